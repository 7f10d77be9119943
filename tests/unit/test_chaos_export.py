"""`iotix chaos export`: every manifest satisfies Chaos Mesh's field rules, each fault
kind maps as documented, and what cannot map is said, not dropped in silence.

The rules are Chaos Mesh's, written down here as JSON Schemas: the CRDs
(config/crd/bases/chaos-mesh.org_networkchaos.yaml, chaos-mesh.org_schedules.yaml)
and what their admission webhooks add (api/v1alpha1/networkchaos_webhook.go,
common_validation.go, schedule_webhook.go): durations that Go's time.ParseDuration
reads, `value` a whole percentage in (0, 100] as a string for fixed-percent, a target
for `direction: both`, bandwidth's rate/limit/buffer, a 5-field cron, names that are
DNS-1123 labels (57 characters for a Schedule, which appends "-xxxxx").
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from iotix.scenario.chaos import (
    API_VERSION,
    BROKER_LABEL,
    DEFAULT_DEVICE_SELECTOR,
    FLEET_LABEL,
    ChaosExport,
    ChaosExportError,
    dump_manifests,
    export_chaos,
    go_duration,
    parse_selector,
    tbf_rate,
)
from iotix.scenario.loader import load_scenario
from iotix.scenario.spec import ScenarioSpec

ROOT = Path(__file__).resolve().parents[2]
FLAKY_CELLULAR = ROOT / "examples" / "scenarios" / "flaky-cellular.yaml"

# --- Chaos Mesh's rules, as JSON Schemas --------------------------------------------------

_GO_UNIT = r"(?:ns|us|µs|ms|s|m|h)"
_GO_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
GO_DURATION = rf"^(?:0|(?:{_GO_NUMBER}{_GO_UNIT})+)$"  # time.ParseDuration, unsigned
DNS_LABEL = r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$"
LABEL_VALUE = r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
PERCENT = r"^(?:[1-9][0-9]?|100)$"  # strconv.Atoi, then (0, 100]
FLOAT = r"^[0-9]+(?:\.[0-9]+)?$"  # strconv.ParseFloat, as we write it
RATE = r"^[0-9]+(?:bps|kbps|mbps|gbps|tbps)$"  # ConvertUnitToBytes: whole numbers
_CRON_FIELD = r"[0-9A-Za-z*?,/-]+"
_CRON_DESCRIPTOR = r"@(?:yearly|annually|monthly|weekly|daily|midnight|hourly)"
CRON = rf"^(?:{_CRON_DESCRIPTOR}|{_CRON_FIELD}(?: {_CRON_FIELD}){{4}})$"  # 5 fields
MODES = ["one", "all", "fixed", "fixed-percent", "random-max-percent"]
INT32_MAX = 2**31 - 1

LABELS = {
    "type": "object",
    "minProperties": 1,
    "propertyNames": {"maxLength": 317},
    "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE},
}
SELECTOR = {
    "type": "object",
    "required": ["namespaces"],
    "additionalProperties": False,
    "properties": {
        "namespaces": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63},
        },
        "labelSelectors": LABELS,
        "expressionSelectors": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "additionalProperties": False,
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
    # Without labels the selector takes every pod of the namespace: never what we mean.
    "anyOf": [{"required": ["labelSelectors"]}, {"required": ["expressionSelectors"]}],
}
_MODE_VALUE = [
    {
        "if": {"properties": {"mode": {"enum": ["fixed-percent", "random-max-percent"]}}},
        "then": {"required": ["value"], "properties": {"value": {"pattern": PERCENT}}},
    },
    {
        "if": {"properties": {"mode": {"const": "fixed"}}},
        "then": {"required": ["value"], "properties": {"value": {"pattern": r"^[1-9][0-9]*$"}}},
    },
]
NETWORK_CHAOS_SPEC = {
    "type": "object",
    # duration is optional to the CRD (then the chaos lasts until deleted); every fault
    # we export is reverted after its duration, so ours always carry one.
    "required": ["action", "mode", "selector", "duration"],
    "additionalProperties": False,
    "properties": {
        "action": {
            "enum": ["netem", "delay", "loss", "duplicate", "corrupt", "partition", "bandwidth"]
        },
        "mode": {"enum": MODES},
        "value": {"type": "string"},
        "selector": SELECTOR,
        "direction": {"enum": ["to", "from", "both"]},
        "target": {
            "type": "object",
            "required": ["mode", "selector"],
            "additionalProperties": False,
            "properties": {
                "mode": {"enum": MODES},
                "value": {"type": "string"},
                "selector": SELECTOR,
            },
            "allOf": _MODE_VALUE,
        },
        "delay": {
            "type": "object",
            "required": ["latency"],
            "additionalProperties": False,
            "properties": {
                "latency": {"type": "string", "pattern": GO_DURATION},
                "jitter": {"type": "string", "pattern": GO_DURATION},
                "correlation": {"type": "string", "pattern": FLOAT},
            },
        },
        "bandwidth": {
            "type": "object",
            "required": ["rate", "limit", "buffer"],
            "additionalProperties": False,
            "properties": {
                "rate": {"type": "string", "pattern": RATE},
                "limit": {"type": "integer", "minimum": 1, "maximum": INT32_MAX},
                "buffer": {"type": "integer", "minimum": 1, "maximum": INT32_MAX},
            },
        },
        "duration": {"type": "string", "pattern": GO_DURATION},
    },
    "allOf": [
        *_MODE_VALUE,
        {"if": {"properties": {"action": {"const": "delay"}}}, "then": {"required": ["delay"]}},
        {
            "if": {"properties": {"action": {"const": "bandwidth"}}},
            "then": {"required": ["bandwidth"]},
        },
        {
            "if": {"properties": {"action": {"const": "partition"}}},
            "then": {"required": ["target", "direction"]},
        },
        {  # the webhook: `from` and `both` need a target
            "if": {
                "required": ["direction"],
                "properties": {"direction": {"enum": ["from", "both"]}},
            },
            "then": {"required": ["target"]},
        },
    ],
}


def _metadata(max_name: int) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name", "namespace"],
        "properties": {
            "name": {"type": "string", "pattern": DNS_LABEL, "maxLength": max_name},
            "namespace": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63},
            "labels": LABELS,
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }


NETWORK_CHAOS = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "chaos-mesh.org/v1alpha1"},
        "kind": {"const": "NetworkChaos"},
        "metadata": _metadata(63),
        "spec": NETWORK_CHAOS_SPEC,
    },
}
SCHEDULE = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "chaos-mesh.org/v1alpha1"},
        "kind": {"const": "Schedule"},
        "metadata": _metadata(57),
        "spec": {
            "type": "object",
            "required": ["schedule", "type", "networkChaos"],
            "additionalProperties": False,
            "properties": {
                "schedule": {"type": "string", "pattern": CRON},
                "type": {"const": "NetworkChaos"},
                "concurrencyPolicy": {"enum": ["Forbid", "Allow"]},
                "historyLimit": {"type": "integer", "minimum": 1},
                "startingDeadlineSeconds": {"type": "integer", "exclusiveMinimum": 0},
                "networkChaos": NETWORK_CHAOS_SPEC,
            },
        },
    },
}
VALIDATORS = {
    "NetworkChaos": jsonschema.Draft202012Validator(NETWORK_CHAOS),
    "Schedule": jsonschema.Draft202012Validator(SCHEDULE),
}


def _check(export: ChaosExport) -> list[dict[str, Any]]:
    """Every manifest follows Chaos Mesh's rules; names are unique. The manifests."""
    names = []
    for manifest in export.manifests:
        errors = sorted(VALIDATORS[manifest["kind"]].iter_errors(manifest), key=str)
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
        names.append(manifest["metadata"]["name"])
    assert len(names) == len(set(names)), names
    return list(export.manifests)


