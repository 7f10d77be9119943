"""The device-model language: pydantic specs, loaded from YAML or JSON.

A model describes one kind of device; a fleet runs many devices of it, each with its own
index. Every spec forbids unknown keys, and every union is discriminated by a ``kind``
field, so a typo is an error with a path instead of a silently ignored setting.

Numbers that describe a device (a baseline, a period, a speed) may be written either as
a plain number or as a distribution (``{kind: uniform, low: 18, high: 24}``): the value
is then drawn once per device, deterministically from the run seed and the device index.

Cross-references (fields named by messages, names used in expressions, states named by
transitions) are checked after parsing by :mod:`iotix.model.check`, which reports every
problem with its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from iotix.payload.spec import JSONPayloadSpec, PayloadSpec

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class Spec(BaseModel):
    """Base of every spec: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- per-device distributions -------------------------------------------------------


class UniformSpec(Spec):
    """A value drawn uniformly from [low, high)."""

    kind: Literal["uniform"]
    low: float
    high: float
    round: int | None = Field(default=None, ge=0, le=12, description="Decimals to keep.")

    @model_validator(mode="after")
    def _ordered(self) -> UniformSpec:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must not be below low ({self.low})")
        return self


class GaussianSpec(Spec):
    """A normally distributed value, optionally clipped to [min, max]."""

    kind: Literal["gaussian"]
    mean: float
    stddev: float = Field(ge=0)
    min: float | None = None
    max: float | None = None
    round: int | None = Field(default=None, ge=0, le=12)

    @model_validator(mode="after")
    def _ordered(self) -> GaussianSpec:
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must not be below min ({self.min})")
        return self


class ChoiceSpec(Spec):
    """One of ``values``, optionally weighted."""

    kind: Literal["choice"]
    values: list[Any] = Field(min_length=1)
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _weights_match(self) -> ChoiceSpec:
        if self.weights is not None:
            if len(self.weights) != len(self.values):
                raise ValueError(
                    f"weights has {len(self.weights)} entries but values has {len(self.values)}"
                )
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("weights must be non-negative and not all zero")
        return self


Distribution = Annotated[UniformSpec | GaussianSpec | ChoiceSpec, Field(discriminator="kind")]
Number = float | Distribution
"""A plain number, or a distribution drawn once per device."""


# --- telemetry field generators -----------------------------------------------------


class FieldBase(Spec):
    """What every telemetry field may carry besides its generator."""

    unit: str | None = Field(default=None, description="Unit, shown in previews and docs.")
    description: str | None = None


class NumericFieldBase(FieldBase):
    round: int | None = Field(default=None, ge=0, le=12, description="Decimals to keep.")


class ConstantFieldSpec(FieldBase):
    """The same value on every sample; a distribution gives each device its own."""

    kind: Literal["constant"]
    value: Annotated[Distribution | Any, Field(union_mode="left_to_right")]


class CounterFieldSpec(NumericFieldBase):
    """A counter that grows by ``step`` per sample and wraps to ``start`` past ``wrap_at``."""

    kind: Literal["counter"]
    start: Number = 0
    step: Number = 1
    wrap_at: float | None = None


class UniformFieldSpec(NumericFieldBase):
    kind: Literal["uniform"]
    low: Number
    high: Number


class GaussianFieldSpec(NumericFieldBase):
    kind: Literal["gaussian"]
    mean: Number
    stddev: Number
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> GaussianFieldSpec:
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must not be below min ({self.min})")
        return self


class RandomWalkFieldSpec(NumericFieldBase):
    """A bounded random walk: each sample adds a gaussian step of ``step`` stddev.

    With ``reversion`` > 0 the value is also pulled towards ``mean`` by that fraction of
    the distance per sample (an Ornstein-Uhlenbeck walk), which keeps it realistic.
    """

    kind: Literal["random_walk"]
    start: Number
    step: Number = Field(description="Standard deviation of one step.")
    min: float | None = None
    max: float | None = None
    mean: Number | None = None
    reversion: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> RandomWalkFieldSpec:
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must not be below min ({self.min})")
        if self.reversion > 0 and self.mean is None:
            raise ValueError("reversion needs a mean to pull towards")
        return self


class WaveFieldSpec(NumericFieldBase):
    """A periodic wave: offset + amplitude * shape((t + phase_s) / period_s) + noise."""

    kind: Literal["wave"]
    shape: Literal["sine", "square", "sawtooth", "triangle"] = "sine"
    period_s: Number
    amplitude: Number = 1.0
    offset: Number = 0.0
    phase_s: Number = 0.0
    noise: Number = Field(default=0.0, description="Stddev of gaussian noise per sample.")
    time_base: Literal["run", "wall"] = Field(
        default="run",
        description="run: t=0 at the run start; wall: t=0 at the Unix epoch (UTC), so a "
        "daily wave peaks at the same time of day whatever the start.",
    )


