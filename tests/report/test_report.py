"""The report builder turns a (tiny) study into every table and plot, with the paper beside us."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dipsen.attack import Budget
from dipsen.attack.study import StudySettings, study_run, sweep_verdict
from dipsen.report import build_report
from dipsen.report.paper import FIG6

TINY = StudySettings(
    samples=12,
    mc_samples=2,
    eot_draws=2,
    paper_budget=Budget(3, 1 / 3, 0),
    adaptive_budget=Budget(3, 1 / 3, 1, queries=5, hsj_iterations=1, hsj_evaluations=10),
    doubling_samples=6,
    hsj_samples=2,
    stale_rounds=1,
    attacker_samples=200,
    surrogate_epochs=1,
    sweep_eps=(0.1, 0.5),
    sweep_samples=10,
    sweep_budget=Budget(3, 1 / 3, 0),
    sweep_eot_draws=2,
)


def _fat_study(cnn: dict, clean: float = 0.951, pgd: float = 0.902, worst: float = 0.873) -> dict:
    """A stand-in FAT study: the CNN's study with its own figures, its eps sweep staying high (masking)."""
    study = copy.deepcopy(cnn)
    for rule in ("single", "mc"):
        study["clean"]["metrics"][rule]["accuracy"] = clean
        study["paper"]["pgd"]["metrics"][rule]["accuracy"] = pgd
        study["worst_case"][rule]["all"] = worst
    curve = study["sweep"]["single-draw"]
    curve["single"] = curve["mc"] = [clean, 0.61, 0.42]
    curve["verdict"] = sweep_verdict(curve["mc"], study["sweep"]["eps"][-1], study["sweep"]["chance"])
    for rule in ("single", "mc"):  # doubling the iterations changed nothing
        study["doubling"][rule]["doubled"] = study["doubling"][rule]["base"]
    study["doubling"]["converged"] = True
    study["paper"]["fgsm"]["crafted_on"] = "final global model (round 60)"  # trained longer than the CNN
    if cnn["training_cost"]:
        study["training_cost"] = {"mean_step_seconds": cnn["training_cost"]["mean_step_seconds"] * 2.5}
    return study


def _certificate(method: str, accuracy: float, certified: dict[str, float], sigma: float = 0.25) -> dict:
    record = {
        "method": method,
        "sigma": sigma,
        "samples": 10,
        "n": 100,
        "alpha": 0.001,
        "accuracy": accuracy,
        "certified_accuracy": certified,
    }
    return {
        "certificate": record,
        "attacked": {r: min(1.0, v + 0.05) for r, v in certified.items()} if method == "smoothing" else None,
    }


CERTIFIED = {
    "mnist/cnn-smooth-0.25": _certificate("smoothing", 0.9, {"0": 0.9, "0.25": 0.8, "0.5": 0.612, "1": 0.331}),
    "mnist/dipsen": _certificate("pixeldp", 0.8, {"0": 0.8, "0.25": 0.0, "0.5": 0.0}),
}
TRAINING_SECONDS = {"mnist/cnn": 120.0, "mnist/dipsen": 132.0, "mnist/cnn-fat": 300.0, "mnist/cnn-smooth-0.25": 126.0}


@pytest.fixture(scope="module")
def report(cnn_run, dipsen_run, tmp_path_factory):
    from dipsen.report.defences import defences_record

    studies = {"mnist/cnn": study_run(cnn_run, TINY), "mnist/dipsen": study_run(dipsen_run, TINY)}
    studies["mnist/cnn-fat"] = _fat_study(studies["mnist/cnn"])
    results = {
        "quick": True,
        "machine": "test machine",
        "settings": TINY.to_dict(),
        "seconds": {"total": 60.0, "training": 20.0, "attacks": 40.0},
        "studies": studies,
        "certified": CERTIFIED,
        "training_seconds": TRAINING_SECONDS,
        "defences": defences_record(TINY.eps),
    }
    out = tmp_path_factory.mktemp("report")
    return build_report(results, out), studies


