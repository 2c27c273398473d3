import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dipsen.config import TrainConfig
from dipsen.errors import ConfigError, DipsenError
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.engine import (
    _PARTITION,
    _SUBSET,
    _subset,
    derive_seed,
    federated_data,
    round_eval_rows,
    sample_clients,
)
from dipsen.federated.workers import ClientFailure
from dipsen.metrics import predict_labels
from dipsen.partition import partition

SMALL = dict(dataset="mnist", clients=10, fraction=0.5, train_subset=1000, test_subset=200, seed=3, workers=1)


def _final_state(run: RunDir) -> dict:
    return run.load_checkpoint(run.last_round())


def _trained_dipsen_state(mnist, tmp_path, **overrides) -> dict:
    """Final weights of a 2-round DiPSeN run on the SMALL settings with ``overrides``."""
    cfg = TrainConfig(model="dipsen", rounds=2, **{**SMALL, **overrides}).validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist), run)
    return _final_state(run)


def test_small_federated_cnn_reaches_90_percent(mnist, tmp_path):
    cfg = TrainConfig(
        dataset="mnist",
        model="cnn",
        clients=10,
        fraction=1.0,
        rounds=5,
        train_subset=4000,
        test_subset=1000,
        optimizer="adam",
        lr=0.002,
        workers=1,
    ).validate()
    run = RunDir.create(tmp_path, cfg)
    metrics = train(FederatedTraining(cfg, mnist), run)
    assert metrics["accuracy"] >= 0.90
    history = run.metrics()
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5]
    assert history[-1]["test_accuracy"] == metrics["accuracy"]
    assert all(len(r["clients"]) == 10 for r in history)
    assert run.finished_rounds() == [0, 1, 2, 3, 4, 5]
    info = run.read_json("run_info.json")
    assert info["noise"] is None and info["prediction_rule"] == "deterministic"
    assert run.read_json("partition.json")["samples"] == 4000
    # the whole data set's counts and the subsets' sizes under names that cannot be confused
    assert info["dataset_counts"] == {"train": 60000, "test": 10000} == info["dataset"]["counts"]
    assert (info["train_samples_used"], info["test_samples_used"], info["validation"]) == (4000, 1000, None)
    assert all(r["validation_accuracy"] is None for r in history)


def test_dipsen_run_logs_noise_calibration_and_rule(mnist, tmp_path):
    cfg = TrainConfig(model="dipsen", rounds=1, mc_samples=4, **SMALL).validate()
    run = RunDir.create(tmp_path, cfg)
    metrics = train(FederatedTraining(cfg, mnist), run)
    noise = run.read_json("run_info.json")["noise"]
    assert noise["sensitivity"] == 1.0 and noise["epsilon"] == 1.0 and noise["delta"] == 0.05
    assert noise["attack_bound"] == 0.1 and noise["sigma"] == pytest.approx(0.2537, abs=1e-4)
    assert metrics["prediction_rule"] == "mean softmax over 4 draws"


