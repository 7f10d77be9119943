"""The `connection:` section: a last will and a birth message, parsed and rendered per device."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import cbor2
import orjson
import pytest

from iotix.errors import ModelError, ModelIssue
from iotix.model.connection import ConnectionMessage, ConnectionTemplates, check_connection
from iotix.model.loader import load_model, load_model_data
from iotix.model.runtime import DeviceBatch
from iotix.model.spec import DeviceModelSpec
from iotix.payload.codec import build_encoder
from iotix.payload.spec import JSONPayloadSpec, TextPayloadSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "device-models"

MODEL = """\
name: gateway
id: "gw-{site}-{index:03d}"
attributes:
  site: {kind: choice, values: [north, south]}
  capacity_kw: {kind: choice, values: [7.4, 22]}
  slots: 4
fields:
  load: {kind: uniform, low: 0, high: 1}
messages:
  telemetry:
    schedule: {kind: interval, interval_s: 10}
connection:
  will:
    topic: "sites/{site}/{device_id}/status"
    payload:
      kind: json
      template: {online: "${online}", id: "${device_id}", index: "${index}", model: "${model}"}
    qos: 1
    retain: true
  birth:
    topic: "sites/{site}/{device_id}/status"
    payload:
      kind: json
      template: {online: "${online}", capacity: "${capacity_kw}", slots: "${slots}"}
    qos: 1
    retain: true
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def issues_of(tmp_path: Path, text: str) -> list[ModelIssue]:
    with pytest.raises(ModelError) as caught:
        load_model(write(tmp_path, text))
    return caught.value.issues


def only_issue(tmp_path: Path, text: str) -> ModelIssue:
    issues = issues_of(tmp_path, text)
    assert len(issues) == 1, issues
    return issues[0]


def minimal(connection: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "m",
        "messages": {"t": {"schedule": {"kind": "interval", "interval_s": 1}}},
        "connection": connection,
        **extra,
    }


def batch_of(spec: DeviceModelSpec, devices: int = 4) -> DeviceBatch:
    return DeviceBatch(spec, indices=range(devices), seed=3)


# --- parsing ------------------------------------------------------------------------


def test_will_and_birth_parse(tmp_path: Path) -> None:
    spec = load_model(write(tmp_path, MODEL)).spec
    assert spec.connection is not None
    will, birth = spec.connection.will, spec.connection.birth
    assert will is not None
    assert birth is not None
    assert will.topic == "sites/{site}/{device_id}/status"
    assert (will.qos, will.retain) == (1, True)
    assert isinstance(birth.payload, JSONPayloadSpec)


def test_connection_is_optional_and_so_are_will_and_birth() -> None:
    assert load_model_data(minimal({})).spec.connection is not None
    spec = load_model_data(minimal({"will": {"topic": "x/{device_id}"}})).spec
    assert spec.connection is not None
    assert spec.connection.birth is None
    without = minimal({})
    del without["connection"]
    assert load_model_data(without).spec.connection is None


def test_defaults_are_qos_0_not_retained_and_a_json_payload() -> None:
    spec = load_model_data(minimal({"will": {"topic": "x/{device_id}"}})).spec
    assert spec.connection is not None
    will = spec.connection.will
    assert will is not None
    assert (will.qos, will.retain) == (0, False)
    assert isinstance(will.payload, JSONPayloadSpec)


def test_any_payload_kind_is_accepted() -> None:
    spec = load_model_data(
        minimal({"will": {"topic": "s", "payload": {"kind": "text", "template": "bye {index}"}}})
    ).spec
    assert spec.connection is not None
    assert spec.connection.will is not None
    assert isinstance(spec.connection.will.payload, TextPayloadSpec)


# --- bad input names the field path -------------------------------------------------


def test_bad_qos_names_its_path_and_line(tmp_path: Path) -> None:
    issue = only_issue(
        tmp_path,
        MODEL.replace(
            "    qos: 1\n    retain: true\n  birth:", "    qos: 3\n    retain: true\n  birth:"
        ),
    )
    assert issue.dotted_path == "connection.will.qos"
    assert issue.line == MODEL.splitlines().index("    qos: 1") + 1
    assert "0, 1 or 2" in issue.problem


def test_misspelt_key_names_its_path_and_suggests_the_right_one(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, MODEL.replace("  birth:\n    topic:", "  birth:\n    topik:"))
    assert issue.dotted_path == "connection.birth.topik"
    assert issue.problem == "unknown field 'topik'"
    assert issue.hint == "did you mean 'topic'?"


def test_unknown_section_key_is_reported(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, MODEL.replace("  birth:\n", "  lwt:\n"))
    assert issue.dotted_path == "connection.lwt"
    assert issue.problem == "unknown field 'lwt'"


def test_missing_topic_is_reported_with_its_path(tmp_path: Path) -> None:
    text = MODEL.replace('  will:\n    topic: "sites/{site}/{device_id}/status"\n', "  will:\n")
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path == "connection.will.topic"
    assert issue.problem == "missing required field 'topic'"


def test_a_wildcard_in_the_topic_is_refused(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, MODEL.replace("sites/{site}/{device_id}/status", "sites/+/x", 1))
    assert issue.dotted_path == "connection.will.topic"
    assert "wildcard" in issue.problem


def test_unknown_payload_kind_is_reported(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, MODEL.replace("      kind: json\n", "      kind: jsn\n", 1))
    assert issue.dotted_path == "connection.will.payload"
    assert issue.hint is not None
    assert "did you mean 'json'?" in issue.hint


