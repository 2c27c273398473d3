"""Client-side training recipes: TRADES, CalFAT, FedProx's proximal term, consistency regularisation for smoothing.

Each loss against a hand computation, TRADES' search inside the feasible domain, the defaults
bit-identical to the training loop before the recipes, the ConfigErrors, and a one-round federated
run of each recipe (in-process engine, and the Flower ClientApp's train step on the same task).
"""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from dipsen.attack.domain import FeasibleDomain, feasible_domain
from dipsen.config import TrainConfig, load_config
from dipsen.errors import ConfigError
from dipsen.federated import FederatedTraining, LocalTraining, RunDir, client_update, train
from dipsen.federated.adversarial import CalibratedLogits, calfat_loss, kl_divergence, label_log_prior, perturb_kl, trades_loss
from dipsen.federated.client import proximal_term
from dipsen.federated.engine import federated_data, local_training
from dipsen.federated.smoothing import (
    consistency_batch_loss,
    consistency_loss,
    noisy_copies,
    smoothadv_batch_loss,
    smoothadv_examples,
    smoothed_cross_entropy,
)
from dipsen.models import build_model, calibrate_noise

TINY = dict(dataset="mnist", model="cnn", clients=10, fraction=1.0, train_subset=500, test_subset=200, seed=3, workers=1)
IMAGES = FeasibleDomain("images in [0, 1]")


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread, and a busy machine's cores are not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    model = nn.Linear(len(weight[0]), len(weight)).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        model.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return model


# --- TRADES -----------------------------------------------------------------------------------------


def test_trades_loss_is_ce_plus_beta_times_the_kl_by_hand():
    weight, bias = [[1.0, -2.0, 0.5], [0.0, 1.5, -1.0], [-0.5, 0.25, 2.0]], [0.1, -0.2, 0.3]
    model = _linear(weight, bias)
    x = np.array([[0.2, 0.4, 0.9], [1.0, 0.0, 0.3]])
    x_adv = np.array([[0.5, 0.1, 0.6], [0.7, 0.3, 0.0]])
    y = np.array([2, 0])
    w, b = np.array(weight), np.array(bias)
    p, q = _softmax(x @ w.T + b), _softmax(x_adv @ w.T + b)
    ce = -np.mean(np.log(p[np.arange(2), y]))
    kl = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))  # KL(p || q) per row, then the batch mean
    assert kl > 0.1  # the two inputs disagree enough for the KL term to matter in the sum below
    got = trades_loss(model, torch.from_numpy(x), torch.from_numpy(x_adv), torch.from_numpy(y), beta=6.0).item()
    assert got == pytest.approx(ce + 6.0 * kl, rel=1e-12)
    assert kl_divergence(model(torch.from_numpy(x)), model(torch.from_numpy(x))).item() == pytest.approx(0.0, abs=1e-15)


def _mnist_batch(mnist, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(mnist.x_train[:n]), torch.from_numpy(mnist.y_train[:n])


def test_trades_search_raises_the_kl_and_stays_in_the_eps_ball_and_0_1(mnist):
    x, y = _mnist_batch(mnist)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    eps, steps = 0.3, 5
    x_adv = perturb_kl(model, x, eps, steps, 2.5 * eps / steps, feasible_domain(mnist), torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0.2  # it moved
    with torch.no_grad():
        natural = model(x)
        start = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # the search's start
        at_start = float(kl_divergence(natural, model(start.clamp(0, 1))))
        found = float(kl_divergence(natural, model(x_adv)))
        # a random point of the ball as good a guess as any without the search
        uniform = (x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 1)).clamp(0, 1)
        at_random = float(kl_divergence(natural, model(uniform)))
    assert at_start < 1e-4 and found > 10 * at_random and found > 0.05, (at_start, at_random, found)


def test_trades_examples_of_local_training_are_the_kl_search_and_stay_feasible_on_ctu13(ctu13):
    domain = feasible_domain(ctu13)
    x, y = torch.from_numpy(ctu13.x_train[:128]), torch.from_numpy(ctu13.y_train[:128]).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), int(y.max()) + 1))
    training = LocalTraining(adv_train="pgd", adv_steps=3, adv_eps=0.1, adv_loss="trades", domain=domain)
    x_adv = training.adversarial_examples(model, x, y, torch.Generator().manual_seed(0))
    again = perturb_kl(model, x, 0.1, 3, 2.5 * 0.1 / 3, domain, torch.Generator().manual_seed(0))
    assert torch.equal(x_adv, again)  # adv_steps, the default step size and adv_eps reach the search
    xn, an = x.numpy(), x_adv.numpy()
    assert np.abs(an - xn).max() <= 0.1 + 1e-6 and an.min() >= 0 and an.max() <= 1
    assert np.array_equal(an[..., 4:], xn[..., 4:])  # protocol and port class unchanged, as for the CE attack
    assert np.array_equal(domain.project(an, xn, 0.1), an)  # feasible: counts are integers
    assert not np.array_equal(an, xn)