def test_same_seed_same_weights_other_seed_differs(mnist, tmp_path):
    states = [_trained_dipsen_state(mnist, tmp_path, seed=seed) for seed in (3, 3, 4)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_target_accuracy_stops_early(mnist, tmp_path):
    cfg = TrainConfig(model="cnn", rounds=10, target_accuracy=0.05, **SMALL).validate()
    job = FederatedTraining(cfg, mnist)
    run = RunDir.create(tmp_path, cfg)
    metrics = train(job, run)
    assert metrics["rounds"] == 1 and run.last_round() == 1
    assert run.metrics()[0]["validation_accuracy"] >= 0.05


def test_a_target_is_checked_on_the_rounds_eval_every_evaluates(mnist, tmp_path):
    cfg = TrainConfig(model="cnn", rounds=10, target_accuracy=0.05, eval_every=2, **SMALL).validate()
    run = RunDir.create(tmp_path, cfg)
    metrics = train(FederatedTraining(cfg, mnist), run)
    assert metrics["rounds"] == 2  # round 1 reached it too, unmeasured
    assert [(r["test_accuracy"], r["validation_accuracy"]) for r in run.metrics()][0] == (None, None)
    assert run.metrics()[1]["validation_accuracy"] >= 0.05


def _accuracy(job: FederatedTraining, run: RunDir, round_: int, x: np.ndarray, y: np.ndarray) -> float:
    """The accuracy on (x, y) of the CNN that ``run`` saved for ``round_``, evaluated here, outside the round loop."""
    job.model.load_state_dict(run.load_checkpoint(round_))
    return float((predict_labels(job.model, x) == y).mean())


def test_the_round_slice_is_seeded_and_clamped_to_the_test_set():
    cfg = TrainConfig(round_eval_size=50, seed=3).validate()
    rows = round_eval_rows(cfg, 200)
    assert rows is not None and len(rows) == len(set(rows.tolist())) == 50 and np.all(np.diff(rows) > 0) and rows.max() < 200
    assert np.array_equal(rows, round_eval_rows(TrainConfig(round_eval_size=50, seed=3).validate(), 200))
    assert not np.array_equal(rows, round_eval_rows(TrainConfig(round_eval_size=50, seed=4).validate(), 200))
    # 0, the test set's size or more: the whole test set every round
    for size in (0, 200, 201):
        assert round_eval_rows(TrainConfig(round_eval_size=size).validate(), 200) is None


def test_rounds_are_evaluated_on_the_round_slice_and_the_last_on_the_whole_test_set(mnist, tmp_path):
    cfg = TrainConfig(model="cnn", rounds=3, round_eval_size=50, keep_checkpoints="all", **SMALL).validate()
    job = FederatedTraining(cfg, mnist)
    run = RunDir.create(tmp_path, cfg)
    metrics = train(job, run)
    history = run.metrics()
    assert [r["eval_rows"] for r in history] == [50, 50, 200]
    info = run.read_json("run_info.json")["round_evaluation"]
    assert (info["rows"], info["of"]) == (50, 200)
    # the same rows every round: each record is its round's model on the seeded slice
    slice_ = round_eval_rows(cfg, 200)
    for record in history[:2]:
        accuracy = _accuracy(job, run, record["round"], job.x_test[slice_], job.y_test[slice_])
        assert record["test_accuracy"] == accuracy
    # the last round, and final_metrics.json, on the whole test set
    whole = _accuracy(job, run, 3, job.x_test, job.y_test)
    assert history[-1]["test_accuracy"] == metrics["accuracy"] == whole
    assert metrics["samples"] == 200


def test_a_run_a_target_stops_ends_with_a_round_on_the_whole_test_set(mnist, tmp_path):
    cfg = TrainConfig(model="cnn", rounds=10, target_accuracy=0.05, round_eval_size=50, **SMALL).validate()
    run = RunDir.create(tmp_path, cfg)
    metrics = train(FederatedTraining(cfg, mnist), run)
    (record,) = run.metrics()  # the target is decided on the validation slice, then the round measured in full
    assert metrics["rounds"] == 1 and record["eval_rows"] == 200 and record["test_accuracy"] == metrics["accuracy"]


def test_a_resumed_run_records_the_metrics_of_the_uninterrupted_one(mnist, tmp_path):
    cfg = TrainConfig(model="dipsen", rounds=3, round_eval_size=50, keep_checkpoints="all", **SMALL).validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist), run)
    timing = ("train_seconds", "eval_seconds", "step_seconds")

    def figures(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in timing} for r in records]

    before, final = figures(run.metrics()), run.read_json("final_metrics.json")
    for round_ in (3, 2):
        run.checkpoint_path(round_).unlink()  # as if killed during round 2: metrics.jsonl is cut back on resume
    train(FederatedTraining(run.config(), mnist), run, resume=True)
    assert figures(run.metrics()) == before and [r["eval_rows"] for r in before] == [50, 50, 200]
    assert run.read_json("final_metrics.json") | {"cost": None} == final | {"cost": None}