def _chaos(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]
    return spec["networkChaos"] if manifest["kind"] == "Schedule" else spec


# --- independent readers, for differential checks -----------------------------------------

_GO_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _go_seconds(text: str) -> float:
    """Go's time.ParseDuration, for the unsigned texts the schema allows."""
    assert re.fullmatch(GO_DURATION, text), text
    if text == "0":
        return 0.0
    return sum(
        float(number) * _GO_SECONDS[unit]
        for number, unit in re.findall(rf"({_GO_NUMBER})({_GO_UNIT})", text)
    )


def _rate_bytes(text: str) -> int:
    """Chaos Mesh's ConvertUnitToBytes: whole numbers, each prefix x1024."""
    number, unit = re.fullmatch(r"([0-9]+)([a-z]+)", text).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** ["bps", "kbps", "mbps", "gbps", "tbps"].index(unit)


# --- scenarios -----------------------------------------------------------------------------


def _spec(*faults: dict[str, Any], **changes: Any) -> ScenarioSpec:
    data: dict[str, Any] = {
        "name": "soak",
        "brokers": {"main": "mqtt://127.0.0.1:1883"},
        "fleets": [{"name": "meters", "model": "m.yaml", "devices": 10}],
        "duration": "10m",
        "faults": list(faults),
    }
    data.update(changes)
    return ScenarioSpec.model_validate(data)


