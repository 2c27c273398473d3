"""How the Flower launcher handles ports, addresses, processes, stops, polling, certificates, the run lock,
and its own death (``kill -9``: the watchdog stops what it started and removes its scratch folder).

No Flower process runs here: a small stand-in for ``flower-superlink`` (a Python script that
listens on its ``--port`` and, as the real one starts ``flower-superexec``, starts a child in a
session of its own, which starts a grandchild) takes its place. Every process a test starts is
killed by PID when it ends, passed or failed.
"""

import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from dipsen.config import TrainConfig
from dipsen.errors import DipsenError
from dipsen.federated import RunDir
from dipsen.federated.flower import launch
from dipsen.federated.flower.launch import (
    LOCK_HOLDER,
    Federation,
    free_port,
    generate_certificates,
    generate_node_key,
    process_alive,
)
from dipsen.federated.flower.watchdog import processes
from dipsen.federated.workers import Interrupted, StopFlag

FAKE_SUPERLINK = """
import os, socket, subprocess, sys, time
from pathlib import Path

port = int(sys.argv[sys.argv.index("--port") + 1])
pids = Path(os.environ["FAKE_PIDS"])
# as flower-superlink starts flower-superexec: a child in a session of its own, which starts the ServerApp
child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                          "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                          "print(p.pid, flush=True); time.sleep(600)"],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
grandchild = int(child.stdout.readline())
sock = socket.socket()
try:
    sock.bind(("127.0.0.1", port))
except OSError as exc:
    print(f"ERROR: [Errno 98] error while attempting to bind on address: {exc.strerror.lower()}", flush=True)
    child.kill()
    os.kill(grandchild, 9)
    sys.exit(1)
sock.listen()
with open(pids, "a") as out:
    out.write(f"{os.getpid()} {child.pid} {grandchild}\\n")
print(f"INFO: Uvicorn running on http://127.0.0.1:{port}", flush=True)
time.sleep(600)
"""


