"""CTU-13 botnet detection (Garcia et al. 2014) as 28x6 images of per-host flow sequences.

Task (binary): botnet (label contains "Botnet") = 1 vs normal (label contains "Normal") = 0.
Background flows (traffic the capture's authors did not label) are not samples by default; with
``include_background=True`` they count as normal and at most 50,000 of them, drawn with a fixed seed
(``BACKGROUND_SEED``, independent of the loader's ``seed``), become samples. They are always part of
the contexts below, because a detector on the network sees all of a host's traffic.

Features, six per flow, in this column order:

0-3. Dur, TotPkts, TotBytes, SrcBytes: log1p (they span about nine orders of magnitude), then min-max
     scaled with the minimum and maximum of the training-period flows only; test values are clipped to [0, 1].
4.   Proto: tcp 0, udp 1/3, icmp 2/3, anything else 1.
5.   Destination-port class: none or not a decimal number (e.g. ICMP type/code written in hex) 0,
     well-known (< 1024) 1/3, registered (< 49152) 2/3, dynamic 1.

Why these: they are per-flow fields any NetFlow exporter provides. Left out are identifiers (addresses,
ephemeral source ports: a model would learn who, not what), timestamps, the label, Argus-specific
Dir/State strings, and sTos/dTos, which are near constant (0 in 93% of scenario 6's flows).

Input layout: one sample per included flow: that flow and the previous 27 flows of the same SrcAddr,
in StartTime order, as a 28 x 6 image, rows = flows (oldest at the top, the classified flow in the
bottom row), columns = the six features above; zero rows pad the top when the host has fewer earlier
flows. Shape (N, 1, 28, 6); label = that of the bottom flow. A padding row looks like a tcp flow with
minimum counters and no port, which the model has to learn to discount.

Split by time, per scenario file: T = 70% quantile (numpy method "lower") of the included flows'
StartTime; train = flows before T, test = flows at or after T. Windows are built within each period,
so no test window holds a train-period flow. Several files are split separately and concatenated.

Caveat: in each CTU-13 scenario the botnet flows come from the few infected hosts (scenario 6: all
4,630 from 147.32.84.165), so per-host contexts make the task partly one of recognising those hosts'
traffic; the split by time only keeps the test period unseen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dipsen.data._io import describe_file, embedded_dir
from dipsen.data.binetflow import BACKGROUND, BOTNET, KIND_NAMES, NORMAL, read_binetflow
from dipsen.data.dataset import Dataset
from dipsen.errors import DataError

CLASSES = ("normal", "botnet")
CONTINUOUS = ("Dur", "TotPkts", "TotBytes", "SrcBytes")
FEATURES = (*CONTINUOUS, "Proto", "DportClass")
WINDOW = 28
TEST_QUANTILE = 0.7
MAX_BACKGROUND_SAMPLES = 50_000
BACKGROUND_SEED = 0
EMBEDDED_FILE = "capture20110816.binetflow.gz"
PROTO_CODES = {"tcp": 0.0, "udp": 1 / 3, "icmp": 2 / 3}  # any other protocol: 1
FEATURE_DOC = [
    {"name": name, "encoding": "log1p, then min-max fitted on training-period flows; test clipped to [0, 1]"}
    for name in CONTINUOUS
] + [
    {"name": "Proto", "encoding": "tcp 0, udp 1/3, icmp 2/3, other 1"},
    {"name": "DportClass", "encoding": "none/non-numeric 0, <1024 1/3, <49152 2/3, dynamic 1"},
]


def load_ctu13(
    data_dir: Path | None = None, *, include_background: bool = False, bad_rows: str = "error"
) -> Dataset:
    """Windows of flows as a (N, 1, 28, 6) Dataset; see the module docstring for features, layout and split.

    ``data_dir`` may be None (embedded scenario 6), one .binetflow[.gz] file, or a folder searched
    recursively for them. Guarantees: both classes in each split, no test window holding a train-period
    flow, scaler fitted on training-period flows only, values in [0, 1].
    """
    paths = _scenario_files(data_dir)
    where = str(paths[0] if len(paths) == 1 else data_dir)
    frames, files = zip(*(_read_scenario(path, include_background, bad_rows) for path in paths))
    host = np.concatenate(_host_ids(frames))
    flows = pd.concat(frames, ignore_index=True)
    test = flows["test"].to_numpy()
    kind = flows["kind"].to_numpy()
    sample = flows["sample"].to_numpy()
    if include_background:
        sample, background_info = _cap_background(sample, kind)

    y = (kind == BOTNET).astype(np.int64)
    idx = {"train": np.flatnonzero(sample & ~test), "test": np.flatnonzero(sample & test)}
    for split, rows in idx.items():
        for label, name in enumerate(CLASSES):
            if not (y[rows] == label).any():
                raise DataError(f"{where}: the {split} split has no {name} flows (split at 70% of StartTime)")

    features = _raw_features(flows)
    lo, hi = features[~test, :4].min(axis=0), features[~test, :4].max(axis=0)
    features[:, :4] = np.clip((features[:, :4] - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)
    windows = _WindowBuilder(features.astype(np.float32), host, test)

    info = {
        "source": {"embedded": data_dir is None, "data_dir": None if data_dir is None else str(data_dir),
                   "files": list(files)},
        "task": "binary: label containing 'Botnet' = 1, 'Normal' = 0"
        + ("; 'Background' counted as 0" if include_background else "; 'Background' flows are context only"),
        "features": FEATURE_DOC,
        "feature_rationale": "per-flow NetFlow fields; left out: identifiers (addresses, source ports), "
        "timestamps, the label, Argus Dir/State and near-constant sTos/dTos",
        "layout": f"(N, 1, {WINDOW}, {len(FEATURES)}): rows = the classified flow (bottom) and the previous "
        f"{WINDOW - 1} flows of the same SrcAddr in the same period, oldest at top, zero rows pad the top",
        "split": "per file: T = 70% quantile (numpy 'lower') of included flows' StartTime; "
        "train < T <= test; windows built within each period",
        "scaler": {"space": "log1p", **{name: {"min": float(lo[i]), "max": float(hi[i])}
                                        for i, name in enumerate(CONTINUOUS)}},
        "bad_rows": bad_rows,
        "skipped_malformed_rows": sum(f["skipped_malformed_rows"] for f in files),
        "include_background": include_background,
        "counts": {
            split: {KIND_NAMES[k]: int((kind[rows] == k).sum()) for k in (NORMAL, BOTNET, BACKGROUND)}
            for split, rows in idx.items()
        },
    }
    if include_background:
        info["background_samples"] = background_info
    return Dataset(
        "ctu13",
        windows.build(idx["train"]), y[idx["train"]], windows.build(idx["test"]), y[idx["test"]],
        classes=CLASSES, info=info,
    )


def _read_scenario(path: Path, include_background: bool, bad_rows: str) -> tuple[pd.DataFrame, dict]:
    """One file's flows in time order with its period (``test``) and ``sample`` flags, and its description."""
    flows = read_binetflow(path, bad_rows)
    frame = flows.frame.sort_values("time", kind="stable", ignore_index=True)
    sample = (frame["kind"] != BACKGROUND).to_numpy() | include_background
    if not sample.any():
        raise DataError(f"{path}: no botnet or normal flows")
    split_time = int(np.quantile(frame["time"].to_numpy()[sample], TEST_QUANTILE, method="lower"))
    frame["test"] = frame["time"] >= split_time
    frame["sample"] = sample
    kinds = frame["kind"].to_numpy()
    periods = {"train": ~frame["test"].to_numpy(), "test": frame["test"].to_numpy()}
    per_period = {
        period: {name: int((in_period & (kinds == k)).sum()) for k, name in KIND_NAMES.items()}
        for period, in_period in periods.items()
    }
    return frame, {
        **describe_file(path),
        "path": str(path),
        "flows": len(frame),
        "skipped_malformed_rows": len(flows.skipped_lines),
        "split_time": pd.Timestamp(split_time, unit="us").isoformat(),
        "flows_per_period": per_period,
    }


