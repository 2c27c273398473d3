"""The in-process engine against the Flower simulation, on the same federated workload, in one run.

Workload: MNIST, K=200 clients (IID), C=0.1 (20 clients per round), E=1, B=32, 10 rounds, for the
CNN and for DiPSeN. Each run is ``dipsen train`` in a subprocess, as a user starts it, with the
default worker count (one client-training process per core; in Flower, that many Ray actors).

Per engine and model it prints:
- start-up: from launching the command to round 1 starting (imports, data, worker processes;
  for Flower also the SuperLink, ``flwr run``, Ray and its actors, and node discovery);
- round 1 and the median of rounds 2..10, as wall time between the rounds' metrics lines, and of
  those rounds the median client-training + aggregation time and test-evaluation time as the
  engine records them;
- teardown: from the last round's metrics line to the command's exit (final evaluation,
  stopping workers or the SuperLink and Ray);
- the whole run's wall time and final test accuracy;
- peak memory of all processes: PSS summed over the process tree (``PeakMemory``).

Usage: python benchmarks/engine_compare.py [--rounds 10] [--models cnn dipsen] [--json out.json] [--smoke]

``--smoke``: 2 rounds of the CNN on 20 clients holding 1,000 MNIST images, 200 test images, one
worker, the in-process engine only (a Flower simulation takes about a minute to start, and
tests/federated/test_flower*.py cover that engine; ``--smoke --engines inprocess flower`` runs
both): checks that the script runs end to end; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import PeakMemory

from dipsen.federated.run_dir import RunDir

WORKLOAD = {"dataset": "mnist", "clients": 200, "fraction": 0.1, "local-epochs": 1, "batch-size": 32, "seed": 0}
SMOKE = {"rounds": 2, "models": ["cnn"], "engines": ["inprocess"]}
SMOKE_WORKLOAD = {**WORKLOAD, "clients": 20, "train-subset": 1000, "test-subset": 200, "workers": 1}


def run_engine(engine: str, model: str, rounds: int, out: Path, workload: dict = WORKLOAD) -> dict:
    """Train once with ``dipsen train --engine engine``; time it from outside, watching the run folder."""
    flags = [part for name, value in workload.items() for part in (f"--{name}", str(value))]
    args = [
        sys.executable,
        "-m",
        "dipsen",
        "train",
        "--engine",
        engine,
        "--model",
        model,
        *flags,
        "--rounds",
        str(rounds),
        "--out",
        str(out),
    ]
    line_seen: dict[int, float] = {}  # round -> when its metrics line appeared
    # stderr to a file: a pipe nobody reads while the run lasts would block the command once it is full
    with tempfile.TemporaryFile() as stderr, PeakMemory(interval=0.25) as memory:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
        while proc.poll() is None:
            folders = list(out.iterdir())
            if folders:
                for record in RunDir(folders[0]).metrics():
                    line_seen.setdefault(record["round"], time.perf_counter() - start)
            time.sleep(0.05)
        end = time.perf_counter() - start
        if proc.returncode != 0:
            stderr.seek(0)
            raise SystemExit(f"{engine}/{model} failed: {stderr.read().decode(errors='replace')[-3000:]}")
    (folder,) = out.iterdir()
    run = RunDir(folder)
    history = run.metrics()
    first = history[0]
    round1_start = line_seen[1] - first["train_seconds"] - first["eval_seconds"]
    later = [line_seen[r] - line_seen[r - 1] for r in range(2, rounds + 1)]
    return {
        "engine": engine,
        "model": model,
        "startup_seconds": round1_start,
        "round1_seconds": line_seen[1] - round1_start,
        "median_round_seconds": statistics.median(later) if later else None,
        "median_train_seconds": statistics.median(r["train_seconds"] for r in history[1:]) if later else None,
        "median_eval_seconds": statistics.median(r["eval_seconds"] for r in history[1:]) if later else None,
        "teardown_seconds": end - line_seen[rounds],
        "whole_run_seconds": end,
        "final_accuracy": run.read_json("final_metrics.json")["accuracy"],
        "peak_pss_gb": memory.peak_bytes / 1024**3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["cnn", "dipsen"])
    parser.add_argument("--engines", nargs="+", default=["inprocess", "flower"], choices=["inprocess", "flower"])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    workload = SMOKE_WORKLOAD if args.smoke else WORKLOAD
    results = []
    header = (
        f"{'engine':<10} {'model':<7} {'start-up':>9} {'round 1':>8} {'rounds 2+':>10} {'(train':>7} {'eval)':>6} "
        f"{'teardown':>9} {'whole':>7} {'acc':>7} {'PSS GB':>7}"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for engine in args.engines:
                out = Path(tmp) / f"{engine}-{model}"
                out.mkdir()
                r = run_engine(engine, model, args.rounds, out, workload)
                results.append(r)
                later = " ".join(
                    f"{r[k]:{w}.2f}" if r[k] is not None else f"{'-':>{w}}"
                    for k, w in (("median_round_seconds", 10), ("median_train_seconds", 7), ("median_eval_seconds", 6))
                )
                print(
                    f"{engine:<10} {model:<7} {r['startup_seconds']:9.1f} {r['round1_seconds']:8.2f} {later} "
                    f"{r['teardown_seconds']:9.1f} {r['whole_run_seconds']:7.1f} {r['final_accuracy']:7.4f} "
                    f"{r['peak_pss_gb']:7.2f}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