LATENCY = {"kind": "latency", "at": "10s", "duration": "30s", "delay": "200ms", "jitter": "50ms"}
BANDWIDTH = {"kind": "bandwidth", "at": "1m", "duration": "20s", "bytes_per_s": 2048}
TWO_BROKERS = {"a": "mqtt://10.0.0.1:1883", "b": "mqtt://10.0.0.2:1883"}
TWO_FLEETS = [
    {"name": "meters", "model": "m.yaml", "devices": 10, "broker": "a"},
    {"name": "cars", "model": "m.yaml", "devices": 10, "broker": "b"},
]


def _one(*faults: dict[str, Any], **options: Any) -> dict[str, Any]:
    manifests = _check(export_chaos(_spec(*faults), **options))
    assert len(manifests) == 1
    return manifests[0]


def test_the_schemas_are_valid_json_schemas() -> None:
    jsonschema.Draft202012Validator.check_schema(NETWORK_CHAOS)
    jsonschema.Draft202012Validator.check_schema(SCHEDULE)


# --- each kind ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "action"),
    [
        (LATENCY, "delay"),
        (BANDWIDTH, "bandwidth"),
        ({"kind": "blackhole", "at": "0s", "duration": "5s"}, "partition"),
        ({"kind": "partition", "at": "2m", "duration": "1m30s"}, "partition"),
        ({"kind": "target_down", "at": "3m", "duration": "250ms"}, "partition"),
    ],
    ids=lambda v: v if isinstance(v, str) else v["kind"],
)
def test_each_mapped_kind_becomes_one_valid_network_chaos(
    fault: dict[str, Any], action: str
) -> None:
    manifest = _one(fault)
    chaos = _chaos(manifest)
    spec = _spec(fault)
    assert manifest["apiVersion"] == API_VERSION
    assert chaos["action"] == action
    assert _go_seconds(chaos["duration"]) == pytest.approx(spec.faults[0].duration_s, abs=1e-6)
    annotations = manifest["metadata"]["annotations"]
    assert annotations["iotix.dev/fault-kind"] == fault["kind"]
    assert _go_seconds(annotations["iotix.dev/start-offset"]) == spec.faults[0].at_s


def test_latency_carries_delay_and_jitter_as_go_durations() -> None:
    delay = _chaos(_one(LATENCY))["delay"]
    assert _go_seconds(delay["latency"]) == pytest.approx(0.2)
    assert _go_seconds(delay["jitter"]) == pytest.approx(0.05)
    assert delay["correlation"] == "0"


def test_latency_without_jitter_has_a_zero_jitter() -> None:
    delay = _chaos(_one({**LATENCY, "jitter": 0}))["delay"]
    assert _go_seconds(delay["jitter"]) == 0


@pytest.mark.parametrize(
    ("bytes_per_s", "rate"),
    [(1, "1bps"), (2000, "2000bps"), (2048, "2kbps"), (3 * 1024**2, "3mbps"), (1025, "1025bps")],
)
def test_bandwidth_rate_is_exact_in_chaos_mesh_units(bytes_per_s: int, rate: str) -> None:
    bandwidth = _chaos(_one({**BANDWIDTH, "bytes_per_s": bytes_per_s}))["bandwidth"]
    assert bandwidth["rate"] == rate
    assert _rate_bytes(bandwidth["rate"]) == bytes_per_s


def test_a_huge_bandwidth_keeps_limit_and_buffer_within_int32() -> None:
    _one({**BANDWIDTH, "bytes_per_s": 10**12})  # the schema checks the bounds