def test_a_run_from_before_the_round_slice_goes_on_with_the_whole_test_set(tmp_path):
    run = RunDir.create(tmp_path, TrainConfig(**SMALL).validate())
    values = json.loads((run.path / "config.json").read_text())
    del values["round_eval_size"]
    (run.path / "config.json").write_text(json.dumps(values))
    assert run.config().round_eval_size == 0 and TrainConfig().round_eval_size == 1000


def _fingerprint(parts: list[np.ndarray]) -> str:
    return hashlib.sha256(b"".join(p.tobytes() for p in parts)).hexdigest()


def test_target_is_checked_on_validation_accuracy_not_test_accuracy(mnist, tmp_path):
    cfg = TrainConfig(model="cnn", rounds=2, target_accuracy=0.99, **SMALL).validate()
    job = FederatedTraining(cfg, mnist)
    job.test_accuracy = lambda round_, whole=True: 1.0  # the test set "reaches" the target at once: must not stop the run
    run = RunDir.create(tmp_path / "test-reached", cfg)
    assert train(job, run)["rounds"] == 2
    assert all(r["test_accuracy"] == 1.0 and r["validation_accuracy"] < 0.99 for r in run.metrics())

    job = FederatedTraining(cfg, mnist)
    job.validation_accuracy = lambda round_: 0.995  # the validation slice reaches it: stop after round 1
    run = RunDir.create(tmp_path / "validation-reached", cfg)
    assert train(job, run)["rounds"] == 1 and run.metrics()[0]["test_accuracy"] < 0.99


def test_validation_slice_is_held_out_of_every_client_and_recorded(mnist, tmp_path):
    cfg = TrainConfig(model="cnn", rounds=1, target_accuracy=0.99, **SMALL).validate()
    job = FederatedTraining(cfg, mnist)
    run = RunDir.create(tmp_path, cfg)
    train(job, run)
    assert cfg.validation_size == 100 == run.config().validation_size  # default: 10% of the 1,000 training rows
    full = federated_data(TrainConfig(**SMALL).validate(), mnist)  # the same rows, nothing held out

    def rows(x: np.ndarray) -> list[bytes]:
        return [row.tobytes() for row in x]

    validation = rows(job.x_validation)
    clients = [r for part in job.parts for r in rows(job.x_train.numpy()[part])]
    assert len(validation) == 100 and len(clients) == 900
    assert not set(validation) & set(clients)  # no client holds a validation row
    assert sorted(validation + clients) == sorted(rows(full.x_train))  # and every row is used exactly once
    info = run.read_json("run_info.json")
    assert (info["train_samples_used"], info["test_samples_used"]) == (900, 200)
    assert info["dataset_counts"] == {"train": 60000, "test": 10000}
    assert info["validation"]["samples"] == 100 and sum(info["validation"]["class_counts"]) == 100
    assert run.read_json("partition.json")["samples"] == 900


def test_without_a_target_the_partition_is_unchanged(mnist):
    cfg = TrainConfig(**SMALL).validate()
    data = federated_data(cfg, mnist)
    assert cfg.validation_size is None and len(data.y_validation) == 0
    _, y = _subset(mnist.x_train, mnist.y_train, cfg.train_subset, derive_seed(cfg.seed, _SUBSET, 0))
    expected = partition(y, cfg.clients, cfg.partition, seed=derive_seed(cfg.seed, _PARTITION))
    assert np.array_equal(data.y_train, y) and _fingerprint(data.parts) == _fingerprint(expected)


def test_validation_size_is_checked_against_the_training_rows(mnist):
    cfg = TrainConfig(target_accuracy=0.9, validation_size=1000, **SMALL).validate()
    with pytest.raises(ConfigError, match="validation_size 1000 leaves none of the 1000 training rows"):
        federated_data(cfg, mnist)


