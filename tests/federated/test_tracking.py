"""Experiment tracking (dipsen.federated.tracking): the TensorBoard log holds what metrics.jsonl and final_metrics.json hold."""

import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dipsen.config import TrainConfig
from dipsen.errors import ConfigError
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.tracking import FOLDER, require, scalars

TINY = dict(dataset="mnist", model="cnn", clients=10, fraction=1.0, train_subset=500, test_subset=200, seed=3, workers=1)


def logged(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard log: tag -> [(step, value)], as TensorBoard reads them (purges applied)."""
    events = EventAccumulator(str(run.path / FOLDER), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    """What the log must hold: metrics.jsonl's numeric fields by round, and final_metrics.json's at the final round."""
    want: dict[str, list[tuple[int, float]]] = {}
    for record in run.metrics():
        for tag, value in scalars({k: v for k, v in record.items() if k != "round"}, "round").items():
            want.setdefault(tag, []).append((record["round"], value))
    final = run.read_json("final_metrics.json")
    for tag, value in scalars(final, "final").items():
        want[tag] = [(final["rounds"], value)]
    return want


def assert_log_matches(run: RunDir) -> None:
    got, want = logged(run), expected(run)
    assert set(got) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # each step once, in order
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 in the log


def test_scalars_keep_numbers_only_and_join_nested_keys():
    values = {"a": 1, "b": None, "c": "x", "d": True, "e": [1.0], "f": {"g": 0.5, "h": {"i": 2}}}
    assert scalars(values, "final") == {"final/a": 1.0, "final/f/g": 0.5, "final/f/h/i": 2.0}


def test_the_log_holds_every_round_and_the_final_metrics(tmp_path, mnist):
    # with a target: validation accuracy is measured, client DP: epsilon, cyclic: a changing lr
    cfg = TrainConfig(
        **TINY, rounds=2, log_to="tensorboard", target_accuracy=0.99, lr_schedule="cyclic", clip_norm=1.0, client_dp_noise=0.5
    ).validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist), run)
    got = logged(run)
    for tag in ("test_accuracy", "validation_accuracy", "train_loss", "lr", "client_dp_epsilon", "train_seconds", "samples"):
        assert [s for s, _ in got[f"round/{tag}"]] == [1, 2], tag
    assert "round/robust_accuracy" not in got  # null in every row: not measured without adversarial training
    assert got["final/accuracy"][0][0] == 2 and "final/client_dp/epsilon" in got and "final/macro/f1" in got
    assert_log_matches(run)
    # a kill after round 2's row and before its checkpoint: the resume redoes round 2 (other DP noise, other figures)
    run.checkpoint_path(2).unlink()
    (run.path / "final_metrics.json").unlink()
    train(FederatedTraining(cfg, mnist), run, resume=True)
    assert_log_matches(run)  # round 2 and the final metrics once each, the redone ones


def hide_tensorboard(monkeypatch) -> None:
    for module in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError


def test_dipsen_train_logs_and_a_resumed_run_continues_its_log_without_repeating_a_step(monkeypatch, dipsen_cli, tmp_path):
    options = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    code, _, err = dipsen_cli("train", *options, "--rounds", "1", "--log-to", "tensorboard", "--out", str(tmp_path))
    assert code == 0, err
    (folder,) = tmp_path.iterdir()
    run = RunDir.open(folder)
    assert run.config().log_to == "tensorboard"  # saved with the run: --resume logs too
    with monkeypatch.context() as hidden:  # without the package the resume fails before touching the run
        hide_tensorboard(hidden)
        code, _, err = dipsen_cli("train", "--resume", str(folder), "--rounds", "2")
        assert code == 2 and "dipsen[tracking]" in err and run.config().rounds == 1, err
    # finished at round 1, final metrics logged at step 1; extended to 2 rounds
    code, _, err = dipsen_cli("train", "--resume", str(folder), "--rounds", "2")
    assert code == 0, err
    assert len(list((folder / FOLDER).iterdir())) == 2  # one event file per session
    assert [s for s, _ in logged(run)["round/test_accuracy"]] == [1, 2]
    assert_log_matches(run)  # the final metrics of step 1 are gone: final/* at step 2 only


def test_a_missing_tensorboard_is_one_line_naming_the_extra_and_writes_nothing(monkeypatch, dipsen_cli, tmp_path):
    hide_tensorboard(monkeypatch)
    with pytest.raises(ConfigError, match=r"pip install 'dipsen\[tracking\]'"):
        require("tensorboard")
    require(None)  # no tracker, no package needed
    code, _, err = dipsen_cli("train", "--log-to", "tensorboard", "--out", str(tmp_path / "runs"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "dipsen[tracking]" in err, err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_an_unknown_tracker_is_refused(dipsen_cli, tmp_path):
    code, _, err = dipsen_cli("train", "--log-to", "mlflow", "--out", str(tmp_path / "runs"))
    assert code == 2 and "--log-to must be one of tensorboard, got 'mlflow'" in err, err
