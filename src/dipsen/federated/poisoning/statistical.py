"""The statistical attacks: colluding clients send one vector built from the benign steps' statistics.

Each works on the benign steps it knows (``Round.known``: the round's honest clients' steps under
full knowledge, the default; its own clients' honest steps under partial knowledge), with mu and
sigma their coordinate-wise mean and (population, ddof 0) standard deviation, n the round's
updates that reach the aggregator and f the malicious ones among them. Every malicious client
sends the same vector.

- ``alie`` (Baruch et al. 2019, "A little is enough: circumventing defenses for distributed
  learning", NeurIPS): mu - z sigma. z is ``alie_z`` if set, else the paper's z_max for the
  round's n and f (:func:`alie_z`). Knowledge: the paper's attackers estimate mu and sigma from
  their own honest steps (partial); the reference implementations use the honest ones (full).
- ``ipm`` (Xie et al. 2019, "Fall of empires: breaking Byzantine-tolerant SGD by inner product
  manipulation", UAI): -eps mu, eps = ``ipm_eps`` (0.1, as in the references: small enough to get
  past Krum; a large eps such as 10 reverses even a median). Knowledge: full in the paper;
  partial is the same rule on its own steps.
- ``min-max`` and ``min-sum`` (Shejwalkar & Houmansadr 2021, "Manipulating the Byzantine:
  optimizing model poisoning attacks and defenses for federated learning", NDSS): mu + gamma p,
  p = -mu / ||mu|| (``unit``, the authors' default), -sign(mu) (``sign``) or -sigma (``std``)
  (``minmax_perturbation``), gamma the largest scale that keeps the vector as close to the benign
  ones as they are to each other: Min-Max, max_i ||x - x_i||^2 <= max_ij ||x_i - x_j||^2;
  Min-Sum, sum_i ||x - x_i||^2 <= min_i sum_j ||x_i - x_j||^2 (the authors' code; FLPoison takes
  the max, a looser bound). The authors find gamma by bisection; the constraint is quadratic in
  gamma, so :func:`_largest_scale` solves it exactly (the bisection's limit, without its cap at
  twice the initial 10). Knowledge: full, or partial (the authors' "unknown benign gradients").
- ``mimic`` (Karimireddy et al. 2022, "Byzantine-robust learning on heterogeneous datasets via
  bucketing", ICLR): every malicious client copies one honest client's step, over-weighting that
  client's data; nothing it sends is out of distribution. The authors fix the target after a
  warm-up as the client furthest along the honest steps' top principal direction; clients are
  sampled here, so the target is chosen that way in each round (no state between rounds).
  Knowledge: full only (under partial it would send its own honest steps).
"""

from __future__ import annotations

import functools
import logging
from statistics import NormalDist

import torch
from torch import Tensor

from .base import Round

log = logging.getLogger(__name__)

PERTURBATIONS = ("unit", "sign", "std")
# alie: outside 0 < s < n - f (a malicious majority needs no supporter) the quantile is clipped: |z| <= 3.09
ALIE_QUANTILE_CLIP = 0.001


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max: ``Phi^-1((n - f - s) / (n - f))``, s = floor(n/2 + 1) - f the supporters needed.

    0 at n = 10, f = 2 (the attack then sends the honest mean: set ``alie_z``), 0.157 at n = 20,
    f = 4, 0.253 at n = 50, f = 10. The quantile is clipped to [0.001, 0.999] (|z| <= 3.09) where
    the formula leaves (0, 1): a malicious majority (s <= 0) or n - f <= s.
    """
    honest = n - f
    quantile = (honest - (n // 2 + 1 - f)) / honest
    return NormalDist().inv_cdf(min(max(quantile, ALIE_QUANTILE_CLIP), 1 - ALIE_QUANTILE_CLIP))


@functools.cache  # once per (n, f) and process, not every round
def _warn_void_z(n: int, f: int) -> None:
    log.warning("alie: the paper's z is 0 at n = %d, f = %d: the malicious clients send the honest mean (set alie_z)", n, f)


def spread(known: Tensor) -> tuple[Tensor, Tensor]:
    """mu and sigma: the coordinate-wise mean and population (ddof 0) standard deviation of the ``known`` steps."""
    return known.mean(0), known.std(0, correction=0)


def chosen_z(z: float | None, n: int, f: int) -> float:
    """ALIE's z: ``z`` if set, else :func:`alie_z` (n, f) (warned once where it is 0)."""
    if z is None:
        z = alie_z(n, f)
        if z == 0:
            _warn_void_z(n, f)
    return z


