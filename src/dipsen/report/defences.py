"""The defences the study trains beside the paper's two models, and the report's "Defences compared" section.

:data:`DEFENCES` is the run set's one place for them: ``dipsen reproduce`` trains each on the data sets
it names, from the data set's packaged config for its base model plus its overrides, and attacks it
with the same study as the CNN and DiPSeN (``results["studies"]["DATASET/KEY"]``).

:func:`defences_section` reads ``results`` (``studies``, ``certified``, ``training_seconds``,
``defences``, ``settings``) and puts, per data set, the undefended CNN, DiPSeN, every defence and
every smoothed CNN in one table. Figures are only ever read from the input; a model without a
figure gets "—" or says why it has none; a worst case saved before the fix is shown with its bounds
(:mod:`dipsen.report.worst`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..attack.study import NEAR_ZERO, at_chance, doubling_converged, near_majority
from ..federated.engine import COLLAPSE_MIN_BEST
from . import plots
from .paper import DATASET_NAMES, DATASETS
from .render import Block, Heading, Image, Paragraph, Table
from .worst import MARK, noted, worst_case

PAPER_MODELS = ("cnn", "dipsen")


@dataclass(frozen=True)
class Defence:
    """A model the study trains and attacks beyond the paper's: ``model`` trained with ``overrides``."""

    name: str  # in the report's prose
    model: str  # the architecture, as the training config names it
    datasets: tuple[str, ...]  # the data sets it is trained on (their task variants excluded)
    overrides: dict[str, Any] = field(default_factory=dict)  # training-config values beside the data set's TOML
    at_study_eps: bool = False  # adversarial training: adv_eps is the study's attack eps
    per_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)  # data set -> values for it alone
    variant_of: str | None = None  # the defence this one repeats under another condition: it names no data sets left out

    def config(self, eps: float, dataset: str) -> dict[str, Any]:
        """The training-config overrides of a study attacking at ``eps``, for ``dataset``."""
        return {**self.overrides, **self.per_dataset.get(dataset, {}), **({"adv_eps": eps} if self.at_study_eps else {})}


