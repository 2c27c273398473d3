"""Session fixtures: the MNIST data set, and run folders of small MNIST models trained centrally.

Attacks and reports only need a run folder with checkpoints; central training gets there in
seconds (one checkpoint per epoch stands in for one per round).
"""

import sys
import time

import pytest
import torch
from torch import nn

from dipsen.attack import TrainedRun
from dipsen.config import TrainConfig
from dipsen.data import load_dataset
from dipsen.federated import RunDir
from dipsen.models import build_model, calibrate_noise

EPOCHS = 3


@pytest.fixture(scope="session")
def mnist():
    return load_dataset("mnist")


@pytest.fixture(scope="session")
def ctu13():
    return load_dataset("ctu13")


@pytest.fixture
def dipsen_cli(monkeypatch, capsys):
    """``dipsen ARGS`` in this process (fast enough to try every option): (exit code, stdout, stderr)."""
    from dipsen.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["dipsen", *args])
        with pytest.raises(SystemExit) as done:
            main()
        out, err = capsys.readouterr()
        return done.value.code, out, err

    return run


def _train_run(root, mnist, model_name: str) -> TrainedRun:
    config = TrainConfig(dataset="mnist", model=model_name, rounds=EPOCHS, seed=1).validate()
    run = RunDir.create(root, config)
    torch.manual_seed(1)
    noise = calibrate_noise(config.sigma, config.dp_epsilon, config.dp_delta, config.dp_attack_bound)
    model = build_model(model_name, (1, 28, 28), 10, noise)
    run.save_checkpoint(0, model.state_dict())
    x, y = torch.from_numpy(mnist.x_train[:3000]), torch.from_numpy(mnist.y_train[:3000])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    step_seconds = []
    for epoch in range(1, EPOCHS + 1):
        model.train()
        for batch in torch.randperm(len(y)).split(32):
            start = time.perf_counter()
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            step_seconds.append(time.perf_counter() - start)
        run.save_checkpoint(epoch, model.state_dict())
    run.write_json("final_metrics.json", {"cost": {"mean_step_seconds": sum(step_seconds) / len(step_seconds)}})
    return TrainedRun(run.path, mnist)


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory, mnist) -> TrainedRun:
    return _train_run(tmp_path_factory.mktemp("runs"), mnist, "cnn")


@pytest.fixture(scope="session")
def dipsen_run(tmp_path_factory, mnist) -> TrainedRun:
    return _train_run(tmp_path_factory.mktemp("runs"), mnist, "dipsen")
