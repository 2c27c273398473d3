"""CTU-13 botnet detection (Garcia et al. 2014) as 28x6 images of per-host flow sequences.

Task (binary): botnet (label contains "Botnet") = 1 vs normal (label contains "Normal") = 0.
Background flows (traffic the capture's authors did not label) are not samples by default; with
``include_background=True`` they count as normal and at most 50,000 of them, drawn with a fixed seed
(``BACKGROUND_SEED``, independent of the loader's ``seed``), become samples. They are always part of
the contexts below, because a detector on the network sees all of a host's traffic.

Features, six per flow, in this column order:

0-3. Dur, TotPkts, TotBytes, SrcBytes: log1p (they span about nine orders of magnitude), then min-max
     scaled with the minimum and maximum of the training part's flows only; test values are clipped to [0, 1].
4.   Proto: tcp 0, udp 1/3, icmp 2/3, anything else 1.
5.   Destination-port class: none or not a decimal number (e.g. ICMP type/code written in hex) 0,
     well-known (< 1024) 1/3, registered (< 49152) 2/3, dynamic 1.

Why these: they are per-flow fields any NetFlow exporter provides. Left out are identifiers (addresses,
ephemeral source ports: a model would learn who, not what), timestamps, the label, Argus-specific
Dir/State strings, and sTos/dTos, which are near constant (0 in 93% of scenario 6's flows).

Input layout: one sample per included flow, as a 28 x 6 image, rows = flows, columns = the six
features above. The bottom row is the classified flow; the rows above are the 27 flows of the same
SrcAddr (in the same part of the split, below) that ended most recently by the time it ended, i.e.
with StartTime + Dur at or before its own. Flows are ordered by end time (StartTime + Dur), ties by
StartTime, then by line in the file; the window holds the 27 flows just before the classified one
in that order, the earliest-ending at the top. A flow still running when the classified flow ends,
even one that started earlier, is not in its window: an online detector that classifies a flow when
its record is exported has exactly these flows. Zero rows pad the top when the host has fewer such
flows. Shape (N, 1, 28, 6); label = that of the bottom flow. A padding row looks like a tcp flow
with minimum counters and no port, which the model has to learn to discount.

Splits (``split``), each into a training and a test part of all flows, context flows included:

- ``time`` (default), per scenario file: T = 70% quantile (numpy method "lower") of the StartTime of
  the file's sample flows (after the background cap); train = flows starting before T, test = at or
  after T. Several files are split separately and concatenated.
- ``host``: hold out source addresses. The addresses with botnet sample flows, and the other
  addresses with sample flows, are each shuffled with ``seed``; in that order, each address that keeps
  the group's held-out sample flows at or under 30% of the group's is held out, then the first other
  one that brings them closer to 30%. Every flow of a held-out address (in every file) is test, all
  others train. Needs botnet flows from at least two addresses.
- ``scenario``: hold out whole files: round(30%) of them (at least 1, at most all but 1), chosen
  with ``seed``; needs at least two files.

Windows are built within each part, so no test window holds a training flow (for ``host`` and
``scenario`` a host's flows all lie in one part anyway). Both classes must be in both parts.

Caveat, measured on scenario 6 (the embedded file) with the time split: all 4,630 botnet flows
come from one host, 147.32.84.165, which has no other traffic (no normal or background flow); the
normal flows come from 16 other hosts. On the 3,638 test windows the majority class scores 0.678,
and one feature of the bottom row, TotBytes <= 187 -> botnet (the best threshold on the training
windows), scores 0.971: the task is mostly telling that host's flows from the others, and an accuracy
on it says little about detecting botnets in general. The host split would test unseen hosts, but
scenario 6 cannot be split by host (one botnet host); it needs scenarios with several infected hosts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dipsen.data._io import describe_file, embedded_dir
from dipsen.data.binetflow import BACKGROUND, BOTNET, KIND_NAMES, NORMAL, read_binetflow
from dipsen.data.dataset import Dataset, WindowOrigins
from dipsen.errors import DataError

CLASSES = ("normal", "botnet")
CONTINUOUS = ("Dur", "TotPkts", "TotBytes", "SrcBytes")
FEATURES = (*CONTINUOUS, "Proto", "DportClass")
WINDOW = 28
TEST_QUANTILE = 0.7  # time: the split quantile; host and scenario hold out the other 30%
MAX_BACKGROUND_SAMPLES = 50_000
BACKGROUND_SEED = 0
EMBEDDED_FILE = "capture20110816.binetflow.gz"
PROTO_CODES = {"tcp": 0.0, "udp": 1 / 3, "icmp": 2 / 3}  # any other protocol: 1
FEATURE_DOC = [
    {"name": name, "encoding": "log1p, then min-max fitted on the training part's flows; test clipped to [0, 1]"}
    for name in CONTINUOUS
] + [
    {"name": "Proto", "encoding": "tcp 0, udp 1/3, icmp 2/3, other 1"},
    {"name": "DportClass", "encoding": "none/non-numeric 0, <1024 1/3, <49152 2/3, dynamic 1"},
]


def load_ctu13(
    data_dir: Path | None = None,
    *,
    include_background: bool = False,
    bad_rows: str = "error",
    split: str = "time",
    seed: int = 0,
) -> Dataset:
    """Windows of flows as a (N, 1, 28, 6) Dataset; see the module docstring for features, layout and splits.

    ``data_dir`` may be None (embedded scenario 6), one .binetflow[.gz] file, or a folder searched
    recursively for them. ``split`` is one of ``dipsen.data.CTU13_SPLITS``; ``seed`` chooses the held-out hosts or files
    (the time split does not use it). Guarantees: both classes in each part, no test window holding a
    training flow or a flow that ended after its classified flow, scaler fitted on training flows only,
    values in [0, 1]. ``test_origins`` names the flows of each test window.
    """
    paths = _scenario_files(data_dir)
    where = str(paths[0] if len(paths) == 1 else data_dir)
    frames, skipped = zip(*(_read_sorted(path, bad_rows) for path in paths), strict=True)
    file = np.repeat(np.arange(len(frames)), [len(frame) for frame in frames])
    host = np.concatenate(_host_ids(frames))
    flows = pd.concat(frames, ignore_index=True)
    kind = flows["kind"].to_numpy()
    sample = (kind != BACKGROUND) | include_background
    for k, path in enumerate(paths):
        if not sample[file == k].any():
            raise DataError(f"{path}: no botnet or normal flows")
    if include_background:
        sample, background_info = _cap_background(sample, kind)

    split_times: list[str | None] = [None] * len(paths)
    if split == "time":
        test, split_info, split_times = _time_split(flows, file, sample)
    elif split == "host":
        test, split_info = _host_split(flows, sample, kind, seed, where)
    else:
        test, split_info = _scenario_split(file, paths, seed, where)
    y = (kind == BOTNET).astype(np.int64)
    idx = {"train": np.flatnonzero(sample & ~test), "test": np.flatnonzero(sample & test)}
    for part, rows in idx.items():
        for label, name in enumerate(CLASSES):
            if not (y[rows] == label).any():
                raise DataError(f"{where}: the {part} split has no {name} flows ({split_info['description']})")
    split_info["sample_flows"] = {part: len(rows) for part, rows in idx.items()}
    split_info["test_share"] = round(len(idx["test"]) / int(sample.sum()), 4)

    features = _raw_features(flows)
    lo, hi = features[~test, :4].min(axis=0), features[~test, :4].max(axis=0)
    features[:, :4] = np.clip((features[:, :4] - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)
    end = flows["time"].to_numpy() + (flows["Dur"].to_numpy() * 1e6).round().astype(np.int64)
    windows = _WindowBuilder(features.astype(np.float32), host, test, end)
    x_train, _ = windows.build(idx["train"])
    x_test, test_flows = windows.build(idx["test"])

    info = {
        "source": {
            "embedded": data_dir is None,
            "data_dir": None if data_dir is None else str(data_dir),
            "files": [
                _describe(path, skipped[k], test[file == k], kind[file == k], split_times[k]) for k, path in enumerate(paths)
            ],
        },
        "task": "binary: label containing 'Botnet' = 1, 'Normal' = 0"
        + ("; 'Background' counted as 0" if include_background else "; 'Background' flows are context only"),
        "features": FEATURE_DOC,
        "feature_rationale": "per-flow NetFlow fields; left out: identifiers (addresses, source ports), "
        "timestamps, the label, Argus Dir/State and near-constant sTos/dTos",
        "layout": f"(N, 1, {WINDOW}, {len(FEATURES)}): the classified flow in the bottom row, above it the "
        f"{WINDOW - 1} flows of the same SrcAddr in the same part of the split that ended (StartTime + Dur) "
        "most recently at or before its end, in end-time order (ties: StartTime, line), earliest at top; "
        "zero rows pad the top",
        "split": split_info,
        "scaler": {"space": "log1p", **{name: {"min": float(lo[i]), "max": float(hi[i])} for i, name in enumerate(CONTINUOUS)}},
        "bad_rows": bad_rows,
        "skipped_malformed_rows": sum(skipped),
        "include_background": include_background,
        "counts": {
            part: {KIND_NAMES[k]: int((kind[rows] == k).sum()) for k in (NORMAL, BOTNET, BACKGROUND)}
            for part, rows in idx.items()
        },
    }
    if include_background:
        info["background_samples"] = background_info
    return Dataset(
        "ctu13",
        x_train,
        y[idx["train"]],
        x_test,
        y[idx["test"]],
        classes=CLASSES,
        info=info,
        test_origins=WindowOrigins(test_flows, file[idx["test"]]),
    )


def _time_split(flows: pd.DataFrame, file: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray, dict, list[str | None]]:
    """Per file: test = flows starting at or after the 70% quantile of its sample flows' StartTime (T, per file)."""
    time = flows["time"].to_numpy()
    test = np.zeros(len(flows), dtype=bool)
    split_times: list[str | None] = []
    for k in range(int(file.max()) + 1):
        in_file = file == k
        # Over all the file's flows only when the background cap drew none of them (it has no other sample).
        times = time[in_file & sample] if (in_file & sample).any() else time[in_file]
        split_time = int(np.quantile(times, TEST_QUANTILE, method="lower"))
        test[in_file] = time[in_file] >= split_time
        split_times.append(pd.Timestamp(split_time, unit="us").isoformat())
    return (
        test,
        {
            "method": "time",
            "description": f"time split: per file, T = {TEST_QUANTILE:.0%} quantile (numpy 'lower') of the StartTime of "
            "its sample flows (after any background cap); train = flows starting before T, test = at or after T; "
            "windows built within each part",
        },
        split_times,
    )