@pytest.mark.parametrize("kind", ["blackhole", "partition", "target_down"])
def test_cuts_partition_the_devices_from_the_broker_pods_both_ways(kind: str) -> None:
    chaos = _chaos(_one({"kind": kind, "at": "1s", "duration": "1s"}))
    assert chaos["direction"] == "both"
    assert chaos["selector"]["labelSelectors"] == DEFAULT_DEVICE_SELECTOR
    assert chaos["target"] == {
        "mode": "all",
        "selector": {"namespaces": ["default"], "labelSelectors": {BROKER_LABEL: "main"}},
    }


@pytest.mark.parametrize("kind", ["blackhole", "target_down", "bandwidth"])
def test_an_approximate_mapping_says_how_it_differs(kind: str) -> None:
    fault = BANDWIDTH if kind == "bandwidth" else {"kind": kind, "at": "1s", "duration": "1s"}
    assert _one(fault)["metadata"]["annotations"]["iotix.dev/approximation"]


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ({"kind": "reset", "at": "5s"}, "resets connections"),
        ({"kind": "slow_close", "at": "5s", "duration": "5s", "delay": "1s"}, "close"),
    ],
    ids=["reset", "slow_close"],
)
def test_a_kind_without_equivalent_is_skipped_with_its_reason(
    fault: dict[str, Any], words: str
) -> None:
    export = export_chaos(_spec(LATENCY, fault))
    assert len(_check(export)) == 1
    (skipped,) = export.skipped
    assert (skipped.index, skipped.kind) == (1, fault["kind"])
    assert words in skipped.reason
    assert f"skipped: faults[1] {fault['kind']}: " in dump_manifests(export)


def test_only_unmappable_faults_is_an_error_that_says_why() -> None:
    with pytest.raises(ChaosExportError, match="none of the scenario's 1 fault") as info:
        export_chaos(_spec({"kind": "reset", "at": "5s"}))
    assert "resets connections" in str(info.value)
    assert info.value.field == "faults"


def test_a_scenario_without_faults_is_an_error() -> None:
    with pytest.raises(ChaosExportError, match="has no faults"):
        export_chaos(_spec())


# --- share, broker, fleet, names ------------------------------------------------------------


@pytest.mark.parametrize(
    ("share", "value"),
    [(0.25, "25"), ("50%", "50"), (0.125, "13"), (0.004, "1"), (0.999, "100")],
)
def test_a_share_picks_a_whole_percentage_of_the_device_pods(share: Any, value: str) -> None:
    manifest = _one({**LATENCY, "share": share})
    chaos = _chaos(manifest)
    assert (chaos["mode"], chaos["value"]) == ("fixed-percent", value)
    assert isinstance(chaos["value"], str)
    assert float(manifest["metadata"]["annotations"]["iotix.dev/share"]) < 1


def test_all_the_connections_are_all_the_device_pods() -> None:
    chaos = _chaos(_one(LATENCY))
    assert chaos["mode"] == "all"
    assert "value" not in chaos


def test_a_fault_on_one_broker_targets_its_pods() -> None:
    spec = _spec({**LATENCY, "broker": "b"}, brokers=TWO_BROKERS, fleets=TWO_FLEETS)
    (manifest,) = _check(export_chaos(spec))
    assert _chaos(manifest)["target"]["selector"]["labelSelectors"] == {BROKER_LABEL: "b"}


def test_a_fault_on_every_broker_is_one_manifest_targeting_them_all() -> None:
    spec = _spec(LATENCY, brokers=TWO_BROKERS, fleets=TWO_FLEETS)
    (manifest,) = _check(export_chaos(spec))
    assert _chaos(manifest)["target"]["selector"]["expressionSelectors"] == [
        {"key": BROKER_LABEL, "operator": "In", "values": ["a", "b"]}
    ]


def test_brokers_with_unrelated_selectors_take_one_manifest_each_and_a_warning() -> None:
    spec = _spec(LATENCY, brokers=TWO_BROKERS, fleets=TWO_FLEETS)
    selectors = {"a": {"app": "emqx"}, "b": {"release": "mosquitto"}}
    export = export_chaos(spec, broker_selectors=selectors)
    manifests = _check(export)
    assert [_chaos(m)["target"]["selector"]["labelSelectors"] for m in manifests] == [
        {"app": "emqx"},
        {"release": "mosquitto"},
    ]
    assert [m["metadata"]["name"] for m in manifests] == ["soak-0-latency-a", "soak-0-latency-b"]
    (warning,) = export.warnings
    assert "may replace" in warning


