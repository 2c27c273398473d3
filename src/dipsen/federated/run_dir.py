"""The run folder: config, partition summary, per-round metrics, per-round checkpoints, final metrics.

Layout::

    RUN/config.json          resolved TrainConfig (what --resume reads back), validation_size included
    RUN/run_info.json        dataset description and counts, samples used (train, validation slice, test),
                             noise calibration (S_f, L, epsilon, delta, sigma)
    RUN/partition.json       samples and classes per client
    RUN/metrics.jsonl        one JSON line per finished round (test and, with a target, validation accuracy)
    RUN/checkpoints/round_0000.pt ...   global model after each round (0 = initialisation)
    RUN/final_metrics.json   metrics of the final global model
    RUN/.lock                held by the process training the run (see RunDir.lock); names its PID

Every file is written to a temporary name and renamed into place, so a run killed at any moment
leaves only complete files; a round counts as finished once its checkpoint exists.
"""

from __future__ import annotations

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

from ..config import TrainConfig
from ..errors import DipsenError
from .client import StateDict

_CHECKPOINT = re.compile(r"^round_(\d{4,})\.pt$")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    @classmethod
    def create(cls, out: Path, config: TrainConfig) -> RunDir:
        """A new, empty run folder under ``out`` named after dataset, model and time."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(out) / f"{config.dataset}-{config.model}-{stamp}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        run = cls(path)
        run.checkpoints.mkdir(parents=True)
        run.write_json("config.json", config.to_dict())
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        run = cls(path)
        if not (run.path / "config.json").is_file():
            raise DipsenError(f"{path}: not a dipsen run folder (no config.json)")
        return run

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run folder's lock (``RUN/.lock``) inside; DipsenError if another process holds it.

        One writer at a time: a ``--resume`` beside a run that is still training (an orphaned Flower
        ServerApp, say) would interleave two runs' rounds in one folder. It is an ``flock``, so it
        ends with its holder however that ends, and a killed run leaves no stale lock behind.
        """
        path = self.path / ".lock"
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise DipsenError(f"{self.path} is in use by {who} (it holds {path}); stop it or wait for it to finish") from None
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
            return TrainConfig.from_dict(json.loads(file.read_text()), source=str(file)).validate()
        except json.JSONDecodeError as exc:
            raise DipsenError(f"{file}: corrupt config: {exc}") from None

    def write_json(self, name: str, obj) -> None:
        _atomic_write_bytes(self.path / name, (json.dumps(obj, indent=2) + "\n").encode())

    def read_json(self, name: str):
        return json.loads((self.path / name).read_text())

    def checkpoint_path(self, round_: int) -> Path:
        return self.checkpoints / f"round_{round_:04d}.pt"

    def save_checkpoint(self, round_: int, state: StateDict) -> None:
        buffer = io.BytesIO()
        torch.save({"round": round_, "model_state": state}, buffer)
        _atomic_write_bytes(self.checkpoint_path(round_), buffer.getvalue())

    def load_checkpoint(self, round_: int) -> StateDict:
        path = self.checkpoint_path(round_)
        try:
            return torch.load(path, weights_only=True)["model_state"]
        except FileNotFoundError:
            raise DipsenError(f"{path}: checkpoint not found") from None
        except Exception as exc:  # torch raises several types for damaged files
            raise DipsenError(f"{path}: unreadable checkpoint: {exc}") from None

    def finished_rounds(self) -> list[int]:
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
        _atomic_write_bytes(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())
        return kept

    def append_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