def test_resume_of_a_run_with_a_target_gives_the_uninterrupted_weights(mnist, tmp_path):
    cfg = TrainConfig(model="dipsen", rounds=3, target_accuracy=0.99, validation_size=150, **SMALL).validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist), run)
    final = _final_state(run)
    run.checkpoint_path(3).unlink()  # as if killed during round 3
    resumed_cfg = run.config()
    assert resumed_cfg.validation_size == 150
    train(FederatedTraining(resumed_cfg, mnist), run, resume=True)
    assert all(torch.equal(final[k], _final_state(run)[k]) for k in final)
    assert [r["round"] for r in run.metrics()] == [1, 2, 3]
    assert all(r["validation_accuracy"] is not None for r in run.metrics())


def test_flower_nodes_hold_the_engines_partitions_without_the_validation_slice(mnist, tmp_path):
    from dipsen.federated.flower.task import (
        NUM_PARTITIONS,
        PARTITION_FILE,
        PARTITION_ID,
        client_data,
        client_id,
        config_to_json,
        export_partitions,
    )

    cfg = TrainConfig(model="cnn", target_accuracy=0.99, **SMALL).validate()
    job = FederatedTraining(cfg, mnist)  # resolves validation_size, as the ServerApp does before it sends the config
    sent = config_to_json(cfg)
    paths = export_partitions(TrainConfig(model="cnn", target_accuracy=0.99, **SMALL).validate(), mnist, tmp_path)
    for client, rows in enumerate(job.parts):
        simulated = client_data(sent, {PARTITION_ID: client, NUM_PARTITIONS: cfg.clients})
        deployed = client_data(sent, {PARTITION_FILE: str(paths[client])})
        for x, y in (simulated, deployed):
            assert torch.equal(x, job.x_train[rows]) and torch.equal(y, job.y_train[rows])
        assert client_id(cfg, {PARTITION_FILE: str(paths[client])}) == client
    other = dataclasses.replace(cfg, validation_size=50)
    with pytest.raises(DipsenError, match="validation_size=100 \\(run: 50\\)"):
        client_id(other, {PARTITION_FILE: str(paths[0])})


def test_sampling_draws_m_distinct_clients_each_round():
    cfg = TrainConfig(clients=200, fraction=0.1).validate()
    for r in range(1, 6):
        chosen = sample_clients(cfg, r)
        assert len(chosen) == 20 == len(set(chosen)) and all(0 <= c < 200 for c in chosen)
    assert sample_clients(cfg, 1) != sample_clients(cfg, 2)


KILL_ROUNDS = 12  # a signal sent at round 2 leaves 10 rounds to act before the run could finish


@pytest.fixture(scope="module")
def reference_run(mnist, tmp_path_factory) -> RunDir:
    """An uninterrupted KILL_ROUNDS-round run on SMALL: the weights every killed-and-resumed run must end with.

    Trained here with one process: the weights do not depend on the worker count.
    """
    cfg = TrainConfig(model="dipsen", rounds=KILL_ROUNDS, **SMALL).validate()
    run = RunDir.create(tmp_path_factory.mktemp("reference"), cfg)
    train(FederatedTraining(cfg, mnist), run)
    return run


def _train_command(out, rounds: int, **overrides) -> list[str]:
    args = [sys.executable, "-m", "dipsen", "train", "--model", "dipsen", "--rounds", str(rounds), "--out", str(out)]
    for key, value in {**SMALL, **overrides}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _default_signal_handling() -> None:
    # a process started with SIGINT ignored (a background job of a non-interactive shell, as a CI
    # runner may start pytest) passes that on, and dipsen rightly leaves an ignored signal ignored
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _start_and_wait_for_round_2(args: list[str], out) -> subprocess.Popen:
    # a session of its own, so that a signal can go to the whole group, as Ctrl-C in a terminal does
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_default_signal_handling
    )
    deadline = time.time() + 120
    while not list(out.glob("*/checkpoints/round_0002.pt")):
        if proc.poll() is not None or time.time() > deadline:
            _kill_group(proc)
            pytest.fail(f"no round 2 within 120 s: {proc.stderr.read().decode()}")
        time.sleep(0.02)
    return proc


