"""MQTT 3.1.1 and 5.0 control packets: typed values, an encoder and an incremental decoder.

Design
------
The codec is a functional core (STYLE.md §1): it never touches a socket or a clock.

* Every control packet is a frozen, slotted dataclass (``Publish``, ``PubAck``, ...). The
  same classes serve both protocol versions; fields that only MQTT 5 has (``properties``,
  reason codes on acknowledgements) keep their neutral defaults under 3.1.1, and the
  encoder refuses a 3.1.1 packet that would need them rather than silently dropping them.
* ``encode(packet, version)`` builds the bytes of one packet. ``encode_publish(...)`` is
  the hot path of a simulator (millions of PUBLISH packets): it takes the topic already
  encoded and the properties already encoded (``encode_properties``), builds no
  dataclass and returns exactly what ``encode(Publish(...))`` would.
* ``PacketReader`` is fed whatever the transport received, split anywhere, and returns
  the packets completed so far. It needs the protocol version to parse (an MQTT 5
  PUBACK differs from a 3.1.1 one); a broker-side reader starts without one and takes
  it from the first CONNECT.
* Properties are a ``Mapping[Property, value]``. One table, ``_PROPERTY_SPECS``, says for
  each property its wire type, the packets it may appear in, whether it may repeat and
  its legal range; the encoder and the decoder both read it, so they cannot drift apart.

Errors: anything malformed raises :class:`~iotix.errors.MQTTProtocolError` and nothing
else (never ``IndexError``, ``struct.error`` or ``UnicodeDecodeError``); ``reason_code`` is
the MQTT 5 reason code to disconnect with: 0x81 malformed packet, 0x82 protocol error,
0x84 unsupported protocol version (CONNECT), 0x90 topic name invalid, 0x95 packet too
large. The encoder raises the same error for a packet that it cannot put on the wire
validly, so that what it emits always decodes. Each rule cites the conformance statement
or section it implements: ``MQTT-x.y.z-n`` alone names an MQTT 5.0 statement,
``3.1.1 MQTT-x.y.z-n`` a 3.1.1 one, ``§`` a section without a numbered statement.

What the codec does not judge (the session's or broker's job): packet order (a second
CONNECT, a CONNACK before CONNECT), which side may send which packet, topic *filter*
syntax (MQTT 5 answers a bad filter with SUBACK 0x8F, not by disconnecting), reason-code
values, topic alias mapping, and an empty client id without clean start (a CONNACK
answer, not a malformed packet).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NamedTuple, TypeAlias

from iotix.errors import MQTTProtocolError

__all__ = [
    "NO_PROPERTIES",
    "Auth",
    "ConnAck",
    "Connect",
    "Disconnect",
    "Packet",
    "PacketReader",
    "PacketType",
    "PingReq",
    "PingResp",
    "Properties",
    "Property",
    "ProtocolVersion",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "SubAck",
    "Subscribe",
    "Subscription",
    "UnsubAck",
    "Unsubscribe",
    "Will",
    "encode",
    "encode_properties",
    "encode_publish",
]

# Reason codes this module raises with (MQTT 5 §2.4, Table 2-6).
_MALFORMED: Final = 0x81
_PROTOCOL_ERROR: Final = 0x82
_UNSUPPORTED_VERSION: Final = 0x84
_TOPIC_NAME_INVALID: Final = 0x90
_PACKET_TOO_LARGE: Final = 0x95

# The largest Remaining Length a four-byte Variable Byte Integer can carry (§1.5.5).
MAX_REMAINING_LENGTH: Final = 268_435_455


class PacketType(enum.IntEnum):
    """The control packet type, the high nibble of the first byte (§2.1.2)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15  # MQTT 5 only; reserved (forbidden) in 3.1.1 (3.1.1 §2.2.1)


class ProtocolVersion(enum.IntEnum):
    """The Protocol Level byte of CONNECT (3.1.1 §3.1.2.2, MQTT 5 §3.1.2.2)."""

    V311 = 4
    V5 = 5


class Property(enum.IntEnum):
    """MQTT 5 property identifiers (§2.2.2.2, Table 2-4)."""

    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


_V311: Final = ProtocolVersion.V311
_V5: Final = ProtocolVersion.V5

Properties: TypeAlias = Mapping[Property, Any]
"""Property values: ``int``, ``str`` or ``bytes`` by wire type; ``USER_PROPERTY`` is a
``tuple[tuple[str, str], ...]`` and ``SUBSCRIPTION_IDENTIFIER`` a ``tuple[int, ...]``
(both may repeat; the decoder always returns tuples for them)."""

NO_PROPERTIES: Final[Properties] = MappingProxyType({})
"""The shared, immutable empty property set: the default of every ``properties`` field."""


def _no_properties() -> Properties:
    # A factory only because dataclasses refuse a mapping as a plain default; every
    # packet shares the one empty mapping, so the default costs no allocation.
    return NO_PROPERTIES


# --------------------------------------------------------------------------------------
# Packets
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    """The Will Message carried in CONNECT (§3.1.2.5, §3.1.3.2-3.1.3.4)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=_no_properties)


@dataclass(frozen=True, slots=True)
class Connect:
    """CONNECT (§3.1). Encoded with its own ``version``, whatever the caller passes."""

    client_id: str
    keepalive_s: int = 60
    clean_start: bool = True  # "Clean Session" in 3.1.1
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    version: ProtocolVersion = ProtocolVersion.V311
    properties: Properties = field(default_factory=_no_properties)


@dataclass(frozen=True, slots=True)
class ConnAck:
    """CONNACK (§3.2). 3.1.1 return codes 0-5 travel in ``reason_code`` unchanged, also
    when a 5.0 reader meets a 3.1.1 refusal (see ``_decode_connack``)."""

    session_present: bool = False
    reason_code: int = 0
    properties: Properties = field(default_factory=_no_properties)


@dataclass(frozen=True, slots=True)
class Publish:
    """PUBLISH (§3.3). ``topic`` may be empty in MQTT 5 when a TOPIC_ALIAS is set."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = field(default_factory=_no_properties)


@dataclass(frozen=True, slots=True)
class _Ack:
    """The shape the four publish acknowledgements share (§3.4 to §3.7)."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=_no_properties)


@dataclass(frozen=True, slots=True)
class PubAck(_Ack):
    """PUBACK (§3.4): QoS 1 acknowledgement."""


@dataclass(frozen=True, slots=True)
class PubRec(_Ack):
    """PUBREC (§3.5): QoS 2, part 1."""


@dataclass(frozen=True, slots=True)
class PubRel(_Ack):
    """PUBREL (§3.6): QoS 2, part 2."""


@dataclass(frozen=True, slots=True)
class PubComp(_Ack):
    """PUBCOMP (§3.7): QoS 2, part 3."""


@dataclass(frozen=True, slots=True)
class Subscription:
    """One topic filter of SUBSCRIBE and its options (§3.8.3.1). 3.1.1 has only ``qos``."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True, slots=True)
class Subscribe:
    """SUBSCRIBE (§3.8)."""

    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = field(default_factory=_no_properties)


@dataclass(frozen=True, slots=True)
class SubAck:
    """SUBACK (§3.9): one reason code (3.1.1: return code) per subscription."""

    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = field(default_factory=_no_properties)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """UNSUBSCRIBE (§3.10)."""

    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = field(default_factory=_no_properties)


@dataclass(frozen=True, slots=True)
class UnsubAck:
    """UNSUBACK (§3.11). 3.1.1 UNSUBACK carries no reason codes: ``reason_codes == ()``."""

    packet_id: int
    reason_codes: tuple[int, ...] = ()
    properties: Properties = field(default_factory=_no_properties)


@dataclass(frozen=True, slots=True)
class PingReq:
    """PINGREQ (§3.12)."""


