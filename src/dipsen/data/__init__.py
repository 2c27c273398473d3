"""Datasets for the pipeline: MNIST, SOCOFing fingerprints and CTU-13 botnet flows.

Each loader reads the ORIGINAL files of its dataset (or, for SOCOFing, a cache this package
derived from them) and returns a :class:`Dataset` of 1-channel images in [0, 1]. With
``data_dir=None`` the defaults embedded in the package are used (``embedded/<name>/``, each with
a PROVENANCE.md); ``data_dir`` points a loader at a user's own full download instead.
"""

from __future__ import annotations

from pathlib import Path

from dipsen.data.dataset import Dataset, WindowOrigins
from dipsen.errors import ConfigError, DataError

DATASETS: tuple[str, ...] = ("mnist", "socofing", "ctu13")
BAD_ROWS_MODES = ("error", "skip")
CTU13_SPLITS = ("time", "host", "scenario")  # see dipsen.data.ctu13
SOCOFING_TASKS = ("hand-finger", "gender", "hand", "finger")  # see dipsen.data.socofing.TASKS

__all__ = ["CTU13_SPLITS", "DATASETS", "SOCOFING_TASKS", "Dataset", "WindowOrigins", "load_dataset"]


def load_dataset(
    name: str,
    data_dir: Path | None = None,
    *,
    seed: int = 0,
    include_background: bool = False,
    bad_rows: str = "error",
    ctu13_split: str = "time",
    socofing_task: str = "hand-finger",
) -> Dataset:
    """Load dataset ``name`` (one of ``DATASETS``) as a train/test :class:`Dataset`.

    ``seed`` affects the SOCOFing subject split and CTU-13's host and scenario splits;
    ``include_background``, ``bad_rows`` ("error" or "skip") and ``ctu13_split`` (one of
    ``CTU13_SPLITS``, see :mod:`dipsen.data.ctu13`) only affect CTU-13. The result is deterministic
    for given arguments and files. ``socofing_task`` (one of ``SOCOFING_TASKS``, see
    :mod:`dipsen.data.socofing`) is the label SOCOFing predicts. Raises DataError (message names the file)
    for any problem with the data, ConfigError for a bad ``bad_rows``, ``ctu13_split`` or ``socofing_task``.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if bad_rows not in BAD_ROWS_MODES:
        raise ConfigError(f"bad_rows must be one of {', '.join(BAD_ROWS_MODES)}, got {bad_rows!r}")
    if ctu13_split not in CTU13_SPLITS:
        raise ConfigError(f"ctu13_split must be one of {', '.join(CTU13_SPLITS)}, got {ctu13_split!r}")
    if socofing_task not in SOCOFING_TASKS:
        raise ConfigError(f"socofing_task must be one of {', '.join(SOCOFING_TASKS)}, got {socofing_task!r}")
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.exists():
            raise DataError(f"{data_dir}: no such file or folder")
    # Imported here so that loading one dataset does not import the others' dependencies.
    if name == "mnist":
        from dipsen.data.mnist import load_mnist

        return load_mnist(data_dir)
    if name == "socofing":
        from dipsen.data.socofing import load_socofing

        return load_socofing(data_dir, seed=seed, task=socofing_task)
    from dipsen.data.ctu13 import load_ctu13

    return load_ctu13(data_dir, include_background=include_background, bad_rows=bad_rows, split=ctu13_split, seed=seed)
