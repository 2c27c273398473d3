"""Server-side weights, update clipping and the robust aggregators (dipsen.federated.aggregate)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum, aggregate_median, aggregate_trimmed_avg

from dipsen.config import TrainConfig, load_config
from dipsen.errors import ConfigError
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.aggregate import (
    AGGREGATORS,
    Aggregation,
    aggregate,
    cap_shares,
    clip_update,
    multi_krum_selection,
    server_counts,
    trim_count,
)
from dipsen.federated.schedule import round_lr


def _states(*rows) -> list[dict]:
    return [{"w": torch.tensor(row, dtype=torch.float64)} for row in rows]


GLOBAL = {"w": torch.zeros(3, dtype=torch.float64)}


def test_median_of_three_is_coordinate_wise():
    states = _states([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [100.0, -5.0, 3.0])
    out = aggregate(states, [1, 1, 1], GLOBAL, Aggregation("median"))
    assert out["w"].tolist() == [2.0, 2.0, 3.0]


def test_trimmed_mean_cuts_each_end_of_each_coordinate():
    states = _states([1.0, 0.0, -50.0], [2.0, 10.0, 1.0], [3.0, 20.0, 2.0], [4.0, 30.0, 3.0], [1000.0, 40.0, 4.0])
    out = aggregate(states, [1] * 5, GLOBAL, Aggregation("trimmed-mean", trim_fraction=0.2))
    assert out["w"].tolist() == [3.0, 20.0, 2.0]  # means of the middle three of each column


def _honest_and_outlier(honest: int, outliers: int = 1, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = [rng.normal(1.0, 0.01, 6) for _ in range(honest)] + [np.full(6, 50.0) for _ in range(outliers)]
    return [{"w": torch.tensor(r)} for r in rows]


def test_krum_picks_an_honest_update_against_an_outlier():
    states = _honest_and_outlier(4)
    g = {"w": torch.zeros(6, dtype=torch.float64)}
    out = aggregate(states, [1] * 5, g, Aggregation("krum", byzantine=1))
    assert any(torch.equal(out["w"], s["w"]) for s in states[:4])
    assert multi_krum_selection(np.stack([s["w"].numpy() for s in states]), 1) == [0, 1, 2, 3]
    multi = aggregate(states, [1] * 5, g, Aggregation("multi-krum", byzantine=1))
    assert torch.allclose(multi["w"], torch.stack([s["w"] for s in states[:4]]).mean(0))
    assert (aggregate(_honest_and_outlier(6), [1] * 7, g, Aggregation("bulyan", byzantine=1))["w"] - 1).abs().max() < 0.05
    assert aggregate(states, [1] * 5, g, Aggregation("fedavg"))["w"].min() > 10  # what the robust rules avoid


def _random_updates(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"a": torch.tensor(rng.normal(size=(3, 4))), "b": torch.tensor(rng.normal(size=5))} for _ in range(n)]


def _ndarrays(states) -> list[list[np.ndarray]]:
    return [[s["a"].numpy(), s["b"].numpy()] for s in states]


@pytest.mark.parametrize("seed", [0, 1])
def test_ours_and_flowers_agree_on_the_same_inputs(seed):
    states = _random_updates(11, seed)
    counts = list(np.random.default_rng(seed).integers(1, 100, 11))
    g = {"a": torch.zeros(3, 4, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}
    f = 2

    def ours(rule, **kw):
        out = aggregate(states, counts, g, Aggregation(rule, byzantine=f if "krum" in rule or rule == "bulyan" else 0, **kw))
        return [out["a"].numpy(), out["b"].numpy()]

    def flower(fn, *args, **kw):
        return fn([(a, int(n)) for a, n in zip(_ndarrays(states), counts, strict=True)], *args, **kw)

    cases = [
        (ours("median"), flower(aggregate_median)),
        (ours("trimmed-mean", trim_fraction=0.2), flower(aggregate_trimmed_avg, 0.2)),
        (ours("krum"), flower(aggregate_krum, num_malicious=f, to_keep=0)),
        (ours("bulyan"), flower(aggregate_bulyan, num_malicious=f, aggregation_rule=aggregate_krum, to_keep=0)),
    ]
    for mine, theirs in cases:  # the same functions on the same float64 arrays: bit for bit
        assert all(np.array_equal(x, y) for x, y in zip(mine, theirs, strict=True))
    # Multi-Krum: our selection, then fedavg; Flower's sample-weighted mean of the same n - f
    mine, theirs = ours("multi-krum"), flower(aggregate_krum, num_malicious=f, to_keep=11 - f)
    assert all(np.allclose(x, y, rtol=1e-12, atol=1e-12) for x, y in zip(mine, theirs, strict=True))


def test_float32_models_and_integer_buffers_are_handled_as_fedavg_handles_them():
    g = {"w": torch.zeros(2), "n": torch.tensor(0)}
    states = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(v)} for v in (2, 3, 7, 8)]
    server = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}  # fltrust's own update
    for rule in AGGREGATORS:
        out = aggregate(states, [1] * 4, g, Aggregation(rule, server_update=lambda state, seed: server), noise_seed=0)
        assert out["w"].dtype == torch.float32 and out["n"].dtype == torch.int64
    assert aggregate(states, [1] * 4, g, Aggregation("median"))["n"].item() == 5  # 5.0
    assert aggregate(states[:3], [1] * 3, g, Aggregation("trimmed-mean", trim_fraction=0.34))["n"].item() == 3


def test_clipping_bounds_the_update_norm():
    g = {"w": torch.ones(4), "n": torch.tensor(1)}
    big = {"w": torch.ones(4) + torch.tensor([30.0, 40.0, 0.0, 0.0]), "n": torch.tensor(9)}
    small = {"w": torch.ones(4) + 0.1, "n": torch.tensor(2)}
    clipped = clip_update(big, g, 5.0)
    assert (clipped["w"] - 1).norm().item() == pytest.approx(5.0, rel=1e-12) and clipped["w"].dtype == torch.float64
    assert torch.equal(clipped["n"], big["n"])  # integer buffers are no step
    assert torch.allclose(clip_update(small, g, 5.0)["w"], small["w"].double())
    for rule in ("fedavg", "median", "krum"):
        out = aggregate([big, big, big], [1, 1, 1], g, Aggregation(rule, clip_norm=5.0))
        assert (out["w"] - g["w"]).norm().item() <= 5.0 + 1e-5


def test_a_huge_reported_sample_count_cannot_dominate():
    assert server_counts([10**12, 50, 40], [60, 50, 40]) == [60, 50, 40]
    assert server_counts([10, 50], [60, 50]) == [10, 50]  # a lower claim stands
    shares = cap_shares([1000, 10, 10, 10], 0.5)
    assert shares == [0.5, 1 / 6, 1 / 6, 1 / 6]
    assert cap_shares([1000, 10, 10, 10], 0.2) == [0.25] * 4  # no weights can meet 0.2 < 1/4
    assert cap_shares([30, 20, 10], 0.6) == [30, 20, 10]  # no share above 0.6: the counts themselves
    shares = cap_shares([500, 400, 30, 20, 10, 40], 0.3)
    assert sum(shares) == pytest.approx(1) and max(shares) <= 0.3 + 1e-12
    assert shares[2] / shares[4] == pytest.approx(3)  # the uncapped keep their proportions
    g = {"w": torch.zeros(1)}
    states = [{"w": torch.tensor([100.0])}] + [{"w": torch.tensor([0.0])}] * 3
    out = aggregate(states, [10**6, 10, 10, 10], g, Aggregation("fedavg", max_client_weight=0.25))
    assert out["w"].item() == pytest.approx(25.0)


class _InflatingRunner:
    """A local runner whose client 0 claims 10^9 samples (with a consistent step count)."""

    def __init__(self, inner, training) -> None:
        self.inner, self.training = inner, training

    def run(self, state, tasks):
        results = self.inner.run(state, tasks)
        for i, task in enumerate(tasks):
            if task.client == 0:
                n = 10**9
                steps = self.training.epochs * math.ceil(n / self.training.batch_size)
                results[i] = dataclasses.replace(results[i], num_samples=n, steps=steps)
        return results

    def close(self, abort=False):
        self.inner.close(abort)


TINY = dict(dataset="mnist", model="cnn", clients=4, fraction=1.0, train_subset=200, test_subset=100, seed=3, workers=1)


def _final(run: RunDir) -> dict:
    return run.load_checkpoint(run.last_round())


def test_an_inflated_sample_count_is_capped_at_the_partition_in_the_engine(mnist, tmp_path, caplog):
    cfg = TrainConfig(rounds=1, **TINY).validate()
    honest = RunDir.create(tmp_path / "honest", cfg)
    train(FederatedTraining(cfg, mnist), honest)
    inner = FederatedTraining(cfg, mnist)
    job = FederatedTraining(cfg, mnist, runner=_InflatingRunner(inner.clients, inner.training))
    lying = RunDir.create(tmp_path / "lying", cfg)
    with caplog.at_level("WARNING", logger="dipsen.federated.engine"):
        train(job, lying)
    assert "client 0 claims 1000000000 samples, its partition 50" in caplog.text
    a, b = _final(honest), _final(lying)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the claim changed nothing
    assert lying.metrics()[0]["samples"] == honest.metrics()[0]["samples"] == 200


@pytest.mark.parametrize(
    "values, key, message",
    [
        ({"aggregator": "krum", "byzantine": 1, "clients": 4, "fraction": 1.0}, "byzantine", "needs m >= 2f \\+ 3 = 5"),
        ({"aggregator": "bulyan", "byzantine": 2, "clients": 10, "fraction": 1.0}, "byzantine", "needs m >= 4f \\+ 3 = 11"),
        (
            {"aggregator": "median", "byzantine": 1},
            "byzantine",
            "applies to aggregator krum, multi-krum, bulyan, dnc or pre_aggregation nnm only",
        ),
        ({"aggregator": "trimmed-mean", "trim_fraction": 0.5}, "trim_fraction", "in \\[0, 0.5\\)"),
        ({"aggregator": "trimmed-mean", "trim_fraction": 0.04}, "trim_fraction", "trims no update of 20"),
        ({"aggregator": "mean"}, "aggregator", "must be one of fedavg, trimmed-mean"),
        ({"clip_norm": 0.0}, "clip_norm", "must be a number > 0"),
        ({"max_client_weight": 1.5}, "max_client_weight", "in \\(0, 1\\]"),
        (
            {"aggregator": "centered-clipping", "byzantine": 1},
            "byzantine",
            "applies to aggregator krum, .* or pre_aggregation nnm",
        ),
        ({"aggregator": "dnc", "byzantine": 4, "clients": 4, "fraction": 1.0}, "byzantine", "dnc needs m >= f \\+ 1 = 5"),
        (
            {"aggregator": "krum", "byzantine": 4, "pre_aggregation": "bucketing"},  # 11 buckets of 2 > m = 20
            "byzantine",
            "krum needs m >= 2\\(2f \\+ 3 - 1\\) \\+ 1 = 21",
        ),
        ({"aggregator": "trimmed-mean", "pre_aggregation": "bucketing", "bucket_size": 4}, "trim_fraction", "no update of 5"),
        ({"client_dp_noise": 1.0, "clip_norm": 1.0, "pre_aggregation": "nnm"}, "client_dp_noise", "needs pre_aggregation none"),
    ],
)
def test_aggregation_options_are_validated(values, key, message):
    with pytest.raises(ConfigError, match=message) as error:
        TrainConfig(**values).validate()
    assert error.value.key == key


def test_flags_name_the_aggregation_options_and_krum_raises_the_round_minimum():
    with pytest.raises(ConfigError, match="^--byzantine 5 is too large for m = 20"):
        load_config(None, {"aggregator": "bulyan", "byzantine": 5})
    cfg = TrainConfig(aggregator="bulyan", byzantine=4, min_clients=2).validate()  # m = 20 >= 19
    assert cfg.required_updates == 19
    assert TrainConfig(aggregator="median").validate().required_updates == 11  # more than half of m
    bucketed = TrainConfig(aggregator="krum", byzantine=2, pre_aggregation="bucketing", min_clients=2).validate()
    assert bucketed.required_updates == 13  # 7 = 2f + 3 buckets of 2


def test_trimmed_mean_cuts_exactly_c_of_n_when_the_fraction_is_c_over_n():
    n, c = 44, 15
    assert int(c / n * n) == 14 and trim_count(c / n, n) == 15  # Flower's int(q n) would cut one fewer
    rows = np.random.default_rng(0).normal(size=(n, 30))
    out = aggregate(
        _states(*rows), [1] * n, {"w": torch.zeros(30, dtype=torch.float64)}, Aggregation("trimmed-mean", trim_fraction=c / n)
    )
    assert np.allclose(out["w"].numpy(), np.sort(rows, axis=0)[c : n - c].mean(axis=0), rtol=0, atol=1e-12)


def test_the_poisoning_study_tells_trimmed_mean_the_cut_it_planned():
    from dipsen.report.poisoning import exceeded, p_more_than_told

    config = TrainConfig(clients=440, fraction=0.1, aggregator="trimmed-mean", trim_fraction=15 / 44).validate()  # m = 44
    assert p_more_than_told(config, 0.3) == exceeded(15, 0.3, 440, 44) != exceeded(14, 0.3, 440, 44)


@pytest.mark.parametrize("m", [3, 20, 44, 49])
def test_a_trim_fraction_of_one_over_m_and_the_suggested_minimum_are_accepted(m):
    settings = dict(clients=m, fraction=1.0, aggregator="trimmed-mean")
    TrainConfig(**settings, trim_fraction=1 / m).validate()  # (1/49) * 49 < 1 in floats
    with pytest.raises(ConfigError, match="use at least") as error:
        TrainConfig(**settings, trim_fraction=0.01).validate()
    suggested = float(str(error.value).rsplit(" ", 1)[-1])
    assert TrainConfig(**settings, trim_fraction=suggested).validate().trim_fraction == suggested


def test_a_median_run_is_deterministic_and_resumes_bit_identically(mnist, tmp_path):
    settings = dict(TINY, aggregator="median", clip_norm=5.0)
    full_cfg = TrainConfig(rounds=2, **settings).validate()
    runs = []
    for name in ("a", "b"):
        run = RunDir.create(tmp_path / name, full_cfg)
        train(FederatedTraining(full_cfg, mnist), run)
        runs.append(run)
    assert all(torch.equal(_final(runs[0])[k], _final(runs[1])[k]) for k in _final(runs[0]))
    assert runs[0].metrics()[-1]["test_accuracy"] > 0.2  # it learns
    short = RunDir.create(tmp_path / "short", TrainConfig(rounds=1, **settings).validate())
    train(FederatedTraining(short.config(), mnist), short)
    cfg = short.reconfigure(rounds=2, keep_checkpoints=None)
    train(FederatedTraining(cfg, mnist), short, resume=True)
    assert all(torch.equal(_final(short)[k], _final(runs[0])[k]) for k in _final(runs[0]))


def test_fltrust_trains_the_server_on_validation_rows_only_at_the_rounds_rate(mnist, tmp_path, monkeypatch):
    from dipsen.federated import engine

    cfg = TrainConfig(rounds=3, aggregator="fltrust", fltrust_root_size=10, lr_schedule="cyclic", lr=0.004, **TINY)
    cfg = cfg.validate()
    assert cfg.holds_out_validation
    seen = []
    real = engine.client_update
    monkeypatch.setattr(engine, "client_update", lambda *args: seen.append((args[2], args[4].lr)) or real(*args))
    job = FederatedTraining(cfg, mnist)
    run = RunDir.create(tmp_path / "run", cfg)
    train(job, run)
    validation = {row.tobytes() for row in job.x_validation}
    assert len(seen) == 3 and all(len(rows) == 10 for rows, _ in seen)  # one server update per round, on the root rows
    assert all(row.numpy().tobytes() in validation for rows, _ in seen for row in rows)
    # the server's step at the rate its clients trained at that round, which the schedule changes every round
    assert [lr for _, lr in seen] == [r["lr"] for r in run.metrics()] == [round_lr("cyclic", 0.004, r, 3) for r in (1, 2, 3)]
    assert run.read_json("run_info.json")["validation"]["samples"] == cfg.validation_size == 20  # 10% of 200 rows


@pytest.mark.parametrize(
    "settings",
    [
        dict(aggregator="fltrust", fltrust_root_size=10),
        dict(aggregator="dnc", byzantine=1, dnc_coordinates=1000, pre_aggregation="bucketing", clients=6),  # 3 buckets
    ],
)
def test_the_randomized_defences_resume_bit_identically(mnist, tmp_path, settings):
    settings = {**TINY, **settings}
    full = RunDir.create(tmp_path / "full", TrainConfig(rounds=2, **settings).validate())
    train(FederatedTraining(full.config(), mnist), full)
    short = RunDir.create(tmp_path / "short", TrainConfig(rounds=1, **settings).validate())
    train(FederatedTraining(short.config(), mnist), short)
    cfg = short.reconfigure(rounds=2, keep_checkpoints=None)
    train(FederatedTraining(cfg, mnist), short, resume=True)
    assert all(torch.equal(_final(short)[k], _final(full)[k]) for k in _final(full))
    assert any(not torch.equal(_final(full)[k], full.load_checkpoint(1)[k]) for k in _final(full))  # round 2 moved
