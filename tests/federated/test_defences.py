"""The hand-written defences of dipsen.federated.aggregate on analytic cases, and the Gram-matrix Krum against Flower's."""

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum

from dipsen.federated.aggregate import (
    Aggregation,
    Updates,
    aggregate,
    aggregate_round,
    krum_scores,
    multi_krum_selection,
    squared_distances,
)
from dipsen.federated.aggregate.dnc import dnc
from dipsen.federated.aggregate.flame import flame_admitted
from dipsen.federated.aggregate.pre import bucketing, nnm


def _states(rows) -> list[dict]:
    return [{"w": torch.tensor(np.asarray(row, dtype=np.float64))} for row in rows]


def _origin(d: int) -> dict:
    return {"w": torch.zeros(d, dtype=torch.float64)}


def _aggregate(rows, spec: Aggregation, counts=None) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return aggregate(_states(rows), counts or [1] * len(rows), _origin(rows.shape[1]), spec, noise_seed=0)["w"].numpy()


# --- Centered Clipping --------------------------------------------------------------------------


def test_centered_clipping_with_every_step_within_tau_is_the_mean():
    rows = np.random.default_rng(0).normal(size=(7, 20))
    for iterations in (1, 3):  # the mean is a fixed point
        out = _aggregate(rows, Aggregation("centered-clipping", cc_tau=100.0, cc_iterations=iterations))
        assert np.allclose(out, rows.mean(axis=0), rtol=0, atol=1e-14)


def test_centered_clipping_bounds_an_outliers_pull_by_tau_over_n_per_iteration():
    n, tau = 10, 0.5
    rows = np.zeros((n, 5))
    rows[-1, 0] = 1e6  # nine steps at 0 and one far outlier
    assert _aggregate(rows, Aggregation("fedavg"))[0] == pytest.approx(1e5)
    # v_1 = clip(outlier) / n = (tau / n) e_1; v_2 = v_1 + (9 (0 - v_1) + tau e_1) / n = (tau / n)(1 + 1/n) e_1
    one = _aggregate(rows, Aggregation("centered-clipping", cc_tau=tau, cc_iterations=1))
    two = _aggregate(rows, Aggregation("centered-clipping", cc_tau=tau, cc_iterations=2))
    assert np.allclose(one, [tau / n, 0, 0, 0, 0], rtol=1e-15) and np.allclose(two, [tau / n * (1 + 1 / n), 0, 0, 0, 0])
    for iterations in (1, 2, 5):
        pull = np.linalg.norm(_aggregate(rows, Aggregation("centered-clipping", cc_tau=tau, cc_iterations=iterations)))
        assert 0 < pull <= iterations * tau / n + 1e-15


# --- FLTrust ------------------------------------------------------------------------------------


def _fltrust(rows, server_step) -> np.ndarray:
    def server_update(state, seed):  # the server's step from the global weights it is given
        return {"w": state["w"] + torch.tensor(server_step, dtype=torch.float64)}

    return _aggregate(rows, Aggregation("fltrust", server_update=server_update))


def test_fltrust_weighs_by_direction_and_rescales_to_the_servers_norm():
    e1, e2 = np.eye(2)
    server = 2 * e1
    assert np.array_equal(_fltrust([5 * e1], server), 2 * e1)  # the same direction: trust 1, rescaled to ||g_0|| = 2
    assert np.array_equal(_fltrust([e2, -3 * e1], server), [0.0, 0.0])  # orthogonal and opposite: trust 0, no step
    # trust 1 and cos 45 = 1/sqrt(2), steps rescaled to 2 e1 and sqrt(2)(e1 + e2); the others weigh 0
    mixed = _fltrust([3 * e1, e1 + e2, e2, -7 * e1], server)
    assert np.allclose(mixed, (3 * e1 + e2) / (1 + 1 / np.sqrt(2)), rtol=1e-15)
    assert np.allclose(_fltrust([3000 * e1, e1 + e2, 1e-3 * e2, -7 * e1], server), mixed, rtol=1e-15)  # sizes do not count
    assert np.array_equal(_fltrust([e1, e2], np.zeros(2)), [0.0, 0.0])  # no server step: nothing to trust