class WeightedChoiceFieldSpec(FieldBase):
    """One of ``values`` per sample, optionally weighted."""

    kind: Literal["choice"]
    values: list[Any] = Field(min_length=1)
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _weights_match(self) -> WeightedChoiceFieldSpec:
        ChoiceSpec(kind="choice", values=self.values, weights=self.weights)
        return self


class BooleanFieldSpec(FieldBase):
    """True with ``probability`` per sample."""

    kind: Literal["boolean"]
    probability: Number = Field(default=0.5)


class TimestampFieldSpec(FieldBase):
    """The sample's wall-clock time (run start + virtual time)."""

    kind: Literal["timestamp"]
    format: Literal["epoch_s", "epoch_ms", "iso8601"] = "epoch_ms"


class UUIDFieldSpec(FieldBase):
    """A random (version 4) UUID, deterministic from the seed; new per sample or per device."""

    kind: Literal["uuid"]
    per: Literal["sample", "device"] = "sample"


class TemplateFieldSpec(FieldBase):
    """A string built with Python format syntax over other names: ``"SN-{index:06d}"``."""

    kind: Literal["template"]
    template: str


class LatLonSpec(Spec):
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)


class GPSAreaFieldSpec(FieldBase):
    """A position inside a circle: fixed per device, optionally jittering per sample."""

    kind: Literal["gps_area"]
    center: LatLonSpec
    radius_m: float = Field(gt=0)
    jitter_m: float = Field(default=0.0, ge=0)


class GPSRouteFieldSpec(FieldBase):
    """A position moving along waypoints at ``speed_mps``, with heading.

    ``routes`` holds one or more routes; each device follows one (chosen by
    ``route_weights`` or evenly) and starts at its own ``start_fraction`` of it.
    """

    kind: Literal["gps_route"]
    routes: list[list[LatLonSpec]] = Field(min_length=1)
    route_weights: list[float] | None = None
    speed_mps: Number
    start_fraction: Number = Field(default=0.0)
    loop: bool = Field(default=True, description="Loop back to the start, else turn around.")

    @field_validator("routes")
    @classmethod
    def _two_points(cls, routes: list[list[LatLonSpec]]) -> list[list[LatLonSpec]]:
        for number, route in enumerate(routes):
            if len(route) < 2:
                raise ValueError(f"route {number} needs at least two waypoints")
        return routes


class ReplayFieldSpec(FieldBase):
    """Values replayed from a column of a CSV file.

    Without ``time_column`` each sample takes the next row. With it, the value is the
    row in force at the sample's time (``time_warp`` x faster than recorded). Paths are
    relative to the model file.
    """

    kind: Literal["replay"]
    file: Path
    column: str
    time_column: str | None = None
    time_warp: float = Field(default=1.0, gt=0)
    loop: bool = True
    stagger: bool = Field(default=True, description="Start each device at its own row.")


class ExpressionFieldSpec(NumericFieldBase):
    """A value derived from other fields, attributes, state and time."""

    kind: Literal["expression"]
    expr: str = Field(min_length=1)


FieldSpec = Annotated[
    ConstantFieldSpec
    | CounterFieldSpec
    | UniformFieldSpec
    | GaussianFieldSpec
    | RandomWalkFieldSpec
    | WaveFieldSpec
    | WeightedChoiceFieldSpec
    | BooleanFieldSpec
    | TimestampFieldSpec
    | UUIDFieldSpec
    | TemplateFieldSpec
    | GPSAreaFieldSpec
    | GPSRouteFieldSpec
    | ReplayFieldSpec
    | ExpressionFieldSpec,
    Field(discriminator="kind"),
]

SETTABLE_KINDS = frozenset({"constant", "counter", "random_walk"})
"""Field kinds whose value a command may set."""


# --- attributes ---------------------------------------------------------------------


class ExpressionAttributeSpec(Spec):
    kind: Literal["expression"]
    expr: str = Field(min_length=1)


class TemplateAttributeSpec(Spec):
    kind: Literal["template"]
    template: str


AttributeSpec = (
    Annotated[
        UniformSpec | GaussianSpec | ChoiceSpec | ExpressionAttributeSpec | TemplateAttributeSpec,
        Field(discriminator="kind"),
    ]
    | str
    | bool
    | int
    | float
)


# --- schedules ----------------------------------------------------------------------


