"""CoAP devices (RFC 7252): each device a UDP endpoint of its own, sending its messages
as requests to a CoAP server and answering requests to its own resources.

``coap://host:5683/base`` and a model topic ``devices/{device_id}/telemetry`` make
``POST coap://host:5683/base/devices/thermo-00001/telemetry`` (one Uri-Path option per
segment; a ``?a=1&b=2`` ending of the topic becomes Uri-Query options) with the payload
as the body. What the engine asks for decides the message
type:

- ``confirm=True`` (the model's QoS 1 or 2) sends a confirmable (CON) request, sent
  again on RFC 7252's schedule (section 4.8: 2 to 3 s, doubling, 4 retransmissions)
  until the server acknowledges it. A 2.xx response (piggybacked on the ACK, or
  separate after an empty ACK) confirms the message; 4.xx and 5.xx count as
  ``coap 4.04`` and the like, a RST as ``reset``, retransmissions that run out (or a
  separate response that never comes, after ``timeout_s``) as ``timeout``; every
  retransmission is counted.
- ``confirm=False`` (QoS 0) sends a non-confirmable (NON) request: sent, never
  confirmed, nothing waited for.
- A body larger than a block (``block_size``, 1024 bytes by default) goes block-wise
  (RFC 7959 Block1), each block confirmable whatever the QoS: a block-wise transfer
  needs the server's answer to each block before the next.

Options (``adapter_options``):

- ``method``: ``POST`` (default) or ``PUT``;
- ``content_format``: the Content-Format option, a number or a name of
  :class:`~iotix.protocols.coap.ContentFormat` (default 50, ``application/json``;
  ``none`` sends none);
- ``block_size``: Block1 block size in bytes, 16 to 1024 (default 1024);
- ``ack_timeout_s``, ``ack_random_factor``, ``max_retransmit``, ``nstart``: RFC 7252's
  transmission parameters (2.0, 1.5, 4, 1);
- ``source_addresses``: local addresses to bind the devices' sockets to, by device
  index in turn (default: 127.0.0.1 for a loopback server, else any);
- ``psk_identity``, ``psk``: for ``coaps://``, templates over ``{device_id}`` and
  ``{index}`` for the DTLS pre-shared key identity and key (default: the device's user
  name and password).

**The device as a server.** Each device's socket also answers requests (from any
address, for ``coap://``; from the server, over ``coaps://``): ``GET /state`` returns
the payload of the device's latest message (RFC 7641 Observe registers for a
notification at every message the device sends), ``PUT /commands/{name}`` hands the
body to ``settings.on_command`` as a :class:`~iotix.adapters.base.Command` and answers
2.04 (5.01 when the run handles no commands), and ``GET /.well-known/core`` lists
these resources (RFC 6690).

**DTLS.** ``coaps://`` wraps every datagram in DTLS 1.2 with a pre-shared key (tinydtls,
through the ``DTLSSocket`` package; cipher TLS_PSK_WITH_AES_128_CCM_8, RFC 7252
section 9.1.3.1). A device's handshake happens in :meth:`CoAPAdapter.connect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib
import ipaddress
import random
import socket
from typing import TYPE_CHECKING, Any, ClassVar, Self

from iotix.adapters.base import AdapterError, Command, Delivery
from iotix.protocols.coap import (
    ACK_RANDOM_FACTOR,
    ACK_TIMEOUT_S,
    DEFAULT_BLOCK_SIZE_BYTES,
    MAX_RETRANSMIT,
    NSTART,
    CoAPClient,
    CoAPFormatError,
    CoAPMessage,
    Code,
    ContentFormat,
    FailedEvent,
    MessageType,
    ObserverRegistry,
    OptionNumber,
    RecentResponses,
    ResponseEvent,
    code_text,
    decode,
    empty_message,
    encode,
    encode_uint,
    is_critical,
    response_to,
)

if TYPE_CHECKING:
    from types import TracebackType

    from iotix.adapters.base import AdapterSettings, DeviceIdentity, OutgoingMessage
    from iotix.engine.worker import BrokerEndpoint
    from iotix.protocols.coap import ClientEvent, Option

__all__ = ["CoAPAdapter"]

Address = tuple[Any, ...]
"""A socket address as recvfrom gives it: (host, port), or four fields for IPv6."""

METHODS = {"POST": Code.POST, "PUT": Code.PUT}
_KNOWN_REQUEST_OPTIONS = frozenset(
    int(n)
    for n in (
        OptionNumber.URI_HOST,
        OptionNumber.URI_PORT,
        OptionNumber.URI_PATH,
        OptionNumber.URI_QUERY,
        OptionNumber.OBSERVE,
        OptionNumber.ACCEPT,
        OptionNumber.CONTENT_FORMAT,
        OptionNumber.IF_MATCH,
        OptionNumber.IF_NONE_MATCH,
        OptionNumber.ETAG,
        OptionNumber.BLOCK2,
        OptionNumber.SIZE2,
    )
)
_WELL_KNOWN_CORE = b"</state>;obs;rt=iotix.state,</commands>;rt=iotix.commands"
# DTLS: tinydtls events (dtls.h) and alert levels (RFC 5246 section 7.2).
_DTLS_EVENT_CONNECTED = 0x01DE
_DTLS_LEVEL_FATAL = 2
# tinydtls addresses its one peer by a name we choose; the socket is connected anyway.
_DTLS_PEER = ("::1", 5684)
_DTLS_HANDSHAKE_POLL_S = 0.25


def _option_float(options: dict[str, Any], name: str, default: float) -> float:
    try:
        return float(options.get(name, default))
    except (TypeError, ValueError) as exc:
        raise AdapterError(
            f"CoAP option {name}: a number, not {options[name]!r}", kind="configuration"
        ) from exc


def _content_format(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    if isinstance(value, int) and 0 <= value <= 0xFFFF:
        return value
    if isinstance(value, str):
        if value.isdigit():
            return _content_format(int(value))
        try:
            return int(ContentFormat[value.upper().replace("-", "_").replace("/", "_")])
        except KeyError:
            pass
    known = ", ".join(f"{f.name.lower()} ({f.value})" for f in ContentFormat)
    raise AdapterError(
        f"CoAP content_format {value!r}: a number 0-65535 or one of {known}", kind="configuration"
    )


class _DTLSSession:
    """One device's DTLS session with the server (tinydtls through DTLSSocket)."""

    def __init__(self, link: _CoAPLink, identity: bytes, key: bytes) -> None:
        try:
            dtls = importlib.import_module("DTLSSocket.dtls")
        except ImportError as exc:
            raise AdapterError(
                "coaps:// needs the DTLSSocket package (pip install 'iotix[coaps]')",
                kind="configuration",
            ) from exc
        self.link = link
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.dtls: Any = dtls.DTLS(
            read=self._read,
            write=self._write,
            event=self._event,
            pskId=identity,
            pskStore={identity: key},
        )
        self.connection: Any = self.dtls.connect(*_DTLS_PEER)

    # tinydtls calls these from inside handleMessage, write and connect.
    def _read(self, _sender: Any, data: bytes) -> int:
        self.link.plaintext_received(data, self.link.adapter.server_address)
        return len(data)

    def _write(self, _recipient: Any, data: bytes) -> int:
        transport = self.link.transport
        if transport is not None and not transport.is_closing():
            transport.sendto(data)
        return len(data)

    def _event(self, level: int, code: int) -> None:
        if code == _DTLS_EVENT_CONNECTED and not self.connected.done():
            self.connected.set_result(None)
        elif level == _DTLS_LEVEL_FATAL:
            error = AdapterError(f"DTLS alert {code} from the server", kind="dtls refused")
            if not self.connected.done():
                self.connected.set_exception(error)
            self.link.fail_pending("reset")

    def poll_handshake(self) -> None:
        """Let tinydtls resend handshake flights that were lost."""
        self.dtls.checkRetransmit()

    def send(self, datagram: bytes) -> None:
        if self.connection is not None:
            self.dtls.write(self.connection, datagram)

    def received(self, data: bytes) -> None:
        if self.connection is not None:
            self.dtls.handleMessage(self.connection, data)

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # a closing peer is no error of ours
                self.dtls.close(connection)
                self.dtls.resetPeer(connection)


