import copy

import pytest
import torch
import torch.nn.functional as F

from dipsen.models import build_model, calibrate_noise
from dipsen.models.net import post_noise_gain


@pytest.mark.parametrize("name", ["cnn", "dipsen"])
def test_channels_last_layout_is_the_same_function_and_survives_loading(name):
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10, calibrate_noise(None, 1.0, 0.05, 0.1)).eval()
    contiguous = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    x = torch.rand(8, 1, 28, 28)
    torch.manual_seed(1)
    expected = contiguous(x)
    torch.manual_seed(1)  # the same noise draws
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)

    # a state dict from elsewhere (a checkpoint, a Flower message) is contiguous; loading keeps the layout
    model.load_state_dict({k: v.contiguous() for k, v in contiguous.state_dict().items()})
    conv_weights = [p for p in model.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)


def _reference_dipsen_logits(model, x: torch.Tensor) -> torch.Tensor:
    """DiPSeN's forward pass written out with functional ops from the definitions (the bound through the layer's
    public methods, the noise from the global generator in channels-last order, the post-noise gain on block 1's
    noisy output, SELU, AlphaDropout)."""
    conv1, conv2, noise = model.block1[0], model.block2[0], model.noise
    kernel = conv1.weight * (conv1.bound / torch.clamp(conv1.lipschitz_upper_bound(), min=conv1.bound))
    h = F.max_pool2d(F.relu(F.conv2d(x, kernel, conv1.bias, padding=1)), 2)
    n, c, height, width = h.shape
    h = post_noise_gain(noise.std) * (h + noise.std * torch.randn(n, height, width, c).permute(0, 3, 1, 2))
    h = F.max_pool2d(F.relu(F.conv2d(h, conv2.weight, conv2.bias, padding=1)), 2).flatten(1)
    linear = model.hidden.linear
    h = F.alpha_dropout(F.selu(F.linear(h, linear.weight, linear.bias)), model.hidden.dropout.p, training=model.training)
    return F.linear(h, model.output.weight, model.output.bias)


@pytest.mark.parametrize("train_mode", [True, False])
def test_dipsen_training_step_matches_a_straightforward_implementation(train_mode):
    torch.manual_seed(0)
    model = build_model("dipsen", (1, 28, 28), 10, calibrate_noise()).train(train_mode)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    results = []
    for forward in (model, lambda inputs: _reference_dipsen_logits(model, inputs)):
        model.zero_grad()
        torch.manual_seed(1)  # the same noise and dropout draws
        logits = forward(x)
        F.cross_entropy(logits, y).backward()
        results.append((logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (logits, grads), (expected_logits, expected_grads) = results
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7, msg=name)