@dataclass(frozen=True, slots=True)
class PingResp:
    """PINGRESP (§3.13)."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """DISCONNECT (§3.14). 3.1.1 has neither reason code nor properties."""

    reason_code: int = 0
    properties: Properties = field(default_factory=_no_properties)


@dataclass(frozen=True, slots=True)
class Auth:
    """AUTH (§3.15), MQTT 5 only."""

    reason_code: int = 0
    properties: Properties = field(default_factory=_no_properties)


Packet: TypeAlias = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
    | Auth
)


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

# The low nibble of byte 1 that each type must carry; PUBLISH is absent because its nibble
# is DUP, QoS and RETAIN (§3.3.1). MQTT-2.1.3-1 / 3.1.1 MQTT-2.2.2-1: reserved bits MUST
# have exactly these values, and anything else is a Malformed Packet (3.1.1 MQTT-2.2.2-2:
# close the connection). Checking them byte by byte is what catches a desynchronised
# stream at its first byte rather than thirty packets later.
_RESERVED_FLAGS: Final[Mapping[int, int]] = {
    PacketType.CONNECT: 0b0000,
    PacketType.CONNACK: 0b0000,
    PacketType.PUBACK: 0b0000,
    PacketType.PUBREC: 0b0000,
    # 0b0010 on the three below is a relic of MQTT 3.1, where they were sent "at QoS 1";
    # 3.1.1 MQTT-3.6.1-1, MQTT-3.8.1-1, MQTT-3.10.1-1 (and MQTT 5 §3.6.1, §3.8.1, §3.10.1)
    # froze the bit pattern.
    PacketType.PUBREL: 0b0010,
    PacketType.PUBCOMP: 0b0000,
    PacketType.SUBSCRIBE: 0b0010,
    PacketType.SUBACK: 0b0000,
    PacketType.UNSUBSCRIBE: 0b0010,
    PacketType.UNSUBACK: 0b0000,
    PacketType.PINGREQ: 0b0000,
    PacketType.PINGRESP: 0b0000,
    PacketType.DISCONNECT: 0b0000,
    PacketType.AUTH: 0b0000,
}


def _valid_first_bytes(version: ProtocolVersion) -> frozenset[int]:
    """Every legal byte 1 of a fixed header, so the reader checks it with one lookup."""
    valid = {(ptype << 4) | flags for ptype, flags in _RESERVED_FLAGS.items()}
    if version is ProtocolVersion.V311:
        # 3.1.1 §2.2.1: type 15 is "Reserved, Forbidden"; AUTH is MQTT 5 only.
        valid.discard(PacketType.AUTH << 4)
    # PUBLISH: DUP (bit 3), QoS (bits 2-1), RETAIN (bit 0), but QoS 3 is malformed
    # (MQTT-3.3.1-4 / 3.1.1 MQTT-3.3.1-4) and so is DUP on QoS 0 (MQTT-3.3.1-2 /
    # 3.1.1 MQTT-3.3.1-2: "The DUP flag MUST be set to 0 for all QoS 0 messages").
    valid.update(
        0x30 | flags
        for flags in range(16)
        if (flags >> 1) & 0b11 != 0b11 and not (flags & 0b1000 and not flags & 0b0110)
    )
    return frozenset(valid)


_VALID_FIRST_BYTES: Final[Mapping[ProtocolVersion, frozenset[int]]] = {
    version: _valid_first_bytes(version) for version in ProtocolVersion
}

# A pseudo packet type for the Will Properties inside CONNECT's payload (§3.1.3.2), which
# have their own set of allowed properties ("Will Properties" column of Table 2-4).
_WILL: Final = 0


class _Kind(enum.Enum):
    """Wire data types of property values (§1.5, §2.2.2.2)."""

    BYTE = enum.auto()  # §1.5.1 (Table 2-4 calls it "Byte")
    TWO_BYTE_INTEGER = enum.auto()  # §1.5.2, big-endian
    FOUR_BYTE_INTEGER = enum.auto()  # §1.5.3, big-endian
    VARIABLE_BYTE_INTEGER = enum.auto()  # §1.5.5, 1-4 bytes
    BINARY_DATA = enum.auto()  # §1.5.6, two-byte length + bytes
    UTF8_STRING = enum.auto()  # §1.5.4, two-byte length + UTF-8
    UTF8_STRING_PAIR = enum.auto()  # §1.5.7, two UTF-8 strings


_INTEGER_MAXIMUM: Final[Mapping[_Kind, int]] = {
    _Kind.BYTE: 0xFF,
    _Kind.TWO_BYTE_INTEGER: 0xFFFF,
    _Kind.FOUR_BYTE_INTEGER: 0xFFFF_FFFF,
    _Kind.VARIABLE_BYTE_INTEGER: MAX_REMAINING_LENGTH,
}


class _PropertySpec(NamedTuple):
    prop: Property
    kind: _Kind
    allowed_in: frozenset[int]  # packet types (and _WILL) that may carry it
    repeatable_in: frozenset[int]  # where it may appear more than once
    minimum: int  # legal range of integer values; a value outside is a Protocol Error
    maximum: int


def _spec(
    prop: Property,
    kind: _Kind,
    *allowed_in: int,
    repeatable_in: tuple[int, ...] = (),
    minimum: int = 0,
    maximum: int | None = None,
) -> tuple[int, _PropertySpec]:
    top = _INTEGER_MAXIMUM.get(kind, 0) if maximum is None else maximum
    spec = _PropertySpec(prop, kind, frozenset(allowed_in), frozenset(repeatable_in), minimum, top)
    return int(prop), spec


_P = PacketType
_ALL_WITH_PROPERTIES: Final = (
    _P.CONNECT, _P.CONNACK, _P.PUBLISH, _WILL, _P.PUBACK, _P.PUBREC, _P.PUBREL,
    _P.PUBCOMP, _P.SUBSCRIBE, _P.SUBACK, _P.UNSUBSCRIBE, _P.UNSUBACK, _P.DISCONNECT,
    _P.AUTH,
)  # fmt: skip

# MQTT 5 §2.2.2.2, Table 2-4: identifier, type and the packets each property may appear
# in. Including a property where the table does not list it is a Protocol Error; so is
# including a single-valued property twice (every property section says "It is a Protocol
# Error to include X more than once"). Ranges come from each property's own section.
_PROPERTY_SPECS: Final[Mapping[int, _PropertySpec]] = dict(
    (
        # 0 = unspecified bytes, 1 = UTF-8 text; "any other value is a Protocol Error"
        # (§3.3.2.3.2, §3.1.3.2.3).
        _spec(Property.PAYLOAD_FORMAT_INDICATOR, _Kind.BYTE, _P.PUBLISH, _WILL, maximum=1),
        _spec(Property.MESSAGE_EXPIRY_INTERVAL, _Kind.FOUR_BYTE_INTEGER, _P.PUBLISH, _WILL),
        _spec(Property.CONTENT_TYPE, _Kind.UTF8_STRING, _P.PUBLISH, _WILL),
        _spec(Property.RESPONSE_TOPIC, _Kind.UTF8_STRING, _P.PUBLISH, _WILL),
        _spec(Property.CORRELATION_DATA, _Kind.BINARY_DATA, _P.PUBLISH, _WILL),
        # A PUBLISH sent to a client carries one identifier per matching subscription, so
        # it repeats there; in SUBSCRIBE it may appear once (§3.8.2.1.2). 0 is a Protocol
        # Error (§3.3.2.3.8, §3.8.2.1.2).
        _spec(
            Property.SUBSCRIPTION_IDENTIFIER,
            _Kind.VARIABLE_BYTE_INTEGER,
            _P.PUBLISH,
            _P.SUBSCRIBE,
            repeatable_in=(_P.PUBLISH,),
            minimum=1,
        ),
        _spec(
            Property.SESSION_EXPIRY_INTERVAL,
            _Kind.FOUR_BYTE_INTEGER,
            _P.CONNECT,
            _P.CONNACK,
            _P.DISCONNECT,
        ),
        _spec(Property.ASSIGNED_CLIENT_IDENTIFIER, _Kind.UTF8_STRING, _P.CONNACK),
        _spec(Property.SERVER_KEEP_ALIVE, _Kind.TWO_BYTE_INTEGER, _P.CONNACK),
        _spec(Property.AUTHENTICATION_METHOD, _Kind.UTF8_STRING, _P.CONNECT, _P.CONNACK, _P.AUTH),
        _spec(Property.AUTHENTICATION_DATA, _Kind.BINARY_DATA, _P.CONNECT, _P.CONNACK, _P.AUTH),
        # 0 or 1, anything else is a Protocol Error (§3.1.2.11.7).
        _spec(Property.REQUEST_PROBLEM_INFORMATION, _Kind.BYTE, _P.CONNECT, maximum=1),
        _spec(Property.WILL_DELAY_INTERVAL, _Kind.FOUR_BYTE_INTEGER, _WILL),
        # 0 or 1, anything else is a Protocol Error (§3.1.2.11.6).
        _spec(Property.REQUEST_RESPONSE_INFORMATION, _Kind.BYTE, _P.CONNECT, maximum=1),
        _spec(Property.RESPONSE_INFORMATION, _Kind.UTF8_STRING, _P.CONNACK),
        _spec(Property.SERVER_REFERENCE, _Kind.UTF8_STRING, _P.CONNACK, _P.DISCONNECT),
        # Every acknowledgement may explain itself; CONNECT, PUBLISH, SUBSCRIBE and
        # UNSUBSCRIBE are requests and have nothing to explain.
        _spec(
            Property.REASON_STRING,
            _Kind.UTF8_STRING,
            _P.CONNACK,
            _P.PUBACK,
            _P.PUBREC,
            _P.PUBREL,
            _P.PUBCOMP,
            _P.SUBACK,
            _P.UNSUBACK,
            _P.DISCONNECT,
            _P.AUTH,
        ),
        # 0 would forbid all QoS>0 traffic: a Protocol Error (§3.1.2.11.3, §3.2.2.3.3).
        _spec(Property.RECEIVE_MAXIMUM, _Kind.TWO_BYTE_INTEGER, _P.CONNECT, _P.CONNACK, minimum=1),
        _spec(Property.TOPIC_ALIAS_MAXIMUM, _Kind.TWO_BYTE_INTEGER, _P.CONNECT, _P.CONNACK),
        # Alias 0 is not permitted (§3.3.2.3.4: "A Topic Alias of 0 is not permitted").
        _spec(Property.TOPIC_ALIAS, _Kind.TWO_BYTE_INTEGER, _P.PUBLISH, minimum=1),
        # 0 or 1: a server supporting QoS 2 omits the property (§3.2.2.3.4).
        _spec(Property.MAXIMUM_QOS, _Kind.BYTE, _P.CONNACK, maximum=1),
        _spec(Property.RETAIN_AVAILABLE, _Kind.BYTE, _P.CONNACK, maximum=1),  # §3.2.2.3.5
        # Name/value pairs, may repeat and even repeat a name (§3.1.2.11.8): kept in order.
        _spec(
            Property.USER_PROPERTY,
            _Kind.UTF8_STRING_PAIR,
            *_ALL_WITH_PROPERTIES,
            repeatable_in=_ALL_WITH_PROPERTIES,
        ),
        # 0 is a Protocol Error (§3.1.2.11.4, §3.2.2.3.6).
        _spec(
            Property.MAXIMUM_PACKET_SIZE,
            _Kind.FOUR_BYTE_INTEGER,
            _P.CONNECT,
            _P.CONNACK,
            minimum=1,
        ),
        # The three "... Available" flags: 0 or 1, else a Protocol Error (§3.2.2.3.11-13).
        _spec(Property.WILDCARD_SUBSCRIPTION_AVAILABLE, _Kind.BYTE, _P.CONNACK, maximum=1),
        _spec(Property.SUBSCRIPTION_IDENTIFIER_AVAILABLE, _Kind.BYTE, _P.CONNACK, maximum=1),
        _spec(Property.SHARED_SUBSCRIPTION_AVAILABLE, _Kind.BYTE, _P.CONNACK, maximum=1),
    )
)
del _P

_CONTEXT_NAMES: Final[Mapping[int, str]] = {
    _WILL: "Will Properties",
    **{ptype: ptype.name for ptype in PacketType},
}

# --------------------------------------------------------------------------------------
# Primitive encoders
# --------------------------------------------------------------------------------------

_U16: Final = struct.Struct("!H").pack
_U32: Final = struct.Struct("!L").pack
_U32_FROM: Final = struct.Struct("!L").unpack_from
_HEADER_2: Final = struct.Struct("!BB").pack  # byte 1 + a one-byte Remaining Length
_HEADER_4: Final = struct.Struct("!BBH").pack  # ... + a two-byte field (packet id, length)
_SMALL_VBI: Final = tuple(bytes((value,)) for value in range(0x80))
_EMPTY_PROPERTY_BLOCK: Final = b"\x00"  # MQTT-2.2.2-1: no properties = Property Length 0
# §3.1.2.1: the Protocol Name is the UTF-8 string "MQTT", length prefix included.
_PROTOCOL_NAME: Final = b"\x00\x04MQTT"


def _error(message: str, reason_code: int = _MALFORMED) -> MQTTProtocolError:
    return MQTTProtocolError(message, reason_code=reason_code)


def _protocol_version(version: int) -> ProtocolVersion:
    """Accept a plain 4 or 5 too: the codec compares versions by identity."""
    if version is _V311 or version is _V5:
        return version
    try:
        return ProtocolVersion(version)
    except ValueError as exc:
        raise _error(f"unsupported protocol version {version!r}", _UNSUPPORTED_VERSION) from exc


def _encode_vbi(value: int) -> bytes:
    """§1.5.5 (3.1.1 §2.2.3): 7 bits per byte, least significant first, high bit = more."""
    if 0 <= value < 0x80:
        return _SMALL_VBI[value]
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise _error(f"{value} does not fit a Variable Byte Integer (0..{MAX_REMAINING_LENGTH})")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_str(text: str, what: str) -> bytes:
    if "\x00" in text:  # MQTT-1.5.4-2 / 3.1.1 MQTT-1.5.3-2
        raise _error(f"{what} contains U+0000")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: MQTT-1.5.4-1 / 3.1.1 MQTT-1.5.3-1
        raise _error(f"{what} is not valid UTF-8: {exc.reason}") from exc
    if len(raw) > 0xFFFF:  # §1.5.4: a two-byte length prefix
        raise _error(f"{what} is longer than 65,535 bytes")
    return _U16(len(raw)) + raw


def _encode_binary(data: bytes, what: str) -> bytes:
    if len(data) > 0xFFFF:  # §1.5.6: a two-byte length prefix
        raise _error(f"{what} is longer than 65,535 bytes")
    return _U16(len(data)) + bytes(data)


def _check_int(value: int, minimum: int, maximum: int, what: str, reason: int) -> int:
    if not minimum <= value <= maximum:
        raise _error(f"{what} must be in {minimum}..{maximum}, not {value}", reason)
    return value


def _encode_packet_id(packet_id: int | None) -> bytes:
    # MQTT-2.2.1-3 / 3.1.1 MQTT-2.3.1-1: packet identifiers are non-zero 16-bit integers.
    if packet_id is None or not 0 < packet_id <= 0xFFFF:
        raise _error(f"packet id must be in 1..65535, not {packet_id}", _PROTOCOL_ERROR)
    return _U16(packet_id)


def _encode_property_value(spec: _PropertySpec, value: Any) -> bytes:
    kind = spec.kind
    name = spec.prop.name
    if kind is _Kind.UTF8_STRING:
        return _encode_str(value, name)
    if kind is _Kind.BINARY_DATA:
        return _encode_binary(value, name)
    if kind is _Kind.UTF8_STRING_PAIR:
        key, text = value
        return _encode_str(key, f"{name} name") + _encode_str(text, f"{name} value")
    _check_int(value, spec.minimum, spec.maximum, name, _PROTOCOL_ERROR)
    if kind is _Kind.BYTE:
        return bytes((value,))
    if kind is _Kind.TWO_BYTE_INTEGER:
        return _U16(value)
    if kind is _Kind.FOUR_BYTE_INTEGER:
        return _U32(value)
    return _encode_vbi(value)


def _encode_property_block(properties: Properties, context: int) -> bytes:
    """Property Length + properties (§2.2.2), in ascending identifier order (as paho)."""
    if not properties:
        return _EMPTY_PROPERTY_BLOCK
    parts: list[bytes] = []
    for prop in sorted(properties):
        spec = _PROPERTY_SPECS.get(prop)
        if spec is None:
            raise _error(f"unknown property identifier {prop!r}")
        if context not in spec.allowed_in:
            raise _error(
                f"{spec.prop.name} is not allowed in {_CONTEXT_NAMES[context]}", _PROTOCOL_ERROR
            )
        value = properties[prop]
        ident = _SMALL_VBI[spec.prop]  # every identifier is below 0x80: one byte
        if spec.repeatable_in:  # multi-valued: a tuple of values (an int alone is accepted)
            values = (value,) if isinstance(value, int) else tuple(value)
            if len(values) > 1 and context not in spec.repeatable_in:
                raise _error(
                    f"{spec.prop.name} may appear only once in {_CONTEXT_NAMES[context]}",
                    _PROTOCOL_ERROR,
                )
            parts.extend(ident + _encode_property_value(spec, item) for item in values)
        else:
            parts.append(ident + _encode_property_value(spec, value))
    body = b"".join(parts)
    return _encode_vbi(len(body)) + body


def encode_properties(properties: Properties, packet_type: PacketType) -> bytes:
    """The MQTT 5 property block (Property Length included) of a packet of this type.

    Pass the result of ``encode_properties(props, PacketType.PUBLISH)`` as
    ``encode_publish(properties_bytes=...)``; compute it once when it does not change.
    """
    try:
        return _encode_property_block(properties, packet_type)
    except (ValueError, OverflowError, struct.error) as exc:  # e.g. a user property triple
        raise _error(f"cannot encode properties: {exc}") from exc


# --------------------------------------------------------------------------------------
# Packet encoders
# --------------------------------------------------------------------------------------


def _frame(first_byte: int, parts: list[bytes]) -> bytes:
    """Prefix a packet body with its fixed header (§2.1.1)."""
    body = b"".join(parts)
    if len(body) > MAX_REMAINING_LENGTH:  # §2.1.4 / 3.1.1 §2.2.3
        raise _error(f"packet body of {len(body)} bytes is too large", _PACKET_TOO_LARGE)
    return bytes((first_byte,)) + _encode_vbi(len(body)) + body


def _no_v311_properties(properties: Properties, what: str) -> None:
    if properties:
        raise _error(f"{what} properties need MQTT 5", _PROTOCOL_ERROR)


def encode_publish(
    topic: bytes,
    payload: bytes,
    *,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
    version: ProtocolVersion = ProtocolVersion.V311,
    properties_bytes: bytes = b"",
) -> bytes:
    """A PUBLISH packet from an already UTF-8 encoded topic: the hot path.

    ``properties_bytes`` is an MQTT 5 property block from :func:`encode_properties`
    (Property Length included); ``b""`` means no properties. The topic's UTF-8 validity
    is the caller's promise; everything cheap to check is checked, and the result is
    byte for byte what ``encode(Publish(...), version)`` returns.
    """
    if type(version) is not ProtocolVersion:  # a plain int would defeat `is _V5` below
        version = _protocol_version(version)
    if qos == 0:
        if packet_id is not None:  # MQTT-2.2.1-2 / 3.1.1 MQTT-2.3.1-5
            raise _error("a QoS 0 PUBLISH has no packet id", _PROTOCOL_ERROR)
        if dup:  # MQTT-3.3.1-2 / 3.1.1 MQTT-3.3.1-2
            raise _error("the DUP flag must be 0 for QoS 0")
        packet_id_bytes = b""
    elif 0 < qos < 3:
        packet_id_bytes = _encode_packet_id(packet_id)  # MQTT-2.2.1-3 / 3.1.1 MQTT-2.3.1-1
    else:  # MQTT-3.3.1-4 / 3.1.1 MQTT-3.3.1-4: QoS 3 is malformed
        raise _error(f"QoS must be 0, 1 or 2, not {qos}")
    # Membership of an int (memchr) is several times faster than of a 1-byte bytes here.
    if 0x2B in topic or 0x23 in topic:  # "+", "#": MQTT-3.3.2-2 / 3.1.1 MQTT-3.3.2-2
        raise _error("a topic name must not contain wildcards", _TOPIC_NAME_INVALID)
    if 0 in topic:  # MQTT-1.5.4-2 / 3.1.1 MQTT-1.5.3-2
        raise _error("the topic contains U+0000")
    topic_length = len(topic)
    if topic_length > 0xFFFF:
        raise _error("the topic is longer than 65,535 bytes")
    if version is _V5:
        properties_bytes = properties_bytes or _EMPTY_PROPERTY_BLOCK  # MQTT-2.2.2-1
        # §3.3.2.1: an empty topic is allowed only with a Topic Alias, which an empty
        # property block certainly lacks (a non-empty one is trusted).
        if not topic and properties_bytes == _EMPTY_PROPERTY_BLOCK:
            raise _error("an empty topic needs a TOPIC_ALIAS property", _PROTOCOL_ERROR)
    elif properties_bytes:
        raise _error("PUBLISH properties need MQTT 5", _PROTOCOL_ERROR)
    elif not topic:  # 3.1.1 MQTT-4.7.3-1: topic names are at least one character long
        raise _error("the topic name is empty", _PROTOCOL_ERROR)
    first_byte = 0x30 | (dup << 3) | (qos << 1) | retain  # §3.3.1
    remaining = 2 + topic_length + len(packet_id_bytes) + len(properties_bytes) + len(payload)
    if remaining < 0x80:
        header = _HEADER_4(first_byte, remaining, topic_length)
    elif remaining <= MAX_REMAINING_LENGTH:
        header = bytes((first_byte,)) + _encode_vbi(remaining) + _U16(topic_length)
    else:
        raise _error(f"PUBLISH of {remaining} bytes is too large", _PACKET_TOO_LARGE)
    return b"".join((header, topic, packet_id_bytes, properties_bytes, payload))


class QoS0Frames:
    """QoS 0 PUBLISH packets from pieces encoded once, for senders of many messages.

    A topic is checked and encoded once by the caller (:meth:`topic_part`, kept per
    device), and the fixed headers of
    packets up to 2 KiB come from a table (:meth:`header`), so a packet costs two
    look-ups: ``header(len(part) + len(payload), retain=r) + part + payload`` is byte
    for byte what :func:`encode_publish` returns. MQTT 5 packets carry an empty
    property block (no topic alias: the full topic every time).
    """

    __slots__ = ("_headers", "_v5")

    TABLE_SIZE: Final = 0x800  # 2 KiB: a header each, 64 KiB a table (a worker has two)

    def __init__(self, version: ProtocolVersion = ProtocolVersion.V311) -> None:
        self._v5 = _protocol_version(version) is _V5
        self._headers: dict[bool, list[bytes]] = {}

    def topic_part(self, topic: str) -> bytes:
        """The topic name as it follows the fixed header (length, UTF-8, and in MQTT 5
        the empty property block). Raises :class:`MQTTProtocolError` for a topic no
        PUBLISH may carry. The caller keeps it: nothing is cached here."""
        try:
            encoded = topic.encode()
        except UnicodeEncodeError:  # a lone surrogate: MQTT-1.5.4-1 / 3.1.1 MQTT-1.5.3-1
            raise _error("the topic is not valid UTF-8") from None
        version = _V5 if self._v5 else ProtocolVersion.V311
        encode_publish(encoded, b"", version=version)  # the checks, once per topic
        return _U16(len(encoded)) + encoded + (_EMPTY_PROPERTY_BLOCK if self._v5 else b"")

    def headers(self, *, retain: bool) -> list[bytes]:
        """The fixed headers of packets whose remaining length is below TABLE_SIZE,
        indexed by that length."""
        table = self._headers.get(retain)
        if table is None:
            first = 0x30 | retain
            table = [bytes((first,)) + _encode_vbi(size) for size in range(self.TABLE_SIZE)]
            self._headers[retain] = table
        return table

    def header(self, remaining: int, *, retain: bool) -> bytes:
        """The fixed header of a packet of any size."""
        if remaining < self.TABLE_SIZE:
            return self.headers(retain=retain)[remaining]
        if remaining > MAX_REMAINING_LENGTH:
            raise _error(f"PUBLISH of {remaining} bytes is too large", _PACKET_TOO_LARGE)
        return bytes((0x30 | retain,)) + _encode_vbi(remaining)


def _encode_connect(packet: Connect) -> bytes:
    # MQTT-3.1.2-2 / 3.1.1 MQTT-3.1.2-2: only levels 4 and 5 are spoken here.
    version = _protocol_version(packet.version)
    flags = 0x02 if packet.clean_start else 0x00  # bit 0 stays 0: MQTT-3.1.2-3
    will = packet.will
    if will is not None:
        # MQTT-3.1.2-12 / 3.1.1 MQTT-3.1.2-14: a Will QoS of 3 is malformed.
        _check_int(will.qos, 0, 2, "Will QoS", _MALFORMED)
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if packet.password is not None:
        if version is _V311 and packet.username is None:
            # 3.1.1 MQTT-3.1.2-22: no password without a user name (MQTT 5 lifted this).
            raise _error("MQTT 3.1.1 allows a password only with a user name")
        flags |= 0x40
    if packet.username is not None:
        flags |= 0x80
    _check_int(packet.keepalive_s, 0, 0xFFFF, "keep alive", _MALFORMED)
    parts = [_PROTOCOL_NAME, bytes((version, flags)), _U16(packet.keepalive_s)]
    if version is _V5:
        parts.append(_encode_property_block(packet.properties, PacketType.CONNECT))
    else:
        _no_v311_properties(packet.properties, "CONNECT")
    # §3.1.3: payload order is client id, will properties, will topic, will payload,
    # user name, password.
    parts.append(_encode_str(packet.client_id, "client id"))
    if will is not None:
        if version is _V5:
            parts.append(_encode_property_block(will.properties, _WILL))
        else:
            _no_v311_properties(will.properties, "Will")
        parts.append(_encode_str(will.topic, "Will topic"))
        parts.append(_encode_binary(will.payload, "Will payload"))
    if packet.username is not None:
        parts.append(_encode_str(packet.username, "user name"))
    if packet.password is not None:
        parts.append(_encode_binary(packet.password, "password"))
    return _frame(0x10, parts)


def _encode_connack(packet: ConnAck, version: ProtocolVersion) -> bytes:
    reason_code = _check_int(packet.reason_code, 0, 0xFF, "reason code", _MALFORMED)
    if packet.session_present and reason_code:
        # MQTT 5 §3.2.2.1.1 / 3.1.1 MQTT-3.2.2-4: a refused connection has no session.
        raise _error("session present on a refused connection", _PROTOCOL_ERROR)
    flags = 0x01 if packet.session_present else 0x00
    if version is _V311:
        _no_v311_properties(packet.properties, "CONNACK")
        return _HEADER_4(0x20, 2, (flags << 8) | reason_code)
    props = _encode_property_block(packet.properties, PacketType.CONNACK)
    return _frame(0x20, [bytes((flags, reason_code)), props])


def _encode_ack(
    first_byte: int,
    ptype: PacketType,
    packet: PubAck | PubRec | PubRel | PubComp,
    version: ProtocolVersion,
) -> bytes:
    packet_id = packet.packet_id
    if not 0 < packet_id <= 0xFFFF:  # MQTT-2.2.1-3 / 3.1.1 MQTT-2.3.1-1
        raise _error(f"packet id must be in 1..65535, not {packet_id}", _PROTOCOL_ERROR)
    reason_code = packet.reason_code
    properties = packet.properties
    if not properties and not reason_code:
        # MQTT 5 §3.4.2.1 (and §3.5.2.1, §3.6.2.1, §3.7.2.1): Reason Code and Property
        # Length may be omitted for success without properties - which is also exactly the
        # 3.1.1 packet. Brokers send this short form; so do we.
        return _HEADER_4(first_byte, 2, packet_id)
    if version is _V311:
        _no_v311_properties(properties, ptype.name)
        raise _error(f"{ptype.name} reason codes need MQTT 5", _PROTOCOL_ERROR)
    _check_int(reason_code, 0, 0xFF, "reason code", _MALFORMED)
    if not properties:
        # §3.4.2.2.1: "If the Remaining Length is less than 4 there is no Property Length".
        return _HEADER_4(first_byte, 3, packet_id) + bytes((reason_code,))
    props = _encode_property_block(properties, ptype)
    return _frame(first_byte, [_U16(packet_id), bytes((reason_code,)), props])


def _encode_subscribe(packet: Subscribe, version: ProtocolVersion) -> bytes:
    if not packet.subscriptions:  # MQTT-3.8.3-2 / 3.1.1 MQTT-3.8.3-3
        raise _error("SUBSCRIBE needs at least one subscription", _PROTOCOL_ERROR)
    parts = [_encode_packet_id(packet.packet_id)]
    if version is _V5:
        parts.append(_encode_property_block(packet.properties, PacketType.SUBSCRIBE))
    else:
        _no_v311_properties(packet.properties, "SUBSCRIBE")
    for sub in packet.subscriptions:
        parts.append(_encode_str(sub.topic_filter, "topic filter"))
        _check_int(sub.qos, 0, 2, "subscription QoS", _MALFORMED)  # MQTT-3.8.3-5 / 3-8.3-4
        options = sub.qos
        if version is _V5:
            # §3.8.3.1: bits 2 No Local, 3 Retain As Published, 4-5 Retain Handling (3 is
            # a Protocol Error), 6-7 reserved.
            _check_int(sub.retain_handling, 0, 2, "retain handling", _PROTOCOL_ERROR)
            if sub.no_local and sub.topic_filter.startswith("$share/"):  # MQTT-3.8.3-4
                raise _error("No Local on a shared subscription", _PROTOCOL_ERROR)
            options |= (
                (0x04 if sub.no_local else 0)
                | (0x08 if sub.retain_as_published else 0)
                | (sub.retain_handling << 4)
            )
        elif sub.no_local or sub.retain_as_published or sub.retain_handling:
            # 3.1.1 MQTT-3-8.3-4: the upper six bits of "Requested QoS" are reserved.
            raise _error("subscription options other than QoS need MQTT 5", _PROTOCOL_ERROR)
        parts.append(bytes((options,)))
    return _frame(0x82, parts)


def _encode_reason_codes(reason_codes: tuple[int, ...]) -> bytes:
    for code in reason_codes:
        _check_int(code, 0, 0xFF, "reason code", _MALFORMED)
    return bytes(reason_codes)


def _encode_suback(packet: SubAck, version: ProtocolVersion) -> bytes:
    parts = [_encode_packet_id(packet.packet_id)]
    if version is _V5:
        parts.append(_encode_property_block(packet.properties, PacketType.SUBACK))
    else:
        _no_v311_properties(packet.properties, "SUBACK")
    parts.append(_encode_reason_codes(packet.reason_codes))
    return _frame(0x90, parts)


def _encode_unsubscribe(packet: Unsubscribe, version: ProtocolVersion) -> bytes:
    if not packet.topic_filters:  # MQTT-3.10.3-2 / 3.1.1 MQTT-3.10.3-2
        raise _error("UNSUBSCRIBE needs at least one topic filter", _PROTOCOL_ERROR)
    parts = [_encode_packet_id(packet.packet_id)]
    if version is _V5:
        parts.append(_encode_property_block(packet.properties, PacketType.UNSUBSCRIBE))
    else:
        _no_v311_properties(packet.properties, "UNSUBSCRIBE")
    parts.extend(_encode_str(topic_filter, "topic filter") for topic_filter in packet.topic_filters)
    return _frame(0xA2, parts)


def _encode_unsuback(packet: UnsubAck, version: ProtocolVersion) -> bytes:
    parts = [_encode_packet_id(packet.packet_id)]
    if version is _V5:
        parts.append(_encode_property_block(packet.properties, PacketType.UNSUBACK))
        parts.append(_encode_reason_codes(packet.reason_codes))
    else:
        _no_v311_properties(packet.properties, "UNSUBACK")
        if packet.reason_codes:  # 3.1.1 §3.11.3: "The UNSUBACK Packet has no payload"
            raise _error("UNSUBACK reason codes need MQTT 5", _PROTOCOL_ERROR)
    return _frame(0xB0, parts)


def _encode_disconnect_or_auth(
    first_byte: int, ptype: PacketType, packet: Disconnect | Auth, version: ProtocolVersion
) -> bytes:
    reason_code = packet.reason_code
    properties = packet.properties
    if not reason_code and not properties:
        # MQTT 5 §3.14.2.1, §3.15.2.1: a Remaining Length of 0 means success, no properties;
        # the only 3.1.1 DISCONNECT there is.
        return _HEADER_2(first_byte, 0)
    if version is _V311:
        _no_v311_properties(properties, ptype.name)
        raise _error(f"{ptype.name} reason codes need MQTT 5", _PROTOCOL_ERROR)
    _check_int(reason_code, 0, 0xFF, "reason code", _MALFORMED)
    if not properties and ptype is PacketType.DISCONNECT:
        # §3.14.2.2.1: "If the Remaining Length is less than 2, a value of 0 is used" for
        # the Property Length. AUTH has no such clause, so it always sends both.
        return _HEADER_2(first_byte, 1) + bytes((reason_code,))
    props = _encode_property_block(properties, ptype)
    return _frame(first_byte, [bytes((reason_code,)), props])


_PINGREQ_BYTES: Final = b"\xc0\x00"
_PINGRESP_BYTES: Final = b"\xd0\x00"


def encode(packet: Packet, version: ProtocolVersion) -> bytes:
    """The bytes of one packet. ``Connect`` is encoded with its own ``version``."""
    version = _protocol_version(version)
    try:
        match packet:
            case Publish():
                if version is _V5:
                    # MQTT 5 §3.3.2.1: an empty topic name is legal only with a Topic Alias.
                    if not packet.topic and Property.TOPIC_ALIAS not in packet.properties:
                        raise _error("an empty topic needs a TOPIC_ALIAS", _PROTOCOL_ERROR)
                    props = _encode_property_block(packet.properties, PacketType.PUBLISH)
                else:
                    _no_v311_properties(packet.properties, "PUBLISH")
                    props = b""
                return encode_publish(
                    _encode_str(packet.topic, "topic")[2:],
                    packet.payload,
                    qos=packet.qos,
                    retain=packet.retain,
                    dup=packet.dup,
                    packet_id=packet.packet_id,
                    version=version,
                    properties_bytes=props,
                )
            case PubAck():
                return _encode_ack(0x40, PacketType.PUBACK, packet, version)
            case PubRec():
                return _encode_ack(0x50, PacketType.PUBREC, packet, version)
            case PubRel():
                return _encode_ack(0x62, PacketType.PUBREL, packet, version)
            case PubComp():
                return _encode_ack(0x70, PacketType.PUBCOMP, packet, version)
            case PingReq():
                return _PINGREQ_BYTES
            case PingResp():
                return _PINGRESP_BYTES
            case Connect():
                return _encode_connect(packet)
            case ConnAck():
                return _encode_connack(packet, version)
            case Subscribe():
                return _encode_subscribe(packet, version)
            case SubAck():
                return _encode_suback(packet, version)
            case Unsubscribe():
                return _encode_unsubscribe(packet, version)
            case UnsubAck():
                return _encode_unsuback(packet, version)
            case Disconnect():
                return _encode_disconnect_or_auth(0xE0, PacketType.DISCONNECT, packet, version)
            case Auth():
                if version is _V311:  # 3.1.1 §2.2.1: packet type 15 is forbidden
                    raise _error("AUTH needs MQTT 5", _PROTOCOL_ERROR)
                return _encode_disconnect_or_auth(0xF0, PacketType.AUTH, packet, version)
    except (ValueError, OverflowError, struct.error) as exc:
        # A value out of range slipped past the explicit checks (an int too large for
        # struct, a non-byte reason code): report it in the one error type.
        raise _error(f"cannot encode {type(packet).__name__}: {exc}") from exc
    raise _error(f"not an MQTT packet: {type(packet).__name__}", _PROTOCOL_ERROR)


# --------------------------------------------------------------------------------------
# Primitive decoders: each reads from data[pos:end] and returns (value, new position).
# `end` is the end of the packet (or of the property block), never of the buffer, so a
# length prefix cannot reach into the next packet.
# --------------------------------------------------------------------------------------


def _truncated(what: str) -> MQTTProtocolError:
    return _error(f"{what} runs past the end of its packet")


def _decode_vbi(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    # §1.5.5 / 3.1.1 §2.2.3: at most four bytes. A non-minimal encoding (MQTT-1.5.5-1 asks
    # senders for the shortest) is still unambiguous, so it is accepted.
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= end:
            raise _truncated(what)
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise _error(f"{what}: a Variable Byte Integer has at most four bytes")


def _decode_u16(data: bytes, pos: int, end: int, what: str) -> int:
    if pos + 2 > end:
        raise _truncated(what)
    return (data[pos] << 8) | data[pos + 1]


def _decode_packet_id(data: bytes, pos: int, end: int) -> tuple[int, int]:
    packet_id = _decode_u16(data, pos, end, "packet id")
    if packet_id == 0:  # MQTT-2.2.1-3 / 3.1.1 MQTT-2.3.1-1: packet ids are non-zero
        raise _error("packet id 0", _PROTOCOL_ERROR)
    return packet_id, pos + 2


def _decode_binary(data: bytes, pos: int, end: int, what: str) -> tuple[bytes, int]:
    stop = pos + 2 + _decode_u16(data, pos, end, what)  # §1.5.6
    if stop > end:
        raise _truncated(what)
    return data[pos + 2 : stop], stop


def _decode_str(data: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    raw, pos = _decode_binary(data, pos, end, what)  # §1.5.4: same framing as binary data
    try:
        # Python's strict UTF-8 codec refuses overlong forms, surrogates (U+D800..U+DFFF)
        # and code points above U+10FFFF: MQTT-1.5.4-1 / 3.1.1 MQTT-1.5.3-1. A BOM is kept,
        # never stripped (MQTT-1.5.4-3 / 3.1.1 MQTT-1.5.3-3).
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(f"{what} is not valid UTF-8: {exc.reason}") from exc
    # Only the byte 0x00 decodes to U+0000 (the overlong C0 80 was refused above).
    if "\x00" in text:  # MQTT-1.5.4-2 / 3.1.1 MQTT-1.5.3-2
        raise _error(f"{what} contains U+0000")
    return text, pos


def _decode_property_int(spec: _PropertySpec, data: bytes, pos: int, stop: int) -> tuple[int, int]:
    kind = spec.kind
    name = spec.prop.name
    if kind is _Kind.BYTE:
        if pos >= stop:
            raise _truncated(name)
        value = data[pos]
        pos += 1
    elif kind is _Kind.TWO_BYTE_INTEGER:
        value = _decode_u16(data, pos, stop, name)
        pos += 2
    elif kind is _Kind.FOUR_BYTE_INTEGER:
        if pos + 4 > stop:
            raise _truncated(name)
        value = _U32_FROM(data, pos)[0]
        pos += 4
    else:
        value, pos = _decode_vbi(data, pos, stop, name)
    if not spec.minimum <= value <= spec.maximum:  # the range in each property's section
        raise _error(f"{name} of {value} is not allowed", _PROTOCOL_ERROR)
    return value, pos


def _decode_properties(data: bytes, pos: int, end: int, context: int) -> tuple[Properties, int]:
    """A property block (§2.2.2): Property Length, then identifier/value pairs."""
    length, pos = _decode_vbi(data, pos, end, "property length")
    stop = pos + length
    if stop > end:  # §2.2.2.1: the properties must fit in the packet
        raise _truncated("property length")
    if not length:
        return NO_PROPERTIES, pos
    props: dict[Property, Any] = {}
    while pos < stop:
        ident, pos = _decode_vbi(data, pos, stop, "property identifier")
        spec = _PROPERTY_SPECS.get(ident)
        if spec is None:  # §2.2.2.2: only the identifiers of Table 2-4 exist
            raise _error(f"unknown property identifier 0x{ident:02x}")
        prop = spec.prop
        if context not in spec.allowed_in:  # §2.2.2.2, Table 2-4
            raise _error(
                f"{prop.name} is not allowed in {_CONTEXT_NAMES[context]}", _PROTOCOL_ERROR
            )
        kind = spec.kind
        value: Any
        if kind is _Kind.UTF8_STRING:
            value, pos = _decode_str(data, pos, stop, prop.name)
        elif kind is _Kind.BINARY_DATA:
            value, pos = _decode_binary(data, pos, stop, prop.name)
        elif kind is _Kind.UTF8_STRING_PAIR:  # MQTT-1.5.7-1: both halves are UTF-8 strings
            key, pos = _decode_str(data, pos, stop, f"{prop.name} name")
            text, pos = _decode_str(data, pos, stop, f"{prop.name} value")
            value = (key, text)
        else:
            value, pos = _decode_property_int(spec, data, pos, stop)
        if spec.repeatable_in:
            previous = props.get(prop, ())
            if previous and context not in spec.repeatable_in:
                raise _error(
                    f"{prop.name} more than once in {_CONTEXT_NAMES[context]}", _PROTOCOL_ERROR
                )
            props[prop] = (*previous, value)
        elif prop in props:  # "It is a Protocol Error to include X more than once"
            raise _error(f"{prop.name} more than once", _PROTOCOL_ERROR)
        else:
            props[prop] = value
    return MappingProxyType(props), pos


def _expect_end(pos: int, end: int, what: str) -> None:
    # A packet is exactly its Remaining Length: bytes left over mean the sender and we
    # disagree on its layout, i.e. it is malformed (MQTT 5 §1.2 "Malformed Packet").
    if pos != end:
        raise _error(f"{end - pos} unexpected bytes at the end of {what}")


# --------------------------------------------------------------------------------------
# Packet decoders: (byte 1, data, start of the variable header, end of packet, version)
# --------------------------------------------------------------------------------------


def _decode_connect(data: bytes, pos: int, end: int, expected: ProtocolVersion | None) -> Connect:
    name, pos = _decode_str(data, pos, end, "protocol name")
    if pos >= end:
        raise _truncated("protocol level")
    level = data[pos]
    pos += 1
    if name != "MQTT" or level not in (4, 5):
        # MQTT-3.1.2-1, MQTT-3.1.2-2 / 3.1.1 MQTT-3.1.2-1, -2: a broker answers 0x84
        # (3.1.1: return code 1) and closes. MQTT 3.1 ("MQIsdp", level 3) lands here too.
        raise _error(f"unsupported protocol {name!r} level {level}", _UNSUPPORTED_VERSION)
    version = ProtocolVersion(level)
    if expected is not None and version is not expected:
        raise _error(f"CONNECT for {version.name}, expected {expected.name}", _UNSUPPORTED_VERSION)
    if pos >= end:
        raise _truncated("connect flags")
    flags = data[pos]
    if flags & 0x01:  # MQTT-3.1.2-3 / 3.1.1 MQTT-3.1.2-3: the reserved flag must be 0
        raise _error("CONNECT reserved flag is set")
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if will_qos == 3:  # MQTT-3.1.2-12 / 3.1.1 MQTT-3.1.2-14
        raise _error("Will QoS 3")
    if not will_flag and (will_qos or will_retain):
        # MQTT-3.1.2-11, -13 / 3.1.1 MQTT-3.1.2-13, -15: no will, no will QoS or retain.
        raise _error("Will QoS or Will Retain set without a Will")
    has_password = flags & 0x40
    has_username = flags & 0x80
    if has_password and not has_username and version is _V311:
        raise _error("a password without a user name")  # 3.1.1 MQTT-3.1.2-22
    keepalive_s = _decode_u16(data, pos + 1, end, "keep alive")
    pos += 3
    properties = NO_PROPERTIES
    if version is _V5:
        properties, pos = _decode_properties(data, pos, end, PacketType.CONNECT)
    client_id, pos = _decode_str(data, pos, end, "client id")  # MQTT-3.1.3-3 / 3.1.1 -3
    will = None
    if will_flag:
        will_properties = NO_PROPERTIES
        if version is _V5:
            will_properties, pos = _decode_properties(data, pos, end, _WILL)
        will_topic, pos = _decode_str(data, pos, end, "Will topic")
        will_payload, pos = _decode_binary(data, pos, end, "Will payload")
        will = Will(will_topic, will_payload, will_qos, will_retain, will_properties)
    username = None
    if has_username:
        username, pos = _decode_str(data, pos, end, "user name")
    password = None
    if has_password:
        password, pos = _decode_binary(data, pos, end, "password")
    _expect_end(pos, end, "CONNECT")
    return Connect(
        client_id,
        keepalive_s,
        bool(flags & 0x02),
        username,
        password,
        will,
        version,
        properties,
    )


def _decode_connect_known(
    first_byte: int,  # noqa: ARG001  # the uniform decoder signature
    data: bytes,
    pos: int,
    end: int,
    version: ProtocolVersion,
) -> Connect:
    return _decode_connect(data, pos, end, version)


def _decode_connack(
    first_byte: int,  # noqa: ARG001  # the uniform decoder signature
    data: bytes,
    pos: int,
    end: int,
    version: ProtocolVersion,
) -> ConnAck:
    if pos + 2 > end:
        raise _truncated("CONNACK")
    flags = data[pos]
    reason_code = data[pos + 1]
    if flags & 0xFE:  # MQTT 5 §3.2.2.1 / 3.1.1 §3.2.2.1: bits 7-1 are reserved, 0
        raise _error("CONNACK reserved flags are set")
    if flags and reason_code:  # MQTT 5 §3.2.2.1.1 / 3.1.1 MQTT-3.2.2-4
        raise _error("session present on a refused connection", _PROTOCOL_ERROR)
    pos += 2
    properties = NO_PROPERTIES
    if version is _V5 and not (pos == end and reason_code):
        properties, pos = _decode_properties(data, pos, end, PacketType.CONNACK)
    # Else, under 5.0, a 3.1.1 CONNACK refusing the connection: no Property Length. A
    # server without 5.0 answers a 5.0 CONNECT with return code 1, unacceptable protocol
    # level (3.1.1 MQTT-3.1.2-2), in its own version's layout; the session reads the
    # code as the 3.1.1 code it is. An acceptance (code 0) has no such excuse.
    _expect_end(pos, end, "CONNACK")
    return ConnAck(bool(flags), reason_code, properties)


def _decode_publish(
    first_byte: int, data: bytes, pos: int, end: int, version: ProtocolVersion
) -> Publish:
    # QoS 3 and DUP on QoS 0 were refused with byte 1 (_VALID_FIRST_BYTES).
    qos = (first_byte >> 1) & 0x03
    topic, pos = _decode_str(data, pos, end, "topic")  # MQTT-3.3.2-1 / 3.1.1 MQTT-3.3.2-1
    if "+" in topic or "#" in topic:  # MQTT-3.3.2-2 / 3.1.1 MQTT-3.3.2-2
        raise _error(f"wildcard in topic name {topic!r}", _TOPIC_NAME_INVALID)
    packet_id = None
    if qos:  # MQTT-2.2.1-2 / 3.1.1 MQTT-2.3.1-5: only QoS 1 and 2 carry a packet id
        packet_id, pos = _decode_packet_id(data, pos, end)
    properties = NO_PROPERTIES
    if version is _V5:
        properties, pos = _decode_properties(data, pos, end, PacketType.PUBLISH)
        if not topic and Property.TOPIC_ALIAS not in properties:
            # MQTT 5 §3.3.2.1: "It is a Protocol Error if the Topic Name is zero length and
            # there is no Topic Alias".
            raise _error("empty topic without a Topic Alias", _PROTOCOL_ERROR)
    elif not topic:  # 3.1.1 MQTT-4.7.3-1: topic names are at least one character long
        raise _error("empty topic name", _PROTOCOL_ERROR)
    return Publish(
        topic,
        data[pos:end],
        qos,
        bool(first_byte & 0x01),
        bool(first_byte & 0x08),
        packet_id,
        properties,
    )


def _decode_ack(
    first_byte: int, data: bytes, pos: int, end: int, version: ProtocolVersion
) -> PubAck | PubRec | PubRel | PubComp:
    cls = _ACK_CLASSES[first_byte >> 4]
    packet_id, pos = _decode_packet_id(data, pos, end)
    if pos == end:
        # 3.1.1 §3.4.2 (and 3.5-3.7): packet id only. MQTT 5 §3.4.2.1: the same short
        # form means success without properties.
        return cls(packet_id)
    if version is _V311:
        raise _error(f"{cls.__name__} longer than 2 bytes")
    reason_code = data[pos]
    pos += 1
    properties = NO_PROPERTIES
    if pos < end:  # §3.4.2.2.1: "less than 4" bytes means no Property Length
        properties, pos = _decode_properties(data, pos, end, first_byte >> 4)
    _expect_end(pos, end, cls.__name__)
    return cls(packet_id, reason_code, properties)


_ACK_CLASSES: Final[Mapping[int, type[PubAck | PubRec | PubRel | PubComp]]] = {
    PacketType.PUBACK: PubAck,
    PacketType.PUBREC: PubRec,
    PacketType.PUBREL: PubRel,
    PacketType.PUBCOMP: PubComp,
}


def _decode_subscribe(
    first_byte: int,  # noqa: ARG001  # the uniform decoder signature
    data: bytes,
    pos: int,
    end: int,
    version: ProtocolVersion,
) -> Subscribe:
    packet_id, pos = _decode_packet_id(data, pos, end)
    properties = NO_PROPERTIES
    if version is _V5:
        properties, pos = _decode_properties(data, pos, end, PacketType.SUBSCRIBE)
    subscriptions = []
    while pos < end:
        topic_filter, pos = _decode_str(data, pos, end, "topic filter")  # MQTT-3.8.3-1
        if pos >= end:
            raise _truncated("subscription options")
        options = data[pos]
        pos += 1
        qos = options & 0x03
        if qos == 3:  # MQTT 5 §3.8.3.1 / 3.1.1 MQTT-3-8.3-4: QoS 3 is malformed
            raise _error("subscription QoS 3")
        if version is _V311:
            if options & 0xFC:  # 3.1.1 MQTT-3-8.3-4: the upper six bits are reserved
                raise _error("reserved bits set in the requested QoS")
            subscriptions.append(Subscription(topic_filter, qos))
            continue
        if options & 0xC0:  # MQTT-3.8.3-5: bits 6 and 7 are reserved
            raise _error("reserved bits set in the subscription options")
        retain_handling = (options >> 4) & 0x03
        if retain_handling == 3:  # §3.8.3.1: "a Protocol Error to send 3"
            raise _error("retain handling 3", _PROTOCOL_ERROR)
        no_local = bool(options & 0x04)
        if no_local and topic_filter.startswith("$share/"):  # MQTT-3.8.3-4
            raise _error("No Local on a shared subscription", _PROTOCOL_ERROR)
        subscriptions.append(
            Subscription(topic_filter, qos, no_local, bool(options & 0x08), retain_handling)
        )
    if not subscriptions:  # MQTT-3.8.3-2 / 3.1.1 MQTT-3.8.3-3
        raise _error("SUBSCRIBE without subscriptions", _PROTOCOL_ERROR)
    return Subscribe(packet_id, tuple(subscriptions), properties)


def _decode_suback(
    first_byte: int,  # noqa: ARG001  # the uniform decoder signature
    data: bytes,
    pos: int,
    end: int,
    version: ProtocolVersion,
) -> SubAck:
    packet_id, pos = _decode_packet_id(data, pos, end)
    properties = NO_PROPERTIES
    if version is _V5:
        properties, pos = _decode_properties(data, pos, end, PacketType.SUBACK)
    return SubAck(packet_id, tuple(data[pos:end]), properties)  # §3.9.3: one byte each


def _decode_unsubscribe(
    first_byte: int,  # noqa: ARG001  # the uniform decoder signature
    data: bytes,
    pos: int,
    end: int,
    version: ProtocolVersion,
) -> Unsubscribe:
    packet_id, pos = _decode_packet_id(data, pos, end)
    properties = NO_PROPERTIES
    if version is _V5:
        properties, pos = _decode_properties(data, pos, end, PacketType.UNSUBSCRIBE)
    topic_filters = []
    while pos < end:
        topic_filter, pos = _decode_str(data, pos, end, "topic filter")  # MQTT-3.10.3-1
        topic_filters.append(topic_filter)
    if not topic_filters:  # MQTT-3.10.3-2 / 3.1.1 MQTT-3.10.3-2
        raise _error("UNSUBSCRIBE without topic filters", _PROTOCOL_ERROR)
    return Unsubscribe(packet_id, tuple(topic_filters), properties)


def _decode_unsuback(
    first_byte: int,  # noqa: ARG001  # the uniform decoder signature
    data: bytes,
    pos: int,
    end: int,
    version: ProtocolVersion,
) -> UnsubAck:
    packet_id, pos = _decode_packet_id(data, pos, end)
    if version is _V311:
        _expect_end(pos, end, "UNSUBACK")  # 3.1.1 §3.11.3: no payload
        return UnsubAck(packet_id)
    properties, pos = _decode_properties(data, pos, end, PacketType.UNSUBACK)
    return UnsubAck(packet_id, tuple(data[pos:end]), properties)


def _decode_ping(
    first_byte: int,
    data: bytes,  # noqa: ARG001  # the uniform decoder signature
    pos: int,
    end: int,
    version: ProtocolVersion,  # noqa: ARG001
) -> PingReq | PingResp:
    _expect_end(pos, end, "PINGREQ/PINGRESP")  # §3.12, §3.13: no variable header
    return PingReq() if first_byte >> 4 == PacketType.PINGREQ else PingResp()


def _decode_disconnect_or_auth(
    first_byte: int, data: bytes, pos: int, end: int, version: ProtocolVersion
) -> Disconnect | Auth:
    cls = Disconnect if first_byte >> 4 == PacketType.DISCONNECT else Auth
    if pos == end:  # MQTT 5 §3.14.2.1, §3.15.2.1; the only form in 3.1.1 (§3.14)
        return cls()
    if version is _V311:
        raise _error("DISCONNECT with a body")
    reason_code = data[pos]
    pos += 1
    properties = NO_PROPERTIES
    if pos < end:  # §3.14.2.2.1: "less than 2" bytes means no Property Length
        properties, pos = _decode_properties(data, pos, end, first_byte >> 4)
    _expect_end(pos, end, cls.__name__.upper())
    return cls(reason_code, properties)


_Decoder: TypeAlias = Callable[[int, bytes, int, int, ProtocolVersion], Packet]

# Indexed by packet type; 0 (reserved) never gets here, _VALID_FIRST_BYTES refuses it.
_DECODERS: Final[tuple[_Decoder, ...]] = (
    _decode_ping,  # 0: unreachable placeholder
    _decode_connect_known,
    _decode_connack,
    _decode_publish,
    _decode_ack,  # PUBACK
    _decode_ack,  # PUBREC
    _decode_ack,  # PUBREL
    _decode_ack,  # PUBCOMP
    _decode_subscribe,
    _decode_suback,
    _decode_unsubscribe,
    _decode_unsuback,
    _decode_ping,  # PINGREQ
    _decode_ping,  # PINGRESP
    _decode_disconnect_or_auth,  # DISCONNECT
    _decode_disconnect_or_auth,  # AUTH
)


def _first_byte_error(first_byte: int, version: ProtocolVersion | None) -> MQTTProtocolError:
    """Explain why byte 1 of a fixed header was refused."""
    ptype, flags = first_byte >> 4, first_byte & 0x0F
    if version is None:
        # MQTT-3.1.0-1 / 3.1.1 MQTT-3.1.0-1: the first packet from a client is CONNECT.
        if ptype != PacketType.CONNECT:
            return _error(f"expected CONNECT, got packet type {ptype}", _PROTOCOL_ERROR)
    elif ptype == 0 or (ptype == PacketType.AUTH and version is _V311):
        # MQTT 5 §2.1.2: 0 is reserved; 3.1.1 §2.2.1: 0 and 15 are "Reserved, Forbidden".
        return _error(f"reserved packet type {ptype}")
    if ptype == PacketType.PUBLISH:
        if flags & 0x06 == 0x06:  # MQTT-3.3.1-4 / 3.1.1 MQTT-3.3.1-4
            return _error("PUBLISH with QoS 3")
        return _error("PUBLISH with DUP set on QoS 0")  # MQTT-3.3.1-2 / 3.1.1 MQTT-3.3.1-2
    # MQTT-2.1.3-1 / 3.1.1 MQTT-2.2.2-1, -2
    return _error(f"invalid flags 0x{flags:x} for {PacketType(ptype).name}")


class PacketReader:
    """Incremental decoder: feed it bytes as they arrive, get complete packets back.

    ``version`` None makes a broker-side reader: the first packet must be CONNECT, and
    its Protocol Level sets ``version``. A reader created with a version refuses a
    CONNECT of another version (0x84). ``max_packet_size`` bounds the whole packet, fixed
    header included (MQTT 5 §3.1.2.11.4, §3.2.2.3.6), and is checked as soon as the
    Remaining Length is known, before the body is buffered (0x95). The session may
    lower it once the peer's limits are known.

    After it raises, the reader is broken for good (the connection must be closed:
    MQTT 5 §4.13): every later ``feed`` raises again. Packets completed earlier in the
    failing call are not returned.
    """

    __slots__ = ("_buffered", "_chunks", "_failure", "_needed", "_version", "max_packet_size")

    def __init__(
        self, version: ProtocolVersion | None = None, *, max_packet_size: int = 268_435_455
    ) -> None:
        if max_packet_size < 2:
            raise ValueError("max_packet_size must allow at least a 2-byte packet")
        self._version = None if version is None else ProtocolVersion(version)
        self.max_packet_size = max_packet_size
        # An incomplete packet waits in _chunks, joined only once _needed bytes have come,
        # so a large packet arriving in small pieces is copied once, not once per piece.
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._needed = 0
        self._failure: MQTTProtocolError | None = None

    @property
    def version(self) -> ProtocolVersion | None:
        """The protocol version packets are parsed with; None until a CONNECT is seen."""
        return self._version

    @version.setter
    def version(self, version: ProtocolVersion | None) -> None:
        self._version = None if version is None else ProtocolVersion(version)

    def feed(self, data: bytes) -> list[Packet]:
        """Add received bytes; return the packets they complete, in order."""
        if self._failure is not None:
            reason = self._failure.reason_code
            raise _error(f"the reader failed earlier: {self._failure}", reason or _MALFORMED)
        if type(data) is not bytes:
            data = bytes(data)  # payloads are sliced from it and must be immutable bytes
        if self._chunks:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered < self._needed:
                return []
            data = b"".join(self._chunks)
            self._chunks = []
        elif not data:
            return []
        try:
            return self._parse(data)
        except MQTTProtocolError as exc:
            self._failure = exc
            raise
        except (IndexError, ValueError, struct.error) as exc:  # a missed check: still ours
            self._failure = _error(f"malformed packet: {exc}")
            raise self._failure from exc

    def _parse(self, data: bytes) -> list[Packet]:
        packets: list[Packet] = []
        size = len(data)
        pos = 0
        while pos < size:
            first_byte = data[pos]
            version = self._version
            if version is None:
                if first_byte != 0x10:
                    raise _first_byte_error(first_byte, None)
            elif first_byte not in _VALID_FIRST_BYTES[version]:
                raise _first_byte_error(first_byte, version)
            # Remaining Length (§2.1.4 / 3.1.1 §2.2.3), inlined: it is read per packet.
            remaining = 0
            index = pos + 1
            for shift in (0, 7, 14, 21):
                if index >= size:
                    return self._wait(packets, data, pos, size - pos + 1)
                byte = data[index]
                index += 1
                remaining |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
            else:
                raise _error("Remaining Length has more than four bytes")
            end = index + remaining
            if end - pos > self.max_packet_size:
                raise _error(
                    f"packet of {end - pos} bytes exceeds the maximum of {self.max_packet_size}",
                    _PACKET_TOO_LARGE,
                )
            if end > size:
                return self._wait(packets, data, pos, end - pos)
            if version is None:
                connect = _decode_connect(data, index, end, None)
                self._version = connect.version
                packets.append(connect)
            else:
                packets.append(_DECODERS[first_byte >> 4](first_byte, data, index, end, version))
            pos = end
        self._buffered = 0
        return packets

    def _wait(self, packets: list[Packet], data: bytes, pos: int, needed: int) -> list[Packet]:
        """Keep the incomplete tail data[pos:] until `needed` bytes of it have arrived."""
        tail = data[pos:] if pos else data
        self._chunks = [tail]
        self._buffered = len(tail)
        self._needed = needed
        return packets
