import dataclasses
import re

import pytest
import torch

from dipsen.attack.domain import FeasibleDomain
from dipsen.config import TrainConfig, load_config
from dipsen.errors import ConfigError
from dipsen.federated import LocalTraining, client_update
from dipsen.federated.engine import local_training
from dipsen.models import build_model, calibrate_noise


def _update(input_noise: float, seed: int = 0):
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 6), 2, calibrate_noise(None, 1.0, 0.05, 0.1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(64, 1, 28, 6), torch.randint(0, 2, (64,))
    return client_update(model, state, x, y, LocalTraining(input_noise=input_noise), seed).state


def test_input_noise_changes_the_update_and_is_seeded():
    plain, noisy, again = _update(0.0), _update(0.5), _update(0.5)
    assert any(not torch.equal(plain[k], noisy[k]) for k in plain)
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)  # a pure function of the seed
    assert any(not torch.equal(noisy[k], _update(0.5, seed=1)[k]) for k in noisy)


def test_bfloat16_runs_every_forward_pass_in_bfloat16_keeps_float32_weights_and_is_seeded():
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 6), 2, calibrate_noise(None, 1.0, 0.05, 0.1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(64, 1, 28, 6), torch.randint(0, 2, (64,))
    seen: list[torch.dtype] = []
    model.output.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))
    domain = FeasibleDomain("images in [0, 1]")
    # the attack's passes too: 2 PGD steps + the adversarial loss per batch, 2 batches, 1 epoch
    bf16 = LocalTraining(adv_train="pgd", adv_steps=2, adv_mix=1.0, domain=domain, train_dtype="bfloat16")
    first = client_update(model, state, x, y, bf16, seed=0)
    assert seen == [torch.bfloat16] * 6
    assert all(v.dtype == state[k].dtype for k, v in first.state.items())  # autocast leaves the weights float32
    again = client_update(model, state, x, y, bf16, seed=0).state
    assert all(torch.equal(first.state[k], again[k]) for k in again)  # still a pure function of the seed
    float32 = client_update(model, state, x, y, dataclasses.replace(bf16, train_dtype="float32"), seed=0).state
    assert any(not torch.equal(first.state[k], float32[k]) for k in float32)


def test_bfloat16_training_learns_what_float32_learns():
    torch.manual_seed(0)
    y = torch.randint(0, 2, (256,))
    x = 0.5 * torch.rand(256, 1, 28, 6) + 0.5 * y.view(-1, 1, 1, 1)  # the classes differ in brightness
    model = build_model("cnn", (1, 28, 6), 2, calibrate_noise(None, 1.0, 0.05, 0.1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy = {}
    for dtype in ("float32", "bfloat16"):
        model.load_state_dict(client_update(model, state, x, y, LocalTraining(epochs=2, train_dtype=dtype), seed=0).state)
        with torch.no_grad():
            accuracy[dtype] = float((model.eval()(x).argmax(1) == y).float().mean())
    assert min(accuracy.values()) > 0.95, accuracy


def test_train_dtype_reaches_the_clients_and_is_checked():
    assert local_training(TrainConfig(train_dtype="bfloat16").validate()).train_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=re.escape("--train-dtype must be one of float32, bfloat16")):
        load_config(None, {"train_dtype": "fp16"})
