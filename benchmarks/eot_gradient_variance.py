"""How noisy is the gradient an attacker gets from a randomized model, by number of EOT draws?

For each of ``--images`` seeded test images and each k in ``--draws``, ``--estimates`` independent
gradients of the cross-entropy of log E_k[softmax] (dipsen.attack.views.ExpectedSoftmax, k draws)
with respect to the input are taken. The reference is the mean of every estimate at the largest k.
Printed per k, averaged over images:

- relative variance  E ||g - ref||^2 / ||ref||^2   (the gradient's noise, shrinking as 1/k): mean and median
                     over images (confident images have a small ||ref|| and dominate the mean)
- sign agreement     share of input coordinates where sign(g) = sign(ref), over coordinates where ref != 0

Usage: python benchmarks/eot_gradient_variance.py RUN [--images 64] [--estimates 20] [--draws 1,4,16] [--smoke]
RUN is a trained run folder of a randomized model (dipsen or noise-only).

``--smoke``: 4 images, 3 estimates, draws 1,2; without RUN, a DiPSeN run trained for one round on 200
MNIST images in a temporary folder: checks that the script runs end to end; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

from dipsen.attack import TrainedRun
from dipsen.attack.views import ExpectedSoftmax, attacker_view
from dipsen.config import TrainConfig
from dipsen.federated import FederatedTraining, RunDir, train

SMOKE = {"images": 4, "estimates": 3, "draws": "1,2"}
# --smoke without RUN: one round on 4 clients (2 a round) holding 200 images, trained in this process
SMOKE_RUN = {"clients": 4, "fraction": 0.5, "rounds": 1, "train_subset": 200, "test_subset": 100, "workers": 1}


def smoke_run(root: Path) -> Path:
    """A DiPSeN run folder trained for --smoke under ``root``."""
    config = TrainConfig(dataset="mnist", model="dipsen", **SMOKE_RUN).validate()
    run = RunDir.create(root, config)
    train(FederatedTraining(config, config.load_dataset()), run)
    return run.path


def gradients(view: nn.Module, x: torch.Tensor, y: torch.Tensor, estimates: int) -> torch.Tensor:
    """``estimates`` input gradients per image: shape (estimates, images, *input)."""
    out = []
    for _ in range(estimates):
        x_ = x.clone().requires_grad_(True)
        loss = nn.functional.nll_loss(view(x_), y, reduction="sum")  # per-image gradients, unscaled
        (grad,) = torch.autograd.grad(loss, x_)
        out.append(grad)
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, nargs="?", help="run folder (required without --smoke)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--estimates", type=int, default=20)
    parser.add_argument("--draws", default="1,4,16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
        if args.run is None:
            with tempfile.TemporaryDirectory() as tmp:
                args.run = smoke_run(Path(tmp))
                measure(args)
            return
    if args.run is None:
        parser.error("the following arguments are required: run")
    measure(args)


def measure(args: argparse.Namespace) -> None:
    """Print the gradient noise of ``args.run``'s final model for each number of draws."""
    draws = sorted(int(k) for k in args.draws.split(","))

    torch.manual_seed(args.seed)  # the noise layer draws from the global generator
    trained = TrainedRun(args.run)
    model = trained.model()
    if model.noise is None:
        raise SystemExit(f"{args.run}: {trained.config.model} has no noise layer; nothing to measure")
    data = trained.dataset
    pick = torch.randperm(len(data.y_test), generator=torch.Generator().manual_seed(args.seed))[: args.images]
    x, y = torch.as_tensor(data.x_test[pick.numpy()]), torch.as_tensor(data.y_test[pick.numpy()]).long()
    view = attacker_view(model, "draw")

    grads = {k: gradients(ExpectedSoftmax(view, k), x, y, args.estimates) for k in draws}
    flat = {k: g.flatten(2) for k, g in grads.items()}  # (estimates, images, features)
    reference = flat[draws[-1]].mean(dim=0)
    nonzero = reference != 0
    print(f"{trained.config.dataset} {trained.config.model} ({args.run}), {args.images} images, {args.estimates} estimates each")
    print(f"reference: mean of {args.estimates} estimates with {draws[-1]} draws")
    print(f"{'draws':>6} {'rel. variance, mean':>20} {'median':>8} {'sign agreement':>15}")
    for k in draws:
        per_image = (((flat[k] - reference) ** 2).sum(dim=2) / (reference**2).sum(dim=1)).mean(dim=0)
        agree = ((torch.sign(flat[k]) == torch.sign(reference)) & nonzero).sum(dim=2) / nonzero.sum(dim=1)
        print(f"{k:>6} {per_image.mean().item():>20.3f} {per_image.median().item():>8.3f} {agree.mean().item():>15.1%}")


if __name__ == "__main__":
    main()
