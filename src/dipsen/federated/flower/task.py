"""What dipsen's Flower ServerApp and ClientApp share: message layout, conversions, client data.

Messages (Flower Message API):

- ``query`` (server -> every node, once per run): ``config`` holds the run's TrainConfig as JSON;
  the reply's ``client`` record says which dipsen client (partition) the node serves.
- ``train`` (server -> the m sampled nodes, every round): ``arrays`` holds the global weights,
  ``config`` the TrainConfig JSON, the number of classes and the client's seed for this round;
  the reply carries the updated ``arrays`` and ``metrics`` (samples, mean loss, steps, seconds).

A node finds its data in one of two ways. A simulated node (Flower's simulation engine sets
``partition-id`` in its node config) rebuilds the run's partition from the data set, as the
in-process engine does (validation slice held out first), and takes its own part. A deployed node
gets ``partition-file``: a file written by :func:`export_partitions` that holds that one client's
rows and nothing else.

A node's answer to ``query`` is a claim, checked against what the operator knows where there is
an enrolment (a deployment with SuperNode authentication, see :func:`write_enrolment`): the
SuperLink has verified that a node holds the key enrolled for its node id, and the ServerApp
accepts that node only for the client it was enrolled for.

Both apps read messages only through :func:`message_record` and :func:`int_value`,
:func:`float_value` and :func:`str_value`: a message from a node or the server is not trusted to
hold what this layout says, so a missing record or value, or one of the wrong type, raises a
:class:`DipsenError` that names it.
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ...config import TrainConfig
from ...data import Dataset
from ...device import resolve_device
from ...errors import DipsenError
from ...models import build_model
from ..client import StateDict
from ..engine import federated_data, model_args
from .launch import private_folder, write_private

# Node-config keys: Flower's simulation sets the first two; a deployed SuperNode is given the third.
PARTITION_ID, NUM_PARTITIONS, PARTITION_FILE = "partition-id", "num-partitions", "partition-file"

# The settings that decide which rows a client holds: a partition file must match the run on all.
# validation_size (resolved, None without a target) says which rows were held out before partitioning.
PARTITION_SETTINGS = (
    "dataset",
    "data_dir",
    "train_subset",
    "validation_size",
    "include_background",
    "bad_rows",
    "ctu13_split",
    "socofing_task",
    "clients",
    "partition",
    "dirichlet_alpha",
    "shards_per_client",
    "seed",
)


R = TypeVar("R", ArrayRecord, ConfigRecord, MetricRecord)


def message_record(content: RecordDict, name: str, kind: type[R]) -> R:
    """The record ``name`` of a message's ``content``; raises DipsenError if there is none or it is no ``kind``."""
    if name not in content:
        raise DipsenError(f"malformed message: no {name!r} record")
    record = content[name]
    if not isinstance(record, kind):
        raise DipsenError(f"malformed message: record {name!r} is a {type(record).__name__}, expected a {kind.__name__}")
    return record


def _value(record: ConfigRecord | MetricRecord, key: str) -> object:
    if key not in record:
        raise DipsenError(f"malformed message: no value {key!r}")
    return record[key]


def _wrong_type(key: str, value: object, expected: str) -> DipsenError:
    return DipsenError(f"malformed message: {key!r} is a {type(value).__name__}, expected {expected}")


