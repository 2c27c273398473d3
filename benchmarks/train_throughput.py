"""Federated training benchmark: MNIST, K=200 clients, C=0.1, CNN vs DiPSeN, on this machine.

Prints, all measured in one run:
- the machine's ceiling for the workload: the CNN's forward+backward throughput (samples/s) at
  several batch sizes and thread/process layouts, and the best of them;
- for CNN and DiPSeN, trained with the same wall-clock budget: rounds and wall time to reach the
  target test accuracy, final accuracy, training throughput (training + aggregation time, test
  evaluation excluded) and that throughput as a fraction of the ceiling;
- DiPSeN's overhead per training step as a ratio to the CNN, from interleaved step timings;
- peak memory of the whole job: the PSS of the main process and its workers, summed.

Every training step here, the ceiling's and the overhead's included, uses local training's default
optimizer and learning rate (``TrainConfig``'s, what the engine's clients run).

Usage: python benchmarks/train_throughput.py [--budget 300] [--target 0.97] [--json out.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from dipsen.config import TrainConfig
from dipsen.data import load_dataset
from dipsen.federated import FederatedTraining
from dipsen.federated.engine import local_training
from dipsen.models import build_model, calibrate_noise

SHAPE, CLASSES = (1, 28, 28), 10
DEFAULTS = TrainConfig()  # today's local training: its optimizer and learning rate
# --smoke: a few tenths of a second per ceiling layout, one batch size, a one-round budget on a small federation
# trained in this process (no worker processes to start)
SMOKE = {"budget": 0.01, "ceiling_seconds": 0.2, "ceiling_batches": "32", "overhead_blocks": 1, "overhead_steps": 2}
SMOKE_FEDERATION = {"clients": 20, "train_subset": 1000, "test_subset": 200, "workers": 1}


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer a client of the engine trains with, at today's defaults."""
    return local_training(DEFAULTS).make_optimizer(model.parameters())


