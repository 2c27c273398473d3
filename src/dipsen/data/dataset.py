"""The ``Dataset`` container every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# eq=False: the generated __eq__/__hash__ would compare or hash numpy arrays, which raises.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split ready for a CNN.

    Guaranteed on construction: ``x_*`` are float32 of shape (N, 1, H, W) with values in [0, 1],
    ``y_*`` are int64 of shape (N,) with labels in ``range(len(classes))``, train and test share H and W,
    and ``info`` describes where the data came from and how it was split (JSON-serialisable).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    info: dict

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
