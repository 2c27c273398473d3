import pytest
import torch

from dipsen.models import MODELS, build_model, calibrate_noise
from dipsen.models.selu import SeluLayer


@pytest.mark.parametrize("train_mode", [False, True])
def test_selu_layer_keeps_mean_zero_variance_one(train_mode):
    torch.manual_seed(0)
    layer = SeluLayer(512, 512, alpha_dropout=0.1)
    layer.train(train_mode)
    x = torch.randn(4096, 512)  # standardised input
    with torch.no_grad():
        y = layer(x)
    assert abs(y.mean().item()) < 0.1
    assert y.var().item() == pytest.approx(1.0, abs=0.15)


def test_relu_dense_layer_does_not_self_normalise():
    # contrast: the same check fails for the CNN's ReLU layer (so the test above is not vacuous)
    torch.manual_seed(0)
    relu = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU())
    with torch.no_grad():
        y = relu(torch.randn(4096, 512))
    assert abs(y.mean().item()) > 0.1 or abs(y.var().item() - 1) > 0.15


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 28, 6)])
def test_models_build_and_share_parameter_counts(name, shape):
    model = build_model(name, shape, 10, calibrate_noise())
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 10)
    cnn = build_model("cnn", shape, 10, calibrate_noise())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in cnn.parameters())


def test_ablations_have_exactly_their_half():
    noise_only = build_model("noise-only", (1, 28, 28), 10, calibrate_noise())
    selu_only = build_model("selu-only", (1, 28, 28), 10, calibrate_noise())
    assert noise_only.is_randomized and not isinstance(noise_only.hidden, SeluLayer)
    assert not selu_only.is_randomized and isinstance(selu_only.hidden, SeluLayer)
