"""The study's attack cascade: each attack after the paper's runs only on what is still correct; the worst case is unchanged."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from dipsen.attack import AttackResult, AttackSetup, Budget, RobustnessEvaluation
from dipsen.attack import study as study_module
from dipsen.attack.evaluate import from_bits
from dipsen.attack.study import StudySettings, recorded_survivors, study_run

RULES = ("single", "mc")
N = 40
SETTINGS = StudySettings(
    samples=N,
    paper_budget=Budget(3, 1 / 3, 0),
    adaptive_budget=Budget(5, 1 / 10, 1),
    doubling_samples=25,
    hsj_samples=15,
    sweep_eps=(0.3,),
    sweep_samples=N,
)
ATTACKS = (
    "fgsm", "bim", "pgd",  # the paper's
    "adaptive-pgd", "apgd-ce", "apgd-dlr", "pgd-frozen-noise", "doubled",
    "orange-box", "transfer", "square", "hsj",
)  # fmt: skip


def _outcomes(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Per attack (and clean) and rule, whether each of the N examples stays correct: fixed, rule-dependent, per example."""
    rng = np.random.default_rng(seed)
    return {name: {rule: rng.random(N) < (0.9 if name == "clean" else 0.8) for rule in RULES} for name in ("clean", *ATTACKS)}


def _name(setup: AttackSetup) -> str:
    if setup.threat == "query":
        return setup.attack
    if setup.threat != "white-box":
        return setup.threat
    if setup.budget == SETTINGS.paper_budget:
        return setup.attack
    if setup.gradient == "frozen":
        return "pgd-frozen-noise"
    if setup.budget == SETTINGS.adaptive_budget.scaled(2):
        return "doubled"
    return "adaptive-pgd" if setup.attack == "pgd" else setup.attack


def _result(correct: dict[str, np.ndarray], setup: AttackSetup | None, attacked: np.ndarray | None = None) -> AttackResult:
    metrics = {rule: {"accuracy": float(c.mean()), "samples": len(c)} for rule, c in correct.items()}
    return AttackResult(setup, "", 0.0, metrics, correct, np.zeros((len(correct["single"]), 1)), attacked)


class _FakeEvaluation:
    """Stands in for RobustnessEvaluation: a randomized 3-class model whose attacks' outcomes are fixed per example.

    Each attack's outcome on an example does not depend on which other examples it attacks, the
    idealisation under which the cascade and a run of every attack on all examples measure the same thing.
    """

    outcomes: dict[str, dict[str, np.ndarray]] = {}
    calls: list[tuple[str, int | None, np.ndarray | None]] = []

    def __init__(self, trained, samples: int, **_) -> None:
        self.trained, self.randomized, self.classes, self.chance = trained, True, ("a", "b", "c"), 0.4
        self.data = SimpleNamespace(y_eval=np.arange(samples) % 3)
        self.domain = SimpleNamespace(description="the whole input", perturbable_columns=None)

    def source(self, threat: str) -> tuple[None, str]:
        return None, threat

    def clean(self) -> AttackResult:
        return _result({rule: c.copy() for rule, c in self.outcomes["clean"].items()}, None)

    def run(self, setup: AttackSetup, on_progress=None, limit: int | None = None, only=None) -> AttackResult:
        name = _name(setup)
        self.calls.append((name, limit, None if only is None else only.copy()))
        correct = {rule: c[:limit].copy() for rule, c in self.outcomes[name].items()}
        if only is not None:
            correct = {rule: c & only for rule, c in correct.items()}
        return _result(correct, setup, only)

    def reevaluate(self, result: AttackResult, limit: int) -> AttackResult:
        attacked = None if result.attacked is None else result.attacked[:limit]
        return _result({rule: c[:limit] for rule, c in result.correct.items()}, result.setup, attacked)


def _study(monkeypatch, outcomes: dict, every_attack_on_all: bool) -> tuple[dict, list]:
    monkeypatch.setattr(study_module, "RobustnessEvaluation", _FakeEvaluation)
    monkeypatch.setattr(_FakeEvaluation, "outcomes", outcomes)
    monkeypatch.setattr(_FakeEvaluation, "calls", [])
    labels = np.array([0, 1, 2])
    dataset = SimpleNamespace(classes=("a", "b", "c"), info={}, y_train=labels, y_test=labels)
    config = SimpleNamespace(dataset="mnist", model="dipsen")
    trained = SimpleNamespace(
        path="run", config=config, final_round=1, collapse=None, dataset=dataset, training_cost=lambda: None
    )
    study = study_run(trained, replace(SETTINGS, every_attack_on_all=every_attack_on_all))
    return study, _FakeEvaluation.calls[: len(ATTACKS)]  # then the sweep's and the variants', not part of the study's


