"""The colluding attacks of dipsen.federated.poisoning (ALIE, IPM, Min-Max, Min-Sum, Mimic, Fang, FLTrust's adaptive): each one's
defining property on synthetic updates, and tiny engine runs whose malicious updates all pass validation."""

import logging

import numpy as np
import pytest
import torch

from dipsen.config import TrainConfig, load_config
from dipsen.errors import ConfigError
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.aggregate import Aggregation, aggregate, validate_report, validate_update
from dipsen.federated.client import ClientUpdate, LocalTraining
from dipsen.federated.poisoning import ATTACKS, Adversary, AttackOptions, alie_z, statistical
from dipsen.federated.poisoning.full_knowledge import FANG_TRIM_FACTOR
from dipsen.federated.poisoning.statistical import mimic_target, perturbation
from dipsen.federated.workers import ClientFailure

COLLUDING = ("alie", "ipm", "min-max", "min-sum", "mimic", "fang-krum", "fang-trim", "fltrust-adaptive")
TRAINING = LocalTraining()
D = 1000


def _update(state: dict, samples: int = 50) -> ClientUpdate:
    return ClientUpdate(state, samples, 0.5, TRAINING.steps_for(samples), 0.01)


def _synthetic(n: int = 20, seed: int = 0, dtype=torch.float64) -> tuple[dict, list[ClientUpdate]]:
    """A global state and n honest updates: a shared direction (0.3 per coordinate) plus client noise of std 1."""
    rng = np.random.default_rng(seed)
    g = {"w": torch.tensor(rng.normal(size=D), dtype=dtype), "counter": torch.tensor(7)}
    base = 0.3 * rng.normal(size=D)
    updates = [
        _update({"w": g["w"] + torch.tensor(base + rng.normal(size=D), dtype=dtype), "counter": torch.tensor(8)})
        for _ in range(n)
    ]
    return g, updates


def _attack(attack: str, n: int = 20, f: int = 4, seed: int = 0, dtype=torch.float64, **options):
    """One round of n clients, the first f malicious: (global state, honest updates, what was sent, steps (n, D))."""
    g, updates = _synthetic(n, seed, dtype)
    adversary = Adversary(attack, f / n, frozenset(range(f)), float(n), AttackOptions(**options))
    sent = adversary.send_round(list(range(n)), updates, g, TRAINING, list(range(100, 100 + n)))
    steps = torch.stack([u.state["w"].double() - g["w"].double() for u in sent])
    return g, updates, sent, steps


def _honest_steps(g: dict, updates: list[ClientUpdate], f: int) -> torch.Tensor:
    return torch.stack([u.state["w"] - g["w"] for u in updates[f:]])


# --- ALIE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, f, z",
    [(10, 2, 0.0), (10, 3, 0.180), (20, 4, 0.157), (25, 5, 0.253), (50, 10, 0.253), (50, 12, 0.336), (100, 20, 0.286)],
)
def test_alie_z_is_the_papers_formula(n, f, z):
    assert alie_z(n, f) == pytest.approx(z, abs=5e-4)  # the research notes' table, computed with scipy


def test_alie_z_is_clipped_where_the_formula_leaves_the_unit_interval():
    assert alie_z(10, 6) == pytest.approx(3.0902, abs=1e-4)  # a malicious majority needs no supporter
    assert alie_z(2, 0) == pytest.approx(-3.0902, abs=1e-4)


@pytest.mark.parametrize("z", [None, 1.5, -0.5])
def test_alie_sends_mean_minus_z_std_of_the_honest_updates(z):
    g, updates, _, steps = _attack("alie", alie_z=z)
    honest = _honest_steps(g, updates, 4)
    expected = honest.mean(0) - (alie_z(20, 4) if z is None else z) * honest.std(0, correction=0)
    assert all(torch.allclose(steps[i], expected, rtol=0, atol=1e-12) for i in range(4))
    assert all(torch.equal(steps[i], honest[i - 4]) for i in range(4, 20))  # the honest ones are untouched


def test_alie_with_partial_knowledge_uses_the_malicious_clients_own_updates():
    g, updates, _, steps = _attack("alie", knowledge="partial")
    own = torch.stack([u.state["w"] - g["w"] for u in updates[:4]])
    expected = own.mean(0) - alie_z(20, 4) * own.std(0, correction=0)
    assert torch.allclose(steps[0], expected, rtol=0, atol=1e-12)


def test_alie_at_n_10_f_2_sends_the_honest_mean_and_says_so(caplog):
    statistical._warn_void_z.cache_clear()
    with caplog.at_level(logging.WARNING, logger="dipsen.federated.poisoning.statistical"):
        g, updates, _, steps = _attack("alie", n=10, f=2)
    assert torch.allclose(steps[0], _honest_steps(g, updates, 2).mean(0), rtol=0, atol=1e-12)
    assert "z is 0 at n = 10, f = 2" in caplog.text and "alie_z" in caplog.text