FAT = "cnn-fat"
FAT_DIRICHLET = "cnn-fat-dirichlet"
MNIST_FAT = {
    "adv_train": "pgd",
    "adv_steps": 3,
    "adv_mix": 1.0,
    "lr_schedule": "cyclic",
    "lr": 0.004,
    "rounds": 60,
    "local_epochs": 5,
}
"""Madry et al.'s PGD training with 3 steps of 0.25 from a random start, on Wong et al.'s cyclic rate peaking at
0.004, adversarial loss only, 60 rounds of 5 local epochs. Against FGSM-RS under the same schedule it lifts the
study's worst case from 0.575 to 0.84, in 22 min of training on 2 idle cores (measured in README, Adversarial
training): APGD-CE took 12.5 points more than adaptive PGD from the FGSM-RS models, 5.5 from this one."""
MNIST_FAT_LABEL_SKEW = {**{k: v for k, v in MNIST_FAT.items() if k != "adv_mix"}, "adv_loss": "calfat"}
"""MNIST_FAT's PGD-3 on its schedule with CalFAT's calibrated loss (Chen et al. 2022; ``adv_mix`` does not apply to it):
under Dirichlet(0.5) label skew plain PGD-3 training collapsed (PGD-10 accuracy 0.62 at round 20, 0.00 at round 30),
FGSM-RS held at 0.605 worst case (200 images), and CalFAT held for all 60 rounds (APGD-CE-40 on the validation slice
0.68 at round 20, 0.80 at round 60) at worst case 0.772 on 500 images, clean 0.978 (docs/results/adversarial-training.md)."""
FAT_COLLAPSE_DROP = 0.2
"""Every FAT run's collapse guard (``robust_collapse``): training stops once the monitor's robust accuracy on the
validation slice falls more than 0.2 below its best (a best of at least COLLAPSE_MIN_BEST), and the study attacks the
best-robust round's model. PGD-3 FAT under label skew fell from 0.81 to 0.63, 0.07 and 0.00 PGD-10 accuracy at its
next three evaluations, five rounds apart (README, Adversarial training): the guard stops such a run at the second.
A fall of 0.2 is 50 of the monitor's 250 rows, over 4 standard errors of the difference of two independent figures
near 0.5, so sampling noise alone does not stop a run that holds."""
DEFENCES = {
    # Federated adversarial training: the paper's CNN, every client training on adversarial examples
    # (dipsen.federated.adversarial) at the eps the study attacks with. Not on SOCOFing: the CNN's
    # clean accuracy on its hand x finger task is about 45%, so robustness is not the question there.
    # MNIST: MNIST_FAT. CTU-13 keeps its TOML's schedule, with FGSM-RS and the half-clean loss.
    FAT: Defence(
        "FAT",
        "cnn",
        ("mnist", "ctu13"),
        {"adv_train": "fgsm-rs", "adv_mix": 0.5, "robust_collapse": FAT_COLLAPSE_DROP},
        at_study_eps=True,
        per_dataset={"mnist": MNIST_FAT},
    ),
    # MNIST's schedule with every client's labels skewed (Dirichlet(0.5)): where federated adversarial
    # training is known to be fragile (Zizzo et al. 2020). With CalFAT's loss: plain PGD-3 training
    # collapsed there (MNIST_FAT_LABEL_SKEW).
    FAT_DIRICHLET: Defence(
        "FAT under label skew",
        "cnn",
        ("mnist",),
        {"partition": "dirichlet", "dirichlet_alpha": 0.5, **MNIST_FAT_LABEL_SKEW, "robust_collapse": FAT_COLLAPSE_DROP},
        at_study_eps=True,
        variant_of=FAT,
    ),
}
"""Report model key -> the defence trained under it (run ``OUT/runs/DATASET-KEY``)."""
STUDIED_MODELS = (*PAPER_MODELS, *DEFENCES)
"""Every model the study attacks, in report order."""
CERTIFIED_RADII = ("0.5", "1")
"""The L2 radii of the table's certified columns (keys of a certificate's ``certified_accuracy``)."""
MODEL_NAMES = {"cnn": "CNN (no defence)", "dipsen": "DiPSeN", **{k: f"{d.name} ({k})" for k, d in DEFENCES.items()}}


def defences_record(eps: float) -> dict[str, dict]:
    """What each defence was trained with, as ``options.json`` and ``results["defences"]`` record it."""
    return {
        key: {"model": d.model, "datasets": {dataset: d.config(eps, dataset) for dataset in d.datasets}}
        for key, d in DEFENCES.items()
    }


def sweep_check(study: dict) -> tuple[str, bool]:
    """The study's two checks of an attack that works, in words, and whether either failed.

    The eps sweep (EOT where the model is randomized) must fall near 0 at its largest eps, the same
    rule as :func:`dipsen.attack.study.sweep_verdict`; doubling the adaptive PGD's iterations must
    not lower accuracy by more than the study's tolerance. A failure flags possible gradient masking.
    """
    sweep = study["sweep"]
    curve = sweep.get("adaptive", sweep["single-draw"])
    accuracies, largest = curve["mc"], sweep["eps"][-1]
    if near_majority(accuracies[0], sweep["chance"]):
        words, failed = "eps sweep: no verdict (near the majority class before any attack)", False
    elif accuracies[-1] <= NEAR_ZERO:
        words, failed = f"eps sweep falls to {accuracies[-1]:.2f} at eps {largest:g}", False
    else:
        limit = f"; {curve['domain_limit']['mc']:.2f} on the whole feasible domain" if "domain_limit" in curve else ""
        words, failed = f"**eps sweep stays at {accuracies[-1]:.2f} at eps {largest:g}{limit}: possible gradient masking**", True
    doubling = study["doubling"]
    if doubling_converged(doubling):
        words += "; doubling the iterations: converged"
    else:
        rule = max(("single", "mc"), key=lambda r: doubling[r]["base"] - doubling[r]["doubled"])  # the rule that moved
        moved = f"{doubling[rule]['base']:.3f} → {doubling[rule]['doubled']:.3f} ({'1 draw' if rule == 'single' else 'mean'})"
        words += f"; **doubling the iterations: {moved}, not converged**"
        failed = True
    return words, failed


