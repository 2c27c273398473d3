"""APGD keeps each example's best iterate, and every point it queries is feasible.

ART's APGD returned a run's random start wherever its own final prediction said "not fooled", and
never attacked examples a noisy prediction called wrong at the start. On a linear model whose
L-inf worst case is known in closed form, the attack must return that worst case instead.
"""

import numpy as np
import pytest
import torch
from torch import nn

from dipsen.attack import Budget, ExpectedSoftmax, feasible_domain
from dipsen.attack.apgd import checkpoints
from dipsen.attack.attacks import art_classifier, build_attack
from dipsen.attack.views import ClippedProbabilityLoss
from dipsen.errors import DipsenError

EPS = 0.05
SHAPE = (1, 4, 4)


class NoisyLinear(nn.Module):
    """Logits W x + b, plus N(0, std^2) noise on every logit and every call (a randomized model)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, std: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.flatten(1))
        return logits + self.std * torch.randn_like(logits)


def _unfoolable_case(n: int = 40):
    """Classes 0 and 1 (class 2 far below both), and inputs that no eps-perturbation can flip.

    The loss gradient of class y points along w_other - w_y for every input and noise draw, so
    the worst case is the vertex x + eps * sign(w_other - w_y); it still has a margin of >= 1.
    """
    torch.manual_seed(0)
    w = torch.randn(2, 16)
    weight, bias = torch.cat([w, torch.zeros(1, 16)]), torch.tensor([0.0, 0.0, -100.0])
    reach = EPS * (w[0] - w[1]).abs().sum()
    x = 0.3 + 0.4 * torch.rand(4 * n, *SHAPE)
    logits = x.flatten(1) @ w.T
    y = logits.argmax(dim=1)
    clean_margin = (logits[:, 0] - logits[:, 1]).abs()
    keep = (clean_margin > reach + 1.0) & (clean_margin < reach + 2.0)
    x, y = x[keep][:n], y[keep][:n]
    direction = (w[1 - y] - w[y]).sign().view(-1, *SHAPE)
    return weight, bias, x.numpy(), y.numpy(), (x + EPS * direction).numpy()


@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-dlr"])
def test_apgd_returns_the_worst_case_not_the_random_start_on_a_deterministic_model(attack):
    weight, bias, x, y, worst = _unfoolable_case()
    model = NoisyLinear(weight, bias)
    torch.manual_seed(1)
    np.random.seed(1)
    apgd = build_attack(attack, art_classifier(model, SHAPE, 3), EPS, Budget(iterations=10, restarts=1))
    at_worst = np.isclose(apgd.generate(x=x, y=y), worst, atol=1e-6).all(axis=(1, 2, 3))
    assert at_worst.all(), f"only {at_worst.mean():.2f} of the examples at their worst case"


@pytest.mark.parametrize("view", ["draw", "eot"])
def test_apgd_against_a_randomized_model_returns_its_attacked_point(view):
    """Noise of std 0.7 per logit: one draw calls 2-16% of these points wrong, the EOT mean almost none.

    Each example must end at its worst case however the noisy verdicts fell, at the random start
    (ART skipped such examples) or at the end of the run (ART then returned the random start).
    """
    weight, bias, x, y, worst = _unfoolable_case()
    model = NoisyLinear(weight, bias, std=0.7)
    attacked = ExpectedSoftmax(model, draws=8) if view == "eot" else model
    torch.manual_seed(2)
    np.random.seed(2)
    apgd = build_attack("apgd-ce", art_classifier(attacked, SHAPE, 3), EPS, Budget(iterations=10, restarts=1))
    at_worst = np.isclose(apgd.generate(x=x, y=y), worst, atol=1e-6).all(axis=(1, 2, 3))
    assert at_worst.mean() >= 0.9, f"only {at_worst.mean():.2f} of the examples at their worst case"


def test_step_size_checkpoints_follow_the_paper():
    # p_j: 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == [1]


def test_apgd_refuses_a_loss_it_does_not_use():
    weight, bias, *_ = _unfoolable_case(n=1)
    classifier = art_classifier(NoisyLinear(weight, bias), SHAPE, 3, ClippedProbabilityLoss())
    with pytest.raises(DipsenError, match="fgsm, bim, pgd only"):
        build_attack("apgd-ce", classifier, EPS, Budget())


class Recorder(nn.Module):
    """The model, keeping every batch it is called on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().clone())
        return self.model(x)


def _assert_every_query_feasible(batches, x, mask, eps):
    assert batches
    for batch in batches:
        queried = batch.numpy()
        assert np.abs(queried - x).max() <= eps + 1e-6
        assert queried.min() >= 0.0 and queried.max() <= 1.0
        moved = np.argwhere((queried - x) * (1 - mask) != 0)
        assert not len(moved), f"inputs the attacker may not change moved: {moved[:3]}, {queried[tuple(moved[0])]}"


@pytest.mark.parametrize("attack", ["apgd-ce", "square"])
def test_every_point_queried_on_ctu13_is_feasible(ctu13, ctu13_run, attack):
    """Copies of one window with a padding row: every queried batch must leave Proto, port class and
    padding untouched and stay in the eps-ball, the random start and every step included."""
    domain = feasible_domain(ctu13)
    padded = np.all(ctu13.x_test == 0, axis=-1).any(axis=(1, 2))
    window = ctu13.x_test[padded][:1]
    x, y = np.repeat(window, 6, axis=0), np.repeat(ctu13.y_test[padded][:1], 6)
    mask = domain.mask(x)
    recorder = Recorder(ctu13_run.model())
    torch.manual_seed(0)
    np.random.seed(0)
    # only Square takes the projection: APGD's iterates are checked before integer snapping
    project = {"project": lambda x_adv, x_orig: domain.project(x_adv, x_orig, 0.3)} if attack == "square" else {}
    attack_ = build_attack(
        attack, art_classifier(recorder, (1, 28, 6), 2), 0.3, Budget(iterations=8, restarts=2, queries=30), **project
    )
    attack_.generate(x=x, y=y, mask=mask)
    _assert_every_query_feasible(recorder.batches, window, mask[:1], 0.3)
