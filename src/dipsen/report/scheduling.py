"""Where a study's independent units run: here, one after another, or as Ray tasks on this machine or a cluster.

``dipsen reproduce``, ``poison-study`` and ``sweep-sigma`` split their work into units that share
nothing but the output folder: a model's training then its study and certificate (reproduce), one
grid run (poison-study), one sweep point's training then its measurements (sweep-sigma). A unit
first reads its run folder (``RunDir.finished()``, a measurement's saved file) and does only what is
missing, so a finished unit does nothing and an interrupted one resumes, wherever it runs. The
report is then assembled in the calling process from the saved files alone, the same way whichever
way the units ran, so the figures are those of the serial run.

``address`` (the commands' ``--ray-address``) picks where the units run:

- None: in this process, in order, each with its own per-round and per-attack progress bars;
- ``local``: a Ray started here for the command (``ray.init()``), one task per unit;
- ``auto`` or ``HOST:PORT``: the Ray cluster there (``ray start --head``, then ``ray start --address
  HOST:PORT`` on each other node; ``auto``: the one ``ray start`` started on this machine, or
  ``RAY_ADDRESS``).

A task asks Ray for the CPUs its unit keeps busy (:attr:`Unit.cpus`) and runs torch on that many
threads. Its files go to the output folder, so on a cluster that folder must be on storage every
node sees at the same path, and every node needs the same dipsen (and data sets) installed. Progress
comes back per finished unit only: a task's per-round and per-attack bars would be drawn in another
process, perhaps on another machine.
"""

from __future__ import annotations

import logging
import socket
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import ConfigError, DipsenError

LOCAL, AUTO = "local", "auto"
CONNECT_SECONDS = 10.0
"""How long HOST:PORT may take to accept a connection: Ray itself would retry a dead address for minutes."""


@dataclass(frozen=True)
class Unit:
    """One independent piece of a study: ``work()`` writes its results into its run folder and returns nothing.

    ``cpus``: the CPUs it keeps busy (a training's client-worker processes), what its Ray task asks for
    and the torch threads it runs on there. ``gpus``: the GPUs it asks Ray for; 0 while every unit runs
    on the CPU (the hook for a device option: a unit on a GPU asks for one).
    """

    label: str
    work: Callable[[], None]
    cpus: int = 1
    gpus: float = 0.0


OnDone = Callable[[Unit], None]
RunUnits = Callable[[Sequence[Unit], OnDone | None], None]


def check_address(address: str) -> None:
    """Raise ConfigError unless ``address`` is ``local``, ``auto`` or HOST:PORT (a port in 1..65535)."""
    if address in (LOCAL, AUTO):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray-address must be local, auto or HOST:PORT, got {address!r}")


@contextmanager
def scheduler(address: str | None) -> Iterator[RunUnits]:
    """A ``run_units(units, on_done)`` that runs every unit here in order (``address`` None) or as Ray tasks.

    Connected to Ray (or a local Ray started) before the body runs, so a bad address fails before the
    study writes anything: ConfigError, one line. ``run_units`` returns once every unit has finished,
    calling ``on_done(unit)`` here as each one does, and raises the first unit's error (a DipsenError as
    itself); the units still running are cancelled then, leaving their run folders resumable. Ray is
    left (a local one stopped) after the body.
    """
    if address is None:
        yield _run_here
        return
    _connect(address)
    import ray

    try:
        yield _run_on_ray
    finally:
        ray.shutdown()


def _run_here(units: Sequence[Unit], on_done: OnDone | None = None) -> None:
    for unit in units:
        unit.work()
        if on_done:
            on_done(unit)


def _connect(address: str) -> None:
    check_address(address)
    if address not in (LOCAL, AUTO):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
        except OSError as exc:
            raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None
    import ray

    try:
        with warnings.catch_warnings():  # Ray's advice on its next version's GPU defaults: nothing a dipsen user can act on
            warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
            if address == LOCAL:  # without its dashboard: a process less on a small machine (`ray start --head` has one)
                ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise ConfigError(f"--ray-address {address}: {exc}") from None


def _run_task(unit: Unit) -> None:
    """A unit in its Ray task: on as many torch threads as it has CPUs."""
    import torch

    torch.set_num_threads(unit.cpus)
    unit.work()


def _run_on_ray(units: Sequence[Unit], on_done: OnDone | None = None) -> None:
    import ray

    task = ray.remote(_run_task)
    pending = {task.options(num_cpus=u.cpus, num_gpus=u.gpus, name=u.label).remote(u): u for u in units}
    try:
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(ready)
            try:
                ray.get(ready)
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, DipsenError):  # a user error is one line, as in the serial run
                    raise exc.cause from None
                raise
            if on_done:
                on_done(unit)
    finally:
        for ref in pending:  # after an error or an interrupt: nothing of this study runs on
            ray.cancel(ref, force=True)
