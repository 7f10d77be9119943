"""MQTT over WebSockets: iotix's client through `create_websocket_connection`, for real.

- Against Mosquitto 2's websockets listener (`MosquittoBroker(websockets=True)`, bound
  to 127.0.0.1 only: the fixture says `socket_domain ipv4`, see docs/interop.md): iotix
  publishing at QoS 0, 1 and 2 to a paho-mqtt subscriber on its own WebSocket
  transport, a worker's fleet over ``ws://`` watched by a probe over ``ws://``, and
  messages crossing from Mosquitto's plain TCP listener to its websockets one.
- Against the embedded amqtt broker's WebSocket listener, cross-checked with paho-mqtt
  on its own WebSocket transport.
- Against servers of the `websockets` library (installed with amqtt): a path check that
  answers 404, and a TLS echo server for ``wss://``, pings, fragments and closes.
- Against Mosquitto's plain MQTT port and silent or absent servers: a clear error, fast.

Every wait has a timeout; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import re
import shutil
import socket
import ssl
import struct
import subprocess
import uuid
from typing import TYPE_CHECKING, Any, cast

import pytest
import uvloop
from broker_helpers import PahoClient, until
from paho.mqtt.enums import MQTTProtocolVersion
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Frame
from websockets.frames import Opcode as ReferenceOpcode
from websockets.streams import StreamReader

from iotix.adapters.mqtt import MQTTConnectError, MQTTConnection, open_connection
from iotix.adapters.websocket import WebSocketConnectError, create_websocket_connection
from iotix.clock import WallClock
from iotix.engine.probe import Probe
from iotix.engine.worker import RunSettings, Worker, parse_brokers
from iotix.model.loader import load_model_data
from iotix.protocols.mqtt.packets import ProtocolVersion, Subscription
from iotix.protocols.mqtt.session import (
    MessageReceivedEvent,
    MQTTClientSession,
    SessionSettings,
)
from iotix.protocols.websocket import Opcode, WebSocketError, accept_key, encode_frame
from iotix.testing import MosquittoBroker
from iotix.testing.embedded import EmbeddedBroker, EmbeddedBrokerError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
    from pathlib import Path

    from websockets.http11 import Request, Response

    from iotix.protocols.mqtt.session import Event

TIMEOUT_S = 10.0
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run(coroutine: Coroutine[Any, Any, Any], loop: str = "asyncio") -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(coroutine)


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(websocket=True) as embedded:
        yield embedded


@pytest.fixture(scope="module")
def mosquitto_ws(mosquitto_binary: Path) -> Iterator[MosquittoBroker]:
    """A Mosquitto of this module's own with a websockets listener on 127.0.0.1."""
    with MosquittoBroker(binary=mosquitto_binary, websockets=True) as mosquitto:
        yield mosquitto


@contextlib.contextmanager
def paho_websocket_subscriber(
    host: str, port: int, topic: str, qos: int = 1
) -> Iterator[PahoClient]:
    """paho-mqtt on its WebSocket transport (path ``/mqtt``), subscribed at ``qos``."""
    paho = PahoClient(transport="websockets", protocol=MQTTProtocolVersion.MQTTv311)
    paho.client.ws_set_options(path="/mqtt")
    paho.client.connect(host, port, keepalive=30)
    paho.client.loop_start()
    try:
        assert paho.connack.wait(TIMEOUT_S), "no CONNACK over WebSockets"
        assert paho.connack_reason is not None
        assert not paho.connack_reason.is_failure, paho.connack_reason
        paho.subscribe(topic, qos)
        yield paho
    finally:
        paho.client.disconnect()
        paho.close()


async def open_mqtt_over_websocket(
    host: str,
    port: int,
    *,
    path: str = "/mqtt",
    on_event: Callable[[Event], None] | None = None,
) -> tuple[asyncio.Transport, MQTTConnection]:
    """An iotix MQTT connection over a WebSocket, once the broker's CONNACK is in (the
    way `open_connection` waits for it)."""
    session = MQTTClientSession(SessionSettings(client_id=f"iotix-ws-{uuid.uuid4()}"))
    transport, connection = await create_websocket_connection(
        lambda: MQTTConnection(session, on_event=on_event),
        host,
        port,
        path=path,
        timeout_s=TIMEOUT_S,
    )
    async with asyncio.timeout(TIMEOUT_S):
        await connection._connected
    return transport, connection


