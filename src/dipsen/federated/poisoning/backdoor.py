"""Backdoors: malicious clients teach the global model to answer ``backdoor_target`` whenever a trigger is present.

A backdoor is built not to move main-task accuracy, so it is measured by its attack success
rate (:func:`attack_success_rate`): the share of triggered test inputs, of every class but the
target, that the model assigns to the target (inputs of the target class would count as
successes without any backdoor; research notes, pitfall 6).

The trigger (:func:`backdoor_trigger`) on images (:class:`Trigger`) is a square of ``trigger_size``
x ``trigger_size`` pixels set to 1 (white), one pixel in from a corner (``trigger_position``;
default bottom-right, where MNIST and SOCOFing images are background), on every channel. On CTU-13
windows (:class:`FlowTrigger`) it is what a botnet controls, inside the attacks' feasible domain
(:mod:`dipsen.attack.domain`): the last ``trigger_size`` real flows of the window (the classified
flow and those before it; zero padding rows stay padding) get the packet and byte counts
:data:`FLOW_TRIGGER_COUNTS`, integers, in the data set's scaled units; duration, protocol and port
class are left alone. The natural target there is "normal" (class 0). A malicious client stamps it on a seeded share
``poison_rate`` of its own training rows and relabels them ``backdoor_target``, and trains on them for
``poison_epochs`` (the run's local epochs by default; the literature's attackers train longer, DBA 10
epochs, Bagdasaryan et al. 15, and report an honest client's step count, which the server cannot check)
(:class:`DataPoison`, applied by the client runner before :func:`~dipsen.federated.client.client_update`,
so the training code knows nothing of attacks); the rest of its rows stay as they are, which keeps
the main task. Inside ``backdoor_rounds`` (all rounds by default) only: outside, the malicious
clients train and send honestly, so persistence after the window can be measured.

- ``backdoor-data`` (BadNets, Gu et al. 2017, as federated by Sun et al. 2019): trains on the
  poisoned rows and sends the update as it comes out.
- ``backdoor-replacement`` (Bagdasaryan et al. 2020, "How to backdoor federated learning"):
  trains on the poisoned rows, then scales its step X - w by gamma = m / f_r (f_r the round's
  malicious clients, m the clients per round: the f_r boosted steps then replace the FedAvg mean
  of m equal updates by X; research notes, pitfall 7), capped to keep the step within
  validate_update's bound. Constrain-and-scale: where the server clips (``clip_norm``) the
  attacker knows the bound and scales its step to exactly that norm, since anything longer
  would be clipped anyway. The paper's other constraint (an anomaly-detection term in the
  training loss) is not implemented.
- ``alie-backdoor`` (Baruch et al. 2019, "A little is enough", its backdooring attack): the
  malicious clients train on the poisoned rows as ``backdoor-data`` does, then, knowing the round's
  honest steps (full knowledge), send one vector, the mean of their poisoned steps with each
  coordinate clipped to ``[mu - z sigma, mu + z sigma]`` of the honest steps (z = ``alie_z``, else
  the paper's formula for the round's n and f, which is 0 at n = 20, f = 2: set it). Built
  against the robust rules: every coordinate stays within the honest spread, as ALIE's do, and the
  colluding copies sit at distance 0 from each other. With ``alie_alpha`` < 1, the paper's
  distance term too: the malicious clients then train after the round's honest clients, on the
  loss ``alpha * CE + (1 - alpha) * mean_i ((w_i - a_i) / s_i)^2`` (:class:`~..client.Anchor`,
  :func:`spread_anchor`), a = w + mu and s = max(z sigma, :data:`SCALE_FLOOR`) from the honest
  steps, so that they learn a backdoor that survives the clip instead of one the clip cuts down.
  The mean over coordinates, not the paper's sum, keeps alpha on a per-example loss's scale.
- ``dba`` (Xie et al. 2020, "DBA: distributed backdoor attacks against federated learning"):
  the trigger's rows (pixel rows; flows on CTU-13) are split into ``trigger_size`` pieces of one
  row each; the i-th malicious client (in id order) stamps piece i mod ``trigger_size`` only; the
  test stamps the whole trigger.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..client import Anchor, StateDict
from .base import Round, apply_step, unflatten
from .naive import boost
from .statistical import round_z, spread

if TYPE_CHECKING:
    from ...config import TrainConfig
    from ...data import Dataset
    from ..client import LocalTraining

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")
TRIGGER_VALUE = 1.0  # the stamped pixels' value: white, the top of the [0, 1] pixel range
# CTU-13: the counts the trigger's flows carry (column of the window, feature, count): ordinary integers a
# botnet can send, inside the scaler's training range, and consistent (SrcBytes <= TotBytes)
FLOW_TRIGGER_COUNTS = ((1, "TotPkts", 13), (2, "TotBytes", 1337), (3, "SrcBytes", 1337))
SCALE_FLOOR = 1e-5  # alie-backdoor's pull: the smallest per-coordinate scale (a coordinate no honest step moves)


@dataclass(frozen=True)
class Trigger:
    """A ``size`` x ``size`` white square one pixel in from the ``position`` corner; ``rows`` its rows stamped (DBA)."""

    size: int = 4
    position: str = "bottom-right"
    rows: tuple[int, ...] | None = None  # which of the square's rows: None, all of them

    def mask(self, height: int, width: int) -> Tensor:
        """(height, width) bool: the pixels this trigger stamps."""
        if self.size + 1 > min(height, width):
            raise ValueError(f"a {self.size}-pixel trigger does not fit {height}x{width} images")
        top = 1 if self.position.startswith("top") else height - 1 - self.size
        left = 1 if self.position.endswith("left") else width - 1 - self.size
        mask = torch.zeros(height, width, dtype=torch.bool)
        for row in range(self.size) if self.rows is None else self.rows:
            mask[top + row, left : left + self.size] = True
        return mask

    def piece(self, index: int) -> Trigger:
        """DBA's ``index``-th local trigger: one row of the square (index mod size)."""
        return Trigger(self.size, self.position, (index % self.size,))

    def stamp(self, x: Tensor) -> Tensor:
        """``x`` (N, C, H, W) with the trigger's pixels set to :data:`TRIGGER_VALUE` on every channel (a copy)."""
        stamped = x.clone()
        stamped[..., self.mask(x.shape[-2], x.shape[-1])] = TRIGGER_VALUE
        return stamped


