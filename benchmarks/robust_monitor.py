"""The per-round robust-accuracy monitor against the study's worst case, with its cost.

For each run folder: its final global model, the monitor's validation rows (the engine's own), and
each candidate monitor (``attack-steps``, e.g. ``pgd-10``, ``apgd-ce-20``) on the first ``--samples``
of them, timed; then, with ``--study``, the full robustness study (``dipsen.attack.study_run``, the
adaptive suite) on ``--study-samples`` test images, whose worst case over every attack is the figure
a monitor should come within 3 points of. The cost of each candidate is printed against the run's
median round (``train_seconds`` in metrics.jsonl, which was measured while the run trained, on
whatever else the machine ran then) and against PGD-10 timed in this run.

Usage: python benchmarks/robust_monitor.py RUN [RUN ...] [--candidates pgd-10 pgd-50 apgd-ce-20]
       [--samples 500] [--study] [--study-samples 500] [--threads 2] [--smoke]

``--smoke``: candidates pgd-2 and apgd-ce-2 (and the reference pgd-10) on 8 validation rows, one thread,
and the quick study (``StudySettings.quick()``) on 4 test images; without RUN, a CNN run
adversarially trained (FGSM-RS) for one round on 200 MNIST images in a temporary folder: checks that the
script runs end to end; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dipsen.attack import TrainedRun
from dipsen.attack.domain import feasible_domain
from dipsen.attack.study import StudySettings, study_run
from dipsen.config import TrainConfig
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.adversarial import RobustMonitor
from dipsen.federated.engine import federated_data

SMOKE = {"candidates": ["pgd-2", "apgd-ce-2"], "samples": 8, "study": True, "study_samples": 4, "threads": 1}
# --smoke without RUN: a FAT CNN, one round on 4 clients (2 a round) holding 200 images, trained in this process
SMOKE_RUN = {
    "model": "cnn",
    "adv_train": "fgsm-rs",
    "robust_monitor_steps": 2,
    "robust_monitor_samples": 8,
    "clients": 4,
    "fraction": 0.5,
    "rounds": 1,
    "train_subset": 200,
    "test_subset": 100,
    "workers": 1,
}


def smoke_run(root: Path) -> Path:
    """A run folder trained for --smoke under ``root``."""
    config = TrainConfig(dataset="mnist", **SMOKE_RUN).validate()
    run = RunDir.create(root, config)
    train(FederatedTraining(config, config.load_dataset()), run)
    return run.path


def monitor(name: str, samples: int) -> RobustMonitor:
    attack, _, steps = name.rpartition("-")
    return RobustMonitor(attack, int(steps), samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (at least one without --smoke)")
    parser.add_argument("--candidates", nargs="+", default=["pgd-10", "pgd-50", "apgd-ce-10", "apgd-ce-20", "apgd-ce-40"])
    parser.add_argument("--samples", type=int, default=500, help="validation rows the monitor attacks")
    parser.add_argument("--study", action="store_true", help="also run the full study for its worst case")
    parser.add_argument("--study-samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = StudySettings(samples=args.study_samples)
    if args.smoke:
        settings = dataclasses.replace(StudySettings.quick(), samples=args.study_samples)
        if not args.runs:
            with tempfile.TemporaryDirectory() as tmp:
                compare(args, [smoke_run(Path(tmp))], settings)
            return
    if not args.runs:
        parser.error("the following arguments are required: runs")
    compare(args, args.runs, settings)


def compare(args: argparse.Namespace, runs: list[Path], settings: StudySettings) -> None:
    """For each run: every candidate monitor's accuracy and cost, and with ``args.study`` the study's worst case."""
    for path in runs:
        trained = TrainedRun(path)
        config = trained.config
        data = federated_data(config, trained.dataset)
        x, y = data.x_validation[: args.samples], data.y_validation[: args.samples]
        domain = feasible_domain(trained.dataset)
        rounds = [r["train_seconds"] for r in trained.run.metrics()]
        round_seconds = statistics.median(rounds)
        print(f"{path}: round {trained.final_round}, {len(y)} validation rows, median round {round_seconds:.1f} s")
        reference = None
        for name in ["pgd-10", *[c for c in args.candidates if c != "pgd-10"]]:
            candidate = monitor(name, len(y))
            model = trained.model()
            start = time.perf_counter()
            accuracy = candidate.accuracy(model, x, y, config.adv_eps, domain, config.mc_samples, seed=0)
            seconds = time.perf_counter() - start
            reference = reference or seconds
            print(
                f"  {name:<12} accuracy {accuracy:.3f}  {seconds:6.2f} s  "
                f"{seconds / round_seconds:6.1%} of a median round  {seconds / reference:5.2f}x pgd-10"
            )
        if args.study:
            start = time.perf_counter()
            worst = study_run(trained, settings)["worst_case"]["single"]
            # the study's default cascade has no worst case of the adaptive attacks alone: they skip what the paper's broke
            suite = "adaptive" if "adaptive" in worst else "paper+adaptive"
            print(
                f"  study worst case over every attack, {settings.samples} test images: {worst['all']:.3f} "
                f"({suite} {worst[suite]:.3f}), {time.perf_counter() - start:.0f} s"
            )


if __name__ == "__main__":
    main()
