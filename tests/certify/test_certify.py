import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, norm
from torch import nn

from dipsen.certify import ABSTAIN, Smooth, largest_epsilon, linf_radius, lower_confidence_bound, pixeldp_certify
from dipsen.certify.pixeldp import l2_size
from dipsen.certify.smoothing import class_counts
from dipsen.models import build_model, calibrate_noise


@pytest.mark.parametrize("successes, trials, alpha", [(0, 10, 0.05), (7, 10, 0.05), (950, 1000, 0.001), (40, 100, 0.01)])
def test_lower_bound_is_clopper_pearson(successes, trials, alpha):
    expected = 0.0 if successes == 0 else beta.ppf(alpha, successes, trials - successes + 1)  # the textbook formula
    assert lower_confidence_bound(successes, trials, alpha) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_lower_bound_when_every_trial_succeeds_is_alpha_to_the_one_over_n():
    assert lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100))


class HalfSpace(nn.Module):
    """f(x) = 1 iff w.x > 0 (unit w): the smoothed probability is Phi(w.x / sigma), its exact radius |w.x|."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w / w.norm()

    def forward(self, x):
        score = x.flatten(1) @ self.w
        return torch.stack([-score, score], dim=1)


def test_smoothing_radius_of_a_half_space_is_sound_and_close():
    torch.manual_seed(0)
    w = torch.randn(20)
    smooth = Smooth(HalfSpace(w), num_classes=2, sigma=0.5)
    generator = torch.Generator().manual_seed(1)
    for margin in (0.1, 0.4, 0.8):
        x = w / w.norm() * margin
        cert = smooth.certify(x, n0=100, n=20_000, alpha=0.001, generator=generator)
        assert cert.label == 1
        assert cert.radius < margin  # the exact radius of the smoothed half-space is the margin
        assert cert.radius > 0.85 * margin
        assert cert.p_lower < norm.cdf(margin / 0.5)


def test_smoothing_abstains_on_the_boundary_and_predict_abstains_too():
    w = torch.ones(4)
    smooth = Smooth(HalfSpace(w), num_classes=2, sigma=1.0)
    generator = torch.Generator().manual_seed(0)
    assert smooth.certify(torch.zeros(4), 100, 1000, 0.001, generator).label == ABSTAIN
    assert smooth.predict(torch.zeros(4), 1000, 0.001, generator) == ABSTAIN
    assert smooth.predict(torch.ones(4), 1000, 0.001, generator) == 1


def test_linf_ball_inside_the_l2_ball():
    assert linf_radius(8.4, 784) == pytest.approx(0.3, abs=1e-3)  # the paper's L-inf 0.3 on MNIST is L2 up to 8.4


@pytest.mark.parametrize("seed", range(20))
def test_largest_epsilon_matches_a_grid_search(seed):
    rng = np.random.default_rng(seed)
    lower, upper, delta = rng.uniform(0.3, 1.0), rng.uniform(0.0, 0.3), rng.choice([0.0001, 0.01, 0.05])
    grid = np.linspace(0, 1, 200_001)
    holds = lower >= np.exp(2 * grid) * upper + (1 + np.exp(grid)) * delta
    expected = grid[holds].max() if holds.any() else 0.0
    assert largest_epsilon(lower, upper, delta) == pytest.approx(expected, abs=1e-5)


def test_l2_size_at_epsilon_one_is_the_layer_s_attack_bound():
    noise = calibrate_noise(None, epsilon=1.0, delta=0.05, attack_bound=0.1)
    assert l2_size(1.0, noise) == pytest.approx(0.1)
    assert l2_size(0.5, noise) == pytest.approx(0.05)


def test_pixeldp_certificate_of_a_confident_model_and_of_a_coin():
    noise = calibrate_noise(None, 1.0, 0.05, 0.1)
    model = build_model("dipsen", (1, 28, 28), 10, noise, 0.05)
    torch.manual_seed(0)
    with torch.no_grad():  # make class 3 win whatever the noise: a constant output bias
        model.output.bias.fill_(-50.0)
        model.output.bias[3] = 50.0
    cert = pixeldp_certify(model, torch.rand(1, 28, 28), draws=2000, alpha=0.001, noise=noise)
    assert cert.label == 3 and cert.epsilon == 1.0 and cert.l2_size == pytest.approx(0.1)  # capped at eps 1
    # a model that answers at random: nothing to certify (the noise's draws come through forward_draws)
    model.forward_draws = lambda x, draws: torch.randn(draws * len(x), 10)
    tie = pixeldp_certify(model, torch.rand(1, 28, 28), draws=2000, alpha=0.001, noise=noise)
    assert tie.label == ABSTAIN and tie.l2_size == 0.0


def test_certified_accuracy_never_exceeds_attacked_accuracy():
    """The rule for any certificate: what it certifies at L2 radius r must survive an attack at L-inf r / sqrt(d)."""
    torch.manual_seed(0)
    d, sigma = 10, 0.5
    x = torch.randn(60, d)
    w = torch.randn(d)
    y = (x @ (w / w.norm()) > 0).long()
    smooth = Smooth(HalfSpace(w), num_classes=2, sigma=sigma)
    generator = torch.Generator().manual_seed(0)
    certs = [smooth.certify(xi, 50, 2000, 0.001, generator) for xi in x]
    for radius in (0.1, 0.3, 0.6):
        certified = np.mean([c.label == int(t) and c.radius >= radius for c, t in zip(certs, y, strict=True)])
        # the strongest attack on a half-space: move every coordinate against w by eps = radius / sqrt(d)
        eps = linf_radius(radius, d)
        attacked = x - eps * torch.sign(w) * (2 * y.unsqueeze(1) - 1)
        robust = np.mean([smooth.predict(a, 2000, 0.001, generator) == int(t) for a, t in zip(attacked, y, strict=True)])
        assert certified <= robust, (radius, certified, robust)
        assert certified > 0 or radius > 0.5
    assert math.isfinite(certs[0].radius)


def test_pixeldp_bounds_hold_for_every_class_together(monkeypatch):
    # the label is the argmax of the same counts: each of the 2 C Clopper-Pearson bounds is at alpha / (2 C)
    import dipsen.certify.pixeldp as pixeldp

    counts = np.array([0, 0, 0, 1500, 0, 500, 0, 0, 0, 0])
    monkeypatch.setattr(pixeldp, "class_counts", lambda *args: counts)
    noise = calibrate_noise(None, 1.0, 0.05, 0.1)
    model = build_model("dipsen", (1, 28, 28), 10, noise, 0.05)
    cert = pixeldp_certify(model, torch.rand(1, 28, 28), draws=2000, alpha=0.001, noise=noise)
    level = 0.001 / 20
    lower, upper = beta.ppf(level, 1500, 501), beta.ppf(1 - level, 501, 1500)  # one-sided Clopper-Pearson
    assert cert.label == 3 and cert.epsilon == pytest.approx(largest_epsilon(lower, upper, 0.05), rel=1e-9)
    assert 0 < cert.epsilon < largest_epsilon(beta.ppf(0.001 / 2, 1500, 501), upper, 0.05)  # stricter than alpha / 2


def test_counts_of_a_noise_layer_model_are_those_of_its_repeated_batches():
    torch.manual_seed(0)
    model = build_model("dipsen", (1, 28, 28), 10, calibrate_noise(None, 1.0, 0.05, 0.1)).eval()
    x = torch.rand(1, 28, 28)
    torch.manual_seed(1)
    counts = class_counts(model, x, 300, 10, batch_size=128)
    torch.manual_seed(1)
    expected = torch.zeros(10, dtype=torch.long)
    with torch.no_grad():
        for size in (128, 128, 44):  # the same batches, each through the whole model
            expected += torch.bincount(model(x.expand(size, *x.shape)).argmax(dim=1), minlength=10)
    assert torch.equal(counts, expected) and counts.sum() == 300 and (counts > 0).sum() > 1
