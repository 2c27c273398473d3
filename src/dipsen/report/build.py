"""Turn the study's measurements into ``report.md``, ``report.html``, PNG plots and ``results.json``.

Input: ``results = {"settings", "quick", "machine", "seconds", "studies": {"DATASET/MODEL": study}, "certified"}``
where each study is :func:`dipsen.attack.study.study_run`'s dict, DATASET is one of
:data:`~dipsen.report.paper.REPORT_DATASETS` (a data set or a task variant such as ``socofing-gender``)
and MODEL one of :data:`~dipsen.report.defences.STUDIED_MODELS`: the paper's ``cnn`` and ``dipsen``, and
the defences the study adds (``cnn-fat``), which have no paper figure ("—").
Every table puts the paper's figure next to ours; our figures are only ever read from ``results``.
``certified`` (optional) feeds :func:`dipsen.report.certified.certified_section`; it, ``training_seconds``
(optional, per run label) and ``defences`` (optional) feed :func:`dipsen.report.defences.defences_section`.
``train_dtype`` (optional; absent: float32) is the arithmetic the runs trained in: other than float32, the
preamble and the training-overhead table say so; a float32 study's report has no word of it.
A study saved before the worst case counted the clean prediction shows that figure marked, with the
interval its saved accuracies allow (:mod:`dipsen.report.worst`). In a study run as a cascade, the
details table marks each cascaded attack's figure as such ("cascade: k of n attacked"), never as a
standalone figure.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..attack.study import at_chance, doubling_converged
from . import plots
from .certified import certified_section
from .defences import DEFENCES, PAPER_MODELS, STUDIED_MODELS, defences_section
from .paper import DATASET_NAMES, FIG6, OVERHEAD, REPORT_DATASETS, paper_dataset
from .render import Block, Heading, Image, Paragraph, Table, to_html, to_markdown
from .worst import Bounded, mean, note, noted, per_class, worst_case

TITLE = "dipsen robustness report"
"""The HTML page's title."""

SURVIVAL_MARGIN = 0.05
"""A paper-protocol accuracy 'survives' when adaptive attacks lower it by at most this much."""
CASCADE_NOTE = (
    "Cascade: an attack so marked ran only on the examples still correct (under either rule) after the clean "
    "prediction and every attack above it, and counts the others as broken: its figure is what it left of what "
    "those left, not its accuracy on its own (`dipsen reproduce --every-attack-on-all` measures each attack on "
    "every example). The worst case is the same per-example minimum either way."
)
"""The caption of a details table with cascaded attacks (:func:`dipsen.attack.study.study_run`)."""


def build_report(results: dict, out: Path) -> Path:
    """Write the report folder ``out``; returns the path of report.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    studies = results["studies"]
    datasets = [d for d in REPORT_DATASETS if any(k.startswith(d + "/") for k in studies)]
    n = results["settings"]["mc_samples"]
    blocks: list[Block] = [Heading("dipsen robustness report: CNN against DiPSeN", 1), Paragraph(_preamble(results))]
    blocks += _summary(studies, datasets, n, out)
    blocks += _verdicts(studies, datasets, n)
    blocks += defences_section(results, datasets, out)
    blocks += _baseline(studies, datasets, n, out)
    blocks += _task_difficulty(studies, datasets, n)
    blocks += _overhead(studies, datasets, out, results.get("train_dtype", "float32"))
    blocks += _curves(studies, datasets, out)
    blocks += _details(studies, datasets, n)
    blocks += _variants(studies, datasets)
    blocks += certified_section(results.get("certified") or {}, out)
    markdown = to_markdown(blocks)
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(to_html(markdown, TITLE))
    return out / "report.md"


def _runs(studies: dict, datasets: list[str], models: tuple[str, ...] = STUDIED_MODELS):
    """(dataset, model, study) for every study of ``models`` present, in report order."""
    for dataset in datasets:
        for model in models:
            study = _study(studies, dataset, model)
            if study is not None:
                yield dataset, model, study


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _study(studies: dict, dataset: str, model: str) -> dict | None:
    return studies.get(f"{dataset}/{model}")


def _models(studies: dict, dataset: str) -> dict[str, dict]:
    """Model -> study of every model studied on ``dataset``, in report order."""
    return {m: study for m in STUDIED_MODELS if (study := _study(studies, dataset, m)) is not None}


def _fig6(model: str, dataset: str) -> dict:
    """The paper's Fig. 6 figures for ``model`` on the paper's data set behind report key ``dataset`` (none for a defence)."""
    return FIG6.get((model, paper_dataset(dataset)), {})


def _name(dataset: str, study: dict) -> str:
    """The data set's name; for SOCOFing with the task its models predict."""
    task = (study.get("task") or {}).get("name")
    if study.get("dataset") == "socofing" and task:
        return f"{DATASET_NAMES['socofing']} ({task})"
    return DATASET_NAMES[dataset]


