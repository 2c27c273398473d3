"""CTU-13: the real-row fixture, corrupted copies of it, windows, split and scaler."""

from __future__ import annotations

import gzip
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dipsen.data import ctu13, load_dataset
from dipsen.data.binetflow import read_binetflow
from dipsen.errors import DataError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "ctu13" / "capture20110816_cut.binetflow.gz"
BOTNET_HOST = "147.32.84.165"


def naming(path: Path | str, text: str) -> str:
    """Regex for an error message that starts with the file's path followed by ``text``."""
    return re.escape(f"{path}{text}")


def fixture_lines() -> list[str]:
    return gzip.decompress(FIXTURE.read_bytes()).decode().split("\n")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines))
    return path


def edit_field(line: str, column: int, value: str) -> str:
    fields = line.split(",")
    fields[column] = value
    return ",".join(fields)


@pytest.fixture(scope="module")
def fixture_ds():
    return load_dataset("ctu13", FIXTURE)


def expected_windows(path: Path, split_time: str, split: str, include_background: bool = False) -> tuple:
    """Windows and labels computed the slow, obvious way, from the file and the loader's scaler."""
    ds = load_dataset("ctu13", path, include_background=include_background)
    flows = read_binetflow(path).frame.sort_values("time", kind="stable", ignore_index=True)
    t = pd.Timestamp(split_time).value // 1000
    period = flows[(flows["time"] >= t) if split == "test" else (flows["time"] < t)].reset_index(drop=True)
    scaler = ds.info["scaler"]

    def row(flow) -> list[float]:
        out = []
        for name in ("Dur", "TotPkts", "TotBytes", "SrcBytes"):
            lo, hi = scaler[name]["min"], scaler[name]["max"]
            out.append(min(max((math.log1p(flow[name]) - lo) / (hi - lo), 0.0), 1.0))
        out.append({"tcp": 0.0, "udp": 1 / 3, "icmp": 2 / 3}.get(flow["Proto"], 1.0))
        port = int(flow["Dport"]) if flow["Dport"].isdigit() else None
        out.append(0.0 if port is None else 1 / 3 if port < 1024 else 2 / 3 if port < 49152 else 1.0)
        return out

    windows, labels = [], []
    for i, flow in period.iterrows():
        if flow["kind"] == -1 and not include_background:
            continue
        earlier = period.iloc[:i][period["SrcAddr"].iloc[:i] == flow["SrcAddr"]].tail(27)
        rows = [row(f) for _, f in earlier.iterrows()] + [row(flow)]
        windows.append([[0.0] * 6] * (28 - len(rows)) + rows)
        labels.append(int(flow["kind"] == 1))
    return ds, np.array(windows, dtype=np.float64)[:, None], np.array(labels)


def test_fixture_parses_with_its_labels(fixture_ds):
    flows = read_binetflow(FIXTURE).frame
    assert len(flows) == 610
    assert flows["kind"].value_counts().to_dict() == {1: 200, 0: 200, -1: 210}
    ds = fixture_ds
    assert ds.classes == ("normal", "botnet")
    assert len(ds.y_train) + len(ds.y_test) == 400
    assert ds.x_train.shape == (len(ds.y_train), 1, 28, 6) and ds.x_train.dtype == np.float32
    assert ds.info["counts"]["train"]["botnet"] == int(ds.y_train.sum())
    assert 0.0 <= min(ds.x_train.min(), ds.x_test.min()) and max(ds.x_train.max(), ds.x_test.max()) <= 1.0


@pytest.mark.parametrize("split", ["train", "test"])
def test_windows_match_a_direct_computation(fixture_ds, split):
    # Bottom row = the flow itself; rows above = that host's previous flows of the same period only.
    ds, windows, labels = expected_windows(FIXTURE, fixture_ds.info["source"]["files"][0]["split_time"], split)
    np.testing.assert_allclose(getattr(ds, f"x_{split}"), windows, atol=1e-6)
    np.testing.assert_array_equal(getattr(ds, f"y_{split}"), labels)


def test_first_test_window_of_a_host_holds_no_train_flow(fixture_ds):
    flows = read_binetflow(FIXTURE).frame
    t = pd.Timestamp(fixture_ds.info["source"]["files"][0]["split_time"]).value // 1000
    bot = flows[(flows["SrcAddr"] == BOTNET_HOST) & (flows["kind"] == 1)]
    assert (bot["time"] < t).sum() >= 27  # the host has a full window's worth of train-period flows...
    first_test = int(np.argmax(fixture_ds.y_test == 1))
    assert not fixture_ds.x_test[first_test, 0, :27].any()  # ...but its first test window is padding above
    assert fixture_ds.x_test[first_test, 0, 27].any()


def test_scaler_is_fitted_on_training_period_flows(fixture_ds):
    flows = read_binetflow(FIXTURE).frame
    t = pd.Timestamp(fixture_ds.info["source"]["files"][0]["split_time"]).value // 1000
    train = flows[flows["time"] < t]
    for name in ("Dur", "TotPkts", "TotBytes", "SrcBytes"):
        assert fixture_ds.info["scaler"][name]["min"] == pytest.approx(np.log1p(train[name]).min())
        assert fixture_ds.info["scaler"][name]["max"] == pytest.approx(np.log1p(train[name]).max())


def test_test_values_beyond_the_training_range_are_clipped(tmp_path, fixture_ds):
    lines = fixture_lines()
    last = max(i for i, line in enumerate(lines) if "Botnet" in line)  # a test-period botnet flow
    lines[last] = edit_field(lines[last], 12, "999999999999")  # TotBytes
    ds = load_dataset("ctu13", write_lines(tmp_path / "big.binetflow", lines))
    assert ds.info["scaler"] == fixture_ds.info["scaler"]
    assert ds.x_test[np.flatnonzero(ds.y_test == 1)[-1], 0, 27, 2] == 1.0


