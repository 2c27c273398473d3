"""dipsen.report.scheduling: a study's units run here in order, or as Ray tasks at once, each on its CPUs."""

import json
import os
import socket
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import ray
import torch

from dipsen.errors import ConfigError, DipsenError
from dipsen.report.scheduling import Unit, check_address, scheduler

# the units' work is this module's functions: Ray's workers cannot import a test module, so they get them by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _record(folder: Path, label: str) -> None:
    (folder / label).write_text(json.dumps({"pid": os.getpid(), "threads": torch.get_num_threads()}))


def _meet(folder: Path, label: str, other: str) -> None:
    """Record this unit, then wait for ``other`` to have started: two units meeting this way ran at once."""
    _record(folder, label)
    deadline = time.monotonic() + 120
    while not (folder / other).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{other} did not run beside {label}")
        time.sleep(0.05)


def _fail(message: str) -> None:
    raise DipsenError(message)


def _read(folder: Path, label: str) -> dict:
    return json.loads((folder / label).read_text())


def test_without_an_address_the_units_run_here_in_order(tmp_path):
    events = []
    units = [Unit(label, partial(lambda label: events.append(("work", label)), label), cpus=2) for label in "ab"]
    with scheduler(None) as run_units:
        run_units(units, lambda unit: events.append(("done", unit.label)))
    assert events == [("work", "a"), ("done", "a"), ("work", "b"), ("done", "b")]
    with scheduler(None) as run_units, pytest.raises(DipsenError, match="^a unit's error$"):
        run_units([Unit("fails", partial(_fail, "a unit's error"))], None)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two units at once need two CPUs")
def test_on_a_local_ray_the_units_run_at_once_each_on_its_cpus_and_errors_come_back_as_they_are(tmp_path):
    done = []
    with scheduler("local") as run_units:
        meeting = [Unit("a", partial(_meet, tmp_path, "a", "b")), Unit("b", partial(_meet, tmp_path, "b", "a"))]
        run_units(meeting, lambda unit: done.append(unit.label))
        assert sorted(done) == ["a", "b"]  # each reported once, here, as it finished
        a, b = _read(tmp_path, "a"), _read(tmp_path, "b")
        assert len({a["pid"], b["pid"], os.getpid()}) == 3 and a["threads"] == b["threads"] == 1
        run_units([Unit("two", partial(_record, tmp_path, "two"), cpus=2)], None)
        assert _read(tmp_path, "two")["threads"] == 2
        with pytest.raises(DipsenError, match="^a unit's error$"):  # the unit's own error, not Ray's wrapper
            run_units([Unit("fails", partial(_fail, "a unit's error"))], None)
    assert not ray.is_initialized()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("address", ["cluster", "head:", ":6379", "head:port", "head:70000", ""])
def test_an_address_that_is_not_local_auto_or_host_port_is_refused(address):
    with pytest.raises(ConfigError, match=f"--ray-address must be local, auto or HOST:PORT, got '{address}'"):
        check_address(address)


def test_an_address_where_no_cluster_answers_is_refused_at_once():
    address = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"--ray-address {address}: no Ray cluster answers there"):
        with scheduler(address):
            pass
    assert time.monotonic() - start < 10 and not ray.is_initialized()