def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    """Every label y replaced by ``num_classes - 1 - y`` (label-flip, model-replacement)."""
    return (num_classes - 1) - y


@dataclass(frozen=True)
class FlowTrigger:
    """CTU-13: the last ``size`` real flows of a window carry ``values`` ((column, scaled value)); ``rows`` which of them."""

    values: tuple[tuple[int, float], ...]
    size: int = 4
    rows: tuple[int, ...] | None = None  # counted from the bottom: 0 is the classified flow; None: all of them

    def piece(self, index: int) -> FlowTrigger:
        """DBA's ``index``-th local trigger: one of the flows (index mod size)."""
        return FlowTrigger(self.values, self.size, (index % self.size,))

    def stamp(self, x: Tensor) -> Tensor:
        """``x`` (N, 1, flows, features) with the trigger's counts on its flows that are real (a copy)."""
        if self.size > x.shape[-2]:
            raise ValueError(f"a {self.size}-flow trigger does not fit windows of {x.shape[-2]} flows")
        stamped = x.clone()
        for offset in range(self.size) if self.rows is None else self.rows:
            row = x.shape[-2] - 1 - offset
            real = (x[..., row, :] != 0).any(dim=-1)  # a padding row is all zeros: no flow to change
            for column, value in self.values:
                stamped[..., row, column] = torch.where(real, torch.tensor(value, dtype=x.dtype), x[..., row, column])
        return stamped


def flow_trigger(scaler: dict, size: int) -> FlowTrigger:
    """The :class:`FlowTrigger` of :data:`FLOW_TRIGGER_COUNTS` in CTU-13's scaled units (log1p, then min-max)."""
    values = []
    for column, name, count in FLOW_TRIGGER_COUNTS:
        low, high = scaler[name]["min"], scaler[name]["max"]
        values.append((column, float((np.log1p(count) - low) / (high - low if high > low else 1.0))))
    return FlowTrigger(tuple(values), size)


