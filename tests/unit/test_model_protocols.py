"""Declared protocols: the families and the schemes they cover, the model field, and the
refusal to run a model over a protocol it does not declare (one model, and scenario
fleets)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from iotix.adapters.registry import BUILTIN_ADAPTERS, ENTRY_POINT_GROUP, MQTT_SCHEMES
from iotix.errors import ModelError
from iotix.model.loader import load_model, load_model_data
from iotix.model.protocols import (
    ANY_MODEL_SCHEMES,
    BUILTIN_FAMILIES,
    ProtocolNotDeclaredError,
    check_protocol,
    known_families,
    protocol_family,
    protocol_refusal,
    runs_over,
)
from iotix.scenario.loader import ScenarioError, load_scenario, with_brokers

if TYPE_CHECKING:
    from iotix.model.loader import LoadedModel

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "device-models"
DOOR = EXAMPLES / "door-sensor.yaml"

BASE: dict[str, Any] = {
    "name": "probe",
    "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 10}}},
}


def model(protocols: list[str] | None, **extra: Any) -> LoadedModel:
    data = {**BASE, **extra}
    if protocols is not None:
        data["protocols"] = protocols
    return load_model_data(data)


def fake_plugin(site: Path, monkeypatch: pytest.MonkeyPatch, scheme: str) -> None:
    """An installed adapter plugin serving ``scheme``, as its dist-info leaves it (the
    class is never imported: declaring its scheme needs only the entry point)."""
    dist_info = site / "fake_protocol_plugin-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-protocol-plugin\nVersion: 0.1\n", encoding="utf-8"
    )
    (dist_info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n{scheme} = fake_protocol_plugin:Adapter\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(site))


# --- families -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "family"),
    [
        ("mqtt", "mqtt"),
        ("mqtts", "mqtt"),
        ("ws", "mqtt"),
        ("wss", "mqtt"),
        ("http", "http"),
        ("https", "http"),
        ("coap", "coap"),
        ("coaps", "coap"),
        ("kafka", "kafka"),
        ("udpjson", "udpjson"),
    ],
)
def test_a_scheme_belongs_to_its_family_and_a_plugin_scheme_is_its_own(
    scheme: str, family: str
) -> None:
    assert protocol_family(scheme) == family


def test_every_builtin_scheme_is_in_a_family_or_takes_any_model() -> None:
    covered = {scheme for schemes in BUILTIN_FAMILIES.values() for scheme in schemes}
    assert covered | ANY_MODEL_SCHEMES == {*MQTT_SCHEMES, *BUILTIN_ADAPTERS}
    assert not covered & ANY_MODEL_SCHEMES


def test_known_families_are_the_builtin_ones_then_the_installed_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_plugin(tmp_path, monkeypatch, "zz-proto")
    known = known_families()
    assert known[:4] == ["mqtt", "http", "coap", "kafka"]
    assert "zz-proto" in known
    assert not {"mqtts", "https", "coaps", "memory"} & set(known)


# --- the model field ------------------------------------------------------------------


def test_a_model_without_protocols_runs_over_any_scheme() -> None:
    spec = model(None).spec
    assert spec.protocols is None
    assert all(runs_over(spec, s) for s in ("mqtt", "wss", "http", "coaps", "kafka", "udpjson"))


def test_a_family_covers_its_secure_and_transport_variants() -> None:
    spec = model(["mqtt", "coap"]).spec
    assert [s for s in ("mqtt", "mqtts", "ws", "wss", "coap", "coaps") if runs_over(spec, s)] == [
        "mqtt",
        "mqtts",
        "ws",
        "wss",
        "coap",
        "coaps",
    ]
    assert not any(runs_over(spec, s) for s in ("http", "https", "kafka", "udpjson"))


def test_the_memory_adapter_takes_any_model() -> None:
    assert runs_over(model(["kafka"]).spec, "memory")


def test_an_installed_plugin_scheme_is_a_family_a_model_may_declare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_plugin(tmp_path, monkeypatch, "zz-proto")
    spec = model(["mqtt", "zz-proto"]).spec
    assert runs_over(spec, "zz-proto")
    assert not runs_over(spec, "http")


# --- the refusal ----------------------------------------------------------------------


def test_a_model_is_refused_over_a_scheme_it_does_not_declare() -> None:
    door = load_model(DOOR)
    with pytest.raises(ProtocolNotDeclaredError) as refused:
        check_protocol(door, "https://api.example.com/ingest")
    error = refused.value
    assert (error.model, error.declared, error.scheme) == (DOOR, ("mqtt",), "https")
    text = str(error)
    assert str(DOOR) in text
    assert "declares protocols: mqtt" in text
    assert "https://" in text
    assert "add http to the model's protocols" in text


def test_a_declared_scheme_or_a_bare_scheme_is_not_refused() -> None:
    door = load_model(DOOR)
    check_protocol(door, "mqtts://broker.example.com:8883")
    assert protocol_refusal(door, "wss") is None
    assert protocol_refusal(door, "coap") is not None


def test_a_model_given_as_data_is_named_by_its_name() -> None:
    refusal = protocol_refusal(model(["coap"]), "kafka://127.0.0.1:9092")
    assert refusal is not None
    assert refusal.model is None
    assert str(refusal).startswith("model probe declares protocols: coap;")


def test_a_protocol_error_is_a_model_error_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({**BASE, "protocols": ["mqtt", "amqp"]}), encoding="utf-8")
    with pytest.raises(ModelError) as caught:
        load_model(path)
    [issue] = caught.value.issues
    assert (issue.file, issue.dotted_path) == (path, "protocols[1]")


def _scenario(tmp_path: Path, broker: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            name: doors
            brokers: {{main: "{broker}"}}
            fleets:
              - {{name: doors, model: "{DOOR}", devices: 2}}
            duration: 10s
            """),
        encoding="utf-8",
    )
    return path


def test_a_scenario_fleet_over_an_undeclared_protocol_is_refused_at_its_broker(
    tmp_path: Path,
) -> None:
    with pytest.raises(ScenarioError) as caught:
        load_scenario(_scenario(tmp_path, "coap://127.0.0.1:5683"))
    [issue] = caught.value.issues
    assert issue.dotted_path == "fleets[0].broker"
    assert issue.line == 4
    assert "declares protocols: mqtt; it does not run over coap://" in issue.problem


def test_a_broker_moved_to_an_undeclared_protocol_is_refused(tmp_path: Path) -> None:
    scenario = load_scenario(_scenario(tmp_path, "mqtt://127.0.0.1:1883"))
    with pytest.raises(ScenarioError) as caught:
        with_brokers(scenario, {"main": "kafka://127.0.0.1:9092"})
    [issue] = caught.value.issues
    assert issue.dotted_path == "brokers.main"
    assert "it does not run over kafka://" in issue.problem
    moved = with_brokers(scenario, {"main": "ws://127.0.0.1:8080/mqtt"})
    assert moved.fleets[0].brokers[0].websocket_path == "/mqtt"
