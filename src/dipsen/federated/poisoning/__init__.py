"""Simulated malicious clients: what poisoning clients send the server instead of their honest updates.

They exist to measure the robust aggregators of :mod:`dipsen.federated.aggregate`
(``dipsen train --malicious-fraction f --malicious-attack A``, ``dipsen poison-study``); nothing
here weakens a run that does not ask for them.

Which clients: :func:`malicious_count` = round(f * K) of the K clients (rounded half up), drawn once
per run by :func:`choose_malicious` from a seed of the run's own (the engine derives it from the
run seed with a key of its own), and recorded in ``run_info.json`` as ``malicious``. A malicious
client is malicious in every round it is sampled; sampling itself is unchanged, so about f * m of
each round's m clients are malicious.

Where: every malicious client first trains honestly (on poisoned rows for the attacks that say
so, flipped labels or a backdoor's trigger: the round's :class:`~dipsen.federated.workers.ClientTask`
carries the client's :class:`DataPoison` from :meth:`Adversary.data_poison` and the client runner
hands :func:`~dipsen.federated.client.client_update` the rows it makes, so the training code knows
nothing of attacks; ``alie-backdoor`` with ``alie_alpha`` < 1 trains them after the round's honest
clients, its loss pulled into their spread: :meth:`Adversary.train_round`). Once the round's outcomes
are in, the engine hands them all to :meth:`Adversary.send_round`, since the malicious clients
collude: the adversary crafts the round's malicious updates at once, from what it knows, before
:func:`~dipsen.federated.aggregate.validate_update`. The poisoned updates then take exactly the
path of everyone's (validation, :func:`~dipsen.federated.aggregate.server_counts`,
:func:`~dipsen.federated.aggregate.aggregate`). Each is sent as weights ``w + step`` in the global
model's dtypes (integer buffers as its client trained them), with its client's own sample count,
loss, step count and time, so that it passes validation (a claimed count comes with the step
count that many samples would take).

Knowledge (``attack_knowledge``): ``full`` (the default) lets the colluding attacks see the round's
honest updates, which the simulation has; ``partial`` only the malicious clients' own honest
updates. Only the updates the server will accept count. Without any (no honest update in the
round under full knowledge), the malicious clients send their honest updates.

The attacks (:data:`ATTACKS`, in four families), with each one's knowledge:

- :mod:`.naive`, a transform of the client's own update (knows nothing else): ``label-flip``,
  ``sign-flip``, ``gaussian``, ``scaled-count``, ``model-replacement``.
- :mod:`.statistical`, one vector from the benign steps' statistics: ``alie`` (full or partial),
  ``ipm`` (full or partial), ``min-max`` and ``min-sum`` (full or partial), ``mimic`` (full).
- :mod:`.full_knowledge`, Fang et al. 2020: ``fang-krum`` and ``fang-trim``, and Cao et al. 2021's
  ``fltrust-adaptive`` (each full or partial).
- :mod:`.backdoor`, targeted (:data:`BACKDOOR_ATTACKS`, judged by their attack success rate, in
  ``backdoor_rounds`` only): ``backdoor-data``, ``backdoor-replacement``, ``dba`` (each knows its
  own data; backdoor-replacement also m and the server's clip bound) and ``alie-backdoor`` (full:
  the round's honest steps, to stay within their spread).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..aggregate import validate_report, validate_update
from ..client import ClientUpdate, LocalTraining, StateDict
from . import backdoor, full_knowledge, naive, statistical
from .backdoor import POSITIONS, DataPoison, FlowTrigger, Trigger, flip_labels
from .base import KNOWLEDGE, Attack, AttackOptions, Round, apply_step, flat_norm, flat_step
from .naive import BOUND_MARGIN, CLAIMED_SAMPLES, GAUSSIAN_RMS_FACTOR, SIGN_FLIP_SCALE, replacement_boost
from .statistical import PERTURBATIONS, alie_z, chosen_z

if TYPE_CHECKING:
    from ...config import TrainConfig
    from ..workers import ClientFailure, ClientTask  # workers imports DataPoison from here

__all__ = [
    "ATTACKS",
    "BACKDOOR_ATTACKS",
    "BOUND_MARGIN",
    "CLAIMED_SAMPLES",
    "GAUSSIAN_RMS_FACTOR",
    "KNOWLEDGE",
    "LABEL_FLIP",
    "NAIVE_ATTACKS",
    "PERTURBATIONS",
    "POSITIONS",
    "SIGN_FLIP_SCALE",
    "Adversary",
    "Attack",
    "AttackOptions",
    "DataPoison",
    "FlowTrigger",
    "Trigger",
    "Round",
    "adversary",
    "alie_z",
    "choose_malicious",
    "flip_labels",
    "malicious_count",
    "replacement_boost",
]

_OWN, _BOTH = ("own",), KNOWLEDGE
# name -> attack; the naive ones first. craft None: the update is sent as trained
ATTACKS: dict[str, Attack] = {
    "model-replacement": Attack(naive.model_replacement, _OWN, flips_labels=True, claims=CLAIMED_SAMPLES),
    "sign-flip": Attack(naive.sign_flip, _OWN),
    "gaussian": Attack(naive.gaussian, _OWN),
    "label-flip": Attack(None, _OWN, flips_labels=True),
    "scaled-count": Attack(None, _OWN, claims=CLAIMED_SAMPLES),
    "alie": Attack(statistical.alie, _BOTH),
    "ipm": Attack(statistical.ipm, _BOTH),
    "min-max": Attack(statistical.min_max, _BOTH),
    "min-sum": Attack(statistical.min_sum, _BOTH),
    "mimic": Attack(statistical.mimic, ("full",)),
    "fang-krum": Attack(full_knowledge.fang_krum, _BOTH),
    "fang-trim": Attack(full_knowledge.fang_trim, _BOTH),
    "fltrust-adaptive": Attack(full_knowledge.fltrust_adaptive, _BOTH),
    "backdoor-data": Attack(None, _OWN, backdoor=True),
    "backdoor-replacement": Attack(backdoor.backdoor_replacement, _OWN, backdoor=True),
    "dba": Attack(None, _OWN, backdoor=True, pieces=True),
    "alie-backdoor": Attack(backdoor.alie_backdoor, ("full",), backdoor=True, pulled=True),
}
BACKDOOR_ATTACKS = tuple(name for name, attack in ATTACKS.items() if attack.backdoor)  # targeted: judged by ASR
# the naive untargeted family (each a transform of its client's own update): what the robust rules were designed against
NAIVE_ATTACKS = tuple(name for name, attack in ATTACKS.items() if attack.knowledge == _OWN and not attack.backdoor)
LABEL_FLIP = DataPoison(flip=True)


def malicious_count(clients: int, fraction: float) -> int:
    """round(fraction * clients), half up, computed on the fraction as written (as ``clients_per_round`` is)."""
    return math.floor(Fraction(repr(fraction)) * clients + Fraction(1, 2))


def choose_malicious(clients: int, fraction: float, seed: int) -> list[int]:
    """The malicious clients: :func:`malicious_count` of the ``clients``, drawn from ``seed``, sorted."""
    count = malicious_count(clients, fraction)
    if count == 0:
        return []
    return sorted(np.random.default_rng(seed).choice(clients, size=count, replace=False).tolist())


def claim_samples(update: ClientUpdate, samples: int, training: LocalTraining) -> ClientUpdate:
    """``update`` claiming ``samples`` samples, with the step count that many would take (a consistent lie)."""
    return dataclasses.replace(update, num_samples=samples, steps=training.steps_for(samples))


@dataclass(frozen=True)
class Adversary:
    """The run's malicious clients and their attack (``malicious_fraction``, ``malicious_attack`` and its options)."""

    attack: str  # a key of ATTACKS
    fraction: float  # f: round(f * K) of the K clients are malicious
    clients: frozenset[int]
    gamma: float  # model-replacement's boost before the cap: m, the clients per round
    options: AttackOptions = field(default_factory=AttackOptions)
    backdoor: DataPoison | None = None  # the backdoors' trigger, target and poison rate
    window: tuple[int, int] | None = None  # the backdoors' rounds (first, last); None: every round

    def describe(self) -> dict:
        """What run_info.json records as ``malicious`` (the attack's options are in config.json)."""
        return {"attack": self.attack, "fraction": self.fraction, "clients": sorted(self.clients)}

    def active(self, round_: int) -> bool:
        """Whether the malicious clients attack in ``round_`` (a backdoor outside its window sends honest updates)."""
        return self.window is None or self.window[0] <= round_ <= self.window[1]

    def data_poison(self, client: int, round_: int) -> DataPoison | None:
        """What ``client`` does to its training rows in ``round_``: None for an honest client (or round)."""
        attack = ATTACKS[self.attack]
        if client not in self.clients or not self.active(round_):
            return None
        if attack.flips_labels:
            return LABEL_FLIP
        if attack.backdoor and self.backdoor is not None and self.backdoor.trigger is not None:
            if attack.pieces:  # DBA: the i-th malicious client in id order stamps piece i
                piece = self.backdoor.trigger.piece(sorted(self.clients).index(client))
                return dataclasses.replace(self.backdoor, trigger=piece)
            return self.backdoor
        return None

    def pulls(self, round_: int) -> bool:
        """Whether the malicious clients train after the honest ones in ``round_``, pulled into their spread."""
        return ATTACKS[self.attack].pulled and self.options.alie_alpha < 1 and self.active(round_)

    def train_round(
        self,
        run: Callable[[StateDict, list[ClientTask]], list[ClientUpdate | ClientFailure]],
        global_state: StateDict,
        tasks: Sequence[ClientTask],
        training: LocalTraining,
    ) -> list[ClientUpdate | ClientFailure]:
        """The outcomes of the round's ``tasks``, trained by ``run`` (the engine's clients).

        Where the attack is pulled (:meth:`pulls`; the caller checks the round), the honest clients
        train first; the malicious clients then train with their :class:`DataPoison`'s anchor set
        to :func:`~.backdoor.spread_anchor` of the honest steps the server will accept (full
        knowledge), z for the round's n = len(tasks) and f its malicious clients. Every honest
        client's update is the one it computes in a single pass: each is a function of its own seed.
        """
        malicious = [i for i, task in enumerate(tasks) if task.client in self.clients]
        if not malicious:
            return run(global_state, list(tasks))
        honest = [i for i in range(len(tasks)) if i not in set(malicious)]
        outcomes: list[ClientUpdate | ClientFailure | None] = [None] * len(tasks)
        for i, outcome in zip(honest, run(global_state, [tasks[i] for i in honest]), strict=True):
            outcomes[i] = outcome
        known = [flat_step(o.state, global_state) for o in _usable(outcomes, global_state, training).values()]
        pulled = [tasks[i] for i in malicious]
        if known:  # else nothing to pull towards: they train as backdoor-data's clients do
            z = chosen_z(self.options.alie_z, len(tasks), len(malicious))
            anchor = backdoor.spread_anchor(torch.stack(known), global_state, z, self.options.alie_alpha)
            assert self.backdoor is not None  # a backdoor attack's adversary has its DataPoison
            anchored = dataclasses.replace(self.backdoor, anchor=anchor)
            pulled = [t._replace(poison=anchored) for t in pulled]
        for i, outcome in zip(malicious, run(global_state, pulled), strict=True):
            outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]  # every slot filled

    def send(
        self, client: int, update: ClientUpdate, global_state: StateDict, training: LocalTraining, seed: int, round_: int = 1
    ) -> ClientUpdate:
        """What ``client`` sends after computing ``update``, alone in its round (:meth:`send_round` of one client)."""
        sent = self.send_round([client], [update], global_state, training, [seed], round_)[0]
        assert isinstance(sent, ClientUpdate)  # an update in, an update out
        return sent

    def send_round(
        self,
        clients: Sequence[int],
        outcomes: Sequence[ClientUpdate | ClientFailure],
        global_state: StateDict,
        training: LocalTraining,
        seeds: Sequence[int],
        round_: int = 1,
    ) -> list[ClientUpdate | ClientFailure]:
        """What the round's ``clients`` send, given what they computed (``outcomes``) from ``global_state``.

        Honest clients' outcomes pass unchanged (the same objects), and so does what the server
        would reject anyway (a failure, a malformed update or report). The malicious clients'
        usable updates are replaced by what the attack crafts from the round (:class:`Round`);
        ``seeds[i]`` seeds client i's own draws; ``training`` gives the step count of a claimed
        sample count. A backdoor that trained longer (``poison_epochs``) reports the step count of the
        run's epochs, which the server cannot check.
        """
        attack = ATTACKS[self.attack]
        if not self.active(round_):
            return list(outcomes)
        if self.backdoor is not None and self.backdoor.epochs is not None:  # trained longer, reports an honest count
            outcomes = [
                dataclasses.replace(o, steps=training.steps_for(o.num_samples))
                if isinstance(o, ClientUpdate) and c in self.clients
                else o
                for c, o in zip(clients, outcomes, strict=True)
            ]
        usable = _usable(outcomes, global_state, training)
        malicious = [i for i in usable if clients[i] in self.clients]
        honest = [i for i in usable if clients[i] not in self.clients]
        sent = list(outcomes)
        if not malicious:
            return sent
        steps = {}
        if attack.craft is not None:
            own = torch.stack([flat_step(usable[i].state, global_state) for i in malicious])
            known = own
            if "own" not in attack.knowledge and self.options.knowledge == "full":
                if not honest:
                    return sent  # nothing to build on: the malicious clients send their honest updates
                known = torch.stack([flat_step(usable[i].state, global_state) for i in honest])
            draws = tuple(seeds[i] for i in malicious)
            view = Round(own, known, len(usable), draws, flat_norm(global_state), self.gamma, self.options)
            steps = dict(zip(malicious, attack.craft(view), strict=True))
        for i in malicious:
            update = usable[i]
            if i in steps:
                update = dataclasses.replace(update, state=apply_step(steps[i], global_state, update.state))
            if attack.claims is not None:
                update = claim_samples(update, attack.claims, training)
            sent[i] = update
        return sent


