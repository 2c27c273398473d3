"""One client's local update: engine-independent, used by every federation engine.

The client receives the global weights, trains E local epochs on its own data only (mini-batches
of size B, reshuffled each epoch) and returns its new weights with its sample count, which FedAvg
uses as its weight. All randomness (shuffling, noise draws, AlphaDropout, adversarial random
starts) comes from ``seed``, so an update is a pure function of (global weights, data, settings, seed).

Each mini-batch's loss is :meth:`LocalTraining.loss`:

- plain: CE on the batch, with Gaussian noise of std ``input_noise`` if any (``smoothing_loss``
  ``gaussian``), or the consistency loss over ``consistency_copies`` noisy copies (``consistency``),
  or SmoothAdv's CE on ``smoothadv_copies`` noisy copies of an input attacked through them
  (``smoothadv``; both in :mod:`dipsen.federated.smoothing`);
- with ``adv_train`` (see :mod:`dipsen.federated.adversarial`) and ``adv_loss`` ``ce``:
  ``(1 - adv_mix) * CE(clean) + adv_mix * CE(adversarial)``, the adversarial examples crafted from
  the clean batch against the current local weights; ``input_noise``, if any, is then added to both;
- with ``adv_loss`` ``trades``: TRADES on the clean batch and its KL-maximising examples (noise as above);
- with ``adv_loss`` ``calfat``: CalFAT, the cross-entropy on the examples that maximise the KL, both
  on logits calibrated by log pi_k, the class frequencies of the client's own rows (computed in
  :func:`client_update` from the (x, y) it trains on, so the prior never leaves the client).

``proximal_mu`` > 0 adds FedProx's proximal term (Li et al. 2020, :func:`proximal_term`) to any of
them: (mu / 2) ||w - w_global||^2 over the trainable weights, which keeps a client's local steps near
the round's global model when the clients' data differ. ``anchor`` (an :class:`Anchor`) blends the loss
with a per-coordinate pull towards given weights instead: ``alpha * loss + (1 - alpha) *
mean_i ((w_i - a_i) / s_i)^2`` (the training half of Baruch et al.'s backdoor, which keeps a step
inside a box the server's rule tolerates; see :mod:`dipsen.federated.poisoning.backdoor`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ..device import host_state, model_device
from .adversarial import (
    CalibratedLogits,
    attack_steps,
    calfat_loss,
    default_step_size,
    label_log_prior,
    perturb,
    perturb_kl,
    trades_loss,
)
from .smoothing import consistency_batch_loss, smoothadv_batch_loss

if TYPE_CHECKING:  # dipsen.attack imports dipsen.federated
    from ..attack.domain import FeasibleDomain

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class LocalTraining:
    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 0.001
    momentum: float = 0.0
    # std of Gaussian noise added to every training input (Cohen et al.'s training for randomized
    # smoothing: a base classifier that is accurate under the noise it will be certified with)
    input_noise: float = 0.0
    # adversarial training: none | fgsm-rs | pgd, within L-inf eps and ``domain`` (the data set's
    # feasible inputs, required unless adv_train is none); adv_step_size None: the method's default
    adv_train: str = "none"
    adv_eps: float = 0.3
    adv_steps: int = 10  # pgd only
    adv_step_size: float | None = None
    adv_mix: float = 0.5
    domain: FeasibleDomain | None = None
    train_dtype: str = "float32"  # float32 | bfloat16 (see autocast)
    # the adversarial examples' loss: ce (the adv_mix blend of cross-entropies) | trades (CE + trades_beta * KL)
    # | calfat (CE on the KL-maximising examples, both calibrated by the client's label prior)
    adv_loss: str = "ce"
    trades_beta: float = 6.0
    # the model's classes: the length of calfat's label prior (a client need not hold every class); calfat only
    num_classes: int | None = None
    # FedProx's mu: (mu / 2) ||w - w_global||^2 added to every step's loss; 0: off
    proximal_mu: float = 0.0
    # randomized smoothing's training loss: gaussian (CE under input_noise) | consistency (Jeong & Shin 2020:
    # consistency_copies noisy copies, weights consistency_lambda on the KL term, consistency_eta on the entropy)
    smoothing_loss: str = "gaussian"
    consistency_lambda: float = 20.0
    consistency_copies: int = 2
    consistency_eta: float = 0.5
    # smoothadv (Salman et al. 2019): smoothadv_copies noisy copies, attacked by smoothadv_steps L2 steps within smoothadv_eps
    smoothadv_eps: float = 0.5
    smoothadv_steps: int = 2
    smoothadv_copies: int = 2
    anchor: Anchor | None = None  # a per-coordinate pull blended into every step's loss; None: off

    def __post_init__(self) -> None:
        if self.adv_train != "none" and self.domain is None:
            raise ValueError("adversarial training needs the data set's feasible domain")
        if self.smoothing_loss != "gaussian" and (self.input_noise <= 0 or self.adv_train != "none"):
            raise ValueError(f"the {self.smoothing_loss} loss needs input_noise > 0 and no adversarial training")
        if self.adv_loss == "trades" and self.adv_train == "none":
            raise ValueError("the TRADES loss needs adversarial training (adv_train fgsm-rs or pgd)")
        if self.adv_loss == "calfat" and (self.adv_train == "none" or self.num_classes is None):
            raise ValueError("the CalFAT loss needs adversarial training (adv_train fgsm-rs or pgd) and num_classes")

    def noisy(self, inputs: Tensor) -> Tensor:
        """``inputs`` with the training noise added (``input_noise``), if any."""
        if self.input_noise > 0:
            return inputs + self.input_noise * torch.randn_like(inputs)
        return inputs

    def log_prior(self, y: Tensor) -> Tensor | None:
        """calfat: log pi_k of a client's labels ``y`` (:func:`~dipsen.federated.adversarial.label_log_prior`); else None."""
        if self.adv_loss != "calfat":
            return None
        assert self.num_classes is not None  # __post_init__
        return label_log_prior(y, self.num_classes)

    def adversarial_examples(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator, log_prior: Tensor | None = None
    ) -> Tensor:
        """The ``adv_train`` examples of (x, y) against ``model`` as it is now (random starts from ``generator``).

        With ``adv_loss`` trades they maximise the KL term (:func:`~dipsen.federated.adversarial.perturb_kl`)
        with the same steps, step size and eps; with calfat the same KL between the logits calibrated by
        ``log_prior`` (:class:`~dipsen.federated.adversarial.CalibratedLogits`); else the cross-entropy
        (:func:`~dipsen.federated.adversarial.perturb`).
        """
        assert self.domain is not None  # __post_init__
        steps = attack_steps(self.adv_train, self.adv_steps)
        step = self.adv_step_size if self.adv_step_size is not None else default_step_size(self.adv_train, self.adv_eps, steps)
        if self.adv_loss == "trades":
            return perturb_kl(model, x, self.adv_eps, steps, step, self.domain, generator)
        if self.adv_loss == "calfat":
            assert log_prior is not None, "calfat's search needs the client's label prior"
            return perturb_kl(CalibratedLogits(model, log_prior), x, self.adv_eps, steps, step, self.domain, generator)
        return perturb(model, x, y, self.adv_eps, steps, step, self.domain, generator)

    def loss(
        self, model: nn.Module, inputs: Tensor, labels: Tensor, starts: torch.Generator, log_prior: Tensor | None = None
    ) -> Tensor:
        """One mini-batch's training loss (the module docstring lists them), without the proximal term.

        ``starts`` draws the adversarial examples' random starts; every noise draw comes from torch's global generator.
        ``log_prior``: calfat's log pi_k of the client's labels (:meth:`log_prior`), on the model's device.
        """
        if self.adv_train == "none":
            if self.smoothing_loss == "consistency":
                lam, eta = self.consistency_lambda, self.consistency_eta
                return consistency_batch_loss(model, inputs, labels, self.input_noise, self.consistency_copies, lam, eta)
            if self.smoothing_loss == "smoothadv":
                eps, steps, copies = self.smoothadv_eps, self.smoothadv_steps, self.smoothadv_copies
                return smoothadv_batch_loss(model, inputs, labels, self.input_noise, copies, eps, steps)
            return nn.functional.cross_entropy(model(self.noisy(inputs)), labels)
        adversarial = self.adversarial_examples(model, inputs, labels, starts, log_prior)
        if self.adv_loss == "trades":
            return trades_loss(model, self.noisy(inputs), self.noisy(adversarial), labels, self.trades_beta)
        if self.adv_loss == "calfat":
            assert log_prior is not None  # adversarial_examples checked it
            return calfat_loss(model, self.noisy(adversarial), labels, log_prior)
        loss = self.adv_mix * nn.functional.cross_entropy(model(self.noisy(adversarial)), labels)
        if self.adv_mix < 1:
            loss = loss + (1 - self.adv_mix) * nn.functional.cross_entropy(model(self.noisy(inputs)), labels)
        return loss

    def autocast(self, device_type: str) -> AbstractContextManager:
        """The arithmetic of a step's forward passes on a ``device_type`` device: bfloat16 autocast when ``train_dtype``
        is bfloat16, else float32 (no autocast context at all: it would refuse a device type it has no rules for)."""
        if self.train_dtype != "bfloat16":
            return nullcontext()
        return torch.autocast(device_type, dtype=torch.bfloat16)

    def steps_for(self, samples: int) -> int:
        """The optimizer steps :func:`client_update` takes on ``samples`` rows: ``epochs`` passes of ceil(samples / B)."""
        return self.epochs * math.ceil(samples / self.batch_size)

    def at_rate(self, lr: float | None) -> LocalTraining:
        """These settings at learning rate ``lr`` (a round's, from the server's schedule); None: unchanged."""
        return self if lr is None else dataclasses.replace(self, lr=lr)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """A fresh optimizer each round: FedAvg averages weights only, so no optimizer state outlives a round."""
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