def _kill_group(proc: subprocess.Popen) -> None:
    """Leave nothing running: the command and whatever is left of its process group (workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); None once it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _worker_pids(parent: int) -> list[int]:
    """The client workers among ``parent``'s children (not multiprocessing's resource tracker)."""
    pids = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(proc_dir.name))
        try:
            if fields and int(fields[1]) == parent and b"spawn_main" in (proc_dir / "cmdline").read_bytes():
                pids.append(int(proc_dir.name))
        except OSError:  # ended while we looked
            continue
    return pids


def _resume_and_compare(run_path, reference: RunDir) -> RunDir:
    resumed = subprocess.run(
        [sys.executable, "-m", "dipsen", "train", "--resume", str(run_path)], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    killed = RunDir.open(run_path)
    ref_state, res_state = _final_state(reference), _final_state(killed)
    assert killed.last_round() == reference.last_round()
    assert all(torch.equal(ref_state[k], res_state[k]) for k in ref_state), resumed.stdout
    assert [r["round"] for r in killed.metrics()] == [r["round"] for r in reference.metrics()]
    assert killed.read_json("final_metrics.json")["accuracy"] == reference.read_json("final_metrics.json")["accuracy"]
    return killed


@pytest.mark.parametrize("sig, workers", [(signal.SIGKILL, 1), (signal.SIGINT, 2), (signal.SIGTERM, 1)])
def test_resume_after_kill_gives_the_uninterrupted_weights(reference_run, tmp_path, sig, workers):
    out = tmp_path / "killed"
    proc = _start_and_wait_for_round_2(_train_command(out, KILL_ROUNDS, workers=workers), out)
    try:
        pool = _worker_pids(proc.pid)
        assert len(pool) == (0 if workers == 1 else workers), pool
        os.killpg(proc.pid, sig)
        stderr = proc.communicate(timeout=60)[1].decode()
        assert not [pid for pid in pool if _alive(pid)]
    finally:
        _kill_group(proc)
    (run_path,) = out.iterdir()
    killed = RunDir.open(run_path)
    assert 2 <= killed.last_round() < KILL_ROUNDS, stderr
    assert not (run_path / "final_metrics.json").exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        # stopped between rounds or client chunks: every metrics line has its checkpoint
        assert proc.returncode == 128 + sig, stderr
        assert stderr.strip() == f"interrupted by {signal.Signals(sig).name}; resume with: dipsen train --resume {run_path}"
        assert [r["round"] for r in killed.metrics()] == list(range(1, killed.last_round() + 1))
    _resume_and_compare(run_path, reference_run)


def test_a_dead_worker_fails_the_round_at_once_and_the_run_resumes(reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = _start_and_wait_for_round_2(_train_command(out, KILL_ROUNDS, workers=2), out)
    try:
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would
        killed_at = time.monotonic()
        stderr = proc.communicate(timeout=30)[1].decode()  # the old Pool.map waited forever
        seconds = time.monotonic() - killed_at
        assert not [pid for pid in workers if _alive(pid)]
    finally:
        _kill_group(proc)
    assert proc.returncode == 2 and seconds < 15, (seconds, stderr)
    (run_path,) = out.iterdir()
    assert re.fullmatch(
        rf"error: client worker process {workers[0]} died \(signal 9\) during round \d+; "
        rf"resume with: dipsen train --resume {re.escape(str(run_path))}",
        stderr.strip(),
    ), stderr
    assert 2 <= RunDir.open(run_path).last_round() < KILL_ROUNDS
    _resume_and_compare(run_path, reference_run)


def test_resume_under_another_thread_count_gives_the_uninterrupted_weights(tmp_path):
    # with --workers 1 the client updates run in the main process, whose default thread count
    # follows OMP_NUM_THREADS and the core count; a resumed run may get other ones
    first = subprocess.run(
        _train_command(tmp_path, 2), capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"}
    )
    assert first.returncode == 0, first.stderr
    (run_path,) = tmp_path.iterdir()
    run = RunDir.open(run_path)
    uninterrupted = run.load_checkpoint(2)
    run.checkpoint_path(2).unlink()  # as if killed during round 2
    resumed = subprocess.run(
        [sys.executable, "-m", "dipsen", "train", "--resume", str(run_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert resumed.returncode == 0, resumed.stderr
    state = run.load_checkpoint(2)
    drift = max((state[k].double() - uninterrupted[k].double()).abs().max().item() for k in state)
    assert drift == 0, f"resumed weights differ by up to {drift:.3g}"


def test_a_stop_request_ends_the_run_between_rounds_and_kills_the_workers(mnist, tmp_path):
    from dipsen.federated.workers import Interrupted, StopFlag

    cfg = TrainConfig(model="cnn", rounds=3, **{**SMALL, "workers": 2}).validate()
    stop = StopFlag()
    job = FederatedTraining(cfg, mnist, stop=stop)
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    run = RunDir.create(tmp_path, cfg)
    with pytest.raises(Interrupted, match="SIGINT"):
        train(job, run, on_round=lambda result, start: result and stop.set(signal.SIGINT))
    assert run.finished_rounds() == [0, 1] and [r["round"] for r in run.metrics()] == [1]
    assert not (run.path / "final_metrics.json").exists()
    assert not [w for w in workers if w.is_alive()]


def test_stop_signals_set_the_flag_and_an_ignored_signal_stays_ignored():
    from dipsen.cli.train import _stop_on_signals
    from dipsen.federated.workers import Interrupted, StopFlag

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    # a shell's background job inherits SIGINT ignored, which the handler would rightly keep
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stop = StopFlag()
    try:
        with _stop_on_signals(stop):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # what a SIGTERM would run
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # a second signal keeps the first's name
        with pytest.raises(Interrupted, match="SIGTERM"):
            stop.check()
        assert stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_seed_must_be_a_non_negative_integer(tmp_path):
    for seed in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=f"seed must be an integer >= 0, got {seed!r}"):
            TrainConfig(seed=seed).validate()
    result = subprocess.run(
        [sys.executable, "-m", "dipsen", "train", "--seed", "-1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: --seed must be an integer >= 0, got -1"
    assert not any(tmp_path.iterdir())


def test_metrics_line_without_checkpoint_is_dropped_on_resume(mnist, tmp_path):
    cfg = TrainConfig(model="cnn", rounds=2, **SMALL).validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist), run)
    run.checkpoint_path(2).unlink()  # as if killed between the metrics line and the checkpoint
    with open(run.path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "test_acc')  # and a line cut short
    assert [r["round"] for r in run.keep_metrics_through(run.last_round())] == [1]
    train(FederatedTraining(cfg, mnist), run, resume=True)
    assert [r["round"] for r in run.metrics()] == [1, 2]


def test_open_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(DipsenError, match="not a dipsen run folder"):
        RunDir.open(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "mnist", "learning": 1}))
    with pytest.raises(DipsenError, match="unknown option"):
        RunDir.open(tmp_path).config()


def test_worker_processes_are_reproducible_and_agree_with_one_process(mnist, tmp_path):
    states = [_trained_dipsen_state(mnist, tmp_path, workers=workers) for workers in (2, 2, 1)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # in one process the client updates run single-threaded too, exactly as in the workers
    assert all(torch.equal(states[0][k], states[2][k]) for k in states[0])


class _CorruptingRunner:
    """A local runner whose clients 0..4 send a NaN, a wrong shape, an absurd step, nothing, or a NaN loss."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def run(self, state, tasks):
        results = self.inner.run(state, tasks)
        for i, (task, update) in enumerate(zip(tasks, results, strict=True)):
            bad = dict(update.state)
            key = next(iter(bad))
            if task.client == 0:
                bad[key] = torch.full_like(bad[key], float("nan"))
            elif task.client == 1:
                bad[key] = bad[key].flatten()
            elif task.client == 2:
                bad[key] = bad[key] * 1e6
            elif task.client == 3:
                results[i] = ClientFailure("no reply")
                continue
            elif task.client == 4:
                results[i] = dataclasses.replace(update, mean_loss=float("nan"))
                continue
            results[i] = dataclasses.replace(update, state=bad)
        return results

    def close(self, abort=False):
        self.inner.close(abort)


