"""The batch runtime: a whole shard of devices of one model, evaluated column by column.

``DeviceBatch`` is pure: it never reads the clock, sleeps or does I/O. The caller (the
preview, the engine's worker, a test) owns time and asks ``advance(now_s)`` for every
message due up to ``now_s``; ``next_due_s()`` says when to ask next. Each round of
``advance`` samples all fields of the devices that have something due, applies state
transitions, raises events, and encodes the payloads of the messages to send.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from iotix.errors import ExpressionError, IotixError
from iotix.model.expr import Expression, compile_expression
from iotix.model.generators import (
    BuildContext,
    FieldGenerator,
    Rows,
    build_generator,
    dependencies,
    template_names,
)
from iotix.model.schedules import (
    UNSCHEDULED,
    OnChangeSchedule,
    PoissonSchedule,
    Schedule,
    build_schedule,
)
from iotix.model.spec import (
    ChoiceSpec,
    DeviceModelSpec,
    EventSpec,
    ExpressionAttributeSpec,
    FieldSpec,
    TemplateAttributeSpec,
)
from iotix.payload.codec import Encoder, build_encoder
from iotix.payload.spec import JSONPayloadSpec

if TYPE_CHECKING:
    from pathlib import Path

    from iotix.model.streams import F64
    from iotix.payload.spec import PayloadSpec

DEFAULT_TOPIC = "devices/{device_id}/{message}"
DEFAULT_EVENT_TOPIC = "devices/{device_id}/events"
DEFAULT_REPLY_TOPIC = "devices/{device_id}/replies/{command}"
EVENT_NAMES = ("event", "severity", "active")
REPLY_NAMES = ("command", "status")


class MessageKind(enum.Enum):
    TELEMETRY = "telemetry"
    EVENT = "event"
    REPLY = "reply"


class Message(NamedTuple):
    """One message a device sends: where, what, and when it was meant to go.

    A named tuple rather than a frozen dataclass: one is built per message, and a
    frozen dataclass's ``__init__`` costs ten times as much.
    """

    device_index: int
    device_id: str
    name: str
    kind: MessageKind
    topic: str
    payload: bytes
    due_s: float
    seq: int
    qos: int = 0
    retain: bool = False


class Emission(NamedTuple):
    """The messages of one outlet in one round, as columns: what the engine sends.

    ``advance_emissions`` hands these out so that a sender can work per batch (one
    lag histogram update, one counter update) instead of per message; ``advance``
    flattens them into :class:`Message` tuples for everything else.
    """

    name: str
    kind: MessageKind
    qos: int
    retain: bool
    rows: list[int]
    """Positions of the sending devices in the batch (not fleet indices)."""
    topics: list[str]
    payloads: list[bytes]
    due_s: npt.NDArray[np.float64]
    seq: list[int]


class CommandStatus(enum.Enum):
    OK = "ok"
    REJECTED = "rejected"
    UNKNOWN = "unknown_command"
    INVALID = "invalid_payload"
    """The handler's expressions could not read the command's payload (not an object,
    a key missing, a wrong type): the device refuses it and changes nothing."""
    OFFLINE = "offline"


@dataclass
class _Outlet:
    """A scheduled source of messages: a message type or a random-rate event."""

    name: str
    kind: MessageKind
    schedule: Schedule
    encoder: Encoder
    topic: str
    qos: int
    retain: bool
    states: frozenset[int] | None
    seq: npt.NDArray[np.int64]
    topics: list[str | None]
    fields: tuple[str, ...]
    severity: str = ""


@dataclass
class _ConditionEvent:
    """An event raised from samples (a condition or entering a state), not a schedule;
    ``outlet`` says where and how it is sent."""

    name: str
    spec: EventSpec
    when: Expression | None
    clear_when: Expression | None
    on_enter: int | None
    outlet: _Outlet
    active: npt.NDArray[np.bool_]


class _Env(Mapping[str, Any]):
    """Names visible to expressions for the sampled rows, computed on first use."""

    def __init__(self, batch: DeviceBatch, rows: Rows, t: F64) -> None:
        self._batch = batch
        self.rows = rows
        self.t = t
        # The state the fields were sampled in: messages of this round report it even if
        # a transition moves the device on.
        self.codes = batch.state[rows]
        self.entered_s = batch.entered_s[rows]
        self.cache: dict[str, Any] = {"t": t}

    def __getitem__(self, name: str) -> Any:
        try:
            return self.cache[name]
        except KeyError:
            value = self._batch._lookup(name, self)  # noqa: SLF001 - a friend class
            self.cache[name] = value
            return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._batch.names)

    def __len__(self) -> int:
        return len(self._batch.names)


class DeviceBatch:
    """Devices ``indices`` of one model, from ``seed``, starting at ``start_epoch_s``."""

    def __init__(
        self,
        spec: DeviceModelSpec,
        *,
        indices: Sequence[int] | npt.NDArray[np.int64],
        seed: int = 0,
        start_epoch_s: float = 0.0,
        base_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.indices = np.asarray(indices, dtype=np.int64)
        self.size = len(self.indices)
        self.start_epoch_s = start_epoch_s
        ctx = BuildContext(seed, self.indices, start_epoch_s, base_dir)
        self._ctx = ctx

        self._attributes = self._build_attributes()
        self.device_ids: list[str] = self._build_ids()
        self._id_table = np.empty(self.size, dtype=object)  # the same strings, for columns
        self._id_table[:] = self.device_ids

        machine = spec.states
        self.state_names: list[str] = list(machine.states) if machine else ["default"]
        self._state_table = np.array(self.state_names, dtype=object)
        self._state_code = {name: code for code, name in enumerate(self.state_names)}
        if machine is None:
            self.state = np.zeros(self.size, dtype=np.int16)
        elif isinstance(machine.initial, ChoiceSpec):
            drawn = ctx.draw(machine.initial, "states.initial")
            self.state = np.array([self._state_code[s] for s in drawn.tolist()], dtype=np.int16)
        else:
            self.state = np.full(self.size, self._state_code[machine.initial], dtype=np.int16)
        self.reached = np.zeros((self.size, len(self.state_names)), dtype=bool)
        """Which states each device has been in (its initial state included)."""
        self.reached[np.arange(self.size), self.state] = True
        self.entered_s = np.zeros(self.size)
        self.offline_until_s = np.full(self.size, -np.inf)
        # Devices the caller holds back (an engine's devices not connected yet): they
        # neither sample nor send, so their sequence numbers have no gaps.
        self.paused = np.zeros(self.size, dtype=bool)
        self._last: dict[str, npt.NDArray[Any]] = {}
        self._sampled = np.zeros(self.size, dtype=bool)

        self._field_order = _field_order(spec)
        self._generators: dict[str, FieldGenerator] = {
            name: build_generator(spec.fields[name], ctx, f"fields.{name}")
            for name in self._field_order
        }
        self._overrides: dict[str, dict[int, FieldGenerator]] = {}
        if machine is not None:
            for state_name, state in machine.states.items():
                for name, field_spec in state.fields.items():
                    self._overrides.setdefault(name, {})[self._state_code[state_name]] = (
                        build_generator(field_spec, ctx, f"states.{state_name}.fields.{name}")
                    )
        self._transitions = self._build_transitions()
        self._outlets = self._build_outlets()
        self._events = self._build_condition_events()
        self._encoders: dict[tuple[MessageKind, str], Encoder] = {
            (o.kind, o.name): o.encoder for o in self._outlets
        }
        self._encoders.update({(MessageKind.EVENT, e.name): e.outlet.encoder for e in self._events})
        self._commands = self._build_commands()
        self._replies: list[tuple[float, int, Emission]] = []
        self._reply_count = 0
        self._reply_seq = np.zeros(self.size, dtype=np.int64)
        self.names = frozenset(
            {"device_id", "index", "model", "t", "ts", "ts_ms", "state", "state_s"}
            | set(self._attributes)
            | set(spec.fields)
        )

    # --- construction -----------------------------------------------------------

    def _build_attributes(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        env: dict[str, Any] = {"index": self.indices, "model": self.spec.name}
        for name, value in self.spec.attributes.items():
            if isinstance(value, ExpressionAttributeSpec):
                result = compile_expression(value.expr)(env | attributes)
                drawn = np.broadcast_to(np.asarray(result), (self.size,)).copy()
            elif isinstance(value, TemplateAttributeSpec):
                columns = env | attributes
                drawn = np.array(
                    [value.template.format(**_row_of(columns, row)) for row in range(self.size)],
                    dtype=object,
                )
            else:
                drawn = self._ctx.draw(value, f"attributes.{name}")
                if not isinstance(drawn, np.ndarray):
                    drawn = np.full(
                        self.size, drawn, dtype=object if isinstance(drawn, str) else None
                    )
            attributes[name] = drawn
        return attributes

    def _build_ids(self) -> list[str]:
        template = self.spec.id
        used = set(template_names(template))
        columns: dict[str, Any] = {"index": self.indices, "model": self.spec.name}
        columns.update({name: self._attributes[name] for name in used if name in self._attributes})
        if used <= {"index", "model"}:
            model = self.spec.name
            return [template.format(index=i, model=model) for i in self.indices.tolist()]
        return [template.format(**_row_of(columns, row)) for row in range(self.size)]

    def _build_transitions(
        self,
    ) -> list[tuple[int | None, int, Any, Expression | None, str | None]]:
        machine = self.spec.states
        transitions: list[tuple[int | None, int, Any, Expression | None, str | None]] = []
        if machine is None:
            return transitions
        for number, transition in enumerate(machine.transitions):
            source = None if transition.from_ == "*" else self._state_code[transition.from_]
            after = (
                None
                if transition.after_s is None
                else self._ctx.param(transition.after_s, f"states.transitions[{number}].after_s")
            )
            when = None if transition.when is None else compile_expression(transition.when)
            transitions.append(
                (source, self._state_code[transition.to], after, when, transition.on_command)
            )
        return transitions

    def _build_outlets(self) -> list[_Outlet]:
        outlets = []
        all_fields = tuple(self.spec.fields)
        for name, message in self.spec.messages.items():
            fields = tuple(message.fields) if message.fields is not None else all_fields
            outlets.append(
                _Outlet(
                    name=name,
                    kind=MessageKind.TELEMETRY,
                    schedule=build_schedule(message.schedule, self._ctx, f"messages.{name}"),
                    encoder=build_encoder(
                        message.payload, default_names=("device_id", "ts_ms", "seq", *fields)
                    ),
                    topic=message.topic or DEFAULT_TOPIC,
                    qos=message.qos,
                    retain=message.retain,
                    states=self._state_set(message.states),
                    seq=np.zeros(self.size, dtype=np.int64),
                    topics=[None] * self.size,
                    fields=fields,
                )
            )
        for name, event in self.spec.events.items():
            if event.rate_per_hour is None:
                continue
            # Drawn per device in the unit the user wrote (per hour), then converted, so
            # a distribution's min, max and rounding keep their meaning.
            per_hour = self._ctx.param(event.rate_per_hour, f"events.{name}.rate_per_hour")
            schedule = PoissonSchedule(per_hour / 3600.0, self._ctx, f"events.{name}")
            fields = tuple(event.fields or ())
            outlets.append(
                _Outlet(
                    name=name,
                    kind=MessageKind.EVENT,
                    schedule=schedule,
                    encoder=self._event_encoder(event.payload, fields),
                    topic=event.topic or DEFAULT_EVENT_TOPIC,
                    qos=event.qos,
                    retain=False,
                    states=None,
                    seq=np.zeros(self.size, dtype=np.int64),
                    topics=[None] * self.size,
                    fields=fields,
                    severity=event.severity,
                )
            )
        return outlets

    def _event_encoder(self, payload: PayloadSpec | None, fields: tuple[str, ...]) -> Encoder:
        return build_encoder(
            payload or JSONPayloadSpec(kind="json"),
            default_names=("device_id", *EVENT_NAMES, "state", "ts_ms", "seq", *fields),
        )

    def _build_condition_events(self) -> list[_ConditionEvent]:
        events = []
        for name, event in self.spec.events.items():
            if event.rate_per_hour is not None:
                continue
            events.append(
                _ConditionEvent(
                    name=name,
                    spec=event,
                    when=None if event.when is None else compile_expression(event.when),
                    clear_when=(
                        None if event.clear_when is None else compile_expression(event.clear_when)
                    ),
                    on_enter=None if event.on_enter is None else self._state_code[event.on_enter],
                    outlet=_Outlet(
                        name=name,
                        kind=MessageKind.EVENT,
                        schedule=UNSCHEDULED,
                        encoder=self._event_encoder(event.payload, tuple(event.fields or ())),
                        topic=event.topic or DEFAULT_EVENT_TOPIC,
                        qos=event.qos,
                        retain=False,
                        states=None,
                        seq=np.zeros(self.size, dtype=np.int64),
                        topics=[None] * self.size,
                        fields=tuple(event.fields or ()),
                        severity=event.severity,
                    ),
                    active=np.zeros(self.size, dtype=bool),
                )
            )
        return events

    def _state_set(self, names: list[str] | None) -> frozenset[int] | None:
        return None if names is None else frozenset(self._state_code[n] for n in names)

    # --- names for expressions, templates and payloads --------------------------

    def _lookup(self, name: str, env: _Env) -> Any:
        rows = env.rows
        if name in self._attributes:
            return self._attributes[name][rows]
        if name == "index":
            return self.indices[rows]
        if name == "device_id":
            return self._id_table[rows]
        if name == "state":
            return self._state_table[env.codes]
        if name == "state_s":
            return env.t - env.entered_s
        if name == "ts":
            return self.start_epoch_s + env.t
        if name == "ts_ms":
            return np.round((self.start_epoch_s + env.t) * 1000.0).astype(np.int64)
        if name == "model":
            return self.spec.name
        head, dot, part = name.partition(".")
        if dot and head in self._generators and head in env.cache:  # `location.lat`
            return env[head][part]
        # Outside a round (a command, its reply): the last sampled values.
        if name in self._last:
            return self._last[name][rows]
        prefix = f"{name}."
        parts = {
            k.removeprefix(prefix): v[rows] for k, v in self._last.items() if k.startswith(prefix)
        }
        if parts:
            return parts
        raise KeyError(name)

    # --- time -------------------------------------------------------------------

    def next_due_s(self) -> float:
        """The earliest virtual time at which ``advance`` has something to send."""
        due = min((float(o.schedule.due.min()) for o in self._outlets), default=np.inf)
        if self._replies:
            due = min(due, self._replies[0][0])
        return due

    def advance(self, now_s: float) -> list[Message]:
        """Every message due at or before ``now_s``, in rounds, oldest first per device."""
        return [
            message
            for emission in self.advance_emissions(now_s)
            for message in self.messages_of(emission)
        ]

    def advance_emissions(self, now_s: float) -> list[Emission]:
        """What ``advance`` returns, as one :class:`Emission` per outlet and round (in
        send order: oldest first per device)."""
        out: list[Emission] = []
        while self._replies and self._replies[0][0] <= now_s:
            out.append(heapq.heappop(self._replies)[2])
        if self.size == 0:
            return out
        while True:
            due_rows = [np.flatnonzero(o.schedule.due <= now_s) for o in self._outlets]
            if not any(len(r) for r in due_rows):
                return out
            self._round(due_rows, out)

    def messages_of(self, emission: Emission) -> Iterator[Message]:
        """The messages of an emission, one tuple each."""
        ids = self.device_ids
        indices = self.indices[emission.rows].tolist()
        name, kind, qos, retain = emission.name, emission.kind, emission.qos, emission.retain
        for row, index, topic, payload, due, seq in zip(
            emission.rows,
            indices,
            emission.topics,
            emission.payloads,
            emission.due_s.tolist(),
            emission.seq,
            strict=True,
        ):
            yield Message(index, ids[row], name, kind, topic, payload, due, seq, qos, retain)

    def _round(self, due_rows: list[npt.NDArray[np.intp]], out: list[Emission]) -> None:
        """One sample per due device, at its earliest due time; only the outlets due at
        that very time fire in this round, the others wait for a later round."""
        all_rows = np.concatenate(due_rows)
        all_due = np.concatenate(
            [o.schedule.due[r] for o, r in zip(self._outlets, due_rows, strict=True)]
        )
        order = np.lexsort((all_due, all_rows))
        due_devices, first = np.unique(all_rows[order], return_index=True)
        sample_t = all_due[order][first]
        online = (self.offline_until_s[due_devices] <= sample_t) & ~self.paused[due_devices]
        rows, t = due_devices[online], sample_t[online]
        env = _Env(self, rows, t)
        if len(rows):
            self._sample_fields(env)
            entered = self._apply_transitions(env)
            self._raise_condition_events(env, entered, out)
        for outlet, candidates in zip(self._outlets, due_rows, strict=True):
            if len(candidates) == 0:
                continue
            due = outlet.schedule.due[candidates]
            now = due <= sample_t[np.searchsorted(due_devices, candidates)]
            fired, due = candidates[now], due[now]
            if len(fired) == 0:
                continue
            positions = np.minimum(np.searchsorted(rows, fired), max(len(rows) - 1, 0))
            live = (rows[positions] == fired) if len(rows) else np.zeros(len(fired), bool)
            if outlet.states is not None and live.any():
                live &= np.isin(env.codes[positions], list(outlet.states))
            if isinstance(outlet.schedule, OnChangeSchedule) and live.any():
                watched = {name: env[name] for name in self._watched(outlet)}
                sending = outlet.schedule.changed(positions[live], fired[live], watched, due[live])
                live[np.flatnonzero(live)[~sending]] = False
            if live.any():
                self._emit(outlet, env, positions[live], due[live], out)
            outlet.schedule.fire(fired)

    def _watched(self, outlet: _Outlet) -> list[str]:
        spec = self.spec.messages[outlet.name].schedule
        watch = getattr(spec, "watch", None)
        if watch:
            return list(watch)
        # Timestamps and per-sample uuids change every sample: watching them would send
        # every sample, which is not what "on change" means.
        fields = self.spec.fields
        return [
            f for f in outlet.fields if f in fields and fields[f].kind not in ("timestamp", "uuid")
        ]

    def _sample_fields(self, env: _Env) -> None:
        rows, t = env.rows, env.t
        self._sampled[rows] = True
        for name in self._field_order:
            overrides = self._overrides.get(name)
            if not overrides:
                values = self._generators[name].sample(rows, t, env)
                env.cache[name] = values
                self._remember(name, rows, values)
                continue
            codes = self.state[rows]
            parts, where = [], []
            base_mask = ~np.isin(codes, list(overrides))
            groups = [(self._generators[name], base_mask)] + [
                (generator, codes == code) for code, generator in overrides.items()
            ]
            for generator, mask in groups:
                if mask.any():
                    sub = _SubEnv(env, mask)
                    parts.append(np.asarray(generator.sample(rows[mask], t[mask], sub)))
                    where.append(np.flatnonzero(mask))
            merged = np.concatenate(parts) if parts else np.empty(0)
            values = np.empty(len(rows), dtype=merged.dtype)
            values[np.concatenate(where) if where else np.empty(0, np.intp)] = merged
            env.cache[name] = values
            self._remember(name, rows, values)

    def _remember(self, name: str, rows: Rows, values: Any) -> None:
        """Keep each device's last sampled value, for commands and their replies."""
        if isinstance(values, Mapping):  # a GPS position: remember its parts
            for part, column in values.items():
                self._remember(f"{name}.{part}", rows, column)
            return
        values = np.asarray(values)
        last = self._last.get(name)
        if last is None or np.result_type(last, values) != last.dtype:
            kind = values.dtype.kind
            dtype = values.dtype if kind in "biuf" else object
            if last is not None:
                dtype = np.result_type(last, values) if kind in "biuf" else object
            grown = np.zeros(self.size, dtype=dtype)
            if last is not None:
                grown[:] = last
            self._last[name] = last = grown
        last[rows] = values

    def _apply_transitions(self, env: _Env) -> npt.NDArray[np.bool_]:
        """Move rows whose transition fired; returns which rows entered a new state."""
        rows = env.rows
        entered = np.zeros(len(rows), dtype=bool)
        if not self._transitions:
            return entered
        codes = self.state[rows]
        for source, target, after, when, command in self._transitions:
            if command is not None:
                continue
            # "*" means any *other* state: a device already in the target stays, so its
            # on_enter events and after_s timers do not restart at every sample.
            candidates = ~entered & ((codes != target) if source is None else (codes == source))
            if not candidates.any():
                continue
            if after is not None:
                fire = candidates & (env.t - self.entered_s[rows] >= _at(after, rows))
            else:
                assert when is not None  # noqa: S101 - the spec guarantees one trigger
                fire = candidates & np.asarray(_evaluate(when, env), dtype=bool)
            if fire.any():
                moved = rows[fire]
                self.state[moved] = target
                self.reached[moved, target] = True
                self.entered_s[moved] = env.t[fire]
                entered |= fire
                codes = np.where(fire, target, codes)
        return entered

    def _raise_condition_events(
        self, env: _Env, entered: npt.NDArray[np.bool_], out: list[Emission]
    ) -> None:
        rows = env.rows
        for event in self._events:
            if event.on_enter is not None:
                fire = entered & (self.state[rows] == event.on_enter)
                if fire.any():
                    self._emit_event(
                        event,
                        env,
                        np.flatnonzero(fire),
                        out,
                        active=True,
                        state=self.state_names[event.on_enter],
                    )
                continue
            assert event.when is not None  # noqa: S101 - the spec guarantees one trigger
            condition = np.asarray(_evaluate(event.when, env), dtype=bool)
            active = event.active[rows]
            rising = condition & ~active
            if event.clear_when is None:
                clearing = active & ~condition
            else:
                clearing = active & np.asarray(_evaluate(event.clear_when, env), dtype=bool)
            event.active[rows[rising]] = True
            event.active[rows[clearing]] = False
            if rising.any():
                self._emit_event(event, env, np.flatnonzero(rising), out, active=True)
            if event.spec.send_clear and clearing.any():
                self._emit_event(event, env, np.flatnonzero(clearing), out, active=False)

    def _emit_event(
        self,
        event: _ConditionEvent,
        env: _Env,
        positions: npt.NDArray[np.intp],
        out: list[Emission],
        *,
        active: bool,
        state: str | None = None,
    ) -> None:
        extra: dict[str, Any] = {"active": active}
        if state is not None:  # an on_enter event reports the state it entered
            extra["state"] = state
        self._emit(event.outlet, env, positions, env.t[positions], out, extra=extra)

    def _emit(
        self,
        outlet: _Outlet,
        env: _Env,
        positions: npt.NDArray[np.intp],
        due: F64,
        out: list[Emission],
        *,
        extra: dict[str, Any] | None = None,
    ) -> None:
        rows = env.rows[positions]
        seq = outlet.seq[rows]
        outlet.seq[rows] = seq + 1
        count = len(rows)
        columns: dict[str, list[Any]] = {}
        constants: dict[str, Any] = {
            "message": outlet.name,
            "event": outlet.name,
            "severity": outlet.severity,
            "active": True,
        }
        constants.update(extra or {})
        for name in outlet.encoder.names:
            if name == "seq":
                columns[name] = seq.tolist()
            elif name in constants:
                columns[name] = [constants[name]] * count
            else:
                columns[name] = _column(env[name], positions, count)
        payloads = outlet.encoder.encode_many(columns, count)
        row_list = rows.tolist()
        topics = outlet.topics
        topic = self._topic
        out.append(
            Emission(
                outlet.name,
                outlet.kind,
                outlet.qos,
                outlet.retain,
                row_list,
                [topics[row] or topic(outlet, row) for row in row_list],
                payloads,
                due,
                seq.tolist(),
            )
        )

    def _topic(self, outlet: _Outlet, row: int) -> str:
        topic = outlet.topics[row]
        if topic is None:
            topic = self.render(outlet.topic, row, message=outlet.name, event=outlet.name)
            outlet.topics[row] = topic
        return topic

    def attribute(self, name: str, row: int) -> Any:
        """One device's attribute as a plain Python value (KeyError if no such name)."""
        value = self._attributes[name][row]
        return value.item() if isinstance(value, np.generic) else value

    def render(self, template: str, row: int, **extra: Any) -> str:
        """A topic or path template for one device (static names only)."""
        values: dict[str, Any] = {
            "device_id": self.device_ids[row],
            "index": int(self.indices[row]),
            "model": self.spec.name,
        }
        for name in template_names(template):
            if name in self._attributes:
                value = self._attributes[name][row]
                values[name] = value.item() if isinstance(value, np.generic) else value
        values.update(extra)
        return template.format(**values)

    # --- commands ---------------------------------------------------------------

    def encoder_for(self, message: Message) -> Encoder:
        """The encoder that built ``message``'s payload (to decode it in a preview)."""
        return self._encoders[(message.kind, message.name)]

    def _build_commands(self) -> dict[str, _Command]:
        commands = self.spec.commands
        compiled: dict[str, _Command] = {}
        unknown_reply = build_encoder(
            JSONPayloadSpec(kind="json"), default_names=("device_id", *REPLY_NAMES, "ts_ms")
        )
        self._encoders[(MessageKind.REPLY, "*")] = unknown_reply
        if commands is None:
            return compiled
        for name, handler in commands.handlers.items():
            path = f"commands.{name}"
            target = handler.state
            on_command = {
                source: target_code
                for source, target_code, _, _, command in self._transitions
                if command == name
            }
            reply = handler.reply
            encoder = None
            if reply is not None:
                encoder = build_encoder(
                    reply.payload or JSONPayloadSpec(kind="json"),
                    default_names=("device_id", *REPLY_NAMES, *reply.values, "ts_ms"),
                )
                self._encoders[(MessageKind.REPLY, name)] = encoder
            compiled[name] = _Command(
                name=name,
                accept=None
                if handler.accept_when is None
                else compile_expression(handler.accept_when),
                sets={f: compile_expression(source) for f, source in handler.set.items()},
                state=None if target is None else self._state_code[target],
                on_command=on_command,
                offline_s=(
                    None
                    if handler.offline_s is None
                    else self._ctx.param(handler.offline_s, f"{path}.offline_s")
                ),
                reply_delay_s=(
                    0.0
                    if reply is None
                    else self._ctx.param(reply.delay_s, f"{path}.reply.delay_s")
                ),
                reply_values={
                    v: compile_expression(source)
                    for v, source in (reply.values if reply else {}).items()
                },
                reply_encoder=encoder,
                reply_topic=(reply.topic if reply and reply.topic else commands.reply_topic),
            )
        return compiled

    def handle_command(self, row: int, command: str, payload: Any, now_s: float) -> CommandStatus:
        """Apply a command to the device at position ``row``. Its reply, and any event of
        a state it enters, are queued and come out of ``advance`` when due."""
        handler = self._commands.get(command)
        if handler is None:
            template = self.spec.commands.reply_topic if self.spec.commands else DEFAULT_REPLY_TOPIC
            self._queue_reply(
                _CommandEnv(self, row, now_s, payload),
                command=command,
                status=CommandStatus.UNKNOWN,
                values={},
                due_s=now_s,
                encoder=self._encoders[(MessageKind.REPLY, "*")],
                template=template,
            )
            return CommandStatus.UNKNOWN
        if self.offline_until_s[row] > now_s:
            return CommandStatus.OFFLINE
        env = _CommandEnv(self, row, now_s, payload)
        status = CommandStatus.OK
        try:
            # Every value the command sets is read before any is set: a payload the
            # handler cannot read changes nothing.
            accepted = handler.accept is None or bool(_scalar(_evaluate(handler.accept, env)))
            values = (
                {name: _scalar(_evaluate(source, env)) for name, source in handler.sets.items()}
                if accepted
                else {}
            )
        except ExpressionError:
            status = CommandStatus.INVALID
        else:
            if accepted:
                self._apply_command(handler, env, values)
            else:
                status = CommandStatus.REJECTED
        if handler.reply_encoder is None:
            return status
        # Replies see the device as the command left it (a new setpoint, a new state).
        after = _CommandEnv(self, row, now_s, payload)
        encoder, template = handler.reply_encoder, handler.reply_topic
        try:
            values = {
                name: _scalar(_evaluate(e, after)) for name, e in handler.reply_values.items()
            }
        except ExpressionError:
            # A reply that reads the payload cannot be written for one it cannot read:
            # the plain reply (command and status) says so instead.
            status = CommandStatus.INVALID
            values, encoder = {}, self._encoders[(MessageKind.REPLY, "*")]
        self._queue_reply(
            after,
            command=command,
            status=status,
            values=values,
            due_s=now_s + _for_row(handler.reply_delay_s, row),
            encoder=encoder,
            template=template,
        )
        return status

    def _apply_command(self, handler: _Command, env: _CommandEnv, values: dict[str, Any]) -> None:
        rows = env.rows
        row = int(rows[0])
        now_s = float(env.t[0])
        for name, value in values.items():
            for generator in self._settable(name):
                generator.set(rows, value)
            self._remember(name, rows, np.asarray([value]))
        code = int(self.state[row])
        target = handler.on_command.get(code, handler.on_command.get(None, handler.state))
        if target is not None and target != code:
            self.state[row] = target
            self.reached[row, target] = True
            self.entered_s[row] = now_s
            entered_env = _CommandEnv(self, row, now_s, env["payload"])
            events: list[Emission] = []
            for event in self._events:
                if event.on_enter == target:
                    self._emit_event(
                        event,
                        entered_env,
                        np.zeros(1, dtype=np.intp),
                        events,
                        active=True,
                        state=self.state_names[target],
                    )
            for emission in events:
                self._push(emission)
        if handler.offline_s is not None:
            self.offline_until_s[row] = now_s + _for_row(handler.offline_s, row)

    def state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(devices in each state now, devices that have been in each state)."""
        now = np.bincount(self.state, minlength=len(self.state_names))
        reached = self.reached.sum(axis=0)
        return (
            {name: int(now[code]) for code, name in enumerate(self.state_names)},
            {name: int(reached[code]) for code, name in enumerate(self.state_names)},
        )

    def set_field(self, name: str, rows: npt.NDArray[np.intp], value: Any) -> None:
        """Give a constant, counter or random walk field ``value`` on the devices at
        ``rows``, as a command's ``set`` does (a counter or walk continues from it)."""
        generators = self._settable(name) if name in self._generators else []
        if not generators:
            raise IotixError(f"{name} is not a field that can be set")
        if len(rows) == 0:
            return
        for generator in generators:
            generator.set(rows, value)
        self._remember(name, rows, np.full(len(rows), value))

    def _settable(self, name: str) -> list[FieldGenerator]:
        found = [self._generators[name], *self._overrides.get(name, {}).values()]
        return [g for g in found if g.settable]

    def _push(self, emission: Emission) -> None:
        """Queue a one-device emission (a reply, or an event a command raised)."""
        self._reply_count += 1
        due = float(emission.due_s[0])
        heapq.heappush(self._replies, (due, self._reply_count, emission))

    def _queue_reply(
        self,
        env: _CommandEnv,
        *,
        command: str,
        status: CommandStatus,
        values: dict[str, Any],
        due_s: float,
        encoder: Encoder,
        template: str,
    ) -> None:
        row = int(env.rows[0])
        seq = int(self._reply_seq[row])
        self._reply_seq[row] = seq + 1
        constants: dict[str, Any] = {
            "command": command,
            "message": command,
            "status": status.value,
            "seq": seq,
            "ts_ms": round((self.start_epoch_s + due_s) * 1000),
            "ts": self.start_epoch_s + due_s,
            "t": due_s,
            **values,
        }
        only = np.zeros(1, dtype=np.intp)
        record = {
            name: constants[name] if name in constants else _column(env[name], only, 1)[0]
            for name in encoder.names
        }
        self._push(
            Emission(
                name=command if command in self._commands else "*",
                kind=MessageKind.REPLY,
                qos=1,
                retain=False,
                rows=[row],
                topics=[self.render(template, row, command=command)],
                payloads=[encoder.encode(record)],
                due_s=np.array([due_s]),
                seq=[seq],
            )
        )


