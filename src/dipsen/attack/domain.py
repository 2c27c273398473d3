"""What an attacker may change: the feasible input domain of each data set.

Images (MNIST, SOCOFing): every pixel, within [0, 1].

CTU-13 windows (28 flows x 6 features, see :mod:`dipsen.data.ctu13`): the attacker controls the
traffic it sends, so it may change the four volume features (Dur, TotPkts, TotBytes, SrcBytes) of
every real flow in a window, within their scaled range [0, 1]. It may not change the protocol or
the destination-port class (categorical: no flow can be 0.4 tcp), nor turn a zero padding row
(no earlier flow) into a flow. Packet and byte counts are integers: after an attack each is moved
to the nearest value that is an integer count in original units and still inside the eps-ball.
Not enforced: cross-feature consistency such as SrcBytes <= TotBytes.

Adversarial training crafts its examples inside the same domain, through
:meth:`FeasibleDomain.project_tensor` (see :mod:`dipsen.federated.adversarial`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data import Dataset

_CTU13_INTEGER_FEATURES = {1: "TotPkts", 2: "TotBytes", 3: "SrcBytes"}
_CTU13_CONTINUOUS_COLUMNS = 4


@dataclass(frozen=True)
class FeasibleDomain:
    """Projection onto the inputs an attacker can produce from x within an L-inf ball."""

    description: str
    perturbable_columns: int | None = None
    integer_scalers: dict[int, tuple[float, float]] | None = None

    def mask(self, x: np.ndarray) -> np.ndarray | None:
        """1 where the attacker may change x, 0 elsewhere (per example); None means everything."""
        if self.perturbable_columns is None:
            return None
        mask = np.zeros_like(x)
        mask[..., : self.perturbable_columns] = 1.0
        padding = np.all(x == 0.0, axis=-1, keepdims=True)
        return mask * ~padding

    def project(self, x_adv: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
        """The closest feasible point: masked, inside the eps-ball and [0, 1], integers snapped."""
        delta = np.clip(x_adv - x, -eps, eps)
        mask = self.mask(x)
        if mask is not None:
            delta *= mask
        out = np.clip(x + delta, 0.0, 1.0).astype(np.float32)
        for column, (low, high) in (self.integer_scalers or {}).items():
            out[..., column] = _snap_to_counts(out[..., column], x[..., column], eps, low, high)
        return out

    def project_tensor(self, x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
        """:meth:`project` on tensors (adversarial training): the same projection, no gradient, on ``x``'s device.

        It runs in numpy on the host: the numpy arrays share CPU tensors' memory, so on the CPU this
        costs no copy; a GPU's tensors go to the host and back.
        """
        projected = self.project(x_adv.detach().cpu().numpy(), x.detach().cpu().numpy(), eps)
        return torch.from_numpy(projected).to(x.device)

    def to_dict(self) -> dict:
        """JSON-ready fields (the Flower ServerApp sends the domain to its nodes with each train message)."""
        scalers = None if self.integer_scalers is None else {str(c): list(v) for c, v in self.integer_scalers.items()}
        return {"description": self.description, "perturbable_columns": self.perturbable_columns, "integer_scalers": scalers}

    @classmethod
    def from_dict(cls, values: dict) -> FeasibleDomain:
        scalers = values.get("integer_scalers")
        return cls(
            str(values["description"]),
            values.get("perturbable_columns"),
            None if scalers is None else {int(c): (float(low), float(high)) for c, (low, high) in scalers.items()},
        )


def feasible_domain(dataset: Dataset) -> FeasibleDomain:
    """The domain of ``dataset`` (see the module docstring)."""
    if dataset.name != "ctu13":
        return FeasibleDomain("every pixel, within [0, 1]")
    scaler = dataset.info["scaler"]
    integers = {col: (scaler[name]["min"], scaler[name]["max"]) for col, name in _CTU13_INTEGER_FEATURES.items()}
    return FeasibleDomain(
        "volume features (Dur, TotPkts, TotBytes, SrcBytes) of real flows within [0, 1]; counts kept integer; "
        "Proto, port class and padding rows unchanged",
        perturbable_columns=_CTU13_CONTINUOUS_COLUMNS,
        integer_scalers=integers,
    )


def _snap_to_counts(scaled: np.ndarray, original: np.ndarray, eps: float, low: float, high: float) -> np.ndarray:
    """Nearest scaled value whose count (expm1 of the log1p scale) is an integer and stays in the ball.

    The original value is the fallback: it is always inside the ball (and is a real count unless the
    test value was clipped at the scaler's range).
    """
    span = high - low if high > low else 1.0
    count = np.expm1(scaled.astype(np.float64) * span + low)
    best = original.astype(np.float64)
    best_distance = np.abs(best - scaled)
    for candidate_count in (np.floor(count), np.ceil(count)):
        candidate = (np.log1p(np.maximum(candidate_count, 0.0)) - low) / span
        ok = (np.abs(candidate - original) <= eps + 1e-6) & (candidate >= 0.0) & (candidate <= 1.0)
        closer = ok & (np.abs(candidate - scaled) < best_distance)
        best = np.where(closer, candidate, best)
        best_distance = np.where(closer, np.abs(candidate - scaled), best_distance)
    return best.astype(np.float32)
