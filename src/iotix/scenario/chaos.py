"""Chaos Mesh manifests from a scenario's fault timeline (``iotix chaos export``).

iotix applies a scenario's faults with its own user-space proxy. On Kubernetes the same
timeline can be played by Chaos Mesh instead: :func:`export_chaos` turns each fault into
a ``NetworkChaos`` (or, given a cron expression, a ``Schedule`` that creates one) and
:func:`dump_manifests` writes them as one multi-document YAML stream for ``kubectl
apply -f``. Both are pure: no cluster, no clock, no I/O.

Who is who in the cluster (conventions, overridable):

- the devices run in pods labelled ``app.kubernetes.io/name=iotix`` (``selector``
  replaces these labels); a fault on one fleet adds ``iotix.dev/fleet=<fleet>``;
- each broker's pods are labelled ``iotix.dev/broker=<broker name>``
  (``broker_selectors`` replaces them, broker by broker).

The chaos is injected on the device pods (``selector``; ``share`` becomes a percentage
of those pods) with the brokers' pods as ``target``, so it hits only the traffic between
the two, and ``direction: both``, as iotix's proxy degrades both ways. A fault on every
broker takes one manifest whose target matches them all (``iotix.dev/broker In (a,
b)``): two chaos of one kind on one pod do not combine in Chaos Mesh.

What maps, and how (the field rules are Chaos Mesh's CRD and admission webhook,
``api/v1alpha1/networkchaos_types.go`` and ``networkchaos_webhook.go``):

=============  =====================  ===================================================
iotix kind     Chaos Mesh action      how close
=============  =====================  ===================================================
latency        delay                  netem ``latency`` ± ``jitter``, both directions
bandwidth      bandwidth              tbf ``rate``; capped per pod, not per connection
blackhole      partition              packets dropped both ways; sockets stay open
partition      partition              dropped both ways; new connects time out, not refused
target_down    partition              dropped, not reset and refused: devices see a stall
reset          (none: skipped)        no action resets a TCP connection
slow_close     (none: skipped)        netem delays every packet, not only the close
=============  =====================  ===================================================

A ``NetworkChaos`` starts when it is created and has no "start at T": the fault's offset
(``at``) travels in the annotation ``iotix.dev/start-offset`` and in a comment above each
document, for whoever applies it (``kubectl apply -f FILE -l iotix.dev/fault-index=N``).
A ``Schedule`` starts its chaos at the cron times, so the offsets are not kept there
either. Two traffic-control chaos (delay, bandwidth) on one pod at once do not combine
in Chaos Mesh; :attr:`ChaosExport.warnings` names such overlaps.
"""

from __future__ import annotations

import hashlib
import math
import re
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import yaml

from iotix.errors import IotixError
from iotix.scenario.loader import LoadedScenario

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from iotix.scenario.spec import FaultEntry, ScenarioSpec

__all__ = [
    "API_VERSION",
    "BROKER_LABEL",
    "DEFAULT_DEVICE_SELECTOR",
    "FLEET_LABEL",
    "ChaosExport",
    "ChaosExportError",
    "SkippedFault",
    "dump_manifests",
    "export_chaos",
    "go_duration",
    "parse_selector",
    "tbf_rate",
]

API_VERSION: Final = "chaos-mesh.org/v1alpha1"
DEFAULT_DEVICE_SELECTOR: Final = {"app.kubernetes.io/name": "iotix"}
"""The device pods' labels, unless ``selector`` says otherwise."""
FLEET_LABEL: Final = "iotix.dev/fleet"
"""Added to the device selector for a fault on one fleet: ``iotix.dev/fleet=<fleet>``."""
BROKER_LABEL: Final = "iotix.dev/broker"
"""A broker's pods, unless ``broker_selectors`` says otherwise: ``iotix.dev/broker=<name>``."""

