"""What the DP noise layer's Gaussian draws cost, and whether an exact sampler is faster than torch.randn.

One training step of DiPSeN on MNIST (batch 32) draws 32 x 32 x 14 x 14 = 200,704 Gaussian numbers.
This prints the median time of each way to draw them (one thread, as in the engine's workers),
against one forward+backward step of the CNN and of DiPSeN, measured in the same run:

    python benchmarks/noise_sampling.py [--repeats 300] [--warmup 20] [--smoke]

Each sampler's median is over ``--repeats`` calls (drawing for 16 batches at once: a sixth of them), a
training step's over two thirds of them, each after ``--warmup`` calls.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dipsen.models import build_model, calibrate_noise

torch.set_num_threads(1)
SHAPE = (32, 32, 14, 14)
# --smoke: medians of a few calls
SMOKE = {"repeats": 6, "warmup": 1}


def median_ms(fn: Callable[[], object], repeats: int = 300, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def step_ms(name: str, repeats: int = 200, warmup: int = 20) -> float:
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10, calibrate_noise())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return median_ms(step, repeats, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=300, help="calls per sampler's median")
    parser.add_argument("--warmup", type=int, default=20, help="calls before each median")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    out = torch.empty(SHAPE)
    samplers: dict[str, Callable[[], object]] = {
        "torch.randn (what the layer uses)": lambda: torch.randn(SHAPE),
        "torch.randn into a preallocated tensor": lambda: torch.randn(SHAPE, out=out),
        "torch.rand (uniforms only: the generator's share)": lambda: torch.rand(SHAPE),
        "torch.randn in bfloat16": lambda: torch.randn(SHAPE, dtype=torch.bfloat16),
        "torch.randn for 16 batches at once, per batch": lambda: torch.randn((16 * SHAPE[0], *SHAPE[1:])),
    }
    for bit_generator in (np.random.SFC64, np.random.PCG64):
        rng = np.random.Generator(bit_generator(0))
        label = f"numpy {bit_generator.__name__} ziggurat, float32"
        samplers[label] = lambda rng=rng: rng.standard_normal(SHAPE, dtype=np.float32)
    step_repeats = max(1, args.repeats * 2 // 3)
    cnn, dipsen = step_ms("cnn", step_repeats, args.warmup), step_ms("dipsen", step_repeats, args.warmup)
    print(f"one training step, batch 32: CNN {cnn:.2f} ms, DiPSeN {dipsen:.2f} ms (ratio {dipsen / cnn:.3f})\n")
    print(f"{'sampler of 200,704 N(0,1) numbers':<52} ms     share of a DiPSeN step")
    for label, fn in samplers.items():
        ms = median_ms(fn, max(1, args.repeats // 6) if "16 batches" in label else args.repeats, args.warmup)
        if "16 batches" in label:
            ms /= 16
        print(f"{label:<52} {ms:6.3f} {ms / dipsen:8.1%}")


if __name__ == "__main__":
    main()