def test_plain_and_gzipped_files_give_the_same_dataset(tmp_path, fixture_ds):
    plain = write_lines(tmp_path / "capture.binetflow", fixture_lines())
    ds = load_dataset("ctu13", plain)
    np.testing.assert_array_equal(ds.x_train, fixture_ds.x_train)
    np.testing.assert_array_equal(ds.y_test, fixture_ds.y_test)


def test_a_folder_of_scenarios_is_split_per_file(tmp_path, fixture_ds):
    (tmp_path / "a").mkdir()
    write_lines(tmp_path / "a" / "one.binetflow", fixture_lines())
    (tmp_path / "b.binetflow.gz").write_bytes(FIXTURE.read_bytes())
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_dataset("ctu13", tmp_path)
    assert [f["name"] for f in ds.info["source"]["files"]] == ["one.binetflow", "b.binetflow.gz"]
    np.testing.assert_array_equal(ds.x_train, np.concatenate([fixture_ds.x_train, fixture_ds.x_train]))


def test_include_background_counts_it_as_normal_and_caps_it(monkeypatch):
    ds = load_dataset("ctu13", FIXTURE, include_background=True)
    assert len(ds.y_train) + len(ds.y_test) == 610
    assert ds.info["background_samples"]["used"] == 210
    monkeypatch.setattr(ctu13, "MAX_BACKGROUND_SAMPLES", 50)
    capped = load_dataset("ctu13", FIXTURE, include_background=True)
    assert capped.info["background_samples"] == {"available": 210, "cap": 50, "seed": 0, "used": 50}
    assert len(capped.y_train) + len(capped.y_test) == 450
    again = load_dataset("ctu13", FIXTURE, include_background=True)
    np.testing.assert_array_equal(capped.x_test, again.x_test)


def test_missing_column_is_named(tmp_path):
    lines = fixture_lines()
    lines[0] = lines[0].replace("TotBytes", "Bytes")
    path = write_lines(tmp_path / "x.binetflow", lines)
    with pytest.raises(DataError, match=naming(path, ": missing column 'TotBytes'")):
        load_dataset("ctu13", path)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda line: line + ",extra", "expected 15 fields, found 16"),
        (lambda line: line.rsplit(",", 1)[0], "expected 15 fields, found 14"),
        (lambda line: edit_field(line, 1, "fast"), "Dur is not a non-negative number"),
        (lambda line: edit_field(line, 11, "-3"), "TotPkts is not a non-negative number"),
        (lambda line: edit_field(line, 13, "inf"), "SrcBytes is not a non-negative number"),
        (lambda line: edit_field(line, 0, "yesterday"), "StartTime is not a date"),
        (lambda line: "", "expected 15 fields, found 1"),
    ],
    ids=["long", "short", "text", "negative", "infinite", "time", "blank"],
)
def test_malformed_row_names_file_and_line_or_is_skipped(tmp_path, edit, reason, fixture_ds):
    lines = fixture_lines()
    lines[41] = edit(lines[41])  # file line 42
    path = write_lines(tmp_path / "bad.binetflow", lines)
    with pytest.raises(DataError, match=naming(path, f": line 42: malformed row ({reason})")):
        load_dataset("ctu13", path)
    ds = load_dataset("ctu13", path, bad_rows="skip")
    assert ds.info["skipped_malformed_rows"] == 1
    assert read_binetflow(path, "skip").frame["line"].tolist() == [n for n in range(2, 612) if n != 42]


def test_unknown_label_names_file_and_line(tmp_path):
    lines = fixture_lines()
    lines[9] = edit_field(lines[9], 14, "flow=Suspicious")
    path = write_lines(tmp_path / "x.binetflow", lines)
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=naming(path, ": line 10: unknown label 'flow=Suspicious'")):
            load_dataset("ctu13", path, bad_rows=mode)


def test_a_split_without_botnet_flows_is_an_error(tmp_path):
    lines = [line for line in fixture_lines() if "Botnet" not in line]
    path = write_lines(tmp_path / "x.binetflow", lines)
    with pytest.raises(DataError, match=naming(path, ": the train split has no botnet flows")):
        load_dataset("ctu13", path)


def test_truncated_gzip_and_empty_files_are_named(tmp_path):
    truncated = tmp_path / "t.binetflow.gz"
    truncated.write_bytes(FIXTURE.read_bytes()[:5000])
    with pytest.raises(DataError, match=naming(truncated, ": truncated gzip stream")):
        load_dataset("ctu13", truncated)
    empty = tmp_path / "e.binetflow"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=naming(empty, ": empty file")):
        load_dataset("ctu13", empty)
    with pytest.raises(DataError, match=naming(tmp_path / "none", ": no *.binetflow")):
        (tmp_path / "none").mkdir()
        load_dataset("ctu13", tmp_path / "none")


def test_embedded_scenario_6():
    ds = load_dataset("ctu13")
    counts = ds.info["counts"]
    assert counts["train"]["botnet"] + counts["test"]["botnet"] == 4630
    assert counts["train"]["normal"] + counts["test"]["normal"] == 7494
    assert ds.x_train.shape == (counts["train"]["botnet"] + counts["train"]["normal"], 1, 28, 6)
    assert ds.info["source"]["files"][0]["flows"] == 558919


def test_a_utf8_byte_order_mark_before_the_header_is_accepted(tmp_path, fixture_ds):
    path = tmp_path / "bom.binetflow"
    path.write_text("\n".join(fixture_lines()), encoding="utf-8-sig")
    np.testing.assert_array_equal(load_dataset("ctu13", path).x_test, fixture_ds.x_test)
