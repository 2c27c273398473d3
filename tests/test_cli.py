import json
import subprocess
import sys

import pytest


def dipsen(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dipsen", *args], capture_output=True, text=True, timeout=timeout)


def test_train_writes_a_complete_run_folder(tmp_path):
    config = tmp_path / "small.toml"
    config.write_text('dataset = "ctu13"\nmodel = "cnn"\nclients = 8\nfraction = 0.5\nrounds = 4\nseed = 1\n')
    result = dipsen("train", "--config", str(config), "--rounds", "2", "--train-subset", "800", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((run / "config.json").read_text())["rounds"] == 2  # the flag overrode the file
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round_0000.pt", "round_0001.pt", "round_0002.pt"]
    final = json.loads((run / "final_metrics.json").read_text())
    assert {"accuracy", "macro", "weighted", "per_class", "cost"} <= set(final)
    assert [c["class"] for c in final["per_class"]] == ["normal", "botnet"]
    assert "accuracy" in result.stdout and "precision" in result.stdout
    shown = dipsen("show", str(run))
    assert shown.returncode == 0 and "weighted avg" in shown.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--dataset", "cifar"], "dataset must be one of"),
        (["train", "--fraction", "0"], "fraction must be in"),
        (["train", "--config", "missing.toml"], "missing.toml"),
        (["train", "--resume", "."], "not a dipsen run folder"),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
        (["train", "--dp-epsilon", "3"], "dp_epsilon"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    result = dipsen(*args, "--out", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resume_refuses_extra_options(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = dipsen("train", "--resume", str(tmp_path), "--lr", "0.1")
    assert result.returncode == 2 and "drop --lr" in result.stderr
