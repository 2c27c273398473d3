"""Federated against centralised training of one model and recipe: the federated gap in certified accuracy, on our own model.

The federated run is a run folder (``--federated RUN``) or one trained here from the flags (MNIST,
the CNN, K = ``--clients``, C = ``--fraction``, ``--rounds`` of ``--local-epochs``, Gaussian input
noise ``--sigma`` with ``--smoothing-loss``). The centralised reference is the same configuration
with one client holding every training row: the same model, optimizer, learning rate, batch size,
noise and loss, trained on the same epochs of data, R E m / K (rounded up), as that many rounds of
one local epoch (so a round-based learning-rate schedule keeps its shape; the optimizer's state
starts afresh each epoch, as it does each federated round). Both run through the in-process engine,
the code every ``dipsen train`` uses. Both are then certified by randomized smoothing (Cohen et al.,
``dipsen certify``'s code) at the federated run's sigma on the same seeded test examples, and the
script prints certified accuracy per L2 radius, the gap in points, and each training's time; it writes
``OUT/centralised_reference.json``.

Usage: python benchmarks/centralised_reference.py [--federated RUN] [--sigma 0.25] [--smoothing-loss gaussian]
           [--clients 200] [--fraction 0.1] [--rounds 30] [--local-epochs 3] [--samples 500] [--n 10000]
           [--n0 100] [--alpha 0.001] [--workers W] [--out runs/centralised-reference] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from fractions import Fraction
from pathlib import Path

from dipsen.attack import TrainedRun
from dipsen.certify.evaluate import CertifySettings, certify_run
from dipsen.config import TrainConfig
from dipsen.data import Dataset
from dipsen.report.reproduce import train_run, training_seconds

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
# --smoke: ten clients on 300 rows, two rounds, a few draws on a few examples (figures meaningless)
SMOKE = {
    "clients": 10,
    "fraction": 0.5,
    "rounds": 2,
    "local_epochs": 1,
    "train_subset": 300,
    "test_subset": 60,
    "samples": 4,
    "n0": 10,
    "n": 50,
    "workers": 1,
}


def epochs_of_data(config: TrainConfig) -> int:
    """Passes over the training set a federated run makes, R E m / K, rounded up (at least 1)."""
    passes = Fraction(config.rounds * config.local_epochs * config.clients_per_round, config.clients)
    return max(1, math.ceil(passes))


def centralised(config: TrainConfig) -> TrainConfig:
    """``config`` with one client holding every row, trained for the same epochs of data in rounds of one epoch."""
    return dataclasses.replace(
        config, clients=1, fraction=1.0, partition="iid", rounds=epochs_of_data(config), local_epochs=1, min_clients=None
    ).validate()


def trained(config: TrainConfig, folder: Path, data: Dataset) -> Path:
    """``folder``, with ``config`` trained on ``data`` in it (a run begun there goes on from its last checkpoint)."""
    train_run(folder, config, data, None, folder.name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--federated", type=Path, help="a trained federated run folder (default: train one from the flags)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--smoothing-loss", default="gaussian")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int)
    parser.add_argument("--test-subset", type=int)
    parser.add_argument("--workers", type=int, help="client-training processes (default: one per core)")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--out", type=Path, default=Path("runs/centralised-reference"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE, out=None)
        args = parser.parse_args()
    if args.out is None:  # a smoke run writes where it leaves nothing behind
        import tempfile

        args.out = Path(tempfile.mkdtemp(prefix="centralised-reference-"))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    federated_run = args.federated or args.out / "federated"
    if args.federated is not None:
        federated_config = TrainedRun(args.federated).config
    else:
        federated_config = TrainConfig(
            dataset="mnist",
            model="cnn",
            clients=args.clients,
            fraction=args.fraction,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            input_noise=args.sigma,
            smoothing_loss=args.smoothing_loss,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
            workers=args.workers,
        ).validate()
    data = federated_config.load_dataset()  # both runs' rows: the engine partitions them, the data set is one
    if args.federated is None:
        trained(federated_config, federated_run, data)
    reference = centralised(federated_config)
    reference_run = trained(reference, args.out / "centralised", data)
    federated_seconds, reference_seconds = training_seconds(federated_run), training_seconds(reference_run)
    sigma = federated_config.input_noise or args.sigma
    settings = CertifySettings("smoothing", sigma, args.n0, args.n, args.alpha, args.samples, RADII)
    runs = {"federated": federated_run, "centralised": reference_run}
    records = {name: certify_run(TrainedRun(path), settings) for name, path in runs.items()}
    fed, cen = (records[k]["certified_accuracy"] for k in ("federated", "centralised"))
    print(
        f"{federated_config.dataset}, {federated_config.model}, sigma {sigma}, {federated_config.smoothing_loss} loss; "
        f"federated: K = {federated_config.clients}, m = {federated_config.clients_per_round}, "
        f"{federated_config.rounds} rounds of {federated_config.local_epochs}; centralised: {reference.rounds} epoch(s) of data; "
        f"{args.samples} examples, n = {args.n}, alpha = {args.alpha}"
    )
    print(f"{'L2 radius':>9} {'federated':>10} {'centralised':>12} {'gap (points)':>13}")
    for radius in fed:
        print(f"{radius:>9} {fed[radius]:>10.3f} {cen[radius]:>12.3f} {100 * (fed[radius] - cen[radius]):>+13.1f}")
    total = time.perf_counter() - start
    print(f"training: federated {federated_seconds:.0f} s, centralised {reference_seconds:.0f} s; total {total:.0f} s")
    summary = {
        "federated": {"run": str(federated_run), "training_seconds": federated_seconds, **_certified(records["federated"])},
        "centralised": {"run": str(reference_run), "training_seconds": reference_seconds, **_certified(records["centralised"])},
        "epochs_of_data": reference.rounds,
        "sigma": sigma,
        "settings": dataclasses.asdict(settings),
    }
    (args.out / "centralised_reference.json").write_text(json.dumps(summary, indent=2))


def _certified(record: dict) -> dict:
    """What the summary keeps of a certification record."""
    keys = ("certified_accuracy", "accuracy", "abstain_rate", "samples", "seconds")
    return {k: record[k] for k in keys}


if __name__ == "__main__":
    main()