def proximal_term(model: nn.Module, anchor: StateDict, mu: float) -> Tensor:
    """FedProx's proximal term (Li et al. 2020, "Federated optimization in heterogeneous networks"): (mu / 2) ||w - w_0||^2.

    Summed over ``model``'s trainable parameters (buffers and frozen weights have no gradient to
    pull), ``anchor`` the round's global weights by state-dict name, on the model's device. Its gradient is mu (w - w_0).
    """
    squares = [((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters() if p.requires_grad]
    return (mu / 2) * torch.stack(squares).sum()


@dataclass(frozen=True)
class Anchor:
    """A pull towards ``weights``, per coordinate at the scale ``scales``, blended into the loss with weight ``1 - alpha``.

    :meth:`blend` returns ``alpha * loss + (1 - alpha) * mean_i ((w_i - a_i) / s_i)^2`` over the
    trainable weights' coordinates i: the penalty is 1 where every weight sits one scale from its
    anchor, 0 at the anchor. The mean, not a sum, keeps ``alpha`` on the scale of a per-example loss
    whatever the model's size (a sum weighted 1 - alpha' is the same objective for
    (1 - alpha') / alpha' = (1 - alpha) / (alpha d), d the coordinates).
    """

    weights: StateDict
    scales: StateDict  # positive
    alpha: float  # in (0, 1]: 1 leaves the loss as it is

    def to(self, device: torch.device) -> Anchor:
        """This anchor with its tensors on ``device``."""
        weights = {k: v.to(device) for k, v in self.weights.items()}
        return Anchor(weights, {k: v.to(device) for k, v in self.scales.items()}, self.alpha)

    def blend(self, model: nn.Module, loss: Tensor) -> Tensor:
        """``alpha * loss + (1 - alpha) * mean ((w - a) / s)^2`` over ``model``'s trainable weights."""
        if self.alpha == 1:
            return loss
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        total = torch.stack([(((p - self.weights[n]) / self.scales[n]) ** 2).sum() for n, p in named]).sum()
        count = sum(p.numel() for _, p in named)
        return self.alpha * loss + (1 - self.alpha) * total / count


@dataclass(frozen=True)
class ClientUpdate:
    state: StateDict
    num_samples: int
    mean_loss: float  # the mean of the steps' losses, the proximal term included
    steps: int
    seconds: float


def client_update(
    model: nn.Module,
    global_state: StateDict,
    x: Tensor,
    y: Tensor,
    training: LocalTraining,
    seed: int,
) -> ClientUpdate:
    """Train ``model`` from ``global_state`` on (x, y) and return the updated weights.

    ``model`` is a reusable worker: its weights are overwritten by ``global_state`` first. It trains on
    its own device, (x, y) staying where they are and each mini-batch moving there; the update's
    weights are host copies (:func:`~dipsen.device.host_state`). The random draws that pick batches
    and adversarial starts are made on the CPU whatever the device, so they are the same on any.
    """
    start = time.perf_counter()
    device = model_device(model)
    torch.manual_seed(seed)  # noise layer and AlphaDropout draw from the global generator
    shuffle = torch.Generator().manual_seed(seed)
    # the random starts of adversarial examples: a stream of their own, so shuffling stays as without them
    starts = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
    model.load_state_dict(global_state)
    model.train()
    optimizer = training.make_optimizer(model.parameters())
    # the proximal term's w_global, copied to the device: a caller may pass the worker model's own state_dict(),
    # whose tensors share memory with the weights being trained and would move with them
    anchor = {k: v.detach().to(device, copy=True) for k, v in global_state.items()} if training.proximal_mu > 0 else {}
    pull = None if training.anchor is None else training.anchor.to(device)
    # calfat's label prior, of all the rows this client trains on (not a batch's): computed here from its own labels only
    log_prior = training.log_prior(y)
    if log_prior is not None:
        log_prior = log_prior.to(device)
    # summed on the device in float64 (each float32 loss exactly, as Python floats would), read once at the end:
    # a GPU then waits for no step's loss
    total_loss, steps = torch.zeros((), dtype=torch.float64, device=device), 0
    for _ in range(training.epochs):
        order = torch.randperm(len(x), generator=shuffle)
        for batch in order.split(training.batch_size):
            optimizer.zero_grad(set_to_none=True)
            inputs, labels = x[batch].to(device), y[batch].to(device)
            with training.autocast(device.type):
                loss = training.loss(model, inputs, labels, starts, log_prior)
            if training.proximal_mu > 0:  # in float32 outside autocast: it is a difference of weights, not a forward pass
                loss = loss + proximal_term(model, anchor, training.proximal_mu)
            if pull is not None:  # likewise
                loss = pull.blend(model, loss)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach()
            steps += 1
    state = host_state(model)
    return ClientUpdate(state, len(x), total_loss.item() / max(steps, 1), steps, time.perf_counter() - start)