# metadata.name: a DNS-1123 label. A Schedule's is shorter: Chaos Mesh appends 6
# characters ("-xxxxx") to it for each NetworkChaos it creates (docs: "Define
# Scheduling Rules", "should not exceed 57 characters").
_NAME_MAX = {"NetworkChaos": 63, "Schedule": 57}
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# Label keys and values (Kubernetes "Labels and Selectors"): a value is 63 characters at
# most, alphanumeric at both ends, '-', '_' and '.' inside; a key is a value-like name
# with an optional DNS-subdomain prefix and '/'.
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# iotix kind -> Chaos Mesh NetworkChaos action; a kind missing here is skipped with the
# reason in _UNMAPPED (or a generic one, for kinds newer than this table).
_ACTION: Final = {
    "latency": "delay",  # netem delay; jitter spreads it
    "bandwidth": "bandwidth",  # tbf token bucket
    "blackhole": "partition",  # iptables DROP both ways: the sockets stay open, stalled
    "partition": "partition",
    "target_down": "partition",  # closest: dropped, where iotix resets and refuses
}
_UNMAPPED: Final = {
    "reset": (
        "no NetworkChaos action resets connections: a partition drops packets without a "
        "reset, so a short one only stalls them. For reconnects, use a partition longer "
        "than 1.5 x the devices' MQTT keep-alive, or a PodChaos pod-kill of the broker"
    ),
    "slow_close": (
        "no NetworkChaos action delays only a connection's close: netem delays every packet"
    ),
}
# Why an exported fault is not exactly the iotix one (annotation iotix.dev/approximation).
_APPROXIMATION: Final = {
    "bandwidth": (
        "Chaos Mesh caps all of a device pod's traffic to the broker together, iotix each "
        "connection: for N devices in one pod, multiply the rate by N"
    ),
    "blackhole": "a partition: iptables drops every packet both ways; the sockets stay open",
    "target_down": (
        "a partition: packets are dropped, where iotix resets the connections and refuses "
        "new ones; devices see a stall, then their keep-alive times out"
    ),
}
# The actions that are Linux traffic control on the pod (netem, tbf); Chaos Mesh does
# not combine two of these on one pod (chaos-mesh/chaos-mesh#3631): the later may win.
_TC_ACTIONS: Final = frozenset({"delay", "bandwidth"})

# Bandwidth (tc-tbf): Chaos Mesh requires limit and buffer (integers >= 1, uint32).
_BUFFER_MIN_BYTES = 16 * 1024  # the iotix proxy's bucket depth (faults.Bandwidth)
_BUFFER_S = 0.01  # and at least 10 ms of the rate, as tbf wants for fast links
_LIMIT_S = 2.0  # the queue: 2 x rate x an assumed 1 s round trip (Chaos Mesh's advice)
_LIMIT_MIN_BYTES = 64 * 1024
_TBF_MAX = 2**31 - 1  # the CRD's format is int32
# Chaos Mesh's rate units: "bps" is bytes per second, each prefix x1024 (its
# ConvertUnitToBytes); only whole numbers parse.
_RATE_UNITS: Final = (("tbps", 1024**4), ("gbps", 1024**3), ("mbps", 1024**2), ("kbps", 1024))

