"""Split a training set across K clients: IID, Dirichlet(alpha) label skew, or shards.

Guarantee of every scheme: the returned index arrays are disjoint and their union is
``range(len(labels))`` -- each training sample belongs to exactly one client.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

SCHEMES = ("iid", "dirichlet", "shards")
_DIRICHLET_TRIES = 100


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Return one sorted array of sample indices per client."""
    n = len(labels)
    if num_clients < 1:
        raise ConfigError(f"clients must be >= 1, got {num_clients}")
    if n < num_clients:
        raise ConfigError(f"cannot give {num_clients} clients at least one of only {n} training samples")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_clients, alpha, rng)
    elif scheme == "shards":
        parts = _shards(labels, num_clients, shards_per_client, rng)
    else:
        raise ConfigError(f"unknown partition {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, split its samples over clients in proportions drawn from Dir(alpha, ..., alpha).

    Draws are repeated until every client holds at least one sample (small alpha can leave
    clients empty); a client with no data could not take part in a round.
    """
    if not alpha > 0:
        raise ConfigError(f"dirichlet_alpha must be > 0, got {alpha}")
    classes = np.unique(labels)
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha))) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) > 0:
            return merged
    raise ConfigError(
        f"Dirichlet(alpha={alpha}) left some of the {k} clients without data in {_DIRICHLET_TRIES} "
        "draws; use a larger dirichlet_alpha or fewer clients"
    )


def _shards(labels: np.ndarray, k: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-IID split: sort by label, cut into k*per_client shards."""
    if per_client < 1:
        raise ConfigError(f"shards_per_client must be >= 1, got {per_client}")
    if len(labels) < k * per_client:
        raise ConfigError(f"{len(labels)} samples cannot make {k * per_client} shards")
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, k * per_client)
    assignment = rng.permutation(k * per_client).reshape(k, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in assignment]


def summarize(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> dict:
    """Samples and class histogram per client, plus totals: saved with every run."""
    per_client = [
        {
            "client": i,
            "samples": int(len(p)),
            "class_counts": np.bincount(labels[p], minlength=num_classes).tolist(),
        }
        for i, p in enumerate(parts)
    ]
    sizes = np.array([len(p) for p in parts])
    classes_held = np.array([int((np.bincount(labels[p], minlength=num_classes) > 0).sum()) for p in parts])
    return {
        "clients": len(parts),
        "samples": int(sizes.sum()),
        "samples_per_client": {"min": int(sizes.min()), "mean": float(sizes.mean()), "max": int(sizes.max())},
        "classes_per_client": {
            "min": int(classes_held.min()),
            "mean": float(classes_held.mean()),
            "max": int(classes_held.max()),
        },
        "per_client": per_client,
    }
