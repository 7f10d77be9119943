"""CoAP (RFC 7252) as a codec and a client exchange state, with no I/O.

Three layers, each usable alone:

- **The codec**: :func:`encode` and :func:`decode` turn a :class:`CoAPMessage` (type,
  code, message id, token, options, payload) into a datagram and back, with the option
  delta/length encoding of RFC 7252 section 3.1 and its extended forms. Typed helpers
  read and build the options a device uses: Uri-Path and Uri-Query (section 5.10.1),
  Content-Format (5.10.3), Observe (RFC 7641 section 2), Block1 and Block2 (RFC 7959
  section 2.2).
- **The client exchange state**, :class:`CoAPClient`: one device talking to one server
  endpoint. It numbers messages and tokens, sends confirmable (CON) requests again on
  the schedule of RFC 7252 section 4.8 until they are acknowledged, matches ACKs, RSTs,
  piggybacked and separate responses to the requests they answer (sections 4.2, 5.2,
  5.3.2), acknowledges separate responses, and splits a request body larger than a
  block into a Block1 transfer (RFC 7959 section 2.5). Time is given to it (``now_s``
  on every call) and randomness is injected (``random``), so tests run in virtual time.
- **Server-side helpers** for a device that answers requests itself: a piggybacked or
  non-confirmable response to a request (:func:`response_to`), a cache that answers a
  duplicated request with the same response (:class:`RecentResponses`, section 4.5),
  and the observer list of RFC 7641 (:class:`ObserverRegistry`).

Driving the client::

    client = CoAPClient(random=rng.random)
    exchange = client.request(Code.POST, ("telemetry",), b"{}", confirmable=True, now_s=now)
    socket.send(*client.datagrams_to_send())
    # ... when a datagram arrives:       events = client.receive(decode(data), now_s=now)
    # ... at client.next_deadline_s():   events = client.handle_timeouts(now_s=now)
    # events: ResponseEvent (the final response) or FailedEvent ("timeout", "reset")

What is not here: DTLS (the adapter wraps the datagrams), Block2 on the client side (a
device reads no large response bodies), proxying, multicast, and the Size2/ETag
machinery of caches.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Generic, TypeVar

from iotix.errors import ProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Iterable, Sequence

__all__ = [
    "ACK_RANDOM_FACTOR",
    "ACK_TIMEOUT_S",
    "DEFAULT_BLOCK_SIZE_BYTES",
    "MAX_RETRANSMIT",
    "NSTART",
    "AcknowledgedEvent",
    "BlockOption",
    "ClientEvent",
    "CoAPClient",
    "CoAPFormatError",
    "CoAPMessage",
    "Code",
    "ContentFormat",
    "FailedEvent",
    "MessageType",
    "ObserverRegistry",
    "Option",
    "OptionNumber",
    "RecentResponses",
    "ResponseEvent",
    "block_szx",
    "code_text",
    "decode",
    "decode_uint",
    "empty_message",
    "encode",
    "encode_uint",
    "is_critical",
    "path_options",
    "query_options",
    "response_to",
]

# --- constants ----------------------------------------------------------------------

VERSION: Final = 1  # section 3: "Implementations of this specification MUST set this field to 1"
PAYLOAD_MARKER: Final = 0xFF  # section 3
MAX_TOKEN_BYTES: Final = 8  # section 3: lengths 9-15 are reserved
MAX_MESSAGE_ID: Final = 0xFFFF
# Section 3.1: a 4-bit nibble, one extra byte (13 + n), or two (269 + n).
_EXTENDED_8: Final = 13
_EXTENDED_16: Final = 14
_RESERVED_NIBBLE: Final = 15
_BASE_8: Final = 13
_BASE_16: Final = 269
MAX_OPTION_FIELD: Final = _BASE_16 + 0xFFFF  # the largest delta or length expressible

# Transmission parameters, section 4.8.
ACK_TIMEOUT_S: Final = 2.0
ACK_RANDOM_FACTOR: Final = 1.5
MAX_RETRANSMIT: Final = 4
NSTART: Final = 1  # section 4.7: outstanding interactions with one server

# RFC 7959 section 2.2: block size 2**(SZX + 4), SZX 0-6 (16 to 1024 bytes); SZX 7 is
# reserved (BERT, RFC 8323, on reliable transports only).
DEFAULT_BLOCK_SIZE_BYTES: Final = 1024
_MAX_SZX: Final = 6
_MAX_BLOCK_NUMBER: Final = (1 << 20) - 1  # 20 bits in a 3-byte option

# RFC 7641 section 4.4: the Observe sequence number is 24 bits and wraps.
_OBSERVE_MODULUS: Final = 1 << 24

_HEADER = struct.Struct("!BBH")

PeerT = TypeVar("PeerT", bound="Hashable")
"""How the caller names a peer (an address tuple, for the adapter)."""


class CoAPFormatError(ProtocolError):
    """A datagram is not a well-formed CoAP message (RFC 7252 section 3), or a message
    cannot be encoded. Where the header could be read, ``message_id`` and
    ``message_type`` say which message it was, so a receiver can reject a malformed
    CON with a RST (section 4.2)."""

    def __init__(
        self,
        message: str,
        *,
        message_id: int | None = None,
        message_type: MessageType | None = None,
    ) -> None:
        super().__init__(message)
        self.message_id = message_id
        self.message_type = message_type


class MessageType(enum.IntEnum):
    """Section 3: the T field."""

    CON = 0  # confirmable: retransmitted until ACKed or RST (section 4.2)
    NON = 1  # non-confirmable (section 4.3)
    ACK = 2
    RST = 3


class Code(enum.IntEnum):
    """Section 12.1: the 8-bit code, class (3 bits) '.' detail (5 bits). 0.xx are
    methods (0.00 an empty message), 2.xx success, 4.xx client and 5.xx server errors.
    Decoded messages keep the plain integer, so unregistered codes survive."""

    EMPTY = 0x00
    GET = 0x01
    POST = 0x02
    PUT = 0x03
    DELETE = 0x04
    CREATED = 0x41  # 2.01
    DELETED = 0x42  # 2.02
    VALID = 0x43  # 2.03
    CHANGED = 0x44  # 2.04
    CONTENT = 0x45  # 2.05
    CONTINUE = 0x5F  # 2.31, RFC 7959 section 2.9.1
    BAD_REQUEST = 0x80  # 4.00
    UNAUTHORIZED = 0x81
    BAD_OPTION = 0x82
    FORBIDDEN = 0x83
    NOT_FOUND = 0x84  # 4.04
    METHOD_NOT_ALLOWED = 0x85
    NOT_ACCEPTABLE = 0x86
    REQUEST_ENTITY_INCOMPLETE = 0x88  # 4.08, RFC 7959 section 2.9.2
    PRECONDITION_FAILED = 0x8C
    REQUEST_ENTITY_TOO_LARGE = 0x8D  # 4.13
    UNSUPPORTED_CONTENT_FORMAT = 0x8F
    INTERNAL_SERVER_ERROR = 0xA0  # 5.00
    NOT_IMPLEMENTED = 0xA1
    BAD_GATEWAY = 0xA2
    SERVICE_UNAVAILABLE = 0xA3
    GATEWAY_TIMEOUT = 0xA4
    PROXYING_NOT_SUPPORTED = 0xA5


def code_text(code: int) -> str:
    """``"4.04"`` for 0x84: the dotted form of section 3 (``c.dd``)."""
    return f"{code >> 5}.{code & 0x1F:02d}"


def _is_request(code: int) -> bool:
    return code >> 5 == 0 and code != Code.EMPTY  # section 12.1.1: 0.01-0.31


def _is_response(code: int) -> bool:
    return 2 <= code >> 5 <= 5  # section 12.1.2: 2.xx, 4.xx and 5.xx


class OptionNumber(enum.IntEnum):
    """Section 12.2 and the registrations of RFC 7641 and RFC 7959."""

    IF_MATCH = 1
    URI_HOST = 3
    ETAG = 4
    IF_NONE_MATCH = 5
    OBSERVE = 6  # RFC 7641 section 2
    URI_PORT = 7
    LOCATION_PATH = 8
    URI_PATH = 11
    CONTENT_FORMAT = 12
    MAX_AGE = 14
    URI_QUERY = 15
    ACCEPT = 17
    LOCATION_QUERY = 20
    BLOCK2 = 23  # RFC 7959 section 2.1
    BLOCK1 = 27
    SIZE2 = 28
    PROXY_URI = 35
    PROXY_SCHEME = 39
    SIZE1 = 60


_KNOWN_OPTIONS: Final = frozenset(int(number) for number in OptionNumber)


def is_critical(number: int) -> bool:
    """Section 5.4.6: odd option numbers are critical (an endpoint that does not know
    one must reject the message); even ones are elective."""
    return number & 1 == 1


class ContentFormat(enum.IntEnum):
    """Section 12.3 and later registrations: the ones a device is likely to send."""

    TEXT_PLAIN = 0
    LINK_FORMAT = 40
    XML = 41
    OCTET_STREAM = 42
    EXI = 47
    JSON = 50
    CBOR = 60
    SENML_JSON = 110
    SENML_CBOR = 112


# --- options ------------------------------------------------------------------------


def encode_uint(value: int) -> bytes:
    """Section 3.2: a uint option value in as few bytes as it needs (0 is empty)."""
    if value < 0:
        raise CoAPFormatError(f"a uint option value is not negative: {value}")
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def decode_uint(data: bytes) -> int:
    """Section 3.2: leading zero bytes are allowed on receipt."""
    return int.from_bytes(data, "big")


def block_szx(size_bytes: int) -> int:
    """RFC 7959 section 2.2: the SZX of a block size (16, 32, ... 1024 bytes)."""
    szx = size_bytes.bit_length() - 5
    if size_bytes != 1 << (szx + 4) or not 0 <= szx <= _MAX_SZX:
        raise ValueError(
            f"a CoAP block is 16, 32, 64, 128, 256, 512 or 1024 bytes, not {size_bytes}"
        )
    return szx


@dataclass(frozen=True, slots=True)
class BlockOption:
    """The value of a Block1 or Block2 option (RFC 7959 section 2.2): block ``number``,
    whether ``more`` blocks follow, and the size exponent ``szx`` (size 2**(szx+4))."""

    number: int
    more: bool
    szx: int

    @property
    def size_bytes(self) -> int:
        return 1 << (self.szx + 4)

    @property
    def offset_bytes(self) -> int:
        """Where this block starts in the body."""
        return self.number * self.size_bytes

    def encode(self) -> bytes:
        if not 0 <= self.szx <= _MAX_SZX:
            raise CoAPFormatError(f"block SZX {self.szx} (0-6 on UDP, RFC 7959 section 2.2)")
        if not 0 <= self.number <= _MAX_BLOCK_NUMBER:
            raise CoAPFormatError(f"block number {self.number} does not fit 20 bits")
        # NUM (4, 12 or 20 bits) | M (1 bit) | SZX (3 bits), as a uint (section 2.2).
        return encode_uint(self.number << 4 | int(self.more) << 3 | self.szx)

    @classmethod
    def decode(cls, data: bytes) -> BlockOption:
        if len(data) > 3:
            raise CoAPFormatError(f"a block option is 0-3 bytes, not {len(data)}")
        value = decode_uint(data)
        szx = value & 0x07
        if szx > _MAX_SZX:
            # RFC 7959 section 2.2: SZX 7 is reserved; a request with it is a 4.00.
            raise CoAPFormatError("block SZX 7 is reserved")
        return cls(value >> 4, bool(value & 0x08), szx)


Option = tuple[int, bytes]
"""One option: its number and its raw value (section 3.1)."""


# --- messages -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CoAPMessage:
    """One CoAP message (section 3). ``options`` are (number, raw value) pairs; they
    are encoded in ascending number order (a stable sort, so repeated options keep
    their order: Uri-Path segments), and decoded in wire order, which is ascending."""

    type: MessageType
    code: int
    message_id: int
    token: bytes = b""
    options: tuple[Option, ...] = ()
    payload: bytes = b""

    # -- reading options --

    def option_values(self, number: int) -> list[bytes]:
        return [value for n, value in self.options if n == number]

    def first_option(self, number: int) -> bytes | None:
        for n, value in self.options:
            if n == number:
                return value
        return None

    @property
    def uri_path(self) -> tuple[str, ...]:
        """Section 6.5: one segment per Uri-Path option."""
        return tuple(
            v.decode("utf-8", "replace") for v in self.option_values(OptionNumber.URI_PATH)
        )

    @property
    def uri_query(self) -> tuple[str, ...]:
        return tuple(
            v.decode("utf-8", "replace") for v in self.option_values(OptionNumber.URI_QUERY)
        )

    @property
    def content_format(self) -> int | None:
        value = self.first_option(OptionNumber.CONTENT_FORMAT)
        return None if value is None else decode_uint(value)

    @property
    def observe(self) -> int | None:
        value = self.first_option(OptionNumber.OBSERVE)
        return None if value is None else decode_uint(value)

    @property
    def block1(self) -> BlockOption | None:
        value = self.first_option(OptionNumber.BLOCK1)
        return None if value is None else BlockOption.decode(value)

    @property
    def block2(self) -> BlockOption | None:
        value = self.first_option(OptionNumber.BLOCK2)
        return None if value is None else BlockOption.decode(value)

    @property
    def is_request(self) -> bool:
        return _is_request(self.code)

    @property
    def is_response(self) -> bool:
        return _is_response(self.code)


def path_options(path: Iterable[str]) -> list[Option]:
    """Uri-Path options for the segments of ``path`` (each at most 255 bytes, section
    5.10). Empty segments are dropped: ``"a//b"`` is ``/a/b``."""
    options = []
    for segment in path:
        if segment:
            value = segment.encode()
            if len(value) > 255:
                raise CoAPFormatError(
                    f"a Uri-Path segment is at most 255 bytes: {segment[:40]!r}..."
                )
            options.append((int(OptionNumber.URI_PATH), value))
    return options


def query_options(query: Iterable[str]) -> list[Option]:
    """Uri-Query options, one per ``key=value`` argument (section 5.10.1)."""
    options = []
    for argument in query:
        value = argument.encode()
        if len(value) > 255:
            raise CoAPFormatError(
                f"a Uri-Query argument is at most 255 bytes: {argument[:40]!r}..."
            )
        options.append((int(OptionNumber.URI_QUERY), value))
    return options


def empty_message(message_type: MessageType, message_id: int) -> CoAPMessage:
    """An Empty message (section 4.1): code 0.00, no token, options or payload. An empty
    ACK acknowledges a CON; an empty RST rejects a message; an empty CON is a ping."""
    return CoAPMessage(message_type, Code.EMPTY, message_id)


def _extended(value: int) -> tuple[int, bytes]:
    # Section 3.1: the nibble, and the extended bytes that follow the option header.
    if value < _BASE_8:
        return value, b""
    if value < _BASE_16:
        return _EXTENDED_8, bytes((value - _BASE_8,))
    if value <= MAX_OPTION_FIELD:
        return _EXTENDED_16, (value - _BASE_16).to_bytes(2, "big")
    raise CoAPFormatError(f"an option delta or length of {value} does not fit the format")


def encode(message: CoAPMessage) -> bytes:
    """The datagram of ``message`` (section 3). Raises :class:`CoAPFormatError` for a
    message the format cannot carry (a token over 8 bytes, an Empty message with
    content, an option value over 65,804 bytes)."""
    if message.code == Code.EMPTY and (message.token or message.options or message.payload):
        raise CoAPFormatError("an Empty message (0.00) has no token, options or payload")
    return encode_parts(
        message.type,
        message.code,
        message.message_id,
        token=message.token,
        options=encode_options(message.options),
        payload=message.payload,
    )


def encode_parts(
    message_type: MessageType,
    code: int,
    message_id: int,
    *,
    token: bytes,
    options: bytes,
    payload: bytes,
) -> bytes:
    """A datagram from its parts, the options already encoded by
    :func:`encode_options` (a device sends the same options again and again)."""
    if len(token) > MAX_TOKEN_BYTES:
        raise CoAPFormatError(f"a token is at most 8 bytes, not {len(token)}")
    if not 0 <= message_id <= MAX_MESSAGE_ID:
        raise CoAPFormatError(f"message id {message_id} is not 16 bits")
    if not 0 <= code <= 0xFF:
        raise CoAPFormatError(f"code {code} is not 8 bits")
    header = _HEADER.pack(VERSION << 6 | int(message_type) << 4 | len(token), code, message_id)
    if payload:
        # Section 3: the marker only when a payload follows (a zero-length payload after
        # a marker is a format error).
        return b"".join((header, token, options, b"\xff", payload))
    return b"".join((header, token, options))


def encode_options(options: Iterable[Option]) -> bytes:
    """The options part of a datagram: ordered by number, each carrying the delta from
    the one before (section 3.1)."""
    parts = []
    previous = 0
    for number, value in sorted(options, key=_option_number):
        if not 0 <= number <= 0xFFFF:
            # Section 12.2: option numbers are 0-65535.
            raise CoAPFormatError(f"option number {number} is not 0-65535")
        delta_nibble, delta_bytes = _extended(number - previous)
        length_nibble, length_bytes = _extended(len(value))
        parts.append(bytes((delta_nibble << 4 | length_nibble,)))
        parts.append(delta_bytes)
        parts.append(length_bytes)
        parts.append(value)
        previous = number
    return b"".join(parts)


@functools.lru_cache(maxsize=1 << 15)
def prepared_options(
    path: tuple[str, ...], query: tuple[str, ...], content_format: int | None
) -> tuple[tuple[Option, ...], bytes]:
    """A request's Uri-Path, Uri-Query and Content-Format options, and their encoding:
    the same for every message a device sends to a resource, so built once (for up to
    32,768 resources; a device sends to a few)."""
    options = [*path_options(path), *query_options(query)]
    if content_format is not None:
        options.append((int(OptionNumber.CONTENT_FORMAT), encode_uint(content_format)))
    return tuple(options), encode_options(options)


def _option_number(option: Option) -> int:
    return option[0]


def decode(data: bytes) -> CoAPMessage:
    """The message in datagram ``data``. Raises :class:`CoAPFormatError` for anything
    section 3 calls a message format error (with the message id and type once the
    header has been read)."""
    if len(data) < 4:
        raise CoAPFormatError(f"a CoAP message has a 4-byte header; got {len(data)} bytes")
    first, code, message_id = _HEADER.unpack_from(data)
    message_type = MessageType((first >> 4) & 0x03)

    def fail(problem: str) -> CoAPFormatError:
        return CoAPFormatError(problem, message_id=message_id, message_type=message_type)

    if first >> 6 != VERSION:
        # Section 3: messages with unknown version numbers MUST be silently ignored;
        # the caller decides, from the error, to ignore it.
        raise fail(f"CoAP version {first >> 6}, not 1")
    token_length = first & 0x0F
    if token_length > MAX_TOKEN_BYTES:
        raise fail(f"token length {token_length} is reserved")  # section 3
    end = 4 + token_length
    if len(data) < end:
        raise fail("the datagram ends inside the token")
    token = data[4:end]
    if code == Code.EMPTY and len(data) > 4:
        # Section 4.1: bytes after the message id of an Empty message are a format error.
        raise fail("an Empty message (0.00) carries nothing after its message id")
    options: list[Option] = []
    number = 0
    position = end
    size = len(data)
    while position < size:
        header = data[position]
        position += 1
        if header == PAYLOAD_MARKER:
            if position == size:
                raise fail("a payload marker followed by no payload")  # section 3
            return CoAPMessage(
                message_type, code, message_id, token, tuple(options), data[position:]
            )
        delta, position = _read_extended(header >> 4, data, position, fail)
        length, position = _read_extended(header & 0x0F, data, position, fail)
        number += delta
        if position + length > size:
            raise fail(f"option {number} is {length} bytes; the datagram ends first")
        options.append((number, data[position : position + length]))
        position += length
    return CoAPMessage(message_type, code, message_id, token, tuple(options))


def _read_extended(
    nibble: int, data: bytes, position: int, fail: Callable[[str], CoAPFormatError]
) -> tuple[int, int]:
    if nibble < _EXTENDED_8:
        return nibble, position
    if nibble == _EXTENDED_8:
        if position + 1 > len(data):
            raise fail("the datagram ends inside an extended option field")
        return data[position] + _BASE_8, position + 1
    if nibble == _EXTENDED_16:
        if position + 2 > len(data):
            raise fail("the datagram ends inside an extended option field")
        return int.from_bytes(data[position : position + 2], "big") + _BASE_16, position + 2
    # Section 3.1: 15 is reserved for the payload marker; in a delta or length alone it
    # is a message format error.
    raise fail("option delta or length nibble 15 outside the payload marker")


# --- the client exchange state --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseEvent:
    """The final response to request ``exchange_id`` (for a Block1 transfer: to its
    last block). ``retransmissions`` counts every CON sent again in the exchange."""

    exchange_id: int
    response: CoAPMessage
    retransmissions: int


@dataclass(frozen=True, slots=True)
class FailedEvent:
    """Request ``exchange_id`` ended without a response: ``reason`` is ``timeout`` (no
    ACK after every retransmission, or no separate response after an empty ACK),
    ``reset`` (the server answered with RST) or ``rejected`` (a response carried a
    critical option this client does not know, section 5.4.1)."""

    exchange_id: int
    reason: str
    retransmissions: int


@dataclass(frozen=True, slots=True)
class AcknowledgedEvent:
    """The server ACKed request ``exchange_id`` with an empty ACK: its response comes
    separately (section 5.2.2); retransmission stops."""

    exchange_id: int


ClientEvent = ResponseEvent | FailedEvent | AcknowledgedEvent


@dataclass(slots=True)
class _Exchange:
    """One request in progress (for a Block1 transfer, the whole transfer)."""

    exchange_id: int
    code: int
    options: list[Option]  # the request's options without Block1/Size1
    payload: bytes
    token: bytes
    szx: int | None  # the block size exponent of a Block1 transfer; None: one message
    encoded_options: bytes | None = None  # of a one-message request: sent as they are
    block_number: int = 0
    message_id: int = -1  # of the CON in flight
    datagram: bytes = b""
    timeout_s: float = 0.0
    deadline_s: float = 0.0
    attempt_retransmissions: int = 0  # of the CON in flight
    retransmissions: int = 0  # the whole exchange
    acknowledged: bool = False


class CoAPClient:
    """A device's requests to one CoAP server: see the module docstring.

    ``random`` returns floats in [0, 1): it draws the first retransmission timeout
    (section 4.2: between ACK_TIMEOUT and ACK_TIMEOUT * ACK_RANDOM_FACTOR) and, unless
    given, the first message id and token (section 4.4 and 5.3.1 want them hard to
    guess; a simulator shares one generator among its devices). ``separate_timeout_s``
    bounds the wait for a separate response after an empty ACK. ``nstart`` is how many
    confirmable requests may be outstanding at once (section 4.7); more wait in order.
    Non-confirmable requests expect no response and are not tracked, so a response to
    one is dropped (or, if confirmable, acknowledged); they use the empty token.
    """

    __slots__ = (
        "_ack_random_factor",
        "_ack_timeout_s",
        "_exchange_ids",
        "_exchanges",
        "_max_retransmit",
        "_message_id",
        "_nstart",
        "_outgoing",
        "_random",
        "_recently_acked",
        "_separate_timeout_s",
        "_szx",
        "_token",
        "_waiting",
    )

    def __init__(
        self,
        *,
        random: Callable[[], float],
        first_message_id: int | None = None,
        first_token: int | None = None,
        block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        ack_random_factor: float = ACK_RANDOM_FACTOR,
        max_retransmit: int = MAX_RETRANSMIT,
        nstart: int = NSTART,
        separate_timeout_s: float = 93.0,
    ) -> None:
        if ack_timeout_s <= 0 or ack_random_factor < 1 or max_retransmit < 0 or nstart < 1:
            raise ValueError(
                "CoAP transmission parameters: ack_timeout_s > 0, ack_random_factor >= 1, "
                "max_retransmit >= 0, nstart >= 1"
            )
        self._random = random
        self._szx = block_szx(block_size_bytes)
        self._ack_timeout_s = ack_timeout_s
        self._ack_random_factor = ack_random_factor
        self._max_retransmit = max_retransmit
        self._nstart = nstart
        self._separate_timeout_s = separate_timeout_s
        self._message_id = (
            int(random() * 0x10000) if first_message_id is None else first_message_id
        ) & MAX_MESSAGE_ID
        self._token = int(random() * 0x1_0000_0000) if first_token is None else first_token
        self._exchange_ids = 0
        self._exchanges: dict[int, _Exchange] = {}  # started, by exchange id
        self._waiting: deque[_Exchange] = deque()  # beyond NSTART, in order
        self._outgoing: list[bytes] = []
        # Message ids of separate CON responses we acknowledged: a copy of one (our ACK
        # was lost) is acknowledged again, not rejected (section 4.5).
        self._recently_acked: deque[int] = deque(maxlen=8)

    # -- state --

    @property
    def outstanding(self) -> int:
        """Requests started and not finished, plus those waiting for NSTART."""
        return len(self._exchanges) + len(self._waiting)

    def is_pending(self, exchange_id: int) -> bool:
        """Whether request ``exchange_id`` still waits for its outcome (a
        non-confirmable request never does)."""
        return exchange_id in self._exchanges or any(
            exchange.exchange_id == exchange_id for exchange in self._waiting
        )

    def exchange_acknowledged(self, exchange_id: int) -> bool:
        """Whether the server has ACKed request ``exchange_id`` (and not answered yet)."""
        exchange = self._exchanges.get(exchange_id)
        return exchange is not None and exchange.acknowledged

    def next_deadline_s(self) -> float | None:
        """When :meth:`handle_timeouts` should next be called; None: nothing pending."""
        if not self._exchanges:
            return None
        return min(exchange.deadline_s for exchange in self._exchanges.values())

    def datagrams_to_send(self) -> list[bytes]:
        """The datagrams queued since the last call, in order (to the server)."""
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    # -- verbs --

    def request(
        self,
        code: int,
        path: Sequence[str],
        payload: bytes = b"",
        *,
        confirmable: bool,
        now_s: float,
        content_format: int | None = None,
        query: Sequence[str] = (),
        options: Iterable[Option] = (),
    ) -> int:
        """Queue a request for ``path`` (Uri-Path segments) and return its exchange id.

        A confirmable request is answered by a :class:`ResponseEvent` or a
        :class:`FailedEvent` with this id. A non-confirmable one is sent as it is and
        nothing more is heard of it, unless its body is larger than a block: a Block1
        transfer needs the server's answer to every block before the next (RFC 7959
        section 2.5), so it is always sent confirmable.
        """
        self._exchange_ids += 1
        exchange_id = self._exchange_ids
        prepared, encoded = prepared_options(tuple(path), tuple(query), content_format)
        extra = tuple(options)
        request_options = [*prepared, *extra]
        if extra:
            encoded = encode_options(request_options)
        blockwise = len(payload) > 1 << (self._szx + 4)
        if not confirmable and not blockwise:
            self._outgoing.append(
                encode_parts(
                    MessageType.NON,
                    code,
                    self.next_message_id(),
                    token=b"",
                    options=encoded,
                    payload=payload,
                )
            )
            return exchange_id
        exchange = _Exchange(
            exchange_id,
            code,
            request_options,
            payload,
            self._next_token(),
            self._szx if blockwise else None,
            encoded_options=None if blockwise else encoded,
        )
        if len(self._exchanges) < self._nstart:
            self._start(exchange, now_s)
        else:
            self._waiting.append(exchange)
        return exchange_id

    def cancel_all(self) -> list[int]:
        """Forget every request (the device is going away); their ids, for the caller to
        fail. Nothing is sent: CoAP has no cancel for a CON (section 4.2)."""
        ids = [*self._exchanges, *(exchange.exchange_id for exchange in self._waiting)]
        self._exchanges.clear()
        self._waiting.clear()
        return ids

    def receive(self, message: CoAPMessage, now_s: float) -> list[ClientEvent]:
        """Take a message from the server; return what it decided. Requests (a server
        asking the device) are not the client's business and are ignored here."""
        mtype = message.type
        code = message.code
        if mtype is MessageType.ACK:
            exchange = self._by_message_id(message.message_id)
            if exchange is None or exchange.acknowledged:
                return []  # a late or duplicated ACK (section 4.5)
            if code == Code.EMPTY:
                # Section 5.2.2: the response comes separately; stop retransmitting.
                exchange.acknowledged = True
                exchange.deadline_s = now_s + self._separate_timeout_s
                return [AcknowledgedEvent(exchange.exchange_id)]
            if message.token != exchange.token or not message.is_response:
                return []  # section 5.3.2: a piggybacked response echoes the token
            return self._on_response(exchange, message, now_s)
        if mtype is MessageType.RST:
            exchange = self._by_message_id(message.message_id)
            if exchange is None or exchange.acknowledged:
                return []
            # Section 4.2: the server could not process the CON (nor will it).
            return self._finish(
                exchange,
                FailedEvent(exchange.exchange_id, "reset", exchange.retransmissions),
                now_s,
            )
        # CON or NON from the server.
        if code == Code.EMPTY:
            if mtype is MessageType.CON:
                self._send(empty_message(MessageType.RST, message.message_id))  # a ping (4.3)
            return []
        if not message.is_response:
            return []
        exchange = self._by_token(message.token)
        if exchange is None:
            if mtype is MessageType.CON:
                if not message.token or message.message_id in self._recently_acked:
                    # A confirmable answer to a NON request, or a copy of a separate
                    # response already taken: acknowledge it (section 4.5).
                    self._send(empty_message(MessageType.ACK, message.message_id))
                else:
                    # Section 5.3.2: a response matching no request is rejected.
                    self._send(empty_message(MessageType.RST, message.message_id))
            return []
        if mtype is MessageType.CON:
            if _unknown_critical(message):
                # Section 5.4.1: rejected, so not acknowledged but reset (section 4.2).
                self._send(empty_message(MessageType.RST, message.message_id))
            else:
                # Section 5.2.2: a separate response in a CON is acknowledged.
                self._send(empty_message(MessageType.ACK, message.message_id))
                self._recently_acked.append(message.message_id)
        return self._on_response(exchange, message, now_s)

    def handle_timeouts(self, now_s: float) -> list[ClientEvent]:
        """Retransmit the CONs whose timeout has passed, or give them up."""
        events: list[ClientEvent] = []
        for exchange in list(self._exchanges.values()):
            if exchange.deadline_s > now_s:
                continue
            if exchange.acknowledged or exchange.attempt_retransmissions >= self._max_retransmit:
                # Section 4.2: after MAX_RETRANSMIT retransmissions the last timeout
                # ends the attempt; after an empty ACK, the separate response is late.
                failed = FailedEvent(exchange.exchange_id, "timeout", exchange.retransmissions)
                events.extend(self._finish(exchange, failed, now_s))
                continue
            # Section 4.2: retransmit and double the timeout. The next deadline counts
            # from the one that passed, so a late call does not stretch the schedule.
            exchange.attempt_retransmissions += 1
            exchange.retransmissions += 1
            exchange.timeout_s *= 2
            exchange.deadline_s += exchange.timeout_s
            self._outgoing.append(exchange.datagram)
        return events

    # -- internals --

    def next_message_id(self) -> int:
        """The endpoint's next message id (section 4.4: sequential from a random start,
        16 bits, wrapping); the device's own responses and notifications take theirs
        from here too, since message ids are per endpoint."""
        message_id = self._message_id
        self._message_id = (message_id + 1) & MAX_MESSAGE_ID
        return message_id

    def _next_token(self) -> bytes:
        # Section 5.3.1: tokens tell the client's requests apart. A counter from a
        # random start keeps them unique on this endpoint; never empty (the empty token
        # marks non-confirmable requests, whose answers are not tracked).
        self._token = (self._token + 1) & 0xFFFF_FFFF
        return self._token.to_bytes(4, "big")

    def _send(self, message: CoAPMessage) -> None:
        self._outgoing.append(encode(message))

    def _by_message_id(self, message_id: int) -> _Exchange | None:
        for exchange in self._exchanges.values():
            if exchange.message_id == message_id:
                return exchange
        return None

    def _by_token(self, token: bytes) -> _Exchange | None:
        for exchange in self._exchanges.values():
            if exchange.token == token:
                return exchange
        return None

    def _start(self, exchange: _Exchange, now_s: float) -> None:
        self._exchanges[exchange.exchange_id] = exchange
        self._transmit(exchange, now_s)

    def _transmit(self, exchange: _Exchange, now_s: float) -> None:
        """Send the exchange's current message (its next block) as a new CON."""
        options = exchange.options
        payload = exchange.payload
        if exchange.szx is not None:
            size = 1 << (exchange.szx + 4)
            offset = exchange.block_number * size
            more = offset + size < len(payload)
            options = [
                *options,
                (
                    int(OptionNumber.BLOCK1),
                    BlockOption(exchange.block_number, more, exchange.szx).encode(),
                ),
            ]
            if exchange.block_number == 0:
                # RFC 7959 section 4: Size1 tells the server the body's size up front.
                options.append((int(OptionNumber.SIZE1), encode_uint(len(payload))))
            payload = payload[offset : offset + size]
        exchange.message_id = self.next_message_id()
        encoded = exchange.encoded_options
        exchange.datagram = encode_parts(
            MessageType.CON,
            exchange.code,
            exchange.message_id,
            token=exchange.token,
            options=encode_options(options)
            if encoded is None or exchange.szx is not None
            else encoded,
            payload=payload,
        )
        exchange.acknowledged = False
        exchange.attempt_retransmissions = 0
        # Section 4.2: the first timeout is random in [ACK_TIMEOUT, ACK_TIMEOUT *
        # ACK_RANDOM_FACTOR], so that many clients do not retransmit in step.
        exchange.timeout_s = self._ack_timeout_s * (
            1 + (self._ack_random_factor - 1) * self._random()
        )
        exchange.deadline_s = now_s + exchange.timeout_s
        self._outgoing.append(exchange.datagram)

    def _on_response(
        self, exchange: _Exchange, response: CoAPMessage, now_s: float
    ) -> list[ClientEvent]:
        if _unknown_critical(response):
            # Section 5.4.1: an unknown critical option in a response rejects it.
            failed = FailedEvent(exchange.exchange_id, "rejected", exchange.retransmissions)
            return self._finish(exchange, failed, now_s)
        if exchange.szx is not None and response.code == Code.CONTINUE:
            size = 1 << (exchange.szx + 4)
            offset = (exchange.block_number + 1) * size
            if offset < len(exchange.payload):
                try:
                    asked = response.block1
                except CoAPFormatError:
                    asked = None
                if asked is not None and asked.szx < exchange.szx:
                    # RFC 7959 section 2.5: the server may ask for smaller blocks; the
                    # next block number counts in the new size.
                    exchange.szx = asked.szx
                    size = 1 << (asked.szx + 4)
                exchange.block_number = offset // size
                self._transmit(exchange, now_s)
                return []
        return self._finish(
            exchange, ResponseEvent(exchange.exchange_id, response, exchange.retransmissions), now_s
        )

    def _finish(self, exchange: _Exchange, event: ClientEvent, now_s: float) -> list[ClientEvent]:
        del self._exchanges[exchange.exchange_id]
        while self._waiting and len(self._exchanges) < self._nstart:
            self._start(self._waiting.popleft(), now_s)
        return [event]


