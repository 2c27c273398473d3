"""The attack / reproduce / sweep-sigma commands: outputs and one-line user errors."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest


def dipsen(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dipsen", *args], capture_output=True, text=True, timeout=timeout)


def test_attack_prints_and_saves_metrics(cnn_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cnn_run.path, run)
    result = dipsen("attack", str(run), "--attack", "fgsm", "--samples", "30")
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout and "fgsm eps=0.3" in result.stdout and "support" in result.stdout
    (saved,) = (run / "attacks").glob("*.json")
    record = json.loads(saved.read_text())
    attacked = record["results"][0]["metrics"]["single"]
    assert record["samples"] == 30 and {"accuracy", "macro", "per_class"} <= set(attacked)
    assert attacked["accuracy"] < record["clean"]["metrics"]["single"]["accuracy"]


def test_eps_sweep_writes_a_plot_and_its_data(cnn_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cnn_run.path, run)
    result = dipsen("attack", str(run), "--attack", "bim", "--iterations", "3", "--samples", "20", "--eps-sweep", "0.1,0.5")
    assert result.returncode == 0, result.stderr
    (plot,) = (run / "attacks").glob("*eps-sweep*.png")
    data = json.loads(plot.with_suffix(".json").read_text())
    assert [r["eps"] for r in data["results"]] == [0.1, 0.5]


@pytest.mark.parametrize(
    "args, message",
    [
        (["attack", "/nonexistent/run"], "/nonexistent/run"),
        (["attack", "RUN", "--attack", "cw"], "unknown attack 'cw'"),
        (["attack", "RUN", "--attack", "square"], "query"),
        (["attack", "RUN", "--eps", "2"], "eps must be in (0, 1]"),
        (["attack", "RUN", "--protocol", "strong"], "--protocol"),
        (["reproduce", "--datasets", "cifar", "--quick"], "unknown data set 'cifar'"),
        (["reproduce", "--train-dtype", "fp16", "--quick"], "--train-dtype must be one of float32, bfloat16, got 'fp16'"),
        (["sweep-sigma", "--sigmas", "0.1,x"], "--sigmas"),
    ],
)
def test_user_errors_are_one_line_without_traceback(dipsen_cli, cnn_run, tmp_path, args, message):
    # in this process (a subprocess per case cost 5 s of start-up); the next test runs one through `python -m dipsen`
    args = [str(cnn_run.path) if a == "RUN" else a for a in args]
    extra = ["--out", str(tmp_path / "out")] if args[0] in ("reproduce", "sweep-sigma") else []
    code, _, err = dipsen_cli(*args, *extra)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_user_error_from_the_command_line_is_one_line_exit_2():
    result = dipsen("attack", "/nonexistent/run")
    assert result.returncode == 2 and "/nonexistent/run" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, every_attack_on_all", [((), False), (("--every-attack-on-all",), True)])
def test_reproduce_attacks_as_a_cascade_unless_told_every_attack_on_all(
    dipsen_cli, monkeypatch, tmp_path, flag, every_attack_on_all
):
    import dipsen.report
    from dipsen.attack.study import StudySettings

    called: list[dict] = []
    monkeypatch.setattr(dipsen.report, "reproduce", lambda out, **options: called.append(options) or out / "report.md")
    code, _, err = dipsen_cli("reproduce", "--quick", "--out", str(tmp_path / "out"), *flag)
    assert code == 0, err
    assert called[0]["settings"] == replace(StudySettings.quick(), every_attack_on_all=every_attack_on_all)


def test_a_resumed_study_keeps_its_cascade_setting_and_one_from_before_the_cascade_ran_every_attack_on_all(
    dipsen_cli, monkeypatch, tmp_path
):
    import dipsen.report
    from dipsen.attack.study import StudySettings
    from dipsen.errors import DipsenError
    from dipsen.report.reproduce import open_output

    called: list[dict] = []
    monkeypatch.setattr(dipsen.report, "reproduce", lambda out, **options: called.append(options) or out / "report.md")
    before = StudySettings.quick().to_dict()
    del before["every_attack_on_all"]  # as recorded by the version before the cascade
    for folder, settings in (("old", before), ("new", StudySettings.quick().to_dict())):
        open_output(tmp_path / folder, {"quick": True, "datasets": ["mnist"], "settings": settings}, resume=False)
        code, _, err = dipsen_cli("reproduce", "--resume", str(tmp_path / folder))
        assert code == 0, err
    assert [options["settings"].every_attack_on_all for options in called] == [True, False]
    # and the study resumed checks them against the folder's: the old one's as every attack on all examples
    as_before = {"quick": True, "datasets": ["mnist"], "settings": called[0]["settings"].to_dict()}
    open_output(tmp_path / "old", as_before, resume=True)
    with pytest.raises(DipsenError, match="was started with other settings"):
        open_output(tmp_path / "old", {**as_before, "settings": StudySettings.quick().to_dict()}, resume=True)
    code, _, err = dipsen_cli("reproduce", "--resume", str(tmp_path / "new"), "--every-attack-on-all")
    assert code == 2 and "drop --every-attack-on-all" in err


def test_reproduce_trains_in_the_dtype_asked_float32_by_default_and_a_resume_keeps_the_recorded_one(
    dipsen_cli, monkeypatch, tmp_path
):
    import dipsen.report
    from dipsen.report.reproduce import open_output

    called: list[dict] = []
    monkeypatch.setattr(dipsen.report, "reproduce", lambda out, **options: called.append(options) or out / "report.md")
    for flag in ((), ("--train-dtype", "bfloat16")):
        code, _, err = dipsen_cli("reproduce", "--quick", "--out", str(tmp_path / "out"), *flag)
        assert code == 0, err
    base = {"quick": True, "datasets": ["mnist"], "settings": {"every_attack_on_all": False}}
    open_output(tmp_path / "old", base, resume=False)  # as recorded before --train-dtype: trained in float32
    open_output(tmp_path / "bf16", {**base, "train_dtype": "bfloat16"}, resume=False)
    for folder in ("old", "bf16"):
        code, _, err = dipsen_cli("reproduce", "--resume", str(tmp_path / folder))
        assert code == 0, err
    assert [options["train_dtype"] for options in called] == ["float32", "bfloat16", "float32", "bfloat16"]
    code, _, err = dipsen_cli("reproduce", "--resume", str(tmp_path / "old"), "--train-dtype", "bfloat16")
    assert code == 2
    assert err.strip() == f"error: --resume reads its options from {tmp_path / 'old' / 'options.json'}; drop --train-dtype"
