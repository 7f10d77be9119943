"""The probe's pure core: delivery counts, latency, memory bound, payloads and sampling."""

from __future__ import annotations

import math
import re
import sys
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotix.engine.fleet import FleetPlan, kafka_probe_pattern, probe_can_follow, probe_refusal
from iotix.engine.kafka_probe import fleet_topic_pattern, record_identity, record_stream
from iotix.engine.probe import (
    SCHEMA_ERROR_EXAMPLES,
    DeliveryTracker,
    Probe,
    SchemaTally,
    in_sample,
    parse_json_payload,
    sample_buckets,
    topic_stream,
)
from iotix.engine.worker import RunSettings, parse_brokers
from iotix.model.conformance import Conformance
from iotix.model.loader import load_model, load_model_data
from iotix.model.runtime import DeviceBatch
from iotix.protocols.mqtt.session import MessageReceivedEvent

THERMOSTAT = Path(__file__).resolve().parents[2] / "examples" / "device-models" / "thermostat.yaml"

SENT_MS = 1_700_000_000_000
"""An epoch in milliseconds; receive times below are this plus a known latency."""
SENT_S = SENT_MS / 1000


def feed(tracker: DeliveryTracker, seqs: list[int], device: str = "d1", stream: str = "t") -> None:
    for seq in seqs:
        tracker.observe(device, stream, seq, SENT_MS, SENT_S + 0.01)


def test_in_order_delivery_has_no_loss() -> None:
    tracker = DeliveryTracker()
    feed(tracker, list(range(100)))
    summary = tracker.finish()
    assert summary["received"] == 100
    assert summary["expected"] == 100
    assert summary["lost"] == 0
    assert summary["duplicates"] == 0
    assert summary["reordered"] == 0
    assert summary["delivery_ratio"] == 1.0


def test_a_gap_is_lost_at_finish() -> None:
    tracker = DeliveryTracker()
    feed(tracker, [0, 1, 3, 4])
    summary = tracker.finish()
    assert summary["expected"] == 5
    assert summary["lost"] == 1
    assert summary["delivery_ratio"] == pytest.approx(4 / 5)


def test_a_gap_filled_late_is_reordered_not_lost() -> None:
    tracker = DeliveryTracker()
    feed(tracker, [0, 1, 3, 4, 2])
    summary = tracker.finish()
    assert summary["lost"] == 0
    assert summary["reordered"] == 1
    assert summary["received"] == 5


def test_a_duplicate_is_counted_once_and_not_as_received_unique() -> None:
    tracker = DeliveryTracker()
    feed(tracker, [0, 1, 1, 2])
    summary = tracker.finish()
    assert summary["duplicates"] == 1
    assert summary["received"] == 4
    assert summary["unique"] == 3
    assert summary["lost"] == 0
    assert summary["reordered"] == 0


def test_a_duplicate_is_not_recorded_as_latency() -> None:
    tracker = DeliveryTracker()
    feed(tracker, [0, 0])
    assert tracker.e2e_latency.count == 1


def test_two_streams_of_one_device_are_independent() -> None:
    tracker = DeliveryTracker()
    feed(tracker, [0, 1, 2], stream="telemetry")
    feed(tracker, [0, 2], stream="alarm")
    summary = tracker.finish()
    assert summary["streams"] == 2
    assert summary["expected"] == 3 + 3
    assert summary["lost"] == 1
    assert summary["duplicates"] == 0


def test_two_devices_with_one_stream_name_are_independent() -> None:
    tracker = DeliveryTracker()
    feed(tracker, [0, 1], device="a")
    feed(tracker, [0, 1], device="b")
    assert tracker.finish()["duplicates"] == 0


def test_latency_histogram_gets_received_minus_sent() -> None:
    tracker = DeliveryTracker()
    tracker.observe("d1", "t", 0, SENT_MS, SENT_S + 0.250)
    latency = tracker.summary()["e2e_latency"]
    assert latency["count"] == 1
    assert latency["min_s"] == pytest.approx(0.250, abs=1e-6)


def test_negative_latency_is_clamped_to_zero_and_counted_as_clock_skew() -> None:
    tracker = DeliveryTracker()
    tracker.observe("d1", "t", 0, SENT_MS, SENT_S - 0.5)
    tracker.observe("d1", "t", 1, SENT_MS, SENT_S + 0.1)
    summary = tracker.summary()
    assert summary["clock_skew"] == 1
    assert summary["max_clock_skew_s"] == pytest.approx(0.5, abs=1e-6)
    assert summary["e2e_latency"]["min_s"] == 0.0
    assert summary["e2e_latency"]["count"] == 2


