"""The sans-I/O WebSocket client (`iotix.protocols.websocket`): handshake, frames, errors.

The RFC 6455 examples pin the bytes; the `websockets` library (installed with amqtt) is
the independent implementation for differential tests: it decodes the frames we encode
and encodes the server frames we decode.
"""

from __future__ import annotations

import base64
import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame
from websockets.frames import Opcode as ReferenceOpcode
from websockets.streams import StreamReader

from iotix.errors import ProtocolError
from iotix.protocols.websocket import (
    CloseReceivedEvent,
    DataReceivedEvent,
    HandshakeCompletedEvent,
    Opcode,
    WebSocketClient,
    WebSocketError,
    WebSocketEvent,
    WebSocketHandshakeError,
    WebSocketState,
    accept_key,
    encode_frame,
    mask_payload,
)

RFC_NONCE = b"the sample nonce"  # RFC 6455 section 1.3: its key is the example's
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
MASK = bytes.fromhex("37fa213d")  # RFC 6455 section 5.7's mask key


def seeded_bytes(seed: int = 0) -> random.Random:
    return random.Random(seed)  # noqa: S311 - deterministic test masks, not secrets


def new_client(**kwargs: Any) -> WebSocketClient:
    rng = seeded_bytes()
    return WebSocketClient("broker.test", nonce=RFC_NONCE, random_bytes=rng.randbytes, **kwargs)


def answer(
    *,
    status: str = "HTTP/1.1 101 Switching Protocols",
    accept: str | None = RFC_ACCEPT,
    upgrade: str | None = "websocket",
    connection: str | None = "Upgrade",
    protocol: str | None = "mqtt",
    extra: tuple[str, ...] = (),
) -> bytes:
    lines = [status]
    if upgrade is not None:
        lines.append(f"Upgrade: {upgrade}")
    if connection is not None:
        lines.append(f"Connection: {connection}")
    if accept is not None:
        lines.append(f"Sec-WebSocket-Accept: {accept}")
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def open_client() -> WebSocketClient:
    client = new_client()
    client.data_to_send()  # the request
    events = client.receive_data(answer())
    assert [type(event) for event in events] == [HandshakeCompletedEvent]
    return client


def server_frame(payload: bytes, opcode: Opcode = Opcode.BINARY, *, fin: bool = True) -> bytes:
    return encode_frame(payload, opcode=opcode, fin=fin, masked=False)


def received(events: list[WebSocketEvent]) -> bytes:
    return b"".join(event.data for event in events if isinstance(event, DataReceivedEvent))


