"""Certify a trained run's final global model on seeded test examples: certified accuracy per radius.

The examples are the ones ``dipsen attack`` evaluates (:meth:`dipsen.attack.TrainedRun.attack_data`),
so certified and attacked figures are on the same inputs. Certified accuracy at radius r is the
share of examples whose certified prediction is correct with a certified L2 radius of at least r;
an abstention counts as wrong. Each certificate holds with probability at least 1 - alpha.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..attack.target import TrainedRun
from ..errors import DipsenError
from ..models import calibrate_noise
from .attack import smoothed_pgd_l2
from .pixeldp import pixeldp_certify
from .smoothing import ABSTAIN, Smooth

METHODS = ("smoothing", "pixeldp")
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class CertifySettings:
    """What ``dipsen certify`` runs; ``sigma`` (smoothing only) defaults to the run's ``input_noise``."""

    method: str = "smoothing"
    sigma: float | None = None
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    samples: int = 500
    radii: tuple[float, ...] = DEFAULT_RADII
    seed: int = 0
    batch_size: int = 128

    def validate(self) -> CertifySettings:
        """Check every value that does not depend on the run; DipsenError naming the bad one."""
        if self.method not in METHODS:
            raise DipsenError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.alpha < 1:
            raise DipsenError(f"--alpha must be in (0, 1), got {self.alpha}")
        for name in ("n0", "n", "samples", "batch_size"):
            if getattr(self, name) < 1:
                raise DipsenError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n0 > self.n:
            raise DipsenError(f"--n0 ({self.n0}) must not exceed --n ({self.n})")
        if any(not (r >= 0 and math.isfinite(r)) for r in self.radii):
            raise DipsenError(f"--radii must be finite numbers >= 0, got {', '.join(map(str, self.radii))}")
        if self.sigma is not None and not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise DipsenError(f"--sigma must be a finite number > 0, got {self.sigma}")
        return self

    def resolve(self, trained: TrainedRun) -> CertifySettings:
        """The settings checked against ``trained``, with ``sigma`` filled in for smoothing."""
        self.validate()
        if self.method == "pixeldp":
            if self.sigma is not None:
                raise DipsenError("--sigma is for smoothing; pixeldp certifies at the run's own noise layer")
            cfg = trained.config
            noise = calibrate_noise(cfg.sigma, cfg.dp_epsilon, cfg.dp_delta, cfg.dp_attack_bound)
            if not trained.model().is_randomized or noise.std <= 0:
                raise DipsenError(f"{trained.path}: {cfg.model} has no noise layer with std > 0; pixeldp needs one")
            return self
        sigma = self.sigma if self.sigma is not None else (trained.config.input_noise or None)
        if sigma is None:
            raise DipsenError(f"{trained.path} was trained without --input-noise; give the smoothing noise with --sigma")
        return CertifySettings(**{**asdict(self), "sigma": float(sigma)})


def certify_run(trained: TrainedRun, settings: CertifySettings, progress: Callable[[int], None] | None = None) -> dict:
    """Certify ``settings.samples`` test examples of ``trained`` on its device; the record ``dipsen certify`` saves."""
    settings = settings.resolve(trained)
    data = trained.attack_data(settings.samples)
    model = trained.model()
    torch.manual_seed(settings.seed)  # a noise layer draws from the global generator
    generator = torch.Generator(device=trained.device).manual_seed(settings.seed)
    cfg = trained.config
    noise = calibrate_noise(cfg.sigma, cfg.dp_epsilon, cfg.dp_delta, cfg.dp_attack_bound)
    if settings.method == "smoothing" and settings.sigma is not None:  # resolve() gave smoothing its sigma
        smooth = Smooth(model, len(trained.dataset.classes), settings.sigma, settings.batch_size)

        def certify_one(x: torch.Tensor) -> tuple[int, float]:
            cert = smooth.certify(x, settings.n0, settings.n, settings.alpha, generator)
            return cert.label, cert.radius
    else:

        def certify_one(x: torch.Tensor) -> tuple[int, float]:
            cert = pixeldp_certify(model, x, settings.n, settings.alpha, noise, settings.batch_size)
            return cert.label, cert.l2_size

    labels, radii = [], []
    start = time.perf_counter()
    for x in torch.as_tensor(data.x_eval):
        label, radius = certify_one(x.to(trained.device))
        labels.append(label)
        radii.append(radius)
        if progress is not None:
            progress(1)
    seconds = time.perf_counter() - start
    correct = [label == int(y) for label, y in zip(labels, data.y_eval, strict=True)]
    dimension = int(data.x_eval[0].size)
    passes = settings.samples * (settings.n0 + settings.n if settings.method == "smoothing" else settings.n)
    return {
        "run": str(trained.path),
        "model": cfg.model,
        "dataset": cfg.dataset,
        **asdict(settings),
        "samples": len(labels),
        "dimension": dimension,
        "certified_accuracy": {
            f"{r:g}": sum(ok and radius >= r for ok, radius in zip(correct, radii, strict=True)) / len(labels)
            for r in settings.radii
        },
        "linf_radius": {f"{r:g}": r / math.sqrt(dimension) for r in settings.radii},
        "abstain_rate": sum(label == ABSTAIN for label in labels) / len(labels),
        "accuracy": sum(correct) / len(labels),
        "noise_layer": asdict(noise) if settings.method == "pixeldp" else None,
        "examples": [
            {"row": int(row), "label": label, "radius": radius}
            for row, label, radius in zip(data.eval_rows, labels, radii, strict=True)
        ],
        "seconds": seconds,
        "forward_passes_per_second": passes / seconds,
    }


def attacked_accuracy(
    trained: TrainedRun, settings: CertifySettings, radii: tuple[float, ...], draws: int = 1000
) -> dict[str, float]:
    """Accuracy of the smoothed classifier under :func:`~dipsen.certify.attack.smoothed_pgd_l2` at each L2 radius.

    On the examples :func:`certify_run` certifies; each prediction by Cohen's PREDICT with ``draws``
    draws at ``settings.alpha`` (an abstention counts as wrong). A sound certificate at r can never
    be above this at r, beyond its alpha: the report puts the two side by side.
    """
    settings = settings.resolve(trained)
    if settings.method != "smoothing" or settings.sigma is None:
        raise DipsenError("the L2 attack check is for smoothing certificates")
    data = trained.attack_data(settings.samples)
    x, y = torch.as_tensor(data.x_eval).to(trained.device), torch.as_tensor(data.y_eval).long().to(trained.device)
    model = trained.model()
    smooth = Smooth(model, len(trained.dataset.classes), settings.sigma, settings.batch_size)
    generator = torch.Generator(device=trained.device).manual_seed(settings.seed + 1)
    accuracy = {}
    for radius in radii:
        adversarial = smoothed_pgd_l2(model, x, y, radius, settings.sigma, generator=generator) if radius > 0 else x
        right = [smooth.predict(a, draws, settings.alpha, generator) == int(t) for a, t in zip(adversarial, y, strict=True)]
        accuracy[f"{radius:g}"] = sum(right) / len(right)
    return accuracy
