"""The report builder turns a (tiny) study into every table and plot, with the paper beside us."""

import json

import pytest
from PIL import Image

from dipsen.attack import Budget
from dipsen.attack.study import StudySettings, study_run
from dipsen.report import build_report
from dipsen.report.paper import FIG6

TINY = StudySettings(samples=12, mc_samples=2, eot_draws=2, paper_budget=Budget(3, 1 / 3, 0),
                     adaptive_budget=Budget(3, 1 / 3, 1, queries=5, hsj_iterations=1, hsj_evaluations=10),
                     doubling_samples=6, hsj_samples=2, stale_rounds=1, attacker_samples=200, surrogate_epochs=1,
                     sweep_eps=(0.1, 0.5), sweep_samples=10, sweep_budget=Budget(3, 1 / 3, 0), sweep_eot_draws=2)


@pytest.fixture(scope="module")
def report(cnn_run, dipsen_run, tmp_path_factory):
    studies = {"mnist/cnn": study_run(cnn_run, TINY), "mnist/dipsen": study_run(dipsen_run, TINY)}
    results = {"quick": True, "machine": "test machine", "settings": TINY.to_dict(),
               "seconds": {"total": 60.0, "training": 20.0, "attacks": 40.0}, "studies": studies}
    out = tmp_path_factory.mktemp("report")
    return build_report(results, out), studies


def test_every_table_and_plot_is_written(report):
    path, _ = report
    text = path.read_text()
    for heading in ("Summary (the paper's Fig. 6)", "What survives", "Baseline accuracy (the paper's Table I and Fig. 3)",
                    "Training overhead per step (the paper's Fig. 4)", "Robustness against eps (the paper's Fig. 5)",
                    "Every attack, every threat model", "Where could the paper's figures come from?"):
        assert f"## {heading}" in text
    for png in ("fig6_summary.png", "fig3_baseline.png", "fig4_overhead.png", "fig5_mnist.png"):
        assert f"({png})" in text
        with Image.open(path.parent / png) as image:
            assert image.format == "PNG" and image.width > 300
    html = (path.parent / "report.html").read_text()
    assert html.count("<table>") == text.count("\n|---") and "<img src='fig6_summary.png'" in html


def test_tables_show_the_paper_next_to_our_measurements(report):
    path, studies = report
    text = path.read_text()
    ours = studies["mnist/dipsen"]["paper"]["pgd"]["metrics"]["single"]["accuracy"]
    assert f"{FIG6[('dipsen', 'mnist')]['pgd']:.3f} / **{ours:.3f}**" in text
    for threat in ("orange-box", "transfer", "query"):
        assert threat in text


def test_every_number_is_also_json(report):
    path, studies = report
    results = json.loads((path.parent / "results.json").read_text())
    assert results["studies"] == json.loads(json.dumps(studies))
    dipsen = results["studies"]["mnist/dipsen"]
    assert set(dipsen["paper"]) == {"fgsm", "bim", "pgd"}
    assert {"pgd", "apgd-ce", "apgd-dlr", "pgd-frozen-noise"} <= set(dipsen["adaptive"])
    assert set(dipsen["threats"]) == {"orange-box", "transfer", "square", "hsj"}
    assert dipsen["sweep"]["eps"] == [0.0, 0.1, 0.5] and "adaptive" in dipsen["sweep"]
    assert set(dipsen["variants"]) == {"clipped-probabilities", "noise-off-at-inference"}


def test_plots_carry_the_papers_figures_beside_ours(report, tmp_path, monkeypatch):
    from dipsen.report import build

    _, studies = report
    calls = {}
    real = build.plots.grouped_bars

    def recording(groups, series, title, *args, **kwargs):
        calls[title] = series
        return real(groups, series, title, *args, **kwargs)

    monkeypatch.setattr(build.plots, "grouped_bars", recording)
    results = {"quick": True, "machine": "test machine", "settings": TINY.to_dict(),
               "seconds": {"total": 1.0, "training": 0.5, "attacks": 0.5}, "studies": studies}
    build.build_report(results, tmp_path)
    assert calls["Accuracy under attack at eps 0.3"]["paper: PGD"] == [FIG6["cnn", "mnist"]["pgd"], FIG6["dipsen", "mnist"]["pgd"]]
    assert calls["Clean accuracy"]["paper"] == [FIG6["cnn", "mnist"]["clean"], FIG6["dipsen", "mnist"]["clean"]]