def int_value(record: ConfigRecord | MetricRecord, key: str) -> int:
    """``record[key]`` if it is an int (not a bool); raises DipsenError naming ``key`` otherwise."""
    value = _value(record, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(key, value, "an int")
    return value


def float_value(record: ConfigRecord | MetricRecord, key: str) -> float:
    """``record[key]`` as a float if it is an int or a float (not a bool); raises DipsenError naming ``key`` otherwise."""
    value = _value(record, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(key, value, "a number")
    return float(value)


def str_value(record: ConfigRecord | MetricRecord, key: str) -> str:
    """``record[key]`` if it is a str; raises DipsenError naming ``key`` otherwise."""
    value = _value(record, key)
    if not isinstance(value, str):
        raise _wrong_type(key, value, "a str")
    return value


def config_to_json(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def config_from_json(text: str) -> TrainConfig:
    return TrainConfig.from_dict(json.loads(text), source="message").validate()


def state_to_arrays(state: StateDict) -> ArrayRecord:
    return ArrayRecord({k: v.detach() for k, v in state.items()})


def arrays_to_state(arrays: ArrayRecord) -> StateDict:
    return arrays.to_torch_state_dict()


def partition_file_name(client: int) -> str:
    return f"client_{client:04d}.npz"


def export_partitions(config: TrainConfig, dataset: Dataset, out_dir: Path) -> list[Path]:
    """Write each client's training rows to its own file in ``out_dir``; returns the paths by client.

    The rows are the clients' private data: ``out_dir`` is made 0700 and each file 0600, whatever the umask.
    """
    data = federated_data(config, dataset)
    out_dir = private_folder(out_dir)
    # after federated_data, which has resolved validation_size as the ServerApp does for the run
    settings = json.dumps({k: getattr(config, k) for k in PARTITION_SETTINGS}, sort_keys=True)
    paths = []
    for client, rows in enumerate(data.parts):
        path = out_dir / partition_file_name(client)
        buffer = io.BytesIO()
        np.savez(buffer, x=data.x_train[rows], y=data.y_train[rows], client=client, settings=settings)
        write_private(path, buffer.getvalue())
        paths.append(path)
    return paths


def write_enrolment(path: Path, enrolled: dict[int, int]) -> Path:
    """Record which client each enrolled node id serves (node id -> client) as JSON at ``path``; returns ``path``."""
    Path(path).write_text(json.dumps({str(node): client for node, client in sorted(enrolled.items())}, indent=1) + "\n")
    return Path(path)


def read_enrolment(path: Path) -> dict[int, int]:
    """Node id -> client, as :func:`write_enrolment` wrote it; raises DipsenError naming what is wrong."""
    try:
        entries = json.loads(Path(path).read_text())
        if not isinstance(entries, dict):
            raise ValueError("not a JSON object")
        enrolled = {int(node): client for node, client in entries.items()}
    except (OSError, ValueError) as exc:
        raise DipsenError(f"cannot read the node enrolment {path}: {exc}") from None
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in enrolled.values()):
        raise DipsenError(f"the node enrolment {path} maps a node to something other than a client number")
    return enrolled


def client_id(config: TrainConfig, node_config: dict) -> int:
    """The client this node serves in a run with ``config``; raises if the node does not fit the run."""
    if PARTITION_FILE in node_config:
        with np.load(node_config[PARTITION_FILE]) as file:
            client, settings = int(file["client"]), json.loads(str(file["settings"]))
        expected = {k: getattr(config, k) for k in PARTITION_SETTINGS}
        differing = sorted(k for k in PARTITION_SETTINGS if settings.get(k) != expected[k])
        if differing:
            raise DipsenError(
                f"{node_config[PARTITION_FILE]} was exported for other settings: "
                + ", ".join(f"{k}={settings.get(k)!r} (run: {expected[k]!r})" for k in differing)
            )
        return client
    if PARTITION_ID in node_config:
        if int(node_config[NUM_PARTITIONS]) != config.clients:
            raise DipsenError(f"the federation has {node_config[NUM_PARTITIONS]} nodes, the run needs {config.clients}")
        return int(node_config[PARTITION_ID])
    raise DipsenError(f"node config names no data: give {PARTITION_FILE}=PATH (or run in Flower's simulation)")


@lru_cache(maxsize=2)
def _simulated_partitions(config_json: str) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    config = config_from_json(config_json)
    data = federated_data(config, config.load_dataset())
    return torch.from_numpy(data.x_train), torch.from_numpy(data.y_train), data.parts


def client_data(config_json: str, node_config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """This node's training rows: from its partition file, or (simulation) rebuilt from the data set."""
    if PARTITION_FILE in node_config:
        return _partition_file(node_config[PARTITION_FILE])
    x, y, parts = _simulated_partitions(config_json)
    rows = parts[client_id(config_from_json(config_json), node_config)]
    return x[rows], y[rows]


@lru_cache(maxsize=1)
def _partition_file(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as file:
        return torch.from_numpy(file["x"]), torch.from_numpy(file["y"])


@lru_cache(maxsize=2)
def client_model(config_json: str, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    """A model to train in, reused across rounds: :func:`client_update` overwrites its weights.

    It sits on the run's ``device`` as this node resolves it (``auto``: CUDA where this node has it).
    """
    config = config_from_json(config_json)
    return build_model(*model_args(config, input_shape, num_classes)).to(resolve_device(config.device))
