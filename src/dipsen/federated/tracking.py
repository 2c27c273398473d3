"""Experiment tracking: a run's metrics as TensorBoard scalars, beside metrics.jsonl (``log_to``, ``--log-to``).

With ``log_to = "tensorboard"`` the run also writes TensorBoard event files into ``RUN/tensorboard/``:

- every numeric field of every metrics.jsonl row as the scalar ``round/<field>`` at step = its round
  (``round/test_accuracy``, ``round/train_loss``, ``round/validation_accuracy``, ``round/robust_accuracy``,
  ``round/lr``, ``round/client_dp_epsilon``, ``round/attack_success_rate``, ``round/train_seconds``, ...);
  a null (a round that ``eval_every`` skips, a figure the run does not measure) is left out;
- every numeric value of final_metrics.json as ``final/<key>`` at the step of the final round, nested
  keys joined by "/" (``final/accuracy``, ``final/macro/f1``, ``final/cost/mean_round_seconds``,
  ``final/client_dp/epsilon``); lists (``per_class``) stay in final_metrics.json only.

View them with ``tensorboard --logdir RUN/tensorboard`` (or a folder of runs). Both engines train through
:func:`dipsen.federated.engine.train`, whose round loop writes metrics.jsonl and, next to it, this log,
so a Flower run logs from its ServerApp's process like an in-process run. Each round is flushed at
once: a killed run's log holds what its metrics.jsonl holds.

Why TensorBoard rather than MLflow or W&B: the log is plain files in the run folder (copied, archived
and deleted with it), needs no server, account or network, and torch ships the writer
(``torch.utils.tensorboard``), so the ``tracking`` extra adds only the ``tensorboard`` package. MLflow
keeps runs in a store outside the run folder (a tracking server or ``mlruns/``) and brings dozens of
dependencies; W&B needs an account. Both can import a TensorBoard log (``wandb sync --sync-tensorboard``).

Resume: ``--resume`` goes on from the last checkpoint's round t and cuts metrics.jsonl back to it, so
the log opens with ``purge_step`` t, which tells TensorBoard to drop every event of step t or later
written before (rows of rounds after t that a kill left without a checkpoint, and the final metrics
of a run that had finished at t), and round t's row is written again: no step appears twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError

TRACKERS = ("tensorboard",)
FOLDER = "tensorboard"  # in the run folder


def require(log_to: str | None) -> None:
    """Nothing if ``log_to``'s package is installed (or ``log_to`` is None); else a ConfigError naming the extra."""
    if log_to is None:
        return
    try:
        import torch.utils.tensorboard  # noqa: F401  (it imports the tensorboard package)
    except ImportError:
        raise ConfigError(
            f"log_to {log_to} (--log-to) needs the tensorboard package, which is not installed: pip install 'dipsen[tracking]'",
            "log_to",
        ) from None


def scalars(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The numeric values of ``values`` by tag ``prefix/key``, nested dicts as ``prefix/key/inner``.

    None, strings, booleans and lists are left out: they are no scalars.
    """
    found: dict[str, float] = {}
    for key, value in values.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            found.update(scalars(value, tag))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found[tag] = float(value)
    return found


class Tracker:
    """A run's TensorBoard log (see the module docstring)."""

    def __init__(self, run_path: Path, purge_step: int | None) -> None:
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_path) / FOLDER), purge_step=purge_step)

    def log_round(self, record: Mapping[str, Any]) -> None:
        """One metrics.jsonl row, at step ``record["round"]``; written to disk at once."""
        step = record["round"]
        for tag, value in scalars({k: v for k, v in record.items() if k != "round"}, "round").items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_final(self, metrics: Mapping[str, Any]) -> None:
        """final_metrics.json, at the step of its final round (``metrics["rounds"]``)."""
        for tag, value in scalars(metrics, "final").items():
            self.writer.add_scalar(tag, value, metrics["rounds"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@contextmanager
def open_tracker(log_to: str | None, run_path: Path, resumed_at: int | None) -> Iterator[Tracker | None]:
    """The run's tracker inside (None without ``log_to``), closed on the way out.

    ``resumed_at``: the round a resumed run goes on from (None for a new run); the log drops what it
    holds from that round on (``purge_step``), and the caller logs that round's row again.
    """
    if log_to is None:
        yield None
        return
    tracker = Tracker(run_path, resumed_at)
    try:
        yield tracker
    finally:
        tracker.close()
