"""sweep-sigma trains DiPSeN at each noise level and writes the trade-off table, plot and data."""

import json

from PIL import Image

from dipsen.report.sigma import sweep_sigma


def test_quick_sigma_sweep_writes_table_plot_and_data(tmp_path):
    path = sweep_sigma(tmp_path / "sweep", "ctu13", [0.3, 0.0], quick=True)
    results = json.loads((path.parent / "sigma_sweep.json").read_text())["results"]
    assert list(results) == ["cnn", "sigma=0", "sigma=0.3"]
    assert [results[k]["sigma"] for k in ("sigma=0", "sigma=0.3")] == [0.0, 0.3]
    for figures in results.values():
        assert {"clean", "clean_mc", "paper_pgd", "adaptive_pgd"} <= set(figures)
        assert all(0.0 <= figures[k] <= 1.0 for k in ("clean", "paper_pgd", "adaptive_pgd"))
    assert "| sigma=0.3 |" in path.read_text()
    with Image.open(path.parent / "sigma_sweep.png") as image:
        assert image.format == "PNG"
