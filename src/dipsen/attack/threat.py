"""Threat models: which model the attacker crafts adversarial examples on.

Every adversarial example is evaluated on the deployed final global model; the threat model only
changes what the attacker has (paper section V):

- ``white-box``  the final global model's parameters;
- ``orange-box`` a stale global model: the checkpoint ``stale_rounds`` rounds before the end (an
                 attacker who stopped receiving updates, or a client that left the federation);
                 the run must be that long and have kept that checkpoint (see :func:`stale_round`);
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

from ..device import CPU
from ..errors import DipsenError
from ..models import FederatedNet, build_model, calibrate_noise
from .target import TrainedRun

THREAT_MODELS = ("white-box", "orange-box", "transfer", "query")
DEFAULT_STALE_ROUNDS = 5
SURROGATE_EPOCHS = 10


def stale_round(run: TrainedRun, stale_rounds: int) -> int:
    """The round whose checkpoint an orange-box attacker holds: ``stale_rounds`` before the final one.

    Raises DipsenError, naming the round, the run and the way out, if the run is shorter than
    ``stale_rounds`` (there is no such round; crafting on round 0, the untrained model, would
    measure another threat) or its ``keep_checkpoints`` rule has deleted that checkpoint.
    """
    if stale_rounds < 1:
        raise DipsenError(f"--stale-rounds must be >= 1, got {stale_rounds}")
    final, round_ = run.final_round, run.final_round - stale_rounds
    if round_ < 0:
        shorter = f"use --stale-rounds {final} or less, or " if final >= 1 else ""
        raise DipsenError(
            f"orange-box: {run.path} ends at round {final}, so it has no round {round_} ({final} - --stale-rounds "
            f"{stale_rounds}); {shorter}train it longer: dipsen train --resume {run.path} --rounds N"
        )
    saved = run.run.finished_rounds()
    if round_ not in saved:
        ages = ", ".join(str(final - r) for r in reversed(saved) if r < final) or "none"
        raise DipsenError(
            f"orange-box: {run.path} no longer has the checkpoint of round {round_} (--stale-rounds {stale_rounds}): "
            f"keep_checkpoints {run.config.keep_checkpoints!r} deleted it; --stale-rounds it can serve: {ages}; "
            f"or retrain with --keep-checkpoints last-{stale_rounds + 1} or all"
        )
    return round_


def train_surrogate(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    seed: int = 0,
    epochs: int = SURROGATE_EPOCHS,
    device: torch.device = CPU,
) -> FederatedNet:
    """The attacker's own undefended CNN, trained centrally on its data (SGD, momentum 0.9, batch 64) on ``device``."""
    if len(y) < 2:
        raise DipsenError("the attacker's data slice is empty: lower --samples so part of the test set is left over")
    torch.manual_seed(seed)
    model = build_model("cnn", tuple(x.shape[1:]), num_classes, calibrate_noise(0.0, 1.0, 0.05, 0.1)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(yt), generator=generator).split(64):
            optimizer.zero_grad()
            loss_fn(model(xt[batch].to(device)), yt[batch].to(device)).backward()
            optimizer.step()
    return model.eval()