@dataclass
class _Row:
    """One model of one data set in the table: attacked (``study``) or certified only."""

    label: str  # DATASET/KEY
    name: str
    study: dict | None
    certificate: dict | None


def defences_section(results: dict, datasets: list[str], out: Path) -> list[Block]:
    """Per data set: clean accuracy, attacked accuracy, certified accuracy and training time of every model."""
    studies, certified = results["studies"], results.get("certified") or {}
    seconds = results.get("training_seconds") or {}
    n, eps = results["settings"]["mc_samples"], results["settings"]["eps"]
    rows: list[list[str]] = []
    groups: list[str] = []
    series: dict[str, list[float | None]] = {
        f"clean (mean of {n})": [],
        f"adaptive worst case at eps {eps:g} (mean of {n})": [],
        "certified at L2 r = 0.5": [],
    }
    text = []
    attacked: list[dict] = []
    for dataset in datasets:
        entries = _rows(dataset, studies, certified)
        if not entries:
            continue
        cnn_seconds = seconds.get(f"{dataset}/cnn")
        for row in entries:
            rows.append([DATASET_NAMES[dataset], row.name, *_cells(row, seconds.get(row.label), cnn_seconds)])
            groups.append(f"{DATASET_NAMES[dataset]} {row.name}")
            record = (row.certificate or {}).get("certificate") or {}
            certificate = record.get("certified_accuracy", {})
            if row.study is not None:
                attacked.append(row.study)
                values = [_acc(row.study["clean"], "mc"), row.study["worst_case"]["mc"]["all"]]
            else:
                values = [record.get("accuracy"), None]
            for values_of, value in zip(series.values(), [*values, certificate.get("0.5")], strict=True):
                values_of.append(value)
        text.append(_reading(dataset, entries, seconds, eps, n))
    if not rows:
        return []
    plots.grouped_bars(groups, series, "Defences: clean against worst-case accuracy", "accuracy", out / "defences.png")
    headers = [
        "data set",
        "model",
        f"clean: 1 draw (/ mean of {n})",
        "paper-protocol PGD (1 draw)",
        f"adaptive worst case at eps {eps:g}: 1 draw (/ mean of {n})",
        *[f"certified, L2 r = {r}" for r in CERTIFIED_RADII],
        "training (min)",
        "training / CNN's",
        "attack checks",
    ]
    return [
        Heading("Defences compared"),
        Paragraph(_introduction(results, datasets)),
        Table(
            headers,
            rows,
            noted(
                f"'/ mean of {n}' for randomized models only. Smoothed CNNs: the certified prediction's accuracy "
                "(abstentions count as wrong) on the certificate's examples; they are certified in L2 and not attacked "
                "by the L-inf study. Certified columns: '—' where the model has no certificate. Training: the rounds' time "
                "in the run's metrics.jsonl. Attack checks: the eps sweep must fall near 0 and doubling the iterations "
                "must not lower accuracy further, else the figure may be gradient masking.",
                attacked,
            ),
        ),
        Paragraph("\n".join(f"- {line}" for line in text)),
        Image("defences.png", "Per data set and model: clean accuracy, adaptive worst case and certified accuracy"),
    ]


def _rows(dataset: str, studies: dict, certified: dict) -> list[_Row]:
    rows = [
        _Row(f"{dataset}/{model}", MODEL_NAMES[model], study, certified.get(f"{dataset}/{model}"))
        for model in STUDIED_MODELS
        if (study := studies.get(f"{dataset}/{model}")) is not None
    ]
    for label, entry in certified.items():
        if label.startswith(f"{dataset}/") and label not in studies:  # a smoothed CNN: certified, not attacked
            record = entry["certificate"]
            name = f"smoothed CNN, sigma {record['sigma']:g}" if record["method"] == "smoothing" else label.split("/", 1)[1]
            rows.append(_Row(label, name, None, entry))
    return rows


def _acc(result: dict, rule: str = "single") -> float:
    return result["metrics"][rule]["accuracy"]


def _both(single: str, mc: str, randomized: bool) -> str:
    return f"{single} / {mc}" if randomized else single


