"""EOT gradients and noise-layer counts with block 1 run once per input, against a whole-model pass per draw.

An EOT gradient (``dipsen.attack.ExpectedSoftmax``) and a PixelDP count (``class_counts`` on a model
with a noise layer) need ``draws`` noise draws per input. The noise comes after block 1, so
``FederatedNet.forward_draws`` runs block 1 once per input and repeats its output; the other way
repeats the input and runs the whole model on every copy. Both are timed in the same run,
interleaved, best of ``--repeats``, and the ratio is printed.

Usage: python benchmarks/eot_throughput.py [--batch 128] [--draws 16] [--count-draws 2000] [--repeats 3] [--threads 2]
                                          [--smoke]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from dipsen.attack import ExpectedSoftmax
from dipsen.models import build_model, calibrate_noise

# --smoke: 8 inputs, 2 EOT draws, 200 count draws, one repeat, 1 thread
SMOKE = {"batch": 8, "draws": 2, "count_draws": 200, "repeats": 1, "threads": 1}


def seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="inputs per EOT gradient (the study's ART batch)")
    parser.add_argument("--draws", type=int, default=16, help="EOT draws (the study's adaptive attacks use 16)")
    parser.add_argument("--count-draws", type=int, default=2000, help="noise draws of one input's PixelDP count")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("dipsen", (1, 28, 28), 10, calibrate_noise(None, 1.0, 0.05, 0.1)).eval()
    x, y = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))

    def repeated_eot(inputs: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(model(inputs.repeat(args.draws, 1, 1, 1)), dim=1).view(args.draws, len(inputs), -1)
        return torch.logsumexp(log_probs, dim=0) - math.log(args.draws)

    def gradient(view: Callable[[torch.Tensor], torch.Tensor]) -> None:
        inputs = x.clone().requires_grad_(True)
        nn.functional.nll_loss(view(inputs), y).backward()

    one = x[0]

    def counts(shared: bool) -> None:
        with torch.inference_mode():
            for start in range(0, args.count_draws, 128):
                size = min(128, args.count_draws - start)
                logits = model.forward_draws(one.unsqueeze(0), size) if shared else model(one.expand(size, *one.shape))
                torch.bincount(logits.argmax(dim=1), minlength=10)

    shared_view = ExpectedSoftmax(model, args.draws)
    work = {
        "EOT gradient": (lambda: gradient(repeated_eot), lambda: gradient(shared_view), args.batch),
        "PixelDP count": (lambda: counts(False), lambda: counts(True), args.count_draws),
    }
    print(f"DiPSeN, MNIST-shaped input, {args.threads} threads, best of {args.repeats}, interleaved")
    print(f"{'work':14} {'whole model per draw':>22} {'block 1 once':>14} {'speed-up':>9}")
    for name, (whole, shared, inputs) in work.items():
        times = {"whole": float("inf"), "shared": float("inf")}
        for _ in range(args.repeats):  # interleaved: a load change hits both alike
            times["whole"] = min(times["whole"], seconds(whole))
            times["shared"] = min(times["shared"], seconds(shared))
        rates = {k: inputs / v for k, v in times.items()}
        unit = "inputs/s" if name == "EOT gradient" else "draws/s"
        print(f"{name:14} {rates['whole']:>13.0f} {unit:8} {rates['shared']:>14.0f} {times['whole'] / times['shared']:>8.2f}x")


if __name__ == "__main__":
    main()
