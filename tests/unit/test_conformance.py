"""Conformance: every message the models send passes; hand-broken ones fail precisely."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import cbor2
import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotix.model.conformance import Conformance
from iotix.model.connection import ConnectionTemplates
from iotix.model.loader import LoadedModel, load_model, load_model_data
from iotix.model.runtime import DeviceBatch, Message, MessageKind
from iotix.payload.binary import BinaryPayloadEncoder
from iotix.payload.crc import crc16_function
from iotix.payload.spec import BinaryPayloadSpec
from iotix.preview import PlannedCommand, preview_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "device-models"
MODELS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
START_EPOCH_S = 1.767e9
COMMAND_PAYLOAD = {"value": 25, "closed": False, "amps": 16}
"""One command body for every example handler: each reads the key it needs."""


@functools.cache
def example(name: str) -> tuple[LoadedModel, Conformance]:
    loaded = load_model(EXAMPLES / name)
    return loaded, Conformance.for_model(loaded)


def sent(
    loaded: LoadedModel, *, seed: int = 1, devices: int = 6, count: int = 300
) -> list[Message]:
    """What ``devices`` devices send first, every command handler called once on each."""
    handlers = loaded.spec.commands.handlers if loaded.spec.commands else {}
    commands = [
        PlannedCommand(name, COMMAND_PAYLOAD, at_s=30.0 + 45.0 * number)
        for number, name in enumerate(handlers)
    ]
    return preview_model(
        loaded,
        devices=devices,
        count=count,
        seed=seed,
        start_epoch_s=START_EPOCH_S,
        commands=commands,
    ).messages


@functools.cache
def first(name: str, message: str) -> tuple[Conformance, Message]:
    loaded, conformance = example(name)
    found = next(m for m in sent(loaded, devices=2, count=60) if m.name == message)
    return conformance, found


def problems(conformance: Conformance, messages: list[Message]) -> dict[str, str]:
    return {
        f"{m.name} {m.topic} {m.payload!r}": problem
        for m in messages
        if (problem := conformance(m.topic, m.payload)) is not None
    }


# --- what the models send conforms --------------------------------------------------


def test_there_are_examples_of_every_payload_kind() -> None:
    kinds = {
        payload.kind
        for loaded in (example(path.name)[0] for path in MODELS)
        for payload in [m.payload for m in loaded.spec.messages.values()]
        + [e.payload for e in loaded.spec.events.values() if e.payload is not None]
    }
    assert kinds == {"json", "cbor", "msgpack", "text", "csv", "binary", "raw"}


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_every_message_an_example_model_sends_conforms(path: Path) -> None:
    loaded, conformance = example(path.name)
    messages = sent(loaded)
    assert problems(conformance, messages) == {}
    assert {m.name for m in messages if m.kind is MessageKind.TELEMETRY} == set(
        loaded.spec.messages
    )


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_any_seed_of_the_binary_csv_and_state_machine_examples_conforms(seed: int) -> None:
    for name in ("smart-meter.yaml", "wearable.yaml", "ev-charger.yaml"):
        loaded, conformance = example(name)
        assert problems(conformance, sent(loaded, seed=seed, devices=3, count=40)) == {}


@pytest.mark.parametrize("name", ["door-sensor.yaml", "ev-charger.yaml"])
def test_will_and_birth_are_recognised_and_skipped(name: str) -> None:
    loaded, conformance = example(name)
    batch = DeviceBatch(loaded.spec, indices=range(3), seed=1, base_dir=loaded.base_dir)
    templates = ConnectionTemplates(loaded.spec)
    for row in range(3):
        for message in (templates.will(batch, row), templates.birth(batch, row)):
            assert message is not None
            assert conformance(message.topic, message.payload) is None


def test_replies_to_commands_are_recognised_and_skipped() -> None:
    loaded, conformance = example("ev-charger.yaml")
    replies = [m for m in sent(loaded, devices=2, count=40) if m.kind is MessageKind.REPLY]
    assert {m.name for m in replies} == {"start", "stop", "set_limit", "reboot"}
    assert all(conformance(m.topic, m.payload) is None for m in replies)
    assert conformance("ocpp/p1/cp-p1-000/result/no_such_command", b"{}") is None


def test_command_topics_are_recognised_and_skipped() -> None:
    _, conformance = example("thermostat.yaml")
    assert conformance("devices/thermo-00001/commands/set_setpoint", b'{"value": 22}') is None
    assert conformance("devices/thermo-00001/commands/anything", b"not json") is None


# --- topics ---------------------------------------------------------------------------


def test_a_topic_of_no_message_is_a_problem() -> None:
    _, conformance = example("thermostat.yaml")
    assert (
        conformance("nowhere/at/all", b"{}")
        == "no message of model 'thermostat' has topic 'nowhere/at/all'"
    )


def test_a_topic_with_a_device_id_of_another_form_matches_no_message() -> None:
    conformance, message = first("thermostat.yaml", "telemetry")
    topic = message.topic.replace("thermo-", "thermostat-")
    assert conformance(topic, message.payload) == (
        f"no message of model 'thermostat' has topic {topic!r}"
    )


def test_from_models_routes_each_topic_to_its_model() -> None:
    thermostat, _ = example("thermostat.yaml")
    meter, _ = example("smart-meter.yaml")
    conformance = Conformance.from_models([("heating", thermostat), ("meters", meter)])
    for loaded in (thermostat, meter):
        assert problems(conformance, sent(loaded, devices=2, count=20)) == {}
    assert conformance("nowhere", b"") == "no message of any model has topic 'nowhere'"


def test_from_models_names_the_fleet_in_a_problem() -> None:
    thermostat, _ = example("thermostat.yaml")
    meter, _ = example("smart-meter.yaml")
    conformance = Conformance.from_models([("heating", thermostat), ("meters", meter)])
    _, message = first("thermostat.yaml", "telemetry")
    payload = orjson.dumps({**orjson.loads(message.payload), "temperature": 41.2})
    assert (
        conformance(message.topic, payload) == "heating: telemetry.temperature: 41.2 above max 40"
    )


def test_from_models_needs_a_model() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Conformance.from_models([])


def test_on_a_shared_topic_the_problem_is_that_of_the_message_it_resembles() -> None:
    walk = {"kind": "random_walk", "start": 20, "step": 5, "min": -10, "max": 50}
    loaded = load_model_data(
        {
            "name": "room",
            "fields": {"temperature": walk},
            "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 1}}},
            "events": {
                "hot": {"when": "temperature > 30", "fields": ["temperature"]},
                "cold": {"when": "temperature < 10", "fields": ["temperature"]},
            },
        }
    )
    conformance = Conformance.for_model(loaded)
    batch = DeviceBatch(loaded.spec, indices=range(20), seed=4)
    events = [m for m in batch.advance(600) if m.kind is MessageKind.EVENT]
    assert {m.name for m in events} == {"hot", "cold"}
    assert problems(conformance, events) == {}
    hot = next(m for m in events if m.name == "hot")
    assert hot.topic == f"devices/{hot.device_id}/events"  # both events' default topic
    payload = orjson.dumps({**orjson.loads(hot.payload), "temperature": 51})
    assert conformance(hot.topic, payload) == "hot.temperature: 51 above max 50"


# --- JSON -----------------------------------------------------------------------------


def broken_thermostat(**changes: Any) -> str | None:
    conformance, message = first("thermostat.yaml", "telemetry")
    document = {**orjson.loads(message.payload), **changes}
    return conformance(message.topic, orjson.dumps(document))


def test_a_value_above_max_names_the_message_the_field_and_the_bound() -> None:
    assert broken_thermostat(temperature=41.2) == "telemetry.temperature: 41.2 above max 40"


def test_a_value_below_min_is_a_problem() -> None:
    assert broken_thermostat(temperature=4) == "telemetry.temperature: 4 below min 5"


def test_rounding_may_reach_just_past_a_bound() -> None:
    # round: 2 on a walk clipped at 40 can give 40.0 but never 40.01.
    assert broken_thermostat(temperature=40.0) is None
    assert broken_thermostat(temperature=40.01) == "telemetry.temperature: 40.01 above max 40"


def test_a_value_of_the_wrong_type_is_a_problem() -> None:
    assert broken_thermostat(temperature="hot") == (
        "telemetry.temperature: expected a number, got 'hot'"
    )


def test_an_integer_field_refuses_a_fraction() -> None:
    assert broken_thermostat(seq=1.5) == "telemetry.seq: expected an integer, got 1.5"


def test_a_boolean_field_refuses_a_number() -> None:
    assert broken_thermostat(heating=1) == "telemetry.heating: expected a boolean, got 1"


def test_a_missing_key_is_a_problem() -> None:
    conformance, message = first("thermostat.yaml", "telemetry")
    document = orjson.loads(message.payload)
    del document["humidity"]
    assert conformance(message.topic, orjson.dumps(document)) == "telemetry.humidity: missing key"


def test_an_unexpected_key_is_a_problem() -> None:
    assert broken_thermostat(extra=1) == "telemetry.extra: unexpected key"


def test_a_payload_that_is_not_an_object_is_a_problem() -> None:
    conformance, message = first("thermostat.yaml", "telemetry")
    assert conformance(message.topic, b"[1, 2]") == "telemetry: expected an object, got [1, 2]"


def test_undecodable_json_is_a_problem() -> None:
    conformance, message = first("thermostat.yaml", "telemetry")
    problem = conformance(message.topic, b"\xff{")
    assert problem is not None
    assert problem.startswith("telemetry: not valid JSON: ")


def test_the_payloads_device_id_must_be_the_topics() -> None:
    assert broken_thermostat(device_id="thermo-00009") == (
        "telemetry.device_id: 'thermo-00009' is not the topic's 'thermo-00000'"
    )


def test_a_device_id_of_another_form_is_a_problem() -> None:
    assert broken_thermostat(device_id="x") == (
        "telemetry.device_id: 'x' is not a device id of the form 'thermo-{index:05d}'"
    )


def test_a_constant_a_command_sets_may_take_other_values() -> None:
    assert broken_thermostat(setpoint=27.5) is None


def test_a_template_constant_is_part_of_the_shape() -> None:
    conformance, message = first("ev-charger.yaml", "meter_values")
    document = {**orjson.loads(message.payload), "connectorId": 2}
    assert conformance(message.topic, orjson.dumps(document)) == (
        "meter_values.connectorId: expected 1, got 2"
    )


def test_a_template_list_has_its_length() -> None:
    conformance, message = first("ev-charger.yaml", "meter_values")
    document = orjson.loads(message.payload)
    document["sampledValue"].pop()
    assert conformance(message.topic, orjson.dumps(document)) == (
        "meter_values.sampledValue: expected 3 items, got 2"
    )


def test_a_nested_value_is_named_by_its_path() -> None:
    conformance, message = first("ev-charger.yaml", "meter_values")
    document = orjson.loads(message.payload)
    document["sampledValue"][1]["value"] = "full"
    assert conformance(message.topic, orjson.dumps(document)) == (
        "meter_values.sampledValue[1].value: expected a number or null, got 'full'"
    )


def test_the_message_name_in_a_payload_is_checked() -> None:
    conformance, message = first("ev-charger.yaml", "meter_values")
    document = {**orjson.loads(message.payload), "message": "status"}
    assert conformance(message.topic, orjson.dumps(document)) == (
        "meter_values.message: 'status' is not 'meter_values'"
    )


def test_a_state_the_model_does_not_have_is_a_problem() -> None:
    conformance, message = first("ev-charger.yaml", "status")
    document = {**orjson.loads(message.payload), "status": "charging"}
    assert conformance(message.topic, orjson.dumps(document)) is None
    document["status"] = "parked"
    assert conformance(message.topic, orjson.dumps(document)) == (
        "status.status: 'parked' is not one of 'charging', 'faulted', 'finished', 'idle', 'plugged'"
    )


def test_a_gps_part_outside_the_routes_is_a_problem() -> None:
    conformance, message = first("gps-tracker.yaml", "status")
    document = {**cbor2.loads(message.payload), "last_fix": "50.00000,4.84000"}
    assert conformance(message.topic, cbor2.dumps(document)) == (
        "status.last_fix: 50.0 above max 45.7637"
    )


# --- CBOR and MessagePack -----------------------------------------------------------


def test_a_bad_choice_in_messagepack_is_a_problem() -> None:
    conformance, message = first("plc.json", "tags")
    document = msgpack.unpackb(message.payload)
    document["lines"]["L2"]["mode"] = "turbo"
    assert conformance(message.topic, msgpack.packb(document)) == (
        "tags.lines.L2.mode: 'turbo' is not one of 'auto', 'manual', 'maintenance'"
    )


def test_an_interpolated_string_must_match_its_template() -> None:
    conformance, message = first("air-quality.yaml", "reading")
    document = {**cbor2.loads(message.payload), "fw": "aq-9.9.9"}
    assert conformance(message.topic, cbor2.dumps(document)) == (
        "reading.fw: 'aq-9.9.9' does not match 'aq-${firmware}'"
    )


def test_an_integer_in_cbor_refuses_text() -> None:
    conformance, message = first("air-quality.yaml", "reading")
    document = cbor2.loads(message.payload)
    document["m"]["co2"] = "high"
    assert conformance(message.topic, cbor2.dumps(document)) == (
        "reading.m.co2: expected an integer, got 'high'"
    )


def test_undecodable_cbor_is_a_problem() -> None:
    conformance, message = first("air-quality.yaml", "reading")
    problem = conformance(message.topic, b"\xff\xff")
    assert problem is not None
    assert problem.startswith("reading: not valid CBOR")


def test_a_replayed_text_column_takes_its_recorded_values_only() -> None:
    conformance, message = first("weather-station.yaml", "observation")
    document = orjson.loads(message.payload)
    document["summary"] = "snow, " + document["summary"].split(", ", 1)[1]
    assert conformance(message.topic, orjson.dumps(document)) == (
        f"observation.summary: {document['summary']!r} does not match "
        "'${sky}, ${temperature:.1f} °C'"
    )


# --- binary and raw -----------------------------------------------------------------


def meter_frame(**changes: Any) -> tuple[Conformance, str, bytes]:
    """A smart-meter frame re-encoded with ``changes`` to its record (valid CRC)."""
    loaded, conformance = example("smart-meter.yaml")
    _, message = first("smart-meter.yaml", "reading")
    spec = loaded.spec.messages["reading"].payload
    assert isinstance(spec, BinaryPayloadSpec)
    encoder = BinaryPayloadEncoder(spec)
    values = encoder.decode(message.payload)
    record = {**values, **values["status"], **changes}
    return conformance, message.topic, encoder.encode(record)


def test_a_binary_frame_of_the_wrong_length_is_a_problem() -> None:
    conformance, message = first("smart-meter.yaml", "reading")
    assert conformance(message.topic, message.payload[:-1]) == (
        "reading: 30 bytes, but the layout is 31 bytes"
    )


def test_a_binary_frame_with_a_bad_crc_is_a_problem() -> None:
    conformance, message = first("smart-meter.yaml", "reading")
    problem = conformance(message.topic, message.payload[:-2] + b"\x00\x00")
    assert problem is not None
    assert problem.startswith("reading.crc: CRC mismatch, the frame has 0x0 but its bytes give")


def test_a_binary_value_out_of_range_is_a_problem() -> None:
    conformance, topic, frame = meter_frame(voltage=260.0)
    assert conformance(topic, frame) == "reading.voltage: 260.0 above max 253"


def test_a_binary_bit_group_outside_its_values_is_a_problem() -> None:
    conformance, topic, frame = meter_frame(tariff=3)
    assert conformance(topic, frame) == "reading.status.tariff: 3 is not one of 2, 1"


def test_a_binary_constant_is_checked() -> None:
    conformance, message = first("smart-meter.yaml", "reading")
    body = b"\x69" + message.payload[1:-2]
    frame = body + crc16_function("modbus")(body).to_bytes(2, "little")
    assert conformance(message.topic, frame) == "reading.start: expected 104, got 105"


def test_a_raw_payload_is_compared_byte_for_byte() -> None:
    conformance, message = first("weather-station.yaml", "heartbeat")
    assert conformance(message.topic, b"HB\x02\x00") == (
        "heartbeat: expected the constant 4 bytes 48 42 01 00, got 4 bytes 48 42 02 00"
    )


# --- text and CSV ---------------------------------------------------------------------


def test_text_that_does_not_match_its_template_is_a_problem() -> None:
    conformance, message = first("door-sensor.yaml", "contact")
    text = (
        message.payload.decode()
        .replace("door=closed", "door=ajar")
        .replace("door=open", "door=ajar")
    )
    problem = conformance(message.topic, text.encode())
    assert problem is not None
    assert problem.startswith("contact: 'door=ajar ")
    assert problem.endswith(
        "does not match 'door={contact} temp={temperature:.1f}C bat={battery_mv:.0f}mV link={link}'"
    )


def test_a_formatted_number_in_text_is_checked_within_its_rounding() -> None:
    conformance, message = first("door-sensor.yaml", "contact")
    assert conformance(message.topic, b"door=open temp=20.0C bat=3000mV link=good") is None
    assert conformance(message.topic, b"door=open temp=20.1C bat=3000mV link=good") == (
        "contact.temperature: 20.1 above max 20"
    )


def test_a_csv_line_has_its_columns() -> None:
    conformance, message = first("wearable.yaml", "vitals")
    assert conformance(message.topic, message.payload + b",x") == (
        "vitals: expected 7 columns, got 8"
    )


def test_a_csv_cell_outside_its_choices_is_a_problem() -> None:
    conformance, message = first("wearable.yaml", "vitals")
    cells = message.payload.decode().split(",")
    cells[-1] = "fly"
    assert conformance(message.topic, ",".join(cells).encode()) == (
        "vitals.activity: 'fly' is not one of 'rest', 'walk', 'run'"
    )


def test_a_csv_uuid_must_be_a_uuid() -> None:
    conformance, message = first("wearable.yaml", "vitals")
    cells = message.payload.decode().split(",")
    cells[1] = "not-a-uuid"
    assert conformance(message.topic, ",".join(cells).encode()) == (
        "vitals.sample_id: 'not-a-uuid' is not a version 4 UUID"
    )


# --- rules of small models ------------------------------------------------------------


def small_model(fields: dict[str, Any], **sections: Any) -> LoadedModel:
    data: dict[str, Any] = {
        "name": "small",
        "fields": fields,
        "messages": {
            "telemetry": {"schedule": {"kind": "interval", "interval_s": 1, "start": "aligned"}}
        },
    }
    data.update(sections)
    return load_model_data(data)


def check_telemetry(loaded: LoadedModel, **values: Any) -> str | None:
    """The problem with the first telemetry message of device 0 changed by ``values``."""
    batch = DeviceBatch(loaded.spec, indices=[0], seed=0)
    message = next(m for m in batch.advance(0) if m.name == "telemetry")
    document = {**orjson.loads(message.payload), **values}
    return Conformance.for_model(loaded)(message.topic, orjson.dumps(document))


def test_a_counter_stays_below_wrap_at() -> None:
    loaded = small_model({"n": {"kind": "counter", "wrap_at": 256}})
    assert check_telemetry(loaded, n=255) is None
    assert check_telemetry(loaded, n=256) == "telemetry.n: 256 above max 255"
    assert check_telemetry(loaded, n=-1) == "telemetry.n: -1 below min 0"


def test_a_wave_without_noise_stays_within_its_amplitude() -> None:
    wave = {"kind": "wave", "period_s": 60, "amplitude": 2, "offset": 10}
    loaded = small_model({"w": wave})
    assert check_telemetry(loaded, w=12.0) is None
    assert check_telemetry(loaded, w=12.5) == "telemetry.w: 12.5 above max 12"


def test_a_string_expression_takes_the_values_of_its_branches() -> None:
    loaded = small_model(
        {
            "open": {"kind": "boolean"},
            "contact": {"kind": "expression", "expr": "'open' if open else 'closed'"},
        }
    )
    assert check_telemetry(loaded, contact="closed") is None
    assert check_telemetry(loaded, contact="ajar") == (
        "telemetry.contact: 'ajar' is not one of 'open', 'closed'"
    )


def test_a_numeric_expression_may_be_null_where_json_wrote_nan() -> None:
    loaded = small_model(
        {
            "x": {"kind": "uniform", "low": 0, "high": 1},
            "ratio": {"kind": "expression", "expr": "log(x)"},
        }
    )
    assert check_telemetry(loaded, ratio=None) is None
    assert check_telemetry(loaded, x=None) == "telemetry.x: expected a number, got None"


LEVEL_STATES = {
    "initial": "off",
    "states": {"off": {}, "on": {"fields": {"level": {"kind": "constant", "value": 1}}}},
}
"""A field that is 0 in the model and 1 while the device is on."""


def test_a_field_overridden_in_a_state_takes_the_values_of_every_state() -> None:
    loaded = small_model({"level": {"kind": "constant", "value": 0}}, states=LEVEL_STATES)
    assert check_telemetry(loaded, level=1) is None
    assert check_telemetry(loaded, level=2) == "telemetry.level: 2 is not one of 0, 1"


def test_a_message_sent_in_some_states_takes_the_values_of_those_states() -> None:
    on_only = small_model(
        {"level": {"kind": "constant", "value": 0}},
        states=LEVEL_STATES,
        messages={
            "telemetry": {
                "schedule": {"kind": "interval", "interval_s": 1, "start": "aligned"},
                "payload": {"kind": "json", "template": {"level": "${level}"}},
                "states": ["on"],
            }
        },
    )
    conformance = Conformance.for_model(on_only)
    assert conformance("devices/small-000000/telemetry", b'{"level": 1}') is None
    assert conformance("devices/small-000000/telemetry", b'{"level": 0}') == (
        "telemetry.level: 0 is not 1"
    )