class IntervalScheduleSpec(Spec):
    """Every ``interval_s``, each send moved by up to ± ``jitter_s`` without drifting."""

    kind: Literal["interval"]
    interval_s: Number
    jitter_s: float = Field(default=0.0, ge=0)
    start: Literal["spread", "aligned"] = Field(
        default="spread", description="spread: first sends spread over one interval."
    )


class PoissonScheduleSpec(Spec):
    """Sends at random, ``rate_hz`` on average (exponential gaps)."""

    kind: Literal["poisson"]
    rate_hz: Number


class BurstScheduleSpec(Spec):
    """Every ``every_s``, a burst of ``count`` sends ``spacing_s`` apart."""

    kind: Literal["burst"]
    every_s: Number
    count: int = Field(ge=1, le=10_000)
    spacing_s: float = Field(ge=0)
    start: Literal["spread", "aligned"] = "spread"


class OnChangeScheduleSpec(Spec):
    """Sample every ``sample_interval_s``; send when a watched field moved past its deadband
    since the last send, and at least every ``max_interval_s`` (a heartbeat)."""

    kind: Literal["on_change"]
    sample_interval_s: float = Field(gt=0)
    deadband: float | dict[str, float] = 0.0
    watch: list[str] | None = Field(default=None, description="Default: the message's fields.")
    max_interval_s: float | None = Field(default=None, gt=0)


ScheduleSpec = Annotated[
    IntervalScheduleSpec | PoissonScheduleSpec | BurstScheduleSpec | OnChangeScheduleSpec,
    Field(discriminator="kind"),
]


# --- messages, events, states, commands ---------------------------------------------


class MessageSpec(Spec):
    """A message type: where it goes, when, and what it carries."""

    topic: str | None = Field(
        default=None,
        description="Topic or path template; default devices/{device_id}/{message}.",
    )
    schedule: ScheduleSpec
    fields: list[str] | None = Field(default=None, description="Default: every field.")
    payload: PayloadSpec = Field(default_factory=lambda: JSONPayloadSpec(kind="json"))
    states: list[str] | None = Field(default=None, description="Send only in these states.")
    qos: Literal[0, 1, 2] = 0
    retain: bool = False


class EventSpec(Spec):
    """An event or alarm: on a condition (with hysteresis), at a random rate, or on
    entering a state. Exactly one trigger is given."""

    when: str | None = None
    clear_when: str | None = Field(
        default=None, description="Re-arm only once this holds (default: `not when`)."
    )
    send_clear: bool = Field(default=False, description="Also send when the alarm clears.")
    rate_per_hour: Number | None = None
    on_enter: str | None = Field(default=None, description="A state name.")
    severity: Literal["info", "warning", "minor", "major", "critical"] = "warning"
    topic: str | None = Field(default=None, description="Default devices/{device_id}/events.")
    fields: list[str] | None = Field(default=None, description="Default: none.")
    payload: PayloadSpec | None = Field(
        default=None, description="Default: JSON with event, severity, state and fields."
    )
    qos: Literal[0, 1, 2] = 1

    @model_validator(mode="after")
    def _one_trigger(self) -> EventSpec:
        triggers = [
            name
            for name, value in (
                ("when", self.when),
                ("rate_per_hour", self.rate_per_hour),
                ("on_enter", self.on_enter),
            )
            if value is not None
        ]
        if len(triggers) != 1:
            given = ", ".join(triggers) or "none"
            raise ValueError(
                f"give exactly one trigger of when, rate_per_hour, on_enter (given: {given})"
            )
        if self.clear_when is not None and self.when is None:
            raise ValueError("clear_when needs when")
        return self


class StateSpec(Spec):
    """A state of the device: field generators that replace the model's while in it."""

    fields: dict[Identifier, FieldSpec] = Field(default_factory=dict)
    description: str | None = None


class TransitionSpec(Spec):
    """Leave ``from`` for ``to`` after a time in the state, on a condition, or on a
    command. ``from`` may be ``"*"`` (any state)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: str = Field(alias="from")
    to: str
    after_s: Number | None = None
    when: str | None = None
    on_command: str | None = None

    @model_validator(mode="after")
    def _one_trigger(self) -> TransitionSpec:
        given = [
            name
            for name, value in (
                ("after_s", self.after_s),
                ("when", self.when),
                ("on_command", self.on_command),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one trigger of after_s, when, on_command "
                f"(given: {', '.join(given) or 'none'})"
            )
        return self


class StateMachineSpec(Spec):
    """States and transitions. Transitions are checked each time the device samples."""

    initial: str | ChoiceSpec
    states: dict[Identifier, StateSpec] = Field(min_length=1)
    transitions: list[TransitionSpec] = Field(default_factory=list)


class ReplySpec(Spec):
    """The device's answer to a command, sent after ``delay_s``."""

    delay_s: Number = 0.0
    values: dict[Identifier, str] = Field(
        default_factory=dict, description="Name -> expression, added to the reply."
    )
    payload: PayloadSpec | None = Field(
        default=None, description="Default: JSON with command, status and values."
    )
    topic: str | None = None


