"""Client-level differential privacy for federated averaging (DP-FedAvg), central model.

McMahan, Ramage, Talwar, Zhang 2018, "Learning differentially private recurrent language models".
The server is trusted; what is protected is each client's whole data set, against anyone who sees
the sequence of global models the run releases (its checkpoints, the deployed model).

The mechanism, one round (:func:`private_mean`). The server samples m of the K clients uniformly
WITHOUT replacement (:func:`dipsen.federated.engine.sample_clients`); each valid update's step
``Delta_k = w_k - w`` is clipped to L2 norm C; and the new global weights are

    w' = w + (1/m) * ( sum_k clip_C(Delta_k) + N(0, z^2 C^2 I) )

with a FIXED denominator m (the clients sampled, not those that answered; every client weight 1,
never its sample count) and noise multiplier z. A client that fails or is rejected contributes
the zero step, which lies in the same ball of radius C, so the bound below holds whatever drops out.

The guarantee (:func:`epsilon`). Neighbouring federations differ in ONE client's data set, replaced
by any other (replace-one; K, the population, is public). Replacing it moves the sum of clipped
steps by at most ``||clip(a) - clip(b)|| <= 2C``: the round is a Gaussian mechanism with L2
sensitivity 2C and noise std zC, an effective noise multiplier of z/2, applied to a sample of m of
the K clients without replacement. T rounds compose to (epsilon, delta)-DP for the T released models.

Accounting, with Google's ``dp_accounting`` (two conventions, checked in the tests against the exact
Gaussian curve of Balle & Wang 2018):

* RDP (``RdpAccountant(neighboring_relation=REPLACE_ONE)``, ``SampledWithoutReplacementDpEvent``:
  Wang, Balle, Kasiviswanathan 2019, Theorem 27). Its Gaussian noise multiplier is std / sensitivity
  under the relation it is given, with no doubling for REPLACE_ONE (a ``GaussianDpEvent(s)`` costs
  alpha / (2 s^2) at order alpha whatever the relation), so it gets ``z / 2``.
* PLD (``PLDAccountant(REPLACE_ONE)``): for REPLACE_ONE it doubles the shift itself (a noise
  multiplier s is a Gaussian whose two neighbours are 2/s standard deviations apart), so it gets ``z``.
  It is tight, but it supports no sampling without replacement (only a plain Gaussian and Poisson
  sampling), so it serves here only when every client takes part in every round (m = K).

:func:`accountant_for` picks PLD when m = K and RDP otherwise; the accountant used is named in the
run's outputs. The RDP bound for sampling without replacement is an upper bound and not a tight
one: at the same z and q = m/K the Poisson-sampled figures (add/remove-one, or replace-one by PLD)
are 3.6 to 22 times smaller in the cases of ``tests/federated/test_privacy.py``, but they describe
another sampler than the one this code runs.

Secret randomness (:meth:`ClientDP.sample_clients`, :meth:`ClientDP.noise_seed`). The guarantee
holds only if the adversary cannot predict the noise, and the subsampling amplification the
accountant applies only if it cannot predict the sample. Both are therefore drawn from the
operating system's CSPRNG (``secrets``), fresh each round, and never written anywhere: not to
config.json, the logs, the checkpoints, nor metrics.jsonl, which records how many clients a DP
round sampled, not which. A seed-derived draw would not do: the seed sits in config.json, and even
a hidden 32-bit derived seed can be searched exhaustively. The price is reproducibility: two DP
runs with the same config end with different weights, and a resumed DP run goes on from its last
checkpoint with fresh draws. ``client_dp_insecure_seeded_noise`` brings back seed-derived draws for
tests; the run then records ``"guarantee": "none (seeded noise)"``.

Not covered, and assumed: the run halts (resumably) when fewer than ``min_clients`` valid updates
arrive in a round (:func:`dipsen.federated.engine.train`). That decision depends on the clients'
data and is not privatised; ``min_clients = 0`` removes it, as a round of DP-FedAvg is defined for
any number of valid updates, none included. Neither is the floating-point sampling of the noise
(Mironov 2012): the Gaussian draws are IEEE doubles from torch's generator, not a discrete or
snapped mechanism.

Not covered: what the run folder records beside the models (train_loss, samples, steps and the
rejected clients in metrics.jsonl, partition.json) comes from the clients unprivatised; it is the
operator's log, not a released output.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from .aggregate import clip_update
from .client import StateDict

if TYPE_CHECKING:
    from ..config import TrainConfig

ACCOUNTANTS = ("rdp", "pld")
ACCOUNTANT_NAMES = {
    "rdp": "RDP (dp_accounting, sampling without replacement, replace-one)",
    "pld": "PLD (dp_accounting, no sampling, replace-one)",
}
# calibration searches the noise multiplier in [_Z_MIN, _Z_MAX]
_Z_MIN, _Z_MAX = 1e-4, 1e6
_PLD_LIMIT = 1e6  # past this RDP bound, epsilon returns the bound rather than run the PLD accountant


def default_delta(population: int) -> float:
    """delta = 1 / K^1.1: below 1/K, so that no mechanism that publishes one client's data wholesale meets it."""
    return float(population) ** -1.1


