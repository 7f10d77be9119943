"""The scenario file: a whole run (brokers, fleets, stages, duration, checks) in one
YAML or JSON document, validated by pydantic.

These specs check what can be checked field by field: unknown keys, names, numbers in
range, durations and stage lists that parse. What needs the whole file or the disk (a
fleet's broker exists, names are unique, model files load, broker URLs parse, stage
percentages resolve against the fleets' sizes) is checked by
:func:`iotix.scenario.loader.load_scenario`, which reports every problem with its path.

Durations are written as the stages' are (``250ms``, ``30s``, ``2m``, ``1h``,
``1m30s``) or as a number of seconds; the specs hold them in seconds.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from iotix.engine.stages import StagesError, parse_duration_s, parse_stage_specs

__all__ = [
    "ActionEntry",
    "CheckSpec",
    "FleetSpec",
    "ScenarioSpec",
    "StageEntrySpec",
]

Name = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$", max_length=64)]
"""A scenario's or a fleet's name: letters, digits, ``_`` and ``-``, not a digit first."""

BrokerName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=64)]

# The duration grammar of iotix.engine.stages.parse_duration_s, for editors.
_NUMBER = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
DURATION_PATTERN = rf"^\s*(?:{_NUMBER}|(?:{_NUMBER}(?:ms|h|m|s))+)\s*$"
STAGE_DEVICES_PATTERN = rf"^\s*(?:[0-9]+|{_NUMBER}%)\s*$"
_PERCENT = re.compile(rf"{_NUMBER}%")
_WHOLE = re.compile(r"[0-9]{1,18}")


def _seconds(value: Any, *, allow_zero: bool) -> Any:
    """A duration as written (``"1m30s"``, ``45``) in seconds; other types are left to
    pydantic's own float check, so they get its usual message."""
    if isinstance(value, bool):
        # pydantic turns ValueError, not TypeError, into a validation error.
        raise ValueError(  # noqa: TRY004
            f"a duration is a number of seconds or a text such as 30s, not {value}"
        )
    if isinstance(value, str):
        try:
            value = parse_duration_s(value)
        except StagesError as exc:
            raise ValueError(str(exc)) from None
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"a duration must be finite, not {value}")
        if value < 0 or (value == 0 and not allow_zero):
            limit = "negative" if allow_zero else "zero or negative"
            raise ValueError(f"a duration must not be {limit}, not {value:g} s")
    return value


def _duration_schema(*, allow_zero: bool) -> dict[str, Any]:
    bound = {"minimum": 0} if allow_zero else {"exclusiveMinimum": 0}
    return {
        "anyOf": [
            {"type": "number", **bound},
            {"type": "string", "pattern": DURATION_PATTERN},
        ],
    }


Duration = Annotated[
    float,
    BeforeValidator(lambda v: _seconds(v, allow_zero=False)),
    WithJsonSchema(_duration_schema(allow_zero=False)),
]
"""More than zero seconds: ``30s``, ``2m``, ``1m30s``, ``250ms`` or a number of seconds."""

StageDuration = Annotated[
    float,
    BeforeValidator(lambda v: _seconds(v, allow_zero=True)),
    WithJsonSchema(_duration_schema(allow_zero=True)),
]
"""Zero seconds or more (a stage of zero seconds is a step)."""


