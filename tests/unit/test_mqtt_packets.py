"""MQTT 3.1.1 / 5.0 packet codec: round trips, known vectors, fuzzing, paho differential,
and one test per malformed-packet rule."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from iotix.errors import MQTTProtocolError
from iotix.protocols.mqtt import packets
from iotix.protocols.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PacketReader,
    PacketType,
    PingReq,
    PingResp,
    Property,
    ProtocolVersion,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    QoS0Frames,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
    encode,
    encode_properties,
    encode_publish,
)

V311 = ProtocolVersion.V311
V5 = ProtocolVersion.V5
BOTH = pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
READERS = pytest.mark.parametrize("version", [V311, V5, None], ids=["v311", "v5", "broker"])
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None)


def decode(data: bytes, version: ProtocolVersion | None) -> list[Packet]:
    return PacketReader(version).feed(data)


def rejects(data: bytes, version: ProtocolVersion | None) -> MQTTProtocolError:
    with pytest.raises(MQTTProtocolError) as info:
        PacketReader(version).feed(data)
    return info.value


def refuses(packet: Packet, version: ProtocolVersion) -> MQTTProtocolError:
    with pytest.raises(MQTTProtocolError) as info:
        encode(packet, version)
    return info.value


# ------------------------------------------------------------------------------ strategies
# The allowed-in table comes from paho (an independent reading of MQTT 5 Table 2-4), so
# the strategies do not merely echo the table under test.

PAHO_WILL = PacketTypes.WILLMESSAGE
_PAHO_TABLE: dict[int, tuple[int, list[int]]] = PahoProperties(PacketTypes.PUBLISH).properties
BYTE, TWO, FOUR, VBI, BINARY, UTF8, PAIR = range(7)  # paho's type indexes
MULTI = {Property.USER_PROPERTY, Property.SUBSCRIPTION_IDENTIFIER}
RANGES = {
    Property.PAYLOAD_FORMAT_INDICATOR: (0, 1),
    Property.REQUEST_PROBLEM_INFORMATION: (0, 1),
    Property.REQUEST_RESPONSE_INFORMATION: (0, 1),
    Property.MAXIMUM_QOS: (0, 1),
    Property.RETAIN_AVAILABLE: (0, 1),
    Property.WILDCARD_SUBSCRIPTION_AVAILABLE: (0, 1),
    Property.SUBSCRIPTION_IDENTIFIER_AVAILABLE: (0, 1),
    Property.SHARED_SUBSCRIPTION_AVAILABLE: (0, 1),
    Property.RECEIVE_MAXIMUM: (1, 0xFFFF),
    Property.TOPIC_ALIAS: (1, 0xFFFF),
    Property.MAXIMUM_PACKET_SIZE: (1, 268_435_455),  # paho refuses more (MQTT allows 2**32-1)
    Property.SUBSCRIPTION_IDENTIFIER: (1, 268_435_455),
}
TYPE_RANGES = {BYTE: (0, 0xFF), TWO: (0, 0xFFFF), FOUR: (0, 0xFFFF_FFFF), VBI: (0, 268_435_455)}


def mqtt_text(
    *, min_size: int = 0, max_size: int = 12, exclude: str = ""
) -> st.SearchStrategy[str]:
    """Strings MQTT allows: any code point but surrogates (not encodable) and U+0000."""
    chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00" + exclude)
    return st.text(chars, min_size=min_size, max_size=max_size)


TEXT = mqtt_text()
PAHO_TEXT = mqtt_text(exclude="\ufeff")  # paho refuses U+FEFF, which MQTT allows
TOPIC = mqtt_text(min_size=1, exclude="+#")
PACKET_ID = st.integers(1, 0xFFFF)
BYTE_CODE = st.integers(0, 0xFF)


def property_value(prop: Property, context: int, text: st.SearchStrategy[str]) -> Any:
    kind = _PAHO_TABLE[prop][0]
    if kind in TYPE_RANGES:
        low, high = RANGES.get(prop, TYPE_RANGES[kind])
        value: st.SearchStrategy[Any] = st.integers(low, high)
    elif kind == BINARY:
        value = st.binary(max_size=12)
    elif kind == UTF8:
        value = text
    else:
        value = st.tuples(text, text)
    if prop is Property.USER_PROPERTY:
        return st.lists(value, min_size=1, max_size=3).map(tuple)
    if prop is Property.SUBSCRIPTION_IDENTIFIER:
        most = 3 if context == PacketType.PUBLISH else 1
        return st.lists(value, min_size=1, max_size=most).map(tuple)
    return value


def properties(context: int, text: st.SearchStrategy[str] = TEXT) -> st.SearchStrategy[Any]:
    """Property sets allowed in `context` (a PacketType, or PAHO_WILL for a will)."""
    allowed = {
        Property(ident): property_value(Property(ident), context, text)
        for ident, (_, contexts) in _PAHO_TABLE.items()
        if context in contexts
    }
    return st.fixed_dictionaries({}, optional=allowed)


def props_for(version: ProtocolVersion, context: int) -> st.SearchStrategy[Any]:
    return properties(context) if version is V5 else st.just({})


@st.composite
def connects(draw: st.DrawFn, version: ProtocolVersion) -> Connect:
    username = draw(st.none() | TEXT)
    password = draw(st.none() | st.binary(max_size=8))
    if version is V311 and username is None:
        password = None  # 3.1.1 MQTT-3.1.2-22
    will = None
    if draw(st.booleans()):
        will = Will(
            draw(TOPIC),
            draw(st.binary(max_size=16)),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            draw(props_for(version, PAHO_WILL)),
        )
    return Connect(
        draw(TEXT),
        draw(st.integers(0, 0xFFFF)),
        draw(st.booleans()),
        username,
        password,
        will,
        version,
        draw(props_for(version, PacketType.CONNECT)),
    )


@st.composite
def connacks(draw: st.DrawFn, version: ProtocolVersion) -> ConnAck:
    reason_code = draw(BYTE_CODE)
    present = draw(st.booleans()) if reason_code == 0 else False
    return ConnAck(present, reason_code, draw(props_for(version, PacketType.CONNACK)))


@st.composite
def publishes(draw: st.DrawFn, version: ProtocolVersion) -> Publish:
    qos = draw(st.integers(0, 2))
    props = draw(props_for(version, PacketType.PUBLISH))
    topic = draw(TOPIC)
    if Property.TOPIC_ALIAS in props and draw(st.booleans()):
        topic = ""  # MQTT 5 §3.3.2.1: the alias stands for the topic
    return Publish(
        topic,
        draw(st.binary(max_size=40)),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(PACKET_ID) if qos else None,
        props,
    )


def acks(version: ProtocolVersion) -> st.SearchStrategy[Packet]:
    def ack(cls: type[PubAck | PubRec | PubRel | PubComp], ptype: PacketType) -> Any:
        if version is V311:
            return st.builds(cls, PACKET_ID)
        return st.builds(cls, PACKET_ID, BYTE_CODE, properties(ptype))

    return st.one_of(
        ack(PubAck, PacketType.PUBACK),
        ack(PubRec, PacketType.PUBREC),
        ack(PubRel, PacketType.PUBREL),
        ack(PubComp, PacketType.PUBCOMP),
    )


def subscriptions(version: ProtocolVersion) -> st.SearchStrategy[Subscription]:
    if version is V311:
        return st.builds(Subscription, TEXT, st.integers(0, 2))
    return st.builds(
        Subscription, TEXT, st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 2)
    ).filter(lambda s: not (s.no_local and s.topic_filter.startswith("$share/")))


def packets_of(version: ProtocolVersion) -> st.SearchStrategy[Packet]:
    codes = st.lists(BYTE_CODE, max_size=5).map(tuple)
    choices: list[st.SearchStrategy[Any]] = [
        connects(version),
        connacks(version),
        publishes(version),
        acks(version),
        st.builds(
            Subscribe,
            PACKET_ID,
            st.lists(subscriptions(version), min_size=1, max_size=4).map(tuple),
            props_for(version, PacketType.SUBSCRIBE),
        ),
        st.builds(SubAck, PACKET_ID, codes, props_for(version, PacketType.SUBACK)),
        st.builds(
            Unsubscribe,
            PACKET_ID,
            st.lists(TEXT, min_size=1, max_size=4).map(tuple),
            props_for(version, PacketType.UNSUBSCRIBE),
        ),
        st.just(PingReq()),
        st.just(PingResp()),
    ]
    if version is V311:
        choices += [st.builds(UnsubAck, PACKET_ID), st.just(Disconnect())]
    else:
        choices += [
            st.builds(UnsubAck, PACKET_ID, codes, properties(PacketType.UNSUBACK)),
            st.builds(Disconnect, BYTE_CODE, properties(PacketType.DISCONNECT)),
            st.builds(Auth, BYTE_CODE, properties(PacketType.AUTH)),
        ]
    return st.one_of(choices)


# ------------------------------------------------------------------------------ round trips


@BOTH
@QUICK
@given(data=st.data())
def test_every_packet_decodes_to_itself(version: ProtocolVersion, data: st.DataObject) -> None:
    packet = data.draw(packets_of(version))
    assert decode(encode(packet, version), version) == [packet]


@BOTH
@QUICK
@given(data=st.data())
def test_a_packet_split_at_any_point_decodes_to_itself(
    version: ProtocolVersion, data: st.DataObject
) -> None:
    packet = data.draw(packets_of(version))
    wire = encode(packet, version)
    for cut in range(len(wire) + 1):
        reader = PacketReader(version)
        assert reader.feed(wire[:cut]) + reader.feed(wire[cut:]) == [packet]


@BOTH
@QUICK
@given(data=st.data())
def test_concatenated_packets_fed_in_random_chunks_decode_in_order(
    version: ProtocolVersion, data: st.DataObject
) -> None:
    sent = data.draw(st.lists(packets_of(version), min_size=1, max_size=8))
    wire = b"".join(encode(packet, version) for packet in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    reader = PacketReader(version)
    received: list[Packet] = []
    for start, stop in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        received += reader.feed(wire[start:stop])
    assert received == sent


@BOTH
@QUICK
@given(data=st.data())
def test_a_broker_side_reader_learns_the_version_from_connect(
    version: ProtocolVersion, data: st.DataObject
) -> None:
    sent = [data.draw(connects(version)), *data.draw(st.lists(packets_of(version), max_size=4))]
    reader = PacketReader()
    assert reader.feed(b"".join(encode(packet, version) for packet in sent)) == sent
    assert reader.version is version


@BOTH
@QUICK
@given(data=st.data())
def test_encode_publish_equals_encoding_the_dataclass(
    version: ProtocolVersion, data: st.DataObject
) -> None:
    publish = data.draw(publishes(version))
    props = encode_properties(publish.properties, PacketType.PUBLISH) if version is V5 else b""
    fast = encode_publish(
        publish.topic.encode(),
        publish.payload,
        qos=publish.qos,
        retain=publish.retain,
        dup=publish.dup,
        packet_id=publish.packet_id,
        version=version,
        properties_bytes=props,
    )
    assert fast == encode(publish, version)


@BOTH
@QUICK
@given(
    topic=st.text(
        st.characters(blacklist_characters="+#\x00", blacklist_categories=["Cs"]),
        min_size=1,
        max_size=40,
    ),
    payload=st.one_of(st.binary(max_size=200), st.builds(bytes, st.integers(16_000, 17_000))),
    retain=st.booleans(),
)
def test_qos0_frames_equal_encode_publish(
    version: ProtocolVersion, topic: str, payload: bytes, *, retain: bool
) -> None:
    frames = QoS0Frames(version)
    part = frames.topic_part(topic)
    header = frames.header(len(part) + len(payload), retain=retain)
    expected = encode_publish(topic.encode(), payload, retain=retain, version=version)
    assert header + part + payload == expected
    assert decode(expected, version) == [Publish(topic, payload, retain=retain)]


@pytest.mark.parametrize("topic", ["a/+/b", "a/#", "nul\x00", "", "\ud800"])
def test_qos0_frames_refuse_a_topic_no_publish_may_carry(topic: str) -> None:
    with pytest.raises(MQTTProtocolError):
        QoS0Frames().topic_part(topic)


def test_qos0_frames_refuse_a_packet_beyond_the_largest_remaining_length() -> None:
    frames = QoS0Frames()
    assert frames.header(packets.MAX_REMAINING_LENGTH, retain=False)[:1] == b"\x30"
    with pytest.raises(MQTTProtocolError, match="too large"):
        frames.header(packets.MAX_REMAINING_LENGTH + 1, retain=False)


def test_encode_publish_handles_a_multi_byte_remaining_length() -> None:
    payload = bytes(300)
    wire = encode_publish(b"t", payload, qos=1, packet_id=9)
    assert wire[:3] == b"\x32\xb1\x02"  # 2 + 1 + 2 + 300 = 305 = 0x31 + 2 * 128
    assert decode(wire, V311) == [Publish("t", payload, 1, packet_id=9)]


def test_connect_is_encoded_with_its_own_version() -> None:
    connect = Connect("abc", version=V5)
    assert encode(connect, V311) == encode(connect, V5)
    assert decode(encode(connect, V311), None) == [connect]


# ------------------------------------------------------------------------------ fuzzing


def feed_untrusted(
    version: ProtocolVersion | None, data: bytes
) -> tuple[list[Packet] | None, MQTTProtocolError | None]:
    """Feed bytes that may be garbage; only an explicit check may refuse them."""
    try:
        return PacketReader(version).feed(data), None
    except MQTTProtocolError as exc:
        error = exc
    # The reader's last-resort net turns IndexError & co. into MQTTProtocolError; the
    # fuzzers must never reach it, so the only cause allowed is a UTF-8 decode error.
    assert error.__cause__ is None or isinstance(error.__cause__, UnicodeDecodeError)
    return None, error


@READERS
@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_yield_packets_or_a_protocol_error(
    version: ProtocolVersion | None, data: bytes
) -> None:
    decoded, error = feed_untrusted(version, data)
    assert error is None or error.reason_code in {0x81, 0x82, 0x84, 0x90, 0x95}
    assert decoded is None or isinstance(decoded, list)


@BOTH
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_valid_packets_yield_packets_or_a_protocol_error(
    version: ProtocolVersion, data: st.DataObject
) -> None:
    # Random bytes rarely get past the fixed header; a valid packet with one byte changed,
    # or cut short, reaches every field decoder.
    wire = bytearray(encode(data.draw(packets_of(version)), version))
    index = data.draw(st.integers(0, len(wire) - 1))
    wire[index] = data.draw(BYTE_CODE)
    wire = wire[: data.draw(st.integers(1, len(wire)))]
    decoded, _ = feed_untrusted(version, bytes(wire))
    for packet in decoded or []:
        # Whatever the decoder accepts, the encoder can write back: no packet that only
        # one direction of the codec considers valid.
        assert decode(encode(packet, version), version) == [packet]


# ------------------------------------------------------------------------------ known vectors

VECTORS_V311: list[tuple[str, Packet]] = [
    # CONNECT, client id "abc", keep alive 60, clean session (3.1.1 §3.1, Figure 3.4ff.)
    ("10 0f 00 04 4d 51 54 54 04 02 00 3c 00 03 61 62 63", Connect("abc")),
    # user name, password, Will QoS 1 retained, no clean session
    (
        "10 1a 00 04 4d 51 54 54 04 ec 00 0a 00 01 63 00 01 77 00 01 78 00 01 75 00 02 70 77",
        Connect("c", 10, False, "u", b"pw", Will("w", b"x", 1, True)),
    ),
    ("20 02 00 00", ConnAck()),
    ("20 02 01 00", ConnAck(session_present=True)),
    ("20 02 00 05", ConnAck(reason_code=5)),  # not authorised: 3.1.1 return codes as-is
    ("32 0c 00 03 61 2f 62 00 0a 68 65 6c 6c 6f", Publish("a/b", b"hello", 1, packet_id=10)),
    ("31 05 00 01 74 68 69", Publish("t", b"hi", retain=True)),
    ("40 02 00 07", PubAck(7)),
    ("50 02 00 07", PubRec(7)),
    ("62 02 00 07", PubRel(7)),
    ("70 02 00 07", PubComp(7)),
    ("82 08 00 01 00 03 61 2f 62 01", Subscribe(1, (Subscription("a/b", 1),))),
    ("90 04 00 01 01 80", SubAck(1, (1, 0x80))),
    ("a2 07 00 02 00 03 61 2f 62", Unsubscribe(2, ("a/b",))),
    ("b0 02 00 02", UnsubAck(2)),
    ("c0 00", PingReq()),
    ("d0 00", PingResp()),
    ("e0 00", Disconnect()),
]

VECTORS_V5: list[tuple[str, Packet]] = [
    # CONNECT "abc", keep alive 60, clean start, Session Expiry Interval 120
    (
        "10 15 00 04 4d 51 54 54 05 02 00 3c 05 11 00 00 00 78 00 03 61 62 63",
        Connect("abc", version=V5, properties={Property.SESSION_EXPIRY_INTERVAL: 120}),
    ),
    ("20 03 00 00 00", ConnAck()),
    (
        "20 07 00 00 04 24 01 25 00",
        ConnAck(properties={Property.MAXIMUM_QOS: 1, Property.RETAIN_AVAILABLE: 0}),
    ),
    # PUBLISH with an empty topic and Topic Alias 1 (MQTT 5 §3.3.2.3.4)
    ("30 07 00 00 03 23 00 01 78", Publish("", b"x", properties={Property.TOPIC_ALIAS: 1})),
    # ... and the first one, which sets the alias for topic "t"
    ("30 08 00 01 74 03 23 00 05 78", Publish("t", b"x", properties={Property.TOPIC_ALIAS: 5})),
    ("40 02 00 01", PubAck(1)),  # short form: success, no properties (§3.4.2.1)
    ("40 03 00 01 10", PubAck(1, 0x10)),  # no matching subscribers, no properties
    (
        "50 08 00 01 80 04 1f 00 01 65",
        PubRec(1, 0x80, {Property.REASON_STRING: "e"}),
    ),
    ("82 07 00 01 00 00 01 61 2d", Subscribe(1, (Subscription("a", 1, True, True, 2),))),
    ("90 04 00 01 00 02", SubAck(1, (2,))),
    ("b0 05 00 01 00 00 11", UnsubAck(1, (0, 0x11))),
    ("e0 00", Disconnect()),
    ("e0 01 04", Disconnect(4)),  # disconnect with will message; no property length
    ("f0 00", Auth()),
    ("f0 06 18 04 15 00 01 6d", Auth(0x18, {Property.AUTHENTICATION_METHOD: "m"})),
]


def _vector_cases() -> list[Any]:
    return [
        pytest.param(V311, bytes.fromhex(hex_), packet, id=f"v311-{i}")
        for i, (hex_, packet) in enumerate(VECTORS_V311)
    ] + [
        pytest.param(V5, bytes.fromhex(hex_), packet, id=f"v5-{i}")
        for i, (hex_, packet) in enumerate(VECTORS_V5)
    ]


@pytest.mark.parametrize(("version", "wire", "packet"), _vector_cases())
def test_known_vector_decodes_and_reencodes_identically(
    version: ProtocolVersion, wire: bytes, packet: Packet
) -> None:
    assert decode(wire, version) == [packet]
    assert encode(packet, version) == wire


def test_a_non_minimal_remaining_length_is_accepted() -> None:
    # MQTT-1.5.5-1 asks senders for the shortest form; a longer one is still unambiguous.
    assert decode(bytes.fromhex("c0 80 00"), V5) == [PingReq()]


def test_a_v5_ack_with_an_explicit_empty_property_length_is_accepted() -> None:
    assert decode(bytes.fromhex("40 04 00 01 10 00"), V5) == [PubAck(1, 0x10)]


@pytest.mark.parametrize("cls", [PubAck, PubRec, PubRel, PubComp])
def test_v5_acks_for_success_without_properties_use_the_two_byte_form(
    cls: type[PubAck | PubRec | PubRel | PubComp],
) -> None:
    wire = encode(cls(258), V5)
    assert wire[1:] == b"\x02\x01\x02"  # MQTT 5 §3.4.2.1: as brokers send them


def test_disconnect_with_remaining_length_0_means_normal_disconnection() -> None:
    assert decode(b"\xe0\x00", V5) == [Disconnect(0)]


def test_auth_with_remaining_length_0_means_success() -> None:
    assert decode(b"\xf0\x00", V5) == [Auth(0)]


def test_a_byte_order_mark_is_kept_in_a_string() -> None:
    # MQTT-1.5.4-3: U+FEFF MUST NOT be skipped or stripped by a receiver.
    wire = bytes.fromhex("30 06 00 04 ef bb bf 61")
    assert decode(wire, V311) == [Publish("\ufeffa", b"")]


# ------------------------------------------------------------------------------ paho


PAHO_CONTEXTS = [*PacketTypes.indexes, PAHO_WILL]
PAHO_CONTEXTS.remove(PacketTypes.PINGREQ)
PAHO_CONTEXTS.remove(PacketTypes.PINGRESP)


def _our_context(paho_context: int) -> int:
    return packets._WILL if paho_context == PAHO_WILL else paho_context


def _to_paho(props: dict[Property, Any], context: int) -> PahoProperties:
    paho = PahoProperties(context)
    for prop, value in props.items():
        name = paho.getNameFromIdent(int(prop)).replace(" ", "")
        setattr(paho, name, list(value) if prop in MULTI else value)
    return paho


def _from_paho(paho: PahoProperties) -> dict[Property, Any]:
    props: dict[Property, Any] = {}
    for name, ident in paho.names.items():
        if hasattr(paho, name.replace(" ", "")):
            value = getattr(paho, name.replace(" ", ""))
            props[Property(ident)] = tuple(value) if isinstance(value, list) else value
    return props


@st.composite
def paho_property_sets(draw: st.DrawFn) -> tuple[int, dict[Property, Any]]:
    context = draw(st.sampled_from(PAHO_CONTEXTS))
    return context, draw(properties(context, PAHO_TEXT))


def test_the_allowed_in_table_matches_paho() -> None:
    ours = {
        ident: {PAHO_WILL if c == packets._WILL else c for c in spec.allowed_in}
        for ident, spec in packets._PROPERTY_SPECS.items()
    }
    assert ours == {ident: set(contexts) for ident, (_, contexts) in _PAHO_TABLE.items()}


@settings(max_examples=80, deadline=None)
@given(case=paho_property_sets())
def test_property_encoding_equals_paho_pack(case: tuple[int, dict[Property, Any]]) -> None:
    context, props = case
    ours = packets._encode_property_block(props, _our_context(context))
    assert ours == _to_paho(props, context).pack()


@settings(max_examples=80, deadline=None)
@given(case=paho_property_sets())
def test_paho_unpacks_our_property_encoding_to_the_same_values(
    case: tuple[int, dict[Property, Any]],
) -> None:
    context, props = case
    paho = PahoProperties(context)
    paho.unpack(packets._encode_property_block(props, _our_context(context)))
    assert _from_paho(paho) == props


@settings(max_examples=80, deadline=None)
@given(case=paho_property_sets())
def test_we_decode_paho_packed_properties_to_the_same_values(
    case: tuple[int, dict[Property, Any]],
) -> None:
    context, props = case
    wire = _to_paho(props, context).pack()
    decoded, end = packets._decode_properties(wire, 0, len(wire), _our_context(context))
    assert (decoded, end) == (props, len(wire))


# ------------------------------------------------------------------------------ fixed header


@BOTH
@pytest.mark.parametrize(
    "first_byte",
    [0x11, 0x21, 0x41, 0x51, 0x60, 0x63, 0x71, 0x80, 0x83, 0x98, 0xA0, 0xB4, 0xC1, 0xD8, 0xE1],
)
def test_reserved_flag_bits_must_be_exact(version: ProtocolVersion, first_byte: int) -> None:
    assert rejects(bytes((first_byte, 0)), version).reason_code == 0x81  # MQTT-2.1.3-1


@BOTH
def test_packet_type_0_is_malformed(version: ProtocolVersion) -> None:
    assert rejects(b"\x00\x00", version).reason_code == 0x81


def test_auth_is_malformed_in_v311() -> None:
    assert rejects(b"\xf0\x00", V311).reason_code == 0x81


@BOTH
def test_a_fifth_remaining_length_byte_is_malformed(version: ProtocolVersion) -> None:
    assert rejects(bytes.fromhex("30 ff ff ff ff 7f"), version).reason_code == 0x81


def test_a_four_byte_remaining_length_waits_for_more_data() -> None:
    assert PacketReader(V5).feed(b"\x30\xff\xff\xff") == []


def test_a_packet_over_max_packet_size_is_refused_before_its_body_arrives() -> None:
    reader = PacketReader(V5, max_packet_size=10)
    assert rejects_with(reader, b"\x30\x09").reason_code == 0x95  # 2 + 9 = 11 bytes


def test_a_packet_of_exactly_max_packet_size_is_accepted() -> None:
    wire = encode(Publish("t", b"12345"), V5)
    assert PacketReader(V5, max_packet_size=len(wire)).feed(wire) == [Publish("t", b"12345")]


def rejects_with(reader: PacketReader, data: bytes) -> MQTTProtocolError:
    with pytest.raises(MQTTProtocolError) as info:
        reader.feed(data)
    return info.value


def test_the_reader_stays_failed_after_an_error() -> None:
    reader = PacketReader(V311)
    rejects_with(reader, b"\x00\x00")
    assert rejects_with(reader, b"\xc0\x00").reason_code == 0x81


def test_the_reader_accepts_any_bytes_like_object_and_returns_bytes_payloads() -> None:
    wire = bytearray(encode(Publish("t", b"x"), V311))
    [packet] = PacketReader(V311).feed(wire)  # type: ignore[arg-type]  # on purpose
    assert isinstance(packet, Publish)
    assert type(packet.payload) is bytes


def test_the_first_packet_to_a_broker_must_be_connect() -> None:
    assert rejects(b"\xc0\x00", None).reason_code == 0x82  # MQTT-3.1.0-1


# ------------------------------------------------------------------------------ strings


@pytest.mark.parametrize(
    "raw",
    ["c3 28", "ed a0 80", "c0 80", "f4 90 80 80", "ff", "e2 82"],
    ids=["bad-continuation", "surrogate", "overlong-nul", "above-10ffff", "ff", "cut-short"],
)
def test_ill_formed_utf8_is_malformed(raw: str) -> None:
    topic = bytes.fromhex(raw)
    wire = bytes((0x30, 2 + len(topic))) + len(topic).to_bytes(2, "big") + topic
    assert rejects(wire, V311).reason_code == 0x81  # MQTT-1.5.4-1


def test_u0000_in_a_string_is_malformed() -> None:
    assert rejects(bytes.fromhex("30 05 00 03 61 00 62"), V311).reason_code == 0x81


def test_a_string_longer_than_its_packet_is_malformed() -> None:
    assert rejects(bytes.fromhex("30 03 00 05 61"), V311).reason_code == 0x81


def test_encoding_a_string_over_65535_bytes_is_refused() -> None:
    assert refuses(Publish("t" * 65536, b""), V311).reason_code == 0x81


def test_encoding_a_lone_surrogate_is_refused() -> None:
    assert refuses(Subscribe(1, (Subscription("\ud800"),)), V311).reason_code == 0x81


def test_encoding_u0000_is_refused() -> None:
    assert refuses(Connect("a\x00b"), V311).reason_code == 0x81


# ------------------------------------------------------------------------------ PUBLISH


@BOTH
def test_publish_qos_3_is_malformed(version: ProtocolVersion) -> None:
    assert rejects(bytes.fromhex("36 05 00 01 74 00 01"), version).reason_code == 0x81


def test_encoding_publish_qos_3_is_refused() -> None:
    assert refuses(Publish("t", b"", qos=3, packet_id=1), V311).reason_code == 0x81


@BOTH
def test_dup_on_qos_0_is_malformed(version: ProtocolVersion) -> None:
    assert rejects(bytes.fromhex("38 03 00 01 74"), version).reason_code == 0x81


@pytest.mark.parametrize(
    ("version", "hex_"),
    [
        (V311, "32 05 00 01 74 00 00"),  # PUBLISH QoS 1
        (V5, "32 06 00 01 74 00 00 00"),
        (V311, "40 02 00 00"),  # PUBACK
        (V5, "40 02 00 00"),
        (V5, "62 02 00 00"),  # PUBREL
        (V311, "82 06 00 00 00 01 61 00"),  # SUBSCRIBE
        (V5, "82 07 00 00 00 00 01 61 00"),
        (V311, "a2 05 00 00 00 01 61"),  # UNSUBSCRIBE
        (V5, "a2 06 00 00 00 00 01 61"),
        (V311, "90 03 00 00 00"),  # SUBACK
        (V5, "b0 04 00 00 00 00"),  # UNSUBACK
    ],
)
def test_packet_id_0_is_a_protocol_error(version: ProtocolVersion, hex_: str) -> None:
    assert rejects(bytes.fromhex(hex_), version).reason_code == 0x82  # MQTT-2.2.1-3


def test_a_qos_1_publish_without_a_packet_id_is_malformed() -> None:
    assert rejects(bytes.fromhex("32 03 00 01 74"), V311).reason_code == 0x81


def test_encoding_qos_1_without_a_packet_id_is_refused() -> None:
    assert refuses(Publish("t", b"", qos=1), V311).reason_code == 0x82


def test_encoding_qos_0_with_a_packet_id_is_refused() -> None:
    assert refuses(Publish("t", b"", packet_id=1), V311).reason_code == 0x82  # MQTT-2.2.1-2


def test_encoding_packet_id_0_is_refused() -> None:
    assert refuses(PubAck(0), V5).reason_code == 0x82


@BOTH
@pytest.mark.parametrize("topic", [b"a/+", b"#", b"a/#/b"])
def test_wildcards_in_a_topic_name_are_refused(version: ProtocolVersion, topic: bytes) -> None:
    wire = encode(Publish("x" * len(topic), b""), version).replace(b"x" * len(topic), topic)
    assert rejects(wire, version).reason_code == 0x90  # MQTT-3.3.2-2


def test_encoding_a_topic_name_with_a_wildcard_is_refused() -> None:
    assert refuses(Publish("a/+", b""), V5).reason_code == 0x90


def test_an_empty_topic_name_is_a_protocol_error_in_v311() -> None:
    assert rejects(bytes.fromhex("30 02 00 00"), V311).reason_code == 0x82  # 3.1.1 MQTT-4.7.3-1


def test_an_empty_topic_name_without_a_topic_alias_is_a_protocol_error_in_v5() -> None:
    assert rejects(bytes.fromhex("30 03 00 00 00"), V5).reason_code == 0x82


def test_encoding_an_empty_topic_without_a_topic_alias_is_refused() -> None:
    assert refuses(Publish("", b"x"), V5).reason_code == 0x82


def test_encode_publish_refuses_properties_in_v311() -> None:
    with pytest.raises(MQTTProtocolError) as info:
        encode_publish(b"t", b"", properties_bytes=b"\x02\x01\x01")
    assert info.value.reason_code == 0x82


# ------------------------------------------------------------------------------ SUBSCRIBE


@pytest.mark.parametrize(("version", "hex_"), [(V311, "82 02 00 01"), (V5, "82 03 00 01 00")])
def test_subscribe_without_subscriptions_is_a_protocol_error(
    version: ProtocolVersion, hex_: str
) -> None:
    assert rejects(bytes.fromhex(hex_), version).reason_code == 0x82  # MQTT-3.8.3-2


@pytest.mark.parametrize(("version", "hex_"), [(V311, "a2 02 00 01"), (V5, "a2 03 00 01 00")])
def test_unsubscribe_without_topic_filters_is_a_protocol_error(
    version: ProtocolVersion, hex_: str
) -> None:
    assert rejects(bytes.fromhex(hex_), version).reason_code == 0x82  # MQTT-3.10.3-2


def test_encoding_subscribe_without_subscriptions_is_refused() -> None:
    assert refuses(Subscribe(1, ()), V311).reason_code == 0x82


def test_requested_qos_reserved_bits_are_malformed_in_v311() -> None:
    assert rejects(bytes.fromhex("82 06 00 01 00 01 61 04"), V311).reason_code == 0x81


def test_subscription_options_reserved_bits_are_malformed_in_v5() -> None:
    assert rejects(bytes.fromhex("82 07 00 01 00 00 01 61 40"), V5).reason_code == 0x81


@BOTH
def test_subscription_qos_3_is_malformed(version: ProtocolVersion) -> None:
    wire = encode(Subscribe(1, (Subscription("a"),)), version)
    assert rejects(wire[:-1] + b"\x03", version).reason_code == 0x81


def test_retain_handling_3_is_a_protocol_error() -> None:
    assert rejects(bytes.fromhex("82 07 00 01 00 00 01 61 30"), V5).reason_code == 0x82


def test_no_local_on_a_shared_subscription_is_a_protocol_error() -> None:
    wire = encode(Subscribe(1, (Subscription("$share/g/a"),)), V5)
    assert rejects(wire[:-1] + b"\x04", V5).reason_code == 0x82  # MQTT-3.8.3-4


def test_encoding_v5_subscription_options_for_v311_is_refused() -> None:
    assert refuses(Subscribe(1, (Subscription("a", no_local=True),)), V311).reason_code == 0x82


# ------------------------------------------------------------------------------ CONNECT


def connect_bytes(
    flags: int = 0x02,
    payload: bytes = b"\x00\x01c",
    *,
    name: bytes = b"MQTT",
    level: int = 4,
    properties: bytes = b"",
) -> bytes:
    body = (
        len(name).to_bytes(2, "big")
        + name
        + bytes((level, flags))
        + b"\x00\x3c"
        + properties
        + payload
    )
    return bytes((0x10, len(body))) + body


def test_connect_bytes_helper_builds_a_valid_connect() -> None:
    assert decode(connect_bytes(), None) == [Connect("c")]


@pytest.mark.parametrize(
    ("name", "level"), [(b"MQIsdp", 3), (b"MQTX", 4), (b"MQTT", 3), (b"MQTT", 6)]
)
def test_an_unsupported_protocol_name_or_level_is_refused_with_0x84(
    name: bytes, level: int
) -> None:
    wire = connect_bytes(name=name, level=level)
    assert rejects(wire, None).reason_code == 0x84  # MQTT-3.1.2-1, MQTT-3.1.2-2


def test_a_connect_of_another_version_than_the_reader_expects_is_refused() -> None:
    assert rejects(encode(Connect("c", version=V5), V5), V311).reason_code == 0x84


@READERS
def test_the_connect_reserved_flag_is_malformed(version: ProtocolVersion | None) -> None:
    if version is V5:
        wire = connect_bytes(flags=0x03, level=5, properties=b"\x00")
    else:
        wire = connect_bytes(flags=0x03)
    assert rejects(wire, version).reason_code == 0x81  # MQTT-3.1.2-3


def test_will_qos_without_the_will_flag_is_malformed() -> None:
    assert rejects(connect_bytes(flags=0x0A), None).reason_code == 0x81  # MQTT-3.1.2-11


def test_will_retain_without_the_will_flag_is_malformed() -> None:
    assert rejects(connect_bytes(flags=0x22), None).reason_code == 0x81  # MQTT-3.1.2-13


def test_will_qos_3_is_malformed() -> None:
    payload = b"\x00\x01c\x00\x01w\x00\x00"
    assert rejects(connect_bytes(0x1E, payload), None).reason_code == 0x81  # MQTT-3.1.2-12


def test_a_password_without_a_user_name_is_malformed_in_v311() -> None:
    wire = connect_bytes(flags=0x42, payload=b"\x00\x01c\x00\x02pw")
    assert rejects(wire, None).reason_code == 0x81  # 3.1.1 MQTT-3.1.2-22


def test_a_password_without_a_user_name_is_allowed_in_v5() -> None:
    wire = connect_bytes(flags=0x42, payload=b"\x00\x01c\x00\x02pw", level=5, properties=b"\x00")
    assert decode(wire, None) == [Connect("c", version=V5, password=b"pw")]


def test_encoding_a_password_without_a_user_name_is_refused_in_v311() -> None:
    assert refuses(Connect("c", password=b"pw"), V311).reason_code == 0x81


def test_a_connect_with_bytes_after_its_payload_is_malformed() -> None:
    assert rejects(connect_bytes(payload=b"\x00\x01cX"), None).reason_code == 0x81


# ------------------------------------------------------------------------------ CONNACK


@BOTH
def test_connack_reserved_flags_are_malformed(version: ProtocolVersion) -> None:
    wire = bytearray(encode(ConnAck(), version))
    wire[2] = 0x02
    assert rejects(bytes(wire), version).reason_code == 0x81


def test_session_present_on_a_refused_connection_is_a_protocol_error() -> None:
    assert rejects(bytes.fromhex("20 02 01 05"), V311).reason_code == 0x82


@pytest.mark.parametrize("code", [1, 5])
def test_a_v5_reader_decodes_a_3_1_1_refusal_with_its_return_code(code: int) -> None:
    # What a broker without 5.0 answers a 5.0 CONNECT (3.1.1 MQTT-3.1.2-2): its own
    # CONNACK layout, with no Property Length.
    assert decode(bytes([0x20, 2, 0, code]), V5) == [ConnAck(reason_code=code)]


def test_a_v5_connack_accepting_without_a_property_length_is_malformed() -> None:
    assert rejects(bytes.fromhex("20 02 00 00"), V5).reason_code == 0x81


# ------------------------------------------------------------------------------ properties


def puback_with_properties(raw: bytes) -> bytes:
    return bytes((0x40, 4 + len(raw), 0, 1, 0, len(raw))) + raw


def test_a_property_not_allowed_in_the_packet_type_is_a_protocol_error() -> None:
    wire = puback_with_properties(b"\x23\x00\x01")  # TOPIC_ALIAS in PUBACK
    assert rejects(wire, V5).reason_code == 0x82


def test_a_single_valued_property_twice_is_a_protocol_error() -> None:
    wire = puback_with_properties(b"\x1f\x00\x01a\x1f\x00\x01b")  # REASON_STRING twice
    assert rejects(wire, V5).reason_code == 0x82


def test_user_properties_may_repeat_and_keep_their_order() -> None:
    raw = b"\x26\x00\x01k\x00\x01b\x26\x00\x01k\x00\x01a"
    [ack] = decode(puback_with_properties(raw), V5)
    assert ack == PubAck(1, 0, {Property.USER_PROPERTY: (("k", "b"), ("k", "a"))})


def test_subscription_identifiers_may_repeat_in_publish() -> None:
    wire = bytes.fromhex("30 08 00 01 74 04 0b 01 0b 02")
    props = {Property.SUBSCRIPTION_IDENTIFIER: (1, 2)}
    assert decode(wire, V5) == [Publish("t", b"", properties=props)]


def test_a_subscription_identifier_twice_in_subscribe_is_a_protocol_error() -> None:
    wire = bytes.fromhex("82 0b 00 01 04 0b 01 0b 02 00 01 61 00")
    assert rejects(wire, V5).reason_code == 0x82


def test_encoding_two_subscription_identifiers_in_subscribe_is_refused() -> None:
    props = {Property.SUBSCRIPTION_IDENTIFIER: (1, 2)}
    assert refuses(Subscribe(1, (Subscription("a"),), props), V5).reason_code == 0x82


def test_a_property_length_past_the_end_of_the_packet_is_malformed() -> None:
    assert rejects(bytes.fromhex("40 04 00 01 00 05"), V5).reason_code == 0x81


def test_a_property_value_past_the_property_length_is_malformed() -> None:
    wire = bytes.fromhex("40 08 00 01 00 02 1f 00 01 65")  # a 4-byte property, length 2
    assert rejects(wire, V5).reason_code == 0x81


def test_an_unknown_property_identifier_is_malformed() -> None:
    assert rejects(puback_with_properties(b"\x07\x00"), V5).reason_code == 0x81


@pytest.mark.parametrize(
    "hex_",
    [
        "30 07 00 01 74 03 23 00 00",  # TOPIC_ALIAS 0
        "30 06 00 01 74 02 01 02",  # PAYLOAD_FORMAT_INDICATOR 2
        "30 06 00 01 74 02 0b 00",  # SUBSCRIPTION_IDENTIFIER 0
        "20 06 00 00 03 21 00 00",  # RECEIVE_MAXIMUM 0
        "20 05 00 00 02 24 02",  # MAXIMUM_QOS 2
    ],
)
def test_a_property_value_out_of_range_is_a_protocol_error(hex_: str) -> None:
    assert rejects(bytes.fromhex(hex_), V5).reason_code == 0x82


def test_encoding_a_property_not_allowed_in_the_packet_type_is_refused() -> None:
    assert refuses(PubAck(1, 0, {Property.TOPIC_ALIAS: 1}), V5).reason_code == 0x82


def test_encoding_a_property_value_out_of_range_is_refused() -> None:
    assert refuses(Publish("t", b"", properties={Property.TOPIC_ALIAS: 0}), V5).reason_code == 0x82


def test_encoding_properties_for_v311_is_refused() -> None:
    props = {Property.USER_PROPERTY: (("a", "b"),)}
    assert refuses(Publish("t", b"", properties=props), V311).reason_code == 0x82


# ------------------------------------------------------------------------------ exact lengths


@pytest.mark.parametrize(
    ("version", "hex_"),
    [
        (V311, "c0 01 00"),  # PINGREQ with a body
        (V5, "d0 01 00"),  # PINGRESP with a body
        (V311, "40 03 00 01 00"),  # 3.1.1 PUBACK is exactly the packet id
        (V311, "e0 01 00"),  # 3.1.1 DISCONNECT has no body
        (V311, "b0 03 00 01 00"),  # 3.1.1 UNSUBACK has no payload
        (V311, "20 03 00 00 00"),  # 3.1.1 CONNACK is two bytes
        (V5, "40 05 00 01 10 00 00"),  # a byte after the properties
    ],
)
def test_bytes_beyond_a_packet_layout_are_malformed(version: ProtocolVersion, hex_: str) -> None:
    assert rejects(bytes.fromhex(hex_), version).reason_code == 0x81


def test_encoding_auth_for_v311_is_refused() -> None:
    assert refuses(Auth(), V311).reason_code == 0x82


def test_encoding_a_reason_code_for_v311_is_refused() -> None:
    assert refuses(PubAck(1, 0x10), V311).reason_code == 0x82


def test_encoding_unsuback_reason_codes_for_v311_is_refused() -> None:
    assert refuses(UnsubAck(1, (0,)), V311).reason_code == 0x82


def test_encoding_a_reason_code_above_255_is_refused() -> None:
    assert refuses(SubAck(1, (256,)), V5).reason_code == 0x81


def test_a_plain_int_version_is_accepted_by_the_encoder() -> None:
    publish = Publish("t", b"", properties={Property.TOPIC_ALIAS: 1})
    assert encode(publish, 5) == encode(publish, V5)  # type: ignore[arg-type]


def test_a_plain_int_version_is_accepted_by_encode_publish() -> None:
    wire = encode_publish(b"t", b"", version=5)  # type: ignore[arg-type]
    assert wire == encode(Publish("t", b""), V5)


def test_a_plain_int_version_is_accepted_by_the_reader() -> None:
    assert PacketReader(5).version is V5  # type: ignore[arg-type]
