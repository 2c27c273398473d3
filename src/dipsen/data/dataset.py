"""The ``Dataset`` container every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class WindowOrigins:
    """Where each test example of a data set of flow windows (CTU-13) comes from.

    ``flows``: (N_test, rows) int64, the id of the flow in each row of each test window, -1 for a
    padding row. Ids number every flow the loader read (samples and context flows alike) in
    (file, StartTime) order, so windows that hold the same flow hold the same id, and the id of the
    bottom row orders the windows of a file in time. ``file``: (N_test,) int64, the index in
    ``info["source"]["files"]`` of the file each window comes from.
    """

    flows: np.ndarray
    file: np.ndarray

    def time_blocks(self, blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """Test rows of the even and of the odd time blocks, each sorted.

        Each file's windows, in the time order of their bottom flow, are cut into ``blocks``
        contiguous blocks of (nearly) equal size, numbered from 0.
        """
        order = np.lexsort((self.flows[:, -1], self.file))
        file = self.file[order]
        starts = np.r_[0, np.flatnonzero(file[1:] != file[:-1]) + 1]
        sizes = np.diff(np.r_[starts, len(order)])
        block = (np.arange(len(order)) - np.repeat(starts, sizes)) * blocks // np.repeat(sizes, sizes)
        return np.sort(order[block % 2 == 0]), np.sort(order[block % 2 == 1])

    def shares_flows(self, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
        """For each of ``rows``, whether its window holds a flow that one of the windows ``others`` holds."""
        seen = self.flows[others]
        return np.asarray(np.isin(self.flows[rows], seen[seen >= 0]).any(axis=1))


# eq=False: the generated __eq__/__hash__ would compare or hash numpy arrays, which raises.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split ready for a CNN.

    Guaranteed on construction: ``x_*`` are float32 of shape (N, 1, H, W) with values in [0, 1],
    ``y_*`` are int64 of shape (N,) with labels in ``range(len(classes))``, train and test share H and W,
    and ``info`` describes where the data came from and how it was split (JSON-serialisable).
    ``test_origins`` (windowed data only, else None) says which flows each test example holds.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    info: dict
    test_origins: WindowOrigins | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != np.float32 or x.ndim != 4 or x.shape[1] != 1:
                raise ValueError(f"{self.name}: x_{split} must be float32 (N, 1, H, W), not {x.dtype}{x.shape}")
            if y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: y_{split} must be int64 ({len(x)},), not {y.dtype} {y.shape}")
            if x.size and (x.min() < 0.0 or x.max() > 1.0):
                raise ValueError(f"{self.name}: x_{split} has values outside [0, 1]")
            if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
                raise ValueError(f"{self.name}: y_{split} has labels outside 0..{len(self.classes) - 1}")
        if self.x_train.shape[2:] != self.x_test.shape[2:]:
            raise ValueError(f"{self.name}: train and test images differ in size")
        origins = self.test_origins
        if origins is not None and (
            origins.flows.shape != (len(self.y_test), self.x_test.shape[2]) or origins.file.shape != (len(self.y_test),)
        ):
            raise ValueError(f"{self.name}: test_origins must have one row of flow ids per test window row")
