"""The JSON Schemas of iotix's input files, generated from the pydantic specs.

The committed copies under ``schemas/`` are what editors and CI validate against; tests
fail when they drift from the code. Regenerate them with
``iotix schema > schemas/device-model.schema.json`` and
``iotix schema --scenario > schemas/scenario.schema.json``.
"""

from __future__ import annotations

from typing import Any

from iotix.model.spec import DeviceModelSpec
from iotix.scenario.spec import ScenarioSpec

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def model_schema() -> dict[str, Any]:
    """The device-model schema, as validation (input) sees it."""
    schema = DeviceModelSpec.model_json_schema(mode="validation", by_alias=True)
    return {"$schema": SCHEMA_DIALECT, **schema}


def scenario_schema() -> dict[str, Any]:
    """The scenario-file schema, as validation (input) sees it."""
    schema = ScenarioSpec.model_json_schema(mode="validation", by_alias=True)
    return {"$schema": SCHEMA_DIALECT, **schema}