def pulse_model(topic: str, qos: int) -> dict[str, Any]:
    """Devices that send JSON telemetry (``device_id``, ``seq``, ``ts_ms``) every 0.05 s."""
    return {
        "name": "ws_pulse",
        "fields": {"n": {"kind": "counter"}},
        "messages": {
            "telemetry": {
                "topic": topic,
                "schedule": {"kind": "interval", "interval_s": 0.05},
                "qos": qos,
            }
        },
    }


# -- through Mosquitto's websockets listener ---------------------------------------------


@contextlib.contextmanager
def paho_tcp_subscriber(host: str, port: int, topic: str, qos: int) -> Iterator[PahoClient]:
    """paho-mqtt on plain TCP, subscribed at ``qos``."""
    paho = PahoClient(protocol=MQTTProtocolVersion.MQTTv311)
    paho.client.connect(host, port, keepalive=30)
    paho.client.loop_start()
    try:
        assert paho.connack.wait(TIMEOUT_S), "no CONNACK"
        paho.subscribe(topic, qos)
        yield paho
    finally:
        paho.client.disconnect()
        paho.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_iotix_publishes_over_websocket_to_mosquitto_reach_a_subscriber_at_their_qos(
    mosquitto_ws: MosquittoBroker, loop: str
) -> None:
    base = f"iotix/test/mosquitto-ws/{uuid.uuid4()}"
    host, port = mosquitto_ws.host, mosquitto_ws.websockets_port
    # Every frame length class: 7-bit, 16-bit and 64-bit (over 64 KiB).
    payloads = {
        0: [b"q0-small", b"a" * 300, bytes(range(256)) * 300],
        1: [b"q1-small", b"b" * 70_000, b""],
        2: [b"q2-small", b"c" * 1_000, b"d" * 100_000],
    }

    async def publish() -> tuple[dict[int, list[int]], Any]:
        transport, connection = await open_mqtt_over_websocket(host, port)
        peername = transport.get_extra_info("peername")
        packet_ids = {
            qos: [connection.publish(f"{base}/qos{qos}", p, qos=qos) for p in sent]
            for qos, sent in payloads.items()
        }
        async with asyncio.timeout(TIMEOUT_S):
            # PUBACK for QoS 1, PUBCOMP (after PUBREC and PUBREL) for QoS 2.
            reasons = {
                qos: [(await connection.wait_acked(pid)).reason_code for pid in ids if pid]
                for qos, ids in packet_ids.items()
            }
            for qos in payloads:
                # Markers: nothing may come after them. MQTT orders the messages of one
                # QoS only (paho hands a QoS 2 message over at PUBREL, after a QoS 1 one
                # sent later), so each topic's marker goes at that topic's QoS.
                await connection.wait_acked(
                    connection.publish(f"{base}/qos{qos}", b"end", qos=max(qos, 1)) or 0
                )
            await connection.disconnect()
        return reasons, peername

    # The subscriber is on the plain MQTT port: Mosquitto 2.0.11 sends large messages
    # over websockets slowly (about 40 KB/s; see docs/interop.md), and the next
    # test covers that direction.
    with paho_tcp_subscriber(host, mosquitto_ws.port, f"{base}/#", qos=2) as subscriber:
        reasons, peername = run(publish(), loop)
        count = sum(len(sent) + 1 for sent in payloads.values())
        received = [subscriber.receive() for _ in range(count)]
    assert reasons == {0: [], 1: [0, 0, 0], 2: [0, 0, 0]}
    assert peername == (host, port)
    by_topic: dict[str, list[tuple[bytes, int]]] = {}
    for message in received:
        by_topic.setdefault(message.topic, []).append((bytes(message.payload), message.qos))
    # Mosquitto forwards at the lesser of the publish and subscription QoS (MQTT-3.8.4).
    assert by_topic == {
        f"{base}/qos{qos}": [(p, qos) for p in sent] + [(b"end", max(qos, 1))]
        for qos, sent in payloads.items()
    }
    assert subscriber.messages.empty()


