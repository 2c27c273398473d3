import copy

import pytest
import torch

from dipsen.models import build_model, calibrate_noise


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
