"""The robustness study of one trained run: the paper's protocol and the adaptive one, side by side.

For one deployed model, on the same evaluation examples:

- ``paper``: FGSM, BIM and PGD at eps, white-box, gradients through single noise draws, ART's
  default step sizes, evaluated with one draw (the paper's protocol, section VI-E);
- ``adaptive`` (Carlini et al. 2019): PGD and APGD (CE, and DLR with >= 3 classes) through the EOT
  view, PGD through frozen noise, random starts; plus the check that doubling the iterations no
  longer helps (both runs judged on the same examples with the same prediction draws);
- ``threats``: orange-box (stale checkpoint), black-box transfer (own surrogate) and query-only
  attacks (Square, HopSkipJump) against the deployed model;
- ``sweep``: accuracy against eps (PGD through one noise draw per gradient, key ``single-draw``, and EOT PGD,
  key ``adaptive``; both with the sweep's budget, not the paper's), with a verdict on whether the
  attack is working: an untargeted attack must drive accuracy near 0 at large eps. Where the
  feasible domain is restricted (CTU-13), the sweep also runs at eps 1, where every feasible
  coordinate may take any value in [0, 1]: what stays correct there is out of this attack's reach
  in that domain, and is reported as such;
- ``variants``: protocol choices that could explain published figures (noise off at inference,
  Keras-style clipped probabilities in the loss), clearly labelled, never part of the verdict;
- ``task``: what the run predicts (the data set's ``info["task"]``), its class counts and the
  accuracy of always answering the most frequent class of the whole test split;
- ``baselines`` (CTU-13): trivial reference classifiers (majority, one feature,
  depth-2 trees, logistic regression) on the same examples, clean and under their exact worst case
  at every eps of the study (:mod:`.baselines`), so a model's figure can be read against what the
  task demands;
- ``worst_case``: per example, the minimum over the clean prediction and every attack run above,
  the doubled-iteration PGD run included, averaged over examples (``all``; ``paper`` over the
  paper's attacks; with every attack on all examples ``adaptive`` over the adaptive ones, the
  doubled run being adaptive, and in the cascade ``paper+adaptive`` over both sections instead);
  HopSkipJump and the doubled run count on the first ``hsj_samples`` and ``doubling_samples``
  examples, where they ran.

The cascade (the default; ``StudySettings.every_attack_on_all`` turns it off): the paper's attacks
run on every example, and the adaptive attacks and threat models after them, in the order above, run
only on the examples still correct after the clean prediction and every attack before them, as
AutoAttack does: the worst case is the same per-example minimum, at a fraction of the cost (see
:func:`study_run`). A cascaded attack's figure is then what it left of what came before it, not
its standalone accuracy; its dict says so (``cascade``, and the ``attacked`` examples).

Every figure is a measurement; :func:`study_run` returns them as one JSON-serialisable dict. Each
attack's dict (and the clean one, and the doubled run's, ``doubling["run"]``) keeps its per-example
correctness, so the worst case can be recomputed from a saved study (:func:`recorded_survivors`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ..data import Dataset
from .attacks import Budget
from .baselines import dataset_baselines
from .evaluate import RULES, AttackResult, AttackSetup, RobustnessEvaluation, from_bits, survivors, worst_case_accuracy
from .target import TrainedRun

ProgressFactory = Callable[[str, int], Callable[[int], None]]
"""``factory(description, total)`` returns a callback advanced by the number of examples done."""

CONVERGENCE_TOLERANCE = 0.02
"""Doubling the iterations may lower accuracy by at most this much for the attack to count as converged."""
NEAR_ZERO = 0.1
"""An eps sweep shows a working attack when its largest eps leaves at most this accuracy."""
DOMAIN_LIMIT_EPS = 1.0
"""On inputs in [0, 1], an L-inf ball of radius 1 is the whole feasible domain."""


@dataclass(frozen=True)
class StudySettings:
    """Sizes and budgets of a study; the defaults are the full study (``quick()`` is CI-sized).

    ``every_attack_on_all`` runs every adaptive attack and threat model on every example, for each
    one's standalone figure; by default they run as a cascade (:func:`study_run`), which gives the
    same worst case for less.
    """

    eps: float = 0.3
    samples: int = 200
    mc_samples: int = 16
    eot_draws: int = 16
    paper_budget: Budget = Budget(iterations=100, step_fraction=1 / 3, restarts=0)
    adaptive_budget: Budget = Budget(
        iterations=50, step_fraction=1 / 10, restarts=1, queries=1000, hsj_iterations=10, hsj_evaluations=500
    )
    doubling_samples: int = 100
    hsj_samples: int = 30
    stale_rounds: int = 5
    attacker_samples: int = 5000
    surrogate_epochs: int = 5
    sweep_eps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    sweep_samples: int = 200
    sweep_budget: Budget = Budget(iterations=40, step_fraction=1 / 10, restarts=0)
    sweep_eot_draws: int = 8
    seed: int = 0
    every_attack_on_all: bool = False

    @classmethod
    def quick(cls) -> StudySettings:
        return cls(
            samples=40,
            mc_samples=4,
            eot_draws=4,
            paper_budget=Budget(10, 1 / 3, 0),
            adaptive_budget=Budget(10, 1 / 10, 1, queries=30, hsj_iterations=2, hsj_evaluations=30),
            doubling_samples=20,
            hsj_samples=5,
            stale_rounds=1,
            attacker_samples=500,
            surrogate_epochs=2,
            sweep_eps=(0.1, 0.3, 0.5),
            sweep_samples=30,
            sweep_budget=Budget(5, 1 / 5, 0),
            sweep_eot_draws=2,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def study_run(trained: TrainedRun, settings: StudySettings, progress: ProgressFactory | None = None) -> dict:
    """Every attack of the study on ``trained``'s final global model; see the module docstring.

    Unless ``settings.every_attack_on_all``, the attacks after the paper's run as a cascade: each
    only on the examples still correct, under at least one prediction rule, after the clean
    prediction and every attack before it (the paper's attacks run on every example and count).
    No rule is canonical (the report gives the one-draw and the mean-of-draws figures side by side),
    so an example leaves the cascade only once it is broken under both: under each rule, every
    attack ran on every example that rule still counted as surviving, and each rule's worst case is
    the per-example minimum over the clean prediction and every attack, exactly as with every attack
    on all examples. An example left out of an attack counts as broken in that attack's result
    (it was broken before; the minimum is unchanged). Each attack is still predicted on every
    example, so an example is judged with the same prediction draws as without the cascade
    (:meth:`~.evaluate.RobustnessEvaluation.run`); figures differ from such a run only through the
    attacks' own randomness (random starts, EOT noise, queries), drawn per call: on fewer examples,
    other draws of the same attacks.

    The doubling check in the cascade: the doubled run attacks exactly the examples adaptive PGD
    attacked among the first ``doubling_samples`` (not the fewer still correct when it runs), both
    runs are judged with the same prediction draws, and the examples neither attacked count as
    broken in both. Base and doubled are thus compared on the same examples, and their
    difference is counted over the same ``doubling_samples`` examples as without the cascade.
    """
    evaluation = RobustnessEvaluation(
        trained,
        settings.samples,
        mc_samples=settings.mc_samples,
        stale_rounds=settings.stale_rounds,
        seed=settings.seed,
        attacker_samples=settings.attacker_samples,
        surrogate_epochs=settings.surrogate_epochs,
    )
    # the orange-box attack runs late in the study: a run that cannot serve its stale checkpoint fails now
    evaluation.source("orange-box")
    randomized = evaluation.randomized
    eps, paper, adaptive = settings.eps, settings.paper_budget, settings.adaptive_budget
    strong_view: dict[str, Any] = {"gradient": "eot", "eot_draws": settings.eot_draws} if randomized else {}
    clean = evaluation.clean()
    cascade = _Cascade(_Runner(evaluation, progress), clean, enabled=not settings.every_attack_on_all)

    paper_results = {name: cascade(AttackSetup(name, eps, budget=paper), on_all=True) for name in ("fgsm", "bim", "pgd")}

    adaptive_setups = {
        "pgd": AttackSetup("pgd", eps, budget=adaptive, **strong_view),
        "apgd-ce": AttackSetup("apgd-ce", eps, budget=adaptive, **strong_view),
    }
    if len(evaluation.classes) >= 3:
        adaptive_setups["apgd-dlr"] = AttackSetup("apgd-dlr", eps, budget=adaptive, **strong_view)
    if randomized:
        adaptive_setups["pgd-frozen-noise"] = AttackSetup(
            "pgd", eps, gradient="frozen", budget=replace(adaptive, iterations=2 * adaptive.iterations)
        )
    adaptive_results = {name: cascade(setup) for name, setup in adaptive_setups.items()}

    doubled_setup = replace(adaptive_setups["pgd"], budget=adaptive.scaled(2))
    limit = min(settings.doubling_samples, settings.samples)
    base_run = adaptive_results["pgd"]
    # in the cascade, the examples base PGD attacked: both runs judged on the same examples (see the docstring)
    doubled = cascade(doubled_setup, limit, only=None if base_run.attacked is None else base_run.attacked[:limit])
    base = evaluation.reevaluate(base_run, limit)
    doubling: dict[str, Any] = {
        "samples": limit,
        **({} if doubled.attacked is None else {"attacked": int(doubled.attacked.sum())}),
        "iterations": [adaptive.iterations, doubled_setup.budget.iterations],
        **{rule: {"base": base.accuracy(rule), "doubled": doubled.accuracy(rule)} for rule in ("single", "mc")},
        "run": doubled.to_dict(),
    }
    doubling["converged"] = doubling_converged(doubling)

    threat_results = {
        "orange-box": cascade(AttackSetup("pgd", eps, threat="orange-box", budget=adaptive, **strong_view)),
        "transfer": cascade(AttackSetup("pgd", eps, threat="transfer", budget=adaptive)),
        "square": cascade(AttackSetup("square", eps, threat="query", budget=adaptive)),
    }
    hsj = cascade(AttackSetup("hsj", eps, threat="query", budget=adaptive), min(settings.hsj_samples, settings.samples))

    paper_attacks, adaptive_attacks = list(paper_results.values()), [*adaptive_results.values(), doubled]
    every_attack = [*paper_attacks, *adaptive_attacks, *threat_results.values(), hsj]
    # in the cascade an adaptive attack skipped what the paper's broke: no worst case of the adaptive ones alone
    sections = (
        {"paper": paper_attacks, "adaptive": adaptive_attacks}
        if settings.every_attack_on_all
        else {"paper": paper_attacks, "paper+adaptive": [*paper_attacks, *adaptive_attacks]}
    )
    worst: dict[str, Any] = {
        rule: {
            **{section: worst_case_accuracy(clean, attacks, rule) for section, attacks in sections.items()},
            "all": worst_case_accuracy(clean, every_attack, rule),
        }
        for rule in ("single", "mc")
    }
    partial = f"adaptive PGD with doubled iterations on the first {doubled.samples}, HopSkipJump on the first {hsj.samples} only"
    worst["all_covers"] = (
        f"clean and every attack on all {settings.samples} examples; {partial}"
        if settings.every_attack_on_all
        else f"clean and every attack, as a cascade: the paper's attacks on all {settings.samples} examples, each "
        "later attack only on those still correct (under either rule) after the clean prediction and every attack "
        f"before it, the others counting as broken; {partial}"
    )
    worst["per_class"] = {rule: _survival_per_class(clean, every_attack, rule, evaluation) for rule in ("single", "mc")}

    return {
        "run": str(trained.path),
        "dataset": trained.config.dataset,
        "model": trained.config.model,
        "randomized": randomized,
        "final_round": trained.final_round,
        "collapse": trained.collapse,  # None, or why final_round is the best-robust round and not the last one
        "samples": settings.samples,
        "cascade": not settings.every_attack_on_all,  # adaptive and threat figures: what each left of what came before
        "chance": evaluation.chance,
        "task": task_summary(trained.dataset),
        "domain": evaluation.domain.description,
        "clean": clean.to_dict(),
        "paper": {k: r.to_dict() for k, r in paper_results.items()},
        "adaptive": {k: r.to_dict() for k, r in adaptive_results.items()},
        "doubling": doubling,
        "threats": {**{k: r.to_dict() for k, r in threat_results.items()}, "hsj": hsj.to_dict()},
        "worst_case": worst,
        "sweep": _sweep(trained, settings, progress, randomized),
        "variants": _variants(trained, settings, progress, randomized),
        # the rules read CTU-13's flow windows (bottom row = the classified flow); meaningless on images
        "baselines": _baselines(evaluation, settings) if trained.config.dataset == "ctu13" else None,
        "training_cost": trained.training_cost(),
    }


def converged(base: float, doubled: float, samples: int) -> bool:
    """Whether doubling the iterations lowered accuracy on ``samples`` examples by at most :data:`CONVERGENCE_TOLERANCE`.

    Compared in examples, not in floats: 0.43 - 0.41 is 0.020000000000000018, and a fall of exactly
    the tolerance must pass.
    """
    allowed = math.floor(CONVERGENCE_TOLERANCE * samples + 1e-9)  # whole examples, never more than the tolerance
    return round((base - doubled) * samples) <= allowed


def doubling_converged(doubling: dict) -> bool:
    """A study's doubling check, judged from its figures under both prediction rules (also those saved by older versions)."""
    return all(converged(doubling[r]["base"], doubling[r]["doubled"], doubling["samples"]) for r in ("single", "mc"))


def task_summary(dataset: Dataset) -> dict:
    """The task's name (``info["task"]``), class counts, and the majority class of the whole test split."""
    counts = {
        split: np.bincount(y, minlength=len(dataset.classes)).tolist()
        for split, y in (("train", dataset.y_train), ("test", dataset.y_test))
    }
    majority = int(np.argmax(counts["test"]))
    total = sum(counts["test"])
    return {
        "name": dataset.info.get("task"),
        "classes": list(dataset.classes),
        "class_counts": counts,
        "majority_class": dataset.classes[majority],
        "majority_rate": counts["test"][majority] / total if total else None,
    }


def recorded_survivors(study: dict, rule: str) -> np.ndarray | None:
    """Per example, whether it survived clean and every attack of a saved study: its ``worst_case`` ``all``, recomputed.

    None for a study saved without per-example results, whose worst case left out the clean
    prediction and the doubled PGD run (:mod:`dipsen.report.worst` bounds its figure). A cascaded
    attack's results mark the examples it left out as broken, so the same minimum applies.
    """
    if "correct" not in study["clean"]:
        return None
    attacks = [*study["paper"].values(), *study["adaptive"].values(), study["doubling"]["run"], *study["threats"].values()]
    return survivors(from_bits(study["clean"]["correct"][rule]), [from_bits(a["correct"][rule]) for a in attacks])


def _survival_per_class(
    clean: AttackResult, attacks: list[AttackResult], rule: str, evaluation: RobustnessEvaluation
) -> list[float | None]:
    """Per class, the fraction of its examples :func:`survivors` keeps (their mean is the balanced worst case)."""
    survived = survivors(clean.correct[rule], [result.correct[rule] for result in attacks])
    labels = evaluation.data.y_eval
    return [float(survived[labels == c].mean()) if (labels == c).any() else None for c in range(len(evaluation.classes))]


def _baselines(evaluation: RobustnessEvaluation, settings: StudySettings) -> dict:
    """The reference classifiers on the study's examples at eps, and their robust accuracy along the sweep's eps."""
    data, dataset = evaluation.data, evaluation.trained.dataset
    at_eps = dataset_baselines(dataset, settings.eps, data.x_eval, data.y_eval, seed=settings.seed)
    sweep_eps = [*settings.sweep_eps, *([DOMAIN_LIMIT_EPS] if evaluation.domain.perturbable_columns is not None else [])]
    curves: dict[str, list[float]] = {name: [entry["accuracy"]] for name, entry in at_eps["baselines"].items()}
    for eps in sweep_eps:
        for name, entry in dataset_baselines(dataset, eps, data.x_eval, data.y_eval, seed=settings.seed)["baselines"].items():
            curves[name].append(entry["robust_accuracy"])
    return {**at_eps, "sweep": {"eps": [0.0, *sweep_eps], "robust_accuracy": curves}}


class _Runner:
    def __init__(self, evaluation: RobustnessEvaluation, progress: ProgressFactory | None) -> None:
        self.evaluation, self.progress = evaluation, progress

    def __call__(self, setup: AttackSetup, limit: int | None = None, only: np.ndarray | None = None) -> AttackResult:
        total = int(only.sum()) if only is not None else limit or len(self.evaluation.data.y_eval)
        on_progress = self.progress(f"{self.evaluation.trained.config.model}: {setup.label}", total) if self.progress else None
        return self.evaluation.run(setup, on_progress, limit=limit, only=only)


class _Cascade:
    """Runs the study's attacks one after another, keeping per rule which examples survived so far.

    Enabled, an attack runs only on the examples that survived the clean prediction and every
    attack before it under at least one rule (see :func:`study_run`); disabled, on every example.
    """

    def __init__(self, runner: _Runner, clean: AttackResult, enabled: bool) -> None:
        self.runner, self.enabled = runner, enabled
        self.surviving = {rule: clean.correct[rule].copy() for rule in RULES}

    def __call__(
        self, setup: AttackSetup, limit: int | None = None, *, on_all: bool = False, only: np.ndarray | None = None
    ) -> AttackResult:
        """``setup`` on the first ``limit`` examples: those still surviving under some rule, every one of them
        with ``on_all`` or when disabled, or exactly ``only`` (a mask of them) when given."""
        if only is None and self.enabled and not on_all:
            only = np.logical_or.reduce([surviving[:limit] for surviving in self.surviving.values()])
        result = self.runner(setup, limit, only)
        for rule, surviving in self.surviving.items():
            surviving[: result.samples] &= result.correct[rule]
        return result


def _sweep(trained: TrainedRun, settings: StudySettings, progress: ProgressFactory | None, randomized: bool) -> dict:
    """Accuracy against eps for PGD through one draw per gradient and (randomized models) EOT PGD, both with
    ``settings.sweep_budget`` (fewer, smaller steps than the paper's PGD: the sweep runs at five eps)."""
    evaluation = RobustnessEvaluation(trained, settings.sweep_samples, mc_samples=settings.mc_samples, seed=settings.seed)
    runner = _Runner(evaluation, progress)
    curves = {"single-draw": AttackSetup("pgd", budget=settings.sweep_budget)}
    if randomized:
        curves["adaptive"] = AttackSetup("pgd", gradient="eot", eot_draws=settings.sweep_eot_draws, budget=settings.sweep_budget)
    clean = evaluation.clean()
    restricted = evaluation.domain.perturbable_columns is not None
    out: dict = {"eps": [0.0, *settings.sweep_eps], "samples": settings.sweep_samples, "chance": evaluation.chance}
    for curve, setup in curves.items():
        accuracies = {rule: [clean.accuracy(rule)] for rule in ("single", "mc")}
        for eps in settings.sweep_eps:
            result = runner(replace(setup, eps=eps))
            for rule in accuracies:
                accuracies[rule].append(result.accuracy(rule))
        steps = f"{setup.budget.iterations} steps of eps/{1 / setup.budget.step_fraction:g}"
        out[curve] = {**accuracies, "attack": f"pgd, {steps}, grad={setup.gradient}"}
        limit = None
        if restricted:
            whole_domain = runner(replace(setup, eps=DOMAIN_LIMIT_EPS))
            out[curve]["domain_limit"] = {rule: whole_domain.accuracy(rule) for rule in accuracies}
            limit = out[curve]["domain_limit"]["mc"]
        out[curve]["verdict"] = sweep_verdict(accuracies["mc"], max(settings.sweep_eps), evaluation.chance, limit)
    return out


def near_majority(accuracy: float, chance: float) -> bool:
    """True when ``accuracy`` is within :data:`NEAR_ZERO` of (or below) the majority-class rate ``chance``."""
    return accuracy <= chance + NEAR_ZERO


def at_chance(study: dict) -> bool:
    """True when a studied model is near the majority-class rate before any attack (its best clean rule).

    Such a model (one that answers the majority class for nearly every input, say) keeps that rate
    under any attack that cannot move its answer: a figure of the majority class, not robustness.
    The same rule (:func:`near_majority`) as :func:`sweep_verdict`'s "no verdict".
    """
    chance = study.get("chance")  # absent from studies saved before the majority-class rate was recorded
    clean = study["clean"]["metrics"]
    return chance is not None and near_majority(max(rule["accuracy"] for rule in clean.values()), chance)


def sweep_verdict(accuracies: list[float], largest_eps: float, chance: float, domain_limit: float | None = None) -> str:
    """'working' when an untargeted attack leaves accuracy near 0 at the largest eps; otherwise failing.

    ``accuracies`` starts with the clean accuracy. ``domain_limit`` is the accuracy the same attack
    leaves when every feasible coordinate may take any value (eps 1): reported beside a failing
    verdict, as what the feasible domain keeps out of the attack's reach; it never turns a high
    accuracy into a pass, since a weak attack would show the same.
    """
    if near_majority(accuracies[0], chance):
        return f"no verdict: the model is near the majority-class rate ({chance:.2f}) before any attack"
    if accuracies[-1] <= NEAR_ZERO:
        return f"working: accuracy falls to {accuracies[-1]:.2f} at eps {largest_eps:g}"
    verdict = (
        f"attack not shown to work: accuracy {accuracies[-1]:.2f} at eps {largest_eps:g} is not near 0 "
        f"(majority class {chance:.2f})"
    )
    if domain_limit is not None:
        verdict += (
            f"; with every feasible coordinate free (eps {DOMAIN_LIMIT_EPS:g}) it leaves {domain_limit:.2f}, "
            "out of this attack's reach in the feasible domain"
        )
    return verdict + "; a weak or domain-limited attack, not evidence of robustness"


def _variants(trained: TrainedRun, settings: StudySettings, progress: ProgressFactory | None, randomized: bool) -> dict:
    """Paper-protocol attacks under protocol choices that could explain the paper's figures."""
    variants: dict[str, dict] = {}
    choices: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {"clipped-probabilities": ({}, {"loss": "clipped-probabilities"})}
    if randomized:
        choices["noise-off-at-inference"] = ({"inference_noise": False}, {})
    for name, (evaluation_args, setup_args) in choices.items():
        evaluation = RobustnessEvaluation(
            trained, settings.samples, mc_samples=settings.mc_samples, seed=settings.seed, **evaluation_args
        )
        runner = _Runner(evaluation, progress)
        variants[name] = {
            "clean": evaluation.clean().to_dict(),
            **{
                attack: runner(AttackSetup(attack, settings.eps, budget=settings.paper_budget, **setup_args)).to_dict()
                for attack in ("fgsm", "bim", "pgd")
            },
        }
    return variants
