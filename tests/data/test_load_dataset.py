"""Argument checks of the ``load_dataset`` entry point."""

from __future__ import annotations

import pytest

from dipsen.config import TrainConfig
from dipsen.data import DATASETS, load_dataset
from dipsen.errors import ConfigError, DataError


def test_dataset_names():
    assert DATASETS == ("mnist", "socofing", "ctu13")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="'cifar10'; valid names: mnist, socofing, ctu13"):
        load_dataset("cifar10")


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_bad_rows_mode_is_checked():
    with pytest.raises(ConfigError, match="bad_rows"):
        load_dataset("ctu13", bad_rows="ignore")


def test_ctu13_split_is_checked():
    with pytest.raises(ConfigError, match="ctu13_split must be one of time, host, scenario, got 'region'"):
        load_dataset("ctu13", ctu13_split="region")
    with pytest.raises(ConfigError, match="ctu13_split must be one of time, host, scenario, got 'region'"):
        TrainConfig(dataset="ctu13", ctu13_split="region").validate()