# --- IPM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.1, 10.0])
def test_ipm_sends_minus_eps_times_the_honest_mean(eps):
    g, updates, sent, steps = _attack("ipm", ipm_eps=eps)
    mean = _honest_steps(g, updates, 4).mean(0)
    assert all(torch.allclose(steps[i], -eps * mean, rtol=0, atol=1e-12) for i in range(4))
    assert all(validate_update(u.state, g, u.num_samples) is None for u in sent)


def test_ipm_with_a_large_eps_turns_the_mean_against_the_honest_direction():
    g, updates, sent, steps = _attack("ipm", n=10, f=4, ipm_eps=10.0)
    mean = _honest_steps(g, updates, 4).mean(0)
    fedavg = aggregate([u.state for u in sent], [50] * 10, g, Aggregation())["w"] - g["w"]
    assert float(fedavg @ mean) < 0  # f eps > n - f: 40 > 6


# --- Min-Max and Min-Sum ------------------------------------------------------------------------


def _squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("kind", ["unit", "sign", "std"])
def test_min_max_stays_within_the_honest_updates_largest_distance_and_goes_as_far_as_it_can(kind):
    g, updates, _, steps = _attack("min-max", perturbation=kind)
    honest = _honest_steps(g, updates, 4)
    bound = float(_squared_distances(honest, honest).max())
    assert all(torch.equal(steps[i], steps[0]) for i in range(4))
    assert float(_squared_distances(steps[:1], honest).max()) <= bound * (1 + 1e-12)
    mu, p = honest.mean(0), perturbation(honest, kind)
    gamma = float((steps[0] - mu) @ p / (p @ p))
    assert gamma > 0 and torch.allclose(steps[0], mu + gamma * p, rtol=0, atol=1e-9)
    assert float(_squared_distances((mu + 1.001 * gamma * p)[None], honest).max()) > bound  # the largest gamma


@pytest.mark.parametrize("kind", ["unit", "sign", "std"])
def test_min_sum_stays_within_the_smallest_honest_sum_of_squared_distances(kind):
    g, updates, _, steps = _attack("min-sum", perturbation=kind)
    honest = _honest_steps(g, updates, 4)
    bound = float(_squared_distances(honest, honest).sum(1).min())  # the authors' code: the minimum sum
    assert float(_squared_distances(steps[:1], honest).sum()) <= bound * (1 + 1e-12)
    mu, p = honest.mean(0), perturbation(honest, kind)
    gamma = float((steps[0] - mu) @ p / (p @ p))
    assert gamma > 0 and float(_squared_distances((mu + 1.001 * gamma * p)[None], honest).sum()) > bound


def test_min_max_with_one_known_update_sends_it():
    g, updates, _, steps = _attack("min-max", f=1, knowledge="partial")  # one update: no distance to stay within
    assert torch.allclose(steps[0], updates[0].state["w"] - g["w"], rtol=0, atol=1e-12)


# --- Fang et al. 2020 ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_fang_krum_is_the_update_krum_selects(seed):
    g, updates, sent, steps = _attack("fang-krum", seed=seed)
    honest = _honest_steps(g, updates, 4)
    chosen = aggregate([u.state for u in sent], [50] * 20, g, Aggregation("krum", byzantine=4))
    assert torch.equal(chosen["w"], sent[0].state["w"])
    lam = float(steps[0].abs().max())
    assert lam > 0 and torch.allclose(steps[0], -lam * torch.sign(honest.mean(0)), rtol=0, atol=1e-12)


