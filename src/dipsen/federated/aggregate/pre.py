"""Pre-aggregation: mix the round's updates before any rule (``pre_aggregation``), against heterogeneous clients.

``bucketing`` (Karimireddy, He & Jaggi, ICLR 2022): a fresh seeded permutation of the n updates,
split into ceil(n / s) buckets of s (the last may be smaller), each replaced by its mean; the rule
sees the ceil(n / s) bucket means and keeps its f (one malicious update spoils at most one bucket),
so Krum needs ceil(n / s) >= 2f + 3 (:func:`~dipsen.federated.aggregate.min_updates`). s = 2 as in
the authors' experiments.

``nnm``, nearest-neighbour mixing (Allouah et al., AISTATS 2023): each update is replaced by the
mean of its n - f nearest (L2) updates, itself included (f = ``byzantine``); the rule sees n mixed
updates. With f = 0 every one is the mean of all.

The means are unweighted, as in the references (byzfl, the authors' code); the mixed vectors carry
no sample count, so a weighted rule after them (fedavg, multi-krum, dnc) weighs each 1.
"""

from __future__ import annotations

import numpy as np

from .base import BUCKETING, Aggregation, Updates, generator
from .krum import squared_distances


def bucketing(updates: Updates, spec: Aggregation, seed: int | None) -> np.ndarray:
    """(ceil(n / s), d): the means of the buckets of s updates of a seeded random permutation."""
    order = generator(seed, BUCKETING).permutation(len(updates))
    s = spec.bucket_size
    return np.stack([updates.weights[order[i : i + s]].mean(axis=0) for i in range(0, len(order), s)])


def nnm(updates: Updates, spec: Aggregation, seed: int | None) -> np.ndarray:
    """(n, d): each update replaced by the mean of its n - f nearest updates, itself included."""
    weights, keep = updates.weights, len(updates) - spec.byzantine
    nearest = np.argsort(squared_distances(weights), axis=1, kind="stable")[:, :keep]
    mixing = np.zeros((len(weights), len(weights)))  # row i: 1 / (n - f) at i's nearest, so one product mixes all
    np.put_along_axis(mixing, nearest, 1 / keep, axis=1)
    return mixing @ weights