def test_an_iotix_websocket_subscriber_receives_what_paho_publishes_to_mosquitto_over_tcp(
    mosquitto_ws: MosquittoBroker,
) -> None:
    topic = f"iotix/test/mosquitto-ws/{uuid.uuid4()}"
    # One message over 64 KiB, for a 64-bit frame length from Mosquitto: about 1.7 s,
    # as Mosquitto 2.0.11 sends large messages over websockets at about 40 KB/s.
    payloads = [b"%d" % n for n in range(200)] + [b"x" * 70_000, b"end"]

    async def subscribe_and_receive() -> tuple[tuple[int, ...], list[tuple[bytes, int]]]:
        messages: asyncio.Queue[MessageReceivedEvent] = asyncio.Queue()

        def on_event(event: Event) -> None:
            if isinstance(event, MessageReceivedEvent):
                messages.put_nowait(event)

        _, connection = await open_mqtt_over_websocket(
            mosquitto_ws.host, mosquitto_ws.websockets_port, on_event=on_event
        )
        async with asyncio.timeout(TIMEOUT_S):
            suback = await connection.subscribe([Subscription(topic, qos=1)])
            publisher = PahoClient(protocol=MQTTProtocolVersion.MQTTv311)  # plain TCP
            publisher.client.connect(mosquitto_ws.host, mosquitto_ws.port, keepalive=30)
            publisher.client.loop_start()
            try:
                for payload in payloads:
                    publisher.client.publish(topic, payload, qos=1)
                received = []
                for _ in payloads:
                    message = await messages.get()
                    received.append((message.payload, message.qos))
            finally:
                publisher.client.disconnect()
                publisher.close()
            await connection.disconnect()
        return suback.reason_codes, received

    granted, received = run(subscribe_and_receive())
    assert granted == (1,)
    assert received == [(payload, 1) for payload in payloads]


@pytest.mark.parametrize(
    "version", [ProtocolVersion.V311, ProtocolVersion.V5], ids=lambda v: v.name
)
def test_a_fleet_over_websocket_to_mosquitto_loses_nothing_on_the_way_to_a_websocket_probe(
    mosquitto_ws: MosquittoBroker, version: ProtocolVersion
) -> None:
    devices = 10
    base = f"ws-fleet/{uuid.uuid4()}"
    [endpoint] = parse_brokers(mosquitto_ws.websockets_url)
    assert (endpoint.host, endpoint.port) == (mosquitto_ws.host, mosquitto_ws.websockets_port)
    assert endpoint.websocket_path == "/mqtt"

    async def scenario() -> tuple[Worker, dict[str, Any]]:
        probe = Probe(
            endpoint.host,
            endpoint.port,
            topic_filter=f"{base}/#",
            version=version,
            websocket_path=endpoint.websocket_path,
        )
        await probe.start()
        worker = Worker(
            load_model_data(pulse_model(base + "/{device_id}/telemetry", qos=1)),
            range(devices),
            RunSettings(devices=devices, brokers=(endpoint,), version=version),
            WallClock(),
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.counters.messages_acked >= 5 * devices, TIMEOUT_S)
        stop.set()
        await running
        acked = worker.counters.messages_acked
        await until(lambda: probe.tracker.received >= acked, TIMEOUT_S)
        return worker, await probe.stop()

    worker, summary = run(scenario(), "uvloop")
    counters = worker.counters
    assert counters.reconciles(), counters.problems()
    assert counters.in_flight == 0
    assert (counters.connects, counters.disconnects, counters.connect_failures) == (devices, 0, 0)
    assert counters.messages_acked_by_qos["1"] >= 5 * devices
    assert summary["streams"] == devices
    assert summary["received"] >= counters.messages_acked
    assert (summary["lost"], summary["duplicates"], summary["unparseable"]) == (0, 0, 0)


