"""Server cost of each aggregation rule, and of client-level DP, against the time of a round's training.

The updates are real: ``--clients`` client updates of the model from the same initial weights, each
:func:`dipsen.federated.client_update` (the code both engines train with) on ``--samples`` MNIST
training images for ``--epochs`` epochs, as a client of the README's main command trains (K = 200
clients hold 300 images each, E = 3). The round's training time is the sum of those updates' times
divided by ``--workers``, the client processes that share them (one thread each). Each rule then
runs :func:`dipsen.federated.aggregate` on the same updates, best of ``--repeats``, on one thread
(torch's and numpy's BLAS: OpenBLAS threads on a busy machine stall a Gram product for seconds);
the ratio is its time over the round's training time, both measured in this run. Every rule is
timed, FLTrust with its server update (``client_update`` on 100 further training images), the two
pre-aggregations before the median, and Flower's own ``aggregate_krum`` and ``aggregate_bulyan``
for reference (our Krum family computes the distances once, from a Gram matrix).

Usage: python benchmarks/aggregation_cost.py [--model cnn] [--clients 20] [--samples 300] [--epochs 3]
                                             [--workers 2] [--byzantine 4] [--clip-norm 5] [--repeats 3] [--smoke]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum
from threadpoolctl import threadpool_limits

from dipsen.data import load_dataset
from dipsen.federated import LocalTraining, client_update
from dipsen.federated.aggregate import AGGREGATORS, BYZANTINE_AGGREGATORS, Aggregation, aggregate
from dipsen.models import build_model, calibrate_noise

# --smoke: 11 updates (Bulyan needs 4f + 3 = 11 for f = 2) of 32 images, one epoch, one repeat
SMOKE = {"clients": 11, "samples": 32, "epochs": 1, "byzantine": 2, "repeats": 1}

ROOT_ROWS = 100  # FLTrust's root set, the default fltrust_root_size


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
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
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
    root = slice(args.clients * args.samples, args.clients * args.samples + ROOT_ROWS)  # no client's rows
    x_root, y_root = torch.from_numpy(mnist.x_train[root]), torch.from_numpy(mnist.y_train[root])

    def server_update(state: dict, seed: int) -> dict:
        return client_update(model, state, x_root, y_root, training, seed).state

    f = args.byzantine
    specs = {rule: Aggregation(rule, byzantine=f if rule in BYZANTINE_AGGREGATORS else 0) for rule in AGGREGATORS}
    specs["fltrust"] = Aggregation("fltrust", server_update=server_update)
    specs["bucketing (s 2) + median"] = Aggregation("median", pre_aggregation="bucketing")
    specs[f"nnm (f {f}) + median"] = Aggregation("median", byzantine=f, pre_aggregation="nnm")
    specs[f"fedavg + clip {args.clip_norm:g}"] = Aggregation("fedavg", clip_norm=args.clip_norm)
    specs["client DP (z 1)"] = Aggregation("fedavg", clip_norm=args.clip_norm, noise_multiplier=1.0, sampled=args.clients)
    timed = {name: partial(aggregate, updates, counts, global_state, spec, noise_seed=0) for name, spec in specs.items()}

    def flower(rule: Callable, **kwargs) -> Callable[[], object]:  # on float64 arrays, as aggregate used to call it
        return lambda: rule([([v.double().numpy() for v in u.values()], 1) for u in updates], num_malicious=f, **kwargs)

    timed["krum (Flower's)"] = flower(aggregate_krum, to_keep=0)
    timed["bulyan (Flower's)"] = flower(aggregate_bulyan, aggregation_rule=aggregate_krum, to_keep=0)
    print(f"{'rule':26} {'seconds':>8} {'x round':>8}")
    for name, run in timed.items():
        best = float("inf")
        for _ in range(args.repeats):
            with threadpool_limits(limits=1):
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
        print(f"{name:26} {best:8.3f} {best / round_seconds:8.3f}")


if __name__ == "__main__":
    main()
