"""FLAME (dipsen.federated.aggregate.flame): the cluster it admits, the median-norm clip, its noise."""

import numpy as np
import pytest
import torch

from dipsen.federated.aggregate import Aggregation, aggregate
from dipsen.federated.aggregate.flame import flame_admitted

D = 500


def _round(seed: int = 0):
    """w = 0; 7 benign steps along a shared direction, 3 backdoored ones along another, much longer."""
    rng = np.random.default_rng(seed)
    shared, other = rng.normal(size=D), rng.normal(size=D)
    benign = [shared + 0.3 * rng.normal(size=D) for _ in range(7)]
    backdoored = [5 * other + 0.3 * rng.normal(size=D) for _ in range(3)]
    return {"w": torch.zeros(D, dtype=torch.float64)}, [*benign, *backdoored]


def test_flame_admits_the_majority_cluster_and_at_least_half_plus_one():
    _, steps = _round()
    admitted = flame_admitted(np.stack(steps))
    # no backdoored update gets in; HDBSCAN may call a benign one at the cluster's edge noise, as in the reference
    assert set(admitted.tolist()) <= set(range(7)) and len(admitted) >= 10 // 2 + 1
    assert len(flame_admitted(np.random.default_rng(1).normal(size=(9, D)))) >= 9 // 2 + 1  # no structure: a majority or all


def test_flame_without_noise_is_the_mean_of_the_admitted_steps_clipped_at_the_median_norm():
    g, steps = _round()
    norms = np.linalg.norm(steps, axis=1)
    bound = np.median(norms)
    admitted = flame_admitted(np.stack(steps))
    expected = np.mean([steps[i] * min(1.0, bound / norms[i]) for i in admitted], axis=0)
    states = [{"w": torch.from_numpy(s)} for s in steps]
    out = aggregate(states, [50] * 10, g, Aggregation("flame", flame_lambda=0.0), noise_seed=0)["w"].numpy()
    assert np.allclose(out, expected, rtol=0, atol=1e-12)
    assert all(np.linalg.norm(s * min(1.0, bound / n)) <= bound + 1e-12 for s, n in zip(steps, norms, strict=True))
    # counts are ignored: a benign client claiming more samples weighs the same
    assert torch.equal(
        aggregate(states, [1] * 9 + [10**6], g, Aggregation("flame", flame_lambda=0.0), noise_seed=0)["w"], torch.from_numpy(out)
    )


def test_flame_adds_seeded_noise_of_lambda_times_the_median_norm_on_floating_point_weights_only():
    g, steps = _round()
    g["count"] = torch.tensor(3)
    states = [{"w": torch.from_numpy(s), "count": torch.tensor(3)} for s in steps]
    bound = np.median(np.linalg.norm(steps, axis=1))
    quiet = aggregate(states, [50] * 10, g, Aggregation("flame", flame_lambda=0.0), noise_seed=4)
    noisy = aggregate(states, [50] * 10, g, Aggregation("flame", flame_lambda=0.01), noise_seed=4)
    noise = (noisy["w"] - quiet["w"]).numpy()
    assert noise.std() == pytest.approx(0.01 * bound, rel=0.1) and noisy["count"].item() == 3
    again = aggregate(states, [50] * 10, g, Aggregation("flame", flame_lambda=0.01), noise_seed=4)
    assert torch.equal(again["w"], noisy["w"])  # the round's seed: a resume gives the same weights
