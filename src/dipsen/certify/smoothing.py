"""Randomized smoothing (Cohen, Rosenfeld, Kolter, ICML 2019): a certified L2 radius per input.

The smoothed classifier of a base classifier f is

    g(x) = argmax_c P(f(x + e) = c),   e ~ N(0, s^2 I).

**Guarantee** (Cohen et al., Thm. 1): if the top class c_A has probability at least p_A > 1/2 under
the noise, then g(x + d) = c_A for every ||d||_2 < R = s * Phi^-1(p_A). It holds for a randomized f
as well (DiPSeN's own noise layer): for each fixed draw w of f's internal noise the bound
p_w(x + d) >= Phi(Phi^-1(p_w(x)) - ||d|| / s) holds, and t -> Phi(Phi^-1(t) - r) is convex (its
derivative exp(r Phi^-1(t) - r^2 / 2) increases with t), so by Jensen it survives averaging over w.

What is certified is g, the smoothed classifier, evaluated with its own noise; not the base model,
and not with any fixed number of draws other than the one the estimate used. Both methods below
may be wrong with probability at most ``alpha`` per input (Clopper-Pearson bounds, scipy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import binomtest, norm
from torch import Tensor, nn

from ..models.predict import draw_logits

ABSTAIN = -1
"""What :meth:`Smooth.predict` and :meth:`Smooth.certify` return when they cannot decide."""


@dataclass(frozen=True)
class Certificate:
    """The smoothed prediction for one input: ``label`` (or ABSTAIN) and its certified L2 ``radius``."""

    label: int
    radius: float
    p_lower: float  # one-sided lower confidence bound on P(f(x + e) = label)


class Smooth:
    """The smoothed version of ``base`` (a model returning logits) at input noise std ``sigma``."""

    def __init__(self, base: nn.Module, num_classes: int, sigma: float, batch_size: int = 128) -> None:
        if not sigma > 0:
            raise ValueError(f"randomized smoothing needs a noise std > 0, got {sigma}")
        self.base, self.num_classes, self.sigma, self.batch_size = base.eval(), num_classes, sigma, batch_size

    def counts(self, x: Tensor, draws: int, generator: torch.Generator | None = None) -> Tensor:
        """How often f(x + e) takes each class over ``draws`` noise draws (``x`` one input, no batch axis)."""
        return class_counts(self.base, x, draws, self.num_classes, self.batch_size, self.sigma, generator)

    def predict(self, x: Tensor, n: int, alpha: float, generator: torch.Generator | None = None) -> int:
        """PREDICT: g(x), or ABSTAIN; returns a class other than g(x) with probability at most ``alpha``.

        Two-sided binomial test of the top two counts against 1/2 (Hung & Fithian 2019).
        """
        top2 = self.counts(x, n, generator).topk(2)
        count_a, count_b = int(top2.values[0]), int(top2.values[1])
        if binomtest(count_a, count_a + count_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2.indices[0])

    def certify(self, x: Tensor, n0: int, n: int, alpha: float, generator: torch.Generator | None = None) -> Certificate:
        """CERTIFY: guess c_A from ``n0`` draws, bound p_A from ``n`` fresh draws.

        With probability at least 1 - ``alpha``: if a label is returned, g(x + d) = label for every
        ||d||_2 < radius. Abstains (radius 0) when the lower bound on p_A is not above 1/2.
        """
        guess = int(self.counts(x, n0, generator).argmax())
        count = int(self.counts(x, n, generator)[guess])
        p_lower = lower_confidence_bound(count, n, alpha)
        if p_lower <= 0.5:
            return Certificate(ABSTAIN, 0.0, p_lower)
        return Certificate(guess, self.sigma * float(norm.ppf(p_lower)), p_lower)


@torch.inference_mode()
def class_counts(
    model: nn.Module,
    x: Tensor,
    draws: int,
    num_classes: int,
    batch_size: int = 128,
    input_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Predicted-class counts of ``model`` over ``draws`` copies of ``x``, each with fresh input noise of ``input_std``
    (and, for a model with a noise layer, a fresh draw of it). Batches of 128 keep activations in cache on a CPU.

    Computed on ``x``'s device, which must be the model's; the input noise is drawn there, so ``generator`` must live there too.
    """
    counts = torch.zeros(num_classes, dtype=torch.long, device=x.device)
    model.eval()
    for start in range(0, draws, batch_size):
        size = min(batch_size, draws - start)
        if input_std > 0:
            batch = x.unsqueeze(0).expand(size, *x.shape)
            logits = model(batch + torch.randn(batch.shape, generator=generator, device=x.device) * input_std)
        else:  # only a noise layer's draws: block 1 computed once
            logits = draw_logits(model, x.unsqueeze(0), size)
        counts += torch.bincount(logits.argmax(dim=1), minlength=num_classes)
    return counts


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion: the 1 - 2 alpha interval's low end."""
    return float(binomtest(successes, trials).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low)


def linf_radius(l2_radius: float, dimension: int) -> float:
    """The L-inf ball inside an L2 ball: ||d||_inf <= r / sqrt(d) implies ||d||_2 <= r."""
    return l2_radius / math.sqrt(dimension)
