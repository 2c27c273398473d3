import re

import pytest
import torch

from dipsen.federated import ClientUpdate, LocalTraining, fedavg
from dipsen.federated.aggregate import MAX_STEP_NORM_RATIO, validate_update


def test_fedavg_is_the_exact_sample_weighted_mean():
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "b": torch.tensor([10.0])}
    c = {"w": torch.tensor([[0.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([-4.0])}
    out = fedavg([a, b, c], [1, 3, 4])
    # (1*a + 3*b + 4*c) / 8
    assert torch.equal(out["w"], torch.tensor([[2.0, 2.5], [3.0, 3.5]]))
    assert torch.equal(out["b"], torch.tensor([1.75]))
    assert out["w"].dtype == torch.float32


def test_fedavg_of_identical_states_is_identity_and_order_free():
    torch.manual_seed(0)
    states = [{"w": torch.randn(5, 5)} for _ in range(4)]
    forward = fedavg(states, [3, 1, 4, 1])
    backward = fedavg(states[::-1], [1, 4, 1, 3])
    assert torch.allclose(forward["w"], backward["w"], atol=1e-7)
    same = fedavg([states[0]] * 3, [2, 7, 1])
    assert torch.allclose(same["w"], states[0]["w"], atol=1e-7)


def test_fedavg_rejects_empty_and_zero_weights():
    with pytest.raises(ValueError):
        fedavg([], [])
    with pytest.raises(ValueError):
        fedavg([{"w": torch.zeros(1)}], [0])


def _global() -> dict:
    return {"w": torch.ones(3, 2), "b": torch.zeros(2)}


def test_validate_update_accepts_an_honest_update():
    update = {"w": torch.ones(3, 2) + 0.1, "b": torch.full((2,), -0.2)}
    assert validate_update(update, _global(), 30) is None


@pytest.mark.parametrize(
    "update, samples, reason",
    [
        ({"w": torch.ones(3, 2)}, 30, "missing \\['b'\\]"),
        ({"w": torch.ones(3, 2), "b": torch.zeros(2), "x": torch.zeros(1)}, 30, "unexpected \\['x'\\]"),
        ({"w": torch.ones(2, 3), "b": torch.zeros(2)}, 30, "w has shape \\(2, 3\\), expected \\(3, 2\\)"),
        ({"w": torch.ones(3, 2, dtype=torch.float64), "b": torch.zeros(2)}, 30, "w has dtype torch.float64"),
        ({"w": torch.tensor([[1.0, float("nan")]] * 3), "b": torch.zeros(2)}, 30, "w contains NaN or Inf"),
        ({"w": torch.ones(3, 2), "b": torch.tensor([float("inf"), 0.0])}, 30, "b contains NaN or Inf"),
        ({"w": torch.ones(3, 2) * 1e4, "b": torch.zeros(2)}, 30, "step norm .* exceeds"),
        ({"w": torch.ones(3, 2), "b": torch.zeros(2)}, 0, "sample count 0"),
        ({"w": torch.ones(3, 2), "b": torch.zeros(2)}, 2.5, "sample count 2.5"),
        ([torch.ones(3, 2), torch.zeros(2)], 30, "not a state dict"),
        ({"w": [[1.0, 1.0]] * 3, "b": torch.zeros(2)}, 30, "w is a list, not a tensor"),
    ],
)
def test_validate_update_names_what_is_wrong(update, samples, reason):
    assert re.search(reason, validate_update(update, _global(), samples))


def test_step_bound_scales_with_the_global_weights():
    big = {"w": torch.full((3, 2), 1000.0), "b": torch.zeros(2)}
    assert validate_update({"w": big["w"] * 2, "b": big["b"]}, big, 10) is None
    limit = MAX_STEP_NORM_RATIO * big["w"].norm().item()
    assert validate_update({"w": big["w"] + 1.01 * limit / 6**0.5, "b": big["b"]}, big, 10) is not None


def test_fedavg_rounds_integer_buffers_instead_of_truncating():
    states = [{"count": torch.tensor(7, dtype=torch.int64)} for _ in range(3)]
    assert fedavg(states, [1, 1, 1])["count"].item() == 7
    mixed = [{"count": torch.tensor(v, dtype=torch.int64)} for v in (2, 3)]
    assert fedavg(mixed, [1, 3])["count"].item() == 3  # 2.75 rounds to 3


def _report(**fields) -> ClientUpdate:
    """An honest client's update on 100 samples (2 epochs, batch 32: 4 steps each), with ``fields`` changed."""
    return ClientUpdate(**{"state": _global(), "num_samples": 100, "mean_loss": 0.7, "steps": 8, "seconds": 1.5, **fields})


TRAINING = LocalTraining(epochs=2, batch_size=32)


def test_validate_report_accepts_an_honest_report():
    from dipsen.federated.aggregate import validate_report

    assert validate_report(_report(), TRAINING) is None
    assert validate_report(_report(mean_loss=0.0, seconds=0), TRAINING) is None


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"mean_loss": float("nan")}, "mean_loss nan is not a finite number >= 0"),
        ({"mean_loss": float("inf")}, "mean_loss inf is not"),
        ({"mean_loss": -0.1}, "mean_loss -0.1 is not"),
        ({"mean_loss": "0.7"}, "mean_loss '0.7' is not"),
        ({"seconds": float("nan")}, "seconds nan is not"),
        ({"seconds": -1.0}, "seconds -1.0 is not"),
        ({"seconds": True}, "seconds True is not"),
        ({"steps": 8.0}, "steps 8.0, expected 8 \\(2 epochs of 100 samples in batches of 32\\)"),
        ({"steps": -8}, "steps -8, expected 8"),
        ({"steps": 7}, "steps 7, expected 8"),
        ({"steps": 10**9}, "steps 1000000000, expected 8"),
    ],
)
def test_validate_report_names_what_is_wrong(fields, reason):
    from dipsen.federated.aggregate import validate_report

    assert re.fullmatch(reason + ".*", validate_report(_report(**fields), TRAINING))
