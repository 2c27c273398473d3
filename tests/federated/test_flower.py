"""dipsen's Flower app: simulation against the in-process engine (stopped by SIGTERM and resumed), a launcher
killed by SIGKILL, malformed updates under a robust aggregator, loopback-only sockets, an authenticated TLS
deployment, SuperNode enrolment.

Each test starts real Flower processes (SuperLink, Ray or SuperNodes) on loopback; every one of
them is stopped by PID when the test ends, passed or failed (``Federation`` is a context manager;
the SIGTERM test kills by PID whatever it saw, should the command under test have left any).
"""

import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from dipsen.config import TrainConfig
from dipsen.errors import DipsenError
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.engine import sample_clients
from dipsen.federated.flower.launch import (
    COMPLETED,
    CONNECTION,
    Federation,
    deploy_on_loopback,
    generate_certificates,
    generate_node_key,
    process_alive,
)

AGREEMENT = dict(
    dataset="mnist",
    model="cnn",
    clients=10,
    fraction=0.5,
    rounds=40,
    train_subset=2000,
    test_subset=500,
    round_eval_size=100,  # a round slice smaller than the test set: both engines evaluate the same rows
    optimizer="adam",
    lr=0.002,
    seed=5,
    workers=2,
)


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dipsen", *args], capture_output=True, text=True, timeout=timeout)


def _flags(settings: dict) -> list[str]:
    return [f for key, value in settings.items() for f in (f"--{key.replace('_', '-')}", str(value))]


