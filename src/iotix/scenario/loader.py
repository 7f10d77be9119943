"""Loading scenario files (YAML or JSON): every problem found before anything runs.

:func:`load_scenario` parses the file with the device-model loader's line-aware parser,
validates it with :class:`~iotix.scenario.spec.ScenarioSpec`, then checks what needs the
whole file or the disk: each fleet's broker is one of ``brokers`` and its model file
loads (relative to the scenario file), names are unique, broker URLs parse, stage
percentages resolve against all the fleets' devices. Every problem becomes one
:class:`~iotix.errors.ModelIssue` of a :class:`ScenarioError`, which names the file, the
line, the field path (``fleets[1].broker``) and, where one helps, a hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from iotix.adapters.base import AdapterSettings
from iotix.adapters.registry import adapter_for
from iotix.engine.credentials import CREDENTIALS_HINT, CredentialsError, read_credentials
from iotix.engine.fleet import probe_can_follow
from iotix.engine.stages import Stage, StagesError, StageSpec, parse_stage_specs
from iotix.engine.worker import BrokerEndpoint, RunConfigError, parse_brokers
from iotix.errors import IotixError, ModelError, ModelIssue
from iotix.model.loader import LoadedModel, load_model, read_document
from iotix.model.protocols import protocol_refusal
from iotix.model.spec import SETTABLE_KINDS
from iotix.scenario.checks import (
    COMMAND_METRICS,
    PROBE_METRICS,
    STATE_METRIC,
    CheckError,
    parse_check,
)
from iotix.scenario.conductor import UDP_SCHEMES
from iotix.scenario.spec import (
    TCP_ONLY_FAULTS,
    UDP_ONLY_FAULTS,
    CheckSpec,
    CommandActionSpec,
    FailoverActionSpec,
    FleetSpec,
    RestartBrokerActionSpec,
    ScenarioSpec,
    SetActionSpec,
    StageEntrySpec,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from pydantic import BaseModel

    from iotix.scenario.spec import ActionEntry, FaultEntry

__all__ = [
    "DEFAULT_DURATION_S",
    "LoadedFleet",
    "LoadedScenario",
    "ScenarioError",
    "load_scenario",
    "load_scenario_data",
    "with_brokers",
]

PathKey = tuple[str | int, ...]
DEFAULT_DURATION_S = 60.0
"""A scenario's duration when it gives neither a duration nor stages."""

_BROKER_HINT = (
    "write mqtt://host:port[,host:port...]; mqtts:// for TLS, ws:// or wss:// for MQTT "
    "over WebSockets"
)


class ScenarioError(ModelError):
    """A scenario file is invalid; ``issues`` lists every problem found, as
    :class:`~iotix.errors.ModelError` does for a device model (a problem in a fleet's
    model appears under that fleet's path, ``fleets[0].model.fields...``)."""

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues) or "invalid scenario"


@dataclass(frozen=True)
class LoadedFleet:
    """One fleet of a scenario, resolved: its model loaded, its broker's endpoints parsed."""

    name: str
    model_path: Path
    """Absolute: the fleet's ``model`` resolved against the scenario file's directory."""
    model: LoadedModel
    devices: int
    broker: str
    """The name of the fleet's broker in the scenario's ``brokers``."""
    brokers: tuple[BrokerEndpoint, ...]
    """That broker's endpoints (as :class:`~iotix.engine.worker.RunSettings` takes them)."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    qos: int | None = None
    credentials: Path | None = None
    """A CSV file of per-device credentials (checked: it reads, its header is right)."""
    adapter: dict[str, Any] = field(default_factory=dict)
    """Options for a non-MQTT fleet's adapter (checked by building the adapter)."""
    adapter_timeout_s: float = 10.0
    adapter_retries: int = 0


