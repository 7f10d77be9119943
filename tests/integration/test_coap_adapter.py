"""CoAP devices (`iotix.adapters.coap`) against real CoAP servers on free ports.

- aiocoap, in-process (:class:`~iotix.testing.coap.RecordingCoAPServer`): what arrives,
  error codes, a dropped first CON, a separate response, Block1 reassembly;
- libcoap's ``coap-server`` (:class:`~iotix.testing.coap.LibCoAPServer`): CON and NON
  PUTs read back with GET, Block1, and DTLS-PSK (``coaps://``);
- raw UDP peers built from the codec, for what no server does on request (a RST, a
  server that never answers, a malformed datagram);
- the engine end to end: a :class:`~iotix.engine.message_worker.MessageWorker` of
  thermostats against aiocoap, counters reconciled with what the server got;
- the device as a server: GET /state, PUT /commands/{name}, Observe, asked by aiocoap.

A missing libcoap or DTLSSocket fails the tests that need it, with the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiocoap
import pytest
from broker_helpers import until

from iotix.adapters.base import (
    AdapterError,
    AdapterSettings,
    Command,
    DeviceIdentity,
    OutgoingMessage,
)
from iotix.adapters.coap import CoAPAdapter
from iotix.clock import WallClock
from iotix.engine.message_worker import MessageWorker
from iotix.engine.worker import BrokerEndpoint, RunSettings, parse_brokers
from iotix.model.loader import load_model_data, read_document
from iotix.protocols.coap import (
    CoAPMessage,
    Code,
    MessageType,
    decode,
    empty_message,
    encode,
)
from iotix.testing.coap import LibCoAPServer, RecordingCoAPServer, find_coap_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from iotix.adapters.coap import _CoAPLink

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "device-models"
FAST = {"ack_timeout_s": 0.05}  # retransmissions in tens of milliseconds, not seconds


@pytest.fixture(scope="session")
def coap_server_binary() -> Path:
    binary = find_coap_server(dtls=True)
    if binary is None:
        pytest.fail(
            "libcoap's coap-server (with DTLS) is not installed, and these tests start it: "
            "run scripts/services (it installs Debian's `libcoap3-bin`).",
            pytrace=False,
        )
    return binary


@pytest.fixture
def libcoap(coap_server_binary: Path) -> Iterator[LibCoAPServer]:
    with LibCoAPServer(binary=coap_server_binary) as server:
        yield server


@contextlib.asynccontextmanager
async def device(
    url: str, *, device_id: str = "thermo-00001", index: int = 0, **options: Any
) -> AsyncIterator[_CoAPLink]:
    """One device's link through a CoAP adapter of its own."""
    endpoint = parse_brokers(url)[0]
    settings = AdapterSettings(timeout_s=5.0, options=options)
    async with CoAPAdapter(endpoint, settings) as adapter:
        link = await adapter.connect(DeviceIdentity(device_id, index))
        try:
            yield link
        finally:
            await link.aclose()


def message(topic: str, payload: bytes = b'{"t":21.5}', *, confirm: bool = True) -> OutgoingMessage:
    return OutgoingMessage(topic, payload, confirm=confirm)


# --- against aiocoap ----------------------------------------------------------------------


def test_a_confirmable_message_is_posted_and_confirmed() -> None:
    async def scenario() -> None:
        async with RecordingCoAPServer() as server, device(f"{server.url}/ingest") as link:
            delivery = await link.send(message("devices/thermo-00001/telemetry"))
            assert delivery.sent
            assert delivery.confirmed
            assert delivery.error is None
            assert delivery.latency_s is not None
            assert delivery.retransmissions == 0
            [request] = server.requests
            assert request.method == "POST"
            assert request.path == ("ingest", "devices", "thermo-00001", "telemetry")
            assert request.payload == b'{"t":21.5}'
            assert request.content_format == 50  # application/json
            [datagram] = server.datagrams
            assert datagram.type == "CON"

    asyncio.run(scenario())


def test_method_and_content_format_come_from_the_options() -> None:
    async def scenario() -> None:
        async with (
            RecordingCoAPServer() as server,
            device(server.url, method="put", content_format="cbor") as link,
        ):
            assert (await link.send(message("t", b"\xa0"))).confirmed
            [request] = server.requests
            assert (request.method, request.content_format) == ("PUT", 60)

    asyncio.run(scenario())


