import pytest
import torch

from dipsen.federated import fedavg


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
