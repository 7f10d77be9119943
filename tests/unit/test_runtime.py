"""The batch runtime: generators, schedules, events, states and commands, in virtual time."""

from __future__ import annotations

import itertools
import json
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from iotix.model.loader import load_model_data
from iotix.model.runtime import CommandStatus, DeviceBatch, Message, MessageKind

if TYPE_CHECKING:
    from pathlib import Path


def model(fields: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A minimal model: the given fields, sent every second, aligned at t=0."""
    data: dict[str, Any] = {
        "name": "probe",
        "fields": fields,
        "messages": {
            "telemetry": {"schedule": {"kind": "interval", "interval_s": 1, "start": "aligned"}}
        },
    }
    data.update(sections)
    return data


def batch(data: dict[str, Any], devices: int = 1, *, seed: int = 0, **kwargs: Any) -> DeviceBatch:
    loaded = load_model_data(data, file=kwargs.pop("file", None))
    return DeviceBatch(
        loaded.spec,
        indices=kwargs.pop("indices", range(devices)),
        seed=seed,
        base_dir=loaded.base_dir,
        **kwargs,
    )


def run(device_batch: DeviceBatch, until_s: float) -> list[Message]:
    """Every message up to ``until_s`` in time order (one call: rounds keep each
    device's samples in order, so this equals stepping to every due time)."""
    return sorted(device_batch.advance(until_s), key=lambda m: (m.due_s, m.device_index))


def test_one_advance_equals_stepping_to_every_due_time() -> None:
    fields = {
        "x": WALK,
        "e": {"kind": "expression", "expr": "x * 2"},
        "at": {"kind": "timestamp"},
    }
    data = model(fields)
    data["messages"]["fast"] = {
        "schedule": {"kind": "interval", "interval_s": 0.7, "jitter_s": 0.2},
        "fields": ["at", "x"],
    }
    data["messages"]["rare"] = {"schedule": {"kind": "poisson", "rate_hz": 0.2}}
    stepped: list[Message] = []
    device = batch(data, 4)
    while (due := device.next_due_s()) <= 30:
        stepped.extend(device.advance(due))
    at_once = run(batch(data, 4), 30)
    key = lambda m: (m.due_s, m.device_index, m.name)  # noqa: E731
    assert sorted(at_once, key=key) == sorted(stepped, key=key)
    assert all(json.loads(m.payload)["at"] == round(m.due_s * 1000) for m in at_once)


def payloads(messages: list[Message], name: str = "telemetry") -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages if m.name == name]


# --- determinism --------------------------------------------------------------------

WALK = {"kind": "random_walk", "start": {"kind": "uniform", "low": 0, "high": 10}, "step": 1}


def test_same_seed_gives_the_same_messages() -> None:
    first = run(batch(model({"x": WALK}), 5, seed=7), 20)
    second = run(batch(model({"x": WALK}), 5, seed=7), 20)
    assert [m.payload for m in first] == [m.payload for m in second]


def test_another_seed_gives_other_values() -> None:
    first = payloads(run(batch(model({"x": WALK}), 3, seed=1), 5))
    second = payloads(run(batch(model({"x": WALK}), 3, seed=2), 5))
    assert [p["x"] for p in first] != [p["x"] for p in second]


def test_a_device_sends_the_same_values_whatever_shard_it_is_in() -> None:
    fields = {
        "x": WALK,
        "g": {"kind": "gaussian", "mean": 0, "stddev": 1},
        "c": {"kind": "choice", "values": ["a", "b", "c"]},
    }
    whole = [m for m in run(batch(model(fields), 10), 10) if m.device_index == 7]
    alone = run(batch(model(fields), indices=[7]), 10)
    assert [m.payload for m in whole] == [m.payload for m in alone]


def test_device_ids_follow_the_template() -> None:
    data = model({"x": {"kind": "constant", "value": 1}}, id="meter-{index:05d}")
    assert batch(data, indices=[3, 42]).device_ids == ["meter-00003", "meter-00042"]


# --- generators ---------------------------------------------------------------------


def test_random_walk_stays_within_its_bounds() -> None:
    walk = {"kind": "random_walk", "start": 5, "step": 3, "min": 0, "max": 10}
    values = [p["x"] for p in payloads(run(batch(model({"x": walk}), 20), 50))]
    assert min(values) >= 0
    assert max(values) <= 10
    assert len(set(values)) > 100


def test_mean_reversion_pulls_a_walk_towards_its_mean() -> None:
    walk = {"kind": "random_walk", "start": 100, "step": 0.1, "mean": 0, "reversion": 0.2}
    values = [p["x"] for p in payloads(run(batch(model({"x": walk})), 40))]
    assert values[0] > 70
    assert abs(values[-1]) < 5


def test_per_device_variation_gives_each_device_its_own_baseline() -> None:
    constant = {"kind": "constant", "value": {"kind": "uniform", "low": 10, "high": 20}}
    values = {p["x"] for p in payloads(run(batch(model({"x": constant}), 50), 0))}
    assert len(values) == 50
    assert all(10 <= v < 20 for v in values)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # Sampled at t = 0, 1, 2, 3 s of a 4 s period (a quarter period apart).
        ("sine", [0.0, 1.0, 0.0, -1.0]),
        ("square", [1.0, 1.0, -1.0, -1.0]),
        ("sawtooth", [-1.0, -0.5, 0.0, 0.5]),
        ("triangle", [-1.0, 0.0, 1.0, 0.0]),
    ],
)
def test_waves_have_their_shape(shape: str, expected: list[float]) -> None:
    wave = {"kind": "wave", "shape": shape, "period_s": 4, "round": 9}
    values = [p["x"] for p in payloads(run(batch(model({"x": wave})), 3))]
    assert values == pytest.approx(expected, abs=1e-9)


