"""Where client updates run: in this process, or on single-threaded worker processes.

The training data reach the workers once, as shared-memory tensors. Per-round traffic (global
weights, client indices, updated weights) travels as numpy arrays, i.e. plain pickles: torch would
share every tensor through a file-descriptor handshake, which costs a round trip per tensor.

Every client update runs on one torch thread, in a worker or in this process, so the weights are
bit-identical whatever the worker count, core count or ``OMP_NUM_THREADS`` (a resumed run may run
under another). On a 2-core CPU the CNN's forward+backward is also fastest as two single-threaded
processes (each core runs its own client) rather than one two-threaded process: measured 3,230
against 2,706 samples/s at batch 32 (``benchmarks/train_throughput.py``).

Each worker has a pipe of its own; the main process waits on the pipes and on the workers'
process sentinels together, so a worker that dies (SIGKILL, the OOM killer) fails the round at
once with :class:`WorkerDied` instead of leaving it waiting for a result that never comes. The
wait wakes every ``POLL_SECONDS`` to look at the :class:`StopFlag`, which a signal handler sets:
the run then stops in this module's own code, never inside a library's.

A worker that is alive but stuck (SIGSTOP, a hang) is what ``round_timeout`` is for: once a
round has waited that long, every client not yet answered gets a :class:`ClientFailure` (the whole
chunk of a worker still busy, the chunks not yet started), and each worker still busy is killed
and replaced by a fresh one, so later rounds have their full pool. A worker's start-up (importing
torch: seconds on a busy machine) is waited for before a round's clock starts, for at most
``START_SECONDS``. Chunks are sent from a thread of their own, because a worker that
has stopped reading would block a large send, and with it the deadline. With one worker the
updates run in this process: there is nothing to wait for, and no deadline.

On CUDA (``device``) each worker trains on one GPU, the workers taking the GPUs in turn
(:func:`~dipsen.device.worker_device`; a replaced worker keeps its predecessor's), and the default
worker count is one per GPU (:func:`~dipsen.device.training_processes`). The training rows stay in
shared host memory; each worker moves its mini-batches to its GPU. Untested on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import connection, resource_tracker, util
from multiprocessing.process import BaseProcess
from typing import NamedTuple

import numpy as np
import torch
import torch.multiprocessing as tmp

from ..device import CPU, worker_device
from ..models import build_model
from .client import ClientUpdate, LocalTraining, StateDict, client_update
from .poisoning import DataPoison

# Sent to the whole process group by a terminal (Ctrl-C, hang-up) or by a service manager: they
# are the main process's to handle, and it stops the workers.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
POLL_SECONDS = 0.1  # how often a waiting main process looks at the stop flag
CLOSE_SECONDS = 10.0  # how long close() lets idle workers exit before it kills them
START_SECONDS = 120.0  # how long a new worker may take to start (import torch, build its model)


class ClientTask(NamedTuple):
    """One client's share of a round: its id, its training rows and the seed of its update.

    ``poison``: a simulated malicious client (:mod:`dipsen.federated.poisoning`) that trains on its
    rows changed as :class:`~dipsen.federated.poisoning.DataPoison` says (labels flipped, a backdoor
    trigger stamped); the runner changes them, not ``client_update``.
    ``lr``: the round's learning rate (:func:`dipsen.federated.schedule.round_lr`); None: the
    runner's ``LocalTraining.lr``.
    """

    client: int
    indices: np.ndarray
    seed: int
    poison: DataPoison | None = None
    lr: float | None = None


def _rows(
    x: torch.Tensor, y: torch.Tensor, indices: np.ndarray, poison: DataPoison | None, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a client trains on: its rows of (x, y), poisoned for a malicious client (seeded by its round seed)."""
    if poison is None:
        return x[indices], y[indices]
    return poison.apply(x[indices], y[indices], num_classes, seed)


def _training(training: LocalTraining, poison: DataPoison | None, lr: float | None) -> LocalTraining:
    """A client's local training at the round's rate: a backdoor's own epochs on its poisoned rows."""
    training = training.at_rate(lr)
    return training if poison is None else poison.training(training)


@dataclasses.dataclass(frozen=True)
class ClientFailure:
    """A client that delivered no update this round, and why."""

    reason: str


