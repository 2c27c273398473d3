"""The models' channels-last layout against the default contiguous one, measured in the same run.

``FederatedNet`` stores its conv weights channels-last (NHWC), so oneDNN runs its convolutions in
that layout. This compares it with a copy converted back to ``torch.contiguous_format`` (the same
weights, the same function) on the three kinds of work the project does, MNIST-shaped inputs:

- inference: a forward pass on a batch of noisy copies of one input (certification's counting loop);
- input gradient: forward and backward to the input (one attack step);
- training step: forward, backward and an Adam step at the clients' batch size (``client_update``).

Rates are best of ``--repeats``, the two layouts interleaved; only the ratio is meant to carry over
to another machine or load.

Usage: python benchmarks/memory_format.py [--repeats 5] [--threads 2] [--iterations 20] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from dipsen.models import build_model, calibrate_noise

# --smoke: one repeat of 2 iterations, 1 thread
SMOKE = {"repeats": 1, "iterations": 2, "threads": 1}

INFERENCE_BATCH = 128  # certification's batch of draws
ATTACK_BATCH = 128
TRAIN_BATCH = 32  # the packaged configs' B


def workloads(model: nn.Module) -> dict[str, tuple[Callable[[], None], int]]:
    """Name -> (one unit of work on ``model``, the images it processes)."""
    x = torch.rand(1, 1, 28, 28)
    attack_x, attack_y = torch.rand(ATTACK_BATCH, 1, 28, 28), torch.randint(0, 10, (ATTACK_BATCH,))
    train_x, train_y = torch.rand(TRAIN_BATCH, 1, 28, 28), torch.randint(0, 10, (TRAIN_BATCH,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def inference() -> None:
        model.eval()
        with torch.inference_mode():
            model(x.expand(INFERENCE_BATCH, -1, -1, -1) + 0.25 * torch.randn(INFERENCE_BATCH, 1, 28, 28))

    def input_gradient() -> None:
        model.eval()
        inputs = attack_x.clone().requires_grad_(True)
        torch.autograd.grad(nn.functional.cross_entropy(model(inputs), attack_y), inputs)

    def training_step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(train_x), train_y).backward()
        optimizer.step()

    return {
        "inference": (inference, INFERENCE_BATCH),
        "input gradient": (input_gradient, ATTACK_BATCH),
        "training step": (training_step, TRAIN_BATCH),
    }


def seconds(work: Callable[[], None], iterations: int) -> float:
    work()  # warm-up: oneDNN picks and caches its kernels on the first call
    start = time.perf_counter()
    for _ in range(iterations):
        work()
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    noise = calibrate_noise(None, 1.0, 0.05, 0.1)
    print(f"MNIST-shaped input, {args.threads} threads, best of {args.repeats} interleaved, {args.iterations} iterations each")
    print(f"{'model':8} {'work':15} {'contiguous img/s':>17} {'channels-last img/s':>20} {'ratio':>6}")
    for name in ("cnn", "dipsen"):
        torch.manual_seed(0)
        channels_last = build_model(name, (1, 28, 28), 10, noise)
        contiguous = copy.deepcopy(channels_last).to(memory_format=torch.contiguous_format)
        layouts = {"contiguous": workloads(contiguous), "channels-last": workloads(channels_last)}
        for work in layouts["contiguous"]:
            best = {layout: float("inf") for layout in layouts}
            for _ in range(args.repeats):
                for layout, loads in layouts.items():
                    best[layout] = min(best[layout], seconds(loads[work][0], args.iterations))
            images = layouts["contiguous"][work][1]
            rates = {layout: images / s for layout, s in best.items()}
            print(
                f"{name:8} {work:15} {rates['contiguous']:>17.0f} {rates['channels-last']:>20.0f} "
                f"{rates['channels-last'] / rates['contiguous']:>6.2f}"
            )


if __name__ == "__main__":
    main()
