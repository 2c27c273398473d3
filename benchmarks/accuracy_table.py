"""Final test metrics and cost per step of every model on every data set (paper's Table I / Fig. 3 / Fig. 4).

Trains each (data set, model) pair with the data set's packaged settings (``dipsen/configs/DATASET.toml``,
the ones ``dipsen reproduce`` uses; ``--rounds`` / ``--local-epochs`` override them) through the
in-process engine, keeps the run folders, and prints a markdown table of accuracy, macro F1 and mean time per local
step; randomized models are scored with both prediction rules (one draw, and the mean softmax of
``--mc-samples`` draws, same weights).

Usage: python benchmarks/accuracy_table.py [--datasets mnist socofing ctu13] [--models cnn dipsen ...]
       [--socofing-task gender] [--rounds N] [--local-epochs E] [--out runs/table]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dipsen.data import DATASETS
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.engine import derive_seed
from dipsen.metrics import evaluate_model
from dipsen.models import MODELS
from dipsen.report.reproduce import paper_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-epochs", type=int, default=None)
    parser.add_argument("--socofing-task", default=None, help="SOCOFing's label (default: the config's, hand-finger)")
    parser.add_argument("--mc-samples", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/table"))
    args = parser.parse_args()

    rows = []
    for name in args.datasets:
        settings = {"rounds": args.rounds, "local_epochs": args.local_epochs}
        if name == "socofing":
            settings["socofing_task"] = args.socofing_task
        data = paper_config(name, "cnn", **settings).load_dataset()
        for model in args.models:
            cfg = paper_config(name, model, **settings)
            start = time.perf_counter()
            job = FederatedTraining(cfg, data)
            metrics = train(job, RunDir.create(args.out, cfg))
            wall = time.perf_counter() - start
            mc = None
            if job.model.is_randomized:
                torch.manual_seed(derive_seed(cfg.seed, 99))
                mc = evaluate_model(job.model, job.x_test, job.y_test, data.classes, args.mc_samples)
            rows.append((name, model, metrics, mc, wall))
            print(f"{name:9} {model:10} {cfg.rounds} rounds, E={cfg.local_epochs}, {cfg.optimizer} lr {cfg.lr}: acc {metrics['accuracy']:.4f} "
                  f"({metrics['prediction_rule']})" + (f", {mc['accuracy']:.4f} ({mc['prediction_rule']})" if mc else "")
                  + f", step {metrics['cost']['mean_step_seconds'] * 1e3:.2f} ms, {wall:.0f} s", flush=True)

    print(f"\n| data set | model | accuracy, one draw | accuracy, mean of {args.mc_samples} draws | macro F1 | ms per local step |")
    print("|---|---|---|---|---|---|")
    for name, model, m, mc, _ in rows:
        mc_acc = f"{mc['accuracy']:.4f}" if mc else "(deterministic)"
        print(f"| {name} | {model} | {m['accuracy']:.4f} | {mc_acc} | {m['macro']['f1']:.4f} "
              f"| {m['cost']['mean_step_seconds'] * 1e3:.2f} |")


if __name__ == "__main__":
    main()