def test_wave_phase_shifts_the_wave() -> None:
    wave = {"kind": "wave", "period_s": 4, "phase_s": 1, "amplitude": 2, "offset": 10}
    values = [p["x"] for p in payloads(run(batch(model({"x": wave})), 0))]
    assert values == pytest.approx([12.0])


def test_counter_counts_and_wraps() -> None:
    counter = {"kind": "counter", "start": 0, "step": 3, "wrap_at": 10}
    values = [p["x"] for p in payloads(run(batch(model({"x": counter})), 5))]
    assert values == [0, 3, 6, 9, 0, 3]


def test_weighted_choice_follows_its_weights() -> None:
    choice = {"kind": "choice", "values": ["a", "b"], "weights": [9, 1]}
    values = [p["x"] for p in payloads(run(batch(model({"x": choice}), 100), 9))]
    share = values.count("a") / len(values)
    assert 0.85 < share < 0.95


def test_boolean_is_true_with_its_probability() -> None:
    values = [
        p["x"]
        for p in payloads(run(batch(model({"x": {"kind": "boolean", "probability": 0.2}}), 100), 9))
    ]
    assert 0.15 < sum(values) / len(values) < 0.25


def test_timestamps_in_every_format() -> None:
    fields = {
        "s": {"kind": "timestamp", "format": "epoch_s"},
        "ms": {"kind": "timestamp", "format": "epoch_ms"},
        "iso": {"kind": "timestamp", "format": "iso8601"},
    }
    device = batch(model(fields), start_epoch_s=1_767_225_600.0)  # 2026-01-01T00:00:00Z
    second = payloads(run(device, 1))[1]
    assert second["s"] == 1_767_225_601.0
    assert second["ms"] == 1_767_225_601_000
    assert second["iso"] == "2026-01-01T00:00:01.000Z"


def test_uuid_is_version_4_new_per_sample_or_fixed_per_device() -> None:
    fields = {
        "sample": {"kind": "uuid"},
        "device": {"kind": "uuid", "per": "device"},
    }
    sent = payloads(run(batch(model(fields)), 2))
    pattern = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    assert all(pattern.match(p["sample"]) and pattern.match(p["device"]) for p in sent)
    assert len({p["sample"] for p in sent}) == 3
    assert len({p["device"] for p in sent}) == 1


