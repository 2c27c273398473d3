"""DiPSeN's clean accuracy against its noise level, at a fixed federated training budget.

For each sigma, trains DiPSeN on MNIST (K=200, C=0.1, local training at ``TrainConfig``'s defaults) for
``--rounds`` rounds and prints the test accuracy with one noise draw and with the mean softmax of 16 draws.
sigma = 0.254 is the default, derived from PixelDP's (epsilon 1, delta 0.05, L 0.1); the noise
layer's guarantee covers L2 attacks of size L = sigma * epsilon / sqrt(2 ln(1.25/delta)).

Usage: python benchmarks/sigma_sweep.py [--sigmas 0 0.05 0.1 0.254] [--rounds 40] [--test-subset 2000] [--smoke]

``--smoke``: sigma 0 and 0.254, one round on 4 clients (2 a round) holding 200 training images, 100 test
images, trained in this process: checks that the script runs end to end; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from dipsen.config import TrainConfig
from dipsen.data import load_dataset
from dipsen.federated import FederatedTraining
from dipsen.federated.engine import derive_seed
from dipsen.metrics import evaluate_model

SMOKE = {"sigmas": [0.0, 0.254], "rounds": 1, "test_subset": 100}
SMOKE_SETTINGS = {"clients": 4, "fraction": 0.5, "train_subset": 200, "workers": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.254])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    settings = SMOKE_SETTINGS if args.smoke else {}
    data = load_dataset(args.dataset)
    print("| sigma | certified L2 size L (eps 1, delta 0.05) | acc, one draw | acc, mean of 16 draws | train time |")
    print("|---|---|---|---|---|")
    for sigma in args.sigmas:
        cfg = TrainConfig(
            dataset=args.dataset, model="dipsen", sigma=sigma, rounds=args.rounds, test_subset=args.test_subset, **settings
        ).validate()
        start = time.perf_counter()
        with FederatedTraining(cfg, data) as job:
            state = {k: v.clone() for k, v in job.model.state_dict().items()}
            for r in range(1, args.rounds + 1):
                state, result = job.run_round(r, state)
            torch.manual_seed(derive_seed(0, 99))
            mc = evaluate_model(job.model, job.x_test, job.y_test, data.classes, 16)
        bound = sigma / math.sqrt(2 * math.log(1.25 / 0.05))
        print(
            f"| {sigma:g} | {bound:.3f} | {result.test_accuracy:.4f} | {mc['accuracy']:.4f} "
            f"| {time.perf_counter() - start:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