def test_malformed_updates_are_rejected_and_the_round_goes_on(mnist, tmp_path, caplog):
    cfg = TrainConfig(
        model="cnn", rounds=2, optimizer="adam", lr=0.002, **{**SMALL, "fraction": 1.0, "min_clients": 5}
    ).validate()
    honest = FederatedTraining(cfg, mnist)
    job = FederatedTraining(cfg, mnist, runner=_CorruptingRunner(honest.clients))
    run = RunDir.create(tmp_path, cfg)
    with caplog.at_level("WARNING", logger="dipsen.federated.engine"):
        metrics = train(job, run)
    history = run.metrics()
    assert [r["round"] for r in history] == [1, 2]
    for record in history:
        reasons = {r["client"]: r["reason"] for r in record["rejected"]}
        assert sorted(reasons) == [0, 1, 2, 3, 4]
        assert "contains NaN" in reasons[0] and "has shape" in reasons[1]
        assert "step norm" in reasons[2] and reasons[3] == "no reply"
        assert reasons[4] == "mean_loss nan is not a finite number >= 0"
        assert record["samples"] == 1000 - sum(len(job.parts[c]) for c in reasons)
        assert np.isfinite(record["train_loss"])
    assert caplog.text.count("rejected the update of client") == 10
    state = _final_state(run)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert metrics["accuracy"] > 0.5  # the five honest clients still train the model


