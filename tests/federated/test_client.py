import torch

from dipsen.federated import LocalTraining, client_update
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
