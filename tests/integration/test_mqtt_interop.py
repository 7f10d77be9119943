"""The MQTT interoperability matrix: iotix's client and engine against four brokers.

Mosquitto 2 (the reference), amqtt (the embedded broker), NATS 2.9's MQTT listener and
RabbitMQ 3.10's MQTT plugin, each started once for this module, privately, on free
ports (never a broker this machine already runs), and crossed with the MQTT versions and
QoS levels each one supports: connect, subscribe, publish and receive with iotix's own
client; a worker's fleet watched by a probe that must count nothing lost; will and
retained messages; a fleet that comes back after its broker restarts.

Where brokers differ, the difference is written down in :data:`FACTS` and asserted,
never skipped: a broker that refuses MQTT 5, grants QoS 1 to a QoS 2 subscription or
closes the connection on a QoS 2 PUBLISH must keep doing exactly that, and iotix must
turn it into an error it reports, not a crash. ``docs/interop.md`` has the same matrix
as a table.

Every wait is bounded and waits for an event (an acknowledgement, a message, a
counter); nothing sleeps in place of synchronisation. Retained and QoS 2 checks that
count what did *not* arrive publish a marker afterwards and wait for it: each broker
delivers in order, so once the marker is in, everything before it is too.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from unittest import mock

import pytest
from broker_helpers import until

from iotix.adapters.mqtt import (
    BROKER_CLOSED,
    CLOSED_BEFORE_CONNACK,
    MQTTConnectError,
    open_connection,
)
from iotix.clock import WallClock
from iotix.engine.probe import Probe
from iotix.engine.worker import BrokerEndpoint, RunSettings, Worker
from iotix.model.loader import load_model_data
from iotix.protocols.mqtt.packets import (
    ConnAck,
    Connect,
    PacketReader,
    ProtocolVersion,
    Publish,
    Subscription,
    Will,
    encode,
)
from iotix.protocols.mqtt.session import MessageReceivedEvent, SessionSettings
from iotix.testing import MosquittoBroker, embedded
from iotix.testing.embedded import EmbeddedBroker
from iotix.testing.nats import NATSServer
from iotix.testing.rabbitmq import RabbitMQServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from _pytest.mark.structures import ParameterSet

    from iotix.adapters.mqtt import MQTTConnection
    from iotix.protocols.mqtt.session import Event

TIMEOUT_S = 10.0
RESTART_TIMEOUT_S = 60.0
"""A RabbitMQ node takes 5 to 10 s to boot; the fleet waits for it."""
MESSAGES = 10
DEVICES = 20
V311, V5 = ProtocolVersion.V311, ProtocolVersion.V5
PUBREC, PUBACK = 0x5, 0x4
PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"
REFUSED_3_1_1 = b"\x20\x02\x00\x01"
"""A 3.1.1 CONNACK with return code 1, unacceptable protocol version."""


@dataclass(frozen=True)
class BrokerFacts:
    """What one broker does, where brokers differ, as this module asserts it."""

    versions: tuple[ProtocolVersion, ...]
    """The MQTT versions it accepts."""
    v5_refusal: bytes | None
    """What a 5.0 CONNECT gets before the broker closes the connection: a 3.1.1 CONNACK
    with return code 1, or nothing at all (b""); None when the broker accepts 5.0."""
    v5_connect_failure: str | None
    """What a worker counts a refused 5.0 CONNECT under (``connect_failures_by_reason``,
    ``MQTTConnectError.kind``); None when the broker accepts 5.0."""
    granted_for_qos2: int
    """The QoS granted to a subscription asking for QoS 2."""
    qos2_publish_answer: int | None
    """The packet type a QoS 2 PUBLISH is answered with: PUBREC (the QoS 2 flow),
    PUBACK (taken as QoS 1), or None: the broker closes the connection."""
    qos2_close_reason: str | None
    """The ``close_reason`` of a connection a QoS 2 PUBLISH ended: a worker counts its
    unacknowledged messages as ``not acknowledged: <reason>``; None when the broker
    does QoS 2."""
    delivers_at_subscription_qos: bool
    """True when a message is delivered at the subscription's QoS even if it was
    published at a lower one (MQTT-3.8.4-8 says the lower of the two)."""
    wildcard_retained_copies: int
    """Copies of a retained message a new ``base/+`` subscriber gets while another
    client holds the exact-topic subscription ``base/state``."""
    retained_survives_crash: bool
    """Whether a retained message is still there after :attr:`Broker.crash` and
    :attr:`Broker.restart` (as the module's brokers are configured)."""


FACTS = {
    "mosquitto": BrokerFacts(
        versions=(V311, V5),
        v5_refusal=None,
        v5_connect_failure=None,
        granted_for_qos2=2,
        qos2_publish_answer=PUBREC,
        qos2_close_reason=None,
        delivers_at_subscription_qos=False,
        wildcard_retained_copies=1,
        retained_survives_crash=False,  # the fixture runs it with `persistence false`
    ),
    # amqtt 0.12: MQTT 3.1.1 only. It delivers at the subscription's QoS, and when a
    # client connects it replays the retained messages matching every topic filter any
    # client holds (at QoS 0), before its own subscription replays them again.
    "amqtt": BrokerFacts(
        versions=(V311,),
        v5_refusal=REFUSED_3_1_1,
        v5_connect_failure="unsupported protocol version",
        granted_for_qos2=2,
        qos2_publish_answer=PUBREC,
        qos2_close_reason=None,
        delivers_at_subscription_qos=True,
        wildcard_retained_copies=2,
        retained_survives_crash=False,  # kept in memory only
    ),
    # NATS 2.9: MQTT 3.1.1 only, QoS 0 and 1; a QoS 2 PUBLISH ends the connection
    # ("publish QoS=2 not supported" in its log).
    "nats": BrokerFacts(
        versions=(V311,),
        v5_refusal=REFUSED_3_1_1,
        v5_connect_failure="unsupported protocol version",
        granted_for_qos2=1,
        qos2_publish_answer=None,
        qos2_close_reason=BROKER_CLOSED,
        delivers_at_subscription_qos=False,
        wildcard_retained_copies=1,
        retained_survives_crash=True,  # kept in a JetStream stream, on disk
    ),
    # RabbitMQ 3.10: MQTT 3.1.1 only (5.0 came in 3.13), QoS 0 and 1. A QoS 2 PUBLISH
    # is routed as QoS 1 and answered with PUBACK, which iotix's session takes for the
    # protocol error it is (a QoS 2 flow ends with PUBCOMP) and closes the connection.
    # Retained messages are replayed to exact-topic subscriptions only.
    "rabbitmq": BrokerFacts(
        versions=(V311,),
        v5_refusal=b"",
        v5_connect_failure=CLOSED_BEFORE_CONNACK,
        granted_for_qos2=1,
        qos2_publish_answer=PUBACK,
        qos2_close_reason="PUBACK for a QoS 2 message",
        delivers_at_subscription_qos=False,
        wildcard_retained_copies=0,
        # Its retained store (DETS) keeps them over a graceful restart, not a crash.
        retained_survives_crash=False,
    ),
}


# -- the brokers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    """One broker of the matrix, whatever its kind: where it listens, what it does, and
    how to take it down and bring it back on the same port."""

    name: str
    host: str
    port: int
    facts: BrokerFacts
    crash: Callable[[], None]
    restart: Callable[[], None]


@pytest.fixture(scope="module")
def mosquitto_broker(mosquitto_binary: Path) -> Iterator[Broker]:
    # A broker of this module's own: the session-wide one must not be restarted.
    with MosquittoBroker(binary=mosquitto_binary) as server:
        yield Broker(
            "mosquitto",
            server.host,
            server.port,
            FACTS["mosquitto"],
            crash=server.kill,
            restart=server.restart,
        )


@pytest.fixture(scope="module")
def amqtt_broker() -> Iterator[Broker]:
    with EmbeddedBroker() as server:
        port = server.port

        def start_again() -> None:
            # EmbeddedBroker always starts on a new free port; a restart needs the old
            # one, so its port picker is made to hand that back.
            with mock.patch.object(embedded, "_pick_ports", return_value=[port]):
                server.start()

        # In-process: it cannot be killed, only shut down (clients see their
        # connections close, as after a crash).
        yield Broker("amqtt", server.host, port, FACTS["amqtt"], server.stop, start_again)


@pytest.fixture(scope="module")
def nats_broker() -> Iterator[Broker]:
    with NATSServer() as server:
        yield Broker("nats", server.host, server.port, FACTS["nats"], server.kill, server.restart)


@pytest.fixture(scope="module")
def rabbitmq_broker() -> Iterator[Broker]:
    with RabbitMQServer() as server:
        yield Broker(
            "rabbitmq",
            server.host,
            server.port,
            FACTS["rabbitmq"],
            server.kill,
            server.restart,
        )


@pytest.fixture
def broker(request: pytest.FixtureRequest, broker_name: str) -> Broker:
    """The module's broker named by the test's ``broker_name`` parameter (started on
    first use, stopped when the module is done)."""
    found: Broker = request.getfixturevalue(f"{broker_name}_broker")
    return found


@pytest.fixture
def base() -> str:
    """A topic prefix of the test's own: the brokers are shared by the module."""
    return f"interop/{uuid.uuid4().hex}"


def brokers(where: Callable[[BrokerFacts], bool] = lambda _facts: True) -> list[str]:
    return [name for name, facts in FACTS.items() if where(facts)]


def with_versions() -> list[ParameterSet]:
    return [
        pytest.param(name, version, id=f"{name}-{version.name}")
        for name, facts in FACTS.items()
        for version in facts.versions
    ]


def with_versions_and_qos() -> list[ParameterSet]:
    """Every QoS a broker completes a flow for: QoS 2 only where it answers PUBREC."""
    return [
        pytest.param(name, version, qos, id=f"{name}-{version.name}-qos{qos}")
        for name, facts in FACTS.items()
        for version in facts.versions
        for qos in (0, 1, 2)
        if qos < 2 or facts.qos2_publish_answer == PUBREC
    ]


# -- helpers ---------------------------------------------------------------------------


class Inbox:
    """The messages an iotix connection received (its ``on_event``)."""

    def __init__(self) -> None:
        self.messages: list[MessageReceivedEvent] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, MessageReceivedEvent):
            self.messages.append(event)

    def has(self, payload: bytes) -> bool:
        return any(message.payload == payload for message in self.messages)

    def before(self, payload: bytes) -> list[MessageReceivedEvent]:
        """The messages that came before the first one carrying ``payload``."""
        index = next(i for i, m in enumerate(self.messages) if m.payload == payload)
        return self.messages[:index]


