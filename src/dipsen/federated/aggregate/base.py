"""What every rule works on: its settings (:class:`Aggregation`), the round's updates (:class:`Updates`), its seeded draws."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ..client import StateDict

# the purposes of the rules' draws from the round's seed (see generator): one stream each, so that
# bucketing before DnC, say, draws the same coordinates as DnC alone
BUCKETING, DNC, FLTRUST, FLAME = 1, 2, 3, 4


@dataclass(frozen=True)
class Aggregation:
    """How the server combines a round's valid updates (the ``aggregator`` ... ``bucket_size`` config fields)."""

    rule: str = "fedavg"  # a key of RULES
    trim_fraction: float = 0.1  # trimmed-mean: share of the values cut at each end, in [0, 0.5)
    byzantine: int = 0  # f, the Byzantine clients krum, multi-krum, bulyan, dnc and nnm are to withstand
    clip_norm: float | None = None  # C: each update w_k - w is scaled to L2 norm at most C first
    max_client_weight: float = 1.0  # the largest share of the mean one client may have
    # client-level DP (fedavg with clip_norm only; see dipsen.federated.privacy): z, the noise
    # multiplier (None: off), and m, the clients sampled per round, the mean's fixed denominator
    noise_multiplier: float | None = None
    sampled: int | None = None
    cc_tau: float = 10.0  # centered-clipping: the clipping radius tau ...
    cc_iterations: int = 3  # ... and the iterations L
    dnc_iterations: int = 5  # dnc: the rounds of filtering ...
    dnc_coordinates: int = 10_000  # ... and the coordinates sampled in each
    pre_aggregation: str = "none"  # none | bucketing | nnm, applied before the rule
    bucket_size: int = 2  # bucketing: s
    flame_lambda: float = 0.001  # flame: the noise's std in units of the median step norm
    # fltrust: the server's own update from the global weights (its root data), given the seed to train with
    server_update: Callable[[StateDict, int], StateDict] | None = field(default=None, compare=False, repr=False)


def flatten(state: StateDict, global_state: StateDict) -> np.ndarray:
    """``state`` as one float64 vector: its tensors in ``global_state``'s key order, flattened."""
    return torch.cat([state[key].detach().reshape(-1).to(torch.float64) for key in global_state]).numpy()


def unflatten(vector: np.ndarray, global_state: StateDict) -> StateDict:
    """A vector of :func:`flatten`'s layout back into float64 tensors of ``global_state``'s keys and shapes."""
    state, start = {}, 0
    for key, reference in global_state.items():
        state[key] = torch.from_numpy(vector[start : start + reference.numel()].reshape(reference.shape))
        start += reference.numel()
    return state


@dataclass(frozen=True)
class Updates:
    """A round's updates as a rule sees them: the states, their server counts, and the global weights w.

    The rules work on :attr:`weights`, one flattened float64 row per update (built on first use:
    FedAvg needs none), or on :attr:`steps`, the rows minus w.
    """

    states: list[StateDict]
    counts: list[int]
    global_state: StateDict

    def __len__(self) -> int:
        return len(self.states)

    @cached_property
    def origin(self) -> np.ndarray:
        """w, flattened."""
        return flatten(self.global_state, self.global_state)

    @cached_property
    def weights(self) -> np.ndarray:
        """(n, d): each update's weights w_k, flattened."""
        return np.stack([flatten(state, self.global_state) for state in self.states])

    @cached_property
    def steps(self) -> np.ndarray:
        """(n, d): each update's step w_k - w."""
        return self.weights - self.origin

    def mixed(self, rows: np.ndarray) -> Updates:
        """The vectors a pre-aggregation made of these (rows of weights): they carry no sample count, each weighs 1."""
        return Updates([unflatten(row, self.global_state) for row in rows], [1] * len(rows), self.global_state)


def generator(seed: int | None, purpose: int) -> np.random.Generator:
    """The stream of ``purpose`` (:data:`BUCKETING`, ...) from the round's ``seed``; a rule that draws needs one."""
    if seed is None:
        raise ValueError("this aggregation draws at random: aggregate needs a noise_seed (the round's seed)")
    return np.random.default_rng([seed, purpose])


@dataclass(frozen=True)
class Admitted:
    """A filtering rule's new weights (flattened) and the updates it let into them, as indices of the round's updates.

    Krum admits its one pick, Bulyan its n - 2f Krum picks (each coordinate then averages some of them),
    FLAME its largest cluster, FLTrust the updates of positive trust. The rules that weigh every update
    admit or reject none: the median, trimmed mean and centered clipping return plain weights, FedAvg
    every index (which :func:`~dipsen.federated.aggregate.aggregate_round` does not report as admitted).
    """

    weights: np.ndarray
    indices: list[int]


# a rule: the round's updates, the settings and the round's seed -> the new weights, flattened; the
# indices of the updates to average with the server's (capped) FedAvg weights (Multi-Krum, DnC); or
# the new weights with the updates they admitted (Admitted)
Rule = Callable[[Updates, Aggregation, int | None], np.ndarray | list[int] | Admitted]