def test_every_table_and_plot_is_written(report):
    path, _ = report
    text = path.read_text()
    for heading in (
        "Summary (the paper's Fig. 6)",
        "What survives",
        "Baseline accuracy (the paper's Table I and Fig. 3)",
        "Training overhead per step (the paper's Fig. 4)",
        "Robustness against eps (the paper's Fig. 5)",
        "Every attack, every threat model",
        "Where could the paper's figures come from?",
        "Defences compared",
        "What can be certified",
    ):
        assert f"## {heading}" in text
    for png in ("fig6_summary.png", "fig3_baseline.png", "fig4_overhead.png", "fig5_mnist.png", "defences.png"):
        assert f"({png})" in text
        with Image.open(path.parent / png) as image:
            assert image.format == "PNG" and image.width > 300
    html = (path.parent / "report.html").read_text()
    assert html.count("<table>") == text.count("\n|---") and '<img src="fig6_summary.png"' in html
    assert "<li>MNIST: DiPSeN under the paper's own protocol" in html  # What survives: a list, not a run-on paragraph


def test_tables_show_the_paper_next_to_our_measurements(report):
    path, studies = report
    text = path.read_text()
    ours = studies["mnist/dipsen"]["paper"]["pgd"]["metrics"]["single"]["accuracy"]
    assert f"{FIG6[('dipsen', 'mnist')]['pgd']:.3f} / **{ours:.3f}**" in text
    for threat in ("orange-box", "transfer", "query"):
        assert threat in text


def test_a_cascaded_attacks_figure_is_marked_as_the_cascades_never_as_a_standalone_one(report):
    from dipsen.report.build import CASCADE_NOTE, _coverage

    path, studies = report
    text = path.read_text()
    assert CASCADE_NOTE in text and "ran as a cascade" in text and "as a cascade: the paper's attacks on all 12" in text
    for study in studies.values():
        for result in (*study["adaptive"].values(), *study["threats"].values()):
            attacked = result["attacked"].count("1")
            figures = f"{result['metrics']['single']['accuracy']:.3f} / {result['metrics']['mc']['accuracy']:.3f}"
            assert f"{figures} (cascade: {attacked} of {result['samples']} attacked)" in text
        assert "cascade" not in study["paper"]["pgd"] and _coverage(study["paper"]["pgd"], 12) == ""
    # a study with every attack on every example: its figures as they are, a shorter run's with its n
    assert _coverage({"samples": 12}, 12) == "" and _coverage({"samples": 2}, 12) == " (n=2)"


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


def test_a_study_trained_in_bfloat16_says_so_and_a_float32_one_says_nothing_of_it(report, tmp_path):
    path, _ = report
    results = json.loads((path.parent / "results.json").read_text())
    float32 = path.read_text()
    assert "train_dtype" not in results and "autocast" not in float32  # a study from before the option: float32
    text = build_report({**results, "train_dtype": "bfloat16"}, tmp_path).read_text()
    said = ", every model trained in bfloat16 autocast (evaluation, attacks and certificates in float32),"
    caption = " Every step under bfloat16 autocast (`--train-dtype`)."
    assert f"on test machine{said} in 1.0 min" in text and caption in text
    assert text.replace(said, "").replace(caption, "") == float32  # and nothing else changes
    assert json.loads((tmp_path / "results.json").read_text())["train_dtype"] == "bfloat16"
    assert build_report({**results, "train_dtype": "float32"}, tmp_path).read_text() == float32


def test_plots_carry_the_papers_figures_beside_ours(report, tmp_path, monkeypatch):
    from dipsen.report import build

    _, studies = report
    calls = {}
    real = build.plots.grouped_bars

    def recording(groups, series, title, *args, **kwargs):
        calls[title] = series
        return real(groups, series, title, *args, **kwargs)

    monkeypatch.setattr(build.plots, "grouped_bars", recording)
    results = {
        "quick": True,
        "machine": "test machine",
        "settings": TINY.to_dict(),
        "seconds": {"total": 1.0, "training": 0.5, "attacks": 0.5},
        "studies": studies,
        "certified": CERTIFIED,
    }
    build.build_report(results, tmp_path)
    # the paper has no FAT model: a gap beside ours
    paper = [FIG6["cnn", "mnist"], FIG6["dipsen", "mnist"], {}]
    assert calls["Accuracy under attack at eps 0.3"]["paper: PGD"] == [figures.get("pgd") for figures in paper]
    assert calls["Clean accuracy"]["paper"] == [figures.get("clean") for figures in paper]
    defences = calls["Defences: clean against worst-case accuracy"]
    models = ("cnn", "dipsen", "cnn-fat")
    assert defences["clean (mean of 2)"] == [studies[f"mnist/{m}"]["clean"]["metrics"]["mc"]["accuracy"] for m in models] + [0.9]
    assert defences["adaptive worst case at eps 0.3 (mean of 2)"] == [
        studies[f"mnist/{m}"]["worst_case"]["mc"]["all"] for m in models
    ] + [None]
    assert defences["certified at L2 r = 0.5"] == [None, 0.0, None, 0.612]
    steps = {m: studies[f"mnist/{m}"]["training_cost"]["mean_step_seconds"] for m in models}
    overhead = calls["Training time per step against the CNN's"]
    assert overhead == {
        "dipsen / cnn time per step": [steps["dipsen"] / steps["cnn"]],
        "cnn-fat / cnn time per step": [pytest.approx(2.5)],
    }


