"""The report builder turns a (tiny) study into every table and plot, with the paper beside us."""

import json

import numpy as np
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


def _central_study(root, config, data, rows: int | None = None) -> dict:
    """A CNN trained centrally for one epoch (SGD, momentum 0.9) on ``data``'s first ``rows`` training
    rows, saved as round 1 of a run folder under ``root`` and studied with TINY settings."""
    import torch
    from torch import nn

    from dipsen.attack import TrainedRun
    from dipsen.federated import RunDir
    from dipsen.models import build_model, calibrate_noise

    run = RunDir.create(root, config)
    torch.manual_seed(1)
    model = build_model("cnn", tuple(data.x_train.shape[1:]), len(data.classes), calibrate_noise(None, 1.0, 0.05, 0.1))
    run.save_checkpoint(0, model.state_dict())
    x, y = torch.from_numpy(data.x_train[:rows]), torch.from_numpy(data.y_train[:rows])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for batch in torch.randperm(len(y)).split(64):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    run.save_checkpoint(1, model.state_dict())
    return study_run(TrainedRun(run.path, data), TINY)


@pytest.fixture(scope="module")
def ctu13_study(tmp_path_factory):
    from dipsen.config import TrainConfig
    from dipsen.data import load_dataset

    config = TrainConfig(dataset="ctu13", model="cnn", rounds=1, seed=1).validate()
    return _central_study(tmp_path_factory.mktemp("runs"), config, load_dataset("ctu13"))


def test_ctu13_report_sets_every_model_figure_beside_trivial_rules(ctu13_study, tmp_path):
    study = ctu13_study
    baselines = study["baselines"]
    assert set(baselines["baselines"]) == {"majority", "one-feature", "tree-bottom-row", "tree-context", "logistic"}
    assert baselines["samples"] == TINY.samples
    assert baselines["sweep"]["eps"] == [0.0, 0.1, 0.5, 1.0]
    assert "domain_limit" in study["sweep"]["single-draw"]
    assert len(study["worst_case"]["per_class"]["single"]) == 2
    results = {"quick": True, "machine": "test machine", "settings": TINY.to_dict(),
               "seconds": {"total": 1.0, "training": 0.5, "attacks": 0.5}, "studies": {"ctu13/cnn": study}}
    text = build_report(results, tmp_path).read_text()
    assert "## How hard is the CTU-13 task?" in text
    stump = baselines["baselines"]["one-feature"]
    assert f"{stump['accuracy']:.3f}" in text and "eps 1 (whole feasible domain)" in text
    if stump["accuracy"] > FIG6[("cnn", "ctu13")]["clean"]:
        assert "sit below this one-feature rule" in text


SOCOFING_SEED = 1  # the subject split (and so the test split's majority rate) depends on it


def _central_socofing_study(root, task: str) -> dict:
    """A CNN trained centrally for one epoch on SOCOFing ``task``, studied with TINY settings."""
    from dipsen.config import TrainConfig

    config = TrainConfig(dataset="socofing", model="cnn", socofing_task=task, rounds=1,
                         seed=SOCOFING_SEED).validate()
    return _central_study(root, config, config.load_dataset(), rows=1500)


@pytest.fixture(scope="module")
def socofing_report(tmp_path_factory):
    studies = {f"{key}/cnn": _central_socofing_study(tmp_path_factory.mktemp("runs"), task)
               for key, task in (("socofing", "hand-finger"), ("socofing-gender", "gender"))}
    results = {"quick": True, "machine": "test machine", "settings": TINY.to_dict(),
               "seconds": {"total": 1.0, "training": 0.5, "attacks": 0.5}, "studies": studies}
    return build_report(results, tmp_path_factory.mktemp("report")).read_text(), studies


def test_reproduce_trains_socofing_on_gender_too():
    from dipsen.report.reproduce import paper_config, study_runs

    runs = study_runs(("mnist", "socofing", "ctu13"))
    assert list(runs) == ["mnist", "socofing", "socofing-gender", "ctu13"]
    assert runs["socofing"] == ("socofing", {}) and runs["socofing-gender"] == ("socofing", {"socofing_task": "gender"})
    assert study_runs(("ctu13", "mnist")) == {"ctu13": ("ctu13", {}), "mnist": ("mnist", {})}
    dataset, overrides = runs["socofing-gender"]
    assert paper_config(dataset, "cnn", quick=True, **overrides).socofing_task == "gender"
    assert paper_config("socofing", "cnn", quick=True).socofing_task == "hand-finger"


def test_summary_shows_socofing_rows_for_both_tasks_with_their_majority_rate(socofing_report):
    from dipsen.data import load_dataset

    text, studies = socofing_report
    for key, task, name in (("socofing", "hand-finger", None), ("socofing-gender", "gender", "male")):
        y_test = load_dataset("socofing", seed=SOCOFING_SEED, socofing_task=task).y_test  # the whole test split
        counts = np.bincount(y_test)
        rate, majority = counts.max() / len(y_test), studies[f"{key}/cnn"]["task"]["classes"][counts.argmax()]
        if name is not None:
            assert majority == name
        ours = studies[f"{key}/cnn"]["clean"]["metrics"]["single"]["accuracy"]
        row = (f"| SOCOFing ({task}) | cnn | {FIG6[('cnn', 'socofing')]['clean']:.3f} / **{ours:.3f}** | "
               f"{rate:.3f} ({majority}) |")
        assert row in text
    assert studies["socofing-gender/cnn"]["baselines"] is None and "How hard is the SOCOFing" not in text


def test_report_says_which_socofing_task_the_papers_figure_can_be_compared_with(socofing_report):
    from dipsen.data import load_dataset

    text, studies = socofing_report
    gender = load_dataset("socofing", seed=SOCOFING_SEED, socofing_task="gender")
    male = np.concatenate([gender.y_train, gender.y_test])
    whole, test_rate = male.mean(), gender.y_test.mean()  # label 1 = male
    paper = FIG6[("cnn", "socofing")]["clean"]
    assert "Which SOCOFing task is the paper's figure for?" in text
    assert f"only {(paper - whole) * 100:.1f} points above the share of 'male' among all {len(male):,} images" in text
    assert f"{(paper - test_rate) * 100:.1f} points above always answering 'male' on our test split ({test_rate:.3f})" in text
    hand_finger = np.bincount(load_dataset("socofing", seed=SOCOFING_SEED).y_test)
    assert f"hand-finger task's majority rate ({hand_finger.max() / hand_finger.sum():.3f}, 10 classes)" in text
    for key, task in (("socofing-gender", "gender"), ("socofing", "hand-finger")):
        ours = studies[f"{key}/cnn"]["clean"]["metrics"]["single"]["accuracy"]
        assert f"Ours, clean (1 draw), {task}: cnn {ours:.3f}." in text