def test_seqs_before_the_first_seen_count_as_expected_and_lost() -> None:
    tracker = DeliveryTracker()
    feed(tracker, [5, 6])
    summary = tracker.finish()
    assert summary["expected"] == 7
    assert summary["lost"] == 5


def test_lost_so_far_gives_the_latest_seqs_a_grace() -> None:
    tracker = DeliveryTracker(window_seqs=64)
    feed(tracker, [0, 2, 3, 4, 5, 6, 8])  # 1 and 7 missing; highest 8
    assert tracker.lost_so_far(0) == 2
    assert tracker.lost_so_far(1) == 2  # 7 <= 8 - 1
    assert tracker.lost_so_far(2) == 1  # only 1 <= 8 - 2 counts
    assert tracker.lost_so_far(7) == 1
    assert tracker.lost_so_far(8) == 0
    assert tracker.lost_so_far(1000) == 0


def test_lost_so_far_with_a_grace_counts_across_the_ring_wrap() -> None:
    tracker = DeliveryTracker(window_seqs=16)
    feed(tracker, [s for s in range(40) if s not in {30, 35}])
    # Window holds 24..39; with a grace of 3, seqs 24..36 count: 30 and 35 are missing.
    assert tracker.lost_so_far(3) == 2
    assert tracker.lost_so_far(5) == 1


def test_gaps_evicted_from_the_window_stay_lost() -> None:
    tracker = DeliveryTracker(window_seqs=8)
    feed(tracker, [s for s in range(100) if s != 10])
    assert tracker.lost_so_far(8) == 1
    assert tracker.finish()["lost"] == 1


def test_a_late_arrival_from_below_the_window_is_reordered_and_fills_its_gap() -> None:
    tracker = DeliveryTracker(window_seqs=8)
    feed(tracker, [s for s in range(100) if s != 10])
    feed(tracker, [10])
    summary = tracker.finish()
    assert summary["lost"] == 0
    assert summary["reordered"] == 1
    assert summary["below_window"] == 1
    assert summary["duplicates"] == 0


def test_a_jump_larger_than_the_window_counts_every_skipped_seq() -> None:
    tracker = DeliveryTracker(window_seqs=8)
    feed(tracker, [0, 1, 2, 1000, 1001])
    summary = tracker.finish()
    assert summary["expected"] == 1002
    assert summary["lost"] == 1002 - 5


def test_window_pruning_keeps_memory_bounded() -> None:
    tracker = DeliveryTracker(window_seqs=1024)
    observe = tracker.observe
    for seq in range(1_000_000):
        observe("d1", "t", seq, SENT_MS, SENT_S)
    (state,) = tracker._streams.values()
    assert len(state.bits) == 1024 // 8
    assert sys.getsizeof(state.bits) < 256
    assert state.in_window == 1024
    assert state.evicted_missing == 0
    assert tracker.finish()["lost"] == 0


def test_observing_after_finish_is_an_error() -> None:
    tracker = DeliveryTracker()
    tracker.finish()
    with pytest.raises(RuntimeError):
        feed(tracker, [0])


def test_an_empty_tracker_has_no_delivery_ratio() -> None:
    assert math.isnan(DeliveryTracker().finish()["delivery_ratio"])


def test_a_negative_seq_is_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        feed(DeliveryTracker(), [-1])


# -- against an unbounded reference --------------------------------------------------


def reference(seqs: list[int]) -> dict[str, int]:
    """Exact counts from an unbounded set: what the tracker must agree with."""
    seen: set[int] = set()
    highest = -1
    duplicates = reordered = 0
    for seq in seqs:
        if seq in seen:
            duplicates += 1
            continue
        if seq < highest:
            reordered += 1
        seen.add(seq)
        highest = max(highest, seq)
    return {
        "expected": highest + 1,
        "lost": highest + 1 - len(seen),
        "duplicates": duplicates,
        "reordered": reordered,
        "received": len(seqs),
    }


def tracked(seqs: list[int], window_seqs: int) -> dict[str, int]:
    tracker = DeliveryTracker(window_seqs=window_seqs)
    feed(tracker, seqs)
    summary = tracker.finish()
    return {
        name: summary[name] for name in ("expected", "lost", "duplicates", "reordered", "received")
    }