# Schedule: Forbid keeps one chaos per schedule at a time; a run missed by more than a
# minute (controller down) is dropped rather than replayed late.
_CONCURRENCY_POLICY = "Forbid"
_HISTORY_LIMIT = 2
_STARTING_DEADLINE_S = 60
# A standard 5-field cron (minute hour day-of-month month day-of-week) or a descriptor,
# as Chaos Mesh's Schedule documents them.
_CRON_DESCRIPTORS: Final = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
_CRON_FIELDS: Final = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    (
        "month",
        1,
        12,
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
    ),
    ("day of week", 0, 6, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
_CRON_PART = re.compile(r"(?P<range>\*|\?|(?P<lo>\w+)(?:-(?P<hi>\w+))?)(?:/(?P<step>\d+))?")


class ChaosExportError(IotixError):
    """A scenario cannot be exported as asked: no faults, none that maps, a bad
    namespace, selector or cron expression. ``field`` names the culprit
    (``namespace``, ``selector``, ``schedule``, ``faults[2].fleet``...)."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SkippedFault:
    """A fault with no Chaos Mesh equivalent, left out of the manifests."""

    index: int
    """Its position in the scenario's ``faults``."""
    name: str
    kind: str
    reason: str

    def __str__(self) -> str:
        label = self.kind if self.name == self.kind else f"{self.name} ({self.kind})"
        return f"faults[{self.index}] {label}: {self.reason}"


@dataclass(frozen=True)
class ChaosExport:
    """The manifests of one scenario, and what did not make it into them."""

    scenario: str
    namespace: str
    manifests: tuple[dict[str, Any], ...]
    """``NetworkChaos`` or ``Schedule`` documents, in the faults' order."""
    skipped: tuple[SkippedFault, ...] = ()
    warnings: tuple[str, ...] = ()
    """What a person should know before applying them (overlapping faults...)."""
    schedule: str | None = None
    """The cron expression, when the manifests are ``Schedule`` objects."""


# --- entry points ----------------------------------------------------------------------


def export_chaos(
    scenario: LoadedScenario | ScenarioSpec,
    *,
    namespace: str = "default",
    selector: Mapping[str, str] | None = None,
    broker_selectors: Mapping[str, Mapping[str, str]] | None = None,
    schedule: str | None = None,
) -> ChaosExport:
    """Chaos Mesh manifests for a scenario's faults, in ``namespace``.

    ``selector`` labels the device pods (default :data:`DEFAULT_DEVICE_SELECTOR`);
    ``broker_selectors`` maps broker names to their pods' labels (default
    ``{BROKER_LABEL: name}``). With ``schedule`` (a cron expression) each fault becomes
    a ``Schedule`` that creates its ``NetworkChaos`` at those times.

    Raises :class:`ChaosExportError` when the scenario has no faults, when none of them
    maps to Chaos Mesh, and for a bad namespace, label or cron expression.
    """
    spec = scenario.spec if isinstance(scenario, LoadedScenario) else scenario
    names = _fault_names(scenario, spec)
    _check_namespace(namespace)
    devices = dict(DEFAULT_DEVICE_SELECTOR if selector is None else selector)
    _check_labels(devices, "selector")
    brokers = _broker_labels(spec, broker_selectors or {})
    if schedule is not None:
        schedule = _check_cron(schedule)
    if not spec.faults:
        raise ChaosExportError(
            f"the scenario {spec.name!r} has no faults: there is nothing to export",
            field="faults",
        )
    kind = "Schedule" if schedule is not None else "NetworkChaos"
    scenario_part = _dns_part(spec.name) or "iotix"
    manifests: list[dict[str, Any]] = []
    skipped: list[SkippedFault] = []
    exported: list[_Exported] = []
    used: set[str] = set()
    for index, entry in enumerate(spec.faults):
        action = _ACTION.get(entry.kind)
        if action is None:
            reason = _UNMAPPED.get(entry.kind, f"iotix cannot export a {entry.kind} fault yet")
            skipped.append(SkippedFault(index, names[index], entry.kind, reason))
            continue
        fleet = getattr(entry, "fleet", None)
        groups = _target_groups(_fault_brokers(spec, entry, index), brokers)
        for group in groups:
            suffix = "-".join(group) if len(groups) > 1 else ""
            name = _unique_name(
                (scenario_part, str(index), names[index], suffix), _NAME_MAX[kind], used
            )
            chaos = _network_chaos_spec(
                entry,
                action,
                namespace=namespace,
                devices=_with_fleet(devices, fleet, index),
                target=_target_selector(group, brokers),
            )
            metadata = _metadata(
                name, namespace, scenario_part, entry, index=index, name_in_scenario=names[index]
            )
            manifests.append(_manifest(metadata, chaos, schedule))
            label = f"faults[{index}] {names[index]}" + (f" (to {suffix})" if suffix else "")
            exported.append(_Exported(label, action, entry, fleet))
    if not manifests:
        raise ChaosExportError(
            f"none of the scenario's {len(skipped)} fault(s) maps to Chaos Mesh: "
            + "; ".join(str(s) for s in skipped),
            field="faults",
        )
    warnings = _overlaps(exported)
    actions = getattr(spec, "actions", ())
    if actions:
        warnings.append(
            f"the scenario's {len(actions)} action(s) are not exported: Chaos Mesh "
            "NetworkChaos covers network faults only"
        )
    return ChaosExport(
        scenario=spec.name,
        namespace=namespace,
        manifests=tuple(manifests),
        skipped=tuple(skipped),
        warnings=tuple(warnings),
        schedule=schedule,
    )


def dump_manifests(export: ChaosExport) -> str:
    """One multi-document YAML stream (``---`` between documents) for ``kubectl apply
    -f``: a header comment with what was skipped and why, then each manifest under a
    comment saying when it should start."""
    if export.schedule is None:
        timing = (
            "A NetworkChaos starts when it is created: apply each one at its offset from "
            "the run's start (the comment above it; annotation iotix.dev/start-offset), "
            "e.g. kubectl apply -f FILE -l iotix.dev/fault-index=1."
        )
    else:
        timing = (
            f"Each Schedule creates its NetworkChaos at the cron times ({export.schedule}); "
            "the faults' offsets within the run (annotation iotix.dev/start-offset) are "
            "not kept."
        )
    origin = (
        f"Chaos Mesh manifests for the iotix scenario {export.scenario} (namespace "
        f"{export.namespace}), from `iotix chaos export`; see docs/chaos-mesh.md."
    )
    header = [
        origin,
        timing,
        *(f"warning: {warning}" for warning in export.warnings),
        *(f"skipped: {skipped}" for skipped in export.skipped),
    ]
    lines = [_comment(paragraph) for paragraph in header]
    for manifest in export.manifests:
        annotations = manifest["metadata"]["annotations"]
        chaos = manifest["spec"].get("networkChaos", manifest["spec"])
        when = (
            f"{annotations['iotix.dev/fault']} {annotations['iotix.dev/fault-name']}: from "
            f"{annotations['iotix.dev/start-offset']} into the run, for {chaos['duration']}"
        )
        body = yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)
        lines += ["---", _comment(when), body.rstrip("\n")]
    return "\n".join(lines) + "\n"