def test_fat_rows_sit_beside_the_cnn_and_dipsen_without_a_paper_figure(report):
    path, studies = report
    text = path.read_text()
    fat = studies["mnist/cnn-fat"]
    assert "| MNIST | cnn-fat | — / **0.951** | " in text and "| — / **0.902** | 0.873 / 0.873 |" in text  # Fig. 6 summary
    assert "cnn-fat: the CNN with FAT (see 'Defences compared'); the paper has no such model (—)." in text
    assert "| MNIST | cnn-fat | — | 0.951 | 0.951 |" in text  # baseline
    steps = {m: studies[f"mnist/{m}"]["training_cost"]["mean_step_seconds"] for m in ("cnn", "dipsen", "cnn-fat")}
    assert f"| +0.9% | {steps['cnn-fat'] * 1e3:.2f} | 2.50× |" in text  # overhead: FAT's time per step against the CNN's
    curve = fat["sweep"]["single-draw"]["attack"]
    assert f"| cnn-fat | {curve} (1 draw) | 0.951 | 0.610 | 0.420 | attack not shown to work" in text
    assert "| cnn: 1 draw / mean of 2 | dipsen: 1 draw / mean of 2 | cnn-fat: 1 draw / mean of 2 |" in text  # details
    # a defence outside this study (no MNIST run under label skew here) has no column, row or description
    assert "cnn-fat-dirichlet" not in text and "label skew" not in text
    assert "| worst case | all attacks above (mean of 2) |" in text and " | 0.873 |  |" in text
    # each attack names what it was crafted on; where the models' rounds differ, each model's
    cnn_source = studies["mnist/cnn"]["paper"]["fgsm"]["crafted_on"]
    assert f"| cnn: {cnn_source}; dipsen: {cnn_source}; cnn-fat: final global model (round 60) |" in text
    assert f"| {studies['mnist/cnn']['paper']['bim']['crafted_on']} |" in text
    # the paper's claim is DiPSeN's: the verdicts name no other model; its protocol variants are the paper's models only
    survives = text.split("## What survives")[1].split("##")[0]
    assert "cnn-fat" not in survives and "FAT" not in survives
    variants = text.split("## Where could the paper's figures come from?")[1].split("##")[0]
    assert "| cnn-fat |" not in variants and "| dipsen |" in variants


def test_defences_compared_reads_every_figure_from_the_input(report):
    path, studies = report
    text = path.read_text()
    section = text.split("## Defences compared")[1].split("\n## ")[0]
    cnn, dipsen = studies["mnist/cnn"], studies["mnist/dipsen"]
    clean = {m: s["clean"]["metrics"] for m, s in (("cnn", cnn), ("dipsen", dipsen))}
    pgd = {m: s["paper"]["pgd"]["metrics"]["single"]["accuracy"] for m, s in (("cnn", cnn), ("dipsen", dipsen))}
    worst = {m: s["worst_case"] for m, s in (("cnn", cnn), ("dipsen", dipsen))}
    assert (
        f"| MNIST | CNN (no defence) | {clean['cnn']['single']['accuracy']:.3f} | {pgd['cnn']:.3f} | "
        f"{worst['cnn']['single']['all']:.3f} | — | — | 2.0 | 1.00× | "
    ) in section
    assert (
        f"| MNIST | DiPSeN | {clean['dipsen']['single']['accuracy']:.3f} / {clean['dipsen']['mc']['accuracy']:.3f} | "
        f"{pgd['dipsen']:.3f} | {worst['dipsen']['single']['all']:.3f} / {worst['dipsen']['mc']['all']:.3f} | "
        "0.000 | — | 2.2 | 1.10× | "
    ) in section
    assert (
        "| MNIST | FAT (cnn-fat) | 0.951 | 0.902 | 0.873 | — | — | 5.0 | 2.50× | "
        "**eps sweep stays at 0.42 at eps 0.5: possible gradient masking**; doubling the iterations: converged |"
    ) in section
    unattacked = "not attacked (certified in L2 only)"
    assert (
        f"| MNIST | smoothed CNN, sigma 0.25 | 0.900 (certified prediction, 10 examples) | {unattacked} | {unattacked} | "
        "0.612 | 0.331 | 2.1 | 1.05× | — |"
    ) in section
    # the reading under the table follows the figures: FAT keeps the most here, and its checks fail
    assert max(worst[m]["mc"]["all"] for m in worst) < 0.873
    assert (
        f"FAT (cnn-fat) keeps the most, at clean accuracy 0.951 (mean of 2) against the CNN's "
        f"{clean['cnn']['mc']['accuracy']:.3f}, for 2.50 times the CNN's training time. Its attack checks fail"
    ) in section
    assert (
        "Certified at L2 r = 0.5 (a different threat model, not comparable with L-inf eps 0.3): "
        "0.612 for the smoothed CNN, sigma 0.25."
    ) in section
    assert (
        "on MNIST, a share 1 of every client's mini-batch loss on pgd (3 steps) adversarial examples at eps 0.3, "
        "cyclic learning rate peaking at 0.004"
    ) in section


