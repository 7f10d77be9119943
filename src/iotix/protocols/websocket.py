"""The client side of WebSocket (RFC 6455) as a state machine with no I/O, for MQTT.

MQTT over WebSockets (MQTT 5.0 section 6, MQTT 3.1.1 section 6) carries the MQTT byte
stream in binary frames of the ``mqtt`` subprotocol; frame boundaries mean nothing to
MQTT. So this codec is a byte-stream adapter: what MQTT writes goes out in binary frames
(:meth:`WebSocketClient.send`, one frame per call), and what the server's data frames
carry comes back as :class:`DataReceivedEvent` bytes, fragments and frame boundaries
erased. Data is handed on as soon as it arrives, even from a frame that is not complete
yet, so a large frame is never buffered whole.

Feed it what the socket received (``receive_data``) and send what it has queued
(``data_to_send``), as with :class:`iotix.protocols.mqtt.session.MQTTClientSession`. The
Upgrade request is queued when the client is made. Pings are answered and a close from
the server is echoed by the codec itself: they appear in ``data_to_send``.

States::

    CONNECTING --101 Switching Protocols--> OPEN --close()--> CLOSING
         |                                   |                   |
         |  refused, bad answer, close()      |  close frame       |  close frame
         v                                   v  received          v  received
       CLOSED <------------------------------+-------------------+
         ^
         +---- any malformed input (the error is raised; a close frame is queued first
               when the WebSocket was open)

Every malformed input from the server raises :class:`WebSocketError` (a
:class:`~iotix.errors.ProtocolError`): :class:`WebSocketHandshakeError` for a refused or
broken Upgrade, :class:`WebSocketError` itself for broken frames; ``reason_code`` is the
WebSocket close code that fits (1002 protocol error, 1003 for a text frame, 1007 for a
close reason that is not UTF-8). Mistakes of the caller (a nonce of the wrong size, a
path with spaces, sending after close) raise :class:`ValueError` or
:class:`WebSocketError` as documented on each method.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from iotix.errors import ProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "CloseReceivedEvent",
    "DataReceivedEvent",
    "HandshakeCompletedEvent",
    "Opcode",
    "WebSocketClient",
    "WebSocketError",
    "WebSocketEvent",
    "WebSocketHandshakeError",
    "WebSocketState",
    "accept_key",
    "encode_frame",
    "mask_payload",
]

# RFC 6455 section 1.3: appended to the key before hashing, so that only a server that
# understood the Upgrade can compute Sec-WebSocket-Accept.
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOL: Final = "mqtt"  # MQTT-6.0.0-3 (offered) and MQTT-6.0.0-4 (chosen)

# Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_NO_STATUS: Final = 1005  # reported when a close frame carries no code; never sent
CLOSE_INVALID_DATA: Final = 1007

# A 101 answer is a few hundred bytes; a head larger than this is not a WebSocket server.
MAX_HANDSHAKE_BYTES: Final = 16 * 1024
# RFC 6455 section 5.5: control frames carry at most 125 bytes, so a close reason at most
# 123 (two bytes hold the code).
_MAX_CONTROL_PAYLOAD: Final = 125
_MAX_64BIT_LENGTH: Final = 2**63 - 1  # section 5.2: the most significant bit must be 0
# Masking switches from one big-integer XOR to numpy above this size; measured here
# (CPython 3.11): equal near 1 KiB, numpy 3.5x faster at 4 KiB and 35x at 64 KiB (8 us
# against 300 us), the integer XOR 3x faster below 256 bytes.
_NUMPY_MASK_BYTES: Final = 1024

# Frame header bits (RFC 6455 section 5.2).
_FIN: Final = 0x80
_RSV: Final = 0x70  # RSV1-3: must be 0 unless an extension says otherwise; we ask for none
_OPCODE: Final = 0x0F
_MASKED: Final = 0x80
_LENGTH: Final = 0x7F
_LENGTH_16: Final = 126
_LENGTH_64: Final = 127

_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: (.*))?")
# RFC 9110 section 5.1: a field name is a token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What a request target may hold here: printable ASCII without spaces (RFC 3986).
_PATH = re.compile(r"/[!-~]*")


class WebSocketError(ProtocolError):
    """The server broke the WebSocket protocol (a malformed frame, a text frame, a
    masked frame, ...), or the caller used the WebSocket in a state that forbids it.
    ``reason_code`` is the close code that fits (1002 protocol error by default)."""

    def __init__(self, message: str, *, reason_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message, reason_code=reason_code)


class WebSocketHandshakeError(WebSocketError):
    """The server refused the Upgrade or answered it wrongly.

    ``status_code`` and ``status_line`` hold the server's HTTP status when it sent one
    (``404`` and ``"HTTP/1.1 404 Not Found"`` for a wrong path), None otherwise.
    """

    def __init__(
        self, message: str, *, status_code: int | None = None, status_line: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.status_line = status_line


class Opcode(enum.IntEnum):
    """Frame opcodes (RFC 6455 section 5.2); 3-7 and 11-15 are reserved."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class WebSocketState(enum.Enum):
    CONNECTING = "connecting"  # Upgrade request queued or sent, no answer yet
    OPEN = "open"
    CLOSING = "closing"  # we sent a close frame and wait for the server's
    CLOSED = "closed"  # close frames exchanged, the Upgrade failed, or the server erred