def _comment(text: str) -> str:
    """A paragraph as YAML comment lines of at most 88 characters."""
    lines = textwrap.wrap(
        text,
        width=88,
        initial_indent="# ",
        subsequent_indent="#   ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "\n".join(lines)


def parse_selector(pairs: Iterable[str]) -> dict[str, str]:
    """Labels from ``key=value`` texts (as ``--selector`` takes them), checked."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ChaosExportError(
                f"a selector is key=value, such as app=iotix, not {pair!r}", field="selector"
            )
        labels[key.strip()] = value.strip()
    _check_labels(labels, "selector")
    return labels


def go_duration(seconds: float) -> str:
    """A duration as Go's ``time.ParseDuration`` reads it (``1m30s``, ``150ms``), to the
    microsecond (what netem resolves); a positive duration is at least ``1us``."""
    total_us = round(seconds * 1_000_000)
    if total_us <= 0:
        return "1us" if seconds > 0 else "0s"
    hours, rest = divmod(total_us, 3_600_000_000)
    minutes, rest = divmod(rest, 60_000_000)
    whole_s, rest_us = divmod(rest, 1_000_000)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    text += f"{whole_s}s" if whole_s else ""
    if rest_us:
        text += f"{rest_us // 1000}ms" if rest_us % 1000 == 0 else f"{rest_us}us"
    return text


def tbf_rate(bytes_per_s: int) -> str:
    """A bandwidth ``rate`` as Chaos Mesh reads it, exactly: the largest of its units
    (``kbps`` = 1024 bytes/s, ``mbps``...) that divides the rate, else ``bps``."""
    if bytes_per_s <= 0:
        raise ChaosExportError(f"a rate must be positive, not {bytes_per_s}", field="rate")
    for unit, factor in _RATE_UNITS:
        if bytes_per_s % factor == 0:
            return f"{bytes_per_s // factor}{unit}"
    return f"{bytes_per_s}bps"


# --- one fault -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Exported:
    """What the overlap check needs of an exported fault."""

    label: str
    """``faults[1] squeeze``, and the brokers when the fault takes several manifests."""
    action: str
    entry: FaultEntry
    fleet: str | None


def _network_chaos_spec(
    entry: FaultEntry,
    action: str,
    *,
    namespace: str,
    devices: Mapping[str, str],
    target: Mapping[str, Any],
) -> dict[str, Any]:
    spec: dict[str, Any] = {"action": action, **_mode(entry.share)}
    spec["selector"] = {"namespaces": [namespace], "labelSelectors": dict(devices)}
    # Both ways, as the proxy degrades both; the webhook wants a target for that.
    spec["direction"] = "both"
    spec["target"] = {"mode": "all", "selector": {"namespaces": [namespace], **target}}
    if entry.kind == "latency":
        spec["delay"] = {
            "latency": go_duration(entry.delay_s),
            "jitter": go_duration(entry.jitter_s) if entry.jitter_s else "0ms",
            "correlation": "0",
        }
    elif entry.kind == "bandwidth":
        rate = entry.bytes_per_s
        buffer = max(_BUFFER_MIN_BYTES, math.ceil(rate * _BUFFER_S))
        spec["bandwidth"] = {
            "rate": tbf_rate(rate),
            "limit": min(_TBF_MAX, max(_LIMIT_MIN_BYTES, math.ceil(rate * _LIMIT_S))),
            "buffer": min(_TBF_MAX, buffer),
        }
    if entry.duration_s is None:  # pragma: no cover - only reset has none, and it is skipped
        msg = f"a {entry.kind} fault without a duration"
        raise ChaosExportError(msg)
    spec["duration"] = go_duration(entry.duration_s)
    return spec


def _mode(share: float) -> dict[str, str]:
    """``share`` of the device pods: all of them, or a whole percentage in (0, 100] as
    the webhook wants (``strconv.Atoi``), at least 1."""
    if share >= 1:
        return {"mode": "all"}
    percent = min(100, max(1, math.floor(share * 100 + 0.5)))
    return {"mode": "fixed-percent", "value": str(percent)}


def _metadata(
    name: str,
    namespace: str,
    scenario_part: str,
    entry: FaultEntry,
    *,
    index: int,
    name_in_scenario: str,
) -> dict[str, Any]:
    annotations = {
        "iotix.dev/fault": f"faults[{index}]",
        "iotix.dev/fault-name": name_in_scenario,
        "iotix.dev/fault-kind": entry.kind,
        "iotix.dev/start-offset": go_duration(entry.at_s),
    }
    if entry.share < 1:
        annotations["iotix.dev/share"] = f"{entry.share:g}"
    if entry.kind in _APPROXIMATION:
        annotations["iotix.dev/approximation"] = _APPROXIMATION[entry.kind]
    return {
        "name": name,
        "namespace": namespace,
        # kubectl apply -f FILE -l iotix.dev/fault-index=1 applies one fault, at its time.
        "labels": {
            "app.kubernetes.io/managed-by": "iotix",
            "iotix.dev/scenario": scenario_part,
            "iotix.dev/fault-index": str(index),
        },
        "annotations": annotations,
    }


def _manifest(
    metadata: dict[str, Any], chaos: dict[str, Any], schedule: str | None
) -> dict[str, Any]:
    if schedule is None:
        return {
            "apiVersion": API_VERSION,
            "kind": "NetworkChaos",
            "metadata": metadata,
            "spec": chaos,
        }
    return {
        "apiVersion": API_VERSION,
        "kind": "Schedule",
        "metadata": metadata,
        "spec": {
            "schedule": schedule,
            "type": "NetworkChaos",
            "concurrencyPolicy": _CONCURRENCY_POLICY,
            "historyLimit": _HISTORY_LIMIT,
            "startingDeadlineSeconds": _STARTING_DEADLINE_S,
            "networkChaos": chaos,
        },
    }


# --- who is hit ------------------------------------------------------------------------


def _fault_names(scenario: LoadedScenario | ScenarioSpec, spec: ScenarioSpec) -> list[str]:
    """Each fault's name: the loader's (own, else kind numbered), else own, else kind."""
    loaded = getattr(scenario, "fault_names", ())
    if len(loaded) == len(spec.faults):
        return list(loaded)
    return [getattr(entry, "name", None) or entry.kind for entry in spec.faults]


def _fault_brokers(spec: ScenarioSpec, entry: FaultEntry, index: int) -> list[str]:
    """The brokers whose connections the fault hits: its own, else its fleet's, else
    every broker (one manifest each)."""
    if entry.broker is not None:
        if entry.broker not in spec.brokers:
            raise ChaosExportError(
                f"faults[{index}] names the unknown broker {entry.broker!r}",
                field=f"faults[{index}].broker",
            )
        return [entry.broker]
    fleet_name = getattr(entry, "fleet", None)
    if fleet_name is None:
        return list(spec.brokers)
    fleet = next((f for f in spec.fleets if f.name == fleet_name), None)
    if fleet is None:
        raise ChaosExportError(
            f"faults[{index}] names the unknown fleet {fleet_name!r}",
            field=f"faults[{index}].fleet",
        )
    # A fleet without a broker uses the only one (the loader insists there is one).
    return [fleet.broker] if fleet.broker is not None else list(spec.brokers)[:1]


def _with_fleet(devices: Mapping[str, str], fleet: str | None, index: int) -> dict[str, str]:
    if fleet is None:
        return dict(devices)
    labels = {**devices, FLEET_LABEL: fleet}
    _check_labels(labels, f"faults[{index}].fleet")
    return labels


def _broker_labels(
    spec: ScenarioSpec, given: Mapping[str, Mapping[str, str]]
) -> dict[str, dict[str, str]]:
    unknown = sorted(set(given) - set(spec.brokers))
    if unknown:
        raise ChaosExportError(
            f"broker_selectors names brokers the scenario does not have: {', '.join(unknown)} "
            f"(brokers: {', '.join(spec.brokers)})",
            field="broker_selectors",
        )
    labels = {}
    for broker in spec.brokers:
        labels[broker] = dict(given.get(broker, {BROKER_LABEL: broker}))
        _check_labels(labels[broker], f"broker_selectors.{broker}")
    return labels


def _target_groups(
    targets: Sequence[str], labels: Mapping[str, Mapping[str, str]]
) -> list[tuple[str, ...]]:
    """The brokers one manifest can target together: all of them when one selector
    matches them all (see :func:`_target_selector`), else one manifest per broker."""
    if _merged_selector([labels[b] for b in targets]) is not None:
        return [tuple(targets)]
    return [(broker,) for broker in targets]


def _target_selector(
    group: Sequence[str], labels: Mapping[str, Mapping[str, str]]
) -> dict[str, Any]:
    merged = _merged_selector([labels[b] for b in group])
    if merged is None:  # pragma: no cover - _target_groups made single-broker groups
        msg = f"no one selector matches the brokers {', '.join(group)}"
        raise ChaosExportError(msg)
    return merged


def _merged_selector(selectors: Sequence[Mapping[str, str]]) -> dict[str, Any] | None:
    """One pod selector for the union of several label selectors, when there is a simple
    one: all equal, or equal but for one key (``iotix.dev/broker In (a, b)``); else
    None. Two chaos on one pod do not combine, so one manifest beats one per broker."""
    first = selectors[0]
    if all(s == first for s in selectors):
        return {"labelSelectors": dict(first)}
    if any(s.keys() != first.keys() for s in selectors):
        return None
    varying = [key for key in first if any(s[key] != first[key] for s in selectors)]
    if len(varying) != 1:
        return None
    (key,) = varying
    merged: dict[str, Any] = {}
    common = {k: v for k, v in first.items() if k != key}
    if common:
        merged["labelSelectors"] = common
    values = sorted({s[key] for s in selectors})
    merged["expressionSelectors"] = [{"key": key, "operator": "In", "values": values}]
    return merged


def _overlaps(exported: Sequence[_Exported]) -> list[str]:
    """Pairs of traffic-control chaos that may land on the same device pods at once."""
    warnings = []
    for i, first in enumerate(exported):
        for second in exported[i + 1 :]:
            if (
                first.action not in _TC_ACTIONS
                or second.action not in _TC_ACTIONS
                or (first.fleet is not None and second.fleet not in (None, first.fleet))
            ):
                continue
            start_s = max(first.entry.at_s, second.entry.at_s)
            end_s = min(_end_s(first.entry), _end_s(second.entry))
            if start_s < end_s:
                warnings.append(
                    f"{first.label} and {second.label} overlap from {go_duration(start_s)} "
                    f"to {go_duration(end_s)} on the same pods: Chaos Mesh does not combine "
                    "two traffic-control chaos on one pod, so the later one may replace "
                    "the earlier while both are in force (chaos-mesh/chaos-mesh#3631)"
                )
    return warnings


def _end_s(entry: FaultEntry) -> float:
    return entry.at_s + (entry.duration_s or 0.0)


# --- names and checks ------------------------------------------------------------------


def _dns_part(text: str) -> str:
    """``text`` as a piece of a DNS-1123 label: lower case, runs of anything else as
    one '-', no '-' at either end."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _unique_name(parts: Sequence[str], limit: int, used: set[str]) -> str:
    """``scenario-index-fault[-broker]`` as a DNS-1123 label of at most ``limit``
    characters, unlike every name in ``used``: too long or taken, it is cut and ends in
    a hash of the parts."""
    base = "-".join(p for p in (_dns_part(part) for part in parts) if p)
    name = base
    if len(name) > limit or name in used:
        digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]
        name = f"{base[: limit - len(digest) - 1].rstrip('-')}-{digest}"
    if name in used:  # pragma: no cover - a hash collision between two faults
        msg = f"two faults would both be named {name!r}"
        raise ChaosExportError(msg)
    used.add(name)
    return name