class PeakMemory:
    """Samples the proportional set size (PSS) of this process and all its descendants.

    PSS splits shared pages (the training set in shared memory, libraries) between the processes
    that map them, so the sum over processes is the memory the whole job really takes.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _tree(pid: int) -> list[int]:
        pids = [pid]
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            for child in task.read_text().split():
                pids += PeakMemory._tree(int(child))
        return pids

    @staticmethod
    def _pss(pid: int) -> int:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            total = 0
            for pid in self._tree(os.getpid()):
                try:
                    total += self._pss(pid)
                except OSError:  # the process ended while being read
                    pass
            self.peak_bytes = max(self.peak_bytes, total)


def _train_steps(model_name: str, batch: int, seconds: float, threads: int) -> tuple[int, float]:
    """Run forward+backward+optimizer steps for ``seconds``; return (samples, elapsed)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name, SHAPE, CLASSES, calibrate_noise())
    opt = make_optimizer(model)
    x, y = torch.rand(batch, *SHAPE), torch.randint(0, CLASSES, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(5):  # warm-up
        step()
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        samples += batch
    return samples, time.perf_counter() - start


def _worker(args) -> tuple[int, float]:
    return _train_steps(*args)


def measure_ceiling(seconds: float = 3.0, batches: tuple[int, ...] = (32, 64, 128, 256)) -> dict:
    threads = torch.get_num_threads()
    layouts = {}
    for batch in batches:
        for t in sorted({1, threads}):
            samples, elapsed = _train_steps("cnn", batch, seconds, t)
            layouts[f"1 process x {t} thread(s), batch {batch}"] = samples / elapsed
        if threads > 1:
            with mp.get_context("spawn").Pool(threads) as pool:
                results = pool.map(_worker, [("cnn", batch, seconds, 1)] * threads)
            layouts[f"{threads} processes x 1 thread, batch {batch}"] = sum(s / e for s, e in results)
    torch.set_num_threads(threads)
    best = max(layouts, key=layouts.get)
    return {"layouts": layouts, "best_layout": best, "ceiling": layouts[best]}


def train_with_budget(model: str, dataset, budget: float, target: float, **overrides) -> dict:
    """Federated rounds (K=200, C=0.1, local training at the defaults) until ``budget`` seconds; ``overrides``: config fields."""
    # every round on the whole test set: the target and the final accuracy are read from the rounds' figures
    settings = {"clients": 200, "fraction": 0.1, "round_eval_size": 0, **overrides}
    cfg = TrainConfig(dataset="mnist", model=model, rounds=10_000, **settings).validate()
    history, wall, reached = [], 0.0, None
    with FederatedTraining(cfg, dataset) as job:  # its worker processes end with the run, before the next model's
        state = {k: v.clone() for k, v in job.model.state_dict().items()}
        while wall < budget:
            state, result = job.run_round(len(history) + 1, state)
            history.append(result)
            wall += result.train_seconds + result.eval_seconds
            print(f"  {model} round {result.round}: acc {result.test_accuracy:.4f}, {wall:.0f} s", flush=True)
            if reached is None and result.test_accuracy >= target:
                reached = {"round": result.round, "wall_seconds": wall}
                if model == "cnn":
                    break
    train_seconds = sum(r.train_seconds for r in history)
    return {
        "optimizer": f"{cfg.optimizer} lr {cfg.lr}, batch {cfg.batch_size}, E={cfg.local_epochs}",
        "rounds_run": len(history),
        "reached_target": reached,
        "final_accuracy": history[-1].test_accuracy,
        "best_accuracy": max(r.test_accuracy for r in history),
        "wall_seconds": wall,
        "train_samples_per_second": sum(r.samples for r in history) / train_seconds,
        "mean_step_seconds": statistics.mean(r.step_seconds for r in history),
        "mean_eval_seconds": statistics.mean(r.eval_seconds for r in history),
    }


def step_overhead(x: torch.Tensor, y: torch.Tensor, threads: int, blocks: int = 15, steps: int = 20) -> dict:
    """Median time per step of CNN and DiPSeN, interleaved block by block on the same batches."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    models = {name: build_model(name, SHAPE, CLASSES, calibrate_noise()) for name in ("cnn", "dipsen")}
    opts = {name: make_optimizer(m) for name, m in models.items()}
    loss_fn = torch.nn.CrossEntropyLoss()
    times: dict[str, list[float]] = {name: [] for name in models}
    batches = list(zip(x.split(32), y.split(32), strict=True))
    for block in range(blocks + 1):
        for name, model in models.items():
            start = time.perf_counter()
            for i in range(steps):
                xb, yb = batches[(block * steps + i) % len(batches)]
                opts[name].zero_grad()
                loss_fn(model(xb), yb).backward()
                opts[name].step()
            if block:  # block 0 is warm-up
                times[name].append((time.perf_counter() - start) / steps)
    torch.set_num_threads(previous)
    cnn, dipsen = statistics.median(times["cnn"]), statistics.median(times["dipsen"])
    return {"threads": threads, "cnn_step_seconds": cnn, "dipsen_step_seconds": dipsen, "ratio": dipsen / cnn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=300.0, help="training wall-clock budget per model (s)")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="time spent on each ceiling layout (s)")
    parser.add_argument("--ceiling-batches", default="32,64,128,256", help="batch sizes of the ceiling's layouts")
    parser.add_argument("--overhead-blocks", type=int, default=15, help="interleaved blocks of the step-overhead timing")
    parser.add_argument("--overhead-steps", type=int, default=20, help="steps per block of the step-overhead timing")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    federation = SMOKE_FEDERATION if args.smoke else {}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; local training {DEFAULTS.optimizer} lr {DEFAULTS.lr}")
    ceiling = measure_ceiling(args.ceiling_seconds, tuple(int(b) for b in args.ceiling_batches.split(",")))
    print("ceiling (CNN forward+backward, samples/s):")
    for layout, value in ceiling["layouts"].items():
        print(f"  {layout:<40} {value:8.0f}")
    print(f"  best: {ceiling['best_layout']} = {ceiling['ceiling']:.0f}")

    mnist = load_dataset("mnist")
    x, y = torch.from_numpy(mnist.x_train[:3200]), torch.from_numpy(mnist.y_train[:3200])
    overhead = [step_overhead(x, y, t, args.overhead_blocks, args.overhead_steps) for t in sorted({1, torch.get_num_threads()})]
    for o in overhead:
        print(
            f"step time, batch 32, {o['threads']} thread(s): CNN {o['cnn_step_seconds'] * 1e3:.2f} ms, "
            f"DiPSeN {o['dipsen_step_seconds'] * 1e3:.2f} ms, DiPSeN/CNN {o['ratio']:.3f}"
        )

    runs = {}
    for model in ("cnn", "dipsen"):
        with PeakMemory() as memory:
            runs[model] = r = train_with_budget(model, mnist, args.budget, args.target, **federation)
        r["peak_pss_gb"] = memory.peak_bytes / 1024**3
        reached = r["reached_target"]
        when = f"round {reached['round']} after {reached['wall_seconds']:.0f} s" if reached else "not reached"
        print(
            f"{model} ({r['optimizer']}): {args.target:.0%} {when}; final acc {r['final_accuracy']:.4f} "
            f"(best {r['best_accuracy']:.4f}) after {r['rounds_run']} rounds / {r['wall_seconds']:.0f} s; "
            f"{r['train_samples_per_second']:.0f} samples/s = "
            f"{r['train_samples_per_second'] / ceiling['ceiling']:.2f} of ceiling; "
            f"eval {r['mean_eval_seconds']:.2f} s/round; peak memory, all processes (PSS) {r['peak_pss_gb']:.2f} GB"
        )
    run_ratio = runs["dipsen"]["mean_step_seconds"] / runs["cnn"]["mean_step_seconds"]
    print(f"DiPSeN/CNN step time within the federated runs: {run_ratio:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"ceiling": ceiling, "overhead": overhead, "runs": runs, "run_step_ratio": run_ratio}, fh, indent=2)


if __name__ == "__main__":
    main()
