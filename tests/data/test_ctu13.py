"""CTU-13: the real-row fixture, corrupted copies of it, synthetic flows, windows, splits and scaler."""

from __future__ import annotations

import gzip
import math
import re
import subprocess
import sys
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


LABELS = {"normal": "flow=From-Normal-V47-Jist", "botnet": "flow=From-Botnet-V47-TCP-Attempt", "background": "flow=Background"}
START = pd.Timestamp("2011-08-16 10:00:00")


def flow(second: float, src: str, kind: str, dur: float = 0.1, total_bytes: int = 500) -> str:
    """A synthetic binetflow row: a tcp flow from ``src`` starting ``second`` seconds after START."""
    when = (START + pd.Timedelta(seconds=second)).strftime("%Y/%m/%d %H:%M:%S.%f")
    return f"{when},{dur:.6f},tcp,{src},40000,   ->,10.9.9.9,80,S_,0,0,3,{total_bytes},200,{LABELS[kind]}"


def multi_host_lines() -> list[str]:
    """Three botnet and five normal hosts, each sending flows over 100 s, and background traffic."""
    counts = {
        ("10.0.1.1", "botnet"): 20,
        ("10.0.1.2", "botnet"): 10,
        ("10.0.1.3", "botnet"): 14,
        ("10.0.0.1", "normal"): 30,
        ("10.0.0.2", "normal"): 10,
        ("10.0.0.3", "normal"): 12,
        ("10.0.0.4", "normal"): 8,
        ("10.0.0.5", "normal"): 20,
        ("10.0.0.1", "background"): 15,
        ("10.0.2.1", "background"): 10,
    }
    lines = [fixture_lines()[0]]
    for n, ((src, kind), count) in enumerate(counts.items()):
        lines += [flow(i * 100 / count + n / 10, src, kind, total_bytes=100 + 7 * i + n) for i in range(count)]
    return lines