# --- events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeCompletedEvent:
    """The server accepted the Upgrade; the WebSocket is open."""

    subprotocol: str
    headers: tuple[tuple[str, str], ...]  # the 101 answer's header fields, as sent


@dataclass(frozen=True, slots=True)
class DataReceivedEvent:
    """Bytes of the MQTT stream, from one or more binary or continuation frames."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CloseReceivedEvent:
    """The server closed the WebSocket. ``code`` is 1005 when its close frame carried
    no code. When the server started the close, a reply is queued in ``data_to_send``."""

    code: int
    reason: str


WebSocketEvent = HandshakeCompletedEvent | DataReceivedEvent | CloseReceivedEvent


# --- pure functions -----------------------------------------------------------------


def accept_key(key: str | bytes) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``Sec-WebSocket-Key`` *key*:
    base64(SHA-1(key + GUID)) (RFC 6455 section 4.2.2, item 5.4)."""
    raw = key.encode("ascii") if isinstance(key, str) else key
    # SHA-1 is what the RFC prescribes here: a handshake check, not a security measure.
    digest = hashlib.sha1(raw + _GUID, usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def mask_payload(payload: bytes, mask_key: bytes) -> bytes:
    """XOR *payload* with the 4-byte *mask_key* repeated (RFC 6455 section 5.3).

    Masking twice gives the payload back. The whole payload is XORed at once, in C: as
    one big integer for small payloads, as a numpy array for large ones (a batch of
    coalesced MQTT packets); a loop over bytes in Python costs over 100 ns a byte.
    """
    length = len(payload)
    if length == 0:
        return b""
    key = mask_key * (length // 4 + 1)
    if length > _NUMPY_MASK_BYTES:
        data = np.frombuffer(payload, dtype=np.uint8)
        return (data ^ np.frombuffer(key, dtype=np.uint8, count=length)).tobytes()
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key[:length], "little")
    return value.to_bytes(length, "little")


def encode_frame(
    payload: bytes,
    *,
    opcode: Opcode = Opcode.BINARY,
    fin: bool = True,
    mask_key: bytes | None = None,
    masked: bool = True,
) -> bytes:
    """One frame: the header with the shortest length encoding (7, 16 or 64 bits), then
    the payload, masked with *mask_key* (4 random bytes from :func:`os.urandom` when
    None). A client masks every frame (RFC 6455 section 5.3); ``masked=False`` builds a
    server's frame, for tests and for a server role.

    Raises :class:`ValueError` for a mask key that is not 4 bytes long.
    """
    length = len(payload)
    first = (_FIN if fin else 0) | opcode
    mask_bit = _MASKED if masked else 0
    if length < _LENGTH_16:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", first, mask_bit | _LENGTH_16, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | _LENGTH_64, length)
    if not masked:
        return header + payload
    if mask_key is None:
        mask_key = os.urandom(4)
    elif len(mask_key) != 4:
        raise ValueError(f"a mask key is 4 bytes long, not {len(mask_key)}")
    return b"".join((header, mask_key, mask_payload(payload, mask_key)))


def _close_payload(code: int, reason: str) -> bytes:
    if code == CLOSE_NO_STATUS:
        return b""  # 1005 means "no code": it is said with an empty close frame
    return struct.pack("!H", code) + reason.encode("utf-8")


def _is_valid_close_code(code: int) -> bool:
    """Codes a close frame may carry (RFC 6455 section 7.4; 1012-1014 registered by IANA
    since). 1004 is reserved; 1005, 1006 and 1015 must never be sent."""
    return code in {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014} or (
        3000 <= code <= 4999
    )


def _host_header(host: str, port: int | None, *, secure: bool) -> str:
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if port is None or port == (443 if secure else 80):
        return name
    return f"{name}:{port}"


# --- the client -----------------------------------------------------------------------


class WebSocketClient:
    """One client WebSocket connection, from the Upgrade request to the close.

    *host* and *port* make the ``Host`` header (the port is left out when it is the
    scheme's default: 80, or 443 with ``secure``). *nonce* is the 16 bytes behind
    ``Sec-WebSocket-Key``; *random_bytes* makes the nonce when it is not given and every
    frame's mask key (pass a seeded source for deterministic tests).

    Raises :class:`ValueError` for a *path* that is not ``/`` followed by printable
    ASCII, or a *nonce* that is not 16 bytes long.
    """

    def __init__(
        self,
        host: str,
        path: str = "/mqtt",
        *,
        port: int | None = None,
        secure: bool = False,
        subprotocol: str = SUBPROTOCOL,
        nonce: bytes | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not _PATH.fullmatch(path):
            raise ValueError(f"a WebSocket path starts with '/' and is printable ASCII: {path!r}")
        if nonce is None:
            nonce = random_bytes(16)
        if len(nonce) != 16:
            raise ValueError(f"a Sec-WebSocket-Key nonce is 16 bytes long, not {len(nonce)}")
        self.path = path
        self.subprotocol = subprotocol
        self.key = base64.b64encode(nonce).decode("ascii")
        self._random_bytes = random_bytes
        self._state = WebSocketState.CONNECTING
        self._outgoing: list[bytes] = [self._request(host, port, secure=secure)]
        self._buffer = bytearray()
        # Frame parsing state kept between calls to receive_data: how many payload bytes
        # of the current data frame are still to come, whether that frame ends its
        # message (FIN), and whether a fragmented message is unfinished.
        self._data_remaining = 0
        self._data_fin = True
        self._in_message = False

    @property
    def state(self) -> WebSocketState:
        return self._state

    # --- verbs ----------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """Queue *payload* as one binary frame.

        Raises :class:`WebSocketError` unless the WebSocket is open: no data may precede
        the 101 answer, nor follow our close frame (RFC 6455 section 5.5.1).
        """
        if self._state is not WebSocketState.OPEN:
            raise WebSocketError(f"cannot send data: the WebSocket is {self._state.value}")
        self._outgoing.append(encode_frame(payload, mask_key=self._random_bytes(4)))

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Start the closing handshake: queue a close frame and wait for the server's.

        Before the Upgrade completed there is no WebSocket to close: the client just
        becomes CLOSED. Once closing or closed, it does nothing. Raises
        :class:`ValueError` for a code that may not be sent or a reason over 123 bytes.
        """
        if code != CLOSE_NO_STATUS and not _is_valid_close_code(code):
            raise ValueError(f"{code} is not a close code that may be sent")
        payload = _close_payload(code, reason)
        if len(payload) > _MAX_CONTROL_PAYLOAD:
            raise ValueError("a close reason is at most 123 bytes of UTF-8")
        if self._state is WebSocketState.OPEN:
            self._queue_control(Opcode.CLOSE, payload)
            self._state = WebSocketState.CLOSING
        elif self._state is WebSocketState.CONNECTING:
            self._state = WebSocketState.CLOSED

    def data_to_send(self) -> bytes:
        """Everything queued since the last call: the Upgrade request, frames, replies."""
        # join() of a single bytes object returns that object: no copy for a lone frame.
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data: bytes) -> list[WebSocketEvent]:
        """Take bytes from the server, in chunks of any size; return what they completed.

        Raises :class:`WebSocketHandshakeError` for a refused or wrong Upgrade answer and
        :class:`WebSocketError` for a malformed frame; either leaves the client CLOSED
        (with a close frame queued for the server when the WebSocket was open). Bytes
        after the server's close frame, or after an error, are ignored.
        """
        if self._state is WebSocketState.CLOSED:
            return []
        self._buffer += data
        events: list[WebSocketEvent] = []
        if self._state is WebSocketState.CONNECTING:
            try:
                opened = self._receive_handshake()
            except WebSocketError:
                self._fail_silently()
                raise
            if opened is None:
                return events
            events.append(opened)
        try:
            self._receive_frames(events)
        except WebSocketError as exc:
            self._fail(exc)
            raise
        return events

    def connection_lost(self) -> None:
        """The TCP connection ended (for whatever reason); the client becomes CLOSED.

        Raises :class:`WebSocketHandshakeError` when it ended before the server answered
        the Upgrade: the port is not a WebSocket server, or it gave up on the request.
        """
        was_connecting = self._state is WebSocketState.CONNECTING
        self._fail_silently()
        if was_connecting:
            raise WebSocketHandshakeError(
                f"the server closed the connection without answering the WebSocket "
                f"upgrade of {self.path} (is it a WebSocket port?)"
            )

    # --- the Upgrade (RFC 6455 section 4.1) -----------------------------------------

    def _request(self, host: str, port: int | None, *, secure: bool) -> bytes:
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {_host_header(host, port, secure=secure)}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self.key}",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Protocol: {self.subprotocol}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def _receive_handshake(self) -> HandshakeCompletedEvent | None:
        buffer = self._buffer
        # Fail at once on an answer that is not HTTP (a plain MQTT or TLS port) rather
        # than wait for a blank line that will never come.
        start = bytes(buffer[:5])
        if not b"HTTP/".startswith(start):
            raise WebSocketHandshakeError(
                f"the server's answer to the WebSocket upgrade of {self.path} is not HTTP: "
                f"it starts with {bytes(buffer[:16])!r}"
            )
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HANDSHAKE_BYTES:
                raise WebSocketHandshakeError(
                    f"the server's answer to the WebSocket upgrade is over "
                    f"{MAX_HANDSHAKE_BYTES} bytes without the end of its header"
                )
            return None
        head = bytes(buffer[:end])
        del buffer[: end + 4]  # what follows is the first frames
        status_line, *header_lines = head.split(b"\r\n")
        status_text = self._check_status(status_line)
        headers = _parse_headers(header_lines, status_text)
        self._check_headers(headers, status_text)
        self._state = WebSocketState.OPEN
        return HandshakeCompletedEvent(subprotocol=self.subprotocol, headers=tuple(headers))

    def _check_status(self, line: bytes) -> str:
        """The status line as text, once it says 101 in HTTP/1.1 or later."""
        match = _STATUS_LINE.fullmatch(line)
        text = line.decode("latin-1")
        if match is None:
            raise WebSocketHandshakeError(
                f"the server's answer to the WebSocket upgrade has no valid status line: {text!r}",
                status_line=text,
            )
        status_code = int(match.group(3))
        if status_code != 101:
            raise WebSocketHandshakeError(
                f"the server refused the WebSocket upgrade of {self.path}: {text}",
                status_code=status_code,
                status_line=text,
            )
        if (int(match.group(1)), int(match.group(2))) < (1, 1):
            # Section 4.1: the handshake is HTTP/1.1 or later.
            raise WebSocketHandshakeError(
                f"the server answered the WebSocket upgrade in HTTP older than 1.1: {text}",
                status_code=status_code,
                status_line=text,
            )
        return text

    def _check_headers(self, headers: list[tuple[str, str]], status_line: str) -> None:
        fields: dict[str, list[str]] = {}
        for name, value in headers:
            fields.setdefault(name.lower(), []).append(value)

        def tokens(name: str) -> set[str]:
            return {
                token.strip().lower()
                for value in fields.get(name, [])
                for token in value.split(",")
                if token.strip()
            }

        def fail(problem: str) -> WebSocketHandshakeError:
            return WebSocketHandshakeError(
                f"the server's answer to the WebSocket upgrade of {self.path} is invalid: "
                f"{problem}",
                status_code=101,
                status_line=status_line,
            )

        # Section 4.1, the client's checks of the answer, items 2 to 6.
        if "websocket" not in tokens("upgrade"):
            raise fail(f"Upgrade is {_shown(fields, 'upgrade')}, not websocket")
        if "upgrade" not in tokens("connection"):
            raise fail(f"Connection is {_shown(fields, 'connection')}, not Upgrade")
        accept = fields.get("sec-websocket-accept", [])
        expected = accept_key(self.key)
        if [value.strip() for value in accept] != [expected]:
            raise fail(
                f"Sec-WebSocket-Accept is {_shown(fields, 'sec-websocket-accept')}, "
                f"not {expected!r} (the hash of our Sec-WebSocket-Key)"
            )
        if tokens("sec-websocket-extensions"):
            raise fail(
                f"it uses extensions we did not offer: {_shown(fields, 'sec-websocket-extensions')}"
            )
        chosen = [value.strip() for value in fields.get("sec-websocket-protocol", [])]
        if chosen != [self.subprotocol]:
            # MQTT-6.0.0-4: the server must choose "mqtt"; an absent header means the
            # server would speak no subprotocol at all.
            raise fail(
                f"the subprotocol is {_shown(fields, 'sec-websocket-protocol')}, "
                f"not {self.subprotocol!r}"
            )

    # --- frames (RFC 6455 section 5) ------------------------------------------------

    def _receive_frames(self, events: list[WebSocketEvent]) -> None:
        chunks: list[bytes] = []  # MQTT bytes, handed out as one event
        # Slices of a memoryview copy once; slices of the bytearray would copy twice. The
        # view must be released before the buffer is resized.
        with memoryview(self._buffer) as view:
            position, close_payload = self._read_frames(view, chunks)
        del self._buffer[:position]
        if chunks:
            events.append(DataReceivedEvent(b"".join(chunks)))
        if close_payload is not None:
            self._buffer.clear()  # nothing may follow a close frame (section 5.5.1)
            events.append(self._receive_close(close_payload))

    def _read_frames(self, view: memoryview, chunks: list[bytes]) -> tuple[int, bytes | None]:
        """Read the frames in *view*, adding data to *chunks* and answering pings; return
        how many bytes were used, and the payload of a close frame if one was read."""
        size = len(view)
        position = 0
        while True:
            if self._data_remaining:
                # The payload of a data frame whose header was read: hand on what is here.
                take = min(self._data_remaining, size - position)
                if take == 0:
                    return position, None
                chunks.append(bytes(view[position : position + take]))
                position += take
                self._data_remaining -= take
                if self._data_remaining == 0:
                    self._in_message = not self._data_fin
                continue
            header = self._parse_header(view, position)
            if header is None:
                return position, None
            opcode, fin, length, header_size = header
            if opcode >= Opcode.CLOSE:
                if size - position < header_size + length:
                    return position, None  # a control frame is handled whole
                start = position + header_size
                position = start + length
                payload = bytes(view[start:position])
                if opcode is Opcode.CLOSE:
                    return position, payload
                if opcode is Opcode.PING and self._state is WebSocketState.OPEN:
                    self._queue_control(Opcode.PONG, payload)  # section 5.5.2
                # A pong (section 5.5.3) needs nothing: MQTT keeps the connection alive.
                continue
            # Data frames (section 5.4): binary starts a message, continuation goes on.
            if opcode is Opcode.CONTINUATION and not self._in_message:
                raise WebSocketError("a continuation frame with no message to continue")
            if opcode is Opcode.BINARY and self._in_message:
                raise WebSocketError("a new message started before the fragmented one ended")
            position += header_size
            self._data_fin = fin
            self._data_remaining = length
            if length == 0:
                self._in_message = not fin

    def _parse_header(
        self, buffer: memoryview, position: int
    ) -> tuple[Opcode, bool, int, int] | None:
        """(opcode, fin, payload length, header size) of the frame at *position*, or None
        while its header is incomplete. Each rule is checked as soon as its bits are in."""
        available = len(buffer) - position
        if available < 2:
            return None
        first, second = buffer[position], buffer[position + 1]
        opcode = self._check_header(first, second)
        fin = bool(first & _FIN)
        length = second & _LENGTH
        header_size = 2
        if length == _LENGTH_16:
            header_size = 4
            if available < header_size:
                return None
            (length,) = struct.unpack_from("!H", buffer, position + 2)
        elif length == _LENGTH_64:
            header_size = 10
            if available < header_size:
                return None
            (length,) = struct.unpack_from("!Q", buffer, position + 2)
            if length > _MAX_64BIT_LENGTH:
                raise WebSocketError("a frame length has its most significant bit set")
        # A 16- or 64-bit length that would have fitted a shorter form breaks the
        # "minimal number of bytes" rule of section 5.2; like most implementations we
        # accept it, since it is unambiguous.
        if opcode >= Opcode.CLOSE:
            # Control frames (section 5.5): short and never fragmented.
            if not fin:
                raise WebSocketError(f"a fragmented {opcode.name} frame")
            if length > _MAX_CONTROL_PAYLOAD:
                raise WebSocketError(f"a {opcode.name} frame of {length} bytes (at most 125)")
        return opcode, fin, length, header_size

    def _check_header(self, first: int, second: int) -> Opcode:
        """The opcode of a frame, once its first two bytes pass section 5.2's rules."""
        if first & _RSV:
            raise WebSocketError(
                f"a frame sets reserved bits 0x{first & _RSV:02x} (no extension was agreed)"
            )
        try:
            opcode = Opcode(first & _OPCODE)
        except ValueError:
            raise WebSocketError(f"a frame has the reserved opcode 0x{first & _OPCODE:x}") from None
        if second & _MASKED:
            # Section 5.1: a client closes the connection on a masked frame from a server.
            raise WebSocketError("the server masked a frame (servers must not)")
        if opcode is Opcode.TEXT:
            # MQTT-6.0.0-1: MQTT travels in binary frames; a text frame closes the link.
            raise WebSocketError(
                "the server sent a text frame (MQTT uses binary frames)",
                reason_code=CLOSE_UNSUPPORTED_DATA,
            )
        return opcode

    def _receive_close(self, payload: bytes) -> CloseReceivedEvent:
        """Section 5.5.1: a close frame holds nothing, or a code and a UTF-8 reason."""
        if len(payload) == 1:
            raise WebSocketError("a close frame of one byte (a code takes two)")
        if payload:
            (code,) = struct.unpack_from("!H", payload)
            if not _is_valid_close_code(code):
                raise WebSocketError(f"a close frame with the invalid code {code}")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise WebSocketError(
                    "a close reason that is not UTF-8", reason_code=CLOSE_INVALID_DATA
                ) from None
        else:
            code, reason = CLOSE_NO_STATUS, ""
        if self._state is WebSocketState.OPEN:
            # The server started the close: echo its code (section 5.5.1).
            self._queue_control(Opcode.CLOSE, _close_payload(code, ""))
        self._state = WebSocketState.CLOSED
        return CloseReceivedEvent(code=code, reason=reason)

    # --- internals --------------------------------------------------------------------

    def _queue_control(self, opcode: Opcode, payload: bytes) -> None:
        self._outgoing.append(encode_frame(payload, opcode=opcode, mask_key=self._random_bytes(4)))

    def _fail(self, exc: WebSocketError) -> None:
        """Section 7.1.7, failing the connection: tell the server why, when we still may."""
        if self._state is WebSocketState.OPEN:
            code = exc.reason_code if exc.reason_code is not None else CLOSE_PROTOCOL_ERROR
            self._queue_control(Opcode.CLOSE, _close_payload(code, ""))
        self._fail_silently()

    def _fail_silently(self) -> None:
        self._state = WebSocketState.CLOSED
        self._buffer.clear()
        self._data_remaining = 0


def _parse_headers(lines: list[bytes], status_line: str) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            # Also catches obsolete line folding (a line starting with white space),
            # which RFC 9110 section 5.5 lets a client reject.
            raise WebSocketHandshakeError(
                f"the server's answer to the WebSocket upgrade has a malformed header "
                f"line: {line.decode('latin-1')!r}",
                status_code=101,
                status_line=status_line,
            )
        headers.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    return headers


def _shown(fields: dict[str, list[str]], name: str) -> str:
    values = fields.get(name)
    return "missing" if not values else repr(", ".join(values))
