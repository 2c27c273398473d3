"""Simulated malicious clients (dipsen.federated.poisoning); the study that runs them is tests/report/test_poison_study.py."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dipsen.config import TrainConfig, load_config
from dipsen.errors import ConfigError
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.aggregate import (
    AGGREGATORS,
    BYZANTINE_AGGREGATORS,
    MAX_STEP_NORM_RATIO,
    Aggregation,
    aggregate,
    server_counts,
    validate_report,
    validate_update,
)
from dipsen.federated.client import ClientUpdate, client_update
from dipsen.federated.engine import _MALICIOUS, derive_seed, local_training, model_args
from dipsen.federated.poisoning import (
    ATTACKS,
    CLAIMED_SAMPLES,
    LABEL_FLIP,
    SIGN_FLIP_SCALE,
    Adversary,
    choose_malicious,
    flip_labels,
    malicious_count,
    replacement_boost,
)
from dipsen.federated.workers import ClientFailure, ClientRunner, ClientTask, _single_thread
from dipsen.models import build_model

SMALL = dict(dataset="mnist", model="cnn", clients=10, fraction=0.5, train_subset=500, test_subset=100, seed=3, workers=1)


def _flat(state: dict, reference: dict) -> torch.Tensor:
    """The step ``state - reference`` over the floating-point tensors, as one float64 vector."""
    return torch.cat(
        [(state[k].double() - reference[k].double()).flatten() for k in reference if reference[k].is_floating_point()]
    )


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v / (u.norm() * v.norm()))


def _final(run: RunDir) -> dict:
    return run.load_checkpoint(run.last_round())


# --- which clients ------------------------------------------------------------------------------


@pytest.mark.parametrize("clients, fraction, count", [(200, 0.2, 40), (10, 0.25, 3), (10, 0.05, 1), (10, 0.04, 0), (7, 0.29, 2)])
def test_round_f_k_clients_are_malicious_rounded_half_up(clients, fraction, count):
    assert malicious_count(clients, fraction) == count
    chosen = choose_malicious(clients, fraction, 123)
    assert len(chosen) == len(set(chosen)) == count and all(0 <= c < clients for c in chosen) and chosen == sorted(chosen)


def test_the_malicious_set_is_seeded():
    assert choose_malicious(200, 0.2, 5) == choose_malicious(200, 0.2, 5)
    assert len({tuple(choose_malicious(200, 0.2, seed)) for seed in range(5)}) == 5


def test_the_malicious_set_is_recorded_in_run_info(mnist, tmp_path):
    cfg = TrainConfig(**SMALL, rounds=1, malicious_fraction=0.2, malicious_attack="sign-flip").validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist), run)
    malicious = run.read_json("run_info.json")["malicious"]
    expected = choose_malicious(10, 0.2, derive_seed(3, _MALICIOUS))
    assert malicious == {"attack": "sign-flip", "fraction": 0.2, "clients": expected} and len(expected) == 2
    assert run.metrics()[0]["rejected"] == []  # sign-flip's updates pass validation


def test_f_zero_is_no_attack_and_bit_identical_to_a_run_without_the_option(mnist, tmp_path):
    runs = {}
    for name, extra in (
        ("plain", {}),
        ("zero", {"malicious_fraction": 0.0}),
        ("attacked", {"malicious_fraction": 0.2, "malicious_attack": "label-flip"}),
    ):
        cfg = TrainConfig(**SMALL, rounds=2, **extra).validate()
        runs[name] = RunDir.create(tmp_path / name, cfg)
        train(FederatedTraining(cfg, mnist), runs[name])
    plain, zero, attacked = (_final(runs[n]) for n in ("plain", "zero", "attacked"))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert runs["zero"].read_json("run_info.json")["malicious"] is None
    assert not all(torch.equal(plain[k], attacked[k]) for k in plain)  # the option does something


@pytest.mark.parametrize(
    "values, message",
    [
        ({"malicious_fraction": 0.2}, "^--malicious-fraction 0.2 needs malicious_attack, one of model-replacement"),
        ({"malicious_attack": "sign-flip"}, "^--malicious-attack 'sign-flip' applies with malicious_fraction > 0 only$"),
        (
            {"malicious_fraction": 1.0, "malicious_attack": "sign-flip"},
            r"^--malicious-fraction must be a number in \[0, 1\), got 1.0$",
        ),
        ({"malicious_fraction": 0.001, "malicious_attack": "sign-flip"}, "^--malicious-fraction 0.001 makes no client malicious"),
        ({"malicious_fraction": 0.2, "malicious_attack": "backdoor"}, "^--malicious-attack must be one of model-replacement, "),
        ({"malicious_fraction": 0.2, "malicious_attack": "gaussian", "engine": "flower"}, "simulated in-process only"),
    ],
)
def test_bad_malicious_options_are_one_line(values, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, values)
    assert "\n" not in str(error.value)


# --- what each attack sends ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def honest(mnist):
    """(model args, global state, training, x, y, the honest update, the flipped-label update) of one client."""
    cfg = TrainConfig(**SMALL).validate()
    args = model_args(cfg, (1, 28, 28), 10)
    torch.manual_seed(0)
    global_state = {k: v.clone() for k, v in build_model(*args).state_dict().items()}
    training = local_training(cfg)
    x, y = torch.from_numpy(mnist.x_train[:64]), torch.from_numpy(mnist.y_train[:64])
    model = build_model(*args)
    with _single_thread():  # as every client update runs, so that the runner's results are bit-identical
        update = client_update(model, global_state, x, y, training, 7)
        flipped = client_update(model, global_state, x, flip_labels(y, 10), training, 7)
    return args, global_state, training, x, y, update, flipped


def _adversary(attack: str, gamma: float = 5.0) -> Adversary:
    return Adversary(attack, 0.2, frozenset({1}), gamma)


def test_an_honest_client_sends_its_update_unchanged(honest):
    _, g, training, _, _, update, _ = honest
    for attack in ATTACKS:
        assert _adversary(attack).send(0, update, g, training, 1) is update


def test_sign_flip_sends_minus_four_times_the_honest_step(honest):
    _, g, training, _, _, update, _ = honest
    sent = _adversary("sign-flip").send(1, update, g, training, 1)
    assert torch.allclose(_flat(sent.state, g), -SIGN_FLIP_SCALE * _flat(update.state, g), atol=1e-6)
    assert SIGN_FLIP_SCALE == 4 and sent.num_samples == update.num_samples
    assert all(sent.state[k].dtype == g[k].dtype for k in g) and validate_update(sent.state, g, sent.num_samples) is None


def test_gaussian_noise_has_ten_times_the_honest_rms_and_is_seeded(honest):
    _, g, training, _, _, update, _ = honest
    adversary = _adversary("gaussian")
    sent, again, other = (adversary.send(1, update, g, training, seed) for seed in (1, 1, 2))
    step, honest_step = _flat(sent.state, g), _flat(update.state, g)
    rms = lambda v: float(v.square().mean().sqrt())  # noqa: E731
    assert rms(step) == pytest.approx(10 * rms(honest_step), rel=0.01)
    assert abs(float(step.mean())) < 0.01 * rms(step) and _cos(step, honest_step) < 0.05  # noise, not the step
    assert all(torch.equal(sent.state[k], again.state[k]) for k in g) and not torch.equal(step, _flat(other.state, g))


def test_scaled_count_claims_ten_to_the_twelve_and_the_server_caps_it(honest):
    _, g, training, _, _, update, _ = honest
    sent = _adversary("scaled-count").send(1, update, g, training, 1)
    assert sent.num_samples == CLAIMED_SAMPLES == 10**12 and all(torch.equal(sent.state[k], update.state[k]) for k in g)
    assert validate_update(sent.state, g, sent.num_samples) is None and validate_report(sent, training) is None
    assert server_counts([sent.num_samples, 64], [64, 64]) == [64, 64]


def test_label_flip_trains_on_flipped_labels_in_the_runner(honest):
    args, g, training, x, y, update, flipped = honest
    assert flip_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]
    runner = ClientRunner(args, x, y, training, workers=1)
    tasks = [ClientTask(0, np.arange(64), 7), ClientTask(1, np.arange(64), 7, poison=LABEL_FLIP)]
    plain, poisoned = runner.run(g, tasks)
    assert all(torch.equal(plain.state[k], update.state[k]) for k in g)
    assert all(torch.equal(poisoned.state[k], flipped.state[k]) for k in g)
    assert not all(torch.equal(poisoned.state[k], update.state[k]) for k in g)
    sent = _adversary("label-flip").send(1, poisoned, g, training, 1)
    assert sent is poisoned  # the poison is in the data: the update goes as trained


def test_worker_processes_flip_the_labels_too(honest):
    args, g, training, x, y, _, flipped = honest
    runner = ClientRunner(args, x, y, training, workers=2)
    try:
        results = runner.run(g, [ClientTask(c, np.arange(64), 7, poison=LABEL_FLIP if c == 1 else None) for c in (0, 1)])
    finally:
        runner.close()
    assert all(torch.equal(results[1].state[k], flipped.state[k]) for k in g)


def test_model_replacement_boosts_the_flipped_label_step_by_gamma_and_claims_the_count(honest):
    _, g, training, _, _, _, flipped = honest
    sent = _adversary("model-replacement", gamma=20.0).send(1, flipped, g, training, 1)
    assert torch.allclose(_flat(sent.state, g), 20 * _flat(flipped.state, g), atol=1e-5)
    assert sent.num_samples == CLAIMED_SAMPLES and validate_report(sent, training) is None
    assert validate_update(sent.state, g, sent.num_samples) is None  # gamma = m passes the step bound uncapped
    # a gamma the bound would not let through is capped just below it, so the update still counts
    huge = replacement_boost(flipped.state, g, 1e6)
    assert huge < 1e6
    capped = _adversary("model-replacement", gamma=1e6).send(1, flipped, g, training, 1)
    bound = MAX_STEP_NORM_RATIO * max(
        math.sqrt(sum(float(v.double().square().sum()) for v in g.values() if v.is_floating_point())), 1
    )
    assert 0.98 * bound < float(_flat(capped.state, g).norm()) <= bound
    assert validate_update(capped.state, g, capped.num_samples) is None


class _Capturing:
    """A local runner that keeps each client's update as its training returned it (before any attack)."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, {}

    def run(self, state, tasks):
        results = self.inner.run(state, tasks)
        self.seen.update({t.client: r for t, r in zip(tasks, results, strict=True)})
        return results

    def close(self, abort=False):
        self.inner.close(abort)


