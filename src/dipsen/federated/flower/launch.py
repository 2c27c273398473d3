"""Start Flower's processes (SuperLink, SuperNodes), submit dipsen runs to them, wait, clean up.

Everything goes through Flower's own command-line tools (``flower-superlink``,
``flower-supernode``, ``flwr run``, ``flwr ls``, ``flwr log``), as a user would run them. Each
:class:`Federation` gets a Flower home folder of its own (``FLWR_HOME``: connection settings,
installed apps), so it never reads or changes the user's ``~/.flwr``. Runtime dependency
installation is always off: Flower would otherwise ``uv sync`` the app's dependencies into a
fresh environment per run (torch with CUDA packages, gigabytes) instead of using this one.

Every port these processes open is bound to loopback (127.0.0.1), Ray's included when the
simulation runtime starts it; the SuperLink always serves TLS with a throw-away certificate. See
README "Trust boundary" for what that does and does not keep out.

Processes are started in sessions of their own and stopped by PID, with everything they spawned
(``flower-superexec``, the ServerApp, ``flwr-simulation``, Ray's workers), also when the caller
fails or is told to stop: every process in those sessions, or in a session that one of their
members opened, is signalled, also after its parent died and it was re-parented to init. Should
the launcher (the process running a :class:`Federation`) die without stopping them, killed by
``kill -9`` or the OOM killer, its watchdog process (:mod:`.watchdog`) does, and removes the
run's temporary ``dipsen-flower-*`` folder; such a folder left behind all the same is removed by
the next launch once the process it names as its owner is dead.

``simulate`` and ``deploy_on_loopback`` take the run folder's lock (:meth:`RunDir.lock`) before
they start or write anything and hold it until every process has stopped, so a second launch on
the same folder is refused at once and leaves it untouched. The ServerApp they start is told the
launcher's PID (:data:`LOCK_HOLDER` in its environment) and checks that this process holds the
lock instead of taking it; a ServerApp started by hand (``flwr run``) takes it itself.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from ...device import resolve_device
from ...errors import DipsenError
from ..run_dir import RunDir
from ..workers import StopFlag
from . import watchdog
from .watchdog import process_alive, terminate, track

log = logging.getLogger(__name__)

CONNECTION = "dipsen"
FINISHED = "finished"
COMPLETED = "finished:completed"


def app_dir() -> Path:
    """The project folder whose pyproject.toml declares dipsen's Flower app."""
    root = Path(__file__).resolve().parents[4]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app.components]" not in pyproject.read_text():
        raise DipsenError(
            "the Flower engine runs dipsen from its source folder (pip install -e .); "
            f"{pyproject} does not declare the Flower app"
        )
    return root


LOOPBACK = "127.0.0.1"

# in a launched ServerApp's environment: the PID of the launcher that holds the run folder's lock for it
LOCK_HOLDER = "DIPSEN_RUN_LOCK_HOLDER"

# Ray binds its servers (GCS, raylets, workers) to the node's IP, on Linux the address of the
# default route; told that no cluster will be formed, it takes loopback instead.
RAY_ON_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

START_ATTEMPTS = 3  # starts of one process, each on a new port, before a taken port fails the run
START_SECONDS = 120.0  # how long a SuperLink or SuperNode may take to listen on its port

_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port that was free just now and that this process has never handed out before.

    The kernel may give a closed socket's port to the next ``bind(0)``, so two calls can return the
    same port; every port handed out is therefore kept for the process's lifetime. Another program
    can still take it before it is bound: :class:`Federation` then restarts on another port.
    """
    while True:
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port


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


def private_folder(folder: Path) -> Path:
    """``folder``, created if need be, readable by its owner only."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # mkdir's mode is masked by the umask, and an existing folder keeps its own
    return folder