def test_fltrust_trains_the_server_from_the_global_weights_with_a_seed_of_the_round():
    seen = []

    def server_update(state, seed):
        seen.append((state["w"].clone(), seed))
        return {"w": state["w"] + 1.0}

    g = {"w": torch.full((3,), 5.0, dtype=torch.float64)}
    spec = Aggregation("fltrust", server_update=server_update)
    out = aggregate(_states([[6.0, 6.0, 6.0], [4.0, 4.0, 4.0]]), [1, 1], g, spec, noise_seed=7)
    assert torch.equal(out["w"], torch.full((3,), 6.0, dtype=torch.float64))
    aggregate(_states([[6.0, 6.0, 6.0]]), [1], g, spec, noise_seed=7)
    aggregate(_states([[6.0, 6.0, 6.0]]), [1], g, spec, noise_seed=8)
    assert torch.equal(seen[0][0], g["w"]) and seen[0][1] == seen[1][1] != seen[2][1]
    with pytest.raises(ValueError, match="noise_seed"):
        aggregate(_states([[6.0, 6.0, 6.0]]), [1], g, spec)


# --- DnC ----------------------------------------------------------------------------------------


def _planted(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Nine honest steps around 1 and one outlier 5 away from their mean along a random direction u."""
    rng = np.random.default_rng(seed)
    honest = 1.0 + rng.normal(0, 0.1, size=(9, 50))
    u = rng.normal(size=50)
    return np.vstack([honest, honest.mean(axis=0) + 5 * u / np.linalg.norm(u)]), honest


@pytest.mark.parametrize("iterations, f, coordinates", [(1, 1, 20), (1, 2, 20), (5, 1, 20), (3, 1, 10_000)])
def test_dnc_removes_a_planted_outlier_along_the_top_singular_direction(iterations, f, coordinates):
    rows, honest = _planted()
    spec = Aggregation("dnc", byzantine=f, dnc_iterations=iterations, dnc_coordinates=coordinates)
    kept = dnc(Updates(_states(rows), [1] * 10, _origin(50)), spec, 0)
    assert isinstance(kept, list) and 9 not in kept
    if iterations == 1:
        assert len(kept) == 10 - f  # exactly n - f survive an iteration
    if (iterations, f) == (1, 1):
        assert np.allclose(_aggregate(rows, spec), honest.mean(axis=0), rtol=0, atol=1e-14)


def test_dnc_with_f_0_is_fedavg():
    rows, _ = _planted()
    counts = list(range(1, 11))
    assert np.array_equal(_aggregate(rows, Aggregation("dnc"), counts), _aggregate(rows, Aggregation("fedavg"), counts))


# --- pre-aggregation ----------------------------------------------------------------------------


def test_bucketing_averages_buckets_of_s_of_a_fresh_permutation():
    n = 7
    updates = Updates(_states(np.eye(n)), [1] * n, _origin(n))  # update i is e_i: a bucket mean shows its members
    spec = Aggregation(pre_aggregation="bucketing", bucket_size=2)
    means = bucketing(updates, spec, 0)
    members = [np.flatnonzero(row) for row in means]
    assert means.shape == (4, n) and sorted(len(m) for m in members) == [1, 2, 2, 2]  # ceil(7 / 2) buckets
    assert sorted(np.concatenate(members).tolist()) == list(range(n))  # each update in exactly one bucket
    assert all(np.array_equal(row[m], np.full(len(m), 1 / len(m))) for row, m in zip(means, members, strict=True))
    assert np.array_equal(bucketing(updates, spec, 0), means)  # the same round's seed: the same buckets
    assert not np.array_equal(bucketing(updates, spec, 1), means)  # another round's: others
    # one bucket of all n: the unweighted mean, whatever the sample counts
    whole = Aggregation("fedavg", pre_aggregation="bucketing", bucket_size=n)
    assert np.allclose(_aggregate(np.eye(n), whole, counts=list(range(1, n + 1))), np.full(n, 1 / n), rtol=1e-15)


def test_nnm_replaces_each_update_by_the_mean_of_its_n_minus_f_nearest():
    rows = np.random.default_rng(2).normal(size=(8, 6))
    updates = Updates(_states(rows), [1] * 8, _origin(6))
    mixed = nnm(updates, Aggregation(byzantine=3, pre_aggregation="nnm"), None)
    for i in range(8):
        nearest = np.argsort(np.linalg.norm(rows - rows[i], axis=1))[:5]
        assert i in nearest and np.allclose(mixed[i], rows[nearest].mean(axis=0), rtol=0, atol=1e-14)
    everyone = nnm(updates, Aggregation(pre_aggregation="nnm"), None)  # f = 0: the mean of all, n times
    assert everyone.shape == (8, 6) and np.allclose(everyone, rows.mean(axis=0), rtol=0, atol=1e-14)
    # through aggregate, before a rule: the median of n copies of the mean is the mean
    out = _aggregate(rows, Aggregation("median", pre_aggregation="nnm"))
    assert np.allclose(out, rows.mean(axis=0), rtol=0, atol=1e-14)


# --- Krum's distances from a Gram matrix --------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_gram_krum_selects_what_flowers_aggregate_krum_selects(seed):
    rng = np.random.default_rng(seed)
    n, f = 15, 3
    # global weights of norm ~ 3000 plus steps of different spreads: the Gram products must not cancel
    rows = 100.0 + rng.normal(size=(n, 1000)) * rng.uniform(0.5, 2.0, size=(n, 1))
    direct = np.array([[np.sum((a - b) ** 2) for b in rows] for a in rows])
    assert np.allclose(squared_distances(rows), direct, rtol=1e-10, atol=1e-9)
    scores = np.sort(krum_scores(squared_distances(rows), f))
    assert scores[1] - scores[0] > 1e-6 * scores[0]  # no near-tie for the choice
    results = [([row], 1) for row in rows]
    krum = _aggregate(rows, Aggregation("krum", byzantine=f))
    assert np.array_equal(krum, aggregate_krum(results, num_malicious=f, to_keep=0)[0])
    multi = multi_krum_selection(rows, f)
    assert np.allclose(rows[multi].mean(axis=0), aggregate_krum(results, num_malicious=f, to_keep=n - f)[0], rtol=1e-13)
    bulyan = _aggregate(rows, Aggregation("bulyan", byzantine=f))
    assert np.array_equal(bulyan, aggregate_bulyan(results, num_malicious=f, aggregation_rule=aggregate_krum, to_keep=0)[0])


# --- what the filtering rules admit --------------------------------------------------------------


def _admitted(rows, spec: Aggregation) -> list[int] | None:
    rows = np.asarray(rows, dtype=np.float64)
    return aggregate_round(_states(rows), [1] * len(rows), _origin(rows.shape[1]), spec, noise_seed=0)[1]


def test_each_filtering_rule_says_which_updates_it_admitted_and_the_others_none():
    rng = np.random.default_rng(3)
    rows = np.vstack([rng.normal(1.0, 0.01, (8, 6)), np.full(6, -40.0), np.tile([40.0, -40.0], 3)])  # outliers 8, 9
    honest = list(range(8))
    for rule in ("multi-krum", "dnc"):
        assert _admitted(rows, Aggregation(rule, byzantine=2)) == honest
    assert _admitted(rows, Aggregation("krum", byzantine=2))[0] in honest
    assert len(_admitted(rows, Aggregation("krum", byzantine=2))) == 1
    assert _admitted(rows, Aggregation("bulyan", byzantine=1)) == honest  # n - 2f = 8 Krum picks, all honest
    flame = _admitted(rows, Aggregation("flame", flame_lambda=0.0))  # HDBSCAN's largest cluster (test_flame.py)
    assert flame == flame_admitted(rows).tolist() and set(flame) <= set(honest)
    for rule in ("fedavg", "median", "trimmed-mean", "centered-clipping"):
        assert _admitted(rows, Aggregation(rule)) is None
    # a pre-aggregation's vectors are mixtures, not clients' updates: nothing to name
    assert _admitted(rows, Aggregation("multi-krum", byzantine=1, pre_aggregation="bucketing")) is None


def test_fltrust_admits_the_updates_of_positive_trust():
    e1, e2 = np.eye(2)

    def server_update(state, seed):
        return {"w": state["w"] + torch.tensor(2 * e1, dtype=torch.float64)}

    spec = Aggregation("fltrust", server_update=server_update)
    assert _admitted([3 * e1, e1 + e2, e2, -7 * e1], spec) == [0, 1]  # orthogonal and opposite: trust 0
    assert _admitted([-e1, e2], spec) == []
