"""The learning-rate schedule: its values, the rate each round's clients train at, and resume."""

import dataclasses

import numpy as np
import pytest
import torch

from dipsen.config import TrainConfig
from dipsen.errors import DipsenError
from dipsen.federated import FederatedTraining, LocalTraining, RunDir, client_update, train
from dipsen.federated.schedule import round_lr
from dipsen.federated.workers import ClientRunner, ClientTask
from dipsen.models import build_model, calibrate_noise

TINY = dict(dataset="mnist", model="cnn", clients=4, fraction=0.5, train_subset=200, test_subset=100, seed=3, workers=1)


def test_constant_is_the_rate_itself():
    assert [round_lr("constant", 0.01, r, 7) for r in (1, 4, 7)] == [0.01, 0.01, 0.01]


def test_cyclic_is_the_triangle_through_the_middle_of_each_round():
    # rounds of 5: middles at 0.1, 0.3, 0.5, 0.7, 0.9 of the run; up to 1 at 0.4, down to 0 at 1
    expected = [0.1 / 0.4, 0.3 / 0.4, 0.5 / 0.6, 0.3 / 0.6, 0.1 / 0.6]
    assert [round_lr("cyclic", 2.0, r, 5) for r in range(1, 6)] == pytest.approx([2 * e for e in expected])
    rates = [round_lr("cyclic", 1.0, r, 100) for r in range(1, 101)]
    assert int(np.argmax(rates)) + 1 in (40, 41) and max(rates) <= 1.0 and min(rates) > 0
    with pytest.raises(ValueError, match="outside 1..5"):
        round_lr("cyclic", 1.0, 6, 5)
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        round_lr("step", 1.0, 1, 5)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_task_trains_at_its_own_rate(workers):
    torch.manual_seed(0)
    args = ("cnn", (1, 28, 28), 10, calibrate_noise(None, 1.0, 0.05, 0.1))
    model = build_model(*args)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    training = LocalTraining(lr=0.001)
    runner = ClientRunner(args, x, y, training, workers)
    try:
        own, scheduled = runner.run(state, [ClientTask(0, np.arange(64), 5), ClientTask(0, np.arange(64), 5, lr=0.01)])
    finally:
        runner.close()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runner trains: single-threaded, in this process or a worker
    try:
        at_001 = client_update(build_model(*args), state, x, y, dataclasses.replace(training, lr=0.01), 5).state
        at_0001 = client_update(build_model(*args), state, x, y, training, 5).state
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(scheduled.state[k], at_001[k]) for k in at_001)
    assert all(torch.equal(own.state[k], at_0001[k]) for k in at_0001)
    assert any(not torch.equal(at_001[k], at_0001[k]) for k in at_001)


def test_each_round_trains_at_the_scheduled_rate_and_records_it(mnist, tmp_path):
    cfg = TrainConfig(rounds=3, lr_schedule="cyclic", lr=0.004, **TINY).validate()
    run = RunDir.create(tmp_path / "cyclic", cfg)
    train(FederatedTraining(cfg, mnist), run)
    assert [r["lr"] for r in run.metrics()] == pytest.approx([round_lr("cyclic", 0.004, r, 3) for r in (1, 2, 3)])
    constant = TrainConfig(rounds=3, lr=0.004, **TINY).validate()
    flat = RunDir.create(tmp_path / "constant", constant)
    train(FederatedTraining(constant, mnist), flat)
    assert [r["lr"] for r in flat.metrics()] == [0.004] * 3
    ours, theirs = run.load_checkpoint(3), flat.load_checkpoint(3)
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)
    # the rate of every round depends on the round count: it cannot change on resume
    with pytest.raises(DipsenError, match=r"cyclic learning rate is scheduled over 3 rounds; --rounds 4"):
        run.reconfigure(rounds=4)
    assert flat.reconfigure(rounds=4).rounds == 4