def write_private(path: Path, data: bytes) -> None:
    """Write a secret to ``path`` created 0600: writing first and chmod-ing after leaves it world-readable for a moment."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # O_CREAT's mode applies only to a new file
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def generate_certificates(folder: Path, valid_for: datetime.timedelta = datetime.timedelta(days=2)) -> Certificates:
    """Write a throw-away CA and a loopback server certificate, valid for ``valid_for`` from now, to ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = private_folder(folder)
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("dipsen test CA", ca_key, "dipsen test CA", ca_key, ca=True)
    server_cert = certificate("localhost", server_key, "dipsen test CA", ca_key, ca=False)
    paths = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_private(
        paths.server_key,
        server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return paths


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair (OpenSSH format): the SuperLink enrols the public half."""

    private: Path
    public: Path


def generate_node_key(folder: Path, name: str) -> NodeKey:
    """Write a fresh P-384 key pair ``name`` / ``name.pub`` to ``folder``; the private key is owner-only."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = private_folder(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    paths = NodeKey(folder / name, folder / f"{name}.pub")
    write_private(
        paths.private,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    paths.public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return paths


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds a socket listening on TCP ``port`` (not just anyone)."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                sockets.add(f"socket:[{fields[9]}]")
    if not sockets:
        return False
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor) in sockets:
                return True
        except OSError:
            continue
    return False


class _Watchdog:
    """The launcher's end of a watchdog process (:mod:`.watchdog`), which stops what it is told of once this process is gone."""

    def __init__(self) -> None:
        # Popen opens stdin's write end non-inheritable and closes every other descriptor in the
        # children it starts: no process but this one holds it, so it closes when this one ends
        self.proc = subprocess.Popen(
            [sys.executable, "-I", watchdog.__file__, str(os.getsid(0))],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # out of reach of whatever stops this process's session or process group
        )
        self._pipe: IO[str] = self.proc.stdin  # type: ignore[assignment]  # set: stdin=PIPE

    def tell(self, line: str) -> None:
        try:
            self._pipe.write(f"{line}\n")
            self._pipe.flush()
        except BrokenPipeError:  # it died: Federation._check stops the run
            pass

    def close(self) -> None:
        """End its input as this process's death would, and wait while it stops what is left."""
        try:
            self._pipe.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log.warning("the watchdog process %d is still stopping processes; it goes on alone", self.proc.pid)


@dataclass
class _Service:
    """A process that listens on a port of its own; ``command`` builds its command line for a port."""

    name: str
    command: Callable[[int], list[str]]
    env: dict[str, str]
    port: int
    proc: subprocess.Popen
    attempts: int = 1
    listening: bool = False


class Federation:
    """A SuperLink with TLS on loopback, plus whatever SuperNodes are started on it.

    With ``node_auth`` the SuperLink accepts only SuperNodes enrolled by :meth:`enroll_supernode`,
    each proving on every request that it holds the private key of its enrolled public key.

    Use as a context manager: leaving it stops every process it started, with everything they
    spawned; a watchdog process does so should this process die first, and then removes
    ``folder`` if it is ``scratch``. With ``holds_lock`` this process holds the lock of the run
    folder the ServerApps train in, and tells them so (:data:`LOCK_HOLDER`).

    Logs go to files in ``folder``. Once ``stop`` (a :class:`StopFlag`, set by a signal
    handler) is set, every wait raises :class:`~dipsen.federated.workers.Interrupted` within a
    fraction of a second, and leaving the context stops the processes.
    """

    def __init__(
        self,
        folder: Path,
        *,
        simulation: bool,
        certificates: Certificates,
        node_auth: bool = False,
        stop: StopFlag | None = None,
        scratch: bool = False,
        holds_lock: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.home = self.folder / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.simulation, self.certificates, self.node_auth = simulation, certificates, node_auth
        self.stop_flag = stop or StopFlag()
        # RAY_ADDRESS would make the simulation join that Ray cluster instead of starting its own on loopback
        inherited = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env = {
            **inherited,
            **(RAY_ON_LOOPBACK if simulation else {}),
            # the SuperLink starts flower-superexec by name: from this Python's environment, even when
            # dipsen runs as .venv/bin/dipsen from a shell where that venv is not activated
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [inherited.get("PATH")])]),
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            **({LOCK_HOLDER: str(os.getpid())} if holds_lock else {}),
        }
        self.port, self.address = 0, ""  # the SuperLink's, once it listens
        self._services: list[_Service] = []
        # every session a process of this federation runs in: those of the processes started here
        # (each leads its own) and those that their descendants opened (flower-superexec's)
        self._sessions: set[int] = set()
        self.stopped_pids: list[int] = []  # every process stop() signalled
        self._watchdog = _Watchdog()  # before any process it is to guard
        if scratch:
            self._watchdog.tell(f"folder {self.folder.resolve()}")

    def __enter__(self) -> Federation:
        try:
            self._start_superlink()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._watchdog.close()

    def _tls_args(self, *, server: bool) -> list[str]:
        c = self.certificates
        if server:
            return ["--ssl-ca-certfile", str(c.ca), "--ssl-certfile", str(c.server_cert), "--ssl-keyfile", str(c.server_key)]
        return ["--root-certificates", str(c.ca)]

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        output = open(self.folder / f"{name}.log", "wb")
        try:
            proc = subprocess.Popen(
                args, stdout=output, stderr=subprocess.STDOUT, env={**self.env, **env}, start_new_session=True
            )  # a session of its own, so it can be stopped whole
        finally:
            output.close()
        self._sessions.add(proc.pid)
        self._watchdog.tell(f"session {proc.pid}")
        return proc

    def _start(self, name: str, command: Callable[[int], list[str]], env: dict[str, str] | None = None) -> _Service:
        port = free_port()
        service = _Service(name, command, env or {}, port, self._spawn(name, command(port), env or {}))
        self._services.append(service)
        return service

    def _restart(self, service: _Service) -> None:
        """Start ``service`` again on another port if its port was taken; raise for any other exit."""
        tail = self.log_tail(service.name)
        if "address already in use" not in tail.lower() or service.attempts >= START_ATTEMPTS:
            raise DipsenError(
                f"{service.command(service.port)[0]} ({service.name}) exited "
                f"({service.proc.returncode}) after {service.attempts} start(s): {tail}"
            )
        log.warning(
            "%s: port %d was taken before it could bind it; starting it again on another port", service.name, service.port
        )
        service.port, service.attempts = free_port(), service.attempts + 1
        service.proc = self._spawn(service.name, service.command(service.port), service.env)

    def _await_listening(self, services: list[_Service], timeout: float) -> None:
        """Wait until every one of ``services`` listens on its port, restarting those whose port was taken."""
        deadline = time.monotonic() + timeout
        while waiting := [s for s in services if not s.listening]:
            for service in waiting:
                # its own socket, not merely an open port: another program may hold the one handed out
                if _listens(service.proc.pid, service.port):
                    service.listening = True
                elif service.proc.poll() is not None:
                    self._restart(service)
            self._track()
            if any(not s.listening for s in services):
                if time.monotonic() > deadline:
                    names = ", ".join(f"{s.name} (port {s.port})" for s in services if not s.listening)
                    raise DipsenError(f"not listening after {timeout:g} s: {names}")
                self._check()
                self._sleep(0.2)

    def _start_superlink(self) -> None:
        def command(port: int) -> list[str]:
            args = [
                _tool("flower-superlink"),
                *self._tls_args(server=True),
                "--host",  # Flower's default too; said here so that no default can widen it
                LOOPBACK,
                "--port",
                str(port),
                "--database",
                ":flwr-in-memory:",
                "--disable-runtime-dependency-installation",
            ]
            return args + (["--simulation"] if self.simulation else []) + (["--enable-supernode-auth"] if self.node_auth else [])

        superlink = self._start("superlink", command)
        self._await_listening([superlink], START_SECONDS)
        self.port, self.address = superlink.port, f"{LOOPBACK}:{superlink.port}"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.certificates.ca.resolve()}"\n'
        )

    def enroll_supernode(self, public_key: Path) -> int:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``); returns its node ID.

        Only a SuperNode holding the matching private key can then connect as that node, and under
        ``node_auth`` no other can connect at all.
        """
        reply = json.loads(self._flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json"))
        if not reply.get("success"):
            raise DipsenError(f"flwr supernode register failed: {reply}")
        return int(reply["node-id"])

    def start_supernode(self, name: str, node_config: str, env: dict[str, str] | None = None, key: Path | None = None) -> None:
        """A SuperNode connected to this SuperLink, with ``node_config`` (e.g. ``partition-file="..."``).

        ``key`` is its private key, whose public half was enrolled (:meth:`enroll_supernode`). It
        starts in the background: :meth:`await_supernodes` waits until every SuperNode listens.
        """
        auth = ["--auth-supernode-private-key", str(key)] if key is not None else []
        self._start(
            name,
            lambda port: [
                _tool("flower-supernode"),
                *self._tls_args(server=False),
                *auth,
                "--superlink",
                self.address,
                "--host",  # its API for the ClientApp processes: loopback, as Flower's default
                LOOPBACK,
                "--port",
                str(port),
                "--node-config",
                node_config,
            ],
            env,
        )

    def await_supernodes(self, timeout: float = START_SECONDS) -> None:
        """Wait until every SuperNode listens on its port; one whose port was taken starts again on another."""
        self._await_listening([s for s in self._services if s.name != "superlink"], timeout)

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
        args = [
            "run",
            str(app or app_dir()),
            CONNECTION,
            "--format",
            "json",
            "--run-config",
            " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items()),
        ]
        if federation_config:
            args += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
        reply = json.loads(self._flwr(*args, timeout=120))
        if not reply.get("success"):
            raise DipsenError(f"flwr run failed: {reply}")
        self._check()  # a stop asked for while flwr run ran
        return int(reply["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status as ``flwr ls --format json`` reports it, e.g. ``running``, ``finished:completed``."""
        runs = json.loads(self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"))["runs"]
        return runs[0]["status"] if runs else "unknown"

    def wait(
        self,
        run_id: int,
        timeout: float,
        *,
        run: RunDir | None = None,
        on_poll: Callable[[], None] | None = None,
        poll_seconds: float = 2.0,
        status_seconds: float = 30.0,
    ) -> str:
        """Wait until the run finishes and return its status; raises if it has not within ``timeout`` seconds.

        Every ``poll_seconds`` it calls ``on_poll`` (which follows progress in the run folder) and
        looks at the processes. Flower itself is asked (``flwr ls``: a Python start, about a second
        of CPU) only every ``status_seconds``, when a process of the federation has ended (a
        ServerApp that finished or failed), and every poll once ``run``'s final_metrics.json has
        been written, the ServerApp's last act.
        """
        deadline = time.monotonic() + timeout
        final = run.path / "final_metrics.json" if run is not None else None
        written_before = _mtime(final)  # a resumed run that had finished has one from before
        members = self._track()
        next_status, status = time.monotonic() + status_seconds, None
        checks_due = 0  # status checks owed to a process that ended
        while True:
            alive = self._track()
            if members - alive:
                checks_due = 2  # now, and once more should Flower record the end a moment later
            members = alive
            if checks_due or time.monotonic() >= next_status or _mtime(final) != written_before:
                checks_due = max(0, checks_due - 1)
                status = self.status(run_id)
                if status.startswith(FINISHED):
                    return status
                next_status = time.monotonic() + status_seconds
            if time.monotonic() > deadline:
                raise DipsenError(
                    f"Flower run {run_id} did not finish within {timeout:g} s (last status: {status or 'not asked yet'})"
                )
            if on_poll:
                on_poll()
            self._check()
            self._sleep(poll_seconds)

    def run_log(self, run_id: int) -> str:
        return self._flwr("log", str(run_id), CONNECTION, "--show", timeout=60)

    def _check(self) -> None:
        """Raise if a stop was asked for, or the SuperLink or the watchdog has exited."""
        self.stop_flag.check()
        if self._watchdog.proc.poll() is not None:  # nothing would stop the processes should this one die
            raise DipsenError(f"the watchdog process {self._watchdog.proc.pid} exited ({self._watchdog.proc.returncode})")
        for service in self._services:
            if service.name == "superlink" and service.listening and service.proc.poll() is not None:
                raise DipsenError(f"flower-superlink exited ({service.proc.returncode}): {self.log_tail('superlink')}")

    def _sleep(self, seconds: float) -> None:
        """Sleep, but raise within a fifth of a second once a stop is asked for."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.stop_flag.check()
            time.sleep(min(0.2, left))
        self.stop_flag.check()

    def _track(self) -> set[int]:
        """The live processes of this federation (see :func:`.watchdog.track`); tells the watchdog each new session."""
        known = set(self._sessions)
        members = track(self._sessions, os.getsid(0))
        for session in sorted(self._sessions - known):
            self._watchdog.tell(f"session {session}")
        return members

    def stop(self, grace_seconds: float = 15.0) -> None:
        """Stop every process of the federation: SIGTERM, then SIGKILL after ``grace_seconds``."""
        signalled = terminate(self._track, grace_seconds, reap=self._reap)
        for service in self._services:
            try:
                service.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self.stopped_pids += sorted(signalled)
        self._services.clear()

    def _reap(self) -> None:
        """Collect our children's exit statuses, so that they do not linger as zombies."""
        for service in self._services:
            service.proc.poll()


def _mtime(path: Path | None) -> float | None:
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except FileNotFoundError:
        return None


SCRATCH_PREFIX = "dipsen-flower-"
OWNER_FILE = "owner"  # in a scratch folder: the PID of the launcher it belongs to


@contextmanager
def _scratch_folder() -> Iterator[Path]:
    """A new owner-only temporary folder that names this process as its owner; removed on leaving.

    Should this process die, its Federation's watchdog removes it. One left behind all the same
    (its launcher killed before the watchdog started, or both killed) is removed by the next
    launch once its owner is dead.
    """
    for stale in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        try:
            owner = int((stale / OWNER_FILE).read_text())
        except (OSError, ValueError):  # another user's, one being made, or one this code did not make
            continue
        if not process_alive(owner):
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
    try:
        (folder / OWNER_FILE).write_text(f"{os.getpid()}\n")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the watchdog may have been first


def simulate(
    run: RunDir,
    *,
    resume: bool = False,
    timeout: float = 7 * 24 * 3600,
    on_poll: Callable[[], None] | None = None,
    stop: StopFlag | None = None,
) -> dict:
    """Train ``run`` (a run folder with its config.json) on a Flower simulation; returns the final metrics.

    A SuperLink with the simulation runtime runs K virtual SuperNodes on Ray, ``workers`` of them
    at a time, each on one CPU thread as the in-process engine's workers; on CUDA (the run's
    ``device``) each ClientApp also holds one whole GPU, so at most one trains per GPU (untested on
    a GPU). It serves TLS with a throw-away certificate valid for ``timeout`` plus a day, and it
    and Ray listen on loopback only. Flower's log of the run is saved as ``flower.log`` in the run folder. Once ``stop`` is
    set (by a signal handler) every process is stopped and
    :class:`~dipsen.federated.workers.Interrupted` raised. The run folder's lock is held throughout.
    """
    config = run.config()
    with run.lock(), _scratch_folder() as folder:  # the lock first: a second launch starts and writes nothing
        certificates = generate_certificates(folder / "certificates", _certificate_validity(timeout))
        with Federation(
            folder, simulation=True, certificates=certificates, stop=stop, scratch=True, holds_lock=True
        ) as federation:
            run_id = federation.submit(
                {"run-dir": str(run.path.resolve()), "resume": resume},
                federation_config={
                    "num-supernodes": config.clients,
                    "client-resources-num-cpus": 1,
                    "init-args-num-cpus": config.workers,
                    **_gpu_resources(config.device),
                },
            )
            _wait_for_completion(federation, run_id, run, timeout, on_poll)
    return run.read_json("final_metrics.json")


def _gpu_resources(device: str) -> dict[str, float | int]:
    """The simulation's GPU settings for the run's ``device``: none on the CPU; on CUDA one GPU per ClientApp of all
    the GPUs torch sees (Ray then gives each ClientApp its own GPU as its only visible one)."""
    if resolve_device(device).type != "cuda":
        return {}
    return {"client-resources-num-gpus": 1.0, "init-args-num-gpus": torch.cuda.device_count()}


@dataclass(frozen=True)
class Deployment:
    """How a deployed run went: its final Flower status, its final metrics, the PIDs it stopped."""

    status: str
    metrics: dict
    pids: list[int]


# the certificates outlive the run's timeout by this much: export, start-up and shut-down come on top
CERTIFICATE_MARGIN = datetime.timedelta(days=1)


def _certificate_validity(timeout: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=timeout) + CERTIFICATE_MARGIN


def deploy_on_loopback(run: RunDir, folder: Path, *, timeout: float = 3600.0, stop: StopFlag | None = None) -> Deployment:
    """Train ``run`` on a real Flower deployment on this machine: one SuperLink, K authenticated SuperNodes, TLS.

    Each client's rows are exported to a file of their own, and each SuperNode (a separate process)
    is told only its own file. Each SuperNode gets a key pair of its own whose public half is
    enrolled with the SuperLink for its client before it starts (``--enable-supernode-auth``); the
    ServerApp then accepts a node only for the client it was enrolled for. Certificates are
    self-signed, made for this run, and valid for ``timeout`` plus a day. Logs, partition files,
    keys, the enrolment and certificates stay in ``folder``. Every process is stopped on return,
    also on error or once ``stop`` is set. The run folder's lock is held throughout.
    """
    from .task import PARTITION_FILE, export_partitions, partition_file_name, write_enrolment

    config = run.config()
    folder = Path(folder)
    with run.lock():  # first: a second launch starts and writes nothing
        partitions = export_partitions(config, config.load_dataset(), folder / "partitions")
        certificates = generate_certificates(folder / "certificates", valid_for=_certificate_validity(timeout))
        keys = [generate_node_key(folder / "node-keys", Path(partition_file_name(c)).stem) for c in range(len(partitions))]
        with Federation(
            folder, simulation=False, certificates=certificates, node_auth=True, stop=stop, holds_lock=True
        ) as federation:
            enrolment = write_enrolment(
                folder / "enrolled_nodes.json", {federation.enroll_supernode(key.public): c for c, key in enumerate(keys)}
            )
            for client, path in enumerate(partitions):
                # many SuperNodes share this machine's cores: one thread each, as the in-process workers
                federation.start_supernode(
                    f"supernode-{client}",
                    f'{PARTITION_FILE}="{path.resolve()}"',
                    env={"OMP_NUM_THREADS": "1"},
                    key=keys[client].private,
                )
            federation.await_supernodes()
            run_id = federation.submit(
                {"run-dir": str(run.path.resolve()), "resume": False, "enrolled-nodes": str(enrolment.resolve())}
            )
            status = _wait_for_completion(federation, run_id, run, timeout)
    return Deployment(status, run.read_json("final_metrics.json"), federation.stopped_pids)


def _wait_for_completion(federation: Federation, run_id: int, run: RunDir, timeout: float, on_poll=None) -> str:
    """Wait for ``run_id``, save its log as flower.log, and raise unless it completed."""
    try:
        status = federation.wait(run_id, timeout, run=run, on_poll=on_poll)
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