class Spec(BaseModel):
    """Base of every scenario spec: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FleetSpec(Spec):
    """Devices of one model, connected to one of the scenario's brokers."""

    name: Name = Field(description="Unique within the scenario.")
    model: str = Field(
        min_length=1,
        description="The device model file (YAML or JSON), relative to the scenario file.",
    )
    devices: int = Field(ge=1, description="How many devices of the model.")
    broker: BrokerName | None = Field(
        default=None,
        description="A key of `brokers`; default: the only broker, if there is one.",
    )
    username: str | None = Field(
        default=None, description="User name template, e.g. `{device_id}`."
    )
    password: str | None = Field(default=None, description="Password template.")
    adapter: dict[str, Any] = Field(
        default_factory=dict,
        description="Options for the fleet's adapter when its broker is http://, coap://, "
        "kafka:// or a plugin's (method, headers, acks...; `timeout` in seconds): see "
        "docs/adapters.md.",
    )
    credentials: str | None = Field(
        default=None,
        min_length=1,
        description="A CSV file of per-device credentials, relative to the scenario file: "
        "a header with `username` and `password`, and `device_id` to match devices by id "
        "(else row N is device N).",
    )
    qos: int | None = Field(
        default=None, ge=0, le=2, description="QoS for every message (default: the model's)."
    )


class StageEntrySpec(Spec):
    """One stage: move the number of connected devices to ``devices`` over ``duration``."""

    duration_s: StageDuration = Field(
        alias="duration", description="How long the stage lasts; 0 makes it a step."
    )
    devices: Annotated[
        int | str,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "integer", "minimum": 0},
                    {"type": "string", "pattern": STAGE_DEVICES_PATTERN},
                ]
            }
        ),
    ] = Field(
        description="The target: a number of devices, or a percentage of all the scenario's "
        "devices such as `50%`."
    )

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ValueError(f"devices must not be negative, not {value}")
            return value
        if isinstance(value, str):
            text = value.strip()
            if _WHOLE.fullmatch(text):
                return int(text)
            if _PERCENT.fullmatch(text):
                if Fraction(text[:-1]) > 100:
                    raise ValueError(f"{text} is more than all the devices")
                return text
        raise ValueError(
            f"devices is a whole number (1000) or a percentage of the devices (50%), not {value!r}"
        )


class CheckSpec(Spec):
    """A named check; a check written as a bare string is named by its text. By default
    it is evaluated over the whole run; ``during``, ``after`` or ``from``/``to`` narrow
    it to a window."""

    name: str | None = Field(
        default=None, min_length=1, description="Unique within the scenario (a JUnit case)."
    )
    check: str = Field(min_length=1, description="The condition, e.g. `e2e_latency.p99 < 200ms`.")
    during: Name | None = Field(
        default=None, description="Only while this fault or action (by name) is in force."
    )
    after: Name | None = Field(
        default=None, description="Only after this fault or action (by name) has ended."
    )
    for_s: Duration | None = Field(
        default=None,
        alias="for",
        description="With `after`: how long the window lasts; default: to the run's end.",
    )
    from_s: StageDuration | None = Field(
        default=None, alias="from", description="The window's start, from the run's start."
    )
    to_s: Duration | None = Field(
        default=None, alias="to", description="The window's end, from the run's start."
    )
    abort_on_fail: bool = Field(
        default=False,
        description="Evaluate it while the run goes on, and stop the run the first time it "
        "fails (whole-run checks only).",
    )
    abort_after_s: StageDuration = Field(
        default=0.0,
        alias="abort_after",
        description="With `abort_on_fail`: do not judge before this time (let the run warm up).",
    )

    @model_validator(mode="after")
    def _one_window(self) -> CheckSpec:
        ways = [
            way
            for way, given in (
                ("during", self.during is not None),
                ("after", self.after is not None),
                ("from/to", self.from_s is not None or self.to_s is not None),
            )
            if given
        ]
        if len(ways) > 1:
            raise ValueError(f"a check has one window: {' and '.join(ways)} are both given")
        if self.for_s is not None and self.after is None:
            raise ValueError("`for` goes with `after` (how long after it the window lasts)")
        if self.from_s is not None and self.to_s is not None and self.to_s <= self.from_s:
            raise ValueError(
                f"the window ends ({self.to_s:g} s) before it starts ({self.from_s:g} s)"
            )
        if self.abort_on_fail and ways:
            raise ValueError("abort_on_fail is for whole-run checks, not windowed ones")
        return self


