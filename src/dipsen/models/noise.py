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
its frequency, which gives the same value and gradient at a fraction of the backward cost). For a
kernel with one input or one output channel (block 1 here) the layer computes the same value and its
gradient in closed form, without recording a graph (:meth:`BoundedConv2d._rank_one_scale`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from ..errors import ConfigError

SENSITIVITY_BOUND = 1.0
"""S_f: the L2 sensitivity bound of block 1 that :class:`BoundedConv2d` enforces."""

FREQUENCY_GRID = 128
"""Frequencies per axis at which :class:`BoundedConv2d` evaluates its frequency bound when ``C_in`` or
``C_out`` is 1 (block 1 on our data sets): margin (b) is then 0.24% for a 3x3 kernel, and the bound
costs about 0.26 ms more than the unfolded one per forward+backward through autograd on one CPU thread,
about 1% of a DiPSeN training step on a batch of 32 (``benchmarks/sensitivity_bound.py``); block 1's
closed-form path (:meth:`BoundedConv2d._rank_one_scale`) costs less (``docs/results/benchmarks.md``)."""
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

    ``cos_sin_rows`` (2N, 2k_h - 1) holds ``cos(w_1 d_1)`` in row ``2k`` and ``sin(w_1 d_1)`` in row
    ``2k + 1``, and ``cos_sin_cols`` (2 (2k_w - 1), N//2 + 1) holds ``[cos; -sin](w_2 d_2)``, so
    ``(rows @ R).reshape(N, -1) @ cols`` is ``sum_d R[d] cos(<d, w>)`` on the grid;
    ``phase_rows``/``phase_cols`` hold ``exp(-i w d)`` likewise;
    ``lag_map`` (k_h k_w k_h k_w, (2k_h - 1)(2k_w - 1)) sends a tap-by-tap Gram matrix ``A[t, t']`` to
    the autocorrelation ``R[d] = sum_{t' - t = d} A[t, t']``; ``tap_rows``/``tap_cols`` (k_h k_w) are
    the taps' positions ``p``, ``q`` times ``2 pi / N``; ``lipschitz_weights`` (k_h k_w) is
    ``(pi/N) (|p - c_1| + |q - c_2|)``; ``cos_sin_taps`` (N (N//2 + 1), 2, k_h k_w) holds
    ``[cos, sin](<t, w>)`` for each tap ``t`` at each grid frequency, in the grid's flat order.
    """

    cos_sin_rows: torch.Tensor
    cos_sin_cols: torch.Tensor
    phase_rows: torch.Tensor
    phase_cols: torch.Tensor
    lag_map: torch.Tensor
    tap_rows: torch.Tensor
    tap_cols: torch.Tensor
    lipschitz_weights: torch.Tensor
    cos_sin_taps: torch.Tensor

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
        tap_rows, tap_cols = tap_p.to(f64) * (2 * math.pi / n), tap_q.to(f64) * (2 * math.pi / n)
        grid_rows = torch.arange(n, dtype=f64).repeat_interleave(n // 2 + 1)
        grid_cols = torch.arange(n // 2 + 1, dtype=f64).repeat(n)
        tap_phases = tap_rows * grid_rows[:, None] + tap_cols * grid_cols[:, None]
        tables = {
            "cos_sin_rows": torch.stack([torch.cos(arg_rows), torch.sin(arg_rows)], dim=1).reshape(2 * n, -1),
            "cos_sin_cols": torch.cat([torch.cos(arg_cols), -torch.sin(arg_cols)], dim=1).T.contiguous(),
            "phase_rows": torch.polar(torch.ones_like(arg_rows), -arg_rows),
            "phase_cols": torch.polar(torch.ones_like(arg_cols), -arg_cols),
            "lag_map": lag_map,
            "tap_rows": tap_rows,
            "tap_cols": tap_cols,
            "lipschitz_weights": (math.pi / n) * offsets.to(f64),
            "cos_sin_taps": torch.stack([torch.cos(tap_phases), torch.sin(tap_phases)], dim=1),
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
        # the unfolded kernel's top right singular vector, as last computed: W's next values are close, so
        # ||W v|| (a lower bound on ||W||_2 for any unit v) usually shows that the unfolded bound is not
        # the smaller one without computing it; a stale v only makes that check fail, never wrong
        self._unfolded_direction: torch.Tensor | None = None

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

    def _grid_argmax(self, w64: torch.Tensor, grid: _FrequencyGrid, gram: torch.Tensor | None = None) -> torch.Tensor:
        """Flat index into the (N, N//2 + 1) grid of the frequency where sigma_max(W^(w)) is largest.

        ``sigma_max(W^(w))^2`` is the top eigenvalue of the Gram matrix ``W^(w)^H W^(w)`` (or
        ``W^(w) W^(w)^H``, whichever is smaller), ``sum_d R[d] exp(-i <d, w>)`` with ``R[d]`` the
        kernel's autocorrelation at lag ``d`` (a ``c x c`` matrix per lag), so the grid costs one small
        transform of ``R``. When ``C_in`` or ``C_out`` is 1 the Gram matrix is the scalar
        ``||W^(w)||^2 = sum_d R[d] cos(<d, w>)``, with ``R`` summed over all channel pairs (``gram``,
        the tap-by-tap Gram matrix of ``w64`` reshaped to ``(C_out C_in, k_h k_w)``, if already computed).
        """
        kh, kw = self.kernel_size
        with torch.no_grad():
            if self._rank_one:
                if gram is None:
                    flat = w64.reshape(-1, kh * kw)
                    gram = flat.mT @ flat
                lags = (gram.reshape(1, -1) @ grid.lag_map).reshape(2 * kh - 1, 2 * kw - 1)
                # [C_r R, S_r R] @ [C_c; -S_c] = C_r R C_c^T - S_r R S_c^T, an (N, N//2 + 1) array
                power = (grid.cos_sin_rows @ lags).reshape(self.frequency_grid, -1) @ grid.cos_sin_cols
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
        # block 1 here; on the CPU only: the closed form works in host numbers, a sync per step on a GPU
        on_cpu = self.weight.device.type == "cpu"
        if self._rank_one and self.frequency_bound_applies and self.weight.dtype == torch.float32 and on_cpu:
            return _RescaledKernel.apply(self.weight, self, torch.is_grad_enabled() and self.weight.requires_grad)
        # = W * min(1, bound / ub), written so that an all-zero kernel (ub = 0) gets finite gradients
        return self.weight * (self.bound / torch.clamp(self.lipschitz_upper_bound(), min=self.bound))

    def _rank_one_scale(self, weight: torch.Tensor, needs_grad: bool) -> tuple[float, torch.Tensor | None]:
        """``s = bound / max(bound, min(frequency bound, unfolded bound))`` and ``ds/dW`` (None when zero).

        The value :meth:`effective_weight`'s general path computes and the gradient autograd takes
        through it, in the rank-one case (``C_in`` or ``C_out`` is 1) with the frequency bound, worked
        out here without recording a graph. With ``F`` the kernel reshaped to ``(C_out C_in, k_h k_w)``,
        ``G = F^T F`` and ``c``, ``s`` the taps' ``cos``, ``sin`` at the grid maximiser:

        - ``peak = ||F [c, s]||``, so ``d peak / dF = F (c c^T + s s^T) / peak``;
        - the tap norms ``||F[:, t]||`` have gradient ``F e_t e_t^T / ||F[:, t]||`` (0 for a zero tap, as
          torch's norm gives), so the Lipschitz form ``peak + sum_t L_t ||F[:, t]||`` has
          ``d peak + F diag(L / ||F[:, t]||)`` and the Bernstein form ``b peak`` has ``b d peak``: the
          frequency bound's gradient is ``F M`` for a ``k_h k_w``-square ``M``;
        - the unfolded bound ``r ||W||_2`` (``W`` reshaped to ``(C_out, C_in k_h k_w)``) has
          ``r u v^T`` (top singular vectors); it is computed only when ``r ||W v_last||`` does not
          already exceed the frequency bound;
        - a minimum passes the smaller term's gradient (half of each on a tie), the clamp passes it
          where ``ub >= bound``, and ``d (bound / c) = -bound / c^2``.

        ``weight`` is float32; the value is rounded to float32 where the general path rounds it, so it
        is the same number.
        """
        f64 = torch.float64
        with torch.no_grad():
            grid = self._grid(weight.device)
            w64 = weight.to(f64)
            flat = w64.reshape(-1, self.kernel_size[0] * self.kernel_size[1])  # F
            gram = flat.mT @ flat
            cos_sin = grid.cos_sin_taps[int(self._grid_argmax(w64, grid, gram))]  # (2, k_h k_w): [c; s]
            symbol = flat @ cos_sin.mT  # [re, im] of W^ at the maximiser
            peak = float(torch.linalg.vector_norm(symbol))
            tap_norms = torch.linalg.vector_norm(flat, dim=0)
            lipschitz = peak + float(tap_norms @ grid.lipschitz_weights)
            bernstein = math.inf if self._bernstein_factor is None else peak * self._bernstein_factor
            frequency = _float32(min(lipschitz, bernstein))

            unfolded: float | None = None
            left = right = torch.empty(0)  # the unfolded kernel's top singular vectors, when computed
            direction = self._unfolded_direction
            # r ||W v|| <= the unfolded bound; skip its SVD only with room for the SVD's rounding (1e-4 relative)
            unfolded_is_larger = (
                direction is not None
                and direction.device == weight.device
                and self._overlap_factor * float(torch.linalg.vector_norm(w64.flatten(1) @ direction)) > frequency * (1 + 1e-4)
            )
            if not unfolded_is_larger:
                u, singular, vh = torch.linalg.svd(weight.flatten(1), full_matrices=False)
                unfolded = _float32(self._overlap_factor * float(singular[0]))
                left, right = u[:, 0].to(f64), vh[0].to(f64)
                self._unfolded_direction = right / torch.linalg.vector_norm(right)
            upper = frequency if unfolded is None else min(frequency, unfolded)
            bound = _float32(self.bound)  # torch compares and divides a float32 tensor with a float32 bound
            clamped = max(upper, bound)
            # bound / c as torch computes it: bound * (1 / c), each rounded to float32 (as the division is)
            scale = _float32(_float32(1.0 / clamped) * bound)
            if not needs_grad or upper < bound:  # no gradient, or ub < bound: s = 1 whatever W
                return scale, None

            chain = -self.bound / clamped**2  # ds / d ub
            to_frequency = chain * (1.0 if unfolded is None else _minimum_share(frequency, unfolded))
            to_lipschitz = _minimum_share(lipschitz, bernstein)
            peak_factor = to_lipschitz + (1 - to_lipschitz) * (self._bernstein_factor or 0.0)  # d frequency / d peak
            to_peak = 0.0 if peak == 0 else to_frequency * peak_factor / peak
            # F M = to_peak (F [c, s]) [c; s] + to_taps F diag(L / ||F[:, t]||); a zero tap's column of F is zero
            # (float32 weights: a nonzero one has a norm far above 1e-300), so its term is 0, as torch's norm gives
            tap_terms = flat * (grid.lipschitz_weights / tap_norms.clamp_min(1e-300))
            to_taps = to_frequency * to_lipschitz
            d_scale = torch.addmm(tap_terms, symbol, cos_sin, beta=to_taps, alpha=to_peak).reshape(weight.shape)
            if unfolded is not None and to_frequency != chain:
                d_scale += (chain - to_frequency) * self._overlap_factor * torch.outer(left, right).reshape(weight.shape)
            return scale, d_scale.to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


def _minimum_share(a: float, b: float) -> float:
    """The share of ``torch.minimum(a, b)``'s gradient that goes to ``a``: 1, 0, or half on a tie."""
    return 1.0 if a < b else 0.0 if a > b else 0.5


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32, as ``tensor.to(torch.float32)`` rounds it."""
    return struct.unpack("f", struct.pack("f", value))[0]


class _RescaledKernel(torch.autograd.Function):
    """``W * s(W)``, the bounded kernel, with ``ds/dW`` computed in the forward pass.

    The same value and gradient as :meth:`BoundedConv2d.effective_weight`'s general path, with one
    autograd node and a few operations backward, where the general path records some 25 small
    operations (the frequency bound's evaluation at the grid maximiser, the unfolded bound's SVD, the
    minimum and the rescaling), each with its backward node: most of the bound's cost per training
    step was that overhead, not the arithmetic.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, layer: BoundedConv2d, needs_grad: bool) -> torch.Tensor:
        scale, d_scale = layer._rank_one_scale(weight, needs_grad)
        ctx.save_for_backward(weight, d_scale)
        ctx.scale = scale
        return weight * scale  # a float32 number: the same product as with the general path's 0-dim tensor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, d_scale = ctx.saved_tensors
        grad_weight = grad * ctx.scale
        if d_scale is not None:  # + (dL/ds) ds/dW, dL/ds = <grad, W>
            grad_weight = torch.addcmul(grad_weight, d_scale, (grad * weight).sum())
        return grad_weight, None, None


class GaussianNoiseLayer(nn.Module):
    """Returns ``gain * (x + N(0, std^2))``, in training AND in evaluation mode.

    Attack libraries call ``model.eval()``; a noise layer gated on ``self.training`` (as Keras'
    GaussianNoise is) would silently evaluate a different, deterministic model. ``gain`` is a
    constant applied after the noise (post-processing: it changes neither S_f nor the guarantee).
    ``generator`` may be set to a ``torch.Generator`` for reproducible draws; by default the global
    torch RNG is used (which the federated engine seeds per client update). The noise is drawn on the
    input's device, so a generator must live there too.

    The draws fill a 4-D input's noise in channels-last order (NHWC: draw ``((n H + h) W + w) C + c``
    goes to element ``(n, c, h, w)``), the layout the models' convolutions run in: the output is then
    channels-last, and block 2's convolution takes it without a layout conversion, forward or
    backward. The order is fixed, whatever the input's layout, so a model gives the same draws in
    either layout; other inputs are filled in their logical order.
    """

    def __init__(self, std: float, gain: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.std = float(std)
        self.gain = float(gain)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.std == 0.0:
            return x if self.gain == 1.0 else x * self.gain
        # gain * std * N(0, 1) in one pass (normal_ scales as it draws), then gain * x added in place: into
        # the drawn tensor itself (added into its permuted view, autograd would copy it in the backward pass)
        if x.dim() != 4:
            return self._draw(x.shape, x).add_(x, alpha=self.gain)
        n, c, h, w = x.shape
        return self._draw((n, h, w, c), x).add_(x.permute(0, 2, 3, 1), alpha=self.gain).permute(0, 3, 1, 2)

    def _draw(self, shape: tuple[int, ...] | torch.Size, like: torch.Tensor) -> torch.Tensor:
        """``gain * std * N(0, 1)`` noise of ``shape``, filled in memory order."""
        noise = torch.empty(shape, dtype=like.dtype, device=like.device)
        return noise.normal_(0.0, self.gain * self.std, generator=self.generator)

    def extra_repr(self) -> str:
        return f"std={self.std:.4g}, gain={self.gain:g}, always_on=True"