async def connect(
    broker: Broker,
    version: ProtocolVersion = V311,
    *,
    on_event: Callable[[Event], None] | None = None,
    will: Will | None = None,
) -> MQTTConnection:
    settings = SessionSettings(
        client_id=f"interop-{uuid.uuid4().hex[:16]}", version=version, will=will
    )
    return await open_connection(
        broker.host, broker.port, settings, on_event=on_event, timeout_s=TIMEOUT_S
    )


def pulse_model(base: str, qos: int) -> dict[str, Any]:
    """Devices that send JSON telemetry (``device_id``, ``seq``, ``ts_ms``) every 0.1 s."""
    return {
        "name": "pulse",
        "fields": {"n": {"kind": "counter"}},
        "messages": {
            "telemetry": {
                "topic": base + "/{device_id}/telemetry",
                "schedule": {"kind": "interval", "interval_s": 0.1},
                "qos": qos,
            }
        },
    }


def fleet(
    broker: Broker, base: str, devices: int, *, qos: int = 1, version: ProtocolVersion = V311
) -> Worker:
    return Worker(
        load_model_data(pulse_model(base, qos)),
        range(devices),
        RunSettings(
            devices=devices,
            brokers=(BrokerEndpoint(broker.host, broker.port),),
            version=version,
            reconnect_min_s=0.2,
            reconnect_max_s=1.0,
        ),
        WallClock(),
    )