# --- CalFAT -----------------------------------------------------------------------------------------


def test_calfat_loss_is_the_cross_entropy_of_the_prior_weighted_softmax_by_hand():
    weight, bias = [[1.0, -2.0, 0.5], [0.0, 1.5, -1.0], [-0.5, 0.25, 2.0]], [0.1, -0.2, 0.3]
    model = _linear(weight, bias)
    x_adv = np.array([[0.5, 0.1, 0.6], [0.7, 0.3, 0.0], [0.2, 0.9, 0.4]])
    y = np.array([2, 0, 1])
    prior = np.array([0.7, 0.2, 0.1])  # a client that mostly holds class 0
    z = x_adv @ np.array(weight).T + np.array(bias)
    # p_c = pi_c e^{z_c} / sum_c' pi_c' e^{z_c'}: the softmax of z + log pi
    calibrated = prior * np.exp(z) / (prior * np.exp(z)).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(calibrated[np.arange(3), y]))
    xt, yt = torch.from_numpy(x_adv), torch.from_numpy(y)
    got = calfat_loss(model, xt, yt, torch.from_numpy(np.log(prior))).item()
    assert got == pytest.approx(expected, rel=1e-12)
    uncalibrated = nn.functional.cross_entropy(model(xt), yt).item()
    assert abs(got - uncalibrated) > 0.05  # the prior matters here
    # a uniform prior (log pi = -log 3 for every class) leaves the softmax as it is: the plain CE on the examples
    uniform = torch.full((3,), -np.log(3.0), dtype=torch.float64)
    assert calfat_loss(model, xt, yt, uniform).item() == pytest.approx(uncalibrated, rel=1e-12)


def test_calfat_search_with_a_uniform_prior_is_the_trades_search_and_a_skewed_prior_moves_it():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 6, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    eps, steps = 0.3, 3

    def search(net: nn.Module) -> torch.Tensor:
        return perturb_kl(net, x, eps, steps, 2.5 * eps / steps, IMAGES, torch.Generator().manual_seed(1))

    trades = search(model)
    assert torch.allclose(search(CalibratedLogits(model, torch.full((4,), -float(np.log(4.0))))), trades, atol=1e-6)
    skewed = torch.log(torch.tensor([0.91, 0.03, 0.03, 0.03]))
    assert not torch.allclose(search(CalibratedLogits(model, skewed)), trades, atol=1e-3)


def test_the_label_prior_is_the_class_frequencies_a_missing_class_counted_once():
    y = torch.tensor([0, 0, 0, 2, 2, 1, 0, 0])  # counts 5, 1, 2 and none of class 3
    prior = label_log_prior(y, 4).exp()
    assert torch.allclose(prior, torch.tensor([5.0, 1.0, 2.0, 1.0]) / 9)
    assert label_log_prior(torch.tensor([1, 1]), 3).isfinite().all()


