"""How a worker counts the commands its devices receive (no broker: the events are
handed to a device as its connection would)."""

from __future__ import annotations

import json

import pytest

from iotix.clock import WallClock
from iotix.engine.worker import BrokerEndpoint, RunSettings, Worker, _command_pattern
from iotix.errors import ModelError
from iotix.model.loader import load_model_data
from iotix.model.runtime import MessageKind
from iotix.protocols.mqtt.session import MessageReceivedEvent

MODEL = {
    "name": "box",
    "id": "box-{index:03d}",
    "fields": {"n": {"kind": "counter"}},
    "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 1}}},
    "commands": {
        "topic": "site/{index:03d}/{command}",
        "handlers": {"reboot": {"offline_s": 30}, "ping": {}},
    },
}


def _worker() -> Worker:
    settings = RunSettings(devices=1, brokers=(BrokerEndpoint("127.0.0.1", 1),))
    return Worker(load_model_data(MODEL), range(1), settings, WallClock())


def test_a_command_to_an_offline_device_is_not_answered() -> None:
    worker = _worker()
    device = worker.devices[0]
    device(MessageReceivedEvent("site/000/reboot", b"{}", 1, False))
    device(MessageReceivedEvent("site/000/ping", b"{}", 1, False))  # it is offline now
    counters = worker.counters
    assert counters.commands_received == 2
    assert counters.commands_answered == 1
    assert counters.errors_by_kind == {"command ignored: device offline": 1}


def test_a_retained_command_is_old_and_ignored() -> None:
    worker = _worker()
    device = worker.devices[0]
    device(MessageReceivedEvent("site/000/reboot", b"{}", 1, True))  # kept by the broker
    device(MessageReceivedEvent("site/000/ping", b"{}", 1, False))
    counters = worker.counters
    assert counters.commands_received == 1
    assert counters.commands_answered == 1
    assert counters.errors_by_kind == {"command ignored: retained": 1}
    assert worker.batch.offline_until_s[0] < worker.clock.now_s()  # it did not reboot


def test_a_command_whose_payload_the_handler_cannot_read_is_answered_invalid() -> None:
    model = {
        **MODEL,
        "commands": {
            "topic": "site/{index:03d}/{command}",
            "handlers": {"limit": {"set": {"n": "payload.n"}}},
        },
    }
    worker = Worker(
        load_model_data(model),
        range(1),
        RunSettings(devices=1, brokers=(BrokerEndpoint("127.0.0.1", 1),)),
        WallClock(),
    )
    device = worker.devices[0]
    device(MessageReceivedEvent("site/000/limit", b"[1, 2]", 1, False))  # JSON, not an object
    device(MessageReceivedEvent("site/000/limit", b"not json", 1, False))
    due = worker.batch.advance(worker.clock.now_s() + 1)
    replies = [m for m in due if m.kind is MessageKind.REPLY]
    assert [json.loads(m.payload)["status"] for m in replies] == ["invalid_payload"] * 2
    assert worker.counters.commands_answered == 2
    assert worker.counters.errors_by_kind == {}


def test_a_command_topic_keeps_its_format_spec_for_the_subscription() -> None:
    topic_filter, pattern = _command_pattern("site/{index:03d}/{command}")
    assert topic_filter == "site/{index:03d}/+"
    match = pattern.match("site/007/reboot")
    assert match is not None
    assert match["command"] == "reboot"


def test_a_command_topic_without_the_command_is_refused() -> None:
    model = {**MODEL, "commands": {"topic": "site/{index}/cmd", "handlers": {"ping": {}}}}
    with pytest.raises(ModelError) as info:
        load_model_data(model)
    [issue] = info.value.issues
    assert issue.dotted_path == "commands.topic"
    assert "it has no {command}" in issue.problem