class _WindowBuilder:
    """Looks up, for any flow, the previous flows of its host within its period (train or test)."""

    def __init__(self, features: np.ndarray, host: np.ndarray, test: np.ndarray) -> None:
        n = len(features)
        # Rows are in time order within each file and host ids are per file, so sorting by
        # (period, host) with a stable sort puts each host's flows of a period together, in time order.
        order = np.lexsort((np.arange(n), host, test))
        group = (host * 2 + test)[order]
        starts = np.r_[True, group[1:] != group[:-1]]
        self.rank = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        self.position = np.empty(n, dtype=np.int64)
        self.position[order] = np.arange(n)
        self.features = features[order]

    def build(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 1, 28, 6) float32 windows ending at the given flows."""
        offsets = np.arange(-(WINDOW - 1), 1)
        pos = self.position[rows]
        valid = (self.rank[pos][:, None] + offsets) >= 0
        out = self.features[np.where(valid, pos[:, None] + offsets, 0)]
        out[~valid] = 0.0
        return out[:, None]


def _raw_features(flows: pd.DataFrame) -> np.ndarray:
    """(n, 6) float64: log1p of the counters, and the two categorical codes (already in [0, 1])."""
    counters = np.log1p(flows[list(CONTINUOUS)].to_numpy(dtype=np.float64))
    proto = flows["Proto"].str.lower().map(PROTO_CODES).fillna(1.0).to_numpy(dtype=np.float64)
    dport = flows["Dport"]
    numeric = dport.str.fullmatch(r"[0-9]+").to_numpy(dtype=bool)
    port = np.zeros(len(flows))
    value = pd.to_numeric(dport[numeric]).to_numpy()
    port[numeric] = np.select([value < 1024, value < 49152], [1 / 3, 2 / 3], 1.0)
    return np.column_stack([counters, proto, port])


def _host_ids(frames: tuple[pd.DataFrame, ...]) -> list[np.ndarray]:
    """Integer SrcAddr ids, distinct across files (each file is its own capture)."""
    ids, offset = [], 0
    for frame in frames:
        codes, uniques = pd.factorize(frame["SrcAddr"])
        ids.append(codes + offset)
        offset += len(uniques)
    return ids


def _cap_background(sample: np.ndarray, kind: np.ndarray) -> tuple[np.ndarray, dict]:
    background = np.flatnonzero(sample & (kind == BACKGROUND))
    info = {"available": len(background), "cap": MAX_BACKGROUND_SAMPLES, "seed": BACKGROUND_SEED}
    if len(background) > MAX_BACKGROUND_SAMPLES:
        rng = np.random.default_rng(BACKGROUND_SEED)
        keep = rng.choice(background, MAX_BACKGROUND_SAMPLES, replace=False)
        sample = sample.copy()
        sample[background] = False
        sample[keep] = True
    info["used"] = int((sample & (kind == BACKGROUND)).sum())
    return sample, info


def _scenario_files(data_dir: Path | None) -> list[Path]:
    if data_dir is None:
        return [embedded_dir("ctu13") / EMBEDDED_FILE]
    data_dir = Path(data_dir)
    if data_dir.is_file():
        return [data_dir]
    suffixes = (".binetflow", ".binetflow.gz")
    paths = sorted(p for p in data_dir.rglob("*") if p.name.endswith(suffixes) and p.is_file())
    if not paths:
        raise DataError(f"{data_dir}: no *.binetflow or *.binetflow.gz files found")
    return paths
