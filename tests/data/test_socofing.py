"""SOCOFing: original BMP fixtures, archives, corrupted copies, the embedded cache and the subject split."""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dipsen.config import TrainConfig
from dipsen.data import SOCOFING_TASKS, load_dataset
from dipsen.data.socofing import (
    CACHE_NAME,
    CLASSES,
    EMBEDDED_CACHE,
    TASKS,
    build_socofing_cache,
    load_socofing,
    read_cache,
    read_originals,
)
from dipsen.data.socofing_split import split_by_subject
from dipsen.errors import ConfigError, DataError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "socofing"
BMP_NAMES = sorted(p.name for p in FIXTURES.glob("*.BMP"))


def naming(path: Path | str, text: str) -> str:
    """Regex for an error message that starts with the file's path followed by ``text``."""
    return re.escape(f"{path}{text}")


@pytest.fixture(scope="module")
def fixture_records() -> dict[str, np.ndarray]:
    return read_originals(FIXTURES)


@pytest.fixture(scope="module")
def embedded() -> dict[str, np.ndarray]:
    return read_cache(EMBEDDED_CACHE)[0]


def copy_fixtures(folder: Path, names: list[str] = BMP_NAMES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(FIXTURES / name, folder / name)
    return folder


def test_fixtures_parse_with_their_labels(fixture_records):
    r = fixture_records
    assert r["subject"].tolist() == [1, 53, 64, 203, 511, 590]
    assert [f"{h}_{f}" for h, f in zip(r["hand"], r["finger"], strict=True)] == [
        "Left_index",
        "Left_index",
        "Left_little",
        "Left_little",
        "Left_middle",
        "Right_little",
    ]
    assert set(r["gender"]) == {"M"} and set(r["variant"]) == {""}
    assert r["images"].shape == (6, 28, 28) and r["images"].dtype == np.uint8
    # The 241x298 RGB file is resized like the others, and it is a real picture, not a blank.
    assert r["images"][1].std() > 20
    assert r["sha256"][2] == r["sha256"][3] and r["sha256"][4] == r["sha256"][5]


def test_tar_gz_of_the_fixtures_reads_the_same(tmp_path, fixture_records):
    archive = tmp_path / "SOCOFing_Real.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in reversed(BMP_NAMES):  # archive order must not matter
            tar.add(FIXTURES / name, arcname=f"Real/{name}")
    records = read_originals(archive)
    assert records["source"].tolist() == [f"Real/{s}" for s in fixture_records["source"]]
    for field in ("images", "subject", "gender", "hand", "finger", "variant", "sha256"):
        np.testing.assert_array_equal(records[field], fixture_records[field])
    # A folder holding only the archive is read through the archive.
    assert len(read_originals(tmp_path)["subject"]) == 6


def test_bad_file_name_is_named(tmp_path):
    folder = copy_fixtures(tmp_path / "real", BMP_NAMES[:1])
    bad = folder / "1__M_Left_pinky_finger.BMP"
    shutil.copy(FIXTURES / BMP_NAMES[0], bad)
    with pytest.raises(DataError, match=naming(bad, ": not a SOCOFing file name")):
        read_originals(folder)


def test_bad_name_inside_an_archive_names_archive_and_member(tmp_path):
    archive = tmp_path / "real.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(FIXTURES / BMP_NAMES[0], arcname="Real/finger.BMP")
    with pytest.raises(DataError, match=naming(f"{archive}:Real/finger.BMP", ": not a SOCOFing file name")):
        read_originals(archive)


@pytest.mark.parametrize(
    "content",
    [lambda data: data[:2000], lambda data: b"garbage" * 100, lambda data: b""],
    ids=["truncated", "garbage", "empty"],
)
def test_undecodable_bmp_is_named(tmp_path, content):
    path = tmp_path / "7__F_Right_ring_finger.BMP"
    path.write_bytes(content((FIXTURES / "1__M_Left_index_finger.BMP").read_bytes()))
    with pytest.raises(DataError, match=naming(path, ": ")):
        read_originals(tmp_path)


def test_truncated_archive_is_named(tmp_path):
    archive = tmp_path / "real.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in BMP_NAMES:
            tar.add(FIXTURES / name, arcname=name)
    archive.write_bytes(archive.read_bytes()[:50000])
    with pytest.raises(DataError, match=naming(archive, ": cannot read tar archive")):
        read_originals(archive)


def test_missing_source_is_named(tmp_path):
    with pytest.raises(DataError, match=naming(tmp_path / "Real", ": no such file or folder")):
        build_socofing_cache(tmp_path / "Real", tmp_path)


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=naming(tmp_path, ": no SOCOFing BMP files found")):
        load_dataset("socofing", tmp_path)