def _cells(row: _Row, seconds: float | None, cnn_seconds: float | None) -> list[str]:
    certificate = (row.certificate or {}).get("certificate", {}).get("certified_accuracy", {})
    certified = [f"{certificate[r]:.3f}" if r in certificate else "—" for r in CERTIFIED_RADII]
    minutes = "—" if seconds is None else f"{seconds / 60:.1f}"
    ratio = "—" if seconds is None or not cnn_seconds else f"{seconds / cnn_seconds:.2f}×"
    study = row.study
    if study is None:
        record = (row.certificate or {})["certificate"]
        unattacked = "not attacked (certified in L2 only)"
        clean = f"{record['accuracy']:.3f} (certified prediction, {record['samples']} examples)"
        return [clean, unattacked, unattacked, *certified, minutes, ratio, "—"]
    randomized = bool(study.get("randomized"))
    return [
        _both(f"{_acc(study['clean']):.3f}", f"{_acc(study['clean'], 'mc'):.3f}", randomized),
        f"{_acc(study['paper']['pgd']):.3f}",
        _both(str(worst_case(study, "single")), str(worst_case(study, "mc")), randomized),
        *certified,
        minutes,
        ratio,
        sweep_check(study)[0],
    ]


def _steps(how: dict) -> str:
    """PGD training's step count as the report prints it, " (3 steps)"; nothing for other methods."""
    return f" ({how['adv_steps']} steps)" if how["adv_train"] == "pgd" and "adv_steps" in how else ""


def _introduction(results: dict, datasets: list[str]) -> str:
    recorded = results.get("defences") or {}
    studies = results["studies"]
    text = [
        "The paper's models beside the defences the study adds (not in the paper, so they have no paper figure). "
        "Every attacked model goes through the same study: the paper's protocol and every adaptive attack and "
        "threat model, on the same examples."
    ]
    for key, defence in DEFENCES.items():
        studied = any(f"{dataset}/{key}" in studies for dataset in datasets)
        if not studied and (defence.variant_of or any(dataset in defence.datasets for dataset in datasets)):
            continue  # a variant outside these data sets, or results of a run set without this defence
        trained = (recorded.get(key) or {}).get("datasets") or {}
        hows = [
            f"on {DATASET_NAMES[dataset]}, a share {how['adv_mix']:g} of every client's mini-batch loss on "
            f"{how['adv_train']}{_steps(how)} adversarial examples at eps {how['adv_eps']:g}"
            + (f", {how['lr_schedule']} learning rate peaking at {how['lr']:g}" if "lr_schedule" in how else "")
            + (
                f", clients' labels drawn from Dirichlet({how['dirichlet_alpha']:g})"
                if how.get("partition") == "dirichlet"
                else ""
            )
            for dataset, how in trained.items()
            if dataset in datasets and {"adv_train", "adv_mix", "adv_eps"} <= how.keys()
        ]
        guards = sorted(
            {how["robust_collapse"] for d, how in trained.items() if d in datasets and how.get("robust_collapse") is not None}
        )
        guard = (
            f"; training stops if that accuracy falls more than {' / '.join(f'{d:g}' for d in guards)} below its best "
            f"(a best of at least {COLLAPSE_MIN_BEST:g}: the collapse guard, `--robust-collapse`), and the run then "
            "ends with its best-robust round's model (`best_robust.pt`)"
            if guards
            else ""
        )
        attacked = [
            f"on {DATASET_NAMES[dataset]}, {_attacked_model(study)}"
            for dataset in datasets
            if (study := studies.get(f"{dataset}/{key}")) is not None
        ]
        text.append(
            f"{defence.name} ({key}): the CNN trained with federated adversarial training "
            f"({'; '.join(hows) or 'every client partly on adversarial examples'}; `dipsen train --adv-train`); its run "
            f"holds out a validation slice of the training rows to watch its robust accuracy after every evaluated round"
            f"{guard}. The study attacks{', ' + '; '.join(attacked) if attacked else ' its final model'}."
        )
        left_out = [] if defence.variant_of else [d for d in datasets if d in DATASETS and d not in defence.datasets]
        for dataset in left_out:
            cnn = studies.get(f"{dataset}/cnn")
            why = (
                f"the undefended CNN's clean accuracy there is {_acc(cnn['clean']):.3f} (1 draw), "
                "so robustness is not the question"
                if cnn
                else "clean accuracy is too low there for robustness to be the question"
            )
            text.append(f"No {defence.name} run on {DATASET_NAMES[dataset]}: {why}.")
    if any(label.split("/", 1)[1].startswith("cnn-smooth-") for label in results.get("certified") or {}):
        text.append(
            "Smoothed CNNs (randomized smoothing, see 'What can be certified') are certified in L2 and not attacked by "
            "the L-inf study: they have certified figures only."
        )
    return " ".join(text)