def _majority(study: dict) -> str:
    """Accuracy of always answering the test split's most frequent class, and that class."""
    task = study.get("task") or {}
    if task.get("majority_rate") is None:
        return "—"
    return f"{task['majority_rate']:.3f} ({task['majority_class']})"


def _acc(result: dict, rule: str = "single") -> float:
    return result["metrics"][rule]["accuracy"]


def _ours(study: dict, row: str, rule: str = "single") -> float:
    return _acc(study["clean"] if row == "clean" else study["paper"][row], rule)


def _trained_in(train_dtype: str) -> str:
    """What a report says of the runs' training arithmetic: nothing for float32 (the default, and every study before
    the option), else the autocast dtype and that the measurements are float32."""
    if train_dtype == "float32":
        return ""
    return f", every model trained in {train_dtype} autocast (evaluation, attacks and certificates in float32),"


def _preamble(results: dict) -> str:
    s, seconds = results["settings"], results["seconds"]
    mode = "**quick mode** (small subsets and budgets: a smoke test, not a result)" if results.get("quick") else "full study"
    trained_in = _trained_in(results.get("train_dtype", "float32"))
    return (
        f"{mode}. Every figure below was measured by `dipsen reproduce` on {results['machine']}{trained_in} in "
        f"{seconds['total'] / 60:.1f} min ({seconds['training'] / 60:.1f} min training, "
        f"{seconds['attacks'] / 60:.1f} min attacks). "
        f"Attacks: L-inf, untargeted, eps {s['eps']}, on {s['samples']} seeded test examples per model. "
        f"'1 draw' is the paper's prediction rule (one noise draw per input); 'mean of {s['mc_samples']}' averages the "
        f"softmax over {s['mc_samples']} draws. Paper protocol: FGSM, BIM and PGD through ART with its default steps "
        f"(eps/3, {s['paper_budget']['iterations']} iterations, no random start), gradients through single noise draws. "
        f"Adaptive: PGD and APGD through the expectation over {s['eot_draws']} noise draws (EOT), PGD through frozen noise, "
        f"random starts, {s['adaptive_budget']['iterations']} iterations; worst case = examples classified correctly "
        "without attack and after every attack."
        + (
            " The attacks after the paper's ran as a cascade, each only on the examples still correct after the clean "
            "prediction and every attack before it: the worst case is the same, and their own figures are not standalone "
            "ones (see 'Every attack, every threat model')."
            if any(study.get("cascade") for study in results["studies"].values())
            else ""
        )
    )


