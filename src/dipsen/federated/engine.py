"""The in-process federation engine: FedAvg rounds on one machine, with checkpoints and resume.

Each round t the aggregator samples m = max(1, C*K) of the K clients without replacement, every
sampled client runs :func:`client_update` from the global weights on its own partition, and
:func:`~dipsen.federated.aggregate.aggregate` combines the results: by default :func:`fedavg`
weighted by the server's sample counts (each capped at the size of the partition the server
assigned, see :mod:`dipsen.federated.aggregate`), or the robust rule the config names. The global model is evaluated on
the held-out test set after every round (on the round slice, see below); training stops after ``rounds`` rounds or as
soon as the accuracy on a validation slice reaches ``target_accuracy``. The slice is held out of the training
rows (``validation_size`` of them, seeded) before they are partitioned, so no client trains on it
and the stop never looks at the test set; nothing is held out unless a target, the robust monitor
or FLTrust's root set (a seeded part of the slice) needs it. An update that
fails :func:`validate_update` or :func:`validate_report` (or a client that fails to deliver one) is
left out of the average, logged, and recorded in the round's metrics under ``rejected``; the round
goes on with the others.

Stopping: the job's :class:`~dipsen.federated.workers.StopFlag` (set by a signal handler) is
checked between client chunks and between rounds and raises
:class:`~dipsen.federated.workers.Interrupted`; a worker process that dies fails the round with a
:class:`~dipsen.errors.DipsenError`, and so does a write to the run folder that fails (a full
disk: see :class:`RunDir`). In each case the unfinished round leaves no checkpoint, so the run
resumes from the last finished one. A worker that is alive but has not answered within
``round_timeout`` seconds (stopped, hung) is killed and replaced; its clients count as failed, so
the round goes on under ``min_clients`` like any round with failed clients.

Where the client updates run is the ``runner``'s business: by default a local
:class:`~dipsen.federated.workers.ClientRunner`; the Flower app passes one that sends them to
Flower SuperNodes. The round loop, the run folder and resume are the same for both.

Reproducibility: every random choice (but client DP's, see below) is seeded from (seed, purpose,
round, client), never from state carried between rounds, so a run resumed from the checkpoint of
round t ends with exactly the weights of an uninterrupted run. For the same reason a run, finished
or not, whose round limit is raised (:meth:`RunDir.reconfigure`, ``dipsen train --resume RUN
--rounds N``) and resumed ends with exactly the weights of a run of N rounds from the start.

Adversarial training (``adv_train``, see :mod:`dipsen.federated.adversarial`) and
``target_robust_accuracy`` hold out the validation slice too: after every round the global model's
accuracy under the :class:`~dipsen.federated.adversarial.RobustMonitor` (``robust_monitor``:
APGD-CE-40 by default) on the first ``robust_monitor_samples`` rows is recorded as
``robust_accuracy`` with the monitor's name, the global model of the best round so far is kept as
``RUN/best_robust.pt`` (the guard against catastrophic overfitting) and the run stops once
``target_robust_accuracy`` is reached. On the final model the monitor runs again at twice its steps
(:meth:`FederatedTraining.check_monitor`); final_metrics.json's ``robust_monitor_check`` says
whether the figure held, and whether a target stop can be trusted.

The collapse guard (``robust_collapse`` DROP, see :func:`detect_collapse`): FAT under label skew can
lose its robustness within a few rounds (catastrophic overfitting: PGD-3 training fell from 0.62 to
0.00 robust accuracy in ten rounds under Dirichlet(0.5)). Once an evaluated round's ``robust_accuracy``
is more than DROP below the best so far, and that best is at least :data:`COLLAPSE_MIN_BEST`, the run
stops after that round c and ends with the model of ``best_robust.pt`` (round b): final_metrics.json
describes that model and records ``collapse`` (c, b, both figures, DROP), and
:class:`~dipsen.attack.target.TrainedRun` attacks and certifies it as the run's final model. The round
checkpoints stay what they always are, the global model after each round (round c's is the collapsed
one), and with the guard on :meth:`RunDir.save_checkpoint` keeps around round b what the
``keep_checkpoints`` rule keeps around the newest round (the orange-box attack's stale model of b).
The decision is a function of metrics.jsonl alone, so a resumed run finds the same collapse and trains
no further, whatever its round limit.

The round slice (``round_eval_size`` n, see :func:`round_eval_rows`): a round's ``test_accuracy`` (and a
backdoor's ``attack_success_rate``) is measured on a seeded sample of n test rows, the same rows in every round
and in both engines, so that evaluation stays a small share of a round; the round a run ends with is measured on
the whole test set instead: the ``rounds``-th, and the round a target or the collapse guard stops the run at
(:meth:`FederatedTraining.evaluate_in_full`, once the stop is decided). Each metrics.jsonl record says which in
``eval_rows``. No decision looks at the test set, slice or whole: a target is decided on the validation slice,
and only then is the round measured in full. final_metrics.json is always of the whole test set (:func:`_finish`).
A run extended after it finished (``--resume --rounds``) keeps its former last round's whole-set record, where a
run as long from the start has a slice's: the weights and final metrics are the same.

``eval_every`` N > 1 thins all three evaluations to every N-th round and the run's last
(:meth:`FederatedTraining.evaluates`): the other rounds record null, and the targets and
``best_robust.pt`` are decided on the evaluated rounds only. Each evaluation seeds its own draws,
so the weights of every round are those of a run that evaluates every round.

Client-level differential privacy (``client_dp_noise`` or ``client_dp_epsilon``, see
:mod:`dipsen.federated.privacy`): :func:`aggregation` carries the noise multiplier into
:func:`~dipsen.federated.aggregate.aggregate`. Its noise and the round's client sample are the two
draws NOT seeded from the config: they come from the OS CSPRNG (:attr:`FederatedTraining.secret_draws`),
so a DP run is not reproducible and its metrics record how many clients a round sampled, not which
(``client_dp_insecure_seeded_noise`` seeds them again, for tests, and voids the guarantee). Each
round's metrics record the epsilon spent through that round, final_metrics.json the run's
``client_dp``. Both engines aggregate here, so both get it.

Simulated malicious clients (``malicious_fraction``, ``malicious_attack``; in-process only, see
:mod:`dipsen.federated.poisoning`): a seeded set of clients, recorded in run_info.json as
``malicious``. :meth:`FederatedTraining.run_round` marks their tasks for label flipping where the
attack trains on flipped labels, and once the round's updates are in, has the adversary turn the
malicious ones into what the attack sends (:meth:`~dipsen.federated.poisoning.Adversary.send_round`:
they collude, and may see the honest ones) before validating them like any other.

Checkpoints: every round's is saved through :meth:`RunDir.save_checkpoint`, which keeps those the
run's ``keep_checkpoints`` rule keeps (see :mod:`dipsen.federated.run_dir`), always the newest.

Experiment tracking (``log_to``): each metrics.jsonl row, right after it is written, and the final
metrics also go to the run's TensorBoard log (see :mod:`dipsen.federated.tracking`); the round loop
is the one writer of metrics.jsonl for both engines, so both log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from ..config import TrainConfig
from ..data import Dataset
from ..device import host_state, resolve_device
from ..errors import ConfigError, DipsenError
from ..metrics import evaluate_model, predict_labels
from ..models import build_model, calibrate_noise, prediction_rule
from ..partition import partition, summarize
from .adversarial import RobustMonitor
from .aggregate import Aggregation, aggregate_round, min_updates, root_rows, server_counts, validate_report, validate_update
from .client import ClientUpdate, LocalTraining, StateDict, client_update
from .poisoning import adversary
from .poisoning.backdoor import attack_success_rate, backdoor_trigger, triggered_test_rows
from .privacy import ClientDP, client_dp
from .run_dir import BEST_ROBUST, RunDir
from .schedule import round_lr
from .tracking import Tracker, open_tracker
from .workers import ClientFailure, ClientRunner, ClientTask, StopFlag, WorkerDied

if TYPE_CHECKING:  # dipsen.attack imports dipsen.federated
    from ..attack.domain import FeasibleDomain

log = logging.getLogger(__name__)

_INIT, _CLIENT, _EVAL, _SAMPLE, _SUBSET, _PARTITION, _VALIDATION = range(7)
_ROBUST = 7
_CLIENT_DP = 8  # the noise of client-level DP (see dipsen.federated.privacy)
_MALICIOUS = 9  # simulated malicious clients: which ones, and their attacks' draws (see dipsen.federated.poisoning)
_BACKDOOR = 10  # the noise draws of a randomized model's predictions on the triggered test rows
_ROUND_EVAL = 11  # the round slice of the test set (round_eval_size)

# default validation slice: this share of the training rows, at most VALIDATION_CAP of them
VALIDATION_SHARE, VALIDATION_CAP = 0.1, 5000
COLLAPSE_MIN_BEST = 0.3
"""The least best robust accuracy the collapse guard protects: a fall from below it is a model that never held
robustness, or the noise of the first rounds (0.39 PGD-10 at round 10 of the collapsed label-skew run), not a
collapse of robustness it had."""


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that depends on every key (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class Runner(Protocol):
    """Runs a round's client updates, one result per task, in task order."""

    def run(self, state: StateDict, tasks: Sequence[ClientTask]) -> list[ClientUpdate | ClientFailure]: ...

    def close(self, abort: bool = False) -> None: ...


