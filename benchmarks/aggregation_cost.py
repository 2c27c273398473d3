"""Server cost of each aggregation rule, and of client-level DP, against the time of a round's training.

The updates are real: ``--clients`` client updates of the model from the same initial weights, each
:func:`dipsen.federated.client_update` (the code both engines train with) on ``--samples`` MNIST
training images for ``--epochs`` epochs, as a client of the README's main command trains (K = 200
clients hold 300 images each, E = 3). The round's training time is the sum of those updates' times
divided by ``--workers``, the client processes that share them (one thread each). Each rule then
runs :func:`dipsen.federated.aggregate` on the same updates, best of ``--repeats``, on one thread;
the ratio is its time over the round's training time, both measured in this run.

Usage: python benchmarks/aggregation_cost.py [--model cnn] [--clients 20] [--samples 300] [--epochs 3]
                                             [--workers 2] [--byzantine 4] [--clip-norm 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from dipsen.data import load_dataset
from dipsen.federated import LocalTraining, client_update
from dipsen.federated.aggregate import AGGREGATORS, BYZANTINE_AGGREGATORS, Aggregation, aggregate
from dipsen.models import build_model, calibrate_noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--byzantine", type=int, default=4)
    parser.add_argument("--clip-norm", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    mnist = load_dataset("mnist")
    model = build_model(args.model, (1, 28, 28), 10, calibrate_noise())
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    training = LocalTraining(epochs=args.epochs)
    updates, seconds = [], 0.0
    for client in range(args.clients):
        rows = slice(client * args.samples, (client + 1) * args.samples)
        x, y = torch.from_numpy(mnist.x_train[rows]), torch.from_numpy(mnist.y_train[rows])
        update = client_update(model, global_state, x, y, training, seed=client)
        updates.append(update.state)
        seconds += update.seconds
    round_seconds = seconds / args.workers
    counts = [args.samples] * args.clients
    parameters = sum(v.numel() for v in global_state.values())
    print(
        f"{args.model} ({parameters:,} parameters), {args.clients} updates of {args.samples} images x {args.epochs} epochs; "
        f"round training {round_seconds:.2f} s ({args.workers} workers); aggregation on 1 thread, best of {args.repeats}"
    )
    specs = {rule: Aggregation(rule, byzantine=args.byzantine if rule in BYZANTINE_AGGREGATORS else 0) for rule in AGGREGATORS}
    specs[f"fedavg + clip {args.clip_norm:g}"] = Aggregation("fedavg", clip_norm=args.clip_norm)
    specs["client DP (z 1)"] = Aggregation("fedavg", clip_norm=args.clip_norm, noise_multiplier=1.0, sampled=args.clients)
    print(f"{'rule':22} {'seconds':>8} {'x round':>8}")
    for name, spec in specs.items():
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            aggregate(updates, counts, global_state, spec, noise_seed=0)
            best = min(best, time.perf_counter() - start)
        print(f"{name:22} {best:8.3f} {best / round_seconds:8.3f}")


if __name__ == "__main__":
    main()
