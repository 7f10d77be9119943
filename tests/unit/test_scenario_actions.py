"""Scenario actions, windows, abort, shares and credentials: what loads, and every
mistake reported before anything runs, with its path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import yaml

from iotix.engine.credentials import CredentialsError, read_credentials
from iotix.engine.worker import in_share
from iotix.metrics import Counters, Histogram, Snapshot
from iotix.model.loader import load_model
from iotix.model.runtime import DeviceBatch, MessageKind
from iotix.scenario.checks import MetricKind, evaluate, parse_check, run_metrics
from iotix.scenario.loader import LoadedScenario, ScenarioError, load_scenario

if TYPE_CHECKING:
    from iotix.errors import ModelIssue

ROOT = Path(__file__).resolve().parents[2]
THERMOSTAT = ROOT / "examples" / "device-models" / "thermostat.yaml"
DOOR = ROOT / "examples" / "device-models" / "door-sensor.yaml"


def _write(tmp_path: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": "t",
        "brokers": {"main": "mqtt://127.0.0.1:1883", "spare": "mqtt://127.0.0.1:1884"},
        "fleets": [
            {"name": "thermo", "model": str(THERMOSTAT), "devices": 10, "broker": "main"},
            {"name": "doors", "model": str(DOOR), "devices": 5, "broker": "main"},
        ],
        "duration": "1m",
    }
    data.update(changes)
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _load(tmp_path: Path, **changes: Any) -> LoadedScenario:
    return load_scenario(_write(tmp_path, **changes))


def _only(tmp_path: Path, **changes: Any) -> ModelIssue:
    with pytest.raises(ScenarioError) as info:
        _load(tmp_path, **changes)
    issues = info.value.issues
    assert len(issues) == 1, [str(i) for i in issues]
    return issues[0]


# --- actions ------------------------------------------------------------------------------


def test_every_kind_of_action_loads_with_times_in_seconds(tmp_path: Path) -> None:
    actions = [
        {"kind": "disconnect", "at": "5s", "fleet": "thermo", "share": "25%", "offline": "10s"},
        {"kind": "reconnect_storm", "at": 20},
        {
            "kind": "command",
            "at": "30s",
            "fleet": "thermo",
            "command": "set_setpoint",
            "payload": {"value": 22},
            "timeout": "2s",
        },
        {
            "kind": "set",
            "when": "devices_connected >= 15",
            "fleet": "thermo",
            "field": "setpoint",
            "value": 25,
        },
        {"kind": "restart_broker", "at": "40s", "broker": "main", "down_for": "5s"},
        {"name": "move", "kind": "failover", "at": "50s", "broker": "main", "to": "spare"},
    ]
    loaded = _load(tmp_path, actions=actions)
    disconnect, storm, command, set_, restart, failover = loaded.actions
    assert (disconnect.at_s, disconnect.share, disconnect.offline_s) == (5.0, 0.25, 10.0)
    assert storm.share == 1.0
    assert command.timeout_s == 2.0
    assert set_.at_s is None
    assert set_.when == "devices_connected >= 15"
    assert restart.down_for_s == 5.0
    assert failover.to == "spare"
    assert loaded.action_names == (
        "disconnect",
        "reconnect_storm",
        "command",
        "set",
        "restart_broker",
        "move",
    )


def test_unnamed_entries_of_one_kind_are_numbered(tmp_path: Path) -> None:
    loaded = _load(
        tmp_path,
        faults=[
            {"kind": "reset", "at": "1s"},
            {"kind": "reset", "at": "2s"},
            {"kind": "latency", "at": "1s", "duration": "1s", "delay": "10ms"},
        ],
        actions=[{"kind": "reconnect_storm", "at": "3s"}],
    )
    assert loaded.fault_names == ("reset-1", "reset-2", "latency")
    assert loaded.action_names == ("reconnect_storm",)


@pytest.mark.parametrize(
    ("action", "path", "words"),
    [
        ({"kind": "disconnect"}, "actions[0]", "needs `at`"),
        ({"kind": "disconnect", "at": "2m"}, "actions[0].at", "is over"),
        (
            {"kind": "disconnect", "at": "1s", "fleet": "therm"},
            "actions[0].fleet",
            "did you mean 'thermo'",
        ),
        (
            {"kind": "disconnect", "at": "1s", "share": "120%"},
            "actions[0].share",
            "less than or equal to 1",
        ),
        (
            {"kind": "disconnect", "at": "1s", "share": "lots"},
            "actions[0].share",
            "a fraction (0.25) or a percentage",
        ),
        ({"kind": "disconnect", "at": "1s", "when": "connectz > 1"}, "actions[0].when", "connectz"),
        (
            {"kind": "command", "at": "1s", "fleet": "doors", "command": "open"},
            "actions[0].command",
            "takes no commands",
        ),
        (
            {"kind": "command", "at": "1s", "fleet": "thermo", "command": "set_setpont"},
            "actions[0].command",
            "did you mean 'set_setpoint'",
        ),
        (
            {"kind": "set", "at": "1s", "fleet": "thermo", "field": "humidity", "value": 1},
            "actions[0].field",
            "cannot be set",
        ),
        (
            {"kind": "set", "at": "1s", "fleet": "thermo", "field": "nope", "value": 1},
            "actions[0].field",
            "unknown field",
        ),
        (
            {"kind": "failover", "at": "1s", "broker": "main", "to": "main"},
            "actions[0].to",
            "itself",
        ),
        (
            {"kind": "failover", "at": "1s", "broker": "main", "to": "sparse"},
            "actions[0].to",
            "did you mean 'spare'",
        ),
        ({"kind": "restart_broker", "at": "1s", "broker": "main"}, "actions[0]", "down_for"),
        ({"kind": "explode", "at": "1s"}, "actions[0]", "explode"),
    ],
)
def test_a_bad_action_is_refused_with_its_path(
    tmp_path: Path, action: dict[str, Any], path: str, words: str
) -> None:
    issue = _only(tmp_path, actions=[action])
    assert issue.dotted_path.startswith(path), issue
    assert words in str(issue), issue


def test_a_command_to_every_fleet_needs_every_fleet_to_take_it(tmp_path: Path) -> None:
    issue = _only(tmp_path, actions=[{"kind": "command", "at": "1s", "command": "set_setpoint"}])
    assert "fleet 'doors'" in str(issue)


def test_two_entries_of_one_name_are_refused(tmp_path: Path) -> None:
    issue = _only(
        tmp_path,
        faults=[{"name": "x", "kind": "reset", "at": "1s"}],
        actions=[{"name": "x", "kind": "reconnect_storm", "at": "2s"}],
    )
    assert issue.dotted_path == "actions[0].name"
    assert "faults[0] has it too" in str(issue)


# --- faults: shares, fleets, overlaps -----------------------------------------------------


def test_a_fault_takes_a_percentage_and_a_fleet(tmp_path: Path) -> None:
    [fault] = _load(
        tmp_path,
        faults=[{"kind": "partition", "at": 1, "duration": 2, "share": "12.5%", "fleet": "doors"}],
    ).faults
    assert (fault.share, fault.fleet) == (0.125, "doors")


def test_overlapping_faults_of_one_kind_on_the_same_connections_are_refused(
    tmp_path: Path,
) -> None:
    issue = _only(
        tmp_path,
        faults=[
            {"kind": "latency", "at": "0s", "duration": "10s", "delay": "1ms"},
            {"kind": "latency", "at": "5s", "duration": "10s", "delay": "2ms"},
        ],
    )
    assert issue.dotted_path == "faults[1].at"
    assert "overlaps faults[0]" in str(issue)


@pytest.mark.parametrize(
    "second",
    [
        {"kind": "bandwidth", "at": "5s", "duration": "10s", "bytes_per_s": 100},  # other kind
        {"kind": "latency", "at": "10s", "duration": "10s", "delay": "1ms"},  # follows it
        {"kind": "latency", "at": "5s", "duration": "10s", "delay": "1ms", "fleet": "doors"},
    ],
)
def test_faults_that_do_not_collide_may_overlap_in_time(
    tmp_path: Path, second: dict[str, Any]
) -> None:
    first = {"kind": "latency", "at": "0s", "duration": "10s", "delay": "1ms", "fleet": "thermo"}
    assert len(_load(tmp_path, faults=[first, second]).faults) == 2


# --- windows and abort --------------------------------------------------------------------


def test_windowed_and_aborting_checks_load(tmp_path: Path) -> None:
    loaded = _load(
        tmp_path,
        faults=[{"name": "cut", "kind": "partition", "at": "10s", "duration": "5s"}],
        checks=[
            {"check": "e2e_latency.p99 < 2s", "during": "cut"},
            {"check": "connect_failures == 0", "after": "cut", "for": "30s"},
            {"check": "ack_latency.p99 < 1s", "from": "20s", "to": "40s"},
            {"check": "connect_errors.rate < 5%", "abort_on_fail": True, "abort_after": "5s"},
        ],
    )
    during, after, between, abort = loaded.check_specs
    assert during.during == "cut"
    assert (after.after, after.for_s) == ("cut", 30.0)
    assert (between.from_s, between.to_s) == (20.0, 40.0)
    assert (abort.abort_on_fail, abort.abort_after_s) == (True, 5.0)
    # A check without a name is named by its text, whatever its window.
    assert next(name for name, _ in loaded.checks) == "e2e_latency.p99 < 2s"


@pytest.mark.parametrize(
    ("check", "path", "words"),
    [
        (
            {"check": "connects > 0", "during": "nothing"},
            "checks[0].during",
            "unknown fault or action 'nothing'",
        ),
        ({"check": "connects > 0", "during": "kick"}, "checks[0].during", "one instant"),
        ({"check": "connects > 0", "after": "cutt"}, "checks[0].after", "did you mean 'cut'"),
        ({"check": "connects > 0", "during": "cut", "from": "1s"}, "checks[0]", "one window"),
        ({"check": "connects > 0", "for": "1s"}, "checks[0]", "`for` goes with `after`"),
        ({"check": "connects > 0", "from": "5s", "to": "2s"}, "checks[0]", "before it starts"),
        ({"check": "lost == 0", "during": "cut"}, "checks[0].check", "no value over a window"),
        (
            {"check": "command_reply.max < 1s", "after": "cut"},
            "checks[0].check",
            "the commands' figure",
        ),
        (
            {"check": "delivery_ratio > 99%", "abort_on_fail": True},
            "checks[0].abort_on_fail",
            "cannot abort",
        ),
        (
            {"check": "command_reply_ratio > 99%", "abort_on_fail": True},
            "checks[0].abort_on_fail",
            "cannot abort",
        ),
        (
            {"check": "connects > 0", "during": "cut", "abort_on_fail": True},
            "checks[0]",
            "whole-run checks",
        ),
    ],
)
def test_a_bad_window_or_abort_is_refused_with_its_path(
    tmp_path: Path, check: dict[str, Any], path: str, words: str
) -> None:
    issue = _only(
        tmp_path,
        faults=[
            {"name": "cut", "kind": "partition", "at": "10s", "duration": "5s"},
            {"name": "kick", "kind": "reset", "at": "20s"},
        ],
        checks=[check],
    )
    assert issue.dotted_path.startswith(path), issue
    assert words in str(issue), issue


# --- credentials --------------------------------------------------------------------------


def test_credentials_by_device_id_and_by_row(tmp_path: Path) -> None:
    by_id = tmp_path / "ids.csv"
    by_id.write_text("device_id,username,password\nthermo-00002,u2,p2\n", encoding="utf-8")
    table = read_credentials(by_id)
    assert table.for_device("thermo-00002", 0) == ("u2", "p2")
    assert table.for_device("thermo-00003", 2) is None
    by_row = tmp_path / "rows.csv"
    by_row.write_text("password\ns0\ns1\ns2\n", encoding="utf-8")
    table = read_credentials(by_row, keep=[1])
    assert table.for_device("x", 1) == (None, "s1")
    assert table.for_device("x", 0) == (None, None)  # not this worker's: not kept


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "must name the columns"),
        ("id,secret\n1,2\n", "must name the columns"),
        ("username,password\nu,p,extra\n", "line 2: 3 values for 2 columns"),
    ],
)
def test_a_bad_credentials_file_says_what_is_wrong(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "c.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CredentialsError, match=words):
        read_credentials(path)


def test_a_fleet_with_too_few_credential_rows_is_refused(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("username,password\nu,p\n", encoding="utf-8")
    fleets = [{"name": "thermo", "model": str(THERMOSTAT), "devices": 3, "credentials": "c.csv"}]
    issue = _only(tmp_path, fleets=fleets, brokers={"main": "mqtt://127.0.0.1:1883"})
    assert issue.dotted_path == "fleets[0].credentials"
    assert "1 rows for 3 devices" in str(issue)


def test_a_missing_credentials_file_is_refused(tmp_path: Path) -> None:
    fleets = [{"name": "thermo", "model": str(THERMOSTAT), "devices": 3, "credentials": "nope.csv"}]
    issue = _only(tmp_path, fleets=fleets, brokers={"main": "mqtt://127.0.0.1:1883"})
    assert "cannot read" in str(issue)


# --- the pieces: shares, windows of snapshots, set ----------------------------------------


def test_shares_are_deterministic_nested_and_about_right() -> None:
    indices = np.arange(20_000)
    tenth, half = in_share(indices, 0.1, 7), in_share(indices, 0.5, 7)
    assert np.array_equal(tenth, in_share(indices, 0.1, 7))
    assert not (tenth & ~half).any()  # the 10 % are among the 50 %
    assert 0.09 < tenth.mean() < 0.11
    assert 0.48 < half.mean() < 0.52
    assert in_share(indices, 1.0, 7).all()
    # A worker holding a slice picks the same devices as one holding them all.
    assert np.array_equal(in_share(indices[500:900], 0.1, 7), tenth[500:900])


def test_a_snapshot_since_an_earlier_one_is_the_difference() -> None:
    earlier = Snapshot(worker=-1, at_s=10.0, counters=Counters(connects=5, messages_sent=100))
    earlier.ack_latency.record_many([0.01] * 10)
    later = earlier.copy()
    later.at_s = 25.0
    later.counters.connects = 7
    later.counters.messages_sent = 160
    later.counters.errors_by_kind["boom"] = 2
    later.ack_latency.record_many([0.5] * 4)
    window = later.since(earlier)
    assert window.at_s == 15.0
    assert (window.counters.connects, window.counters.messages_sent) == (2, 60)
    assert window.counters.errors_by_kind == {"boom": 2}
    assert window.ack_latency.count == 4
    assert window.ack_latency.percentile(0.5) >= 0.5
    with pytest.raises(ValueError, match="later state"):
        earlier.since(later)


def test_set_field_changes_a_settable_field_on_the_rows_given() -> None:
    model = load_model(THERMOSTAT)
    batch = DeviceBatch(model.spec, indices=list(range(4)), seed=1, base_dir=model.base_dir)
    batch.set_field("setpoint", np.array([1, 3]), 25.0)
    messages = batch.advance(0.0) + batch.advance(15.0)
    setpoints = {
        m.device_id: json.loads(m.payload)["setpoint"]
        for m in messages
        if m.kind is MessageKind.TELEMETRY
    }
    ids = batch.device_ids
    assert setpoints[ids[1]] == setpoints[ids[3]] == 25.0
    assert setpoints[ids[0]] == setpoints[ids[2]] == 21.0
    with pytest.raises(Exception, match="humidity is not a field that can be set"):
        batch.set_field("humidity", np.array([0]), 1.0)


def test_histogram_helpers_used_by_windows_are_exact() -> None:
    first = Histogram()
    first.record_many([0.1, 0.2])
    second = first.copy()
    second.record(0.3)
    assert second.since(first).count == 1


def test_state_metrics_are_shares_of_each_fleet() -> None:
    summary = {
        "states": {"a/off": 3, "a/on": 1, "b/idle": 5},
        "states_reached": {"a/off": 4, "a/on": 2, "b/idle": 5},
    }
    metrics = run_metrics(summary, None)
    assert metrics["state.a.on"] == 0.25
    assert metrics["state_reached.a.on"] == 0.5
    assert metrics["state.b.idle"] == 1.0
    check = parse_check("state_reached.a.on >= 50%")
    assert check.kind is MetricKind.RATIO
    assert evaluate([check], metrics)[0].passed
    [missing] = evaluate([parse_check("state.c.on > 0")], metrics)
    assert not missing.passed
    assert "no fleet c in this run" in missing.message


def test_devices_connected_ratio_needs_the_number_of_devices() -> None:
    summary = {"devices_connected": 3}
    assert "devices_connected.ratio" not in run_metrics(summary, None)
    assert run_metrics(summary, None, devices=4)["devices_connected.ratio"] == 0.75


def test_the_batch_remembers_every_state_a_device_has_been_in() -> None:
    model = load_model(ROOT / "examples" / "device-models" / "ev-charger.yaml")
    batch = DeviceBatch(model.spec, indices=list(range(50)), seed=3, base_dir=model.base_dir)
    now, reached = batch.state_counts()
    assert sum(now.values()) == 50
    assert now == reached  # nobody has moved yet
    batch.advance(0.0)
    batch.advance(120.0)  # idle chargers plug in after 20 to 60 s
    now, reached = batch.state_counts()
    assert reached["plugged"] > now["plugged"] or reached["idle"] > now["idle"]
    assert all(reached[state] >= now[state] for state in now)


@pytest.mark.parametrize(
    ("broker", "fault", "words"),
    [
        ("coap://127.0.0.1:5683", {"kind": "reset", "at": "1s"}, "about connections"),
        (
            "coap://127.0.0.1:5683",
            {"kind": "bandwidth", "at": "1s", "duration": "1s", "bytes_per_s": 10},
            "about connections",
        ),
        (
            "mqtt://127.0.0.1:1883",
            {"kind": "loss", "at": "1s", "duration": "1s", "probability": 0.1},
            "a fault for datagrams",
        ),
        (
            "kafka://127.0.0.1:9092",
            {"kind": "latency", "at": "1s", "duration": "1s", "delay": "1ms"},
            "cannot reach a Kafka fleet",
        ),
    ],
)
def test_a_fault_must_suit_the_transport_of_the_fleets_it_reaches(
    tmp_path: Path, broker: str, fault: dict[str, Any], words: str
) -> None:
    fleets = [{"name": "thermo", "model": str(THERMOSTAT), "devices": 2}]
    issue = _only(tmp_path, brokers={"main": broker}, fleets=fleets, faults=[fault])
    assert issue.dotted_path.startswith("faults[0]"), issue
    assert words in str(issue), issue


def test_datagram_faults_load_for_a_coap_fleet(tmp_path: Path) -> None:
    fleets = [{"name": "thermo", "model": str(THERMOSTAT), "devices": 2}]
    faults = [
        {"kind": "loss", "at": "1s", "duration": "1s", "probability": "0.2"},
        {"kind": "reorder", "at": "1s", "duration": "1s", "probability": 0.1, "delay": "50ms"},
        {"kind": "duplicate", "at": "2s", "duration": "1s", "probability": 0.3},
        {"kind": "partition", "at": "3s", "duration": "1s"},
    ]
    loaded = _load(
        tmp_path, brokers={"main": "coap://127.0.0.1:5683"}, fleets=fleets, faults=faults
    )
    assert [f.kind for f in loaded.faults] == ["loss", "reorder", "duplicate", "partition"]


def test_a_coap_fleet_cannot_fail_over(tmp_path: Path) -> None:
    fleets = [{"name": "thermo", "model": str(THERMOSTAT), "devices": 2, "broker": "main"}]
    issue = _only(
        tmp_path,
        brokers={"main": "coap://127.0.0.1:5683", "spare": "coap://127.0.0.1:5684"},
        fleets=fleets,
        actions=[{"kind": "failover", "at": "1s", "broker": "main", "to": "spare"}],
    )
    assert issue.dotted_path == "actions[0].kind"
    assert "about connections" in str(issue)


def test_adapter_options_are_checked_when_the_scenario_loads(tmp_path: Path) -> None:
    fleets = [
        {
            "name": "thermo",
            "model": str(THERMOSTAT),
            "devices": 2,
            "adapter": {"method": "GET", "timeout": -1},
        }
    ]
    with pytest.raises(ScenarioError) as info:
        _load(tmp_path, brokers={"main": "http://127.0.0.1:8080"}, fleets=fleets)
    text = str(info.value)
    assert "fleets[0].adapter.timeout: a timeout is a number of seconds, not -1" in text
    assert "HTTP method 'GET'" in text
    mqtt = [
        {"name": "thermo", "model": str(THERMOSTAT), "devices": 2, "adapter": {"method": "PUT"}}
    ]
    issue = _only(tmp_path, brokers={"main": "mqtt://127.0.0.1:1883"}, fleets=mqtt)
    assert "this fleet's broker is MQTT" in str(issue)
