"""Federated averaging (McMahan et al. 2017): engine-independent aggregation.

FedAvg's new global weights are the sample-weighted mean of the client weights,
``w = sum_k n_k w_k / sum_k n_k``. The sum runs in float64 so the result does not depend on the
order of the clients beyond float64 rounding.

Every engine passes each client's update through :func:`validate_update` first: a malformed update
(wrong keys, shapes or dtypes, non-finite values, an absurd step, a non-positive sample count) is
dropped from the round instead of poisoning the average or crashing the aggregator. The statistics
reported with it (loss, steps, seconds) pass :func:`validate_report`, so that no NaN or negative
figure reaches metrics.jsonl or the cost figures.

Server-side weighting: no number a client reports enters the average unbounded. The weight of
client k is ``n_k = min(reported n_k, |P_k|)`` (:func:`server_counts`), where ``|P_k|`` is the size
of the partition the server itself assigned to k: the in-process engine made the partitions, and
the Flower ServerApp rebuilds the same ones from the run's config and data. Then no client's share
of the round's weighted mean may exceed ``max_client_weight`` (a fraction of the round's total
weight, default 1: no cap): :func:`cap_shares` gives the largest clients exactly that share and
the others shares proportional to ``n_k`` (if the cap is below 1/n, every client gets 1/n). The
coordinate-wise median, trimmed mean, Krum and Bulyan ignore sample counts altogether.

Robust aggregation (:func:`aggregate`, one registry, :data:`AGGREGATORS`, for both engines):
each update's step ``w_k - w`` is first clipped to L2 norm ``clip_norm`` if one is set (Sun et
al. 2019, "Can you really backdoor federated learning?"); then ``fedavg``, ``trimmed-mean``
(``trim_fraction`` of the values cut at each end of every coordinate), ``median`` (coordinate-
wise), ``krum`` (Blanchard et al. 2017: the update closest to its n - f - 2 nearest others),
``multi-krum`` (the FedAvg of the n - f best-scored updates) or ``bulyan`` (El Mhamdi et al.
2018: n - 2f updates chosen by Krum, then per coordinate the mean of the n - 4f values closest
to their median). Median, trimmed mean, Krum and Bulyan are Flower's own functions
(``flwr.server.strategy.aggregate``); Multi-Krum's selection is ours, because Flower's returns
only the mean, not which clients it kept, and the weight cap applies among those kept.

Client-level differential privacy (DP-FedAvg, ``Aggregation.noise_multiplier``) replaces the
weighted mean by :func:`dipsen.federated.privacy.private_mean`: see :mod:`dipsen.federated.privacy`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .client import ClientUpdate, LocalTraining, StateDict

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


def fedavg(states: Sequence[StateDict], num_samples: Sequence[int] | Sequence[float]) -> StateDict:
    """Weighted mean of ``states`` with weights ``num_samples``; each key keeps its dtype.

    Integer tensors (counters such as BatchNorm's ``num_batches_tracked``) are rounded to the
    nearest integer, not truncated: truncation would turn three 7s weighted in float64 into 6.
    """
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
        mean = torch.tensordot(weights, stacked, dims=1)
        if not (reference.is_floating_point() or reference.is_complex() or reference.dtype == torch.bool):
            mean = mean.round()
        averaged[key] = mean.to(reference.dtype)
    return averaged


# --- server-side weights, clipping and robust aggregators -------------------------------------


@dataclass(frozen=True)
class Aggregation:
    """How the server combines a round's valid updates (the ``aggregator`` ... ``max_client_weight`` config fields)."""

    rule: str = "fedavg"  # a key of AGGREGATORS
    trim_fraction: float = 0.1  # trimmed-mean: share of the values cut at each end, in [0, 0.5)
    byzantine: int = 0  # f, the Byzantine clients krum, multi-krum and bulyan are to withstand
    clip_norm: float | None = None  # C: each update w_k - w is scaled to L2 norm at most C first
    max_client_weight: float = 1.0  # the largest share of the mean one client may have
    # client-level DP (fedavg with clip_norm only; see dipsen.federated.privacy): z, the noise
    # multiplier (None: off), and m, the clients sampled per round, the mean's fixed denominator
    noise_multiplier: float | None = None
    sampled: int | None = None


def min_updates(rule: str, byzantine: int) -> int:
    """Valid updates a round needs for ``rule`` to hold against ``byzantine`` clients (0: any number).

    Krum and Multi-Krum need n >= 2f + 3 (Blanchard et al. 2017), Bulyan n >= 4f + 3
    (El Mhamdi et al. 2018, and Flower's ``aggregate_bulyan``).
    """
    return {"krum": 2 * byzantine + 3, "multi-krum": 2 * byzantine + 3, "bulyan": 4 * byzantine + 3}.get(rule, 0)


def server_counts(reported: Sequence[int], known: Sequence[int]) -> list[int]:
    """Each client's sample count as the server accepts it: ``min(reported, known)``.

    ``known`` is the size of the partition the server itself assigned the client; an honest client
    reports exactly that, so only a count claimed beyond it is cut.
    """
    return [min(int(r), int(k)) for r, k in zip(reported, known, strict=True)]


def cap_shares(counts: Sequence[int], max_share: float) -> list[int] | list[float]:
    """Weights proportional to ``counts`` in which no client's share of the total exceeds ``max_share``.

    Unchanged (the integer counts) when no share exceeds it. Otherwise water-filling: the largest
    clients get exactly ``max_share`` each and the others ``lam * count`` with one ``lam`` so that
    the shares sum to 1. When ``max_share < 1/n`` no weights can meet it and every client gets 1/n.
    """
    counts = [int(c) for c in counts]
    total, n = sum(counts), len(counts)
    if not counts or max(counts) <= max_share * total:
        return counts
    if max_share * n <= 1:
        return [1.0 / n] * n
    order = sorted(range(n), key=lambda k: (-counts[k], k))
    rest, capped = total, 0
    scale = 1.0 / total
    for capped, k in enumerate(order):  # noqa: B007 - ``capped`` is used after the loop
        scale = (1.0 - capped * max_share) / rest
        if counts[k] * scale <= max_share:
            break
        rest -= counts[k]
    top = set(order[:capped])
    return [max_share if k in top else counts[k] * scale for k in range(n)]


def clip_update(state: StateDict, global_state: StateDict, clip_norm: float) -> StateDict:
    """``global_state + (state - global_state) * min(1, C / ||state - global_state||)``, in float64.

    The norm is the L2 norm over all floating-point tensors (as in :func:`validate_update`); those
    come back as float64 tensors, so no rounding to float32 happens before the aggregation. Integer
    buffers are no step of the optimizer and pass unchanged.
    """
    deltas = {k: state[k].double() - ref.double() for k, ref in global_state.items() if ref.is_floating_point()}
    norm = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()))
    factor = 1.0 if norm <= clip_norm else clip_norm / norm
    return {k: global_state[k].double() + deltas[k] * factor if k in deltas else state[k] for k in global_state}