def test_duplicates_on_the_fixtures(fixture_records):
    split = split_by_subject(fixture_records, seed=0)
    kept = fixture_records["source"][np.concatenate([split.train, split.test])]
    # 64 and 203 agree (Left_little): one copy kept. 511 and 590 conflict: both dropped.
    assert sorted(kept) == ["1__M_Left_index_finger.BMP", "53__M_Left_index_finger.BMP", "64__M_Left_little_finger.BMP"]
    assert split.info["duplicates"]["dropped_identical_copies"] == ["203__M_Left_little_finger.BMP"]
    assert len(split.info["duplicates"]["dropped_conflicting_labels"]) == 2
    assert split.info["split"]["joined_subject_groups"] == [[64, 203], [511, 590]]


def test_altered_variants_parse_and_follow_their_real_image(tmp_path):
    folder = copy_fixtures(tmp_path / "full")
    altered = folder / "Altered" / "Altered-Easy"
    altered.mkdir(parents=True)
    # Stand-ins with altered names: an exact copy of 1's image, and a new image (511's, mirrored).
    shutil.copy(FIXTURES / "1__M_Left_index_finger.BMP", altered / "1__M_Left_index_finger_CR.BMP")
    with Image.open(FIXTURES / "511__M_Left_middle_finger.BMP") as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(altered / "511__M_Left_middle_finger_Zcut.BMP")
    ds = load_dataset("socofing", folder)
    assert ds.info["variants"] == {"real": 6, "CR": 1, "Obl": 0, "Zcut": 1}
    # The _CR copy is identical to its real image (same label): kept once. The Zcut variant of the
    # conflicting 511 image is dropped with it, although its own content is unique.
    dup = ds.info["duplicates"]
    assert sorted(dup["dropped_identical_copies"]) == [
        "203__M_Left_little_finger.BMP",
        "Altered/Altered-Easy/1__M_Left_index_finger_CR.BMP",
    ]
    assert dup["dropped_altered_of_conflicting"] == ["Altered/Altered-Easy/511__M_Left_middle_finger_Zcut.BMP"]
    assert dup["kept"] == 3


def test_embedded_cache_split_has_no_shared_subject_or_image(embedded):
    assert len(embedded["subject"]) == 6000 and len(np.unique(embedded["subject"])) == 600
    for seed in (0, 1, 2):
        split = split_by_subject(embedded, seed=seed)
        train, test = split.train, split.test
        assert not set(embedded["subject"][train]) & set(embedded["subject"][test])
        assert not set(embedded["sha256"][train]) & set(embedded["sha256"][test])
        kept = embedded["sha256"][np.concatenate([train, test])]
        assert len(set(kept)) == len(kept) == 5979  # 9 identical copies and 12 conflicting files dropped
        assert split.info["split"]["subjects"] == {"train": 480, "test": 120}


def test_load_dataset_on_the_embedded_cache(embedded):
    ds = load_dataset("socofing", seed=0)
    split = split_by_subject(embedded, seed=0)
    assert ds.x_train.shape == (len(split.train), 1, 28, 28) and ds.x_test.shape == (len(split.test), 1, 28, 28)
    assert len(ds.y_train) + len(ds.y_test) == 5979
    assert ds.classes == CLASSES and len(CLASSES) == 10 and CLASSES[0] == "Left_thumb"
    np.testing.assert_array_equal(ds.x_test[:, 0], embedded["images"][split.test] / np.float32(255))
    assert set(ds.y_train.tolist()) == set(ds.y_test.tolist()) == set(range(10))
    assert ds.info["source"]["embedded"] is True