@dataclass(frozen=True)
class RoundResult:
    round: int
    test_accuracy: float | None  # None in a round that eval_every skips
    # the test rows test_accuracy and attack_success_rate are of: the round slice's, or the whole test set's in the
    # round the run ends with (FederatedTraining.evaluate_in_full); None in a round that eval_every skips
    eval_rows: int | None
    validation_accuracy: float | None  # None where no slice is held out (holds_out_validation) or in a skipped round
    robust_accuracy: float | None  # the monitor's accuracy on the validation slice; None unless robust_evaluation, or skipped
    train_loss: float | None  # None when every update of the round was rejected
    clients: list[int] | None  # the sampled clients; None in a client-DP run, whose sample is secret
    sampled: int  # how many clients the round sampled (m)
    samples: int
    steps: int
    train_seconds: float
    eval_seconds: float  # evaluation of the new global model: test set (or round slice), and validation slice if any
    step_seconds: float
    rejected: list[dict] = field(default_factory=list)  # {"client": id (None in a client-DP run), "reason": why}
    # client-level DP: the epsilon (at the run's client_dp_delta) of the models of rounds 1..round; None without it
    client_dp_epsilon: float | None = None
    lr: float | None = None  # the clients' learning rate this round (lr_schedule); None in runs older than it
    robust_monitor: str | None = None  # the attack behind robust_accuracy, e.g. "apgd-ce-40, 250 validation rows"
    # a backdoor attack's success rate: the share of triggered test rows not of the target class predicted as it
    attack_success_rate: float | None = None
    # the clients whose updates a filtering rule (krum, multi-krum, bulyan, dnc, flame, fltrust) admitted into the
    # new weights; None for the rules that weigh every update, after a pre-aggregation, and in a client-DP run
    admitted: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def aggregation(config: TrainConfig, dp: ClientDP | None) -> Aggregation:
    """The server's rule from ``config``, with the noise multiplier of its client-level DP ``dp`` (:func:`client_dp`)."""
    return Aggregation(
        config.aggregator,
        config.trim_fraction,
        config.byzantine,
        config.clip_norm,
        config.max_client_weight,
        noise_multiplier=None if dp is None else dp.noise_multiplier,
        sampled=config.clients_per_round,
        cc_tau=config.cc_tau,
        cc_iterations=config.cc_iterations,
        dnc_iterations=config.dnc_iterations,
        dnc_coordinates=config.dnc_coordinates,
        pre_aggregation=config.pre_aggregation,
        bucket_size=config.bucket_size,
        flame_lambda=config.flame_lambda,
    )