def _attacked(calls: list) -> int:
    """How many examples the attacks of ``calls`` attacked, all together."""
    return sum(limit or N if only is None else int(only.sum()) for _, limit, only in calls)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_cascade_worst_case_is_the_full_runs_per_example_minimum_under_each_rule(monkeypatch, seed):
    outcomes = _outcomes(seed)
    full, full_calls = _study(monkeypatch, outcomes, every_attack_on_all=True)
    cascade, cascade_calls = _study(monkeypatch, outcomes, every_attack_on_all=False)
    limits = {"doubled": SETTINGS.doubling_samples, "hsj": SETTINGS.hsj_samples}
    assert [name for name, _, _ in full_calls] == [name for name, _, _ in cascade_calls] == list(ATTACKS)
    for rule in RULES:
        minimum = outcomes["clean"][rule].copy()
        for name in ATTACKS:
            minimum[: limits.get(name, N)] &= outcomes[name][rule][: limits.get(name, N)]
        assert 0 < minimum.mean() < outcomes["clean"][rule].mean()  # a case where attacks matter and some survive
        assert full["worst_case"][rule]["all"] == cascade["worst_case"][rule]["all"] == minimum.mean()
        assert full["worst_case"]["per_class"][rule] == cascade["worst_case"]["per_class"][rule]
        assert full["worst_case"][rule]["paper"] == cascade["worst_case"][rule]["paper"]
        np.testing.assert_array_equal(recorded_survivors(cascade, rule), minimum)
    assert _attacked(cascade_calls) < _attacked(full_calls)


def test_each_cascaded_attack_runs_on_exactly_what_some_rule_still_counts_correct(monkeypatch):
    outcomes = _outcomes(3)
    study, calls = _study(monkeypatch, outcomes, every_attack_on_all=False)
    surviving = {rule: outcomes["clean"][rule].copy() for rule in RULES}
    attacked_by = {}
    for name, limit, only in calls:
        n = limit or N
        if name in ("fgsm", "bim", "pgd"):
            assert only is None  # the paper's table: every example
        elif name == "doubled":  # the examples base PGD attacked, so base and doubled compare on the same ones
            np.testing.assert_array_equal(only, attacked_by["adaptive-pgd"][:n])
        else:
            np.testing.assert_array_equal(only, surviving["single"][:n] | surviving["mc"][:n])
        attacked_by[name] = only
        for rule in RULES:
            surviving[rule][:n] &= outcomes[name][rule][:n]
    # some examples end broken under one rule only: attacked on after the other broke them, as that rule's worst case needs
    assert (surviving["single"] != surviving["mc"]).any()
    assert study["cascade"] and "as a cascade" in study["worst_case"]["all_covers"]
    for name, result in study["adaptive"].items():
        key = "adaptive-pgd" if name == "pgd" else name
        assert result["cascade"] and from_bits(result["attacked"]).tolist() == attacked_by[key].tolist()
    assert study["doubling"]["attacked"] == int(attacked_by["doubled"].sum())
    assert "adaptive" not in study["worst_case"]["single"] and "paper+adaptive" in study["worst_case"]["single"]


def test_every_attack_on_all_runs_each_attack_on_every_example_as_before(monkeypatch):
    outcomes = _outcomes(4)
    study, calls = _study(monkeypatch, outcomes, every_attack_on_all=True)
    assert all(only is None for _, _, only in calls)
    assert [limit for _, limit, _ in calls] == [None] * 7 + [SETTINGS.doubling_samples] + [None] * 3 + [SETTINGS.hsj_samples]
    assert not study["cascade"] and "attacked" not in study["doubling"]
    for result in (*study["paper"].values(), *study["adaptive"].values(), *study["threats"].values()):
        assert "cascade" not in result and "attacked" not in result
    assert study["adaptive"]["apgd-ce"]["metrics"]["mc"]["accuracy"] == outcomes["apgd-ce"]["mc"].mean()  # standalone
    for rule in RULES:
        adaptive = outcomes["clean"][rule].copy()
        for name in ("adaptive-pgd", "apgd-ce", "apgd-dlr", "pgd-frozen-noise"):
            adaptive &= outcomes[name][rule]
        adaptive[: SETTINGS.doubling_samples] &= outcomes["doubled"][rule][: SETTINGS.doubling_samples]
        assert study["worst_case"][rule]["adaptive"] == adaptive.mean()