def test_brokers_alike_but_for_one_label_share_one_manifest() -> None:
    spec = _spec(LATENCY, brokers=TWO_BROKERS, fleets=TWO_FLEETS)
    selectors = {"a": {"app": "emqx", "site": "paris"}, "b": {"app": "emqx", "site": "oslo"}}
    (manifest,) = _check(export_chaos(spec, broker_selectors=selectors))
    assert _chaos(manifest)["target"]["selector"] == {
        "namespaces": ["default"],
        "labelSelectors": {"app": "emqx"},
        "expressionSelectors": [{"key": "site", "operator": "In", "values": ["oslo", "paris"]}],
    }


@pytest.mark.parametrize(
    "b_labels",
    [{"app": "emqx"}, {"app": "hivemq", "site": "oslo"}],
    ids=["other keys", "two labels differ"],
)
def test_brokers_without_one_common_selector_take_one_manifest_each(
    b_labels: dict[str, str],
) -> None:
    spec = _spec(BANDWIDTH, brokers=TWO_BROKERS, fleets=TWO_FLEETS)
    selectors = {"a": {"app": "emqx", "site": "paris"}, "b": b_labels}
    assert len(_check(export_chaos(spec, broker_selectors=selectors))) == 2


@pytest.mark.parametrize(("key", "value"), [("broker", "nope"), ("fleet", "nope")])
def test_a_fault_on_an_unknown_broker_or_fleet_is_an_error(key: str, value: str) -> None:
    """The loader refuses these; a spec built in code may still hold them."""
    with pytest.raises(ChaosExportError, match="unknown") as info:
        export_chaos(_spec({**LATENCY, key: value}))
    assert info.value.field == f"faults[0].{key}"


def test_the_scenarios_actions_are_said_to_be_left_out() -> None:
    spec = _spec(LATENCY, actions=[{"kind": "disconnect", "at": "5s", "share": 0.1}])
    (warning,) = export_chaos(spec).warnings
    assert "1 action(s) are not exported" in warning


def test_broker_selectors_must_name_the_scenarios_brokers() -> None:
    with pytest.raises(ChaosExportError, match="mian") as info:
        export_chaos(_spec(LATENCY), broker_selectors={"mian": {"app": "emqx"}})
    assert info.value.field == "broker_selectors"


def test_a_fault_on_one_fleet_selects_its_pods_and_its_broker() -> None:
    spec = _spec({**LATENCY, "fleet": "cars"}, brokers=TWO_BROKERS, fleets=TWO_FLEETS)
    (manifest,) = _check(export_chaos(spec, selector={"app": "sim"}))
    chaos = _chaos(manifest)
    assert chaos["selector"]["labelSelectors"] == {"app": "sim", FLEET_LABEL: "cars"}
    assert chaos["target"]["selector"]["labelSelectors"] == {BROKER_LABEL: "b"}


def test_a_named_fault_gives_its_name_to_the_manifest() -> None:
    manifest = _one({**LATENCY, "name": "Cellular_Lag"})
    assert manifest["metadata"]["name"] == "soak-0-cellular-lag"
    assert manifest["metadata"]["annotations"]["iotix.dev/fault-name"] == "Cellular_Lag"


def test_fault_entries_without_name_or_fleet_still_export() -> None:
    """Fault specs from before `name` and `fleet` existed (read with getattr)."""
    entry = SimpleNamespace(
        kind="latency", at_s=0.0, duration_s=5.0, broker=None, share=1.0, delay_s=0.1, jitter_s=0
    )
    spec = SimpleNamespace(name="old", brokers={"main": "mqtt://h:1883"}, fleets=[], faults=[entry])
    (manifest,) = _check(export_chaos(spec))  # type: ignore[arg-type]
    assert manifest["metadata"]["name"] == "old-0-latency"


def test_a_kind_newer_than_the_exporter_is_skipped_not_guessed() -> None:
    jam = SimpleNamespace(kind="jam", at_s=0.0, duration_s=5.0, broker=None, share=1.0)
    spec = _spec(LATENCY).model_copy(update={"faults": [*_spec(LATENCY).faults, jam]})
    export = export_chaos(spec)
    assert [s.kind for s in export.skipped] == ["jam"]


