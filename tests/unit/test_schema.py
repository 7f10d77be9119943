"""The committed JSON Schema matches the specs, and it accepts what the loader accepts."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from iotix.schema import model_schema

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
