"""Prediction rules for (possibly randomized) models.

A randomized model's label for x is a random variable. The paper reports one draw per input;
PixelDP predicts with the Monte-Carlo mean of the softmax over n draws, which estimates the
expected scores E[softmax(f(x))] (error O(1/sqrt(n))). Every reported accuracy names its rule.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..device import model_device


def draw_logits(model: nn.Module, x: torch.Tensor, draws: int) -> torch.Tensor:
    """Logits of ``draws`` forward passes of each input, draw-major (row ``d * len(x) + i``: draw d of input i).

    A :class:`~dipsen.models.net.FederatedNet` runs its deterministic block 1 once per input
    (:meth:`~dipsen.models.net.FederatedNet.forward_draws`); any other model sees the repeated batch.
    """
    forward_draws = getattr(model, "forward_draws", None)
    if forward_draws is not None:
        return forward_draws(x, draws)
    return model(x.repeat(draws, *([1] * (x.dim() - 1))))


def prediction_rule(model: nn.Module, mc_samples: int) -> str:
    """Human-readable name of the rule ``predict_proba(model, x, mc_samples)`` applies."""
    if not getattr(model, "is_randomized", False):
        return "deterministic"
    if mc_samples <= 1:
        return "single draw"
    return f"mean softmax over {mc_samples} draws"


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray | torch.Tensor, mc_samples: int = 1, batch_size: int = 128) -> np.ndarray:
    """Class probabilities for ``x`` (eval mode; noise layers stay on), averaged over draws; computed on the model's device.

    The default batch keeps activations in cache: on a 2-core CPU, batches of 128 ran about 2x
    faster per sample than batches of 512 or more.
    """
    model.eval()
    draws = mc_samples if getattr(model, "is_randomized", False) else 1
    inputs, device = torch.as_tensor(x), model_device(model)
    chunks = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size].to(device)
        probs = torch.stack([torch.softmax(model(batch), dim=1) for _ in range(draws)]).mean(dim=0)
        chunks.append(probs.cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