def parse_client_frames(data: bytes) -> list[Frame]:
    """Frames as the `websockets` library's server side reads them (masked, as it must)."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=True)
        with pytest.raises(StopIteration) as done:
            next(parser)
        frames.append(done.value.value)
    return frames


# -- the Upgrade request -------------------------------------------------------------------


def test_accept_key_of_the_rfc_example() -> None:
    assert accept_key(RFC_KEY) == RFC_ACCEPT
    assert accept_key(RFC_KEY.encode()) == RFC_ACCEPT


def test_the_key_is_the_base64_of_the_nonce() -> None:
    assert new_client().key == RFC_KEY


def test_the_nonce_comes_from_the_random_source_when_not_given() -> None:
    client = WebSocketClient("h", random_bytes=lambda n: b"\x01" * n)
    assert base64.b64decode(client.key) == b"\x01" * 16


def test_request_asks_for_websocket_version_13_and_the_mqtt_subprotocol() -> None:
    request = new_client(path="/mqtt?x=1", port=8080).data_to_send()
    assert request.endswith(b"\r\n\r\n")
    lines = request.decode("ascii").split("\r\n")[:-2]
    assert lines[0] == "GET /mqtt?x=1 HTTP/1.1"
    assert sorted(lines[1:]) == sorted(
        [
            "Host: broker.test:8080",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {RFC_KEY}",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Protocol: mqtt",
        ]
    )


@pytest.mark.parametrize(
    ("host", "port", "secure", "expected"),
    [
        ("broker.test", None, False, "broker.test"),
        ("broker.test", 80, False, "broker.test"),
        ("broker.test", 443, True, "broker.test"),
        ("broker.test", 443, False, "broker.test:443"),
        ("broker.test", 80, True, "broker.test:80"),
        ("::1", 8080, False, "[::1]:8080"),
    ],
)
def test_host_header_leaves_out_the_default_port_and_brackets_ipv6(
    host: str, port: int | None, secure: bool, expected: str
) -> None:
    request = WebSocketClient(host, port=port, secure=secure).data_to_send()
    assert f"\r\nHost: {expected}\r\n".encode() in request


@pytest.mark.parametrize("path", ["mqtt", "/with space", "/crlf\r\nX: y", "/caf\u00e9", ""])
def test_a_path_that_cannot_go_in_a_request_line_is_a_value_error(path: str) -> None:
    with pytest.raises(ValueError, match="path"):
        WebSocketClient("h", path)


def test_a_nonce_of_the_wrong_size_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        WebSocketClient("h", nonce=b"short")


# -- the answer ----------------------------------------------------------------------------


def test_a_valid_answer_opens_the_websocket() -> None:
    client = new_client()
    events = client.receive_data(answer(extra=("Server: test",)))
    assert client.state is WebSocketState.OPEN
    (event,) = events
    assert isinstance(event, HandshakeCompletedEvent)
    assert event.subprotocol == "mqtt"
    assert ("Server", "test") in event.headers


def test_header_names_and_tokens_are_case_insensitive() -> None:
    client = new_client()
    client.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nUPGRADE: WebSocket\r\n"
        b"connection: keep-alive, UPGRADE\r\nsec-websocket-accept:" + RFC_ACCEPT.encode() + b"\r\n"
        b"Sec-Websocket-Protocol:  mqtt \r\n\r\n"
    )
    assert client.state is WebSocketState.OPEN


def test_an_answer_fed_byte_by_byte_opens_on_its_last_byte() -> None:
    client = new_client()
    data = answer()
    for index in range(len(data) - 1):
        assert client.receive_data(data[index : index + 1]) == []
    assert [type(e) for e in client.receive_data(data[-1:])] == [HandshakeCompletedEvent]


def test_frames_in_the_same_chunk_as_the_answer_are_read() -> None:
    client = new_client()
    events = client.receive_data(answer() + server_frame(b"\x20\x02\x00\x00"))
    assert [type(e) for e in events] == [HandshakeCompletedEvent, DataReceivedEvent]
    assert received(events) == b"\x20\x02\x00\x00"


@pytest.mark.parametrize(
    ("status_line", "code"),
    [
        ("HTTP/1.1 404 Not Found", 404),
        ("HTTP/1.1 400 Bad Request", 400),
        ("HTTP/1.1 426 Upgrade Required", 426),
        ("HTTP/1.0 200 OK", 200),
    ],
)
def test_a_refusal_reports_the_status_line(status_line: str, code: int) -> None:
    client = new_client()
    with pytest.raises(WebSocketHandshakeError) as caught:
        client.receive_data(answer(status=status_line) + b"<html>body</html>")
    assert caught.value.status_code == code
    assert caught.value.status_line == status_line
    assert status_line in str(caught.value)
    assert "/mqtt" in str(caught.value)
    assert client.state is WebSocketState.CLOSED


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"accept": "AAAAAAAAAAAAAAAAAAAAAAAAAAA="}, "Sec-WebSocket-Accept is 'AAAA"),
        ({"accept": None}, "Sec-WebSocket-Accept is missing"),
        ({"upgrade": None}, "Upgrade is missing"),
        ({"upgrade": "h2c"}, "Upgrade is 'h2c'"),
        ({"connection": "keep-alive"}, "Connection is 'keep-alive'"),
        ({"connection": None}, "Connection is missing"),
        ({"protocol": None}, "subprotocol is missing"),
        ({"protocol": "mqttv3.1"}, "subprotocol is 'mqttv3.1'"),
        ({"extra": ("Sec-WebSocket-Extensions: permessage-deflate",)}, "permessage-deflate"),
        ({"status": "HTTP/1.0 101 Switching Protocols"}, "older than 1.1"),
        ({"status": "HTTP/1.1 abc Whatever"}, "no valid status line"),
        ({"extra": ("no colon here",)}, "malformed header line: 'no colon here'"),
        ({"extra": (" folded: value",)}, "malformed header line"),
    ],
)
def test_a_wrong_answer_is_a_handshake_error_naming_the_problem(
    kwargs: dict[str, Any], named: str
) -> None:
    client = new_client()
    with pytest.raises(WebSocketHandshakeError) as caught:
        client.receive_data(answer(**kwargs))
    assert named in str(caught.value)
    assert client.state is WebSocketState.CLOSED


def test_an_answer_that_is_not_http_fails_at_once() -> None:
    client = new_client()
    with pytest.raises(WebSocketHandshakeError, match="not HTTP"):
        client.receive_data(b"\x20\x02")  # a CONNACK from a plain MQTT port


def test_an_endless_header_is_an_error() -> None:
    client = new_client()
    client.receive_data(b"HTTP/1.1 101 Switching Protocols\r\n")
    with pytest.raises(WebSocketHandshakeError, match="bytes without the end"):
        client.receive_data(b"X-Filler: " + b"x" * 20_000)


def test_a_connection_lost_before_the_answer_is_a_handshake_error() -> None:
    client = new_client()
    with pytest.raises(WebSocketHandshakeError, match="without answering"):
        client.connection_lost()
    assert client.state is WebSocketState.CLOSED


def test_a_connection_lost_once_open_is_no_error() -> None:
    client = open_client()
    client.connection_lost()
    assert client.state is WebSocketState.CLOSED


# -- client frames -------------------------------------------------------------------------


def test_the_rfc_masked_hello_example() -> None:
    frame = encode_frame(b"Hello", opcode=Opcode.TEXT, mask_key=MASK)
    assert frame == bytes.fromhex("818537fa213d7f9f4d5158")


def test_the_rfc_unmasked_examples() -> None:
    assert encode_frame(b"Hello", opcode=Opcode.TEXT, masked=False) == b"\x81\x05Hello"
    assert encode_frame(b"Hel", opcode=Opcode.TEXT, fin=False, masked=False) == b"\x01\x03Hel"
    assert encode_frame(b"lo", opcode=Opcode.CONTINUATION, masked=False) == b"\x80\x02lo"
    assert encode_frame(b"Hello", opcode=Opcode.PING, masked=False) == b"\x89\x05Hello"
    header = encode_frame(bytes(256), masked=False)[:4]
    assert header == b"\x82\x7e\x01\x00"
    header = encode_frame(bytes(65536), masked=False)[:10]
    assert header == b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"


@pytest.mark.parametrize(
    ("length", "header_size", "length_byte"),
    [(0, 2, 0), (125, 2, 125), (126, 4, 126), (65535, 4, 126), (65536, 10, 127)],
)
def test_every_length_class_uses_the_shortest_form(
    length: int, header_size: int, length_byte: int
) -> None:
    payload = bytes(range(256)) * (length // 256) + bytes(range(length % 256))
    frame = encode_frame(payload, mask_key=MASK)
    assert frame[0] == 0x82  # FIN, binary
    assert frame[1] == 0x80 | length_byte  # always masked
    assert frame[header_size : header_size + 4] == MASK
    assert mask_payload(frame[header_size + 4 :], MASK) == payload
    (decoded,) = parse_client_frames(frame)
    assert decoded.opcode is ReferenceOpcode.BINARY
    assert decoded.fin
    assert decoded.data == payload


def test_a_mask_key_of_the_wrong_size_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        encode_frame(b"x", mask_key=b"abc")


def test_frames_without_a_given_key_get_a_fresh_random_one() -> None:
    first, second = encode_frame(b"same"), encode_frame(b"same")
    assert first[2:6] != second[2:6] or first[6:] != second[6:]  # 1 in 2**32 to fail
    assert [f.data for f in parse_client_frames(first + second)] == [b"same", b"same"]


@given(st.binary(max_size=3000), st.binary(min_size=4, max_size=4))
def test_masking_equals_the_per_byte_definition_and_undoes_itself(
    payload: bytes, key: bytes
) -> None:
    masked = mask_payload(payload, key)
    assert masked == bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    assert mask_payload(masked, key) == payload


@pytest.mark.parametrize("length", [1, 3, 1023, 1024, 1025, 4099, 100_003])
def test_masking_of_every_size_equals_the_per_byte_definition(length: int) -> None:
    payload = random.Random(length).randbytes(length)  # noqa: S311 - test data
    expected = bytes(byte ^ MASK[index % 4] for index, byte in enumerate(payload))
    assert mask_payload(payload, MASK) == expected


def test_send_queues_one_masked_binary_frame_per_call() -> None:
    client = open_client()
    client.send(b"\x10\x0c")
    client.send(b"")
    client.send(b"x" * 70_000)
    frames = parse_client_frames(client.data_to_send())
    assert [(f.opcode, f.fin, f.data) for f in frames] == [
        (ReferenceOpcode.BINARY, True, b"\x10\x0c"),
        (ReferenceOpcode.BINARY, True, b""),
        (ReferenceOpcode.BINARY, True, b"x" * 70_000),
    ]


def test_each_frame_gets_its_own_mask_key_from_the_random_source() -> None:
    keys = iter([b"\x00" * 16, b"AAAA", b"BBBB"])
    client = WebSocketClient("h", random_bytes=lambda _n: next(keys))
    client.data_to_send()
    client.receive_data(answer(accept=accept_key(client.key)))
    client.send(b"1")
    client.send(b"2")
    data = client.data_to_send()
    assert data[2:6] == b"AAAA"
    assert data[9:13] == b"BBBB"


def test_sending_before_the_upgrade_is_an_error() -> None:
    with pytest.raises(WebSocketError, match="connecting"):
        new_client().send(b"x")


def test_sending_after_close_is_an_error() -> None:
    client = open_client()
    client.close()
    with pytest.raises(WebSocketError, match="closing"):
        client.send(b"x")


def test_close_queues_a_close_frame_and_waits_for_the_servers() -> None:
    client = open_client()
    client.close(1001, "bye")
    (frame,) = parse_client_frames(client.data_to_send())
    assert frame.opcode is ReferenceOpcode.CLOSE
    assert frame.data == struct.pack("!H", 1001) + b"bye"
    assert client.state is WebSocketState.CLOSING
    client.close()  # once closing, nothing more
    assert client.data_to_send() == b""
    events = client.receive_data(server_frame(struct.pack("!H", 1001), Opcode.CLOSE))
    assert events == [CloseReceivedEvent(code=1001, reason="")]
    assert client.state is WebSocketState.CLOSED
    assert client.data_to_send() == b""  # no reply to the reply


def test_close_before_the_upgrade_just_closes() -> None:
    client = new_client()
    client.data_to_send()
    client.close()
    assert client.state is WebSocketState.CLOSED
    assert client.data_to_send() == b""
    assert client.receive_data(answer()) == []


@pytest.mark.parametrize(("code", "reason"), [(1006, ""), (999, ""), (1000, "x" * 124)])
def test_close_refuses_codes_that_may_not_be_sent_and_long_reasons(code: int, reason: str) -> None:
    with pytest.raises(ValueError, match="close"):
        open_client().close(code, reason)


def test_close_with_1005_sends_an_empty_close_frame() -> None:
    client = open_client()
    client.close(1005)  # 1005 means "no code": it is said with no payload
    (frame,) = parse_client_frames(client.data_to_send())
    assert (frame.opcode, frame.data) == (ReferenceOpcode.CLOSE, b"")


# -- server frames -------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_a_binary_frame_of_every_length_class_is_received(length: int) -> None:
    client = open_client()
    payload = random.Random(length).randbytes(length)  # noqa: S311 - test data
    assert received(client.receive_data(server_frame(payload))) == payload


def test_a_fragmented_message_is_one_byte_stream() -> None:
    client = open_client()
    data = (
        server_frame(b"ab", fin=False)
        + server_frame(b"", Opcode.CONTINUATION, fin=False)
        + server_frame(b"cd", Opcode.CONTINUATION, fin=False)
        + server_frame(b"pong?", Opcode.PING)  # control frames may come between fragments
        + server_frame(b"ef", Opcode.CONTINUATION)
        + server_frame(b"gh")
    )
    events = client.receive_data(data)
    assert events == [DataReceivedEvent(b"abcdefgh")]


def test_frames_fed_byte_by_byte_give_the_same_bytes() -> None:
    client = open_client()
    data = (
        server_frame(b"x" * 300, fin=False)
        + server_frame(b"", Opcode.PING)
        + server_frame(b"y" * 70_000, Opcode.CONTINUATION)
        + server_frame(b"z")
    )
    events = [
        event
        for index in range(len(data))
        for event in client.receive_data(data[index : index + 1])
    ]
    assert {type(event) for event in events} == {DataReceivedEvent}
    assert received(events) == b"x" * 300 + b"y" * 70_000 + b"z"


def test_data_of_an_incomplete_frame_is_handed_on_at_once() -> None:
    client = open_client()
    frame = server_frame(b"0123456789")
    assert client.receive_data(frame[:6]) == [DataReceivedEvent(b"0123")]
    assert client.receive_data(frame[6:]) == [DataReceivedEvent(b"456789")]


def test_a_ping_is_answered_with_a_masked_pong_of_the_same_payload() -> None:
    client = open_client()
    assert client.receive_data(server_frame(b"are you there", Opcode.PING)) == []
    data = client.data_to_send()
    assert data[1] & 0x80  # masked
    (frame,) = parse_client_frames(data)
    assert (frame.opcode, frame.data) == (ReferenceOpcode.PONG, b"are you there")


def test_a_pong_is_ignored() -> None:
    client = open_client()
    assert client.receive_data(server_frame(b"late", Opcode.PONG) + server_frame(b"d")) == [
        DataReceivedEvent(b"d")
    ]
    assert client.data_to_send() == b""


def test_a_close_from_the_server_is_reported_and_echoed() -> None:
    client = open_client()
    events = client.receive_data(
        server_frame(b"last")
        + server_frame(struct.pack("!H", 1011) + "br\u00fbl\u00e9".encode(), Opcode.CLOSE)
        + server_frame(b"after the close")
    )
    assert events == [DataReceivedEvent(b"last"), CloseReceivedEvent(1011, "br\u00fbl\u00e9")]
    assert client.state is WebSocketState.CLOSED
    (frame,) = parse_client_frames(client.data_to_send())
    assert (frame.opcode, frame.data) == (ReferenceOpcode.CLOSE, struct.pack("!H", 1011))
    assert client.receive_data(server_frame(b"more")) == []


def test_an_empty_close_is_code_1005_and_echoed_empty() -> None:
    client = open_client()
    assert client.receive_data(server_frame(b"", Opcode.CLOSE)) == [CloseReceivedEvent(1005, "")]
    (frame,) = parse_client_frames(client.data_to_send())
    assert (frame.opcode, frame.data) == (ReferenceOpcode.CLOSE, b"")


@pytest.mark.parametrize(
    ("data", "message", "code"),
    [
        (server_frame(b"{}", Opcode.TEXT), "text frame", 1003),
        (encode_frame(b"x", mask_key=MASK), "masked a frame", 1002),
        (b"\xc2\x00", "reserved bits 0x40", 1002),
        (b"\xa2\x00", "reserved bits 0x20", 1002),
        (b"\x92\x00", "reserved bits 0x10", 1002),
        *[(bytes([0x80 | op, 0]), f"reserved opcode 0x{op:x}", 1002) for op in (3, 7, 0xB, 0xF)],
        (b"\x89\x7e\x00\x7e" + bytes(126), "PING frame of 126 bytes", 1002),
        (b"\x09\x00", "fragmented PING", 1002),
        (server_frame(b"x", Opcode.CONTINUATION), "no message to continue", 1002),
        (server_frame(b"a", fin=False) + server_frame(b"b"), "before the fragmented", 1002),
        (b"\x82\x7f\x80" + bytes(7), "most significant bit", 1002),
        (b"\x88\x01\x03", "one byte", 1002),
        (server_frame(struct.pack("!H", 1006), Opcode.CLOSE), "invalid code 1006", 1002),
        (server_frame(struct.pack("!H", 2000), Opcode.CLOSE), "invalid code 2000", 1002),
        (server_frame(b"\x03\xe8\xff", Opcode.CLOSE), "not UTF-8", 1007),
    ],
)
def test_malformed_frames_are_protocol_errors_and_close_the_websocket(
    data: bytes, message: str, code: int
) -> None:
    client = open_client()
    with pytest.raises(WebSocketError, match=message) as caught:
        client.receive_data(data)
    assert isinstance(caught.value, ProtocolError)
    assert caught.value.reason_code == code
    assert client.state is WebSocketState.CLOSED
    (frame,) = parse_client_frames(client.data_to_send())
    assert (frame.opcode, frame.data) == (ReferenceOpcode.CLOSE, struct.pack("!H", code))
    assert client.receive_data(server_frame(b"ignored")) == []


def test_a_long_16_bit_length_for_a_short_payload_is_accepted() -> None:
    client = open_client()  # not minimal (section 5.2), but unambiguous
    assert received(client.receive_data(b"\x82\x7e\x00\x03abc")) == b"abc"


# -- properties ----------------------------------------------------------------------------

fragments = st.lists(st.binary(max_size=300), min_size=1, max_size=4)
messages = st.lists(fragments, max_size=6)


def server_stream(message_list: list[list[bytes]], pings: list[bytes]) -> bytes:
    """Messages as the `websockets` library's server writes them; ping N follows the
    first fragment of message N, so it falls between fragments when there are more."""
    data = b""
    for index, message in enumerate(message_list):
        for position, fragment in enumerate(message):
            opcode = ReferenceOpcode.BINARY if position == 0 else ReferenceOpcode.CONT
            fin = position == len(message) - 1
            data += Frame(opcode, fragment, fin=fin).serialize(mask=False)
            if position == 0 and index < len(pings):
                data += Frame(ReferenceOpcode.PING, pings[index]).serialize(mask=False)
    return data


@settings(max_examples=200)
@given(
    messages,
    st.lists(st.binary(max_size=125), max_size=6),
    st.lists(st.integers(min_value=0), max_size=10),
)
def test_server_frames_split_anywhere_give_back_the_byte_stream(
    message_list: list[list[bytes]], pings: list[bytes], cuts: list[int]
) -> None:
    data = server_stream(message_list, pings)
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    client = open_client()
    events: list[WebSocketEvent] = []
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        events += client.receive_data(data[start:end])
    assert received(events) == b"".join(b"".join(message) for message in message_list)
    pongs = parse_client_frames(client.data_to_send())
    assert [(f.opcode, f.data) for f in pongs] == [
        (ReferenceOpcode.PONG, ping) for ping in pings[: len(message_list)]
    ]


@settings(deadline=None)  # frames up to 70 KB (every length class) take a few ms each
@given(st.lists(st.binary(max_size=70_000), max_size=4), st.integers(min_value=0, max_value=2**32))
def test_client_frames_decode_to_the_payloads_sent(payloads: list[bytes], seed: int) -> None:
    client = WebSocketClient("h", random_bytes=seeded_bytes(seed).randbytes)
    client.data_to_send()
    client.receive_data(answer(accept=accept_key(client.key)))
    for payload in payloads:
        client.send(payload)
    frames = parse_client_frames(client.data_to_send())
    assert [(f.opcode, f.fin, f.data) for f in frames] == [
        (ReferenceOpcode.BINARY, True, payload) for payload in payloads
    ]


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0), max_size=5))
def test_garbage_frames_raise_only_the_protocol_error(garbage: bytes, cuts: list[int]) -> None:
    client = open_client()
    points = sorted({cut % (len(garbage) + 1) for cut in cuts})
    try:
        for start, end in zip([0, *points], [*points, len(garbage)], strict=True):
            client.receive_data(garbage[start:end])
    except WebSocketError:
        assert client.state is WebSocketState.CLOSED


@given(st.binary(max_size=300))
def test_a_garbage_answer_raises_only_the_handshake_error(garbage: bytes) -> None:
    client = new_client()
    with pytest.raises(WebSocketHandshakeError):  # CR LF CR LF ends any header, invalid
        client.receive_data(garbage + b"\r\n\r\n")
    assert client.state is WebSocketState.CLOSED


@given(st.lists(st.text(max_size=20), max_size=5))
def test_garbage_header_lines_raise_only_the_protocol_error(lines: list[str]) -> None:
    client = new_client()
    try:
        client.receive_data(
            answer(extra=tuple(lines))
        )  # a CR LF CR LF in a line ends the header early,
    except WebSocketError:  # and what follows it is read as frames
        assert client.state is WebSocketState.CLOSED
