r"""The differential-privacy noise layer and the block it protects (PixelDP, Lecuyer et al. 2019).

PixelDP makes a network's pre-noise computation ``g`` have a bounded L2 sensitivity ``S_f``,
``||g(x) - g(x')||_2 <= S_f ||x - x'||_2``, then adds Gaussian noise ``N(0, (S_f sigma)^2)``.
By the Gaussian mechanism, with

.. math::  \sigma = \sqrt{2 \ln(1.25/\delta)} \, L / \epsilon, \qquad \epsilon \le 1,

the randomized scores are (epsilon, delta)-DP with respect to input changes of L2 size at most L,
which is what turns the noise into a robustness statement.

Here ``g`` is block 1 (convolution, ReLU, 2x2 max-pooling). ReLU and non-overlapping max-pooling are
1-Lipschitz in L2, so ``S_f`` is the convolution's L2 operator norm. :class:`BoundedConv2d` rescales
its kernel in every forward pass so that a sound upper bound on that norm never exceeds ``S_f = 1``
whatever its parameters are (after an SGD step, after FedAvg, after loading a checkpoint). The bound
is the smaller of two, each valid for every input size:

- the *unfolded* bound ``sqrt(n_overlap) * ||W||_2``, where ``W`` is the kernel unfolded to a
  ``C_out x (C_in k_h k_w)`` matrix and ``n_overlap`` is how many (output position, tap) pairs can
  read one input pixel (``ceil(k_h/s_h) ceil(k_w/s_w)`` without dilation). It holds for any stride
  and is up to ``sqrt(k_h k_w)`` = 3x loose for a 3x3 kernel.
- the *frequency* bound (stride 1, no dilation, one group; Sedghi, Gupta & Long, ICLR 2019). With the
  kernel's symbol ``W^(w) = sum_{p,q} W[:, :, p, q] exp(-i (p w_1 + q w_2))``, a ``C_out x C_in``
  complex matrix for each frequency ``w`` in ``[0, 2 pi)^2``,

  .. math::  \|\mathrm{conv}\|_2 \le \sup_w \sigma_{\max}(\hat W(w)).

  Why it is sound: with zero padding, the convolution of an ``H x W`` input is ``R T E``, where ``E``
  extends the input by zeros to the infinite grid Z^2 (an isometry), ``T`` is the convolution on Z^2
  and ``R`` keeps the output window (a coordinate projection, norm <= 1); by Plancherel ``T`` is
  multiplication by ``W^(w)`` on the Fourier side, so ``||T||_2 = sup_w sigma_max(W^(w))``. This
  holds for every input size and padding amount, and it is attained as the input grows.

  The supremum is evaluated on the ``N x N`` grid ``w = 2 pi (k, l) / N`` (half of it: a real kernel
  has ``W^(-w) = conj(W^(w))``), giving ``G = max_grid sigma_max(W^(w))^2``; every ``w`` lies within
  ``pi/N`` of a grid point in each coordinate, and either of two proven margins closes the gap:

  (a) Lipschitz. Multiplying ``W^`` by the unit phase ``exp(i <c, w>)``, ``c`` the kernel centre,
      changes no singular value, and ``|sigma_max(A) - sigma_max(B)| <= ||A - B||_2``,
      ``|exp(-ia) - exp(-ib)| <= |a - b|``, so for ``|delta_1|, |delta_2| <= pi/N``
      ``|sigma_max(W^(w + delta)) - sigma_max(W^(w))| <= sum_t ||W_t||_2 |<t - c, delta>|
      <= (pi/N) sum_{p,q} ||W[:, :, p, q]||_2 (|p - c_1| + |q - c_2|) =: (pi/N) L_w``, hence
      ``sup <= sqrt(G) + pi L_w / N``. (By Cauchy-Schwarz this is at most the Euclidean form
      ``sum_t ||W_t||_2 ||t - c||_2 * (2 pi/N) sqrt(2)/2``.) Exact for a kernel with one tap.
  (b) Bernstein. ``sigma_max(W^(w))^2 = max_{|u|=1} ||W^(w) u||^2`` and each
      ``g_u(w) = ||W^(w) u||^2`` is a non-negative trigonometric polynomial of degree
      ``(k_h - 1, k_w - 1)``. Let ``(w*, u*)`` attain ``M = sup_w sigma_max^2`` and ``w* + delta``
      be the nearest grid point; ``phi(s) = g_u*(w* + s delta)`` is an exponential sum of type
      ``tau <= (k_h - 1 + k_w - 1) pi / N`` bounded by ``M`` on the real line, with ``phi'(0) = 0``
      (a maximum) and ``|phi''| <= tau^2 M`` (Bernstein's inequality), so
      ``G >= phi(1) >= M (1 - tau^2 / 2)`` and ``sup <= sqrt(G / (1 - tau^2 / 2))``
      (0.24% above the grid maximum for a 3x3 kernel and ``N = 128``).

The bound is computed in float64 and is differentiable: the rescaling is trained through like the rest
of the forward pass (the grid maximum is located without autograd, then re-evaluated differentiably at
its frequency, which gives the same value and gradient at a fraction of the backward cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError

SENSITIVITY_BOUND = 1.0
"""S_f: the L2 sensitivity bound of block 1 that :class:`BoundedConv2d` enforces."""

FREQUENCY_GRID = 128
"""Frequencies per axis at which :class:`BoundedConv2d` evaluates its frequency bound when ``C_in`` or
``C_out`` is 1 (block 1 on our data sets): margin (b) is then 0.24% for a 3x3 kernel, and the bound
costs about 0.26 ms more than the unfolded one per forward+backward on one CPU thread, about 1% of a
DiPSeN training step on a batch of 32 (``benchmarks/sensitivity_bound.py``)."""
FREQUENCY_GRID_MATRIX = 40
"""The same when ``C_in`` and ``C_out`` both exceed 1: each grid point then takes a ``min(C_in, C_out)``
Hermitian eigenvalue problem, so the grid is coarser (margin (b) 2.6% for a 3x3 kernel; about 1.7 ms
per forward+backward for a 32 x 3 x 3 x 3 kernel on one CPU thread)."""


@dataclass(frozen=True)
class NoiseCalibration:
    """How the noise standard deviation was chosen; logged with every run."""

    sensitivity: float
    epsilon: float
    delta: float
    attack_bound: float
    sigma: float
    sigma_given: bool

    @property
    def std(self) -> float:
        """Standard deviation of the added noise: S_f * sigma."""
        return self.sensitivity * self.sigma


def gaussian_mechanism_sigma(epsilon: float, delta: float, attack_bound: float) -> float:
    """sigma = sqrt(2 ln(1.25/delta)) * L / epsilon (Dwork & Roth, Thm A.1; valid for epsilon <= 1)."""
    return math.sqrt(2.0 * math.log(1.25 / delta)) * attack_bound / epsilon


def calibrate_noise(
    sigma: float | None = None, epsilon: float = 1.0, delta: float = 0.05, attack_bound: float = 0.1
) -> NoiseCalibration:
    """Return the calibration for a given sigma, or for sigma derived from (epsilon, delta, L).

    PixelDP's defaults are epsilon 1, delta 0.05, L 0.1, which give sigma ~= 0.254.
    """
    if sigma is not None:
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ConfigError(f"sigma must be a finite number >= 0, got {sigma}", "sigma")
        return NoiseCalibration(SENSITIVITY_BOUND, epsilon, delta, attack_bound, float(sigma), True)
    if not 0 < epsilon <= 1:
        raise ConfigError(f"dp_epsilon must be in (0, 1] for the Gaussian mechanism, got {epsilon}", "dp_epsilon")
    if not 0 < delta < 1:
        raise ConfigError(f"dp_delta must be in (0, 1), got {delta}", "dp_delta")
    if not attack_bound > 0:
        raise ConfigError(f"dp_attack_bound (L) must be > 0, got {attack_bound}", "dp_attack_bound")
    derived = gaussian_mechanism_sigma(epsilon, delta, attack_bound)
    return NoiseCalibration(SENSITIVITY_BOUND, epsilon, delta, attack_bound, derived, False)


def _overlap_count(kernel: int, stride: int, dilation: int) -> int:
    """How many taps of one kernel axis can read one input pixel: the taps ``p`` with
    ``p * dilation`` congruent to a fixed residue mod ``stride`` step by ``stride / gcd(stride, dilation)``."""
    return math.ceil(kernel / (stride // math.gcd(stride, dilation)))


@dataclass(frozen=True)
class _FrequencyGrid:
    """Float64 tables for evaluating a kernel's symbol on the grid ``2 pi (k, l) / N``, ``k < N``, ``l <= N/2``.

    ``cos_sin_rows`` (2, N, 2k_h - 1) holds ``[cos, sin](w_1 d_1)`` and ``cos_sin_cols``
    (2 (2k_w - 1), N//2 + 1) holds ``[cos; -sin](w_2 d_2)``, so ``[C_r R, S_r R] @ cols`` is
    ``sum_d R[d] cos(<d, w>)``; ``phase_rows``/``phase_cols`` hold ``exp(-i w d)`` likewise;
    ``lag_map`` (k_h k_w k_h k_w, (2k_h - 1)(2k_w - 1)) sends a tap-by-tap Gram matrix ``A[t, t']`` to
    the autocorrelation ``R[d] = sum_{t' - t = d} A[t, t']``; ``tap_rows``/``tap_cols`` (k_h k_w) are
    the taps' positions ``p``, ``q`` times ``2 pi / N``; ``lipschitz_weights`` (k_h k_w) is
    ``(pi/N) (|p - c_1| + |q - c_2|)``.
    """

    cos_sin_rows: torch.Tensor
    cos_sin_cols: torch.Tensor
    phase_rows: torch.Tensor
    phase_cols: torch.Tensor
    lag_map: torch.Tensor
    tap_rows: torch.Tensor
    tap_cols: torch.Tensor
    lipschitz_weights: torch.Tensor

    @classmethod
    def build(cls, kernel_size: tuple[int, int], n: int, device: torch.device) -> _FrequencyGrid:
        kh, kw = kernel_size
        f64 = torch.float64
        freq_rows = torch.arange(n, dtype=f64) * (2 * math.pi / n)
        freq_cols = freq_rows[: n // 2 + 1]
        arg_rows = torch.outer(freq_rows, torch.arange(-(kh - 1), kh, dtype=f64))
        arg_cols = torch.outer(freq_cols, torch.arange(-(kw - 1), kw, dtype=f64))
        tap_p, tap_q = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
        tap_p, tap_q = tap_p.flatten(), tap_q.flatten()
        lag = (tap_p[None, :] - tap_p[:, None] + kh - 1) * (2 * kw - 1) + (tap_q[None, :] - tap_q[:, None] + kw - 1)
        lag_map = torch.zeros(kh * kw * kh * kw, (2 * kh - 1) * (2 * kw - 1), dtype=f64)
        lag_map[torch.arange(lag.numel()), lag.flatten()] = 1.0
        offsets = (tap_p - (kh - 1) / 2).abs() + (tap_q - (kw - 1) / 2).abs()
        tables = {
            "cos_sin_rows": torch.stack([torch.cos(arg_rows), torch.sin(arg_rows)]),
            "cos_sin_cols": torch.cat([torch.cos(arg_cols), -torch.sin(arg_cols)], dim=1).T.contiguous(),
            "phase_rows": torch.polar(torch.ones_like(arg_rows), -arg_rows),
            "phase_cols": torch.polar(torch.ones_like(arg_cols), -arg_cols),
            "lag_map": lag_map,
            "tap_rows": tap_p.to(f64) * (2 * math.pi / n),
            "tap_cols": tap_q.to(f64) * (2 * math.pi / n),
            "lipschitz_weights": (math.pi / n) * offsets.to(f64),
        }
        return cls(**{name: table.to(device) for name, table in tables.items()})


class BoundedConv2d(nn.Conv2d):
    """A convolution whose L2 operator norm is at most ``bound``, by construction.

    The effective kernel is ``W * min(1, bound / lipschitz_upper_bound(W))``; the rescaling is part
    of the forward pass, so the guarantee holds for any stored parameters. The upper bound is
    ``min(frequency_bound, unfolded_bound)`` (see the module docstring for both and why they are
    sound). With a stride other than 1, dilation or groups the frequency bound does not apply and the
    unfolded bound alone is used. Only zero padding is accepted: reflect, replicate or circular
    padding read a pixel more than once, which neither bound accounts for.

    ``frequency_grid`` is ``N``, the frequencies per axis at which the frequency bound is evaluated;
    by default :data:`FREQUENCY_GRID` when ``C_in`` or ``C_out`` is 1 (then ``sigma_max`` is a vector
    norm, and the grid costs little) and :data:`FREQUENCY_GRID_MATRIX` otherwise (one eigenvalue
    problem per frequency).
    """

    def __init__(self, *args, bound: float = SENSITIVITY_BOUND, frequency_grid: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ConfigError(f"BoundedConv2d supports zero padding only, got padding_mode={self.padding_mode!r}")
        self.bound = bound
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        self._overlap_factor = math.sqrt(_overlap_count(kh, sh, dh) * _overlap_count(kw, sw, dw))
        self.frequency_bound_applies = self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
        self._rank_one = min(self.in_channels, self.out_channels) == 1
        if frequency_grid is None:
            frequency_grid = FREQUENCY_GRID if self._rank_one else FREQUENCY_GRID_MATRIX
        if frequency_grid < 1:
            raise ConfigError(f"frequency_grid must be >= 1, got {frequency_grid}")
        self.frequency_grid = frequency_grid
        # margin (b): sup <= peak / sqrt(1 - tau^2 / 2), tau = (k_h - 1 + k_w - 1) pi / N; None when tau^2 >= 2
        tau = (kh - 1 + kw - 1) * math.pi / frequency_grid
        self._bernstein_factor = 1.0 / math.sqrt(1.0 - tau**2 / 2) if tau**2 < 2 else None
        self._grids: dict[torch.device, _FrequencyGrid] = {}

    def unfolded_bound(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """sqrt(n_overlap) * spectral norm of the unfolded kernel: an upper bound on ||conv||_2 for any stride."""
        w = self.weight if weight is None else weight
        return self._overlap_factor * torch.linalg.matrix_norm(w.flatten(1), ord=2)

    def _grid(self, device: torch.device) -> _FrequencyGrid:
        grid = self._grids.get(device)
        if grid is None:
            kh, kw = self.kernel_size
            # cached tables must be ordinary tensors: built under inference mode (a first forward pass in
            # certification, say) they could never again enter a pass that autograd records
            with torch.inference_mode(False):
                grid = _FrequencyGrid.build((kh, kw), self.frequency_grid, device)
            self._grids[device] = grid
        return grid

    def _grid_argmax(self, w64: torch.Tensor, grid: _FrequencyGrid) -> torch.Tensor:
        """Flat index into the (N, N//2 + 1) grid of the frequency where sigma_max(W^(w)) is largest.

        ``sigma_max(W^(w))^2`` is the top eigenvalue of the Gram matrix ``W^(w)^H W^(w)`` (or
        ``W^(w) W^(w)^H``, whichever is smaller), ``sum_d R[d] exp(-i <d, w>)`` with ``R[d]`` the
        kernel's autocorrelation at lag ``d`` (a ``c x c`` matrix per lag), so the grid costs one small
        transform of ``R``. When ``C_in`` or ``C_out`` is 1 the Gram matrix is the scalar
        ``||W^(w)||^2 = sum_d R[d] cos(<d, w>)``, with ``R`` summed over all channel pairs.
        """
        kh, kw = self.kernel_size
        with torch.no_grad():
            if self._rank_one:
                flat = w64.reshape(-1, kh * kw)
                lags = ((flat.mT @ flat).reshape(1, -1) @ grid.lag_map).reshape(2 * kh - 1, 2 * kw - 1)
                # [C_r R, S_r R] @ [C_c; -S_c] = C_r R C_c^T - S_r R S_c^T, an (N, N//2 + 1) array
                power = (grid.cos_sin_rows @ lags).transpose(0, 1).reshape(self.frequency_grid, -1) @ grid.cos_sin_cols
            else:
                side = w64.transpose(0, 1) if self.in_channels <= self.out_channels else w64
                lags = F.conv2d(side, side, padding=(kh - 1, kw - 1)).to(torch.complex128)  # (c, c, 2k_h-1, 2k_w-1)
                gram = torch.einsum("kp,abpq,lq->klab", grid.phase_rows, lags, grid.phase_cols)
                power = torch.linalg.eigvalsh(gram)[..., -1]
            return power.flatten().argmax()

    def frequency_bound(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Upper bound on sup_w sigma_max(W^(w)) (so on ||conv||_2 at every input size), from an N x N grid.

        ``min(peak + pi L_w / N, peak * bernstein_factor)`` with ``peak`` the grid maximum of
        ``sigma_max(W^(w))``: margins (a) and (b) of the module docstring. Returns ``inf`` when the
        frequency bound does not apply (stride, dilation, groups).

        The grid maximum is located without autograd (:meth:`_grid_argmax`), then ``sigma_max`` is
        evaluated differentiably at that one frequency: the same value, and the gradient of a maximum
        is the gradient at its maximiser, so the backward pass costs a few small operations.
        """
        w = self.weight if weight is None else weight
        if not self.frequency_bound_applies:
            return torch.full((), math.inf, dtype=w.dtype, device=w.device)
        grid = self._grid(w.device)
        w64 = w.to(torch.float64)
        index = self._grid_argmax(w64, grid)
        n_cols = self.frequency_grid // 2 + 1
        phase = grid.tap_rows * torch.div(index, n_cols, rounding_mode="floor") + grid.tap_cols * (index % n_cols)
        flat = w64.flatten(2)  # (C_out, C_in, k_h k_w)
        re, im = flat @ torch.cos(phase), flat @ torch.sin(phase)  # W^(w) = re - i im, (C_out, C_in)
        if self._rank_one:
            peak = torch.linalg.vector_norm(torch.stack([re, im]))
            tap_norms = torch.linalg.vector_norm(flat, dim=(0, 1))
        else:
            peak = torch.linalg.matrix_norm(torch.complex(re, -im), ord=2)
            tap_norms = torch.linalg.matrix_norm(flat.permute(2, 0, 1), ord=2)
        bound = peak + tap_norms @ grid.lipschitz_weights
        if self._bernstein_factor is not None:
            bound = torch.minimum(bound, peak * self._bernstein_factor)
        return bound.to(w.dtype)

    def lipschitz_upper_bound(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The bound on ||conv||_2 the layer enforces: min(frequency bound, unfolded bound)."""
        w = self.weight if weight is None else weight
        unfolded = self.unfolded_bound(w)
        if not self.frequency_bound_applies:
            return unfolded
        return torch.minimum(self.frequency_bound(w), unfolded)

    def effective_weight(self) -> torch.Tensor:
        if not math.isfinite(self.bound):
            return self.weight
        # = W * min(1, bound / ub), written so that an all-zero kernel (ub = 0) gets finite gradients
        return self.weight * (self.bound / torch.clamp(self.lipschitz_upper_bound(), min=self.bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class GaussianNoiseLayer(nn.Module):
    """Returns ``gain * (x + N(0, std^2))``, in training AND in evaluation mode.

    Attack libraries call ``model.eval()``; a noise layer gated on ``self.training`` (as Keras'
    GaussianNoise is) would silently evaluate a different, deterministic model. ``gain`` is a
    constant applied after the noise (post-processing: it changes neither S_f nor the guarantee).
    ``generator`` may be set to a ``torch.Generator`` for reproducible draws; by default the global
    torch RNG is used (which the federated engine seeds per client update). The noise is drawn on the
    input's device, so a generator must live there too.
    """

    def __init__(self, std: float, gain: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.std = float(std)
        self.gain = float(gain)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.std == 0.0:
            return x * self.gain
        noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)
        # one fused pass: gain * x + gain * std * noise
        return torch.add(noise.mul_(self.gain * self.std), x, alpha=self.gain)

    def extra_repr(self) -> str:
        return f"std={self.std:.4g}, gain={self.gain:g}, always_on=True"