def _check_namespace(namespace: str) -> None:
    if not _DNS_LABEL.fullmatch(namespace):
        raise ChaosExportError(
            f"{namespace!r} is not a Kubernetes namespace name: lower-case letters, digits "
            "and '-', starting and ending with a letter or digit, 63 characters at most",
            field="namespace",
        )


def _check_labels(labels: Mapping[str, str], field: str) -> None:
    if not labels:
        raise ChaosExportError(
            "a selector needs at least one label: an empty one selects every pod of the "
            "namespace, brokers included",
            field=field,
        )
    for key, value in labels.items():
        prefix, slash, name = key.rpartition("/")
        if (
            not _LABEL_NAME.fullmatch(name)
            or (slash and not (len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix)))
            or not _LABEL_VALUE.fullmatch(value)
        ):
            raise ChaosExportError(
                f"{key}={value} is not a Kubernetes label: keys are [prefix/]name, names and "
                "values at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends",
                field=field,
            )


def _check_cron(text: str) -> str:
    """A cron expression as Chaos Mesh's Schedule takes it, normalised to single spaces."""
    cron = " ".join(text.split())
    if cron.lower() in _CRON_DESCRIPTORS:
        return cron
    fields = cron.split(" ")
    if len(fields) != len(_CRON_FIELDS):
        raise ChaosExportError(
            f"{text!r} is not a 5-field cron expression (minute hour day-of-month month "
            "day-of-week, such as '0 3 * * *') nor one of " + ", ".join(sorted(_CRON_DESCRIPTORS)),
            field="schedule",
        )
    for value, (what, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for part in value.split(","):
            if not _cron_part_ok(part, low, high, names, question=what.startswith("day")):
                raise ChaosExportError(
                    f"{value!r} is not a valid cron {what} field (allowed: {low}-{high}, *, "
                    "lists with ',', ranges with '-', steps with '/')",
                    field="schedule",
                )
    return cron


def _cron_part_ok(part: str, low: int, high: int, names: Sequence[str], *, question: bool) -> bool:
    match = _CRON_PART.fullmatch(part)
    if match is None or (match["step"] is not None and int(match["step"]) == 0):
        return False
    if match["range"] == "?":
        return question
    if match["range"] == "*":
        return True

    def value(token: str) -> int | None:
        if token.isdigit():
            number = int(token)
            return number if low <= number <= high else None
        lowered = token.lower()
        return names.index(lowered) + low if lowered in names else None

    first = value(match["lo"])
    last = first if match["hi"] is None else value(match["hi"])
    return first is not None and last is not None and first <= last
