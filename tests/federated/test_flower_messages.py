"""The ServerApp's message exchange, on a fake Grid: replies matched to their messages, nodes to their enrolment.

No Flower process runs here: the fake Grid behaves as Flower's HttpGrid does towards the ServerApp
(message ids set on push, replies carrying ``reply_to_message_id``), and its SuperLink errors are
made by Flower's own helper, so they carry the SuperLink's node id (1) as Flower's do.
"""

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from dipsen.config import TrainConfig
from dipsen.errors import DipsenError
from dipsen.federated.client import ClientUpdate, LocalTraining
from dipsen.federated.flower.server_app import FlowerClients
from dipsen.federated.flower.task import (
    float_value,
    int_value,
    message_record,
    read_enrolment,
    str_value,
    write_enrolment,
)
from dipsen.federated.workers import ClientFailure, ClientTask


class FakeGrid:
    """Nodes 101, 102, ... serve clients 0, 1, ...; ``train[node]`` says how a node answers a train message.

    ``"ok"``: a reply with the weights it was sent; ``"float-steps"``: the same, but with its step
    count sent as a float; ``"unavailable"``: the SuperLink's node-unavailable error; ``"silent"``:
    nothing, ever.
    """

    def __init__(self, train: dict[int, str], query: dict[int, str] | None = None, claims: dict[int, int] | None = None) -> None:
        self.train, self.query, self.claims = train, query or {}, claims or {}
        self.sent: list[Message] = []
        self._replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.train)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"message-{len(self.sent)}"  # as HttpGrid does
            self.sent.append(message)
            ids.append(message.metadata.message_id)
            self._answer(message)
        return ids

    def _answer(self, message: Message) -> None:
        node = message.metadata.dst_node_id
        if message.metadata.message_type == MessageType.QUERY:
            how = self.query.get(node, "ok")
            client = self.claims.get(node, node - 101)  # what a node says, true or not
            content = RecordDict({"client": ConfigRecord({"client": client, "samples": 3})})
        else:
            how = self.train[node]
            steps = 1.0 if how == "float-steps" else 1
            metrics = MetricRecord({"num-examples": 3, "mean-loss": 0.5, "steps": steps, "seconds": 0.01})
            content = RecordDict({"arrays": message.content["arrays"], "metrics": metrics})
        if how in ("ok", "float-steps"):
            self._replies.append(Message(content, reply_to=message))
        elif how == "unavailable":
            self._replies.append(create_message_error_unavailable_res_message(message.metadata, "node_unavail"))

    def pull_messages(self, message_ids) -> list[Message]:
        wanted = set(message_ids)
        found = [r for r in self._replies if r.metadata.reply_to_message_id in wanted]
        self._replies = [r for r in self._replies if r not in found]
        return found

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        """As Flower's HttpGrid: push, then pull until every message is answered or ``timeout`` passes."""
        ids = set(self.push_messages(messages))
        end, replies = time.time() + (timeout or 0.0), []
        while time.time() < end:
            found = self.pull_messages(ids)
            replies += found
            ids -= {r.metadata.reply_to_message_id for r in found}
            if not ids:
                break
            time.sleep(0.05)
        return replies


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """What Flower sets in a ServerApp process before it runs, and Message() reads."""
    for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 3)):
        monkeypatch.setattr(TaskIdentity, name, value)


CONFIG = dict(dataset="mnist", model="cnn", clients=3, fraction=1.0, rounds=1, seed=0, workers=1)


def _tasks(clients: list[int]) -> list[ClientTask]:
    return [ClientTask(c, np.arange(3), 100 + c) for c in clients]


def test_superlink_errors_are_reported_for_the_client_they_answer():
    grid = FakeGrid({101: "ok", 102: "unavailable", 103: "silent"})
    clients = FlowerClients(grid, TrainConfig(**CONFIG).validate(), 10, node_wait_seconds=5, reply_timeout_seconds=1.0)
    start = time.monotonic()
    ok, unavailable, silent = clients.run({"w": torch.ones(2)}, _tasks([0, 1, 2]))
    assert time.monotonic() - start < 5
    assert isinstance(ok, ClientUpdate) and torch.equal(ok.state["w"], torch.ones(2))
    # the SuperLink's error names the node that did not answer, not "no reply"
    assert isinstance(unavailable, ClientFailure), unavailable
    assert "Node Unavailable" in unavailable.reason and "no reply" not in unavailable.reason
    assert isinstance(silent, ClientFailure) and silent.reason == "no reply within 1 s"


