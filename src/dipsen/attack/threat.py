"""Threat models: which model the attacker crafts adversarial examples on.

Every adversarial example is evaluated on the deployed final global model; the threat model only
changes what the attacker has (paper section V):

- ``white-box``  the final global model's parameters;
- ``orange-box`` a stale global model: the checkpoint ``stale_rounds`` rounds before the end (an
                 attacker who stopped receiving updates, or a client that left the federation);
- ``transfer``   black-box (a): no parameters; the attacker trains its own surrogate CNN on its own
                 data (a slice of the test distribution disjoint from the clients' and from the
                 evaluated examples) and transfers examples crafted on it;
- ``query``      black-box (b): no parameters, only the deployed model's outputs (scores for
                 Square, labels for HopSkipJump), each query answered with a fresh noise draw.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import DipsenError
from ..models import FederatedNet, build_model, calibrate_noise
from .target import TrainedRun

THREAT_MODELS = ("white-box", "orange-box", "transfer", "query")
DEFAULT_STALE_ROUNDS = 5
SURROGATE_EPOCHS = 10


def stale_round(run: TrainedRun, stale_rounds: int) -> int:
    """The round whose checkpoint an orange-box attacker holds (never before round 0)."""
    if stale_rounds < 1:
        raise DipsenError(f"--stale-rounds must be >= 1, got {stale_rounds}")
    return max(0, run.final_round - stale_rounds)


def train_surrogate(
    x: np.ndarray, y: np.ndarray, num_classes: int, seed: int = 0, epochs: int = SURROGATE_EPOCHS
) -> FederatedNet:
    """The attacker's own undefended CNN, trained centrally on its data (SGD, momentum 0.9, batch 64)."""
    if len(y) < 2:
        raise DipsenError("the attacker's data slice is empty: lower --samples so part of the test set is left over")
    torch.manual_seed(seed)
    model = build_model("cnn", tuple(x.shape[1:]), num_classes, calibrate_noise(0.0, 1.0, 0.05, 0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(yt), generator=generator).split(64):
            optimizer.zero_grad()
            loss_fn(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
    return model.eval()