def test_seed_changes_the_split_and_is_reproducible():
    a, b, c = (load_dataset("socofing", seed=s).info["split"]["test_subject_ids"] for s in (0, 0, 1))
    assert a == b and a != c


def test_cache_built_from_fixtures_matches_embedded_rows(tmp_path, embedded):
    out = build_socofing_cache(FIXTURES, tmp_path)
    assert out == tmp_path / CACHE_NAME
    built, meta = read_cache(out)
    rows = [int(np.flatnonzero(embedded["source"] == f"Real/{name}")[0]) for name in built["source"]]
    for field in ("images", "subject", "gender", "hand", "finger", "variant", "sha256"):
        np.testing.assert_array_equal(built[field], embedded[field][rows])
    assert meta["count"] == 6 and "LANCZOS" in meta["resize"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]  # no temporary file left behind


def test_failed_build_leaves_no_file(tmp_path):
    source = copy_fixtures(tmp_path / "src", BMP_NAMES[:2])
    (source / "1__M_Left_index_finger.BMP").write_bytes(b"not a bmp")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(DataError):
        build_socofing_cache(source, out_dir / "cache.npz")
    assert list(out_dir.iterdir()) == []


def test_corrupt_caches_are_named(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=naming(garbage, ": cannot read SOCOFing cache")):
        load_dataset("socofing", garbage)
    partial = tmp_path / "partial.npz"
    np.savez_compressed(partial, images=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DataError, match=naming(partial, ": not a SOCOFing cache: missing arrays subject")):
        load_dataset("socofing", partial)


# --- the task: hand-finger (default), gender, hand, finger -------------------------------------------------

EXPECTED_CLASSES = {
    "hand-finger": CLASSES,
    "gender": ("female", "male"),
    "hand": ("Left", "Right"),
    "finger": ("thumb", "index", "middle", "ring", "little"),
}


@pytest.fixture(scope="module")
def by_task() -> dict[str, object]:
    return {task: load_dataset("socofing", seed=0, socofing_task=task) for task in SOCOFING_TASKS}


def test_task_table_is_the_one_load_dataset_accepts():
    assert SOCOFING_TASKS == tuple(TASKS) == tuple(EXPECTED_CLASSES)
    assert {task: classes for task, (classes, _) in TASKS.items()} == EXPECTED_CLASSES


def test_default_task_is_hand_finger(by_task):
    default = load_dataset("socofing", seed=0)
    assert default.classes == CLASSES and default.info["task"] == "hand-finger"
    np.testing.assert_array_equal(default.y_train, by_task["hand-finger"].y_train)
    np.testing.assert_array_equal(default.y_test, by_task["hand-finger"].y_test)


@pytest.mark.parametrize("task", SOCOFING_TASKS)
def test_each_task_labels_the_file_name_fields(embedded, by_task, task):
    ds = by_task[task]
    split = split_by_subject(embedded, seed=0)
    assert ds.classes == EXPECTED_CLASSES[task] and ds.info["task"] == task
    for y, idx in ((ds.y_train, split.train), (ds.y_test, split.test)):
        gender, hand, finger = (embedded[field][idx] for field in ("gender", "hand", "finger"))
        names = np.array(ds.classes)[y]
        if task == "gender":
            np.testing.assert_array_equal(y == 1, gender == "M")
            np.testing.assert_array_equal(y == 0, gender == "F")
        elif task == "hand":
            np.testing.assert_array_equal(names, hand)
        elif task == "finger":
            np.testing.assert_array_equal(names, finger)
        else:
            np.testing.assert_array_equal(names, np.char.add(np.char.add(hand.astype(str), "_"), finger.astype(str)))
        assert set(y.tolist()) == set(range(len(ds.classes)))  # every class on both sides


