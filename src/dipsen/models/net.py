"""The paper's CNN and the DiPSeN variants, one class with two switches.

Layout (all datasets; inputs are (1, H, W) with H, W even-friendly, e.g. 28x28 or 28x6):

- block 1: conv 3x3 (32 channels, 'same' padding) -> ReLU -> max-pool 2x2
- [noise] Gaussian noise layer, std S_f * sigma (block 1's conv is then a :class:`BoundedConv2d`),
  whose output is scaled by a constant gain (see :func:`post_noise_gain`), applied by block 2's conv
  (an :class:`InputGainConv2d`, whose kernel it multiplies)
- block 2: conv 3x3 (64 channels, 'same' padding) -> ReLU -> max-pool 2x2
- hidden dense layer, 128 units: ReLU (CNN) or [selu] a :class:`SeluLayer` (LeCun-uniform, SELU,
  AlphaDropout)
- output dense layer; the model returns logits, softmax is applied by the loss and by prediction.

Both DiPSeN components keep every layer size, so the CNN and DiPSeN have the same parameter count
and their per-step cost differs only by what the defence itself costs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .noise import BoundedConv2d, GaussianNoiseLayer
from .selu import SeluLayer, lecun_uniform_

CONV_CHANNELS = (32, 64)
HIDDEN_UNITS = 128
BLOCK1_TARGET_RMS = 0.4
"""Root mean square of block 1's output after the gain: what the former constant gain of 4 gave a
bounded block 1 without noise (4 x 0.1), measured to train well at sigma 0 (93% MNIST test accuracy after
2 centralised epochs, against 84% without a gain)."""
BOUNDED_BLOCK1_RMS = 0.1
"""Root mean square of a bounded (S_f = 1) block 1's output on MNIST at initialisation (measured:
0.10-0.15 over seeds 0-2, against 0.18-0.23 for the CNN's unconstrained block 1)."""


def post_noise_gain(std: float) -> float:
    """The constant that scales block 1's noisy output back to ``BLOCK1_TARGET_RMS``.

    Bounding block 1 to S_f = 1 shrinks its output, and the noise adds a component of RMS ``std``
    (2.5x the signal at PixelDP's default). Block 2 sees the sum, and the size of its input sets how
    far one optimizer step moves its pre-activations. With the former constant gain of 4 the default
    noise made block 2's input 2.7x larger than at sigma 0, and SGD with momentum 0.9
    left noise-only at one class with 97% of block 2's ReLU units dead; this gain lets it learn
    (``benchmarks/training_diagnostics.py``). The noise also makes every later gradient 2-2.5x
    noisier, which no gain removes: that is why the default optimizer is Adam. As post-processing,
    the gain changes neither S_f nor the DP guarantee.
    """
    return BLOCK1_TARGET_RMS / (BOUNDED_BLOCK1_RMS**2 + std**2) ** 0.5


class InputGainConv2d(nn.Conv2d):
    """``conv(input_gain * x)``, computed as a convolution with the kernel times ``input_gain``.

    The same function as scaling the input first, but the gain multiplies the kernel (64 x 32 x 3 x 3
    numbers for block 2) instead of block 1's noisy output (200,704 numbers per batch of 32 on MNIST),
    once forward and once backward.
    """

    def __init__(self, *args, input_gain: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.input_gain = float(input_gain)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight if self.input_gain == 1.0 else self.weight * self.input_gain
        return self._conv_forward(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_gain={self.input_gain:g}"


class FederatedNet(nn.Module):
    """CNN with an optional DP noise layer after block 1 and an optional SELU layer after block 2."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        noise_std: float | None = None,
        selu: bool = False,
        alpha_dropout: float = 0.05,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        c1, c2 = CONV_CHANNELS
        conv1_cls = BoundedConv2d if noise_std is not None else nn.Conv2d
        self.block1 = nn.Sequential(conv1_cls(channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        # the post-noise gain is applied by block 2's convolution: the noise layer itself has gain 1
        self.noise = GaussianNoiseLayer(noise_std) if noise_std is not None else None
        gain = 1.0 if noise_std is None else post_noise_gain(noise_std)
        conv2 = nn.Conv2d(c1, c2, 3, padding=1) if noise_std is None else InputGainConv2d(c1, c2, 3, padding=1, input_gain=gain)
        self.block2 = nn.Sequential(conv2, nn.ReLU(), nn.MaxPool2d(2))
        flat = c2 * (height // 4) * (width // 4)
        self.hidden: nn.Module = (
            SeluLayer(flat, HIDDEN_UNITS, alpha_dropout) if selu else nn.Sequential(nn.Linear(flat, HIDDEN_UNITS), nn.ReLU())
        )
        self.output = nn.Linear(HIDDEN_UNITS, num_classes)
        if selu:
            lecun_uniform_(self.output.weight)
            nn.init.zeros_(self.output.bias)
        # Channels-last (NHWC) conv weights make oneDNN run both blocks in that layout: the same
        # function, 2.3x faster inference and 1.3x faster input gradients on a 2-core x86 CPU
        # (benchmarks/memory_format.py). Weights loaded later keep the layout (load_state_dict copies).
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit the keyword

    @property
    def is_randomized(self) -> bool:
        """True when predictions depend on noise draws even in evaluation mode."""
        return self.noise is not None and self.noise.std > 0

    def forward(self, x: Tensor) -> Tensor:
        return self._after_block1(self.block1(x.float()))

    def forward_draws(self, x: Tensor, draws: int) -> Tensor:
        """Logits of ``draws`` noise draws for each input, draw-major: row ``d * len(x) + i`` is draw d of input i.

        The function of ``self(x.repeat(draws, 1, 1, 1))``, and with the same generator state the same
        noise in the same order, but block 1 runs once per input instead of once per draw: it is
        deterministic (the noise comes after it), and at EOT's batch of draws x inputs its full-resolution
        activations fall out of cache. An EOT-16 gradient of 128 inputs took 1.8-2.1x less time this way
        (``benchmarks/eot_throughput.py``, 1 thread, on a loaded 2-core machine).
        """
        features = self.block1(x.float())
        return self._after_block1(features.repeat(draws, *([1] * (features.dim() - 1))))

    def _after_block1(self, x: Tensor) -> Tensor:
        if self.noise is not None:
            x = self.noise(x)
        x = self.block2(x).flatten(1)
        return self.output(self.hidden(x))
