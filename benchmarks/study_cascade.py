"""The study's attack cascade against every attack on every example: time and worst case on the same model, in one run.

For each model, ``study_run`` twice on the same examples: as a cascade (the default) and with
``every_attack_on_all``. Printed per mode: the study's wall time, the crafting time of the attacks
the cascade changes (the adaptive ones, the doubled-iteration run and the threat models: each
result's ``seconds``), how many examples those attacked, and the worst case under both prediction
rules. The paper's attacks, the eps sweep and the protocol variants run on every example in both
modes, so they are in the wall times but not in the crafting times. The two worst cases are the
same per-example minimum; they differ only through the random attacks' draws.

Usage: python benchmarks/study_cascade.py [RUN ...] [--samples 40] [--eps 0.3] [--budgets quick] [--threads 2] [--smoke]

Without RUN: the CNN and DiPSeN trained centrally on 3,000 MNIST images for 3 epochs (as the tests'
fixtures), in a temporary folder. ``--budgets quick`` is ``StudySettings.quick()``'s sizes (10
iterations, EOT-4), ``full`` the study's (50 iterations, EOT-16), both on ``--samples`` examples;
the orange-box checkpoint is at most the run's length old.
``--smoke``: 300 images for 1 epoch, 4 examples, quick budgets: checks that the script runs end to
end; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from dipsen.attack import TrainedRun
from dipsen.attack.study import StudySettings, study_run
from dipsen.config import TrainConfig
from dipsen.data import load_dataset
from dipsen.federated import RunDir
from dipsen.models import build_model, calibrate_noise

SMOKE = {"samples": 4, "budgets": "quick", "threads": 1, "train_images": 300, "epochs": 1}


def central_run(root: Path, model_name: str, images: int, epochs: int) -> Path:
    """A run folder of ``model_name`` trained centrally on the first ``images`` MNIST training images, a checkpoint an epoch."""
    data = load_dataset("mnist")
    config = TrainConfig(dataset="mnist", model=model_name, rounds=epochs, seed=1).validate()
    run = RunDir.create(root, config)
    torch.manual_seed(1)
    noise = calibrate_noise(config.sigma, config.dp_epsilon, config.dp_delta, config.dp_attack_bound)
    model = build_model(model_name, (1, 28, 28), 10, noise)
    run.save_checkpoint(0, model.state_dict())
    x, y = torch.from_numpy(data.x_train[:images]), torch.from_numpy(data.y_train[:images])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in torch.randperm(len(y)).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        run.save_checkpoint(epoch, model.state_dict())
    run.write_json("final_metrics.json", {})
    return run.path


def cascaded_part(study: dict) -> tuple[float, int, int]:
    """Crafting seconds, examples attacked and examples covered of the attacks the cascade runs on fewer examples."""
    results = [*study["adaptive"].values(), study["doubling"]["run"], *study["threats"].values()]
    attacked = sum(r["attacked"].count("1") if "attacked" in r else r["samples"] for r in results)
    return sum(r["seconds"] for r in results), attacked, sum(r["samples"] for r in results)


def compare(runs: list[Path], settings: StudySettings) -> None:
    """Each run's study both ways, interleaved per run, with its times and worst cases."""
    budget = settings.adaptive_budget
    print(f"eps {settings.eps:g}, {settings.samples} examples, adaptive budget {budget}, EOT-{settings.eot_draws}")
    for path in runs:
        trained = TrainedRun(path)
        stale = min(settings.stale_rounds, trained.final_round)  # the orange-box checkpoint of a short run
        seconds = {}
        for every_attack_on_all in (False, True):
            start = time.perf_counter()
            study = study_run(trained, dataclasses.replace(settings, stale_rounds=stale, every_attack_on_all=every_attack_on_all))
            wall = time.perf_counter() - start
            crafting, attacked, covered = cascaded_part(study)
            worst = study["worst_case"]
            mode = "every attack on all" if every_attack_on_all else "cascade"
            seconds[mode] = (wall, crafting)
            print(
                f"  {trained.config.model:<7} {mode:<20} study {wall:7.1f} s; adaptive and threat attacks: "
                f"{crafting:7.1f} s crafting, {attacked:5d} of {covered} examples attacked; "
                f"worst case {worst['single']['all']:.3f} (1 draw) / {worst['mc']['all']:.3f} (mean of {settings.mc_samples})"
            )
        (wall_cascade, crafting_cascade), (wall_all, crafting_all) = seconds["cascade"], seconds["every attack on all"]
        print(
            f"  {trained.config.model:<7} every attack on all / cascade: study {wall_all / wall_cascade:.2f}x; "
            f"adaptive and threat crafting {crafting_all:.1f} s against {crafting_cascade:.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (default: a CNN and a DiPSeN trained here)")
    parser.add_argument("--samples", type=int, default=40, help="evaluation examples of each study")
    parser.add_argument("--eps", type=float, default=0.3, help="the study's L-inf eps (smaller: more survive)")
    parser.add_argument("--budgets", choices=("quick", "full"), default="quick", help="the attacks' sizes (see above)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=3000, help="without RUN: MNIST images each model trains on")
    parser.add_argument("--epochs", type=int, default=3, help="without RUN: epochs each model trains for")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = StudySettings.quick() if args.budgets == "quick" else StudySettings()
    settings = dataclasses.replace(
        settings, eps=args.eps, samples=args.samples, sweep_samples=min(settings.sweep_samples, args.samples)
    )
    if args.runs:
        compare(args.runs, settings)
        return
    with tempfile.TemporaryDirectory() as tmp:
        runs = [central_run(Path(tmp), model, args.train_images, args.epochs) for model in ("cnn", "dipsen")]
        compare(runs, settings)


if __name__ == "__main__":
    main()