def test_payload_name_a_device_lacks_is_reported_with_its_path() -> None:
    spec = DeviceModelSpec.model_validate(
        minimal(
            {"will": {"topic": "s", "payload": {"kind": "json", "template": {"t": "${load}"}}}},
            fields={"load": {"kind": "uniform", "low": 0, "high": 1}},
        )
    )
    issues = list(check_connection(spec))
    assert len(issues) == 1
    path, problem, _hint = issues[0]
    assert path == ("connection", "will", "payload", "template", "t")
    assert "'load'" in problem
    with pytest.raises(ModelError) as caught:
        ConnectionTemplates(spec)
    assert caught.value.issues[0].dotted_path == "connection.will.payload.template.t"


def test_topic_name_a_device_lacks_is_reported_with_a_hint() -> None:
    spec = DeviceModelSpec.model_validate(
        minimal({"birth": {"topic": "x/{devce_id}"}}, attributes={"site": "a"})
    )
    [(path, problem, hint)] = check_connection(spec)
    assert path == ("connection", "birth", "topic")
    assert "{devce_id}" in problem
    assert hint == "did you mean 'device_id'?"


def test_online_is_a_payload_name_but_not_a_topic_name() -> None:
    spec = DeviceModelSpec.model_validate(minimal({"birth": {"topic": "x/{online}"}}))
    [(path, _problem, _hint)] = check_connection(spec)
    assert path == ("connection", "birth", "topic")


# --- rendering ----------------------------------------------------------------------


def test_will_is_rendered_per_device(tmp_path: Path) -> None:
    spec = load_model(write(tmp_path, MODEL)).spec
    batch = batch_of(spec)
    templates = ConnectionTemplates(spec)
    for row, device_id in enumerate(batch.device_ids):
        will = templates.will(batch, row)
        assert isinstance(will, ConnectionMessage)
        site = device_id.split("-")[1]
        assert will.topic == f"sites/{site}/{device_id}/status"
        assert (will.qos, will.retain) == (1, True)
        assert orjson.loads(will.payload) == {
            "online": False,
            "id": device_id,
            "index": row,
            "model": "gateway",
        }


def test_birth_says_online_and_keeps_attribute_types(tmp_path: Path) -> None:
    spec = load_model(write(tmp_path, MODEL)).spec
    batch = batch_of(spec, devices=8)
    templates = ConnectionTemplates(spec)
    capacities = set()
    for row in range(batch.size):
        birth = templates.birth(batch, row)
        assert birth is not None
        decoded = orjson.loads(birth.payload)
        assert decoded["online"] is True
        assert decoded["slots"] == 4
        capacities.add(decoded["capacity"])
    assert capacities == {7.4, 22}  # numbers, not the text of numbers


def test_the_default_payload_is_device_id_and_online() -> None:
    spec = load_model_data(
        minimal({"will": {"topic": "w/{device_id}"}, "birth": {"topic": "b/{device_id}"}})
    ).spec
    batch = batch_of(spec, devices=2)
    templates = ConnectionTemplates(spec)
    will, birth = templates.will(batch, 1), templates.birth(batch, 1)
    assert will is not None
    assert birth is not None
    assert orjson.loads(will.payload) == {"device_id": "m-000001", "online": False}
    assert orjson.loads(birth.payload) == {"device_id": "m-000001", "online": True}
    assert will.topic == "w/m-000001"


def test_text_and_cbor_payloads_decode_back() -> None:
    spec = load_model_data(
        minimal(
            {
                "will": {"topic": "w", "payload": {"kind": "text", "template": "{device_id} gone"}},
                "birth": {
                    "topic": "b",
                    "payload": {"kind": "cbor", "template": {"up": "${online}", "i": "${index}"}},
                },
            }
        )
    ).spec
    batch = batch_of(spec, devices=3)
    templates = ConnectionTemplates(spec)
    will, birth = templates.will(batch, 2), templates.birth(batch, 2)
    assert will is not None
    assert birth is not None
    assert will.payload.decode() == "m-000002 gone"
    assert cbor2.loads(birth.payload) == {"up": True, "i": 2}


def test_a_model_without_connection_has_no_will_and_no_birth() -> None:
    data = minimal({})
    del data["connection"]
    spec = load_model_data(data).spec
    templates = ConnectionTemplates(spec)
    batch = batch_of(spec, devices=1)
    assert (templates.has_will, templates.has_birth) == (False, False)
    assert templates.will(batch, 0) is None
    assert templates.birth(batch, 0) is None


def test_encoders_are_built_once_per_model_not_per_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_model(write(tmp_path, MODEL)).spec
    built: list[object] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(args)
        return build_encoder(*args, **kwargs)

    monkeypatch.setattr("iotix.model.connection.build_encoder", counting)
    templates = ConnectionTemplates(spec)
    batch = batch_of(spec, devices=50)
    for row in range(batch.size):
        templates.will(batch, row)
        templates.birth(batch, row)
    assert len(built) == 2


@pytest.mark.parametrize("name", ["ev-charger.yaml", "door-sensor.yaml"])
def test_examples_with_a_connection_render_a_will_and_a_birth(name: str) -> None:
    loaded = load_model(EXAMPLES / name)
    batch = DeviceBatch(loaded.spec, indices=range(3), base_dir=loaded.base_dir)
    templates = ConnectionTemplates(loaded.spec)
    for row, device_id in enumerate(batch.device_ids):
        will, birth = templates.will(batch, row), templates.birth(batch, row)
        assert will is not None
        assert birth is not None
        assert device_id in will.topic
        assert will.topic == birth.topic
        assert will.retain
        assert birth.retain
        assert will.payload != birth.payload
