"""Semantic checks of a parsed device model: every cross-reference, with its path.

Pydantic checks each spec on its own; this module checks how they fit together: the
fields a message names exist, expressions are safe, known and acyclic, states and
commands named anywhere are defined, topics only use per-device constants, binary
layouts can hold the values their fields produce, replay files can be read, and the
declared protocols are known ones (:mod:`iotix.model.protocols`).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from iotix.errors import ExpressionError, ReplayError
from iotix.model.connection import check_connection
from iotix.model.expr import compile_expression
from iotix.model.generators import ReplayTable, template_names, value_bounds
from iotix.model.protocols import declared_protocol_issues
from iotix.model.spec import (
    DEVICE_NAMES,
    MESSAGE_NAMES,
    SETTABLE_KINDS,
    ExpressionAttributeSpec,
    ExpressionFieldSpec,
    GPSAreaFieldSpec,
    GPSRouteFieldSpec,
    OnChangeScheduleSpec,
    ReplayFieldSpec,
    TemplateAttributeSpec,
    TemplateFieldSpec,
)
from iotix.payload.spec import BinaryNumberFieldSpec, BinaryPayloadSpec

if TYPE_CHECKING:
    from collections.abc import Collection, Iterator
    from pathlib import Path

    from iotix.model.spec import DeviceModelSpec, FieldSpec
    from iotix.payload.spec import PayloadSpec

Issue = tuple[tuple[str | int, ...], str, str | None]
GPS_PARTS = ("lat", "lon", "heading", "speed")
EVENT_NAMES = frozenset({"event", "severity", "active"})
REPLY_NAMES = frozenset({"command", "status"})


def _suggest(name: str, known: Collection[str]) -> str | None:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"did you mean {close[0]!r}?" if close else None


class _Checker:
    def __init__(self, spec: DeviceModelSpec, base_dir: Path | None) -> None:
        self.spec = spec
        self.base_dir = base_dir
        self.issues: list[Issue] = []
        self.fields = set(spec.fields)
        self.attributes = set(spec.attributes)
        self.states = set(spec.states.states) if spec.states else set()
        self.commands = set(spec.commands.handlers) if spec.commands else set()
        gps = [
            n for n, f in spec.fields.items() if isinstance(f, GPSAreaFieldSpec | GPSRouteFieldSpec)
        ]
        self.flat_names = {f"{n}.{part}" for n in gps for part in GPS_PARTS}
        self.device_names = DEVICE_NAMES | self.fields | self.attributes

    def add(self, path: tuple[str | int, ...], problem: str, hint: str | None = None) -> None:
        self.issues.append((path, problem, hint))

    # --- building blocks --------------------------------------------------------

    def expression(
        self, source: str, path: tuple[str | int, ...], known: Collection[str]
    ) -> set[str]:
        try:
            return set(compile_expression(source, allowed_names=known).names)
        except ExpressionError as exc:
            self.add(path, str(exc))
            return set()

    def template(
        self, template: str, path: tuple[str | int, ...], known: Collection[str], what: str
    ) -> None:
        try:
            names = template_names(template)
        except ValueError as exc:
            self.add(path, f"invalid {what} template: {exc}", "use {name} or {name:format}")
            return
        for name in names:
            if name not in known:
                self.add(
                    path,
                    f"{what} template uses {{{name}}}, which is not available here",
                    _suggest(name, known) or "available: " + ", ".join(sorted(known)),
                )

    def field_list(
        self,
        names: list[str] | None,
        path: tuple[str | int, ...],
        *,
        also: Collection[str] = (),
    ) -> None:
        known = self.fields | set(also)
        what = "field or attribute" if self.attributes & set(also) else "field"
        for i, name in enumerate(names or ()):
            if name not in known:
                self.add((*path, i), f"no {what} named {name!r}", _suggest(name, known))

    def state(self, name: str | None, path: tuple[str | int, ...]) -> None:
        if name is not None and name not in self.states:
            if not self.states:
                self.add(path, f"state {name!r} is named but the model has no `states`")
            else:
                self.add(path, f"no state named {name!r}", _suggest(name, self.states))

    def payload(
        self,
        payload: PayloadSpec | None,
        path: tuple[str | int, ...],
        extra: Collection[str],
    ) -> None:
        if payload is None:
            return
        known = self.device_names | self.flat_names | MESSAGE_NAMES | set(extra)
        for reference in payload.references():
            if reference.name not in known:
                self.add(
                    (*path, *reference.path),
                    f"payload reads {reference.name!r}, which is not a field, attribute "
                    "or built-in name",
                    _suggest(reference.name, known),
                )
        if isinstance(payload, BinaryPayloadSpec):
            self.binary_ranges(payload, path)

    def binary_ranges(self, payload: BinaryPayloadSpec, path: tuple[str | int, ...]) -> None:
        for position, field in enumerate(payload.fields):
            if not isinstance(field, BinaryNumberFieldSpec) or field.value is not None:
                continue
            source = field.source or field.name
            spec = self.spec.fields.get(source)
            bounds = None if spec is None else value_bounds(spec)
            if bounds is None:
                continue
            low, high = field.physical_range()
            if bounds[0] < low or bounds[1] > high:
                self.add(
                    (*path, "fields", position),
                    f"field {source!r} ranges over [{bounds[0]:g}, {bounds[1]:g}] but "
                    f"{field.type} with scale {field.scale:g} and offset {field.offset:g} "
                    f"holds [{low:g}, {high:g}]",
                    "use a wider type, a coarser scale or an offset",
                )

    # --- sections ---------------------------------------------------------------

    def run(self) -> list[Issue]:
        spec = self.spec
        self.template(spec.id, ("id",), {"index", "model"} | self.attributes, "id")
        self.check_attributes()
        self.check_fields()
        topic_names = {"device_id", "index", "model"} | self.attributes
        for name, message in spec.messages.items():
            path: tuple[str | int, ...] = ("messages", name)
            self.template(message.topic or "", (*path, "topic"), topic_names | {"message"}, "topic")
            self.field_list(message.fields, (*path, "fields"), also=self.attributes)
            self.payload(message.payload, (*path, "payload"), ())
            for i, state in enumerate(message.states or ()):
                self.state(state, (*path, "states", i))
            schedule = message.schedule
            if isinstance(schedule, OnChangeScheduleSpec):
                self.field_list(schedule.watch, (*path, "schedule", "watch"), also=self.flat_names)
                if isinstance(schedule.deadband, dict):
                    for field_name in schedule.deadband:
                        if field_name not in self.fields | self.flat_names:
                            self.add(
                                (*path, "schedule", "deadband", field_name),
                                f"no field named {field_name!r}",
                                _suggest(field_name, self.fields),
                            )
        for name, event in spec.events.items():
            path = ("events", name)
            if event.when is not None:
                self.expression(event.when, (*path, "when"), self.device_names | self.flat_names)
            if event.clear_when is not None:
                self.expression(
                    event.clear_when, (*path, "clear_when"), self.device_names | self.flat_names
                )
            self.state(event.on_enter, (*path, "on_enter"))
            if event.topic is not None:
                self.template(event.topic, (*path, "topic"), topic_names | {"event"}, "topic")
            self.field_list(event.fields, (*path, "fields"), also=self.attributes)
            self.payload(event.payload, (*path, "payload"), EVENT_NAMES)
        self.check_states()
        self.check_commands()
        return self.issues

    def check_attributes(self) -> None:
        known = {"index", "model"}
        for name, value in self.spec.attributes.items():
            path = ("attributes", name)
            if isinstance(value, ExpressionAttributeSpec):
                self.expression(value.expr, (*path, "expr"), known)
            elif isinstance(value, TemplateAttributeSpec):
                self.template(value.template, (*path, "template"), known, "attribute")
            known.add(name)  # an attribute may use the ones before it

    def check_fields(self) -> None:
        reads: dict[str, set[str]] = {}
        names = self.device_names | self.flat_names
        for name, field in self.spec.fields.items():
            reads[name] = self.check_field(field, ("fields", name), names - {name})
        self.check_cycles(reads)

    def check_field(
        self, field: FieldSpec, path: tuple[str | int, ...], names: Collection[str]
    ) -> set[str]:
        if isinstance(field, ExpressionFieldSpec):
            return self.expression(field.expr, (*path, "expr"), names)
        if isinstance(field, TemplateFieldSpec):
            self.template(field.template, (*path, "template"), names, "field")
            try:
                return set(template_names(field.template))
            except ValueError:
                return set()
        if isinstance(field, ReplayFieldSpec):
            self.replay(field, path)
        return set()

    def replay(self, field: ReplayFieldSpec, path: tuple[str | int, ...]) -> None:
        file = field.file
        if not file.is_absolute() and self.base_dir is not None:
            file = self.base_dir / file
        try:
            table = ReplayTable.load(file)
            table.column(field.column)
            if field.time_column is not None:
                times = table.column(field.time_column)
                if times.dtype.kind != "f":
                    self.add((*path, "time_column"), f"column {field.time_column!r} is not numeric")
        except ReplayError as exc:
            self.add((*path, "file"), str(exc), "paths are relative to the model file")

    def check_cycles(self, reads: dict[str, set[str]]) -> None:
        done: set[str] = set()

        def visit(name: str, trail: list[str]) -> None:
            if name in done:
                return
            if name in trail:
                cycle = [*trail[trail.index(name) :], name]
                self.add(
                    ("fields", cycle[0]),
                    "circular derivation: " + " -> ".join(cycle),
                    "a derived field cannot depend on itself, even through others",
                )
                done.update(cycle)
                return
            for needed in sorted(reads.get(name, set()) & self.fields):
                visit(needed, [*trail, name])
            done.add(name)

        for name in self.spec.fields:
            visit(name, [])

    def check_states(self) -> None:
        machine = self.spec.states
        if machine is None:
            return
        if isinstance(machine.initial, str):
            self.state(machine.initial, ("states", "initial"))
        else:
            for i, value in enumerate(machine.initial.values):
                self.state(str(value), ("states", "initial", "values", i))
        names = self.device_names | self.flat_names
        for state_name, state in machine.states.items():
            for name, field in state.fields.items():
                path: tuple[str | int, ...] = ("states", "states", state_name, "fields", name)
                if name not in self.fields:
                    self.add(
                        path,
                        f"state overrides {name!r}, which is not a field of the model",
                        "declare the field under `fields` first; states replace its generator",
                    )
                elif isinstance(field, GPSAreaFieldSpec | GPSRouteFieldSpec):
                    self.add(path, "GPS fields cannot be overridden per state")
                self.check_field(field, path, names - {name})
        for i, transition in enumerate(machine.transitions):
            path = ("states", "transitions", i)
            if transition.from_ != "*":
                self.state(transition.from_, (*path, "from"))
            self.state(transition.to, (*path, "to"))
            if transition.when is not None:
                self.expression(transition.when, (*path, "when"), names)
            command = transition.on_command
            if command is not None and command not in self.commands:
                self.add(
                    (*path, "on_command"),
                    f"no command handler named {command!r}",
                    _suggest(command, self.commands) or "add it under commands.handlers",
                )

    def check_commands(self) -> None:
        commands = self.spec.commands
        if commands is None:
            return
        settable = {n for n, f in self.spec.fields.items() if f.kind in SETTABLE_KINDS}
        static = {"device_id", "index", "model", "command"} | self.attributes
        self.template(commands.topic, ("commands", "topic"), static, "topic")
        if "{command}" not in commands.topic:
            self.add(
                ("commands", "topic"),
                "the command topic must name the command: it has no {command}",
                'write it as "devices/{device_id}/commands/{command}"',
            )
        self.template(commands.reply_topic, ("commands", "reply_topic"), static, "topic")
        # A command reads each field's last sampled value.
        known = self.device_names | self.flat_names | {"payload"}
        for name, handler in commands.handlers.items():
            path: tuple[str | int, ...] = ("commands", "handlers", name)
            if handler.accept_when is not None:
                self.expression(handler.accept_when, (*path, "accept_when"), known)
            for field_name, source in handler.set.items():
                where = (*path, "set", field_name)
                if field_name not in self.fields:
                    self.add(
                        where, f"no field named {field_name!r}", _suggest(field_name, self.fields)
                    )
                elif field_name not in settable:
                    kind = self.spec.fields[field_name].kind
                    self.add(
                        where,
                        f"field {field_name!r} is a {kind} field, which a command cannot set",
                        "settable kinds: " + ", ".join(sorted(SETTABLE_KINDS)),
                    )
                self.expression(source, where, known)
            self.state(handler.state, (*path, "state"))
            reply = handler.reply
            if reply is None:
                continue
            for value_name, source in reply.values.items():
                self.expression(source, (*path, "reply", "values", value_name), known)
            if reply.topic is not None:
                self.template(reply.topic, (*path, "reply", "topic"), static, "topic")
            self.payload(
                reply.payload,
                (*path, "reply", "payload"),
                REPLY_NAMES | set(reply.values),
            )


def check_model(spec: DeviceModelSpec, *, base_dir: Path | None = None) -> Iterator[Issue]:
    """Every cross-reference problem of ``spec``: (path, problem, hint)."""
    yield from _Checker(spec, base_dir).run()
    yield from check_connection(spec)
    yield from declared_protocol_issues(spec)


__all__ = ["check_model"]
