"""The report's "What can be certified" section, from ``results["certified"]``.

Input: ``{"DATASET/RUN": {"certificate": certify_run's record, "attacked": {radius: accuracy} or None}}``
where RUN is ``cnn-smooth-SIGMA`` (randomized smoothing of a CNN trained with that input noise) or
``dipsen`` (the PixelDP certificate of its noise layer). Figures are only ever read from the input.
"""

from __future__ import annotations

from pathlib import Path

from . import plots
from .paper import DATASET_NAMES
from .render import Block, Heading, Image, Paragraph, Table

TABLE_RADII = ("0", "0.25", "0.5", "1")


def certified_section(certified: dict, out: Path) -> list[Block]:
    """Certified accuracy per radius and data set, with the L2 attack's accuracy beside every smoothing figure."""
    if not certified:
        return []
    blocks: list[Block] = [
        Heading("What can be certified"),
        Paragraph(
            "Certified accuracy: the share of examples whose certified prediction is correct with a certified L2 "
            "radius of at least r (an abstention counts as wrong); each certificate fails with probability at most "
            "alpha. Randomized smoothing (Cohen et al. 2019) certifies a CNN trained with Gaussian input noise of std "
            "sigma on every client (`--input-noise`); PixelDP (Lecuyer et al. 2019) certifies DiPSeN's own noise layer, "
            "never beyond eps = 1 of the Gaussian mechanism, i.e. L2 0.1 with the defaults. 'L2 attack' is the smoothed "
            "classifier's accuracy under PGD on its expected softmax at that radius: a certified figure above it would "
            "be a broken certificate. For scale: the paper's L-inf 0.3 on a 28x28 image allows L2 changes up to 8.4."
        ),
    ]
    rows = []
    for label, entry in certified.items():
        record, attacked = entry["certificate"], entry.get("attacked")
        dataset = label.split("/", 1)[0]
        sizes = f"{record['samples']} / {record['n']} / {record['alpha']:g}"
        cells = [DATASET_NAMES.get(dataset, dataset), _certificate_name(record), sizes]
        for r in TABLE_RADII:
            certified_at = record["certified_accuracy"].get(r)
            attacked_at = None if attacked is None else attacked.get(r)
            cell = "—" if certified_at is None else f"{certified_at:.3f}"
            cells.append(cell if attacked_at is None else f"{cell} (L2 attack {attacked_at:.3f})")
        rows.append(cells)
    headers = ["data set", "certificate", "examples / n / alpha", *[f"r = {r}" for r in TABLE_RADII]]
    blocks.append(Table(headers, rows))
    broken = [
        f"{label} at r = {r}"
        for label, entry in certified.items()
        for r, value in entry["certificate"]["certified_accuracy"].items()
        if entry.get("attacked") and r in entry["attacked"] and value > entry["attacked"][r]
    ]
    blocks.append(
        Paragraph(
            "**Check failed**: certified accuracy above the attacked accuracy at " + ", ".join(broken) + "."
            if broken
            else "Check: no certified figure is above the L2 attack's accuracy at the same radius."
        )
    )
    for dataset in dict.fromkeys(label.split("/", 1)[0] for label in certified):
        curves = {
            _certificate_name(e["certificate"]): e["certificate"]["certified_accuracy"]
            for label, e in certified.items()
            if label.startswith(dataset + "/")
        }
        name = f"certified_{dataset}.png"
        plots.certified_accuracy(curves, f"{DATASET_NAMES.get(dataset, dataset)}: certified accuracy", out / name)
        blocks.append(Image(name, f"{DATASET_NAMES.get(dataset, dataset)}: certified accuracy against L2 radius"))
    return blocks


def _certificate_name(record: dict) -> str:
    return f"smoothed CNN, sigma {record['sigma']:g}" if record["method"] == "smoothing" else "DiPSeN, PixelDP"