def wire_answer(broker: Broker, packets: list[bytes]) -> tuple[bytes, bool]:
    """Send raw packets on a fresh socket, each once the previous one is answered; return
    the broker's answer to the last one (one whole packet, or b"" when the broker closed
    the connection instead) and whether the connection is still open after it (a
    PINGREQ gets its PINGRESP)."""
    with socket.create_connection((broker.host, broker.port), timeout=TIMEOUT_S) as sock:
        answer = b""
        for packet in packets:
            sock.sendall(packet)
            answer = _read_packet(sock)
        if not answer:
            return answer, False
        try:
            sock.sendall(PINGREQ)
            return answer, _read_packet(sock) == PINGRESP
        except ConnectionError:  # the broker closed it: the write or the read says so
            return answer, False


def _read_packet(sock: socket.socket) -> bytes:
    """One whole packet as sent, or b"" at the end of the stream."""
    data = b""
    while True:
        size = _packet_size(data)
        if size is not None and len(data) >= size:
            return data[:size]
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def _packet_size(data: bytes) -> int | None:
    """A packet's whole size once its fixed header is in (Remaining Length, MQTT 2.2.3),
    read by hand so that a packet of any version comes back as sent; else None."""
    length = shift = 0
    for pos in range(1, min(len(data), 5)):
        length |= (data[pos] & 0x7F) << shift
        shift += 7
        if not data[pos] & 0x80:
            return pos + 1 + length
    return None


