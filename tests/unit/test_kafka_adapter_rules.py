"""The Kafka adapter's pure parts: the topic rule, the topic option, the patterns a
probe finds a fleet's topics by, the headers, and the error kinds (no broker, no loop)."""

from __future__ import annotations

import re

import orjson
import pytest
from aiokafka import errors as kafka_errors
from hypothesis import given
from hypothesis import strategies as st

from iotix.adapters.base import AdapterError, AdapterSettings, OutgoingMessage
from iotix.adapters.kafka import (
    MAX_TOPIC_LENGTH,
    KafkaAdapter,
    kafka_error_kind,
    kafka_topic,
    kafka_topic_pattern,
)
from iotix.engine.worker import parse_brokers

ENDPOINT = parse_brokers("kafka://127.0.0.1:9092")[0]


def adapter(**options: object) -> KafkaAdapter:
    return KafkaAdapter(ENDPOINT, AdapterSettings(timeout_s=5, options=options))


def outgoing(topic: str, name: str = "telemetry", payload: bytes = b"{}") -> OutgoingMessage:
    return OutgoingMessage(topic, payload, key="thermo-00001", headers={"iotix-name": name})


# --- the topic rule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_topic", "kafka"),
    [
        (
            "buildings/paris/thermostats/thermo-00001/telemetry",
            "buildings.paris.thermostats.thermo-00001.telemetry",
        ),
        ("/devices/d1/events/", "devices.d1.events"),  # no dots left at either end
        ("a b+c#é:d/e", "abcd.e"),  # characters Kafka does not allow are dropped
        ("already.legal_Name-1", "already.legal_Name-1"),
        ("x" * MAX_TOPIC_LENGTH, "x" * MAX_TOPIC_LENGTH),
    ],
)
def test_a_model_topic_is_made_a_legal_kafka_topic(model_topic: str, kafka: str) -> None:
    assert kafka_topic(model_topic) == kafka


@pytest.mark.parametrize("model_topic", ["", "+/#", "/", ".", "..", "x" * (MAX_TOPIC_LENGTH + 1)])
def test_a_topic_with_no_legal_kafka_name_becomes_empty(model_topic: str) -> None:
    assert kafka_topic(model_topic) == ""


def test_the_adapter_sends_to_the_model_topic_made_legal() -> None:
    assert adapter().topic_for(outgoing("devices/d 1/telemetry")) == "devices.d1.telemetry"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("iotix.{message}", "iotix.overheat"),
        ("iotix/{message}", "iotix.overheat"),
        ("{topic}", "devices.d1.events"),
        ("fleet.{device_id}", "fleet.thermo-00001"),
    ],
)
def test_the_topic_option_is_a_template_made_legal(template: str, expected: str) -> None:
    topic = adapter(topic=template).topic_for(outgoing("devices/d1/events", name="overheat"))
    assert topic == expected


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("iotix.{nope}", "{topic}, {message} and {device_id}"),
        ("iotix.{", "{topic}, {message} and {device_id}"),
        ("+/#", "makes no legal topic name"),
        ("x" * (MAX_TOPIC_LENGTH + 1) + ".{message}", "longer than Kafka's 249 characters"),
    ],
)
def test_a_topic_option_that_cannot_make_a_legal_name_is_refused(template: str, says: str) -> None:
    with pytest.raises(AdapterError) as caught:
        adapter(topic=template)
    assert caught.value.kind == "configuration"
    assert says in str(caught.value)


def test_a_topic_option_that_is_legal_only_with_its_placeholders_is_taken() -> None:
    assert adapter(topic="/{message}/").topic_for(outgoing("x")) == "telemetry"


# --- the patterns a probe reads by -------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "values", "matches", "misses"),
    [
        (
            "buildings/{site}/thermostats/{device_id}/telemetry",
            {},
            ["buildings.paris.thermostats.thermo-00001.telemetry"],
            ["buildings.paris.thermostats.thermo-00001.events", "devices.d1.telemetry"],
        ),
        (
            "devices/{device_id}/{message}",
            {"message": "telemetry"},
            ["devices.d1.telemetry"],
            ["devices.d1.overheat"],
        ),
        ("{site}/x", {}, ["paris.x", "x"], ["y"]),  # an empty site leaves no dot
        ("/fleet/{message}/", {"message": "a|b"}, ["fleet.a", "fleet.b"], ["fleet.c", ".fleet.a"]),
        ("{{literal}}/{n:05d}", {"n": "never"}, ["literal.00001"], ["x.00001"]),  # spec: any
    ],
)
def test_a_topic_pattern_matches_what_the_template_renders_to(
    template: str, values: dict[str, str], matches: list[str], misses: list[str]
) -> None:
    pattern = re.compile(kafka_topic_pattern(template, values))
    assert [name for name in matches if not pattern.fullmatch(name)] == []
    assert [name for name in misses if pattern.fullmatch(name)] == []


