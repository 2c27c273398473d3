"""Minimum participation: a round with fewer valid updates than ``min_clients`` stops the run, resumably.

The client runner here sends the global weights back unchanged (a valid update, no training), or
fails the clients a test picks, so every case runs in about a second.
"""

import math
from collections.abc import Callable

import pytest

from dipsen.config import TrainConfig
from dipsen.errors import ConfigError, DipsenError
from dipsen.federated import FederatedTraining, RunDir, train
from dipsen.federated.client import ClientUpdate
from dipsen.federated.engine import local_training
from dipsen.federated.workers import ClientFailure

SETTINGS = dict(
    dataset="mnist", model="cnn", clients=4, fraction=1.0, rounds=3, train_subset=200, test_subset=100, seed=4, workers=1
)


class ScriptedRunner:
    """Client ``c`` fails in round ``r`` where ``failing(r, c)``; every other client returns the weights it got."""

    def __init__(self, config: TrainConfig, failing: Callable[[int, int], bool], first_round: int = 1) -> None:
        self.training, self.failing, self.round = local_training(config), failing, first_round - 1

    def run(self, state, tasks):
        self.round += 1
        return [
            ClientFailure("node unavailable")
            if self.failing(self.round, task.client)
            else ClientUpdate(
                {k: v.clone() for k, v in state.items()},
                len(task.indices),
                0.5,
                self.training.epochs * math.ceil(len(task.indices) / self.training.batch_size),
                0.01,
            )
            for task in tasks
        ]

    def close(self, abort=False):
        pass


def test_a_round_below_min_clients_stops_the_run_and_resumes(mnist, tmp_path):
    cfg = TrainConfig(**SETTINGS).validate()
    assert cfg.required_updates == 3  # more than half of m = 4
    run = RunDir.create(tmp_path, cfg)
    job = FederatedTraining(cfg, mnist, runner=ScriptedRunner(cfg, lambda r, c: r == 2 and c < 2))
    message = rf"^round 2: 2 of 4 clients sent a valid update, min_clients is 3; resume with: dipsen train --resume {run.path}$"
    with pytest.raises(DipsenError, match=message):
        train(job, run)
    assert run.finished_rounds() == [0, 1] and [r["round"] for r in run.metrics()] == [1]
    assert not (run.path / "final_metrics.json").exists()

    resumed = FederatedTraining(cfg, mnist, runner=ScriptedRunner(cfg, lambda r, c: False, first_round=2))
    metrics = train(resumed, run, resume=True)
    assert metrics["rounds"] == 3 and run.finished_rounds() == [0, 1, 2, 3]


def test_a_round_whose_every_update_is_rejected_does_not_count(mnist, tmp_path):
    cfg = TrainConfig(**SETTINGS).validate()
    run = RunDir.create(tmp_path, cfg)
    with pytest.raises(DipsenError, match=r"^round 1: 0 of 4 clients sent a valid update, min_clients is 3;"):
        train(FederatedTraining(cfg, mnist, runner=ScriptedRunner(cfg, lambda r, c: True)), run)
    assert run.finished_rounds() == [0]


def test_min_clients_lets_a_round_count_with_as_many_valid_updates(mnist, tmp_path):
    cfg = TrainConfig(**{**SETTINGS, "min_clients": 2}).validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist, runner=ScriptedRunner(cfg, lambda r, c: c < 2)), run)
    assert [len(r["rejected"]) for r in run.metrics()] == [2, 2, 2]
    assert RunDir.open(run.path).config().min_clients == 2  # saved with the run, for --resume


@pytest.mark.parametrize(("fraction", "clients", "required"), [(0.1, 10, 1), (1.0, 2, 2), (0.1, 200, 11), (0.5, 10, 3)])
def test_the_default_is_more_than_half_of_m(fraction, clients, required):
    assert TrainConfig(clients=clients, fraction=fraction).validate().required_updates == required


@pytest.mark.parametrize("value, message", [(-1, "an integer >= 0"), (5, r"in \[0, m = 4\]")])
def test_min_clients_outside_zero_to_m_is_refused(value, message):
    with pytest.raises(ConfigError, match=rf"^min_clients must be {message}, got {value}$"):
        TrainConfig(clients=4, fraction=1.0, min_clients=value).validate()


def test_the_command_line_takes_min_clients(dipsen_cli, tmp_path):
    code, _, err = dipsen_cli("train", "--clients", "4", "--fraction", "1", "--min-clients", "5", "--out", str(tmp_path))
    assert code == 2 and "--min-clients must be in [0, m = 4], got 5" in err, err
    assert not any(tmp_path.iterdir())