arrivals = st.lists(st.integers(min_value=0, max_value=200), max_size=300)


@given(arrivals)
def test_counts_are_exact_when_the_window_covers_every_seq(seqs: list[int]) -> None:
    assert tracked(seqs, window_seqs=256) == reference(seqs)


@given(
    st.lists(st.integers(min_value=0, max_value=200), unique=True, max_size=200),
    st.integers(min_value=1, max_value=40),
)
def test_counts_are_exact_with_any_window_when_nothing_is_duplicated(
    seqs: list[int], window_seqs: int
) -> None:
    assert tracked(seqs, window_seqs) == reference(seqs)


@given(arrivals, st.integers(min_value=1, max_value=40))
def test_unique_plus_lost_is_at_least_expected_with_any_window(
    seqs: list[int], window_seqs: int
) -> None:
    tracker = DeliveryTracker(window_seqs=window_seqs)
    feed(tracker, seqs)
    summary = tracker.finish()
    # Equal unless a duplicate arrived from below the window (taken as a late first
    # arrival): then lost may be low, never high.
    assert summary["lost"] <= reference(seqs)["lost"]
    assert summary["unique"] + summary["lost"] >= summary["expected"]


# -- payloads, streams and sampling --------------------------------------------------


def test_parse_json_payload_reads_the_default_telemetry_payload() -> None:
    payload = orjson.dumps({"device_id": "dev-7", "ts_ms": SENT_MS, "seq": 42, "temp": 21.5})
    assert parse_json_payload(payload) == ("dev-7", 42, SENT_MS)


def test_parse_json_payload_rounds_a_float_timestamp() -> None:
    payload = orjson.dumps({"device_id": "d", "ts_ms": 1000.6, "seq": 0})
    assert parse_json_payload(payload) == ("d", 0, 1001)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        b'{"ts_ms": 1, "seq": 0}',
        b'{"device_id": "d", "ts_ms": 1}',
        b'{"device_id": "d", "seq": 0}',
        b'{"device_id": 7, "ts_ms": 1, "seq": 0}',
        b'{"device_id": "d", "ts_ms": 1, "seq": -1}',
        b'{"device_id": "d", "ts_ms": 1, "seq": true}',
        b'{"device_id": "d", "ts_ms": 1, "seq": 1.5}',
        b'{"device_id": "d", "ts_ms": "1", "seq": 0}',
    ],
)
def test_parse_json_payload_returns_none_without_the_fields(payload: bytes) -> None:
    assert parse_json_payload(payload) is None


def test_the_stream_is_the_topics_last_level() -> None:
    assert topic_stream("fleet/dev-1/telemetry") == "telemetry"
    assert topic_stream("single") == "single"


def test_sampling_is_deterministic_and_nested() -> None:
    devices = [f"device-{index}" for index in range(10_000)]
    tenth = [d for d in devices if in_sample(d, 0.1)]
    assert tenth == [d for d in devices if in_sample(d, 0.1)]
    assert 800 < len(tenth) < 1200
    half = {d for d in devices if in_sample(d, 0.5)}
    assert set(tenth) <= half
    assert all(in_sample(d, 1.0) for d in devices)


def test_sampling_keeps_devices_whose_crc32_falls_below_the_fraction() -> None:
    bucket = zlib.crc32(b"device-1") % 10_000
    assert in_sample("device-1", (bucket + 1) / 10_000)
    assert not in_sample("device-1", bucket / 10_000)


@pytest.mark.parametrize("sample", [0.0003, 0.0006, 0.0029, 0.1, 0.5])
def test_a_sample_keeps_its_share_of_buckets_despite_float_noise(sample: float) -> None:
    assert sample_buckets(sample) == round(sample * 10_000)


@pytest.mark.parametrize("sample", [0.0, -0.1, 1.5])
def test_a_sample_outside_zero_to_one_is_rejected(sample: float) -> None:
    with pytest.raises(ValueError, match="sample"):
        in_sample("d", sample)


# -- conformance of the tracked messages -----------------------------------------------


def received(topic: str, payload: bytes, *, retain: bool = False) -> MessageReceivedEvent:
    return MessageReceivedEvent(topic=topic, payload=payload, qos=1, retain=retain)


def telemetry(device: str, seq: int, **values: object) -> bytes:
    return orjson.dumps({"device_id": device, "ts_ms": SENT_MS, "seq": seq, **values})