def _unknown_critical(message: CoAPMessage) -> bool:
    return any(is_critical(n) and n not in _KNOWN_OPTIONS for n, _ in message.options)


# --- server-side helpers --------------------------------------------------------------


def response_to(
    request: CoAPMessage,
    code: int,
    *,
    message_id: int,
    payload: bytes = b"",
    options: Iterable[Option] = (),
) -> CoAPMessage:
    """The response to ``request``: piggybacked on the ACK of a CON (section 5.2.1,
    same message id), or a NON answering a NON (section 5.2.3, with ``message_id``);
    the token is echoed either way (section 5.3.2)."""
    if request.type is MessageType.CON:
        return CoAPMessage(
            MessageType.ACK, code, request.message_id, request.token, tuple(options), payload
        )
    return CoAPMessage(MessageType.NON, code, message_id, request.token, tuple(options), payload)


class RecentResponses(Generic[PeerT]):
    """The last ``capacity`` responses sent, by (peer, message id): a request seen
    again (its ACK was lost) gets the same response, not a second execution (section
    4.5). Entries older than ``lifetime_s`` (EXCHANGE_LIFETIME, section 4.8.2) go."""

    __slots__ = ("_capacity", "_entries", "_lifetime_s")

    def __init__(self, capacity: int = 8, lifetime_s: float = 247.0) -> None:
        self._capacity = capacity
        self._lifetime_s = lifetime_s
        self._entries: OrderedDict[tuple[PeerT, int], tuple[float, bytes]] = OrderedDict()

    def get(self, peer: PeerT, message_id: int, now_s: float) -> bytes | None:
        found = self._entries.get((peer, message_id))
        if found is None or now_s - found[0] > self._lifetime_s:
            return None
        return found[1]

    def put(self, peer: PeerT, message_id: int, datagram: bytes, now_s: float) -> None:
        self._entries[(peer, message_id)] = (now_s, datagram)
        self._entries.move_to_end((peer, message_id))
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)