def _check_kind(value: Any) -> str:
    # Choose the branch up front, so that a bad check gets one error, not one per branch.
    return "named" if isinstance(value, dict | CheckSpec) else "text"


def _stages_kind(value: Any) -> str:
    return "list" if isinstance(value, list | tuple) else "text"


CheckEntry = Annotated[
    Annotated[str, Field(min_length=1), Tag("text")] | Annotated[CheckSpec, Tag("named")],
    Discriminator(_check_kind),
]

Stages = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[StageEntrySpec], Field(min_length=1), Tag("list")],
    Discriminator(_stages_kind),
]


def _share(value: Any) -> Any:
    """A share written as a fraction (``0.25``) or a percentage (``"25%"``), as a
    fraction; pydantic's bounds then check it is in (0, 1]."""
    if isinstance(value, str):
        text = value.strip()
        if _PERCENT.fullmatch(text):
            return float(Fraction(text[:-1]) / 100)
        raise ValueError(f"a share is a fraction (0.25) or a percentage (25%), not {value!r}")
    return value


Share = Annotated[
    float,
    BeforeValidator(_share),
    Field(gt=0, le=1),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                {"type": "string", "pattern": rf"^\s*{_NUMBER}%\s*$"},
            ]
        }
    ),
]
"""The part of a group something applies to: ``0.25`` or ``25%``, more than 0, at most all."""


class _FaultSpec(Spec):
    """When, where and for how long a network fault applies."""

    name: Name | None = Field(
        default=None,
        description="What checks call it (`during: NAME`); default: its kind, numbered "
        "when several faults share one.",
    )
    at_s: StageDuration = Field(alias="at", description="When it starts, from the run's start.")
    duration_s: Duration | None = Field(
        default=None,
        alias="duration",
        description="How long it lasts; then it is reverted. Required, except for reset.",
    )
    broker: BrokerName | None = Field(
        default=None, description="Only the connections to this broker; default: every broker."
    )
    fleet: Name | None = Field(
        default=None, description="Only this fleet's connections; default: every fleet."
    )
    share: Share = Field(
        default=1.0, description="The part of those connections it hits: 0.25 or 25%."
    )

    @model_validator(mode="after")
    def _duration_given(self) -> _FaultSpec:
        kind = getattr(self, "kind", "")
        if kind == "reset" and self.duration_s is not None:
            raise ValueError("a reset happens once: it has no duration")
        if kind != "reset" and self.duration_s is None:
            raise ValueError(f"a {kind} fault needs a duration (it is reverted after it)")
        return self


class LatencyFaultSpec(_FaultSpec):
    """Every chunk of data, both ways, delayed by ``delay`` ± ``jitter``."""

    kind: Literal["latency"]
    delay_s: Duration = Field(alias="delay")
    jitter_s: StageDuration = Field(default=0.0, alias="jitter")


class BandwidthFaultSpec(_FaultSpec):
    """Each connection capped at ``bytes_per_s`` each way."""

    kind: Literal["bandwidth"]
    bytes_per_s: int = Field(gt=0)


class BlackholeFaultSpec(_FaultSpec):
    """Nothing forwarded either way; the connections stay open (a stall)."""

    kind: Literal["blackhole"]


class ResetFaultSpec(_FaultSpec):
    """The connections reset at once (a one-shot; devices reconnect)."""

    kind: Literal["reset"]


class SlowCloseFaultSpec(_FaultSpec):
    """A close from either side passed on ``delay`` late."""

    kind: Literal["slow_close"]
    delay_s: Duration = Field(alias="delay")


class PartitionFaultSpec(_FaultSpec):
    """The connections cut off (blackholed) and new ones refused."""

    kind: Literal["partition"]


class TargetDownFaultSpec(_FaultSpec):
    """The broker unreachable: connections reset, new ones refused."""

    kind: Literal["target_down"]


class LossFaultSpec(_FaultSpec):
    """UDP fleets (CoAP): each datagram, either way, lost with ``probability``."""

    kind: Literal["loss"]
    probability: float = Field(gt=0, le=1)


