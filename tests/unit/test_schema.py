"""The committed JSON Schema matches the specs, and it accepts what the loader accepts."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from iotix.schema import model_schema, scenario_schema

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "schemas" / "device-model.schema.json"
EXAMPLES = sorted((ROOT / "examples" / "device-models").glob("*.y*ml")) + sorted(
    (ROOT / "examples" / "device-models").glob("*.json")
)


def test_committed_schema_is_in_sync_with_the_code() -> None:
    committed = json.loads(COMMITTED.read_text(encoding="utf-8"))
    assert committed == model_schema(), (
        "schemas/device-model.schema.json is stale; regenerate it with "
        "`iotix schema > schemas/device-model.schema.json`"
    )


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(model_schema())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_model_validates_against_the_schema(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    jsonschema.Draft202012Validator(model_schema()).validate(data)


def test_schema_rejects_an_unknown_generator_kind() -> None:
    model = {
        "name": "x",
        "fields": {"a": {"kind": "brownian"}},
        "messages": {"m": {"schedule": {"kind": "interval", "interval_s": 1}}},
    }
    validator = jsonschema.Draft202012Validator(model_schema())
    assert not validator.is_valid(model)


@pytest.mark.parametrize(
    ("protocols", "valid"),
    [(["mqtt", "coap"], True), (["udpjson"], True), ([], False), (["mqtt", "mqtt"], False)],
)
def test_schema_knows_the_declared_protocols(protocols: list[str], valid: bool) -> None:
    model = {
        "name": "x",
        "protocols": protocols,
        "messages": {"m": {"schedule": {"kind": "interval", "interval_s": 1}}},
    }
    validator = jsonschema.Draft202012Validator(model_schema())
    assert validator.is_valid(model) is valid


# --- the scenario file ----------------------------------------------------------------

SCENARIO_COMMITTED = ROOT / "schemas" / "scenario.schema.json"
SCENARIO_EXAMPLES = sorted((ROOT / "examples" / "scenarios").glob("*.y*ml")) + sorted(
    (ROOT / "examples" / "scenarios").glob("*.json")
)


def test_committed_scenario_schema_is_in_sync_with_the_code() -> None:
    committed = json.loads(SCENARIO_COMMITTED.read_text(encoding="utf-8"))
    assert committed == scenario_schema(), (
        "schemas/scenario.schema.json is stale; regenerate it with "
        "`iotix schema --scenario > schemas/scenario.schema.json`"
    )


def test_scenario_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(scenario_schema())


@pytest.mark.parametrize("path", SCENARIO_EXAMPLES, ids=lambda p: p.name)
def test_every_example_scenario_validates_against_the_schema(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    jsonschema.Draft202012Validator(scenario_schema()).validate(data)


def test_scenario_schema_rejects_an_unknown_key() -> None:
    scenario = {
        "name": "x",
        "brokers": {"main": "mqtt://127.0.0.1:1883"},
        "fleets": [{"name": "a", "model": "m.yaml", "devices": 1, "brokr": "main"}],
    }
    validator = jsonschema.Draft202012Validator(scenario_schema())
    assert not validator.is_valid(scenario)


def test_scenario_schema_accepts_durations_as_text_or_seconds() -> None:
    base = {
        "name": "x",
        "brokers": {"main": "mqtt://127.0.0.1:1883"},
        "fleets": [{"name": "a", "model": "m.yaml", "devices": 1}],
    }
    validator = jsonschema.Draft202012Validator(scenario_schema())
    assert validator.is_valid({**base, "duration": "1m30s"})
    assert validator.is_valid({**base, "duration": 90})
    assert not validator.is_valid({**base, "duration": "90 seconds"})
    assert not validator.is_valid({**base, "duration": 0})