def test_messages_live_as_long_as_the_server_waits_for_their_replies():
    grid = FakeGrid({101: "ok", 102: "ok", 103: "ok"})
    clients = FlowerClients(grid, TrainConfig(**CONFIG).validate(), 10, node_wait_seconds=7, reply_timeout_seconds=2.5)
    clients.run({"w": torch.ones(2)}, _tasks([0, 2]))
    queries = [m for m in grid.sent if m.metadata.message_type == MessageType.QUERY]
    trains = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(queries) == 3 and len(trains) == 2
    assert {m.metadata.ttl for m in queries} == {7} and {m.metadata.ttl for m in trains} == {2.5}


def test_a_node_that_cannot_be_reached_at_start_is_named_by_its_own_id():
    grid = FakeGrid({101: "ok", 102: "ok", 103: "ok"}, query={102: "unavailable"})
    with pytest.raises(DipsenError, match=r"^node 102 cannot serve this run: .*Node Unavailable"):
        FlowerClients(grid, TrainConfig(**CONFIG).validate(), 10, node_wait_seconds=1, reply_timeout_seconds=1)


@pytest.mark.parametrize(
    "read, record, message",
    [
        (int_value, ConfigRecord({"seed": "5"}), "'seed' is a str, expected an int"),
        (int_value, ConfigRecord({"seed": True}), "'seed' is a bool, expected an int"),
        (int_value, MetricRecord({"steps": 1.0}), "'steps' is a float, expected an int"),
        (float_value, ConfigRecord({"mean-loss": "0.5"}), "'mean-loss' is a str, expected a number"),
        (float_value, MetricRecord({"mean-loss": [0.5]}), "'mean-loss' is a list, expected a number"),
        (str_value, ConfigRecord({"train-config": b"{}"}), "'train-config' is a bytes, expected a str"),
        (str_value, ConfigRecord({}), "no value 'train-config'"),
    ],
)
def test_a_wrong_typed_or_missing_value_is_a_one_line_error_naming_its_key(read, record, message):
    key = message.split("'")[1]
    with pytest.raises(DipsenError) as raised:
        read(record, key)
    assert str(raised.value) == f"malformed message: {message}"


def test_a_missing_or_wrong_kind_of_record_is_a_one_line_error_naming_it():
    content = RecordDict({"metrics": ConfigRecord({"steps": 1})})
    with pytest.raises(DipsenError, match=r"^malformed message: no 'arrays' record$"):
        message_record(content, "arrays", ArrayRecord)
    with pytest.raises(DipsenError, match=r"^malformed message: record 'metrics' is a ConfigRecord, expected a MetricRecord$"):
        message_record(content, "metrics", MetricRecord)
    assert int_value(message_record(RecordDict({"m": MetricRecord({"steps": 1})}), "m", MetricRecord), "steps") == 1


def test_a_reply_with_a_wrong_typed_value_costs_that_update_with_a_one_line_reason():
    grid = FakeGrid({101: "ok", 102: "float-steps", 103: "ok"})
    clients = FlowerClients(grid, TrainConfig(**CONFIG).validate(), 10, node_wait_seconds=5, reply_timeout_seconds=1.0)
    ok, bad = clients.run({"w": torch.ones(2)}, _tasks([0, 1]))
    assert isinstance(ok, ClientUpdate) and ok.steps == 1
    assert isinstance(bad, ClientFailure)
    assert bad.reason == "unreadable reply: DipsenError: malformed message: 'steps' is a float, expected an int"


def test_a_node_that_names_its_client_with_a_wrong_type_stops_the_run_naming_the_key():
    class StrClientGrid(FakeGrid):
        def _answer(self, message: Message) -> None:
            content = RecordDict({"client": ConfigRecord({"client": str(message.metadata.dst_node_id - 101)})})
            self._replies.append(Message(content, reply_to=message))

    grid = StrClientGrid({101: "ok", 102: "ok", 103: "ok"})
    with pytest.raises(DipsenError, match=r"^malformed message: 'client' is a str, expected an int$"):
        FlowerClients(grid, TrainConfig(**CONFIG).validate(), 10, node_wait_seconds=1, reply_timeout_seconds=1)


ENROLLED = {101: 0, 102: 1, 103: 2}  # node id -> client, as the deployment enrolled their keys


def test_a_rogue_node_that_claims_another_clients_partition_is_refused():
    grid = FakeGrid({101: "ok", 102: "ok", 103: "ok"}, claims={103: 0})  # node 103 says it serves client 0
    with pytest.raises(DipsenError, match=r"^node 103 claims client 0, but it is enrolled for client 2: refused$"):
        FlowerClients(grid, TrainConfig(**CONFIG).validate(), 10, node_wait_seconds=1, reply_timeout_seconds=1, enrolled=ENROLLED)