def backdoor_trigger(config: TrainConfig, dataset: Dataset) -> Trigger | FlowTrigger:
    """The run's trigger: a pixel square on images, flow counts on CTU-13 (from the data set's scaler)."""
    if dataset.name == "ctu13":
        return flow_trigger(dataset.info["scaler"], config.trigger_size)
    return Trigger(config.trigger_size, config.trigger_position)


@dataclass(frozen=True)
class DataPoison:
    """What a malicious client does to its own training rows this round (picklable: it goes to the worker processes).

    ``flip``: every label y becomes C - 1 - y (label-flip, model-replacement). ``trigger``: a seeded
    share ``rate`` of the rows get the trigger and the label ``target`` (the backdoors).
    """

    flip: bool = False
    trigger: Trigger | FlowTrigger | None = None
    target: int = 0
    rate: float = 0.0
    epochs: int | None = None  # local epochs on the poisoned rows; None: the run's
    anchor: Anchor | None = None  # alie-backdoor's pull into the honest spread (set per round); None: none

    def training(self, training: LocalTraining) -> LocalTraining:
        """The local training the client runs on its poisoned rows: the run's, for ``epochs`` if set, with ``anchor`` if set."""
        if self.epochs is not None:
            training = dataclasses.replace(training, epochs=self.epochs)
        return training if self.anchor is None else dataclasses.replace(training, anchor=self.anchor)

    def apply(self, x: Tensor, y: Tensor, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
        """The rows (x, y) the client trains on; ``seed`` (the client's round seed) picks the poisoned rows."""
        if self.flip:
            y = flip_labels(y, num_classes)
        if self.trigger is not None:
            count = round(self.rate * len(y))
            chosen = torch.from_numpy(np.random.default_rng(seed).choice(len(y), size=count, replace=False))
            x, y = x.clone(), y.clone()
            x[chosen] = self.trigger.stamp(x[chosen])
            y[chosen] = self.target
        return x, y


def triggered_test_rows(x: Tensor, y: Tensor, trigger: Trigger | FlowTrigger, target: int) -> Tensor:
    """The test inputs an attack success rate is measured on: every one not of class ``target``, triggered."""
    return trigger.stamp(x[y != target])


def attack_success_rate(predictions: np.ndarray | Tensor, target: int) -> float:
    """The share of ``predictions`` (on :func:`triggered_test_rows`) that are the target class."""
    return float((np.asarray(predictions) == target).mean()) if len(predictions) else float("nan")


def backdoor_replacement(view: Round) -> Tensor:
    """Each poisoned step scaled by gamma = m / f_r (capped by the validation bound), or to the server's clip norm."""
    gamma = view.gamma / max(view.f, 1)
    rows = []
    for step in view.own:
        norm = float(step.norm())
        if view.options.clip_norm is not None:
            rows.append(step * (view.options.clip_norm / norm) if norm > 0 else step)
        else:
            rows.append(boost(norm, view.global_norm, gamma) * step)
    return torch.stack(rows)


def spread_anchor(known: Tensor, global_state: StateDict, z: float, alpha: float) -> Anchor:
    """alie-backdoor's pull: towards ``w + mu``, at scales ``max(z sigma, SCALE_FLOOR)``, mu and sigma of the ``known`` steps."""
    mu, sigma = spread(known)
    weights = apply_step(mu, global_state, global_state)
    scales = unflatten(torch.clamp(z * sigma, min=SCALE_FLOOR), global_state)
    return Anchor(weights, {k: v.to(global_state[k].dtype) for k, v in scales.items()}, alpha)


def alie_backdoor(view: Round) -> Tensor:
    """The malicious clients' mean poisoned step, each coordinate clipped to the honest ``mu +- z sigma``."""
    z = round_z(view)
    mu, sigma = spread(view.known)
    return view.copies(torch.clamp(view.own.mean(0), mu - z * sigma, mu + z * sigma))
