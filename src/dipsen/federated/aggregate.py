"""Federated averaging (McMahan et al. 2017): engine-independent aggregation.

FedAvg's new global weights are the sample-weighted mean of the client weights,
``w = sum_k n_k w_k / sum_k n_k``. The sum runs in float64 so the result does not depend on the
order of the clients beyond float64 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .client import StateDict


def fedavg(states: Sequence[StateDict], num_samples: Sequence[int]) -> StateDict:
    """Weighted mean of ``states`` with weights ``num_samples``; each key keeps its dtype."""
    if not states:
        raise ValueError("fedavg needs at least one client update")
    if len(states) != len(num_samples):
        raise ValueError("fedavg: one sample count per state is required")
    total = float(sum(num_samples))
    if total <= 0:
        raise ValueError("fedavg: the sample counts sum to zero")
    weights = torch.tensor([n / total for n in num_samples], dtype=torch.float64)
    averaged: StateDict = {}
    for key, reference in states[0].items():
        stacked = torch.stack([state[key] for state in states]).to(torch.float64)
        averaged[key] = torch.tensordot(weights, stacked, dims=1).to(reference.dtype)
    return averaged