@dataclass(slots=True)
class _Observer(Generic[PeerT]):
    peer: PeerT
    token: bytes
    last_message_id: int = -1


@dataclass(slots=True)
class ObserverRegistry(Generic[PeerT]):
    """RFC 7641's server side for one resource: who observes it, and their
    notifications. A GET with Observe 0 registers (section 3.1), Observe 1 or a RST
    to a notification deregisters (3.6); a registration from a peer with the same
    token replaces the old one (4.1)."""

    sequence: int = 0
    observers: list[_Observer[PeerT]] = field(default_factory=list)

    def register(self, peer: PeerT, token: bytes) -> int:
        """Add (or renew) an observer; the Observe value for the first response."""
        self.deregister(peer, token)
        self.observers.append(_Observer(peer, token))
        return self.sequence

    def deregister(self, peer: PeerT, token: bytes) -> None:
        self.observers = [o for o in self.observers if not (o.peer == peer and o.token == token)]

    def reset_by(self, peer: PeerT, message_id: int) -> bool:
        """A RST from ``peer`` for ``message_id``: drop the observer it answers (section
        3.6). True if one was dropped."""
        before = len(self.observers)
        self.observers = [
            o for o in self.observers if not (o.peer == peer and o.last_message_id == message_id)
        ]
        return len(self.observers) != before

    def notifications(
        self,
        payload: bytes,
        *,
        next_message_id: Callable[[], int],
        content_format: int | None = None,
        confirmable: bool = False,
    ) -> list[tuple[PeerT, bytes]]:
        """A 2.05 notification for every observer, with the next sequence number
        (section 4.4: 24 bits, increasing). Non-confirmable unless ``confirmable``
        (section 4.5 leaves the choice to the server)."""
        if not self.observers:
            return []
        self.sequence = (self.sequence + 1) % _OBSERVE_MODULUS
        options: list[Option] = [(int(OptionNumber.OBSERVE), encode_uint(self.sequence))]
        if content_format is not None:
            options.append((int(OptionNumber.CONTENT_FORMAT), encode_uint(content_format)))
        mtype = MessageType.CON if confirmable else MessageType.NON
        sent = []
        for observer in self.observers:
            observer.last_message_id = next_message_id()
            message = CoAPMessage(
                mtype,
                Code.CONTENT,
                observer.last_message_id,
                observer.token,
                tuple(options),
                payload,
            )
            sent.append((observer.peer, encode(message)))
        return sent
