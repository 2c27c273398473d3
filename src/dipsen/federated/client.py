"""One client's local update: engine-independent, used by every federation engine.

The client receives the global weights, trains E local epochs on its own data only (mini-batches
of size B, reshuffled each epoch) and returns its new weights with its sample count, which FedAvg
uses as its weight. All randomness (shuffling, noise draws, AlphaDropout) comes from ``seed``, so an
update is a pure function of (global weights, data, settings, seed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class LocalTraining:
    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 0.001
    momentum: float = 0.0
    # std of Gaussian noise added to every training input (Cohen et al.'s training for randomized
    # smoothing: a base classifier that is accurate under the noise it will be certified with)
    input_noise: float = 0.0

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """A fresh optimizer each round: FedAvg averages weights only, so no optimizer state outlives a round."""
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


@dataclass(frozen=True)
class ClientUpdate:
    state: StateDict
    num_samples: int
    mean_loss: float
    steps: int
    seconds: float


def client_update(
    model: nn.Module,
    global_state: StateDict,
    x: Tensor,
    y: Tensor,
    training: LocalTraining,
    seed: int,
) -> ClientUpdate:
    """Train ``model`` from ``global_state`` on (x, y) and return the updated weights.

    ``model`` is a reusable worker: its weights are overwritten by ``global_state`` first.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)  # noise layer and AlphaDropout draw from the global generator
    shuffle = torch.Generator().manual_seed(seed)
    model.load_state_dict(global_state)
    model.train()
    optimizer = training.make_optimizer(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    total_loss, steps = 0.0, 0
    for _ in range(training.epochs):
        order = torch.randperm(len(x), generator=shuffle)
        for batch in order.split(training.batch_size):
            optimizer.zero_grad(set_to_none=True)
            inputs = x[batch]
            if training.input_noise > 0:
                inputs = inputs + training.input_noise * torch.randn_like(inputs)
            loss = loss_fn(model(inputs), y[batch])
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            steps += 1
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ClientUpdate(state, len(x), total_loss / max(steps, 1), steps, time.perf_counter() - start)