def flow_ends(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The file's flows in the loader's id order (StartTime, then line) and their end times (us)."""
    flows = read_binetflow(path).frame.sort_values("time", kind="stable", ignore_index=True)
    return flows, (flows["time"] + (flows["Dur"] * 1e6).round().astype("int64")).to_numpy()


@pytest.fixture(scope="module")
def fixture_ds():
    return load_dataset("ctu13", FIXTURE)


def expected_windows(path: Path, split_time: str, split: str, include_background: bool = False) -> tuple:
    """Windows and labels computed the slow, obvious way, from the file and the loader's scaler."""
    ds = load_dataset("ctu13", path, include_background=include_background)
    flows = read_binetflow(path).frame.sort_values("time", kind="stable", ignore_index=True)
    t = pd.Timestamp(split_time).value // 1000
    period = flows[(flows["time"] >= t) if split == "test" else (flows["time"] < t)].reset_index(drop=True)
    period["end"] = period["time"] + (period["Dur"] * 1e6).round().astype("int64")
    # Position when ordered by end time, ties by StartTime, then line (the period is in that order already).
    period["rank"] = period.sort_values(["end", "time"], kind="stable").index.argsort()
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
    for _, flow in period.iterrows():
        if flow["kind"] == -1 and not include_background:
            continue
        ended = period[(period["SrcAddr"] == flow["SrcAddr"]) & (period["rank"] < flow["rank"])]
        assert (ended["end"] <= flow["end"]).all()
        earlier = ended.sort_values("rank").tail(27)
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
    # Bottom row = the flow itself; rows above = that host's flows of the same period that ended before it.
    ds, windows, labels = expected_windows(FIXTURE, fixture_ds.info["source"]["files"][0]["split_time"], split)
    np.testing.assert_allclose(getattr(ds, f"x_{split}"), windows, atol=1e-6)
    np.testing.assert_array_equal(getattr(ds, f"y_{split}"), labels)


def test_a_window_holds_no_flow_that_ends_after_its_classified_flow(tmp_path):
    # 10.0.0.1 (normal) and 10.0.0.2 (botnet) send a 0.1 s flow every second; in the test period
    # 10.0.0.1 also starts a 100 s normal flow and a 50 s background flow, which end after its short flows.
    lines = [fixture_lines()[0]] + [
        flow(second, src, kind) for second in range(20) for src, kind in (("10.0.0.1", "normal"), ("10.0.0.2", "botnet"))
    ]
    lines += [flow(13.5, "10.0.0.1", "normal", dur=100), flow(13.6, "10.0.0.1", "background", dur=50)]
    path = write_lines(tmp_path / "long.binetflow", lines)
    ds = load_dataset("ctu13", path)
    assert ds.info["source"]["files"][0]["split_time"] == "2011-08-16T10:00:13.500000"
    long_rows = ds.x_test[:, 0, :, 0] == 1.0  # Dur beyond the training range (0.1 s): the 100 s or the 50 s flow
    own = long_rows[:, -1]
    assert own.sum() == 1  # the 100 s flow is classified once...
    assert not long_rows[~own].any()  # ...and neither long flow is in the window of a flow that ended before it
    window = ds.x_test[own][0, 0]
    assert window[:-1].any(axis=1).sum() == 7  # its own window: the 50 s flow and 10.0.0.1's six short test flows
    assert window[-2, 0] == 1.0  # the 50 s flow ended last before it (63.6 s), so it sits just above
    flows, end = flow_ends(path)
    ids = ds.test_origins.flows
    context_end = np.where(ids >= 0, end[np.maximum(ids, 0)], np.iinfo(np.int64).min)
    assert (context_end <= end[ids[:, -1:]]).all()
    assert (
        flows["SrcAddr"].to_numpy()[ids[ids >= 0]] == np.repeat(flows["SrcAddr"].to_numpy()[ids[:, -1]], (ids >= 0).sum(axis=1))
    ).all()


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


def test_include_background_splits_the_samples_left_after_the_cap_70_30(monkeypatch):
    monkeypatch.setattr(ctu13, "MAX_BACKGROUND_SAMPLES", 50)
    ds = load_dataset("ctu13", FIXTURE, include_background=True)
    # numpy's "lower" 70% quantile of n distinct StartTimes leaves floor(0.7 (n - 1)) of them before it
    assert (len(ds.y_train), len(ds.y_test)) == (math.floor(0.7 * 449), 450 - math.floor(0.7 * 449))
    assert ds.info["split"]["sample_flows"] == {"train": 314, "test": 136}
    assert "after any background cap" in ds.info["split"]["description"]


def test_host_split_holds_out_whole_source_hosts(tmp_path):
    path = write_lines(tmp_path / "hosts.binetflow", multi_host_lines())
    flows, _ = flow_ends(path)
    address = flows["SrcAddr"].to_numpy()
    held_out_sets = set()
    for seed in range(4):
        ds = load_dataset("ctu13", path, ctu13_split="host", seed=seed)
        split = ds.info["split"]
        test_hosts = set(split["test_hosts"])
        held_out_sets.add(frozenset(test_hosts))
        in_test = np.isin(address, list(test_hosts))
        samples = (flows["kind"] != -1).to_numpy()
        assert (len(ds.y_train), len(ds.y_test)) == ((samples & ~in_test).sum(), (samples & in_test).sum())
        assert set(ds.y_train) == set(ds.y_test) == {0, 1}
        assert 0.2 <= split["test_share"] <= 0.4
        ids = ds.test_origins.flows
        assert set(address[ids[ids >= 0]]) <= test_hosts  # no test window holds a training host's flow
        assert ds.info["scaler"]["TotBytes"]["max"] == pytest.approx(np.log1p(flows["TotBytes"][~in_test].max()))
        np.testing.assert_array_equal(load_dataset("ctu13", path, ctu13_split="host", seed=seed).x_test, ds.x_test)
    assert len(held_out_sets) > 1  # the seed chooses the hosts


def test_host_split_needs_botnet_flows_from_two_hosts():
    # Scenario 6: every botnet flow comes from 147.32.84.165.
    with pytest.raises(
        DataError,
        match=naming(
            FIXTURE,
            ": ctu13_split 'host' cannot put botnet flows in both train and "
            "test: it needs botnet flows from at least 2 source hosts, and "
            f"all 200 come from one host, {BOTNET_HOST}",
        ),
    ):
        load_dataset("ctu13", FIXTURE, ctu13_split="host")


def test_scenario_split_holds_out_whole_files(tmp_path):
    names = ["a.binetflow", "b.binetflow", "c.binetflow"]
    for name in names:
        write_lines(tmp_path / name, fixture_lines())
    chosen = set()
    for seed in range(5):
        ds = load_dataset("ctu13", tmp_path, ctu13_split="scenario", seed=seed)
        (held_out,) = ds.info["split"]["test_files"]  # round(30% of 3 files)
        chosen.add(held_out)
        assert (len(ds.y_train), len(ds.y_test)) == (800, 400)
        assert (ds.test_origins.file == names.index(held_out)).all()
    assert len(chosen) > 1  # the seed chooses the files


def test_scenario_split_needs_two_files_and_both_classes_on_each_side(tmp_path):
    with pytest.raises(
        DataError,
        match=naming(FIXTURE, ": ctu13_split 'scenario' holds out whole files and needs at least 2 .binetflow files, found 1"),
    ):
        load_dataset("ctu13", FIXTURE, ctu13_split="scenario")
    write_lines(tmp_path / "a.binetflow", [line for line in fixture_lines() if "Botnet" not in line])
    write_lines(tmp_path / "b.binetflow", fixture_lines())
    with pytest.raises(DataError, match=naming(tmp_path, ": the ") + r"(train|test) split has no botnet flows \(scenario"):
        load_dataset("ctu13", tmp_path, ctu13_split="scenario")


def test_the_train_command_and_the_flower_task_pass_the_split_on(tmp_path):
    from dipsen.config import TrainConfig
    from dipsen.federated.flower.task import PARTITION_SETTINGS

    assert "ctu13_split" in PARTITION_SETTINGS
    config = TrainConfig(dataset="ctu13", data_dir=str(FIXTURE), ctu13_split="host").validate()
    with pytest.raises(DataError, match="ctu13_split 'host' cannot put botnet flows"):
        config.load_dataset()  # what the Flower task and the ServerApp load
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dipsen",
            "train",
            "--dataset",
            "ctu13",
            "--data-dir",
            str(FIXTURE),
            "--ctu13-split",
            "host",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "ctu13_split 'host' cannot put botnet flows" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


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