def test_a_query_in_the_topic_becomes_uri_query_options() -> None:
    async def scenario() -> None:
        async with RecordingCoAPServer() as server, device(server.url) as link:
            assert (await link.send(message("t/x?unit=C&dev=1"))).confirmed
            [request] = server.requests
            assert request.path == ("t", "x")
            assert request.query == ("unit=C", "dev=1")

    asyncio.run(scenario())


def test_a_4_04_is_counted_by_its_code() -> None:
    async def scenario() -> None:
        async with (
            RecordingCoAPServer(codes={"ingest/missing": 0x84}) as server,
            device(f"{server.url}/ingest") as link,
        ):
            delivery = await link.send(message("missing/thing"))
            assert delivery.sent
            assert not delivery.confirmed
            assert delivery.error == "coap 4.04"
            assert len(server.requests) == 1

    asyncio.run(scenario())


def test_a_5_03_is_counted_by_its_code() -> None:
    async def scenario() -> None:
        async with RecordingCoAPServer(codes={"busy": 0xA3}) as server, device(server.url) as link:
            assert (await link.send(message("busy"))).error == "coap 5.03"

    asyncio.run(scenario())


def test_a_dropped_con_is_retransmitted_and_counted() -> None:
    async def scenario() -> None:
        async with (
            RecordingCoAPServer(drop_first={"flaky"}) as server,
            device(server.url, **FAST) as link,
        ):
            delivery = await link.send(message("flaky/t"))
            assert delivery.confirmed
            assert delivery.retransmissions == 1
            dropped, taken = server.datagrams
            assert dropped.dropped
            assert not taken.dropped
            # Section 4.2: a retransmission is the same message, same id and token.
            assert (dropped.message_id, dropped.token) == (taken.message_id, taken.token)
            assert len(server.requests) == 1  # processed once

    asyncio.run(scenario())


def test_a_non_confirmable_message_is_sent_and_not_waited_for() -> None:
    async def scenario() -> None:
        async with RecordingCoAPServer() as server, device(server.url) as link:
            delivery = await link.send(message("t", confirm=False))
            assert delivery.sent
            assert not delivery.confirmed
            assert delivery.error is None
            assert delivery.latency_s is None
            await until(lambda: len(server.requests) == 1)
            assert server.datagrams[0].type == "NON"
            assert server.datagrams[0].token == b""

    asyncio.run(scenario())


def test_a_separate_response_confirms_after_the_empty_ack() -> None:
    async def scenario() -> None:
        async with RecordingCoAPServer(hold={"slow"}) as server, device(server.url) as link:
            sending = asyncio.create_task(link.send(message("slow")))
            # aiocoap acknowledges a request whose response is not ready (after 0.1 s).
            await until(lambda: any(d.type == "ACK" and d.code == "0.00" for d in server.sent))
            assert not sending.done()
            server.release.set()
            delivery = await sending
            assert delivery.confirmed
            assert delivery.retransmissions == 0
            # The separate response came as a CON, and the device acknowledged it.
            await until(lambda: any(d.type == "ACK" for d in server.datagrams))

    asyncio.run(scenario())


def test_a_large_body_goes_block_wise_and_arrives_whole() -> None:
    body = bytes(i % 251 for i in range(5000))

    async def scenario() -> None:
        async with RecordingCoAPServer() as server, device(server.url) as link:
            delivery = await link.send(message("big", body, confirm=False))
            # Block-wise needs every block answered: sent confirmable even for QoS 0.
            assert delivery.confirmed
            [request] = server.requests
            assert request.payload == body
            blocks = [d.block1 for d in server.datagrams]
            assert blocks == [(0, True, 6), (1, True, 6), (2, True, 6), (3, True, 6), (4, False, 6)]
            assert {d.type for d in server.datagrams} == {"CON"}

    asyncio.run(scenario())


def test_the_block_size_is_an_option() -> None:
    async def scenario() -> None:
        async with RecordingCoAPServer() as server, device(server.url, block_size=256) as link:
            assert (await link.send(message("big", b"z" * 1000))).confirmed
            assert [d.block1 for d in server.datagrams][-1] == (3, False, 4)
            assert server.requests[0].payload == b"z" * 1000

    asyncio.run(scenario())


# --- raw peers: what no server does on request ---------------------------------------------


class _RawPeer(asyncio.DatagramProtocol):
    """A UDP peer that answers each datagram with ``answer(message)`` (or nothing)."""

    def __init__(self, answer: Callable[[CoAPMessage], bytes | None]) -> None:
        self.answer = answer
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        reply = self.answer(decode(data))
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


