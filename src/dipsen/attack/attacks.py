"""The evasion attacks behind one registry: ART's (IBM's Adversarial Robustness Toolbox) and our own.

All are untargeted and bounded in L-infinity by ``eps`` (inputs live in [0, 1]), and every attack
takes one perturbation mask per example (``generate(x, y, mask)``: 1 where the attacker may
change the input, see :mod:`.domain`):

==========  ===========================  ======================================================
name        implementation               settings (``Budget`` fills the numbers)
==========  ===========================  ======================================================
fgsm        ART FastGradientMethod       one step of size eps along sign(grad)
bim         ART BasicIterativeMethod     ``iterations`` steps of ``step_fraction * eps``, no random start
pgd         ART ProjectedGradientDescent as BIM, plus ``restarts`` random starts (0: start at x)
apgd-ce     ours, :mod:`.apgd`           Croce & Hein's APGD, cross-entropy, adaptive step (initial
                                         2 eps), ``iterations`` per run, max(1, ``restarts``) runs;
                                         keeps each example's best iterate; feasible at every step
apgd-dlr    ours, :mod:`.apgd`           the same with the difference-of-logits-ratio loss (>= 3 classes)
square      ours, :mod:`.square`         Andriushchenko et al.'s Square, scores only, ``queries``
                                         iterations, p_init 0.8; every candidate projected onto the
                                         feasible domain before it is queried
hsj         ART HopSkipJump              labels only, L-inf; minimises distance, so the result
                                         is projected onto the eps-ball afterwards
==========  ===========================  ======================================================

APGD and Square are ours because ART's versions do not measure what they claim here: ART's APGD
returns a run's random start wherever its single final prediction says "not fooled" (with a
randomized model, also where the attacked point is better) and ignores per-example masks after a
restart; ART's Square takes no mask, so on CTU-13 it searched infeasible inputs and stopped on
"successes" that the projection onto the feasible domain then undid.

The paper's protocol uses ART's defaults at eps 0.3: step 0.1 (= eps/3) and 100 iterations for BIM
and PGD, no random start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from art.attacks.attack import EvasionAttack
from art.attacks.evasion import BasicIterativeMethod, FastGradientMethod, HopSkipJump, ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier
from torch import nn

from ..device import model_device
from ..errors import DipsenError
from .apgd import Apgd
from .square import P_INIT, Square
from .torch_attack import TorchAttack

GRADIENT_ATTACKS = ("fgsm", "bim", "pgd", "apgd-ce", "apgd-dlr")
QUERY_ATTACKS = ("square", "hsj")
ATTACKS = GRADIENT_ATTACKS + QUERY_ATTACKS
CUSTOM_LOSS_ATTACKS = ("fgsm", "bim", "pgd")
"""ART's gradient attacks, which differentiate the classifier's own loss (e.g. clipped probabilities);
APGD brings its own losses and the query attacks use none."""

FeasibleProjection = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``project(x_adv, x)``: the feasible point closest to ``x_adv`` for the original ``x`` (within eps)."""


@dataclass(frozen=True)
class Budget:
    """How hard an attack tries. ``step_fraction`` is the step size as a fraction of eps."""

    iterations: int = 100
    step_fraction: float = 1 / 3
    restarts: int = 0
    queries: int = 1000
    hsj_iterations: int = 10
    hsj_evaluations: int = 500

    def scaled(self, factor: int) -> Budget:
        """The same budget with ``factor`` times the iterations (the iteration-doubling check)."""
        return Budget(
            self.iterations * factor,
            self.step_fraction,
            self.restarts,
            self.queries * factor,
            self.hsj_iterations * factor,
            self.hsj_evaluations,
        )


PAPER_BUDGET = Budget(iterations=100, step_fraction=1 / 3, restarts=0)
"""ART's defaults at eps 0.3 (eps_step 0.1, max_iter 100, no random init), the paper's protocol."""
ADAPTIVE_BUDGET = Budget(iterations=100, step_fraction=1 / 10, restarts=2)
"""Smaller steps, random restarts: Carlini et al. 2019's checklist."""


def art_classifier(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int, loss: nn.Module | None = None
) -> PyTorchClassifier:
    """``model`` (returning logits or log-probabilities) as an ART classifier on inputs in [0, 1], on the model's device.

    ART's ``device_type`` "gpu" means its current CUDA device, which is where a model placed on ``cuda`` is.
    """
    return PyTorchClassifier(
        model,
        loss=loss if loss is not None else nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if model_device(model).type == "cuda" else "cpu",
    )


def build_attack(
    name: str,
    classifier: PyTorchClassifier,
    eps: float,
    budget: Budget,
    batch_size: int = 128,
    project: FeasibleProjection | None = None,
) -> EvasionAttack | TorchAttack:
    """Attack ``name`` at L-inf radius ``eps`` on ``classifier``'s model; see the module docstring.

    Our attacks (APGD, Square) call ``classifier.model`` directly. ``project`` is the data set's
    feasible-domain projection, which Square applies to every candidate before querying it
    (default: clip into the eps-ball and [0, 1]).
    """
    if name not in ATTACKS:
        raise DipsenError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    if not eps > 0:
        raise DipsenError(f"eps must be > 0, got {eps}")
    if name not in CUSTOM_LOSS_ATTACKS and not isinstance(classifier.loss, nn.CrossEntropyLoss):
        raise DipsenError(
            f"{name} does not use the classifier's loss; a custom loss applies to {', '.join(CUSTOM_LOSS_ATTACKS)} only"
        )
    step = budget.step_fraction * eps
    common = {"batch_size": batch_size}
    if name == "fgsm":
        return FastGradientMethod(classifier, norm=np.inf, eps=eps, eps_step=eps, **common)
    if name == "bim":
        return BasicIterativeMethod(classifier, eps=eps, eps_step=step, max_iter=budget.iterations, verbose=False, **common)
    if name == "pgd":
        return ProjectedGradientDescent(
            classifier,
            norm=np.inf,
            eps=eps,
            eps_step=step,
            max_iter=budget.iterations,
            num_random_init=budget.restarts,
            verbose=False,
            **common,
        )
    if name in ("apgd-ce", "apgd-dlr"):
        if name == "apgd-dlr" and classifier.nb_classes < 3:
            raise DipsenError("apgd-dlr needs at least 3 classes (its loss uses the third-largest logit)")
        return Apgd(classifier.model, eps, budget.iterations, max(1, budget.restarts), name.removeprefix("apgd-"), **common)
    if name == "square":
        return Square(classifier.model, eps, budget.queries, P_INIT, _on_tensors(project), **common)
    return HopSkipJump(
        classifier,
        targeted=False,
        norm=np.inf,
        max_iter=budget.hsj_iterations,
        max_eval=budget.hsj_evaluations,
        init_eval=min(100, budget.hsj_evaluations),
        init_size=100,
        verbose=False,
        batch_size=batch_size,
    )


def _on_tensors(project: FeasibleProjection | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    if project is None:
        return None
    return lambda candidate, x: torch.from_numpy(project(candidate.cpu().numpy(), x.cpu().numpy())).to(candidate.device)