def _summary(studies: dict, datasets: list[str], n: int, out: Path) -> list[Block]:
    headers = [
        "data set",
        "model",
        "clean: paper / ours",
        "majority class (test split)",
        "FGSM: paper / ours",
        "BIM: paper / ours",
        "PGD: paper / ours",
        f"adaptive worst case: 1 draw / mean of {n}",
    ]
    rows = []
    runs = list(_runs(studies, datasets))
    for dataset, model, study in runs:
        paper = _fig6(model, dataset)
        cells = [f"{_pct(paper.get(r))} / **{_pct(_ours(study, r))}**" for r in ("clean", "fgsm", "bim", "pgd")]
        worst_cell = f"{worst_case(study, 'single')} / {worst_case(study, 'mc')}"
        rows.append([_name(dataset, study), model, cells[0], _majority(study), *cells[1:], worst_cell])
    plots.grouped_bars(
        [f"{_name(d, study)} {m}" for d, m, study in runs],
        {
            "paper: PGD": [_fig6(m, d).get("pgd") for d, m, _ in runs],
            "ours: paper-protocol PGD (1 draw)": [_ours(study, "pgd") for _, _, study in runs],
            f"ours: worst case over all attacks (mean of {n})": [study["worst_case"]["mc"]["all"] for _, _, study in runs],
        },
        "Accuracy under attack at eps 0.3",
        "accuracy",
        out / "fig6_summary.png",
    )
    return [
        Heading("Summary (the paper's Fig. 6)"),
        Table(
            headers,
            rows,
            noted(
                "Accuracy. Ours: paper protocol, 1 draw (bold); majority class: accuracy of always answering the most "
                "frequent class of the whole test split; last column: every attack of the study." + _defence_caption(runs),
                [study for _, _, study in runs],
            ),
        ),
        *_socofing_task(studies),
        Image(
            "fig6_summary.png", "PGD accuracy: the paper's figure, ours under the paper's protocol, ours under adaptive attack"
        ),
    ]


def _defence_caption(runs: list) -> str:
    present = [key for key in DEFENCES if any(model == key for _, model, _ in runs)]
    return "".join(
        f" {key}: the CNN with {DEFENCES[key].name} (see 'Defences compared'); the paper has no such model (—)."
        for key in present
    )


def _socofing_task(studies: dict) -> list[Block]:
    """Which SOCOFing task the paper's clean figure can be compared with, from the measured rows."""
    gender = {m: s for m in ("cnn", "dipsen") if (s := _study(studies, "socofing-gender", m))}
    if not gender:
        return []
    task = next(iter(gender.values()))["task"]
    male, rate = task["majority_class"], task["majority_rate"]
    counts, k = task["class_counts"], task["classes"].index(task["majority_class"])
    images = sum(counts["train"]) + sum(counts["test"])
    whole = (counts["train"][k] + counts["test"][k]) / images
    paper = {m: _fig6(m, "socofing").get("clean") for m in ("cnn", "dipsen")}
    top = max(v for v in paper.values() if v is not None)
    text = [
        "Which SOCOFing task is the paper's figure for? The paper names gender, hand and finger as SOCOFing's "
        "labels but does not say which one its models predict, nor how it splits the images into training and "
        f"test sets. Its clean figures ({', '.join(f'{m} {v:.2f}' for m, v in paper.items() if v is not None)}) "
        f"are only {(top - whole) * 100:.1f} points above the share of '{male}' among all {images:,} images we keep "
        f"({whole:.3f}), and {(top - rate) * 100:.1f} points above always answering '{male}' on our test split "
        f"({rate:.3f})."
    ]
    hand_finger = {m: s for m in ("cnn", "dipsen") if (s := _study(studies, "socofing", m))}
    if hand_finger:
        default = next(iter(hand_finger.values()))["task"]
        text.append(
            f"They are far above the {default['name']} task's majority rate ({default['majority_rate']:.3f}, "
            f"{len(default['classes'])} classes)."
        )
    text.append(
        f"So either the paper predicted gender, and then its figure is barely above always answering '{male}', "
        "or it predicted hand and finger on a split that lets the model see the same fingers in training and "
        "test (ours keeps every person on one side)."
    )
    for runs in (gender, hand_finger):
        if runs:
            ours = ", ".join(f"{m} {_ours(s, 'clean'):.3f}" for m, s in runs.items())
            text.append(f"Ours, clean (1 draw), {next(iter(runs.values()))['task']['name']}: {ours}.")
    return [Paragraph(" ".join(text))]


