"""Federated training. ``client_update`` and ``fedavg`` are the engine-independent maths;
``train`` is the in-process engine that runs them round by round into a run folder."""

from .aggregate import fedavg
from .client import ClientUpdate, LocalTraining, client_update
from .engine import FederatedTraining, RoundResult, derive_seed, train
from .run_dir import RunDir

__all__ = [
    "ClientUpdate",
    "FederatedTraining",
    "LocalTraining",
    "RoundResult",
    "RunDir",
    "client_update",
    "derive_seed",
    "fedavg",
    "train",
]