def test_client_update_calibrates_by_the_prior_of_its_own_rows_only(mnist, one_thread, monkeypatch):
    """Under label skew (Dirichlet 0.5) every client's prior is its own rows' class frequencies, and only they reach it."""
    from dipsen.federated import client as client_module

    cfg = TrainConfig(**TINY, partition="dirichlet", adv_train="fgsm-rs", adv_loss="calfat").validate()
    data = federated_data(cfg, mnist)
    training = local_training(cfg, feasible_domain(mnist), 10)
    seen: list[torch.Tensor] = []

    def spy(y: torch.Tensor, num_classes: int) -> torch.Tensor:
        seen.append(y.clone())
        return label_log_prior(y, num_classes)

    monkeypatch.setattr(client_module, "label_log_prior", spy)
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10, calibrate_noise(None, 1.0, 0.05, 0.1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    priors = []
    for part in data.parts[:2]:
        x, y = torch.from_numpy(data.x_train[part]), torch.from_numpy(data.y_train[part])
        update = client_update(model, state, x, y, training, seed=5)
        assert torch.equal(seen[-1], y)  # its own labels, all of them, once
        assert update.state.keys() == state.keys()  # the calibration adds nothing to the model it sends
        counts = np.bincount(y.numpy(), minlength=10)
        priors.append(np.maximum(counts, 1) / np.maximum(counts, 1).sum())
        assert np.allclose(label_log_prior(y, 10).exp().numpy(), priors[-1])
    assert len(seen) == 2
    assert np.abs(priors[0] - priors[1]).max() > 0.1  # skewed: the two clients calibrate differently


# --- proximal term ----------------------------------------------------------------------------------


def test_the_proximal_term_is_half_mu_times_the_squared_distance_and_its_gradient_mu_times_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[2].bias.requires_grad_(False)  # frozen: not pulled
    anchor = {k: v.detach() + 0.1 * torch.randn_like(v.float()).to(v.dtype) for k, v in model.state_dict().items()}
    term = proximal_term(model, anchor, mu=0.3)
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    by_hand = 0.15 * sum(float(((p.detach() - anchor[k]) ** 2).sum()) for k, p in trainable.items())
    assert float(term) == pytest.approx(by_hand, rel=1e-6)
    term.backward()  # no data term: the whole gradient is the proximal term's
    for k, p in trainable.items():
        assert torch.allclose(p.grad, 0.3 * (p.detach() - anchor[k]), atol=1e-7), k
    assert model[2].bias.grad is None


def test_client_update_adds_mu_times_the_distance_to_the_global_weights_to_every_step(one_thread):
    """SGD, one full batch per epoch: step 1 starts at w0 (no pull), step 2 is pulled by lr * mu * (w1 - w0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(16, 1, 3, 4), torch.randint(0, 3, (16,))
    lr, mu = 0.5, 0.2

    def run(epochs: int, proximal_mu: float):
        training = LocalTraining(epochs=epochs, batch_size=16, optimizer="sgd", lr=lr, proximal_mu=proximal_mu)
        return client_update(model, w0, x, y, training, seed=0).state

    w1 = run(1, 0.0)
    assert all(torch.equal(w1[k], run(1, mu)[k]) for k in w1)  # at w_global the term pulls nothing
    plain, pulled = run(2, 0.0), run(2, mu)
    for k in w0:
        assert torch.allclose(pulled[k] - plain[k], -lr * mu * (w1[k] - w0[k]), atol=1e-6), k
        assert not torch.equal(pulled[k], plain[k])


# --- consistency regularisation ---------------------------------------------------------------------


def test_the_consistency_loss_is_the_papers_formula_by_hand():
    logits = np.array(
        [
            [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 3.0], [-1.0, 2.0, 0.0, 0.5]],
            [[1.0, 1.5, -0.5, 0.0], [0.0, 0.0, 1.0, 2.0], [0.5, 0.5, 0.5, 0.5]],
            [[3.0, -1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 2.5], [-2.0, 1.0, 0.2, 0.0]],
        ]
    )  # m = 3 copies of a batch of 3 rows, 4 classes
    y = np.array([0, 3, 1])
    p = _softmax(logits)  # (m, B, C)
    ce = -np.mean(np.log(p[:, np.arange(3), y]))  # the mean over copies and rows
    p_hat = p.mean(axis=0)
    kl = np.mean(np.sum(p_hat * (np.log(p_hat) - np.log(p)), axis=-1), axis=0)  # mean over copies of KL(p_hat || p_i)
    entropy = -np.sum(p_hat * np.log(p_hat), axis=-1)
    expected = ce + np.mean(20.0 * kl + 0.5 * entropy)
    got = consistency_loss(torch.from_numpy(logits), torch.from_numpy(y), lam=20.0, eta=0.5)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    assert float(got) - ce > 0.5  # the regularisers are a real part of it
    # identical copies agree: only CE and the entropy remain
    same = np.stack([logits[0]] * 3)
    q = _softmax(logits[0])
    only = -np.mean(np.log(q[np.arange(3), y])) + 0.5 * np.mean(-np.sum(q * np.log(q), axis=-1))
    assert float(consistency_loss(torch.from_numpy(same), torch.from_numpy(y), 20.0, 0.5)) == pytest.approx(only, rel=1e-12)


def test_noisy_copies_lay_copy_i_of_row_b_at_i_times_b_and_the_loss_draws_from_the_global_generator():
    x = torch.arange(6.0).view(3, 1, 2)
    torch.manual_seed(0)
    copies = noisy_copies(x, 0.0, 4)
    assert copies.shape == (12, 1, 2) and torch.equal(copies[2 * 3 + 1], x[1])
    torch.manual_seed(1)
    noisy = noisy_copies(x, 0.5, 2)
    assert not torch.equal(noisy[:3], noisy[3:]) and float((noisy - x.repeat(2, 1, 1)).std()) > 0.2  # independent draws
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 3))
    y = torch.tensor([0, 1, 2])
    losses = []
    for _ in range(2):
        torch.manual_seed(7)
        losses.append(float(consistency_batch_loss(model, x, y, 0.5, 3, 20.0, 0.5)))
    assert losses[0] == losses[1]


# --- SmoothAdv ------------------------------------------------------------------------------------------


def test_the_smoothed_cross_entropy_is_minus_the_log_of_the_copies_mean_softmax():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[0.0, 1.0, 0.0], [3.0, -1.0, 0.0]]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    p = _softmax(logits.numpy()).mean(axis=0)  # (B, C): the mean over the 2 copies
    expected = -np.mean(np.log(p[np.arange(2), y.numpy()]))
    assert float(smoothed_cross_entropy(logits, y)) == pytest.approx(expected, rel=1e-12)


def test_smoothadv_takes_normalised_gradient_steps_of_2_eps_over_t_then_clips_to_the_box_and_the_ball():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).double()
    x = torch.rand(4, 1, 6, dtype=torch.float64) * 0.5 + 0.25  # away from the box's faces
    y = torch.tensor([0, 1, 2, 0])
    noise = 0.1 * torch.randn(3, 4, 1, 6, dtype=torch.float64)
    # one step of 2 eps (eps 0.05): along the normalised gradient of the smoothed CE at delta = 0, then the ball (norm eps)
    x0 = x.clone().requires_grad_(True)
    logits = model((x0.unsqueeze(0) + noise).flatten(0, 1)).view(3, 4, -1)
    (grad,) = torch.autograd.grad(smoothed_cross_entropy(logits, y), x0)
    direction = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1)
    one = smoothadv_examples(model, x, y, noise, eps=0.05, steps=1)
    assert torch.allclose(one - x, 0.05 * direction, atol=1e-12)  # 2 eps along it, then renormed to eps
    # many steps with a large eps: every row within the ball, inside [0, 1], and the smoothed loss higher than at x
    far = smoothadv_examples(model, x, y, noise, eps=2.0, steps=10)
    assert bool((far - x).flatten(1).norm(dim=1).le(2.0 + 1e-9).all()) and float(far.min()) >= 0 and float(far.max()) <= 1

    def loss(z: torch.Tensor) -> float:
        return float(smoothed_cross_entropy(model((z.unsqueeze(0) + noise).flatten(0, 1)).view(3, 4, -1), y))

    assert loss(far) > loss(x) + 0.1


def test_smoothadv_trains_on_the_noisy_copies_of_the_attacked_rows_with_one_noise_draw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    x, y = torch.rand(5, 1, 6), torch.tensor([0, 1, 2, 0, 1])
    torch.manual_seed(3)
    got = smoothadv_batch_loss(model, x, y, 0.25, 2, 0.5, 2)
    torch.manual_seed(3)
    noise = 0.25 * torch.randn(2, 5, 1, 6)  # drawn once, first: attacked through and trained on
    attacked = smoothadv_examples(model, x, y, noise, 0.5, 2)
    expected = nn.functional.cross_entropy(model((attacked.unsqueeze(0) + noise).flatten(0, 1)), y.repeat(2))
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert model[1].weight.grad is None  # the attack takes no gradient of the weights


def test_a_smoothadv_client_update_trains_and_is_reproducible(one_thread):
    cfg = TrainConfig(input_noise=0.25, smoothing_loss="smoothadv", smoothadv_steps=1, smoothadv_copies=2).validate()
    training = dataclasses.replace(local_training(cfg), batch_size=16)
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10, calibrate_noise(None, 1.0, 0.05, 0.1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    first, second = (client_update(model, state, x, y, training, seed=5) for _ in range(2))
    assert all(torch.equal(first.state[k], second.state[k]) for k in state) and first.steps == 2
    assert any(not torch.equal(first.state[k], state[k]) for k in state)  # it trained


# --- defaults: the loop as it was ---------------------------------------------------------------------


def _before_recipes(model: nn.Module, global_state, x, y, training: LocalTraining, seed: int):
    """client_update's loop before the recipes, verbatim in what it computes: the defaults must reproduce it bit for bit."""
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    starts = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
    model.load_state_dict(global_state)
    model.train()
    optimizer = training.make_optimizer(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(training.epochs):
        order = torch.randperm(len(x), generator=shuffle)
        for batch in order.split(training.batch_size):
            optimizer.zero_grad(set_to_none=True)
            inputs, labels = x[batch], y[batch]
            with training.autocast("cpu"):
                if training.adv_train == "none":
                    loss = loss_fn(model(training.noisy(inputs)), labels)
                else:
                    adversarial = training.adversarial_examples(model, inputs, labels, starts)
                    loss = training.adv_mix * loss_fn(model(training.noisy(adversarial)), labels)
                    if training.adv_mix < 1:
                        loss = loss + (1 - training.adv_mix) * loss_fn(model(training.noisy(inputs)), labels)
            loss.backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"input_noise": 0.5},
        {"adv_train": "pgd", "adv_steps": 2},
        {"adv_train": "fgsm-rs", "adv_mix": 1.0, "input_noise": 0.25},
        {"adv_train": "fgsm-rs", "input_noise": 0.25},  # both terms of the blend, each with its own noise draw
        {"adv_train": "pgd", "adv_steps": 2, "train_dtype": "bfloat16"},
    ],
)
@pytest.mark.parametrize("model_name", ["cnn", "dipsen"])
def test_default_recipes_give_the_weights_of_the_loop_before_them(settings, model_name, one_thread):
    cfg = TrainConfig(**settings).validate()  # the config's defaults, through the path both engines take
    training = local_training(cfg, IMAGES if cfg.adv_train != "none" else None)
    torch.manual_seed(0)
    model = build_model(model_name, (1, 28, 28), 10, calibrate_noise(None, 1.0, 0.05, 0.1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(48, 1, 28, 28, generator=g), torch.randint(0, 10, (48,), generator=g)
    now = client_update(model, state, x, y, training, seed=7).state
    before = _before_recipes(model, state, x, y, training, seed=7)
    assert all(torch.equal(now[k], before[k]) for k in before)


# --- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        ({"adv_loss": "trades"}, "adv_loss", "--adv-loss trades needs adv_train fgsm-rs or pgd"),
        ({"adv_loss": "mart"}, "adv_loss", "--adv-loss must be one of ce, trades, calfat"),
        ({"adv_loss": "calfat"}, "adv_loss", "--adv-loss calfat needs adv_train fgsm-rs or pgd"),
        (
            {"adv_train": "pgd", "adv_loss": "calfat", "adv_mix": 1.0},
            "adv_mix",
            "--adv-mix 1.0 does not apply to adv_loss calfat (its loss is on adversarial examples alone)",
        ),
        ({"adv_train": "pgd", "adv_loss": "calfat", "trades_beta": 1.0}, "trades_beta", "applies to adv_loss trades only"),
        ({"adv_train": "pgd", "adv_loss": "trades", "adv_mix": 0.7}, "adv_mix", "--adv-mix 0.7 does not apply to adv_loss"),
        ({"trades_beta": 3.0}, "trades_beta", "--trades-beta 3.0 applies to adv_loss trades only"),
        ({"adv_train": "pgd", "adv_loss": "trades", "trades_beta": 0.0}, "trades_beta", "--trades-beta must be a number > 0"),
        ({"proximal_mu": -0.1}, "proximal_mu", "--proximal-mu must be a number >= 0"),
        ({"smoothing_loss": "consistency"}, "smoothing_loss", "--smoothing-loss consistency needs input_noise > 0"),
        (
            {"smoothing_loss": "consistency", "input_noise": 0.25, "adv_train": "pgd"},
            "smoothing_loss",
            "--smoothing-loss consistency does not combine with adv_train 'pgd'",
        ),
        ({"smoothing_loss": "macer"}, "smoothing_loss", "--smoothing-loss must be one of gaussian, consistency, smoothadv"),
        ({"smoothing_loss": "smoothadv"}, "smoothing_loss", "--smoothing-loss smoothadv needs input_noise > 0"),
        (
            {"smoothing_loss": "smoothadv", "input_noise": 0.25, "dataset": "ctu13"},
            "smoothing_loss",
            "smoothadv attacks images in [0, 1]",
        ),
        ({"input_noise": 0.25, "smoothadv_eps": 1.0}, "smoothadv_eps", "--smoothadv-eps 1.0 applies to smoothing_loss smoothadv"),
        ({"smoothing_loss": "smoothadv", "input_noise": 0.25, "smoothadv_steps": 0}, "smoothadv_steps", "smoothadv-steps"),
        ({"input_noise": 0.25, "consistency_lambda": 5.0}, "consistency_lambda", "applies to smoothing_loss consistency only"),
        ({"consistency_copies": 4}, "consistency_copies", "--consistency-copies 4 applies to smoothing_loss consistency only"),
        ({"consistency_eta": 1.0}, "consistency_eta", "--consistency-eta 1.0 applies to smoothing_loss consistency only"),
        (
            {"smoothing_loss": "consistency", "input_noise": 0.25, "consistency_copies": 1},
            "consistency_copies",
            "--consistency-copies must be an integer >= 2",
        ),
    ],
)
def test_bad_recipe_combinations_are_refused_naming_the_key(overrides, key, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        load_config(None, overrides)
    assert refused.value.key == key


def test_recipes_reach_local_training_and_it_refuses_what_the_config_refuses():
    cfg = TrainConfig(adv_train="pgd", adv_loss="trades", trades_beta=2.0, proximal_mu=0.01, adv_eps=0.2, adv_steps=3).validate()
    training = local_training(cfg, IMAGES)
    assert (training.adv_loss, training.trades_beta, training.proximal_mu) == ("trades", 2.0, 0.01)
    smooth = TrainConfig(
        input_noise=0.5, smoothing_loss="consistency", consistency_lambda=10.0, consistency_copies=3, consistency_eta=0.1
    ).validate()
    training = local_training(smooth)
    assert (training.smoothing_loss, training.consistency_lambda, training.consistency_copies) == ("consistency", 10.0, 3)
    assert training.consistency_eta == 0.1
    with pytest.raises(ValueError, match="TRADES loss needs adversarial training"):
        LocalTraining(adv_loss="trades")
    calfat = TrainConfig(adv_train="fgsm-rs", adv_loss="calfat").validate()
    assert (local_training(calfat, IMAGES, 10).adv_loss, local_training(calfat, IMAGES, 10).num_classes) == ("calfat", 10)
    for refused in (dict(adv_loss="calfat", num_classes=10), dict(adv_train="pgd", adv_loss="calfat", domain=IMAGES)):
        with pytest.raises(ValueError, match="CalFAT loss needs adversarial training .* and num_classes"):
            LocalTraining(**refused)
    with pytest.raises(ValueError, match="consistency loss needs input_noise > 0"):
        LocalTraining(smoothing_loss="consistency")


# --- one federated round of each ----------------------------------------------------------------------

QUICK_MONITOR = dict(robust_monitor_steps=3, robust_monitor_samples=50)  # the robust accuracy of each round, cheaply
RECIPES = {
    "trades": dict(adv_train="pgd", adv_steps=2, adv_loss="trades", **QUICK_MONITOR),
    "trades-proximal": dict(adv_train="fgsm-rs", adv_loss="trades", trades_beta=1.0, proximal_mu=0.1, **QUICK_MONITOR),
    "calfat": dict(partition="dirichlet", adv_train="pgd", adv_steps=2, adv_loss="calfat", **QUICK_MONITOR),
    "proximal": dict(proximal_mu=0.01),
    "consistency": dict(input_noise=0.25, smoothing_loss="consistency", consistency_copies=3),
    "consistency-proximal": dict(input_noise=0.5, smoothing_loss="consistency", proximal_mu=0.01),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_one_federated_round_trains_with_each_recipe(recipe, mnist, tmp_path, one_thread):
    cfg = TrainConfig(**TINY, rounds=1, **RECIPES[recipe]).validate()
    run = RunDir.create(tmp_path, cfg)
    final = train(FederatedTraining(cfg, mnist), run)
    (record,) = run.metrics()
    assert np.isfinite(record["train_loss"]) and record["train_loss"] > 0
    assert 0 <= final["accuracy"] <= 1
    if cfg.adv_train != "none":
        assert 0 <= record["robust_accuracy"] <= 1


@pytest.mark.parametrize("recipe", ["trades", "calfat", "proximal", "consistency"])
def test_the_flower_client_app_trains_each_recipe_as_the_in_process_engine_does(recipe, mnist, one_thread, monkeypatch):
    """The Flower engine's train step (its ClientApp, called here without a Flower process) on the task of client 0."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 3)):  # what Flower sets before Message() is made
        monkeypatch.setattr(TaskIdentity, name, value)

    from dipsen.federated.flower import client_app
    from dipsen.federated.flower.task import config_to_json, state_to_arrays

    cfg = TrainConfig(**TINY, rounds=1, engine="flower", **RECIPES[recipe]).validate()
    domain = feasible_domain(mnist) if cfg.adv_train != "none" else None
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10, calibrate_noise(None, 1.0, 0.05, 0.1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = ConfigRecord({"train-config": config_to_json(cfg), "num-classes": 10, "seed": 11})
    if domain is not None:
        settings["feasible-domain"] = json.dumps(domain.to_dict())
    message = Message(
        RecordDict({"config": settings, "arrays": state_to_arrays(state)}), dst_node_id=101, message_type=MessageType.TRAIN
    )
    context = Context(1, 101, {"partition-id": 0, "num-partitions": cfg.clients}, RecordDict(), {})
    reply = client_app.train(message, context)
    flower = reply.content["arrays"].to_torch_state_dict()

    data = federated_data(cfg, mnist)
    x, y = torch.from_numpy(data.x_train[data.parts[0]]), torch.from_numpy(data.y_train[data.parts[0]])
    in_process = client_update(model, state, x, y, local_training(cfg, domain, 10), seed=11).state
    recipe_keys = {"adv_loss", "trades_beta", "proximal_mu", "smoothing_loss", "consistency_copies"}
    without = TrainConfig(**TINY, **{k: v for k, v in RECIPES[recipe].items() if k not in recipe_keys}).validate()
    plain = client_update(model, state, x, y, local_training(without, domain), seed=11).state
    assert all(torch.equal(flower[k], in_process[k]) for k in in_process)
    assert any(not torch.equal(flower[k], plain[k]) for k in plain)  # the recipe changed the update
    assert isinstance(reply.content["arrays"], ArrayRecord)