@dataclass(frozen=True)
class LoadedScenario:
    """A validated scenario, with everything the run needs resolved."""

    path: Path | None
    spec: ScenarioSpec
    base_dir: Path
    """Where relative paths in the scenario point from (the scenario file's directory)."""
    fleets: tuple[LoadedFleet, ...]
    stages: tuple[Stage, ...]
    """Resolved against :attr:`devices`; empty: every device from the start."""
    duration_s: float
    checks: tuple[tuple[str, str], ...]
    """(name, expression) pairs, names unique; the expressions are not parsed here."""
    seed: int
    probe: float | None
    faults: tuple[FaultEntry, ...] = ()
    """The network faults, in the file's order (times in seconds from the run's start)."""
    actions: tuple[ActionEntry, ...] = ()
    """The actions, in the file's order."""
    fault_names: tuple[str, ...] = ()
    """Each fault's name: its own, else its kind (numbered when several share it)."""
    action_names: tuple[str, ...] = ()
    """Each action's name, likewise."""
    check_specs: tuple[CheckSpec, ...] = ()
    """The checks with their windows and abort settings, in :attr:`checks` order."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def devices(self) -> int:
        """All the fleets' devices (what stage percentages are of)."""
        return sum(fleet.devices for fleet in self.fleets)


class _Lines(Protocol):
    """What the model loader's line map offers (``parse_document``'s second value)."""

    duplicates: list[tuple[PathKey, int]]

    def line_for(self, path: PathKey) -> int | None: ...


class _NoLines:
    duplicates: list[tuple[PathKey, int]] = []  # noqa: RUF012 - never mutated

    def line_for(self, path: PathKey) -> int | None:  # noqa: ARG002 - no document, no lines
        return None


# --- pydantic's errors as issues -------------------------------------------------------


def _keys_at(path: PathKey) -> list[str]:
    """The keys a mapping at ``path`` may have, for did-you-mean hints."""
    specs: dict[PathKey, type[BaseModel]] = {
        (): ScenarioSpec,
        ("fleets",): FleetSpec,
        ("stages",): StageEntrySpec,
        ("checks",): CheckSpec,
    }
    spec = specs.get(tuple(p for p in path if isinstance(p, str)))
    if spec is None:
        return []
    return [info.alias or name for name, info in spec.model_fields.items()]


def _issue_from_pydantic(error: Any, data: Any, lines: _Lines, file: Path | None) -> ModelIssue:
    # `loc` holds the union tags and validator names too: keep the parts in the document.
    path: list[str | int] = []
    current = data
    for part in error["loc"]:
        if (isinstance(current, dict) and part in current) or (
            isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        ):
            current = current[part]
            path.append(part)
    kind = error["type"]
    problem = str(error["msg"]).removeprefix("Value error, ")
    hint = None
    if kind == "extra_forbidden":
        problem = f"unknown key {path[-1]!r}" if path else "unknown key"
        allowed = _keys_at(tuple(path[:-1]))
        close = difflib.get_close_matches(str(path[-1]), allowed, n=1) if path else []
        hint = (f"did you mean {close[0]!r}? " if close else "") + (
            f"expected one of: {', '.join(allowed)}" if allowed else ""
        )
    elif kind == "missing":
        name = error["loc"][-1]
        problem = f"missing required key {name!r}"
        path.append(name)
    elif kind == "string_pattern_mismatch":
        problem = f"{error['input']!r} is not a valid name"
        hint = "use letters, digits, '_' and '-', starting with a letter or '_'"
    key = tuple(path)
    return ModelIssue(key, problem, file=file, line=lines.line_for(key), hint=hint or None)


def _dedupe(issues: list[ModelIssue]) -> list[ModelIssue]:
    """One issue per path and problem; an unknown key whose hint names a missing sibling
    is its misspelling, so the missing key needs no issue of its own."""
    unique: dict[tuple[PathKey, str], ModelIssue] = {}
    for issue in issues:
        unique.setdefault((issue.path, issue.problem), issue)
    explained = {
        (*issue.path[:-1], issue.hint.split("'")[1])
        for issue in unique.values()
        if issue.problem.startswith("unknown key")
        and issue.hint
        and issue.hint.startswith("did you mean")
    }
    return [
        issue
        for issue in unique.values()
        if not (issue.problem.startswith("missing required key") and issue.path in explained)
    ]


# --- what needs the whole file ---------------------------------------------------------


