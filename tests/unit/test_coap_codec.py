"""The sans-I/O CoAP codec and client (`iotix.protocols.coap`): RFC 7252 byte vectors,
round trips, one test per message-format rule, the retransmission schedule in virtual
time, ACK/RST/separate-response matching, Block1, and the server-side helpers.

aiocoap is the independent implementation for differential tests: it decodes what we
encode and encodes what we decode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Any

import pytest
from aiocoap import Message as AiocoapMessage
from aiocoap.numbers.optionnumbers import OptionNumber as AiocoapOptionNumber
from hypothesis import given, settings
from hypothesis import strategies as st

from iotix.errors import ProtocolError
from iotix.protocols.coap import (
    ACK_TIMEOUT_S,
    AcknowledgedEvent,
    BlockOption,
    CoAPClient,
    CoAPFormatError,
    CoAPMessage,
    Code,
    FailedEvent,
    MessageType,
    ObserverRegistry,
    OptionNumber,
    RecentResponses,
    ResponseEvent,
    block_szx,
    code_text,
    decode,
    decode_uint,
    empty_message,
    encode,
    encode_uint,
    is_critical,
    response_to,
)

# --- strategies ---------------------------------------------------------------------


def sorted_options(message: CoAPMessage) -> CoAPMessage:
    """The message as it decodes: options in ascending order, repeats in their order."""
    return dataclasses.replace(message, options=tuple(sorted(message.options, key=lambda o: o[0])))


def minimal_uint(max_bytes: int) -> st.SearchStrategy[bytes]:
    return st.integers(0, (1 << (8 * max_bytes)) - 1).map(encode_uint)


blocks = st.builds(
    lambda number, more, szx: BlockOption(number, more, szx).encode(),
    st.integers(0, (1 << 20) - 1),
    st.booleans(),
    st.integers(0, 6),
)

_REGISTERED = {int(number): number for number in AiocoapOptionNumber}


def aiocoap_value(number: int) -> st.SearchStrategy[bytes]:
    """A value of option ``number`` that aiocoap decodes and re-encodes unchanged."""
    registered = _REGISTERED.get(number)
    kind = registered.format.__name__ if registered is not None else "OpaqueOption"
    if kind == "StringOption":
        return st.text(max_size=40).map(str.encode)
    if kind in ("UintOption", "ContentFormatOption"):
        return minimal_uint(4)
    if kind == "BlockOption":
        return blocks
    return st.binary(max_size=40)


unregistered_numbers = st.integers(0, 3000).filter(lambda n: n not in _REGISTERED and n != 0)
option_numbers = st.one_of(st.sampled_from(sorted(_REGISTERED)), unregistered_numbers)
options = st.lists(
    option_numbers.flatmap(lambda n: aiocoap_value(n).map(lambda v: (n, v))), max_size=8
)


@st.composite
def messages(draw: st.DrawFn, *, any_options: bool = False) -> CoAPMessage:
    code = draw(st.integers(1, 0xFF))  # not 0.00: an Empty message has no content
    drawn = (
        draw(
            st.lists(
                st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=300)),
                max_size=6,
            )
        )
        if any_options
        else draw(options)
    )
    return CoAPMessage(
        draw(st.sampled_from(MessageType)),
        code,
        draw(st.integers(0, 0xFFFF)),
        draw(st.binary(max_size=8)),
        tuple(drawn),
        draw(st.binary(max_size=200)),
    )


# --- RFC 7252 byte vectors ----------------------------------------------------------


def test_a_get_encodes_as_rfc_7252_figure_16_shows() -> None:
    # Appendix A / figure 16: CON [0x7d34] GET /temperature, no token.
    message = CoAPMessage(
        MessageType.CON, Code.GET, 0x7D34, options=((OptionNumber.URI_PATH, b"temperature"),)
    )
    assert encode(message) == bytes.fromhex("40017d34") + b"\xbbtemperature"


def test_a_piggybacked_response_with_payload_has_the_payload_marker() -> None:
    message = CoAPMessage(MessageType.ACK, Code.CONTENT, 0x7D34, b"\x20", (), b"22.3 C")
    assert encode(message) == bytes.fromhex("6145 7d34 20 ff".replace(" ", "")) + b"22.3 C"


@pytest.mark.parametrize(
    ("number", "length", "header"),
    [
        (12, 0, b"\xc0"),  # both fit the nibbles
        (13, 0, b"\xd0\x00"),  # delta 13: one extended byte, 13 + 0
        (268, 0, b"\xd0\xff"),  # 13 + 255: the largest one-byte delta
        (269, 0, b"\xe0\x00\x00"),  # two extended bytes, 269 + 0
        (1, 13, b"\x1d\x00"),
        (1, 269, b"\x1e\x00\x00"),
        (1, 65_804, b"\x1e\xff\xff"),  # 269 + 65535: the longest option value
        (300, 300, b"\xee\x00\x1f\x00\x1f"),  # extended delta before extended length
    ],
)
def test_option_delta_and_length_use_the_extended_forms(
    number: int, length: int, header: bytes
) -> None:
    encoded = encode(CoAPMessage(MessageType.NON, Code.GET, 1, options=((number, b"x" * length),)))
    assert encoded[4 : 4 + len(header)] == header
    assert decode(encoded).options == ((number, b"x" * length),)


def test_an_option_value_too_long_for_the_format_is_refused() -> None:
    with pytest.raises(CoAPFormatError):
        encode(CoAPMessage(MessageType.NON, Code.GET, 1, options=((1, b"x" * 65_805),)))


def test_option_numbers_are_16_bits() -> None:
    with pytest.raises(CoAPFormatError, match="option number"):
        encode(CoAPMessage(MessageType.NON, Code.GET, 1, options=((65_536, b""),)))


def test_options_are_sent_in_number_order_with_repeats_in_their_order() -> None:
    message = CoAPMessage(
        MessageType.CON,
        Code.POST,
        1,
        options=((OptionNumber.CONTENT_FORMAT, b"\x32"), (11, b"a"), (11, b"b"), (15, b"q=1")),
    )
    decoded = decode(encode(message))
    assert decoded.options == ((11, b"a"), (11, b"b"), (12, b"\x32"), (15, b"q=1"))
    assert decoded.uri_path == ("a", "b")
    assert decoded.uri_query == ("q=1",)
    assert decoded.content_format == 50


def test_an_empty_message_is_four_bytes() -> None:
    assert encode(empty_message(MessageType.ACK, 0x1234)) == bytes.fromhex("60001234")
    assert encode(empty_message(MessageType.RST, 0x1234)) == bytes.fromhex("70001234")


# --- round trips and the reference implementation -------------------------------------


@given(messages(any_options=True))
def test_encode_then_decode_gives_the_message_back(message: CoAPMessage) -> None:
    assert decode(encode(message)) == sorted_options(message)


@settings(max_examples=300, deadline=None)  # aiocoap's first decode imports and warms up
@given(messages())
def test_aiocoap_decodes_what_we_encode(message: CoAPMessage) -> None:
    theirs = AiocoapMessage.decode(encode(message))
    assert int(theirs.mtype) == message.type
    assert int(theirs.code) == message.code
    assert theirs.mid == message.message_id
    assert theirs.token == message.token
    assert theirs.payload == message.payload
    assert [(int(o.number), o.encode()) for o in theirs.opt.option_list()] == list(
        sorted_options(message).options
    )


@settings(max_examples=300)
@given(messages())
def test_we_decode_what_aiocoap_encodes(message: CoAPMessage) -> None:
    theirs = AiocoapMessage(
        code=message.code,
        payload=message.payload,
        _mtype=int(message.type),
        _mid=message.message_id,
        _token=message.token,
    )
    for number, value in message.options:
        theirs.opt.add_option(AiocoapOptionNumber(number).create_option(decode=value))
    assert decode(theirs.encode()) == sorted_options(message)


@given(st.binary(max_size=64))
def test_any_datagram_decodes_or_raises_a_format_error(data: bytes) -> None:
    with contextlib.suppress(CoAPFormatError):  # anything else fails the test
        decode(data)
    assert issubclass(CoAPFormatError, ProtocolError)


# --- message format errors (RFC 7252 section 3) -----------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x40\x01\x00", "4-byte header"),
        (bytes.fromhex("80017d34"), "version 2"),  # section 3: version 1 only
        (bytes.fromhex("49017d34") + b"123456789", "token length 9"),  # 9-15 reserved
        (bytes.fromhex("44017d34") + b"12", "inside the token"),
        (bytes.fromhex("60007d34ff"), "Empty message"),  # section 4.1
        (bytes.fromhex("40017d34ff"), "no payload"),  # a marker with nothing after it
        (bytes.fromhex("40017d34f1"), "nibble 15"),  # delta 15 outside the marker
        (bytes.fromhex("40017d341f"), "nibble 15"),  # length 15
        (bytes.fromhex("40017d34d1"), "extended option field"),  # 1 extended byte missing
        (bytes.fromhex("40017d34b3") + b"ab", "ends first"),  # 3 announced, 2 there
    ],
)
def test_malformed_messages_are_format_errors(data: bytes, problem: str) -> None:
    with pytest.raises(CoAPFormatError, match=problem):
        decode(data)


def test_a_format_error_names_the_message_so_a_con_can_be_reset() -> None:
    with pytest.raises(CoAPFormatError) as caught:
        decode(bytes.fromhex("40017d34f1"))
    assert caught.value.message_id == 0x7D34
    assert caught.value.message_type is MessageType.CON


def test_a_token_longer_than_eight_bytes_cannot_be_encoded() -> None:
    with pytest.raises(CoAPFormatError, match="at most 8"):
        encode(CoAPMessage(MessageType.CON, Code.GET, 1, b"123456789"))


def test_an_empty_message_with_content_cannot_be_encoded() -> None:
    with pytest.raises(CoAPFormatError, match="Empty"):
        encode(CoAPMessage(MessageType.ACK, Code.EMPTY, 1, b"t"))


# --- option values --------------------------------------------------------------------


@given(st.integers(0, 2**32 - 1))
def test_uints_take_as_few_bytes_as_they_need(value: int) -> None:
    encoded = encode_uint(value)
    assert decode_uint(encoded) == value
    assert not encoded.startswith(b"\x00")


def test_a_uint_with_leading_zeros_is_read_all_the_same() -> None:
    assert decode_uint(b"\x00\x00\x32") == 50


@given(st.integers(0, (1 << 20) - 1), st.booleans(), st.integers(0, 6))
def test_block_options_round_trip(number: int, more: bool, szx: int) -> None:
    block = BlockOption(number, more, szx)
    assert BlockOption.decode(block.encode()) == block
    assert len(block.encode()) <= 3


def test_block_sizes_follow_szx() -> None:
    assert [BlockOption(0, False, szx).size_bytes for szx in range(7)] == [
        16,
        32,
        64,
        128,
        256,
        512,
        1024,
    ]
    assert block_szx(1024) == 6
    assert BlockOption(3, True, 6).offset_bytes == 3072
    with pytest.raises(ValueError, match="1024"):
        block_szx(2048)


def test_block_szx_seven_is_reserved() -> None:
    with pytest.raises(CoAPFormatError, match="reserved"):
        BlockOption.decode(b"\x0f")


def test_odd_options_are_critical() -> None:
    assert is_critical(OptionNumber.URI_PATH)
    assert is_critical(OptionNumber.BLOCK1)
    assert not is_critical(OptionNumber.CONTENT_FORMAT)
    assert not is_critical(OptionNumber.OBSERVE)


def test_codes_read_as_class_dot_detail() -> None:
    assert code_text(Code.NOT_FOUND) == "4.04"
    assert code_text(Code.CHANGED) == "2.04"
    assert code_text(Code.CONTINUE) == "2.31"
    assert code_text(Code.POST) == "0.02"


# --- the client: retransmission (RFC 7252 section 4.2) ----------------------------------


def new_client(draw: float = 0.0, **kwargs: Any) -> CoAPClient:
    kwargs.setdefault("first_message_id", 100)
    kwargs.setdefault("first_token", 0)
    return CoAPClient(random=lambda: draw, **kwargs)


def sent(client: CoAPClient) -> list[CoAPMessage]:
    return [decode(d) for d in client.datagrams_to_send()]


def run_until_done(client: CoAPClient) -> tuple[list[float], list[Any]]:
    """Fire every timeout in virtual time; the times retransmissions went out."""
    times: list[float] = []
    events: list[Any] = []
    while (deadline := client.next_deadline_s()) is not None:
        events += client.handle_timeouts(deadline)
        times += [deadline] * len(client.datagrams_to_send())
    return times, events


def test_a_con_is_retransmitted_with_doubling_timeouts_then_given_up() -> None:
    client = new_client(draw=0.0)  # the shortest first timeout: ACK_TIMEOUT
    exchange = client.request(Code.POST, ["t"], b"{}", confirmable=True, now_s=0.0)
    [first] = sent(client)
    assert first.type is MessageType.CON
    times, events = run_until_done(client)
    # 2, 4, 8, 16 s apart; then the 5th timeout (32 s) ends it: MAX_TRANSMIT_WAIT's shape.
    assert times == [2.0, 6.0, 14.0, 30.0]
    assert events == [FailedEvent(exchange, "timeout", 4)]


def test_the_first_timeout_is_drawn_up_to_ack_random_factor() -> None:
    client = new_client(draw=0.999999)
    client.request(Code.POST, ["t"], b"{}", confirmable=True, now_s=10.0)
    deadline = client.next_deadline_s()
    assert deadline is not None
    assert 10.0 + ACK_TIMEOUT_S < deadline <= 10.0 + ACK_TIMEOUT_S * 1.5


def test_retransmissions_carry_the_same_message_id_and_token() -> None:
    client = new_client()
    client.request(Code.POST, ["t"], b"{}", confirmable=True, now_s=0.0)
    [first] = sent(client)
    client.handle_timeouts(2.0)
    [again] = sent(client)
    assert again == first


def test_transmission_parameters_are_injectable() -> None:
    client = new_client(ack_timeout_s=0.5, max_retransmit=2)
    exchange = client.request(Code.POST, ["t"], b"{}", confirmable=True, now_s=0.0)
    client.datagrams_to_send()
    times, events = run_until_done(client)
    assert times == [0.5, 1.5]
    assert events == [FailedEvent(exchange, "timeout", 2)]


@given(st.integers(0, 4))
def test_a_con_lost_n_times_completes_with_n_retransmissions(lost: int) -> None:
    client = new_client()
    exchange = client.request(Code.POST, ["t"], b"{}", confirmable=True, now_s=0.0)
    request = sent(client)[0]
    for _ in range(lost):
        deadline = client.next_deadline_s()
        assert deadline is not None
        client.handle_timeouts(deadline)
        request = sent(client)[0]
    ack = response_to(request, Code.CHANGED, message_id=0)
    events = client.receive(ack, now_s=100.0)
    assert events == [ResponseEvent(exchange, ack, lost)]
    assert client.next_deadline_s() is None


# --- the client: matching (sections 4.2, 5.2, 5.3.2) -----------------------------------


def test_a_piggybacked_response_ends_the_exchange() -> None:
    client = new_client()
    exchange = client.request(Code.POST, ["a", "b"], b"{}", confirmable=True, now_s=0.0)
    [request] = sent(client)
    assert request.uri_path == ("a", "b")
    ack = response_to(request, Code.CREATED, message_id=0)
    assert client.receive(ack, now_s=0.1) == [ResponseEvent(exchange, ack, 0)]
    assert client.outstanding == 0


def test_a_piggybacked_response_with_another_token_is_ignored() -> None:
    client = new_client()
    client.request(Code.POST, ["t"], b"{}", confirmable=True, now_s=0.0)
    [request] = sent(client)
    wrong = dataclasses.replace(response_to(request, Code.CHANGED, message_id=0), token=b"zz")
    assert client.receive(wrong, now_s=0.1) == []
    assert client.outstanding == 1


def test_a_reset_fails_the_exchange() -> None:
    client = new_client()
    exchange = client.request(Code.POST, ["t"], b"{}", confirmable=True, now_s=0.0)
    [request] = sent(client)
    reset = empty_message(MessageType.RST, request.message_id)
    assert client.receive(reset, now_s=0.1) == [FailedEvent(exchange, "reset", 0)]


def test_an_empty_ack_stops_retransmission_and_the_separate_response_is_acked() -> None:
    client = new_client(separate_timeout_s=30.0)
    exchange = client.request(Code.POST, ["t"], b"{}", confirmable=True, now_s=0.0)
    [request] = sent(client)
    events = client.receive(empty_message(MessageType.ACK, request.message_id), now_s=0.5)
    assert events == [AcknowledgedEvent(exchange)]
    assert client.exchange_acknowledged(exchange)
    assert client.next_deadline_s() == 30.5  # waiting for the response, not resending
    separate = CoAPMessage(MessageType.CON, Code.CHANGED, 7000, request.token)
    assert client.receive(separate, now_s=1.0) == [ResponseEvent(exchange, separate, 0)]
    assert sent(client) == [empty_message(MessageType.ACK, 7000)]
    # Our ACK was lost and the server sends the response again: acknowledged again.
    assert client.receive(separate, now_s=2.0) == []
    assert sent(client) == [empty_message(MessageType.ACK, 7000)]


def test_a_separate_response_that_never_comes_times_out() -> None:
    client = new_client(separate_timeout_s=30.0)
    exchange = client.request(Code.POST, ["t"], b"{}", confirmable=True, now_s=0.0)
    [request] = sent(client)
    client.receive(empty_message(MessageType.ACK, request.message_id), now_s=0.5)
    assert client.handle_timeouts(30.5) == [FailedEvent(exchange, "timeout", 0)]
    assert client.datagrams_to_send() == []


def test_a_separate_non_response_is_taken_without_an_ack() -> None:
    client = new_client()
    exchange = client.request(Code.POST, ["t"], b"{}", confirmable=True, now_s=0.0)
    [request] = sent(client)
    separate = CoAPMessage(MessageType.NON, Code.CHANGED, 7000, request.token)
    assert client.receive(separate, now_s=0.1) == [ResponseEvent(exchange, separate, 0)]
    assert client.datagrams_to_send() == []


def test_a_confirmable_response_to_no_request_is_reset() -> None:
    client = new_client()
    stray = CoAPMessage(MessageType.CON, Code.CHANGED, 9, b"nope")
    assert client.receive(stray, now_s=0.0) == []
    assert sent(client) == [empty_message(MessageType.RST, 9)]


def test_a_ping_is_answered_with_a_reset() -> None:
    client = new_client()
    client.receive(empty_message(MessageType.CON, 9), now_s=0.0)
    assert sent(client) == [empty_message(MessageType.RST, 9)]


def test_a_response_with_an_unknown_critical_option_is_rejected() -> None:
    client = new_client()
    exchange = client.request(Code.POST, ["t"], b"{}", confirmable=True, now_s=0.0)
    [request] = sent(client)
    odd = dataclasses.replace(
        response_to(request, Code.CHANGED, message_id=0), options=((2049, b"x"),)
    )
    assert client.receive(odd, now_s=0.1) == [FailedEvent(exchange, "rejected", 0)]


def test_a_late_duplicate_ack_is_ignored() -> None:
    client = new_client()
    client.request(Code.POST, ["t"], b"{}", confirmable=True, now_s=0.0)
    [request] = sent(client)
    ack = response_to(request, Code.CHANGED, message_id=0)
    client.receive(ack, now_s=0.1)
    assert client.receive(ack, now_s=0.2) == []


def test_a_non_request_is_sent_once_with_the_empty_token_and_not_tracked() -> None:
    client = new_client()
    exchange = client.request(
        Code.PUT, ["t"], b"{}", confirmable=False, now_s=0.0, content_format=60
    )
    [request] = sent(client)
    assert (request.type, request.code, request.token) == (MessageType.NON, Code.PUT, b"")
    assert request.content_format == 60
    assert not client.is_pending(exchange)
    assert client.next_deadline_s() is None


def test_message_ids_are_sequential_and_wrap() -> None:
    client = new_client(first_message_id=0xFFFF)
    for _ in range(3):
        client.request(Code.POST, ["t"], b"", confirmable=False, now_s=0.0)
    assert [m.message_id for m in sent(client)] == [0xFFFF, 0, 1]


def test_requests_beyond_nstart_wait_for_the_one_outstanding() -> None:
    client = new_client()
    first = client.request(Code.POST, ["t"], b"1", confirmable=True, now_s=0.0)
    second = client.request(Code.POST, ["t"], b"2", confirmable=True, now_s=0.0)
    [request] = sent(client)
    assert request.payload == b"1"
    assert client.is_pending(second)
    client.receive(response_to(request, Code.CHANGED, message_id=0), now_s=0.1)
    [next_request] = sent(client)
    assert next_request.payload == b"2"
    assert not client.is_pending(first)


def test_cancel_all_forgets_every_request() -> None:
    client = new_client()
    first = client.request(Code.POST, ["t"], b"1", confirmable=True, now_s=0.0)
    second = client.request(Code.POST, ["t"], b"2", confirmable=True, now_s=0.0)
    assert client.cancel_all() == [first, second]
    assert client.next_deadline_s() is None


# --- the client: Block1 (RFC 7959) --------------------------------------------------------


def continue_for(request: CoAPMessage, szx: int | None = None) -> CoAPMessage:
    block = request.block1
    assert block is not None
    answer = BlockOption(block.number, True, block.szx if szx is None else szx)
    return response_to(
        request, Code.CONTINUE, message_id=0, options=((OptionNumber.BLOCK1, answer.encode()),)
    )


def test_a_body_over_a_block_goes_in_confirmable_blocks() -> None:
    body = bytes(range(256)) * 10  # 2560 bytes: blocks of 1024, 1024 and 512
    client = new_client()
    exchange = client.request(Code.POST, ["big"], body, confirmable=False, now_s=0.0)
    received = b""
    for number in itertools.count():
        [request] = sent(client)
        assert request.type is MessageType.CON
        block = request.block1
        assert block is not None
        assert block.number == number
        assert block.szx == 6
        received += request.payload
        if number == 0:
            assert decode_uint(request.first_option(OptionNumber.SIZE1) or b"") == len(body)
        else:
            assert request.first_option(OptionNumber.SIZE1) is None
        if not block.more:
            final = response_to(request, Code.CHANGED, message_id=0)
            assert client.receive(final, now_s=1.0) == [ResponseEvent(exchange, final, 0)]
            break
        assert client.receive(continue_for(request), now_s=0.5) == []
    assert received == body
    assert number == 2


def test_block1_takes_the_smaller_size_the_server_asks_for() -> None:
    body = b"x" * 2048
    client = new_client()
    client.request(Code.POST, ["big"], body, confirmable=True, now_s=0.0)
    [first] = sent(client)
    client.receive(continue_for(first, szx=5), now_s=0.1)  # 512-byte blocks from now on
    [second] = sent(client)
    assert second.block1 == BlockOption(2, True, 5)  # offset 1024 in 512-byte blocks
    assert len(second.payload) == 512


def test_an_error_on_a_block_ends_the_transfer() -> None:
    client = new_client()
    exchange = client.request(Code.POST, ["big"], b"x" * 3000, confirmable=True, now_s=0.0)
    [first] = sent(client)
    too_large = response_to(first, Code.REQUEST_ENTITY_TOO_LARGE, message_id=0)
    assert client.receive(too_large, now_s=0.1) == [ResponseEvent(exchange, too_large, 0)]
    assert client.datagrams_to_send() == []


def test_retransmissions_add_up_over_the_blocks() -> None:
    client = new_client(block_size_bytes=16)
    exchange = client.request(Code.POST, ["big"], b"y" * 32, confirmable=True, now_s=0.0)
    client.datagrams_to_send()
    client.handle_timeouts(2.0)
    [first] = sent(client)
    client.receive(continue_for(first), now_s=2.1)
    client.datagrams_to_send()
    client.handle_timeouts(4.1)  # the second block, once more
    [last] = sent(client)
    final = response_to(last, Code.CHANGED, message_id=0)
    assert client.receive(final, now_s=10.1) == [ResponseEvent(exchange, final, 2)]


# --- server-side helpers ----------------------------------------------------------------


def test_a_con_request_is_answered_on_its_ack_and_a_non_with_a_non() -> None:
    con = CoAPMessage(MessageType.CON, Code.GET, 42, b"tk")
    non = dataclasses.replace(con, type=MessageType.NON)
    assert response_to(con, Code.CONTENT, message_id=7, payload=b"x") == CoAPMessage(
        MessageType.ACK, Code.CONTENT, 42, b"tk", (), b"x"
    )
    assert response_to(non, Code.CONTENT, message_id=7) == CoAPMessage(
        MessageType.NON, Code.CONTENT, 7, b"tk"
    )


def test_recent_responses_answer_duplicates_until_they_expire() -> None:
    recent = RecentResponses[str](capacity=2, lifetime_s=10.0)
    recent.put("a", 1, b"one", now_s=0.0)
    assert recent.get("a", 1, now_s=5.0) == b"one"
    assert recent.get("b", 1, now_s=5.0) is None
    assert recent.get("a", 1, now_s=11.0) is None
    recent.put("a", 2, b"two", now_s=0.0)
    recent.put("a", 3, b"three", now_s=0.0)
    assert recent.get("a", 1, now_s=0.0) is None  # the oldest made room


def test_observers_get_numbered_notifications_until_they_leave() -> None:
    registry = ObserverRegistry[str]()
    ids = itertools.count(500)
    assert registry.register("peer", b"t1") == 0
    [(peer, datagram)] = registry.notifications(b"21.5", next_message_id=lambda: next(ids))
    notification = decode(datagram)
    assert peer == "peer"
    assert (notification.type, notification.code, notification.token) == (
        MessageType.NON,
        Code.CONTENT,
        b"t1",
    )
    assert notification.observe == 1
    [(_, second)] = registry.notifications(
        b"21.6", next_message_id=lambda: next(ids), content_format=50
    )
    assert decode(second).observe == 2
    assert decode(second).content_format == 50
    assert registry.reset_by("peer", decode(second).message_id)  # RFC 7641 section 3.6
    assert registry.notifications(b"x", next_message_id=lambda: next(ids)) == []


def test_a_deregistered_observer_gets_nothing() -> None:
    registry = ObserverRegistry[str]()
    registry.register("peer", b"t1")
    registry.register("peer", b"t1")  # a renewal, not a second observer
    assert len(registry.observers) == 1
    registry.deregister("peer", b"t1")
    assert registry.notifications(b"x", next_message_id=lambda: 1) == []
