"""MQTT over TCP (optionally TLS) on asyncio protocols: the shell around the session.

:class:`MQTTConnection` owns one socket and one :class:`MQTTClientSession`. Writes are
coalesced: every verb queues bytes in the session, and one flush per event-loop
iteration hands them to the transport, so a burst of publishes costs one system call
(DESIGN.md: one ``write()`` per message caps a core near 140K messages/s).

Keepalive runs on a timer per connection here; the engine's workers drive many
connections from one timer wheel instead, through the same ``tick`` method.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any, cast

from iotix.adapters.net import create_stream
from iotix.adapters.websocket import create_websocket_connection
from iotix.errors import IotixError, MQTTProtocolError
from iotix.protocols.mqtt.packets import ProtocolVersion
from iotix.protocols.mqtt.session import (
    ConnectedEvent,
    ConnectionRefusedEvent,
    DisconnectedEvent,
    MQTTClientSession,
    PublishAckedEvent,
    SessionSettings,
    SessionState,
    SubscribedEvent,
    UnexpectedAckError,
    reason_name,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from iotix.protocols.mqtt.packets import Property, Subscription
    from iotix.protocols.mqtt.session import Event

logger = logging.getLogger(__name__)


EARLY_ACKS = 1024
"""Acknowledgements a connection without ``on_event`` keeps for a later wait_acked."""

BROKER_CLOSED = "broker closed the connection"
"""The :attr:`MQTTConnection.close_reason` of a connection the broker closed (no
DISCONNECT, no socket error)."""
CLOSED_BEFORE_CONNACK = "closed before CONNACK"
"""The :attr:`MQTTConnectError.kind` of a connection the broker closed before its
CONNACK: the TCP (or WebSocket) connection was made, so nothing was unreachable."""


class MQTTConnectError(IotixError):
    """A connection could not be made: refused by the server (``reason_code``), or the
    socket failed (``reason_code`` None, the cause chained); also what waiters get when
    an open connection is lost.

    ``kind`` is what a worker counts a failed attempt under: the refusal's reason in
    words (``not authorized``, ``unsupported protocol version``), ``closed before
    CONNACK``, a bad packet instead of the CONNACK (``malformed packet``), or
    ``unreachable`` (the default: no connection, a socket or TLS error, no CONNACK in
    time)."""

    def __init__(
        self, message: str, *, reason_code: int | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        if kind is None:
            kind = reason_name(reason_code) if reason_code is not None else "unreachable"
        self.kind = kind


class MQTTConnection(asyncio.Protocol):
    """One MQTT client connection. Build it with :func:`open_connection`.

    With ``keepalive_timer`` (the default) it keeps itself alive on a timer of its own;
    without, its owner calls :meth:`keepalive` when it says (a worker drives thousands
    of connections from one wheel instead of a timer each).
    """

    __slots__ = (
        "_close_callbacks",
        "_closed",
        "_connected",
        "_early",
        "_flush_scheduled",
        "_loop",
        "_on_event",
        "_own_timer",
        "_timer",
        "_transport",
        "_waiters",
        "close_reason",
        "closed",
        "session",
        "writable",
    )

    def __init__(
        self,
        session: MQTTClientSession,
        *,
        on_event: Callable[[Event], None] | None = None,
        keepalive_timer: bool = True,
    ) -> None:
        self.session = session
        self._own_timer = keepalive_timer
        self._on_event = on_event
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._connected: asyncio.Future[ConnectedEvent] | None = self._loop.create_future()
        """Until open_connection has seen the CONNACK; then dropped (it was 144 bytes)."""
        # Made when first needed: a simulator holds 100,000 connections that mostly
        # never wait for an ack or for their close.
        self._closed: asyncio.Future[None] | None = None
        self._close_callbacks: list[Callable[[], None]] | None = None
        self._waiters: dict[int, asyncio.Future[Any]] | None = None
        # Acknowledgements nobody waited for yet, for a later wait_acked (only without
        # an on_event callback, which sees every event anyway); the latest few only.
        self._early: dict[int, Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        """True once the transport has closed, for whatever reason (an attribute, not a
        property: the engine reads it for every message it sends)."""
        self.close_reason: str | None = None
        """Why the connection ended, in words fit for counting (no ids, no addresses):
        ``broker closed the connection``, ``connection lost`` (a socket error), ``keep
        alive timeout``, the reason of the server's DISCONNECT, or the broker's bad
        packet (``malformed packet``, ``PUBACK for a QoS 2 message``, ...); "" when its
        owner closed it (:meth:`disconnect`, :meth:`drop`, :meth:`abort`); None while
        it is open."""
        self.writable = True
        """False while the transport's buffer is above its high-water mark (the peer
        reads slower than we write) and once closed: a sender that respects it never
        buffers without bound."""

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (TCP or TLS); uvloop's does not subclass asyncio.Transport.
        self._transport = cast("asyncio.Transport", transport)
        self.session.connect()
        self._flush()
        if self._own_timer:
            self._arm_keepalive()

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = not self.closed

    def data_received(self, data: bytes) -> None:
        try:
            events = self.session.receive_data(data)
        except MQTTProtocolError as exc:
            logger.debug("protocol error from the server: %s", exc)
            self._fail(exc.kind if isinstance(exc, UnexpectedAckError) else _code_name(exc))
            return
        for event in events:
            self._dispatch(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable = False
        if self.close_reason is None:
            self.close_reason = BROKER_CLOSED if exc is None else "connection lost"
        if self._timer is not None:
            self._timer.cancel()
        connecting = self.session.state is SessionState.CONNECTING
        for event in self.session.connection_lost():
            self._dispatch(event)
        error = MQTTConnectError(_lost_reason(exc, self.close_reason))
        error.__cause__ = exc
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(self._connect_error(exc) if connecting else error)
        if self._waiters:
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(error)
            self._waiters = None
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        callbacks, self._close_callbacks = self._close_callbacks, None
        for callback in callbacks or ():
            callback()

    # --- verbs ----------------------------------------------------------------------

    def publish(
        self,
        topic: str | bytes,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        properties: Mapping[Property, Any] | None = None,
    ) -> int | None:
        """Queue a message (written at the end of this loop iteration); QoS 1 and 2
        return the packet id that :meth:`wait_acked` takes."""
        packet_id = self.session.publish(
            topic, payload, qos=qos, retain=retain, properties=properties or {}
        )
        self._schedule_flush()
        return packet_id

    def publish_encoded(self, packets: bytes) -> bool:
        """Write QoS 0 PUBLISH packets encoded by the caller now, with anything the
        session has queued; False (nothing written) when the connection is closing."""
        transport = self._transport
        if self.closed or transport is None or transport.is_closing():
            return False
        session = self.session
        if session.state is not SessionState.CONNECTED:
            return False
        now = self._loop.time()
        queued = session.data_to_send(now)  # acks, a PINGREQ: they go first
        transport.write(queued + packets if queued else packets)
        session.publish_encoded_written(now)
        return True

    async def wait_acked(self, packet_id: int) -> PublishAckedEvent:
        """Wait for the acknowledgement of a QoS 1 or 2 message (one that came before
        this call is returned at once, among the latest :data:`EARLY_ACKS` ones)."""
        early = None if self._early is None else self._early.pop(packet_id, None)
        if early is not None:
            acked: PublishAckedEvent = early
            return acked
        waiter = self._waiter(packet_id)
        result: PublishAckedEvent = await waiter
        return result

    async def subscribe(self, subscriptions: Iterable[Subscription]) -> SubscribedEvent:
        packet_id = self.session.subscribe(subscriptions)
        waiter = self._waiter(packet_id)
        self._schedule_flush()
        result: SubscribedEvent = await waiter
        return result

    async def disconnect(self) -> None:
        """Send DISCONNECT, then close once it is written."""
        self._closing()
        self.session.disconnect()
        self._flush()
        if self._transport is not None:
            self._transport.close()
        await self.wait_closed()

    def drop(self) -> None:
        """Close the socket without DISCONNECT once what is queued is written: to the
        broker the client vanished (a reboot, a power cut), so it sends the will."""
        self._closing()
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once (no DISCONNECT: the will message is sent)."""
        self._closing()
        if self._transport is not None:
            self._transport.abort()

    def _closing(self) -> None:
        """The owner closes the connection: no reason to count, unless one came first."""
        if self.close_reason is None:
            self.close_reason = ""

    def _fail(self, reason: str) -> None:
        """Drop the connection because of the broker (a bad packet, no PINGRESP)."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._transport is not None:
            self._transport.abort()

    def _connect_error(self, exc: Exception | None) -> MQTTConnectError:
        """What ``open_connection`` raises when the connection ends before its CONNACK."""
        reason = self.close_reason
        if exc is None and reason == BROKER_CLOSED:
            message = "the broker closed the connection before its CONNACK"
            if self.session.settings.version is ProtocolVersion.V5:
                message += " (a broker without MQTT 5 may do this to a 5.0 CONNECT)"
            error = MQTTConnectError(message, kind=CLOSED_BEFORE_CONNACK)
        elif exc is None and reason:  # a bad packet instead of the CONNACK
            error = MQTTConnectError(f"connection closed: {reason}", kind=reason)
        else:
            error = MQTTConnectError(_lost_reason(exc, reason))
        error.__cause__ = exc
        return error

    def _waiter(self, packet_id: int) -> asyncio.Future[Any]:
        if self._waiters is None:
            self._waiters = {}
        return self._waiters.setdefault(packet_id, self._loop.create_future())

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the connection closes (from ``connection_lost``), or
        soon if it has closed already."""
        if self.closed:
            self._loop.call_soon(callback)
        elif self._close_callbacks is None:
            self._close_callbacks = [callback]
        else:
            self._close_callbacks.append(callback)

    async def wait_closed(self) -> None:
        # Shielded: a waiter that is cancelled must not mark the connection closed.
        if self.closed:
            return
        if self._closed is None:
            self._closed = self._loop.create_future()
        await asyncio.shield(self._closed)

    # --- internals ------------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        connecting = self._connected is not None and not self._connected.done()
        if isinstance(event, ConnectedEvent) and connecting:
            assert self._connected is not None  # noqa: S101 - for the type checker
            self._connected.set_result(event)
        elif isinstance(event, ConnectionRefusedEvent) and connecting:
            assert self._connected is not None  # noqa: S101
            self._connected.set_exception(
                MQTTConnectError(
                    f"connection refused: {event.reason}", reason_code=event.reason_code
                )
            )
        elif isinstance(event, PublishAckedEvent | SubscribedEvent):
            waiter = None if self._waiters is None else self._waiters.pop(event.packet_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event)
            elif waiter is None and self._on_event is None and type(event) is PublishAckedEvent:
                if self._early is None:
                    self._early = {}
                self._early[event.packet_id] = event
                if len(self._early) > EARLY_ACKS:
                    del self._early[next(iter(self._early))]
        elif isinstance(event, DisconnectedEvent) and event.reason_code == 0x8D:
            self._fail(reason_name(0x8D))  # keepalive expired: the session gave up
        elif isinstance(event, DisconnectedEvent) and event.by_server and self.close_reason is None:
            # The server's DISCONNECT says why; it closes the socket next.
            code = event.reason_code
            self.close_reason = reason_name(code) if code >= 0x80 else BROKER_CLOSED
        if self._on_event is not None:
            self._on_event(event)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.session.data_to_send(self._loop.time())
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def keepalive(self, now_s: float) -> float | None:
        """Keep the connection alive at ``now_s`` (the loop's time): PINGREQ when it is
        due, give up when no PINGRESP came. Returns when to call again, or None once
        there is nothing to keep alive (closed, or keepalive 0)."""
        session = self.session
        if self.closed or session.settings.keepalive_s == 0:
            return None
        for event in session.tick(now_s):
            self._dispatch(event)
        self._flush()
        if session.state is SessionState.DISCONNECTED:
            return None
        return session.next_tick_s()

    def _arm_keepalive(self) -> None:
        at = self.keepalive(self._loop.time())
        if at is not None:
            delay = max(at - self._loop.time(), 0.05)
            self._timer = self._loop.call_later(delay, self._arm_keepalive)


