"""iotix's MQTT client against a real Mosquitto, cross-checked with paho-mqtt."""

from __future__ import annotations

import asyncio
import queue
import socket
import uuid
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import pytest
from broker_helpers import stop_paho
from paho.mqtt.enums import CallbackAPIVersion

from iotix.adapters.mqtt import MQTTConnectError, open_connection
from iotix.protocols.mqtt.packets import (
    Property,
    ProtocolVersion,
    Publish,
    Subscription,
    Will,
    encode,
)
from iotix.protocols.mqtt.session import MessageReceivedEvent, SessionSettings
from iotix.testing import MosquittoBroker

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from iotix.protocols.mqtt.session import Event

TIMEOUT_S = 10.0
VERSIONS = [ProtocolVersion.V311, ProtocolVersion.V5]


class Subscriber:
    """A paho-mqtt client: the independent implementation on the other side."""

    def __init__(self, broker: MosquittoBroker, topic: str, qos: int = 2) -> None:
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"paho-{uuid.uuid4()}")
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        result, mid = self.client.subscribe(topic, qos)
        assert result == paho.MQTT_ERR_SUCCESS
        self._subscribed = mid

    def receive(self) -> paho.MQTTMessage:
        return self.messages.get(timeout=TIMEOUT_S)

    def close(self) -> None:
        self.client.disconnect()
        stop_paho(self.client)


@pytest.fixture
def topic() -> str:
    return f"iotix-test/{uuid.uuid4()}"


@pytest.fixture
def subscriber(mosquitto_session: MosquittoBroker, topic: str) -> Iterator[Subscriber]:
    client = Subscriber(mosquitto_session, f"{topic}/#")
    # A retained probe proves the subscription is active before the test publishes.
    client.client.publish(f"{topic}/ready", b"ready", qos=1)
    assert client.receive().payload == b"ready"
    yield client
    client.close()


def settings(version: ProtocolVersion = ProtocolVersion.V311, **kwargs: Any) -> SessionSettings:
    return SessionSettings(client_id=f"iotix-{uuid.uuid4()}", version=version, **kwargs)


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_messages_published_at_each_qos_reach_a_paho_subscriber(
    mosquitto_session: MosquittoBroker,
    subscriber: Subscriber,
    topic: str,
    version: ProtocolVersion,
    qos: int,
) -> None:
    async def publish() -> None:
        connection = await open_connection(
            mosquitto_session.host, mosquitto_session.port, settings(version)
        )
        ids = [connection.publish(f"{topic}/t", b"m%d" % i, qos=qos) for i in range(20)]
        if qos:
            await asyncio.gather(*(connection.wait_acked(i) for i in ids if i is not None))
        await connection.disconnect()

    asyncio.run(publish())
    received = [subscriber.receive() for _ in range(20)]
    assert [m.payload for m in received] == [b"m%d" % i for i in range(20)]
    assert {m.topic for m in received} == {f"{topic}/t"}


def test_topic_aliases_are_resolved_by_the_broker(
    mosquitto_session: MosquittoBroker, subscriber: Subscriber, topic: str
) -> None:
    async def publish() -> None:
        connection = await open_connection(
            mosquitto_session.host, mosquitto_session.port, settings(ProtocolVersion.V5)
        )
        for i in range(3):
            connection.publish(f"{topic}/aliased", b"%d" % i, qos=1)
        await connection.wait_acked(3)
        await connection.disconnect()

    asyncio.run(publish())
    assert [subscriber.receive().topic for _ in range(3)] == [f"{topic}/aliased"] * 3


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_commands_from_paho_reach_an_iotix_subscriber(
    mosquitto_session: MosquittoBroker, topic: str, version: ProtocolVersion
) -> None:
    received: asyncio.Queue[MessageReceivedEvent] = asyncio.Queue()

    def on_event(event: Event) -> None:
        if isinstance(event, MessageReceivedEvent):
            received.put_nowait(event)

    async def scenario() -> list[MessageReceivedEvent]:
        connection = await open_connection(
            mosquitto_session.host, mosquitto_session.port, settings(version), on_event=on_event
        )
        suback = await connection.subscribe([Subscription(f"{topic}/commands/+", qos=2)])
        assert suback.reason_codes == (2,)
        sender = paho.Client(CallbackAPIVersion.VERSION2)
        sender.connect(mosquitto_session.host, mosquitto_session.port)
        sender.loop_start()
        for qos in (0, 1, 2):
            sender.publish(f"{topic}/commands/set", b"q%d" % qos, qos=qos).wait_for_publish(
                TIMEOUT_S
            )
        sender.disconnect()
        stop_paho(sender)
        events = [await asyncio.wait_for(received.get(), TIMEOUT_S) for _ in range(3)]
        await connection.disconnect()
        return events

    events = asyncio.run(scenario())
    assert sorted(e.payload for e in events) == [b"q0", b"q1", b"q2"]
    assert {e.topic for e in events} == {f"{topic}/commands/set"}


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_wrong_credentials_are_refused_with_the_brokers_reason(
    mosquitto_binary: Path, version: ProtocolVersion
) -> None:
    async def connect(password: bytes) -> None:
        connection = await open_connection(
            broker.host,
            broker.port,
            settings(version, username="device", password=password),
        )
        await connection.disconnect()

    with MosquittoBroker(
        binary=mosquitto_binary, users={"device": "secret"}, allow_anonymous=False
    ) as broker:
        asyncio.run(connect(b"secret"))
        with pytest.raises(MQTTConnectError) as caught:
            asyncio.run(connect(b"wrong"))
    assert caught.value.reason_code in (0x86, 0x87)