def test_a_node_outside_the_enrolment_is_never_asked_nor_sent_a_client_update():
    # node 104 connected first and claims client 2; node 103, enrolled for client 2, too
    grid = FakeGrid({104: "ok", 101: "ok", 102: "ok", 103: "ok"}, claims={104: 2})
    clients = FlowerClients(
        grid, TrainConfig(**CONFIG).validate(), 10, node_wait_seconds=1, reply_timeout_seconds=1, enrolled=ENROLLED
    )
    assert clients.nodes == {0: 101, 1: 102, 2: 103}
    clients.run({"w": torch.ones(2)}, _tasks([0, 1, 2]))
    assert 104 not in {m.metadata.dst_node_id for m in grid.sent}
    # without an enrolment, its claim is all the server has to go by
    with pytest.raises(DipsenError, match=r"^client 2 is served by two nodes \(104, 103\)$"):
        FlowerClients(
            FakeGrid({104: "ok", 101: "ok", 102: "ok", 103: "ok"}, claims={104: 2}),
            TrainConfig(**CONFIG).validate(),
            10,
            node_wait_seconds=1,
            reply_timeout_seconds=1,
        )


def test_the_server_waits_for_the_enrolled_nodes_not_for_any_three():
    grid = FakeGrid({101: "ok", 102: "ok", 104: "ok"}, claims={104: 2})  # 103 never connects
    with pytest.raises(DipsenError, match=r"^only 2 of 3 client nodes connected within 0.5 s$"):
        FlowerClients(
            grid, TrainConfig(**CONFIG).validate(), 10, node_wait_seconds=0.5, reply_timeout_seconds=1, enrolled=ENROLLED
        )
    assert grid.sent == []


def test_an_enrolment_must_name_each_client_once():
    with pytest.raises(DipsenError, match=r"^the node enrolment does not name each of the clients 0..2 exactly once$"):
        FlowerClients(
            FakeGrid({101: "ok", 102: "ok", 103: "ok"}),
            TrainConfig(**CONFIG).validate(),
            10,
            node_wait_seconds=1,
            reply_timeout_seconds=1,
            enrolled={101: 0, 102: 1, 103: 1},
        )


def test_an_enrolment_file_round_trips_and_a_malformed_one_is_named(tmp_path):
    big = 9812417804378425701  # Flower's node ids are unsigned 64-bit
    assert read_enrolment(write_enrolment(tmp_path / "enrolled.json", {big: 0, 7: 1})) == {big: 0, 7: 1}
    (tmp_path / "bad.json").write_text('{"7": "one"}')
    with pytest.raises(DipsenError, match=r"maps a node to something other than a client number"):
        read_enrolment(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[7, 0]")
    with pytest.raises(DipsenError, match=r"^cannot read the node enrolment .*list.json: not a JSON object$"):
        read_enrolment(tmp_path / "list.json")


def test_adversarial_training_sends_the_feasible_domain_to_the_nodes(ctu13):
    from dipsen.attack.domain import feasible_domain
    from dipsen.federated.flower.client_app import _domain

    grid = FakeGrid({101: "ok", 102: "ok", 103: "ok"})
    domain = feasible_domain(ctu13)
    clients = FlowerClients(
        grid,
        TrainConfig(**CONFIG, adv_train="fgsm-rs").validate(),
        2,
        node_wait_seconds=5,
        reply_timeout_seconds=1.0,
        domain=domain,
    )
    clients.run({"w": torch.ones(2)}, _tasks([0]))
    (train,) = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert _domain(message_record(train.content, "config", ConfigRecord)) == domain


def test_a_task_s_learning_rate_reaches_the_client_training():
    from dipsen.federated.flower.client_app import _at_round_rate

    grid = FakeGrid({101: "ok", 102: "ok", 103: "ok"})
    clients = FlowerClients(grid, TrainConfig(**CONFIG).validate(), 2, node_wait_seconds=5, reply_timeout_seconds=1.0)
    clients.run({"w": torch.ones(2)}, [ClientTask(0, np.arange(3), 100, lr=0.0125)])
    (train,) = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    settings = message_record(train.content, "config", ConfigRecord)
    assert _at_round_rate(LocalTraining(lr=0.001), settings).lr == 0.0125
    assert _at_round_rate(LocalTraining(lr=0.001), ConfigRecord({"seed": 1})).lr == 0.001
