"""Backdoors (dipsen.federated.poisoning.backdoor): the trigger, who stamps it when, the attack success rate."""

import json

import numpy as np
import pytest
import torch

from dipsen.config import TrainConfig
from dipsen.errors import ConfigError
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.client import ClientUpdate, LocalTraining
from dipsen.federated.engine import round_eval_rows
from dipsen.federated.poisoning import BACKDOOR_ATTACKS, LABEL_FLIP, NAIVE_ATTACKS, Adversary, AttackOptions, DataPoison, Trigger
from dipsen.federated.poisoning.backdoor import FLOW_TRIGGER_COUNTS, attack_success_rate, backdoor_trigger, triggered_test_rows
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