def test_a_flower_run_stops_on_sigterm_resumes_and_ends_with_the_in_process_weights(mnist, tmp_path, dipsen_cli):
    out = tmp_path / "flower"
    # rounds enough that the signal, sent once round 1 is saved, lands long before the end
    command = [sys.executable, "-m", "dipsen", "train", "--engine", "flower", "--out", str(out), *_flags(AGREEMENT)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, int] = {}  # every process of the run seen while it trained: PID -> session
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*/checkpoints/round_0001.pt")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "round 1 did not finish within 240 s"
            seen.update(_flower_descendants(proc.pid))
            time.sleep(0.5)
        seen.update(_flower_descendants(proc.pid))
        assert len(seen) >= 4  # SuperLink, SuperExec, the simulation, Ray
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        sessions = set(seen.values()) - {os.getsid(0)}  # never this one: pytest and its shell run in it
        deadline = time.monotonic() + 15
        while (left := [p for p, (_, s) in _processes().items() if s in sessions]) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:  # what the command left behind: reported below, and never left running
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM; resume with: dipsen train --resume" in err
    assert not left, f"left running after SIGTERM: {left}"
    (path,) = out.iterdir()
    run = RunDir.open(path)
    assert run.config().engine == "flower"
    stopped_at = run.finished_rounds()
    time.sleep(2)  # nothing goes on writing the run folder
    assert run.finished_rounds() == stopped_at and not (path / "final_metrics.json").exists()
    assert 1 <= stopped_at[-1] < AGREEMENT["rounds"]

    # --resume continues a Flower run on Flower (one round more, to keep the test short), to the weights of
    # an uninterrupted in-process run of as many rounds
    rounds = stopped_at[-1] + 1
    reference_cfg = TrainConfig(**{**AGREEMENT, "rounds": rounds}).validate()
    reference = RunDir.create(tmp_path / "inprocess", reference_cfg)
    expected = train(FederatedTraining(reference_cfg, mnist), reference)
    assert expected["accuracy"] > 0.5  # a model that learned, so that agreement means something
    resumed = _cli("train", "--resume", str(path), "--rounds", str(rounds), timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert {p.name for p in path.iterdir()} >= {
        "config.json",
        "run_info.json",
        "partition.json",
        "metrics.jsonl",
        "final_metrics.json",
        "flower.log",
        "checkpoints",
    }
    history = run.metrics()
    assert [r["round"] for r in history] == list(range(1, rounds + 1))
    # the rounds' figures are the in-process engine's: the same round slice, the last round on the whole test set
    figures = [(r["test_accuracy"], r["eval_rows"]) for r in history]
    assert figures == [(r["test_accuracy"], r["eval_rows"]) for r in reference.metrics()]
    assert [r["eval_rows"] for r in history] == [100] * (rounds - 1) + [500]
    m = reference_cfg.clients_per_round
    for record in history:  # the first round too: exactly the m clients that sample_clients picks
        assert record["clients"] == sample_clients(reference_cfg, record["round"]) and len(record["clients"]) == m
        assert record["rejected"] == []
    final, expected_state = run.load_checkpoint(rounds), reference.load_checkpoint(rounds)
    assert all(torch.equal(final[k], expected_state[k]) for k in expected_state)
    accuracy = run.read_json("final_metrics.json")["accuracy"]
    assert accuracy == expected["accuracy"]
    assert run.read_json("partition.json") == reference.read_json("partition.json")
    # show and certify read only the folder: in this process, which saves two interpreter and torch starts
    code, out, err = dipsen_cli("show", str(path))
    assert code == 0 and f"accuracy: {accuracy:.4f}" in out, err
    # a Flower run's folder is certified as an in-process one's: smoothing at a sigma the run did not train with
    settings = ("--sigma", "0.1", "--n0", "10", "--n", "200", "--samples", "8", "--radii", "0,0.1")
    code, out, err = dipsen_cli("certify", str(path), *settings)
    assert code == 0, out + err
    certificate = run.read_json("certify-smoothing.json")
    assert certificate["sigma"] == 0.1 and certificate["samples"] == 8 and certificate["n"] == 200
    assert 0 < certificate["certified_accuracy"]["0"] <= 1  # the model learned: some examples are certified correct


def test_a_launcher_killed_by_sigkill_leaves_no_process_no_scratch_folder_and_no_writes_behind(tmp_path):
    out = tmp_path / "flower"
    settings = dict(dataset="mnist", model="cnn", clients=2, fraction=1.0, rounds=500, train_subset=200, test_subset=100)
    command = [sys.executable, "-m", "dipsen", "train", "--engine", "flower", "--out", str(out), *_flags(settings)]
    with open(tmp_path / "launcher.log", "w") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    seen: dict[int, int] = {}  # every process of the run seen while it trained: PID -> session
    try:
        deadline = time.monotonic() + 240
        while not (metrics := list(out.glob("*/metrics.jsonl"))) or not metrics[0].read_text():  # mid-training
            assert proc.poll() is None, (tmp_path / "launcher.log").read_text()
            assert time.monotonic() < deadline, "round 1 did not finish within 240 s"
            seen.update(_flower_descendants(proc.pid))
            time.sleep(0.5)
        seen.update(_flower_descendants(proc.pid))
        run = RunDir.open(metrics[0].parent)
        try:
            with run.lock():
                holder = "nobody"
        except DipsenError as exc:
            holder = str(exc)
        scratch = [f for f in Path(tempfile.gettempdir()).glob("dipsen-flower-*") if _owner(f) == proc.pid]
        proc.kill()  # SIGKILL, as the OOM killer sends: no handler and no finally of the launcher runs
        killed = time.monotonic()
        proc.wait(timeout=10)
        sessions = set(seen.values()) - {os.getsid(0)}  # never this one: pytest and its shell run in it
        while (left := [p for p, (_, s) in _processes().items() if s in sessions]) or any(f.exists() for f in scratch):
            if time.monotonic() - killed > 30:
                break
            time.sleep(0.1)
        gone_after = time.monotonic() - killed
        print(f"launcher killed: waited {gone_after:.1f} s for every process of the run and its scratch folder to go")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pid in [p for p, (_, s) in _processes().items() if s in set(seen.values()) - {os.getsid(0)}]:
            os.kill(pid, signal.SIGKILL)  # what the command left behind: reported below, and never left running
    assert len(seen) >= 5, seen  # SuperLink, SuperExec, the simulation, Ray, the watchdog
    assert not left, f"left running 30 s after the launcher was killed: {left}"
    assert len(scratch) == 1 and not scratch[0].exists()
    # while it trained, the launcher held the run folder's lock (for the ServerApp, which only checked it)
    assert f"is in use by process {proc.pid} " in holder, holder
    written = _snapshot(run.path)
    time.sleep(3)
    assert _snapshot(run.path) == written and not (run.path / "final_metrics.json").exists()  # nothing writes any more


def _owner(scratch: Path) -> int | None:
    try:
        return int((scratch / "owner").read_text())
    except (OSError, ValueError):
        return None


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


FAULTY_CLIENT = '''
"""dipsen's ClientApp, except that clients 0, 1 and 2 misbehave."""
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from dipsen.federated.flower import client_app, task

app = ClientApp()
app.query()(client_app.identify)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = client_app.train(msg, context)
    client = task.client_id(task.config_from_json(msg.content["config"]["train-config"]), context.node_config)
    state = reply.content["arrays"].to_torch_state_dict()
    if client == 0:
        state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    elif client == 1:
        state = {f"renamed.{k}": v for k, v in state.items()}
    elif client == 2:
        raise RuntimeError("this client crashed")
    reply.content["arrays"] = ArrayRecord(state)
    return reply
'''

FAULTY_APP = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "faulty"
version = "1.0.0"

[tool.flwr.app]
publisher = "dipsen-tests"

[tool.flwr.app.components]
serverapp = "dipsen.federated.flower.server_app:app"
clientapp = "faulty_client:app"

[tool.flwr.app.config]
run-dir = ""
resume = false
node-wait-seconds = 60.0
reply-timeout-seconds = 120.0
enrolled-nodes = ""
"""


def _listening(pids: set[int]) -> dict[str, set[int]]:
    """Address -> PIDs of every TCP socket one of ``pids`` listens on; IPv4-mapped IPv6 shown as IPv4."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A":  # LISTEN
                host, port = fields[1].split(":")
                raw = b"".join(bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, len(host), 8))  # host order words
                ip = ipaddress.ip_address(raw)
                ip = getattr(ip, "ipv4_mapped", None) or ip
                sockets[f"socket:[{fields[9]}]"] = f"{ip}:{int(port, 16)}"
    found: dict[str, set[int]] = {}
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # it ended meanwhile
            continue
        for link in links:
            if link in sockets:
                found.setdefault(sockets[link], set()).add(pid)
    return found