def local_training(config: TrainConfig, domain: FeasibleDomain | None = None, num_classes: int | None = None) -> LocalTraining:
    """The client-side settings of ``config``; ``domain`` (:func:`training_domain`) is needed with ``adv_train``,
    the data set's ``num_classes`` with ``adv_loss`` calfat (the length of each client's label prior)."""
    return LocalTraining(
        config.local_epochs,
        config.batch_size,
        config.optimizer,
        config.lr,
        config.momentum,
        config.input_noise,
        config.adv_train,
        config.adv_eps,
        config.adv_steps,
        config.adv_step_size,
        config.adv_mix,
        domain,
        config.train_dtype,
        adv_loss=config.adv_loss,
        trades_beta=config.trades_beta,
        num_classes=num_classes,
        proximal_mu=config.proximal_mu,
        smoothing_loss=config.smoothing_loss,
        consistency_lambda=config.consistency_lambda,
        consistency_copies=config.consistency_copies,
        consistency_eta=config.consistency_eta,
        smoothadv_eps=config.smoothadv_eps,
        smoothadv_steps=config.smoothadv_steps,
        smoothadv_copies=config.smoothadv_copies,
    )


def training_domain(config: TrainConfig, dataset: Dataset) -> FeasibleDomain | None:
    """The data set's feasible domain (the attacks' own) when the run crafts adversarial examples, else None."""
    if not config.robust_evaluation:
        return None
    from ..attack.domain import feasible_domain  # not at the top: dipsen.attack imports dipsen.federated

    return feasible_domain(dataset)


def sample_clients(config: TrainConfig, round_: int) -> list[int]:
    rng = np.random.default_rng(derive_seed(config.seed, _SAMPLE, round_))
    return sorted(rng.choice(config.clients, size=config.clients_per_round, replace=False).tolist())


