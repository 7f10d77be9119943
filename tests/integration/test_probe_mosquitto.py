"""The probe against a real Mosquitto, fed by paho-mqtt and by a worker: loss and
duplicates counted, and payloads checked against the device model."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import orjson
import paho.mqtt.client as paho
import pytest
from broker_helpers import stop_paho, until
from paho.mqtt.enums import CallbackAPIVersion

from iotix.clock import WallClock
from iotix.engine.probe import Probe, in_sample
from iotix.engine.worker import BrokerEndpoint, RunSettings, Worker
from iotix.model.conformance import Conformance
from iotix.model.loader import load_model_data
from iotix.model.runtime import DeviceBatch
from iotix.protocols.mqtt.packets import ProtocolVersion

if TYPE_CHECKING:
    from collections.abc import Iterable

    from iotix.testing import MosquittoBroker

TIMEOUT_S = 10.0
SENT_EPOCH_MS = 1_700_000_000_000
RECEIVED_EPOCH_S = SENT_EPOCH_MS / 1000 + 0.5
"""What the injected wall clock says: every message arrives 0.5 s after it was sent."""


def fixed_clock() -> float:
    return RECEIVED_EPOCH_S


def publish(broker: MosquittoBroker, messages: Iterable[tuple[str, bytes]]) -> None:
    """Publish (topic, payload) pairs in order at QoS 1 with paho, waiting for each ack."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"paho-{uuid.uuid4()}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            info = client.publish(topic, payload, qos=1)
            info.wait_for_publish(timeout=TIMEOUT_S)
            assert info.is_published()
    finally:
        client.disconnect()
        stop_paho(client)


def telemetry(device_id: str, seq: int) -> bytes:
    return orjson.dumps(
        {"device_id": device_id, "ts_ms": SENT_EPOCH_MS, "seq": seq, "temperature": 21.5}
    )


async def wait_until_received(probe: Probe, count: int) -> None:
    """Wait (bounded) until the probe's tracker has received ``count`` messages."""
    await until(lambda: probe.tracker.received + probe.tracker.unparseable >= count, TIMEOUT_S)


@pytest.fixture
def base_topic() -> str:
    return f"iotix-test/{uuid.uuid4()}"


@pytest.mark.parametrize("version", [ProtocolVersion.V311, ProtocolVersion.V5], ids=str)
def test_probe_counts_a_skipped_seq_as_lost_and_a_repeated_one_as_duplicate(
    mosquitto_session: MosquittoBroker, base_topic: str, version: ProtocolVersion
) -> None:
    seqs = [0, 1, 2, 4, 5, 5, 6]  # 3 never sent, 5 sent twice
    messages = [(f"{base_topic}/dev-1/telemetry", telemetry("dev-1", seq)) for seq in seqs]

    async def scenario() -> dict[str, object]:
        probe = Probe(
            mosquitto_session.host,
            mosquitto_session.port,
            topic_filter=f"{base_topic}/#",
            wall_clock=fixed_clock,
            version=version,
        )
        await probe.start()
        await asyncio.to_thread(publish, mosquitto_session, messages)
        await wait_until_received(probe, len(seqs))
        return await probe.stop()

    summary = asyncio.run(scenario())
    assert summary["received"] == 7
    assert summary["expected"] == 7
    assert summary["lost"] == 1
    assert summary["duplicates"] == 1
    assert summary["reordered"] == 0
    assert summary["delivery_ratio"] == pytest.approx(6 / 7)
    latency = summary["e2e_latency"]
    assert isinstance(latency, dict)
    assert latency["count"] == 6
    assert latency["min_s"] == pytest.approx(0.5, abs=1e-3)
    assert latency["max_s"] == pytest.approx(0.5, abs=1e-3)


def test_probe_keeps_streams_apart_and_counts_unparseable_payloads(
    mosquitto_session: MosquittoBroker, base_topic: str
) -> None:
    messages = [
        (f"{base_topic}/dev-1/telemetry", telemetry("dev-1", 0)),
        (f"{base_topic}/dev-1/alarm", telemetry("dev-1", 0)),
        (f"{base_topic}/dev-1/telemetry", telemetry("dev-1", 1)),
        (f"{base_topic}/dev-1/alarm", telemetry("dev-1", 1)),
        (f"{base_topic}/dev-1/status", b"online"),
    ]

    async def scenario() -> dict[str, object]:
        async with Probe(
            mosquitto_session.host,
            mosquitto_session.port,
            topic_filter=f"{base_topic}/#",
            wall_clock=fixed_clock,
        ) as probe:
            await asyncio.to_thread(publish, mosquitto_session, messages)
            await wait_until_received(probe, len(messages))
        return probe.tracker.summary()

    summary = asyncio.run(scenario())
    assert summary["streams"] == 2
    assert summary["received"] == 4
    assert summary["duplicates"] == 0
    assert summary["lost"] == 0
    assert summary["unparseable"] == 1
    assert summary["finished"] is True


