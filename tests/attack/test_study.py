"""The study's derived figures: worst case over attacks of unequal length, the doubling check, the sweep verdict."""

import numpy as np

from dipsen.attack import AttackResult, AttackSetup, Budget, RobustnessEvaluation, worst_case_accuracy
from dipsen.attack.study import converged, doubling_converged, sweep_verdict


def _result(single: list[bool]) -> AttackResult:
    correct = np.array(single)
    return AttackResult(None, "", 0.0, {}, {"single": correct, "mc": correct}, np.zeros((len(single), 1)))


def test_worst_case_counts_an_attack_run_on_fewer_examples_where_it_ran():
    full = _result([True, True, True, False])
    short = _result([False, True])  # e.g. HopSkipJump on the first two examples only
    assert worst_case_accuracy([full, short], "single") == 0.5
    assert worst_case_accuracy([short, full], "single") == 0.5


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
