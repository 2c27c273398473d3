"""FLAME (Nguyen et al., USENIX Security 2022, "FLAME: taming backdoors in federated learning"): cluster, clip, noise.

With the n valid updates' weights w_i, their steps g_i = w_i - w:

1. **Cluster**: HDBSCAN (scikit-learn's) on the pairwise cosine distances of the w_i (the
   paper's local models), ``min_cluster_size = n // 2 + 1``, ``min_samples = 1``,
   ``allow_single_cluster``: the largest cluster is admitted, the rest (HDBSCAN's other
   clusters and noise points) rejected. Everything noise: every update is admitted (BackFed).
2. **Clip**: ``S = median_i ||g_i||`` over all n; each admitted step is scaled by min(1, S / ||g_i||).
3. **Aggregate**: w + the plain mean of the admitted clipped steps (sample counts are ignored).
4. **Noise**: Gaussian of std ``lambda * S`` on every floating-point coordinate, lambda =
   ``flame_lambda`` (0.001, the paper's for image classification), drawn from the round's seed
   (FLPoison and BackFed also multiply by each tensor's std: not the paper's formula).

Integer buffers take the mean like every coordinate and are rounded by :func:`~dipsen.federated.aggregate.aggregate`.
"""

from __future__ import annotations

import numpy as np

from .base import FLAME, Admitted, Aggregation, Updates, generator


def flame_admitted(weights: np.ndarray) -> np.ndarray:
    """Indices of the updates in HDBSCAN's largest cluster of cosine distances (all of them if it finds none)."""
    from sklearn.cluster import HDBSCAN  # slow to import: only here

    n = len(weights)
    if n < 3:  # nothing to outvote
        return np.arange(n)
    norms = np.linalg.norm(weights, axis=1)
    unit = weights / np.where(norms > 0, norms, 1.0)[:, None]
    distances = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    # copy=False: the distance matrix is this call's own, HDBSCAN may overwrite it (and saying so silences sklearn's warning)
    clustering = HDBSCAN(metric="precomputed", min_cluster_size=n // 2 + 1, min_samples=1, allow_single_cluster=True, copy=False)
    labels = clustering.fit_predict(distances)
    clusters = labels[labels >= 0]
    if not len(clusters):
        return np.arange(n)
    return np.flatnonzero(labels == np.bincount(clusters).argmax())


def flame(updates: Updates, spec: Aggregation, seed: int | None) -> Admitted:
    """w + the mean of the admitted steps clipped at the median norm, plus Gaussian noise of std lambda * S (module doc)."""
    steps = updates.steps
    norms = np.linalg.norm(steps, axis=1)
    bound = float(np.median(norms))
    admitted = flame_admitted(updates.weights)
    scale = np.minimum(1.0, np.divide(bound, norms[admitted], out=np.ones(len(admitted)), where=norms[admitted] > 0))
    new = updates.origin + (scale[:, None] * steps[admitted]).mean(axis=0)
    if spec.flame_lambda > 0:
        floating = np.concatenate([np.full(v.numel(), v.is_floating_point()) for v in updates.global_state.values()])
        noise = generator(seed, FLAME).normal(0.0, spec.flame_lambda * bound, size=new.shape)
        new = new + np.where(floating, noise, 0.0)
    return Admitted(new, admitted.tolist())
