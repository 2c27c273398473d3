"""Fang et al. 2020 ("Local model poisoning attacks to Byzantine-robust federated learning", USENIX
Security): colluding clients that push every coordinate against the direction it would move.

Knowledge: full (the round's honest steps and the server's rule) by default, or partial (the
malicious clients' own honest steps stand in for the honest ones, as in the paper). s = sign(mu),
mu the mean of the known benign steps, is the direction the global model would move without
attack; n, f, d as in :mod:`.statistical`.

- ``fang-krum`` (against Krum and Multi-Krum): every malicious client sends -lambda s, lambda
  halved from the paper's upper bound :func:`krum_lambda` until the repository's Krum
  (:func:`~dipsen.federated.aggregate.krum_scores`, with the server's f, or the round's malicious
  count if the server has none) picks it among the known benign steps and the f copies. Below
  :data:`FANG_LAMBDA_MIN` it gives up and sends that last, near-zero step (as the NDSS21 code does).
- ``fang-trim`` (against trimmed mean and median): per coordinate j, with min_j and max_j over
  the known benign steps, each malicious client draws from its own seed, uniformly: where
  mu_j > 0, below the benign minimum within a factor b = :data:`FANG_TRIM_FACTOR` (2),
  [b min_j, min_j] if min_j < 0 else [min_j / b, min_j]; where mu_j < 0, above the maximum,
  [max_j, b max_j] if max_j > 0 else [max_j / b, max_j]; where mu_j = 0, 0. (The three-way form
  of blades' code: the NDSS21 notebook tests mu_j > 0 in both branches.)
- ``fltrust-adaptive`` (against FLTrust; Cao et al. 2021's adaptive attack, Fang's framework
  applied to their rule: maximise the distance between FLTrust's aggregate with and without the
  malicious updates). FLTrust weighs an update by ReLU(cos(g_i, g_0)) and rescales it to
  ||g_0||, so only a direction u with a positive cosine to the server's step counts, and pulls
  along g_0 as much as its weight. The paper's attacker knows g_0; here g_0's direction is
  replaced by that of mu (the server trains on the same distribution), and u is sought in the
  plane of g = mu / ||mu|| and v, the part of -s orthogonal to g (Fang's harmful direction):
  u = cos(t) g + sin(t) v. With the known steps' FLTrust sum H = sum_j TS_j h_j / ||h_j|| and
  weight T = sum_j TS_j, the f copies of u move the aggregate by
  ``k (T u - H) / (T (T + k))``, k = f cos(t), whose norm is a function of t alone: t is the
  best of :data:`FLTRUST_ANGLES` angles in [0, 90) degrees. Sent at the known steps' mean norm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..aggregate import krum_scores, squared_distances
from .base import Round

FANG_LAMBDA_MIN = 1e-5  # fang-krum: the smallest lambda tried (the references' threshold)
FANG_TRIM_FACTOR = 2.0  # fang-trim: b, how far beyond the benign extremes a value may go
FLTRUST_ANGLES = 90  # fltrust-adaptive: the angles t tried, every degree in [0, 90)


def krum_lambda(known: Tensor, f: int) -> float:
    """The paper's upper bound on lambda, with k = len(known) benign steps x_i in update space:

    ``min_i S_i / ((k - f - 1) sqrt(d)) + max_i ||x_i|| / sqrt(d)``, S_i the sum of the distances
    from x_i to its k - f - 2 nearest other benign steps (at least 1 of each where k is small);
    ``||x_i||`` is the paper's distance from the local model to the global one.
    """
    k, d = known.shape
    distances = torch.cdist(known, known, compute_mode="donot_use_mm_for_euclid_dist")
    nearest = distances.sort(1).values[:, 1 : 1 + max(k - f - 2, 1)]  # column 0: the distance to itself
    root_d = math.sqrt(d)
    return float(nearest.sum(1).min()) / (max(k - f - 1, 1) * root_d) + float(known.norm(dim=1).max()) / root_d


def krum_selects(crafted: Tensor, known: Tensor, byzantine: int) -> bool:
    """Whether Krum, told ``byzantine``, selects one of the ``crafted`` rows among them and the ``known`` ones."""
    scores = krum_scores(squared_distances(torch.cat([crafted, known]).numpy()), byzantine)
    return int(scores.argmin()) < len(crafted)  # Krum takes the first of equal scores


def fang_krum(view: Round) -> Tensor:
    """``-lambda s``, lambda halved from :func:`krum_lambda` until Krum selects it."""
    known = view.known
    direction = torch.sign(known.mean(0))
    byzantine = view.options.byzantine or view.f
    lam = krum_lambda(known, view.f)
    while lam / 2 >= FANG_LAMBDA_MIN and not krum_selects(view.copies(-lam * direction), known, byzantine):
        lam /= 2
    return view.copies(-lam * direction)


def fang_trim(view: Round) -> Tensor:
    """Per coordinate, a uniform draw beyond the benign extreme opposite to sign(mu), within factor b (module doc)."""
    known, b = view.known, FANG_TRIM_FACTOR
    mu, low, high = known.mean(0), known.min(0).values, known.max(0).values
    below = torch.where(low < 0, b * low, low / b)  # [below, low]: where mu > 0
    above = torch.where(high > 0, b * high, high / b)  # [high, above]: where mu < 0
    rows = []
    for seed in view.seeds:
        u = torch.rand(mu.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        value = torch.where(mu > 0, below + u * (low - below), high + u * (above - high))
        rows.append(torch.where(mu == 0, torch.zeros_like(mu), value))
    return torch.stack(rows)


def fltrust_deviation(angles: Tensor, f: int, known: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """||FLTrust's aggregate with f copies of cos(t) g + sin(t) v - without them|| / ||g_0||, for each angle t.

    The server's step g_0 is taken to point along the unit vector ``g``; ``v`` is a unit vector
    orthogonal to it; ``known`` the honest steps. (Module doc: k (T u - H) / (T (T + k)).)
    """
    norms = known.norm(dim=1).clamp_min(torch.finfo(known.dtype).tiny)
    trust = (known @ g / norms).clamp_min(0)
    honest = (trust / norms) @ known  # H
    total = trust.sum()  # T
    k = f * torch.cos(angles)
    along_g, along_v = float(honest @ g), float(honest @ v)
    # ||T u - H||^2 = T^2 - 2 T <u, H> + ||H||^2, u a unit vector
    gap = total**2 - 2 * total * (torch.cos(angles) * along_g + torch.sin(angles) * along_v) + honest @ honest
    return k * gap.clamp_min(0).sqrt() / (total * (total + k))


def fltrust_adaptive(view: Round) -> Tensor:
    """``cos(t) g + sin(t) v`` at the known steps' mean norm, t maximising FLTrust's deviation (module doc)."""
    known = view.known
    mu = known.mean(0)
    if float(mu.norm()) == 0:
        return view.copies(mu)
    g = mu / mu.norm()
    harm = -torch.sign(mu)
    v = harm - (harm @ g) * g
    if float(v.norm()) == 0:  # -sign(mu) is -g itself (d = 1): nothing orthogonal to push along
        return view.copies(mu)
    v = v / v.norm()
    angles = torch.arange(FLTRUST_ANGLES, dtype=known.dtype) * (math.pi / 2 / FLTRUST_ANGLES)
    t = angles[int(fltrust_deviation(angles, view.f, known, g, v).argmax())]
    return view.copies(float(known.norm(dim=1).mean()) * (torch.cos(t) * g + torch.sin(t) * v))