# -- connect: which versions ------------------------------------------------------------


@pytest.mark.parametrize("broker_name", brokers())
def test_a_5_0_connect_gets_the_brokers_answer(broker: Broker) -> None:
    connect_v5 = encode(Connect(f"interop-{uuid.uuid4().hex[:16]}", version=V5), V5)
    answer, still_open = wire_answer(broker, [connect_v5])
    if broker.facts.v5_refusal is None:
        [connack] = PacketReader(V5).feed(answer)
        assert isinstance(connack, ConnAck)
        assert connack.reason_code == 0
        assert still_open
    else:
        assert answer == broker.facts.v5_refusal
        assert not still_open


@pytest.mark.parametrize("broker_name", brokers(lambda facts: V5 not in facts.versions))
def test_iotix_reports_a_refused_5_0_connect_with_the_brokers_reason(broker: Broker) -> None:
    async def scenario() -> None:
        await connect(broker, V5)

    with pytest.raises(MQTTConnectError) as caught:
        asyncio.run(scenario())
    error = caught.value
    assert error.kind == broker.facts.v5_connect_failure
    if broker.facts.v5_refusal == REFUSED_3_1_1:
        # A 3.1.1 CONNACK (no property length), read as the 3.1.1 refusal it is.
        assert error.reason_code == 0x84
        assert str(error) == "connection refused: unsupported protocol version"
    else:  # RabbitMQ sends nothing at all: the reason is a guess, and said to be one
        assert error.reason_code is None
        assert str(error) == (
            "the broker closed the connection before its CONNACK "
            "(a broker without MQTT 5 may do this to a 5.0 CONNECT)"
        )


@pytest.mark.parametrize("broker_name", brokers(lambda facts: V5 not in facts.versions))
def test_a_5_0_fleet_counts_the_refusals_of_a_3_1_1_broker_by_reason(
    broker: Broker, base: str
) -> None:
    devices = 3

    async def scenario() -> Worker:
        worker = fleet(broker, base, devices, version=V5)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.counters.connect_failures >= 2 * devices)
        stop.set()
        await running
        return worker

    counters = asyncio.run(scenario()).counters
    assert counters.connects == 0
    assert counters.connect_failures_by_reason == {
        broker.facts.v5_connect_failure: counters.connect_failures
    }
    assert counters.reconciles(), counters.problems()