@dataclass(frozen=True)
class _Command:
    """A command handler with its expressions compiled and parameters drawn."""

    name: str
    accept: Expression | None
    sets: dict[str, Expression]
    state: int | None
    on_command: dict[int | None, int]
    offline_s: Any
    reply_delay_s: Any
    reply_values: dict[str, Expression]
    reply_encoder: Encoder | None
    reply_topic: str


class _SubEnv(Mapping[str, Any]):
    """The parent environment restricted to a mask of its rows."""

    def __init__(self, parent: _Env, mask: npt.NDArray[np.bool_]) -> None:
        self._parent = parent
        self._mask = mask

    def __getitem__(self, name: str) -> Any:
        value = self._parent[name]
        if isinstance(value, np.ndarray):
            return value[self._mask]
        if isinstance(value, Mapping):
            return {k: v[self._mask] for k, v in value.items()}
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._parent)

    def __len__(self) -> int:
        return len(self._parent)


class _CommandEnv(_Env):
    """One device's names while it handles a command: fields hold their last sampled
    values and ``payload`` is the command's decoded payload. A device that has not
    sampled yet reads its sensors first."""

    def __init__(self, batch: DeviceBatch, row: int, now_s: float, payload: Any) -> None:
        rows = np.array([row], dtype=np.intp)
        t = np.array([now_s])
        if not batch._sampled[row]:  # noqa: SLF001 - a friend class
            batch._sample_fields(_Env(batch, rows, t))  # noqa: SLF001
        super().__init__(batch, rows, t)
        self.cache["payload"] = payload


