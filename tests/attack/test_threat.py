"""Threat models: which weights the attacker crafts on, and which data it has."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dipsen.attack import RobustnessEvaluation, TrainedRun
from dipsen.attack.target import SPLIT_SEED, same_weights
from dipsen.config import TrainConfig
from dipsen.errors import DataError, DipsenError
from dipsen.federated import RunDir
from dipsen.models import build_model, calibrate_noise

CTU13_FIXTURE = Path(__file__).parents[1] / "fixtures" / "ctu13" / "capture20110816_cut.binetflow.gz"


def dense_ctu13_file(path: Path) -> Path:
    """A normal and a botnet host sending a 0.1 s flow every second for 1,000 s, in binetflow format.

    Dense enough that a window (28 flows of its host) is short against the test period's time blocks;
    the real-row fixture keeps 1 in 23 of scenario 6's botnet flows, too few for any flow-disjoint slice.
    """
    lines = ["StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,TotPkts,TotBytes,SrcBytes,Label"]
    for second in range(1000):
        when = (pd.Timestamp("2011-08-16 10:00:00") + pd.Timedelta(seconds=second)).strftime("%Y/%m/%d %H:%M:%S.%f")
        for src, size, label in (("10.0.0.1", 300, "From-Normal-V47-Jist"), ("10.0.0.2", 120, "From-Botnet-V47-TCP-Attempt")):
            lines.append(f"{when},0.1,tcp,{src},40000,   ->,10.9.9.9,80,S_,0,0,3,{size + second % 7},60,flow={label}")
    path.write_text("\n".join(lines))
    return path


def ctu13_run_dir(root: Path, data: Path, **options) -> Path:
    """A run folder of an untrained CNN on CTU-13 flows in ``data`` (attack data need no training)."""
    config = TrainConfig(dataset="ctu13", data_dir=str(data), model="cnn", **options).validate()
    run = RunDir.create(root, config)
    noise = calibrate_noise(config.sigma, config.dp_epsilon, config.dp_delta, config.dp_attack_bound)
    run.save_checkpoint(0, build_model("cnn", (1, 28, 6), 2, noise).state_dict())
    return run.path


def test_orange_box_crafts_on_the_stale_checkpoint(cnn_run):
    evaluation = RobustnessEvaluation(cnn_run, samples=10, stale_rounds=2)
    source, description = evaluation.source("orange-box")
    assert same_weights(source, cnn_run.model(cnn_run.final_round - 2))
    assert not same_weights(source, cnn_run.model())
    assert f"round {cnn_run.final_round - 2}" in description


def test_white_box_crafts_on_the_final_model(cnn_run):
    source, _ = RobustnessEvaluation(cnn_run, samples=10).source("white-box")
    assert same_weights(source, cnn_run.model())


def test_transfer_surrogate_is_trained_on_data_disjoint_from_the_evaluated_examples(cnn_run):
    evaluation = RobustnessEvaluation(cnn_run, samples=50, attacker_samples=300, surrogate_epochs=1)
    data = evaluation.data
    evaluated = {x.tobytes() for x in data.x_eval}
    assert not any(x.tobytes() in evaluated for x in data.x_attacker)
    assert len(data.y_attacker) == 300
    source, description = evaluation.source("transfer")
    assert not same_weights(source, cnn_run.model()) and "300 attacker examples" in description
    order = np.random.default_rng(SPLIT_SEED).permutation(len(cnn_run.dataset.y_test))  # images: as before
    np.testing.assert_array_equal(data.eval_rows, np.sort(order[:50]))
    np.testing.assert_array_equal(data.attacker_rows, np.sort(order[50:350]))


def test_ctu13_attacker_windows_share_no_flow_with_evaluated_windows(tmp_path):
    run = TrainedRun(ctu13_run_dir(tmp_path, dense_ctu13_file(tmp_path / "dense.binetflow")))  # loads its data set
    flows = run.dataset.test_origins.flows
    for samples, attacker_samples in ((40, None), (20, 30)):
        data = run.attack_data(samples, attacker_samples)
        assert len(data.y_eval) == samples and len(data.y_attacker) == (attacker_samples or len(data.y_attacker)) >= 30
        assert set(data.y_attacker) == {0, 1}
        evaluated, attacker = flows[data.eval_rows], flows[data.attacker_rows]
        assert not np.isin(attacker[attacker >= 0], evaluated[evaluated >= 0]).any()
        np.testing.assert_array_equal(data.x_eval, run.dataset.x_test[data.eval_rows])
        np.testing.assert_array_equal(data.y_attacker, run.dataset.y_test[data.attacker_rows])
    np.testing.assert_array_equal(run.attack_data(40).eval_rows, run.attack_data(40).eval_rows)  # seeded


def test_trained_run_loads_ctu13_with_the_run_split(tmp_path):
    with pytest.raises(DataError, match="ctu13_split 'host' cannot put botnet flows"):
        TrainedRun(ctu13_run_dir(tmp_path, CTU13_FIXTURE, ctu13_split="host"))


def test_stale_rounds_must_be_positive(cnn_run):
    with pytest.raises(DipsenError, match="stale-rounds"):
        RobustnessEvaluation(cnn_run, samples=10, stale_rounds=0).source("orange-box")


def _copy_of(run: TrainedRun, root: Path) -> RunDir:
    import shutil

    return RunDir.open(Path(shutil.copytree(run.path, root / run.path.name)))


def test_orange_box_refuses_a_run_shorter_than_stale_rounds(cnn_run):
    from dipsen.attack.threat import stale_round

    assert cnn_run.final_round == 3 and stale_round(cnn_run, 3) == 0  # round 0 is 3 rounds before the end
    message = (
        f"orange-box: {cnn_run.path} ends at round 3, so it has no round -2 (3 - --stale-rounds 5); use "
        f"--stale-rounds 3 or less, or train it longer: dipsen train --resume {cnn_run.path} --rounds N"
    )
    with pytest.raises(DipsenError) as error:
        RobustnessEvaluation(cnn_run, samples=10, stale_rounds=5).source("orange-box")
    assert str(error.value) == message


def test_orange_box_names_a_pruned_checkpoint_and_what_is_left(cnn_run, mnist, tmp_path):
    import subprocess
    import sys

    from dipsen.attack.threat import stale_round

    run = _copy_of(cnn_run, tmp_path)
    run.reconfigure(keep_checkpoints="every-2")  # of rounds 0..3, keeps 0, 2 and the final 3
    assert run.finished_rounds() == [0, 2, 3]
    trained = TrainedRun(run.path, mnist)
    assert stale_round(trained, 1) == 2
    with pytest.raises(
        DipsenError,
        match=f"^orange-box: {run.path} no longer has the checkpoint of round 1 "
        r"\(--stale-rounds 2\): keep_checkpoints 'every-2' deleted it; --stale-rounds "
        r"it can serve: 1, 3; or retrain with --keep-checkpoints last-3 or all$",
    ):
        stale_round(trained, 2)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dipsen",
            "attack",
            str(run.path),
            "--threat",
            "orange-box",
            "--stale-rounds",
            "2",
            "--samples",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "no longer has the checkpoint of round 1" in result.stderr and not (run.path / "attacks").exists()


def test_the_study_refuses_a_run_without_its_stale_checkpoint_before_attacking(cnn_run, monkeypatch):
    from dipsen.attack import study

    attacked = []
    monkeypatch.setattr(RobustnessEvaluation, "clean", lambda *args, **kwargs: attacked.append("clean"))
    monkeypatch.setattr(RobustnessEvaluation, "run", lambda *args, **kwargs: attacked.append(args))
    with pytest.raises(DipsenError, match="ends at round 3, so it has no round -2"):
        study.study_run(cnn_run, study.StudySettings(stale_rounds=5))
    assert attacked == []  # refused before any prediction or attack
