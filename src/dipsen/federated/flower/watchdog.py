"""Finding and stopping the processes of a Flower federation; the watchdog that does so once its launcher is gone.

A :class:`~dipsen.federated.flower.launch.Federation` starts this file as a script (``python -I``,
standard library only, so it starts in a blink and imports nothing of the project) in a session of
its own, which it keeps however the launcher ends. The launcher holds the only write end of the
watchdog's stdin: a pipe it opened non-inheritable, so no other process it starts keeps it open.
Over it the launcher tells the watchdog, line by line, each ``session N`` its processes run in and
the ``folder PATH`` of scratch files (keys included) to remove. End of file means the launcher is
gone, whether it closed the pipe after its own stop or died by any means, ``kill -9`` and the OOM
killer included: the watchdog then stops every process of those sessions and of the sessions their
members opened (SIGTERM, SIGKILL after :data:`GRACE_SECONDS`), removes the folders and exits.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

GRACE_SECONDS = 5.0  # how long the watchdog lets processes stop on SIGTERM before SIGKILL


def processes() -> dict[int, tuple[int, int]]:
    """Every live process on this machine: PID -> (parent PID, session ID); zombies left out."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:  # the process ended while being read
            continue
        if fields[0] != "Z":
            found[int(stat.parent.name)] = (int(fields[1]), int(fields[3]))
    return found


def process_alive(pid: int) -> bool:
    """Whether ``pid`` still runs; a zombie (exited, waiting to be reaped by its parent) does not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def track(sessions: set[int], never: int) -> set[int]:
    """The live processes of ``sessions``; adds to ``sessions`` those that their members opened, never ``never``.

    A process that opens a session of its own (flower-superexec does) is found through its parent
    while that lives; from then on its session is known, so it and what it spawns are found even
    after the parent has died and they were re-parented. ``never`` is the caller's own session.
    """
    found = processes()
    while True:
        members = {pid for pid, (_, session) in found.items() if session in sessions}
        known = sessions | {never}
        opened = {session for pid, (parent, session) in found.items() if parent in members and session not in known}
        if not opened:
            return members
        sessions |= opened


def terminate(members: Callable[[], set[int]], grace_seconds: float, reap: Callable[[], None] = lambda: None) -> set[int]:
    """Stop every process ``members()`` finds: SIGTERM, then SIGKILL after ``grace_seconds``; returns those signalled.

    Processes that appear meanwhile (started during shutdown) get their SIGTERM too. ``reap`` waits
    for the caller's own children, so that they do not linger as zombies.
    """
    signalled: set[int] = set()
    deadline = time.monotonic() + grace_seconds
    while alive := members():
        fresh = sorted(alive - signalled)
        signal_pids(fresh, signal.SIGTERM)
        signalled.update(fresh)
        if time.monotonic() > deadline:
            signal_pids(sorted(alive), signal.SIGKILL)
            break
        reap()
        time.sleep(0.1)
    kill_deadline = time.monotonic() + 10
    while members() and time.monotonic() < kill_deadline:  # SIGKILL is not instant either
        reap()
        time.sleep(0.1)
    return signalled


def main() -> None:
    """Guard what stdin names until it ends, then stop it all (see the module docstring); argv: the launcher's session."""
    never = int(sys.argv[1])
    sessions: set[int] = set()
    folders: list[str] = []
    for line in sys.stdin:  # until end of file: the launcher closed the pipe or died
        kind, _, value = line.rstrip("\n").partition(" ")
        if kind == "session":
            sessions.add(int(value))
        elif kind == "folder":
            folders.append(value)
    terminate(lambda: track(sessions, never), GRACE_SECONDS)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