# -- through the embedded broker ---------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_iotix_publishes_over_websocket_reach_a_paho_websocket_subscriber(
    broker: EmbeddedBroker, loop: str
) -> None:
    base = f"iotix/test/ws/{uuid.uuid4()}"
    # Every frame length class: 7-bit, 16-bit and 64-bit (over 64 KiB).
    qos0 = [b"q0-small", b"a" * 300, bytes(range(256)) * 300]
    qos1 = [b"q1-small", b"b" * 70_000, b""]

    async def publish() -> tuple[list[int], dict[str, Any]]:
        transport, connection = await open_mqtt_over_websocket(broker.host, broker.ws_port)
        extra = {
            name: transport.get_extra_info(name)
            for name in ("websocket_subprotocol", "websocket_path", "peername")
        }
        for payload in qos0:
            connection.publish(f"{base}/qos0", payload, qos=0)
        packet_ids = [connection.publish(f"{base}/qos1", p, qos=1) for p in qos1]
        async with asyncio.timeout(TIMEOUT_S):
            # One after the other: the broker may acknowledge all three in one read, and
            # an ack that came before its wait_acked is kept for it.
            acks = [await connection.wait_acked(pid) for pid in packet_ids if pid is not None]
            for topic in ("qos0", "qos1"):  # markers: nothing may come after the messages
                await connection.wait_acked(
                    connection.publish(f"{base}/{topic}", b"end", qos=1) or 0
                )
            await connection.disconnect()
        assert connection.closed
        return [ack.reason_code for ack in acks], extra

    with paho_websocket_subscriber(broker.host, broker.ws_port, f"{base}/#") as subscriber:
        reason_codes, extra = run(publish(), loop)
        received = [subscriber.receive() for _ in range(len(qos0) + len(qos1) + 2)]
    assert reason_codes == [0] * len(qos1)
    assert extra == {
        "websocket_subprotocol": "mqtt",
        "websocket_path": "/mqtt",
        "peername": (broker.host, broker.ws_port),
    }
    # amqtt forwards at the subscription's QoS, not the lesser of the two (MQTT-3.8.4),
    # so the QoS the subscriber sees says nothing about the publisher's: payloads only.
    by_topic: dict[str, list[bytes]] = {}
    for message in received:
        by_topic.setdefault(message.topic, []).append(message.payload)
    assert by_topic == {f"{base}/qos0": [*qos0, b"end"], f"{base}/qos1": [*qos1, b"end"]}
    assert subscriber.messages.empty()


def test_iotix_subscriber_over_websocket_receives_what_paho_publishes(
    broker: EmbeddedBroker,
) -> None:
    topic = f"iotix/test/ws/{uuid.uuid4()}"
    payloads = [b"%d" % n for n in range(200)] + [b"x" * 100_000]

    async def subscribe_and_receive() -> list[bytes]:
        messages: asyncio.Queue[MessageReceivedEvent] = asyncio.Queue()

        def on_event(event: Event) -> None:
            if isinstance(event, MessageReceivedEvent):
                messages.put_nowait(event)

        _, connection = await open_mqtt_over_websocket(
            broker.host, broker.ws_port, on_event=on_event
        )
        async with asyncio.timeout(TIMEOUT_S):
            await connection.subscribe([Subscription(topic, qos=1)])
            publisher = PahoClient(transport="websockets", protocol=MQTTProtocolVersion.MQTTv311)
            publisher.client.connect(broker.host, broker.ws_port, keepalive=30)
            publisher.client.loop_start()
            try:
                for payload in payloads:
                    publisher.client.publish(topic, payload, qos=1)
                received = [(await messages.get()).payload for _ in payloads]
            finally:
                publisher.client.disconnect()
                publisher.close()
            await connection.disconnect()
        return received

    assert run(subscribe_and_receive()) == payloads


def test_a_worker_runs_its_devices_over_websocket_from_a_ws_url(broker: EmbeddedBroker) -> None:
    model = {
        "name": "ws_pulse",
        "fields": {"n": {"kind": "counter"}},
        "messages": {
            "telemetry": {
                "topic": "ws-fleet/{device_id}",
                "schedule": {"kind": "interval", "interval_s": 0.05},
                "qos": 1,
            }
        },
    }
    [endpoint] = parse_brokers(broker.ws_url)
    assert endpoint.websocket_path == "/mqtt"

    async def scenario() -> Worker:
        worker = Worker(
            load_model_data(model),
            range(5),
            RunSettings(devices=5, brokers=(endpoint,)),
            WallClock(),
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.counters.messages_acked >= 25, TIMEOUT_S)
        stop.set()
        await running
        return worker

    with paho_websocket_subscriber(broker.host, broker.ws_port, "ws-fleet/#") as subscriber:
        worker = run(scenario(), "uvloop")
        first = subscriber.receive()
    counters = worker.counters
    assert counters.connects == 5
    assert counters.reconciles(), counters.problems()
    assert first.topic.startswith("ws-fleet/")
    assert b'"seq"' in first.payload


