"""Attack a deployed global model and measure what survives.

:class:`RobustnessEvaluation` holds one deployed model and a fixed set of evaluation examples;
:meth:`RobustnessEvaluation.run` crafts adversarial examples for one :class:`AttackSetup` (attack,
eps, threat model, gradient view, budget) and evaluates them on the deployed model, noise on,
with both prediction rules:

- ``single``: one noise draw per input, the paper's rule;
- ``mc``:     the mean softmax over ``mc_samples`` draws (PixelDP's rule).

For a deterministic model both rules give the same labels. The prediction draws are seeded per
call, so two calls on the same number of examples give each position the same draws: every attack
of a study is judged with the same noise per example as the clean prediction. Every result keeps, per example,
whether the prediction stayed correct (saved in its dict as a bit string), so
:func:`worst_case_accuracy` can report the fraction of examples classified correctly without attack
and after every attack (Carlini et al. 2019: mean over x of the min over clean and every attack).

:meth:`RobustnessEvaluation.run` with ``only`` attacks a subset of the examples (the study's attack
cascade, :mod:`.study`): the result still covers every example, the ones left out counted as broken
and marked in its ``attacked`` mask. It is predicted on every example it covers, so each attacked
example is judged with the same draws as in a run on all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import DipsenError
from ..metrics import classification_metrics
from ..models import FederatedNet, predict_proba
from .attacks import ATTACKS, PAPER_BUDGET, QUERY_ATTACKS, Budget, art_classifier, build_attack
from .domain import feasible_domain
from .target import TrainedRun
from .threat import DEFAULT_STALE_ROUNDS, SURROGATE_EPOCHS, THREAT_MODELS, stale_round, train_surrogate
from .views import DEFAULT_EOT_DRAWS, GRADIENT_VIEWS, ClippedProbabilityLoss, attacker_view

RULES = ("single", "mc")
LOSSES = ("cross-entropy", "clipped-probabilities")
CHUNK = 100
"""Examples crafted per ART call: bounds memory (EOT multiplies the batch by its draws) and paces
the progress bar."""


@dataclass(frozen=True)
class AttackSetup:
    """One attack configuration. ``gradient`` and ``eot_draws`` only matter for randomized models."""

    attack: str
    eps: float = 0.3
    threat: str = "white-box"
    gradient: str = "draw"
    eot_draws: int = DEFAULT_EOT_DRAWS
    budget: Budget = PAPER_BUDGET
    loss: str = "cross-entropy"

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.attack, ATTACKS, "attack"),
            (self.threat, THREAT_MODELS, "threat model"),
            (self.gradient, GRADIENT_VIEWS, "gradient view"),
            (self.loss, LOSSES, "loss"),
        ):
            if value not in allowed:
                raise DipsenError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        if (self.threat == "query") != (self.attack in QUERY_ATTACKS):
            raise DipsenError(
                f"{self.attack} does not fit the {self.threat} threat model: query attacks "
                f"({', '.join(QUERY_ATTACKS)}) go with 'query', gradient attacks with the others"
            )
        if not 0 < self.eps <= 1:
            raise DipsenError(f"eps must be in (0, 1] for inputs in [0, 1], got {self.eps}")

    @property
    def label(self) -> str:
        gradient = f"eot{self.eot_draws}" if self.gradient == "eot" else self.gradient
        return f"{self.attack} eps={self.eps:g} {self.threat} grad={gradient}"


@dataclass
class AttackResult:
    """``setup`` is None for the clean (unattacked) evaluation."""

    setup: AttackSetup | None
    crafted_on: str
    seconds: float
    metrics: dict[str, dict]
    correct: dict[str, np.ndarray] = field(repr=False)
    """Per rule, whether each evaluated example is still classified correctly."""
    x_adv: np.ndarray = field(repr=False)
    """The inputs that were evaluated (the adversarial examples; the clean inputs for ``setup=None`` and
    for examples left out of a cascaded run)."""
    attacked: np.ndarray | None = field(default=None, repr=False)
    """None when the attack ran on every example it covers; otherwise a cascaded run's mask of the
    examples it attacked. The others were not attacked, their ``correct`` is False under every rule,
    and ``metrics[rule]["accuracy"]`` counts them as broken (what this attack left of what came before
    it, not a standalone figure); ``metrics[rule]["on_attacked"]`` holds the metrics of the attacked ones."""

    @property
    def samples(self) -> int:
        return len(self.correct["single"])

    def accuracy(self, rule: str) -> float:
        return self.metrics[rule]["accuracy"]

    def to_dict(self) -> dict:
        setup = {**asdict(self.setup), "label": self.setup.label} if self.setup else {"label": "clean"}
        correct = {rule: to_bits(mask) for rule, mask in self.correct.items()}
        cascade = {} if self.attacked is None else {"cascade": True, "attacked": to_bits(self.attacked)}
        return {
            **setup,
            "crafted_on": self.crafted_on,
            "seconds": self.seconds,
            "samples": self.samples,
            "metrics": self.metrics,
            "correct": correct,
            **cascade,
        }


def to_bits(mask: np.ndarray) -> str:
    """``mask`` as a string of '0' and '1', one per example: one JSON line, 1 byte an example."""
    return "".join("1" if value else "0" for value in mask)


def from_bits(bits: str) -> np.ndarray:
    """The boolean mask :func:`to_bits` wrote."""
    return np.array([c == "1" for c in bits], dtype=bool)


class RobustnessEvaluation:
    """One deployed model, fixed evaluation examples, any number of attacks.

    ``inference_noise=False`` deploys the model with its noise switched off (what a Keras
    GaussianNoise layer does at inference): a different model, offered only to explain published
    numbers.
    """

    def __init__(
        self,
        run: TrainedRun,
        samples: int = 500,
        *,
        mc_samples: int = 16,
        stale_rounds: int = DEFAULT_STALE_ROUNDS,
        seed: int = 0,
        inference_noise: bool = True,
        attacker_samples: int | None = None,
        surrogate_epochs: int = SURROGATE_EPOCHS,
        batch_size: int = 128,
    ) -> None:
        self.trained, self.seed, self.mc_samples, self.batch_size = run, seed, mc_samples, batch_size
        self.stale_rounds, self.surrogate_epochs = stale_rounds, surrogate_epochs
        self.inference_noise = inference_noise
        self.target = self._deployed(run.model())
        self.randomized = self.target.is_randomized
        self.data = run.attack_data(samples, attacker_samples)
        self.domain = feasible_domain(run.dataset)
        self.classes = run.dataset.classes
        self.input_shape = tuple(self.data.x_eval.shape[1:])
        self._sources: dict[str, tuple[FederatedNet, str]] = {}

    @property
    def chance(self) -> float:
        """Accuracy of always predicting the most frequent class among the evaluated examples."""
        return float(np.bincount(self.data.y_eval).max() / len(self.data.y_eval))

    def source(self, threat: str) -> tuple[FederatedNet, str]:
        """The model the attacker crafts on under ``threat``, and a description of it."""
        if threat not in self._sources:
            if threat in ("white-box", "query"):
                self._sources[threat] = (self.target, self.trained.final_model_description)
            elif threat == "orange-box":
                round_ = stale_round(self.trained, self.stale_rounds)
                self._sources[threat] = (self._deployed(self.trained.model(round_)), f"stale global model (round {round_})")
            else:
                surrogate = train_surrogate(
                    self.data.x_attacker,
                    self.data.y_attacker,
                    len(self.classes),
                    self.seed,
                    self.surrogate_epochs,
                    self.trained.device,
                )
                self._sources[threat] = (surrogate, f"surrogate CNN trained on {len(self.data.y_attacker)} attacker examples")
        return self._sources[threat]

    def _deployed(self, model: FederatedNet) -> FederatedNet:
        if not self.inference_noise and model.noise is not None:
            model.noise.std = 0.0
        return model

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The deployed model's labels for ``x`` under both rules (seeded draws)."""
        out: dict[str, np.ndarray] = {}
        for rule, draws in (("single", 1), ("mc", self.mc_samples)):
            if rule == "mc" and not self.randomized:
                out[rule] = out["single"]
                continue
            torch.manual_seed(self.seed + draws)
            out[rule] = predict_proba(self.target, x, draws, self.batch_size).argmax(axis=1)
        return out

    def clean(self) -> AttackResult:
        """The deployed model on the unperturbed evaluation examples, under both rules."""
        return self._result(None, "", 0.0, self.data.x_eval, self.data.y_eval)

    def run(
        self,
        setup: AttackSetup,
        on_progress: Callable[[int], None] | None = None,
        limit: int | None = None,
        only: np.ndarray | None = None,
    ) -> AttackResult:
        """Craft adversarial examples for ``setup`` and evaluate them on the deployed model.

        ``limit`` attacks only the first ``limit`` evaluation examples (for costly attacks). ``only``, a
        boolean mask over those examples, attacks the ones it marks and no other: the result covers
        all of them, with ``attacked = only`` and the others counted as broken (see
        :attr:`AttackResult.attacked`). The prediction is made on all of them (the others on their
        clean input), so an attacked example is judged with the same prediction draws as in a run
        on every example. The attack's own random draws (random starts, EOT noise, queries) are
        taken per call, so on a subset they are other draws: each marked example gets the same
        attack, not the same sample of its randomness.
        """
        source, crafted_on = self.source(setup.threat)
        view = attacker_view(source, setup.gradient, setup.eot_draws, self.seed)
        loss = ClippedProbabilityLoss() if setup.loss == "clipped-probabilities" else None
        classifier = art_classifier(view, self.input_shape, len(self.classes), loss)
        attack = build_attack(
            setup.attack,
            classifier,
            setup.eps,
            setup.budget,
            self.batch_size,
            project=lambda x_adv, x_orig: self.domain.project(x_adv, x_orig, setup.eps),
        )
        x, y = self.data.x_eval[:limit], self.data.y_eval[:limit]
        if only is not None and (only.dtype != bool or only.shape != y.shape):
            raise ValueError(f"only must be a boolean mask of the run's {len(y)} examples, got {only.dtype} {only.shape}")
        np.random.seed(self.seed)  # ART draws its random starts from numpy's global RNG, ours from torch's
        torch.manual_seed(self.seed)
        start = time.perf_counter()
        chunks = []
        x_attacked, y_attacked = (x, y) if only is None else (x[only], y[only])
        for begin in range(0, len(y_attacked), CHUNK):
            xc, yc = x_attacked[begin : begin + CHUNK], y_attacked[begin : begin + CHUNK]
            x_adv = attack.generate(x=xc, y=yc, mask=self.domain.mask(xc))
            # integer counts are snapped here, once, for the gradient attacks; Square's output is
            # already feasible and the projection leaves it unchanged
            chunks.append(self.domain.project(x_adv, xc, setup.eps))
            if on_progress:
                on_progress(len(yc))
        seconds = time.perf_counter() - start
        if only is None:
            return self._result(setup, crafted_on, seconds, np.concatenate(chunks), y)
        evaluated = x.copy()  # the clean input where nothing was attacked
        if chunks:
            evaluated[only] = np.concatenate(chunks)
        return self._result(setup, crafted_on, seconds, evaluated, y, only)

    def _result(
        self,
        setup: AttackSetup | None,
        crafted_on: str,
        seconds: float,
        x: np.ndarray,
        y: np.ndarray,
        attacked: np.ndarray | None = None,
    ) -> AttackResult:
        if attacked is None:
            labels = self.predict(x)
            metrics = {rule: classification_metrics(y, predicted, self.classes) for rule, predicted in labels.items()}
            return AttackResult(setup, crafted_on, seconds, metrics, {rule: p == y for rule, p in labels.items()}, x)
        # a cascaded run: predicted on every example, as a run on all of them would be (the same
        # draws per example); the examples not attacked count as broken
        labels = self.predict(x)
        correct, metrics = {}, {}
        for rule, predicted in labels.items():
            correct[rule] = (predicted == y) & attacked
            on_attacked = classification_metrics(y[attacked], predicted[attacked], self.classes) if attacked.any() else None
            metrics[rule] = {"accuracy": float(correct[rule].mean()), "samples": int(len(y)), "on_attacked": on_attacked}
        return AttackResult(setup, crafted_on, seconds, metrics, correct, x, attacked.copy())

    def reevaluate(self, result: AttackResult, limit: int) -> AttackResult:
        """``result`` on its first ``limit`` examples, predicted exactly as :meth:`run` with ``limit`` would.

        The prediction rules draw their noise per call, so accuracies of runs over different numbers
        of examples are only comparable after re-predicting on the same examples with the same draws.
        A cascaded ``result`` keeps its mask: as :meth:`run` with ``limit`` and ``only`` = the examples
        it attacked among the first ``limit`` would.
        """
        attacked = None if result.attacked is None else result.attacked[:limit]
        x, y = result.x_adv[:limit], self.data.y_eval[:limit]
        return self._result(result.setup, result.crafted_on, result.seconds, x, y, attacked)


def survivors(clean: np.ndarray, attacks: Iterable[np.ndarray]) -> np.ndarray:
    """Per example, whether it is classified correctly without attack (``clean``) and after every attack that ran on it.

    The clean prediction counts: an attack's output may be classified correctly where the clean input
    was not (a random start, a step across the boundary, a fresh noise draw), and such an example is
    not robust. ``clean`` covers every example; an attack run on fewer (``limit``) covers a prefix.
    """
    survived = clean.copy()
    for correct in attacks:
        survived[: len(correct)] &= correct
    return survived


def worst_case_accuracy(clean: AttackResult, attacks: Sequence[AttackResult], rule: str) -> float:
    """Fraction of examples that :func:`survivors` keeps under ``rule``."""
    return float(survivors(clean.correct[rule], [result.correct[rule] for result in attacks]).mean())
