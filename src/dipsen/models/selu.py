"""The self-normalizing (SELU) layer of Klambauer et al. 2017.

With LeCun initialisation (weights of variance 1/fan_in) and inputs of mean 0 and variance 1, a
SELU layer's outputs again have mean ~0 and variance ~1; AlphaDropout keeps both in training.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lecun_uniform_(weight: torch.Tensor) -> torch.Tensor:
    """LeCun-uniform initialisation: U(-sqrt(3/fan_in), sqrt(3/fan_in)), i.e. variance 1/fan_in."""
    fan_in = weight[0].numel()
    bound = math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class SeluLayer(nn.Module):
    """Dense layer with LeCun-uniform weights, SELU activation and AlphaDropout."""

    def __init__(self, in_features: int, out_features: int, alpha_dropout: float = 0.05) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        lecun_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.activation = nn.SELU()
        self.dropout = nn.AlphaDropout(alpha_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.activation(self.linear(x)))