def test_fang_krum_with_partial_knowledge_stays_in_the_sign_direction_of_its_own_updates():
    g, updates, _, steps = _attack("fang-krum", knowledge="partial")
    own = torch.stack([u.state["w"] - g["w"] for u in updates[:4]])
    lam = float(steps[0].abs().max())
    assert torch.allclose(steps[0], -lam * torch.sign(own.mean(0)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["trimmed-mean", "median"])
def test_fang_trim_moves_the_aggregate_opposite_to_the_honest_direction(rule):
    g, updates, sent, steps = _attack("fang-trim")
    honest = _honest_steps(g, updates, 4)
    mu = honest.mean(0)
    neutral = [_update({"w": g["w"] + mu, "counter": torch.tensor(8)})] * 4  # the malicious clients sending the mean
    spec = Aggregation(rule, trim_fraction=0.2)
    attacked = aggregate([u.state for u in sent], [50] * 20, g, spec)["w"]
    reference = aggregate([u.state for u in neutral + updates[4:]], [50] * 20, g, spec)["w"]
    shift = attacked - reference
    assert bool((shift * torch.sign(mu) <= 0).all()) and float(shift @ mu) < 0


def test_fang_trim_goes_beyond_the_honest_extreme_within_the_factor_and_is_seeded():
    g, updates, sent, steps = _attack("fang-trim")
    honest = _honest_steps(g, updates, 4)
    mu, low, high = honest.mean(0), honest.min(0).values, honest.max(0).values
    b = FANG_TRIM_FACTOR
    for row in steps[:4]:
        up, down = mu < 0, mu > 0
        assert bool((row[down] <= low[down]).all() and (row[up] >= high[up]).all())
        assert bool((row[down] >= torch.minimum(b * low, low / b)[down]).all())
        assert bool((row[up] <= torch.maximum(b * high, high / b)[up]).all())
    assert not torch.equal(steps[0], steps[1])  # each client draws from its own seed
    assert torch.equal(steps, _attack("fang-trim")[3])


# --- FLTrust's adaptive attack -----------------------------------------------------------------


def _fltrust_shift(g: dict, honest: list[ClientUpdate], malicious_step: torch.Tensor, server_step: torch.Tensor) -> float:
    """||FLTrust's aggregate with 4 copies of ``malicious_step`` - without them||, the server stepping ``server_step``."""
    spec = Aggregation("fltrust", server_update=lambda state, seed: {**state, "w": state["w"] + server_step})
    bad = [{"w": g["w"] + malicious_step, "counter": torch.tensor(8)}] * 4
    clean = aggregate([u.state for u in honest], [50] * len(honest), g, spec, noise_seed=0)["w"]
    attacked = aggregate(bad + [u.state for u in honest], [50] * (4 + len(honest)), g, spec, noise_seed=0)["w"]
    return float((attacked - clean).norm())


def test_fltrust_adaptive_gets_trust_and_moves_fltrust_further_than_any_other_angle_or_attack():
    g, updates, sent, steps = _attack("fltrust-adaptive")
    honest = _honest_steps(g, updates, 4)
    mu = honest.mean(0)
    step = steps[0]
    assert torch.equal(steps[:4], step.expand(4, -1))
    assert float(step @ mu) > 0  # a positive cosine to the server's direction: FLTrust trusts it
    assert float(step.norm()) == pytest.approx(float(honest.norm(dim=1).mean()), rel=1e-9)
    # the server's own step along mu (the attacker's stand-in for it): the chosen angle beats every other one tried
    g_hat = mu / mu.norm()
    v = -torch.sign(mu) - (-torch.sign(mu) @ g_hat) * g_hat
    v = v / v.norm()
    chosen = _fltrust_shift(g, updates[4:], step, mu)
    for degrees in (0, 15, 30, 45, 60, 75, 89):
        t = torch.tensor(np.radians(degrees), dtype=torch.float64)
        other = float(step.norm()) * (torch.cos(t) * g_hat + torch.sin(t) * v)
        assert chosen >= _fltrust_shift(g, updates[4:], other, mu) - 1e-9, degrees
    # and beats the attacks not built for FLTrust, measured by the rule itself
    for attack in ("alie", "ipm", "min-max", "fang-trim"):
        assert chosen > _fltrust_shift(g, updates[4:], _attack(attack)[3][0], mu), attack


# --- Mimic --------------------------------------------------------------------------------------


def test_mimic_copies_the_honest_update_furthest_along_the_top_principal_direction():
    g, updates = _synthetic(20, dtype=torch.float32)  # float32 weights, as the models' own
    direction = torch.zeros(D)
    direction[:10] = 1.0
    for i, update in enumerate(updates[4:]):  # the honest clients spread along one direction, client 11 furthest
        update.state["w"] += (8.0 if i == 7 else (i % 3) - 1.0) * direction
    adversary = Adversary("mimic", 0.2, frozenset(range(4)), 20.0)
    sent = adversary.send_round(list(range(20)), updates, g, TRAINING, list(range(20)))
    assert mimic_target(_honest_steps(g, updates, 4).double()) == 7
    # bit-identical: the float64 step w_k - w of float32 weights is exact, and so is w + step rounded back to float32
    assert all(torch.equal(sent[i].state["w"], updates[11].state["w"]) for i in range(4))


def test_mimic_needs_full_knowledge():
    with pytest.raises(ConfigError, match="^--attack-knowledge 'partial': mimic needs full knowledge$"):
        load_config(None, {"malicious_fraction": 0.2, "malicious_attack": "mimic", "attack_knowledge": "partial"})
    load_config(None, {"malicious_fraction": 0.2, "malicious_attack": "sign-flip", "attack_knowledge": "partial"})


# --- what every attack sends --------------------------------------------------------------------


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_every_attack_keeps_dtypes_reports_plausibly_and_passes_validation(attack):
    g, updates, sent, _ = _attack(attack, dtype=torch.float32)
    for update, original in zip(sent[:4], updates[:4], strict=True):
        assert {k: v.dtype for k, v in update.state.items()} == {"w": torch.float32, "counter": torch.int64}
        assert torch.equal(update.state["counter"], original.state["counter"])  # integer buffers as trained
        assert validate_update(update.state, g, update.num_samples) is None and validate_report(update, TRAINING) is None
        assert (update.mean_loss, update.seconds) == (original.mean_loss, original.seconds)
    assert all(s is u for s, u in zip(sent[4:], updates[4:], strict=True))  # honest updates pass as they are


@pytest.mark.parametrize("attack", COLLUDING)
def test_failed_and_rejected_clients_pass_through_and_are_not_counted(attack):
    g, updates = _synthetic(10)
    broken = _update({"w": g["w"] + float("nan"), "counter": torch.tensor(8)})
    outcomes = [ClientFailure("no reply"), broken, *updates[2:]]
    adversary = Adversary(attack, 0.3, frozenset({0, 1, 2}), 10.0)
    sent = adversary.send_round(list(range(10)), outcomes, g, TRAINING, list(range(10)))
    assert sent[0] is outcomes[0] and sent[1] is broken and sent[2] is not updates[2]
    assert validate_update(sent[2].state, g, sent[2].num_samples) is None


@pytest.mark.parametrize("attack", COLLUDING)
def test_without_an_honest_update_full_knowledge_sends_the_honest_updates(attack):
    g, updates = _synthetic(3)
    outcomes = [updates[0], updates[1], ClientFailure("no reply")]
    sent = Adversary(attack, 0.5, frozenset({0, 1}), 3.0).send_round([0, 1, 2], outcomes, g, TRAINING, [0, 1, 2])
    assert all(s is o for s, o in zip(sent, outcomes, strict=True))


# --- tiny engine runs ---------------------------------------------------------------------------

SMALL = dict(dataset="mnist", model="cnn", clients=10, fraction=1.0, train_subset=500, test_subset=100, seed=3, workers=1)


@pytest.mark.parametrize(
    "attack, settings",
    [
        ("alie", {}),
        ("ipm", {"ipm_eps": 10.0}),
        ("min-max", {"attack_knowledge": "partial"}),
        ("min-sum", {"minmax_perturbation": "std"}),
        ("mimic", {"aggregator": "median"}),
        ("fang-krum", {"aggregator": "krum", "byzantine": 3}),
        ("fang-trim", {"aggregator": "trimmed-mean", "trim_fraction": 0.3}),
        ("fltrust-adaptive", {"aggregator": "fltrust", "fltrust_root_size": 20}),
    ],
)
def test_a_round_under_each_colluding_attack_accepts_every_malicious_update(mnist, tmp_path, attack, settings):
    cfg = TrainConfig(**SMALL, rounds=1, malicious_fraction=0.3, malicious_attack=attack, **settings).validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist), run)
    assert len(run.read_json("run_info.json")["malicious"]["clients"]) == 3
    assert run.metrics()[0]["rejected"] == []
    g, final = run.load_checkpoint(0), run.load_checkpoint(1)
    assert not all(torch.equal(g[k], final[k]) for k in g)


