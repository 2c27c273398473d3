"""The collapse guard (robust_collapse): its rule, the run it stops, the model it ends with, resume, refusals."""

import pytest
import torch

from dipsen.attack import TrainedRun
from dipsen.attack.threat import stale_round
from dipsen.config import TrainConfig, load_config
from dipsen.errors import ConfigError
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.engine import COLLAPSE_MIN_BEST, detect_collapse
from dipsen.metrics import predict_labels

TINY = dict(
    dataset="mnist",
    model="cnn",
    clients=3,
    fraction=1.0,
    train_subset=300,
    test_subset=50,
    seed=5,
    workers=1,
    adv_train="fgsm-rs",
    adv_eps=0.2,
    robust_collapse=0.2,
)


def _history(*figures: float | None) -> list[dict]:
    return [{"round": r, "robust_accuracy": a} for r, a in enumerate(figures, start=1)]


@pytest.mark.parametrize(
    "figures, found",
    [
        ((0.5, 0.6, 0.1), (3, 2, 0.6, 0.1)),  # 0.5 below round 2's best
        ((0.8, 0.6), None),  # exactly the drop is not more than it (0.8 - 0.6 > 0.2 in floats)
        ((0.8, 0.59), (2, 1, 0.8, 0.59)),
        ((0.8, 0.7, 0.65, 0.59), (4, 1, 0.8, 0.59)),  # a slow fall counts from the best, not from the round before
        ((0.7, 0.45, 0.1), (2, 1, 0.7, 0.45)),  # the first round that fell is the collapse
        ((0.6, 0.6, 0.3), (3, 1, 0.6, 0.3)),  # the best's round is the earliest of equals, as best_robust.pt's
        ((None, 0.5, None, 0.25), (4, 2, 0.5, 0.25)),  # rounds eval_every skips are passed over
        ((0.29, 0.0), None),  # a best below COLLAPSE_MIN_BEST is not robustness to protect
        ((COLLAPSE_MIN_BEST, 0.05), (2, 1, COLLAPSE_MIN_BEST, 0.05)),
        ((0.1, 0.4, 0.5, 0.9), None),
        ((), None),
    ],
)
def test_the_rule_finds_the_first_round_more_than_drop_below_the_best_before_it(figures, found):
    collapse = detect_collapse(_history(*figures), 0.2)
    if found is None:
        assert collapse is None
    else:
        assert collapse is not None
        assert (collapse["round"], collapse["best_round"], collapse["best"], collapse["at"], collapse["drop"]) == (*found, 0.2)


def test_the_rule_takes_its_drop_and_floor_as_given():
    assert detect_collapse(_history(0.5, 0.35), 0.1) is not None and detect_collapse(_history(0.5, 0.35), 0.2) is None
    assert detect_collapse(_history(0.2, 0.0), 0.1) is None and detect_collapse(_history(0.2, 0.0), 0.1, min_best=0.2) is not None


@pytest.fixture
def figures(monkeypatch):
    """The monitor's robust accuracy per round, set by the test: the rounds' weights stay those of a real run."""
    by_round: dict[int, float] = {}
    monkeypatch.setattr(FederatedTraining, "robust_accuracy", lambda self, round_, steps=None: by_round[round_])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains fastest on one thread
    yield by_round
    torch.set_num_threads(threads)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_collapse_stops_the_run_and_it_ends_with_the_best_robust_model(mnist, tmp_path, figures):
    figures.update({1: 0.5, 2: 0.6, 3: 0.1, 4: 0.7, 5: 0.7})
    cfg = TrainConfig(rounds=5, **TINY).validate()
    run = RunDir.create(tmp_path, cfg)
    metrics = train(FederatedTraining(cfg, mnist), run)
    history = run.metrics()
    assert [r["robust_accuracy"] for r in history] == [0.5, 0.6, 0.1] and run.last_round() == 3  # stopped at round 3
    collapse = {"round": 3, "best_round": 2, "best": 0.6, "at": 0.1, "drop": 0.2, "model": "best_robust.pt"}
    assert metrics["collapse"] == collapse and run.read_json("final_metrics.json")["collapse"] == collapse
    assert metrics["rounds"] == 3  # the rounds trained; the model is round 2's
    saved = run.best_robust()
    assert saved["round"] == 2 and _same(saved["model_state"], run.load_checkpoint(2))
    assert not _same(run.load_checkpoint(3), run.load_checkpoint(2))  # round 3's checkpoint stays the collapsed model
    # the final metrics are the best round's model, evaluated as its round was: the same test accuracy
    assert metrics["accuracy"] == history[1]["test_accuracy"] != history[2]["test_accuracy"]
    assert metrics["robust_monitor_check"]["accuracy"][0] == 0.6  # the check of that model, not of round 3's
    # what dipsen attack, certify and reproduce read as the run's final model
    trained = TrainedRun(run.path, mnist)
    assert trained.final_round == 2 and trained.collapse == collapse
    assert _same(trained.model().state_dict(), run.load_checkpoint(2))
    assert trained.final_model_description == "best-robust global model (round 2; robust accuracy collapsed at round 3)"

    # a resume trains no further, even with a higher round limit, and writes the same verdict
    before = run.metrics()
    train(FederatedTraining(run.config(), mnist), run, resume=True)
    run.reconfigure(rounds=8)
    again = train(FederatedTraining(run.config(), mnist), run, resume=True)
    assert run.last_round() == 3 and run.metrics() == before
    assert again["collapse"] == collapse and again["accuracy"] == metrics["accuracy"]
    # the final model is best_robust.pt's: it needs no round checkpoint
    run.checkpoint_path(2).unlink()
    assert _same(TrainedRun(run.path, mnist).model().state_dict(), saved["model_state"])