class DuplicateFaultSpec(_FaultSpec):
    """UDP fleets: each datagram delivered twice with ``probability``."""

    kind: Literal["duplicate"]
    probability: float = Field(gt=0, le=1)


class ReorderFaultSpec(_FaultSpec):
    """UDP fleets: each datagram held back ``delay`` with ``probability``, so that later
    ones overtake it."""

    kind: Literal["reorder"]
    probability: float = Field(gt=0, le=1)
    delay_s: Duration = Field(alias="delay")


UDP_ONLY_FAULTS = frozenset({"loss", "duplicate", "reorder"})
"""Fault kinds only a datagram proxy applies."""

TCP_ONLY_FAULTS = frozenset({"bandwidth", "reset", "slow_close"})
"""Fault kinds about streams and connections, which datagrams do not have."""

FaultEntry = Annotated[
    LatencyFaultSpec
    | BandwidthFaultSpec
    | BlackholeFaultSpec
    | ResetFaultSpec
    | SlowCloseFaultSpec
    | PartitionFaultSpec
    | TargetDownFaultSpec
    | LossFaultSpec
    | DuplicateFaultSpec
    | ReorderFaultSpec,
    Field(discriminator="kind"),
]


class _ActionSpec(Spec):
    """When an action happens: at a time, on a condition, or on a condition from a time."""

    name: Name | None = Field(
        default=None,
        description="What checks call it (`after: NAME`); default: its kind, numbered when "
        "several actions share one.",
    )
    at_s: StageDuration | None = Field(
        default=None,
        alias="at",
        description="When it happens, from the run's start; with `when`, the earliest time.",
    )
    when: str | None = Field(
        default=None,
        min_length=1,
        description="A condition in the checks' language (`devices_connected >= 1000`): the "
        "action happens the first time it holds.",
    )

    @model_validator(mode="after")
    def _timed(self) -> _ActionSpec:
        if self.at_s is None and self.when is None:
            raise ValueError("an action needs `at` (a time), `when` (a condition), or both")
        return self


class _DeviceActionSpec(_ActionSpec):
    """An action on devices: all of a fleet's, or a share of them."""

    fleet: Name | None = Field(
        default=None, description="The devices' fleet; default: every fleet."
    )
    share: Share = Field(
        default=1.0,
        description="The part of the fleet's devices: 0.25 or 25%; the same share picks the "
        "same devices in every action (nested: 10% are among 50%).",
    )


class DisconnectActionSpec(_DeviceActionSpec):
    """Connections closed by the devices; they come back after ``offline``."""

    kind: Literal["disconnect"]
    offline_s: StageDuration = Field(
        default=0.0,
        alias="offline",
        description="How long the devices stay away; 0: they reconnect at once, with backoff.",
    )
    clean: bool = Field(
        default=False,
        description="Send DISCONNECT (the broker drops the wills); default: just close the "
        "socket, as a device that loses power (the broker sends the wills).",
    )


class ReconnectStormActionSpec(_DeviceActionSpec):
    """Every selected device drops its connection and reconnects at once, no backoff."""

    kind: Literal["reconnect_storm"]


class CommandActionSpec(_DeviceActionSpec):
    """A command sent to the devices on their command topic; their replies are timed."""

    kind: Literal["command"]
    command: str = Field(min_length=1, description="A command of the fleet's model.")
    payload: dict[str, Any] = Field(default_factory=dict, description="The command's JSON body.")
    timeout_s: Duration = Field(
        default=10.0, alias="timeout", description="A reply later than this counts as timed out."
    )


class SetActionSpec(_DeviceActionSpec):
    """A field of the model set on the devices, as a command's `set` would."""

    kind: Literal["set"]
    field: str = Field(
        min_length=1, description="A constant, counter or random_walk field of the model."
    )
    value: float | int | bool | str = Field(description="Its new value.")