@contextlib.asynccontextmanager
async def raw_peer(
    answer: Callable[[CoAPMessage], bytes | None],
) -> AsyncIterator[tuple[str, _RawPeer]]:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(
        lambda: _RawPeer(answer), local_addr=("127.0.0.1", 0)
    )
    try:
        yield f"coap://127.0.0.1:{transport.get_extra_info('sockname')[1]}", peer
    finally:
        transport.close()


def test_a_reset_is_counted_as_reset() -> None:
    async def scenario() -> None:
        async with (
            raw_peer(lambda m: encode(empty_message(MessageType.RST, m.message_id))) as (url, _),
            device(url) as link,
        ):
            delivery = await link.send(message("t"))
            assert (delivery.sent, delivery.confirmed, delivery.error) == (True, False, "reset")

    asyncio.run(scenario())


def test_retransmissions_that_run_out_are_a_timeout() -> None:
    async def scenario() -> None:
        async with (
            raw_peer(lambda _: None) as (url, peer),
            device(url, max_retransmit=2, **FAST) as link,
        ):
            delivery = await link.send(message("t"))
            assert (delivery.sent, delivery.confirmed, delivery.error) == (True, False, "timeout")
            assert delivery.retransmissions == 2
            assert len(peer.received) == 3
            assert len({decode(d).message_id for d in peer.received}) == 1

    asyncio.run(scenario())


def test_a_malformed_confirmable_datagram_to_the_device_is_reset() -> None:
    async def scenario() -> None:
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        async with RecordingCoAPServer() as server, device(server.url) as link:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Collector(answers), remote_addr=link.transport.get_extra_info("sockname")
            )
            try:
                transport.sendto(bytes.fromhex("40017d34f1"))  # option nibble 15
                reply = decode(await asyncio.wait_for(answers.get(), 5))
                assert reply == empty_message(MessageType.RST, 0x7D34)
            finally:
                transport.close()

    asyncio.run(scenario())


class _Collector(asyncio.DatagramProtocol):
    def __init__(self, into: asyncio.Queue[bytes]) -> None:
        self.into = into

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # noqa: ARG002 - asyncio's signature
        self.into.put_nowait(data)


def test_a_path_segment_over_255_bytes_is_not_sent() -> None:
    async def scenario() -> None:
        async with RecordingCoAPServer() as server, device(server.url) as link:
            delivery = await link.send(message("a/" + "x" * 256))
            assert (delivery.sent, delivery.error) == (False, "not sent: uri option over 255 bytes")
            assert server.datagrams == []

    asyncio.run(scenario())


def test_a_send_after_close_is_not_sent() -> None:
    async def scenario() -> None:
        async with RecordingCoAPServer() as server, device(server.url) as link:
            await link.aclose()
            delivery = await link.send(message("t"))
            assert (delivery.sent, delivery.error) == (False, "not sent: link closed")
            await link.aclose()  # idempotent

    asyncio.run(scenario())


def test_closing_a_link_ends_its_pending_confirmations() -> None:
    async def scenario() -> None:
        async with raw_peer(lambda _: None) as (url, peer), device(url) as link:
            sending = asyncio.create_task(link.send(message("t")))
            await until(lambda: len(peer.received) == 1)
            await link.aclose()
            delivery = await sending
            assert (delivery.sent, delivery.confirmed) == (True, False)
            assert delivery.error == "not confirmed: link closed"

    asyncio.run(scenario())


def test_bad_options_are_configuration_errors() -> None:
    endpoint = BrokerEndpoint("127.0.0.1", 5683, scheme="coap")
    for options in ({"method": "GET"}, {"content_format": "nonsense"}, {"block_size": 2048}):
        with pytest.raises(AdapterError) as caught:
            CoAPAdapter(endpoint, AdapterSettings(options=options))
        assert caught.value.kind == "configuration"


# --- against libcoap's coap-server -----------------------------------------------------------