def test_template_field_formats_other_names() -> None:
    fields = {
        "n": {"kind": "counter"},
        "label": {"kind": "template", "template": "{device_id}/{n:03d}"},
    }
    sent = payloads(run(batch(model(fields, id="dev-{index}")), 1))
    assert [p["label"] for p in sent] == ["dev-0/000", "dev-0/001"]


def test_expression_field_derives_from_other_fields_in_dependency_order() -> None:
    fields = {
        "f": {"kind": "expression", "expr": "c * 9 / 5 + 32"},
        "c": {"kind": "counter", "start": 0, "step": 10},
    }
    sent = payloads(run(batch(model(fields)), 2))
    assert [p["f"] for p in sent] == [32.0, 50.0, 68.0]


def test_gps_area_keeps_each_device_inside_its_circle() -> None:
    area = {"kind": "gps_area", "center": {"lat": 48.85, "lon": 2.35}, "radius_m": 1000}
    sent = payloads(run(batch(model({"pos": area}), 200), 0))
    lat = np.array([p["pos"]["lat"] for p in sent])
    lon = np.array([p["pos"]["lon"] for p in sent])
    north_m = (lat - 48.85) * 111_195
    east_m = (lon - 2.35) * 111_195 * np.cos(np.radians(48.85))
    assert np.hypot(north_m, east_m).max() <= 1001
    assert len(set(lat.tolist())) == 200


def test_gps_route_moves_along_its_waypoints_at_its_speed() -> None:
    # Two points 1 km apart due east on the equator; 10 m/s covers the leg in 100 s.
    route = {
        "kind": "gps_route",
        "routes": [[{"lat": 0, "lon": 0}, {"lat": 0, "lon": 0.0089932}]],
        "speed_mps": 10,
        "loop": False,
    }
    data = model({"pos": route})
    data["messages"]["telemetry"]["schedule"]["interval_s"] = 50
    sent = [p["pos"] for p in payloads(run(batch(data), 150))]
    assert [round(p["lon"], 5) for p in sent] == pytest.approx([0.0, 0.0045, 0.00899, 0.0045])
    assert [p["heading"] for p in sent[:2]] == [90.0, 90.0]
    assert sent[3]["heading"] == 270.0  # on its way back


