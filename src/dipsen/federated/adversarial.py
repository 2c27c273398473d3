"""Adversarial training inside :func:`~dipsen.federated.client.client_update`, and the per-round robust accuracy.

Both draw their examples with :func:`perturb`: L-inf PGD from a uniform random start in the
eps-ball, every iterate projected by the data set's
:meth:`~dipsen.attack.domain.FeasibleDomain.project` (the attacks' own projection: eps-ball,
[0, 1], on CTU-13 only the volume columns of real flows, counts snapped to integers).

- ``fgsm-rs`` (Wong, Rice, Kolter 2020, "Fast is better than free"): one step of 1.25 eps from the
  random start.
- ``pgd`` (Madry et al. 2018): ``adv_steps`` steps of 2.5 eps / ``adv_steps`` from the random start.

The loss on those examples is the cross-entropy (``adv_loss`` ``ce``), or TRADES (``adv_loss``
``trades``, Zhang et al. 2019, :func:`trades_loss`): the clean cross-entropy plus beta times the KL
divergence from the clean prediction to the prediction on an example crafted by :func:`perturb_kl`,
which maximises that KL instead of the cross-entropy (same steps, step size, eps and projection);
or CalFAT (``adv_loss`` ``calfat``, Chen et al. 2022, :func:`calfat_loss`): TRADES' KL search and a
cross-entropy on its examples, both on logits calibrated by the client's own label prior.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ..device import model_device
from ..metrics import predict_labels

if TYPE_CHECKING:  # dipsen.attack imports dipsen.federated: import it where it is used, not here
    from ..attack.domain import FeasibleDomain

FGSM_RS_STEP = 1.25  # x eps (Wong et al.)
PGD_STEP = 2.5  # x eps / steps (Madry et al.)
ROBUST_BATCH = 250
MONITOR_ATTACKS = ("apgd-ce", "pgd")
MONITOR_TOLERANCE = 0.03  # doubling the monitor's steps may lower its accuracy by this much on the final model
ADV_LOSSES = ("ce", "trades", "calfat")
# TRADES' start: x plus Gaussian noise of this std (Zhang et al.'s trades.py), not a uniform draw over the
# eps-ball: the KL term is 0 with a zero gradient at x itself, so the search needs a nudge, and starting
# near x keeps it a search for the nearest disagreement rather than a random point in the ball
TRADES_START_STD = 0.001


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
    return _sign_ascent(lambda x_adv: nn.functional.cross_entropy(model(x_adv), y), x, start, eps, steps, step_size, domain)


def _sign_ascent(
    objective: Callable[[Tensor], Tensor],
    x: Tensor,
    start: Tensor,
    eps: float,
    steps: int,
    step_size: float,
    domain: FeasibleDomain,
) -> Tensor:
    """``steps`` L-inf sign-gradient ascent steps on ``objective`` from ``x + start``, each iterate projected by ``domain``."""
    x_adv = domain.project_tensor(x + start.to(x.device), x, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x_adv), x_adv)
        x_adv = domain.project_tensor(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def kl_divergence(natural_logits: Tensor, adversarial_logits: Tensor) -> Tensor:
    """KL(softmax(natural) || softmax(adversarial)), summed over classes and averaged over the batch.

    The reference's ``KLDivLoss(size_average=False)(log_softmax(adv), softmax(nat)) / batch_size``,
    computed from log-probabilities on both sides so that a vanishing probability does not make a log(0).
    """
    return nn.functional.kl_div(
        nn.functional.log_softmax(adversarial_logits, dim=1),
        nn.functional.log_softmax(natural_logits, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def perturb_kl(
    model: nn.Module,
    x: Tensor,
    eps: float,
    steps: int,
    step_size: float,
    domain: FeasibleDomain,
    generator: torch.Generator,
) -> Tensor:
    """TRADES' inner maximisation: L-inf sign-gradient ascent on :func:`kl_divergence` from the model's prediction on ``x``.

    Starts at ``x`` plus N(0, :data:`TRADES_START_STD`^2) noise drawn from ``generator``; the start and
    every iterate are projected by ``domain`` as :func:`perturb` projects (eps-ball, [0, 1], CTU-13's
    rules). The clean prediction is computed once, without a gradient: it is the fixed target the
    search moves away from (the reference recomputes it every step, the same values for a model
    without dropout). As :func:`perturb`, gradients are taken with respect to the input only, in
    whatever mode the model is in.
    """
    with torch.no_grad():
        natural = model(x)
    start = TRADES_START_STD * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return _sign_ascent(lambda x_adv: kl_divergence(natural, model(x_adv)), x, start, eps, steps, step_size, domain)


def trades_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES (Zhang et al. 2019, "Theoretically principled trade-off between robustness and accuracy").

    ``CE(f(x), y) + beta * KL(softmax(f(x)) || softmax(f(x_adv)))``, both terms averaged over the
    batch; the gradient flows through f(x) in both terms and through f(x_adv), as in the reference
    ``trades.py``. ``x_adv`` comes from :func:`perturb_kl`.
    """
    natural = model(x)
    return nn.functional.cross_entropy(natural, y) + beta * kl_divergence(natural, model(x_adv))