def test_a_sampling_probe_follows_only_devices_in_its_sample(
    mosquitto_session: MosquittoBroker, base_topic: str
) -> None:
    devices = [f"device-{index}" for index in range(40)]
    followed = [device for device in devices if in_sample(device, 0.5)]
    assert 0 < len(followed) < len(devices)
    messages = [
        (f"{base_topic}/{device}/telemetry", telemetry(device, seq))
        for seq in range(3)
        for device in devices
    ]

    async def scenario() -> Probe:
        async with Probe(
            mosquitto_session.host,
            mosquitto_session.port,
            topic_filter=f"{base_topic}/#",
            sample=0.5,
            wall_clock=fixed_clock,
        ) as probe:
            await asyncio.to_thread(publish, mosquitto_session, messages)
            await until(lambda: probe.tracker.received + probe.skipped >= len(messages), TIMEOUT_S)
        return probe

    probe = asyncio.run(scenario())
    assert probe.tracker.received == 3 * len(followed)
    assert probe.skipped == 3 * (len(devices) - len(followed))
    assert probe.tracker.stream_count == len(followed)
    assert probe.tracker.summary()["lost"] == 0


# -- conformance to the device model ---------------------------------------------------


def room_model(base_topic: str) -> dict[str, Any]:
    """A model whose topics live under ``base_topic`` (the session broker is shared)."""
    walk = {"kind": "random_walk", "start": 20, "step": 0.5, "min": 5, "max": 40, "round": 1}
    return {
        "name": "room",
        "fields": {
            "temperature": walk,
            "mode": {"kind": "choice", "values": ["eco", "comfort"]},
            "occupied": {"kind": "boolean"},
        },
        "messages": {
            "telemetry": {
                "topic": base_topic + "/{device_id}/telemetry",
                "schedule": {"kind": "interval", "interval_s": 0.1},
                "qos": 1,
            }
        },
        "events": {
            "warm": {
                "when": "temperature > 20.5",
                "topic": base_topic + "/{device_id}/events",
                "fields": ["temperature"],
            }
        },
    }


def test_probe_counts_the_payloads_that_break_the_model(
    mosquitto_session: MosquittoBroker, base_topic: str
) -> None:
    loaded = load_model_data(room_model(base_topic))
    good = DeviceBatch(loaded.spec, indices=range(2), seed=1).advance(2.0)
    device_0 = [m for m in good if m.device_index == 0 and m.name == "telemetry"]
    base = orjson.loads(device_0[0].payload)
    topic = device_0[0].topic
    seqs = iter(range(device_0[-1].seq + 1, 10_000))  # no gap, no duplicate: nothing lost

    def broken(**changes: Any) -> bytes:
        document = {**base, "seq": next(seqs), **changes}
        return orjson.dumps({k: v for k, v in document.items() if v is not None})

    unknown_topic = f"{base_topic}/room-000000/status"
    bad = [
        (topic, broken(temperature=41.0)),
        (topic, broken(mode="off")),
        (topic, broken(temperature=41.0)),  # the same problem again
        (unknown_topic, orjson.dumps({**base, "seq": 0})),
        (topic, broken(occupied="yes")),
        (topic, broken(extra=1)),
        (topic, broken(mode=None)),  # beyond the first five distinct problems
    ]
    messages = [(m.topic, m.payload) for m in good] + bad

    async def scenario() -> dict[str, Any]:
        probe = Probe(
            mosquitto_session.host,
            mosquitto_session.port,
            topic_filter=f"{base_topic}/#",
            wall_clock=fixed_clock,
            conformance=Conformance.for_model(loaded),
        )
        await probe.start()
        await asyncio.to_thread(publish, mosquitto_session, messages)
        await wait_until_received(probe, len(messages))
        return await probe.stop()

    summary = asyncio.run(scenario())
    assert summary["received"] == len(messages)
    assert summary["lost"] == 0
    assert summary["duplicates"] == 0
    assert summary["schema_checked"] == len(messages)
    assert summary["schema_errors"] == len(bad)
    assert summary["schema_error_examples"] == [
        "telemetry.temperature: 41.0 above max 40",
        "telemetry.mode: 'off' is not one of 'eco', 'comfort'",
        f"no message of model 'room' has topic {unknown_topic!r}",
        "telemetry.occupied: expected a boolean, got 'yes'",
        "telemetry.extra: unexpected key",
    ]


def test_probe_finds_no_fault_with_what_a_worker_sends(
    mosquitto_session: MosquittoBroker, base_topic: str
) -> None:
    loaded = load_model_data(room_model(base_topic))
    devices = 4
    settings = RunSettings(
        devices=devices,
        brokers=(BrokerEndpoint(mosquitto_session.host, mosquitto_session.port),),
    )

    async def scenario() -> tuple[int, dict[str, Any]]:
        probe = Probe(
            mosquitto_session.host,
            mosquitto_session.port,
            topic_filter=f"{base_topic}/#",
            conformance=Conformance.for_model(loaded),
        )
        await probe.start()
        worker = Worker(loaded, range(devices), settings, WallClock())
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.counters.messages_acked >= 20 * devices, TIMEOUT_S)
        stop.set()
        await running
        acked = worker.counters.messages_acked
        await wait_until_received(probe, acked)
        return acked, await probe.stop()

    acked, summary = asyncio.run(scenario())
    assert summary["unparseable"] == 0
    assert summary["received"] >= acked >= 20 * devices
    assert summary["schema_checked"] == summary["received"]
    assert summary["schema_errors"] == 0
    assert summary["schema_error_examples"] == []