def test_unreachable_broker_is_a_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connections are refused

        async def connect() -> None:
            await open_connection("127.0.0.1", port, settings())

        with pytest.raises(MQTTConnectError, match="cannot connect"):
            asyncio.run(connect())


def test_will_message_is_published_when_the_device_drops(
    mosquitto_session: MosquittoBroker, subscriber: Subscriber, topic: str
) -> None:
    will = Will(topic=f"{topic}/status", payload=b"offline", qos=1, retain=False)

    async def drop() -> None:
        connection = await open_connection(
            mosquitto_session.host, mosquitto_session.port, settings(will=will)
        )
        connection.abort()
        await connection.wait_closed()

    asyncio.run(drop())
    message = subscriber.receive()
    assert (message.topic, message.payload) == (f"{topic}/status", b"offline")


def test_unacked_qos1_message_is_sent_again_after_a_reconnect(
    mosquitto_session: MosquittoBroker, subscriber: Subscriber, topic: str
) -> None:
    async def scenario() -> None:
        persistent = settings(clean_start=False)
        connection = await open_connection(
            mosquitto_session.host, mosquitto_session.port, persistent
        )
        packet_id = connection.publish(f"{topic}/kept", b"not lost", qos=1)
        connection.abort()  # before the write is flushed: the broker never saw it
        await connection.wait_closed()
        assert connection.session.inflight == 1
        again = await open_connection(
            mosquitto_session.host,
            mosquitto_session.port,
            persistent,
            session=connection.session,
        )
        assert packet_id is not None
        await again.wait_acked(packet_id)
        await again.disconnect()

    asyncio.run(scenario())
    assert subscriber.receive().payload == b"not lost"


def test_broker_restart_drops_devices_and_they_reconnect(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> None:
        connection = await open_connection(mosquitto.host, mosquitto.port, settings())
        mosquitto.kill()
        await asyncio.wait_for(connection.wait_closed(), TIMEOUT_S)
        mosquitto.restart()
        again = await open_connection(mosquitto.host, mosquitto.port, settings(), session=None)
        await again.disconnect()

    asyncio.run(scenario())


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_mosquitto_accepts_every_packet_iotix_sends(
    mosquitto_session: MosquittoBroker, topic: str, version: ProtocolVersion
) -> None:
    async def scenario() -> None:
        connection = await open_connection(
            mosquitto_session.host,
            mosquitto_session.port,
            settings(
                version,
                properties={Property.SESSION_EXPIRY_INTERVAL: 0}
                if version is ProtocolVersion.V5
                else {},
            ),
        )
        await connection.subscribe([Subscription(f"{topic}/+", qos=2)])
        for qos in (0, 1, 2):
            packet_id = connection.publish(f"{topic}/x", b"payload", qos=qos, retain=qos == 1)
            if packet_id is not None:
                await connection.wait_acked(packet_id)
        # Acks came back in order after every packet type: a broker that had found one
        # malformed would have closed the connection instead.
        assert not connection.closed
        await connection.disconnect()

    asyncio.run(scenario())


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_mosquitto_drops_a_client_that_sends_a_malformed_packet(
    mosquitto_session: MosquittoBroker, version: ProtocolVersion
) -> None:
    async def scenario() -> None:
        connection = await open_connection(
            mosquitto_session.host, mosquitto_session.port, settings(version)
        )
        good = encode(Publish("ok", b"x"), version)
        # QoS 3 does not exist (MQTT-3.3.1-4): the broker must close the connection.
        bad = bytes([good[0] | 0b0110]) + good[1:]
        assert connection._transport is not None
        connection._transport.write(bad)
        await asyncio.wait_for(connection.wait_closed(), TIMEOUT_S)

    asyncio.run(scenario())


def test_connections_from_source_addresses_come_from_those_addresses(
    mosquitto: MosquittoBroker,
) -> None:
    async def scenario() -> None:
        for address in ("127.0.0.7", "127.0.0.8"):
            connection = await open_connection(
                mosquitto.host,
                mosquitto.port,
                SessionSettings(client_id=f"src-{address}"),
                local_address=address,
                timeout_s=TIMEOUT_S,
            )
            await connection.disconnect()

    asyncio.run(scenario())
    log = mosquitto.log_text()
    assert "New connection from 127.0.0.7" in log
    assert "New connection from 127.0.0.8" in log


def test_a_source_address_that_is_not_local_is_a_clear_connect_error(
    mosquitto: MosquittoBroker,
) -> None:
    async def scenario() -> None:
        await open_connection(
            mosquitto.host,
            mosquitto.port,
            SessionSettings(client_id="nowhere"),
            local_address="192.0.2.1",  # TEST-NET-1: no interface has it
            timeout_s=TIMEOUT_S,
        )

    with pytest.raises(MQTTConnectError, match="cannot connect"):
        asyncio.run(scenario())