def test_names_are_dns_labels_unique_and_short_enough_for_a_schedule() -> None:
    long_name = "x" * 60
    faults = [{**LATENCY, "name": f"{long_name}{i}", "at": f"{i * 40}s"} for i in range(3)]
    spec = _spec(*faults, name="A_" + "Very_Long_Scenario" * 3)
    for schedule in (None, "0 * * * *"):
        manifests = _check(export_chaos(spec, schedule=schedule))
        assert len({m["metadata"]["name"] for m in manifests}) == 3


def test_manifests_are_labelled_for_kubectl_selection() -> None:
    manifests = _check(export_chaos(_spec(LATENCY, {**BANDWIDTH, "at": "1m"})))
    assert [m["metadata"]["labels"] for m in manifests] == [
        {
            "app.kubernetes.io/managed-by": "iotix",
            "iotix.dev/scenario": "soak",
            "iotix.dev/fault-index": str(index),
        }
        for index in range(2)
    ]


# --- options ------------------------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["Default", "-iot", "iot-", "a" * 64, "my.ns", "", "i_t"])
def test_a_namespace_that_kubernetes_refuses_is_an_error(namespace: str) -> None:
    with pytest.raises(ChaosExportError, match="namespace") as info:
        export_chaos(_spec(LATENCY), namespace=namespace)
    assert info.value.field == "namespace"


def test_the_namespace_goes_to_metadata_and_both_selectors() -> None:
    chaos_manifest = _one(LATENCY, namespace="iot-lab")
    chaos = _chaos(chaos_manifest)
    assert chaos_manifest["metadata"]["namespace"] == "iot-lab"
    assert chaos["selector"]["namespaces"] == chaos["target"]["selector"]["namespaces"]
    assert chaos["selector"]["namespaces"] == ["iot-lab"]


@pytest.mark.parametrize(
    "selector", [{}, {"app": "-bad"}, {"bad key": "x"}, {"a/b/c": "x"}, {"app": "x" * 64}]
)
def test_a_selector_that_kubernetes_refuses_is_an_error(selector: dict[str, str]) -> None:
    with pytest.raises(ChaosExportError) as info:
        export_chaos(_spec(LATENCY), selector=selector)
    assert info.value.field == "selector"


def test_selectors_parse_from_key_value_texts() -> None:
    assert parse_selector(["app=iotix", " tier = load "]) == {"app": "iotix", "tier": "load"}
    assert parse_selector(["example.com/role=sim"]) == {"example.com/role": "sim"}


@pytest.mark.parametrize("text", ["app", "=x", "app=a b"])
def test_a_selector_text_that_does_not_parse_is_an_error(text: str) -> None:
    with pytest.raises(ChaosExportError):
        parse_selector([text])


# --- Schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cron", ["0 3 * * *", "*/5 * * * *", "@hourly", "0 0 * * MON-FRI", "0 0 1,15 * ?"]
)
def test_with_a_cron_each_fault_becomes_a_valid_schedule(cron: str) -> None:
    export = export_chaos(_spec(LATENCY, BANDWIDTH), schedule=cron)
    manifests = _check(export)
    assert [m["kind"] for m in manifests] == ["Schedule", "Schedule"]
    for manifest in manifests:
        spec = manifest["spec"]
        assert spec["schedule"] == cron
        assert spec["type"] == "NetworkChaos"
        assert _go_seconds(spec["networkChaos"]["duration"]) > 0
        assert "duration" not in spec


def test_a_cron_is_normalised_to_single_spaces() -> None:
    export = export_chaos(_spec(LATENCY), schedule="  0   3 * * * ")
    assert _check(export)[0]["spec"]["schedule"] == "0 3 * * *"


@pytest.mark.parametrize(
    "cron",
    ["* * * *", "* * * * * *", "61 * * * *", "0 24 * * *", "0 0 0 * *", "0 0 * 13 *",
     "0 0 * * 7", "0 0 * * FUN", "*/0 * * * *", "5-1 * * * *", "? * * * *", "@every 1h"],
)  # fmt: skip
def test_a_cron_that_chaos_mesh_refuses_is_an_error(cron: str) -> None:
    with pytest.raises(ChaosExportError, match="cron") as info:
        export_chaos(_spec(LATENCY), schedule=cron)
    assert info.value.field == "schedule"


# --- the timeline ---------------------------------------------------------------------------


