"""What an attack is aimed at: the global models a run folder holds, and the data it is evaluated on.

The test set is split once, with a fixed seed, into the examples attacks are evaluated on and the
attacker's own data (used only to train a black-box surrogate), so the two never overlap and neither
overlaps the clients' training data. For windows of flows (CTU-13), whose neighbours share all but
one flow, the split is by time and no attacker window shares a flow with an evaluated one
(see :meth:`TrainedRun.attack_data`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig
from ..data import Dataset
from ..device import CPU
from ..errors import DipsenError
from ..federated import RunDir
from ..models import FederatedNet, build_model, calibrate_noise

SPLIT_SEED = 20_190_917
ATTACK_TIME_BLOCKS = 4  # windowed data: blocks of the test period that alternate between evaluation and attacker


@dataclass(frozen=True, eq=False)
class AttackData:
    """Evaluation examples and the attacker's disjoint slice of the same test set (and their test-set rows)."""

    x_eval: np.ndarray
    y_eval: np.ndarray
    x_attacker: np.ndarray
    y_attacker: np.ndarray
    eval_rows: np.ndarray
    attacker_rows: np.ndarray


class TrainedRun:
    """A finished (or partly finished) run folder: its config, data and global models.

    Its final model is the one the run ends with: the last finished round's, or, where the collapse
    guard stopped training (final_metrics.json's ``collapse``, see :mod:`dipsen.federated.engine`),
    ``best_robust.pt``'s, of round ``final_round`` = the best-robust round; ``collapse`` says so.
    Its models are placed on ``device``, where whatever attacks or certifies them computes.
    """

    def __init__(self, path: Path, dataset: Dataset | None = None, device: torch.device = CPU) -> None:
        self.device = device
        self.run = RunDir.open(Path(path))
        self.config: TrainConfig = self.run.config()
        rounds = self.run.finished_rounds()
        if not rounds:
            raise DipsenError(f"{path}: no checkpoints; train the run first")
        # only a finished run has stopped on a collapse: an unfinished one ends, so far, at its last round
        final = self.run.read_json("final_metrics.json") if self.run.finished() else {}
        self.collapse: dict | None = final.get("collapse")
        self.final_round = rounds[-1] if self.collapse is None else self.collapse["best_round"]
        self.dataset = dataset if dataset is not None else self.config.load_dataset()

    @property
    def final_model_description(self) -> str:
        """Which model the run ends with, in words: ``final global model (round N)``, or the best-robust one's."""
        if self.collapse is None:
            return f"final global model (round {self.final_round})"
        return f"best-robust global model (round {self.final_round}; robust accuracy collapsed at round {self.collapse['round']})"

    @property
    def path(self) -> Path:
        return self.run.path

    def model(self, round_: int | None = None) -> FederatedNet:
        """The global model after ``round_`` (default: the final model, see the class), in eval mode, on the run's device."""
        round_ = self.final_round if round_ is None else round_
        if self.collapse is not None and round_ == self.final_round:
            state = self._best_robust_state()
        elif round_ not in self.run.finished_rounds():
            raise DipsenError(f"{self.path}: no checkpoint for round {round_} (finished: 0..{self.run.last_round()})")
        else:
            state = self.run.load_checkpoint(round_)
        cfg = self.config
        noise = calibrate_noise(cfg.sigma, cfg.dp_epsilon, cfg.dp_delta, cfg.dp_attack_bound)
        shape = tuple(self.dataset.x_test.shape[1:])
        model = build_model(cfg.model, shape, len(self.dataset.classes), noise, cfg.alpha_dropout)
        model.load_state_dict(state)
        return model.to(self.device).eval()

    def _best_robust_state(self) -> dict:
        """The weights of ``best_robust.pt``, the model a collapsed run ends with; DipsenError if it is not that round's."""
        saved = self.run.best_robust()
        if saved is None or saved["round"] != self.final_round:
            held = "is missing" if saved is None else f"holds round {saved['round']}"
            raise DipsenError(
                f"{self.path}: training collapsed, and its final model is best_robust.pt of round {self.final_round}, "
                f"but the file {held}"
            )
        return saved["model_state"]

    def training_cost(self) -> dict | None:
        """Time per local step and per round of the training, if the run finished."""
        if not (self.path / "final_metrics.json").exists():
            return None
        return self.run.read_json("final_metrics.json").get("cost")

    def attack_data(self, samples: int, attacker_samples: int | None = None) -> AttackData:
        """``samples`` seeded test examples to attack, and the attacker's slice of the rest.

        Images: the evaluated rows are the first ``samples`` of a seeded permutation of the test set,
        the attacker's slice is (up to ``attacker_samples`` of) the rest. Windows of flows (a data set
        with ``test_origins``, CTU-13), where neighbouring windows share all but one flow: each file's
        test windows, in time order, are cut into ``ATTACK_TIME_BLOCKS`` blocks; the evaluated rows
        are the first ``samples`` of a seeded permutation of the even blocks (so at most about half
        the test windows), the attacker's slice is (up to ``attacker_samples`` of, in seeded order)
        the windows of the odd blocks that share no flow with any evaluated window.
        """
        if samples < 1:
            raise DipsenError(f"--samples must be >= 1, got {samples}")
        x, y, origins = self.dataset.x_test, self.dataset.y_test, self.dataset.test_origins
        rng = np.random.default_rng(SPLIT_SEED)
        if origins is None:
            order = rng.permutation(len(y))
            evaluated, rest = order[:samples], order[samples:]
        else:
            pool, candidates = origins.time_blocks(ATTACK_TIME_BLOCKS)
            evaluated, rest = rng.permutation(pool)[:samples], rng.permutation(candidates)
            rest = rest[~origins.shares_flows(rest, evaluated)]
        if attacker_samples is not None:
            rest = rest[:attacker_samples]
        evaluated, rest = np.sort(evaluated), np.sort(rest)
        return AttackData(x[evaluated], y[evaluated], x[rest], y[rest], evaluated, rest)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two models hold identical parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
