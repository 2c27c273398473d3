"""What every attack works from (:class:`Round`) and what the registry holds (:class:`Attack`).

An attack is a function of the round as the adversary sees it, returning the steps its malicious
clients send. Every vector here is a step ``w_k - w`` (the client's weights minus the global
weights) over the model's floating-point tensors, flattened in the global state's key order, in
float64: statistics of full weights would be dominated by ``w`` (research notes, pitfall 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..client import StateDict

KNOWLEDGE = ("full", "partial")  # the attack_knowledge choices; "own" marks the attacks that need neither


@dataclass(frozen=True)
class AttackOptions:
    """The attacks' parameters (config fields ``attack_knowledge``, ``alie_z``, ``ipm_eps``, ``minmax_perturbation``)."""

    knowledge: str = "full"  # full: the round's honest steps; partial: the malicious clients' own honest steps
    alie_z: float | None = None  # ALIE's z; None: from the paper's formula for the round's n and f
    ipm_eps: float = 0.1  # epfml's and FLPoison's default
    perturbation: str = "unit"  # Min-Max and Min-Sum: unit | sign | std
    byzantine: int = 0  # the f the server's Krum is configured with (0: the round's malicious count)
    clip_norm: float | None = None  # the server's clip bound, which backdoor-replacement's constrain-and-scale knows
    alie_alpha: float = 1.0  # alie-backdoor: the backdoor loss's weight against the pull into the honest spread; 1: no pull


@dataclass(frozen=True)
class Round:
    """One round as the adversary sees it when it crafts the malicious steps (all at once: they collude)."""

    own: Tensor  # (f, d): the honest steps of the round's malicious clients, in client order
    known: Tensor  # (k, d): the benign steps it knows: the honest clients' (full knowledge) or ``own`` (partial)
    n: int  # the round's updates that reach the aggregator, the malicious ones included
    seeds: tuple[int, ...]  # one per malicious client, for its own random draws
    global_norm: float  # ||w||: validate_update bounds a step by MAX_STEP_NORM_RATIO * max(||w||, 1)
    gamma: float  # model-replacement's boost: m, the clients per round
    options: AttackOptions

    @property
    def f(self) -> int:
        """The round's malicious clients with a usable update."""
        return len(self.own)

    def copies(self, step: Tensor) -> Tensor:
        """``step`` sent by every malicious client (the colluding attacks all send the same vector)."""
        return step.expand(self.f, -1).clone()


@dataclass(frozen=True)
class Attack:
    """One entry of :data:`~dipsen.federated.poisoning.ATTACKS`."""

    craft: Callable[[Round], Tensor] | None  # the round -> the (f, d) steps its clients send; None: as trained
    knowledge: tuple[str, ...]  # what it may see: ("own",), or the KNOWLEDGE choices it supports
    flips_labels: bool = False  # trains on flipped labels (the task says so; see flip_labels)
    claims: int | None = None  # the sample count claimed instead of the true one
    backdoor: bool = False  # trains on rows stamped with the trigger (see .backdoor), within backdoor_rounds only
    pieces: bool = False  # each client stamps its own piece of the trigger (DBA)
    pulled: bool = False  # trains after the round's honest clients, pulled into their spread (alie_alpha < 1)


def floating(state: StateDict) -> list[str]:
    """The keys of ``state``'s floating-point tensors (integer buffers are no optimizer step)."""
    return [key for key, value in state.items() if value.is_floating_point()]


def flat_step(state: StateDict, global_state: StateDict) -> Tensor:
    """``state - global_state`` over the floating-point tensors, as one float64 vector."""
    keys = floating(global_state)
    return torch.cat([(state[k].double() - global_state[k].double()).flatten() for k in keys])


def flat_norm(state: StateDict) -> float:
    """The L2 norm over ``state``'s floating-point tensors, as validate_update takes it."""
    return math.sqrt(sum(float(state[k].double().square().sum()) for k in floating(state)))


def unflatten(vector: Tensor, like: StateDict) -> StateDict:
    """A vector over ``like``'s floating-point tensors (laid out as :func:`flat_step` does) cut back into their shapes."""
    pieces, offset = {}, 0
    for key in floating(like):
        reference = like[key]
        pieces[key] = vector[offset : offset + reference.numel()].view(reference.shape)
        offset += reference.numel()
    return pieces


def apply_step(step: Tensor, global_state: StateDict, state: StateDict) -> StateDict:
    """``global_state + step`` in each tensor's dtype; the tensors without a step (integers) as ``state`` has them."""
    chunks = unflatten(step, global_state)
    return {
        key: (reference.double() + chunks[key]).to(reference.dtype) if key in chunks else state[key].clone()
        for key, reference in global_state.items()
    }