def test_the_defences_say_which_model_of_each_fat_run_the_study_attacked():
    from dipsen.report.defences import FAT_COLLAPSE_DROP, _introduction, defences_record
    from dipsen.report.reproduce import study_configs

    attacked, _ = study_configs(("mnist", "ctu13"), False, TINY)  # the guard is on for every FAT run, off for the others
    assert {label: c.robust_collapse for label, c in attacked.items() if c.robust_collapse is not None} == {
        "mnist/cnn-fat": FAT_COLLAPSE_DROP,
        "mnist/cnn-fat-dirichlet": FAT_COLLAPSE_DROP,
        "ctu13/cnn-fat": FAT_COLLAPSE_DROP,
    }

    collapse = {"round": 50, "best_round": 40, "best": 0.81, "at": 0.07, "drop": 0.2, "model": "best_robust.pt"}
    results = {
        "defences": defences_record(0.3),
        "studies": {"mnist/cnn-fat": {"final_round": 60, "collapse": None}, "mnist/cnn-fat-dirichlet": {"final_round": 40}},
    }
    results["studies"]["mnist/cnn-fat-dirichlet"]["collapse"] = collapse
    text = _introduction(results, ["mnist"])
    assert FAT_COLLAPSE_DROP == 0.2 and text.count("falls more than 0.2 below its best (a best of at least 0.3") == 2
    assert "The study attacks, on MNIST, the final round's model (round 60)." in text
    assert (
        "The study attacks, on MNIST, the best-robust model of round 40 (robust accuracy 0.810 on the validation slice), "
        "not the final one: the collapse guard stopped training at round 50, where it had fallen to 0.070."
    ) in text
    # a study saved before the guard, of a run set without it: the final model, and no guard named
    old = {"defences": {"cnn-fat": {"model": "cnn", "datasets": {"mnist": {"adv_train": "pgd"}}}}}
    text = _introduction({**old, "studies": {"mnist/cnn-fat": {"final_round": 60}}}, ["mnist"])
    assert "collapse guard" not in text and "The study attacks, on MNIST, the final round's model (round 60)." in text


def test_the_reading_names_no_defence_when_none_beats_the_cnn(report, tmp_path):
    _, studies = report
    cnn = studies["mnist/cnn"]
    weak = {"mnist/cnn": cnn, "mnist/cnn-fat": _fat_study(cnn, worst=cnn["worst_case"]["mc"]["all"])}
    weak["mnist/cnn-fat"]["sweep"]["single-draw"]["mc"][-1] = 0.0
    results = {
        "quick": True,
        "machine": "test machine",
        "settings": TINY.to_dict(),
        "seconds": {"total": 1.0, "training": 0.5, "attacks": 0.5},
        "studies": weak,
    }
    text = build_report(results, tmp_path).read_text()
    assert "No defence keeps more worst-case accuracy than the undefended CNN." in text
    assert "| — | — | — | — | eps sweep falls to 0.00 at eps 0.5; doubling the iterations: converged |\n" in text
    worst = cnn["worst_case"]["mc"]["all"]
    assert f"| MNIST | FAT (cnn-fat) | 0.951 | 0.902 | {worst:.3f} | — | — | — | — | " in text  # no times, no certificate


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
    results = {
        "quick": True,
        "machine": "test machine",
        "settings": TINY.to_dict(),
        "seconds": {"total": 1.0, "training": 0.5, "attacks": 0.5},
        "studies": {"ctu13/cnn": study, "ctu13/cnn-fat": _fat_study(study)},
    }
    text = build_report(results, tmp_path).read_text()
    assert "## How hard is the CTU-13 task?" in text
    assert "| **cnn-fat** (1 draw) | 0.951 |" in text and "| CTU-13 | FAT (cnn-fat) | 0.951 |" in text
    assert "label skew" not in text  # an MNIST-only variant of FAT: neither described nor explained away on CTU-13
    stump = baselines["baselines"]["one-feature"]
    assert f"{stump['accuracy']:.3f}" in text and "eps 1 (whole feasible domain)" in text
    if stump["accuracy"] > FIG6[("cnn", "ctu13")]["clean"]:
        assert "sit below this one-feature rule" in text