NDArrays = list[np.ndarray]


def _median(arrays: list[NDArrays], counts: Sequence[int], spec: Aggregation) -> NDArrays:
    from flwr.server.strategy.aggregate import aggregate_median

    return aggregate_median([(a, 1) for a in arrays])


def _trimmed_mean(arrays: list[NDArrays], counts: Sequence[int], spec: Aggregation) -> NDArrays:
    from flwr.server.strategy.aggregate import aggregate_trimmed_avg

    return aggregate_trimmed_avg([(a, 1) for a in arrays], spec.trim_fraction)


def _krum(arrays: list[NDArrays], counts: Sequence[int], spec: Aggregation) -> NDArrays:
    from flwr.server.strategy.aggregate import aggregate_krum

    return aggregate_krum([(a, 1) for a in arrays], num_malicious=spec.byzantine, to_keep=0)


def _bulyan(arrays: list[NDArrays], counts: Sequence[int], spec: Aggregation) -> NDArrays:
    from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum

    results = [(a, 1) for a in arrays]  # aggregate_bulyan pops from its list: a list of our own
    return aggregate_bulyan(results, num_malicious=spec.byzantine, aggregation_rule=aggregate_krum, to_keep=0)


def krum_scores(arrays: list[NDArrays], byzantine: int) -> np.ndarray:
    """Krum's score of each update: the sum of squared distances to its n - f - 2 nearest others.

    The same score as Flower's ``aggregate_krum`` (which returns only the averaged parameters, not
    which clients it kept); each distance is computed once, in float64.
    """
    flat = [np.concatenate([np.ravel(a) for a in update]) for update in arrays]
    n = len(flat)
    distances = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            distances[i, j] = distances[j, i] = float(np.linalg.norm(flat[i] - flat[j])) ** 2
    closest = max(1, n - byzantine - 2)
    return np.array([np.sort(np.delete(distances[i], i))[:closest].sum() for i in range(n)])