def test_a_round_without_any_valid_update_keeps_the_global_model(mnist, tmp_path):
    cfg = TrainConfig(model="cnn", rounds=1, **{**SMALL, "clients": 4, "fraction": 1.0, "min_clients": 0}).validate()
    honest = FederatedTraining(cfg, mnist)
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist, runner=_CorruptingRunner(honest.clients)), run)
    assert run.metrics()[0]["train_loss"] is None and len(run.metrics()[0]["rejected"]) == 4
    before, after = run.load_checkpoint(0), run.load_checkpoint(1)
    assert all(torch.equal(before[k], after[k]) for k in before)


TINY_RUN = dict(dataset="mnist", model="dipsen", clients=4, fraction=0.5, train_subset=200, test_subset=100, seed=3, workers=1)


def _dummy_run(tmp_path, keep: str, rounds: range) -> RunDir:
    """A run folder whose checkpoints of ``rounds`` were saved in order under ``keep``."""
    run = RunDir.create(tmp_path, TrainConfig(keep_checkpoints=keep).validate())
    for round_ in rounds:
        run.save_checkpoint(round_, {"w": torch.tensor([float(round_)])})
    return run


@pytest.mark.parametrize(
    "keep, kept", [("all", list(range(11))), ("last", [10]), ("last-3", [8, 9, 10]), ("every-4", [0, 4, 8, 10])]
)
def test_keep_checkpoints_prunes_as_each_round_is_saved(tmp_path, keep, kept):
    run = _dummy_run(tmp_path, keep, range(11))
    assert run.finished_rounds() == kept
    assert [run.load_checkpoint(r)["w"].item() for r in kept] == kept


def test_the_default_keeps_what_resume_and_the_default_orange_box_attack_need(tmp_path):
    from dipsen.attack.study import StudySettings
    from dipsen.attack.threat import DEFAULT_STALE_ROUNDS

    assert TrainConfig().keep_checkpoints == f"last-{DEFAULT_STALE_ROUNDS + 1}"
    assert StudySettings().stale_rounds == DEFAULT_STALE_ROUNDS
    run = _dummy_run(tmp_path, TrainConfig().keep_checkpoints, range(201))
    assert run.finished_rounds() == list(range(200 - DEFAULT_STALE_ROUNDS, 201))


@pytest.mark.parametrize("value", ["some", "last-0", "every-", "every-2x", "Last", "last-6 "])
def test_keep_checkpoints_must_be_a_rule(value):
    with pytest.raises(ConfigError, match="keep_checkpoints must be all, last, last-N or every-N"):
        TrainConfig(keep_checkpoints=value).validate()