# -- publish and subscribe ---------------------------------------------------------------


@pytest.mark.parametrize(("broker_name", "version", "qos"), with_versions_and_qos())
def test_messages_published_at_each_qos_reach_an_iotix_subscriber(
    broker: Broker, base: str, version: ProtocolVersion, qos: int
) -> None:
    payloads = [b"m%d" % i for i in range(MESSAGES)]

    async def scenario() -> tuple[tuple[int, ...], list[int], list[MessageReceivedEvent]]:
        inbox = Inbox()
        subscriber = await connect(broker, version, on_event=inbox)
        suback = await subscriber.subscribe([Subscription(f"{base}/#", qos=2)])
        publisher = await connect(broker, version)
        ids = [publisher.publish(f"{base}/m", payload, qos=qos) for payload in payloads]
        acks = await asyncio.gather(*(publisher.wait_acked(i) for i in ids if i is not None))
        await until(lambda: len(inbox.messages) >= MESSAGES, TIMEOUT_S)
        await publisher.disconnect()
        await subscriber.disconnect()
        return suback.reason_codes, [ack.reason_code for ack in acks], inbox.messages

    granted, ack_reasons, received = asyncio.run(scenario())
    facts = broker.facts
    assert granted == (facts.granted_for_qos2,)
    assert ack_reasons == ([0] * MESSAGES if qos else [])
    assert [m.payload for m in received] == payloads
    delivered = granted[0] if facts.delivers_at_subscription_qos else min(qos, granted[0])
    assert {m.qos for m in received} == {delivered}
    assert not any(m.retain for m in received)


@pytest.mark.parametrize("broker_name", brokers(lambda facts: facts.qos2_publish_answer != PUBREC))
def test_a_qos2_publish_without_qos2_support_is_a_connect_error_not_a_crash(
    broker: Broker, base: str
) -> None:
    async def scenario() -> tuple[bool, list[MessageReceivedEvent]]:
        inbox = Inbox()
        subscriber = await connect(broker, on_event=inbox)
        await subscriber.subscribe([Subscription(f"{base}/#", qos=1)])
        publisher = await connect(broker)
        packet_id = publisher.publish(f"{base}/q2", b"exactly once", qos=2)
        assert packet_id is not None
        with pytest.raises(MQTTConnectError) as caught:
            await asyncio.wait_for(publisher.wait_acked(packet_id), TIMEOUT_S)
        reason = broker.facts.qos2_close_reason
        assert publisher.close_reason == reason
        if reason == BROKER_CLOSED:
            assert str(caught.value) == "connection closed by the broker"
        else:
            assert str(caught.value) == f"connection closed: {reason}"
        # The marker comes after the QoS 2 message, if that was delivered at all.
        marker = await connect(broker)
        await marker.wait_acked(marker.publish(f"{base}/marker", b"marker", qos=1))
        await until(lambda: inbox.has(b"marker"), TIMEOUT_S)
        await marker.disconnect()
        await subscriber.disconnect()
        return publisher.closed, inbox.before(b"marker")

    closed, before_marker = asyncio.run(scenario())
    assert closed
    delivered = [(m.payload, m.qos) for m in before_marker]
    if broker.facts.qos2_publish_answer == PUBACK:
        assert delivered == [(b"exactly once", 1)]  # routed as QoS 1 before the PUBACK
    else:
        assert delivered == []  # refused: the broker closed the connection instead


@pytest.mark.parametrize("broker_name", brokers())
def test_a_qos2_publish_gets_the_brokers_answer_on_the_wire(broker: Broker, base: str) -> None:
    packets = [
        encode(Connect(f"interop-{uuid.uuid4().hex[:16]}"), V311),
        encode(Publish(f"{base}/q2", b"x", qos=2, packet_id=7), V311),
    ]
    answer, still_open = wire_answer(broker, packets)
    expected = broker.facts.qos2_publish_answer
    if expected is None:
        assert (answer, still_open) == (b"", False)
    else:
        assert answer == bytes([expected << 4, 2, 0, 7])  # PUBREC or PUBACK, packet id 7
        assert still_open