def _verdicts(studies: dict, datasets: list[str], n: int) -> list[Block]:
    lines = []
    for dataset in datasets:
        study = _study(studies, dataset, "dipsen")
        if study is None:
            continue
        paper_protocol = min(_ours(study, r) for r in ("fgsm", "bim", "pgd"))
        published = min(_fig6("dipsen", dataset).get(r, 1.0) for r in ("fgsm", "bim", "pgd"))
        adaptive = worst_case(study, "mc")
        verdict = (
            f"DiPSeN under the paper's own protocol: {paper_protocol:.3f} (lowest of FGSM/BIM/PGD, 1 draw; "
            f"the paper reports {published:.2f}); under every attack of the study: {adaptive} (mean of {n}), "
        )
        if paper_protocol - adaptive.hi > SURVIVAL_MARGIN:
            verdict += "so the paper-protocol figure **does not survive** adaptive attack"
        elif paper_protocol - adaptive.lo <= SURVIVAL_MARGIN:
            verdict += "so adaptive attacks lower it by at most 0.05"
        else:
            verdict += "so the saved figures cannot tell whether adaptive attacks lower it by more than 0.05"
        cnn = _study(studies, dataset, "cnn")
        if at_chance(study):
            verdict += (
                f"; but DiPSeN is near the majority-class rate ({study['chance']:.2f}) before any attack, so these "
                "figures are the majority class's, not robustness"
            )
        elif cnn:
            verdict += (
                f"; the undefended CNN under every attack: {worst_case(cnn, 'mc')}, so DiPSeN's "
                f"measured advantage is {_difference(adaptive, worst_case(cnn, 'mc'))}"
            )
        lines.append(
            f"- {DATASET_NAMES[dataset]}: {verdict}. Iteration doubling: "
            f"{'converged' if doubling_converged(study['doubling']) else '**not converged** (more iterations still help)'}. "
            f"EOT sweep: {study['sweep'].get('adaptive', study['sweep']['single-draw'])['verdict']}."
        )
    return [Heading("What survives"), Paragraph("\n".join(lines) or "No DiPSeN run in this study.")]


def _difference(a: Bounded, b: Bounded) -> str:
    """``a - b``, or the interval it lies in where either is bounded."""
    if a.exact and b.exact:
        return f"{a.hi - b.hi:+.3f}"
    return f"between {a.lo - b.hi:+.3f} and {a.hi - b.lo:+.3f}"


def _baseline(studies: dict, datasets: list[str], n: int, out: Path) -> list[Block]:
    rows, groups, paper_series, ours_series = [], [], [], []
    for dataset, model, study in _runs(studies, datasets):
        clean = study["clean"]["metrics"]
        macro = clean["single"]["macro"]
        paper = _fig6(model, dataset).get("clean")
        rows.append(
            [
                _name(dataset, study),
                model,
                _pct(paper),
                _pct(clean["single"]["accuracy"]),
                _pct(clean["mc"]["accuracy"]),
                _pct(macro["precision"]),
                _pct(macro["recall"]),
                _pct(macro["f1"]),
                str(clean["single"]["samples"]),
                str(study["final_round"]),
            ]
        )
        groups.append(f"{_name(dataset, study)} {model}")
        paper_series.append(paper)
        ours_series.append(clean["single"]["accuracy"])
    plots.grouped_bars(
        groups, {"paper": paper_series, "ours (1 draw)": ours_series}, "Clean accuracy", "accuracy", out / "fig3_baseline.png"
    )
    headers = [
        "data set",
        "model",
        "paper",
        "ours: 1 draw",
        f"ours: mean of {n}",
        "precision (macro)",
        "recall (macro)",
        "F1 (macro)",
        "support",
        "rounds",
    ]
    return [
        Heading("Baseline accuracy (the paper's Table I and Fig. 3)"),
        Table(headers, rows, "On the evaluated test examples; precision, recall and F1 for the 1-draw rule."),
        Image("fig3_baseline.png", "Clean accuracy, paper against ours"),
    ]


