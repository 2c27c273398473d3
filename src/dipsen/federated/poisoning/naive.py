"""The naive attacks: each malicious client transforms its own honest step, knowing nothing else.

Knowledge: its own update only (and, for model-replacement, the clients per round m); none of
them colludes. With w the global weights and w_k the client's honest result:

- ``label-flip`` (Tolpegin et al. 2020, "Data poisoning attacks against federated learning
  systems", ESORICS): honest training with every label y replaced by C - 1 - y (C classes);
  the update is sent as it comes out.
- ``sign-flip`` (Li et al. 2019, "RSA", AAAI, whose Byzantine workers send -4 times their true
  message): sends w - s (w_k - w), s = :data:`SIGN_FLIP_SCALE` = 4.
- ``gaussian`` (the Gaussian Byzantine workers of Blanchard et al. 2017, NeurIPS; a baseline in
  Fang et al. 2020): sends w + N(0, sd^2) per coordinate, sd = :data:`GAUSSIAN_RMS_FACTOR` (10)
  times the RMS of the client's honest step, drawn from the client's own seed (round, client).
- ``scaled-count``: the honest update claiming :data:`CLAIMED_SAMPLES` (10^12) samples, the lie
  FedAvg's weights n_k invite, with the step count that many would take (so the report passes
  validate_report); the server caps the count at the client's partition (server_counts).
- ``model-replacement`` (Bagdasaryan et al. 2020, "How to backdoor federated learning",
  AISTATS): trains on flipped labels as ``label-flip`` does (an untargeted stand-in for their
  backdoor model X), then sends L = w + gamma (X - w) with gamma = n / eta = m (eta = 1 for
  FedAvg), which replaces the FedAvg mean of m equally weighted updates by X, and claims
  :data:`CLAIMED_SAMPLES` samples. An update the server drops replaces nothing, so gamma is
  capped (:func:`replacement_boost`) to keep the step within validate_update's bound,
  ``MAX_STEP_NORM_RATIO * max(||w||, 1)``, with :data:`BOUND_MARGIN` to spare. At the scales used
  here the cap does not bind: from the initial MNIST models one local epoch of Adam at lr 0.001
  on 300 flipped rows moves them by 0.11% (DiPSeN) to 0.28% (CNN) of the bound per unit of
  gamma, three epochs by 0.20%, so gamma = m = 20 uses 2-6% of it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..aggregate import MAX_STEP_NORM_RATIO
from ..client import StateDict
from .base import Round, flat_norm, flat_step

# sign-flip: the reversed honest step, scaled by 4 as in Li et al. 2019 (RSA): reversing alone (s = 1)
# would only cancel one honest client in FedAvg; 4 outweighs several
SIGN_FLIP_SCALE = 4.0
# gaussian: the noise's std per coordinate, in units of the RMS of the client's honest step
GAUSSIAN_RMS_FACTOR = 10.0
# scaled-count and model-replacement: the sample count claimed (FedAvg would weigh the update ~1)
CLAIMED_SAMPLES = 10**12
# model-replacement: the boosted step is kept below this share of validate_update's bound
BOUND_MARGIN = 0.99


def sign_flip(view: Round) -> Tensor:
    """``-s (w_k - w)``, s = :data:`SIGN_FLIP_SCALE`."""
    return -SIGN_FLIP_SCALE * view.own


def gaussian(view: Round) -> Tensor:
    """``N(0, sd^2)`` per coordinate, sd = :data:`GAUSSIAN_RMS_FACTOR` x the RMS of the client's step, from its seed."""
    rows = []
    for step, seed in zip(view.own, view.seeds, strict=True):
        sd = GAUSSIAN_RMS_FACTOR * float(step.norm()) / math.sqrt(max(step.numel(), 1))
        generator = torch.Generator().manual_seed(seed)
        rows.append(sd * torch.randn(step.shape, generator=generator, dtype=torch.float64))
    return torch.stack(rows)


def boost(step_norm: float, global_norm: float, gamma: float) -> float:
    """``gamma``, or less where ``gamma * step_norm`` would pass :data:`BOUND_MARGIN` of validate_update's bound."""
    bound = MAX_STEP_NORM_RATIO * max(global_norm, 1.0)
    if step_norm == 0 or gamma * step_norm <= BOUND_MARGIN * bound:
        return gamma
    return BOUND_MARGIN * bound / step_norm


def replacement_boost(state: StateDict, global_state: StateDict, gamma: float) -> float:
    """Model-replacement's factor for the client result ``state``: :func:`boost` of its step ``state - global_state``."""
    return boost(float(flat_step(state, global_state).norm()), flat_norm(global_state), gamma)


def model_replacement(view: Round) -> Tensor:
    """``gamma (X - w)``, gamma = m capped by :func:`boost` (X: the client's result on flipped labels)."""
    return torch.stack([boost(float(step.norm()), view.global_norm, view.gamma) * step for step in view.own])