def private_mean(
    states: Sequence[StateDict],
    global_state: StateDict,
    clip_norm: float,
    sampled: int,
    noise_multiplier: float,
    seed: int,
) -> StateDict:
    """``w + (sum_k clip_C(w_k - w) + N(0, z^2 C^2 I)) / m``: one round of DP-FedAvg; each key keeps its dtype.

    ``states`` are the round's valid updates (at most ``sampled`` = m; none is allowed: the result is
    then the noise alone), ``global_state`` is w. Each step is clipped by
    :func:`~dipsen.federated.aggregate.clip_update`; the sum runs in float64 in the order given, and
    the noise, std ``z * C / m`` on every coordinate of every floating-point tensor, comes from a
    ``torch.Generator`` seeded with ``seed`` (drawn key by key in ``global_state``'s order), so the
    same seed gives the same noise. Non-floating-point tensors (integer counters; the models here
    have none) are no step of the optimizer and keep the global value: averaging a client-reported
    counter would publish it without noise.
    """
    if sampled < 1 or len(states) > sampled:
        raise ValueError(f"private_mean: {len(states)} updates for m = {sampled} sampled clients")
    if clip_norm <= 0 or noise_multiplier < 0:
        raise ValueError(f"private_mean needs clip_norm > 0 and noise_multiplier >= 0, got {clip_norm}, {noise_multiplier}")
    clipped = [clip_update(state, global_state, clip_norm) for state in states]
    generator = torch.Generator().manual_seed(int(seed))
    std = noise_multiplier * clip_norm / sampled
    result: StateDict = {}
    for key, reference in global_state.items():
        if not reference.is_floating_point():
            result[key] = reference.clone()
            continue
        base = reference.double()
        total = torch.zeros_like(base)
        for state in clipped:
            total += state[key] - base  # clip_update returned base + clipped step, in float64
        step = total / sampled
        if noise_multiplier > 0:
            step += std * torch.randn(base.shape, generator=generator, dtype=torch.float64)
        result[key] = (base + step).to(reference.dtype)
    return result


# --- accounting ------------------------------------------------------------------------------


def accountant_for(sampled: int, population: int) -> str:
    """``"pld"`` when every client is sampled every round (m = K: PLD is exact there), else ``"rdp"``."""
    return "pld" if sampled == population else "rdp"