def test_libcoap_takes_confirmable_and_non_confirmable_puts(libcoap: LibCoAPServer) -> None:
    async def scenario() -> None:
        async with device(f"{libcoap.url}/fleet", method="PUT") as link:
            first = await link.send(message("thermo-00001/telemetry", b'{"n":1}'))
            assert first.confirmed  # 2.01 Created: coap-server made the resource
            second = await link.send(message("thermo-00001/telemetry", b'{"n":2}', confirm=False))
            assert (second.sent, second.confirmed, second.error) == (True, False, None)
            await until(lambda: len(libcoap.requests(["fleet"])) == 2)
            third = await link.send(message("thermo-00001/telemetry", b'{"n":3}'))
            assert third.confirmed  # 2.04 Changed

    asyncio.run(scenario())
    con, non, con_again = libcoap.requests(["fleet"])
    assert (con.type, con.code, con.payload) == ("CON", "PUT", '{"n":1}')
    assert (non.type, non.code, non.payload) == ("NON", "PUT", '{"n":2}')
    assert con.path == ("fleet", "thermo-00001", "telemetry")
    assert con_again.type == "CON"
    assert libcoap.get("fleet/thermo-00001/telemetry") == ("2.05", b'{"n":3}')


def test_libcoap_reassembles_a_block_wise_put(libcoap: LibCoAPServer) -> None:
    body = b"".join(b"%05d," % i for i in range(600))  # 3600 bytes: four blocks

    async def scenario() -> None:
        async with device(libcoap.url, method="PUT") as link:
            assert (await link.send(message("big", body))).confirmed

    asyncio.run(scenario())
    puts = libcoap.requests(["big"])
    assert len(puts) == 4
    assert libcoap.get("big") == ("2.05", body)


def test_libcoap_refusing_a_method_is_counted_by_its_code(libcoap: LibCoAPServer) -> None:
    async def scenario() -> None:
        async with device(libcoap.url) as link:  # POST to a resource that takes none
            delivery = await link.send(message("example_data"))
            assert (delivery.sent, delivery.confirmed, delivery.error) == (True, False, "coap 4.05")

    asyncio.run(scenario())


# --- DTLS-PSK (coaps://) against coap-server -------------------------------------------------


@pytest.fixture
def dtlssocket() -> None:
    if importlib.util.find_spec("DTLSSocket") is None:
        pytest.fail(
            "DTLSSocket is not installed, and coaps:// needs it: pip install 'iotix[coaps]' "
            "(it builds tinydtls: apt-get install autoconf automake)",
            pytrace=False,
        )


@pytest.mark.usefixtures("dtlssocket")
def test_coaps_devices_send_over_dtls_with_a_pre_shared_key(coap_server_binary: Path) -> None:
    with LibCoAPServer(binary=coap_server_binary, psk="sesame") as server:

        async def scenario() -> None:
            endpoint = BrokerEndpoint(
                server.host, server.dtls_port, scheme="coaps", tls=True, path="/secure"
            )
            settings = AdapterSettings(timeout_s=5.0, options={"method": "PUT"})
            async with CoAPAdapter(endpoint, settings) as adapter:
                link = await adapter.connect(
                    DeviceIdentity("thermo-00001", 0, "thermo-00001", "sesame")
                )
                try:
                    assert (await link.send(message("t", b'{"n":1}'))).confirmed
                    assert (await link.send(message("t", b'{"n":2}', confirm=False))).sent
                    await until(lambda: len(server.requests(["secure"])) == 2)
                    assert (await link.send(message("big", b"b" * 2500))).confirmed
                finally:
                    await link.aclose()

        asyncio.run(scenario())
        assert server.get("secure/t") == ("2.05", b'{"n":2}')
        assert server.get("secure/big") == ("2.05", b"b" * 2500)
        assert "DTLS" in server.log_text()


@pytest.mark.usefixtures("dtlssocket")
def test_coaps_with_the_wrong_key_does_not_connect(coap_server_binary: Path) -> None:
    with LibCoAPServer(binary=coap_server_binary, psk="sesame") as server:

        async def scenario() -> None:
            endpoint = BrokerEndpoint(server.host, server.dtls_port, scheme="coaps", tls=True)
            settings = AdapterSettings(
                timeout_s=1.0, options={"psk_identity": "{device_id}", "psk": "wrong"}
            )
            async with CoAPAdapter(endpoint, settings) as adapter:
                with pytest.raises(AdapterError) as caught:
                    await adapter.connect(DeviceIdentity("thermo-00001", 0))
                assert caught.value.kind in ("timeout", "dtls refused")

        asyncio.run(scenario())


def test_coaps_without_a_key_is_a_configuration_error() -> None:
    async def scenario() -> None:
        endpoint = BrokerEndpoint("127.0.0.1", 5684, scheme="coaps", tls=True)
        async with CoAPAdapter(endpoint, AdapterSettings()) as adapter:
            with pytest.raises(AdapterError) as caught:
                await adapter.connect(DeviceIdentity("thermo-00001", 0))
            assert caught.value.kind == "configuration"

    asyncio.run(scenario())