def _usable(
    outcomes: Sequence[ClientUpdate | ClientFailure | None], global_state: StateDict, training: LocalTraining
) -> dict[int, ClientUpdate]:
    """The updates among ``outcomes`` (by position) that the server will accept (validate_update and validate_report)."""
    return {
        i: o
        for i, o in enumerate(outcomes)
        if isinstance(o, ClientUpdate)
        and validate_update(o.state, global_state, o.num_samples) is None
        and validate_report(o, training) is None
    }


def adversary(config: TrainConfig, seed: int, trigger: Trigger | FlowTrigger | None = None) -> Adversary | None:
    """The run's :class:`Adversary`, its clients drawn from ``seed``; None without malicious clients.

    ``trigger``: a backdoor's (:func:`~.backdoor.backdoor_trigger`, which needs the data set);
    None: the pixel square of ``trigger_size`` at ``trigger_position``.
    """
    if not config.malicious_fraction or config.malicious_attack is None:
        return None
    clients = choose_malicious(config.clients, config.malicious_fraction, seed)
    options = AttackOptions(
        config.attack_knowledge,
        config.alie_z,
        config.ipm_eps,
        config.minmax_perturbation,
        config.byzantine,
        config.clip_norm,
        config.alie_alpha,
    )
    gamma = float(config.clients_per_round)
    poison = None
    if ATTACKS[config.malicious_attack].backdoor:
        trigger = trigger or Trigger(config.trigger_size, config.trigger_position)
        poison = DataPoison(trigger=trigger, target=config.backdoor_target, rate=config.poison_rate, epochs=config.poison_epochs)
    window = config.backdoor_window
    return Adversary(config.malicious_attack, config.malicious_fraction, frozenset(clients), gamma, options, poison, window)
