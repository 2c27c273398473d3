"""Where models compute: ``--device`` (the ``device`` key), resolved to a :class:`torch.device`.

``auto`` is CUDA where ``torch.cuda.is_available()``, else the CPU; ``cuda`` on a machine without
CUDA is a :class:`~dipsen.errors.ConfigError`. Models, local training, evaluation, attacks and
certification run on the resolved device; data sets stay in host memory and batches move to the
model's device (:func:`model_device`) in the loops that use them; weights leave it as host copies
(:func:`host_state`), so checkpoints, aggregation and Flower messages hold CPU tensors whatever
trained them.

The CUDA path has not run on a GPU (none was available to its authors): its tests skip without CUDA.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
CPU = torch.device("cpu")
"""The host: where data sets, checkpoints and aggregation live, and the default device of every function that takes one."""


def wants_cuda(name: str) -> bool:
    """Whether the device ``name`` asks for CUDA on this machine: ``cuda``, or ``auto`` where CUDA is available."""
    return name == "cuda" or (name == "auto" and torch.cuda.is_available())


def resolve_device(name: str) -> torch.device:
    """The device ``name`` (one of :data:`DEVICES`) stands for here; ConfigError (key ``device``) if it cannot be had."""
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {name!r}", "device")
    if not wants_cuda(name):
        return CPU
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r}: CUDA is not available here (torch.cuda.is_available() is False: a CPU-only build of "
            f"torch {torch.__version__}, or no GPU or driver); use cpu or auto",
            "device",
        )
    return torch.device("cuda")


def training_processes(name: str) -> int:
    """How many client-training processes the device ``name`` runs at once by default: one per GPU with CUDA, else one per
    CPU core (each process single-threaded, see :mod:`dipsen.federated.workers`)."""
    if wants_cuda(name):
        return max(1, torch.cuda.device_count())
    return os.cpu_count() or 1


def worker_device(device: torch.device, worker: int) -> torch.device:
    """The device of client-training process number ``worker``: with CUDA (no index given) the GPUs in turn, else ``device``."""
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", worker % torch.cuda.device_count())


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are, so where its inputs must go (the CPU for a model without parameters)."""
    weight = next(model.parameters(), None)
    return CPU if weight is None else weight.device


def host_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of ``model``'s state dict in host memory: the form checkpoints, aggregation and messages hold weights in."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
