"""MQTT over WebSockets: the asyncio shell around the sans-I/O WebSocket client.

:func:`create_websocket_connection` does what :meth:`asyncio.loop.create_connection
<asyncio.loop.create_connection>` does, with a WebSocket in between: it opens TCP (TLS
when given a context), performs the HTTP Upgrade, and only then builds the caller's
protocol and calls its ``connection_made`` with a transport that frames what it writes::

    transport, connection = await create_websocket_connection(
        lambda: MQTTConnection(session), "broker.example", 443, path="/mqtt", ssl=context
    )

The protocol sees a byte stream, as over TCP: ``data_received`` gets the payloads of the
server's binary frames, whatever their boundaries, and every ``write()`` becomes one
binary frame. :class:`~iotix.adapters.mqtt.MQTTConnection` already coalesces its writes
per event-loop iteration, so one frame per write costs one frame header per batch.

A failed Upgrade (a refusal such as 404, a wrong ``Sec-WebSocket-Accept``, a port that
is not a WebSocket server and hangs up or answers something else, no answer in time)
raises :class:`WebSocketConnectError`, which is a :class:`ConnectionError` and so an
:class:`OSError`: whoever maps socket errors to "cannot connect" maps it too. Socket
and TLS errors from opening the connection propagate unchanged, as from
``create_connection``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, TypeVar, cast

from iotix.adapters.net import create_stream
from iotix.errors import IotixError
from iotix.protocols.websocket import (
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    CloseReceivedEvent,
    DataReceivedEvent,
    HandshakeCompletedEvent,
    WebSocketClient,
    WebSocketError,
    WebSocketHandshakeError,
    WebSocketState,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from ssl import SSLContext

__all__ = ["WebSocketConnectError", "create_websocket_connection"]

logger = logging.getLogger(__name__)

# Close codes that say nothing went wrong: the inner protocol is told of a plain close.
_ORDINARY_CLOSES = frozenset({CLOSE_NORMAL, CLOSE_NO_STATUS})

_ProtocolT = TypeVar("_ProtocolT", bound=asyncio.Protocol)


class WebSocketConnectError(IotixError, ConnectionError):
    """The WebSocket could not be opened: the server refused or botched the Upgrade,
    hung up before answering it, or did not answer within the timeout.

    ``status_code`` is the server's HTTP status when it sent one (404 for a wrong path),
    None otherwise. The message does not repeat the host and port, which the caller
    knows (``open_connection`` says "cannot connect to HOST:PORT: ..."). The cause (a
    :class:`~iotix.protocols.websocket.WebSocketError`, a socket error or a
    :class:`TimeoutError`) is chained. Being a :class:`ConnectionError`, it is caught by
    ``except OSError``.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class _WebSocketTransport(asyncio.Transport):
    """What the inner protocol writes to: one binary frame per ``write()``."""

    def __init__(self, shell: _WebSocketProtocol, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._websocket_extra = {
            "websocket_path": shell.codec.path,
            "websocket_subprotocol": shell.codec.subprotocol,
        }
        self._shell = shell
        self._protocol = protocol
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        # After close() or abort() writes are dropped, as asyncio's transports drop
        # writes to a lost connection: no data frame may follow a close frame.
        if data and not self.is_closing():
            self._shell.send(bytes(data))

    @property
    def closed_by_protocol(self) -> bool:
        """Whether the inner protocol called :meth:`close` or :meth:`abort`."""
        return self._closing

    def close(self) -> None:
        """Send a close frame (1000); TCP closes once the server answers it."""
        if not self._closing:
            self._closing = True
            self._shell.close_websocket()

    def abort(self) -> None:
        """Drop the TCP connection at once, with no close frame."""
        self._closing = True
        self._shell.tcp.abort()

    def is_closing(self) -> bool:
        # Also once the server's close frame has arrived, even before TCP is closed: a
        # write in reply to data that came just before it must be dropped, not framed.
        return (
            self._closing
            or self._shell.codec.state is not WebSocketState.OPEN
            or self._shell.tcp.is_closing()
        )

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``websocket_path`` and ``websocket_subprotocol``, or the TCP transport's
        (``peername``, ``sockname``, ``socket``, ``ssl_object``, ...)."""
        if name in self._websocket_extra:
            return self._websocket_extra[name]
        return self._shell.tcp.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = cast("asyncio.Protocol", protocol)  # a stream protocol, as here
        self._shell.inner = self._protocol

    def get_protocol(self) -> asyncio.Protocol:
        return self._protocol

    def can_write_eof(self) -> bool:
        return False  # a WebSocket has no half-close: the close frame ends both ways

    def is_reading(self) -> bool:
        return self._shell.tcp.is_reading()

    def pause_reading(self) -> None:
        self._shell.tcp.pause_reading()

    def resume_reading(self) -> None:
        self._shell.tcp.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._shell.tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._shell.tcp.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._shell.tcp.get_write_buffer_limits()


class _WebSocketProtocol(asyncio.Protocol):
    """The protocol on the TCP (or TLS) transport: runs the codec, feeds the inner one."""

    def __init__(
        self,
        codec: WebSocketClient,
        protocol_factory: Callable[[], asyncio.Protocol],
        opened: asyncio.Future[tuple[_WebSocketTransport, asyncio.Protocol]],
        *,
        close_timeout_s: float,
    ) -> None:
        self.codec = codec
        self._close_timeout_s = close_timeout_s
        self._close_timer: asyncio.TimerHandle | None = None
        self._protocol_factory = protocol_factory
        self._opened = opened
        self.tcp: asyncio.Transport = cast("asyncio.Transport", None)
        self.inner: asyncio.Protocol | None = None
        self._shim: _WebSocketTransport | None = None
        # What the inner protocol's connection_lost is told, when it is not the socket's
        # own error: a protocol error of the server's, or its unusual close code.
        self._lost_reason: Exception | None = None
        self._lost_forwarded = False

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (TCP or TLS); uvloop's does not subclass asyncio.Transport.
        self.tcp = cast("asyncio.Transport", transport)
        self.tcp.write(self.codec.data_to_send())  # the Upgrade request

    def data_received(self, data: bytes) -> None:
        try:
            events = self.codec.receive_data(data)
        except WebSocketError as exc:
            if not self._opened.done():
                # A refused Upgrade, or a bad frame in the same read as the 101 answer:
                # the caller is still waiting, and gets the error.
                self._refused(exc)
                return
            logger.debug("WebSocket protocol error from the server: %s", exc)
            self._lost_reason = exc
            self._write_pending()  # the close frame saying why
            self.tcp.close()
            return
        for event in events:
            if self._shim is not None and self._shim.closed_by_protocol:
                break  # the inner protocol closed: like a closed socket, it reads no more
            if isinstance(event, DataReceivedEvent):
                cast("asyncio.Protocol", self.inner).data_received(event.data)
            elif isinstance(event, HandshakeCompletedEvent):
                self._open()
            elif isinstance(event, CloseReceivedEvent) and event.code not in _ORDINARY_CLOSES:
                reason = f": {event.reason}" if event.reason else ""
                self._lost_reason = WebSocketError(
                    f"the server closed the WebSocket with code {event.code}{reason}",
                    reason_code=event.code,
                )
        self._write_pending()  # pongs, and the reply to a close
        if self.codec.state is WebSocketState.CLOSED:
            self.tcp.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport: the WebSocket has no half-close

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        try:
            self.codec.connection_lost()
        except WebSocketHandshakeError as refused:
            if exc is not None:
                refused.__cause__ = exc
            self._refused(refused)
        if self.inner is not None and not self._lost_forwarded:
            self._lost_forwarded = True
            self.inner.connection_lost(self._lost_reason or exc)
        if not self._opened.done():  # the inner protocol's connection_made raised
            self._opened.set_exception(ConnectionResetError("the connection was lost"))

    # --- for the transport shim -------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.codec.send(data)
        self.tcp.write(self.codec.data_to_send())

    def close_websocket(self) -> None:
        """Send our close frame, then wait for the server's before closing TCP (RFC 6455
        section 7.1.2: closing at once would make a TLS server's reply arrive after our
        close_notify, an error); a server that does not reply in time is cut off."""
        self.codec.close(CLOSE_NORMAL)
        self._write_pending()
        if self.codec.state is WebSocketState.CLOSED:
            self.tcp.close()
        elif self._close_timer is None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(self._close_timeout_s, self.tcp.abort)

    # --- internals ------------------------------------------------------------------

    def _open(self) -> None:
        inner = self.inner = self._protocol_factory()
        shim = self._shim = _WebSocketTransport(self, inner)
        inner.connection_made(shim)
        if not self._opened.done():
            self._opened.set_result((shim, inner))

    def _refused(self, exc: WebSocketError) -> None:
        if not self._opened.done():
            self._opened.set_exception(exc)
        self.tcp.abort()

    def _write_pending(self) -> None:
        data = self.codec.data_to_send()
        if data and not self.tcp.is_closing():
            self.tcp.write(data)


async def create_websocket_connection(
    protocol_factory: Callable[[], _ProtocolT],
    host: str,
    port: int,
    *,
    path: str = "/mqtt",
    ssl: SSLContext | None = None,
    server_hostname: str | None = None,
    local_address: str | None = None,
    timeout_s: float = 10.0,
    close_timeout_s: float = 5.0,
) -> tuple[asyncio.Transport, _ProtocolT]:
    """Open a WebSocket to ``ws://host:port/path`` (``wss://`` with *ssl*) and connect
    *protocol_factory*'s protocol to it; return ``(transport, protocol)`` as
    :meth:`asyncio.loop.create_connection` does.

    The protocol is built, and its ``connection_made`` called, once the server has
    accepted the Upgrade (subprotocol ``mqtt``). *server_hostname* is the TLS server
    name (only with *ssl*) and the ``Host`` header (*host* otherwise). *timeout_s*
    bounds the TCP connection, the TLS handshake and the Upgrade together.
    *local_address* is the source address (bound as :func:`~iotix.adapters.net.create_stream`
    does).
    ``transport.close()`` sends a close frame and closes TCP once the server has
    answered it, or after *close_timeout_s*.

    Raises :class:`WebSocketConnectError` for a refused or broken Upgrade (or a server
    that breaks the protocol in the same read as its 101 answer) and for a timeout;
    socket and TLS errors (:class:`OSError`, :class:`ssl.SSLError`) as
    ``create_connection`` raises them; :class:`ValueError` for a *path* that is not
    ``/`` followed by printable ASCII. Cancelled, it leaves no socket open.
    """
    loop = asyncio.get_running_loop()
    codec = WebSocketClient(
        server_hostname or host, path, port=port, secure=ssl is not None, subprotocol="mqtt"
    )
    opened: asyncio.Future[tuple[_WebSocketTransport, asyncio.Protocol]]
    opened = loop.create_future()
    tcp: asyncio.Transport | None = None
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            stream, _ = await create_stream(
                lambda: _WebSocketProtocol(
                    codec, protocol_factory, opened, close_timeout_s=close_timeout_s
                ),
                host,
                port,
                ssl=ssl,
                server_hostname=server_hostname,
                local_address=local_address,
            )
            tcp = cast("asyncio.Transport", stream)
            transport, protocol = await opened
    except WebSocketError as exc:
        status = exc.status_code if isinstance(exc, WebSocketHandshakeError) else None
        raise WebSocketConnectError(str(exc), status_code=status) from exc
    except TimeoutError as exc:
        if not deadline.expired():
            raise  # the socket's own timeout (ETIMEDOUT), an OSError like any other
        opened.cancel()  # a late answer finds nobody waiting: drop it quietly
        if tcp is not None:
            tcp.abort()
        step = "no answer to the WebSocket upgrade" if tcp is not None else "no connection"
        raise WebSocketConnectError(f"{step} within {timeout_s:g} s") from exc
    except BaseException:
        opened.cancel()
        if tcp is not None:
            tcp.abort()  # cancelled, or the inner protocol failed: leave no socket open
        raise
    return cast("asyncio.Transport", transport), cast("_ProtocolT", protocol)