SOCOFING_SEED = 1  # the subject split (and so the test split's majority rate) depends on it


def _central_socofing_study(root, task: str) -> dict:
    """A CNN trained centrally for one epoch on SOCOFing ``task``, studied with TINY settings."""
    from dipsen.config import TrainConfig

    config = TrainConfig(dataset="socofing", model="cnn", socofing_task=task, rounds=1, seed=SOCOFING_SEED).validate()
    return _central_study(root, config, config.load_dataset(), rows=1500)


@pytest.fixture(scope="module")
def socofing_report(tmp_path_factory):
    studies = {
        f"{key}/cnn": _central_socofing_study(tmp_path_factory.mktemp("runs"), task)
        for key, task in (("socofing", "hand-finger"), ("socofing-gender", "gender"))
    }
    results = {
        "quick": True,
        "machine": "test machine",
        "settings": TINY.to_dict(),
        "seconds": {"total": 1.0, "training": 0.5, "attacks": 0.5},
        "studies": studies,
    }
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


def test_reproduce_trains_fat_on_mnist_and_ctu13_and_smooths_mnist_at_three_sigmas():
    from dipsen.report.defences import DEFENCES
    from dipsen.report.reproduce import QUICK_TRAINING, STUDY_EVAL_EVERY, study_configs

    for quick in (True, False):
        attacked, smoothed = study_configs(("mnist", "socofing", "ctu13"), quick, TINY)
        assert list(attacked) == [
            "mnist/cnn",
            "mnist/dipsen",
            "mnist/cnn-fat",
            "mnist/cnn-fat-dirichlet",
            "socofing/cnn",
            "socofing/dipsen",
            "socofing-gender/cnn",
            "socofing-gender/dipsen",
            "ctu13/cnn",
            "ctu13/dipsen",
            "ctu13/cnn-fat",
        ]
        assert not any("fat" in label for label in smoothed)
        mnist_sigmas = ["0.25"] if quick else ["0.25", "0.5", "1"]  # quick: the first sigma only
        assert list(smoothed) == [
            *[f"mnist/cnn-smooth-{s}" for s in mnist_sigmas],
            "socofing/cnn-smooth-0.25",
            "ctu13/cnn-smooth-0.25",
        ]
        assert {c.eval_every for c in [*attacked.values(), *smoothed.values()]} == {STUDY_EVAL_EVERY}
        for dataset in ("mnist", "ctu13"):
            fat, cnn = attacked[f"{dataset}/cnn-fat"], attacked[f"{dataset}/cnn"]
            method = {"mnist": "pgd", "ctu13": "fgsm-rs"}[dataset]
            assert (fat.model, fat.adv_train, fat.adv_eps, fat.keep_checkpoints) == ("cnn", method, TINY.eps, "last-2")
            own = DEFENCES["cnn-fat"].config(TINY.eps, dataset)  # the defence's settings; else the CNN's (quick) ones
            assert replace(fat, **{key: getattr(cnn, key) for key in own}) == cnn
            assert all(getattr(fat, key) == value for key, value in own.items() if not (quick and key in QUICK_TRAINING))
    assert study_configs(("socofing",), True, TINY)[0].keys() == {
        "socofing/cnn",
        "socofing/dipsen",
        "socofing-gender/cnn",
        "socofing-gender/dipsen",
    }
    attacked, _ = study_configs(("mnist",), False, replace(TINY, eps=0.2))
    assert attacked["mnist/cnn-fat"].adv_eps == 0.2  # trained at the eps the study attacks with
    # under label skew: the MNIST recipe on a Dirichlet(0.5) partition with CalFAT's loss (plain PGD-3 collapsed there)
    skewed, iid = attacked["mnist/cnn-fat-dirichlet"], attacked["mnist/cnn-fat"]
    assert (skewed.partition, skewed.dirichlet_alpha, skewed.adv_eps, skewed.adv_loss) == ("dirichlet", 0.5, 0.2, "calfat")
    assert replace(skewed, partition=iid.partition, adv_loss=iid.adv_loss, adv_mix=iid.adv_mix) == iid


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
        row = f"| SOCOFing ({task}) | cnn | {FIG6[('cnn', 'socofing')]['clean']:.3f} / **{ours:.3f}** | {rate:.3f} ({majority}) |"
        assert row in text
    assert studies["socofing-gender/cnn"]["baselines"] is None and "How hard is the SOCOFing" not in text
    ours = studies["socofing/cnn"]["clean"]["metrics"]["single"]["accuracy"]
    assert (
        f"No FAT run on SOCOFing: the undefended CNN's clean accuracy there is {ours:.3f} (1 draw), "
        "so robustness is not the question."
    ) in text


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


