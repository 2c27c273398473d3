"""Simulated malicious clients: what a poisoning client sends the server instead of its honest update.

They exist to measure the robust aggregators of :mod:`dipsen.federated.aggregate`
(``dipsen train --malicious-fraction f --malicious-attack A``, ``dipsen poison-study``); nothing
here weakens a run that does not ask for them.

Which clients: :func:`malicious_count` = round(f * K) of the K clients (rounded half up), drawn once
per run by :func:`choose_malicious` from a seed of the run's own (the engine derives it from the
run seed with a key of its own), and recorded in ``run_info.json`` as ``malicious``. A malicious
client is malicious in every round it is sampled; sampling itself is unchanged, so about f * m of
each round's m clients are malicious.

Where: every attack but the training on flipped labels is a transform of the update the client
computed honestly, applied by the engine (:meth:`Adversary.send`) after the client's local
training and before :func:`~dipsen.federated.aggregate.validate_update`: the poisoned update then
takes exactly the path of everyone's (validation, :func:`~dipsen.federated.aggregate.server_counts`,
:func:`~dipsen.federated.aggregate.aggregate`), and the same transform would serve a Flower client.
Label flipping has to happen in training: the round's :class:`~dipsen.federated.workers.ClientTask`
says so (``flip_labels``) and the client runner (worker process or this process) hands
:func:`~dipsen.federated.client.client_update` the flipped labels (:func:`flip_labels`), so the
training code itself knows nothing of attacks.

The attacks (:data:`ATTACKS`), with w the global weights and w_k the client's honest result:

- ``label-flip`` (Tolpegin et al. 2020, "Data poisoning attacks against federated learning
  systems", ESORICS): honest training on its own rows with every label y replaced by
  C - 1 - y (C classes); the update is sent as it comes out.
- ``sign-flip`` (the sign-flipping attack of Li et al. 2019, "RSA: Byzantine-robust stochastic
  aggregation methods for distributed learning from heterogeneous datasets", AAAI, whose
  Byzantine workers send -4 times their true message): sends w - s (w_k - w), s =
  :data:`SIGN_FLIP_SCALE` = 4.
- ``gaussian`` (the Gaussian Byzantine workers of Blanchard et al. 2017, "Machine learning with
  adversaries: Byzantine tolerant gradient descent", NeurIPS; a baseline in Fang et al. 2020):
  sends w + N(0, sd^2) per coordinate, sd = :data:`GAUSSIAN_RMS_FACTOR` (10) times the RMS of
  the client's honest step, drawn from a seed of its own (round and client).
- ``scaled-count``: the honest update with a claimed sample count of :data:`CLAIMED_SAMPLES`
  (10^12), the lie FedAvg's weights ``n_k`` invite (its step count claimed to match, so the
  report passes :func:`~dipsen.federated.aggregate.validate_report`); the server caps the
  count at the client's partition (:func:`~dipsen.federated.aggregate.server_counts`).
- ``model-replacement`` (Bagdasaryan et al. 2020, "How to backdoor federated learning",
  AISTATS): trains on flipped labels as ``label-flip`` does (an untargeted stand-in for their
  backdoor model X), then sends L = G + gamma (X - G) with gamma = n / eta = m (the clients per
  round; eta = 1 for FedAvg), which replaces the FedAvg mean of m equally weighted updates by
  X, and claims :data:`CLAIMED_SAMPLES` samples as well. An attacker whose update the server
  drops gains nothing, so gamma is capped (:func:`replacement_boost`) to keep the boosted step
  within :func:`~dipsen.federated.aggregate.validate_update`'s bound,
  ``MAX_STEP_NORM_RATIO * max(||G||, 1)``, with :data:`BOUND_MARGIN` to spare. At the scales
  used here the cap does not bind: from the initial MNIST models, one local epoch of Adam at lr
  0.001 on 300 flipped rows moves them by 0.11% (DiPSeN) to 0.28% (CNN) of the bound per unit of
  gamma, three epochs by 0.20%, so gamma = m = 20 uses 2-6% of it and the step sent is the full
  m times the flipped-label step (``tests/federated/test_poisoning.py`` checks it passes).

Integer buffers (counters) are no optimizer step: every attack sends them as trained.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .aggregate import MAX_STEP_NORM_RATIO, validate_update
from .client import ClientUpdate, LocalTraining, StateDict

if TYPE_CHECKING:
    from ..config import TrainConfig

ATTACKS = ("model-replacement", "sign-flip", "gaussian", "label-flip", "scaled-count")
LABEL_FLIPPING = ("label-flip", "model-replacement")  # the attacks that train on flipped labels

# sign-flip: the reversed honest step, scaled by 4 as in Li et al. 2019 (RSA): reversing alone (s = 1)
# would only cancel one honest client in FedAvg; 4 outweighs several
SIGN_FLIP_SCALE = 4.0
# gaussian: the noise's std per coordinate, in units of the RMS of the client's honest step
GAUSSIAN_RMS_FACTOR = 10.0
# scaled-count and model-replacement: the sample count claimed (FedAvg would weigh the update ~1)
CLAIMED_SAMPLES = 10**12
# model-replacement: the boosted step is kept below this share of validate_update's bound
BOUND_MARGIN = 0.99


def malicious_count(clients: int, fraction: float) -> int:
    """round(fraction * clients), half up, computed on the fraction as written (as ``clients_per_round`` is)."""
    return math.floor(Fraction(repr(fraction)) * clients + Fraction(1, 2))


def choose_malicious(clients: int, fraction: float, seed: int) -> list[int]:
    """The malicious clients: :func:`malicious_count` of the ``clients``, drawn from ``seed``, sorted."""
    count = malicious_count(clients, fraction)
    if count == 0:
        return []
    return sorted(np.random.default_rng(seed).choice(clients, size=count, replace=False).tolist())


def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    """Every label y replaced by ``num_classes - 1 - y`` (label-flip, model-replacement)."""
    return (num_classes - 1) - y


def _floating(state: StateDict) -> list[str]:
    return [key for key, value in state.items() if value.is_floating_point()]


def _steps(state: StateDict, global_state: StateDict) -> dict[str, Tensor]:
    """``state - global_state`` in float64, for the floating-point tensors."""
    return {key: state[key].double() - global_state[key].double() for key in _floating(global_state)}


def _norm(tensors: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.square().sum()) for t in tensors.values()))


def _send(state: StateDict, global_state: StateDict, steps: dict[str, Tensor]) -> StateDict:
    """``global_state + steps`` in each tensor's dtype; tensors without a step are sent as ``state`` has them."""
    return {
        key: (global_state[key].double() + steps[key]).to(global_state[key].dtype) if key in steps else state[key].clone()
        for key in state
    }