@pytest.fixture
def fake_flower(tmp_path, monkeypatch):
    """Flower's tools replaced by the stand-in; yields the file where each start writes its PIDs."""
    script = tmp_path / "fake-superlink"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_SUPERLINK))
    script.chmod(0o755)
    pids = tmp_path / "pids.txt"
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    monkeypatch.setattr(launch, "_tool", lambda name: str(script))
    yield pids
    for line in pids.read_text().splitlines() if pids.exists() else []:  # whatever a failed test left running
        for pid in map(int, line.split()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def certs(tmp_path):
    return generate_certificates(tmp_path / "certificates")


def _started(pids: Path) -> list[int]:
    return [int(p) for line in pids.read_text().splitlines() for p in line.split()]


def _all_gone(pids: list[int], seconds: float = 10) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := [p for p in pids if process_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def test_free_port_never_hands_out_a_port_twice():
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == 500


def test_free_port_skips_a_port_the_kernel_offers_again(monkeypatch):
    offered = iter([41001, 41001, 41002])  # the kernel gives a closed socket's port to the next bind(0)

    class Socket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def bind(self, address):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(launch.socket, "socket", Socket)
    monkeypatch.setattr(launch, "_ports_handed_out", set())  # other tests may have been handed 41001 already
    assert [free_port(), free_port()] == [41001, 41002]


def test_a_start_whose_port_was_taken_is_retried_on_another_port(tmp_path, fake_flower, certs, monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real_free_port = launch.free_port
    monkeypatch.setattr(launch, "free_port", lambda: next(ports, None) or real_free_port())
    try:
        with Federation(tmp_path / "federation", simulation=True, certificates=certs) as federation:
            assert federation.port != taken.getsockname()[1]
            assert launch._listens(_started(fake_flower)[0], federation.port)
            assert f'address = "127.0.0.1:{federation.port}"' in (federation.home / "config.toml").read_text()
    finally:
        taken.close()
    assert not _all_gone(_started(fake_flower))


def test_stop_reaches_processes_whose_parent_died_first(tmp_path, fake_flower, certs):
    with Federation(tmp_path / "federation", simulation=True, certificates=certs) as federation:
        superlink, superexec, serverapp = _started(fake_flower)
        assert os.getsid(superexec) == superexec != os.getsid(superlink)  # a session of its own
        os.kill(superlink, signal.SIGKILL)  # the SuperLink dies first: its children go to init
        assert not _all_gone([superlink])
        assert process_alive(superexec) and process_alive(serverapp)
    assert not _all_gone([superlink, superexec, serverapp])
    assert {superexec, serverapp} <= set(federation.stopped_pids)


def test_a_stop_flag_interrupts_the_wait_and_stops_every_process(tmp_path, fake_flower, certs, monkeypatch):
    monkeypatch.setattr(Federation, "status", lambda self, run_id: "running")
    flag = StopFlag()
    threading.Timer(0.5, flag.set, args=(signal.SIGTERM,)).start()  # as the signal handler would
    start = time.monotonic()
    with (
        pytest.raises(Interrupted),
        Federation(tmp_path / "federation", simulation=True, certificates=certs, stop=flag) as federation,
    ):
        federation.wait(1, timeout=60, poll_seconds=5)
    assert time.monotonic() - start < 10
    assert not _all_gone(_started(fake_flower))


def test_flower_is_asked_for_the_status_rarely_and_at_once_when_the_run_has_written_its_end(
    tmp_path, fake_flower, certs, monkeypatch
):
    run = RunDir.create(tmp_path / "runs", TrainConfig(clients=2, fraction=1.0).validate())
    asked = []

    def status(self, run_id):
        asked.append(time.monotonic())
        return launch.COMPLETED if (run.path / "final_metrics.json").exists() else "running"

    monkeypatch.setattr(Federation, "status", status)
    with Federation(tmp_path / "federation", simulation=True, certificates=certs) as federation:
        start = time.monotonic()
        threading.Timer(1.5, run.write_json, args=("final_metrics.json", {})).start()  # the ServerApp's last act
        assert federation.wait(1, timeout=30, run=run, poll_seconds=0.05, status_seconds=20) == launch.COMPLETED
    assert len(asked) == 1 and 1.5 <= asked[0] - start < 5  # not once per poll (30 of them or more)


def test_flower_is_asked_at_once_when_a_process_of_the_federation_ends(tmp_path, fake_flower, certs, monkeypatch):
    asked = []

    def status(self, run_id):
        asked.append(time.monotonic())
        return "finished:failed" if not process_alive(serverapp) else "running"

    monkeypatch.setattr(Federation, "status", status)
    with Federation(tmp_path / "federation", simulation=True, certificates=certs) as federation:
        superlink, superexec, serverapp = _started(fake_flower)
        start = time.monotonic()
        threading.Timer(1.0, os.kill, args=(serverapp, signal.SIGKILL)).start()  # a ServerApp that crashed
        assert federation.wait(1, timeout=30, poll_seconds=0.05, status_seconds=20) == "finished:failed"
    assert len(asked) == 1 and 1.0 <= asked[0] - start < 4


def _command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_superlink_and_supernodes_are_told_to_listen_on_loopback_only_and_to_use_tls(tmp_path, fake_flower, certs):
    key = generate_node_key(tmp_path / "keys", "client_0000")
    with Federation(tmp_path / "federation", simulation=False, certificates=certs, node_auth=True) as federation:
        federation.start_supernode("supernode-0", 'partition-file="/data/client_0000.npz"', key=key.private)
        federation.await_supernodes()
        superlink, supernode = (int(line.split()[0]) for line in fake_flower.read_text().splitlines())
        link, node = _command_line(superlink), _command_line(supernode)
        connection = (federation.home / "config.toml").read_text()
    assert _flag(link, "--host") == _flag(node, "--host") == "127.0.0.1"  # Flower's default, but said
    assert "--insecure" not in link + node and "insecure" not in connection
    assert (_flag(link, "--ssl-certfile"), _flag(link, "--ssl-keyfile")) == (str(certs.server_cert), str(certs.server_key))
    assert _flag(node, "--root-certificates") == str(certs.ca) and f'root-certificates = "{certs.ca}"' in connection
    assert _flag(node, "--superlink") == f"127.0.0.1:{_flag(link, '--port')}"
    assert "--enable-supernode-auth" in link and _flag(node, "--auth-supernode-private-key") == str(key.private)


def test_a_simulation_keeps_ray_on_loopback_and_off_any_cluster_named_in_the_environment(
    tmp_path, fake_flower, certs, monkeypatch
):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # would make ray.init join that cluster
    with Federation(tmp_path / "federation", simulation=True, certificates=certs):
        superlink = _started(fake_flower)[0]
        environment = dict(v.split("=", 1) for v in Path(f"/proc/{superlink}/environ").read_text().split("\0") if v)
        args = _command_line(superlink)
    assert environment["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and "RAY_ADDRESS" not in environment
    assert "--simulation" in args and "--enable-supernode-auth" not in args


def _environment(pid: int) -> dict[str, str]:
    return dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if v)


def test_only_a_federation_that_holds_the_run_lock_names_this_process_to_its_server_apps(tmp_path, fake_flower, certs):
    for holds_lock in (False, True):
        with Federation(tmp_path / f"federation-{holds_lock}", simulation=True, certificates=certs, holds_lock=holds_lock):
            environment = _environment(_started(fake_flower)[-3])  # this start's SuperLink
        assert environment.get(LOCK_HOLDER) == (str(os.getpid()) if holds_lock else None)


def test_processes_find_this_python_s_flower_tools_without_an_activated_venv(tmp_path, fake_flower, certs, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # .venv/bin/dipsen run from a shell without the venv on PATH
    with Federation(tmp_path / "federation", simulation=True, certificates=certs):
        superlink = _started(fake_flower)[0]
        environment = dict(v.split("=", 1) for v in Path(f"/proc/{superlink}/environ").read_text().split("\0") if v)
    assert environment["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # where flower-superexec is


def test_simulation_certificates_outlive_the_run_timeout(tmp_path, monkeypatch):
    class Refused(Exception):
        pass

    validity = []
    real_generate = launch.generate_certificates

    def recording(folder, valid_for):
        validity.append(valid_for)
        return real_generate(folder, valid_for)

    def no_federation(*args, **kwargs):
        raise Refused

    monkeypatch.setattr(launch, "generate_certificates", recording)
    monkeypatch.setattr(launch, "Federation", no_federation)
    run = RunDir.create(tmp_path / "runs", TrainConfig(clients=2, fraction=1.0, engine="flower").validate())
    with pytest.raises(Refused):
        launch.simulate(run, timeout=30 * 24 * 3600.0)
    assert validity == [datetime.timedelta(days=31)]


def test_deployment_certificates_outlive_the_run_timeout(tmp_path, monkeypatch):
    class Refused(Exception):
        pass

    def no_federation(*args, **kwargs):
        raise Refused

    monkeypatch.setattr(launch, "Federation", no_federation)
    cfg = TrainConfig(dataset="mnist", model="cnn", clients=2, fraction=1.0, train_subset=200, seed=2, engine="flower").validate()
    run = RunDir.create(tmp_path / "runs", cfg)
    week = 7 * 24 * 3600.0
    with pytest.raises(Refused):
        launch.deploy_on_loopback(run, tmp_path / "deployment", timeout=week)
    for name in ("ca.crt", "server.pem"):
        cert = x509.load_pem_x509_certificate((tmp_path / "deployment" / "certificates" / name).read_bytes())
        assert cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=week)


def test_generated_certificates_default_to_two_days(tmp_path):
    paths = generate_certificates(tmp_path / "certs")
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=1, hours=23) < left <= datetime.timedelta(days=2)


LOCK_HOLDER_SCRIPT = """
import sys, time
from dipsen.federated import RunDir
with RunDir.open(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_on_a_locked_run_folder_is_refused(tmp_path, monkeypatch):
    run = RunDir.create(tmp_path, TrainConfig(clients=2, fraction=1.0).validate())
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER_SCRIPT, str(run.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        message = rf"^{run.path} is in use by process {holder.pid} \(it holds {run.path / '.lock'}\); "
        with pytest.raises(DipsenError, match=message), run.lock():
            pass
        # the Flower engine refuses before it starts any process or writes anything
        monkeypatch.setattr(launch, "Federation", None)
        with pytest.raises(DipsenError, match=message):
            launch.simulate(run, resume=True)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    with run.lock():  # the holder is gone, killed or not: its lock went with it
        assert (run.path / ".lock").read_text() == f"{os.getpid()}\n"
    assert (run.path / ".lock").read_text() == ""


def test_the_lock_is_refused_within_one_process_too(tmp_path):
    run = RunDir.create(tmp_path, TrainConfig(clients=2, fraction=1.0).validate())
    with run.lock():
        with pytest.raises(DipsenError, match="is in use by process"), run.lock():
            pass


def test_a_server_app_started_by_a_launcher_checks_that_the_launcher_holds_the_lock_instead_of_taking_it(tmp_path):
    run = RunDir.create(tmp_path, TrainConfig(clients=2, fraction=1.0).validate())
    with pytest.raises(DipsenError, match=rf"process {os.getpid()}, which started this one, does not hold"):
        with run.lock(held_by=os.getpid()):  # nobody holds it: no launcher stands behind this process
            pass
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER_SCRIPT, str(run.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with run.lock(held_by=holder.pid):  # its launcher holds it: entered, and left as it was
            assert (run.path / ".lock").read_text() == f"{holder.pid}\n"
        assert (run.path / ".lock").read_text() == f"{holder.pid}\n"
        with pytest.raises(DipsenError, match=rf"process {os.getpid()}, which started this one, does not hold"):
            with run.lock(held_by=os.getpid()):  # held, but by another process than the one named
                pass
        with pytest.raises(DipsenError, match=rf"in use by process {holder.pid}"), run.lock():  # by hand: takes it
            pass
    finally:
        holder.kill()
        holder.wait(timeout=10)


# The launcher of a run: simulate() as `dipsen train --engine flower` calls it, on the stand-in SuperLink
# (argv[2]), which runs no app: Flower reports the run as running until the launcher is stopped.
FAKE_LAUNCHER = """
import sys
from dipsen.federated import RunDir
from dipsen.federated.flower import launch

launch._tool = lambda name: sys.argv[2]
launch.Federation.submit = lambda self, run_config, **kwargs: 1
launch.Federation.status = lambda self, run_id: "running"
launch.simulate(RunDir.open(sys.argv[1]))
"""


def _launch(run: RunDir, tmp_path: Path, pids: Path) -> subprocess.Popen:
    """A launcher (FAKE_LAUNCHER) of ``run``, returned once its SuperLink listens; its scratch folder is in ``tmp_path/tmp``."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    launcher = subprocess.Popen(
        [sys.executable, "-c", FAKE_LAUNCHER, str(run.path), str(tmp_path / "fake-superlink")],
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
    )
    deadline = time.monotonic() + 60
    while not (pids.exists() and pids.read_text()):
        assert launcher.poll() is None and time.monotonic() < deadline, "the launcher did not start its SuperLink"
        time.sleep(0.1)
    return launcher


def _descendants(root: int) -> set[int]:
    found, table = {root}, processes()
    while children := {pid for pid, (parent, _) in table.items() if parent in found} - found:
        found |= children
    return found - {root}


def test_killing_the_launcher_stops_every_process_it_started_and_removes_its_scratch_folder(tmp_path, fake_flower):
    run = RunDir.create(tmp_path / "runs", TrainConfig(clients=2, fraction=1.0, engine="flower").validate())
    launcher = _launch(run, tmp_path, fake_flower)
    try:
        started = _descendants(launcher.pid)  # the stand-in's three processes, and the watchdog
        assert set(_started(fake_flower)) <= started
        (scratch,) = (tmp_path / "tmp").glob("dipsen-flower-*")
        assert (scratch / "certificates" / "server.key").exists()
        launcher.kill()  # SIGKILL: no handler, no finally of its own runs
        killed = time.monotonic()
        launcher.wait(timeout=10)
        left = _all_gone(sorted(started), 30)
        while scratch.exists() and time.monotonic() - killed < 30:
            time.sleep(0.1)
        print(f"launcher killed: waited {time.monotonic() - killed:.1f} s for its processes and scratch folder to go")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)
    assert not left, f"left running after the launcher was killed: {left}"
    assert not scratch.exists()


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_a_second_launch_beside_a_running_one_is_refused_at_once_and_writes_nothing(
    tmp_path, fake_flower, dipsen_cli, monkeypatch
):
    cfg = TrainConfig(dataset="mnist", clients=2, fraction=1.0, train_subset=200, engine="flower").validate()
    run = RunDir.create(tmp_path / "runs", cfg)
    (run.path / "flower.log").write_text("Flower's log of an earlier session of this run\n")
    launcher = _launch(run, tmp_path, fake_flower)  # holds the lock; its ServerApp would not have started yet
    try:
        before = _snapshot(run.path)
        with monkeypatch.context() as patch:
            patch.setattr(subprocess, "Popen", lambda *args, **kwargs: pytest.fail(f"a process was started: {args}"))
            start = time.monotonic()
            code, out, err = dipsen_cli("train", "--resume", str(run.path))
            refused_after = time.monotonic() - start
        assert code != 0 and f"is in use by process {launcher.pid}" in out + err, out + err
        assert refused_after < 15
        assert _snapshot(run.path) == before  # flower.log included
    finally:
        launcher.kill()
        launcher.wait(timeout=10)


def test_a_scratch_folder_whose_launcher_is_dead_is_removed_by_the_next_launch(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale, live, foreign = (tmp_path / f"dipsen-flower-{name}" for name in ("stale", "live", "foreign"))
    for folder, owner in ((stale, f"{dead.pid}\n"), (live, f"{os.getpid()}\n"), (foreign, None)):
        folder.mkdir()
        if owner is not None:
            (folder / "owner").write_text(owner)
    with launch._scratch_folder() as folder:
        assert folder.parent == tmp_path and (folder / "owner").read_text() == f"{os.getpid()}\n"
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        assert not stale.exists() and live.exists() and foreign.exists()  # a live owner's, or one without an owner: kept
    assert not folder.exists()
