"""dipsen's Flower ServerApp: the in-process engine's round loop, with client updates run on Flower nodes.

The ServerApp runs :func:`dipsen.federated.train` itself, so sampling (``sample_clients``), update
validation, the server-side weights (a node's claimed sample count capped at the size of the
partition this ServerApp computed for its client), the aggregator (FedAvg or a robust rule of
:mod:`dipsen.federated.aggregate`), evaluation, the run folder, checkpoints and resume are the
in-process engine's, line for line; only :class:`FlowerClients` differs from the local worker pool. Flower's
own strategies are not used: their sampling would pick other clients than ``sample_clients``, and
in round 1 they sample from whichever nodes have registered so far.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, overridden by ``flwr run --run-config``):
``run-dir`` (a run folder with its config.json, made by ``dipsen train --engine flower`` or
``RunDir.create``), ``resume``, ``node-wait-seconds`` (how long to wait for all K nodes to
connect), ``reply-timeout-seconds`` (how long a round waits for its clients' replies, and so
how long its messages live at the SuperLink) and ``enrolled-nodes`` (empty, or the JSON file of
:func:`~dipsen.federated.flower.task.write_enrolment`: which client each authenticated node id
serves; a node is then used only for that client).

The run folder's lock: a ServerApp that ``dipsen train --engine flower`` (or ``deploy_on_loopback``)
started finds its launcher's PID in :data:`~dipsen.federated.flower.launch.LOCK_HOLDER`; the
launcher took the lock before it started anything, so the ServerApp only checks that it still
holds it (and refuses to train otherwise). One started by hand with ``flwr run`` takes the lock
itself, as ``dipsen train`` does in-process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp

from ...config import TrainConfig
from ...errors import DipsenError
from ..client import ClientUpdate, StateDict
from ..engine import FederatedTraining, resolve_validation_size, train, training_domain
from ..run_dir import RunDir
from ..workers import ClientFailure, ClientTask
from .launch import LOCK_HOLDER
from .task import arrays_to_state, config_to_json, float_value, int_value, message_record, read_enrolment, state_to_arrays

if TYPE_CHECKING:
    from ...attack.domain import FeasibleDomain

log = logging.getLogger(__name__)

PULL_SECONDS = 1.0  # how often a round asks the SuperLink for replies (Flower's send_and_receive: 3 s)

app = ServerApp()


class FlowerClients:
    """Runs client updates on the Flower nodes of ``grid``: one ``train`` message per sampled client.

    On creation it waits until all K clients' nodes have connected and asks each which client it
    serves, so every round can send exactly the m clients that ``sample_clients`` picked. With
    ``enrolled`` (node id -> client, from an authenticated deployment) it waits for and asks only
    the enrolled nodes, and a node that claims another client than its own stops the run.
    """

    def __init__(
        self,
        grid: Grid,
        config: TrainConfig,
        num_classes: int,
        node_wait_seconds: float,
        reply_timeout_seconds: float,
        enrolled: dict[int, int] | None = None,
        domain: FeasibleDomain | None = None,
    ) -> None:
        self.grid, self.reply_timeout = grid, reply_timeout_seconds
        self.settings: dict[str, ConfigRecordValues] = {"train-config": config_to_json(config), "num-classes": num_classes}
        if domain is not None:  # adversarial training: the nodes hold rows, not the data set's scaler
            self.settings["feasible-domain"] = json.dumps(domain.to_dict())
        if enrolled is not None and sorted(enrolled.values()) != list(range(config.clients)):
            raise DipsenError(f"the node enrolment does not name each of the clients 0..{config.clients - 1} exactly once")
        self.nodes = self._discover(config.clients, node_wait_seconds, enrolled)

    def _await_nodes(self, clients: int, wait_seconds: float, enrolled: dict[int, int] | None) -> list[int]:
        """The nodes to ask once all have connected: every node, or the enrolled ones only."""
        deadline = time.monotonic() + wait_seconds
        while True:
            online = list(self.grid.get_node_ids())
            node_ids = online if enrolled is None else [node for node in online if node in enrolled]
            if len(node_ids) >= clients:
                break
            if time.monotonic() > deadline:
                raise DipsenError(f"only {len(node_ids)} of {clients} client nodes connected within {wait_seconds:g} s")
            time.sleep(0.2)
        if strangers := sorted(set(online) - set(node_ids)):
            log.warning("nodes not enrolled for any client are connected and get no message: %s", strangers[:20])
        return node_ids

    def _discover(self, clients: int, wait_seconds: float, enrolled: dict[int, int] | None) -> dict[int, int]:
        node_ids = self._await_nodes(clients, wait_seconds, enrolled)
        query = RecordDict({"config": ConfigRecord({"train-config": self.settings["train-config"]})})
        messages = [Message(query, dst_node_id=node, message_type=MessageType.QUERY, ttl=wait_seconds) for node in node_ids]
        nodes: dict[int, int] = {}
        for node, reply in zip(node_ids, self._exchange(messages, wait_seconds), strict=True):
            if reply is None:
                raise DipsenError(f"node {node} did not answer within {wait_seconds:g} s")
            if reply.has_error():
                raise DipsenError(f"node {node} cannot serve this run: {reply.error.reason}")
            client = int_value(message_record(reply.content, "client", ConfigRecord), "client")
            if enrolled is not None and enrolled[node] != client:
                raise DipsenError(f"node {node} claims client {client}, but it is enrolled for client {enrolled[node]}: refused")
            if client in nodes:
                raise DipsenError(f"client {client} is served by two nodes ({nodes[client]}, {node})")
            nodes[client] = node
        missing, unknown = sorted(set(range(clients)) - set(nodes)), sorted(set(nodes) - set(range(clients)))
        if missing or unknown:
            raise DipsenError(f"the nodes do not serve clients 0..{clients - 1}: missing {missing[:20]}, unknown {unknown[:20]}")
        log.info("%d client nodes connected", clients)
        return nodes

    def _exchange(self, messages: list[Message], timeout: float) -> list[Message | None]:
        """Send ``messages``; their replies in the same order, None where none came within ``timeout`` s.

        A reply is matched by the id of the message it answers, never by its sender: the errors that
        Flower's SuperLink makes itself (node unavailable, message expired) come from the SuperLink's
        node id, not from the node the message went to.
        """
        sent = list(self.grid.push_messages(messages))  # in the order given; None where the push failed
        pending = {message_id for message_id in sent if message_id}
        replies: dict[str, Message] = {}
        deadline = time.monotonic() + timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                answered = reply.metadata.reply_to_message_id
                if answered in pending:  # asked for by id; a reply to anything else is not this exchange's
                    replies[answered] = reply
                    pending.discard(answered)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(PULL_SECONDS, max(0.0, deadline - time.monotonic())))
        return [replies.get(message_id) if message_id else None for message_id in sent]

    def run(self, state: StateDict, tasks: Sequence[ClientTask]) -> list[ClientUpdate | ClientFailure]:
        arrays = state_to_arrays(state)
        # a message lives as long as the round waits for its reply: Flower's default is 12 hours
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": ConfigRecord({**self.settings, **self._task_settings(task)})}),
                dst_node_id=self.nodes[task.client],
                message_type=MessageType.TRAIN,
                ttl=self.reply_timeout,
            )
            for task in tasks
        ]
        return [self._update(reply) for reply in self._exchange(messages, self.reply_timeout)]

    @staticmethod
    def _task_settings(task: ClientTask) -> dict[str, int | float]:
        """What a train message says of its task beside the run's settings: the seed, and the round's rate if set."""
        return {"seed": task.seed} if task.lr is None else {"seed": task.seed, "lr": task.lr}

    def _update(self, reply: Message | None) -> ClientUpdate | ClientFailure:
        """The reply as a ClientUpdate; ClientFailure if there is none or it cannot be read."""
        if reply is None:
            return ClientFailure(f"no reply within {self.reply_timeout:g} s")
        if reply.has_error():
            # from the node itself (its ClientApp failed) or from the SuperLink on its behalf
            source = "SuperLink" if reply.metadata.src_node_id == SUPERLINK_NODE_ID else "client"
            return ClientFailure(f"{source} error: {reply.error.reason}")
        try:
            metrics = message_record(reply.content, "metrics", MetricRecord)
            return ClientUpdate(
                state=arrays_to_state(message_record(reply.content, "arrays", ArrayRecord)),
                num_samples=int_value(metrics, "num-examples"),
                mean_loss=float_value(metrics, "mean-loss"),
                steps=int_value(metrics, "steps"),  # an int, unconverted: validate_report checks its value
                seconds=float_value(metrics, "seconds"),
            )
        except Exception as exc:  # whatever a client sent, a bad reply costs its update, not the run
            return ClientFailure(f"unreadable reply: {type(exc).__name__}: {exc}")

    def close(self, abort: bool = False) -> None:
        """Nothing to stop: the nodes belong to the federation, not to this run."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunDir.open(Path(str(context.run_config["run-dir"])))
    config = run.config()
    dataset = config.load_dataset()
    # the nodes get the config with its validation slice resolved, as their partition files record it
    resolve_validation_size(config, dataset)
    enrolment = str(context.run_config["enrolled-nodes"])
    clients = FlowerClients(
        grid,
        config,
        len(dataset.classes),
        float(context.run_config["node-wait-seconds"]),
        float(context.run_config["reply-timeout-seconds"]),
        read_enrolment(Path(enrolment)) if enrolment else None,
        training_domain(config, dataset),
    )
    holder = os.environ.get(LOCK_HOLDER)  # set by the launcher that holds the run folder's lock for this process
    metrics = train(
        FederatedTraining(config, dataset, runner=clients),
        run,
        resume=bool(context.run_config["resume"]),
        lock_held_by=int(holder) if holder else None,
    )
    log.info("run finished after %d rounds, test accuracy %.4f", metrics["rounds"], metrics["accuracy"])