def round_z(view: Round) -> float:
    """ALIE's z for the round: :func:`chosen_z` of ``alie_z`` and the round's n and f."""
    return chosen_z(view.options.alie_z, view.n, view.f)


def alie(view: Round) -> Tensor:
    """``mu - z sigma`` per coordinate, z = :func:`round_z`."""
    mu, sigma = spread(view.known)
    return view.copies(mu - round_z(view) * sigma)


def ipm(view: Round) -> Tensor:
    """``-eps mu``, eps = ``ipm_eps``."""
    return view.copies(-view.options.ipm_eps * view.known.mean(0))


def perturbation(known: Tensor, kind: str) -> Tensor:
    """Min-Max's and Min-Sum's direction p: ``-mu/||mu||`` (unit), ``-sign(mu)`` (sign) or ``-sigma`` (std)."""
    mu = known.mean(0)
    if kind == "unit":
        return -mu / mu.norm() if mu.norm() > 0 else torch.zeros_like(mu)
    if kind == "sign":
        return -torch.sign(mu)
    if kind == "std":
        return -known.std(0, correction=0)
    raise ValueError(f"unknown perturbation {kind!r}; one of {', '.join(PERTURBATIONS)}")


def _largest_scale(a: Tensor, b: Tensor, c: float, bound: float) -> float:
    """The largest gamma >= 0 with ``a_i + 2 gamma b_i + gamma^2 c <= bound`` for every i (each holds at 0: a_i <= bound).

    Each quadratic's positive root, ``(bound - a_i) / (b_i + sqrt(b_i^2 + c (bound - a_i)))``, is
    written so that it cancels nothing for b_i >= 0; for b_i < 0 it is ``(-b_i + sqrt(...)) / c``.
    """
    if c <= 0:
        return 0.0  # p = 0: nowhere to go
    room = (bound - a).clamp(min=0)
    root = torch.sqrt(b.square() + c * room)
    gamma = torch.where(b >= 0, room / (b + root).clamp(min=torch.finfo(torch.float64).tiny), (root - b) / c)
    return float(gamma.min())


def _squared_distances(known: Tensor) -> Tensor:
    """``||x_i - x_j||^2`` of the benign steps, computed coordinate by coordinate (no ||x||^2 - 2<x, y> cancellation)."""
    return torch.cdist(known, known, compute_mode="donot_use_mm_for_euclid_dist").square()


def min_max(view: Round) -> Tensor:
    """``mu + gamma p``, gamma the largest with ``max_i ||x - x_i||^2 <= max_ij ||x_i - x_j||^2``.

    With ``x = mu + gamma p``: ``||x - x_i||^2 = a_i + 2 gamma b_i + gamma^2 ||p||^2``, a_i =
    ``||mu - x_i||^2``, b_i = ``<p, mu - x_i>``.
    """
    known = view.known
    mu, p = known.mean(0), perturbation(known, view.options.perturbation)
    centred = mu - known
    a, b = centred.square().sum(1), centred @ p
    gamma = _largest_scale(a, b, float(p @ p), float(_squared_distances(known).max()))
    return view.copies(mu + gamma * p)


def min_sum(view: Round) -> Tensor:
    """``mu + gamma p``, gamma the largest with ``sum_i ||x - x_i||^2 <= min_i sum_j ||x_i - x_j||^2``.

    The sum is ``sum_i a_i + 2 gamma sum_i b_i + k gamma^2 ||p||^2`` (as in :func:`min_max`; sum_i b_i = 0).
    """
    known = view.known
    mu, p = known.mean(0), perturbation(known, view.options.perturbation)
    centred = mu - known
    a, b = centred.square().sum(1).sum().reshape(1), (centred @ p).sum().reshape(1)
    gamma = _largest_scale(a, b, len(known) * float(p @ p), float(_squared_distances(known).sum(1).min()))
    return view.copies(mu + gamma * p)


def mimic_target(known: Tensor) -> int:
    """The honest step furthest from mu along the top principal direction z: ``argmax_i |<x_i - mu, z>|``.

    From the k x k Gram matrix G of the centred steps: with u its top eigenvector, z is
    proportional to ``sum_i u_i (x_i - mu)`` and the projections to ``G u = lambda u``.
    """
    centred = known - known.mean(0)
    _, vectors = torch.linalg.eigh(centred @ centred.T)
    return int(vectors[:, -1].abs().argmax())


def mimic(view: Round) -> Tensor:
    """A copy of the honest step :func:`mimic_target` picks, sent by every malicious client."""
    return view.copies(view.known[mimic_target(view.known)])
