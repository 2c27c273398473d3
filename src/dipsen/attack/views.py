"""The model an attacker differentiates: views of a (possibly randomized) global model.

A randomized model f(x; n), n ~ N(0, s^2 I), has no single gradient. What an attacker uses instead
decides whether an attack measures robustness or only gradient noise (Athalye et al. 2018):

- ``draw``   the deployed model as is: every forward pass takes a fresh noise draw, so each gradient
             step follows one random draw (the paper's protocol, ART's default behaviour);
- ``eot``    expectation over transformation: log E_n[softmax f(x; n)], estimated with ``k`` draws in
             one batched pass. Its gradient is the gradient of the quantity the Monte-Carlo
             prediction rule thresholds, with variance O(1/k) of a single draw's;
- ``frozen`` the noise fixed to one draw (the same ``seed`` at every forward pass): a deterministic
             model close to the deployed one, cheap, and often as strong as EOT;
- ``off``    the noise switched off (std 0).

Every view is a deep copy: crafting never changes the attacked model. Adversarial examples are
always *evaluated* on the deployed model, noise on.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from ..device import model_device
from ..errors import DipsenError
from ..models import FederatedNet
from ..models.predict import draw_logits

GRADIENT_VIEWS = ("draw", "eot", "frozen", "off")
DEFAULT_EOT_DRAWS = 16


class ExpectedSoftmax(nn.Module):
    """``log mean_k softmax(model(x))`` over ``draws`` noise draws, computed in one batched pass.

    The output is a valid log-probability vector (it sums to 1 after exp), so attacks that expect
    logits (cross-entropy, APGD's DLR loss) can use it directly.
    """

    def __init__(self, model: nn.Module, draws: int) -> None:
        super().__init__()
        if draws < 1:
            raise DipsenError(f"EOT draws must be >= 1, got {draws}")
        self.model, self.draws = model, draws

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        log_probs = torch.log_softmax(draw_logits(self.model, x, self.draws), dim=1).view(self.draws, batch, -1)
        return torch.logsumexp(log_probs, dim=0) - math.log(self.draws)


class FrozenNoise(nn.Module):
    """The model with its noise generator re-seeded before every forward pass: one fixed draw (on the model's device)."""

    def __init__(self, model: FederatedNet, seed: int) -> None:
        super().__init__()
        if model.noise is None:
            raise DipsenError("frozen noise needs a model with a noise layer")
        self.model, self.seed = model, seed
        self.generator = torch.Generator(device=model_device(model))
        model.noise.generator = self.generator

    def forward(self, x: Tensor) -> Tensor:
        self.generator.manual_seed(self.seed)
        return self.model(x)


def attacker_view(model: FederatedNet, gradient: str, eot_draws: int = DEFAULT_EOT_DRAWS, seed: int = 0) -> nn.Module:
    """A copy of ``model`` as the attacker differentiates it; see the module docstring."""
    if gradient not in GRADIENT_VIEWS:
        raise DipsenError(f"unknown gradient view {gradient!r}; choose one of {', '.join(GRADIENT_VIEWS)}")
    view = copy.deepcopy(model).eval()
    if view.noise is None or not view.is_randomized or gradient == "draw":
        return view
    if gradient == "eot":
        return ExpectedSoftmax(view, eot_draws).eval()
    if gradient == "frozen":
        return FrozenNoise(view, seed).eval()
    view.noise.std = 0.0
    return view


class ClippedProbabilityLoss(nn.Module):
    """Cross-entropy computed the way Keras computes it on a softmax output layer.

    ``-log(clip(softmax(z)_y, 1e-7, 1 - 1e-7))``: where the model is confident the clip is active and
    the gradient is exactly zero, so a gradient attack leaves such inputs unchanged. Offered only to
    show how a Keras/ART pipeline can report robustness that is not there; never an honest attack.
    """

    EPSILON = 1e-7

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.dim() == 2:  # ART hands one-hot labels to losses other than nn.CrossEntropyLoss
            target = target.argmax(dim=1)
        target = target.long()
        probs = torch.softmax(logits, dim=1).gather(1, target.view(-1, 1)).squeeze(1)
        return -torch.log(torch.clamp(probs, self.EPSILON, 1 - self.EPSILON)).mean()
