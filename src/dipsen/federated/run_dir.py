"""The run folder: config, partition summary, per-round metrics, recent checkpoints, final metrics.

Layout::

    RUN/config.json          resolved TrainConfig (what --resume reads back), validation_size included
    RUN/run_info.json        dataset description and counts, samples used (train, validation slice, test),
                             the round slice of the test set, noise calibration (S_f, L, epsilon, delta, sigma)
    RUN/partition.json       samples and classes per client
    RUN/metrics.jsonl        one JSON line per finished round (test accuracy on eval_rows test rows: the round
                             slice, or the whole test set in the run's last round; with a target, validation accuracy)
    RUN/checkpoints/round_0000.pt ...   global model after a round (0 = initialisation); which are kept: below
    RUN/best_robust.pt       with adversarial training or --target-robust-accuracy: the global model of
                             the round with the highest robust_accuracy (round, robust_accuracy, model_state)
    RUN/final_metrics.json   metrics of the final global model; its presence marks the run finished. After a
                             collapse (robust_collapse) the final model is best_robust.pt's, and its
                             ``collapse`` says so (round, best_round, best, at, drop, model)
    RUN/.lock                held by the process training the run, or launching it on Flower (see RunDir.lock); names its PID

Checkpoints hold CPU tensors (the engines save host copies of the weights, see :mod:`dipsen.device`)
and are read back onto the CPU, so a run trained on a GPU loads on a machine without one.

Every file is written to a temporary name and renamed into place, so a run killed at any moment
leaves only complete files; a round counts as finished once its checkpoint exists. A write that
fails (a full disk, a read-only folder) removes its temporary file and raises a one-line
:class:`~dipsen.errors.DipsenError` naming the run, the round or file, and how to resume.

Which checkpoints are kept: ``keep_checkpoints`` in config.json (``--keep-checkpoints``), counted
from the newest round saved, t:

- ``last-N``: rounds t-N+1 .. t; ``last`` is ``last-1``. The default, ``last-6``, keeps what a run
  folder is read for: round t (``--resume``, the deployed model of every attack) and round t-5,
  the stale model of the orange-box attack at its default ``--stale-rounds 5``
  (:func:`dipsen.attack.threat.stale_round`), the ``stale_rounds`` of ``dipsen reproduce`` too;
  six checkpoints (about 10 MB for the paper's models) however long the run.
- ``every-N``: the rounds that are multiples of N (round 0 too), and t.
- ``all``: every round.

With the collapse guard on (``robust_collapse``), the rule also keeps what it would keep had the
run ended at the best-robust round b (``best_robust.pt``'s): a collapsed run's final model is b's
(see :mod:`dipsen.federated.engine`), and the orange-box attack needs b's stale round. So up to
twice the rule's checkpoints.

:meth:`RunDir.save_checkpoint` prunes, right after the new checkpoint is in place, so the rule
holds for every engine (the Flower ServerApp saves through it too). It never deletes round t, and
deletes older ones only once round t's file and its name are on disk: a run killed at any moment
keeps its newest checkpoint and resumes from it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import io
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import TrainConfig, parse_keep_checkpoints
from ..errors import ConfigError, DipsenError
from .client import StateDict

_CHECKPOINT = re.compile(r"^round_(\d{4,})\.pt$")
BEST_ROBUST = "best_robust.pt"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill signal leaves no partial file behind
        raise


def _fsync_folder(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _kept(round_: int, newest: int, keep_checkpoints: str) -> bool:
    """Whether the checkpoint of ``round_`` stays once ``newest`` is saved (see the module docstring)."""
    rule, n = parse_keep_checkpoints(keep_checkpoints)
    if rule == "all" or round_ >= newest:
        return True
    return round_ > newest - n if rule == "last" else round_ % n == 0


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    @classmethod
    def create(cls, out: Path, config: TrainConfig, name: str | None = None) -> RunDir:
        """A new run folder ``out/name``; by default ``name`` is dataset, model and time, made unique.

        A given ``name`` is for callers that find their runs again (``dipsen reproduce --resume``):
        a folder there without config.json, left by a kill before config.json was written, holds
        nothing and is taken over; one with config.json is refused.
        """
        if name is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            base = Path(out) / f"{config.dataset}-{config.model}-{stamp}"
            path, n = base, 1
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{n}")
        else:
            path = Path(out) / name
            if (path / "config.json").exists():
                raise DipsenError(f"{path} already holds a run")
        run = cls(path)
        try:
            run.checkpoints.mkdir(parents=True, exist_ok=name is not None)
        except OSError as exc:
            raise run._write_error(exc, "the run folder") from None
        run.write_json("config.json", config.to_dict())
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        run = cls(path)
        if not (run.path / "config.json").is_file():
            raise DipsenError(f"{path}: not a dipsen run folder (no config.json)")
        return run

    @contextmanager
    def lock(self, held_by: int | None = None) -> Iterator[None]:
        """Hold the run folder's lock (``RUN/.lock``) inside; DipsenError if another process holds it.

        One writer at a time: a ``--resume`` beside a run that is still training (an orphaned Flower
        ServerApp, say) would interleave two runs' rounds in one folder. It is an ``flock``, so it
        ends with its holder however that ends, and a killed run leaves no stale lock behind.

        With ``held_by``, that process holds the lock on this one's behalf (a Flower launcher, for
        the ServerApp it started in a process of Flower's): the lock is not taken but must be held
        by it, else DipsenError.
        """
        path = self.path / ".lock"
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                holder = None
            except BlockingIOError:
                holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
            if held_by is not None:
                if holder != str(held_by):
                    raise DipsenError(f"{self.path}: process {held_by}, which started this one, does not hold {path}")
                yield
                return
            if holder is not None:
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise DipsenError(f"{self.path} is in use by {who} (it holds {path}); stop it or wait for it to finish")
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(descriptor, 0)  # no PID left behind to name a process that has let go
        finally:
            os.close(descriptor)  # releases the flock

    def config(self) -> TrainConfig:
        file = self.path / "config.json"
        try:
            values = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise DipsenError(f"{file}: corrupt config: {exc}") from None
        if not isinstance(values, dict):
            raise DipsenError(f"{file}: corrupt config: not a JSON object")
        # a run saved before the robust monitor could be chosen was watched by PGD-10: it keeps it on --resume
        if "robust_monitor" not in values:
            values.update(robust_monitor="pgd", robust_monitor_steps=10)
        # one saved before the round slice evaluated every round on the whole test set: it goes on doing so
        values.setdefault("round_eval_size", 0)
        try:
            return TrainConfig.from_dict(values, source=str(file)).validate()
        except ConfigError as exc:
            if exc.key is None:
                raise
            raise ConfigError(f"{file}: {exc}", exc.key) from None

    def reconfigure(
        self,
        rounds: int | None = None,
        keep_checkpoints: str | None = None,
        round_timeout: float | None = None,
        device: str | None = None,
    ) -> TrainConfig:
        """The run's config with a new round limit, checkpoint rule, deadline and/or device, saved to config.json (``--resume``).

        None of them changes the weights of any round, so a run extended from t to N rounds ends with
        exactly the weights of a run of N rounds from the start; every other option would. ``rounds``
        may not be fewer than the rounds finished, and may not change at all in a run whose client-DP
        noise was calibrated to a target epsilon over its rounds (``client_dp_epsilon``) or whose
        learning rate is scheduled over them (``lr_schedule``). When it
        changes, final_metrics.json (the run under its former limit) is deleted before config.json is
        rewritten, so a kill in between leaves an unfinished run rather than one whose final metrics
        belie its config; training writes the new one. A new checkpoint rule prunes at once.
        ``round_timeout`` only decides when a stuck worker's clients count as failed: a run stopped
        by a deadline too short for its rounds goes on with a longer one. ``device`` is where the
        rounds still to come train (a run begun on a GPU goes on where there is none); CPU and GPU
        arithmetic differ in the last bits, so the weights equal an uninterrupted run's only on the same device.
        """
        config = self.config()
        updated = dataclasses.replace(
            config,
            rounds=config.rounds if rounds is None else rounds,
            keep_checkpoints=config.keep_checkpoints if keep_checkpoints is None else keep_checkpoints,
            round_timeout=config.round_timeout if round_timeout is None else round_timeout,
            device=config.device if device is None else device,
        ).validate()
        if updated == config:
            return config
        if config.client_dp_epsilon is not None and updated.rounds != config.rounds:
            raise DipsenError(
                f"{self.path}: its client-DP noise was calibrated to epsilon {config.client_dp_epsilon} over "
                f"{config.rounds} rounds; --rounds {updated.rounds} would change the noise of every round (start a new run)"
            )
        if config.lr_schedule != "constant" and updated.rounds != config.rounds:
            raise DipsenError(
                f"{self.path}: its {config.lr_schedule} learning rate is scheduled over {config.rounds} rounds; "
                f"--rounds {updated.rounds} would change the rate of every round (start a new run)"
            )
        last = self.last_round()
        if last is not None and updated.rounds < last:
            raise DipsenError(f"{self.path} has finished {last} rounds: --rounds {updated.rounds} cannot undo them")
        with self.lock():
            if updated.rounds != config.rounds:
                (self.path / "final_metrics.json").unlink(missing_ok=True)
            self.write_json("config.json", updated.to_dict())
            if last is not None:
                self._prune(last)
        return updated

    def finished(self) -> bool:
        """Whether training has finished: final_metrics.json is its last write (and goes when ``reconfigure`` extends it)."""
        return (self.path / "final_metrics.json").is_file()

    def write_json(self, name: str, obj) -> None:
        self._write(self.path / name, (json.dumps(obj, indent=2) + "\n").encode(), name)

    def _write(self, path: Path, data: bytes, what: str) -> None:
        """Write ``data`` to ``path`` atomically; an OSError becomes :meth:`_write_error`'s DipsenError."""
        try:
            _atomic_write_bytes(path, data)
        except OSError as exc:
            raise self._write_error(exc, what) from None

    def _write_error(self, exc: OSError, what: str) -> DipsenError:
        """One line for a failed write of ``what``: the run, why, and how to go on."""
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        message = f"{self.path}: {reason[:1].lower()}{reason[1:]} while writing {what}"
        if (self.path / "config.json").is_file():  # without it (RunDir.create failed) there is no run to resume
            fix = "free space and resume" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "resume"
            message += f"; {fix} with: dipsen train --resume {self.path}"
        return DipsenError(message)

    def read_json(self, name: str):
        return json.loads((self.path / name).read_text())

    def checkpoint_path(self, round_: int) -> Path:
        return self.checkpoints / f"round_{round_:04d}.pt"

    def save_checkpoint(self, round_: int, state: StateDict) -> None:
        """Save the global model after ``round_``, then delete the checkpoints the run's rule lets go."""
        buffer = io.BytesIO()
        torch.save({"round": round_, "model_state": state}, buffer)
        path = self.checkpoint_path(round_)
        self._write(path, buffer.getvalue(), f"round {round_} ({path.relative_to(self.path)})")
        self._prune(round_)

    def _prune(self, newest: int) -> None:
        """Delete the checkpoints that ``keep_checkpoints`` does not keep once ``newest`` is saved.

        The rule is read from config.json at every save, so it is the run's own whatever process
        saves (a Flower ServerApp) and follows a ``reconfigure``. ``newest`` itself always stays,
        and the folder is synced first, so the newest checkpoint's rename is on disk before any
        older file goes, even across a power cut.
        """
        config = self.config()
        rule = config.keep_checkpoints
        # the collapse guard may make the best-robust round the final model's: its rounds stay as the newest's do
        best = self._best_robust_round() if config.robust_collapse is not None else None
        doomed = [
            r
            for r in self.finished_rounds()
            if not _kept(r, newest, rule) and not (best is not None and r <= best and _kept(r, best, rule))
        ]
        if doomed:
            _fsync_folder(self.checkpoints)
            for round_ in doomed:
                self.checkpoint_path(round_).unlink(missing_ok=True)

    def save_best_robust(self, round_: int, robust_accuracy: float, state: StateDict) -> None:
        """Save ``state`` as ``RUN/best_robust.pt``, the global model with the best robust accuracy (atomic)."""
        buffer = io.BytesIO()
        torch.save({"round": round_, "robust_accuracy": robust_accuracy, "model_state": state}, buffer)
        self._write(self.path / BEST_ROBUST, buffer.getvalue(), f"round {round_} ({BEST_ROBUST})")

    def _best_robust_round(self) -> int | None:
        """The round ``best_robust.pt`` holds, read without loading its weights (memory-mapped); None without one."""
        path = self.path / BEST_ROBUST
        if not path.is_file():
            return None
        try:
            return int(torch.load(path, weights_only=True, mmap=True, map_location="cpu")["round"])
        except Exception as exc:  # torch raises several types for damaged files
            raise DipsenError(f"{path}: unreadable: {exc}") from None

    def best_robust(self) -> dict | None:
        """``RUN/best_robust.pt`` as saved (round, robust_accuracy, model_state); None if there is none."""
        path = self.path / BEST_ROBUST
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # torch raises several types for damaged files
            raise DipsenError(f"{path}: unreadable: {exc}") from None

    def load_checkpoint(self, round_: int) -> StateDict:
        path = self.checkpoint_path(round_)
        try:
            return torch.load(path, weights_only=True, map_location="cpu")["model_state"]
        except FileNotFoundError:
            raise DipsenError(f"{path}: checkpoint not found") from None
        except Exception as exc:  # torch raises several types for damaged files
            raise DipsenError(f"{path}: unreadable checkpoint: {exc}") from None

    def finished_rounds(self) -> list[int]:
        """The rounds whose checkpoints are on disk (those ``keep_checkpoints`` keeps), the last finished one last."""
        return sorted(int(m.group(1)) for p in self.checkpoints.glob("round_*.pt") if (m := _CHECKPOINT.match(p.name)))

    def last_round(self) -> int | None:
        rounds = self.finished_rounds()
        return rounds[-1] if rounds else None

    def metrics(self) -> list[dict]:
        file = self.path / "metrics.jsonl"
        if not file.exists():
            return []
        records = []
        for line in file.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: everything after it is unfinished
        return records

    def keep_metrics_through(self, round_: int) -> list[dict]:
        """Drop metric lines of rounds after ``round_`` (written before a kill, checkpoint missing)."""
        kept = [r for r in self.metrics() if r["round"] <= round_]
        self._write(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode(), "metrics.jsonl")
        return kept

    def append_metrics(self, record: dict) -> None:
        """Append ``record`` (a round's) to metrics.jsonl; a line cut short by a failed write is dropped on resume."""
        try:
            with open(self.path / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise self._write_error(exc, f"round {record['round']} (metrics.jsonl)") from None