# --- the engine end to end ---------------------------------------------------------------------


def fast_thermostat() -> Any:
    """The example thermostat, sending every 0.25 s instead of every 10 s."""
    data, _ = read_document(EXAMPLES / "thermostat.yaml")
    data["messages"]["telemetry"]["schedule"] = {
        "kind": "interval",
        "interval_s": 0.25,
        "jitter_s": 0.05,
    }
    return load_model_data(data, file=EXAMPLES / "thermostat.yaml")


@pytest.mark.parametrize("qos", [1, 0])
def test_a_worker_of_thermostats_delivers_every_message(qos: int) -> None:
    devices = 20

    async def scenario() -> tuple[MessageWorker, RecordingCoAPServer]:
        async with RecordingCoAPServer() as server:
            worker = MessageWorker(
                fast_thermostat(),
                range(devices),
                RunSettings(
                    devices=devices,
                    brokers=parse_brokers(f"{server.url}/ingest"),
                    duration_s=1.5,
                    qos=qos,
                ),
                WallClock(),
            )
            await worker.run()
            sent = worker.counters.messages_sent
            await until(lambda: len(server.requests_under("ingest")) == sent)
            return worker, server

    worker, server = asyncio.run(scenario())
    counters = worker.counters
    assert counters.connects == devices
    assert counters.messages_sent >= devices * 3
    assert counters.reconciles(), counters.problems()
    assert counters.messages_failed == 0
    if qos:
        assert counters.messages_acked == counters.messages_sent
        assert {d.type for d in server.datagrams} == {"CON"}
    else:
        assert counters.messages_acked == 0
        assert {d.type for d in server.datagrams} == {"NON"}
    requests = server.requests_under("ingest")
    assert len(requests) == counters.messages_sent
    senders = {r.path[4] for r in requests}  # ingest/buildings/{site}/thermostats/{id}/...
    assert len(senders) == devices
    assert all(r.path[0:2] == ("ingest", "buildings") for r in requests)


def test_a_command_put_to_a_running_device_is_handled_and_answered() -> None:
    async def scenario() -> tuple[MessageWorker, RecordingCoAPServer]:
        async with RecordingCoAPServer() as server:
            worker = MessageWorker(
                fast_thermostat(),
                range(3),
                RunSettings(devices=3, brokers=parse_brokers(f"{server.url}/ingest")),
                WallClock(),
            )
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: worker.connected == 3)
            context = await client_context()
            try:
                link = worker.links[1]
                put = aiocoap.Message(
                    code=aiocoap.PUT,
                    uri=device_uri(link, "commands/set_setpoint"),
                    payload=b'{"value": 24.5}',
                )
                response = await asyncio.wait_for(context.request(put).response, 5)
                assert response.code == aiocoap.CHANGED
                await until(
                    lambda: bool(server.requests_under("ingest/devices/thermo-00001/replies"))
                )
            finally:
                await context.shutdown()
                stop.set()
                await running
            return worker, server

    worker, server = asyncio.run(scenario())
    assert worker.counters.commands_received == 1
    assert worker.counters.commands_answered == 1
    [reply] = server.requests_under("ingest/devices/thermo-00001/replies")
    assert reply.path[-1] == "set_setpoint"
    assert b"24.5" in reply.payload


# --- the device as a server ---------------------------------------------------------------------


async def client_context() -> Any:
    return await aiocoap.Context.create_client_context(transports=["udp6"])


def device_uri(link: _CoAPLink, path: str) -> str:
    host, port = link.transport.get_extra_info("sockname")[:2]
    return f"coap://{host}:{port}/{path}"


def test_a_device_serves_its_latest_message_as_state() -> None:
    async def scenario() -> None:
        async with RecordingCoAPServer() as server, device(server.url) as link:
            await link.send(message("t", b'{"t":22.5}'))
            context = await client_context()
            try:
                get = aiocoap.Message(code=aiocoap.GET, uri=device_uri(link, "state"))
                response = await asyncio.wait_for(context.request(get).response, 5)
                assert response.code == aiocoap.CONTENT
                assert response.payload == b'{"t":22.5}'
                assert response.opt.content_format == 50
                missing = aiocoap.Message(code=aiocoap.GET, uri=device_uri(link, "nothing"))
                assert (
                    await asyncio.wait_for(context.request(missing).response, 5)
                ).code == aiocoap.NOT_FOUND
                core = aiocoap.Message(code=aiocoap.GET, uri=device_uri(link, ".well-known/core"))
                listing = await asyncio.wait_for(context.request(core).response, 5)
                assert b"</state>;obs" in listing.payload
            finally:
                await context.shutdown()

    asyncio.run(scenario())


