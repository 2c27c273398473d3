"""Training configuration: defaults, TOML files, command-line overrides, validation.

Precedence: built-in defaults < ``--config FILE`` (TOML, flat keys named as the fields below)
< command-line flags. The resolved config is saved in every run folder and is what ``--resume``
reads back.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .data import Dataset

OPTIMIZERS = ("sgd", "adam")
ADV_TRAIN = ("none", "fgsm-rs", "pgd")  # adversarial training (see dipsen.federated.adversarial)
TRAIN_DTYPES = ("float32", "bfloat16")  # local training's arithmetic (see dipsen.federated.client.LocalTraining)
ENGINES = ("inprocess", "flower")
# each smoothing loss's own options: set to anything but their defaults, they need that loss
SMOOTHING_OPTIONS = {
    "consistency": ("consistency_lambda", "consistency_copies", "consistency_eta"),
    "smoothadv": ("smoothadv_eps", "smoothadv_steps", "smoothadv_copies"),
}


def _registry(module: str, name: str) -> Callable[[], tuple[str, ...]]:
    """The names a registry offers, imported only when a value is checked (dipsen.data loads torch)."""
    return lambda: tuple(getattr(importlib.import_module(module, __package__), name))


@dataclass(frozen=True)
class Rule:
    """What one field accepts: a type (``None`` too if ``optional``), then a range or a set of choices."""

    kind: type  # bool | int | float | str
    optional: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = False
    choices: Callable[[], tuple[str, ...]] | None = None

    def describe(self) -> str:
        noun = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[self.kind]
        if self.low is not None and self.high is not None:
            return f"{noun} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        return noun

    def check(self, name: str, value: Any) -> Any:
        """``value`` as stored (an int given for a float becomes a float); ConfigError naming ``name`` if it does not fit."""
        if value is None and self.optional:
            return None
        if self.choices is not None:
            allowed = self.choices()
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}", name)
            return value
        numeric = (int, float) if self.kind is float else (self.kind,)
        # bool is an int in Python, and an int is an exact float; a bool is neither here
        if not isinstance(value, numeric) or (isinstance(value, bool) and self.kind is not bool):
            raise ConfigError(f"{name} must be {self.describe()}, got {value!r}", name)
        if self.kind is float and isinstance(value, int | float):
            value = float(value)
        if self.kind in (int, float):
            below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if below or above or not math.isfinite(value):
                raise ConfigError(f"{name} must be {self.describe()}, got {value!r}", name)
        return value


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
    # rows held out of the training set as a validation slice (only where holds_out_validation); None: resolved by
    # dipsen.federated.engine.resolve_validation_size to 10% of the training rows, at most 5,000
    validation_size: int | None = None
    # server-side aggregation (see dipsen.federated.aggregate): the rule, its parameters, update
    # clipping (None: off) and the largest share of a round's weighted mean one client may have
    aggregator: str = "fedavg"
    trim_fraction: float = 0.1  # trimmed-mean only: share cut at each end of every coordinate
    byzantine: int = 0  # krum, multi-krum, bulyan, dnc, and nnm: f, the Byzantine clients to withstand
    clip_norm: float | None = None
    max_client_weight: float = 1.0
    cc_tau: float = 10.0  # centered-clipping: the clipping radius tau and the iterations L
    cc_iterations: int = 3
    fltrust_root_size: int = 100  # fltrust: the server's root rows, drawn from the validation slice
    dnc_iterations: int = 5  # dnc: filtering rounds and the coordinates sampled in each
    dnc_coordinates: int = 10000
    pre_aggregation: str = "none"  # none | bucketing | nnm: mixes the updates before any aggregator
    bucket_size: int = 2  # bucketing: s, the updates averaged per bucket
    flame_lambda: float = 0.001  # flame: its noise's std in units of the round's median step norm
    # client-level differential privacy (DP-FedAvg, see dipsen.federated.privacy): Gaussian noise of
    # std z * clip_norm on the sum of the clipped steps, the mean over m; z given (client_dp_noise)
    # or calibrated to a target epsilon over the rounds (client_dp_epsilon). Not dp_epsilon / dp_delta,
    # the noise layer's guarantee for input perturbations. client_dp_delta None: resolved to 1 / K^1.1
    client_dp_noise: float | None = None
    client_dp_epsilon: float | None = None
    client_dp_delta: float | None = None
    # draw client DP's noise and client sample from the seed instead of the OS's entropy: reproducible,
    # and void as a guarantee (anyone with config.json regenerates the noise): for tests only
    client_dp_insecure_seeded_noise: bool = False
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    # local training. Adam, because the noise layer makes every later layer's gradient noisy and
    # Adam's steps, unlike SGD's, do not grow with that noise (benchmarks/training_diagnostics.py)
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 0.001  # the peak rate with a schedule other than constant
    # the rate of each round (see dipsen.federated.schedule): constant | cyclic (0 -> lr at 2/5 of the run -> 0)
    lr_schedule: str = "constant"
    momentum: float = 0.0  # SGD only
    input_noise: float = 0.0  # std of Gaussian noise on every training input (training for randomized smoothing)
    # adversarial training in client_update (see dipsen.federated.adversarial): none | fgsm-rs | pgd,
    # L-inf eps, PGD steps (pgd only), step (None: 1.25 eps for fgsm-rs, 2.5 eps / adv_steps for pgd),
    # share of each batch's loss on adversarial examples
    adv_train: str = "none"
    adv_eps: float = 0.3
    adv_steps: int = 10
    adv_step_size: float | None = None
    adv_mix: float = 0.5
    # the adversarial examples' loss: ce (the adv_mix blend of cross-entropies) | trades (Zhang et al. 2019:
    # CE(clean) + trades_beta * KL(clean || adversarial), the examples maximising that KL with the adv_*
    # steps; adv_mix does not apply). 6: the paper's setting (its 1/lambda) for its MNIST and CIFAR-10 models; the
    # reference's MNIST script defaults to 1, and its README to [1, 10], larger more robust and less accurate
    # | calfat (Chen et al. 2022, for label skew: CE(f(x_adv) + log pi_k, y), x_adv maximising the KL between the
    # calibrated clean and adversarial predictions, pi_k the class frequencies of client k's own rows; adv_mix and
    # trades_beta do not apply; the calibration is training-only, the global model predicts uncalibrated)
    adv_loss: str = "ce"
    trades_beta: float = 6.0
    # FedProx (Li et al. 2020): (mu / 2) ||w - w_global||^2 added to every local step's loss, any training
    # mode; it keeps clients with skewed data near the round's global model. 0: off
    proximal_mu: float = 0.0
    # randomized smoothing's training loss, with input_noise > 0: gaussian (Cohen et al. 2019: CE on one noisy
    # copy) | consistency (Jeong & Shin 2020: CE on consistency_copies noisy copies + consistency_lambda * their
    # mean KL from the copies' mean prediction + consistency_eta * that mean's entropy). lambda 20, m 2, eta 0.5:
    # the reference code's MNIST commands (smoothing-consistency, EXPERIMENTS.MD) at every sigma
    smoothing_loss: str = "gaussian"
    consistency_lambda: float = 20.0
    consistency_copies: int = 2
    consistency_eta: float = 0.5
    # smoothadv (Salman et al. 2019: CE on smoothadv_copies noisy copies of the input moved by an L2 attack of
    # smoothadv_steps steps within smoothadv_eps on the copies' mean softmax); image data sets only. m 2, T 2,
    # eps 0.5: the middle of the paper's grid (m 1-8, T 1-10, eps 0.25-2), at a cost of (T + 1) m passes a step
    smoothadv_eps: float = 0.5
    smoothadv_steps: int = 2
    smoothadv_copies: int = 2
    # local training's arithmetic: float32, or bfloat16 (torch.autocast: convolutions and matrix products in
    # bfloat16; weights, optimizer and loss in float32); evaluation, attacks and certificates stay float32
    train_dtype: str = "float32"
    # stop once the monitor's accuracy of the global model on the validation slice reaches it (robust_accuracy)
    target_robust_accuracy: float | None = None
    # the monitor behind robust_accuracy (dipsen.federated.adversarial.RobustMonitor): its attack, steps
    # and validation rows. APGD-CE-40 on 250 rows: within 3 points of the study's worst case on FGSM-RS
    # and PGD-3 FAT models, where PGD-10 was 7-16 points above, at about a tenth of a PGD-3 round (README)
    robust_monitor: str = "apgd-ce"
    robust_monitor_steps: int = 40
    robust_monitor_samples: int = 250
    # the collapse guard (dipsen.federated.engine.detect_collapse): stop once a round's robust_accuracy is more
    # than this (absolute) below the best so far, that best being at least COLLAPSE_MIN_BEST, and end with
    # best_robust.pt's model; None: off. Needs the robust monitor (adv_train or target_robust_accuracy)
    robust_collapse: float | None = None
    # simulated poisoning (see dipsen.federated.poisoning): round(f * K) of the K clients, drawn from the
    # seed, send malicious_attack's update instead of their honest one; 0: none (in-process engine only)
    malicious_fraction: float = 0.0
    malicious_attack: str | None = None
    # what the colluding attacks see: full (the round's honest updates) | partial (their own honest updates)
    attack_knowledge: str = "full"
    alie_z: float | None = None  # alie: mean - z * std; None: z from the paper's formula for each round's n and f
    # alie-backdoor: alpha of its training loss alpha * CE + (1 - alpha) * the pull into the honest spread; 1: no pull
    alie_alpha: float = 1.0
    ipm_eps: float = 0.1  # ipm: the malicious clients send -eps times the benign mean
    minmax_perturbation: str = "unit"  # min-max, min-sum: the direction, unit | sign | std
    # the backdoors (backdoor-data, backdoor-replacement, dba; see dipsen.federated.poisoning.backdoor): the
    # label they teach, the share of a malicious client's rows stamped, the trigger square's side and corner,
    # and the rounds "A-B" they attack in (None: every round)
    backdoor_target: int = 0
    poison_rate: float = 0.5
    # the backdoors' local epochs on their poisoned rows (DBA's and Bagdasaryan et al.'s attackers train 10-15);
    # None: local_epochs, as every client. They report the step count of local_epochs: the server cannot tell
    poison_epochs: int | None = None
    trigger_size: int = 4
    trigger_position: str = "bottom-right"
    backdoor_rounds: str | None = None
    # reproducibility and layout
    seed: int = 0
    # where models compute (see dipsen.device): auto (CUDA if available, else the CPU) | cpu | cuda
    device: str = "auto"
    # client-training processes; None: one per CPU core, or with CUDA one per GPU, up to m
    workers: int | None = None
    # seconds a round waits for its clients' updates from the worker processes; a client without one
    # by then has failed (see dipsen.federated.workers). 600: 30 times the slowest round measured
    # (about 20 s, adversarial training). In-process engine only: the Flower engine waits for its
    # replies reply-timeout-seconds (its run config, also 600 s by default)
    round_timeout: float = 600.0
    engine: str = "inprocess"  # inprocess | flower (a Flower simulation; see dipsen.federated.flower)
    # round checkpoints the run folder keeps: all | last | last-N | every-N (see dipsen.federated.run_dir);
    # last-6 bounds the disk and keeps what --resume (the last round) and the orange-box attack at
    # its default --stale-rounds 5 (round final-5) need
    keep_checkpoints: str = "last-6"
    # evaluate the global model (test set, validation and robust slices) after every N-th round and the
    # last one only; the rounds between record null. Evaluation does not touch training's random draws
    eval_every: int = 1
    # the round slice (dipsen.federated.engine.round_eval_rows): an evaluated round's test accuracy is measured on this
    # many seeded test rows, the same every round; the round a run ends with (its last, or where a target or the
    # collapse guard stops it) on the whole test set, as final_metrics.json always. 0, or at least the test rows: the
    # whole test set every round. 1,000: a tenth of MNIST's test set, a standard error of about 0.9 points at 0.9
    round_eval_size: int = 1000
    # experiment tracking (see dipsen.federated.tracking): None | tensorboard, the metrics also as
    # TensorBoard scalars in RUN/tensorboard/; it needs the tracking extra
    log_to: str | None = None

    @property
    def clients_per_round(self) -> int:
        """m = max(1, floor(C * K)), computed on C as written: in floats 0.29 * 100 is 28.999..."""
        return max(1, math.floor(Fraction(repr(self.fraction)) * self.clients))

    @property
    def required_updates(self) -> int:
        """Valid client updates a round needs to count: ``min_clients``, by default more than half of m.

        Never fewer than the aggregator needs against ``byzantine`` clients (2f + 3 for Krum, 4f + 3
        for Bulyan: :func:`dipsen.federated.aggregate.min_updates`).
        """
        from .federated.aggregate import min_updates

        base = self.clients_per_round // 2 + 1 if self.min_clients is None else self.min_clients
        return max(base, min_updates(self.aggregator, self.byzantine, self.pre_aggregation, self.bucket_size))

    @property
    def client_dp(self) -> bool:
        """Whether the server aggregates with client-level DP (a noise multiplier or a target epsilon is set)."""
        return self.client_dp_noise is not None or self.client_dp_epsilon is not None

    @property
    def robust_evaluation(self) -> bool:
        """Whether every round measures ``robust_accuracy``: with adversarial training or a robust target."""
        return self.adv_train != "none" or self.target_robust_accuracy is not None

    @property
    def holds_out_validation(self) -> bool:
        """Whether training rows are held out as a validation slice: a target or the robust accuracy is checked on it,
        or fltrust's server trains on rows of it."""
        return self.target_accuracy is not None or self.robust_evaluation or self.aggregator == "fltrust"

    def validate(self) -> TrainConfig:
        """Check every value against :data:`SCHEMA` and the rules between values, and resolve ``workers``.

        ConfigError names the field (``error.key``), so that :func:`load_config` can say whether
        the value came from a flag or from the TOML file. The resolved worker count is saved with
        the run: float results can depend on the thread/process layout, so a resumed run must use
        the same one. ``device`` is checked by name only: whether this machine has CUDA is asked where
        models are placed (:func:`dipsen.device.resolve_device`), so a run trained on a GPU reads back anywhere.
        """
        from .models import calibrate_noise

        for name, rule in SCHEMA.items():
            setattr(self, name, rule.check(name, getattr(self, name)))
        if self.workers is None:
            from .device import training_processes

            self.workers = max(1, min(training_processes(self.device), self.clients_per_round))
        if self.min_clients is not None and self.min_clients > self.clients_per_round:
            raise ConfigError(f"min_clients must be in [0, m = {self.clients_per_round}], got {self.min_clients}", "min_clients")
        # without a target nothing stops on it: holding rows out would only take them from the clients
        if self.validation_size is not None and not self.holds_out_validation:
            raise ConfigError(
                f"validation_size {self.validation_size} needs target_accuracy, adv_train, target_robust_accuracy "
                "or aggregator fltrust (it is what they are checked or trained on)",
                "validation_size",
            )
        if self.robust_collapse is not None and not self.robust_evaluation:
            raise ConfigError(
                f"robust_collapse {self.robust_collapse} watches robust_accuracy: it needs adv_train fgsm-rs or pgd, "
                "or target_robust_accuracy (the robust monitor)",
                "robust_collapse",
            )
        if self.adv_step_size is not None and self.adv_train == "none":
            raise ConfigError(f"adv_step_size {self.adv_step_size} applies to adv_train fgsm-rs or pgd only", "adv_step_size")
        self._check_recipes()
        self._check_aggregation()
        self._check_client_dp()
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(
                f"momentum {self.momentum} applies to optimizer sgd only (optimizer is {self.optimizer!r})", "momentum"
            )
        calibrate_noise(self.sigma, self.dp_epsilon, self.dp_delta, self.dp_attack_bound)
        parse_keep_checkpoints(self.keep_checkpoints)
        self._check_malicious()
        return self

    def _check_recipes(self) -> None:
        """The client-side loss options go with the training they modify (see :mod:`dipsen.federated.client`).

        A recipe's parameter given without its recipe is refused rather than ignored: it would change nothing.
        """
        defaults = TrainConfig.__dataclass_fields__
        if self.adv_loss in ("trades", "calfat"):
            if self.adv_train == "none":
                raise ConfigError(
                    f"adv_loss {self.adv_loss} needs adv_train fgsm-rs or pgd (the steps of its KL search)", "adv_loss"
                )
            # TRADES weighs its two terms with trades_beta, CalFAT has one term: a blend of cross-entropies has no place
            if self.adv_mix != defaults["adv_mix"].default:
                why = {"trades": "its terms are weighed by trades_beta", "calfat": "its loss is on adversarial examples alone"}
                raise ConfigError(
                    f"adv_mix {self.adv_mix} does not apply to adv_loss {self.adv_loss} ({why[self.adv_loss]})", "adv_mix"
                )
        if self.adv_loss != "trades" and self.trades_beta != defaults["trades_beta"].default:
            raise ConfigError(f"trades_beta {self.trades_beta} applies to adv_loss trades only", "trades_beta")
        loss = self.smoothing_loss
        if loss != "gaussian":
            if self.input_noise <= 0:
                raise ConfigError(
                    f"smoothing_loss {loss} needs input_noise > 0 (the sigma its noisy copies are drawn at)", "smoothing_loss"
                )
            if self.adv_train != "none":
                raise ConfigError(f"smoothing_loss {loss} does not combine with adv_train {self.adv_train!r}", "smoothing_loss")
        if loss == "smoothadv" and self.dataset == "ctu13":
            raise ConfigError("smoothing_loss smoothadv attacks images in [0, 1]; ctu13's windows are not", "smoothing_loss")
        for owner, keys in SMOOTHING_OPTIONS.items():
            for key in keys:
                if loss != owner and getattr(self, key) != defaults[key].default:
                    raise ConfigError(f"{key} {getattr(self, key)} applies to smoothing_loss {owner} only", key)

    def _check_aggregation(self) -> None:
        """The aggregator's parameters fit it and m (see :mod:`dipsen.federated.aggregate`)."""
        from .federated.aggregate import BYZANTINE_AGGREGATORS, min_updates, trim_count

        m = self.clients_per_round
        if self.byzantine and self.aggregator not in BYZANTINE_AGGREGATORS and self.pre_aggregation != "nnm":
            raise ConfigError(
                f"byzantine {self.byzantine} applies to aggregator {', '.join(BYZANTINE_AGGREGATORS)} or "
                f"pre_aggregation nnm only (aggregator is {self.aggregator!r})",
                "byzantine",
            )
        need = min_updates(self.aggregator, self.byzantine, self.pre_aggregation, self.bucket_size)
        if need > m:
            rule = {"krum": "2f + 3", "multi-krum": "2f + 3", "bulyan": "4f + 3"}.get(self.aggregator, "f + 1")  # dnc, nnm
            if self.pre_aggregation == "bucketing":  # that many buckets of s
                rule = f"{self.bucket_size}({rule} - 1) + 1"
            raise ConfigError(
                f"byzantine {self.byzantine} is too large for m = {m}: {self.aggregator} needs m >= {rule} = {need}",
                "byzantine",
            )
        # the trimmed mean sees the bucket means after bucketing; it cuts trim_count of them at each end
        seen = math.ceil(m / self.bucket_size) if self.pre_aggregation == "bucketing" else m
        if self.aggregator == "trimmed-mean" and trim_count(self.trim_fraction, seen) < 1:
            raise ConfigError(
                f"trim_fraction {self.trim_fraction} trims no update of {seen} (floor(trim_fraction * {seen}) = 0): "
                f"use at least {math.ceil(1000 / seen) / 1000:g}",
                "trim_fraction",
            )

    def _check_client_dp(self) -> None:
        """Client-level DP's settings fit together (see :mod:`dipsen.federated.privacy`); resolves its delta."""
        if self.client_dp_noise is not None and self.client_dp_epsilon is not None:
            raise ConfigError(
                f"client_dp_epsilon {self.client_dp_epsilon} and client_dp_noise {self.client_dp_noise} exclude each other: "
                "give the noise multiplier or the target epsilon it is calibrated to",
                "client_dp_epsilon",
            )
        if not self.client_dp:
            for key in ("client_dp_delta", "client_dp_insecure_seeded_noise"):
                if getattr(self, key) not in (None, False):
                    raise ConfigError(f"{key} {getattr(self, key)} applies with client_dp_noise or client_dp_epsilon only", key)
            return
        key = "client_dp_noise" if self.client_dp_noise is not None else "client_dp_epsilon"
        given = f"{key} {getattr(self, key)}"
        if self.clip_norm is None:
            raise ConfigError(f"{given} needs clip_norm (the clip C of each client's update, its sensitivity)", key)
        if self.aggregator != "fedavg":
            raise ConfigError(f"{given} needs aggregator fedavg (aggregator is {self.aggregator!r})", key)
        if self.pre_aggregation != "none":
            raise ConfigError(f"{given} needs pre_aggregation none (it is {self.pre_aggregation!r})", key)
        if self.max_client_weight != 1.0:
            raise ConfigError(
                f"max_client_weight {self.max_client_weight} does not apply with {key}: every client weighs 1/m",
                "max_client_weight",
            )
        if self.client_dp_delta is None:
            from .federated.privacy import default_delta

            self.client_dp_delta = default_delta(self.clients)

    @property
    def backdoor_window(self) -> tuple[int, int] | None:
        """``backdoor_rounds`` as (first, last), both included; None: every round."""
        if self.backdoor_rounds is None:
            return None
        match = re.fullmatch(r"([1-9][0-9]*)-([1-9][0-9]*)", self.backdoor_rounds)
        if match is None or int(match[1]) > int(match[2]):
            raise ConfigError(f"backdoor_rounds must be A-B, 1 <= A <= B, got {self.backdoor_rounds!r}", "backdoor_rounds")
        return int(match[1]), int(match[2])

    def _check_backdoor(self) -> None:
        """The backdoor options go with a backdoor attack."""
        from .federated.poisoning import BACKDOOR_ATTACKS

        window = self.backdoor_window
        if self.alie_alpha != 1 and self.malicious_attack != "alie-backdoor":
            raise ConfigError("alie_alpha applies to alie-backdoor only", "alie_alpha")
        if self.malicious_attack not in BACKDOOR_ATTACKS:
            for name, value in (("backdoor_rounds", window), ("poison_epochs", self.poison_epochs)):
                if value is not None:
                    raise ConfigError(f"{name} applies to {', '.join(BACKDOOR_ATTACKS)} only", name)
            return
        if window is not None and window[0] > self.rounds:
            raise ConfigError(
                f"backdoor_rounds {self.backdoor_rounds} starts after the last round {self.rounds}", "backdoor_rounds"
            )

    def _check_malicious(self) -> None:
        """Simulated malicious clients fit the run (see :mod:`dipsen.federated.poisoning`)."""
        from .federated.poisoning import ATTACKS, malicious_count

        self._check_backdoor()
        if not self.malicious_fraction:
            if self.malicious_attack is not None:
                raise ConfigError(
                    f"malicious_attack {self.malicious_attack!r} applies with malicious_fraction > 0 only", "malicious_attack"
                )
            return
        given = f"malicious_fraction {self.malicious_fraction}"
        if self.malicious_attack is None:
            raise ConfigError(f"{given} needs malicious_attack, one of {', '.join(ATTACKS)}", "malicious_fraction")
        if self.engine != "inprocess":
            raise ConfigError(
                f"{given}: malicious clients are simulated in-process only (engine is {self.engine!r})", "malicious_fraction"
            )
        count = malicious_count(self.clients, self.malicious_fraction)
        if count == 0:
            raise ConfigError(
                f"{given} makes no client malicious: round({self.malicious_fraction} * {self.clients}) = 0; "
                f"use at least {1 / self.clients:.3g}",
                "malicious_fraction",
            )
        if count >= self.clients:
            raise ConfigError(
                f"{given} leaves no honest client: round({self.malicious_fraction} * {self.clients}) = {count}",
                "malicious_fraction",
            )
        sees = ATTACKS[self.malicious_attack].knowledge
        if "own" not in sees and self.attack_knowledge not in sees:
            raise ConfigError(
                f"attack_knowledge {self.attack_knowledge!r}: {self.malicious_attack} needs {' or '.join(sees)} knowledge",
                "attack_knowledge",
            )

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


