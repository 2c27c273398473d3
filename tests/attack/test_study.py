"""The study's derived figures: worst case over clean and attacks of unequal length, the doubling check, the sweep verdict."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from dipsen.attack import AttackResult, AttackSetup, Budget, RobustnessEvaluation, worst_case_accuracy
from dipsen.attack import study as study_module
from dipsen.attack.study import (
    StudySettings,
    at_chance,
    converged,
    doubling_converged,
    recorded_survivors,
    study_run,
    sweep_verdict,
)


def _result(single: list[bool], setup: AttackSetup | None = None) -> AttackResult:
    correct = np.array(single)
    metrics = {rule: {"accuracy": float(correct.mean())} for rule in ("single", "mc")}
    return AttackResult(setup, "", 0.0, metrics, {"single": correct, "mc": correct}, np.zeros((len(single), 1)))


def test_worst_case_counts_clean_and_an_attack_run_on_fewer_examples_where_it_ran():
    clean = _result([True, True, True, True, False])
    full = _result([True, True, True, False, True])  # the last example: misclassified clean, "correct" after attack
    short = _result([False, True])  # e.g. HopSkipJump on the first two examples only
    assert worst_case_accuracy(clean, [full, short], "single") == 0.4
    assert worst_case_accuracy(clean, [short, full], "single") == 0.4


SETTINGS = StudySettings(
    samples=4,
    paper_budget=Budget(3, 1 / 3, 0),
    adaptive_budget=Budget(5, 1 / 10, 1),
    doubling_samples=2,
    hsj_samples=3,
    sweep_eps=(0.3,),
    sweep_samples=4,
)
CLEAN = [True, False, True, True]  # example 1 is misclassified without attack...
ATTACKED = [True, True, True, False]  # ...and no attack leaves it misclassified; every attack breaks example 3
DOUBLED = [False, True]  # PGD with doubled iterations, on the first two examples, alone breaks example 0


class _FakeEvaluation:
    """Stands in for RobustnessEvaluation: four examples of classes 0, 1, 0, 1 and fixed per-example outcomes."""

    def __init__(self, trained, samples: int, **_) -> None:
        self.trained, self.randomized, self.classes, self.chance = trained, False, ("a", "b"), 0.5
        self.data = SimpleNamespace(y_eval=np.array([0, 1, 0, 1]))
        self.domain = SimpleNamespace(description="the whole input", perturbable_columns=None)

    def source(self, threat: str) -> tuple[None, str]:
        return None, threat

    def clean(self) -> AttackResult:
        return _result(CLEAN)

    def run(self, setup: AttackSetup, on_progress=None, limit: int | None = None, only=None) -> AttackResult:
        doubled = setup.budget == SETTINGS.adaptive_budget.scaled(2)
        outcome = np.array(DOUBLED if doubled else ATTACKED[:limit])
        if only is None:
            return _result(list(outcome), setup)
        result = _result(list(outcome & only), setup)  # a cascaded run: what it left out counts as broken
        result.attacked = only
        return result

    def reevaluate(self, result: AttackResult, limit: int) -> AttackResult:
        return _result(list(result.correct["single"][:limit]), result.setup)


def _fake_study(monkeypatch, settings: StudySettings = SETTINGS) -> dict:
    monkeypatch.setattr(study_module, "RobustnessEvaluation", _FakeEvaluation)
    labels = np.array([0, 1])
    dataset = SimpleNamespace(classes=("a", "b"), info={}, y_train=labels, y_test=labels)
    config = SimpleNamespace(dataset="mnist", model="cnn")
    trained = SimpleNamespace(
        path="run", config=config, final_round=1, collapse=None, dataset=dataset, training_cost=lambda: None
    )
    return study_run(trained, settings)


@pytest.mark.parametrize("every_attack_on_all", [True, False])
def test_worst_case_is_the_per_example_minimum_over_clean_and_every_attack_the_doubled_run_included(
    monkeypatch, every_attack_on_all
):
    worst = _fake_study(monkeypatch, replace(SETTINGS, every_attack_on_all=every_attack_on_all))["worst_case"]
    # survivors: example 2 only; not 1 (misclassified clean), 0 (broken by the doubled run) or 3 (broken by every attack)
    adaptive = "adaptive" if every_attack_on_all else "paper+adaptive"  # the cascade's adaptive attacks follow the paper's
    for rule in ("single", "mc"):
        assert worst[rule] == {"paper": 0.5, adaptive: 0.25, "all": 0.25}
        assert worst["per_class"][rule] == [0.5, 0.0]
    assert "doubled iterations on the first 2" in worst["all_covers"] and "HopSkipJump on the first 3" in worst["all_covers"]


@pytest.mark.parametrize("every_attack_on_all", [True, False])
def test_a_saved_study_recomputes_its_worst_case_from_its_per_example_results(monkeypatch, every_attack_on_all):
    saved = json.loads(json.dumps(_fake_study(monkeypatch, replace(SETTINGS, every_attack_on_all=every_attack_on_all))))
    # in the cascade the doubled run attacks what base PGD attacked: not example 1, misclassified without attack
    doubled = "01" if every_attack_on_all else "00"
    assert saved["clean"]["correct"]["single"] == "1011" and saved["doubling"]["run"]["correct"]["mc"] == doubled
    for rule in ("single", "mc"):
        np.testing.assert_array_equal(recorded_survivors(saved, rule), [False, False, True, False])
        assert recorded_survivors(saved, rule).mean() == saved["worst_case"][rule]["all"]
    for result in (saved["clean"], *saved["paper"].values(), *saved["adaptive"].values(), *saved["threats"].values()):
        del result["correct"]  # as saved before per-example results were kept
    assert recorded_survivors(saved, "mc") is None


def test_reevaluating_a_prefix_predicts_exactly_as_a_run_limited_to_it(dipsen_run):
    evaluation = RobustnessEvaluation(dipsen_run, samples=40, mc_samples=4)
    # frozen noise and no random start: the first 20 adversarial examples do not depend on the batch length
    setup = AttackSetup("pgd", eps=0.1, gradient="frozen", budget=Budget(3, 1 / 3, 0))
    full, limited = evaluation.run(setup), evaluation.run(setup, limit=20)
    np.testing.assert_array_equal(full.x_adv[:20], limited.x_adv)
    again = evaluation.reevaluate(full, 20)
    for rule in ("single", "mc"):
        np.testing.assert_array_equal(again.correct[rule], limited.correct[rule])
        assert again.accuracy(rule) == limited.accuracy(rule)


def test_at_chance_is_the_sweep_verdicts_majority_rule_on_the_best_clean_rule():
    def study(single: float, mc: float | None = None, chance: float | None = 0.69) -> dict:
        metrics = {"single": {"accuracy": single}} | ({} if mc is None else {"mc": {"accuracy": mc}})
        return {"clean": {"metrics": metrics}} | ({} if chance is None else {"chance": chance})

    assert at_chance(study(0.69)) and at_chance(study(0.78))  # within NEAR_ZERO (0.1) of the majority rate
    assert not at_chance(study(0.80))
    assert not at_chance(study(0.75, mc=0.85))  # the better rule decides: the mean of draws is above
    assert not at_chance(study(0.5, chance=None))  # a study saved before the rate was recorded
    assert sweep_verdict([0.78, 0.5], 0.5, chance=0.69).startswith("no verdict")  # the same rule


def test_sweep_verdict_requires_accuracy_near_zero_not_near_chance():
    # CTU-13-like: majority class 0.66; an attack that leaves 0.76 at eps 0.5 is not working
    assert not sweep_verdict([0.99, 0.9, 0.76], 0.5, chance=0.66).startswith("working")
    assert not sweep_verdict([0.99, 0.9, 0.70], 0.5, chance=0.66, domain_limit=0.5).startswith("working")
    assert "0.50" in sweep_verdict([0.99, 0.9, 0.70], 0.5, chance=0.66, domain_limit=0.5)
    assert sweep_verdict([0.99, 0.3, 0.02], 0.5, chance=0.11).startswith("working")
    assert sweep_verdict([0.2, 0.1, 0.0], 0.5, chance=0.15).startswith("no verdict")


def test_doubling_converges_at_a_fall_of_exactly_the_tolerance_in_examples():
    assert 0.43 - 0.41 > 0.02  # in floats: the comparison that marked such a fall not converged
    assert converged(0.43, 0.41, 100) and converged(0.55, 0.55, 100) and converged(0.50, 0.52, 100)
    assert not converged(0.43, 0.40, 100)
    assert not converged(0.5, 0.5 - 1 / 30, 30)  # one example of 30 is more than 2 points


def test_a_saved_doubling_record_is_judged_from_its_figures_not_its_flag():
    saved = {"samples": 100, "single": {"base": 0.43, "doubled": 0.41}, "mc": {"base": 0.43, "doubled": 0.41}, "converged": False}
    assert doubling_converged(saved)  # an older version's float comparison flagged it
    saved["mc"]["doubled"] = 0.40
    assert not doubling_converged(saved)
