"""What the DP noise layer's Gaussian draws cost, and whether an exact sampler is faster than torch.randn.

One training step of DiPSeN on MNIST (batch 32) draws 32 x 32 x 14 x 14 = 200,704 Gaussian numbers.
This prints the median time of each way to draw them (one thread, as in the engine's workers),
against one forward+backward step of the CNN and of DiPSeN, measured in the same run:

    python benchmarks/noise_sampling.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dipsen.models import build_model, calibrate_noise

torch.set_num_threads(1)
SHAPE = (32, 32, 14, 14)


def median_ms(fn: Callable[[], object], repeats: int = 300) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def step_ms(name: str) -> float:
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10, calibrate_noise())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return median_ms(step, 200)


def main() -> None:
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
        samplers[f"numpy {bit_generator.__name__} ziggurat, float32"] = lambda rng=rng: rng.standard_normal(SHAPE, dtype=np.float32)
    cnn, dipsen = step_ms("cnn"), step_ms("dipsen")
    print(f"one training step, batch 32: CNN {cnn:.2f} ms, DiPSeN {dipsen:.2f} ms (ratio {dipsen / cnn:.3f})\n")
    print(f"{'sampler of 200,704 N(0,1) numbers':<52} ms     share of a DiPSeN step")
    for label, fn in samplers.items():
        ms = median_ms(fn, 50 if "16 batches" in label else 300)
        if "16 batches" in label:
            ms /= 16
        print(f"{label:<52} {ms:6.3f} {ms / dipsen:8.1%}")


if __name__ == "__main__":
    main()
