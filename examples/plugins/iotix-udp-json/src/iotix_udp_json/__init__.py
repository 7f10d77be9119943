"""An example iotix adapter plugin: each message one UDP datagram holding a JSON envelope,
sent to ``udpjson://host:port``. Copy it to write your own (iotix's docs/adapters.md
walks through it).

What a plugin is:

- an adapter class (:class:`UDPJSONAdapter`), built once per worker process with the
  endpoint and the run's :class:`~iotix.adapters.base.AdapterSettings`, used as an async
  context manager, and asked for one link per device (:meth:`UDPJSONAdapter.connect`;
  here a link is one UDP socket);
- a link's ``send`` returns a :class:`~iotix.adapters.base.Delivery` for every message
  and never raises for a failed send;
- what stops a device from connecting is an :class:`~iotix.adapters.base.AdapterError`,
  translated from the library's exception (``raise ... from exc``);
- an entry point in the group ``iotix.adapters`` whose name is the URL scheme (see this
  package's pyproject.toml).

The wire format: each datagram is one JSON object::

    {"device_id": "thermo-00001", "topic": "buildings/paris/...", "payload": "{...}",
     "ts_ms": 1718000000000, "seq": 1}

``payload`` is the message's payload as text when it is UTF-8, else in base64; ``ts_ms``
the send time (Unix epoch, milliseconds); ``seq`` the message's number on its device's
socket, from 1. A message the engine wants confirmed (a model's QoS 1 or 2) waits at most
the run's adapter timeout for the reply datagram ``ack <seq>``; a QoS 0 message is fire
and forget.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import TYPE_CHECKING, Any, ClassVar, Self

from iotix.adapters.base import AdapterError, Delivery

if TYPE_CHECKING:
    from types import TracebackType

    from iotix.adapters.base import AdapterSettings, DeviceIdentity, OutgoingMessage
    from iotix.engine.worker import BrokerEndpoint

__all__ = ["UDPJSONAdapter", "encode_envelope", "parse_ack"]


def encode_envelope(device_id: str, message: OutgoingMessage, *, seq: int, ts_ms: int) -> bytes:
    """One message as the datagram the server receives."""
    try:
        payload = message.payload.decode()
    except UnicodeDecodeError:
        payload = base64.b64encode(message.payload).decode("ascii")
    envelope = {
        "device_id": device_id,
        "topic": message.topic,
        "payload": payload,
        "ts_ms": ts_ms,
        "seq": seq,
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def parse_ack(datagram: bytes) -> int | None:
    """The ``seq`` an ``ack <seq>`` reply confirms; None for any other datagram."""
    verb, _, number = datagram.strip().partition(b" ")
    return int(number) if verb == b"ack" and number.isdigit() else None


class _DeviceSocket(asyncio.DatagramProtocol):
    """One device's UDP socket: settles the sends waiting for their ack."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[str | None]] = {}
        """Sends waiting for an ack, by seq; each settles to None (acked) or an error."""

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:  # noqa: ARG002 - asyncio's signature
        seq = parse_ack(data)
        future = None if seq is None else self.waiting.get(seq)
        if future is not None and not future.done():  # a late ack finds nothing
            future.set_result(None)

    def error_received(self, exc: Exception) -> None:  # noqa: ARG002 - asyncio's signature
        # On a connected UDP socket an ICMP "port unreachable" for an earlier datagram
        # lands here: nobody listens at the endpoint.
        self._settle("unreachable")

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio's signature
        self._settle("closed")

    def _settle(self, error: str) -> None:
        for future in self.waiting.values():
            if not future.done():
                future.set_result(error)


class _UDPJSONLink:
    """One device: its socket and the number of its last message."""

    def __init__(
        self,
        adapter: UDPJSONAdapter,
        device_id: str,
        transport: asyncio.DatagramTransport,
        socket: _DeviceSocket,
    ) -> None:
        self.adapter = adapter
        self.device_id = device_id
        self.transport = transport
        self.socket = socket
        self.seq = 0

    async def send(self, message: OutgoingMessage) -> Delivery:
        if self.transport.is_closing():
            return Delivery(sent=False, error="not sent: link closed")
        self.seq += 1
        seq = self.seq
        datagram = encode_envelope(
            self.device_id, message, seq=seq, ts_ms=round(time.time() * 1000)
        )
        if not message.confirm:
            self.transport.sendto(datagram)
            return Delivery(sent=True)
        acked: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.socket.waiting[seq] = acked
        started = time.perf_counter()
        try:
            self.transport.sendto(datagram)
            async with asyncio.timeout(self.adapter.timeout_s):
                error = await acked
        except TimeoutError:
            return Delivery(sent=True, error="timeout")
        finally:
            del self.socket.waiting[seq]
        if error is not None:
            return Delivery(sent=True, error=error)
        return Delivery(sent=True, confirmed=True, latency_s=time.perf_counter() - started)

    async def aclose(self) -> None:
        self.transport.close()  # idempotent; the sends still waiting settle as "closed"
        self.adapter.links.discard(self)


class UDPJSONAdapter:
    """See the module docstring."""

    schemes: ClassVar[tuple[str, ...]] = ("udpjson",)

    def __init__(self, endpoint: BrokerEndpoint, settings: AdapterSettings) -> None:
        # The CLI and scenario files build the adapter before the run to check its
        # options: refuse what it does not know there, not mid-run.
        if settings.options:
            raise AdapterError(
                f"udpjson:// takes no adapter options, not {', '.join(settings.options)}",
                kind="configuration",
            )
        self.host = endpoint.host
        self.port = endpoint.port
        self.timeout_s = settings.timeout_s
        self.links: set[_UDPJSONLink] = set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for link in list(self.links):
            await link.aclose()

    async def connect(self, device: DeviceIdentity) -> _UDPJSONLink:
        loop = asyncio.get_running_loop()
        try:
            transport, socket = await loop.create_datagram_endpoint(
                _DeviceSocket, remote_addr=(self.host, self.port)
            )
        except OSError as exc:  # a name that does not resolve, no route, no sockets left
            raise AdapterError(
                f"{device.device_id}: no UDP socket to {self.host}:{self.port}: {exc}",
                kind="unreachable",
            ) from exc
        link = _UDPJSONLink(self, device.device_id, transport, socket)
        self.links.add(link)
        return link
