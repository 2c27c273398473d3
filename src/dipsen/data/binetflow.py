"""Reader for CTU-13 ``.binetflow`` files: Argus bidirectional NetFlow records as CSV, gzipped or not.

The original header is ``StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,TotPkts,
TotBytes,SrcBytes,Label``; columns are found by name, and only those in ``REQUIRED`` must be present.
A row is malformed when its number of fields differs from the header's, its StartTime does not parse,
Dur/TotPkts/TotBytes/SrcBytes is not a non-negative number, or SrcAddr is empty. Labels must contain
``Botnet``, ``Normal`` or ``Background`` (checked in that order, as CTU-13 labels such as
``flow=From-Botnet-V47-TCP-Attempt-SPAM`` are descriptive strings).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dipsen.data._io import read_bytes
from dipsen.errors import DataError

REQUIRED = ("StartTime", "Dur", "Proto", "SrcAddr", "Dport", "TotPkts", "TotBytes", "SrcBytes", "Label")
COUNTERS = ("Dur", "TotPkts", "TotBytes", "SrcBytes")
TIME_FORMAT = "%Y/%m/%d %H:%M:%S.%f"
BOTNET, NORMAL, BACKGROUND = 1, 0, -1
KIND_NAMES = {BOTNET: "botnet", NORMAL: "normal", BACKGROUND: "background"}
_UNKNOWN = 127


@dataclass(frozen=True)
class Flows:
    """Validated flows of one file, in file order.

    ``frame`` columns: time (int64 microseconds since the epoch, as written, no time zone), SrcAddr,
    Proto, Dport (str), Dur, TotPkts, TotBytes, SrcBytes (float64, finite, >= 0), kind (int8: BOTNET,
    NORMAL or BACKGROUND), line (1-based line number in the file). ``skipped_lines`` lists the malformed
    lines dropped with ``bad_rows="skip"``.
    """

    path: Path
    frame: pd.DataFrame
    skipped_lines: list[int]


def read_binetflow(path: Path, bad_rows: str = "error") -> Flows:
    """Parse and validate one .binetflow file.

    ``bad_rows="error"`` raises DataError naming the file and the first malformed line (1-based);
    ``"skip"`` drops malformed rows. An unknown label or a missing column is always an error.
    """
    raw = read_bytes(path)
    names = _header(path, raw)
    field_errors = _field_count_errors(raw, len(names))
    frame = pd.read_csv(
        io.BytesIO(raw),
        usecols=list(REQUIRED),
        dtype=str,
        na_filter=False,
        quoting=csv.QUOTE_NONE,
        skip_blank_lines=False,
        skipinitialspace=True,
        skiprows=[line - 1 for line in field_errors],  # pandas counts lines from 0
        encoding_errors="replace",
    )
    lines = np.arange(2, len(frame) + len(field_errors) + 2)
    lines = lines[~np.isin(lines, list(field_errors))]
    flows = pd.DataFrame({"line": lines})
    times = pd.to_datetime(frame["StartTime"], format=TIME_FORMAT, errors="coerce")
    bad = pd.Series("", index=frame.index)
    bad[times.isna()] = "StartTime is not a date"
    for column in COUNTERS:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad[(bad == "") & ~((values >= 0) & (values < np.inf))] = f"{column} is not a non-negative number"
        flows[column] = values.astype(np.float64)
    bad[(bad == "") & (frame["SrcAddr"] == "")] = "SrcAddr is empty"
    value_errors = {int(line): reason for line, reason in zip(lines[bad != ""], bad[bad != ""], strict=True)}

    errors = {**field_errors, **value_errors}
    if errors and bad_rows == "error":
        first = min(errors)
        raise DataError(
            f"{path}: line {first}: malformed row ({errors[first]}); {len(errors)} malformed row(s) in all, "
            "bad_rows='skip' drops them"
        )
    ok = (bad == "").to_numpy()
    flows = flows[ok].reset_index(drop=True)
    frame = frame[ok].reset_index(drop=True)
    flows["time"] = times[ok].to_numpy().astype("datetime64[us]").astype(np.int64)
    for column in ("SrcAddr", "Proto", "Dport"):
        flows[column] = frame[column]
    flows["kind"] = _kinds(path, frame["Label"], flows["line"])
    return Flows(path, flows, sorted(errors))


def _header(path: Path, raw: bytes) -> list[str]:
    end = raw.find(b"\n")
    first = raw[: end if end >= 0 else len(raw)].decode("utf-8-sig", errors="replace").strip()
    if not first:
        raise DataError(f"{path}: empty file or empty header line")
    names = [name.strip() for name in first.split(",")]
    for column in REQUIRED:
        if column not in names:
            raise DataError(f"{path}: missing column {column!r} in the header (found: {','.join(names)})")
    return names


def _field_count_errors(raw: bytes, n_fields: int) -> dict[int, str]:
    """1-based line number -> reason, for data lines whose comma count differs from the header's.

    Counted with numpy on the raw bytes, because pandas pads short rows silently and reports
    long rows without a usable line number.
    """
    buf = np.frombuffer(raw, dtype=np.uint8)
    line_ends = np.flatnonzero(buf == ord("\n"))
    if len(buf) and buf[-1] != ord("\n"):
        line_ends = np.append(line_ends, len(buf))  # last line without a newline
    comma_lines = np.searchsorted(line_ends, np.flatnonzero(buf == ord(",")))
    commas = np.bincount(comma_lines, minlength=len(line_ends))
    wrong = np.flatnonzero(commas[1:] != n_fields - 1) + 1  # skip the header (index 0)
    return {int(i) + 1: f"expected {n_fields} fields, found {commas[i] + 1}" for i in wrong}


def _kinds(path: Path, labels: pd.Series, lines: pd.Series) -> np.ndarray:
    codes, distinct = pd.factorize(labels)  # a capture has a few dozen distinct labels: classify those
    kind = np.array([_kind(label) for label in distinct], dtype=np.int8)[codes]
    unknown = np.flatnonzero(kind == _UNKNOWN)
    if len(unknown):
        i = unknown[0]
        raise DataError(
            f"{path}: line {lines[i]}: unknown label {labels[i]!r} "
            f"(expected one containing Botnet, Normal or Background); {len(unknown)} such row(s)"
        )
    return kind


def _kind(label: str) -> int:
    for tag, value in (("Botnet", BOTNET), ("Normal", NORMAL), ("Background", BACKGROUND)):
        if tag in label:
            return value
    return _UNKNOWN