# -- a fleet ------------------------------------------------------------------------------


@pytest.mark.parametrize(("broker_name", "version"), with_versions())
def test_a_fleet_at_qos1_loses_no_message_on_the_way_to_a_probe(
    broker: Broker, base: str, version: ProtocolVersion
) -> None:
    async def scenario() -> tuple[Worker, dict[str, Any]]:
        probe = Probe(broker.host, broker.port, topic_filter=f"{base}/#", version=version)
        await probe.start()
        worker = fleet(broker, base, DEVICES, version=version)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.counters.messages_acked >= 5 * DEVICES)
        stop.set()
        await running
        acked = worker.counters.messages_acked
        await until(lambda: probe.tracker.received >= acked, TIMEOUT_S)
        return worker, await probe.stop()

    worker, summary = asyncio.run(scenario())
    counters = worker.counters
    assert counters.reconciles(), counters.problems()
    assert counters.in_flight == 0
    assert (counters.connects, counters.disconnects, counters.connect_failures) == (DEVICES, 0, 0)
    assert summary["streams"] == DEVICES
    assert summary["received"] >= counters.messages_acked
    assert summary["lost"] == 0
    assert summary["duplicates"] == 0
    assert summary["unparseable"] == 0


@pytest.mark.parametrize("broker_name", brokers())
def test_a_fleet_at_qos2_completes_its_flows_or_reports_the_lost_connections(
    broker: Broker, base: str
) -> None:
    devices = 5
    supported = broker.facts.qos2_publish_answer == PUBREC

    async def scenario() -> Worker:
        worker = fleet(broker, base, devices, qos=2)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        counters = worker.counters
        if supported:
            await until(lambda: counters.messages_acked_by_qos["2"] >= 5 * devices)
        else:
            await until(
                lambda: (
                    counters.reconnects >= devices
                    and counters.messages_failed_by_qos["2"] >= devices
                )
            )
        stop.set()
        await running
        return worker

    counters = asyncio.run(scenario()).counters
    assert counters.reconciles(), counters.problems()
    assert counters.in_flight == 0
    if supported:
        assert counters.disconnects == 0
        assert not [kind for kind in counters.errors_by_kind if "acknowledged" in kind]
    else:
        # Every device loses its connection on its first QoS 2 message, again after
        # each reconnect; nothing is ever acknowledged, and nothing is left in flight.
        assert counters.messages_acked_by_qos["2"] == 0
        assert counters.disconnects >= counters.reconnects >= devices
        # Each lost message says why: the broker closed the connection (NATS), or
        # iotix did on the broker's PUBACK (RabbitMQ). Those still awaiting their ack
        # when the run stopped fail without an error, as anywhere else; devices
        # between connections send nothing and say so.
        lost = f"not acknowledged: {broker.facts.qos2_close_reason}"
        assert set(counters.errors_by_kind) <= {lost, "not sent: device not connected"}
        assert devices <= counters.errors_by_kind[lost] <= counters.messages_failed_by_qos["2"]


# -- will and retained messages ------------------------------------------------------------


@pytest.mark.parametrize(("broker_name", "version"), with_versions())
def test_the_will_is_published_when_a_device_vanishes(
    broker: Broker, base: str, version: ProtocolVersion
) -> None:
    async def scenario() -> list[MessageReceivedEvent]:
        inbox = Inbox()
        watcher = await connect(broker, version, on_event=inbox)
        await watcher.subscribe([Subscription(f"{base}/status/+", qos=1)])
        will = Will(f"{base}/status/device", b"offline", qos=1)
        device = await connect(broker, version, will=will)
        device.abort()  # no DISCONNECT: to the broker the device vanished
        await device.wait_closed()
        await until(lambda: inbox.has(b"offline"), TIMEOUT_S)
        # A clean DISCONNECT must not publish the will; the marker bounds the wait.
        polite = await connect(broker, version, will=Will(f"{base}/status/polite", b"gone"))
        await polite.disconnect()
        publisher = await connect(broker, version)
        await publisher.wait_acked(publisher.publish(f"{base}/status/marker", b"m", qos=1))
        await until(lambda: inbox.has(b"m"), TIMEOUT_S)
        await publisher.disconnect()
        await watcher.disconnect()
        return inbox.before(b"m")

    received = asyncio.run(scenario())
    assert [(m.topic, m.payload) for m in received] == [(f"{base}/status/device", b"offline")]