def unconnected_probe(**options: Any) -> Probe:
    """A probe never started: its events are fed by hand (no loop, no socket)."""
    return Probe("127.0.0.1", 1883, wall_clock=lambda: SENT_S + 0.01, **options)


def test_a_schema_tally_counts_and_keeps_the_first_distinct_problems() -> None:
    tally = SchemaTally()
    for problem in [None, "a", "b", "a", None, "c", "d", "e", "f"]:
        tally.record(problem)
    assert SCHEMA_ERROR_EXAMPLES == 5
    assert tally.summary() == {
        "schema_checked": 9,
        "schema_errors": 7,
        "schema_error_examples": ["a", "b", "c", "d", "e"],
    }


def test_a_probe_without_conformance_adds_no_schema_counts() -> None:
    probe = unconnected_probe()
    probe._on_event(received("f/d1/telemetry", telemetry("d1", 0)))
    summary = probe.tracker.finish()
    assert summary["received"] == 1
    assert probe.tracker.schema is None
    assert not [key for key in summary if key.startswith("schema_")]


def test_a_probe_checks_every_tracked_message_and_only_those() -> None:
    followed = next(f"d{n}" for n in range(100) if in_sample(f"d{n}", 0.5))
    ignored = next(f"d{n}" for n in range(100) if not in_sample(f"d{n}", 0.5))
    checked: list[str] = []

    def conformance(topic: str, _payload: bytes) -> str | None:
        checked.append(topic)
        return f"bad: {topic}" if topic.endswith("/bad") else None

    probe = unconnected_probe(sample=0.5, conformance=conformance)
    for event in [
        received(f"f/{followed}/telemetry", telemetry(followed, 0)),
        received(f"f/{followed}/bad", telemetry(followed, 0)),
        received(f"f/{followed}/telemetry", telemetry(followed, 1)),
        received(f"f/{ignored}/bad", telemetry(ignored, 0)),  # not in the sample
        received(f"f/{followed}/bad", b"not json"),  # unparseable: not tracked
        received(f"f/{followed}/bad", telemetry(followed, 1), retain=True),  # retained
    ]:
        probe._on_event(event)
    summary = probe.tracker.finish()
    assert checked == [f"f/{followed}/telemetry", f"f/{followed}/bad", f"f/{followed}/telemetry"]
    assert summary["received"] == 3
    assert summary["schema_checked"] == 3
    assert summary["schema_errors"] == 1
    assert summary["schema_error_examples"] == [f"bad: f/{followed}/bad"]


def test_probes_sharing_a_tracker_share_its_schema_counts() -> None:
    first = unconnected_probe(conformance=lambda _topic, _payload: "wrong")
    second = unconnected_probe(tracker=first.tracker, conformance=lambda _topic, _payload: None)
    first._on_event(received("f/d1/telemetry", telemetry("d1", 0)))
    second._on_event(received("f/d1/telemetry", telemetry("d1", 1)))
    summary = first.tracker.finish()
    assert (summary["schema_checked"], summary["schema_errors"]) == (2, 1)


def test_a_probe_with_a_models_conformance_counts_its_broken_messages() -> None:
    walk = {"kind": "random_walk", "start": 20, "step": 0.5, "min": 5, "max": 40, "round": 1}
    loaded = load_model_data(
        {
            "name": "room",
            "fields": {"temperature": walk, "mode": {"kind": "choice", "values": ["eco", "on"]}},
            "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 1}}},
        }
    )
    messages = DeviceBatch(loaded.spec, indices=range(3), seed=2).advance(20)
    probe = unconnected_probe(conformance=Conformance.for_model(loaded))
    for message in messages:
        probe._on_event(received(message.topic, message.payload))
    topic = "devices/room-000001/telemetry"
    broken = {"temperature": 41.0, "mode": "eco"}
    probe._on_event(received(topic, telemetry("room-000001", 1000, **broken)))
    probe._on_event(received(topic, telemetry("room-000001", 1001, temperature=21.0, mode="off")))
    summary = probe.tracker.finish()
    assert summary["received"] == len(messages) + 2
    assert summary["schema_checked"] == len(messages) + 2
    assert summary["schema_errors"] == 2
    assert summary["schema_error_examples"] == [
        "telemetry.temperature: 41.0 above max 40",
        "telemetry.mode: 'off' is not one of 'eco', 'on'",
    ]


# -- which devices a probe follows, and the Kafka probe's pure parts ---------------------


