"""The interface of our own torch attacks (APGD, Square): ART's ``generate`` on numpy arrays.

A :class:`TorchAttack` crafts on a torch module (the attacker's view of the model, called directly:
no ART wrapper, no numpy round trip per step) and exposes two entry points:

- :meth:`TorchAttack.attack` on tensors, returning the adversarial examples *and* the attack's own
  verdict per example (did the model, as the attack queried it, misclassify the returned point);
- :meth:`TorchAttack.generate` with ART's signature on numpy arrays, so the evaluation treats our
  attacks and ART's alike; it runs :meth:`attack` on slices of ``batch_size`` examples.

A mask has the shape of x (one mask per example): 1 where the attacker may change the input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor, nn

from ..device import model_device
from ..errors import DipsenError


class TorchAttack(ABC):
    """An untargeted L-inf attack of radius ``eps`` on ``model`` (inputs in [0, 1])."""

    def __init__(self, model: nn.Module, eps: float, batch_size: int = 128) -> None:
        if not eps > 0:
            raise DipsenError(f"eps must be > 0, got {eps}")
        self.model, self.eps, self.batch_size = model, eps, batch_size

    @abstractmethod
    def attack(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Adversarial examples for ``x`` (labels ``y``) and, per example, whether the attack fooled the model."""

    def generate(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """:meth:`attack` on numpy arrays (integer labels), ``batch_size`` examples at a time, on the model's device."""
        if y is None or np.ndim(y) != 1:
            raise DipsenError("our attacks need the true labels as one integer per example")
        device = model_device(self.model)
        chunks = []
        for begin in range(0, len(y), self.batch_size):
            part = slice(begin, begin + self.batch_size)
            mask_part = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask[part])).to(device)
            x_adv, _ = self.attack(
                torch.from_numpy(np.ascontiguousarray(x[part], dtype=np.float32)).to(device),
                torch.from_numpy(np.asarray(y[part])).long().to(device),
                mask_part,
            )
            chunks.append(x_adv.cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros_like(x, dtype=np.float32)