class CommandSpec(Spec):
    """What a device does with one command."""

    accept_when: str | None = Field(
        default=None, description="Condition over `payload` and the device; else rejected."
    )
    set: dict[Identifier, str] = Field(
        default_factory=dict, description="Field -> expression over `payload` and the device."
    )
    state: str | None = Field(default=None, description="Go to this state.")
    offline_s: Number | None = Field(default=None, description="Go offline (reboot) this long.")
    reply: ReplySpec | None = Field(default_factory=ReplySpec)


class CommandsSpec(Spec):
    """The device's command channel and its handlers."""

    topic: str = "devices/{device_id}/commands/{command}"
    reply_topic: str = "devices/{device_id}/replies/{command}"
    handlers: dict[Identifier, CommandSpec] = Field(min_length=1)


# --- the connection: last will and birth -------------------------------------------


class ConnectionMessageSpec(Spec):
    """A message tied to the connection rather than to a schedule: the last will, or the
    birth message published right after each successful connect."""

    topic: str = Field(
        min_length=1,
        description="Topic template over device_id, index, model and attributes.",
    )
    payload: PayloadSpec = Field(
        default_factory=lambda: JSONPayloadSpec(kind="json"),
        description="Default: JSON with device_id and online. Payloads read device_id, "
        "index, model, online (false in the will, true in the birth) and attributes.",
    )
    qos: Literal[0, 1, 2] = 0
    retain: bool = Field(
        default=False, description="Retained, so a late subscriber sees the status too."
    )

    @field_validator("topic")
    @classmethod
    def _no_wildcards(cls, topic: str) -> str:
        # A PUBLISH topic (and so a will topic) must not contain wildcards
        # [MQTT-3.3.2-2]; a broker drops a CONNECT whose will topic has one.
        if "+" in topic or "#" in topic:
            raise ValueError(f"topic {topic!r} contains a wildcard (+ or #)")
        return topic


class ConnectionSpec(Spec):
    """What a device says about its own connection."""

    will: ConnectionMessageSpec | None = Field(
        default=None,
        description="Last will: sent by the broker if the device drops without DISCONNECT.",
    )
    birth: ConnectionMessageSpec | None = Field(
        default=None, description="Published once right after every successful connect."
    )


class DeviceModelSpec(Spec):
    """One kind of device."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="iotix device model",
        json_schema_extra={"$id": "https://iotix.dev/schemas/device-model.json"},
    )

    name: Identifier
    description: str | None = None
    id: str = Field(
        default="{model}-{index:06d}",
        description="Device id template over {model}, {index} and attributes.",
    )
    protocols: list[str] | None = Field(
        default=None,
        min_length=1,
        description="The protocol families the model is meant for: mqtt (mqtt, mqtts, ws, "
        "wss), http (http, https), coap (coap, coaps), kafka, or an adapter plugin's scheme. "
        "Running it over another is refused; default: any protocol.",
        json_schema_extra={"uniqueItems": True, "examples": [["mqtt", "coap"]]},
    )
    attributes: dict[Identifier, AttributeSpec] = Field(default_factory=dict)
    fields: dict[Identifier, FieldSpec] = Field(default_factory=dict)
    messages: dict[Identifier, MessageSpec] = Field(min_length=1)
    events: dict[Identifier, EventSpec] = Field(default_factory=dict)
    states: StateMachineSpec | None = None
    commands: CommandsSpec | None = None
    connection: ConnectionSpec | None = Field(
        default=None, description="Last will and birth messages."
    )


DEVICE_NAMES = frozenset({"device_id", "index", "model", "t", "ts", "ts_ms", "state", "state_s"})
"""Built-in names of a device at a sample, for expressions, templates and payloads."""

MESSAGE_NAMES = frozenset({"seq", "message"})
"""Built-in names of one message, for payloads only."""

BUILTIN_NAMES = DEVICE_NAMES | MESSAGE_NAMES

CONNECTION_NAMES = frozenset({"device_id", "index", "model", "online"})
"""Built-in names of a will or birth payload (besides the attributes); its topic has the
same but ``online``."""
