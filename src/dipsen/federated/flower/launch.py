"""Start Flower's processes (SuperLink, SuperNodes), submit dipsen runs to them, wait, clean up.

Everything goes through Flower's own command-line tools (``flower-superlink``,
``flower-supernode``, ``flwr run``, ``flwr ls``, ``flwr log``), as a user would run them. Each
:class:`Federation` gets a Flower home folder of its own (``FLWR_HOME``: connection settings,
installed apps), so it never reads or changes the user's ``~/.flwr``. Runtime dependency
installation is always off: Flower would otherwise ``uv sync`` the app's dependencies into a
fresh environment per run (torch with CUDA packages, gigabytes) instead of using this one.

Processes are started in sessions of their own and stopped by PID, with everything they spawned
(the ServerApp, ``flwr-simulation``, Ray's workers), also when the caller fails.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import DipsenError
from ..run_dir import RunDir

CONNECTION = "dipsen"
FINISHED = "finished"
COMPLETED = "finished:completed"


def app_dir() -> Path:
    """The project folder whose pyproject.toml declares dipsen's Flower app."""
    root = Path(__file__).resolve().parents[4]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app.components]" not in pyproject.read_text():
        raise DipsenError("the Flower engine runs dipsen from its source folder (pip install -e .); "
                          f"{pyproject} does not declare the Flower app")
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tool(name: str) -> str:
    """A Flower command from this Python's environment, so every process runs the same flwr."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


@dataclass(frozen=True)
class Certificates:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost signed by it (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path


def generate_certificates(folder: Path, days: int = 2) -> Certificates:
    """Write a throw-away CA and a loopback server certificate to ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # mkdir's mode is masked by the umask, and an existing folder keeps its own
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("dipsen test CA", ca_key, "dipsen test CA", ca_key, ca=True)
    server_cert = certificate("localhost", server_key, "dipsen test CA", ca_key, ca=False)
    paths = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    # created 0600 from the start: writing first and chmod-ing after leaves the key world-readable for a moment
    descriptor = os.open(paths.server_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # O_CREAT's mode applies only to a new file
    with os.fdopen(descriptor, "wb") as key_file:
        key_file.write(server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children = [int(c) for c in task.read_text().split()]
        except OSError:  # the process ended while being read
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def process_alive(pid: int) -> bool:
    """Whether ``pid`` still runs; a zombie (exited, waiting to be reaped by its parent) does not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Federation:
    """A SuperLink on loopback, optionally with TLS, plus whatever SuperNodes are started on it.

    Use as a context manager: leaving it stops every process it started, with their descendants.
    Logs go to files in ``folder``.
    """

    def __init__(self, folder: Path, *, simulation: bool, certificates: Certificates | None = None) -> None:
        self.folder = Path(folder)
        self.home = self.folder / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.simulation, self.certificates = simulation, certificates
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._processes: list[tuple[subprocess.Popen, str]] = []
        self.stopped_pids: list[int] = []  # every process stop() signalled, descendants included
        security = (f'root-certificates = "{certificates.ca.resolve()}"' if certificates else "insecure = true")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n{security}\n')
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    def __enter__(self) -> "Federation":
        try:
            self._start_superlink()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _tls_args(self, *, server: bool) -> list[str]:
        c = self.certificates
        if c is None:
            return ["--insecure"]
        if server:
            return ["--ssl-ca-certfile", str(c.ca), "--ssl-certfile", str(c.server_cert), "--ssl-keyfile", str(c.server_key)]
        return ["--root-certificates", str(c.ca)]

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")
        try:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                    start_new_session=True)  # a group of its own, so it can be stopped whole
        finally:
            log.close()
        self._processes.append((proc, name))
        return proc

    def _start_superlink(self) -> None:
        args = [_tool("flower-superlink"), *self._tls_args(server=True), "--port", str(self.port),
                "--database", ":flwr-in-memory:", "--disable-runtime-dependency-installation"]
        proc = self._spawn("superlink", args + (["--simulation"] if self.simulation else []))
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise DipsenError(f"flower-superlink exited ({proc.returncode}): {self.log_tail('superlink')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise DipsenError(f"flower-superlink did not open port {self.port} within 60 s") from None
                time.sleep(0.2)

    def start_supernode(self, name: str, node_config: str, env: dict | None = None) -> subprocess.Popen:
        """A SuperNode connected to this SuperLink, with ``node_config`` (e.g. ``partition-file="..."``)."""
        args = [_tool("flower-supernode"), *self._tls_args(server=False), "--superlink", self.address,
                "--port", str(free_port()), "--node-config", node_config]
        return self._spawn(name, args, env)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.folder / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _flwr(self, *args: str, timeout: float = 60) -> str:
        try:
            done = subprocess.run([_tool("flwr"), *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DipsenError(f"flwr {args[0]} did not answer within {timeout:g} s") from None
        if done.returncode != 0:
            raise DipsenError(f"flwr {args[0]} failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
        return done.stdout

    def submit(self, run_config: dict, *, app: Path | None = None, federation_config: dict | None = None) -> int:
        """``flwr run`` the app with ``run_config`` overrides; returns the run ID."""
        args = ["run", str(app or app_dir()), CONNECTION, "--format", "json",
                "--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())]
        if federation_config:
            args += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
        reply = json.loads(self._flwr(*args, timeout=120))
        if not reply.get("success"):
            raise DipsenError(f"flwr run failed: {reply}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status as ``flwr ls --format json`` reports it, e.g. ``running``, ``finished:completed``."""
        runs = json.loads(self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"))["runs"]
        return runs[0]["status"] if runs else "unknown"

    def wait(self, run_id: int, timeout: float, on_poll: Callable[[], None] | None = None,
             poll_seconds: float = 2.0) -> str:
        """Poll the run's status until it finishes; raises if it has not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not (status := self.status(run_id)).startswith(FINISHED):
            if time.monotonic() > deadline:
                raise DipsenError(f"Flower run {run_id} still {status!r} after {timeout:g} s")
            if on_poll:
                on_poll()
            for proc, name in self._processes:
                if proc.poll() is not None and name == "superlink":
                    raise DipsenError(f"flower-superlink exited ({proc.returncode}): {self.log_tail('superlink')}")
            time.sleep(poll_seconds)
        return status

    def run_log(self, run_id: int) -> str:
        return self._flwr("log", str(run_id), CONNECTION, "--show", timeout=60)

    def stop(self, grace_seconds: float = 15.0) -> None:
        """Stop every started process and its descendants: SIGTERM, then SIGKILL after ``grace_seconds``."""
        pids = []
        for proc, _ in reversed(self._processes):  # SuperNodes before the SuperLink they talk to
            pids += [proc.pid, *_descendants(proc.pid)]
        self.stopped_pids += pids
        _signal_pids(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
            for proc, _ in self._processes:
                proc.poll()  # reap our children so they do not linger as zombies
            time.sleep(0.1)
        _signal_pids([pid for pid in pids if process_alive(pid)], signal.SIGKILL)
        for proc, _ in self._processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._processes.clear()


def simulate(run: RunDir, *, resume: bool = False, timeout: float = 7 * 24 * 3600,
             on_poll: Callable[[], None] | None = None) -> dict:
    """Train ``run`` (a run folder with its config.json) on a Flower simulation; returns the final metrics.

    A SuperLink with the simulation runtime runs K virtual SuperNodes on Ray, ``workers`` of them
    at a time, each on one CPU thread as the in-process engine's workers. Flower's log of the run
    is saved as ``flower.log`` in the run folder.
    """
    config = run.config()
    with tempfile.TemporaryDirectory(prefix="dipsen-flower-") as folder, \
            Federation(Path(folder), simulation=True) as federation:
        run_id = federation.submit(
            {"run-dir": str(run.path.resolve()), "resume": resume},
            federation_config={"num-supernodes": config.clients, "client-resources-num-cpus": 1,
                               "init-args-num-cpus": config.workers},
        )
        _wait_for_completion(federation, run_id, run, timeout, on_poll)
    return run.read_json("final_metrics.json")


@dataclass(frozen=True)
class Deployment:
    """How a deployed run went: its final Flower status, its final metrics, the PIDs it stopped."""

    status: str
    metrics: dict
    pids: list[int]


def deploy_on_loopback(run: RunDir, folder: Path, *, timeout: float = 3600.0) -> Deployment:
    """Train ``run`` on a real Flower deployment on this machine: one SuperLink, K SuperNodes, TLS.

    Each client's rows are exported to a file of their own, and each SuperNode (a separate process)
    is told only its own file. Certificates are self-signed, made for this run. Logs, partition
    files and certificates stay in ``folder``. Every process is stopped on return, also on error.
    """
    from .task import PARTITION_FILE, export_partitions, load_config_dataset

    config = run.config()
    folder = Path(folder)
    partitions = export_partitions(config, load_config_dataset(config), folder / "partitions")
    certificates = generate_certificates(folder / "certificates")
    with Federation(folder, simulation=False, certificates=certificates) as federation:
        for client, path in enumerate(partitions):
            # many SuperNodes share this machine's cores: one thread each, as the in-process workers
            federation.start_supernode(f"supernode-{client}", f'{PARTITION_FILE}="{path.resolve()}"',
                                       env={"OMP_NUM_THREADS": "1"})
        run_id = federation.submit({"run-dir": str(run.path.resolve()), "resume": False})
        status = _wait_for_completion(federation, run_id, run, timeout)
    return Deployment(status, run.read_json("final_metrics.json"), federation.stopped_pids)


def _wait_for_completion(federation: Federation, run_id: int, run: RunDir, timeout: float, on_poll=None) -> str:
    """Wait for ``run_id``, save its log as flower.log, and raise unless it completed."""
    try:
        status = federation.wait(run_id, timeout, on_poll)
    except DipsenError:
        _save_log(federation, run_id, run)
        raise
    _save_log(federation, run_id, run)
    if status != COMPLETED:
        tail = "\n".join((run.path / "flower.log").read_text().splitlines()[-25:])
        raise DipsenError(f"Flower run ended {status}; end of {run.path / 'flower.log'}:\n{tail}")
    return status


def _save_log(federation: Federation, run_id: int, run: RunDir) -> None:
    try:
        (run.path / "flower.log").write_text(federation.run_log(run_id))
    except DipsenError as exc:  # the log is a help, not a result: its loss must not hide the run's outcome
        (run.path / "flower.log").write_text(f"flwr log failed: {exc}\n")


def _toml_value(value) -> str:
    """A value as TOML writes it, for ``--run-config key=value``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)
