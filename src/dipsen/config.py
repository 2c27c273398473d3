"""Training configuration: defaults, TOML files, command-line overrides, validation.

Precedence: built-in defaults < ``--config FILE`` (TOML, flat keys named as the fields below)
< command-line flags. The resolved config is saved in every run folder and is what ``--resume``
reads back.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .data import Dataset

OPTIMIZERS = ("sgd", "adam")
ENGINES = ("inprocess", "flower")


@dataclass
class TrainConfig:
    # data
    dataset: str = "mnist"
    data_dir: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    include_background: bool = False
    bad_rows: str = "error"
    ctu13_split: str = "time"  # time | host | scenario (see dipsen.data.ctu13)
    socofing_task: str = "hand-finger"  # hand-finger | gender | hand | finger (see dipsen.data.socofing)
    # model
    model: str = "dipsen"
    sigma: float | None = None
    dp_epsilon: float = 1.0
    dp_delta: float = 0.05
    dp_attack_bound: float = 0.1
    alpha_dropout: float = 0.05
    mc_samples: int = 1
    # federation
    clients: int = 200
    fraction: float = 0.1
    rounds: int = 30
    target_accuracy: float | None = None  # stop once validation accuracy reaches it
    # a round with fewer valid client updates stops the run (resumable); None: more than half of m; 0: no minimum
    min_clients: int | None = None
    # rows held out of the training set to stop on (only with target_accuracy); None: resolved by
    # dipsen.federated.engine.resolve_validation_size to 10% of the training rows, at most 5,000
    validation_size: int | None = None
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    # local training. Adam, because the noise layer makes every later layer's gradient noisy and
    # Adam's steps, unlike SGD's, do not grow with that noise (benchmarks/training_diagnostics.py)
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 0.001
    momentum: float = 0.0  # SGD only
    # reproducibility and layout
    seed: int = 0
    workers: int | None = None  # client-training processes; None: one per CPU core, up to m
    engine: str = "inprocess"  # inprocess | flower (a Flower simulation; see dipsen.federated.flower)

    @property
    def clients_per_round(self) -> int:
        """m = max(1, floor(C * K)), computed on C as written: in floats 0.29 * 100 is 28.999..."""
        return max(1, math.floor(Fraction(repr(self.fraction)) * self.clients))

    @property
    def required_updates(self) -> int:
        """Valid client updates a round needs to count: ``min_clients``, by default more than half of m."""
        return self.clients_per_round // 2 + 1 if self.min_clients is None else self.min_clients

    def validate(self) -> TrainConfig:
        """Check every value (ConfigError names the bad one) and resolve ``workers``.

        The resolved worker count is saved with the run: float results can depend on the
        thread/process layout, so a resumed run must use the same one.
        """
        from .data import CTU13_SPLITS, DATASETS, SOCOFING_TASKS
        from .models import MODELS, calibrate_noise
        from .partition import SCHEMES

        choices = {
            "dataset": DATASETS,
            "model": MODELS,
            "partition": SCHEMES,
            "optimizer": OPTIMIZERS,
            "engine": ENGINES,
            "bad_rows": ("error", "skip"),
            "ctu13_split": CTU13_SPLITS,
            "socofing_task": SOCOFING_TASKS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.workers is None:
            self.workers = max(1, min(os.cpu_count() or 1, self.clients_per_round))
        positive_ints = ("clients", "rounds", "local_epochs", "batch_size", "mc_samples", "workers")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        # every random choice is seeded by numpy's SeedSequence from it, which takes non-negative integers
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_clients is not None and not 0 <= self.min_clients <= self.clients_per_round:
            raise ConfigError(f"min_clients must be in [0, m = {self.clients_per_round}], got {self.min_clients}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")
        if self.validation_size is not None:
            # without a target nothing stops on it: holding rows out would only take them from the clients
            if self.target_accuracy is None:
                raise ConfigError(
                    f"validation_size {self.validation_size} needs target_accuracy (it is what the target is checked on)"
                )
            if self.validation_size < 1:
                raise ConfigError(f"validation_size must be >= 1, got {self.validation_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(f"momentum {self.momentum} applies to optimizer sgd only (optimizer is {self.optimizer!r})")
        if not 0 <= self.alpha_dropout < 1:
            raise ConfigError(f"alpha_dropout must be in [0, 1), got {self.alpha_dropout}")
        calibrate_noise(self.sigma, self.dp_epsilon, self.dp_delta, self.dp_attack_bound)
        return self

    def load_dataset(self) -> Dataset:
        """The data set this config names, loaded with its data settings (every engine and the attacks use this)."""
        from .data import load_dataset

        return load_dataset(
            self.dataset,
            Path(self.data_dir) if self.data_dir else None,
            seed=self.seed,
            include_background=self.include_background,
            bad_rows=self.bad_rows,
            ctu13_split=self.ctu13_split,
            socofing_task=self.socofing_task,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
        return cls(**values)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load_config(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the TOML file at ``path`` (if any), then non-None ``overrides``."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.from_dict(values, source=str(path or "options")).validate()
    except TypeError as exc:
        raise ConfigError(f"{path or 'options'}: {exc}") from None