_PLACEHOLDERS = ("a", "b", "c")
_piece = st.one_of(
    st.sampled_from([f"{{{name}}}" for name in _PLACEHOLDERS]),
    st.text(alphabet="/.ab-_ +#é", max_size=4).map(lambda s: s.replace("{", "").replace("}", "")),
)
_value = st.text(alphabet="/.xy-_ +é", max_size=5)


@given(
    pieces=st.lists(_piece, max_size=6),
    values=st.fixed_dictionaries(dict.fromkeys(_PLACEHOLDERS, _value)),
)
def test_every_name_a_template_renders_to_matches_its_pattern(
    pieces: list[str], values: dict[str, str]
) -> None:
    template = "".join(pieces)
    name = kafka_topic(template.format(**values))
    if name:
        assert re.fullmatch(kafka_topic_pattern(template), name), (template, name)


def test_a_placeholder_without_a_value_matches_any_legal_text() -> None:
    assert kafka_topic_pattern("a/{b}/c") == r"a\.(?:[A-Za-z0-9._-]*)\.c"


# --- headers ----------------------------------------------------------------------------


def test_the_seq_header_is_taken_from_a_json_payload() -> None:
    payload = orjson.dumps({"device_id": "d", "seq": 7, "ts_ms": 1})
    headers = dict(adapter().headers_for(outgoing("t", payload=payload)))
    assert headers == {"iotix-name": b"telemetry", "iotix-seq": b"7"}


@pytest.mark.parametrize("payload", [b"\x01\x02", b"[1]", b'{"seq": -1}', b'{"seq": "7"}', b"{"])
def test_a_payload_without_a_seq_gets_no_seq_header(payload: bytes) -> None:
    assert dict(adapter().headers_for(outgoing("t", payload=payload))) == {
        "iotix-name": b"telemetry"
    }


def test_the_engines_seq_header_wins_over_the_payloads() -> None:
    message = OutgoingMessage(
        "t", orjson.dumps({"seq": 7}), key="d", headers={"iotix-seq": "3", "iotix-name": "t"}
    )
    assert dict(adapter().headers_for(message))["iotix-seq"] == b"3"


# --- error kinds ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (kafka_errors.KafkaTimeoutError(), "kafka timeout"),
        (kafka_errors.RequestTimedOutError(), "kafka timeout"),
        (TimeoutError(), "kafka timeout"),  # an OSError too, but a timeout first
        (kafka_errors.KafkaConnectionError(), "kafka unreachable"),
        (kafka_errors.NodeNotReadyError(), "kafka unreachable"),
        (ConnectionRefusedError(), "kafka unreachable"),
        (OSError(), "kafka unreachable"),
        (kafka_errors.NotLeaderForPartitionError(), "kafka no leader"),
        (kafka_errors.LeaderNotAvailableError(), "kafka no leader"),
        (kafka_errors.UnknownTopicOrPartitionError(), "kafka unknown topic"),
        (kafka_errors.InvalidTopicError(), "kafka invalid topic"),
        (kafka_errors.MessageSizeTooLargeError(), "kafka too large"),
        (kafka_errors.RecordListTooLargeError(), "kafka too large"),
        (kafka_errors.TopicAuthorizationFailedError(), "kafka not authorized"),
        (kafka_errors.NotEnoughReplicasError(), "kafka NotEnoughReplicasError"),
        (kafka_errors.ProducerClosed(), "kafka ProducerClosed"),
        (RuntimeError(), "kafka RuntimeError"),
    ],
)
def test_an_exception_maps_to_its_error_kind(error: BaseException, kind: str) -> None:
    assert kafka_error_kind(error) == kind


def test_a_subclass_of_a_known_exception_lands_with_its_parent() -> None:
    class BrokerGone(kafka_errors.KafkaConnectionError):
        pass

    assert kafka_error_kind(BrokerGone()) == "kafka unreachable"


# --- options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"ack": 1}, "unknown Kafka option(s): ack"),
        ({"acks": 2}, "use 0, 1 or all"),
        ({"acks": True}, "use 0, 1 or all"),
        ({"compression": "brotli"}, "use one of none, gzip"),
        ({"linger_ms": -1}, "linger_ms is a whole number"),
        ({"max_batch_size_bytes": 0}, "must be positive"),
    ],
)
def test_a_bad_option_is_a_configuration_error(options: dict[str, object], says: str) -> None:
    with pytest.raises(AdapterError, match=re.escape(says)) as caught:
        adapter(**options)
    assert caught.value.kind == "configuration"


@pytest.mark.parametrize(("acks", "taken"), [(0, 0), ("1", 1), ("all", "all"), (-1, "all")])
def test_acks_are_taken_as_aiokafka_takes_them(acks: object, taken: object) -> None:
    built = adapter(acks=acks)
    assert built.acks == taken
    assert built.never_confirms is (taken == 0)