def test_replay_without_time_column_takes_the_next_row(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("value\n1\n2\n3\n", encoding="utf-8")
    replay = {"kind": "replay", "file": "data.csv", "column": "value", "stagger": False}
    device = batch(model({"x": replay}), file=tmp_path / "m.yaml")
    assert [p["x"] for p in payloads(run(device, 4))] == [1, 2, 3, 1, 2]


def test_replay_with_time_column_follows_recorded_time_warped(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("t,value\n0,10\n10,20\n20,30\n", encoding="utf-8")
    replay = {
        "kind": "replay",
        "file": "data.csv",
        "column": "value",
        "time_column": "t",
        "time_warp": 5,
        "stagger": False,
    }
    device = batch(model({"x": replay}), file=tmp_path / "m.yaml")
    # At 5x, one second of run time is 5 s of recording; the loop lasts 30 s (6 s of run).
    assert [p["x"] for p in payloads(run(device, 7))] == [10, 10, 20, 20, 30, 30, 10, 10]


# --- schedules ----------------------------------------------------------------------


def test_jittered_interval_does_not_drift() -> None:
    data = model({"x": {"kind": "constant", "value": 1}})
    data["messages"]["telemetry"]["schedule"] = {
        "kind": "interval",
        "interval_s": 10,
        "jitter_s": 2,
        "start": "aligned",
    }
    times = [m.due_s for m in run(batch(data), 1000)]
    assert len(times) == 100
    assert all(abs(t - 10 * n) <= 2 for n, t in enumerate(times))
    assert all(b > a for a, b in itertools.pairwise(times))


def test_spread_start_spreads_first_sends_over_one_interval() -> None:
    data = model({"x": {"kind": "constant", "value": 1}})
    data["messages"]["telemetry"]["schedule"] = {"kind": "interval", "interval_s": 10}
    first = [m.due_s for m in batch(data, 1000).advance(10)][:1000]
    assert min(first) < 0.1
    assert max(first) > 9.9
    assert 4.5 < float(np.mean(first)) < 5.5


def test_poisson_schedule_has_its_mean_rate() -> None:
    data = model({"x": {"kind": "constant", "value": 1}})
    data["messages"]["telemetry"]["schedule"] = {"kind": "poisson", "rate_hz": 0.5}
    sent = run(batch(data, 100), 100)
    assert 4500 < len(sent) < 5500


def test_burst_sends_count_messages_spaced_apart_every_period() -> None:
    data = model({"x": {"kind": "constant", "value": 1}})
    data["messages"]["telemetry"]["schedule"] = {
        "kind": "burst",
        "every_s": 60,
        "count": 3,
        "spacing_s": 0.5,
        "start": "aligned",
    }
    assert [m.due_s for m in run(batch(data), 61)] == [0.0, 0.5, 1.0, 60.0, 60.5, 61.0]


def test_on_change_sends_only_past_the_deadband_and_on_heartbeat() -> None:
    data = model({"x": {"kind": "wave", "shape": "square", "period_s": 100, "amplitude": 1}})
    data["messages"]["telemetry"]["schedule"] = {
        "kind": "on_change",
        "sample_interval_s": 1,
        "deadband": 0.5,
        "max_interval_s": 30,
    }
    device = batch(data)
    times = np.array([m.due_s for m in run(device, 120)])
    # First sample, heartbeats every 30 s, the flip at 50 s, the flip back at 100 s.
    first = times[0]
    assert first < 1
    assert np.isclose(times, first + 50).any()
    assert np.isclose(times, first + 100).any()
    assert np.diff(times).max() <= 30 + 1e-9
    assert len(times) < 10


# --- events -------------------------------------------------------------------------


def test_condition_event_rises_once_per_crossing_with_hysteresis() -> None:
    wave = {"kind": "wave", "shape": "triangle", "period_s": 20, "amplitude": 10}
    events = {
        "high": {"when": "x > 5", "clear_when": "x < 0", "send_clear": True, "fields": ["x"]},
    }
    sent = run(batch(model({"x": wave}, events=events)), 40)
    alarms = [json.loads(m.payload) for m in sent if m.kind is MessageKind.EVENT]
    assert [(a["active"], round(a["x"])) for a in alarms] == [
        (True, 6),
        (False, -2),
        (True, 6),
        (False, -2),
    ]
    assert alarms[0]["event"] == "high"
    assert alarms[0]["severity"] == "warning"
    assert (
        next(m for m in sent if m.kind is MessageKind.EVENT).topic == "devices/probe-000000/events"
    )


def test_rate_event_fires_at_its_rate() -> None:
    events = {"tamper": {"rate_per_hour": 3600}}
    sent = run(batch(model({"x": {"kind": "constant", "value": 1}}, events=events), 10), 100)
    count = sum(1 for m in sent if m.name == "tamper")
    assert 850 < count < 1150


# --- states and commands ------------------------------------------------------------

CHARGER = {
    "initial": "idle",
    "states": {
        "idle": {},
        "charging": {"fields": {"power": {"kind": "constant", "value": 11}}},
        "done": {},
    },
    "transitions": [
        {"from": "idle", "to": "charging", "after_s": 5},
        {"from": "charging", "to": "done", "when": "energy >= 8"},
        {"from": "*", "to": "idle", "on_command": "stop"},
    ],
}


def charger(**sections: Any) -> dict[str, Any]:
    fields = {
        "power": {"kind": "constant", "value": 0},
        "energy": {"kind": "counter", "start": 0, "step": 1},
        "mode": {"kind": "expression", "expr": "state"},
    }
    sections.setdefault("commands", {"handlers": {"stop": {}}})
    return model(fields, states=CHARGER, **sections)


def test_state_machine_moves_on_time_and_on_condition_with_state_fields() -> None:
    sent = payloads(run(batch(charger()), 9))
    assert [(p["mode"], p["power"]) for p in sent] == [
        ("idle", 0),
        ("idle", 0),
        ("idle", 0),
        ("idle", 0),
        ("idle", 0),
        ("idle", 0),  # the transition after 5 s is taken at this sample
        ("charging", 11),
        ("charging", 11),
        ("charging", 11),  # energy reaches 8 at this sample
        ("done", 0),
    ]


def test_on_enter_event_is_raised_when_a_state_is_entered() -> None:
    events = {"started": {"on_enter": "charging"}}
    sent = run(batch(charger(events=events)), 9)
    started = [m for m in sent if m.name == "started"]
    assert [m.due_s for m in started] == [5.0]


def test_messages_limited_to_states_are_sent_only_in_them() -> None:
    data = charger()
    data["messages"]["session"] = {
        "schedule": {"kind": "interval", "interval_s": 1, "start": "aligned"},
        "states": ["charging"],
        "fields": ["energy"],
    }
    sent = run(batch(data), 9)
    assert [m.due_s for m in sent if m.name == "session"] == [6.0, 7.0, 8.0]


COMMANDS = {
    "handlers": {
        "set_level": {
            "accept_when": "payload.value <= 100",
            "set": {"level": "payload.value"},
            "reply": {"delay_s": 0.5, "values": {"level": "level"}},
        },
        "stop": {"reply": {"values": {"state": "state"}}},
        "reboot": {"offline_s": 10, "reply": None},
    }
}


def commanded() -> DeviceBatch:
    fields = {
        "level": {"kind": "constant", "value": 1},
        "power": {"kind": "constant", "value": 0},
        "energy": {"kind": "counter"},
    }
    return batch(model(fields, states=CHARGER, commands=COMMANDS))


def test_command_sets_a_field_and_replies_after_its_delay() -> None:
    device = commanded()
    run(device, 2)
    assert device.handle_command(0, "set_level", {"value": 42}, 2.25) is CommandStatus.OK
    assert device.next_due_s() == 2.75
    reply = device.advance(2.75)[0]
    assert reply.kind is MessageKind.REPLY
    assert reply.topic == "devices/probe-000000/replies/set_level"
    assert json.loads(reply.payload)["status"] == "ok"
    assert json.loads(reply.payload)["level"] == 42
    assert payloads(run(device, 3))[-1]["level"] == 42


def test_command_refused_by_accept_when_is_rejected_and_changes_nothing() -> None:
    device = commanded()
    assert device.handle_command(0, "set_level", {"value": 500}, 0.5) is CommandStatus.REJECTED
    replies = device.advance(1.0)
    assert json.loads(replies[0].payload)["status"] == "rejected"
    assert payloads(replies)[-1]["level"] == 1


@pytest.mark.parametrize("payload", [[1, 2], 5, "high", {}, {"value": "high"}])
def test_a_payload_the_handler_cannot_read_is_invalid_and_changes_nothing(payload: Any) -> None:
    device = commanded()
    status = device.handle_command(0, "set_level", payload, 0.5)
    assert status is CommandStatus.INVALID
    replies = device.advance(1.0)
    assert json.loads(replies[0].payload)["status"] == "invalid_payload"
    assert payloads(replies)[-1]["level"] == 1


def test_a_reply_that_reads_an_unreadable_payload_is_sent_plain() -> None:
    commands = {
        "handlers": {
            "echo": {"reply": {"values": {"asked": "payload.value"}}},
            "set_level": COMMANDS["handlers"]["set_level"],
        }
    }
    fields = {"level": {"kind": "constant", "value": 1}}
    device = batch(model(fields, commands=commands))
    assert device.handle_command(0, "echo", {"value": 7}, 0.5) is CommandStatus.OK
    assert device.handle_command(0, "echo", [7], 0.5) is CommandStatus.INVALID
    ok, invalid = (
        json.loads(m.payload) for m in device.advance(0.5) if m.kind is MessageKind.REPLY
    )
    assert (ok["status"], ok["asked"]) == ("ok", 7)
    assert invalid["status"] == "invalid_payload"
    assert "asked" not in invalid


def test_unknown_command_gets_an_unknown_reply() -> None:
    device = commanded()
    assert device.handle_command(0, "selfdestruct", {}, 0.5) is CommandStatus.UNKNOWN
    reply = device.advance(0.5)[0]
    assert json.loads(reply.payload)["status"] == "unknown_command"


def test_command_transition_changes_state_and_the_reply_sees_it() -> None:
    device = commanded()
    run(device, 5)
    assert device.state_names[int(device.state[0])] == "charging"
    device.handle_command(0, "stop", {}, 5.5)
    reply = device.advance(5.5)[0]
    assert json.loads(reply.payload)["state"] == "idle"


def test_reboot_takes_the_device_offline_for_a_while() -> None:
    device = commanded()
    run(device, 1)
    assert device.handle_command(0, "reboot", {}, 1.5) is CommandStatus.OK
    times = [m.due_s for m in run(device, 15)]
    assert times == [12.0, 13.0, 14.0, 15.0]
    assert device.handle_command(0, "reboot", {}, 15.5) is CommandStatus.OK
    assert device.handle_command(0, "set_level", {"value": 3}, 16) is CommandStatus.OFFLINE


# --- payloads -----------------------------------------------------------------------


def test_binary_payload_carries_scaled_fields() -> None:
    data = model({"v": {"kind": "constant", "value": 230.4}})
    data["messages"]["telemetry"]["payload"] = {
        "kind": "binary",
        "fields": [
            {"name": "head", "type": "u8", "value": 165},
            {"name": "v", "type": "u16", "scale": 0.1},
            {"name": "crc", "type": "crc16", "algorithm": "modbus", "endian": "little"},
        ],
    }
    message = batch(data).advance(0)[0]
    assert message.payload[:3] == bytes([0xA5, 0x09, 0x00])
    assert len(message.payload) == 5


def test_topic_template_uses_attributes() -> None:
    data = model(
        {"x": {"kind": "constant", "value": 1}},
        attributes={"site": {"kind": "template", "template": "site-{index}"}},
    )
    data["messages"]["telemetry"]["topic"] = "{site}/{device_id}/{message}"
    assert batch(data, indices=[4]).advance(0)[0].topic == "site-4/probe-000004/telemetry"


def test_payloads_can_read_the_parts_of_a_gps_position() -> None:
    area = {"kind": "gps_area", "center": {"lat": 48.85, "lon": 2.35}, "radius_m": 10}
    data = model({"pos": area})
    data["messages"]["telemetry"]["payload"] = {
        "kind": "binary",
        "fields": [{"name": "lat", "source": "pos.lat", "type": "i32", "scale": 1e-7}],
    }
    data["messages"]["text"] = {
        "schedule": {"kind": "interval", "interval_s": 1, "start": "aligned"},
        "payload": {"kind": "json", "template": {"at": "${pos.lat:.2f}/${pos.lon:.2f}"}},
    }
    device = batch(data)
    sent = {m.name: m for m in device.advance(0)}
    assert device.encoder_for(sent["telemetry"]).decode(sent["telemetry"].payload)["lat"] == (
        pytest.approx(48.85, abs=1e-3)
    )
    assert json.loads(sent["text"].payload) == {"at": "48.85/2.35"}


def test_round_zero_gives_integers() -> None:
    fields = {
        "a": {"kind": "uniform", "low": 0, "high": 100, "round": 0},
        "b": {"kind": "counter", "start": {"kind": "uniform", "low": 5, "high": 9}, "round": 0},
    }
    sent = payloads(run(batch(model(fields), 5), 2))
    assert all(isinstance(p["a"], int) and isinstance(p["b"], int) for p in sent)


def test_wave_on_the_wall_clock_keeps_its_time_of_day() -> None:
    wave = {"kind": "wave", "period_s": 86400, "amplitude": 1, "time_base": "wall", "round": 6}
    midnight = batch(model({"x": wave}), start_epoch_s=1_767_225_600.0)  # 00:00 UTC
    six_am = batch(model({"x": wave}), start_epoch_s=1_767_225_600.0 + 6 * 3600)
    assert payloads(midnight.advance(0))[0]["x"] == pytest.approx(0.0, abs=1e-6)
    assert payloads(six_am.advance(0))[0]["x"] == pytest.approx(1.0)


def test_rate_given_as_a_distribution_is_drawn_per_hour() -> None:
    rate = {"kind": "uniform", "low": 1000, "high": 3000, "round": 0}
    events = {"knock": {"rate_per_hour": rate}}
    sent = run(batch(model({"x": {"kind": "constant", "value": 1}}, events=events), 20), 360)
    count = sum(1 for m in sent if m.name == "knock")
    assert 2 * 20 * 0.8 / 10 * 1000 < count < 2 * 20 * 1.2 / 10 * 1000


def test_on_change_watches_positions_and_skips_timestamps() -> None:
    route = {
        "kind": "gps_route",
        "routes": [[{"lat": 0, "lon": 0}, {"lat": 0, "lon": 0.01}]],
        "speed_mps": 0,
    }
    data = model({"pos": route, "at": {"kind": "timestamp"}})
    data["messages"]["telemetry"]["schedule"] = {"kind": "on_change", "sample_interval_s": 1}
    assert len(run(batch(data), 20)) == 1  # parked: only the first sample is news


def test_state_at_sample_time_is_what_the_message_reports() -> None:
    data = charger()
    data["fields"]["where"] = {"kind": "expression", "expr": "state"}
    data["messages"]["telemetry"]["payload"] = {
        "kind": "json",
        "template": {"state": "${state}", "where": "${where}", "power": "${power}"},
    }
    for sent in payloads(run(batch(data), 12)):
        assert sent["state"] == sent["where"]
        assert (sent["power"] == 11) == (sent["state"] == "charging")


def test_state_s_is_the_time_in_the_current_state() -> None:
    data = charger()
    data["fields"]["in_state"] = {"kind": "expression", "expr": "state_s"}
    assert [p["in_state"] for p in payloads(run(batch(data), 7))] == [0, 1, 2, 3, 4, 5, 1, 2]


def test_any_state_transition_does_not_re_enter_its_target() -> None:
    states = {
        "initial": "ok",
        "states": {"ok": {}, "alarm": {}},
        "transitions": [
            {"from": "*", "to": "alarm", "when": "x >= 2"},
            {"from": "alarm", "to": "ok", "after_s": 3},
        ],
    }
    events = {"raised": {"on_enter": "alarm"}}
    sent = run(batch(model({"x": {"kind": "counter"}}, states=states, events=events)), 10)
    # Enters alarm at x=2, leaves after 3 s, enters again at once: not at every sample.
    assert [m.due_s for m in sent if m.name == "raised"] == [2.0, 6.0, 10.0]


def test_entering_a_state_by_command_raises_its_on_enter_event() -> None:
    events = {"stopped": {"on_enter": "idle", "fields": ["energy"]}}
    fields = {**charger()["fields"], "level": {"kind": "constant", "value": 1}}
    device = batch(model(fields, states=CHARGER, commands=COMMANDS, events=events))
    run(device, 6)
    device.handle_command(0, "stop", {}, 6.5)
    sent = device.advance(6.5)
    stopped = next(m for m in sent if m.name == "stopped")
    assert json.loads(stopped.payload)["state"] == "idle"
    assert json.loads(stopped.payload)["energy"] == 6


def test_replies_read_fields_as_last_sampled_in_the_current_state() -> None:
    commands = {
        "handlers": {
            "stop": {
                "reply": {
                    "values": {"power_was": "power"},
                    "payload": {
                        "kind": "json",
                        "template": {"p": "${power_was}", "e": "${energy}", "m": "${model}"},
                    },
                }
            }
        }
    }
    device = batch(model(charger()["fields"], states=CHARGER, commands=commands))
    run(device, 7)
    device.handle_command(0, "stop", {}, 7.5)
    assert json.loads(device.advance(7.5)[0].payload) == {"p": 11, "e": 7, "m": "probe"}


def test_a_command_before_the_first_sample_reads_fresh_values() -> None:
    device = commanded()
    device.handle_command(0, "set_level", {"value": 5}, 0.0)
    assert json.loads(device.advance(0.0)[0].payload)["level"] == 5


def test_replayed_columns_of_one_file_stay_on_the_same_row(tmp_path: Path) -> None:
    rows = "\n".join(f"{i},{i * 10}" for i in range(50))
    (tmp_path / "data.csv").write_text(f"a,b\n{rows}\n", encoding="utf-8")
    fields = {
        "a": {"kind": "replay", "file": "data.csv", "column": "a"},
        "b": {"kind": "replay", "file": "data.csv", "column": "b"},
    }
    sent = payloads(run(batch(model(fields), 10, file=tmp_path / "m.yaml"), 3))
    assert len({p["a"] for p in sent}) > 5
    assert all(p["b"] == p["a"] * 10 for p in sent)


def test_message_fields_may_list_attributes() -> None:
    data = model({"x": {"kind": "constant", "value": 1}}, attributes={"site": "lyon"})
    data["messages"]["telemetry"]["fields"] = ["x", "site"]
    assert payloads(batch(data).advance(0))[0]["site"] == "lyon"


def test_state_s_in_a_payload_is_from_before_the_transition() -> None:
    data = charger()
    data["messages"]["telemetry"]["payload"] = {
        "kind": "json",
        "template": {"state": "${state}", "state_s": "${state_s}"},
    }
    sent = payloads(run(batch(data), 6))
    assert sent[5] == {"state": "idle", "state_s": 5.0}  # the sample that moves it on
    assert sent[6] == {"state": "charging", "state_s": 1.0}


def test_template_field_reads_the_parts_of_a_position() -> None:
    area = {"kind": "gps_area", "center": {"lat": 10, "lon": 20}, "radius_m": 1}
    fields = {"pos": area, "where": {"kind": "template", "template": "{pos.lat:.2f};{pos.lon:.2f}"}}
    assert payloads(batch(model(fields)).advance(0))[0]["where"] == "10.00;20.00"


def test_expression_rounded_to_zero_decimals_is_an_integer() -> None:
    fields = {
        "x": {"kind": "constant", "value": 92.4},
        "y": {"kind": "expression", "expr": "x", "round": 0},
    }
    assert payloads(batch(model(fields)).advance(0))[0]["y"] == 92


def test_reply_payload_may_read_the_message_name() -> None:
    commands = {
        "handlers": {
            "go": {"reply": {"payload": {"kind": "json", "template": {"m": "${message}"}}}}
        }
    }
    device = batch(model({"x": {"kind": "constant", "value": 1}}, commands=commands))
    device.handle_command(0, "go", {}, 1.0)
    assert json.loads(device.advance(1.0)[0].payload) == {"m": "go"}


def test_paused_devices_neither_send_nor_use_up_sequence_numbers() -> None:
    device = batch(model({"x": {"kind": "counter"}}), 2)
    device.paused[1] = True
    first = device.advance(2)
    device.paused[1] = False
    later = device.advance(4)
    assert {m.device_index for m in first} == {0}
    assert [m.seq for m in later if m.device_index == 1] == [0, 1]