def _code_name(error: MQTTProtocolError) -> str:
    return reason_name(error.reason_code if error.reason_code is not None else 0x81)


def _lost_reason(exc: Exception | None, close_reason: str | None = None) -> str:
    """Why a connection closed, in words; TLS refusals by the broker made readable."""
    if exc is None:
        if close_reason == BROKER_CLOSED:
            return "connection closed by the broker"
        return f"connection closed: {close_reason}" if close_reason else "connection closed"
    text = str(exc)
    if "CERTIFICATE_REQUIRED" in text or "HANDSHAKE_FAILURE" in text:
        return "the broker refused the TLS handshake: it requires a client certificate"
    if "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text:
        return "the broker refused the TLS handshake: it does not trust the client certificate"
    return f"connection lost: {text}"


async def open_connection(
    host: str,
    port: int,
    settings: SessionSettings,
    *,
    on_event: Callable[[Event], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    local_address: str | None = None,
    timeout_s: float = 10.0,
    session: MQTTClientSession | None = None,
    server_hostname: str | None = None,
    websocket_path: str | None = None,
    keepalive_timer: bool = True,
) -> MQTTConnection:
    """Connect and wait for the CONNACK. Raises :class:`MQTTConnectError` with the
    server's reason when it refuses, or with the socket error chained.

    With ``websocket_path``, MQTT goes over a WebSocket at that path (``wss://`` when
    ``ssl_context`` is given).

    Pass the ``session`` of a lost connection to reconnect it: with ``clean_start``
    off, its unacknowledged messages are sent again."""
    session = session or MQTTClientSession(settings)
    connection: MQTTConnection | None = None

    def protocol() -> MQTTConnection:
        return MQTTConnection(session, on_event=on_event, keepalive_timer=keepalive_timer)

    try:
        async with asyncio.timeout(timeout_s):
            if websocket_path is not None:
                _, connection = await create_websocket_connection(
                    protocol,
                    host,
                    port,
                    path=websocket_path,
                    ssl=ssl_context,
                    server_hostname=server_hostname,
                    local_address=local_address,
                    # Ours fires first otherwise, and would blame the CONNACK.
                    timeout_s=timeout_s * 0.9,
                )
            else:
                _, connection = await create_stream(
                    protocol,
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=server_hostname,
                    local_address=local_address,
                )
            connected = connection._connected  # noqa: SLF001 - the factory's own future
            assert connected is not None  # noqa: S101 - set in __init__
            await connected
            connection._connected = None  # noqa: SLF001
    except (MQTTConnectError, asyncio.CancelledError):
        # Refused, or the caller gave up (a run that stops while devices connect):
        # never leave a half-open socket behind.
        if connection is not None:
            connection.abort()
        raise
    except TimeoutError as exc:
        if connection is not None:
            connection.abort()
        raise MQTTConnectError(f"no CONNACK from {host}:{port} within {timeout_s:g} s") from exc
    except ssl.SSLCertVerificationError as exc:
        raise MQTTConnectError(
            f"TLS: certificate verification of the server {host}:{port} failed: "
            f"{exc.verify_message} (check the CA file, or the server name)"
        ) from exc
    except OSError as exc:
        raise MQTTConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    return connection


__all__ = [
    "BROKER_CLOSED",
    "CLOSED_BEFORE_CONNACK",
    "MQTTConnectError",
    "MQTTConnection",
    "open_connection",
    "reason_name",
]
