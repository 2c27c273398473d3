import json
import subprocess
import sys

import pytest
from test_config import BAD_VALUES, toml_literal  # every option's bad values, from the config schema


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
        (["train", "--fraction", "0"], "--fraction must be a number in (0, 1], got 0.0"),
        (["train", "--config", "missing.toml"], "missing.toml"),
        (["train", "--resume", "."], "not a dipsen run folder"),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
        (["train", "--dp-epsilon", "3"], "--dp-epsilon must be in (0, 1]"),
        (["train", "--round-eval-size", "-1"], "--round-eval-size must be an integer >= 0, got -1"),
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


@pytest.mark.parametrize("name, value", BAD_VALUES)
def test_every_bad_option_is_one_line_exit_2_and_writes_nothing(dipsen_cli, tmp_path, name, value):
    file = tmp_path / "bad.toml"
    file.write_text(f"{name} = {toml_literal(value)}\n")
    code, _, err = dipsen_cli("train", "--config", str(file), "--out", str(tmp_path / "runs"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and f"{file}: {name} must be " in err, err
    assert not (tmp_path / "runs").exists()
    if isinstance(value, bool) or value in ("x", "ten", "yes", 7):
        return  # flags of the wrong type: click's parser, checked below
    flag = "--" + name.replace("_", "-")
    code, _, err = dipsen_cli("train", flag, str(value), "--out", str(tmp_path / "runs"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and flag in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--clients", "abc"], "Invalid value for '--clients': 'abc' is not a valid integer"),
        (["train", "--rounds", "1.5"], "Invalid value for '--rounds'"),
        (["train", "--no-such-flag"], "No such option '--no-such-flag'"),
        (["attack"], "Missing argument 'RUN_DIR'"),
        (["data", "build-socofing-cache", "x.tar.gz"], "Missing option '--out'"),
    ],
)
def test_flags_click_cannot_parse_are_one_line_exit_2(dipsen_cli, args, message):
    code, _, err = dipsen_cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_train_help_shows_the_built_in_defaults(dipsen_cli):
    code, out, _ = dipsen_cli("train", "--help")
    assert code == 0
    text = " ".join(out.split())
    for shown in ("[default: (200)]", "[default: (0.1)]", "[default: (adam)]", "[default: (0.001)]", "[default: (1000)]"):
        assert shown in text


@pytest.mark.parametrize(
    "text, message",
    [('{"rounds": "ten"}', "config.json: rounds must be an integer >= 1, got 'ten'"), ("[1]", "not a JSON object")],
)
def test_a_bad_run_folder_config_is_one_line_naming_the_file(dipsen_cli, tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    code, _, err = dipsen_cli("train", "--resume", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_a_bar_off_a_terminal_logs_each_new_description_and_otherwise_every_few_seconds():
    import io

    from rich.console import Console
    from rich.progress import Progress

    from dipsen.cli.app import LOG_SECONDS, LoggedProgress, progress_bar

    # rich alone draws a bar off a terminal once, at the end: a log would show nothing until then
    assert type(progress_bar(on=Console(file=io.StringIO(), force_terminal=True))) is Progress
    assert type(progress_bar(on=Console(file=io.StringIO(), force_terminal=False))) is LoggedProgress
    log = io.StringIO()
    clock = [0.0]
    bar = LoggedProgress(console=Console(file=log, force_terminal=False, width=200), get_time=lambda: clock[0])
    with bar:
        task = bar.add_task("certifying", total=100)
        for _ in range(10):  # the same description, the clock still: one line
            bar.advance(task)
        clock[0] = LOG_SECONDS - 1
        bar.advance(task)
        clock[0] = LOG_SECONDS + 1  # a line once the interval has passed
        bar.advance(task)
        bar.update(task, description="round 2")  # a new description: a line at once
        bar.update(task, completed=100)  # finished: a line
        bar.update(task, completed=100)  # nothing new
        runs = bar.add_task("grid", total=4)
        bar.update(runs, description="run 2/4: sign-flip", completed=1.5)
    logged = [line for line in log.getvalue().splitlines() if "━" not in line]  # the bars drawn at the end aside
    assert logged == [
        "certifying  1/100  00:00:00",
        "certifying  12/100  00:00:31",
        "round 2  12/100  00:00:31",
        "round 2  100/100  00:00:31",
        "run 2/4: sign-flip  38%  00:00:00",
    ]
