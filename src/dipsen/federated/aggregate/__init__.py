"""Server-side aggregation, engine-independent: one registry of rules (:data:`RULES`) for both engines.

Every engine passes each client's update through :func:`validate_update` and :func:`validate_report`
first (:mod:`.validation`); the valid ones come to :func:`aggregate` with the server's sample
counts (:func:`server_counts`), which then:

1. clips each update's step ``w_k - w`` to L2 norm ``clip_norm`` if one is set (Sun et al. 2019,
   "Can you really backdoor federated learning?"; :func:`clip_update`);
2. applies the ``pre_aggregation`` step if any (:mod:`.pre`): ``bucketing`` (Karimireddy et al.
   2022) or ``nnm``, nearest-neighbour mixing (Allouah et al. 2023);
3. applies the rule. :mod:`.classical`: ``fedavg`` (weighted mean, weights capped by
   ``max_client_weight``), ``trimmed-mean``, ``median``; :mod:`.krum`: ``krum``, ``multi-krum``,
   ``bulyan``; :mod:`.clipping`: ``centered-clipping`` (Karimireddy et al. 2021); :mod:`.trust`:
   ``fltrust`` (Cao et al. 2021); :mod:`.dnc`: ``dnc`` (Shejwalkar & Houmansadr 2021); :mod:`.flame`:
   ``flame`` (Nguyen et al. 2022, against backdoors). Each
   module gives its rule's math, defaults and sources. The filtering rules (:data:`FILTERING_RULES`)
   also name the updates they admitted (:func:`aggregate_round`): the engine records them per round
   (``admitted`` in metrics.jsonl), and the poisoning study turns them into the share of malicious
   updates each rule let in.

Median, trimmed mean and Bulyan's median are Flower's functions (``flwr.server.strategy.aggregate``);
the Krum family's selections are ours, from one Gram matrix, and agree with Flower's. All arithmetic
is float64; integer buffers are rounded at the end, as :func:`fedavg` rounds them. The rules that
draw at random (bucketing's permutation, DnC's coordinates, FLTrust's server training, FLAME's noise) draw from
the round's seed (``noise_seed``, which the engine derives from the run's seed and the round), so
a run and its resume give the same weights. No rule carries state from round to round.

Client-level differential privacy (DP-FedAvg, ``Aggregation.noise_multiplier``) replaces all this by
:func:`dipsen.federated.privacy.private_mean`: see :mod:`dipsen.federated.privacy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..client import StateDict
from .base import Admitted, Aggregation, Rule, Updates, unflatten
from .classical import cap_shares, fedavg, median, server_counts, trim_count, trimmed_mean, weighted_mean
from .clipping import centered_clipping, clip_update
from .dnc import dnc
from .flame import flame
from .krum import bulyan, krum, krum_scores, multi_krum, multi_krum_selection, squared_distances
from .pre import bucketing, nnm
from .trust import fltrust, root_rows
from .validation import MAX_STEP_NORM_RATIO, validate_report, validate_update

__all__ = [
    "AGGREGATORS",
    "BYZANTINE_AGGREGATORS",
    "FILTERING_RULES",
    "MAX_STEP_NORM_RATIO",
    "PRE_AGGREGATIONS",
    "RULES",
    "Aggregation",
    "Updates",
    "aggregate",
    "aggregate_round",
    "cap_shares",
    "clip_update",
    "fedavg",
    "krum_scores",
    "min_updates",
    "multi_krum_selection",
    "root_rows",
    "server_counts",
    "squared_distances",
    "trim_count",
    "validate_report",
    "validate_update",
]

RULES: dict[str, Rule] = {
    "fedavg": weighted_mean,
    "trimmed-mean": trimmed_mean,
    "median": median,
    "krum": krum,
    "multi-krum": multi_krum,
    "bulyan": bulyan,
    "centered-clipping": centered_clipping,
    "fltrust": fltrust,
    "dnc": dnc,
    "flame": flame,
}
AGGREGATORS = tuple(RULES)  # the names, in the registry's order
# the rules that admit some updates and leave the others out (aggregate_round names those they admitted)
FILTERING_RULES = ("krum", "multi-krum", "bulyan", "dnc", "flame", "fltrust")
BYZANTINE_AGGREGATORS = ("krum", "multi-krum", "bulyan", "dnc")  # the rules told f (``byzantine``)
_PRE: dict[str, Callable[[Updates, Aggregation, int | None], np.ndarray]] = {"bucketing": bucketing, "nnm": nnm}
PRE_AGGREGATIONS = ("none", *_PRE)

# n >= a f + b updates: Blanchard et al. 2017 for Krum, El Mhamdi et al. 2018 (and Flower) for
# Bulyan; DnC keeps n - f, so at least one
_NEEDS = {"krum": (2, 3), "multi-krum": (2, 3), "bulyan": (4, 3), "dnc": (1, 1)}


def min_updates(rule: str, byzantine: int, pre_aggregation: str = "none", bucket_size: int = 2) -> int:
    """Valid updates a round needs for ``rule`` to hold against ``byzantine`` clients (0: any number).

    Krum and Multi-Krum need n >= 2f + 3, Bulyan n >= 4f + 3, DnC n >= f + 1, of the vectors the
    rule sees: after bucketing, ceil(n / s) of them, so n >= s (need - 1) + 1. NNM needs n >= f + 1.
    """
    a, b = _NEEDS.get(rule, (0, 0))
    need = a * byzantine + b
    if pre_aggregation == "nnm":
        need = max(need, byzantine + 1)
    if pre_aggregation == "bucketing" and need:
        need = bucket_size * (need - 1) + 1
    return need


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
    """The new global weights from the round's valid ``states`` under ``spec``: :func:`aggregate_round`'s first half."""
    return aggregate_round(states, counts, global_state, spec, noise_seed)[0]


def aggregate_round(
    states: Sequence[StateDict],
    counts: Sequence[int],
    global_state: StateDict,
    spec: Aggregation,
    noise_seed: int | None = None,
) -> tuple[StateDict, list[int] | None]:
    """The new global weights from the round's valid ``states`` under ``spec`` (each key keeps its dtype), and the
    indices of the states the rule admitted into them: None where the rule admits or rejects none (FedAvg, median,
    trimmed mean, centered clipping, client-level DP) or sees mixtures, not states (a pre-aggregation).

    ``counts`` are the server's sample counts (:func:`server_counts`). Clip (``spec.clip_norm``),
    pre-aggregate (``spec.pre_aggregation``), then the rule (``spec.rule``, a key of :data:`RULES`):
    a rule returns either the new weights or the updates to average, whose FedAvg weights are then
    ``cap_shares(their counts, max_client_weight)``. ``noise_seed`` is the round's seed, for the
    rules that draw at random.

    With client-level DP (``spec.noise_multiplier`` set; fedavg and ``clip_norm`` only) the result
    is :func:`dipsen.federated.privacy.private_mean` instead: clipped steps summed with weight 1
    each, divided by ``spec.sampled`` (m), plus Gaussian noise drawn from ``noise_seed``; counts
    are ignored and no update at all is allowed (the noise alone).
    """
    if spec.noise_multiplier is not None:
        from ..privacy import private_mean  # privacy imports clip_update from here

        plain = spec.rule == "fedavg" and spec.pre_aggregation == "none"
        if not plain or spec.clip_norm is None or spec.sampled is None or noise_seed is None:
            raise ValueError("client-level DP needs the fedavg rule, no pre-aggregation, clip_norm, sampled and a noise_seed")
        return private_mean(states, global_state, spec.clip_norm, spec.sampled, spec.noise_multiplier, noise_seed), None
    if not states:
        raise ValueError("aggregate needs at least one client update")
    if spec.rule not in RULES or spec.pre_aggregation not in PRE_AGGREGATIONS:
        raise ValueError(f"unknown aggregator {spec.rule!r} or pre-aggregation {spec.pre_aggregation!r}")
    need = min_updates(spec.rule, spec.byzantine, spec.pre_aggregation, spec.bucket_size)
    if len(states) < need:
        raise ValueError(f"{spec.rule} with f = {spec.byzantine} needs {need} updates, got {len(states)}")
    if spec.clip_norm is not None:
        states = [clip_update(state, global_state, spec.clip_norm) for state in states]
    updates = Updates(list(states), list(counts), global_state)
    if spec.pre_aggregation != "none":
        updates = updates.mixed(_PRE[spec.pre_aggregation](updates, spec, noise_seed))
    result = RULES[spec.rule](updates, spec, noise_seed)
    named = spec.rule in FILTERING_RULES and spec.pre_aggregation == "none"  # a mixture is no client's update
    if isinstance(result, list):
        chosen = [updates.states[i] for i in result]
        mean = fedavg(chosen, cap_shares([updates.counts[i] for i in result], spec.max_client_weight))
        restored = {key: _restore(mean[key].double(), reference) for key, reference in global_state.items()}
        return restored, result if named else None
    admitted = result.indices if isinstance(result, Admitted) and named else None
    weights = result.weights if isinstance(result, Admitted) else result
    new = unflatten(np.asarray(weights, dtype=np.float64), global_state)
    return {key: _restore(new[key], reference) for key, reference in global_state.items()}, admitted
