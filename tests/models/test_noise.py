import math

import pytest
import torch

from dipsen.errors import ConfigError
from dipsen.models import build_model, calibrate_noise
from dipsen.models.noise import BoundedConv2d, GaussianNoiseLayer, gaussian_mechanism_sigma


def test_pixeldp_default_sigma():
    # sqrt(2 ln(1.25/0.05)) * 0.1 / 1
    assert gaussian_mechanism_sigma(1.0, 0.05, 0.1) == pytest.approx(math.sqrt(2 * math.log(25)) * 0.1)
    cal = calibrate_noise()
    assert cal.sensitivity == 1.0 and cal.std == pytest.approx(0.2537, abs=1e-4) and not cal.sigma_given


def test_calibration_rejects_epsilon_above_one_and_bad_sigma():
    with pytest.raises(ConfigError, match="dp_epsilon"):
        calibrate_noise(epsilon=2.0)
    with pytest.raises(ConfigError, match="sigma"):
        calibrate_noise(sigma=-1.0)


@pytest.mark.parametrize("scale", [0.01, 1.0, 50.0])
def test_block1_sensitivity_bound_holds_on_random_pairs(scale):
    torch.manual_seed(0)
    model = build_model("dipsen", (1, 28, 28), 10, calibrate_noise())
    with torch.no_grad():
        model.block1[0].weight.mul_(scale)  # any stored weights, e.g. after an aggregation
    x = torch.rand(256, 1, 28, 28)
    x2 = (x + torch.randn_like(x) * torch.rand(256, 1, 1, 1)).clamp(0, 1)
    with torch.no_grad():
        out_gap = (model.block1(x) - model.block1(x2)).flatten(1).norm(dim=1)
    in_gap = (x - x2).flatten(1).norm(dim=1)
    ratio = out_gap / in_gap
    assert ratio.max().item() <= 1.0 + 1e-5
    # the bound is not vacuous: large weights saturate it closely for some pair
    if scale == 50.0:
        assert ratio.max().item() > 0.1


def test_bounded_conv_upper_bound_dominates_true_operator_norm():
    torch.manual_seed(1)
    conv = BoundedConv2d(1, 8, 3, padding=1, bias=False, bound=float("inf"))
    # power iteration on conv^T conv estimates the true operator norm
    x = torch.randn(1, 1, 16, 16)
    for _ in range(200):
        x = x.requires_grad_(True)
        y = conv(x)
        (g,) = torch.autograd.grad(0.5 * (y**2).sum(), x)
        x = (g / g.norm()).detach()
    true_norm = conv(x).norm().item()
    assert true_norm <= conv.lipschitz_upper_bound().item() + 1e-5


def test_noise_std_matches_sensitivity_times_sigma_and_stays_on_in_eval():
    cal = calibrate_noise(sigma=0.7)
    layer = GaussianNoiseLayer(cal.std, gain=2.0, generator=torch.Generator().manual_seed(3))
    layer.eval()
    x = torch.zeros(200_000)
    noise = layer(x) / 2.0
    assert noise.std().item() == pytest.approx(cal.sensitivity * 0.7, rel=0.01)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)


def test_noise_generator_makes_draws_reproducible():
    a = GaussianNoiseLayer(1.0, generator=torch.Generator().manual_seed(5))(torch.zeros(10))
    b = GaussianNoiseLayer(1.0, generator=torch.Generator().manual_seed(5))(torch.zeros(10))
    c = GaussianNoiseLayer(1.0, generator=torch.Generator().manual_seed(6))(torch.zeros(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dipsen_predictions_are_random_under_eval():
    torch.manual_seed(0)
    model = build_model("dipsen", (1, 28, 28), 10, calibrate_noise()).eval()
    x = torch.rand(4, 1, 28, 28)
    assert model.is_randomized
    assert not torch.equal(model(x), model(x))
    cnn = build_model("cnn", (1, 28, 28), 10, calibrate_noise()).eval()
    assert not cnn.is_randomized and torch.equal(cnn(x), cnn(x))