def scaled_step(state: StateDict, global_state: StateDict, scale: float) -> StateDict:
    """``w + scale (w_k - w)``: sign-flip (scale -4), model-replacement (scale gamma)."""
    return _send(state, global_state, {key: scale * step for key, step in _steps(state, global_state).items()})


def gaussian_state(state: StateDict, global_state: StateDict, seed: int) -> StateDict:
    """``w + N(0, sd^2)`` per coordinate, sd = :data:`GAUSSIAN_RMS_FACTOR` x the RMS of the step ``w_k - w``."""
    steps = _steps(state, global_state)
    coordinates = sum(step.numel() for step in steps.values())
    sd = GAUSSIAN_RMS_FACTOR * _norm(steps) / math.sqrt(max(coordinates, 1))
    generator = torch.Generator().manual_seed(seed)
    noise = {key: sd * torch.randn(step.shape, generator=generator, dtype=torch.float64) for key, step in steps.items()}
    return _send(state, global_state, noise)


def replacement_boost(state: StateDict, global_state: StateDict, gamma: float) -> float:
    """Model-replacement's factor: ``gamma``, or less if the boosted step would exceed validate_update's bound.

    The bound is ``MAX_STEP_NORM_RATIO * max(||global_state||, 1)``; the factor is capped at
    :data:`BOUND_MARGIN` of it, since an update the server drops replaces nothing.
    """
    step = _norm(_steps(state, global_state))
    reference = {key: global_state[key].double() for key in _floating(global_state)}
    bound = MAX_STEP_NORM_RATIO * max(_norm(reference), 1.0)
    if step == 0 or gamma * step <= BOUND_MARGIN * bound:
        return gamma
    return BOUND_MARGIN * bound / step


def claim_samples(update: ClientUpdate, samples: int, training: LocalTraining) -> ClientUpdate:
    """``update`` claiming ``samples`` samples, with the step count that many would take (a consistent lie)."""
    steps = training.steps_for(samples)
    return dataclasses.replace(update, num_samples=samples, steps=steps)


@dataclass(frozen=True)
class Adversary:
    """The run's malicious clients and their attack (``malicious_fraction`` and ``malicious_attack``)."""

    attack: str  # one of ATTACKS
    fraction: float  # f: round(f * K) of the K clients are malicious
    clients: frozenset[int]
    gamma: float  # model-replacement's boost before the cap: m, the clients per round

    def describe(self) -> dict:
        """What run_info.json records as ``malicious``."""
        return {"attack": self.attack, "fraction": self.fraction, "clients": sorted(self.clients)}

    def flips_labels(self, client: int) -> bool:
        """Whether ``client`` trains on flipped labels this run."""
        return client in self.clients and self.attack in LABEL_FLIPPING

    def send(
        self, client: int, update: ClientUpdate, global_state: StateDict, training: LocalTraining, seed: int
    ) -> ClientUpdate:
        """What ``client`` sends after computing ``update`` from ``global_state``: ``update`` itself if it is honest.

        ``seed`` seeds the attack's own draws (gaussian); ``training`` gives the step count that
        goes with a claimed sample count. An update the server would reject anyway (a failed
        client's, a malformed one) is passed on as it is, for the server to reject.
        """
        if client not in self.clients or validate_update(update.state, global_state, update.num_samples) is not None:
            return update
        state = update.state
        if self.attack == "sign-flip":
            return dataclasses.replace(update, state=scaled_step(state, global_state, -SIGN_FLIP_SCALE))
        if self.attack == "gaussian":
            return dataclasses.replace(update, state=gaussian_state(state, global_state, seed))
        if self.attack == "scaled-count":
            return claim_samples(update, CLAIMED_SAMPLES, training)
        if self.attack == "model-replacement":
            boost = replacement_boost(state, global_state, self.gamma)
            boosted = dataclasses.replace(update, state=scaled_step(state, global_state, boost))
            return claim_samples(boosted, CLAIMED_SAMPLES, training)
        return update  # label-flip: the poison is in the training data


def adversary(config: TrainConfig, seed: int) -> Adversary | None:
    """The run's :class:`Adversary`, its clients drawn from ``seed``; None without malicious clients."""
    if not config.malicious_fraction or config.malicious_attack is None:
        return None
    clients = choose_malicious(config.clients, config.malicious_fraction, seed)
    return Adversary(config.malicious_attack, config.malicious_fraction, frozenset(clients), float(config.clients_per_round))
