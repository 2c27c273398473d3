"""Models: the paper's CNN, DiPSeN and its two ablations, behind one registry.

``build_model(name, input_shape, num_classes, noise)`` is the entry point; ``MODELS`` lists the
names the CLI accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .net import FederatedNet
from .noise import NoiseCalibration, calibrate_noise
from .predict import predict_proba, prediction_rule


@dataclass(frozen=True)
class ModelSpec:
    noise: bool
    selu: bool
    description: str


MODEL_SPECS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(False, False, "the paper's CNN"),
    "dipsen": ModelSpec(True, True, "CNN + DP noise layer after block 1 + SELU layer after block 2"),
    "noise-only": ModelSpec(True, False, "ablation: CNN + DP noise layer only"),
    "selu-only": ModelSpec(False, True, "ablation: CNN + SELU layer only"),
}
MODELS = tuple(MODEL_SPECS)


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    noise: NoiseCalibration,
    alpha_dropout: float = 0.05,
) -> FederatedNet:
    """Build model ``name``; ``noise`` is used only by models with a noise layer."""
    if name not in MODEL_SPECS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    spec = MODEL_SPECS[name]
    return FederatedNet(
        input_shape,
        num_classes,
        noise_std=noise.std if spec.noise else None,
        selu=spec.selu,
        alpha_dropout=alpha_dropout,
    )


__all__ = [
    "MODELS",
    "MODEL_SPECS",
    "FederatedNet",
    "NoiseCalibration",
    "build_model",
    "calibrate_noise",
    "predict_proba",
    "prediction_rule",
]