def _host_split(flows: pd.DataFrame, sample: np.ndarray, kind: np.ndarray, seed: int, where: str) -> tuple[np.ndarray, dict]:
    """Test = every flow of a seeded choice of source addresses; see the module docstring."""
    host_of, addresses = pd.factorize(flows["SrcAddr"], sort=True)
    n = len(addresses)
    samples_of = np.bincount(host_of[sample], minlength=n)
    botnet_of = np.bincount(host_of[sample & (kind == BOTNET)], minlength=n)
    botnet_hosts = np.flatnonzero(botnet_of)
    if len(botnet_hosts) < 2:
        found = (
            f"all {botnet_of.sum()} come from one host, {addresses[botnet_hosts[0]]}" if len(botnet_hosts) else "there are none"
        )
        raise DataError(
            f"{where}: ctu13_split 'host' cannot put botnet flows in both train and test: it needs "
            f"botnet flows from at least 2 source hosts, and {found}"
        )
    rng = np.random.default_rng(seed)
    held_out = np.zeros(n, dtype=bool)
    for group in (botnet_hosts, np.flatnonzero((samples_of > 0) & (botnet_of == 0))):
        held_out[_hold_out(rng.permutation(group), samples_of, (1 - TEST_QUANTILE) * samples_of[group].sum())] = True
    labelled = np.bincount(host_of[kind != BACKGROUND], minlength=n) > 0
    return held_out[host_of], {
        "method": "host",
        "description": f"host split, seed {seed}: every flow of the held-out source addresses is test, all "
        "others train; addresses with botnet flows and the other addresses with sample flows are each shuffled, "
        f"and each address that keeps the group's held-out sample flows at or under {1 - TEST_QUANTILE:.0%} is held "
        "out, then the first other one that brings them closer to it",
        "seed": seed,
        "test_hosts": [str(a) for a in addresses[held_out & labelled]],
        "test_background_only_hosts": int((held_out & ~labelled).sum()),
    }


