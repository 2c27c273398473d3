import functools
import math

import pytest
import torch
import torch.nn.functional as F

from dipsen.errors import ConfigError
from dipsen.models import build_model, calibrate_noise
from dipsen.models.noise import BoundedConv2d, GaussianNoiseLayer, gaussian_mechanism_sigma


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these tests run many tiny convolutions; on a busy machine extra intra-op threads only contend
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# ---- the frequency (Sedghi et al.) bound -------------------------------------------------------------

SIZES = [(5, 5), (28, 28), (28, 6)]


def _kernel(kind: str, seed: int = 0) -> torch.Tensor:
    """Kernels of the shapes block 1 meets: its initialisation, trained-like smooth positive filters,
    zero-mean (edge-detector-like) filters, and a multi-channel one for the general (Gram) path."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "init":
        torch.manual_seed(seed)
        return BoundedConv2d(1, 32, 3, padding=1).weight.detach().clone()
    if kind == "smooth_positive":
        grid = torch.arange(3.0) - 1
        bump = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / 2.0)
        scale = torch.rand(32, 1, 1, 1, generator=gen) + 0.1
        return scale * bump + 0.05 * torch.rand(32, 1, 3, 3, generator=gen)
    if kind == "zero_mean":
        w = torch.randn(32, 1, 3, 3, generator=gen)
        return w - w.mean(dim=(2, 3), keepdim=True)
    if kind == "multichannel":
        return torch.randn(16, 3, 3, 3, generator=gen)
    raise ValueError(kind)


KINDS = ["init", "smooth_positive", "zero_mean", "multichannel"]


def _layer(weight: torch.Tensor, **kwargs) -> BoundedConv2d:
    layer = BoundedConv2d(weight.shape[1], weight.shape[0], weight.shape[-1], padding=1, bound=float("inf"), **kwargs)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def _power_norm(weight: torch.Tensor, size: tuple[int, int], iters: int = 300, seed: int = 0) -> float:
    """Power iteration on conv^T conv (conv: stride 1, zero 'same' padding; its adjoint is conv_transpose
    with the same padding). Returns ||conv x|| / ||x|| for the last iterate, evaluated in float64: a lower
    bound on the operator norm at this input size."""
    w = weight.float()
    x = torch.randn(1, w.shape[1], *size, generator=torch.Generator().manual_seed(seed))
    for _ in range(iters):
        x = F.conv_transpose2d(F.conv2d(x, w, padding=1), w, padding=1)
        x = x / x.norm()
    x = x.double()
    return (F.conv2d(x, weight.double(), padding=1).norm() / x.norm()).item()


@functools.cache
def _fine_sup(kind: str, seed: int, n: int = 256) -> float:
    """max sigma_max(W^(w)) on a fine n x n frequency grid: a lower bound on the continuous supremum."""
    symbol = torch.fft.fft2(_kernel(kind, seed).double(), s=(n, n)).permute(2, 3, 0, 1)
    return torch.linalg.matrix_norm(symbol, ord=2).amax().item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_bound_is_sound_on_random_pairs_and_worst_inputs(kind, size):
    weight = _kernel(kind)
    layer = _layer(weight)
    bound = layer.lipschitz_upper_bound().item()
    x = torch.rand(256, weight.shape[1], *size)
    x2 = x + torch.randn_like(x) * torch.rand(256, 1, 1, 1)
    with torch.no_grad():
        out_gap = (layer(x) - layer(x2)).flatten(1).norm(dim=1)  # the layer's forward, bias included
    ratio = out_gap / (x - x2).flatten(1).norm(dim=1)
    assert ratio.max().item() <= bound * (1 + 1e-5)
    # the worst input power iteration finds at this size
    assert _power_norm(weight, size) <= bound + 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_bound_is_nearly_exact_and_never_looser_than_unfolded(kind):
    weight = _kernel(kind)
    layer = _layer(weight)
    bound = layer.lipschitz_upper_bound().item()
    frequency, unfolded = layer.frequency_bound().item(), layer.unfolded_bound().item()
    assert bound == pytest.approx(min(frequency, unfolded), rel=1e-6)
    large = _power_norm(weight, (64, 64), iters=400)
    assert large <= bound + 1e-5
    assert bound <= 1.05 * large
    assert bound <= unfolded
    if kind != "smooth_positive":  # there the unfolded bound is itself nearly exact
        assert frequency < 0.9 * unfolded


@pytest.mark.parametrize("grid", [3, 4, 6, 8, 16, 128])
@pytest.mark.parametrize("kind", KINDS)
def test_grid_margin_covers_the_continuous_supremum(grid, kind):
    """On a coarse grid the grid maximum alone misses the supremum; grid maximum + margin never does."""
    weight = _kernel(kind, seed=3)
    assert _layer(weight, frequency_grid=grid).frequency_bound().item() >= _fine_sup(kind, 3) * (1 - 1e-6)


def test_grid_maximum_without_margin_would_be_unsound():
    # the margin test above has teeth: a 3 x 3 grid misses the supremum of a zero-mean kernel by > 1%
    weight = _kernel("zero_mean", seed=3)
    coarse = torch.linalg.matrix_norm(torch.fft.fft2(weight.double(), s=(3, 3)).permute(2, 3, 0, 1), ord=2).amax().item()
    assert coarse < 0.99 * _fine_sup("zero_mean", 3)


@pytest.mark.parametrize("kind", KINDS)
def test_frequency_bound_matches_an_fft_of_the_kernel_and_is_differentiable(kind):
    # an independent evaluation of the same grid: the FFT of the zero-padded kernel is W^ at 2 pi (k, l) / N
    weight = _kernel(kind).double()
    layer = _layer(weight)
    n = layer.frequency_grid
    peak = torch.linalg.matrix_norm(torch.fft.fft2(weight, s=(n, n)).permute(2, 3, 0, 1), ord=2).amax().item()
    tap_norms = torch.linalg.matrix_norm(weight.permute(2, 3, 0, 1), ord=2)
    centre_distance = torch.tensor([[2.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 2.0]], dtype=torch.float64)
    lipschitz = peak + (math.pi / n) * (tap_norms * centre_distance).sum().item()
    bernstein = peak / math.sqrt(1 - (4 * math.pi / n) ** 2 / 2)
    assert layer.frequency_bound(weight).item() == pytest.approx(min(lipschitz, bernstein), rel=1e-9)
    # the gradient (at the grid maximiser) agrees with finite differences of the bound
    torch.autograd.gradcheck(layer.frequency_bound, (weight.clone().requires_grad_(True),))


def test_analytic_kernels():
    # all ones: |W^(0)| = 9 is the supremum, the norm tends to 9 as the input grows
    # (1-D [1, 1, 1] with zero padding on n points has norm 1 + 2 cos(pi / (n + 1)))
    ones = _layer(torch.ones(1, 1, 3, 3))
    assert ones.unfolded_bound().item() == pytest.approx(9.0, rel=1e-6)
    assert ones.lipschitz_upper_bound().item() == pytest.approx(9.0, rel=1e-6)
    assert 9.0 <= ones.frequency_bound().item() <= 9.0 * 1.003
    assert 8.95 < _power_norm(torch.ones(1, 1, 3, 3), (64, 64)) <= (1 + 2 * math.cos(math.pi / 65)) ** 2 + 1e-6
    # a delta: the identity, norm 1, and the frequency bound is exact (the Lipschitz margin vanishes)
    delta = torch.zeros(1, 1, 3, 3)
    delta[0, 0, 1, 1] = 1.0
    assert _layer(delta).lipschitz_upper_bound().item() == pytest.approx(1.0, abs=1e-6)
    assert _layer(delta).unfolded_bound().item() == pytest.approx(3.0, rel=1e-6)
    # a horizontal difference: |1 - exp(-i w_2)| peaks at 2 (w_2 = pi), the unfolded bound says 3 sqrt(2)
    diff = torch.tensor([[[[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]]])
    layer = _layer(diff)
    assert layer.unfolded_bound().item() == pytest.approx(3 * math.sqrt(2), rel=1e-6)
    assert 2.0 <= layer.lipschitz_upper_bound().item() <= 2.0 * 1.003
    assert _power_norm(diff, (64, 64)) > 1.99


@pytest.mark.parametrize("kind", KINDS)
def test_rescaled_layer_meets_the_sensitivity_bound_closely(kind):
    weight = 50 * _kernel(kind)
    layer = BoundedConv2d(weight.shape[1], weight.shape[0], 3, padding=1)
    with torch.no_grad():
        layer.weight.copy_(weight)
        effective = layer.effective_weight()
    assert layer.lipschitz_upper_bound(effective).item() == pytest.approx(1.0, rel=1e-5)
    true_norm = _power_norm(effective, (28, 28))
    assert true_norm <= 1.0 + 1e-5
    assert true_norm >= 0.95  # the tighter bound leaves little of S_f unused


@pytest.mark.parametrize("kind", ["init", "multichannel"])
def test_bound_is_differentiable_and_zero_kernel_gets_finite_gradients(kind):
    weight = _kernel(kind)
    layer = BoundedConv2d(weight.shape[1], weight.shape[0], 3, padding=1)
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer(torch.rand(4, weight.shape[1], 8, 8)).square().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0
    layer.weight.grad = None
    with torch.no_grad():
        layer.weight.zero_()
    layer(torch.rand(4, weight.shape[1], 8, 8)).square().sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_a_first_pass_under_inference_mode_leaves_the_layer_differentiable():
    # certification counts draws under inference mode; an attack on the same model follows
    model = build_model("dipsen", (1, 28, 28), 10, calibrate_noise(None, 1.0, 0.05, 0.1))
    with torch.inference_mode():
        model(torch.rand(2, 1, 28, 28))
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_strided_and_dilated_layers_fall_back_to_a_sound_unfolded_bound():
    # stride 2 with dilation 2 reads the even sub-grid with a dense 3x3 kernel: all 9 taps can read one
    # pixel, so the overlap factor is 3 (ceil(3/2) = 2 would claim 6 for a kernel of ones, norm ~9)
    layer = BoundedConv2d(1, 1, 3, stride=2, dilation=2, padding=2, bias=False, bound=float("inf"))
    with torch.no_grad():
        layer.weight.fill_(1.0)
    assert not layer.frequency_bound_applies
    assert math.isinf(layer.frequency_bound().item())
    assert layer.lipschitz_upper_bound().item() == pytest.approx(layer.unfolded_bound().item())
    x = torch.randn(1, 1, 40, 40)
    for _ in range(200):
        x = x.requires_grad_(True)
        (g,) = torch.autograd.grad(0.5 * layer(x).square().sum(), x)
        x = (g / g.norm()).detach()
    true_norm = layer(x).norm().item()
    assert true_norm > 8.5
    assert true_norm <= layer.lipschitz_upper_bound().item() + 1e-5


def test_non_zero_padding_is_rejected():
    with pytest.raises(ConfigError, match="zero padding"):
        BoundedConv2d(1, 4, 3, padding=1, padding_mode="reflect")


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


# ---- the fast paths of the training step: same function as the straightforward implementation ------------------------


def _reference_effective_weight(layer: BoundedConv2d) -> torch.Tensor:
    """The rescaled kernel written out as the layer documents it, through its public bounds (autograd records the
    whole computation): W * bound / max(bound, min(frequency bound, unfolded bound))."""
    return layer.weight * (layer.bound / torch.clamp(layer.lipschitz_upper_bound(), min=layer.bound))


RANK_ONE_KERNELS = {
    "init": lambda: _kernel("init"),
    "smooth_positive": lambda: _kernel("smooth_positive"),
    "zero_mean": lambda: _kernel("zero_mean"),
    "one_output_channel": lambda: torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2)),
    "all_ones": lambda: torch.ones(32, 1, 3, 3),  # the unfolded bound is the smaller: the SVD path
    "below_the_bound": lambda: 0.01 * _kernel("zero_mean"),  # ub < S_f: no rescaling, no gradient through it
    "zero": lambda: torch.zeros(32, 1, 3, 3),
}


@pytest.mark.parametrize("kind", list(RANK_ONE_KERNELS))
@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_rank_one_kernel_rescaling_matches_the_recorded_graph(kind, scale):
    weight = scale * RANK_ONE_KERNELS[kind]()
    layer = BoundedConv2d(weight.shape[1], weight.shape[0], 3, padding=1).to(memory_format=torch.channels_last)
    assert layer._rank_one and layer.frequency_bound_applies  # the fast path
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    for step in range(3):  # the first call computes the SVD; later ones may skip it with the cached direction
        with torch.no_grad():
            layer.weight.copy_(weight * (1 + 0.01 * step))
        layer.weight.grad = None
        fast = layer.effective_weight()
        (fast * upstream).sum().backward()
        fast_grad = layer.weight.grad.clone()
        layer.weight.grad = None
        reference = _reference_effective_weight(layer)
        (reference * upstream).sum().backward()
        torch.testing.assert_close(fast, reference, rtol=1e-6, atol=0)
        torch.testing.assert_close(fast_grad, layer.weight.grad, rtol=1e-5, atol=1e-7)
        with torch.no_grad():  # and without a gradient to compute
            torch.testing.assert_close(layer.effective_weight(), reference, rtol=1e-6, atol=0)


def test_a_stale_cached_direction_never_changes_the_bound():
    # the cached singular vector only proves the unfolded bound is the larger; any unit vector is a valid proof
    weight = 20 * _kernel("smooth_positive")
    layer = BoundedConv2d(1, 32, 3, padding=1)
    with torch.no_grad():
        layer.weight.copy_(weight)
    for seed in range(5):
        direction = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        layer._unfolded_direction = direction / direction.norm()
        torch.testing.assert_close(layer.effective_weight(), _reference_effective_weight(layer), rtol=1e-6, atol=0)


def test_noise_is_drawn_in_channels_last_order():
    """By design since the layer draws in the convolutions' layout: element (n, c, h, w) takes draw
    ((n H + h) W + w) C + c of the generator, the draw (n C + c) H W + h W + w took before (the same numbers,
    the same count taken from the generator, in another order)."""
    shape, std, gain = (3, 4, 5, 6), 0.7, 1.9
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    out = GaussianNoiseLayer(std, gain, generator=torch.Generator().manual_seed(3))(x)
    draws = torch.randn(3 * 4 * 5 * 6, generator=torch.Generator().manual_seed(3))
    noise = draws.reshape(3, 5, 6, 4).permute(0, 3, 1, 2)  # (N, H, W, C) order, viewed as (N, C, H, W)
    torch.testing.assert_close(out, gain * (x + std * noise), rtol=1e-6, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # the former order, for the record: the same draws, element (n, c, h, w) took draws[n, c, h, w]
    former = gain * (x + std * draws.reshape(shape))
    assert not torch.allclose(out, former)
    torch.testing.assert_close(torch.sort((out / gain - x).flatten())[0], torch.sort((former / gain - x).flatten())[0])
    # the layout of the input changes nothing; the gradient is the gain
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_(True)
    out_cl = GaussianNoiseLayer(std, gain, generator=torch.Generator().manual_seed(3))(x_cl)
    torch.testing.assert_close(out_cl, out, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out_cl, x_cl, torch.ones_like(out_cl))
    torch.testing.assert_close(grad, torch.full(shape, gain))


def test_noise_generator_state_after_a_draw_is_the_same_as_before():
    # the layer takes as many numbers from the generator as torch.randn of its shape: later draws (AlphaDropout's,
    # the next batch's) are unchanged
    generator = torch.Generator().manual_seed(4)
    GaussianNoiseLayer(1.0, generator=generator)(torch.zeros(2, 3, 4, 5))
    expected = torch.Generator().manual_seed(4)
    torch.randn(2, 3, 4, 5, generator=expected)
    assert torch.equal(generator.get_state(), expected.get_state())