def _captured_round(mnist, tmp_path, **settings):
    """One round of 10 clients, all sampled, with a capturing runner: (job, run, what the clients trained)."""
    cfg = TrainConfig(**{**SMALL, "fraction": 1.0, "rounds": 1, **settings}).validate()
    capture = _Capturing(FederatedTraining(cfg, mnist).clients)
    job = FederatedTraining(cfg, mnist, runner=capture)
    run = RunDir.create(tmp_path, cfg)
    train(job, run)
    return job, run, capture.seen


@pytest.mark.parametrize("attack", ["sign-flip", "model-replacement"])
def test_the_engine_aggregates_what_the_malicious_clients_send(mnist, tmp_path, attack):
    job, run, trained = _captured_round(mnist, tmp_path, malicious_fraction=0.2, malicious_attack=attack)
    g = run.load_checkpoint(0)
    malicious = job.adversary.clients
    scale = -SIGN_FLIP_SCALE if attack == "sign-flip" else 10.0  # model-replacement: gamma = m = 10
    states = []
    for client in range(10):
        state = trained[client].state
        if client in malicious:
            state = {
                k: (g[k].double() + scale * (v.double() - g[k].double())).to(v.dtype) if v.is_floating_point() else v
                for k, v in state.items()
            }
        states.append(state)
    counts = [len(job.parts[c]) for c in range(10)]  # the claimed 10^12 is capped at the partition
    expected = aggregate(states, counts, g, Aggregation())
    final = _final(run)
    assert all(torch.allclose(final[k].double(), expected[k].double(), atol=1e-6) for k in g)
    assert run.metrics()[0]["rejected"] == [] and len(malicious) == 2
    # the round's step count is taken at the capped counts: the claim of 10^12 samples does not inflate it
    batch, epochs = job.training.batch_size, job.training.epochs
    assert run.metrics()[0]["steps"] == sum(epochs * math.ceil(n / batch) for n in counts)