@pytest.mark.parametrize("seed", [0, 1])
def test_the_split_is_the_same_for_every_task(seed):
    loaded = [load_dataset("socofing", seed=seed, socofing_task=task) for task in SOCOFING_TASKS]
    first = loaded[0]
    for ds in loaded[1:]:
        np.testing.assert_array_equal(ds.x_train, first.x_train)
        np.testing.assert_array_equal(ds.x_test, first.x_test)
        assert ds.info["split"] == first.info["split"] and ds.info["duplicates"] == first.info["duplicates"]


@pytest.mark.parametrize("task", SOCOFING_TASKS)
def test_majority_rate_is_the_test_splits_most_frequent_class(embedded, by_task, task):
    ds = by_task[task]
    test = split_by_subject(embedded, seed=0).test
    fields = {"gender": ["gender"], "hand": ["hand"], "finger": ["finger"], "hand-finger": ["hand", "finger"]}[task]
    values = ["_".join(str(embedded[f][i]) for f in fields) for i in test]
    (value, count), *_ = collections.Counter(values).most_common()
    assert ds.info["majority_rate"] == pytest.approx(count / len(test))
    assert ds.info["majority_class"] == {"M": "male", "F": "female"}.get(value, value)
    assert sum(ds.info["class_counts"]["test"]) == len(test) == len(ds.y_test)
    if task == "gender":  # the embedded seed-0 test split: 906 of 1,184 images are male
        assert (ds.info["majority_class"], count, len(test)) == ("male", 906, 1184)


def test_kept_copies_whose_twins_have_another_gender_are_listed(by_task):
    # 363 (M) and 376 (F), 560 (F) and 585 (M) hold byte-identical images of the same finger: one copy is kept
    conflicts = by_task["gender"].info["label_conflicts_kept"]
    assert sorted(conflicts) == [
        ["Real/363__M_Left_little_finger.BMP", "Real/376__F_Left_little_finger.BMP"],
        ["Real/560__F_Left_little_finger.BMP", "Real/585__M_Left_little_finger.BMP"],
    ]
    assert all(by_task[t].info["label_conflicts_kept"] == [] for t in ("hand-finger", "hand", "finger"))


def test_bad_task_is_a_config_error_naming_it_and_the_choices():
    message = "socofing_task must be one of hand-finger, gender, hand, finger, got 'sex'"
    with pytest.raises(ConfigError, match=message):
        load_dataset("socofing", socofing_task="sex")
    with pytest.raises(ConfigError, match=message):
        load_socofing(None, seed=0, task="sex")
    with pytest.raises(ConfigError, match=message):
        TrainConfig(dataset="socofing", socofing_task="sex").validate()


def test_config_and_flag_choose_the_task(tmp_path):
    config = TrainConfig(dataset="socofing", socofing_task="hand").validate()
    assert config.load_dataset().classes == ("Left", "Right")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dipsen",
            "train",
            "--dataset",
            "socofing",
            "--model",
            "cnn",
            "--socofing-task",
            "gender",
            "--clients",
            "2",
            "--fraction",
            "1",
            "--rounds",
            "1",
            "--train-subset",
            "64",
            "--test-subset",
            "64",
            "--workers",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((run / "config.json").read_text())["socofing_task"] == "gender"
    final = json.loads((run / "final_metrics.json").read_text())
    assert [c["class"] for c in final["per_class"]] == ["female", "male"]
    bad = subprocess.run(
        [sys.executable, "-m", "dipsen", "train", "--socofing-task", "sex", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--socofing-task must be one of hand-finger, gender, hand, finger, got 'sex'" in bad.stderr


def test_a_larger_side_decodes_the_originals_at_that_size_and_a_cache_refuses_it(tmp_path, fixture_records):
    larger = read_originals(copy_fixtures(tmp_path / "originals"), side=56)
    assert larger["images"].shape == (6, 56, 56) and larger["images"].dtype == np.uint8
    np.testing.assert_array_equal(larger["sha256"], fixture_records["sha256"])  # same files, same order
    with pytest.raises(ConfigError, match="caches hold 28x28 images; side 56 needs the originals"):
        load_socofing(side=56)
