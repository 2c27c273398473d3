"""Faults outside dipsen's control: a full disk, a stuck worker process, other users on the machine."""

import errno
import os
import signal
import stat
from pathlib import Path

import pytest

from dipsen.config import TrainConfig
from dipsen.errors import DipsenError
from dipsen.federated import FederatedTraining, RunDir, train

TINY = dict(dataset="mnist", model="cnn", clients=4, fraction=1.0, train_subset=200, test_subset=100, seed=3, workers=1)


def _full_disk(monkeypatch, name: str) -> None:
    """Make the next fsync of a file whose path contains ``name`` fail as a full disk does (once)."""
    real_fsync = os.fsync

    def fsync(fd):
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            monkeypatch.setattr(os, "fsync", real_fsync)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*.tmp"))


def test_a_full_disk_is_one_line_exit_2_and_the_run_resumes(dipsen_cli, monkeypatch, tmp_path):
    args = ["train", "--out", str(tmp_path), "--rounds", "3"]
    for key, value in TINY.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    _full_disk(monkeypatch, "round_0002.pt")
    code, _, err = dipsen_cli(*args)
    (run,) = tmp_path.iterdir()
    assert code == 2
    assert err.strip() == (
        f"error: {run}: no space left on device while writing round 2 (checkpoints/round_0002.pt); "
        f"free space and resume with: dipsen train --resume {run}"
    )
    assert _leftovers(run) == [] and RunDir.open(run).finished_rounds() == [0, 1]
    # the fault is gone (fsync is itself again); a deadline may change on resume
    code, _, err = dipsen_cli("train", "--resume", str(run), "--round-timeout", "900")
    assert code == 0, err
    resumed = RunDir.open(run)
    assert resumed.finished() and [r["round"] for r in resumed.metrics()] == [1, 2, 3]
    assert resumed.config().round_timeout == 900.0


@pytest.mark.parametrize(
    "name, what",
    [
        ("run_info.json", "run_info.json"),
        ("metrics.jsonl", "round 1 (metrics.jsonl)"),
        ("round_0001.pt", "round 1 (checkpoints/round_0001.pt)"),
        ("best_robust.pt", "round 1 (best_robust.pt)"),
        ("final_metrics.json", "final_metrics.json"),
    ],
)
def test_every_write_of_a_run_fails_in_one_line_and_leaves_no_partial_file(mnist, monkeypatch, tmp_path, name, what):
    # a robust target makes the run keep best_robust.pt; 0.99 is never reached in 2 rounds; a small monitor suffices
    monitor = dict(robust_monitor_steps=2, robust_monitor_samples=20)
    cfg = TrainConfig(rounds=2, target_robust_accuracy=0.99, adv_eps=0.1, **monitor, **TINY).validate()
    run = RunDir.create(tmp_path, cfg)
    _full_disk(monkeypatch, name)
    with pytest.raises(DipsenError) as error:
        train(FederatedTraining(cfg, mnist), run)
    assert str(error.value) == (
        f"{run.path}: no space left on device while writing {what}; free space and resume with: dipsen train --resume {run.path}"
    )
    assert _leftovers(run.path) == []
    metrics = train(FederatedTraining(cfg, mnist), run, resume=True)
    assert metrics["rounds"] == 2 and [r["round"] for r in run.metrics()] == [1, 2]
    assert run.best_robust() is not None


def test_a_failed_start_names_no_run_to_resume(monkeypatch, tmp_path):
    _full_disk(monkeypatch, "config.json")
    with pytest.raises(DipsenError, match=r"^\S+: no space left on device while writing config.json$"):
        RunDir.create(tmp_path, TrainConfig().validate())
    assert _leftovers(tmp_path) == []


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, T: stopped, Z: a zombie ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_a_stuck_worker_fails_its_clients_at_the_deadline_and_is_replaced(mnist, tmp_path):
    deadline = 5.0  # the other worker's three clients of 50 rows take well under a second
    cfg = TrainConfig(rounds=3, round_timeout=deadline, min_clients=0, **{**TINY, "workers": 2}).validate()
    job = FederatedTraining(cfg, mnist)
    pool = [w.process.pid for w in job.clients._workers]
    stuck = pool[0]

    def on_round(result, start):
        if result is not None and result.round == 1:
            os.kill(stuck, signal.SIGSTOP)  # alive, but never answers: as a hung node

    run = RunDir.create(tmp_path, cfg)
    try:
        train(job, run, on_round=on_round)
    finally:
        if _state(stuck) == "T":  # the test failed: leave no stopped process behind
            os.kill(stuck, signal.SIGKILL)
    history = run.metrics()
    assert [r["round"] for r in history] == [1, 2, 3] and run.finished()
    # 4 clients in 4 chunks: the stuck worker held one when the deadline came, the other did the rest
    assert history[0]["rejected"] == [] and history[2]["rejected"] == []
    (late,) = history[1]["rejected"]
    assert late["reason"] == "no update within 5 s (round_timeout)"
    assert deadline <= history[1]["train_seconds"] < deadline + 5
    assert _state(stuck) is None  # killed and reaped
    assert run.config().round_timeout == deadline  # in config.json, for --resume


def test_a_worker_stuck_at_start_up_stops_the_run_resumably(mnist, tmp_path, monkeypatch):
    from dipsen.federated import workers

    monkeypatch.setattr(workers, "START_SECONDS", 2.0)
    cfg = TrainConfig(rounds=1, **{**TINY, "workers": 2}).validate()
    job = FederatedTraining(cfg, mnist)
    stuck = job.clients._workers[0].process.pid
    os.kill(stuck, signal.SIGSTOP)  # before it has even imported torch
    run = RunDir.create(tmp_path, cfg)
    with pytest.raises(DipsenError) as error:
        train(job, run)
    assert str(error.value) == (
        f"client worker process {stuck} did not start within 2 s during round 1; resume with: dipsen train --resume {run.path}"
    )
    assert _state(stuck) is None and run.finished_rounds() == [0]


def test_a_round_timeout_may_change_on_resume(tmp_path):
    run = RunDir.create(tmp_path, TrainConfig().validate())
    assert run.config().round_timeout == 600.0
    assert run.reconfigure(round_timeout=3600).round_timeout == 3600.0 == run.config().round_timeout


def test_the_round_timeout_is_checked(dipsen_cli, tmp_path):
    code, _, err = dipsen_cli("train", "--round-timeout", "-5", "--out", str(tmp_path))
    assert code == 2 and err.strip() == "error: --round-timeout must be a number > 0, got -5.0"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("existing", [False, True])
def test_partition_files_are_private_whatever_the_umask(mnist, tmp_path, existing):
    from dipsen.federated.flower.task import export_partitions

    out = tmp_path / "workdir" / "partitions"
    if existing:  # a --workdir reused from an older export, readable by all
        out.mkdir(parents=True, mode=0o755)
        (out / "client_0000.npz").write_bytes(b"old")
        os.chmod(out, 0o755)
        os.chmod(out / "client_0000.npz", 0o644)
    previous = os.umask(0o002)
    try:
        paths = export_partitions(TrainConfig(**TINY).validate(), mnist, out)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o600] * 4
