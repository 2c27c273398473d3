"""Krum, Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al. 2018), on one Gram matrix.

Krum's score of update i is the sum of its squared distances to its n - f - 2 nearest others;
``krum`` returns the update with the lowest score, ``multi-krum`` the FedAvg of the n - f lowest
(the weight cap applies among those kept), ``bulyan`` picks n - 2f updates by Krum in turn (each
pick removed before the next) and returns, per coordinate, the mean of the n - 4f picked values
closest to their median.

Cost: Flower's ``aggregate_krum`` computes n^2 difference norms, and its ``aggregate_bulyan`` does
so again for each of its n - 2f picks (O(n^3 d)). Here the distances come once from the Gram
matrix, ``||x_i - x_j||^2 = ||x_i||^2 + ||x_j||^2 - 2 x_i . x_j`` (:func:`squared_distances`), and
Bulyan's picks reuse them. The selections are Flower's (a test checks them against
``aggregate_krum`` on inputs without near-ties); Bulyan's median is Flower's ``aggregate_median``
and its closest-to-the-median mean the same numpy operations as Flower's, so the results are its
results bit for bit.
"""

from __future__ import annotations

import numpy as np

from .base import Admitted, Aggregation, Updates


def squared_distances(rows: np.ndarray) -> np.ndarray:
    """(n, n): ``||x_i - x_j||^2 = ||x_i||^2 + ||x_j||^2 - 2 x_i . x_j`` from one (n x d)(d x n) product.

    The rows are centred on their mean first: the distances stay the same, and the norms stay of
    the order of the distances, so the subtraction does not cancel the digits that tell two
    updates apart (it would for raw weights, whose norms dwarf a round's steps).
    """
    centred = rows - rows.mean(axis=0)
    gram = centred @ centred.T
    norms = np.diag(gram)
    distances = np.maximum(norms[:, None] + norms[None, :] - 2 * gram, 0.0)
    np.fill_diagonal(distances, 0.0)
    return distances


def krum_scores(distances: np.ndarray, byzantine: int) -> np.ndarray:
    """Each update's Krum score: the sum of its ``max(1, n - f - 2)`` smallest squared distances to the others."""
    n = len(distances)
    others = np.sort(distances + np.diag(np.full(n, np.inf)), axis=1)  # each row's own 0 sorted last
    return others[:, : max(1, n - byzantine - 2)].sum(axis=1)


def multi_krum_selection(rows: np.ndarray, byzantine: int) -> list[int]:
    """The n - f updates (rows) with the lowest Krum scores (Multi-Krum), in client order."""
    scores = krum_scores(squared_distances(rows), byzantine)
    return sorted(np.argsort(scores, kind="stable")[: len(rows) - byzantine].tolist())


def krum(updates: Updates, spec: Aggregation, seed: int | None) -> Admitted:
    """The update with the lowest Krum score (the first of equals, as Flower's)."""
    pick = int(np.argmin(krum_scores(squared_distances(updates.weights), spec.byzantine)))
    return Admitted(updates.weights[pick], [pick])


def multi_krum(updates: Updates, spec: Aggregation, seed: int | None) -> list[int]:
    """The n - f best-scored updates, to be averaged at the server's weights."""
    return multi_krum_selection(updates.weights, spec.byzantine)


def bulyan(updates: Updates, spec: Aggregation, seed: int | None) -> Admitted:
    """theta = n - 2f Krum picks in turn; per coordinate, the mean of the beta = theta - 2f picks nearest their median."""
    from flwr.server.strategy.aggregate import aggregate_median

    f, weights = spec.byzantine, updates.weights
    distances = squared_distances(weights)
    remaining, picked = list(range(len(weights))), []
    for _ in range(len(weights) - 2 * f):  # Krum among those not yet picked, each time on the same distances
        scores = krum_scores(distances[np.ix_(remaining, remaining)], f)
        picked.append(remaining.pop(int(np.argmin(scores))))
    chosen = weights[picked]
    median_row = aggregate_median([([row], 1) for row in chosen])[0]
    beta = len(picked) - 2 * f
    nearest = np.argpartition(np.abs(median_row - chosen), beta - 1, axis=0)[:beta]
    return Admitted(np.take_along_axis(chosen, nearest, axis=0).mean(axis=0), sorted(picked))
