"""Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021): drop the updates far out along the top singular direction.

On the steps g_i = w_i - w, ``dnc_iterations`` times: sample b = ``dnc_coordinates`` coordinates
(all if d <= b), centre the n subsampled steps on their mean mu, take the top right singular
vector v of the centred (n x b) matrix, score ``s_i = <g_i - mu, v>^2`` and keep the n - c f
updates of lowest score (c = 1, every reference's default; f = ``byzantine``). The good set is the
intersection over the iterations; the new weights are its FedAvg at the server's weights (the
weight cap applies among those kept, as for Multi-Krum; the references take the plain mean). If the
intersection is empty the global weights stay. Defaults: 5 iterations (FLPoison, Flower's DnC
baseline config) and b = 10,000 (the paper's value as quoted; unverified: FLPoison samples 20% of d).
"""

from __future__ import annotations

import numpy as np

from .base import DNC, Admitted, Aggregation, Updates, generator


def dnc(updates: Updates, spec: Aggregation, seed: int | None) -> list[int] | Admitted:
    """The indices of the updates every iteration keeps (see the module), or w, admitting none, if none is kept by all."""
    steps, rng = updates.steps, generator(seed, DNC)
    n, d = steps.shape
    good = np.ones(n, dtype=bool)
    for _ in range(spec.dnc_iterations):
        coordinates = np.sort(rng.choice(d, size=min(spec.dnc_coordinates, d), replace=False))
        sampled = steps[:, coordinates]
        centred = sampled - sampled.mean(axis=0)
        # C v = sigma_1 u_1 for the top right singular vector v of C, where (sigma_1^2, u_1) is the top
        # eigenpair of the n x n matrix C C^T: the scores without an SVD of the n x b matrix
        eigenvalues, eigenvectors = np.linalg.eigh(centred @ centred.T)
        scores = eigenvalues[-1] * eigenvectors[:, -1] ** 2
        kept = np.zeros(n, dtype=bool)
        kept[np.argsort(scores, kind="stable")[: n - spec.byzantine]] = True
        good &= kept
    return np.flatnonzero(good).tolist() if good.any() else Admitted(updates.origin, [])