def _check(rounds: int, sampled: int, population: int, delta: float, accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if not 1 <= sampled <= population or rounds < 0 or not 0 < delta < 1:
        raise ValueError(
            f"need 1 <= sampled <= population, rounds >= 0 and 0 < delta < 1, got {sampled}, {population}, {rounds}, {delta}"
        )
    if accountant == "pld" and sampled != population:
        raise ValueError("the PLD accountant supports no sampling without replacement: use rdp when sampled < population")


def _event(noise_multiplier: float, rounds: int, sampled: int, population: int, accountant: str):
    """The run as a ``dp_accounting`` event: ``rounds`` self-compositions of one round (see the module docstring)."""
    import dp_accounting

    if accountant == "pld":  # PLD under REPLACE_ONE doubles the sensitivity itself: z as it is
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    # RDP: z / 2, the std over the replace-one sensitivity 2C
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    one_round = dp_accounting.SampledWithoutReplacementDpEvent(population, sampled, gaussian)
    return dp_accounting.SelfComposedDpEvent(one_round, rounds)


def _fresh_accountant(accountant: str, value_interval: float = 1e-4):
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    if accountant == "pld":
        return PLDAccountant(NeighboringRelation.REPLACE_ONE, value_discretization_interval=value_interval)
    return RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)


@lru_cache(maxsize=1024)
def epsilon(
    noise_multiplier: float, rounds: int, sampled: int, population: int, delta: float, accountant: str | None = None
) -> float:
    """The epsilon at ``delta`` of ``rounds`` rounds of :func:`private_mean` (m = ``sampled`` of K = ``population``).

    Replace-one client-level (epsilon, delta)-DP of the released global models: see the module
    docstring. ``accountant``: ``"rdp"`` or ``"pld"`` (PLD needs m = K); default
    :func:`accountant_for`. 0 after 0 rounds; infinite without noise (z = 0).

    PLD discretizes the privacy loss in steps of ``1e-4 * max(1, epsilon_RDP)`` (its default is
    1e-4): its pessimistic rounding then adds about 1e-4 of the result at most, while the loss's
    range, and with it the time and memory, stays bounded when z is small and epsilon large (at
    the default step a z of 1 over 10 rounds takes 8 s and 0.6 GB; this way, 0.1 s). Where the RDP
    bound exceeds 1e6 that bound is returned instead (it holds all the same).
    """
    accountant = accountant or accountant_for(sampled, population)
    _check(rounds, sampled, population, delta, accountant)
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    event = _event(noise_multiplier, rounds, sampled, population, accountant)
    interval = 1e-4
    if accountant == "pld":
        bound = epsilon(noise_multiplier, rounds, sampled, population, delta, "rdp")
        if bound > _PLD_LIMIT:  # a step past e^100 overflows the PLD's arithmetic; no figure this size means anything
            return bound
        interval *= max(1.0, bound)
    return float(_fresh_accountant(accountant, interval).compose(event).get_epsilon(delta))


@lru_cache(maxsize=64)
def noise_multiplier_for(
    target_epsilon: float, rounds: int, sampled: int, population: int, delta: float, accountant: str | None = None
) -> float:
    """The smallest z (to a relative 1e-6) for which :func:`epsilon` of ``rounds`` rounds is at most ``target_epsilon``.

    epsilon(z) falls as z grows. The search brackets the root in log z (from [0.5, 2], widened by
    factors of 4, z in [1e-4, 1e6]), then runs Brent's method (scipy ``brentq``) on
    ``log epsilon(z) - log target``, and steps z up by a relative 1e-6 until the target is met.
    Not ``dp_accounting.mechanism_calibration``: its fresh accountant cannot depend on z, and the
    PLD accountant's discretization here does (see :func:`epsilon`).
    """
    from scipy.optimize import brentq

    accountant = accountant or accountant_for(sampled, population)
    _check(rounds, sampled, population, delta, accountant)
    if not target_epsilon > 0 or rounds < 1:
        raise ValueError(f"need target_epsilon > 0 and rounds >= 1, got {target_epsilon}, {rounds}")

    def gap(log_z: float) -> float:
        reached = epsilon(math.exp(log_z), rounds, sampled, population, delta, accountant)
        return math.log(max(reached, 1e-300)) - math.log(target_epsilon)

    low, high = math.log(0.5), math.log(2.0)
    while gap(low) <= 0:  # even this little noise meets the target
        if low < math.log(_Z_MIN):
            raise ValueError(f"epsilon {target_epsilon} is met with z < {_Z_MIN:g}: no noise multiplier is calibrated")
        low -= math.log(4)
    while gap(high) > 0:
        if high > math.log(_Z_MAX):
            raise ValueError(f"epsilon {target_epsilon} needs z > {_Z_MAX:g} over {rounds} rounds")
        high += math.log(4)
    z = math.exp(brentq(gap, low, high, xtol=1e-9, rtol=1e-12))
    while gap(math.log(z)) > 0:  # the safe side of the root
        z *= 1 + 1e-6
    return z