def test_pruning_never_leaves_a_run_without_its_newest_checkpoint(tmp_path, monkeypatch):
    from dipsen.federated import run_dir

    run = _dummy_run(tmp_path, "last", range(3))
    real_write = run_dir._atomic_write_bytes

    def killed_while_writing(path, data):
        raise KeyboardInterrupt  # as a kill before the rename

    monkeypatch.setattr(run_dir, "_atomic_write_bytes", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(3, {"w": torch.tensor([3.0])})
    assert run.finished_rounds() == [2]  # nothing deleted: round 2 is still the one to resume from

    monkeypatch.setattr(run_dir, "_atomic_write_bytes", real_write)
    run.reconfigure(keep_checkpoints="all")
    for round_ in (3, 4, 5):
        run.save_checkpoint(round_, {"w": torch.tensor([float(round_)])})
    newest_on_disk = []  # at each deletion: the newest checkpoint there is, and whether it is the one deleted
    real_unlink = Path.unlink

    def unlink(path, missing_ok=False):
        newest_on_disk.append((run.last_round(), path == run.checkpoint_path(run.last_round())))
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    run.reconfigure(keep_checkpoints="last")  # prunes at once
    assert run.finished_rounds() == [5]
    run.save_checkpoint(6, {"w": torch.tensor([6.0])})
    assert run.finished_rounds() == [6]
    assert newest_on_disk == [(5, False)] * 3 + [(6, False)]  # round 5 went only once round 6 was saved


def test_extending_a_finished_run_gives_the_weights_of_the_longer_run(mnist, tmp_path):
    longer_cfg = TrainConfig(rounds=3, **TINY_RUN).validate()
    longer = RunDir.create(tmp_path / "longer", longer_cfg)
    train(FederatedTraining(longer_cfg, mnist), longer)

    result = subprocess.run(_tiny_train_command(tmp_path / "short", 2), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (path,) = (tmp_path / "short").iterdir()
    assert RunDir.open(path).read_json("final_metrics.json")["rounds"] == 2
    for args, message in (
        (["--rounds", "1"], f"{path} has finished 2 rounds: --rounds 1 cannot undo them"),
        (["--lr", "0.1"], "drop --lr"),
    ):
        refused = subprocess.run(
            [sys.executable, "-m", "dipsen", "train", "--resume", str(path), *args], capture_output=True, text=True, timeout=300
        )
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    extended = subprocess.run(
        [sys.executable, "-m", "dipsen", "train", "--resume", str(path), "--rounds", "3", "--keep-checkpoints", "last"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert extended.returncode == 0, extended.stderr
    run = RunDir.open(path)
    assert run.config().rounds == 3 and run.config().keep_checkpoints == "last"
    assert run.finished_rounds() == [3] and [r["round"] for r in run.metrics()] == [1, 2, 3]
    ours, reference = _final_state(run), _final_state(longer)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    assert run.read_json("final_metrics.json") | {"cost": None} == longer.read_json("final_metrics.json") | {"cost": None}


def test_extending_an_unfinished_run_deletes_nothing_it_needs(mnist, tmp_path):
    cfg = TrainConfig(rounds=2, **TINY_RUN).validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist), run)
    assert run.reconfigure(rounds=2) == cfg and run.finished()  # nothing to change: nothing touched
    run.checkpoint_path(2).unlink()  # as if killed during round 2
    extended = run.reconfigure(rounds=4)
    assert extended.rounds == 4 == run.config().rounds and not run.finished()
    assert train(FederatedTraining(extended, mnist), run, resume=True)["rounds"] == 4
    assert run.finished() and run.finished_rounds() == [0, 1, 2, 3, 4]


def _tiny_train_command(out, rounds: int) -> list[str]:
    args = [sys.executable, "-m", "dipsen", "train", "--rounds", str(rounds), "--out", str(out)]
    for key, value in TINY_RUN.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args
