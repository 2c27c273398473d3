"""Every attack really attacks: it lowers an undefended model's accuracy on real MNIST images."""

import numpy as np
import pytest

from dipsen.attack import AttackSetup, Budget, RobustnessEvaluation
from dipsen.errors import DipsenError

MARGIN = 0.25
"""Each attack at eps 0.3 must take at least this much off the clean accuracy of the CNN."""

SMALL = Budget(iterations=10, step_fraction=1 / 4, restarts=0, queries=100, hsj_iterations=3, hsj_evaluations=100)
CASES = [
    AttackSetup("fgsm", budget=SMALL),
    AttackSetup("bim", budget=SMALL),
    AttackSetup("pgd", budget=Budget(10, 1 / 4, restarts=1)),
    AttackSetup("apgd-ce", budget=SMALL),
    AttackSetup("apgd-dlr", budget=SMALL),
    AttackSetup("pgd", threat="orange-box", budget=SMALL),
    AttackSetup("pgd", threat="transfer", budget=SMALL),
    AttackSetup("square", threat="query", budget=SMALL),
    AttackSetup("hsj", threat="query", budget=SMALL),
]


@pytest.fixture(scope="module")
def cnn_evaluation(cnn_run):
    return RobustnessEvaluation(cnn_run, samples=60, stale_rounds=1, attacker_samples=2000, surrogate_epochs=3)


def test_the_undefended_model_is_accurate_before_attack(cnn_evaluation):
    assert cnn_evaluation.clean().accuracy("single") >= 0.85


HSJ_SAMPLES = 24
"""HopSkipJump costs several seconds an example: it attacks the first ones only, judged against their clean accuracy."""


@pytest.mark.parametrize("setup", CASES, ids=lambda s: f"{s.attack}-{s.threat}")
def test_each_attack_lowers_accuracy_by_the_margin(cnn_evaluation, setup):
    limit = HSJ_SAMPLES if setup.attack == "hsj" else None
    clean = float(cnn_evaluation.clean().correct["single"][:limit].mean())
    result = cnn_evaluation.run(setup, limit=limit)
    assert result.samples == (limit or cnn_evaluation.clean().samples)
    assert result.accuracy("single") <= clean - MARGIN, f"{setup.label}: {clean:.3f} -> {result.accuracy('single'):.3f}"


def test_pgd_at_large_eps_drives_an_undefended_model_to_near_zero(cnn_evaluation):
    result = cnn_evaluation.run(AttackSetup("pgd", eps=0.5, budget=Budget(20, 1 / 4, 0)))
    assert result.accuracy("single") <= 0.02


def test_adversarial_examples_stay_in_the_eps_ball_and_input_range(cnn_run):
    evaluation = RobustnessEvaluation(cnn_run, samples=20)
    captured = {}
    original = evaluation.domain.project

    def spy(x_adv, x, eps):
        out = original(x_adv, x, eps)
        captured["delta"], captured["out"] = out - x, out
        return out

    object.__setattr__(evaluation.domain, "project", spy)
    evaluation.run(AttackSetup("pgd", eps=0.1, budget=Budget(5, 1 / 2, 1)))
    assert np.abs(captured["delta"]).max() <= 0.1 + 1e-6
    assert captured["out"].min() >= 0.0 and captured["out"].max() <= 1.0


def test_query_attacks_only_go_with_the_query_threat_model():
    with pytest.raises(DipsenError, match="query"):
        AttackSetup("square", threat="white-box")
    with pytest.raises(DipsenError, match="query"):
        AttackSetup("pgd", threat="query")


def test_bad_eps_is_refused():
    with pytest.raises(DipsenError, match="eps"):
        AttackSetup("pgd", eps=0.0)