def test_overlapping_traffic_control_faults_are_warned_about() -> None:
    export = export_chaos(_spec(LATENCY, {**BANDWIDTH, "at": "20s"}))
    (warning,) = export.warnings
    assert "faults[0] latency and faults[1] bandwidth overlap from 20s to 40s" in warning
    assert f"warning: {warning[:40]}" in dump_manifests(export)


@pytest.mark.parametrize(
    "second",
    [
        {**BANDWIDTH, "at": "40s"},  # after the latency ends
        {"kind": "partition", "at": "20s", "duration": "5s"},  # iptables, not tc
    ],
)
def test_faults_that_do_not_collide_are_not_warned_about(second: dict[str, Any]) -> None:
    assert export_chaos(_spec(LATENCY, second)).warnings == ()


def test_faults_on_different_fleets_are_not_warned_about() -> None:
    spec = _spec(
        {**LATENCY, "fleet": "meters"},
        {**BANDWIDTH, "at": "20s", "fleet": "cars"},
        brokers=TWO_BROKERS,
        fleets=TWO_FLEETS,
    )
    assert export_chaos(spec).warnings == ()


# --- the example and the YAML ---------------------------------------------------------------


def test_flaky_cellular_exports_its_latency_and_squeeze_and_skips_the_reset() -> None:
    export = export_chaos(load_scenario(FLAKY_CELLULAR))
    manifests = _check(export)
    assert [m["metadata"]["name"] for m in manifests] == [
        "flaky-cellular-0-latency",
        "flaky-cellular-1-bandwidth",
    ]
    latency, squeeze = (_chaos(m) for m in manifests)
    assert (latency["delay"]["latency"], latency["delay"]["jitter"]) == ("150ms", "100ms")
    assert (latency["duration"], squeeze["duration"]) == ("1m", "15s")
    assert squeeze["bandwidth"]["rate"] == "2000bps"
    assert [(s.index, s.kind) for s in export.skipped] == [(2, "reset")]
    assert len(export.warnings) == 1  # the squeeze lands on the lag's pods


def test_flaky_cellular_exports_as_schedules_too() -> None:
    _check(export_chaos(load_scenario(FLAKY_CELLULAR), schedule="@daily", namespace="iot"))


@pytest.mark.parametrize("schedule", [None, "30 2 * * *"])
def test_the_yaml_stream_reads_back_as_the_manifests(schedule: str | None) -> None:
    export = export_chaos(load_scenario(FLAKY_CELLULAR), schedule=schedule)
    text = dump_manifests(export)
    assert list(yaml.safe_load_all(text)) == list(export.manifests)
    assert text.count("\n---\n") == len(export.manifests)
    assert "# faults[1] bandwidth: from 15s into the run, for 15s\n" in text


def test_the_docs_show_what_flaky_cellular_really_exports() -> None:
    docs = (ROOT / "docs" / "chaos-mesh.md").read_text(encoding="utf-8")
    example = docs.split("## Example: flaky-cellular", 1)[1].split("```yaml\n", 1)[1]
    shown = example.split("```", 1)[0]
    assert shown == dump_manifests(export_chaos(load_scenario(FLAKY_CELLULAR)))


def test_the_yaml_keeps_a_percentage_a_string() -> None:
    export = export_chaos(_spec({**LATENCY, "share": 0.25}))
    (manifest,) = yaml.safe_load_all(dump_manifests(export))
    assert manifest["spec"]["value"] == "25"


# --- the converters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (90, "1m30s"),
        (0.15, "150ms"),
        (3600, "1h"),
        (3661.5, "1h1m1s500ms"),
        (60.5, "1m500ms"),
        (0.000123, "123us"),
        (0, "0s"),
        (1e-9, "1us"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


@given(st.floats(min_value=0, max_value=1e7, allow_nan=False))
def test_go_duration_reads_back_to_the_microsecond(seconds: float) -> None:
    assert _go_seconds(go_duration(seconds)) == pytest.approx(seconds, abs=1e-6, rel=1e-12)


@given(st.integers(min_value=1, max_value=2**50))
def test_tbf_rate_reads_back_exactly(bytes_per_s: int) -> None:
    text = tbf_rate(bytes_per_s)
    assert re.fullmatch(RATE, text)
    assert _rate_bytes(text) == bytes_per_s


def test_a_rate_of_nothing_is_an_error() -> None:
    with pytest.raises(ChaosExportError):
        tbf_rate(0)
