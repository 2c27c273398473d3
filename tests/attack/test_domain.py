"""What an attacker may change: pixels in [0, 1]; CTU-13 volume features only, counts kept integer."""

import numpy as np
import pytest

from dipsen.attack import feasible_domain


def test_ctu13_projection_keeps_categoricals_padding_and_integer_counts(ctu13):
    domain = feasible_domain(ctu13)
    x = ctu13.x_test[:200]
    rng = np.random.default_rng(0)
    x_adv = np.clip(x + rng.uniform(-0.3, 0.3, size=x.shape).astype(np.float32), 0, 1)
    out = domain.project(x_adv, x, 0.3)
    assert np.array_equal(out[..., 4:], x[..., 4:])  # Proto and port class untouched
    padding = np.all(x == 0, axis=-1)
    assert padding.any() and np.array_equal(out[padding], x[padding])
    assert np.abs(out - x).max() <= 0.3 + 1e-5 and out.min() >= 0 and out.max() <= 1
    assert not np.array_equal(out[..., :4], x[..., :4])  # the volume features did move
    scaler = ctu13.info["scaler"]
    for column, name in ((1, "TotPkts"), (2, "TotBytes"), (3, "SrcBytes")):
        low, high = scaler[name]["min"], scaler[name]["max"]
        moved = out[..., column] != x[..., column]
        counts = np.expm1(out[..., column][moved].astype(np.float64) * (high - low) + low)
        assert np.allclose(counts, np.round(counts), atol=1e-3 * np.maximum(1, counts))


def test_images_may_change_every_pixel(mnist):
    domain = feasible_domain(mnist)
    x = mnist.x_test[:5]
    assert domain.mask(x) is None
    out = domain.project(x + 0.5, x, 0.1)
    assert np.allclose(out, np.clip(x + 0.1, 0, 1))


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce", "square"])
def test_attacks_run_on_ctu13_windows(ctu13_run, attack):
    """Masks with restarts (PGD, APGD) and square patches on 28 x 6 inputs (Square)."""
    from dipsen.attack import AttackSetup, Budget, RobustnessEvaluation

    evaluation = RobustnessEvaluation(ctu13_run, samples=60)
    threat = "query" if attack == "square" else "white-box"
    result = evaluation.run(AttackSetup(attack, threat=threat, budget=Budget(5, 1 / 4, restarts=2, queries=20)))
    assert result.accuracy("single") <= evaluation.clean().accuracy("single")