class Interrupted(Exception):
    """A stop signal arrived; raised between client chunks or rounds."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class WorkerDied(Exception):
    """A worker process ended while the runner still needed it (or, with ``why``, never started)."""

    def __init__(self, pid: int | None, exitcode: int | None, why: str | None = None) -> None:
        how = f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
        super().__init__(f"client worker process {pid} {why or f'died ({how})'}")


class StopFlag:
    """Set by a signal handler, acted on by :meth:`check` at points where stopping is safe.

    A KeyboardInterrupt raised wherever the main thread happens to be can land in a library's
    cleanup or a finaliser; checking a flag between client chunks and between rounds cannot.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int) -> None:
        if self.signum is None:  # the first signal names the stop
            self.signum = signum

    def check(self) -> None:
        """Raise :class:`Interrupted` if a stop was requested."""
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextmanager
def _single_thread() -> Iterator[None]:
    """torch on one thread inside, as in a worker; the previous thread count (evaluation's) after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _numpy_state(state: StateDict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in state.items()}


def _torch_state(state: dict[str, np.ndarray]) -> StateDict:
    return {k: torch.from_numpy(v) for k, v in state.items()}


def _serve(
    conn: connection.Connection,
    device: torch.device,
    model_args: tuple,
    x: torch.Tensor,
    y: torch.Tensor,
    training: LocalTraining,
) -> None:
    """A worker: run each chunk of clients it receives on ``device`` and send back their updates, until EOF."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # blocked by the parent since the spawn, so that one sent to the group during start-up cannot
    # kill this worker; ignored now, so the pending ones are dropped
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    torch.set_num_threads(1)
    model = build_model(*model_args).to(device)
    num_classes = model_args[2]  # build_model's (name, input_shape, num_classes, ...)
    conn.send(None)  # started: see ClientRunner._await_start
    while True:
        try:
            state, clients = conn.recv()
        except EOFError:  # the main process closed the pipe (close()) or is gone
            return
        updates = [
            client_update(
                model, _torch_state(state), *_rows(x, y, i, poison, num_classes, seed), _training(training, poison, lr), seed
            )
            for i, seed, poison, lr in clients
        ]
        try:
            # weights as numpy arrays, beside the update's other fields (see the module docstring)
            conn.send([(_numpy_state(u.state), dataclasses.replace(u, state={})) for u in updates])
        except OSError:  # the main process is gone
            return


def _send(conn: connection.Connection, message: object) -> None:
    try:
        conn.send(message)
    except OSError:  # the worker is gone: its sentinel tells the runner
        pass


@dataclasses.dataclass
class _Worker:
    process: BaseProcess
    conn: connection.Connection
    device: torch.device  # where it trains
    started: bool = False  # it has sent its start message (see _serve)
    sending: threading.Thread | None = None

    def send(self, message: object) -> None:
        """Send ``message`` from a thread (see the module docstring): a stuck worker cannot block the caller."""
        if self.sending is not None:
            self.sending.join()  # done: the worker answered the previous message, so it read all of it
        self.sending = threading.Thread(target=_send, args=(self.conn, message), daemon=True)
        self.sending.start()

    def close(self) -> None:
        """Close this end of the pipe: an idle worker sees EOF and exits."""
        if self.sending is not None and self.sending.is_alive():
            self.process.kill()  # a send blocked on a stuck worker ends only with the worker
            self.sending.join()  # before the close: the thread must not write to a reused descriptor
        self.conn.close()

    def died(self) -> WorkerDied:
        self.process.join(1.0)  # collect the exit status of a worker whose pipe broke
        return WorkerDied(self.process.pid, self.process.exitcode)


def _stop_workers(workers: list[_Worker], abort: bool) -> None:
    for w in workers:
        if abort:
            w.process.kill()
        w.close()
    for w in workers:
        w.process.join(CLOSE_SECONDS)
        if w.process.exitcode is None:
            w.process.kill()
            w.process.join()


