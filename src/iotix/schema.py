"""The JSON Schema of the device-model language, generated from the pydantic specs.

The committed copy under ``schemas/`` is what editors and CI validate against; a test
fails when it drifts from the code. Regenerate it with
``iotix schema > schemas/device-model.schema.json``.
"""

from __future__ import annotations

from typing import Any

from iotix.model.spec import DeviceModelSpec

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def model_schema() -> dict[str, Any]:
    """The device-model schema, as validation (input) sees it."""
    schema = DeviceModelSpec.model_json_schema(mode="validation", by_alias=True)
    return {"$schema": SCHEMA_DIALECT, **schema}