def _task_difficulty(studies: dict, datasets: list[str], n: int) -> list[Block]:
    """Binary tasks (CTU-13): our models beside trivial rules fitted on the same training windows."""
    blocks: list[Block] = []
    for dataset in datasets:
        models = _models(studies, dataset)
        reference = next((s["baselines"] for s in models.values() if s.get("baselines")), None)
        if reference is None:
            continue
        positive, eps = reference["positive_class"], reference["eps"]
        headers = [
            "classifier",
            "clean: accuracy",
            "balanced accuracy",
            f"{positive} recall",
            f"eps {eps:g}: accuracy",
            "balanced accuracy",
            f"{positive} recall",
            "how the attacked figure is obtained",
        ]
        rows = []
        for name, entry in reference["baselines"].items():
            rows.append(
                [
                    f"{name}: {entry['description']}",
                    *[
                        _pct(entry[k])
                        for k in (
                            "accuracy",
                            "balanced_accuracy",
                            "recall",
                            "robust_accuracy",
                            "robust_balanced_accuracy",
                            "robust_recall",
                        )
                    ],
                    "exact worst case over the feasible domain, counts relaxed to reals (a lower bound)",
                ]
            )
        for model, study in models.items():
            for rule, rule_name in (("single", "1 draw"), ("mc", f"mean of {n}")):
                clean = study["clean"]["metrics"][rule]
                survival = per_class(study, rule)
                rows.append(
                    [
                        f"**{model}** ({rule_name})",
                        _pct(clean["accuracy"]),
                        _pct(clean["macro"]["recall"]),
                        _pct(clean["per_class"][1]["recall"]),
                        str(worst_case(study, rule)),
                        str(mean([f for f in survival if f is not None])),
                        "—" if survival[1] is None else str(survival[1]),
                        "worst case over every attack of the study",
                    ]
                )
        stump = reference["baselines"]["one-feature"]
        paper_clean = {m: _fig6(m, dataset).get("clean") for m in models}
        below = [f"{m} {v:.2f}" for m, v in paper_clean.items() if v is not None and v < stump["accuracy"]]
        text = [
            f"A one-feature rule ({stump['description']}) reaches {stump['accuracy']:.3f} clean accuracy on the same "
            f"{reference['samples']} examples ({', '.join(f'{c} {k}' for k, c in reference['eval_class_counts'].items())}), "
            f"and logistic regression on the "
            f"flattened window {reference['baselines']['logistic']['accuracy']:.3f}: on this split the task is "
            "mostly recognising the traffic of the infected host, which in the embedded scenario 6 is the only "
            "botnet host and has no other traffic. A model's clean figure shows how well it separates that "
            "host's flows from the others, not that it detects botnets it has not seen."
        ]
        if below:
            text.append(f"The paper's clean figures ({', '.join(below)}) sit below this one-feature rule on our split.")
        text.append(
            f"Under attack, the trivial rules' figures are exact worst cases at eps {eps:g} over the feasible "
            "domain; the models' are the per-example worst case over every attack we ran (an upper bound on "
            "their robust accuracy)."
        )
        blocks += [
            Heading(f"How hard is the {DATASET_NAMES[dataset]} task?"),
            Paragraph(" ".join(text)),
            Table(
                headers,
                rows,
                noted(
                    f"Rules fitted on the training windows ({reference['train_samples']}); "
                    f"balanced accuracy = mean of the per-class recalls.",
                    list(models.values()),
                ),
            ),
        ]
    return blocks