def test_alie_and_ipm_bring_krums_accuracy_down(mnist, tmp_path):
    """3 rounds, 3 of 10 clients malicious: measured 0.38 attack-free, 0.12 under ALIE (z = 1.5), 0.07 under IPM (eps 0.1).

    ALIE's formula gives z = 0.18 at n = 10, f = 3, too little to hurt in 3 rounds (measured 0.45).
    """
    accuracy = {}
    for name, extra in (("none", {}), ("alie", {"alie_z": 1.5}), ("ipm", {})):
        attack = {} if name == "none" else {"malicious_fraction": 0.3, "malicious_attack": name, **extra}
        cfg = TrainConfig(**SMALL, rounds=3, aggregator="krum", byzantine=3, **attack).validate()
        run = RunDir.create(tmp_path / name, cfg)
        accuracy[name] = train(FederatedTraining(cfg, mnist), run)["accuracy"]
    assert accuracy["alie"] < accuracy["none"] - 0.15 and accuracy["ipm"] < accuracy["none"] - 0.15, accuracy


def test_poison_study_takes_the_colluding_attacks():
    from dipsen.report.poisoning import plan, study_options

    runs = plan(study_options("mnist", list(COLLUDING), ["median"], [0, 0.2]))
    assert [r.attack for r in runs] == [None, *COLLUDING]
    assert all(r.config.malicious_attack == r.attack and r.config.attack_knowledge == "full" for r in runs)