class _CoAPLink(asyncio.DatagramProtocol):
    """One device: its socket, its client exchange state, its resources."""

    def __init__(self, adapter: CoAPAdapter, device: DeviceIdentity) -> None:
        self.adapter = adapter
        self.device = device
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.client = adapter.new_client()
        self.pending: dict[int, tuple[asyncio.Future[Delivery], float]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.state = b""
        self.observers: ObserverRegistry[Address] | None = None
        self.recent: RecentResponses[Address] | None = None
        self.dtls: _DTLSSession | None = None
        self.send_error: OSError | None = None
        self.closed = False

    # -- asyncio.DatagramProtocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.dtls is not None:
            self.dtls.received(data)
        else:
            self.plaintext_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # Raised by sendto (EAGAIN, ENETUNREACH...) or reported for an earlier datagram
        # (ECONNREFUSED on a connected socket): the send in progress failed.
        if isinstance(exc, OSError):
            self.send_error = exc
            if self.dtls is not None and exc.errno == errno.ECONNREFUSED:
                self.fail_pending("unreachable")

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio's signature
        self.fail_pending("not confirmed: link closed")

    # -- receiving --

    def plaintext_received(self, data: bytes, addr: Address) -> None:
        try:
            message = decode(data)
        except CoAPFormatError as exc:
            # Section 4.2: a malformed CON is rejected with a RST; a message of another
            # version is ignored (section 3), as is anything else malformed (4.3).
            if (
                exc.message_type is MessageType.CON
                and exc.message_id is not None
                and data[0] >> 6 == 1
            ):
                self._send_to(encode(empty_message(MessageType.RST, exc.message_id)), addr)
            return
        if message.is_request:
            self._serve(message, addr)
            return
        if message.type is MessageType.RST and self.observers is not None:
            self.observers.reset_by(addr, message.message_id)  # RFC 7641 section 3.6
        if addr != self.adapter.server_address:
            return  # responses from anyone but the server match nothing of ours
        now = self.loop.time()
        events = self.client.receive(message, now)
        self._flush()
        self._deliver(events, now)
        self._reschedule()

    # -- sending --

    def _send_to(self, datagram: bytes, addr: Address) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.dtls is not None:
            self.dtls.send(datagram)
        else:
            transport.sendto(datagram, addr)

    def _flush(self) -> None:
        server = self.adapter.server_address
        for datagram in self.client.datagrams_to_send():
            self._send_to(datagram, server)

    async def send(self, message: OutgoingMessage) -> Delivery:
        adapter = self.adapter
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return Delivery(sent=False, error="not sent: link closed")
        now = self.loop.time()
        self.state = message.payload
        if self.observers is not None and self.observers.observers:
            self._notify_observers(message.payload)
        path, query = _route(adapter.base_path, message.topic)
        try:
            exchange = self.client.request(
                adapter.method,
                path,
                message.payload,
                confirmable=message.confirm,
                now_s=now,
                content_format=adapter.content_format,
                query=query,
            )
        except CoAPFormatError:
            # A path segment or query argument over 255 bytes (RFC 7252 section 5.10).
            return Delivery(sent=False, error="not sent: uri option over 255 bytes")
        future: asyncio.Future[Delivery] | None = None
        if self.client.is_pending(exchange):
            future = self.loop.create_future()
            self.pending[exchange] = (future, now)
        self.send_error = None
        self._flush()
        self._reschedule()
        if future is None:
            failed = self._take_send_error()
            if failed is not None:
                return Delivery(sent=False, error=_os_error_kind(failed))
            return Delivery(sent=True)
        return await future

    def _take_send_error(self) -> OSError | None:
        error, self.send_error = self.send_error, None
        return error

    def _notify_observers(self, payload: bytes) -> None:
        assert self.observers is not None  # noqa: S101 - checked by the caller
        for peer, datagram in self.observers.notifications(
            payload,
            next_message_id=self.client.next_message_id,
            content_format=self.adapter.content_format,
        ):
            self._send_to(datagram, peer)

    # -- outcomes and timers --

    def _deliver(self, events: list[ClientEvent], now: float) -> None:
        for event in events:
            if isinstance(event, ResponseEvent):
                entry = self.pending.pop(event.exchange_id, None)
                if entry is None:
                    continue
                future, started = entry
                code = event.response.code
                latency = now - started
                if code >> 5 == 2:
                    delivery = Delivery(
                        sent=True,
                        confirmed=True,
                        latency_s=latency,
                        retransmissions=event.retransmissions,
                    )
                else:
                    delivery = Delivery(
                        sent=True,
                        latency_s=latency,
                        error=f"coap {code_text(code)}",
                        retransmissions=event.retransmissions,
                    )
                if not future.done():
                    future.set_result(delivery)
            elif isinstance(event, FailedEvent):
                entry = self.pending.pop(event.exchange_id, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(
                        Delivery(
                            sent=True, error=event.reason, retransmissions=event.retransmissions
                        )
                    )

    def _reschedule(self) -> None:
        deadline = self.client.next_deadline_s()
        if deadline is None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            return
        if self.timer is not None:
            if self.timer_at == deadline:
                return
            self.timer.cancel()
        self.timer_at = deadline
        self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        # The loop may run a timer up to its clock resolution early: the deadline has
        # come by definition.
        now = max(self.loop.time(), self.timer_at)
        events = self.client.handle_timeouts(now)
        self._flush()
        self._deliver(events, now)
        self._reschedule()

    def fail_pending(self, reason: str) -> None:
        self.client.cancel_all()
        pending, self.pending = self.pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_result(Delivery(sent=True, error=reason))
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- the device's own resources --

    def _serve(self, request: CoAPMessage, addr: Address) -> None:
        now = self.loop.time()
        if request.type is MessageType.CON:
            if self.recent is None:
                self.recent = RecentResponses[Address]()
            cached = self.recent.get(addr, request.message_id, now)
            if cached is not None:
                self._send_to(cached, addr)  # a duplicate (section 4.5): same answer
                return
        code, payload, options = self._resource(request, addr)
        response = response_to(
            request,
            code,
            message_id=self.client.next_message_id(),
            payload=payload,
            options=options,
        )
        datagram = encode(response)
        if request.type is MessageType.CON and self.recent is not None:
            self.recent.put(addr, request.message_id, datagram, now)
        self._send_to(datagram, addr)

    def _resource(self, request: CoAPMessage, addr: Address) -> tuple[int, bytes, list[Option]]:
        for number, _ in request.options:
            if is_critical(number) and number not in _KNOWN_REQUEST_OPTIONS:
                # Section 5.4.1: an unknown critical option in a request is a 4.02.
                return Code.BAD_OPTION, f"option {number} not supported".encode(), []
        path = request.uri_path
        method = request.code
        content_format = self.adapter.content_format
        if path == ("state",):
            if method != Code.GET:
                return Code.METHOD_NOT_ALLOWED, b"", []
            options: list[Option] = []
            observe = request.observe
            if observe == 0:  # RFC 7641 section 3.1: register
                if self.observers is None:
                    self.observers = ObserverRegistry[Address]()
                sequence = self.observers.register(addr, request.token)
                options.append((int(OptionNumber.OBSERVE), encode_uint(sequence)))
            elif observe == 1 and self.observers is not None:  # section 3.6: deregister
                self.observers.deregister(addr, request.token)
            if content_format is not None:
                options.append((int(OptionNumber.CONTENT_FORMAT), encode_uint(content_format)))
            return Code.CONTENT, self.state, options
        if len(path) == 2 and path[0] == "commands" and path[1]:
            if method != Code.PUT:
                return Code.METHOD_NOT_ALLOWED, b"", []
            on_command = self.adapter.on_command
            if on_command is None:
                return Code.NOT_IMPLEMENTED, b"this run handles no commands", []
            try:
                on_command(self.device.device_id, Command(path[1], request.payload))
            except Exception:  # noqa: BLE001 - a handler's failure is the device's 5.00
                return Code.INTERNAL_SERVER_ERROR, b"", []
            return Code.CHANGED, b"", []
        if path == (".well-known", "core"):
            if method != Code.GET:
                return Code.METHOD_NOT_ALLOWED, b"", []
            return (
                Code.CONTENT,
                _WELL_KNOWN_CORE,
                [(int(OptionNumber.CONTENT_FORMAT), encode_uint(40))],
            )
        return Code.NOT_FOUND, b"", []

    # -- closing --

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.adapter.links.discard(self)
        self.fail_pending("not confirmed: link closed")
        if self.dtls is not None:
            self.dtls.close()
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()


@functools.lru_cache(maxsize=1 << 15)
def _route(base_path: tuple[str, ...], topic: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A topic's Uri-Path segments under the endpoint's path, and its query arguments
    (``devices/d1/telemetry?mode=fast``); a device sends to the same few topics."""
    path, _, query = topic.partition("?")
    return (*base_path, *path.split("/")), tuple(a for a in query.split("&") if a)


def _os_error_kind(exc: OSError) -> str:
    if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
        return "not sent: socket buffer full"
    return f"not sent: {exc.strerror or type(exc).__name__}"


class CoAPAdapter:
    """See the module docstring."""

    schemes: ClassVar[tuple[str, ...]] = ("coap", "coaps")

    def __init__(self, endpoint: BrokerEndpoint, settings: AdapterSettings) -> None:
        options: dict[str, Any] = dict(settings.options)
        # One generator for the worker's devices: first timeouts, message ids, tokens.
        self._random = random.Random()  # noqa: S311 - protocol jitter, not secrets
        method = str(options.get("method", "POST")).upper()
        if method not in METHODS:
            raise AdapterError(
                f"CoAP method {method!r}: devices send with one of {', '.join(METHODS)}",
                kind="configuration",
            )
        self.method = METHODS[method]
        self.content_format = _content_format(
            options.get("content_format", int(ContentFormat.JSON))
        )
        self.block_size_bytes = int(_option_float(options, "block_size", DEFAULT_BLOCK_SIZE_BYTES))
        self.ack_timeout_s = _option_float(options, "ack_timeout_s", ACK_TIMEOUT_S)
        self.ack_random_factor = _option_float(options, "ack_random_factor", ACK_RANDOM_FACTOR)
        self.max_retransmit = int(_option_float(options, "max_retransmit", MAX_RETRANSMIT))
        self.nstart = int(_option_float(options, "nstart", NSTART))
        self.separate_timeout_s = settings.timeout_s
        try:  # the parameters are checked once here, not at every device
            self.new_client()
        except ValueError as exc:
            raise AdapterError(f"CoAP options: {exc}", kind="configuration") from exc
        sources = options.get("source_addresses") or ()
        if isinstance(sources, str):
            sources = [s.strip() for s in sources.split(",") if s.strip()]
        self.source_addresses = [str(s) for s in sources]
        self.dtls = endpoint.scheme == "coaps" or endpoint.tls
        self.psk_identity = options.get("psk_identity")
        self.psk = options.get("psk")
        self.endpoint = endpoint
        self.base_path = tuple(segment for segment in endpoint.path.split("/") if segment)
        self.on_command = settings.on_command
        self.server_address: Address = ()
        self.family = socket.AF_INET
        self.links: set[_CoAPLink] = set()

    def new_client(self) -> CoAPClient:
        return CoAPClient(
            random=self._random.random,
            block_size_bytes=self.block_size_bytes,
            ack_timeout_s=self.ack_timeout_s,
            ack_random_factor=self.ack_random_factor,
            max_retransmit=self.max_retransmit,
            nstart=self.nstart,
            separate_timeout_s=self.separate_timeout_s,
        )

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        host, port = self.endpoint.host, self.endpoint.port
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise AdapterError(f"CoAP server {host}: {exc}", kind="unreachable") from exc
        family, _, _, _, address = infos[0]
        self.family = family
        # Compare with what recvfrom reports: (host, port) for IPv4, 4 fields for IPv6.
        self.server_address = tuple(address)
        if not self.source_addresses:
            loopback = ipaddress.ip_address(address[0]).is_loopback
            if family == socket.AF_INET6:
                self.source_addresses = ["::1" if loopback else "::"]
            else:
                self.source_addresses = ["127.0.0.1" if loopback else "0.0.0.0"]  # noqa: S104
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for link in list(self.links):
            await link.aclose()

    async def connect(self, device: DeviceIdentity) -> _CoAPLink:
        loop = asyncio.get_running_loop()
        link = _CoAPLink(self, device)
        source = self.source_addresses[device.index % len(self.source_addresses)]
        try:
            if self.dtls:
                # A DTLS session has one peer: the socket is connected to the server.
                await loop.create_datagram_endpoint(
                    lambda: link,
                    local_addr=(source, 0),
                    remote_addr=self.server_address[:2],
                    family=self.family,
                )
            else:
                # Not connected: the device answers requests from any address.
                await loop.create_datagram_endpoint(
                    lambda: link, local_addr=(source, 0), family=self.family
                )
        except OSError as exc:
            kind = (
                "too many open files"
                if exc.errno in (errno.EMFILE, errno.ENFILE)
                else "unreachable"
            )
            raise AdapterError(
                f"{device.device_id}: UDP socket on {source}: {exc}", kind=kind
            ) from exc
        self.links.add(link)
        if self.dtls:
            try:
                await self._handshake(link, device)
            except BaseException:
                await link.aclose()
                raise
        return link

    async def _handshake(self, link: _CoAPLink, device: DeviceIdentity) -> None:
        values = {"device_id": device.device_id, "index": device.index}
        try:
            identity = (
                str(self.psk_identity).format(**values)
                if self.psk_identity is not None
                else device.username
            )
            key = str(self.psk).format(**values) if self.psk is not None else device.password
        except (KeyError, IndexError, ValueError) as exc:
            raise AdapterError(f"CoAP psk template: {exc}", kind="configuration") from exc
        if not identity or not key:
            raise AdapterError(
                "coaps:// needs a pre-shared key: the psk_identity and psk options, or the "
                "devices' user names and passwords",
                kind="configuration",
            )
        session = _DTLSSession(link, identity.encode(), key.encode())
        link.dtls = session
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.separate_timeout_s
        while not session.connected.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AdapterError(
                    f"{device.device_id}: no DTLS handshake within {self.separate_timeout_s:g} s",
                    kind="timeout",
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.shield(session.connected), min(remaining, _DTLS_HANDSHAKE_POLL_S)
                )
            if link.send_error is not None and link.send_error.errno == errno.ECONNREFUSED:
                raise AdapterError(
                    f"{device.device_id}: nothing listens on {self.endpoint}", kind="unreachable"
                )
            session.poll_handshake()
        session.connected.result()  # raises the server's fatal alert
