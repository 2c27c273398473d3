"""Adversarial training inside :func:`~dipsen.federated.client.client_update`, and the per-round robust accuracy.

Both draw their examples with :func:`perturb`: L-inf PGD from a uniform random start in the
eps-ball, every iterate projected by the data set's
:meth:`~dipsen.attack.domain.FeasibleDomain.project` (the attacks' own projection: eps-ball,
[0, 1], on CTU-13 only the volume columns of real flows, counts snapped to integers).

- ``fgsm-rs`` (Wong, Rice, Kolter 2020, "Fast is better than free"): one step of 1.25 eps from the
  random start.
- ``pgd`` (Madry et al. 2018): ``adv_steps`` steps of 2.5 eps / ``adv_steps`` from the random start.

Catastrophic overfitting (FGSM training whose PGD accuracy collapses to ~0 within an epoch) is
watched by :func:`robust_accuracy`: the aggregator attacks the global model after every round with
PGD of ``ROBUST_STEPS`` steps at the same eps on a fixed slice of held-out rows (see
:func:`dipsen.federated.engine.FederatedTraining.robust_accuracy` for which rows and why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ..metrics import predict_labels

if TYPE_CHECKING:  # dipsen.attack imports dipsen.federated: import it where it is used, not here
    from ..attack.domain import FeasibleDomain

FGSM_RS_STEP = 1.25  # x eps (Wong et al.)
PGD_STEP = 2.5  # x eps / steps (Madry et al.)
ROBUST_STEPS = 10  # PGD steps of the per-round robust accuracy
ROBUST_BATCH = 250


def attack_steps(method: str, steps: int) -> int:
    """Gradient steps per example: 1 for fgsm-rs, ``steps`` for pgd."""
    return 1 if method == "fgsm-rs" else steps


def default_step_size(method: str, eps: float, steps: int) -> float:
    """1.25 eps for fgsm-rs, 2.5 eps / steps for pgd."""
    return FGSM_RS_STEP * eps if method == "fgsm-rs" else PGD_STEP * eps / steps


def perturb(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    step_size: float,
    domain: FeasibleDomain,
    generator: torch.Generator,
) -> Tensor:
    """Untargeted L-inf PGD from a uniform random start (drawn from ``generator``), feasible at every iterate.

    Gradients are taken with respect to the input only (the model's ``.grad`` stays untouched), in
    whatever mode the model is in; its noise layers draw from torch's global generator.
    """
    start = (2 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1) * eps
    x_adv = domain.project_tensor(x + start.to(x.device), x, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = domain.project_tensor(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def robust_accuracy(
    model: nn.Module, x: np.ndarray, y: np.ndarray, eps: float, domain: FeasibleDomain, mc_samples: int, seed: int
) -> float:
    """Accuracy of ``model`` on PGD-``ROBUST_STEPS`` examples (step 2.5 eps / steps, random start) of (x, y).

    Crafted in eval mode on single noise draws, labelled by the run's prediction rule
    (``mc_samples``); every draw comes from ``seed``.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    step = default_step_size("pgd", eps, ROBUST_STEPS)
    correct = 0
    for begin in range(0, len(y), ROBUST_BATCH):
        xb = torch.from_numpy(np.ascontiguousarray(x[begin : begin + ROBUST_BATCH]))
        yb = torch.as_tensor(y[begin : begin + ROBUST_BATCH]).long()
        x_adv = perturb(model, xb, yb, eps, ROBUST_STEPS, step, domain, generator)
        correct += int((predict_labels(model, x_adv.numpy(), mc_samples) == yb.numpy()).sum())
    return correct / max(len(y), 1)