def _hold_out(order: np.ndarray, size: np.ndarray, target: float) -> np.ndarray:
    """Hosts to hold out, from ``order``: each one that keeps their sample flows at or under ``target``,
    then the first other one that brings the total closer to ``target``. With two or more hosts at least
    one and never all are held out."""
    chosen, total = np.zeros(len(order), dtype=bool), 0
    for i, h in enumerate(order):
        if total + size[h] <= target:
            chosen[i] = True
            total += size[h]
    for i, h in enumerate(order):
        if not chosen[i] and abs(total + size[h] - target) < target - total:
            chosen[i] = True
            break
    return order[chosen]


def _scenario_split(file: np.ndarray, paths: list[Path], seed: int, where: str) -> tuple[np.ndarray, dict]:
    """Test = every flow of a seeded choice of about 30% of the files."""
    if len(paths) < 2:
        raise DataError(
            f"{where}: ctu13_split 'scenario' holds out whole files and needs at least 2 .binetflow files, found {len(paths)}"
        )
    count = min(len(paths) - 1, max(1, round((1 - TEST_QUANTILE) * len(paths))))
    held_out = np.sort(np.random.default_rng(seed).choice(len(paths), count, replace=False))
    names = [str(paths[k].relative_to(where)) for k in held_out]
    return np.isin(file, held_out), {
        "method": "scenario",
        "description": f"scenario split, seed {seed}: every flow of the held-out files {', '.join(names)} is test, "
        "all others train",
        "seed": seed,
        "test_files": names,
    }


