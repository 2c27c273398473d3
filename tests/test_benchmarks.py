"""Every script in benchmarks/ runs end to end with ``--smoke`` (tiny sizes; its figures are not checked).

Each runs as a user starts it, ``python benchmarks/NAME.py --smoke`` from the repository root, in a
subprocess with this environment (thread settings included). A new benchmark fails
``test_every_benchmark_is_smoke_tested`` until it is listed here, with its smoke mode.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TIMEOUT = 300  # seconds; a smoke run takes seconds, the rest is slack for a loaded machine
SCRIPTS = (
    "accuracy_table",
    "adv_train_cost",
    "aggregation_cost",
    "attack_throughput",
    "centralised_reference",
    "certify_throughput",
    "engine_compare",
    "eot_gradient_variance",
    "eot_throughput",
    "memory_format",
    "noise_sampling",
    "robust_monitor",
    "sensitivity_bound",
    "sigma_sweep",
    "socofing_input_size",
    "step_profile",
    "study_cascade",
    "train_throughput",
    "training_diagnostics",
)


def test_every_benchmark_is_smoke_tested():
    assert sorted(p.stem for p in BENCHMARKS.glob("*.py")) == sorted(SCRIPTS)


def tail(stream: str | bytes | None) -> str:
    """The last lines of a captured stream, for a failure message."""
    text = stream.decode(errors="replace") if isinstance(stream, bytes) else stream or ""
    return text[-3000:]


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_smoke(name):
    timeout = TIMEOUT
    try:
        done = subprocess.run(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), "--smoke"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{name} --smoke ran past {timeout} s; stderr ends:\n{tail(exc.stderr)}")
    assert done.returncode == 0, f"{name} --smoke exited with {done.returncode}; stderr ends:\n{tail(done.stderr)}"
    assert done.stdout.strip(), f"{name} --smoke printed nothing; stderr ends:\n{tail(done.stderr)}"
