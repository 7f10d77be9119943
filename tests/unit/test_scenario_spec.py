"""Scenario files: the examples load, and every kind of mistake is reported before
anything runs, with the file, the line, the field path and a hint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from iotix.engine.stages import Stage
from iotix.engine.worker import BrokerEndpoint
from iotix.errors import ModelError, ModelIssue
from iotix.scenario.loader import (
    DEFAULT_DURATION_S,
    LoadedScenario,
    ScenarioError,
    load_scenario,
    load_scenario_data,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "scenarios").glob("*.yaml"))

MODEL = {
    "name": "probe",
    "fields": {"a": {"kind": "constant", "value": 1}},
    "messages": {"m": {"schedule": {"kind": "interval", "interval_s": 1}}},
}


def _scenario(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t",
        "brokers": {"main": "mqtt://127.0.0.1:1883"},
        "fleets": [{"name": "a", "model": "models/m.yaml", "devices": 10}],
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def _write(tmp_path: Path, data: Any, name: str = "scenario.yaml") -> Path:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    (models / "m.yaml").write_text(yaml.safe_dump(MODEL), encoding="utf-8")
    path = tmp_path / name
    text = json.dumps(data, indent=2) if name.endswith(".json") else yaml.safe_dump(data)
    path.write_text(text, encoding="utf-8")
    return path


def _load(tmp_path: Path, **changes: Any) -> LoadedScenario:
    return load_scenario(_write(tmp_path, _scenario(**changes)))


def _issues(tmp_path: Path, **changes: Any) -> list[ModelIssue]:
    with pytest.raises(ScenarioError) as info:
        _load(tmp_path, **changes)
    return info.value.issues


def _only(tmp_path: Path, **changes: Any) -> ModelIssue:
    issues = _issues(tmp_path, **changes)
    assert len(issues) == 1, [str(i) for i in issues]
    return issues[0]


# --- the examples -----------------------------------------------------------------------


def test_there_are_example_scenarios() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "smoke.yaml",
        "command-response.yaml",
        "soak-partition.yaml",
        "failover-storm.yaml",
        "flaky-cellular.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_scenario_loads(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.fleets
    assert scenario.checks
    for fleet in scenario.fleets:
        assert fleet.model_path.is_file()


def test_smoke_example_resolves_its_stages_duration_and_checks() -> None:
    scenario = load_scenario(ROOT / "examples" / "scenarios" / "smoke.yaml")
    (fleet,) = scenario.fleets
    assert fleet.devices == 100
    assert fleet.model_path == ROOT / "examples" / "device-models" / "thermostat.yaml"
    assert fleet.brokers == (BrokerEndpoint("127.0.0.1", 1883),)
    assert scenario.stages == (Stage(10.0, 100), Stage(20.0, 100), Stage(5.0, 0))
    assert scenario.duration_s == 35.0
    assert scenario.probe == 1.0
    assert ("everything delivered", "delivery_ratio >= 0.999") in scenario.checks
    assert ("e2e_latency.p99 < 200ms", "e2e_latency.p99 < 200ms") in scenario.checks


# --- what loads -------------------------------------------------------------------------


def test_json_and_yaml_load_the_same_scenario(tmp_path: Path) -> None:
    data = _scenario(stages="5s:100%", checks=["e2e_latency.p99 < 200ms"])
    from_yaml = load_scenario(_write(tmp_path, data, "s.yaml"))
    from_json = load_scenario(_write(tmp_path, data, "s.json"))
    assert from_yaml.spec == from_json.spec
    assert from_yaml.stages == from_json.stages == (Stage(5.0, 10),)
    assert from_yaml.fleets == from_json.fleets


def test_model_paths_resolve_against_the_scenario_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenarios = tmp_path / "deep" / "scenarios"
    scenarios.mkdir(parents=True)
    path = _write(
        tmp_path, _scenario(fleets=[{"name": "a", "model": "../../models/m.yaml", "devices": 1}])
    )
    moved = scenarios / "s.yaml"
    path.rename(moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    scenario = load_scenario(moved)
    assert scenario.base_dir == scenarios
    assert scenario.fleets[0].model_path == tmp_path / "models" / "m.yaml"
    assert scenario.fleets[0].model.spec.name == "probe"


def test_defaults(tmp_path: Path) -> None:
    scenario = _load(tmp_path)
    assert scenario.seed == 0
    assert scenario.probe is None
    assert scenario.stages == ()
    assert scenario.duration_s == DEFAULT_DURATION_S
    assert scenario.checks == ()
    assert scenario.fleets[0].broker == "main"  # the only broker
    assert scenario.fleets[0].qos is None


def test_duration_defaults_to_the_stages_total(tmp_path: Path) -> None:
    assert _load(tmp_path, stages="10s:5,1m30s:5,500ms:0").duration_s == 100.5


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("45s", 45.0), ("1m30s", 90.0), ("250ms", 0.25), (12, 12.0), (2.5, 2.5)],
)
def test_duration_is_text_or_seconds(tmp_path: Path, written: Any, seconds: float) -> None:
    assert _load(tmp_path, duration=written).duration_s == seconds


def test_stage_percentages_are_of_all_the_fleets_devices(tmp_path: Path) -> None:
    fleets = [
        {"name": "a", "model": "models/m.yaml", "devices": 30},
        {"name": "b", "model": "models/m.yaml", "devices": 70},
    ]
    scenario = _load(tmp_path, fleets=fleets, stages="10s:50%,5s:100%,1s:0")
    assert scenario.stages == (Stage(10.0, 50), Stage(5.0, 100), Stage(1.0, 0))
    assert scenario.devices == 100


def test_stages_may_be_a_list(tmp_path: Path) -> None:
    stages = [
        {"duration": "10s", "devices": "50%"},
        {"duration": 20, "devices": 10},
        {"duration": 0, "devices": 0},
    ]
    scenario = _load(tmp_path, stages=stages)
    assert scenario.stages == (Stage(10.0, 5), Stage(20.0, 10), Stage(0.0, 0))
    assert scenario.duration_s == 30.0


def test_fleet_settings_are_carried(tmp_path: Path) -> None:
    fleets = [
        {
            "name": "a",
            "model": "models/m.yaml",
            "devices": 3,
            "broker": "edge",
            "username": "{device_id}",
            "password": "secret",
            "qos": 2,
        }
    ]
    brokers = {"main": "mqtt://127.0.0.1:1883", "edge": "wss://h1:9001/mqtt,h2"}
    (fleet,) = _load(tmp_path, brokers=brokers, fleets=fleets).fleets
    assert fleet.broker == "edge"
    assert fleet.brokers == (
        BrokerEndpoint("h1", 9001, tls=True, websocket_path="/mqtt"),
        BrokerEndpoint("h2", 443, tls=True, websocket_path="/mqtt"),
    )
    assert (fleet.username, fleet.password, fleet.qos) == ("{device_id}", "secret", 2)
    assert "secret" not in repr(fleet)


def test_checks_are_named_by_their_text_unless_named(tmp_path: Path) -> None:
    checks = ["e2e_latency.p99 < 1ms", {"name": "ratio", "check": "delivery_ratio >= 0.9"}]
    assert _load(tmp_path, checks=checks).checks == (
        ("e2e_latency.p99 < 1ms", "e2e_latency.p99 < 1ms"),
        ("ratio", "delivery_ratio >= 0.9"),
    )


def test_check_expressions_that_do_not_parse_are_refused_with_their_path(
    tmp_path: Path,
) -> None:
    issue = _only(tmp_path, checks=["this is << not a check"])
    assert issue.path == ("checks", 0)
    assert "this is << not a check" in issue.problem


def test_scenario_error_is_a_model_error_and_renders_file_line_path_problem(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, _scenario(probe=2))
    with pytest.raises(ModelError) as info:
        load_scenario(path)
    assert isinstance(info.value, ScenarioError)
    assert str(info.value).startswith(f"{path}:")
    assert ": probe: " in str(info.value)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    issue = _only(tmp_path, stagse="10s:5")
    assert issue.path == ("stagse",)
    assert issue.problem == "unknown key 'stagse'"
    assert issue.hint is not None
    assert "did you mean 'stages'?" in issue.hint


def test_unknown_fleet_key_names_its_line(tmp_path: Path) -> None:
    issue = _only(
        tmp_path, fleets=[{"name": "a", "model": "models/m.yaml", "devices": 1, "brokr": "main"}]
    )
    assert issue.dotted_path == "fleets[0].brokr"
    assert issue.hint is not None
    assert "did you mean 'broker'?" in issue.hint
    assert issue.line is not None


def test_misspelt_required_key_is_one_issue(tmp_path: Path) -> None:
    issue = _only(tmp_path, fleets=[{"nmae": "a", "model": "models/m.yaml", "devices": 1}])
    assert issue.dotted_path == "fleets[0].nmae"
    assert issue.hint is not None
    assert "did you mean 'name'?" in issue.hint


def test_missing_required_key(tmp_path: Path) -> None:
    issue = _only(tmp_path, fleets=[{"name": "a", "model": "models/m.yaml"}])
    assert issue.dotted_path == "fleets[0].devices"
    assert issue.problem == "missing required key 'devices'"


def test_unknown_key_in_a_named_check(tmp_path: Path) -> None:
    issues = _issues(tmp_path, checks=[{"name": "x", "chek": "e2e_latency.p99 < 1ms"}])
    assert [i.dotted_path for i in issues] == ["checks[0].chek"]


def test_fleet_broker_not_in_brokers_suggests_a_close_name(tmp_path: Path) -> None:
    fleets = [{"name": "a", "model": "models/m.yaml", "devices": 1, "broker": "mian"}]
    issue = _only(tmp_path, fleets=fleets)
    assert issue.dotted_path == "fleets[0].broker"
    assert issue.problem == "unknown broker 'mian'"
    assert issue.hint == "did you mean 'main'? brokers defines: main"


def test_issues_name_the_line_of_the_value(tmp_path: Path) -> None:
    path = _write(tmp_path, {})
    path.write_text(
        "name: t\n"
        "brokers:\n"
        "  main: mqtt://127.0.0.1:1883\n"
        "fleets:\n"
        "  - name: a\n"
        "    model: models/m.yaml\n"
        "    devices: 1\n"
        "    broker: mian\n",
        encoding="utf-8",
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    (issue,) = info.value.issues
    assert (issue.file, issue.line) == (path, 8)
    assert str(issue) == (
        f"{path}:8: fleets[0].broker: unknown broker 'mian' "
        "(hint: did you mean 'main'? brokers defines: main)"
    )


def test_fleet_without_broker_among_several_brokers(tmp_path: Path) -> None:
    brokers = {"a": "mqtt://127.0.0.1:1883", "b": "mqtt://127.0.0.2:1883"}
    issue = _only(tmp_path, brokers=brokers)
    assert issue.dotted_path == "fleets[0].broker"
    assert "2 brokers" in issue.problem


def test_no_brokers(tmp_path: Path) -> None:
    issue = _only(tmp_path, brokers={})
    assert issue.dotted_path == "brokers"


def test_no_fleets(tmp_path: Path) -> None:
    issue = _only(tmp_path, fleets=[])
    assert issue.dotted_path == "fleets"


def test_duplicate_fleet_names(tmp_path: Path) -> None:
    fleets = [
        {"name": "a", "model": "models/m.yaml", "devices": 1},
        {"name": "a", "model": "models/m.yaml", "devices": 2},
    ]
    issue = _only(tmp_path, fleets=fleets)
    assert issue.dotted_path == "fleets[1].name"
    assert issue.problem == "duplicate fleet name 'a' (fleets[0] has it too)"


def test_missing_model_file_names_the_resolved_path(tmp_path: Path) -> None:
    fleets = [{"name": "a", "model": "../nowhere/m.yaml", "devices": 1}]
    issue = _only(tmp_path, fleets=fleets)
    assert issue.dotted_path == "fleets[0].model"
    assert str(tmp_path.parent / "nowhere" / "m.yaml") in issue.problem
    assert "does not exist" in issue.problem
    assert issue.hint is not None
    assert str(tmp_path) in issue.hint


def test_invalid_model_issues_appear_under_the_fleet(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nfields:\n  a: {kind: constant, value: 1, colour: red}\n"
        "messages:\n  m: {schedule: {kind: interval, interval_s: 1}}\n",
        encoding="utf-8",
    )
    fleets = [
        {"name": "a", "model": "models/m.yaml", "devices": 1},
        {"name": "b", "model": "bad.yaml", "devices": 1},
    ]
    path = _write(tmp_path, _scenario(fleets=fleets))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    (issue,) = info.value.issues
    assert issue.dotted_path == "fleets[1].model.fields.a.colour"
    assert issue.file == path
    assert f"{bad}:3" in issue.problem  # where to fix it
    assert "unknown field 'colour'" in issue.problem


def test_bad_broker_url(tmp_path: Path) -> None:
    issue = _only(tmp_path, brokers={"main": "gopher://127.0.0.1:1883"})
    assert issue.dotted_path == "brokers.main"
    assert "unsupported broker scheme 'gopher'" in issue.problem


def test_bad_broker_port(tmp_path: Path) -> None:
    issue = _only(tmp_path, brokers={"main": "mqtt://127.0.0.1:port"})
    assert issue.dotted_path == "brokers.main"
    assert "bad port" in issue.problem


def test_stages_that_do_not_parse(tmp_path: Path) -> None:
    issue = _only(tmp_path, stages="10s:100%,30x:5")
    assert issue.dotted_path == "stages"
    assert "bad stage '30x:5'" in issue.problem


def test_stage_entry_with_bad_devices(tmp_path: Path) -> None:
    issue = _only(
        tmp_path, stages=[{"duration": "1s", "devices": 1}, {"duration": "1s", "devices": "lots"}]
    )
    assert issue.dotted_path == "stages[1].devices"
    assert "whole number (1000) or a percentage" in issue.problem


def test_stage_entry_over_a_hundred_percent(tmp_path: Path) -> None:
    issue = _only(tmp_path, stages=[{"duration": "1s", "devices": "150%"}])
    assert issue.dotted_path == "stages[0].devices"


def test_stage_entry_with_a_negative_duration(tmp_path: Path) -> None:
    issue = _only(tmp_path, stages=[{"duration": -1, "devices": 1}])
    assert issue.dotted_path == "stages[0].duration"
    assert "must not be negative" in issue.problem


def test_stages_of_no_duration_need_a_duration(tmp_path: Path) -> None:
    issue = _only(tmp_path, stages="0s:10")
    assert issue.dotted_path == "stages"
    assert _load(tmp_path, stages="0s:10", duration="5s").duration_s == 5.0


@pytest.mark.parametrize("written", [0, -5, "0s", "-5s", "5 parsecs", "nan", True])
def test_bad_run_duration(tmp_path: Path, written: Any) -> None:
    issue = _only(tmp_path, duration=written)
    assert issue.dotted_path == "duration"


@pytest.mark.parametrize("probe", [0, -0.5, 1.01, 2])
def test_probe_outside_zero_to_one(tmp_path: Path, probe: float) -> None:
    issue = _only(tmp_path, probe=probe)
    assert issue.dotted_path == "probe"


def test_probe_of_one_is_fine(tmp_path: Path) -> None:
    assert _load(tmp_path, probe=1).probe == 1.0


def test_qos_out_of_range(tmp_path: Path) -> None:
    fleets = [{"name": "a", "model": "models/m.yaml", "devices": 1, "qos": 3}]
    assert _only(tmp_path, fleets=fleets).dotted_path == "fleets[0].qos"


def test_bad_scenario_name(tmp_path: Path) -> None:
    issue = _only(tmp_path, name="my scenario")
    assert issue.dotted_path == "name"
    assert "not a valid name" in issue.problem


def test_repeated_check_text(tmp_path: Path) -> None:
    issue = _only(tmp_path, checks=["e2e_latency.p99 < 1ms", "e2e_latency.p99 < 1ms"])
    assert issue.dotted_path == "checks[1]"
    assert "duplicate check name 'e2e_latency.p99 < 1ms'" in issue.problem


def test_repeated_check_name(tmp_path: Path) -> None:
    checks = [
        {"name": "x", "check": "e2e_latency.p99 < 1ms"},
        {"name": "x", "check": "ack_latency.p99 < 1ms"},
    ]
    issue = _only(tmp_path, checks=checks)
    assert issue.dotted_path == "checks[1].name"


def test_a_named_check_may_not_take_a_bare_checks_name(tmp_path: Path) -> None:
    checks = [
        "e2e_latency.p99 < 1ms",
        {"name": "e2e_latency.p99 < 1ms", "check": "ack_latency.p99 < 1ms"},
    ]
    assert _only(tmp_path, checks=checks).dotted_path == "checks[1].name"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    fleets = [
        {"name": "a", "model": "nowhere.yaml", "devices": 1, "broker": "x"},
        {"name": "a", "model": "models/m.yaml", "devices": 1},
    ]
    issues = _issues(tmp_path, fleets=fleets, brokers={"main": "ftp://h"}, checks=["c", "c"])
    assert sorted(i.dotted_path for i in issues) == [
        "brokers.main",
        "checks[0]",  # 'c' is no check
        "checks[1]",  # and a repeated name
        "fleets[0].broker",
        "fleets[0].model",
        "fleets[1].name",
    ]


# --- files --------------------------------------------------------------------------------


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: t\nfleets: [\n", encoding="utf-8")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    (issue,) = info.value.issues
    assert issue.problem.startswith("invalid YAML")
    assert issue.line is not None


def test_json_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"name": "t",,}', encoding="utf-8")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.issues[0].problem.startswith("invalid JSON")


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    path = _write(tmp_path, _scenario())
    path.write_text(path.read_text(encoding="utf-8") + "name: again\n", encoding="utf-8")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    (issue,) = info.value.issues
    assert issue.path == ("name",)
    assert "duplicate key" in issue.problem


def test_a_scenario_is_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match="a scenario is a mapping, but this is a list"):
        load_scenario(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no such file"):
        load_scenario(tmp_path / "nope.yaml")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"unsupported file type '\.toml'"):
        load_scenario(path)


def test_data_without_a_file_resolves_models_against_base_dir(tmp_path: Path) -> None:
    _write(tmp_path, {})
    scenario = load_scenario_data(_scenario(), base_dir=tmp_path)
    assert scenario.path is None
    assert scenario.fleets[0].model_path == tmp_path / "models" / "m.yaml"


def test_a_blank_check(tmp_path: Path) -> None:
    issue = _only(tmp_path, checks=["   "])
    assert issue.dotted_path == "checks[0]"
    assert issue.problem == "empty check"


def test_a_check_that_is_neither_text_nor_a_mapping(tmp_path: Path) -> None:
    issue = _only(tmp_path, checks=[5])
    assert issue.dotted_path == "checks[0]"
    assert "valid string" in issue.problem


def test_a_check_on_an_unknown_metric_is_refused_before_anything_runs(tmp_path: Path) -> None:
    model = tmp_path / "m.yaml"
    model.write_text(
        "name: m\nfields: {n: {kind: counter}}\n"
        "messages: {t: {schedule: {kind: interval, interval_s: 1}}}\n",
        encoding="utf-8",
    )
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "name: s\nbrokers: {main: 'mqtt://127.0.0.1:1883'}\n"
        "fleets: [{name: f, model: m.yaml, devices: 1}]\n"
        "checks: ['e2e_latncy.p99 < 1s', {name: ok, check: 'delivery_ratio >= 0.999'}]\n",
        encoding="utf-8",
    )
    with pytest.raises(ScenarioError) as caught:
        load_scenario(scenario)
    [issue] = caught.value.issues
    assert issue.path == ("checks", 0)
    assert "e2e_latency.p99" in issue.problem


# --- faults -------------------------------------------------------------------------------


def test_a_fault_timeline_loads_with_times_in_seconds(tmp_path: Path) -> None:
    faults = [
        {"kind": "latency", "at": "5s", "duration": "10s", "delay": "200ms", "jitter": "20ms"},
        {"kind": "partition", "at": 20, "duration": "5s", "share": 0.5, "broker": "main"},
        {"kind": "reset", "at": "30s"},
    ]
    loaded = _load(tmp_path, faults=faults, duration="1m")
    latency, partition, reset = loaded.faults
    assert (latency.at_s, latency.duration_s, latency.delay_s, latency.jitter_s) == (
        5.0,
        10.0,
        0.2,
        0.02,
    )
    assert (partition.share, partition.broker) == (0.5, "main")
    assert reset.duration_s is None


@pytest.mark.parametrize(
    ("fault", "path", "words"),
    [
        ({"kind": "reset", "at": "1s", "duration": "1s"}, "faults[0]", "has no duration"),
        ({"kind": "latency", "at": "1s", "delay": "1s"}, "faults[0]", "needs a duration"),
        ({"kind": "wobble", "at": "1s"}, "faults[0]", "wobble"),
        (
            {"kind": "blackhole", "at": "1s", "duration": "1s", "broker": "mian"},
            "faults[0].broker",
            "unknown broker 'mian'",
        ),
        ({"kind": "blackhole", "at": "2m", "duration": "1s"}, "faults[0].at", "is over"),
        (
            {"kind": "blackhole", "at": "1s", "duration": "1s", "share": 1.5},
            "faults[0].share",
            "less than or equal to 1",
        ),
    ],
)
def test_a_bad_fault_is_refused_with_its_path(
    tmp_path: Path, fault: dict[str, Any], path: str, words: str
) -> None:
    issue = _only(tmp_path, faults=[fault], duration="1m")
    assert issue.dotted_path.startswith(path), issue
    assert words in str(issue), issue
