"""FedAvg (McMahan et al. 2017), the server's weights, and the coordinate-wise median and trimmed mean.

FedAvg's new global weights are the sample-weighted mean of the client weights,
``w = sum_k n_k w_k / sum_k n_k``, summed in float64 so that the result does not depend on the
order of the clients beyond float64 rounding.

Server-side weighting: no number a client reports enters the average unbounded. The weight of
client k is ``n_k = min(reported n_k, |P_k|)`` (:func:`server_counts`), where ``|P_k|`` is the size
of the partition the server itself assigned to k: the in-process engine made the partitions, and
the Flower ServerApp rebuilds the same ones from the run's config and data. Then no client's share
of the round's weighted mean may exceed ``max_client_weight`` (a fraction of the round's total
weight, default 1: no cap): :func:`cap_shares` gives the largest clients exactly that share and
the others shares proportional to ``n_k`` (if the cap is below 1/n, every client gets 1/n).

The median and the trimmed mean (``trim_fraction`` beta: :func:`trim_count` values cut at each end
of every coordinate) are Flower's functions; they ignore sample counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..client import StateDict
from .base import Aggregation, Updates


def fedavg(states: Sequence[StateDict], num_samples: Sequence[int] | Sequence[float]) -> StateDict:
    """Weighted mean of ``states`` with weights ``num_samples``; each key keeps its dtype.

    Integer tensors (counters such as BatchNorm's ``num_batches_tracked``) are rounded to the
    nearest integer, not truncated: truncation would turn three 7s weighted in float64 into 6.
    """
    if not states:
        raise ValueError("fedavg needs at least one client update")
    if len(states) != len(num_samples):
        raise ValueError("fedavg: one sample count per state is required")
    total = float(sum(num_samples))
    if total <= 0:
        raise ValueError("fedavg: the sample counts sum to zero")
    weights = torch.tensor([n / total for n in num_samples], dtype=torch.float64)
    averaged: StateDict = {}
    for key, reference in states[0].items():
        stacked = torch.stack([state[key] for state in states]).to(torch.float64)
        mean = torch.tensordot(weights, stacked, dims=1)
        if not (reference.is_floating_point() or reference.is_complex() or reference.dtype == torch.bool):
            mean = mean.round()
        averaged[key] = mean.to(reference.dtype)
    return averaged


def server_counts(reported: Sequence[int], known: Sequence[int]) -> list[int]:
    """Each client's sample count as the server accepts it: ``min(reported, known)``.

    ``known`` is the size of the partition the server itself assigned the client; an honest client
    reports exactly that, so only a count claimed beyond it is cut.
    """
    return [min(int(r), int(k)) for r, k in zip(reported, known, strict=True)]


def cap_shares(counts: Sequence[int], max_share: float) -> list[int] | list[float]:
    """Weights proportional to ``counts`` in which no client's share of the total exceeds ``max_share``.

    Unchanged (the integer counts) when no share exceeds it. Otherwise water-filling: the largest
    clients get exactly ``max_share`` each and the others ``lam * count`` with one ``lam`` so that
    the shares sum to 1. When ``max_share < 1/n`` no weights can meet it and every client gets 1/n.
    """
    counts = [int(c) for c in counts]
    total, n = sum(counts), len(counts)
    if not counts or max(counts) <= max_share * total:
        return counts
    if max_share * n <= 1:
        return [1.0 / n] * n
    order = sorted(range(n), key=lambda k: (-counts[k], k))
    rest, capped = total, 0
    scale = 1.0 / total
    for capped, k in enumerate(order):  # noqa: B007 - ``capped`` is used after the loop
        scale = (1.0 - capped * max_share) / rest
        if counts[k] * scale <= max_share:
            break
        rest -= counts[k]
    top = set(order[:capped])
    return [max_share if k in top else counts[k] * scale for k in range(n)]


def trim_count(fraction: float, n: int) -> int:
    """The values the trimmed mean cuts at each end of n: ``floor(fraction * n)``, at most (n - 1) / 2.

    Computed with a tolerance of 1e-9, so that a fraction written as c / n cuts c even where
    ``(c / n) * n`` rounds to just below c in floats (15/44 * 44 = 14.999...).
    """
    return min(math.floor(fraction * n + 1e-9), (n - 1) // 2)


def weighted_mean(updates: Updates, spec: Aggregation, seed: int | None) -> list[int]:
    """FedAvg: every update, at the server's weights."""
    return list(range(len(updates)))


def median(updates: Updates, spec: Aggregation, seed: int | None) -> np.ndarray:
    """Per coordinate, the median of the n values (Flower's ``aggregate_median``)."""
    from flwr.server.strategy.aggregate import aggregate_median

    return aggregate_median([([row], 1) for row in updates.weights])[0]


def trimmed_mean(updates: Updates, spec: Aggregation, seed: int | None) -> np.ndarray:
    """Per coordinate, the mean of the n - 2c middle values, c = :func:`trim_count` (Flower's ``aggregate_trimmed_avg``)."""
    from flwr.server.strategy.aggregate import aggregate_trimmed_avg

    n = len(updates)
    # Flower cuts int(q * n): q = (c + 1/4) / n makes that exactly c, away from float rounding, and q < 1/2
    q = (trim_count(spec.trim_fraction, n) + 0.25) / n
    return aggregate_trimmed_avg([([row], 1) for row in updates.weights], q)[0]