def test_the_round_a_collapse_stops_at_is_measured_on_the_whole_test_set(mnist, tmp_path, figures):
    figures.update({1: 0.5, 2: 0.6, 3: 0.1, 4: 0.7})
    cfg = TrainConfig(rounds=4, round_eval_size=20, **TINY).validate()
    run = RunDir.create(tmp_path, cfg)
    job = FederatedTraining(cfg, mnist)
    metrics = train(job, run)
    assert [r["eval_rows"] for r in run.metrics()] == [20, 20, 50] and metrics["collapse"]["round"] == 3
    job.model.load_state_dict(run.best_robust()["model_state"])  # the final model: round 2's, on the whole test set
    assert metrics["samples"] == 50 and metrics["accuracy"] == float((predict_labels(job.model, job.x_test) == job.y_test).mean())


def test_without_a_collapse_the_run_ends_as_before(mnist, tmp_path, figures):
    figures.update({1: 0.5, 2: 0.6, 3: 0.45})  # 0.15 below the best: no collapse
    cfg = TrainConfig(rounds=3, **TINY).validate()
    run = RunDir.create(tmp_path, cfg)
    metrics = train(FederatedTraining(cfg, mnist), run)
    assert metrics["collapse"] is None and metrics["rounds"] == 3 and run.best_robust()["round"] == 2
    trained = TrainedRun(run.path, mnist)
    assert trained.final_round == 3 and _same(trained.model().state_dict(), run.load_checkpoint(3))


def test_the_guard_keeps_the_checkpoints_around_the_best_round_for_the_orange_box_attack(mnist, tmp_path, figures):
    figures.update({1: 0.5, 2: 0.6, 3: 0.55, 4: 0.5, 5: 0.3, 6: 0.9})
    cfg = TrainConfig(rounds=6, keep_checkpoints="last-2", **TINY).validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist), run)
    # last-2 of the newest round (4, 5) and of the best-robust round (1, 2), which the run ends with
    assert run.finished_rounds() == [1, 2, 4, 5]
    trained = TrainedRun(run.path, mnist)
    assert trained.final_round == 2 and stale_round(trained, 1) == 1


def test_the_guard_needs_the_robust_monitor_and_a_drop_in_0_1():
    plain = {k: v for k, v in TINY.items() if k not in ("adv_train", "adv_eps")}
    with pytest.raises(ConfigError, match="robust_collapse 0.2 watches robust_accuracy: it needs adv_train") as error:
        TrainConfig(rounds=2, **plain).validate()
    assert error.value.key == "robust_collapse"
    with pytest.raises(ConfigError, match="^--robust-collapse 0.2 watches robust_accuracy"):
        load_config(None, {"robust_collapse": 0.2})
    # a robust target runs the monitor too
    assert TrainConfig(rounds=2, target_robust_accuracy=0.9, **plain).validate().robust_collapse == 0.2
    for drop in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="robust_collapse must be"):
            TrainConfig(rounds=2, **{**TINY, "robust_collapse": drop}).validate()


def test_the_flag_reaches_the_config_and_its_refusal_names_it(dipsen_cli, tmp_path):
    code, _, err = dipsen_cli("train", "--dataset", "mnist", "--robust-collapse", "0.2", "--out", str(tmp_path / "runs"))
    assert code == 2 and "--robust-collapse 0.2 watches robust_accuracy" in err and not (tmp_path / "runs").exists()
    code, out, _ = dipsen_cli("train", "--help")
    assert code == 0 and "--robust-collapse" in out
