"""Where client updates run: in this process, or on a pool of single-threaded worker processes.

The training data reach the workers once, as shared-memory tensors. Per-round traffic (global
weights, client indices, updated weights) travels as numpy arrays, i.e. plain pickles: torch would
share every tensor through a file-descriptor handshake, which costs a round trip per tensor and,
when Ctrl-C stops the pool mid-handshake, leaves a traceback from multiprocessing's sharer thread.

On a 2-core CPU the CNN's forward+backward is fastest as two single-threaded processes (each core
runs its own client) rather than one two-threaded process: measured 3,230 against 2,706
samples/s at batch 32 (``benchmarks/train_throughput.py``). Both layouts run the same
:func:`client_update`.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.multiprocessing as tmp

from ..models import build_model
from .client import ClientUpdate, LocalTraining, StateDict, client_update

_WORKER: dict = {}


class ClientTask(NamedTuple):
    """One client's share of a round: its id, its training rows and the seed of its update."""

    client: int
    indices: np.ndarray
    seed: int


@dataclasses.dataclass(frozen=True)
class ClientFailure:
    """A client that delivered no update this round, and why."""

    reason: str


def _init_worker(model_args: tuple, x: torch.Tensor, y: torch.Tensor, training: LocalTraining) -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    _WORKER.update(model=build_model(*model_args), x=x, y=y, training=training)


def _numpy_state(state: StateDict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in state.items()}


def _torch_state(state: dict[str, np.ndarray]) -> StateDict:
    return {k: torch.from_numpy(v) for k, v in state.items()}


def _run_clients(task: tuple[dict[str, np.ndarray], list[tuple[np.ndarray, int]]]) -> list[ClientUpdate]:
    state, clients = task
    w = _WORKER
    updates = [
        client_update(w["model"], _torch_state(state), w["x"][i], w["y"][i], w["training"], seed)
        for i, seed in clients
    ]
    return [dataclasses.replace(u, state=_numpy_state(u.state)) for u in updates]


class ClientRunner:
    """Runs a round's client updates; ``workers`` > 1 uses that many single-threaded processes.

    Results are returned in task order, so FedAvg sums them in the same order whatever the layout.
    A round's clients go to the workers in ``CHUNKS_PER_WORKER`` chunks each: few enough that the
    global weights are sent a few times per round rather than once per client, enough to balance
    clients of unequal size.
    """

    CHUNKS_PER_WORKER = 2

    def __init__(self, model_args: tuple, x: torch.Tensor, y: torch.Tensor, training: LocalTraining,
                 workers: int = 1) -> None:
        self.x, self.y, self.training = x, y, training
        self._pool = None
        self.workers = workers
        if workers > 1:
            x.share_memory_()
            y.share_memory_()
            ctx = tmp.get_context("spawn")  # fork after OpenMP has started is unsafe
            self._pool = ctx.Pool(workers, initializer=_init_worker, initargs=(model_args, x, y, training))
        else:
            self._model = build_model(*model_args)

    def run(self, state: StateDict, tasks: Sequence[ClientTask]) -> list[ClientUpdate]:
        """One update per task, all starting from ``state``."""
        if self._pool is None:
            return [client_update(self._model, state, self.x[t.indices], self.y[t.indices], self.training, t.seed)
                    for t in tasks]
        chunks = max(1, min(len(tasks), self.workers * self.CHUNKS_PER_WORKER))
        bounds = [round(j * len(tasks) / chunks) for j in range(chunks + 1)]
        shared = _numpy_state(state)
        work = [(shared, [(t.indices, t.seed) for t in tasks[a:b]]) for a, b in zip(bounds, bounds[1:])]
        chunks = self._pool.map(_run_clients, work, chunksize=1)
        return [dataclasses.replace(u, state=_torch_state(u.state)) for chunk in chunks for u in chunk]

    def close(self, abort: bool = False) -> None:
        """Stop the workers: let them finish, or with ``abort`` (after an error or Ctrl-C) kill them."""
        if self._pool is not None:
            if abort:
                self._pool.terminate()
            else:
                self._pool.close()
            self._pool.join()
            self._pool = None