def _overhead(studies: dict, datasets: list[str], out: Path, train_dtype: str) -> list[Block]:
    """DiPSeN's time per step against the CNN's (the paper's claim), and each defence's beside it; steps in
    ``train_dtype``, which the caption names when it is not float32."""
    rows, groups = [], []
    # the defences of this study only: a run set without one (--datasets ctu13 has no label-skew FAT) shows no column of it
    defences = [m for m in DEFENCES if any(label.split("/", 1)[1] == m for label in studies)]
    compared = ["dipsen", *defences]
    series: dict[str, list[float | None]] = {f"{m} / cnn time per step": [] for m in compared}
    for dataset in datasets:
        steps = {m: s["training_cost"]["mean_step_seconds"] for m, s in _models(studies, dataset).items() if s["training_cost"]}
        if "cnn" not in steps or len(steps) < 2:
            continue
        cnn = steps["cnn"]
        ratios = {m: steps[m] / cnn if m in steps else None for m in compared}
        dipsen = ratios["dipsen"]
        rows.append(
            [
                DATASET_NAMES[dataset],
                *[f"{steps[m] * 1e3:.2f}" if m in steps else "—" for m in PAPER_MODELS],
                "—" if dipsen is None else f"{dipsen - 1:+.1%}",
                f"{OVERHEAD:+.1%}",
                *[
                    cell
                    for m in defences
                    for cell in ((f"{steps[m] * 1e3:.2f}", f"{ratios[m]:.2f}×") if m in steps else ("—", "—"))
                ],
            ]
        )
        groups.append(DATASET_NAMES[dataset])
        for m, values in zip(ratios, series.values(), strict=True):
            values.append(ratios[m])
    plots.grouped_bars(groups, series, "Training time per step against the CNN's", "ratio", out / "fig4_overhead.png", ylim=None)
    return [
        Heading("Training overhead per step (the paper's Fig. 4)"),
        Table(
            [
                "data set",
                *[f"{m} ms/step" for m in PAPER_MODELS],
                "DiPSeN overhead: ours",
                "overhead: paper (mean)",
                *[column for m in defences for column in (f"{m} ms/step", f"{m} / cnn")],
            ],
            rows,
            "Mean time per local SGD step inside the federated runs (one worker thread per client). "
            "The paper's overhead is DiPSeN's; a defence's step includes crafting its adversarial examples."
            + ("" if train_dtype == "float32" else f" Every step under {train_dtype} autocast (`--train-dtype`)."),
        ),
        Image("fig4_overhead.png", "Each model's time per training step relative to the CNN's"),
    ]


def _curves(studies: dict, datasets: list[str], out: Path) -> list[Block]:
    blocks: list[Block] = [Heading("Robustness against eps (the paper's Fig. 5)")]
    for dataset in datasets:
        models = _models(studies, dataset)
        name = f"fig5_{dataset}.png"
        plots.robustness_curves(models, dataset, out / name)
        any_sweep = next(iter(models.values()))["sweep"]
        restricted = "domain_limit" in any_sweep["single-draw"]
        headers = [
            "model",
            "curve",
            *[f"eps {e:g}" for e in any_sweep["eps"]],
            *(["eps 1 (whole feasible domain)"] if restricted else []),
            "sanity",
        ]
        rows = []
        for model, study in models.items():
            for curve in ("single-draw", "adaptive"):
                if curve in study["sweep"]:
                    c = study["sweep"][curve]
                    rule = "single" if curve == "single-draw" else "mc"
                    limit = [_pct(c["domain_limit"][rule])] if restricted else []
                    rows.append(
                        [
                            model,
                            f"{c['attack']} ({'1 draw' if rule == 'single' else 'mean of draws'})",
                            *[_pct(v) for v in c[rule]],
                            *limit,
                            c["verdict"],
                        ]
                    )
        blocks += [
            Heading(DATASET_NAMES[dataset], 3),
            Table(headers, rows, f"{any_sweep['samples']} examples; majority class {any_sweep['chance']:.3f}."),
            Image(name, f"{DATASET_NAMES[dataset]}: accuracy against eps"),
        ]
    return blocks


def _crafted_on(sources: dict[str, str]) -> str:
    """What one attack was crafted on: one source if every model's agrees, else each model's (their runs' rounds differ)."""
    if len(set(sources.values())) <= 1:
        return next(iter(sources.values()), "")
    return "; ".join(f"{model}: {source}" for model, source in sources.items())