class _BrokerActionSpec(_ActionSpec):
    """An action on a broker endpoint, as the devices see it (through the run's proxy)."""

    broker: BrokerName = Field(description="A key of `brokers`.")
    fleet: Name | None = Field(
        default=None, description="Only this fleet's view of the broker; default: every fleet's."
    )


class RestartBrokerActionSpec(_BrokerActionSpec):
    """The broker endpoint goes down (connections reset, new ones refused) and comes back."""

    kind: Literal["restart_broker"]
    down_for_s: Duration = Field(alias="down_for", description="How long it stays down.")


class FailoverActionSpec(_BrokerActionSpec):
    """The endpoint's traffic moves to another broker (a virtual address moving): the
    connections reset and the devices reconnect, to ``to``."""

    kind: Literal["failover"]
    to: BrokerName = Field(description="The broker that takes over (a key of `brokers`).")


ActionEntry = Annotated[
    DisconnectActionSpec
    | ReconnectStormActionSpec
    | CommandActionSpec
    | SetActionSpec
    | RestartBrokerActionSpec
    | FailoverActionSpec,
    Field(discriminator="kind"),
]


class ScenarioSpec(Spec):
    """A whole run: where devices connect, which devices, how many when, and the checks
    that decide the verdict."""

    name: Name = Field(description="The scenario's name, as reports show it.")
    description: str | None = None
    seed: int = Field(default=0, description="Run seed: same seed, same device behaviour.")
    brokers: dict[BrokerName, str] = Field(
        min_length=1,
        description="Named broker addresses: mqtt://host:port[,host:port...], mqtts:// for "
        "TLS, ws:// and wss:// for MQTT over WebSockets.",
    )
    fleets: list[FleetSpec] = Field(min_length=1, description="The devices; names are unique.")
    stages: Stages | None = Field(
        default=None,
        description="Connected devices over time: `10s:100%,30s:100%,5s:0` as `iotix run "
        "--stages`, or a list of {duration, devices}. Percentages are of all the fleets' "
        "devices. Default: every device from the start.",
    )
    duration_s: Duration | None = Field(
        default=None,
        alias="duration",
        description="How long the run lasts; default: the stages' total, else 60s.",
    )
    probe: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Fraction of the devices whose delivery a probe subscriber checks "
        "(loss, duplicates, end-to-end latency); default: no probe.",
    )
    checks: list[CheckEntry] = Field(
        default_factory=list,
        description="Conditions on the run's metrics; each a string, or {name, check}.",
    )
    faults: list[FaultEntry] = Field(
        default_factory=list,
        description="Network faults on a timeline, applied by a proxy between the devices "
        "and their brokers: latency, bandwidth, blackhole, reset, slow_close, partition, "
        "target_down; for UDP (CoAP) fleets also loss, duplicate, reorder.",
    )
    actions: list[ActionEntry] = Field(
        default_factory=list,
        description="Things done during the run, at a time or on a condition: disconnect, "
        "reconnect_storm, command, set, restart_broker, failover.",
    )

    @field_validator("stages", mode="after")
    @classmethod
    def _stages_parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                parse_stage_specs(value)
            except StagesError as exc:
                raise ValueError(str(exc)) from None
        return value

    def named_checks(self) -> tuple[tuple[str, str], ...]:
        """Every check as (name, expression); a check without a name is named by its text."""
        return tuple(
            (spec.check if spec.name is None else spec.name, spec.check)
            for spec in self.check_specs()
        )

    def check_specs(self) -> tuple[CheckSpec, ...]:
        """Every check as a :class:`CheckSpec`, text stripped (a bare string is one
        without a window)."""
        return tuple(
            CheckSpec.model_construct(check=entry.strip())
            if isinstance(entry, str)
            else entry.model_copy(
                update={
                    "name": None if entry.name is None else entry.name.strip(),
                    "check": entry.check.strip(),
                }
            )
            for entry in self.checks
        )