@pytest.mark.parametrize(
    ("url", "follows"),
    [
        ("mqtt://h:1883", True),
        ("mqtts://h:8883", True),
        ("ws://h:80/mqtt", True),
        ("kafka://h:9092", True),
        ("http://h:80/ingest", False),
        ("coap://h:5683", False),
    ],
)
def test_a_probe_follows_mqtt_and_kafka_devices_only(url: str, follows: bool) -> None:
    endpoint = parse_brokers(url)[0]
    assert probe_can_follow(endpoint) is follows
    assert (probe_refusal(endpoint) is None) is follows


@pytest.mark.parametrize(("url", "doc"), [("http://h:80/x", "http"), ("coap://h:5683", "coap")])
def test_the_refusal_names_the_protocol_and_its_docs(url: str, doc: str) -> None:
    scheme = url.partition(":")[0]
    refusal = probe_refusal(parse_brokers(url)[0])
    assert refusal == (
        f"the probe follows MQTT and Kafka devices: it cannot follow {scheme}:// devices "
        f"(see docs/{doc}.md)"
    )


def test_a_kafka_fleets_pattern_matches_its_models_topics_made_legal() -> None:
    pattern = re.compile(fleet_topic_pattern(load_model(THERMOSTAT).spec))
    assert pattern.fullmatch("buildings.paris.thermostats.thermo-00001.telemetry")
    assert pattern.fullmatch("devices.thermo-00001.events")  # the overheat alarm
    assert not pattern.fullmatch("buildings.paris.thermostats.thermo-00001.status")
    assert not pattern.fullmatch("orders")


def test_a_kafka_fleets_pattern_follows_its_topic_option() -> None:
    pattern = re.compile(fleet_topic_pattern(load_model(THERMOSTAT).spec, "iotix/{message}"))
    assert [
        name for name in ("iotix.telemetry", "iotix.overheat") if not pattern.fullmatch(name)
    ] == []
    assert not pattern.fullmatch("iotix.other")
    assert not pattern.fullmatch("buildings.paris.thermostats.thermo-00001.telemetry")


def test_the_probe_pattern_covers_the_kafka_fleets_and_only_them() -> None:
    mqtt, kafka = parse_brokers("mqtt://h:1883")[0], parse_brokers("kafka://h:9092")[0]
    settings = RunSettings(devices=2, brokers=(mqtt,))
    fleets = [
        FleetPlan(THERMOSTAT, 1),  # over MQTT: not the Kafka probe's
        FleetPlan(
            THERMOSTAT, 1, {"brokers": (kafka,), "adapter_options": {"topic": "t.{message}"}}
        ),
    ]
    pattern = kafka_probe_pattern(fleets, settings)
    assert pattern is not None
    assert re.fullmatch(pattern, "t.telemetry")
    assert not re.fullmatch(pattern, "buildings.paris.thermostats.thermo-00001.telemetry")
    assert kafka_probe_pattern(fleets[:1], settings) is None


def test_a_kafka_record_is_identified_by_its_json_payload_first() -> None:
    payload = telemetry("d1", 4)
    headers = {"iotix-seq": b"9", "iotix-ts-ms": b"1"}
    assert record_identity(b"other", payload, headers) == ("d1", 4, SENT_MS)


def test_a_binary_kafka_record_is_identified_by_its_key_and_headers() -> None:
    headers = {"iotix-seq": b"9", "iotix-ts-ms": str(SENT_MS).encode()}
    assert record_identity(b"d1", b"\x01", headers) == ("d1", 9, SENT_MS)


@pytest.mark.parametrize(
    ("key", "headers"),
    [
        (None, {"iotix-seq": b"9", "iotix-ts-ms": b"1"}),
        (b"d1", {"iotix-ts-ms": b"1"}),
        (b"d1", {"iotix-seq": b"-1", "iotix-ts-ms": b"1"}),
        (b"\xff", {"iotix-seq": b"9", "iotix-ts-ms": b"1"}),
    ],
)
def test_a_kafka_record_without_an_identity_is_none(
    key: bytes | None, headers: dict[str, bytes]
) -> None:
    assert record_identity(key, b"\x01", headers) is None


def test_a_kafka_records_stream_is_its_name_header_else_the_topics_last_level() -> None:
    assert record_stream("devices.d1.events", {"iotix-name": b"overheat"}) == "overheat"
    assert record_stream("devices.d1.telemetry", {}) == "telemetry"