_KEEP_CHECKPOINTS = re.compile(r"(all|last)|(last|every)-([1-9][0-9]*)")


def parse_keep_checkpoints(value: str) -> tuple[str, int]:
    """``keep_checkpoints`` as (rule, N): ("all", 0), ("last", N) or ("every", N); ``last`` is ("last", 1).

    Parsed in :meth:`TrainConfig.validate`, so a malformed value fails before any run folder
    exists; which rounds each rule keeps is :class:`dipsen.federated.run_dir.RunDir`'s business.
    """
    match = _KEEP_CHECKPOINTS.fullmatch(value)
    if match is None:
        raise ConfigError(f"keep_checkpoints must be all, last, last-N or every-N (N >= 1), got {value!r}", "keep_checkpoints")
    word, rule, n = match.groups()
    if word is not None:
        return word, 0 if word == "all" else 1
    return rule, int(n)


_COUNT = Rule(int, low=1)
_OPTIONAL_COUNT = Rule(int, optional=True, low=1)
_UNIT = Rule(float, low=0, high=1, low_open=True)  # (0, 1]

# Every field of TrainConfig and what it accepts; tests walk it to try a wrong value for each.
SCHEMA: dict[str, Rule] = {
    "dataset": Rule(str, choices=_registry(".data", "DATASETS")),
    "data_dir": Rule(str, optional=True),
    "train_subset": _OPTIONAL_COUNT,
    "test_subset": _OPTIONAL_COUNT,
    "include_background": Rule(bool),
    "bad_rows": Rule(str, choices=lambda: ("error", "skip")),
    "ctu13_split": Rule(str, choices=_registry(".data", "CTU13_SPLITS")),
    "socofing_task": Rule(str, choices=_registry(".data", "SOCOFING_TASKS")),
    "model": Rule(str, choices=_registry(".models", "MODELS")),
    "sigma": Rule(float, optional=True, low=0),
    "dp_epsilon": Rule(float, low=0, low_open=True),  # (0, 1] when it sets sigma: see calibrate_noise
    "dp_delta": Rule(float, low=0, high=1, low_open=True, high_open=True),
    "dp_attack_bound": Rule(float, low=0, low_open=True),
    "alpha_dropout": Rule(float, low=0, high=1, high_open=True),
    "mc_samples": _COUNT,
    "clients": _COUNT,
    "fraction": _UNIT,
    "rounds": _COUNT,
    "target_accuracy": Rule(float, optional=True, low=0, high=1, low_open=True),
    "min_clients": Rule(int, optional=True, low=0),
    "validation_size": _OPTIONAL_COUNT,
    "aggregator": Rule(str, choices=_registry(".federated.aggregate", "AGGREGATORS")),
    "trim_fraction": Rule(float, low=0, high=0.5, high_open=True),
    "byzantine": Rule(int, low=0),
    "clip_norm": Rule(float, optional=True, low=0, low_open=True),
    "max_client_weight": _UNIT,
    "cc_tau": Rule(float, low=0, low_open=True),
    "cc_iterations": _COUNT,
    "fltrust_root_size": _COUNT,
    "dnc_iterations": _COUNT,
    "dnc_coordinates": _COUNT,
    "pre_aggregation": Rule(str, choices=_registry(".federated.aggregate", "PRE_AGGREGATIONS")),
    "bucket_size": _COUNT,
    "client_dp_noise": Rule(float, optional=True, low=0, low_open=True),
    "client_dp_epsilon": Rule(float, optional=True, low=0, low_open=True),
    "client_dp_delta": Rule(float, optional=True, low=0, high=1, low_open=True, high_open=True),
    "client_dp_insecure_seeded_noise": Rule(bool),
    "partition": Rule(str, choices=_registry(".partition", "SCHEMES")),
    "dirichlet_alpha": Rule(float, low=0, low_open=True),
    "shards_per_client": _COUNT,
    "local_epochs": _COUNT,
    "batch_size": _COUNT,
    "optimizer": Rule(str, choices=lambda: OPTIMIZERS),
    "lr": Rule(float, low=0, low_open=True),
    "lr_schedule": Rule(str, choices=_registry(".federated.schedule", "LR_SCHEDULES")),
    "momentum": Rule(float, low=0, high=1, high_open=True),
    "input_noise": Rule(float, low=0),
    "adv_train": Rule(str, choices=lambda: ADV_TRAIN),
    "adv_eps": _UNIT,
    "adv_steps": _COUNT,
    "adv_step_size": Rule(float, optional=True, low=0, low_open=True),
    "adv_mix": _UNIT,
    "adv_loss": Rule(str, choices=_registry(".federated.adversarial", "ADV_LOSSES")),
    "trades_beta": Rule(float, low=0, low_open=True),
    "proximal_mu": Rule(float, low=0),
    "smoothing_loss": Rule(str, choices=_registry(".federated.smoothing", "SMOOTHING_LOSSES")),
    "consistency_lambda": Rule(float, low=0),
    "consistency_copies": Rule(int, low=2),  # one copy has nothing to be consistent with
    "consistency_eta": Rule(float, low=0),
    "smoothadv_eps": Rule(float, low=0, low_open=True),
    "smoothadv_steps": _COUNT,
    "smoothadv_copies": _COUNT,
    "train_dtype": Rule(str, choices=lambda: TRAIN_DTYPES),
    "target_robust_accuracy": Rule(float, optional=True, low=0, high=1, low_open=True),
    "robust_monitor": Rule(str, choices=_registry(".federated.adversarial", "MONITOR_ATTACKS")),
    "robust_monitor_steps": _COUNT,
    "robust_monitor_samples": _COUNT,
    "robust_collapse": Rule(float, optional=True, low=0, high=1, low_open=True, high_open=True),
    "malicious_fraction": Rule(float, low=0, high=1, high_open=True),
    "malicious_attack": Rule(str, optional=True, choices=_registry(".federated.poisoning", "ATTACKS")),
    "attack_knowledge": Rule(str, choices=_registry(".federated.poisoning", "KNOWLEDGE")),
    "alie_z": Rule(float, optional=True),
    "alie_alpha": Rule(float, low=0, high=1, low_open=True),
    "ipm_eps": Rule(float, low=0, low_open=True),
    "minmax_perturbation": Rule(str, choices=_registry(".federated.poisoning", "PERTURBATIONS")),
    "flame_lambda": Rule(float, low=0),
    "backdoor_target": Rule(int, low=0),
    "poison_rate": Rule(float, low=0, high=1, low_open=True),
    "poison_epochs": Rule(int, low=1, optional=True),
    "trigger_size": Rule(int, low=1),
    "trigger_position": Rule(str, choices=_registry(".federated.poisoning", "POSITIONS")),
    "backdoor_rounds": Rule(str, optional=True),
    # numpy's SeedSequence hashes it (any size) into every seed; it takes non-negative integers only
    "seed": Rule(int, low=0),
    "device": Rule(str, choices=_registry(".device", "DEVICES")),
    "workers": _OPTIONAL_COUNT,
    "round_timeout": Rule(float, low=0, low_open=True),
    "engine": Rule(str, choices=lambda: ENGINES),
    "keep_checkpoints": Rule(str),  # its form is checked by parse_keep_checkpoints
    "eval_every": _COUNT,
    "round_eval_size": Rule(int, low=0),
    "log_to": Rule(str, optional=True, choices=_registry(".federated.tracking", "TRACKERS")),
}


def load_config(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the TOML file at ``path`` (if any), then non-None ``overrides`` (the flags).

    A bad value is reported as the user wrote it: ``--rounds`` for a flag, ``FILE: rounds`` for a key.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the config file: {getattr(exc, 'strerror', None) or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    flags = {k: v for k, v in overrides.items() if v is not None}
    values.update(flags)
    try:
        return TrainConfig.from_dict(values, source=str(path or "options")).validate()
    except ConfigError as exc:
        if exc.key in flags:
            flag, message = "--" + exc.key.replace("_", "-"), str(exc)
            named = flag + message[len(exc.key) :] if message.startswith(exc.key) else f"{flag}: {message}"
            raise ConfigError(named, exc.key) from None
        if exc.key is not None and path is not None:
            raise ConfigError(f"{path}: {exc}", exc.key) from None
        raise