class ClientRunner:
    """Runs a round's client updates on ``device``; ``workers`` > 1 uses that many single-threaded processes.

    Results are returned in task order, so FedAvg sums them in the same order whatever the layout.
    A round's clients go to the workers in ``CHUNKS_PER_WORKER`` chunks each: few enough that the
    global weights are sent a few times per round rather than once per client, enough to balance
    clients of unequal size. ``stop`` is checked between client updates (one process) or while
    waiting for the workers; a set flag raises :class:`Interrupted`. ``round_timeout``: seconds a
    round waits for the workers before the clients still pending fail (see the module docstring).
    """

    CHUNKS_PER_WORKER = 2

    def __init__(
        self,
        model_args: tuple,
        x: torch.Tensor,
        y: torch.Tensor,
        training: LocalTraining,
        workers: int = 1,
        stop: StopFlag | None = None,
        round_timeout: float = math.inf,
        device: torch.device = CPU,
    ) -> None:
        self.x, self.y, self.training = x, y, training
        self.num_classes = model_args[2]  # build_model's (name, input_shape, num_classes, ...): for DataPoison
        self.stop = stop or StopFlag()
        self.round_timeout = round_timeout
        self._workers: list[_Worker] = []
        if workers == 1:
            self._model = build_model(*model_args).to(device)
            return
        x.share_memory_()
        y.share_memory_()
        self._context = tmp.get_context("spawn")  # fork after OpenMP has started is unsafe
        self._serve_args = (model_args, x, y, training)
        # The first spawn would start multiprocessing's resource tracker, which unblocks SIGINT and
        # SIGTERM when it is started: see _spawn
        resource_tracker.ensure_running()
        self._workers.extend(self._spawn(worker_device(device, k)) for k in range(workers))
        # so that neither garbage collection nor interpreter exit leaves workers running: at exit
        # this kills them before multiprocessing's own handler joins them (its SIGTERM they ignore)
        self._finalizer = util.Finalize(self, _stop_workers, args=(self._workers, True), exitpriority=10)

    def _spawn(self, device: torch.device) -> _Worker:
        """Start a worker process training on ``device``; it inherits the stop signals blocked (see _serve)."""
        ours, theirs = self._context.Pipe()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process = self._context.Process(target=_serve, args=(theirs, device, *self._serve_args), daemon=True)
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        theirs.close()  # only the worker holds its end: its death shows as EOF here
        return _Worker(process, ours, device)

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` (busy past the deadline) and start a fresh one in its place."""
        worker.process.kill()  # SIGKILL ends a stopped process too
        worker.close()
        worker.process.join()
        # in place: the finalizer holds this list
        self._workers[self._workers.index(worker)] = self._spawn(worker.device)

    def run(self, state: StateDict, tasks: Sequence[ClientTask]) -> list[ClientUpdate | ClientFailure]:
        """One update per task, all starting from ``state``; a ClientFailure for each client past ``round_timeout``.

        Raises :class:`Interrupted` once ``stop`` is set, :class:`WorkerDied` if a worker ends.
        """
        self.stop.check()
        if not self._workers:
            updates: list[ClientUpdate | ClientFailure] = []
            with _single_thread():
                for t in tasks:
                    rows = _rows(self.x, self.y, t.indices, t.poison, self.num_classes, t.seed)
                    training = _training(self.training, t.poison, t.lr)
                    updates.append(client_update(self._model, state, *rows, training, t.seed))
                    self.stop.check()
            return updates
        try:
            return self._run_on_workers(state, tasks)
        except WorkerDied:
            self.stop.check()  # a stop signal that reached a worker too is what happened
            raise

    def _run_on_workers(self, state: StateDict, tasks: Sequence[ClientTask]) -> list[ClientUpdate | ClientFailure]:
        count = max(1, min(len(tasks), len(self._workers) * self.CHUNKS_PER_WORKER))
        bounds = [round(j * len(tasks) / count) for j in range(count + 1)]
        shared = _numpy_state(state)
        chunks = [
            (shared, [(t.indices, t.seed, t.poison, t.lr) for t in tasks[a:b]]) for a, b in zip(bounds, bounds[1:], strict=False)
        ]
        late = ClientFailure(f"no update within {self.round_timeout:g} s (round_timeout)")
        results: list[list[ClientUpdate | ClientFailure]] = [[late] * len(chunk[1]) for chunk in chunks]
        queue, idle = deque(range(len(chunks))), list(self._workers)
        busy: dict[connection.Connection, tuple[_Worker, int]] = {}
        sentinels = {w.process.sentinel: w for w in self._workers}
        self._await_start()
        deadline = time.monotonic() + self.round_timeout
        while queue or busy:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            while queue and idle:
                worker, j = idle.pop(), queue.popleft()
                worker.send(chunks[j])
                busy[worker.conn] = (worker, j)
            ready = connection.wait([*busy, *sentinels], timeout=min(POLL_SECONDS, left))
            self.stop.check()  # at least every POLL_SECONDS, also while the workers compute
            for conn in ready:
                if conn in busy:
                    worker, j = busy.pop(conn)
                    try:
                        results[j] = [dataclasses.replace(update, state=_torch_state(arrays)) for arrays, update in conn.recv()]
                    except (EOFError, OSError):
                        raise worker.died() from None
                    idle.append(worker)
            for sentinel in ready:
                if sentinel in sentinels:
                    raise sentinels[sentinel].died()
        for worker, _ in busy.values():  # past the deadline: their chunks stay failed
            self._replace(worker)
        return [outcome for chunk in results for outcome in chunk]

    def _await_start(self) -> None:
        """Wait until every worker has started (imported torch, built its model), outside any round's deadline.

        A new worker can take seconds to start on a busy machine: counted in a round, it would eat
        the round's deadline. One not started within ``START_SECONDS`` is killed: :class:`WorkerDied`.
        """
        starting = {w.conn: w for w in self._workers if not w.started}
        sentinels = {w.process.sentinel: w for w in starting.values()}
        deadline = time.monotonic() + START_SECONDS
        while starting:
            left = deadline - time.monotonic()
            if left <= 0:
                late = next(iter(starting.values()))
                late.process.kill()
                raise WorkerDied(late.process.pid, None, f"did not start within {START_SECONDS:g} s")
            ready = connection.wait([*starting, *sentinels], timeout=min(POLL_SECONDS, left))
            self.stop.check()
            for conn in ready:
                if conn in starting:
                    worker = starting.pop(conn)
                    try:
                        conn.recv()
                    except (EOFError, OSError):
                        raise worker.died() from None
                    worker.started = True
            for sentinel in ready:
                if sentinel in sentinels:  # ended before, or right after, it started
                    raise sentinels[sentinel].died()

    def close(self, abort: bool = False) -> None:
        """Stop the workers: let them exit, or with ``abort`` (after an error or a stop) kill them."""
        if self._workers:
            self._finalizer.cancel()
            _stop_workers(self._workers, abort)
            self._workers = []