def _attacked_model(study: dict) -> str:
    """Which of a run's models its study attacked, in words: the final round's, or the best-robust one after a collapse."""
    collapse = study.get("collapse")  # absent from studies saved before the collapse guard: they attacked the final model
    if not collapse:
        return f"the final round's model (round {study['final_round']})"
    return (
        f"the best-robust model of round {collapse['best_round']} (robust accuracy {collapse['best']:.3f} on the "
        f"validation slice), not the final one: the collapse guard stopped training at round {collapse['round']}, "
        f"where it had fallen to {collapse['at']:.3f}"
    )


def _reading(dataset: str, rows: list[_Row], seconds: dict, eps: float, n: int) -> str:
    """Which model keeps the most worst-case accuracy on ``dataset``, at what clean accuracy and training time."""
    name = DATASET_NAMES[dataset]
    attacked = [row for row in rows if row.study is not None]
    if not attacked:
        return f"{name}: no model attacked."
    worst = {row.label: worst_case(row.study, "mc") for row in attacked if row.study}
    listed = ", ".join(f"{row.name} {worst[row.label]}" for row in attacked)
    line = f"{name}: worst case at eps {eps:g} (mean of {n}): {listed}. "
    chance = [row for row in attacked if row.study and at_chance(row.study)]
    if chance:
        names = ", ".join(row.name for row in chance)
        one = len(chance) == 1
        line += (
            f"{names} {'is' if one else 'are'} near the majority-class rate before any attack: "
            f"{'its' if one else 'their'} figures say nothing of robustness, and {'it is' if one else 'they are'} "
            "left out of the comparison."
        )
        attacked = [row for row in attacked if row not in chance]
    if attacked:  # the comparison, among the models that are not at the majority-class rate
        line += " " if chance else ""
        cnn = next((row for row in attacked if row.label == f"{dataset}/cnn"), None)
        best = max(attacked, key=lambda row: worst[row.label].hi)  # the first of equals: the CNN before any defence
        # ordered by upper bounds: certain only where the best one's interval lies above every other's
        certain = all(worst[best.label].lo >= worst[row.label].hi for row in attacked if row is not best)
        hedge = "" if certain else f" by the upper bounds ({MARK}: the intervals overlap, so this is not certain)"
        if cnn is not None and best is cnn:
            line += f"No defence keeps more worst-case accuracy than the undefended CNN{hedge}."
        else:
            assert best.study is not None
            line += f"{best.name} keeps the most{hedge}, at clean accuracy {_acc(best.study['clean'], 'mc'):.3f} (mean of {n})"
            if cnn is not None and cnn.study is not None:
                line += f" against the CNN's {_acc(cnn.study['clean'], 'mc'):.3f}"
            if seconds.get(best.label) and seconds.get(f"{dataset}/cnn"):
                line += f", for {seconds[best.label] / seconds[f'{dataset}/cnn']:.2f} times the CNN's training time"
            line += "."
            if sweep_check(best.study)[1]:
                line += " Its attack checks fail (see the last column): this figure may be gradient masking, not robustness."
    smoothed = [row for row in rows if row.study is None and row.certificate]
    if smoothed:
        radius = CERTIFIED_RADII[0]
        figures = ", ".join(
            f"{row.certificate['certificate']['certified_accuracy'][radius]:.3f} for the {row.name}"
            for row in smoothed
            if row.certificate and radius in row.certificate["certificate"]["certified_accuracy"]
        )
        if figures:
            line += f" Certified at L2 r = {radius} (a different threat model, not comparable with L-inf eps {eps:g}): {figures}."
    return line
