"""Backdoors (dipsen.federated.poisoning.backdoor): the trigger, who stamps it when, the attack success rate."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from dipsen.config import TrainConfig
from dipsen.errors import ConfigError
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.client import Anchor, ClientUpdate, LocalTraining
from dipsen.federated.engine import round_eval_rows
from dipsen.federated.poisoning import BACKDOOR_ATTACKS, LABEL_FLIP, NAIVE_ATTACKS, Adversary, AttackOptions, DataPoison, Trigger
from dipsen.federated.poisoning.backdoor import (
    FLOW_TRIGGER_COUNTS,
    SCALE_FLOOR,
    attack_success_rate,
    backdoor_trigger,
    spread_anchor,
    triggered_test_rows,
)
from dipsen.metrics import predict_labels

TINY = dict(dataset="mnist", model="cnn", clients=10, fraction=1.0, train_subset=500, test_subset=200, seed=3, workers=1)


def test_the_trigger_is_a_white_square_one_pixel_in_from_its_corner():
    mask = Trigger().mask(28, 28)
    assert int(mask.sum()) == 16 and bool(mask[23:27, 23:27].all())  # rows and columns 23..26: one pixel from the edge
    top_left = Trigger(3, "top-left").mask(28, 28)
    assert int(top_left.sum()) == 9 and bool(top_left[1:4, 1:4].all())
    assert bool(Trigger(2, "top-right").mask(10, 10)[1:3, 7:9].all()) and bool(
        Trigger(2, "bottom-left").mask(10, 10)[7:9, 1:3].all()
    )
    x = torch.rand(5, 1, 28, 28) * 0.5
    stamped = Trigger().stamp(x)
    assert bool((stamped[:, :, mask] == 1).all()) and torch.equal(stamped[:, :, ~mask], x[:, :, ~mask])
    with pytest.raises(ValueError, match="does not fit"):
        Trigger(28).mask(28, 28)


def test_dba_splits_the_trigger_into_rows_whose_union_is_the_whole_trigger():
    trigger = Trigger()
    pieces = [trigger.piece(i).mask(28, 28) for i in range(4)]
    assert all(int(p.sum()) == 4 for p in pieces) and not any(bool((a & b).any()) for a in pieces for b in pieces if a is not b)
    assert torch.equal(pieces[0] | pieces[1] | pieces[2] | pieces[3], trigger.mask(28, 28))
    assert torch.equal(trigger.piece(5).mask(28, 28), pieces[1])  # piece i mod size


def test_the_ctu13_trigger_sets_integer_counts_on_real_flows_only_inside_the_feasible_domain(ctu13):
    from dipsen.attack.domain import feasible_domain

    cfg = TrainConfig(dataset="ctu13", malicious_fraction=0.1, malicious_attack="dba").validate()
    trigger = backdoor_trigger(cfg, ctu13)
    x = torch.from_numpy(ctu13.x_test[:300])
    stamped = trigger.stamp(x)
    changed = (stamped != x).any(dim=0)[0]  # (flows, features): where any window changed
    assert not changed[:-4].any() and not changed[:, [0, 4, 5]].any()  # the last 4 flows' three counts only
    padding = (x[:, 0] == 0).all(dim=-1)  # (N, flows)
    assert padding[:, -4:].any() and torch.equal(stamped[:, 0][padding], x[:, 0][padding])  # padding stays padding
    # what an attacker may produce: the feasible domain's projection (eps 1: anywhere in range) leaves it unchanged
    projected = feasible_domain(ctu13).project(stamped.numpy(), x.numpy(), 1.0)
    assert np.allclose(projected, stamped.numpy(), atol=1e-6)
    scaler = ctu13.info["scaler"]
    for column, name, count in FLOW_TRIGGER_COUNTS:  # back in original units: the integer counts
        value = stamped[0, 0, -1, column].double() * (scaler[name]["max"] - scaler[name]["min"]) + scaler[name]["min"]
        assert float(torch.expm1(value)) == pytest.approx(count, rel=1e-4)
    assert trigger.piece(1).stamp(x)[0, 0, -2, 1] == stamped[0, 0, -2, 1] and trigger.piece(1).rows == (1,)


def test_a_poisoned_client_stamps_and_relabels_a_seeded_share_of_its_rows_only():
    x, y = torch.rand(40, 1, 28, 28) * 0.5, torch.arange(40) % 10
    x0, y0 = x.clone(), y.clone()
    poison = DataPoison(trigger=Trigger(), target=7, rate=0.25)
    px, py = poison.apply(x, y, 10, seed=5)
    mask = Trigger().mask(28, 28)
    stamped = (px[:, 0][:, mask] == 1).all(dim=1)
    assert int(stamped.sum()) == 10 and bool((py[stamped] == 7).all())
    assert torch.equal(px[~stamped], x[~stamped]) and torch.equal(py[~stamped], y[~stamped])
    assert torch.equal(poison.apply(x, y, 10, seed=5)[0], px) and not torch.equal(poison.apply(x, y, 10, seed=6)[0], px)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # the client's own rows are not changed in place
    assert LABEL_FLIP.apply(x, y, 10, 0)[1].tolist() == (9 - y).tolist()


def test_the_attack_success_rate_leaves_the_target_class_out():
    x, y = torch.zeros(10, 1, 8, 8), torch.tensor([0, 1, 2, 3, 3, 3, 4, 5, 6, 3])
    rows = triggered_test_rows(x, y, Trigger(2), target=3)
    assert len(rows) == 6 and bool((rows[:, 0][:, Trigger(2).mask(8, 8)] == 1).all())
    assert attack_success_rate(np.array([3, 3, 3, 0, 1, 2]), 3) == 0.5
    # a model that always answers the target succeeds on every counted row; inputs of the target class do not count
    assert attack_success_rate(np.full(len(rows), 3), 3) == 1.0


def _adversary(attack: str, window=None, **options) -> Adversary:
    poison = DataPoison(trigger=Trigger(), target=0, rate=0.5) if attack in BACKDOOR_ATTACKS else None
    return Adversary(attack, 0.3, frozenset({2, 5, 7}), 10.0, AttackOptions(**options), poison, window)


def test_only_malicious_clients_poison_their_data_and_only_within_the_window():
    adversary = _adversary("backdoor-data", window=(3, 5))
    assert adversary.data_poison(2, 3) == adversary.backdoor and adversary.data_poison(7, 5) == adversary.backdoor
    assert adversary.data_poison(1, 4) is None  # honest
    assert adversary.data_poison(2, 2) is None and adversary.data_poison(2, 6) is None  # outside the window
    dba = _adversary("dba")
    pieces = [dba.data_poison(c, 1).trigger.rows for c in (2, 5, 7)]
    assert pieces == [(0,), (1,), (2,)]  # the i-th malicious client in id order stamps row i
    assert _adversary("label-flip").data_poison(5, 1) is LABEL_FLIP and _adversary("sign-flip").data_poison(5, 1) is None
    assert not set(BACKDOOR_ATTACKS) & set(NAIVE_ATTACKS)


def _step_update(g: dict, step: torch.Tensor) -> ClientUpdate:
    training = LocalTraining()
    return ClientUpdate({"w": g["w"] + step}, 50, 0.5, training.steps_for(50), 0.01)


def test_backdoor_replacement_boosts_by_m_over_the_rounds_attackers_or_scales_to_the_clip_bound():
    g = {"w": torch.zeros(100, dtype=torch.float64)}
    steps = [torch.full((100,), 0.01 * (i + 1), dtype=torch.float64) for i in range(4)]
    updates = [_step_update(g, s) for s in steps]
    clients = [2, 5, 1, 3]  # two malicious (2, 5) of m = 4 in this round
    adversary = Adversary("backdoor-replacement", 0.3, frozenset({2, 5, 7}), 4.0)
    sent = adversary.send_round(clients, updates, g, LocalTraining(), [0, 1, 2, 3], 1)
    assert torch.allclose(sent[0].state["w"], 2.0 * steps[0]) and torch.allclose(sent[1].state["w"], 2.0 * steps[1])  # m / f_r
    assert sent[2] is updates[2] and sent[3] is updates[3]
    clipped = Adversary("backdoor-replacement", 0.3, frozenset({2, 5, 7}), 4.0, AttackOptions(clip_norm=0.5))
    sent = clipped.send_round(clients, updates, g, LocalTraining(), [0, 1, 2, 3], 1)
    assert [float(s.state["w"].norm()) for s in sent[:2]] == pytest.approx([0.5, 0.5], rel=1e-12)  # the server's bound exactly
    outside = Adversary("backdoor-replacement", 0.3, frozenset({2, 5}), 4.0, window=(2, 3))
    assert all(s is u for s, u in zip(outside.send_round(clients, updates, g, LocalTraining(), [0] * 4, 1), updates, strict=True))


def test_alie_backdoor_sends_the_mean_poisoned_step_clipped_to_the_honest_spread():
    rng = np.random.default_rng(0)
    g = {"w": torch.zeros(200, dtype=torch.float64)}
    honest = [torch.tensor(0.1 + rng.normal(size=200)) for _ in range(6)]
    poisoned = [torch.tensor(5.0 * rng.normal(size=200)) for _ in range(2)]  # far outside the honest spread
    clients = [2, 5, 0, 1, 3, 4, 6, 8]  # the two malicious first
    updates = [_step_update(g, s) for s in [*poisoned, *honest]]
    poison = DataPoison(trigger=Trigger(), target=0, rate=0.5)
    adversary = Adversary("alie-backdoor", 0.3, frozenset({2, 5, 7}), 8.0, AttackOptions(alie_z=1.0), poison)
    sent = adversary.send_round(clients, updates, g, LocalTraining(), list(range(8)), 1)
    known = torch.stack(honest)
    mu, sigma = known.mean(0), known.std(0, correction=0)
    mean = (poisoned[0] + poisoned[1]) / 2
    expected = torch.where(mean > mu + sigma, mu + sigma, torch.where(mean < mu - sigma, mu - sigma, mean))
    assert torch.equal(sent[0].state["w"], sent[1].state["w"])  # colluding copies
    assert torch.allclose(sent[0].state["w"], expected, rtol=0, atol=1e-12)
    assert ((sent[0].state["w"] - mu).abs() <= sigma + 1e-12).all()  # every coordinate within mu +- z sigma
    assert ((mean - mu).abs() < sigma).any() and ((mean - mu).abs() > sigma).any()  # both cases were exercised
    assert all(sent[i] is updates[i] for i in range(2, 8))  # the honest pass unchanged
    assert adversary.data_poison(2, 1) is poison and adversary.data_poison(0, 1) is None  # trains on the trigger first


def test_the_anchor_blends_the_loss_with_the_mean_scaled_squared_distance_and_its_gradient():
    model = torch.nn.Linear(3, 2)
    weights = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    scales = {k: 0.1 + torch.rand_like(v) for k, v in model.state_dict().items()}
    loss = torch.tensor(0.7)
    blended = Anchor(weights, scales, 0.25).blend(model, loss)
    w = {k: v.detach() for k, v in model.named_parameters()}
    by_hand = sum(float((((w[k] - weights[k]) / scales[k]) ** 2).sum()) for k in w) / 8  # 6 weights + 2 biases
    assert float(blended.detach()) == pytest.approx(0.25 * 0.7 + 0.75 * by_hand, rel=1e-6)
    blended.backward()
    expected = 0.75 * 2 * (w["weight"] - weights["weight"]) / scales["weight"] ** 2 / 8
    assert torch.allclose(model.weight.grad, expected, rtol=1e-5)
    assert Anchor(weights, scales, 1.0).blend(model, loss) is loss  # alpha 1: the loss as it is


def test_alie_backdoors_pull_is_towards_the_honest_mean_at_z_sigma_floored():
    g = {"w": torch.ones(2, 2), "steps": torch.tensor(7)}
    known = torch.tensor([[0.1, 0.2, 0.0, 0.3], [0.3, 0.2, 0.0, 0.5]], dtype=torch.float64)
    anchor = spread_anchor(known, g, 2.0, 0.4)
    assert torch.allclose(anchor.weights["w"], torch.tensor([[1.2, 1.2], [1.0, 1.4]]))  # w + mu
    # sigma (0.1, 0, 0, 0.1), times z = 2; a coordinate no honest step moves gets the floor
    assert torch.allclose(anchor.scales["w"], torch.tensor([[0.2, SCALE_FLOOR], [SCALE_FLOOR, 0.2]]))
    assert anchor.alpha == 0.4 and set(anchor.scales) == {"w"}  # integer buffers take no pull


def test_pulled_alie_backdoor_trains_its_clients_after_the_honest_ones_towards_their_spread():
    from dipsen.federated.workers import ClientTask

    g = {"w": torch.zeros(4, dtype=torch.float64)}
    honest_steps = {0: torch.tensor([0.1, 0.2, 0.0, 0.3]), 1: torch.tensor([0.3, 0.2, 0.0, 0.5])}
    calls = []

    def run(state, tasks):  # stands in for the engine's clients: honest clients' steps as above, malicious ones 1.0
        calls.append([(t.client, t.poison) for t in tasks])
        return [_step_update(g, honest_steps.get(t.client, torch.ones(4, dtype=torch.float64)).double()) for t in tasks]

    poison = DataPoison(trigger=Trigger(), target=0, rate=0.5)
    adversary = Adversary("alie-backdoor", 0.3, frozenset({5, 7}), 4.0, AttackOptions(alie_z=2.0, alie_alpha=0.4), poison)
    tasks = [ClientTask(c, np.arange(3), c, adversary.data_poison(c, 1)) for c in (5, 0, 7, 1)]
    unpulled = dataclasses.replace(adversary, options=dataclasses.replace(adversary.options, alie_alpha=1.0))
    assert adversary.pulls(1) and not unpulled.pulls(1)
    outcomes = adversary.train_round(run, g, tasks, LocalTraining())
    assert [c for c, _ in calls[0]] == [0, 1] and [c for c, _ in calls[1]] == [5, 7]  # honest first
    pulled = calls[1][0][1]
    expected = spread_anchor(torch.stack(list(honest_steps.values())).double(), g, 2.0, 0.4)
    assert pulled.trigger == poison.trigger and torch.equal(pulled.anchor.weights["w"], expected.weights["w"])
    assert torch.equal(pulled.anchor.scales["w"], expected.scales["w"])
    assert pulled.training(LocalTraining()).anchor is pulled.anchor  # what client_update blends into its loss
    assert [float(o.state["w"][0]) for o in outcomes] == pytest.approx([1.0, 0.1, 1.0, 0.3])  # in the tasks' order
    calls.clear()
    adversary.train_round(run, g, [t for t in tasks if t.client in (0, 1)], LocalTraining())
    assert len(calls) == 1  # no malicious client in the round: one pass


def test_a_pulled_alie_backdoor_run_trains_its_malicious_clients_with_the_anchor(mnist, tmp_path, monkeypatch):
    from dipsen.federated import workers

    trained = []
    real = workers.client_update

    def spy(model, state, x, y, training, seed):
        trained.append(training.anchor is not None)
        return real(model, state, x, y, training, seed)

    monkeypatch.setattr(workers, "client_update", spy)
    cfg = TrainConfig(
        **TINY, rounds=1, malicious_fraction=0.3, malicious_attack="alie-backdoor", alie_z=1.0, alie_alpha=0.5
    ).validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist), run)
    assert trained == [False] * 7 + [True] * 3  # the 7 honest clients first, then the 3 malicious, pulled
    assert run.metrics()[0]["rejected"] == []


@pytest.mark.parametrize(
    "settings, field, message",
    [
        ({"malicious_attack": "sign-flip", "backdoor_rounds": "2-3"}, "backdoor_rounds", "applies to backdoor-data"),
        ({"malicious_attack": "dba", "backdoor_rounds": "3-2"}, "backdoor_rounds", "A-B, 1 <= A <= B"),
        ({"malicious_attack": "dba", "backdoor_rounds": "every"}, "backdoor_rounds", "A-B"),
        ({"malicious_attack": "dba", "backdoor_rounds": "9-12"}, "backdoor_rounds", "starts after the last round 5"),
        ({"malicious_attack": "dba", "poison_rate": 0.0}, "poison_rate", "poison_rate"),
        ({"malicious_attack": "alie", "poison_epochs": 10}, "poison_epochs", "applies to backdoor-data"),
        ({"malicious_attack": "dba", "poison_epochs": 0}, "poison_epochs", "poison_epochs"),
        ({"malicious_attack": "dba", "trigger_position": "middle"}, "trigger_position", "trigger_position"),
        ({"malicious_attack": "dba", "alie_alpha": 0.5}, "alie_alpha", "applies to alie-backdoor only"),
        ({"malicious_attack": "alie-backdoor", "alie_alpha": 0.0}, "alie_alpha", "alie_alpha"),
    ],
)
def test_bad_backdoor_options_are_refused_naming_the_option(settings, field, message):
    values = {**TINY, "rounds": 5, "malicious_fraction": 0.3, **settings}
    with pytest.raises(ConfigError, match=message) as error:
        TrainConfig(**values).validate()
    assert error.value.key == field


def test_a_target_outside_the_classes_or_a_trigger_too_big_is_refused_before_training(mnist):
    for settings, message in (
        ({"backdoor_target": 10}, "backdoor_target 10 is no class of mnist"),
        ({"trigger_size": 28}, "trigger_size 28"),
    ):
        cfg = TrainConfig(**TINY, rounds=1, malicious_fraction=0.3, malicious_attack="backdoor-data", **settings).validate()
        with pytest.raises(ConfigError, match=message):
            FederatedTraining(cfg, mnist)


def test_a_backdoor_run_records_its_success_rate_every_round_and_poisons_only_in_its_window(mnist, tmp_path, monkeypatch):
    from dipsen.federated import workers

    seen = []
    real = workers._rows

    def spy(x, y, indices, poison, num_classes, seed):
        seen.append(poison)
        return real(x, y, indices, poison, num_classes, seed)

    monkeypatch.setattr(workers, "_rows", spy)
    cfg = TrainConfig(
        **TINY, rounds=3, malicious_fraction=0.3, malicious_attack="backdoor-data", backdoor_rounds="1-2", backdoor_target=1
    ).validate()
    run = RunDir.create(tmp_path, cfg)
    final = train(FederatedTraining(cfg, mnist), run)
    history = run.metrics()
    assert all(0 <= r["attack_success_rate"] <= 1 for r in history)
    assert final["attack_success_rate"] == history[-1]["attack_success_rate"]
    malicious = json.loads((run.path / "run_info.json").read_text())["malicious"]["clients"]
    assert len(malicious) == 3
    # every client trains each round (fraction 1): 3 poisoned tasks in rounds 1 and 2, none in round 3
    per_round = [seen[i * 10 : (i + 1) * 10] for i in range(3)]
    assert [sum(p is not None for p in r) for r in per_round] == [3, 3, 0]
    assert all(p.target == 1 and p.trigger == Trigger() for r in per_round[:2] for p in r if p is not None)


def test_a_rounds_success_rate_is_of_the_round_slice_and_the_last_rounds_of_the_whole_test_set(mnist, tmp_path):
    cfg = TrainConfig(
        **TINY, rounds=2, round_eval_size=50, malicious_fraction=0.3, malicious_attack="backdoor-data", backdoor_target=1
    ).validate()
    run = RunDir.create(tmp_path, cfg)
    job = FederatedTraining(cfg, mnist)
    final = train(job, run)
    history = run.metrics()
    assert [r["eval_rows"] for r in history] == [50, 200]
    rows = round_eval_rows(cfg, 200)
    x, y = torch.from_numpy(job.x_test), torch.from_numpy(job.y_test)
    for record, (xs, ys) in zip(history, [(x[rows], y[rows]), (x, y)], strict=True):
        job.model.load_state_dict(run.load_checkpoint(record["round"]))
        predictions = predict_labels(job.model, triggered_test_rows(xs, ys, Trigger(), 1).numpy())
        assert record["attack_success_rate"] == attack_success_rate(predictions, 1)
    assert final["attack_success_rate"] == history[-1]["attack_success_rate"]


def test_a_backdoor_trains_its_own_epochs_on_poisoned_rows_and_reports_an_honest_step_count(mnist, tmp_path, monkeypatch):
    from dipsen.federated import workers

    trained = []
    real = workers.client_update

    def spy(model, state, x, y, training, seed):
        update = real(model, state, x, y, training, seed)
        trained.append((training.epochs, update.steps))
        return update

    monkeypatch.setattr(workers, "client_update", spy)
    cfg = TrainConfig(**TINY, rounds=1, malicious_fraction=0.3, malicious_attack="backdoor-data", poison_epochs=4).validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist), run)
    assert sorted(epochs for epochs, _ in trained) == [1] * 7 + [4] * 3  # the 3 malicious of 10 clients
    honest_steps = {steps for epochs, steps in trained if epochs == 1}
    assert all(steps == 4 * next(iter(honest_steps)) for epochs, steps in trained if epochs == 4)
    assert run.metrics()[0]["rejected"] == []  # sent with an honest step count, every update is accepted


def test_runs_without_a_backdoor_record_no_success_rate(mnist, tmp_path):
    cfg = TrainConfig(**TINY, rounds=1).validate()
    run = RunDir.create(tmp_path, cfg)
    assert train(FederatedTraining(cfg, mnist), run)["attack_success_rate"] is None
    assert run.metrics()[0]["attack_success_rate"] is None