def test_a_run_on_a_subset_counts_the_rest_as_broken_and_reevaluates_as_a_shorter_run(dipsen_run):
    evaluation = RobustnessEvaluation(dipsen_run, samples=40, mc_samples=4)
    # frozen noise and no random start: the masked examples among the first 20 are the first of those among 30
    setup = AttackSetup("pgd", eps=0.1, gradient="frozen", budget=Budget(3, 1 / 3, 0))
    only = np.arange(30) % 3 != 1
    full, limited = evaluation.run(setup, limit=30, only=only), evaluation.run(setup, limit=20, only=only[:20])
    np.testing.assert_array_equal(full.attacked, only)
    np.testing.assert_array_equal(full.x_adv[~only], evaluation.data.x_eval[:30][~only])  # not attacked: the clean input
    np.testing.assert_array_equal(full.x_adv[:20], limited.x_adv)
    again = evaluation.reevaluate(full, 20)
    for rule in RULES:
        assert not full.correct[rule][~only].any()
        assert full.accuracy(rule) == full.correct[rule].mean()  # the left-out examples count as broken
        assert full.metrics[rule]["on_attacked"]["samples"] == only.sum()
        np.testing.assert_array_equal(again.correct[rule], limited.correct[rule])
        assert again.accuracy(rule) == limited.accuracy(rule)
    nothing = evaluation.run(setup, limit=10, only=np.zeros(10, dtype=bool))
    assert not nothing.correct["mc"].any() and nothing.metrics["mc"]["on_attacked"] is None


def test_an_attacked_example_is_judged_with_the_draws_a_run_on_every_example_gives_it(dipsen_run):
    evaluation = RobustnessEvaluation(dipsen_run, samples=40, mc_samples=4)
    setup = AttackSetup("pgd", eps=0.1, gradient="frozen", budget=Budget(3, 1 / 3, 0))
    every = evaluation.run(setup, limit=30)
    # the first 20 attacked: the same adversarial examples (a prefix), predicted with the same noise draws
    cascaded = evaluation.run(setup, limit=30, only=np.arange(30) < 20)
    np.testing.assert_array_equal(cascaded.x_adv[:20], every.x_adv[:20])
    for rule in RULES:
        np.testing.assert_array_equal(cascaded.correct[rule][:20], every.correct[rule][:20])


TINY = StudySettings(
    samples=12,
    mc_samples=2,
    eot_draws=2,
    paper_budget=Budget(3, 1 / 3, 0),
    adaptive_budget=Budget(3, 1 / 3, 1, queries=5, hsj_iterations=1, hsj_evaluations=10),
    doubling_samples=6,
    hsj_samples=4,
    stale_rounds=1,
    attacker_samples=200,
    surrogate_epochs=1,
    sweep_eps=(0.5,),
    sweep_samples=4,
    sweep_budget=Budget(2, 1 / 3, 0),
    sweep_eot_draws=2,
)


def test_on_a_trained_model_the_cascade_attacks_only_survivors_and_fewer_examples(dipsen_run):
    study = study_run(dipsen_run, TINY)
    clean = {rule: from_bits(study["clean"]["correct"][rule]) for rule in RULES}
    surviving = {rule: c.copy() for rule, c in clean.items()}
    ordered = [
        *[("paper", r) for r in study["paper"].values()],
        *[("cascade", r) for r in study["adaptive"].values()],
        ("doubled", study["doubling"]["run"]),
        *[("cascade", r) for r in study["threats"].values()],
    ]
    attacked = 0
    for kind, result in ordered:
        n = result["samples"]
        if kind == "paper":
            assert "cascade" not in result
        elif kind == "doubled":
            assert result["attacked"] == study["adaptive"]["pgd"]["attacked"][:n]
        else:
            assert from_bits(result["attacked"]).tolist() == (surviving["single"][:n] | surviving["mc"][:n]).tolist()
        mask = from_bits(result.get("attacked", "1" * n))
        attacked += int(mask.sum())
        for rule in RULES:
            correct = from_bits(result["correct"][rule])
            assert not correct[~mask].any()
            surviving[rule][:n] &= correct
    for rule in RULES:
        assert study["worst_case"][rule]["all"] == surviving[rule].mean() == recorded_survivors(study, rule).mean()
    every_attack_on_all = sum(result["samples"] for _, result in ordered)
    assert attacked < every_attack_on_all
