"""Checks of every client update before any rule sees it: its weights (:func:`validate_update`) and its report.

Every engine passes each update through both: a malformed update (wrong keys, shapes or dtypes,
non-finite values, an absurd step, a non-positive sample count) is dropped from the round instead
of poisoning the average or crashing the aggregator, and no NaN or negative figure (loss, steps,
seconds) reaches metrics.jsonl or the cost figures.
"""

from __future__ import annotations

import math

import torch

from ..client import ClientUpdate, LocalTraining, StateDict

# A client's update moves the global weights by ||w_k - w||. Honest local training with the
# learning rates used here moves them by a fraction of ||w|| per round; a step this many times
# larger than the global weights themselves can only be corrupt or malicious.
MAX_STEP_NORM_RATIO = 100.0


def validate_update(state: StateDict, global_state: StateDict, num_samples: int) -> str | None:
    """Why ``state`` (trained from ``global_state`` on ``num_samples`` samples) is unusable, or None.

    Checks: a positive sample count; exactly the global model's keys, each with its shape and
    dtype; finite values; and a step ``||state - global_state||`` of at most
    ``MAX_STEP_NORM_RATIO * max(||global_state||, 1)`` (L2 over all floating-point tensors).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        return f"sample count {num_samples!r} is not a positive integer"
    if not isinstance(state, dict):
        return f"update is a {type(state).__name__}, not a state dict"
    missing, extra = sorted(set(global_state) - set(state)), sorted(set(state) - set(global_state))
    if missing or extra:
        return f"keys differ from the global model (missing {missing}, unexpected {extra})"
    step_sq, global_sq = 0.0, 0.0
    for key, reference in global_state.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            return f"{key} is a {type(value).__name__}, not a tensor"
        if value.shape != reference.shape:
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}"
        if value.dtype != reference.dtype:
            return f"{key} has dtype {value.dtype}, expected {reference.dtype}"
        if not reference.is_floating_point():
            continue
        if not torch.isfinite(value).all():
            return f"{key} contains NaN or Inf"
        step_sq += float((value.double() - reference.double()).square().sum())
        global_sq += float(reference.double().square().sum())
    step, bound = math.sqrt(step_sq), MAX_STEP_NORM_RATIO * max(math.sqrt(global_sq), 1.0)
    if not step <= bound:
        return f"step norm {step:.3g} exceeds {bound:.3g} ({MAX_STEP_NORM_RATIO:g} x the global weights' norm)"
    return None


def validate_report(update: ClientUpdate, training: LocalTraining) -> str | None:
    """Why the loss, step count or seconds that came with ``update`` are unusable, or None.

    The loss is a mean cross-entropy and the time a duration, so both are finite and >= 0. The
    steps are exactly what :func:`~dipsen.federated.client.client_update` takes on
    ``update.num_samples`` samples (checked first by :func:`validate_update`): ``epochs`` passes
    of ``ceil(samples / batch_size)`` mini-batches.
    """
    for name in ("mean_loss", "seconds"):
        value = getattr(update, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            return f"{name} {value!r} is not a finite number >= 0"
    expected = training.steps_for(update.num_samples)
    if type(update.steps) is not int or update.steps != expected:  # not a bool, a float or a numpy int
        return (
            f"steps {update.steps!r}, expected {expected} ({training.epochs} epochs of "
            f"{update.num_samples} samples in batches of {training.batch_size})"
        )
    return None