def test_the_engine_records_which_clients_a_filtering_rule_admitted(mnist, tmp_path):
    """Multi-Krum told f = 2 against two sign-flippers: metrics.jsonl names the 8 honest clients; FedAvg names none."""
    attack = {"malicious_fraction": 0.2, "malicious_attack": "sign-flip"}
    job, run, _ = _captured_round(mnist, tmp_path / "krum", aggregator="multi-krum", byzantine=2, **attack)
    assert run.metrics()[0]["admitted"] == sorted(set(range(10)) - job.adversary.clients)
    _, run, _ = _captured_round(mnist, tmp_path / "avg", **attack)
    assert run.metrics()[0]["admitted"] is None


# --- the global step under attack ---------------------------------------------------------------


def test_model_replacement_steers_fedavg_but_not_the_median(mnist, tmp_path):
    """One round, 2 of 10 clients replacing the model: FedAvg's step follows them, the median's the honest ones."""
    cosines = {}
    for rule in ("fedavg", "median"):
        job, run, trained = _captured_round(
            mnist, tmp_path / rule, aggregator=rule, malicious_fraction=0.2, malicious_attack="model-replacement"
        )
        g = run.load_checkpoint(0)
        attacker = torch.stack([_flat(trained[c].state, g) for c in job.adversary.clients]).mean(0)
        honest_step = torch.stack([_flat(trained[c].state, g) for c in range(10) if c not in job.adversary.clients]).mean(0)
        step = _flat(_final(run), g)
        cosines[rule] = (_cos(step, attacker), _cos(step, honest_step))
    assert cosines["fedavg"][0] > 0.9  # measured 0.965
    assert cosines["median"][0] < 0.5 and cosines["median"][1] > 0.7  # measured 0.24 and 0.86


