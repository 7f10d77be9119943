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
    """A named check; a check written as a bare string is named by its text."""

    name: str = Field(min_length=1, description="Unique within the scenario (a JUnit case).")
    check: str = Field(min_length=1, description="The condition, e.g. `e2e_latency.p99 < 200ms`.")


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


class _FaultSpec(Spec):
    """When, where and for how long a network fault applies."""

    at_s: StageDuration = Field(alias="at", description="When it starts, from the run's start.")
    duration_s: Duration | None = Field(
        default=None,
        alias="duration",
        description="How long it lasts; then it is reverted. Required, except for reset.",
    )
    broker: BrokerName | None = Field(
        default=None, description="Only the connections to this broker; default: every broker."
    )
    share: float = Field(
        default=1.0, gt=0, le=1, description="The fraction of those connections it hits."
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


FaultEntry = Annotated[
    LatencyFaultSpec
    | BandwidthFaultSpec
    | BlackholeFaultSpec
    | ResetFaultSpec
    | SlowCloseFaultSpec
    | PartitionFaultSpec
    | TargetDownFaultSpec,
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
        "target_down.",
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
        """Every check as (name, expression); a bare check is named by its text."""
        return tuple(
            (entry.strip(), entry.strip())
            if isinstance(entry, str)
            else (entry.name.strip(), entry.check.strip())
            for entry in self.checks
        )
