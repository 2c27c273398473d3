"""Does a larger SOCOFing thumbnail help the hand-finger task under the subject split? One centralised run per side.

For each ``--sides`` value the real SOCOFing images are decoded from ``--source`` (the originals' tar
archive) at side x side with :func:`dipsen.data.socofing.load_socofing` (Lanczos resize, as the embedded
28x28 data set), so the subject split (``--seed``), its duplicate handling and the hand-finger labels (10
classes) are dipsen's own and identical for every side. Side 96 is the native 96x103 image resized to
96x96 (its height squeezed by 7%), not a crop. dipsen's CNN (``build_model("cnn", (1, side, side), 10,
calibrate_noise())``; its dense layer widens with the input, 4x the weights at 56) is trained
CENTRALISED on the whole training split with Adam (lr 1e-3), batches of 32 and the same seed (weights
and batch order) for every side, on one thread. Centralised is a deliberate simplification: a federated
run at 56x56 costs 4x the 28x28 one, and the question is what the input resolution carries, not how
federation changes it. After each epoch the test accuracy per side is printed; at the end a table of
side, best and final test accuracy and seconds per training epoch (evaluation not included), with the
majority-class rate of the test split as the floor.

Usage: python benchmarks/socofing_input_size.py [--sides 28,56] [--epochs 10] [--seed 0]
                                                [--source ../shared/data/socofing/SOCOFing_Real.tar.gz] [--smoke]

``--smoke``: one epoch on the six originals in ``tests/fixtures/socofing`` (unless ``--source`` is given):
checks that the script runs end to end; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from dipsen.data.socofing import load_socofing
from dipsen.models import build_model, calibrate_noise

DEFAULT_SOURCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "socofing" / "SOCOFing_Real.tar.gz"
SMOKE_SOURCE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "socofing"  # six originals
SMOKE = {"epochs": 1}
BATCH = 32
LR = 1e-3


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return (pred == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="28,56")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=None, help=f"default: {DEFAULT_SOURCE}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    source = args.source or (SMOKE_SOURCE if args.smoke else DEFAULT_SOURCE)
    torch.set_num_threads(1)
    sides = [int(s) for s in args.sides.split(",")]
    data = {}
    for side in sides:
        start = time.perf_counter()
        ds = load_socofing(source, seed=args.seed, task="hand-finger", side=side)
        data[side] = tuple(torch.from_numpy(a) for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
        print(
            f"side {side}: {len(ds.y_train)} train, {len(ds.y_test)} test images, decoded in {time.perf_counter() - start:.0f} s"
        )
    test_labels = {tuple(d[3].tolist()) for d in data.values()}
    assert len(test_labels) == 1, "the sides' test splits differ"
    print(f"majority class of the test split: {ds.info['majority_class']}, rate {ds.info['majority_rate']:.3f}")
    print(f"CNN, Adam lr {LR}, batch {BATCH}, {args.epochs} epochs, seed {args.seed}, 1 thread, centralised")

    history: dict[int, list[float]] = {side: [] for side in sides}
    seconds: dict[int, float] = {side: 0.0 for side in sides}
    loss_fn = nn.CrossEntropyLoss()
    for side in sides:
        x_train, y_train, x_test, y_test = data[side]
        torch.manual_seed(args.seed)
        model = build_model("cnn", (1, side, side), 10, calibrate_noise())
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        order = torch.Generator().manual_seed(args.seed)
        for epoch in range(1, args.epochs + 1):
            start = time.perf_counter()
            model.train()
            for idx in torch.randperm(len(y_train), generator=order).split(BATCH):
                optimizer.zero_grad()
                loss_fn(model(x_train[idx]), y_train[idx]).backward()
                optimizer.step()
            seconds[side] += time.perf_counter() - start
            history[side].append(accuracy(model, x_test, y_test))
            print(f"side {side:3d} epoch {epoch:2d}: test accuracy {history[side][-1]:.3f}", flush=True)

    print(f"\n{'side':>4} {'best':>6} {'(epoch)':>7} {'final':>6} {'s/epoch':>8}")
    for side in sides:
        acc = history[side]
        best = max(range(len(acc)), key=acc.__getitem__)
        print(f"{side:>4} {acc[best]:>6.3f} {best + 1:>7} {acc[-1]:>6.3f} {seconds[side] / args.epochs:>8.1f}")


if __name__ == "__main__":
    main()