def test_on_synthetic_updates_fedavg_follows_boosted_attackers_and_robust_rules_do_not():
    rng = np.random.default_rng(0)
    honest_direction, attack_direction = rng.normal(size=200), rng.normal(size=200)
    g = {"w": torch.zeros(200, dtype=torch.float64)}
    honest = [honest_direction + 0.3 * rng.normal(size=200) for _ in range(16)]
    attackers = [20 * (attack_direction + 0.3 * rng.normal(size=200)) for _ in range(4)]  # gamma = m = 20
    states = [{"w": torch.tensor(v)} for v in honest + attackers]
    counts = [50] * 20
    a, h = torch.tensor(attack_direction), torch.tensor(honest_direction)
    fedavg = aggregate(states, counts, g, Aggregation("fedavg"))["w"]
    assert _cos(fedavg, a) > 0.95
    for rule in ("median", "multi-krum", "krum", "bulyan"):
        spec = Aggregation(rule, byzantine=4 if rule in BYZANTINE_AGGREGATORS else 0)
        step = aggregate(states, counts, g, spec)["w"]
        assert _cos(step, a) < 0.3 and _cos(step, h) > 0.9, rule


# --- zero crashes -------------------------------------------------------------------------------


class _Tiny(nn.Module):
    """A small model with an integer buffer, for a fast round loop."""

    def __init__(self) -> None:
        super().__init__()
        self.flat, self.linear = nn.Flatten(), nn.Linear(784, 10)
        self.register_buffer("counter", torch.tensor(0))

    def forward(self, x):
        return self.linear(self.flat(x))


