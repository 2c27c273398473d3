"""The PixelDP certificate of a noise-layer model (Lecuyer et al., S&P 2019, Prop. 1 and Sec. III-C).

DiPSeN's noise layer adds Gaussian noise of std s to block 1's output, and block 1 has L2
sensitivity at most S_f. By the Gaussian mechanism (Dwork & Roth, Thm. A.1) the randomized scores
are then (eps, delta)-DP with respect to L2 changes of the input of size at most L whenever

    s >= sqrt(2 ln(1.25 / delta)) * S_f * L / eps,   eps <= 1,

i.e. eps(L) = sqrt(2 ln(1.25 / delta)) * S_f * L / s. Any post-processing keeps the guarantee, so the
one-hot of the predicted class is an (eps, delta)-DP score in [0, 1].

**Robustness condition** (Prop. 1): if E[y_k(x)] > e^(2 eps) max_{j != k} E[y_j(x)] + (1 + e^eps) delta,
the expected-score prediction k is the same for every x + d with ||d||_2 <= L. With Monte-Carlo
estimates the condition is checked on a lower bound for k and upper bounds for the others
(Clopper-Pearson at alpha / (2 C) each: a union bound over a lower and an upper bound for every one
of the C classes, since k itself is chosen from the counts), so it holds with probability at least
1 - alpha.

What is certified: L2 changes of the input of at most L, for the prediction by *expected* scores
(the mean over draws; approximated by the counts used here), not for a single noise draw's
prediction, and never beyond eps = 1, where the Gaussian mechanism's bound stops holding. With
PixelDP's defaults (eps 1, delta 0.05, L 0.1) no certificate can exceed L = 0.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..models import FederatedNet
from ..models.noise import NoiseCalibration
from .smoothing import ABSTAIN, class_counts, lower_confidence_bound


@dataclass(frozen=True)
class PixelDPCertificate:
    """The expected-score prediction ``label`` (or ABSTAIN) and the L2 size it is certified for."""

    label: int
    l2_size: float
    epsilon: float  # the eps at which the robustness condition holds with equality (0 when not certified)


def largest_epsilon(lower: float, upper: float, delta: float) -> float:
    """The largest eps in [0, 1] with lower >= e^(2 eps) upper + (1 + e^eps) delta (the supremum of Prop. 1's).

    The right side increases with eps; with t = e^eps the boundary is upper t^2 + delta t + delta - lower = 0.
    Returns 0 when the condition fails at eps = 0.
    """
    if lower <= upper + 2 * delta:
        return 0.0
    if upper <= 0:
        t = (lower - delta) / delta
    else:
        t = (-delta + math.sqrt(delta * delta + 4 * upper * (lower - delta))) / (2 * upper)
    return min(1.0, math.log(t))


def pixeldp_certify(
    model: FederatedNet, x: Tensor, draws: int, alpha: float, noise: NoiseCalibration, batch_size: int = 128
) -> PixelDPCertificate:
    """Certify one input ``x`` (no batch axis) of a model with a noise layer, from ``draws`` of its noise."""
    if model.noise is None or noise.std <= 0:
        raise ValueError("a PixelDP certificate needs a model whose noise layer has std > 0")
    counts = class_counts(model, x, draws, model.output.out_features, batch_size)
    classes = len(counts)
    label = int(counts.argmax())
    # the label is chosen from the same counts, so its bound must hold whichever class is chosen: a lower
    # and an upper bound for every class at alpha / (2 classes) hold together with probability >= 1 - alpha
    level = alpha / (2 * classes)
    lower = lower_confidence_bound(int(counts[label]), draws, level)
    others = [int(c) for j, c in enumerate(counts) if j != label]
    upper = max(1 - lower_confidence_bound(draws - c, draws, level) for c in others)
    epsilon = largest_epsilon(lower, upper, noise.delta)
    if epsilon <= 0:
        return PixelDPCertificate(ABSTAIN, 0.0, 0.0)
    return PixelDPCertificate(label, l2_size(epsilon, noise), epsilon)


def l2_size(epsilon: float, noise: NoiseCalibration) -> float:
    """L for which the layer's noise gives (epsilon, delta)-DP: L = eps * s / (sqrt(2 ln(1.25 / delta)) * S_f)."""
    return epsilon * noise.std / (math.sqrt(2 * math.log(1.25 / noise.delta)) * noise.sensitivity)