def test_flower_rejects_malformed_updates_and_aggregates_the_rest_by_median(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(textwrap.dedent(FAULTY_APP))
    (app / "faulty_client.py").write_text(textwrap.dedent(FAULTY_CLIENT))
    cfg = TrainConfig(
        dataset="mnist",
        model="cnn",
        clients=5,
        fraction=1.0,
        rounds=2,
        train_subset=500,
        test_subset=200,
        seed=1,
        workers=2,
        engine="flower",
        min_clients=2,
        aggregator="median",
    ).validate()  # a robust rule, through Flower
    run = RunDir.create(tmp_path / "runs", cfg)
    certificates = generate_certificates(tmp_path / "certificates")
    sockets: dict[str, set[int]] = {}  # every address a process of the federation listened on during the run
    with Federation(tmp_path / "federation", simulation=True, certificates=certificates) as federation:
        run_id = federation.submit(
            {"run-dir": str(run.path), "resume": False},
            app=app,
            federation_config={"num-supernodes": 5, "client-resources-num-cpus": 1, "init-args-num-cpus": 2},
        )

        def record_sockets():
            for address, pids in _listening(federation._track()).items():
                sockets.setdefault(address, set()).update(pids)

        status = federation.wait(run_id, timeout=240, run=run, on_poll=record_sockets, poll_seconds=0.5)
        log = federation.run_log(run_id)
    assert status == COMPLETED, log
    # the SuperLink (TLS), and Ray's GCS, raylet and workers: loopback only, none on a wildcard or a LAN address
    assert len(sockets) >= 4, sockets
    assert all(ipaddress.ip_address(a.rsplit(":", 1)[0]).is_loopback for a in sockets), sockets
    assert "running on https://127.0.0.1:" in (tmp_path / "federation" / "superlink.log").read_text()
    history = run.metrics()
    assert [r["round"] for r in history] == [1, 2]
    for record in history:
        reasons = {r["client"]: r["reason"] for r in record["rejected"]}
        assert sorted(reasons) == [0, 1, 2], reasons
        assert "contains NaN" in reasons[0]
        assert "missing" in reasons[1] and "unexpected ['renamed." in reasons[1]
        assert reasons[2].startswith("client error") and "this client crashed" in reasons[2]
        assert record["samples"] == 200  # the two honest clients' 100 + 100 rows
    assert "rejected the update of client 0" in log
    state = run.load_checkpoint(2)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_authenticated_tls_deployment_trains_and_stops_every_process(tmp_path):
    cfg = TrainConfig(
        dataset="mnist",
        model="cnn",
        clients=2,
        fraction=1.0,
        rounds=2,
        train_subset=400,
        test_subset=200,
        seed=2,
        engine="flower",
    ).validate()
    run = RunDir.create(tmp_path / "runs", cfg)
    start = time.perf_counter()
    deployment = deploy_on_loopback(run, tmp_path / "deployment", timeout=240)
    print(f"deployment: 2 SuperNodes, 2 rounds in {time.perf_counter() - start:.1f} s")
    assert deployment.status == COMPLETED
    assert deployment.metrics["rounds"] == 2 and run.finished_rounds() == [0, 1, 2]
    assert all(r["clients"] == [0, 1] and r["rejected"] == [] for r in run.metrics())
    # the SuperLink served HTTPS with the generated certificate; flwr and the SuperNodes trusted its CA
    folder = tmp_path / "deployment"
    assert "running on https://127.0.0.1:" in (folder / "superlink.log").read_text()
    assert 'root-certificates = "' in (folder / "flwr-home" / "config.toml").read_text()
    assert sorted(p.name for p in (folder / "partitions").iterdir()) == ["client_0000.npz", "client_0001.npz"]
    # each SuperNode authenticated with its own enrolled key, and served the client it was enrolled for
    enrolled = json.loads((folder / "enrolled_nodes.json").read_text())
    assert sorted(enrolled.values()) == [0, 1]
    superlink_log = (folder / "superlink.log").read_text()
    assert "SuperNode authentication is disabled" not in superlink_log
    assert "/v1/fleet/register-node" not in superlink_log  # no node registered itself: all were enrolled
    for client in (0, 1):
        assert (
            f"SuperNode ID: {next(n for n, c in enrolled.items() if c == client)}"
            in (folder / f"supernode-{client}.log").read_text()
        )
    assert len(deployment.pids) >= 4  # SuperLink, 2 SuperNodes and what they spawned
    deadline = time.time() + 10
    while any(process_alive(pid) for pid in deployment.pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in deployment.pids if process_alive(pid)]
    assert os.path.getsize(run.path / "flower.log") > 0


def test_supernode_authentication_admits_an_enrolled_key_and_refuses_any_other(tmp_path):
    certificates = generate_certificates(tmp_path / "certificates")
    enrolled, rogue = (generate_node_key(tmp_path / "keys", name) for name in ("enrolled", "rogue"))
    with Federation(tmp_path / "federation", simulation=False, certificates=certificates, node_auth=True) as federation:
        node_id = federation.enroll_supernode(enrolled.public)
        federation.start_supernode("enrolled", 'partition-file="/none"', key=enrolled.private)
        federation.start_supernode("rogue", 'partition-file="/none"', key=rogue.private)
        federation.start_supernode("anonymous", 'partition-file="/none"')  # a key of its own making
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            exits = {s.name: s.proc.poll() for s in federation._services if s.name != "superlink"}
            if exits["rogue"] is not None and exits["anonymous"] is not None:
                break
            time.sleep(0.5)
        nodes = json.loads(federation._flwr("supernode", "ls", CONNECTION, "--format", "json"))["nodes"]
        logs = {name: federation.log_tail(name, 200) for name in ("enrolled", "rogue", "anonymous")}
    assert exits == {"enrolled": None, "rogue": 1, "anonymous": 1}, logs
    assert [(n["node-id"], n["status"]) for n in nodes] == [(str(node_id), "online")]
    assert f"SuperNode ID: {node_id}" in logs["enrolled"]
    assert "Failed to activate SuperNode" in logs["rogue"], logs["rogue"]  # a key the SuperLink does not know
    assert "All SuperNodes must be registered via the CLI" in logs["anonymous"], logs["anonymous"]


def _processes() -> dict[int, tuple[int, int]]:
    """PID -> (parent PID, session) of every live process; zombies left out."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found[int(stat.parent.name)] = (int(fields[1]), int(fields[3]))
    return found


def _flower_descendants(root: int) -> dict[int, int]:
    """PID -> session of every live descendant of ``root`` outside this process's session.

    Those inside it (``flwr ls``, run by ``root`` and waited for) share the session with pytest and
    the shell around it: treating that session as the run's would stop them all.
    """
    processes, found, grew, own = _processes(), {root}, True, os.getsid(0)
    while grew:
        children = {pid for pid, (parent, _) in processes.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return {pid: processes[pid][1] for pid in found - {root} if processes[pid][1] != own}
