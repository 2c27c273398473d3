"""CLI commands of the robustness side: ``attack``, ``reproduce`` and ``sweep-sigma``.

Registered on :data:`dipsen.cli.app`; kept apart so each file stays short.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from ..errors import DipsenError
from .app import DEVICE_HELP, app, console, device_option, progress_bar


def _factory(progress: Progress):
    """A ProgressFactory drawing one bar per attack."""

    def factory(description: str, total: int):
        task = progress.add_task(description, total=total)
        return lambda done: progress.advance(task, done)

    return factory


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DipsenError(f"{option} must be comma-separated numbers, got {text!r}") from None


@app.command()
def attack(
    run_dir: Annotated[Path, typer.Argument(help="A trained run folder.")],
    attack: Annotated[str, typer.Option(help="fgsm | bim | pgd | apgd-ce | apgd-dlr | square | hsj")] = "pgd",
    eps: Annotated[float, typer.Option(help="L-inf radius, inputs in [0, 1].")] = 0.3,
    threat: Annotated[str, typer.Option(help="white-box | orange-box | transfer | query")] = "white-box",
    protocol: Annotated[
        str, typer.Option(help="paper (ART defaults, single-draw gradients) | adaptive (EOT, smaller steps, restarts)")
    ] = "paper",
    gradient: Annotated[str | None, typer.Option(help="draw | eot | frozen | off (default: from --protocol)")] = None,
    eot_draws: Annotated[int, typer.Option(help="Noise draws per EOT gradient.")] = 16,
    iterations: Annotated[int | None, typer.Option(help="Iterations of BIM/PGD/APGD (paper 100, adaptive 100).")] = None,
    restarts: Annotated[int | None, typer.Option(help="Random starts of PGD/APGD (paper 0, adaptive 2).")] = None,
    queries: Annotated[int | None, typer.Option(help="Square attack iterations.")] = None,
    stale_rounds: Annotated[int, typer.Option(help="Orange-box: the attacker's checkpoint is this many rounds old.")] = 5,
    samples: Annotated[int, typer.Option(help="Seeded test examples to attack.")] = 500,
    mc_samples: Annotated[int, typer.Option(help="Draws of the Monte-Carlo prediction rule.")] = 16,
    eps_sweep: Annotated[str | None, typer.Option(help="Comma-separated eps values: plot accuracy against eps.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Attack a run's final global model; prints and saves clean and adversarial metrics."""
    from ..attack import ADAPTIVE_BUDGET, PAPER_BUDGET, AttackSetup, RobustnessEvaluation, TrainedRun
    from ..data._io import write_atomic
    from ..report import plots

    where = device_option(device)
    if protocol not in ("paper", "adaptive"):
        raise DipsenError(f"--protocol must be paper or adaptive, got {protocol!r}")
    budget = PAPER_BUDGET if protocol == "paper" else ADAPTIVE_BUDGET
    budget = replace(
        budget, **{k: v for k, v in (("iterations", iterations), ("restarts", restarts), ("queries", queries)) if v is not None}
    )
    default_gradient = "eot" if protocol == "adaptive" else "draw"
    setup = AttackSetup(attack, eps, threat, gradient or default_gradient, eot_draws, budget)
    sweep = _floats(eps_sweep, "--eps-sweep") if eps_sweep else None
    trained = TrainedRun(run_dir, device=where)
    evaluation = RobustnessEvaluation(trained, samples, mc_samples=mc_samples, stale_rounds=stale_rounds, seed=seed)
    out = trained.path / "attacks"  # created only once there are results: a failed attack leaves nothing behind
    with progress_bar(remaining=False) as progress:
        factory = _factory(progress)
        clean = evaluation.clean()
        if sweep:
            results = [evaluation.run(replace(setup, eps=e), factory(f"eps {e:g}", samples)) for e in sweep]
        else:
            results = [evaluation.run(setup, factory(setup.label, samples))]
    name = setup.label.replace(" ", "_").replace("=", "")
    if sweep:
        name = name.replace(f"eps{eps:g}_", "eps-sweep_")
        curve = {
            "eps": [0.0, *sweep],
            "chance": evaluation.chance,
            "adaptive" if setup.gradient == "eot" else "single-draw": {
                **{r: [clean.accuracy(r)] + [x.accuracy(r) for x in results] for r in ("single", "mc")},
                "attack": setup.label.replace(f"eps={eps:g} ", ""),
            },
        }
        out.mkdir(exist_ok=True)
        plots.robustness_curves({trained.config.model: {"sweep": curve}}, trained.config.dataset, out / f"{name}.png")
        console.print(f"plot: {out / (name + '.png')}")
    record = {
        "run": str(trained.path),
        "model": trained.config.model,
        "randomized": evaluation.randomized,
        "samples": len(evaluation.data.y_eval),
        "chance": evaluation.chance,
        "clean": clean.to_dict(),
        "results": [r.to_dict() for r in results],
    }
    write_atomic(out / f"{name}.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
    _print_attack(evaluation, clean, results, mc_samples)
    console.print(f"saved: {out / (name + '.json')}")


def _print_attack(evaluation, clean, results, mc_samples: int) -> None:
    rules = ("single", "mc") if evaluation.randomized else ("single",)
    names = {"single": "1 draw" if evaluation.randomized else "deterministic", "mc": f"mean of {mc_samples}"}
    setup = results[-1].setup
    gradient = f"eot{setup.eot_draws}" if setup.gradient == "eot" else setup.gradient
    table = Table(
        title=f"{evaluation.trained.config.model} on {len(evaluation.data.y_eval)} examples: {setup.threat}, gradient {gradient}"
    )
    for column in ("", "rule", "accuracy", "precision", "recall", "F1", "seconds"):
        table.add_column(column, justify="left" if column in ("", "rule") else "right")
    for result in [clean, *results]:
        label = f"{result.setup.attack} eps={result.setup.eps:g}" if result.setup else "clean"
        for rule in rules:
            m = result.metrics[rule]
            table.add_row(
                label,
                names[rule],
                f"{m['accuracy']:.4f}",
                f"{m['macro']['precision']:.4f}",
                f"{m['macro']['recall']:.4f}",
                f"{m['macro']['f1']:.4f}",
                f"{result.seconds:.1f}",
            )
    console.print(table)
    last = results[-1].metrics["single"]
    support = ", ".join(f"{c['class']}: {c['support']}" for c in last["per_class"])
    console.print(f"support: {support}  (precision/recall/F1 are macro averages; per class in the JSON)")


def _resumed(resume: Path, given: dict[str, object], before: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options the study or sweep in ``resume`` was started with, refused beside options of its own; an option of
    ``before`` that an older folder lacks reads as its value there (:func:`~dipsen.report.reproduce.recorded_options`)."""
    from ..report.reproduce import OPTIONS_FILE, recorded_options

    flags = [flag for flag, value in given.items() if value is not None]
    if flags:
        raise DipsenError(f"--resume reads its options from {resume / OPTIONS_FILE}; drop {', '.join(flags)}")
    return recorded_options(resume, before)


_RESUME_HELP = (
    "Finish the {} begun in this folder, with the options it was started with: finished runs and "
    "measurements are kept, an unfinished run resumes from its last checkpoint."
)
_RAY_HELP = (
    "Run the {} as Ray tasks: local (a Ray started here), auto or HOST:PORT (a running cluster; the output "
    "folder must be on storage every node sees). Progress is then per finished {}."
)


@app.command()
def reproduce(
    out: Annotated[Path | None, typer.Option(show_default="report", help="Report folder (must be new or empty).")] = None,
    quick: Annotated[bool | None, typer.Option("--quick", help="Small subsets and budgets: a few minutes, a smoke test.")] = None,
    datasets: Annotated[
        str | None, typer.Option(show_default="mnist,socofing,ctu13", help="Comma-separated: mnist,socofing,ctu13")
    ] = None,
    every_attack_on_all: Annotated[
        bool | None,
        typer.Option(
            "--every-attack-on-all",
            help="Run every adaptive attack and threat model on every example, for each one's standalone figure "
            "(default: a cascade, each only on the examples the attacks before it left correct; the same worst case).",
        ),
    ] = None,
    train_dtype: Annotated[
        str | None,
        typer.Option(
            show_default="float32",
            help="float32 | bfloat16: train every model of the study with its local steps' forward passes under bfloat16 "
            "autocast (as dipsen train --train-dtype; weights, optimizer and loss stay float32). Evaluation, attacks "
            "and certificates run in float32 either way. Recorded with the study and stated in its report.",
        ),
    ] = None,
    resume: Annotated[Path | None, typer.Option(help=_RESUME_HELP.format("study"))] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP + " Not an option of the study: it may change on --resume.")] = "auto",
    ray_address: Annotated[
        str | None,
        typer.Option(metavar="local|auto|HOST:PORT", help=_RAY_HELP.format("models (each trained, then studied)", "model")),
    ] = None,
) -> None:
    """Train CNN, DiPSeN, FAT and smoothed CNNs on each data set, attack and certify them, write the report."""
    from ..attack.study import StudySettings
    from ..report import reproduce as run_study
    from ..report.paper import DATASETS
    from ..report.reproduce import OPTIONS_BEFORE

    device_option(device)  # before any work
    if resume is not None:
        given: dict[str, object] = {"--out": out, "--quick": quick, "--datasets": datasets, "--train-dtype": train_dtype}
        options = _resumed(resume, {**given, "--every-attack-on-all": every_attack_on_all}, OPTIONS_BEFORE)
        out, quick, chosen, train_dtype = resume, options["quick"], tuple(options["datasets"]), options["train_dtype"]
        every_attack_on_all = options["settings"]["every_attack_on_all"]
    else:
        chosen = tuple(d.strip() for d in (datasets or ",".join(DATASETS)).split(",") if d.strip())
    settings = replace(StudySettings.quick() if quick else StudySettings(), every_attack_on_all=bool(every_attack_on_all))
    with progress_bar(remaining=False) as progress:
        path = run_study(
            out or Path("report"),
            quick=bool(quick),
            datasets=chosen,
            settings=settings,
            progress=_factory(progress),
            resume=resume is not None,
            device=device,
            ray_address=ray_address,
            train_dtype=train_dtype or "float32",
        )
    console.print(f"report: {path} and {path.with_suffix('.html')}")


@app.command("sweep-sigma")
def sweep_sigma_cmd(
    dataset: Annotated[str | None, typer.Option(show_default="mnist", help="mnist | socofing | ctu13")] = None,
    sigmas: Annotated[
        str | None, typer.Option(show_default="0,0.05,0.1,0.2537,0.5", help="Comma-separated noise multipliers.")
    ] = None,
    out: Annotated[Path | None, typer.Option(show_default="sigma-sweep", help="Output folder (must be new or empty).")] = None,
    quick: Annotated[bool | None, typer.Option("--quick", help="Small subsets and budgets: a smoke test.")] = None,
    resume: Annotated[Path | None, typer.Option(help=_RESUME_HELP.format("sweep"))] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP + " Not an option of the sweep: it may change on --resume.")] = "auto",
    ray_address: Annotated[
        str | None,
        typer.Option(metavar="local|auto|HOST:PORT", help=_RAY_HELP.format("points (each trained, then measured)", "point")),
    ] = None,
) -> None:
    """Train DiPSeN at several noise levels; plot clean, attacked and certified accuracy against sigma."""
    from ..report.sigma import sweep_sigma

    device_option(device)  # before any work
    if resume is not None:
        options = _resumed(resume, {"--dataset": dataset, "--sigmas": sigmas, "--out": out, "--quick": quick})
        out, dataset, values, quick = resume, options["dataset"], options["sigmas"], options["quick"]
    else:
        values = _floats(sigmas or "0,0.05,0.1,0.2537,0.5", "--sigmas")
    with progress_bar(remaining=False) as progress:
        path = sweep_sigma(
            out or Path("sigma-sweep"),
            dataset or "mnist",
            values,
            quick=bool(quick),
            progress=_factory(progress),
            resume=resume is not None,
            device=device,
            ray_address=ray_address,
        )
    console.print(f"saved: {path}")