def test_a_study_saved_before_the_clean_error_fix_shows_its_worst_case_as_an_upper_bound(report, tmp_path):
    from dipsen.report.worst import NOTE, worst_case

    path, studies = report
    assert "†" not in path.read_text()  # every figure of a study saved with per-example results is exact
    old = copy.deepcopy(studies)
    for study in old.values():  # as saved before per-example results were kept
        for result in (study["clean"], *study["paper"].values(), *study["adaptive"].values(), *study["threats"].values()):
            del result["correct"]
        del study["doubling"]["run"]
    for rule in ("single", "mc"):  # the stand-in FAT study's doubling, consistent with its worst case
        old["mnist/cnn-fat"]["doubling"][rule] = {"base": 1.0, "doubled": 1.0}
    results = {
        "quick": True,
        "machine": "test machine",
        "settings": TINY.to_dict(),
        "seconds": {"total": 1.0, "training": 0.5, "attacks": 0.5},
        "studies": old,
    }
    text = build_report(results, tmp_path).read_text()
    fat = worst_case(old["mnist/cnn-fat"], "mc")
    assert not fat.exact and fat.lo < fat.hi <= 0.873
    cell = f"0.873† (true value in [{fat.lo:.3f}, {fat.hi:.3f}])"
    assert f"| — / **0.902** | {cell} / {cell} |" in text  # summary: the old figure, marked, with its interval
    assert "| worst case | all attacks above (mean of 2) |" in text and f" | {cell} |  |" in text
    assert NOTE in text and "computed before the clean-error fix" in NOTE.lower()


def test_a_model_at_the_majority_class_rate_is_named_and_left_out_of_the_comparison(tmp_path):
    """The committed study's SOCOFing gender DiPSeN answers "male" for every image: its 0.695 is not robustness."""
    from pathlib import Path

    from dipsen.attack.study import at_chance

    results = json.loads((Path(__file__).parents[2] / "docs" / "study-2026-12-07" / "results.json").read_text())
    studies = results["studies"]
    assert at_chance(studies["socofing-gender/dipsen"]) and at_chance(studies["socofing-gender/cnn"])
    assert not any(at_chance(studies[f"{d}/dipsen"]) for d in ("mnist", "socofing", "ctu13"))
    text = build_report(results, tmp_path).read_text()
    survives = text.split("## What survives")[1].split("\n## ")[0]
    (gender,) = [line for line in survives.splitlines() if line.startswith("- SOCOFing (gender):")]
    assert "but DiPSeN is near the majority-class rate (0.69) before any attack" in gender
    assert "measured advantage" not in gender
    (mnist,) = [line for line in survives.splitlines() if line.startswith("- MNIST:")]
    assert "measured advantage" in mnist and "majority-class rate" not in mnist
    defences = text.split("## Defences compared")[1].split("\n## ")[0]
    (reading,) = [line for line in defences.splitlines() if line.startswith("- SOCOFing (gender):")]
    assert "CNN (no defence), DiPSeN are near the majority-class rate before any attack" in reading
    assert "keeps the most" not in reading and "No defence keeps more" not in reading
    (ctu,) = [line for line in defences.splitlines() if line.startswith("- CTU-13:")]
    assert "majority-class rate" not in ctu and "keeps the most" in ctu