@pytest.mark.parametrize(("broker_name", "version"), with_versions())
def test_a_retained_message_reaches_later_subscribers(
    broker: Broker, base: str, version: ProtocolVersion
) -> None:
    async def scenario() -> tuple[list[MessageReceivedEvent], list[MessageReceivedEvent]]:
        publisher = await connect(broker, version)
        await publisher.wait_acked(publisher.publish(f"{base}/state", b"on", qos=1, retain=True))
        exact, wildcard = Inbox(), Inbox()
        exact_client = await connect(broker, version, on_event=exact)
        await exact_client.subscribe([Subscription(f"{base}/state", qos=1)])
        wildcard_client = await connect(broker, version, on_event=wildcard)
        await wildcard_client.subscribe([Subscription(f"{base}/+", qos=1)])
        # A live (not retained) message on the same topic is the marker for both.
        await publisher.wait_acked(publisher.publish(f"{base}/state", b"live", qos=1))
        await until(lambda: exact.has(b"live") and wildcard.has(b"live"), TIMEOUT_S)
        for client in (publisher, exact_client, wildcard_client):
            await client.disconnect()
        return exact.before(b"live"), wildcard.before(b"live")

    exact, wildcard = asyncio.run(scenario())
    assert [(m.payload, m.retain) for m in exact] == [(b"on", True)]
    assert [(m.payload, m.retain) for m in wildcard] == [
        (b"on", True)
    ] * broker.facts.wildcard_retained_copies


# -- restarts (last: they take the module's brokers down and up again) ---------------------


@pytest.mark.parametrize("broker_name", brokers())
def test_a_fleet_comes_back_after_its_broker_restarts(broker: Broker, base: str) -> None:
    devices = 10

    async def scenario() -> tuple[Worker, list[MessageReceivedEvent]]:
        publisher = await connect(broker)
        await publisher.wait_acked(publisher.publish(f"{base}/state", b"on", qos=1, retain=True))
        await publisher.disconnect()
        worker = fleet(broker, base, devices)
        counters = worker.counters
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.connected == devices and counters.messages_acked > devices)
        broker.crash()
        await until(lambda: worker.connected == 0)
        # In a thread: the fleet keeps trying (and failing) to reconnect meanwhile.
        await asyncio.to_thread(broker.restart)
        await until(lambda: worker.connected == devices, RESTART_TIMEOUT_S)
        acked = counters.messages_acked
        await until(lambda: counters.messages_acked > acked + devices)
        stop.set()
        await running
        return worker, await retained_after_restart()

    async def retained_after_restart() -> list[MessageReceivedEvent]:
        inbox = Inbox()
        subscriber = await connect(broker, on_event=inbox)
        await subscriber.subscribe([Subscription(f"{base}/state", qos=1)])
        publisher = await connect(broker)
        await publisher.wait_acked(publisher.publish(f"{base}/state", b"live", qos=1))
        await until(lambda: inbox.has(b"live"), TIMEOUT_S)
        await publisher.disconnect()
        await subscriber.disconnect()
        return inbox.before(b"live")

    worker, retained = asyncio.run(scenario())
    counters = worker.counters
    assert (counters.connects, counters.disconnects, counters.reconnects) == (
        2 * devices,
        devices,
        devices,
    )
    assert counters.reconciles(), counters.problems()
    assert counters.in_flight == 0
    kept = [(b"on", True)] if broker.facts.retained_survives_crash else []
    assert [(m.payload, m.retain) for m in retained] == kept
