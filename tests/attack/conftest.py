"""Run folders holding small MNIST models trained centrally, one checkpoint per epoch.

Attacks only need a run folder with checkpoints; central training gets there in seconds.
"""

import pytest
import torch
from torch import nn

from dipsen.attack import TrainedRun
from dipsen.config import TrainConfig
from dipsen.federated import RunDir
from dipsen.models import build_model, calibrate_noise

EPOCHS = 3


def _train_run(root, mnist, model_name: str) -> TrainedRun:
    config = TrainConfig(dataset="mnist", model=model_name, rounds=EPOCHS, seed=1).validate()
    run = RunDir.create(root, config)
    torch.manual_seed(1)
    noise = calibrate_noise(config.sigma, config.dp_epsilon, config.dp_delta, config.dp_attack_bound)
    model = build_model(model_name, (1, 28, 28), 10, noise)
    run.save_checkpoint(0, model.state_dict())
    x, y = torch.from_numpy(mnist.x_train[:3000]), torch.from_numpy(mnist.y_train[:3000])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(1, EPOCHS + 1):
        model.train()
        for batch in torch.randperm(len(y)).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        run.save_checkpoint(epoch, model.state_dict())
    return TrainedRun(run.path, mnist)


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory, mnist) -> TrainedRun:
    return _train_run(tmp_path_factory.mktemp("runs"), mnist, "cnn")


@pytest.fixture(scope="session")
def dipsen_run(tmp_path_factory, mnist) -> TrainedRun:
    return _train_run(tmp_path_factory.mktemp("runs"), mnist, "dipsen")