def _subset(x: np.ndarray, y: np.ndarray, size: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if size is None or size >= len(y):
        return x, y
    keep = np.sort(np.random.default_rng(seed).choice(len(y), size=size, replace=False))
    return x[keep], y[keep]


def round_eval_rows(config: TrainConfig, test_rows: int) -> np.ndarray | None:
    """The round slice: the indices (sorted) of the ``round_eval_size`` test rows every round but the last is evaluated on.

    A seeded sample drawn once, so the same rows in every round, after a resume and on either engine (both
    evaluate through :class:`FederatedTraining`). None, the whole test set, where ``round_eval_size`` is 0 or at
    least the ``test_rows`` (after ``test_subset``): a larger slice is clamped to the test set.
    """
    size = config.round_eval_size
    if size == 0 or size >= test_rows:
        return None
    rng = np.random.default_rng(derive_seed(config.seed, _ROUND_EVAL))
    return np.sort(rng.choice(test_rows, size=size, replace=False))


@dataclass(frozen=True)
class FederatedData:
    """The run's training rows (split into client partitions), validation slice and test rows."""

    x_train: np.ndarray  # the rows the clients are partitioned over; the validation slice is not among them
    y_train: np.ndarray
    x_validation: np.ndarray  # empty without a target
    y_validation: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    parts: list[np.ndarray]  # parts[c]: the rows of x_train that client c holds


def resolve_validation_size(config: TrainConfig, dataset: Dataset) -> None:
    """Set ``config.validation_size`` to the held-out slice's size, if the config holds one out (``holds_out_validation``).

    Default: 10% of the training rows (after ``train_subset``), at most 5,000. Resolved in the
    config, as ``validate`` resolves ``workers``, so that config.json names the slice and every
    process rebuilding the partition (a resumed run, a Flower node) holds out the same rows.
    """
    if not config.holds_out_validation or config.validation_size is not None:
        return
    rows = len(dataset.y_train) if config.train_subset is None else min(config.train_subset, len(dataset.y_train))
    config.validation_size = max(1, min(VALIDATION_CAP, int(VALIDATION_SHARE * rows)))


def federated_data(config: TrainConfig, dataset: Dataset) -> FederatedData:
    """Subsets, validation slice and client partitions of ``dataset``: a function of the config and the data.

    Resolves ``config.validation_size`` first (:func:`resolve_validation_size`). Without a held-out
    slice the training rows and their partition are exactly those of a run without validation.
    """
    resolve_validation_size(config, dataset)
    seed = config.seed
    x_train, y_train = _subset(dataset.x_train, dataset.y_train, config.train_subset, derive_seed(seed, _SUBSET, 0))
    x_test, y_test = _subset(dataset.x_test, dataset.y_test, config.test_subset, derive_seed(seed, _SUBSET, 1))
    x_validation, y_validation = x_train[:0], y_train[:0]
    if config.validation_size is not None:
        if config.validation_size >= len(y_train):
            raise ConfigError(
                f"validation_size {config.validation_size} leaves none of the {len(y_train)} training rows to the clients"
            )
        held_out = np.zeros(len(y_train), dtype=bool)
        rng = np.random.default_rng(derive_seed(seed, _VALIDATION))
        held_out[rng.choice(len(y_train), size=config.validation_size, replace=False)] = True
        x_validation, y_validation = x_train[held_out], y_train[held_out]
        x_train, y_train = x_train[~held_out], y_train[~held_out]
    parts = partition(
        y_train,
        config.clients,
        config.partition,
        alpha=config.dirichlet_alpha,
        shards_per_client=config.shards_per_client,
        seed=derive_seed(seed, _PARTITION),
    )
    return FederatedData(x_train, y_train, x_validation, y_validation, x_test, y_test, parts)


def model_args(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> tuple:
    """The arguments of :func:`build_model` for ``config``'s model on this data."""
    noise = calibrate_noise(config.sigma, config.dp_epsilon, config.dp_delta, config.dp_attack_bound)
    return (config.model, tuple(input_shape), num_classes, noise, config.alpha_dropout)


class FederatedTraining:
    """Everything one federated run needs: data, partition, model, and the round loop."""

    def __init__(self, config: TrainConfig, dataset: Dataset, runner: Runner | None = None, stop: StopFlag | None = None) -> None:
        """Prepare everything; raises on bad settings before any file is written.

        ``runner`` runs the client updates; default: a local pool of ``config.workers`` processes.
        ``stop``, once set, stops the run between client chunks and rounds (see :func:`train`).
        """
        self.config, self.dataset = config, dataset
        data = federated_data(config, dataset)
        self.x_test, self.y_test, self.parts = data.x_test, data.y_test, data.parts
        self.x_validation, self.y_validation = data.x_validation, data.y_validation
        self.x_train, self.y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
        self.model_args = model_args(config, data.x_train.shape[1:], len(dataset.classes))
        self.noise = self.model_args[3]  # the calibrated noise that build_model receives
        self.client_dp = client_dp(config)  # client-level DP (z calibrated here if a target epsilon is set), or None
        # simulated malicious clients, or None; a backdoor's trigger depends on the data (CTU-13's scaler)
        self.adversary = adversary(config, derive_seed(config.seed, _MALICIOUS), backdoor_trigger(config, dataset))
        # the round slice's rows, which every round but the run's last is evaluated on (the whole test set if no slice)
        rows = round_eval_rows(config, len(self.y_test))
        self.x_round: np.ndarray = self.x_test if rows is None else self.x_test[rows]
        self.y_round: np.ndarray = self.y_test if rows is None else self.y_test[rows]
        # a backdoor's ASR rows (None without one): of the whole test set, and of the round slice
        self.triggered = self._triggered_test_rows(len(dataset.classes), self.x_test, self.y_test)
        self.round_triggered = self.triggered
        if rows is not None:
            self.round_triggered = self._triggered_test_rows(len(dataset.classes), self.x_round, self.y_round)
        self.aggregation = aggregation(config, self.client_dp)
        # FLTrust's root set: the server trains its own update on these rows of the validation slice, drawn with
        # the validation key of round 0, which no evaluation uses (they start at round 1); None for other rules
        self.root = (
            root_rows(self.x_validation, self.y_validation, config.fltrust_root_size, derive_seed(config.seed, _VALIDATION, 0))
            if config.aggregator == "fltrust"
            else None
        )
        self.device = resolve_device(config.device)
        torch.manual_seed(derive_seed(config.seed, _INIT))
        self.model = build_model(*self.model_args).to(self.device)  # initialised on the CPU: the same weights on any device
        self.domain = training_domain(config, dataset)
        self.monitor = (
            RobustMonitor(config.robust_monitor, config.robust_monitor_steps, config.robust_monitor_samples)
            if config.robust_evaluation
            else None
        )
        self.training = local_training(config, self.domain, len(dataset.classes))
        self.stop = stop or StopFlag()
        self.clients = runner or ClientRunner(
            self.model_args,
            self.x_train,
            self.y_train,
            self.training,
            config.workers or 1,
            self.stop,  # validate() set it
            config.round_timeout,
            self.device,
        )

    def close(self, abort: bool = False) -> None:
        """Stop the client runner (worker processes, if any)."""
        self.clients.close(abort)

    def __enter__(self) -> FederatedTraining:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(abort=exc_type is not None)

    def describe(self) -> dict:
        """What run_info.json records: data, model, noise calibration, prediction rule.

        ``dataset`` and ``dataset_counts`` describe the whole data set as loaded; the ``*_used``
        counts and ``validation`` are the rows this run uses, after subsets and the held-out slice.
        """
        config = self.config
        validation = None
        if config.validation_size is not None:
            validation = {
                "samples": int(len(self.y_validation)),
                "held_out_of": "the training rows (after train_subset), before partitioning",
                "seed": derive_seed(config.seed, _VALIDATION),
                "class_counts": np.bincount(self.y_validation, minlength=len(self.dataset.classes)).tolist(),
                "robust_accuracy_samples": self.monitor_rows if self.monitor else None,
                "robust_monitor": self.monitor_name,
            }
        return {
            "dataset": self.dataset.info,
            "dataset_counts": {"train": int(len(self.dataset.y_train)), "test": int(len(self.dataset.y_test))},
            "classes": list(self.dataset.classes),
            "train_samples_used": int(len(self.y_train)),
            "validation": validation,
            "test_samples_used": int(len(self.y_test)),
            "round_evaluation": self.round_evaluation(),
            "model": self.config.model,
            "device": str(self.device),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "noise": {**asdict(self.noise), "std": self.noise.std} if self.model.is_randomized else None,
            "prediction_rule": prediction_rule(self.model, self.config.mc_samples),
            "clients_per_round": self.config.clients_per_round,
            "client_dp": None if self.client_dp is None else self.client_dp.settings(),
            "malicious": None if self.adversary is None else self.adversary.describe(),
        }

    def round_evaluation(self) -> dict:
        """What run_info.json records of the round slice (:func:`round_eval_rows`): its rows, of how many, and its seed."""
        rows, of = self.test_rows(whole=False), self.test_rows()
        return {"rows": rows, "of": of, "seed": None if rows == of else derive_seed(self.config.seed, _ROUND_EVAL)}

    def _triggered_test_rows(self, classes: int, x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
        """The rows of (x, y) a backdoor's success is measured on (see dipsen.federated.poisoning.backdoor); None without one."""
        poison = None if self.adversary is None else self.adversary.backdoor
        if poison is None or poison.trigger is None:
            return None
        if poison.target >= classes:
            raise ConfigError(f"backdoor_target {poison.target} is no class of {self.config.dataset} (0 to {classes - 1})")
        try:
            rows = triggered_test_rows(torch.from_numpy(x), torch.from_numpy(y), poison.trigger, poison.target)
        except ValueError as exc:  # the trigger does not fit the inputs
            raise ConfigError(f"trigger_size {poison.trigger.size}: {exc}") from None
        return rows.numpy()

    def attack_success_rate(self, round_: int, whole: bool = True) -> float | None:
        """The backdoor's success rate on the global model (None without a backdoor attack): on the triggered rows of
        the whole test set, or (``whole`` False) of the round slice."""
        triggered = self.triggered if whole else self.round_triggered
        if triggered is None:
            return None
        assert self.adversary is not None and self.adversary.backdoor is not None
        torch.manual_seed(derive_seed(self.config.seed, _BACKDOOR, round_))
        predictions = predict_labels(self.model, triggered, self.config.mc_samples)
        return attack_success_rate(predictions, self.adversary.backdoor.target)

    def evaluates(self, round_: int) -> bool:
        """Whether the global model of ``round_`` is evaluated: every ``eval_every``-th round and the last."""
        return round_ % self.config.eval_every == 0 or round_ == self.config.rounds

    def test_rows(self, whole: bool = True) -> int:
        """How many rows :meth:`test_accuracy` evaluates on: the whole test set's, or (``whole`` False) the round slice's."""
        return len(self.y_test) if whole else len(self.y_round)

    def test_accuracy(self, round_: int, whole: bool = True) -> float:
        """The global model's accuracy on the whole test set, or (``whole`` False) on the round slice (``round_eval_rows``)."""
        x, y = (self.x_test, self.y_test) if whole else (self.x_round, self.y_round)
        torch.manual_seed(derive_seed(self.config.seed, _EVAL, round_))
        predictions = predict_labels(self.model, x, self.config.mc_samples)
        return float((predictions == y).mean())

    def evaluate_in_full(self, result: RoundResult) -> RoundResult:
        """``result`` with its test-set figures of the whole test set: for the round the run ends with (see :func:`train`).

        The global model must still be ``result``'s round's. Unchanged if it was measured on the whole set already
        (the ``rounds``-th round, or no round slice); the time it takes is added to ``eval_seconds``.
        """
        if result.eval_rows == len(self.y_test):
            return result
        start = time.perf_counter()
        return replace(
            result,
            test_accuracy=self.test_accuracy(result.round),
            eval_rows=len(self.y_test),
            attack_success_rate=self.attack_success_rate(result.round),
            eval_seconds=result.eval_seconds + time.perf_counter() - start,
        )

    def validation_accuracy(self, round_: int) -> float | None:
        """Accuracy on the held-out validation slice; None when there is none (see TrainConfig.holds_out_validation)."""
        if self.config.validation_size is None:
            return None
        # a seed of its own: the test evaluation's draws stay those of a run without a target
        torch.manual_seed(derive_seed(self.config.seed, _VALIDATION, round_))
        predictions = predict_labels(self.model, self.x_validation, self.config.mc_samples)
        return float((predictions == self.y_validation).mean())

    @property
    def monitor_rows(self) -> int:
        """How many validation rows the robust monitor attacks (``robust_monitor_samples``, at most the slice)."""
        return 0 if self.monitor is None else min(self.monitor.samples, len(self.y_validation))

    @property
    def monitor_name(self) -> str | None:
        """The monitor as metrics.jsonl names it, e.g. ``apgd-ce-40, 250 validation rows``; None without one."""
        return None if self.monitor is None else f"{self.monitor.label()}, {self.monitor_rows} validation rows"

    def robust_accuracy(self, round_: int, steps: int | None = None) -> float | None:
        """The monitor's accuracy at ``adv_eps`` on the validation slice (at ``steps``, default its own); None without one.

        On the first ``robust_monitor_samples`` rows of the validation slice, not of the test set:
        the slice is held out of every client's rows and, like the stop on ``target_accuracy``, the
        stop on ``target_robust_accuracy`` and the choice of ``best_robust.pt`` never look at the
        test set. Its rows are a seeded random sample of the training rows, so the first ones are
        a fixed random sample too, the same every round (and after a resume).
        """
        if self.monitor is None:
            return None
        assert self.domain is not None  # training_domain, since robust_evaluation
        seed = derive_seed(self.config.seed, _ROBUST, round_)
        x, y = self.x_validation[: self.monitor_rows], self.y_validation[: self.monitor_rows]
        return self.monitor.accuracy(self.model, x, y, self.config.adv_eps, self.domain, self.config.mc_samples, seed, steps)

    def check_monitor(self, history: list[dict]) -> dict | None:
        """The doubling check of the final model's ``robust_accuracy``: the monitor again at twice its steps.

        A fall of more than :data:`~dipsen.federated.adversarial.MONITOR_TOLERANCE` means the monitor
        had not converged: its figures overstate, and so a stop on ``target_robust_accuracy``
        (``target_reliable``) or the choice of ``best_robust.pt`` may rest on an artefact. None
        without a monitor or when the last round recorded no figure.
        """
        last = history[-1] if history else {}
        if self.monitor is None or last.get("robust_accuracy") is None:
            return None
        steps = [self.monitor.steps, 2 * self.monitor.steps]
        accuracy = [last["robust_accuracy"], self.robust_accuracy(last["round"], steps[1])]
        converged = self.monitor.converged(accuracy[0], accuracy[1], self.monitor_rows)
        reliable = None if self.config.target_robust_accuracy is None else converged
        return {
            "monitor": self.monitor_name,
            "steps": steps,
            "accuracy": accuracy,
            "converged": converged,
            "target_reliable": reliable,
        }

    @property
    def secret_draws(self) -> bool:
        """Whether the client sample and the server's noise come from the OS CSPRNG (client DP; see :mod:`.privacy`)."""
        return self.client_dp is not None and not self.client_dp.seeded

    def _server_update(self, training: LocalTraining) -> Callable[[StateDict, int], StateDict]:
        """FLTrust's server update: ``training`` from the global weights on the root rows, with the rule's seed."""
        assert self.root is not None
        x_root, y_root = self.root
        return lambda state, seed: client_update(self.model, state, x_root, y_root, training, seed).state

    def run_round(self, round_: int, global_state: dict) -> tuple[dict, RoundResult]:
        start = time.perf_counter()
        secret_dp = self.client_dp if self.secret_draws else None
        secret = secret_dp is not None
        clients = secret_dp.sample_clients() if secret_dp else sample_clients(self.config, round_)
        poison = self.adversary  # simulated malicious clients (see dipsen.federated.poisoning), or None
        lr = round_lr(self.config.lr_schedule, self.config.lr, round_, self.config.rounds)
        tasks = [
            ClientTask(
                c,
                self.parts[c],
                derive_seed(self.config.seed, _CLIENT, round_, c),
                None if poison is None else poison.data_poison(c, round_),  # flipped labels, a backdoor's trigger
                lr,
            )
            for c in clients
        ]
        updates: list[ClientUpdate] = []
        valid_clients: list[int] = []
        rejected: list[dict] = []
        if poison is not None and poison.pulls(round_):  # alie-backdoor's malicious clients train after the honest ones
            outcomes = poison.train_round(self.clients.run, global_state, tasks, self.training)
        else:
            outcomes = self.clients.run(global_state, tasks)
        if poison is not None:  # the malicious clients collude: the adversary crafts the round's updates at once
            seeds = [derive_seed(self.config.seed, _MALICIOUS, round_, c) for c in clients]
            outcomes = poison.send_round(clients, outcomes, global_state, self.training, seeds, round_)
        for task, outcome in zip(tasks, outcomes, strict=True):
            if isinstance(outcome, ClientFailure):
                reason: str | None = outcome.reason
            else:
                reason = validate_update(outcome.state, global_state, outcome.num_samples) or validate_report(
                    outcome, self.training
                )
            if reason is None and isinstance(outcome, ClientUpdate):
                updates.append(outcome)
                valid_clients.append(task.client)
            else:
                who = None if secret else task.client  # a DP round's log names no client: its sample is secret
                log.warning("round %d: rejected the update of client %s: %s", round_, "(secret)" if secret else who, reason)
                rejected.append({"client": who, "reason": reason})
        # the weights are the server's: a count is capped at the size of the partition the server assigned
        counts = server_counts([u.num_samples for u in updates], [len(self.parts[c]) for c in valid_clients])
        for client, update, count in zip(valid_clients, updates, counts, strict=True):
            if count < update.num_samples and not secret:
                log.warning("round %d: client %d claims %d samples, its partition %d", round_, client, update.num_samples, count)
        spec = self.aggregation
        if self.root is not None:  # FLTrust's server step, trained at the round's rate as its clients train
            spec = replace(spec, server_update=self._server_update(self.training.at_rate(lr)))
        # too few updates for the rule: the global model stays, and the round fails on required_updates.
        # With client DP even none is aggregated: the noise alone, so that no release tells that none came
        need = min_updates(spec.rule, spec.byzantine, spec.pre_aggregation, spec.bucket_size)
        enough = (bool(updates) or spec.noise_multiplier is not None) and len(updates) >= need
        noise_seed = secret_dp.noise_seed() if secret_dp else derive_seed(self.config.seed, _CLIENT_DP, round_)
        new_state, admitted = global_state, None
        if enough:
            new_state, admitted = aggregate_round([u.state for u in updates], counts, global_state, spec, noise_seed)
        self.model.load_state_dict(new_state)
        trained = time.perf_counter()
        evaluated = self.evaluates(round_)
        whole = round_ == self.config.rounds  # the last round: the whole test set; the others the round slice
        accuracy = self.test_accuracy(round_, whole) if evaluated else None
        validation_accuracy = self.validation_accuracy(round_) if evaluated else None
        robust_accuracy = self.robust_accuracy(round_) if evaluated else None
        success = self.attack_success_rate(round_, whole) if evaluated else None
        # at the server's capped counts, not the steps a client reports for the count it claims
        steps = sum(self.training.steps_for(c) for c in counts)
        samples = sum(counts) * self.config.local_epochs
        result = RoundResult(
            round=round_,
            test_accuracy=accuracy,
            eval_rows=self.test_rows(whole) if evaluated else None,
            validation_accuracy=validation_accuracy,
            robust_accuracy=robust_accuracy,
            robust_monitor=self.monitor_name if robust_accuracy is not None else None,
            train_loss=float(np.average([u.mean_loss for u in updates], weights=counts)) if updates else None,
            clients=None if secret else clients,
            sampled=len(clients),
            samples=samples,
            steps=steps,
            train_seconds=trained - start,
            eval_seconds=time.perf_counter() - trained,
            step_seconds=sum(u.seconds for u in updates) / max(steps, 1),
            rejected=rejected,
            client_dp_epsilon=None if self.client_dp is None else self.client_dp.epsilon(round_),
            lr=lr,
            attack_success_rate=success,
            admitted=None if admitted is None or secret else [valid_clients[i] for i in admitted],
        )
        return new_state, result


def train(
    job: FederatedTraining,
    run: RunDir,
    *,
    resume: bool = False,
    on_round: Callable[[RoundResult | None, int], None] | None = None,
    lock_held_by: int | None = None,
) -> dict:
    """Run (or resume) ``job`` in ``run``; returns the final metrics. Closes ``job`` at the end.

    ``resume`` goes on from the last checkpoint up to ``job.config.rounds`` (a finished run whose
    limit was raised included) and writes final_metrics.json anew.

    ``on_round(result, start_round)`` is called once before the first round (result None) and after
    every finished round, for progress display. Raises :class:`~dipsen.federated.workers.Interrupted`
    once ``job.stop`` is set (checked between client chunks, between rounds and before the final
    evaluation) and :class:`~dipsen.errors.DipsenError` if a worker process dies; the run folder
    then holds the rounds finished so far, ready for ``resume``.

    ``lock_held_by``: the PID of the process that holds ``run``'s lock for this one (the Flower
    launcher, for its ServerApp); it is checked instead of taken (see :meth:`RunDir.lock`).
    """
    with (
        job,
        run.lock(held_by=lock_held_by),  # one writer per run folder: a second train() or --resume is refused
        open_tracker(job.config.log_to, run.path, run.last_round() if resume else None) as tracker,
    ):
        return _train(job, run, resume, on_round, tracker)


def _train(job: FederatedTraining, run: RunDir, resume: bool, on_round, tracker: Tracker | None) -> dict:
    config = job.config
    history: list[dict] = []
    last = run.last_round() if resume else None
    if last is None:
        run.write_json("run_info.json", job.describe())
        run.write_json("partition.json", summarize(job.parts, job.y_train.numpy(), len(job.dataset.classes)))
        state = host_state(job.model)
        run.save_checkpoint(0, state)
        start_round = 0
    else:
        history = run.keep_metrics_through(last)
        state = run.load_checkpoint(last)
        job.model.load_state_dict(state)
        start_round = last
        _restore_best_robust(run, history, last, state)
        if tracker and history:
            tracker.log_round(history[-1])  # the log dropped round `last` and later: see dipsen.federated.tracking
    if on_round:
        on_round(None, start_round)
    done = _stops(config, history)
    if resume and (collapse := _collapsed(config, history)) is not None:
        log.warning(
            "%s stopped at round %d by the collapse guard (robust accuracy %.3f, best %.3f at round %d): nothing to train",
            run.path,
            collapse["round"],
            collapse["at"],
            collapse["best"],
            collapse["best_round"],
        )
    round_ = start_round
    while not done and round_ < config.rounds:
        job.stop.check()
        round_ += 1
        try:
            state, result = job.run_round(round_, state)
        except WorkerDied as exc:
            raise DipsenError(f"{exc} during round {round_}; resume with: dipsen train --resume {run.path}") from None
        valid = result.sampled - len(result.rejected)
        if valid < config.required_updates:  # too few clients to trust the round: it is not saved
            raise DipsenError(
                f"round {round_}: {valid} of {result.sampled} clients sent a valid update, "
                f"min_clients is {config.required_updates}; resume with: dipsen train --resume {run.path}"
            )
        done = _stops(config, [*history, result.to_dict()])
        if done:  # a target or the collapse guard ends the run here: its last round is measured on the whole test set
            result = job.evaluate_in_full(result)
        run.append_metrics(result.to_dict())  # before the checkpoint: see RunDir.keep_metrics_through
        if tracker:
            tracker.log_round(result.to_dict())
        run.save_checkpoint(round_, state)
        history.append(result.to_dict())
        if result.robust_accuracy is not None and _best_robust_round(history) == round_:
            run.save_best_robust(round_, result.robust_accuracy, state)  # after the checkpoint: see _restore_best_robust
        if on_round:
            on_round(result, start_round)
    job.stop.check()
    metrics = _finish(job, run, history)
    if tracker:
        tracker.log_final(metrics)
    return metrics


def training_cost(history: list[dict]) -> dict | None:
    """Mean time per local step and per round; throughput counts training + aggregation time."""
    if not history:
        return None
    train_seconds = sum(r["train_seconds"] for r in history)
    return {
        "mean_step_seconds": float(np.mean([r["step_seconds"] for r in history])),
        "mean_round_seconds": float(np.mean([r["train_seconds"] + r["eval_seconds"] for r in history])),
        "mean_eval_seconds": float(np.mean([r["eval_seconds"] for r in history])),
        "train_samples_per_second": float(sum(r["samples"] for r in history) / train_seconds),
    }


def _stops(config: TrainConfig, history: list[dict]) -> bool:
    """Whether the run ends after the last round of ``history`` before its round limit: a target or the collapse guard."""
    return _target_reached(config, history) or _collapsed(config, history) is not None


def _target_reached(config: TrainConfig, history: list[dict]) -> bool:
    """Whether the last round's validation or robust accuracy reached its target (never the test accuracy).

    With both targets set, either one stops the run.
    """
    if not history:
        return False
    last = history[-1]
    clean = config.target_accuracy is not None and (last["validation_accuracy"] or 0.0) >= config.target_accuracy
    robust = config.target_robust_accuracy is not None and (last.get("robust_accuracy") or 0.0) >= config.target_robust_accuracy
    return clean or robust


def detect_collapse(history: list[dict], drop: float, min_best: float = COLLAPSE_MIN_BEST) -> dict | None:
    """The first round of ``history`` whose ``robust_accuracy`` fell more than ``drop`` below the best before it.

    The rule, on the evaluated rounds in order (null figures, rounds ``eval_every`` skips, are passed
    over): round c collapsed if best - a_c > ``drop``, where best is the highest figure of the rounds
    before c (its round b the earliest of equals, as ``best_robust.pt``'s) and best >= ``min_best``.
    Returns ``{"round": c, "best_round": b, "best": best, "at": a_c, "drop": drop}``, or None if no
    round did.
    """
    best: dict | None = None
    for record in history:
        accuracy = record.get("robust_accuracy")
        if accuracy is None:
            continue
        # in rows, a fall of exactly drop may read as a hair more in floats (0.8 - 0.6 > 0.2): it does not count
        if best is not None and best["robust_accuracy"] >= min_best and best["robust_accuracy"] - accuracy > drop + 1e-9:
            return {
                "round": record["round"],
                "best_round": best["round"],
                "best": best["robust_accuracy"],
                "at": accuracy,
                "drop": drop,
            }
        if best is None or accuracy > best["robust_accuracy"]:
            best = record
    return None


def _collapsed(config: TrainConfig, history: list[dict]) -> dict | None:
    """The collapse the run's guard finds in ``history`` (:func:`detect_collapse`); None without the guard."""
    return None if config.robust_collapse is None else detect_collapse(history, config.robust_collapse)


def _best_robust_round(history: list[dict]) -> int | None:
    """The round of the highest ``robust_accuracy`` in ``history`` (the earliest of equals); None if none was measured."""
    measured = [r for r in history if r.get("robust_accuracy") is not None]
    return max(measured, key=lambda r: r["robust_accuracy"])["round"] if measured else None


def _restore_best_robust(run: RunDir, history: list[dict], last: int, state: StateDict) -> None:
    """On resume, make ``best_robust.pt`` the best round of ``history`` again, if it is not.

    It is written after its round's checkpoint, so a kill in between leaves an older one while the
    best round is the last finished one, whose weights are ``state``; any other mismatch (the
    file deleted) is repaired from that round's checkpoint if the run kept it.
    """
    best = _best_robust_round(history)
    if best is None:
        return
    saved = run.best_robust()
    if saved is not None and saved["round"] == best:
        return
    accuracy = next(r["robust_accuracy"] for r in history if r["round"] == best)
    if best == last:
        run.save_best_robust(best, accuracy, state)
    elif best in run.finished_rounds():
        run.save_best_robust(best, accuracy, run.load_checkpoint(best))
    else:
        log.warning("%s: best_robust.pt is not round %d (the best robust accuracy), whose checkpoint is gone", run.path, best)


def _finish(job: FederatedTraining, run: RunDir, history: list[dict]) -> dict:
    """Evaluate the run's final model on the whole test set (never the round slice) and write final_metrics.json.

    The final model is the last round's, or after a collapse (:func:`detect_collapse`) the model of
    ``best_robust.pt``: it is loaded into ``job.model``, and its evaluation and monitor check use its
    round's seeds, as if the run had ended there. ``rounds`` stays the rounds trained (the cost and
    client DP's epsilon count them all: the server released every one).
    """
    final_round = history[-1]["round"] if history else 0
    collapse = _collapsed(job.config, history)
    model_round, checked = final_round, history
    if collapse is not None:
        saved = run.best_robust()
        if saved is None or saved["round"] != collapse["best_round"]:  # _restore_best_robust could not repair it
            raise DipsenError(
                f"{run.path}: training collapsed at round {collapse['round']}, but {BEST_ROBUST} does not hold round "
                f"{collapse['best_round']}, the best robust accuracy, whose model the run ends with"
            )
        job.model.load_state_dict(saved["model_state"])
        model_round = collapse["best_round"]
        checked = [r for r in history if r["round"] <= model_round]
        collapse["model"] = BEST_ROBUST
        log.warning(
            "%s: robust accuracy collapsed at round %d (%.3f, more than %g below round %d's %.3f): "
            "training stopped, the run ends with %s (round %d)",
            run.path,
            collapse["round"],
            collapse["at"],
            collapse["drop"],
            collapse["best_round"],
            collapse["best"],
            BEST_ROBUST,
            model_round,
        )
    torch.manual_seed(derive_seed(job.config.seed, _EVAL, model_round))
    metrics = evaluate_model(job.model, job.x_test, job.y_test, job.dataset.classes, job.config.mc_samples)
    metrics["rounds"] = final_round
    metrics["collapse"] = collapse
    metrics["attack_success_rate"] = job.attack_success_rate(model_round)
    metrics["cost"] = training_cost(history)
    metrics["client_dp"] = None if job.client_dp is None else job.client_dp.summary(final_round)
    metrics["robust_monitor_check"] = check = job.check_monitor(checked)
    if check is not None and not check["converged"]:
        log.warning(
            "%s: the robust monitor fell from %.3f to %.3f at twice its steps: its figures overstate",
            run.path,
            *check["accuracy"],
        )
    run.write_json("final_metrics.json", metrics)
    return metrics