def label_log_prior(y: Tensor, num_classes: int) -> Tensor:
    """log pi_k: the log class frequencies of one client's labels ``y`` (all its rows), over ``num_classes`` classes.

    pi_k,c = max(n_c, 1) / sum_c' max(n_c', 1), n_c the client's rows of class c: a class the client
    lacks counts as one row, so that its log is finite (the floor of the authors' code, which counts
    such a class once). In the default float dtype, on ``y``'s device.
    """
    counts = torch.bincount(y.long(), minlength=num_classes).clamp(min=1).to(torch.get_default_dtype())
    return torch.log(counts / counts.sum())


class CalibratedLogits(nn.Module):
    """``model`` with a client's log label prior added to its logits: CalFAT's z + log pi_k (training only).

    softmax(z + log pi_k)_c = pi_k,c e^{z_c} / sum_c' pi_k,c' e^{z_c'}: the model's scores reweighted by the
    client's class frequencies, so the local loss no longer pays the model to learn the client's skew.
    The calibration exists inside the local loss only; the model that is sent, evaluated and attacked is ``model``.
    """

    def __init__(self, model: nn.Module, log_prior: Tensor) -> None:
        super().__init__()
        self.model, self.log_prior = model, log_prior

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) + self.log_prior


def calfat_loss(model: nn.Module, x_adv: Tensor, y: Tensor, log_prior: Tensor) -> Tensor:
    """CalFAT's local loss (Chen, Liu, Ma, Lyu 2022, "CalFAT: Calibrated federated adversarial training with label skewness").

    ``CE(f(x_adv) + log pi_k, y)``, averaged over the batch: the calibrated cross-entropy on the
    adversarial examples alone, no clean term. ``x_adv`` maximises the calibrated KL
    ``KL(softmax(f(x) + log pi_k) || softmax(f(x_adv) + log pi_k))`` (:func:`perturb_kl` on
    :class:`CalibratedLogits`), ``log_prior`` is :func:`label_log_prior` of the client's own labels.
    With a uniform prior (log pi_k constant) both softmaxes are the uncalibrated ones: the loss is
    ``CE(f(x_adv), y)`` on TRADES' KL-maximising examples (the inner problem of ``adv_loss`` trades,
    the outer loss of ``adv_loss`` ce at ``adv_mix`` 1).

    Read from the authors' code (github.com/cc233/CalFAT, ``fat.py`` ``pgd_train`` and ``utils.py``
    ``kl_adv``, ``maxMarginLoss``, ``maxMarginLoss_kl``), not copied; it differs in two constants that
    are tied to its own networks: its cross-entropy is on ``10 (z + 0.1 log n)`` = ``10 z + log n``
    (logits scaled by 10, n the class counts, the same calibration as log pi up to a constant that the
    softmax ignores), and its KL search calibrates by ``0.1 log n`` only. Here both use z + log pi_k
    unscaled, so that a uniform prior gives back the uncalibrated losses above. Its search runs in eval
    mode with its own steps (40 of 0.01 at eps 0.3 on MNIST); here, as every ``adv_train`` search, in the
    mode the model is in with ``adv_train``'s steps, step size and eps. The paper's equations are not
    cited by number: only its abstract and the authors' code were checked against.
    """
    return nn.functional.cross_entropy(CalibratedLogits(model, log_prior)(x_adv), y)


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

        Crafted in eval mode on single noise draws, on the model's device, feasible in ``domain``, labelled by the
        run's prediction rule (``mc_samples``); every draw comes from ``seed``.
        """
        steps = steps or self.steps
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model.eval()
        device = model_device(model)
        correct = 0
        for begin in range(0, len(y), ROBUST_BATCH):
            xb = torch.from_numpy(np.ascontiguousarray(x[begin : begin + ROBUST_BATCH]))
            yb = torch.as_tensor(y[begin : begin + ROBUST_BATCH]).long()
            if self.attack == "pgd":
                step = default_step_size("pgd", eps, steps)
                x_adv = perturb(model, xb.to(device), yb.to(device), eps, steps, step, domain, generator).cpu().numpy()
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
