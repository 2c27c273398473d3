r"""The differential-privacy noise layer and the block it protects (PixelDP, Lecuyer et al. 2019).

PixelDP makes a network's pre-noise computation ``g`` have a bounded L2 sensitivity ``S_f``,
``||g(x) - g(x')||_2 <= S_f ||x - x'||_2``, then adds Gaussian noise ``N(0, (S_f sigma)^2)``.
By the Gaussian mechanism, with

.. math::  \sigma = \sqrt{2 \ln(1.25/\delta)} \, L / \epsilon, \qquad \epsilon \le 1,

the randomized scores are (epsilon, delta)-DP with respect to input changes of L2 size at most L,
which is what turns the noise into a robustness statement.

Here ``g`` is block 1 (convolution, ReLU, 2x2 max-pooling). ReLU and non-overlapping max-pooling are
1-Lipschitz in L2, so ``S_f`` is the convolution's L2 operator norm, bounded by
``sqrt(n_overlap) * ||W||_2`` where ``W`` is the kernel unfolded to a ``C_out x (C_in k_h k_w)``
matrix and ``n_overlap = ceil(k_h/s_h) ceil(k_w/s_w)`` is how many patches can contain one input pixel.
:class:`BoundedConv2d` rescales its kernel in every forward pass so this bound never exceeds
``S_f = 1`` whatever its parameters are (after an SGD step, after FedAvg, after loading a checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

SENSITIVITY_BOUND = 1.0
"""S_f: the L2 sensitivity bound of block 1 that :class:`BoundedConv2d` enforces."""


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
            raise ConfigError(f"sigma must be a finite number >= 0, got {sigma}")
        return NoiseCalibration(SENSITIVITY_BOUND, epsilon, delta, attack_bound, float(sigma), True)
    if not 0 < epsilon <= 1:
        raise ConfigError(f"dp_epsilon must be in (0, 1] for the Gaussian mechanism, got {epsilon}")
    if not 0 < delta < 1:
        raise ConfigError(f"dp_delta must be in (0, 1), got {delta}")
    if not attack_bound > 0:
        raise ConfigError(f"dp_attack_bound (L) must be > 0, got {attack_bound}")
    derived = gaussian_mechanism_sigma(epsilon, delta, attack_bound)
    return NoiseCalibration(SENSITIVITY_BOUND, epsilon, delta, attack_bound, derived, False)


class BoundedConv2d(nn.Conv2d):
    """A convolution whose L2 operator norm is at most ``bound``, by construction.

    The effective kernel is ``W * min(1, bound / lipschitz_upper_bound(W))``; the rescaling is part
    of the forward pass, so the guarantee holds for any stored parameters.
    """

    def __init__(self, *args, bound: float = SENSITIVITY_BOUND, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bound = bound
        kh, kw = self.kernel_size
        sh, sw = self.stride
        self._overlap_factor = math.sqrt(math.ceil(kh / sh) * math.ceil(kw / sw))

    def lipschitz_upper_bound(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """sqrt(n_overlap) * spectral norm of the unfolded kernel: an upper bound on ||conv||_2."""
        w = self.weight if weight is None else weight
        return self._overlap_factor * torch.linalg.matrix_norm(w.flatten(1), ord=2)

    def effective_weight(self) -> torch.Tensor:
        scale = torch.clamp(self.bound / self.lipschitz_upper_bound(), max=1.0)
        return self.weight * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class GaussianNoiseLayer(nn.Module):
    """Returns ``gain * (x + N(0, std^2))``, in training AND in evaluation mode.

    Attack libraries call ``model.eval()``; a noise layer gated on ``self.training`` (as Keras'
    GaussianNoise is) would silently evaluate a different, deterministic model. ``gain`` is a
    constant applied after the noise (post-processing: it changes neither S_f nor the guarantee).
    ``generator`` may be set to a ``torch.Generator`` for reproducible draws; by default the global
    torch RNG is used (which the federated engine seeds per client update).
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