class _Checker:
    """Collects the issues of one scenario and resolves what it can."""

    def __init__(self, spec: ScenarioSpec, file: Path | None, lines: _Lines) -> None:
        self.spec = spec
        self.file = file
        self.lines = lines
        self.issues: list[ModelIssue] = []

    def add(self, path: PathKey, problem: str, hint: str | None = None) -> None:
        self.issues.append(
            ModelIssue(path, problem, file=self.file, line=self.lines.line_for(path), hint=hint)
        )

    def brokers(self) -> dict[str, tuple[BrokerEndpoint, ...]]:
        endpoints = {}
        for name, url in self.spec.brokers.items():
            try:
                endpoints[name] = parse_brokers(url)
            except RunConfigError as exc:
                self.add(("brokers", name), str(exc), _BROKER_HINT)
        return endpoints

    def fleets(
        self, endpoints: dict[str, tuple[BrokerEndpoint, ...]], base_dir: Path
    ) -> list[LoadedFleet]:
        loaded: list[LoadedFleet] = []
        first_index: dict[str, int] = {}
        models: dict[Path, LoadedModel | ModelError] = {}
        names = list(self.spec.brokers)
        for i, fleet in enumerate(self.spec.fleets):
            if fleet.name in first_index:
                self.add(
                    ("fleets", i, "name"),
                    f"duplicate fleet name {fleet.name!r} (fleets[{first_index[fleet.name]}] "
                    "has it too)",
                    "every fleet needs its own name",
                )
            first_index.setdefault(fleet.name, i)
            broker = self._broker(i, fleet, names)
            model = self._model(i, fleet, base_dir, models)
            credentials = self._credentials(i, fleet, base_dir)
            if broker is None or model is None or broker not in endpoints:
                continue
            timeout_s, retries = self._adapter(i, fleet, endpoints[broker])
            refusal = protocol_refusal(model, str(endpoints[broker][0]))
            if refusal is not None:  # the model does not declare this broker's protocol
                self.add(("fleets", i, "broker"), str(refusal))
            loaded.append(
                LoadedFleet(
                    name=fleet.name,
                    model_path=model.path or base_dir / fleet.model,
                    model=model,
                    devices=fleet.devices,
                    broker=broker,
                    brokers=endpoints[broker],
                    username=fleet.username,
                    password=fleet.password,
                    qos=fleet.qos,
                    credentials=credentials,
                    adapter=dict(fleet.adapter),
                    adapter_timeout_s=timeout_s,
                    adapter_retries=retries,
                )
            )
        return loaded

    def _adapter(
        self, i: int, fleet: FleetSpec, endpoints: tuple[BrokerEndpoint, ...]
    ) -> tuple[float, int]:
        """A non-MQTT fleet's adapter options work (the adapter is built with them);
        returns its confirmation timeout and retries."""
        path: PathKey = ("fleets", i, "adapter")
        options = dict(fleet.adapter)
        timeout = options.pop("timeout", 10.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            self.add((*path, "timeout"), f"a timeout is a number of seconds, not {timeout!r}")
            timeout = 10.0
        retries = options.pop("retries", 0)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            self.add((*path, "retries"), f"retries is a whole number, not {retries!r}")
            retries = 0
        endpoint = endpoints[0]
        if endpoint.is_mqtt:
            if options:
                self.add(
                    path,
                    "adapter options are for http://, coap://, kafka:// and plugin brokers; "
                    "this fleet's broker is MQTT",
                )
            return float(timeout), retries
        try:
            adapter_for(endpoint.scheme)(
                endpoint, AdapterSettings(timeout_s=float(timeout), options=options)
            )
        except IotixError as exc:
            self.add(path, str(exc))
        return float(timeout), retries

    def _credentials(self, i: int, fleet: FleetSpec, base_dir: Path) -> Path | None:
        if fleet.credentials is None:
            return None
        path = Path(os.path.normpath(base_dir / Path(fleet.credentials).expanduser()))
        try:
            table = read_credentials(path)
        except CredentialsError as exc:
            self.add(("fleets", i, "credentials"), str(exc), CREDENTIALS_HINT)
            return None
        if table.by_id is None and len(table.rows) < fleet.devices:
            self.add(
                ("fleets", i, "credentials"),
                f"{path} has {len(table.rows)} rows for {fleet.devices} devices",
                "add rows, or a device_id column to match devices by id",
            )
        return path

    def _known(self, path: PathKey, value: str | None, names: Sequence[str], what: str) -> bool:
        """``value`` is None or one of ``names``; else an issue with a did-you-mean."""
        if value is None or value in names:
            return True
        close = difflib.get_close_matches(value, list(names), n=1)
        self.add(
            path,
            f"unknown {what} {value!r}",
            (f"did you mean {close[0]!r}? " if close else "")
            + f"the scenario defines: {', '.join(names)}",
        )
        return False

    def faults(self, duration_s: float) -> None:
        """A fault names a known broker and fleet, starts within the run, and does not
        overlap another of its kind on the same connections."""
        brokers = list(self.spec.brokers)
        fleets = [fleet.name for fleet in self.spec.fleets]
        faults = self.spec.faults
        for i, fault in enumerate(faults):
            self._known(("faults", i, "broker"), fault.broker, brokers, "broker")
            self._known(("faults", i, "fleet"), fault.fleet, fleets, "fleet")
            if fault.at_s >= duration_s:
                self.add(
                    ("faults", i, "at"),
                    f"the fault starts at {fault.at_s:g} s, when the run ({duration_s:g} s) "
                    "is over",
                )
            for j, earlier in enumerate(faults[:i]):
                if _overlap(earlier, fault):
                    self.add(
                        ("faults", i, "at"),
                        f"this {fault.kind} fault overlaps faults[{j}], a {earlier.kind} on "
                        f"the same connections from {earlier.at_s:g} s to "
                        f"{earlier.at_s + (earlier.duration_s or 0):g} s",
                        "merge them into one, or move one so that they follow each other",
                    )

    def transports(self, fleets: Sequence[LoadedFleet]) -> None:
        """A fault suits the transport of every fleet it reaches: datagram faults for
        UDP (CoAP) fleets, connection faults for TCP ones; Kafka fleets take none (the
        client connects to the brokers the cluster advertises, past a proxy), and UDP
        fleets cannot fail over."""
        for section, entries in (("faults", self.spec.faults), ("actions", self.spec.actions)):
            for i, entry in enumerate(entries):
                if section == "actions" and not isinstance(
                    entry, RestartBrokerActionSpec | FailoverActionSpec
                ):
                    continue
                broker = getattr(entry, "broker", None)
                reached = [
                    f
                    for f in fleets
                    if (entry.fleet is None or f.name == entry.fleet)
                    and (broker is None or f.broker == broker)
                ]
                self._transport(section, i, entry, reached)

    def _transport(
        self, section: str, i: int, entry: FaultEntry | ActionEntry, reached: list[LoadedFleet]
    ) -> None:
        schemes = {fleet.brokers[0].scheme for fleet in reached}
        udp = schemes & UDP_SCHEMES
        kind = entry.kind
        if "kafka" in schemes:
            self.add(
                (section, i),
                f"a {kind} cannot reach a Kafka fleet: its client connects to the brokers "
                "the cluster advertises, past the fault proxy",
                "give the fault a fleet: or a broker: that is not Kafka",
            )
        elif kind in UDP_ONLY_FAULTS and schemes - UDP_SCHEMES:
            self.add(
                (section, i, "kind"),
                f"{kind} is a fault for datagrams: it reaches fleets that use TCP "
                f"({', '.join(sorted(schemes - UDP_SCHEMES))})",
                "give it the fleet: of a coap:// fleet",
            )
        elif (kind in TCP_ONLY_FAULTS or kind == "failover") and udp:
            self.add(
                (section, i, "kind"),
                f"{kind} is about connections, and it reaches a UDP fleet ({', '.join(udp)})",
                "for CoAP fleets use latency, blackhole, partition, loss, duplicate, reorder",
            )

    def actions(self, fleets: Sequence[LoadedFleet], duration_s: float) -> None:
        """An action names known fleets, brokers, commands and fields, and its condition
        is a check expression."""
        brokers = list(self.spec.brokers)
        by_name = {fleet.name: fleet for fleet in fleets}
        fleet_names = [fleet.name for fleet in self.spec.fleets]
        for i, action in enumerate(self.spec.actions):
            at: PathKey = ("actions", i)
            if action.at_s is not None and action.at_s >= duration_s:
                self.add(
                    (*at, "at"),
                    f"the action is at {action.at_s:g} s, when the run ({duration_s:g} s) is over",
                )
            if action.when is not None:
                try:
                    metric = parse_check(action.when).metric
                except CheckError as exc:
                    self.add((*at, "when"), str(exc))
                else:
                    self.state_metric((*at, "when"), metric, fleets)
            if not self._known((*at, "fleet"), action.fleet, fleet_names, "fleet"):
                continue
            if isinstance(action, RestartBrokerActionSpec | FailoverActionSpec):
                self._known((*at, "broker"), action.broker, brokers, "broker")
                if (
                    isinstance(action, FailoverActionSpec)
                    and self._known((*at, "to"), action.to, brokers, "broker")
                    and action.to == action.broker
                ):
                    self.add((*at, "to"), "a broker cannot fail over to itself")
                continue
            targets = [by_name[action.fleet]] if action.fleet else list(fleets)
            if isinstance(action, CommandActionSpec):
                for fleet in targets:
                    self._command(at, action, fleet)
            elif isinstance(action, SetActionSpec):
                for fleet in targets:
                    self._settable(at, action, fleet)

    def _command(self, at: PathKey, action: CommandActionSpec, fleet: LoadedFleet) -> None:
        commands = fleet.model.spec.commands
        if commands is None:
            self.add(
                (*at, "command"),
                f"fleet {fleet.name!r}: its model {fleet.model.spec.name!r} takes no commands",
                "add a commands section to the model, or send the command to another fleet",
            )
        elif action.command not in commands.handlers:
            self._known(
                (*at, "command"),
                action.command,
                list(commands.handlers),
                f"command for fleet {fleet.name!r} (its model handles)",
            )

    def _settable(self, at: PathKey, action: SetActionSpec, fleet: LoadedFleet) -> None:
        fields = fleet.model.spec.fields
        spec = fields.get(action.field)
        if spec is None:
            self._known(
                (*at, "field"), action.field, list(fields), f"field of fleet {fleet.name!r}"
            )
        elif spec.kind not in SETTABLE_KINDS:
            self.add(
                (*at, "field"),
                f"fleet {fleet.name!r}: {action.field} is a {spec.kind} field, which cannot be set",
                f"only {', '.join(SETTABLE_KINDS)} fields take a new value",
            )

    def timeline(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The names of the faults and the actions (given, or the kind, numbered when
        several share it); two of one name are an issue."""
        entries = [("faults", i, f) for i, f in enumerate(self.spec.faults)] + [
            ("actions", i, a) for i, a in enumerate(self.spec.actions)
        ]
        kinds = [entry.kind for _, _, entry in entries if entry.name is None]
        seen: dict[str, int] = {}
        names: list[str] = []
        first: dict[str, str] = {}
        for section, i, entry in entries:
            name = entry.name
            if name is None:
                name = entry.kind
                if kinds.count(entry.kind) > 1:
                    seen[entry.kind] = seen.get(entry.kind, 0) + 1
                    name = f"{entry.kind}-{seen[entry.kind]}"
            where = f"{section}[{i}]"
            if name in first:
                self.add(
                    (section, i, "name"),
                    f"duplicate name {name!r} ({first[name]} has it too)",
                    "name faults and actions apart: checks refer to them by name",
                )
            first.setdefault(name, where)
            names.append(name)
        count = len(self.spec.faults)
        return tuple(names[:count]), tuple(names[count:])

    def windows(self, specs: Sequence[CheckSpec], names: Sequence[str]) -> None:
        """A check's ``during`` and ``after`` name a fault or an action; ``during`` one
        that lasts."""
        lasting = {
            name
            for name, entry in zip(names, [*self.spec.faults, *self.spec.actions], strict=True)
            if getattr(entry, "duration_s", None)
            or getattr(entry, "down_for_s", None)
            or getattr(entry, "offline_s", None)
        }
        for i, spec in enumerate(specs):
            if (
                spec.during is not None
                and self._known(("checks", i, "during"), spec.during, names, "fault or action")
                and spec.during not in lasting
            ):
                self.add(
                    ("checks", i, "during"),
                    f"{spec.during!r} happens at one instant: there is no 'during'",
                    f"write after: {spec.during} (with for: 30s, say)",
                )
            self._known(("checks", i, "after"), spec.after, names, "fault or action")
            windowed = spec.during or spec.after or spec.from_s is not None or spec.to_s is not None
            if not (windowed or spec.abort_on_fail):
                continue
            try:
                metric = parse_check(spec.check).metric
            except CheckError:
                continue  # said by checks()
            if windowed and metric in PROBE_METRICS | COMMAND_METRICS:
                whose = "the probe's" if metric in PROBE_METRICS else "the commands'"
                self.add(
                    ("checks", i, "check"),
                    f"{metric} is {whose} figure over the whole run: it has no value over a window",
                    "check it over the whole run; e2e_latency and the engine's figures take "
                    "windows",
                )
            if spec.abort_on_fail and metric in PROBE_METRICS | COMMAND_METRICS:
                self.add(
                    ("checks", i, "abort_on_fail"),
                    f"{metric} is known only at the end of the run: it cannot abort it",
                    "abort on the engine's figures (connects, errors, latencies)",
                )

    def _broker(self, i: int, fleet: FleetSpec, names: list[str]) -> str | None:
        if fleet.broker is None:
            if len(names) == 1:
                return names[0]
            self.add(
                ("fleets", i, "broker"),
                f"the scenario has {len(names)} brokers, so each fleet names its broker",
                f"add broker: one of {', '.join(names)}",
            )
            return None
        if fleet.broker not in self.spec.brokers:
            close = difflib.get_close_matches(fleet.broker, names, n=1)
            self.add(
                ("fleets", i, "broker"),
                f"unknown broker {fleet.broker!r}",
                (f"did you mean {close[0]!r}? " if close else "")
                + f"brokers defines: {', '.join(names)}",
            )
            return None
        return fleet.broker

    def _model(
        self,
        i: int,
        fleet: FleetSpec,
        base_dir: Path,
        models: dict[Path, LoadedModel | ModelError],
    ) -> LoadedModel | None:
        path = ("fleets", i, "model")
        # normpath, not resolve(): collapse `..` without following symbolic links.
        model_path = Path(os.path.normpath(base_dir / Path(fleet.model).expanduser()))
        if not model_path.is_file():
            what = "is not a file" if model_path.exists() else "does not exist"
            self.add(
                path,
                f"model file {str(model_path)!r} {what}",
                f"model paths are relative to the scenario file's directory, {base_dir}",
            )
            return None
        if model_path not in models:
            try:
                models[model_path] = load_model(model_path)
            except ModelError as exc:
                models[model_path] = exc
        model = models[model_path]
        if isinstance(model, LoadedModel):
            return model
        line = self.lines.line_for(path)
        for issue in model.issues:
            where = str(issue.file or model_path)
            if issue.line is not None:
                where += f":{issue.line}"
            self.issues.append(
                ModelIssue(
                    (*path, *issue.path),
                    f"{issue.problem} (in the model {where})",
                    file=self.file,
                    line=line,
                    hint=issue.hint,
                )
            )
        return None

    def stages(self, devices: int) -> tuple[Stage, ...]:
        written = self.spec.stages
        if written is None:
            return ()
        try:
            if isinstance(written, str):
                specs: Sequence[StageSpec] = parse_stage_specs(written)
            else:
                specs = [_stage_spec(entry) for entry in written]
            return tuple(spec.resolve(devices) for spec in specs)
        except StagesError as exc:
            self.add(("stages",), str(exc), "write DURATION:DEVICES,... such as 10s:100%,30s:0")
        return ()

    def duration_s(self, stages: tuple[Stage, ...]) -> float:
        if self.spec.duration_s is not None:
            return self.spec.duration_s
        if not stages:
            return DEFAULT_DURATION_S
        total_s = sum(stage.duration_s for stage in stages)  # as StagePlan adds them
        if total_s <= 0:
            self.add(
                ("stages",),
                "the stages last 0 s in all, and there is no duration to run for",
                "give the stages a duration, or add duration: 60s",
            )
        return total_s

    def state_metric(self, path: PathKey, metric: str, fleets: Sequence[LoadedFleet]) -> None:
        """A ``state.F.S`` metric names a fleet of the scenario and a state of its model."""
        match = STATE_METRIC.fullmatch(metric)
        if match is None:
            return
        by_name = {fleet.name: fleet for fleet in fleets}
        fleet = by_name.get(match["fleet"])
        if fleet is None:
            if match["fleet"] not in {f.name for f in self.spec.fleets}:
                self._known(path, match["fleet"], list(by_name), "fleet")
            return
        machine = fleet.model.spec.states
        states = list(machine.states) if machine is not None else ["default"]
        if match["state"] not in states:
            self._known(path, match["state"], states, f"state of fleet {fleet.name!r}")

    def checks(self, fleets: Sequence[LoadedFleet] = ()) -> tuple[tuple[str, str], ...]:
        named = self.spec.named_checks()
        first_index: dict[str, int] = {}
        for i, ((name, expression), entry) in enumerate(zip(named, self.spec.checks, strict=True)):
            at: PathKey = ("checks", i) if isinstance(entry, str) else ("checks", i, "name")
            if not name or not expression:
                blank = at if isinstance(entry, str) or not name else ("checks", i, "check")
                self.add(blank, "empty check")
            elif name in first_index:
                self.add(
                    at,
                    f"duplicate check name {name!r} (checks[{first_index[name]}] has it too)",
                    "name the checks apart: {name: ..., check: ...}",
                )
            else:
                where: PathKey = ("checks", i) if isinstance(entry, str) else ("checks", i, "check")
                try:
                    metric = parse_check(expression, name).metric
                except CheckError as exc:
                    self.add(where, str(exc))  # it names close metrics itself
                else:
                    self.state_metric(where, metric, fleets)
            first_index.setdefault(name, i)
        return named


def _overlap(first: FaultEntry, second: FaultEntry) -> bool:
    """Two faults of one kind on the same connections at the same time (which of them
    counts would be anybody's guess)."""
    if first.kind != second.kind or first.duration_s is None or second.duration_s is None:
        return False
    if first.broker and second.broker and first.broker != second.broker:
        return False
    if first.fleet and second.fleet and first.fleet != second.fleet:
        return False
    return (
        first.at_s < second.at_s + second.duration_s and second.at_s < first.at_s + first.duration_s
    )


def _stage_spec(entry: StageEntrySpec) -> StageSpec:
    text = f"{entry.duration_s:g}s:{entry.devices}"
    if isinstance(entry.devices, int):
        return StageSpec(entry.duration_s, devices=entry.devices, text=text)
    return StageSpec(entry.duration_s, percent=Fraction(entry.devices.strip()[:-1]), text=text)


# --- entry points ----------------------------------------------------------------------


def load_scenario_data(
    data: Any,
    *,
    file: Path | None = None,
    base_dir: Path | None = None,
    lines: Any = None,
) -> LoadedScenario:
    """Validate already-parsed scenario data (from YAML, JSON or an API request).

    Model paths resolve against ``base_dir``: by default the file's directory, else the
    working directory. Raises :class:`ScenarioError` listing every problem.
    """
    line_map: _Lines = lines if lines is not None else _NoLines()
    issues = [
        ModelIssue(path, "duplicate key (the later value would win)", file=file, line=line)
        for path, line in line_map.duplicates
    ]
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        issues.append(
            ModelIssue((), f"a scenario is a mapping, but this is {kind}", file=file, line=1)
        )
        raise ScenarioError(issues)
    try:
        spec = ScenarioSpec.model_validate(data)
    except ValidationError as exc:
        issues += [_issue_from_pydantic(e, data, line_map, file) for e in exc.errors()]
        raise ScenarioError(_dedupe(issues)) from exc
    if base_dir is None:
        base_dir = file.parent if file is not None else Path.cwd()
    base_dir = Path(os.path.normpath(base_dir.absolute()))
    checker = _Checker(spec, file, line_map)
    checker.issues += issues
    endpoints = checker.brokers()
    fleets = checker.fleets(endpoints, base_dir)
    stages = checker.stages(sum(fleet.devices for fleet in spec.fleets))
    duration_s = checker.duration_s(stages)
    checks = checker.checks(fleets)
    checker.faults(duration_s)
    checker.transports(fleets)
    checker.actions(fleets, duration_s)
    if (
        spec.probe is not None
        and fleets
        and not any(probe_can_follow(f.brokers[0]) for f in fleets)
    ):
        checker.add(
            ("probe",),
            "the probe follows MQTT and Kafka devices, and no fleet of this scenario uses either",
            "remove probe:, or add an MQTT or Kafka fleet (see docs/scenarios.md)",
        )
    fault_names, action_names = checker.timeline()
    check_specs = spec.check_specs()
    checker.windows(check_specs, [*fault_names, *action_names])
    if checker.issues:
        raise ScenarioError(checker.issues)
    return LoadedScenario(
        path=file,
        spec=spec,
        base_dir=base_dir,
        fleets=tuple(fleets),
        stages=stages,
        duration_s=duration_s,
        checks=checks,
        seed=spec.seed,
        probe=spec.probe,
        faults=tuple(spec.faults),
        actions=tuple(spec.actions),
        fault_names=fault_names,
        action_names=action_names,
        check_specs=check_specs,
    )


def with_brokers(scenario: LoadedScenario, urls: Mapping[str, str]) -> LoadedScenario:
    """``scenario`` with some of its named brokers at other addresses (``iotix run
    --broker-for NAME=URL``). Raises :class:`ScenarioError` for an unknown name or an
    address that does not parse."""
    issues = []
    parsed: dict[str, tuple[BrokerEndpoint, ...]] = {}
    for name, url in urls.items():
        if name not in scenario.spec.brokers:
            close = difflib.get_close_matches(name, list(scenario.spec.brokers), n=1)
            issues.append(
                ModelIssue(
                    ("brokers", name),
                    f"--broker-for names {name!r}, which the scenario does not define",
                    hint=(f"did you mean {close[0]!r}? " if close else "")
                    + f"brokers defines: {', '.join(scenario.spec.brokers)}",
                )
            )
            continue
        try:
            parsed[name] = parse_brokers(url)
        except RunConfigError as exc:
            issues.append(ModelIssue(("brokers", name), str(exc), hint=_BROKER_HINT))
    for fleet in scenario.fleets:  # a model must declare its new broker's protocol
        if fleet.broker in parsed:
            refusal = protocol_refusal(fleet.model, str(parsed[fleet.broker][0]))
            if refusal is not None:
                issues.append(ModelIssue(("brokers", fleet.broker), str(refusal)))
    if issues:
        raise ScenarioError(issues)
    spec = scenario.spec.model_copy(update={"brokers": {**scenario.spec.brokers, **urls}})
    fleets = tuple(
        dataclasses.replace(fleet, brokers=parsed.get(fleet.broker, fleet.brokers))
        for fleet in scenario.fleets
    )
    return dataclasses.replace(scenario, spec=spec, fleets=fleets)


def load_scenario(path: Path | str) -> LoadedScenario:
    """Load and validate one scenario file (YAML or JSON), and every model it names.

    Raises :class:`ScenarioError` listing every problem, each with the file, the line,
    the field path and a hint.
    """
    file = Path(path)
    try:
        data, lines = read_document(file, what="scenarios")
    except ModelError as exc:  # missing, unreadable, or a syntax error, located
        raise ScenarioError(exc.issues) from exc
    return load_scenario_data(data, file=file, lines=lines)