def test_a_put_to_a_command_reaches_the_run() -> None:
    received: list[tuple[str, Command]] = []

    async def scenario() -> None:
        async with RecordingCoAPServer() as server:
            endpoint = parse_brokers(server.url)[0]
            settings = AdapterSettings(
                on_command=lambda device_id, command: received.append((device_id, command))
            )
            async with CoAPAdapter(endpoint, settings) as adapter:
                link = await adapter.connect(DeviceIdentity("thermo-00007", 7))
                context = await client_context()
                try:
                    put = aiocoap.Message(
                        code=aiocoap.PUT,
                        uri=device_uri(link, "commands/set_setpoint"),
                        payload=b'{"value":23}',
                    )
                    response = await asyncio.wait_for(context.request(put).response, 5)
                    assert response.code == aiocoap.CHANGED
                    post = aiocoap.Message(
                        code=aiocoap.POST, uri=device_uri(link, "commands/set_setpoint")
                    )
                    refused = await asyncio.wait_for(context.request(post).response, 5)
                    assert refused.code == aiocoap.METHOD_NOT_ALLOWED
                finally:
                    await context.shutdown()
                    await link.aclose()

    asyncio.run(scenario())
    assert received == [("thermo-00007", Command("set_setpoint", b'{"value":23}'))]


def test_without_a_command_handler_commands_are_not_implemented() -> None:
    async def scenario() -> None:
        async with RecordingCoAPServer() as server, device(server.url) as link:
            context = await client_context()
            try:
                put = aiocoap.Message(code=aiocoap.PUT, uri=device_uri(link, "commands/reboot"))
                response = await asyncio.wait_for(context.request(put).response, 5)
                assert response.code == aiocoap.NOT_IMPLEMENTED
            finally:
                await context.shutdown()

    asyncio.run(scenario())


def test_an_observer_is_notified_of_every_message_the_device_sends() -> None:
    async def scenario() -> None:
        async with RecordingCoAPServer() as server, device(server.url) as link:
            await link.send(message("t", b'{"n":0}'))
            context = await client_context()
            try:
                get = aiocoap.Message(code=aiocoap.GET, uri=device_uri(link, "state"), observe=0)
                request = context.request(get)
                first = await asyncio.wait_for(request.response, 5)
                assert first.payload == b'{"n":0}'
                assert first.opt.observe is not None
                notifications = aiter(request.observation)
                for n in (1, 2):
                    await link.send(message("t", b'{"n":%d}' % n, confirm=False))
                    notification = await asyncio.wait_for(anext(notifications), 5)
                    assert notification.payload == b'{"n":%d}' % n
                request.observation.cancel()
            finally:
                await context.shutdown()

    asyncio.run(scenario())


def test_a_duplicated_confirmable_request_gets_the_same_response_once() -> None:
    async def scenario() -> None:
        commands: list[Command] = []
        answers: asyncio.Queue[bytes] = asyncio.Queue()
        async with RecordingCoAPServer() as server:
            endpoint = parse_brokers(server.url)[0]
            settings = AdapterSettings(on_command=lambda _d, command: commands.append(command))
            async with CoAPAdapter(endpoint, settings) as adapter:
                link = await adapter.connect(DeviceIdentity("thermo-00001", 0))
                loop = asyncio.get_running_loop()
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Collector(answers),
                    remote_addr=link.transport.get_extra_info("sockname"),
                )
                try:
                    put = CoAPMessage(
                        MessageType.CON,
                        Code.PUT,
                        0x1234,
                        b"tk",
                        ((11, b"commands"), (11, b"reboot")),
                    )
                    for _ in range(2):  # as if our ACK had been lost
                        transport.sendto(encode(put))
                    first = await asyncio.wait_for(answers.get(), 5)
                    second = await asyncio.wait_for(answers.get(), 5)
                    assert first == second
                    assert decode(first).code == Code.CHANGED
                finally:
                    transport.close()
                    await link.aclose()
        assert commands == [Command("reboot", b"")]  # executed once

    asyncio.run(scenario())