def test_the_embedded_broker_reports_its_websocket_listener(broker: EmbeddedBroker) -> None:
    assert broker.ws_port not in (broker.port, 0)
    assert broker.ws_url == f"ws://127.0.0.1:{broker.ws_port}/mqtt"


def test_an_embedded_broker_without_websocket_has_no_websocket_port() -> None:
    with pytest.raises(EmbeddedBrokerError, match="websocket=True"):
        _ = EmbeddedBroker().ws_port
    with pytest.raises(EmbeddedBrokerError, match="not been started"):
        _ = EmbeddedBroker(websocket=True).ws_url


# -- handshake errors --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def websocket_server(
    handler: Callable[[ServerConnection], Coroutine[Any, Any, None]],
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[int]:
    """A `websockets` server on a free port that serves ``/mqtt`` only (404 elsewhere)."""

    def only_mqtt_path(connection: ServerConnection, request: Request) -> Response | None:
        if request.path != "/mqtt":
            return connection.respond(http.HTTPStatus.NOT_FOUND, "no such path\n")
        return None

    async with serve(
        handler,
        "127.0.0.1",
        0,
        subprotocols=["mqtt"],  # type: ignore[list-item]  # a Subprotocol is a str
        process_request=only_mqtt_path,
        ssl=ssl_context,
    ) as server:
        yield server.sockets[0].getsockname()[1]


async def hold(connection: ServerConnection) -> None:
    await connection.wait_closed()


def test_a_wrong_path_reports_the_404_of_the_server() -> None:
    async def connect() -> WebSocketConnectError:
        async with websocket_server(hold) as port:
            with pytest.raises(WebSocketConnectError) as caught:
                await open_mqtt_over_websocket("127.0.0.1", port, path="/wrong")
        return caught.value

    error = run(connect())
    assert error.status_code == 404
    assert "refused the WebSocket upgrade of /wrong: HTTP/1.1 404 Not Found" in str(error)
    assert isinstance(error, OSError)  # what open_connection maps to "cannot connect"


def test_open_connection_at_a_wrong_websocket_path_fails_with_the_server_answer() -> None:
    async def connect() -> MQTTConnectError:
        async with websocket_server(hold) as port:
            with pytest.raises(MQTTConnectError) as caught:
                await open_connection(
                    "127.0.0.1", port, SessionSettings(client_id="x"), websocket_path="/wrong"
                )
        return caught.value

    error = run(connect())
    assert error.reason_code is None
    assert str(error).startswith("cannot connect to 127.0.0.1:")
    assert "404 Not Found" in str(error)


def test_a_plain_mqtt_port_reports_a_handshake_error(mosquitto_session: MosquittoBroker) -> None:
    async def connect() -> WebSocketConnectError:
        with pytest.raises(WebSocketConnectError) as caught:
            await open_mqtt_over_websocket(mosquitto_session.host, mosquitto_session.port)
        return caught.value

    error = run(connect())
    # Mosquitto hangs up on the HTTP request: an answer, not the timeout.
    assert "closed the connection without answering the WebSocket upgrade" in str(error)
    assert error.status_code is None


def test_a_server_that_never_answers_times_out_with_a_clear_error() -> None:
    async def connect() -> WebSocketConnectError:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(WebSocketConnectError) as caught:
                await create_websocket_connection(
                    asyncio.Protocol, "127.0.0.1", port, timeout_s=0.2
                )
        finally:
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()
        return caught.value

    error = run(connect())
    assert "no answer to the WebSocket upgrade within 0.2 s" in str(error)
    assert isinstance(error.__cause__, TimeoutError)


def test_a_cancelled_connection_attempt_leaves_no_socket_open() -> None:
    async def cancel() -> bytes:
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        accepted = asyncio.Queue()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.put_nowait((reader, writer))

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            attempt = asyncio.create_task(
                create_websocket_connection(asyncio.Protocol, "127.0.0.1", port)
            )
            async with asyncio.timeout(TIMEOUT_S):
                reader, writer = await accepted.get()
                await reader.readuntil(b"\r\n\r\n")  # the Upgrade request arrived
                attempt.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await attempt
                rest = await reader.read()  # EOF: the client closed its socket
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
        return rest

    assert run(cancel()) == b""