def _evaluate(expression: Expression, env: Mapping[str, Any]) -> Any:
    try:
        return expression(env)
    except KeyError as exc:
        raise ExpressionError(
            f"{exc.args[0]!r} is not available here", expression=expression.source
        ) from exc


def _at(param: Any, rows: Rows) -> Any:
    return param[rows] if isinstance(param, np.ndarray) else param


def _for_row(param: Any, row: int) -> float:
    return float(param[row]) if isinstance(param, np.ndarray) else float(param)


def _scalar(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _column(value: Any, positions: npt.NDArray[np.intp], count: int) -> list[Any]:
    if isinstance(value, np.ndarray):
        listed: list[Any] = value[positions].tolist()
        return listed
    if isinstance(value, Mapping):
        parts = {key: part[positions].tolist() for key, part in value.items()}
        return [{key: part[i] for key, part in parts.items()} for i in range(count)]
    return [value] * count


def _row_of(columns: Mapping[str, Any], row: int) -> dict[str, Any]:
    values = {}
    for name, column in columns.items():
        value = column[row] if isinstance(column, np.ndarray) else column
        values[name] = value.item() if isinstance(value, np.generic) else value
    return values


def _field_order(spec: DeviceModelSpec) -> list[str]:
    """Fields in evaluation order: each after the fields it reads (checked acyclic)."""
    specs: dict[str, FieldSpec] = dict(spec.fields)
    order: list[str] = []
    placed: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in placed:
            return
        if name in trail:
            raise ValueError("cycle: " + " -> ".join((*trail, name)))
        for needed in sorted(dependencies(specs[name]) & specs.keys()):
            visit(needed, (*trail, name))
        placed.add(name)
        order.append(name)

    for name in specs:
        visit(name, ())
    return order
