"""``dipsen poison-study``: the robust aggregators against simulated malicious clients (see dipsen.report.poisoning)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import DipsenError
from .app import DEVICE_HELP, app, console, progress_bar
from .robustness import _RAY_HELP, _RESUME_HELP, _floats, _resumed


def _names(text: str | None) -> list[str] | None:
    return None if text is None else text.split(",")


@app.command("poison-study")
def poison_study_cmd(
    dataset: Annotated[str | None, typer.Option(show_default="mnist", help="mnist | ctu13")] = None,
    attacks: Annotated[
        str | None,
        typer.Option(
            show_default="model-replacement,sign-flip,alie,ipm,min-max,min-sum,mimic,fang-krum,fang-trim,fltrust-adaptive",
            help="Comma-separated: model-replacement, sign-flip, gaussian, label-flip, scaled-count, alie, ipm, "
            "min-max, min-sum, mimic, fang-krum, fang-trim, fltrust-adaptive, and the backdoors backdoor-data, "
            "backdoor-replacement, dba, alie-backdoor; a variant sets options for its runs: "
            "ATTACK:OPTION=VALUE[;...], OPTION z (alie, alie-backdoor), alpha (alie-backdoor's loss weight), eps (ipm), "
            "perturbation (min-max, min-sum), knowledge, "
            "rate, rounds and epochs (the backdoors' poison rate, window A-B and local epochs): ipm:eps=10, dba:rounds=5-15.",
        ),
    ] = None,
    aggregators: Annotated[
        str | None,
        typer.Option(
            show_default="every rule",
            help="Comma-separated defences: fedavg, trimmed-mean, median, krum, multi-krum, bulyan, centered-clipping, "
            "fltrust, dnc, flame, each also after a pre-aggregation: bucketing+RULE, nnm+RULE (e.g. nnm+centered-clipping).",
        ),
    ] = None,
    fractions: Annotated[
        str | None,
        typer.Option(
            show_default="0,0.2",
            help="Comma-separated shares f of malicious clients, in [0, 1); f = 0 runs once per aggregator.",
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(show_default="cnn, or the --config file's", help="Model of every run (see dipsen train).")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(show_default="mnist 20, ctu13 the TOML's", help="Rounds of every run (README: how chosen).")
    ] = None,
    clients: Annotated[int | None, typer.Option(show_default="the TOML's (200)", help="K, number of clients.")] = None,
    fraction: Annotated[
        float | None, typer.Option(show_default="the TOML's (0.1)", help="C, fraction of clients per round.")
    ] = None,
    local_epochs: Annotated[int | None, typer.Option(show_default="the TOML's", help="E, local epochs per round.")] = None,
    device: Annotated[
        str | None, typer.Option(show_default="auto, or the --config file's", help=DEVICE_HELP + " Recorded with the study.")
    ] = None,
    train_subset: Annotated[
        int | None, typer.Option(show_default="mnist 20000, ctu13 all", help="Use a seeded random subset of the training set.")
    ] = None,
    test_subset: Annotated[
        int | None, typer.Option(show_default="mnist 2000, ctu13 all", help="Evaluate on a seeded random subset of the test set.")
    ] = None,
    partition: Annotated[
        str | None, typer.Option(show_default="iid", help="iid | dirichlet | shards: how the clients' data is split.")
    ] = None,
    dirichlet_alpha: Annotated[
        float | None, typer.Option(show_default="0.5", help="Dirichlet concentration (--partition dirichlet).")
    ] = None,
    target_accuracy: Annotated[
        float | None,
        typer.Option(help="Also report the rounds until the test accuracy first reached this (the runs do not stop on it)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            show_default="src/dipsen/configs/DATASET.toml",
            help="TOML file of training options for every run; the flags above override it.",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(show_default="poison-study", help="Output folder (must be new or empty).")] = None,
    resume: Annotated[Path | None, typer.Option(help=_RESUME_HELP.format("study"))] = None,
    ray_address: Annotated[
        str | None, typer.Option(metavar="local|auto|HOST:PORT", help=_RAY_HELP.format("grid's runs", "run"))
    ] = None,
    merge: Annotated[
        list[Path] | None,
        typer.Option(
            help="A finished study folder, or a report an earlier --merge wrote, repeated: one report in --out of "
            "studies of the same settings (attacks, defences and f their union; the runs stay where they are). "
            "Takes no other flag.",
        ),
    ] = None,
) -> None:
    """Train under simulated poisoning: attack x aggregator x malicious share f; write a table and a plot."""
    from ..report.poisoning import DEFAULT_AGGREGATORS, DEFAULT_ATTACKS, DEFAULT_FRACTIONS, poison_study, study_options

    given: dict[str, object] = {
        "--dataset": dataset,
        "--attacks": attacks,
        "--aggregators": aggregators,
        "--fractions": fractions,
        "--model": model,
        "--rounds": rounds,
        "--clients": clients,
        "--fraction": fraction,
        "--local-epochs": local_epochs,
        "--device": device,
        "--train-subset": train_subset,
        "--test-subset": test_subset,
        "--partition": partition,
        "--dirichlet-alpha": dirichlet_alpha,
        "--target-accuracy": target_accuracy,
        "--config": config,
        "--out": out,
    }
    if merge:
        from ..report.poisoning import merge_studies

        if extra := [flag for flag, value in given.items() if value is not None and flag != "--out"] + [
            flag for flag, value in (("--resume", resume), ("--ray-address", ray_address)) if value is not None
        ]:
            raise DipsenError(f"--merge takes only --out, not {', '.join(extra)}")
        path = merge_studies(out or Path("poison-study"), merge)
        console.print(f"saved: {path} and {path.with_name('poisoning.json')}")
        return
    if resume is not None:
        options, folder = _resumed(resume, given), resume
    else:
        options = study_options(
            dataset or "mnist",
            _names(attacks) or DEFAULT_ATTACKS,
            _names(aggregators) or DEFAULT_AGGREGATORS,
            DEFAULT_FRACTIONS if fractions is None else _floats(fractions, "--fractions"),
            target_accuracy=target_accuracy,
            config_file=config,
            train={
                "model": model,
                "rounds": rounds,
                "clients": clients,
                "fraction": fraction,
                "local_epochs": local_epochs,
                "device": device,
                "train_subset": train_subset,
                "test_subset": test_subset,
                "partition": partition,
                "dirichlet_alpha": dirichlet_alpha,
            },
        )
        folder = out or Path("poison-study")
    with progress_bar() as progress:
        task = progress.add_task("poison-study", total=None)

        def on_progress(description: str, done: float, total: int) -> None:
            progress.update(task, description=description, completed=done, total=total)

        path = poison_study(folder, options, resume=resume is not None, on_progress=on_progress, ray_address=ray_address)
    console.print(f"saved: {path}, {path.with_name('poisoning.json')} and {path.with_name('poisoning.png')}")
