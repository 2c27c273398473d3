"""dipsen's Flower ClientApp: one client of the federation, running :func:`client_update`.

It holds no state between messages except caches (data, a model to train in), so any process
may answer any message for its node.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..client import LocalTraining, client_update
from ..engine import local_training
from .task import (
    arrays_to_state,
    client_data,
    client_id,
    client_model,
    config_from_json,
    float_value,
    int_value,
    message_record,
    state_to_arrays,
    str_value,
)

if TYPE_CHECKING:
    from ...attack.domain import FeasibleDomain

app = ClientApp()


def _domain(settings: ConfigRecord) -> FeasibleDomain | None:
    """The feasible domain the ServerApp sent for adversarial training, if any."""
    if "feasible-domain" not in settings:
        return None
    from ...attack.domain import FeasibleDomain

    return FeasibleDomain.from_dict(json.loads(str_value(settings, "feasible-domain")))


def _at_round_rate(training: LocalTraining, settings: ConfigRecord) -> LocalTraining:
    """``training`` at the learning rate the server sent for this round (its schedule), if it sent one."""
    return training.at_rate(float_value(settings, "lr") if "lr" in settings else None)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client (partition) this node serves, and how many rows it holds."""
    config_json = str_value(message_record(msg.content, "config", ConfigRecord), "train-config")
    client = client_id(config_from_json(config_json), context.node_config)
    _, y = client_data(config_json, context.node_config)
    return Message(RecordDict({"client": ConfigRecord({"client": client, "samples": len(y)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train from the global weights on this node's rows with the seed the server chose."""
    settings = message_record(msg.content, "config", ConfigRecord)
    config_json = str_value(settings, "train-config")
    x, y = client_data(config_json, context.node_config)
    num_classes = int_value(settings, "num-classes")
    model = client_model(config_json, tuple(x.shape[1:]), num_classes)
    training = local_training(config_from_json(config_json), _domain(settings), num_classes)
    update = client_update(
        model,
        arrays_to_state(message_record(msg.content, "arrays", ArrayRecord)),
        x,
        y,
        _at_round_rate(training, settings),
        int_value(settings, "seed"),
    )
    metrics = MetricRecord(
        {"num-examples": update.num_samples, "mean-loss": update.mean_loss, "steps": update.steps, "seconds": update.seconds}
    )
    arrays: ArrayRecord = state_to_arrays(update.state)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