def multi_krum_selection(arrays: list[NDArrays], byzantine: int) -> list[int]:
    """The n - f updates with the lowest Krum scores (Multi-Krum), in client order."""
    scores = krum_scores(arrays, byzantine)
    return sorted(np.argsort(scores, kind="stable")[: len(arrays) - byzantine].tolist())


# name -> fn(float64 arrays per client, server counts, spec) -> float64 arrays. fedavg and
# multi-krum are not here: they are weighted means, computed by fedavg on the capped weights.
_ROBUST = {"trimmed-mean": _trimmed_mean, "median": _median, "krum": _krum, "bulyan": _bulyan}
AGGREGATORS = ("fedavg", "trimmed-mean", "median", "krum", "multi-krum", "bulyan")
BYZANTINE_AGGREGATORS = ("krum", "multi-krum", "bulyan")


def _restore(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A float64 aggregate back in ``reference``'s dtype, integers rounded as :func:`fedavg` does."""
    if not (reference.is_floating_point() or reference.is_complex() or reference.dtype == torch.bool):
        value = value.round()
    return value.to(reference.dtype)


def aggregate(
    states: Sequence[StateDict],
    counts: Sequence[int],
    global_state: StateDict,
    spec: Aggregation,
    noise_seed: int | None = None,
) -> StateDict:
    """The new global weights from the round's valid ``states`` under ``spec``; each key keeps its dtype.

    ``counts`` are the server's sample counts (:func:`server_counts`). Steps: clip each update to
    ``spec.clip_norm`` (if set); then ``fedavg`` (weights: ``cap_shares(counts, max_client_weight)``),
    coordinate-wise ``median`` or ``trimmed-mean``, ``krum`` (the one update with the lowest score),
    ``multi-krum`` (fedavg of the n - f lowest-scored, weights capped among them) or ``bulyan``.
    All arithmetic is float64; integer buffers are rounded at the end, as fedavg rounds them.

    With client-level DP (``spec.noise_multiplier`` set; fedavg and ``clip_norm`` only) the result
    is :func:`dipsen.federated.privacy.private_mean` instead: clipped steps summed with weight 1
    each, divided by ``spec.sampled`` (m), plus Gaussian noise drawn from ``noise_seed``; counts
    are ignored and no update at all is allowed (the noise alone).
    """
    if spec.noise_multiplier is not None:
        from .privacy import private_mean  # privacy imports clip_update from here

        if spec.rule != "fedavg" or spec.clip_norm is None or spec.sampled is None or noise_seed is None:
            raise ValueError("client-level DP needs the fedavg rule, clip_norm, sampled and a noise_seed")
        return private_mean(states, global_state, spec.clip_norm, spec.sampled, spec.noise_multiplier, noise_seed)
    if not states:
        raise ValueError("aggregate needs at least one client update")
    if spec.rule not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {spec.rule!r}")
    need = min_updates(spec.rule, spec.byzantine)
    if len(states) < need:
        raise ValueError(f"{spec.rule} with f = {spec.byzantine} needs {need} updates, got {len(states)}")
    if spec.clip_norm is not None:
        states = [clip_update(state, global_state, spec.clip_norm) for state in states]
    if spec.rule in ("fedavg", "multi-krum"):
        chosen = list(range(len(states)))
        if spec.rule == "multi-krum":
            chosen = multi_krum_selection([_arrays(s, global_state) for s in states], spec.byzantine)
        mean = fedavg([states[i] for i in chosen], cap_shares([counts[i] for i in chosen], spec.max_client_weight))
        return {key: _restore(mean[key].double(), reference) for key, reference in global_state.items()}
    result = _ROBUST[spec.rule]([_arrays(s, global_state) for s in states], counts, spec)
    return {
        key: _restore(torch.from_numpy(np.asarray(value, dtype=np.float64)), reference)
        for (key, reference), value in zip(global_state.items(), result, strict=True)
    }


def _arrays(state: StateDict, global_state: StateDict) -> NDArrays:
    return [state[key].detach().to(torch.float64).numpy() for key in global_state]
