"""sweep-sigma trains DiPSeN at each noise level and writes the trade-off table, plot and data."""

import json

import pytest
from PIL import Image

from dipsen.attack.study import StudySettings
from dipsen.certify.pixeldp import l2_size
from dipsen.errors import DipsenError
from dipsen.models import calibrate_noise
from dipsen.report.reproduce import open_output
from dipsen.report.sigma import RADII, sweep_sigma


def test_quick_sigma_sweep_writes_table_plot_and_data(tmp_path):
    path = sweep_sigma(tmp_path / "sweep", "ctu13", [0.3, 0.0], quick=True)
    sweep = json.loads((path.parent / "sigma_sweep.json").read_text())
    results = sweep["results"]
    assert list(results) == ["cnn", "sigma=0", "sigma=0.3"]
    assert [results[k]["sigma"] for k in ("sigma=0", "sigma=0.3")] == [0.0, 0.3]
    for figures in results.values():
        assert {"clean", "clean_mc", "paper_pgd", "adaptive_pgd", "certified"} <= set(figures)
        assert all(0.0 <= figures[k] <= 1.0 for k in ("clean", "paper_pgd", "adaptive_pgd"))
    # no noise, no certificate: the CNN and sigma 0 have none; DiPSeN's PixelDP certificate on the sweep's examples
    assert results["cnn"]["certified"] == results["sigma=0"]["certified"] == {"0.5": None, "1": None}
    certified = results["sigma=0.3"]["certified"]
    assert list(certified) == list(RADII) and all(0.0 <= c <= 1.0 for c in certified.values())
    assert certified["1"] <= certified["0.5"]
    # PixelDP certifies no L2 radius above its eps = 1 size: sigma 0.3 reaches neither 0.5 nor 1 (both certified at 0)
    assert l2_size(1.0, calibrate_noise(0.3)) < 0.5 and certified == {"0.5": 0.0, "1": 0.0}
    # an L2 certificate and the L-inf PGD are different threat models: neither bounds the other, so no order is asserted
    assert sweep["certify"]["method"] == "pixeldp" and sweep["certify"]["samples"] == sweep["settings"]["samples"]
    text = path.read_text()
    assert "| sigma=0.3 |" in text and "| cnn |" in text
    assert "| certified: L2 r = 0.5 | certified: L2 r = 1 |" in text
    assert f"n = {sweep['certify']['n']} noise draws per example at alpha {sweep['certify']['alpha']:g}" in text
    assert text.count(" | — | — |") == 2  # the CNN's and sigma 0's rows
    with Image.open(path.parent / "sigma_sweep.png") as image:
        assert image.format == "PNG"


def test_a_sweep_begun_without_certificates_is_refused(tmp_path):
    options = {"dataset": "ctu13", "sigmas": [0.3], "quick": True, "settings": StudySettings.quick().to_dict()}
    open_output(tmp_path, options, resume=False)  # as the version without certificates recorded them
    with pytest.raises(DipsenError, match=r"options.json records no certify, so its runs are not this version's"):
        sweep_sigma(tmp_path, "ctu13", [0.3], quick=True, resume=True)
    assert not (tmp_path / "runs").exists()
