"""Attack throughput: PGD steps x samples per second through ART, against the model's ceiling.

The ceiling is one forward + backward pass to the input (what one PGD step must compute), in pure
torch, at the same batch size, measured in the same run. ART's PGD adds its numpy round trips,
projection and clipping; the ratio shows what they cost (target: at least 0.7 of the ceiling).
Measured for the CNN and DiPSeN, and for DiPSeN through the EOT view (k draws per gradient: the
ceiling is then k forward+backward passes per sample-step).

    python benchmarks/attack_throughput.py [--samples 512] [--iterations 20] [--repeats 3] [--json out.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn

from dipsen.attack import attacker_view
from dipsen.attack.attacks import Budget, art_classifier, build_attack
from dipsen.data import load_dataset
from dipsen.models import build_model, calibrate_noise

# --smoke: 16 images, 2 PGD iterations, EOT 2, one repeat
SMOKE = {"samples": 16, "iterations": 2, "eot_draws": 2, "repeats": 1}

BATCH = 128


def ceiling(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iterations: int) -> float:
    """Sample-steps per second of bare forward+backward-to-input passes."""
    model.eval()
    start = time.perf_counter()
    for _ in range(iterations):
        for begin in range(0, len(y), BATCH):
            xb = x[begin : begin + BATCH].clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(model(xb), y[begin : begin + BATCH])
            torch.autograd.grad(loss, xb)
    return len(y) * iterations / (time.perf_counter() - start)


def art_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iterations: int) -> float:
    """Sample-steps per second of ART's PGD (no random start, so every run does the same work)."""
    attack = build_attack(
        "pgd",
        art_classifier(model, tuple(x.shape[1:]), 10),
        0.3,
        Budget(iterations=iterations, step_fraction=0.1, restarts=0),
        batch_size=BATCH,
    )
    start = time.perf_counter()
    attack.generate(x=x.numpy(), y=y.numpy())
    return len(y) * iterations / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--eot-draws", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()

    data = load_dataset("mnist")
    x, y = torch.from_numpy(data.x_test[: args.samples]), torch.from_numpy(data.y_test[: args.samples])
    torch.manual_seed(0)
    noise = calibrate_noise(None, 1.0, 0.05, 0.1)
    models = {"cnn": build_model("cnn", (1, 28, 28), 10, noise), "dipsen": build_model("dipsen", (1, 28, 28), 10, noise)}
    cases = {
        "cnn": (models["cnn"], 1),
        "dipsen": (models["dipsen"], 1),
        f"dipsen, EOT {args.eot_draws}": (attacker_view(models["dipsen"], "eot", args.eot_draws), args.eot_draws),
    }
    best: dict[str, dict[str, float]] = {name: {"ceiling": 0.0, "art": 0.0} for name in cases}
    for _ in range(args.repeats):  # interleaved, best of repeats: the machine's timing noise is 10-25%
        for name, (model, _draws) in cases.items():
            best[name]["ceiling"] = max(best[name]["ceiling"], ceiling(model, x, y, args.iterations))
            best[name]["art"] = max(best[name]["art"], art_pgd(model, x, y, args.iterations))
    print(
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"{args.samples} MNIST images, batch {BATCH}, {args.iterations} PGD iterations, best of {args.repeats}"
    )
    print(f"{'model':18s} {'ceiling (sample-steps/s)':>26s} {'ART PGD (sample-steps/s)':>26s} {'ratio':>7s}")
    for name, figures in best.items():
        figures["ratio"] = figures["art"] / figures["ceiling"]
        print(f"{name:18s} {figures['ceiling']:26,.0f} {figures['art']:26,.0f} {figures['ratio']:7.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": best}, fh, indent=1)


if __name__ == "__main__":
    main()
