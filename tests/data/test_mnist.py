"""MNIST IDX reader: the embedded original files, and corrupted copies of them."""

from __future__ import annotations

import gzip
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from dipsen.data import load_dataset
from dipsen.data._io import embedded_dir
from dipsen.data.mnist import read_idx_images, read_idx_labels
from dipsen.errors import DataError

EMBEDDED = embedded_dir("mnist")
# Label histograms as published in embedded/mnist/PROVENANCE.md.
TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def naming(path: Path, text: str) -> str:
    """Regex for an error message that starts with the file's path followed by ``text``."""
    return re.escape(f"{path}{text}")


def idx_images(images: np.ndarray) -> bytes:
    return struct.pack(">IIII", 2051, len(images), 28, 28) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    return (
        read_idx_images(EMBEDDED / "t10k-images-idx3-ubyte.gz"),
        read_idx_labels(EMBEDDED / "t10k-labels-idx1-ubyte.gz"),
    )


def small_mnist_dir(folder: Path, split: tuple[np.ndarray, np.ndarray], n: int = 50) -> Path:
    """A plain (not gzipped) MNIST folder made of the first ``n`` real test images."""
    images, labels = split
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, (lo, hi) in {"train": (0, n), "t10k": (n, 2 * n)}.items():
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_images(images[lo:hi]))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_labels(labels[lo:hi]))
    return folder


def test_embedded_files_have_the_published_counts_and_histograms():
    ds = load_dataset("mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0
    assert np.bincount(ds.y_train).tolist() == TRAIN_HIST
    assert np.bincount(ds.y_test).tolist() == TEST_HIST
    assert ds.classes == tuple("0123456789")
    assert ds.info["counts"] == {"train": 60000, "test": 10000}


def test_plain_and_gzipped_files_give_the_same_arrays(tmp_path, test_split):
    plain = tmp_path / "t10k-images-idx3-ubyte"
    plain.write_bytes(gzip.decompress((EMBEDDED / "t10k-images-idx3-ubyte.gz").read_bytes()))
    np.testing.assert_array_equal(read_idx_images(plain), test_split[0])


def test_gzip_is_detected_by_content_not_name(tmp_path, test_split):
    # A gzipped file without .gz, and a plain one with .gz, are both read correctly.
    folder = small_mnist_dir(tmp_path / "m", test_split)
    swapped = folder / "train-images-idx3-ubyte"
    swapped.write_bytes(gzip.compress(swapped.read_bytes()))
    (folder / "t10k-labels-idx1-ubyte").rename(folder / "t10k-labels-idx1-ubyte.gz")
    ds = load_dataset("mnist", folder)
    np.testing.assert_array_equal(ds.x_train[:, 0], test_split[0][:50] / np.float32(255))
    np.testing.assert_array_equal(ds.y_test, test_split[1][50:100])


def test_wrong_magic_names_the_file(tmp_path, test_split):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">I", 2049) + idx_images(test_split[0][:3])[4:])
    with pytest.raises(DataError, match=naming(path, ": wrong magic number 2049")):
        read_idx_images(path)


def test_truncated_pixels_report_expected_and_found_bytes(tmp_path, test_split):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_images(test_split[0][:3])[:-10])
    message = ": truncated: expected 2352 bytes of pixel data, found 2342"  # 3 images of 784 bytes, 10 cut off
    with pytest.raises(DataError, match=naming(path, message)):
        read_idx_images(path)


def test_truncated_gzip_stream_names_the_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes((EMBEDDED / "t10k-labels-idx1-ubyte.gz").read_bytes()[:1000])
    with pytest.raises(DataError, match=naming(path, ": truncated gzip stream")):
        read_idx_labels(path)


def test_header_shorter_than_idx_header(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match=naming(path, ": truncated")):
        read_idx_labels(path)


def test_label_out_of_range_names_file_and_index(tmp_path, test_split):
    labels = test_split[1][:20].copy()
    labels[7] = 10
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx_labels(labels))
    with pytest.raises(DataError, match=naming(path, ": label 10 at index 7")):
        read_idx_labels(path)


def test_image_and_label_counts_must_agree(tmp_path, test_split):
    folder = small_mnist_dir(tmp_path / "m", test_split)
    labels = folder / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_labels(test_split[1][:49]))
    with pytest.raises(DataError, match=naming(labels, ": 49 labels but t10k-images-idx3-ubyte has 50 images")):
        load_dataset("mnist", folder)


def test_missing_file_is_named(tmp_path):
    shutil.copy(EMBEDDED / "train-labels-idx1-ubyte.gz", tmp_path)
    with pytest.raises(DataError, match=naming(tmp_path / "train-images-idx3-ubyte", ": file not found")):
        load_dataset("mnist", tmp_path)
