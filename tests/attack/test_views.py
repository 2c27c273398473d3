"""The attacker's views of a randomized model: noise stays on under eval(), EOT lowers gradient variance."""

import math

import numpy as np
import torch
from torch import nn

from dipsen.attack import AttackSetup, Budget, ExpectedSoftmax, RobustnessEvaluation, attacker_view
from dipsen.attack.attacks import art_classifier


def _input_gradient(view: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(view(x), y).backward()
    return x.grad


def test_noise_layer_is_active_under_eval_during_attacks(dipsen_run, mnist):
    model = dipsen_run.model()
    seen_training_flags = []
    model.noise.register_forward_hook(lambda module, inputs, output: seen_training_flags.append(module.training))
    classifier = art_classifier(model, (1, 28, 28), 10)
    x = mnist.x_test[:8]
    first, second = classifier.predict(x), classifier.predict(x)
    labels = np.eye(10, dtype=np.float32)[mnist.y_test[:8]]
    gradient_a, gradient_b = classifier.loss_gradient(x, labels), classifier.loss_gradient(x, labels)
    assert seen_training_flags and not any(seen_training_flags)  # ART put the model in eval mode
    assert not np.allclose(first, second)  # ... and every prediction took a fresh noise draw
    assert not np.allclose(gradient_a, gradient_b)


def test_eot_gradients_have_lower_variance_than_single_draw_gradients(dipsen_run, mnist):
    model = dipsen_run.model()
    x, y = torch.from_numpy(mnist.x_test[:16]), torch.from_numpy(mnist.y_test[:16])
    torch.manual_seed(0)
    single = torch.stack([_input_gradient(attacker_view(model, "draw"), x, y) for _ in range(12)])
    eot = torch.stack([_input_gradient(attacker_view(model, "eot", eot_draws=16), x, y) for _ in range(12)])
    # variance across repeated estimates, relative to the squared mean gradient's scale
    single_variance = single.var(dim=0).sum() / single.mean(dim=0).pow(2).sum()
    eot_variance = eot.var(dim=0).sum() / eot.mean(dim=0).pow(2).sum()
    assert eot_variance < 0.25 * single_variance, (float(eot_variance), float(single_variance))


def test_expected_softmax_is_a_log_probability_and_matches_one_draw(dipsen_run, mnist):
    model = dipsen_run.model()
    x = torch.from_numpy(mnist.x_test[:4])
    out = ExpectedSoftmax(model, draws=8)(x)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(4), atol=1e-5)
    torch.manual_seed(3)
    one = ExpectedSoftmax(model, draws=1)(x)
    torch.manual_seed(3)
    assert torch.allclose(one, torch.log_softmax(model(x), dim=1), atol=1e-5)


def _expected_softmax_of_a_repeated_batch(model: nn.Module, x: torch.Tensor, draws: int) -> torch.Tensor:
    log_probs = torch.log_softmax(model(x.repeat(draws, 1, 1, 1)), dim=1).view(draws, len(x), -1)
    return torch.logsumexp(log_probs, dim=0) - math.log(draws)


def test_eot_runs_block1_once_per_input_with_the_repeated_batch_s_draws_and_gradient(dipsen_run, mnist):
    model = dipsen_run.model()
    x, y = torch.from_numpy(mnist.x_test[:8]), torch.from_numpy(mnist.y_test[:8])
    seen = []
    hook = model.block1.register_forward_hook(lambda module, inputs, output: seen.append(len(output)))
    torch.manual_seed(5)
    shared = _input_gradient(ExpectedSoftmax(model, draws=4), x, y)
    hook.remove()
    assert seen == [8]  # not 4 x 8
    torch.manual_seed(5)
    repeated = _input_gradient(lambda inputs: _expected_softmax_of_a_repeated_batch(model, inputs, 4), x, y)
    assert torch.allclose(shared, repeated, rtol=1e-4, atol=1e-7)
    torch.manual_seed(6)
    other = _input_gradient(ExpectedSoftmax(model, draws=4), x, y)
    assert not torch.allclose(shared, other)  # other draws: the noise is not frozen


def test_frozen_and_off_views_are_deterministic_and_leave_the_model_alone(dipsen_run, mnist):
    model = dipsen_run.model()
    x = torch.from_numpy(mnist.x_test[:4])
    for gradient in ("frozen", "off"):
        view = attacker_view(model, gradient)
        assert torch.equal(view(x), view(x))
    assert model.noise.std > 0 and model.noise.generator is None


def test_fixed_noise_attack_succeeds_on_dipsen(dipsen_run):
    """Carlini et al.'s sanity check: with the randomness fixed, the attack must work."""
    evaluation = RobustnessEvaluation(dipsen_run, samples=40, mc_samples=8)
    result = evaluation.run(AttackSetup("pgd", gradient="frozen", budget=Budget(20, 1 / 4, 0)))
    assert result.accuracy("mc") <= evaluation.clean().accuracy("mc") - 0.4
