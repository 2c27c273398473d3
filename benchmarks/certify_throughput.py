"""Certification throughput against the forward-only ceiling, measured in the same run.

Ceiling: plain ``model(x)`` under ``torch.inference_mode()`` on batches of ``--batch`` noisy copies of
one input (what certification evaluates), in images per second. Certification: ``Smooth.counts``
(noise drawing, forward, argmax, counting) and ``pixeldp_certify`` for the same number of draws.
The ratio is certification / ceiling, best of ``--repeats``, interleaved.

Usage: python benchmarks/certify_throughput.py [--draws 10000] [--batch 1000] [--repeats 3] [--threads 2] [--smoke]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from dipsen.certify import Smooth, pixeldp_certify
from dipsen.models import build_model, calibrate_noise

# --smoke: 200 draws in batches of 100, one repeat, 1 thread
SMOKE = {"draws": 200, "batch": 100, "repeats": 1, "threads": 1}


def best_rate(work, images: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return images / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    noise = calibrate_noise(None, 1.0, 0.05, 0.1)
    x = torch.rand(1, 28, 28)
    print(f"MNIST-shaped input, {args.draws} draws in batches of {args.batch}, {args.threads} threads, best of {args.repeats}")
    print(f"{'model':8} {'method':10} {'ceiling img/s':>14} {'certify img/s':>14} {'ratio':>6}")
    for name, method in (("cnn", "smoothing"), ("dipsen", "smoothing"), ("dipsen", "pixeldp")):
        model = build_model(name, (1, 28, 28), 10, noise).eval()

        def ceiling(model: torch.nn.Module = model) -> None:
            with torch.inference_mode():
                for start in range(0, args.draws, args.batch):
                    size = min(args.batch, args.draws - start)
                    model(x.expand(size, *x.shape) + torch.randn(size, *x.shape))

        smooth = Smooth(model, 10, 0.25, args.batch)
        if method == "smoothing":
            certify = partial(smooth.counts, x, args.draws)
        else:
            certify = partial(pixeldp_certify, model, x, args.draws, 0.001, noise)
        rates = [best_rate(work, args.draws, args.repeats) for work in (ceiling, certify)]
        print(f"{name:8} {method:10} {rates[0]:>14.0f} {rates[1]:>14.0f} {rates[1] / rates[0]:>6.2f}")


if __name__ == "__main__":
    main()
