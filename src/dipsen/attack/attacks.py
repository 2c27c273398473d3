"""The evasion attacks, all from IBM's Adversarial Robustness Toolbox (ART), behind one registry.

All are untargeted and bounded in L-infinity by ``eps`` (inputs live in [0, 1]):

==========  ======================  ===========================================================
name        ART class               settings (``Budget`` fills the numbers)
==========  ======================  ===========================================================
fgsm        FastGradientMethod      one step of size eps along sign(grad)
bim         BasicIterativeMethod    ``iterations`` steps of ``step_fraction * eps``, no random start
pgd         ProjectedGradientDescent  as BIM, plus ``restarts`` random starts (0: start at x)
apgd-ce     AutoProjectedGradientDescent  cross-entropy, adaptive step (initial 2 eps), ``restarts``
apgd-dlr    AutoProjectedGradientDescent  difference-of-logits-ratio loss (needs >= 3 classes)
square      SquareAttack            query-only (scores), ``queries`` iterations, p_init 0.8
hsj         HopSkipJump             query-only (labels), L-inf; minimises distance, so the result
                                    is projected onto the eps-ball afterwards
==========  ======================  ===========================================================

The paper's protocol uses ART's defaults at eps 0.3: step 0.1 (= eps/3) and 100 iterations for BIM
and PGD, no random start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from art.attacks.evasion import (
    AutoProjectedGradientDescent,
    BasicIterativeMethod,
    FastGradientMethod,
    HopSkipJump,
    ProjectedGradientDescent,
    SquareAttack,
)
from art.estimators.classification import PyTorchClassifier
from torch import nn

from ..errors import DipsenError

GRADIENT_ATTACKS = ("fgsm", "bim", "pgd", "apgd-ce", "apgd-dlr")
QUERY_ATTACKS = ("square", "hsj")
ATTACKS = GRADIENT_ATTACKS + QUERY_ATTACKS
PER_EXAMPLE_MASK = ("fgsm", "bim", "pgd", "hsj")
"""Attacks whose ``generate`` honours a per-example perturbation mask."""
BATCH_MASK = ("apgd-ce", "apgd-dlr")
"""Attacks that take only one mask for the whole batch (ART's APGD applies the mask to the
examples still being attacked after a restart, so a per-example mask no longer matches)."""


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
        return Budget(self.iterations * factor, self.step_fraction, self.restarts, self.queries * factor,
                      self.hsj_iterations * factor, self.hsj_evaluations)


PAPER_BUDGET = Budget(iterations=100, step_fraction=1 / 3, restarts=0)
"""ART's defaults at eps 0.3 (eps_step 0.1, max_iter 100, no random init), the paper's protocol."""
ADAPTIVE_BUDGET = Budget(iterations=100, step_fraction=1 / 10, restarts=2)
"""Smaller steps, random restarts: Carlini et al. 2019's checklist."""


def art_classifier(model: nn.Module, input_shape: tuple[int, ...], num_classes: int,
                   loss: nn.Module | None = None) -> PyTorchClassifier:
    """``model`` (returning logits or log-probabilities) as an ART classifier on inputs in [0, 1]."""
    return PyTorchClassifier(
        model, loss=loss if loss is not None else nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
        nb_classes=num_classes, clip_values=(0.0, 1.0), device_type="cpu",
    )


def build_attack(name: str, classifier: PyTorchClassifier, eps: float, budget: Budget, batch_size: int = 128):
    """The ART attack ``name`` at L-inf radius ``eps``; see the module docstring for settings."""
    if name not in ATTACKS:
        raise DipsenError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    if not eps > 0:
        raise DipsenError(f"eps must be > 0, got {eps}")
    step = budget.step_fraction * eps
    common = {"batch_size": batch_size}
    if name == "fgsm":
        return FastGradientMethod(classifier, norm=np.inf, eps=eps, eps_step=eps, **common)
    if name == "bim":
        return BasicIterativeMethod(classifier, eps=eps, eps_step=step, max_iter=budget.iterations, verbose=False, **common)
    if name == "pgd":
        return ProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=step, max_iter=budget.iterations,
                                        num_random_init=budget.restarts, verbose=False, **common)
    if name in ("apgd-ce", "apgd-dlr"):
        if name == "apgd-dlr" and classifier.nb_classes < 3:
            raise DipsenError("apgd-dlr needs at least 3 classes (its loss uses the third-largest logit)")
        loss = "cross_entropy" if name == "apgd-ce" else "difference_logits_ratio"
        return AutoProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=budget.iterations,
                                            nb_random_init=max(1, budget.restarts), loss_type=loss, verbose=False, **common)
    if name == "square":
        return SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=budget.queries, p_init=0.8, nb_restarts=1,
                            verbose=False, **common)
    return HopSkipJump(classifier, targeted=False, norm=np.inf, max_iter=budget.hsj_iterations,
                       max_eval=budget.hsj_evaluations, init_eval=min(100, budget.hsj_evaluations), init_size=100,
                       verbose=False, batch_size=batch_size)
