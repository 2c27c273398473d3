"""Adversarial training inside :func:`~dipsen.federated.client.client_update`, and the per-round robust accuracy.

Both draw their examples with :func:`perturb`: L-inf PGD from a uniform random start in the
eps-ball, every iterate projected by the data set's
:meth:`~dipsen.attack.domain.FeasibleDomain.project` (the attacks' own projection: eps-ball,
[0, 1], on CTU-13 only the volume columns of real flows, counts snapped to integers).

- ``fgsm-rs`` (Wong, Rice, Kolter 2020, "Fast is better than free"): one step of 1.25 eps from the
  random start.
- ``pgd`` (Madry et al. 2018): ``adv_steps`` steps of 2.5 eps / ``adv_steps`` from the random start.

Catastrophic overfitting (FGSM training whose PGD accuracy collapses to ~0 within an epoch) is
watched by the :class:`RobustMonitor`: the aggregator attacks the global model after every
evaluated round at the same eps on a fixed slice of held-out rows (see
:func:`dipsen.federated.engine.FederatedTraining.robust_accuracy` for which rows and why). Its
default is APGD-CE (Croce & Hein 2020, :mod:`dipsen.attack.apgd`), not a short PGD: PGD-10 from an
FGSM-trained model's loss surface reads robustness that longer attacks remove (README, Adversarial
training: the monitor against the study's worst case). The check :meth:`RobustMonitor.converged`
runs it again at twice the steps on the final model: a fall of more than
:data:`MONITOR_TOLERANCE` means the figure still overstates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ..metrics import predict_labels

if TYPE_CHECKING:  # dipsen.attack imports dipsen.federated: import it where it is used, not here
    from ..attack.domain import FeasibleDomain

FGSM_RS_STEP = 1.25  # x eps (Wong et al.)
PGD_STEP = 2.5  # x eps / steps (Madry et al.)
ROBUST_BATCH = 250
MONITOR_ATTACKS = ("apgd-ce", "pgd")
MONITOR_TOLERANCE = 0.03  # doubling the monitor's steps may lower its accuracy by this much on the final model


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


@dataclass(frozen=True)
class RobustMonitor:
    """The attack behind a run's ``robust_accuracy``: ``attack`` of ``steps`` iterations on ``samples`` validation rows.

    ``apgd-ce``: one APGD run with the cross-entropy loss from a random start (step 2 eps, halved
    adaptively). ``pgd``: PGD from a random start, steps of 2.5 eps / ``steps``.
    """

    attack: str = "apgd-ce"
    steps: int = 40
    samples: int = 250

    def label(self, steps: int | None = None) -> str:
        """``apgd-ce-40``: the attack and its steps, as metrics.jsonl and the progress bar name it."""
        return f"{self.attack}-{steps or self.steps}"

    def accuracy(
        self,
        model: nn.Module,
        x: np.ndarray,
        y: np.ndarray,
        eps: float,
        domain: FeasibleDomain,
        mc_samples: int,
        seed: int,
        steps: int | None = None,
    ) -> float:
        """Accuracy of ``model`` on this attack's examples of (x, y), at ``steps`` (default: the monitor's).

        Crafted in eval mode on single noise draws, feasible in ``domain``, labelled by the run's
        prediction rule (``mc_samples``); every draw comes from ``seed``.
        """
        steps = steps or self.steps
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model.eval()
        correct = 0
        for begin in range(0, len(y), ROBUST_BATCH):
            xb = torch.from_numpy(np.ascontiguousarray(x[begin : begin + ROBUST_BATCH]))
            yb = torch.as_tensor(y[begin : begin + ROBUST_BATCH]).long()
            if self.attack == "pgd":
                x_adv = perturb(model, xb, yb, eps, steps, default_step_size("pgd", eps, steps), domain, generator).numpy()
            else:
                from ..attack.apgd import Apgd  # not at the top: dipsen.attack imports dipsen.federated

                crafted = Apgd(model, eps, steps, batch_size=ROBUST_BATCH).generate(
                    xb.numpy(), yb.numpy(), domain.mask(xb.numpy())
                )
                x_adv = domain.project(crafted, xb.numpy(), eps)  # integer counts snapped once, as the study does
            correct += int((predict_labels(model, x_adv, mc_samples) == yb.numpy()).sum())
        return correct / max(len(y), 1)

    def converged(self, accuracy: float, doubled: float, samples: int) -> bool:
        """Whether twice the steps lowered the accuracy on ``samples`` rows by at most :data:`MONITOR_TOLERANCE`.

        Counted in rows, as the study's doubling check: 0.23 - 0.20 in floats exceeds 0.03.
        """
        allowed = math.floor(MONITOR_TOLERANCE * samples + 1e-9)
        return round((accuracy - doubled) * samples) <= allowed