def test_abort_drops_the_connection_without_a_close_frame() -> None:
    async def exchange() -> tuple[Exception | None, int | None]:
        done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

        async def wait(connection: ServerConnection) -> None:
            await connection.wait_closed()
            done.set_result(connection.close_code)

        async with websocket_server(wait) as port:
            transport, recorder = await create_websocket_connection(Recorder, "127.0.0.1", port)
            transport.abort()
            assert transport.is_closing()
            async with asyncio.timeout(TIMEOUT_S):
                return await recorder.lost, await done

    lost, close_code = run(exchange())
    assert lost is None
    assert close_code == 1006  # the server saw no close frame: an abnormal closure


def test_a_closed_port_raises_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused

        async def connect() -> None:
            await create_websocket_connection(asyncio.Protocol, "127.0.0.1", port)

        with pytest.raises(ConnectionRefusedError):
            run(connect())


# -- wss://, pings, fragments and closes against the `websockets` library -----------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) from a self-signed certificate for 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: run scripts/services", pytrace=False)
    directory: Path = tmp_path_factory.mktemp("websocket-tls")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "server.key", "-out", "server.pem", "-days", "2",
         "-subj", "/CN=iotix websocket test", "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=directory, capture_output=True, check=True,
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(directory / "server.pem", directory / "server.key")
    client = ssl.create_default_context(cafile=directory / "server.pem")
    return server, client


class Recorder(asyncio.Protocol):
    """An inner protocol that keeps what it is given, with futures to wait on."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.arrived = asyncio.Event()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        assert not self.lost.done(), "connection_lost was called twice"
        self.lost.set_result(exc)

    async def read(self, size: int) -> bytes:
        while len(self.data) < size:
            self.arrived.clear()
            await self.arrived.wait()
        data = bytes(self.data[:size])
        del self.data[:size]
        return data


@pytest.mark.parametrize("loop", LOOPS)
def test_wss_echo_through_a_tls_websocket_server(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], loop: str
) -> None:
    server_tls, client_tls = tls

    async def echo(connection: ServerConnection) -> None:
        async for message in connection:
            await connection.send(message)

    async def exchange() -> tuple[bytes, bytes, bool]:
        async with websocket_server(echo, ssl_context=server_tls) as port:
            transport, recorder = await create_websocket_connection(
                Recorder, "127.0.0.1", port, ssl=client_tls, server_hostname="127.0.0.1"
            )
            async with asyncio.timeout(TIMEOUT_S):
                transport.write(b"hello over TLS")
                small = await recorder.read(14)
                transport.writelines([b"big:", b"z" * 200_000])
                big = await recorder.read(200_004)
                encrypted = transport.get_extra_info("ssl_object") is not None
                transport.close()
                assert await recorder.lost is None
        return small, big, encrypted

    small, big, encrypted = run(exchange(), loop)
    assert small == b"hello over TLS"
    assert big == b"big:" + b"z" * 200_000
    assert encrypted


def test_server_pings_are_answered_and_fragments_joined_into_one_stream() -> None:
    async def exchange() -> tuple[bytes, int | None]:
        done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

        async def talk(connection: ServerConnection) -> None:
            pong = await connection.ping(b"ping-data")
            await pong  # resolved only by our pong with the same data
            await connection.send([b"frag-1|", b"frag-2|", b"frag-3"])  # one message, 3 frames
            await connection.wait_closed()
            done.set_result(connection.close_code)

        async with websocket_server(talk) as port:
            transport, recorder = await create_websocket_connection(Recorder, "127.0.0.1", port)
            async with asyncio.timeout(TIMEOUT_S):
                data = await recorder.read(20)
                transport.close()  # sends a close frame (1000), then closes TCP
                close_code = await done
        return data, close_code

    data, close_code = run(exchange())
    assert data == b"frag-1|frag-2|frag-3"
    assert close_code == 1000


@pytest.mark.parametrize("loop", LOOPS)
def test_a_close_from_the_server_reaches_the_inner_protocol_with_its_code(loop: str) -> None:
    async def exchange() -> Exception | None:
        async def close_at_once(connection: ServerConnection) -> None:
            await connection.close(1011, "broker on fire")

        async with websocket_server(close_at_once) as port:
            transport, recorder = await create_websocket_connection(Recorder, "127.0.0.1", port)
            async with asyncio.timeout(TIMEOUT_S):
                lost = await recorder.lost
            assert transport.is_closing()
        return lost

    lost = run(exchange(), loop)
    assert isinstance(lost, WebSocketError)
    assert lost.reason_code == 1011
    assert "code 1011: broker on fire" in str(lost)


def test_a_text_frame_from_the_server_fails_the_connection() -> None:
    async def exchange() -> tuple[Exception | None, int | None]:
        done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

        async def send_text(connection: ServerConnection) -> None:
            await connection.recv()  # once the client is open, not in the 101's read
            await connection.send("text is not MQTT")
            await connection.wait_closed()
            done.set_result(connection.close_code)

        async with websocket_server(send_text) as port:
            transport, recorder = await create_websocket_connection(Recorder, "127.0.0.1", port)
            transport.write(b"go")
            async with asyncio.timeout(TIMEOUT_S):
                return await recorder.lost, await done

    lost, close_code = run(exchange())
    assert isinstance(lost, WebSocketError)
    assert "text frame" in str(lost)
    assert close_code == 1003  # we told the server why


# -- a hand-written server, for byte sequences the `websockets` library does not send ------


@contextlib.asynccontextmanager
async def scripted_server(
    after_upgrade: bytes, *, with_answer: bool = False
) -> AsyncIterator[tuple[int, asyncio.Future[bytes]]]:
    """A server that accepts the Upgrade and writes *after_upgrade* in one write: once the
    client has sent something, or in the same write as its 101 answer (*with_answer*).
    The future holds all that the client sent after the Upgrade."""
    heard: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = re.search(rb"Sec-WebSocket-Key: (\S+)", request)
        assert key is not None
        answer = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Protocol: mqtt\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key.group(1)).encode() + b"\r\n\r\n"
        )
        if with_answer:
            writer.write(answer + after_upgrade)
            heard.set_result(await reader.read())
        else:
            writer.write(answer)
            first = await reader.read(1)
            writer.write(after_upgrade)
            heard.set_result(first + await reader.read())
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(serve_one, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], heard
    finally:
        server.close()
        await server.wait_closed()


def client_frames(data: bytes) -> list[tuple[ReferenceOpcode, bytes]]:
    reader = StreamReader()
    reader.feed_data(data)
    frames = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=True)
        with pytest.raises(StopIteration) as done:
            next(parser)
        frames.append((done.value.value.opcode, done.value.value.data))
    return frames


class Replier(Recorder):
    """Answers every piece of data at once, as MQTT answers a PUBLISH with a PUBACK."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.transport.write(b"ack:" + data)