def _details(studies: dict, datasets: list[str], n: int) -> list[Block]:
    blocks: list[Block] = [Heading("Every attack, every threat model")]
    for dataset in datasets:
        models = _models(studies, dataset)
        headers = ["protocol", "attack", *[f"{m}: 1 draw / mean of {n}" for m in models], "crafted on"]
        rows = []
        sections = (("paper", "paper"), ("adaptive", "adaptive"), ("threats", "threat model"))
        keys = []
        for section, label in sections:
            for name in dict.fromkeys(k for s in models.values() for k in s[section]):
                keys.append((section, label, name))
        for section, label, name in keys:
            cells, crafted = [], {}
            for model, study in models.items():
                result = study[section].get(name)
                if result is None:
                    cells.append("—")
                    continue
                crafted[model] = result["crafted_on"]
                cells.append(f"{_pct(_acc(result))} / {_pct(_acc(result, 'mc'))}{_coverage(result, study['samples'])}")
            # the randomized model's setup names the gradient view; the CNNs' gradient is deterministic
            having = sorted((s for s in models.values() if name in s[section]), key=lambda s: not s.get("randomized"))
            shown = having[0][section][name]
            rows.append([label, shown["label"], *cells, _crafted_on(crafted)])
        for rule, rule_name in (("single", "1 draw"), ("mc", f"mean of {n}")):
            rows.append(
                [
                    "worst case",
                    f"all attacks above ({rule_name})",
                    *[str(worst_case(s, rule)) for s in models.values()],
                    "",
                ]
            )
        doubling = [
            f"{s['doubling']['mc']['base']:.3f} → {s['doubling']['mc']['doubled']:.3f} "
            f"({'converged' if doubling_converged(s['doubling']) else 'NOT converged'}"
            + (f"; cascade: {s['doubling']['attacked']} attacked" if "attacked" in s["doubling"] else "")
            + ")"
            for s in models.values()
        ]
        first = next(iter(models.values()))
        cascaded = any(s.get("cascade") for s in models.values())
        rows.append(
            [
                "check",
                f"adaptive PGD, iterations doubled (mean rule, the same {first['doubling']['samples']} examples and draws"
                + ("; cascade: both runs on the examples base PGD attacked, the others broken in both" if cascaded else "")
                + ")",
                *doubling,
                "",
            ]
        )
        caption = " ".join(text for text in (CASCADE_NOTE if cascaded else "", note(list(models.values()))) if text)
        blocks += [
            Heading(DATASET_NAMES[dataset], 3),
            Paragraph(
                f"What the attacker may change: {first['domain']}. Worst case: "
                f"{first['worst_case'].get('all_covers', 'every attack')}."
            ),
            Table(headers, rows, caption),
        ]
    return blocks


def _coverage(result: dict, samples: int) -> str:
    """What an attack's figure covers, beside it: '' for every example of the study, else how many it ran on or attacked."""
    if "attacked" in result:  # a cascaded run: not the attack's standalone figure
        return f" (cascade: {result['attacked'].count('1')} of {result['samples']} attacked)"
    return f" (n={result['samples']})" if result["samples"] != samples else ""


def _variants(studies: dict, datasets: list[str]) -> list[Block]:
    headers = [
        "data set",
        "model",
        "protocol variant",
        "clean: paper / ours",
        "FGSM: paper / ours",
        "BIM: paper / ours",
        "PGD: paper / ours",
    ]
    rows = []
    for dataset, model, study in _runs(studies, datasets, PAPER_MODELS):  # the paper's figures: its models
        paper = _fig6(model, dataset)
        for variant, results in study["variants"].items():
            rows.append(
                [
                    _name(dataset, study),
                    model,
                    variant,
                    *[f"{_pct(paper.get(r))} / {_pct(_acc(results[r]))}" for r in ("clean", "fgsm", "bim", "pgd")],
                ]
            )
    return [
        Heading("Where could the paper's figures come from?"),
        Paragraph(
            "Protocol choices a Keras + ART pipeline makes easily, each measured with the paper's attacks (1 draw). "
            "'noise-off-at-inference': the noise layer is off when predicting and attacking, as Keras' "
            "GaussianNoise is by default. 'clipped-probabilities': the attack's loss is Keras' cross-entropy on "
            "softmax outputs, clipped to [1e-7, 1 - 1e-7], whose gradient vanishes on confident inputs. "
            "These are not robustness measurements."
        ),
        Table(headers, rows),
    ]