def _fuzzed(kind: int, g: dict, rng: np.random.Generator, n: int, training) -> ClientUpdate | ClientFailure:
    """One client's reply: honest, malicious within the bound, or malformed in one of many ways."""
    steps = training.epochs * math.ceil(n / training.batch_size)

    def near(scale: float) -> dict:
        return {
            k: (v + scale * torch.randn_like(v.double()).to(v.dtype)) if v.is_floating_point() else v.clone()
            for k, v in g.items()
        }

    state: object = near(0.01)
    count: object = n
    loss: object = 0.5
    claimed_steps: object = steps
    key = str(rng.choice([k for k in g if g[k].is_floating_point()]))
    if kind == 0:
        pass  # honest
    elif kind == 1:
        state = {k: v.clone() for k, v in g.items()}
        state[key] = torch.full_like(g[key], [float("nan"), float("inf"), -float("inf")][int(rng.integers(3))])
    elif kind == 2:
        state = dict(near(0.01), **{key: torch.randn(tuple(rng.integers(1, 5, size=int(rng.integers(0, 4))).tolist()))})
    elif kind == 3:
        state = dict(
            near(0.01), **{key: g[key].to([torch.float64, torch.float16, torch.int32, torch.bool][int(rng.integers(4))])}
        )
    elif kind == 4:
        state = near(1e6)  # far beyond the step bound
    elif kind == 5:  # malicious but valid: a boosted, reversed or noisy step within the bound
        state = {
            k: (g[k].double() + float(rng.choice([-4.0, 20.0, 90.0])) * (v.double() - g[k].double())).to(v.dtype)
            if v.is_floating_point()
            else v
            for k, v in near(0.05).items()
        }
        count, claimed_steps = 10**12, training.epochs * math.ceil(10**12 / training.batch_size)
    elif kind == 6:
        count = [-5, 0, 2.5, True, np.int64(n), "10", None, 10**30][int(rng.integers(8))]
    elif kind == 7:
        state = [None, [], "weights", {}, dict(near(0.01), extra=torch.zeros(1))][int(rng.integers(5))]
    elif kind == 8:
        loss = [float("nan"), -1.0, float("inf"), "low"][int(rng.integers(4))]
    elif kind == 9:
        claimed_steps = [steps + 1, float(steps), True, -1][int(rng.integers(4))]
    elif kind == 10:
        return ClientFailure("no reply")
    elif kind == 11:
        state = {k: v.clone() for k, v in g.items()}
        state[key] = np.zeros(tuple(g[key].shape))  # not a tensor
    elif kind == 12:
        state = dict(near(0.01), counter=torch.tensor(int(rng.choice([-(2**62), 2**62, 7]))))  # an absurd counter
    return ClientUpdate(state, count, loss, claimed_steps, 0.01)  # type: ignore[arg-type]


class _FuzzRunner:
    def __init__(self, training, seed: int) -> None:
        self.training, self.rng = training, np.random.default_rng(seed)

    def run(self, state, tasks):
        kinds = self.rng.integers(0, 13, size=len(tasks))
        kinds[: len(tasks) // 2] = 0  # about half honest, so that most rounds have enough updates
        return [_fuzzed(int(k), state, self.rng, len(t.indices), self.training) for k, t in zip(kinds, tasks, strict=True)]

    def close(self, abort=False):
        pass


@pytest.mark.parametrize("rule", AGGREGATORS)
def test_a_thousand_malformed_and_malicious_updates_crash_no_aggregator(mnist, rule):
    m = 12
    byzantine = 1 if rule in BYZANTINE_AGGREGATORS else 0
    attack = list(ATTACKS)[AGGREGATORS.index(rule) % len(ATTACKS)]  # the engine's own attacks on top, on some clients
    cfg = TrainConfig(
        **{**SMALL, "clients": m, "fraction": 1.0, "train_subset": 240, "test_subset": 20},
        aggregator=rule,
        byzantine=byzantine,
        trim_fraction=0.25,
        malicious_fraction=0.25,
        malicious_attack=attack,
    ).validate()
    job = FederatedTraining(cfg, mnist)
    job.close()
    job.clients = _FuzzRunner(job.training, seed=AGGREGATORS.index(rule))
    job.model = _Tiny()
    g = {k: v.clone() for k, v in job.model.state_dict().items()}
    accepted = moved = 0
    rounds = math.ceil(1000 / m)
    for round_ in range(1, rounds + 1):
        state, result = job.run_round(round_, g)  # always from g: every round is a fresh attempt
        assert set(state) == set(g) and all(state[k].shape == g[k].shape and state[k].dtype == g[k].dtype for k in g)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        assert len(result.clients) == m and 0 <= len(result.rejected) <= m
        accepted += m - len(result.rejected)
        moved += any(not torch.equal(state[k], g[k]) for k in g)  # aggregated, not kept for too few updates
    assert rounds * m >= 1000 and rounds * m // 3 < accepted < rounds * m  # both kinds occurred
    assert moved > rounds // 2