def test_a_reply_to_data_that_came_with_the_close_is_dropped() -> None:
    data_then_close = encode_frame(b"publish", masked=False) + encode_frame(
        struct.pack("!H", 1000), opcode=Opcode.CLOSE, masked=False
    )

    async def exchange() -> tuple[bytes, Exception | None, bytes]:
        async with scripted_server(data_then_close) as (port, heard):
            transport, replier = await create_websocket_connection(Replier, "127.0.0.1", port)
            transport.write(b"hello")
            async with asyncio.timeout(TIMEOUT_S):
                lost = await replier.lost
                return bytes(replier.data), lost, await heard

    data, lost, heard = run(exchange())
    assert data == b"publish"  # delivered, though the close came in the same read
    assert lost is None
    assert client_frames(heard) == [
        (ReferenceOpcode.BINARY, b"hello"),
        (ReferenceOpcode.CLOSE, struct.pack("!H", 1000)),  # the echo; no "ack:" frame
    ]


def test_a_bad_frame_in_the_same_read_as_the_101_fails_the_connection_attempt() -> None:
    async def connect() -> WebSocketConnectError:
        text = encode_frame(b"{}", opcode=Opcode.TEXT, masked=False)
        async with scripted_server(text, with_answer=True) as (port, heard):
            with pytest.raises(WebSocketConnectError) as caught:
                await create_websocket_connection(Replier, "127.0.0.1", port)
            async with asyncio.timeout(TIMEOUT_S):
                await heard  # the client hung up
        return caught.value

    error = run(connect())
    assert "text frame" in str(error)