# --- a run's settings --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientDP:
    """A run's client-level DP: z, C, m, K, delta and the accountant (see :func:`client_dp`)."""

    noise_multiplier: float  # z: the noise std on the sum of clipped steps is z * C
    clip_norm: float  # C
    sampled: int  # m, the fixed denominator
    population: int  # K
    delta: float
    target_epsilon: float | None = None  # the epsilon z was calibrated to, if it was
    seeded: bool = False  # client_dp_insecure_seeded_noise: draws from the seed, no guarantee

    @property
    def accountant(self) -> str:
        return accountant_for(self.sampled, self.population)

    def sample_clients(self) -> list[int]:
        """A round's m of the K clients, uniformly without replacement, from the OS CSPRNG (sorted)."""
        return sorted(secrets.SystemRandom().sample(range(self.population), self.sampled))

    @staticmethod
    def noise_seed() -> int:
        """A round's seed for :func:`private_mean`'s generator: 64 bits from the OS CSPRNG, never stored."""
        return secrets.randbits(64)

    def _source(self) -> dict:
        if self.seeded:
            return {"noise_source": "seed", "guarantee": "none (seeded noise)"}
        return {"noise_source": "os", "guarantee": "client-level (epsilon, delta)-DP of the released models"}

    def epsilon(self, rounds: int) -> float:
        """Epsilon (at ``delta``) of the models released by rounds 1..``rounds``."""
        return epsilon(self.noise_multiplier, rounds, self.sampled, self.population, self.delta, self.accountant)

    def settings(self) -> dict:
        """The mechanism and its accounting, without a round count (what run_info.json records)."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "sampled": self.sampled,
            "population": self.population,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": ACCOUNTANT_NAMES[self.accountant],
            **self._source(),
        }

    def summary(self, rounds: int) -> dict:
        """What final_metrics.json records as ``client_dp`` after ``rounds`` rounds."""
        return {
            "epsilon": self.epsilon(rounds),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "accountant": ACCOUNTANT_NAMES[self.accountant],
            "rounds": rounds,
            "sampled": self.sampled,
            "population": self.population,
            "target_epsilon": self.target_epsilon,
            **self._source(),
        }


def client_dp(config: TrainConfig) -> ClientDP | None:
    """The run's client-level DP from its config (validated), or None without it.

    With ``client_dp_epsilon`` the noise multiplier is calibrated to it over ``config.rounds``
    rounds (:func:`noise_multiplier_for`, cached): a function of the config, so a resumed run
    keeps the same z (its draws are fresh: see the module docstring).
    """
    if config.client_dp_noise is None and config.client_dp_epsilon is None:
        return None
    if config.clip_norm is None or config.client_dp_delta is None:
        raise ValueError("client DP needs clip_norm and client_dp_delta: validate the config first")
    m, k = config.clients_per_round, config.clients
    z = config.client_dp_noise
    if z is None:
        assert config.client_dp_epsilon is not None
        z = noise_multiplier_for(config.client_dp_epsilon, config.rounds, m, k, config.client_dp_delta)
    return ClientDP(
        z, config.clip_norm, m, k, config.client_dp_delta, config.client_dp_epsilon, config.client_dp_insecure_seeded_noise
    )
