"""Final test metrics and cost per step of every model on every data set (paper's Table I / Fig. 3 / Fig. 4).

Trains each (data set, model) pair with the data set's packaged settings (``dipsen/configs/DATASET.toml``,
the ones ``dipsen reproduce`` uses; ``--rounds`` / ``--local-epochs`` override them) through the
in-process engine, keeps the run folders, and prints a markdown table of accuracy, macro F1 and mean time per local
step; randomized models are scored with both prediction rules (one draw, and the mean softmax of
``--mc-samples`` draws, same weights).

Usage: python benchmarks/accuracy_table.py [--datasets mnist socofing ctu13] [--models cnn dipsen ...]
       [--socofing-task gender] [--rounds N] [--local-epochs E] [--out runs/table] [--smoke]

``--smoke``: MNIST and SOCOFing, every model, one round of one local epoch on 4 clients (2 a round) holding
200 training images, 100 test images, trained in this process, run folders in a temporary folder (unless
``--out`` is given): checks that the script runs end to end; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dipsen.data import DATASETS
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.engine import derive_seed
from dipsen.metrics import evaluate_model
from dipsen.models import MODELS
from dipsen.report.reproduce import paper_config

SMOKE = {"datasets": ["mnist", "socofing"], "rounds": 1, "local_epochs": 1, "mc_samples": 2}
SMOKE_SETTINGS = {"clients": 4, "fraction": 0.5, "train_subset": 200, "test_subset": 100, "workers": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-epochs", type=int, default=None)
    parser.add_argument("--socofing-task", default=None, help="SOCOFing's label (default: the config's, hand-finger)")
    parser.add_argument("--mc-samples", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="folder of the run folders (default: runs/table)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
        if args.out is None:
            with tempfile.TemporaryDirectory() as tmp:
                table(args, Path(tmp), SMOKE_SETTINGS)
            return
    table(args, args.out or Path("runs/table"), SMOKE_SETTINGS if args.smoke else {})


def table(args: argparse.Namespace, out: Path, overrides: dict) -> None:
    """Train every (data set, model) pair into run folders under ``out``; print each result, then the table."""
    rows = []
    for name in args.datasets:
        settings = {"rounds": args.rounds, "local_epochs": args.local_epochs, **overrides}
        if name == "socofing":
            settings["socofing_task"] = args.socofing_task
        data = paper_config(name, "cnn", **settings).load_dataset()
        for model in args.models:
            cfg = paper_config(name, model, **settings)
            start = time.perf_counter()
            job = FederatedTraining(cfg, data)
            metrics = train(job, RunDir.create(out, cfg))
            wall = time.perf_counter() - start
            mc = None
            if job.model.is_randomized:
                torch.manual_seed(derive_seed(cfg.seed, 99))
                mc = evaluate_model(job.model, job.x_test, job.y_test, data.classes, args.mc_samples)
            rows.append((name, model, metrics, mc, wall))
            scores = f"acc {metrics['accuracy']:.4f} ({metrics['prediction_rule']})"
            if mc:
                scores += f", {mc['accuracy']:.4f} ({mc['prediction_rule']})"
            print(
                f"{name:9} {model:10} {cfg.rounds} rounds, E={cfg.local_epochs}, {cfg.optimizer} lr {cfg.lr}: {scores}"
                f", step {metrics['cost']['mean_step_seconds'] * 1e3:.2f} ms, {wall:.0f} s",
                flush=True,
            )

    draws = f"accuracy, mean of {args.mc_samples} draws"
    print(f"\n| data set | model | accuracy, one draw | {draws} | macro F1 | ms per local step |")
    print("|---|---|---|---|---|---|")
    for name, model, m, mc, _ in rows:
        mc_acc = f"{mc['accuracy']:.4f}" if mc else "(deterministic)"
        print(
            f"| {name} | {model} | {m['accuracy']:.4f} | {mc_acc} | {m['macro']['f1']:.4f} "
            f"| {m['cost']['mean_step_seconds'] * 1e3:.2f} |"
        )


if __name__ == "__main__":
    main()
