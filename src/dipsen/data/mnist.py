"""MNIST from the original IDX files (LeCun et al.), gzipped or not.

A folder is expected to hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally with a ``.gz`` suffix.
Compression is detected from the gzip magic bytes, not the name. The original train/test split is kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dipsen.data._io import describe_file, embedded_dir, read_bytes
from dipsen.data.dataset import Dataset
from dipsen.errors import DataError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
SIDE = 28
CLASSES = tuple(str(d) for d in range(10))
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx_images(path: Path) -> np.ndarray:
    """uint8 array (N, 28, 28) from an IDX3 image file; DataError naming the file if it is not one."""
    data = read_bytes(path)
    magic, (n, rows, cols) = _header(path, data, 3)
    if magic != IMAGES_MAGIC:
        raise DataError(f"{path}: wrong magic number {magic}, expected {IMAGES_MAGIC} for an IDX image file")
    if (rows, cols) != (SIDE, SIDE):
        raise DataError(f"{path}: images are {rows}x{cols}, expected {SIDE}x{SIDE}")
    pixels = _payload(path, data, 16, n * rows * cols, "pixel data")
    return pixels.reshape(n, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    """uint8 array (N,) of digits 0-9 from an IDX1 label file; DataError naming the file if it is not one."""
    data = read_bytes(path)
    magic, (n,) = _header(path, data, 1)
    if magic != LABELS_MAGIC:
        raise DataError(f"{path}: wrong magic number {magic}, expected {LABELS_MAGIC} for an IDX label file")
    labels = _payload(path, data, 8, n, "label data")
    if labels.size and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{path}: label {labels[bad]} at index {bad} is not a digit 0-9")
    return labels


def load_mnist(data_dir: Path | None = None) -> Dataset:
    """The 60,000/10,000 MNIST split as a Dataset of (N, 1, 28, 28) float32 images in [0, 1].

    ``data_dir=None`` reads the original files embedded in the package.
    """
    folder = embedded_dir("mnist") if data_dir is None else Path(data_dir)
    paths = {key: _find(folder, stem) for key, stem in FILES.items()}
    splits = {}
    for split in ("train", "test"):
        images = read_idx_images(paths[f"{split}_images"])
        labels = read_idx_labels(paths[f"{split}_labels"])
        if len(images) != len(labels):
            raise DataError(
                f"{paths[f'{split}_labels']}: {len(labels)} labels but {paths[f'{split}_images'].name} has {len(images)} images"
            )
        pixels = images[:, None].astype(np.float32)
        pixels /= 255  # in place: the training set is 188 MB as float32
        splits[split] = (pixels, labels.astype(np.int64))
    info = {
        "source": "embedded" if data_dir is None else str(folder),
        "files": {key: describe_file(path) for key, path in paths.items()},
        "split": "original MNIST train (60,000) / t10k test (10,000) files",
        "preprocessing": "uint8 pixels divided by 255; no normalisation, no augmentation",
        "counts": {split: len(y) for split, (_, y) in splits.items()},
        "label_histogram": {split: np.bincount(y, minlength=10).tolist() for split, (_, y) in splits.items()},
    }
    return Dataset("mnist", *splits["train"], *splits["test"], classes=CLASSES, info=info)


def _header(path: Path, data: bytes, ndims: int) -> tuple[int, tuple[int, ...]]:
    size = 4 * (1 + ndims)
    if len(data) < size:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than the {size}-byte IDX header")
    words = np.frombuffer(data, dtype=">u4", count=1 + ndims)
    return int(words[0]), tuple(int(w) for w in words[1:])


def _payload(path: Path, data: bytes, offset: int, expected: int, what: str) -> np.ndarray:
    found = len(data) - offset
    if found < expected:
        raise DataError(f"{path}: truncated: expected {expected} bytes of {what}, found {found}")
    if found > expected:
        raise DataError(f"{path}: {found - expected} unexpected bytes after the {expected} bytes of {what}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / stem}: file not found (also looked for {stem}.gz)")
