"""The messages of a device's connection: its last will and its birth message.

A model's ``connection`` section (:class:`~iotix.model.spec.ConnectionSpec`) says what a
device announces about itself: the *will* goes in its CONNECT and the broker publishes
it if the device drops without DISCONNECT; the *birth* is published right after every
successful connect. Both are per device constants, so they are built from names that do
not change while the device runs: ``device_id``, ``index``, ``model``, the attributes,
and ``online`` (``false`` in the will, ``true`` in the birth).

:class:`ConnectionTemplates` compiles a model's will and birth once (the encoders, and
which attributes their payloads read); ``will(batch, row)`` and ``birth(batch, row)``
then render them for one device of a :class:`~iotix.model.runtime.DeviceBatch`. Nothing
here does I/O: the engine puts the result in CONNECT or publishes it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from iotix.errors import ModelError, ModelIssue
from iotix.model.generators import template_names
from iotix.model.spec import CONNECTION_NAMES
from iotix.payload.codec import build_encoder

if TYPE_CHECKING:
    from collections.abc import Collection, Iterator

    from iotix.model.runtime import DeviceBatch
    from iotix.model.spec import ConnectionMessageSpec, DeviceModelSpec
    from iotix.payload.codec import Encoder

__all__ = [
    "DEFAULT_PAYLOAD_NAMES",
    "ConnectionMessage",
    "ConnectionTemplates",
    "check_connection",
]

DEFAULT_PAYLOAD_NAMES = ("device_id", "online")
"""What a will or birth payload without a template carries, in order."""

Issue = tuple[tuple[str | int, ...], str, str | None]
"""(path, problem, hint), as :func:`iotix.model.check.check_model` yields them."""


@dataclass(frozen=True, slots=True)
class ConnectionMessage:
    """A will or birth rendered for one device (the fields of an MQTT ``Will``)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One connection message of a model, compiled once for all its devices."""

    spec: ConnectionMessageSpec
    encoder: Encoder
    attributes: tuple[str, ...]  # the attributes the payload reads
    online: bool


def _suggest(name: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"did you mean {close[0]!r}?" if close else "available: " + ", ".join(sorted(known))


def check_connection(spec: DeviceModelSpec) -> Iterator[Issue]:
    """Every name a will or birth reads that a device does not have, with its path.

    Topics may read ``device_id``, ``index``, ``model`` and the attributes; payloads
    also ``online``.
    """
    connection = spec.connection
    if connection is None:
        return
    attributes = set(spec.attributes)
    topic_names = (CONNECTION_NAMES - {"online"}) | attributes
    payload_names = CONNECTION_NAMES | attributes
    for which, message in (("will", connection.will), ("birth", connection.birth)):
        if message is None:
            continue
        path: tuple[str | int, ...] = ("connection", which)
        try:
            names = template_names(message.topic)
        except ValueError as exc:
            yield (*path, "topic"), f"invalid topic template: {exc}", "use {name}"
            names = []
        for name in names:
            if name not in topic_names:
                problem = f"topic template uses {{{name}}}, which is not available here"
                yield (*path, "topic"), problem, _suggest(name, topic_names)
        for reference in message.payload.references():
            if reference.name not in payload_names:
                problem = (
                    f"payload reads {reference.name!r}, which a {which} message does not "
                    "have (device_id, index, model, online and attributes only)"
                )
                where = (*path, "payload", *reference.path)
                yield where, problem, _suggest(reference.name, payload_names)


class ConnectionTemplates:
    """The will and birth of one model, compiled once; rendered per device.

    Raises :class:`~iotix.errors.ModelError` if they read names a device does not have
    (:func:`check_connection`).
    """

    def __init__(self, spec: DeviceModelSpec) -> None:
        issues = list(check_connection(spec))
        if issues:
            raise ModelError(
                [ModelIssue(path, problem, hint=hint) for path, problem, hint in issues]
            )
        connection = spec.connection
        attributes = set(spec.attributes)
        self._will = (
            None
            if connection is None or connection.will is None
            else _compile(connection.will, attributes, online=False)
        )
        self._birth = (
            None
            if connection is None or connection.birth is None
            else _compile(connection.birth, attributes, online=True)
        )

    @property
    def has_will(self) -> bool:
        return self._will is not None

    @property
    def has_birth(self) -> bool:
        return self._birth is not None

    def will(self, batch: DeviceBatch, row: int) -> ConnectionMessage | None:
        """The last will of the device at position ``row`` of ``batch``, if the model has
        one. ``batch`` must run the model these templates were built from."""
        return None if self._will is None else _render(self._will, batch, row)

    def birth(self, batch: DeviceBatch, row: int) -> ConnectionMessage | None:
        """The birth message of the device at position ``row`` of ``batch``, if any."""
        return None if self._birth is None else _render(self._birth, batch, row)


def _compile(spec: ConnectionMessageSpec, attributes: set[str], *, online: bool) -> _Compiled:
    encoder = build_encoder(spec.payload, default_names=DEFAULT_PAYLOAD_NAMES)
    read = tuple(sorted(name for name in encoder.names if name in attributes))
    return _Compiled(spec=spec, encoder=encoder, attributes=read, online=online)


def _render(compiled: _Compiled, batch: DeviceBatch, row: int) -> ConnectionMessage:
    record: dict[str, Any] = {
        "device_id": batch.device_ids[row],
        "index": int(batch.indices[row]),
        "model": batch.spec.name,
        "online": compiled.online,
    }
    # Attributes win over the built-in names, as they do in topics (DeviceBatch.render).
    for name in compiled.attributes:
        record[name] = batch.attribute(name, row)
    spec = compiled.spec
    return ConnectionMessage(
        topic=batch.render(spec.topic, row),
        payload=compiled.encoder.encode(record),
        qos=spec.qos,
        retain=spec.retain,
    )
