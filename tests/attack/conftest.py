"""CTU-13 fixture for the attack tests: a run folder of a small CNN trained on it (the data set: tests/conftest.py)."""

import pytest
import torch
from torch import nn

from dipsen.attack import TrainedRun
from dipsen.config import TrainConfig
from dipsen.federated import RunDir
from dipsen.models import build_model, calibrate_noise


@pytest.fixture(scope="session")
def ctu13_run(tmp_path_factory, ctu13) -> TrainedRun:
    config = TrainConfig(dataset="ctu13", model="cnn", rounds=1, seed=2).validate()
    run = RunDir.create(tmp_path_factory.mktemp("runs"), config)
    torch.manual_seed(2)
    model = build_model("cnn", (1, 28, 6), 2, calibrate_noise(None, 1.0, 0.05, 0.1))
    x, y = torch.from_numpy(ctu13.x_train[:4000]), torch.from_numpy(ctu13.y_train[:4000])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for batch in torch.randperm(len(y)).split(32):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    run.save_checkpoint(1, model.state_dict())
    return TrainedRun(run.path, ctu13)