def _read_sorted(path: Path, bad_rows: str) -> tuple[pd.DataFrame, int]:
    """One file's flows in StartTime order (ties in file order), and the number of malformed rows skipped."""
    flows = read_binetflow(path, bad_rows)
    return flows.frame.sort_values("time", kind="stable", ignore_index=True), len(flows.skipped_lines)


def _describe(path: Path, skipped: int, test: np.ndarray, kind: np.ndarray, split_time: str | None) -> dict:
    """One file's description: size, hash, flows, skipped rows, its split time (time split) and flows per part."""
    return {
        **describe_file(path),
        "path": str(path),
        "flows": len(test),
        "skipped_malformed_rows": skipped,
        **({} if split_time is None else {"split_time": split_time}),
        "flows_per_part": {
            part: {name: int((in_part & (kind == k)).sum()) for k, name in KIND_NAMES.items()}
            for part, in_part in (("train", ~test), ("test", test))
        },
    }


class _WindowBuilder:
    """Looks up, for any flow, the flows of its host and part that ended before it (see the module docstring)."""

    def __init__(self, features: np.ndarray, host: np.ndarray, test: np.ndarray, end: np.ndarray) -> None:
        n = len(features)
        # Rows are in (file, StartTime) order and host ids are per file, so this sorts each host's flows
        # of a part together by (end time, StartTime, line).
        self.order = np.lexsort((np.arange(n), end, host, test))
        group = (host * 2 + test)[self.order]
        starts = np.r_[True, group[1:] != group[:-1]]
        self.rank = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        self.position = np.empty(n, dtype=np.int64)
        self.position[self.order] = np.arange(n)
        self.features = features[self.order]

    def build(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(len(rows), 1, 28, 6) float32 windows ending at the given flows, and (len(rows), 28) flow ids (-1: padding)."""
        offsets = np.arange(-(WINDOW - 1), 1)
        pos = self.position[rows]
        valid = (self.rank[pos][:, None] + offsets) >= 0
        at = np.where(valid, pos[:, None] + offsets, 0)
        out = self.features[at]
        out[~valid] = 0.0
        return out[:, None], np.where(valid, self.order[at], -1)


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


def _host_ids(frames: Sequence[pd.DataFrame]) -> list[np.ndarray]:
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
