"""`iotix.testing.embedded.EmbeddedBroker`: amqtt in a thread, checked with real clients.

paho-mqtt is the independent client (MQTT 3.1.1: amqtt speaks nothing newer); iotix's
own client must work through the broker too, since `iotix demo` runs on it. Every wait
has a timeout; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING

import pytest
from broker_helpers import PahoClient, port_is_free
from paho.mqtt.enums import MQTTProtocolVersion

from iotix.adapters.mqtt import open_connection
from iotix.protocols.mqtt.session import SessionSettings
from iotix.testing.embedded import EmbeddedBroker, EmbeddedBrokerError

if TYPE_CHECKING:
    from collections.abc import Iterator


TIMEOUT_S = 10.0
CONNECTIONS = 200

_client_numbers = itertools.count()


@contextlib.contextmanager
def paho_client(broker: EmbeddedBroker) -> Iterator[PahoClient]:
    """A client the broker accepted; disconnected afterwards."""
    paho = PahoClient(protocol=MQTTProtocolVersion.MQTTv311)
    paho.client.connect(broker.host, broker.port, keepalive=30)
    paho.client.loop_start()
    try:
        assert paho.connack.wait(TIMEOUT_S), "no CONNACK"
        assert paho.connack_reason is not None
        assert not paho.connack_reason.is_failure, paho.connack_reason
        yield paho
    finally:
        paho.client.disconnect()
        paho.close()


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    """One embedded broker for the module's message tests; each uses its own topics."""
    with EmbeddedBroker() as embedded:
        yield embedded


# -- messages ----------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_clients_exchange_messages_at_each_qos(broker: EmbeddedBroker, qos: int) -> None:
    topic = f"iotix/test/embedded/paho/qos{qos}"
    count = 10
    with paho_client(broker) as subscriber, paho_client(broker) as publisher:
        subscriber.subscribe(topic, qos)
        for number in range(count):
            info = publisher.client.publish(topic, f"message {number}".encode(), qos=qos)
            info.wait_for_publish(timeout=TIMEOUT_S)
            assert info.is_published()
        received = [subscriber.receive() for _ in range(count)]
    assert [m.payload for m in received] == [f"message {n}".encode() for n in range(count)]
    assert {m.qos for m in received} == {qos}
    assert {m.topic for m in received} == {topic}


def test_iotix_client_publishes_at_qos1(broker: EmbeddedBroker) -> None:
    async def publish_once() -> int:
        connection = await open_connection(
            broker.host, broker.port, SessionSettings(client_id="iotix-embedded-qos1")
        )
        packet_id = connection.publish("iotix/test/embedded/iotix", b"x", qos=1)
        assert packet_id is not None
        acked = await connection.wait_acked(packet_id)
        await connection.disconnect()
        return acked.reason_code

    assert asyncio.run(publish_once()) == 0


def test_message_count_counts_published_messages(broker: EmbeddedBroker) -> None:
    before = broker.message_count
    with paho_client(broker) as subscriber, paho_client(broker) as publisher:
        subscriber.subscribe("iotix/test/embedded/count", 1)
        for number in range(3):
            publisher.client.publish("iotix/test/embedded/count", b"%d" % number, qos=1)
        for _ in range(3):
            subscriber.receive()  # the broker counts a PUBLISH before it forwards it
    assert broker.message_count - before == 3


def test_accepts_200_iotix_connections_at_once(broker: EmbeddedBroker) -> None:
    async def connect_all() -> list[int]:
        connections = await asyncio.gather(
            *(
                open_connection(
                    broker.host, broker.port, SessionSettings(client_id=f"iotix-fleet-{n}")
                )
                for n in range(CONNECTIONS)
            )
        )
        packet_ids = [
            connection.publish(f"iotix/test/embedded/fleet/{n}", b"hello", qos=1)
            for n, connection in enumerate(connections)
        ]
        acks = await asyncio.gather(
            *(
                connection.wait_acked(packet_id)
                for connection, packet_id in zip(connections, packet_ids, strict=True)
                if packet_id is not None
            )
        )
        await asyncio.gather(*(connection.disconnect() for connection in connections))
        return [ack.reason_code for ack in acks]

    before = broker.message_count
    assert asyncio.run(connect_all()) == [0] * CONNECTIONS
    assert broker.message_count - before == CONNECTIONS


# -- lifecycle ---------------------------------------------------------------------------


def test_listens_on_loopback_at_a_free_port_and_accepts_connections_once_started() -> None:
    with EmbeddedBroker() as embedded:
        assert embedded.running
        assert embedded.host == "127.0.0.1"
        assert embedded.port not in (0, 1883)
        assert embedded.url == f"mqtt://127.0.0.1:{embedded.port}"
        with paho_client(embedded):  # no retry: start() returned, so it listens
            pass


def test_two_brokers_at_once_get_different_ports() -> None:
    with EmbeddedBroker() as first, EmbeddedBroker() as second:
        assert first.port != second.port
        with paho_client(first), paho_client(second):
            pass


def test_stop_disconnects_clients_and_frees_the_port() -> None:
    embedded = EmbeddedBroker().start()
    try:
        paho = PahoClient(protocol=MQTTProtocolVersion.MQTTv311)
        paho.client.connect(embedded.host, embedded.port, keepalive=30)
        paho.client.loop_start()
        assert paho.connack.wait(TIMEOUT_S), "no CONNACK"
        embedded.stop()
        assert paho.disconnected.wait(TIMEOUT_S), "the client was not disconnected"
        paho.close()
    finally:
        embedded.stop()
    assert not embedded.running
    assert port_is_free(embedded.host, embedded.port)


def test_stop_is_safe_to_call_twice_and_before_start() -> None:
    embedded = EmbeddedBroker()
    embedded.stop()
    embedded.start()
    embedded.stop()
    embedded.stop()
    assert not embedded.running


def test_port_before_start_is_an_error() -> None:
    with pytest.raises(EmbeddedBrokerError, match="not been started"):
        _ = EmbeddedBroker().port


def test_failed_start_raises_with_the_cause_and_leaves_nothing_running() -> None:
    amqtt_logger = logging.getLogger("amqtt")
    level = amqtt_logger.level
    # 192.0.2.1 (TEST-NET-1) is no address of this machine, so nothing can bind it.
    embedded = EmbeddedBroker(host="192.0.2.1")
    with pytest.raises(EmbeddedBrokerError, match="failed to start") as caught:
        embedded.start()
    assert isinstance(caught.value.__cause__, OSError)
    assert not embedded.running
    assert amqtt_logger.level == level


# -- logging -----------------------------------------------------------------------------


@pytest.fixture
def unset_broker_loggers() -> Iterator[None]:
    """amqtt's and transitions' loggers without a level of their own, restored after."""
    loggers = [logging.getLogger(name) for name in ("amqtt", "transitions")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.NOTSET)
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.mark.usefixtures("unset_broker_loggers")
def test_amqtt_logs_only_errors_while_running_and_its_levels_are_restored() -> None:
    with EmbeddedBroker():
        assert logging.getLogger("amqtt").level == logging.ERROR
        assert logging.getLogger("transitions").level == logging.ERROR
    assert logging.getLogger("amqtt").level == logging.NOTSET
    assert logging.getLogger("transitions").level == logging.NOTSET


@pytest.mark.usefixtures("unset_broker_loggers")
def test_an_explicit_amqtt_log_level_is_left_alone() -> None:
    logging.getLogger("amqtt").setLevel(logging.DEBUG)
    with EmbeddedBroker():
        assert logging.getLogger("amqtt").level == logging.DEBUG
    assert logging.getLogger("amqtt").level == logging.DEBUG
