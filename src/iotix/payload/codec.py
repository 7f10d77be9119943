"""Encoders: a payload spec compiled once, then run once per message.

:func:`build_encoder` turns a :data:`~iotix.payload.spec.PayloadSpec` into an
:class:`Encoder`. Templates are parsed at build time into a tree of small builder
functions, so a message costs one dictionary lookup per placeholder and one call to the
serialiser (orjson, cbor2, msgpack) and never re-parses the template.

Rendering rules, shared by ``${name}`` interpolation and CSV cells: strings as they
are, ``true``/``false`` for booleans, an empty string for ``None``, ``str()`` for
numbers and compact JSON for lists and mappings; with a format spec
(``${t:.1f}``) Python's :func:`format` decides. Text templates follow :meth:`str.format`
exactly (so ``True`` renders as ``True`` there).

Every problem while encoding raises :class:`~iotix.errors.PayloadError` whose ``path``
says where in the spec (``template.sensors[0].value``, ``columns[2]``, ``fields[3]``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Protocol

import cbor2
import msgpack  # type: ignore[import-untyped]  # msgpack ships no type hints
import orjson

from iotix.errors import PayloadError
from iotix.payload.binary import BinaryPayloadEncoder, DecodedField
from iotix.payload.spec import (
    BinaryPayloadSpec,
    CBORPayloadSpec,
    CSVPayloadSpec,
    JSONPayloadSpec,
    MsgPackPayloadSpec,
    Placeholder,
    RawPayloadSpec,
    TextPayloadSpec,
    dotted_path,
    parse_placeholders,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence

    from iotix.payload.spec import PayloadSpec

__all__ = [
    "CBORPayloadEncoder",
    "CSVPayloadEncoder",
    "DecodedField",
    "Encoder",
    "JSONPayloadEncoder",
    "MsgPackPayloadEncoder",
    "RawPayloadEncoder",
    "TextPayloadEncoder",
    "build_encoder",
]


class Encoder(Protocol):
    """What the model layer runs per message; built by :func:`build_encoder`."""

    #: The MIME type of the payload, for protocols that carry one (HTTP, CoAP, MQTT 5).
    content_type: str
    #: Every value name ``encode`` reads from the record.
    names: frozenset[str]

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """The payload of one message built from its record of values."""
        ...

    def encode_many(self, columns: Mapping[str, Sequence[Any]], count: int) -> list[bytes]:
        """The payloads of ``count`` messages, from one column per name (the hot path)."""
        ...

    def decode(self, data: bytes) -> Any:
        """A payload back as data: an object, a str, a dict of physical values or bytes."""
        ...

    def describe(self, data: bytes) -> list[DecodedField]:
        """A binary payload field by field; an empty list for the other kinds."""
        ...


# ------------------------------------------------------------------------- rendering


def render_value(value: Any) -> str:
    """A value as text in an interpolated string or a CSV cell (see the module docs)."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, dict | list | tuple):
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    return str(value)


def _missing(name: str, path: str) -> PayloadError:
    return PayloadError(f"the record has no value named {name!r}", path=path)


# ------------------------------------------------------------------------- templates


def _constant(value: Any) -> Callable[[Mapping[str, Any]], Any]:
    def build(_record: Mapping[str, Any]) -> Any:
        return value

    return build


def _lookup(name: str, path: str) -> Callable[[Mapping[str, Any]], Any]:
    def build(record: Mapping[str, Any]) -> Any:
        try:
            return record[name]
        except KeyError:
            raise _missing(name, path) from None

    return build


def _formatted(placeholder: Placeholder, path: str) -> Callable[[Mapping[str, Any]], str]:
    name, format_spec = placeholder

    def build(record: Mapping[str, Any]) -> str:
        try:
            value = record[name]
        except KeyError:
            raise _missing(name, path) from None
        if format_spec is None:
            return render_value(value)
        try:
            return format(value, format_spec)
        except (TypeError, ValueError) as exc:
            raise PayloadError(
                f"value {name!r} = {value!r} cannot be formatted with {format_spec!r}: {exc}",
                path=path,
            ) from None

    return build


def _compile_string(text: str, path: str) -> tuple[Callable[[Mapping[str, Any]], Any], bool]:
    parts = parse_placeholders(text)
    if not any(isinstance(part, Placeholder) for part in parts):
        return _constant("".join(str(part) for part in parts)), True
    if len(parts) == 1 and isinstance(parts[0], Placeholder) and parts[0].format_spec is None:
        # Exactly "${name}": the value keeps its type.
        return _lookup(parts[0].name, path), False
    pieces = [
        _formatted(part, path) if isinstance(part, Placeholder) else _constant(part)
        for part in parts
    ]

    def build(record: Mapping[str, Any]) -> str:
        return "".join([piece(record) for piece in pieces])

    return build, False


def _compile_template(
    template: Any, path: tuple[str | int, ...]
) -> tuple[Callable[[Mapping[str, Any]], Any], bool]:
    """A builder for a template node, and whether the node is constant.

    Constant subtrees are built once and shared by every message; that is safe because
    the encoders serialise the built object at once and never hand it out.
    """
    if isinstance(template, str):
        return _compile_string(template, dotted_path(path))
    if isinstance(template, dict):
        keys: list[tuple[Callable[[Mapping[str, Any]], Any], bool]] = []
        values: list[tuple[Callable[[Mapping[str, Any]], Any], bool]] = []
        for key, value in template.items():
            key_path = (*path, str(key))
            keys.append(
                _compile_string(key, dotted_path(key_path))
                if isinstance(key, str)
                else (_constant(key), True)
            )
            values.append(_compile_template(value, key_path))
        if all(constant for _, constant in keys + values):
            return _constant(_build_constant(template)), True
        if all(constant for _, constant in keys):
            items = [
                (key_builder({}), value_builder)
                for (key_builder, _), (value_builder, _) in zip(keys, values, strict=True)
            ]

            def build_dict(record: Mapping[str, Any]) -> Any:
                return {key: value(record) for key, value in items}

            return build_dict, False
        pairs = [
            (key_builder, value_builder)
            for (key_builder, _), (value_builder, _) in zip(keys, values, strict=True)
        ]

        def build_keyed_dict(record: Mapping[str, Any]) -> Any:
            return {key(record): value(record) for key, value in pairs}

        return build_keyed_dict, False
    if isinstance(template, list | tuple):
        items_compiled = [
            _compile_template(item, (*path, index)) for index, item in enumerate(template)
        ]
        if all(constant for _, constant in items_compiled):
            return _constant(_build_constant(template)), True
        builders = [builder for builder, _ in items_compiled]

        def build_list(record: Mapping[str, Any]) -> Any:
            return [builder(record) for builder in builders]

        return build_list, False
    return _constant(template), True


def _build_constant(template: Any) -> Any:
    """A constant template node with ``$$`` escapes resolved."""
    if isinstance(template, str):
        return "".join(str(part) for part in parse_placeholders(template))
    if isinstance(template, dict):
        return {_build_constant(key): _build_constant(value) for key, value in template.items()}
    if isinstance(template, list | tuple):
        return [_build_constant(item) for item in template]
    return template


def _has_non_str_keys(template: Any) -> bool:
    """True when a template maps from anything but literal text, which JSON needs an option for."""
    if isinstance(template, dict):
        return any(
            not isinstance(key, str) or "${" in key or _has_non_str_keys(value)
            for key, value in template.items()
        )
    if isinstance(template, list | tuple):
        return any(_has_non_str_keys(item) for item in template)
    return False


def _default_object(names: Sequence[str]) -> Callable[[Mapping[str, Any]], Any]:
    """The builder of the default payload: a flat object of the names, in order."""
    ordered = tuple(names)

    def build(record: Mapping[str, Any]) -> Any:
        try:
            return {name: record[name] for name in ordered}
        except KeyError as exc:
            raise PayloadError(
                f"the record has no value named {exc.args[0]!r} (a default name of the message)"
            ) from None

    return build


def encode_rows(
    encode: Callable[[Mapping[str, Any]], bytes],
    names: Collection[str],
    columns: Mapping[str, Sequence[Any]],
    count: int,
) -> list[bytes]:
    """``encode_many`` for encoders with nothing faster: one record per row."""
    keys = tuple(names)
    if not keys:
        return [encode({}) for _ in range(count)]
    rows = zip(*(columns[key] for key in keys), strict=True)
    return [encode(dict(zip(keys, row, strict=True))) for row in rows]


class _TemplateEncoder:
    """Shared by the JSON, CBOR and MsgPack encoders: build the object, serialise it."""

    __slots__ = ("_build", "_ordered", "content_type", "names")

    content_type: str

    def __init__(
        self,
        spec: JSONPayloadSpec | CBORPayloadSpec | MsgPackPayloadSpec,
        default_names: Sequence[str],
    ) -> None:
        if spec.template is None:
            self._build = _default_object(default_names)
            self.names = frozenset(default_names)
            self._ordered: tuple[str, ...] | None = tuple(default_names)
        else:
            self._build = _compile_template(spec.template, ("template",))[0]
            self.names = spec.names()
            self._ordered = None

    def _serialise(self, document: Any) -> bytes:
        raise NotImplementedError

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """The payload of one record."""
        return self._serialise(self._build(record))

    def encode_many(self, columns: Mapping[str, Sequence[Any]], count: int) -> list[bytes]:
        """The payloads of ``count`` records given as columns."""
        keys = self._ordered
        if keys is None:
            return encode_rows(self.encode, self.names, columns, count)
        try:
            rows = zip(*(columns[key] for key in keys), strict=True)
        except KeyError as exc:
            raise _missing(str(exc.args[0]), "(default names)") from None
        serialise = self._serialise
        # The default object is the row itself, in order: one dict per message, no copy.
        return [serialise(dict(zip(keys, row, strict=True))) for row in rows]

    def build(self, record: Mapping[str, Any]) -> Any:
        """The object the payload serialises, before serialisation."""
        return self._build(record)

    def describe(self, data: bytes) -> list[DecodedField]:  # noqa: ARG002  # protocol
        """Nothing: only binary payloads are described field by field."""
        return []


class JSONPayloadEncoder(_TemplateEncoder):
    """Compact UTF-8 JSON through orjson.

    ``encode_many`` does not build a document per message: the template is serialised
    once with a marker in every slot (``${name}`` or a formatted string) and split into
    constant text around the slots. Each slot's column is serialised as one JSON array
    and split at its commas, and a message is the constant text with its values
    ``%``-formatted in. The bytes are those of ``encode``; a column whose values hold
    commas themselves (text, nested lists) is serialised value by value instead.
    """

    __slots__ = ("_option", "_plan")

    def __init__(self, spec: JSONPayloadSpec, default_names: Sequence[str]) -> None:
        super().__init__(spec, default_names)
        self.content_type = "application/json"
        # Non-text keys (numbers in YAML, or interpolated keys) need orjson's option.
        self._option = orjson.OPT_NON_STR_KEYS if _has_non_str_keys(spec.template) else 0
        self._plan = _SlotPlan.build(spec.template, default_names, self._option)

    def _serialise(self, document: Any) -> bytes:
        try:
            return orjson.dumps(document, option=self._option)
        except orjson.JSONEncodeError as exc:
            raise PayloadError(f"cannot encode as JSON: {exc}") from None

    def encode_many(self, columns: Mapping[str, Sequence[Any]], count: int) -> list[bytes]:
        """The payloads of ``count`` records given as columns."""
        if self._plan is None:
            return super().encode_many(columns, count)
        return self._plan.render(columns, count)

    def decode(self, data: bytes) -> Any:
        """The JSON document as Python data."""
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise PayloadError(f"not valid JSON: {exc}") from None


_MARK = "\x00iotix-slot-{}\x00"
_MARKED = re.compile(rb'"\\u0000iotix-slot-(\d+)\\u0000"')


class _NoPlan(Exception):  # noqa: N818 - control flow inside _SlotPlan.build only
    """The template has a part the slot plan does not cover (an interpolated key)."""


class _Slot:
    """One value slot: a column as it is, or a string formatted from several."""

    __slots__ = ("build", "names", "path")

    def __init__(
        self, names: tuple[str, ...], path: str, build: Callable[[Mapping[str, Any]], Any] | None
    ) -> None:
        self.names = names
        self.path = path
        self.build = build

    def values(self, columns: Mapping[str, Sequence[Any]]) -> Sequence[Any]:
        try:
            picked = [columns[name] for name in self.names]
        except KeyError as exc:
            raise _missing(str(exc.args[0]), self.path) from None
        if self.build is None:
            return picked[0]
        build, names = self.build, self.names
        return [build(dict(zip(names, row, strict=True))) for row in zip(*picked, strict=True)]


class _SlotPlan:
    """A JSON template as ``%``-format text with one ``%b`` per slot (see
    :class:`JSONPayloadEncoder`)."""

    __slots__ = ("_format", "_option", "_slots")

    def __init__(self, text: bytes, slots: list[_Slot], option: int) -> None:
        self._format = text
        self._slots = slots
        self._option = option

    @classmethod
    def build(cls, template: Any, default_names: Sequence[str], option: int) -> _SlotPlan | None:
        slots: list[_Slot] = []
        if template is None:
            skeleton: Any = {}
            for name in default_names:
                skeleton[name] = _MARK.format(len(slots))
                slots.append(_Slot((name,), "(default names)", None))
        else:
            try:
                skeleton = cls._skeleton(template, ("template",), slots)
            except _NoPlan:
                return None
        pieces = _MARKED.split(orjson.dumps(skeleton, option=option))
        order = [int(index) for index in pieces[1::2]]
        if sorted(order) != list(range(len(slots))):
            return None  # a constant of the template looks like a marker: play safe
        if not slots:  # a constant document: the text as it is
            return cls(pieces[0], [], option)
        text = b"%b".join(piece.replace(b"%", b"%%") for piece in pieces[0::2])
        return cls(text, [slots[index] for index in order], option)

    @classmethod
    def _skeleton(cls, node: Any, path: tuple[str | int, ...], slots: list[_Slot]) -> Any:
        if isinstance(node, str):
            parts = parse_placeholders(node)
            names = tuple(part.name for part in parts if isinstance(part, Placeholder))
            if not names:
                return _build_constant(node)
            builder, _ = _compile_string(node, dotted_path(path))
            exact = len(parts) == 1 and isinstance(parts[0], Placeholder)
            exact = exact and parts[0].format_spec is None  # type: ignore[union-attr]
            slots.append(_Slot(names, dotted_path(path), None if exact else builder))
            return _MARK.format(len(slots) - 1)
        if isinstance(node, dict):
            skeleton = {}
            for key, value in node.items():
                if isinstance(key, str) and any(
                    isinstance(part, Placeholder) for part in parse_placeholders(key)
                ):
                    raise _NoPlan
                skeleton[_build_constant(key)] = cls._skeleton(value, (*path, str(key)), slots)
            return skeleton
        if isinstance(node, list | tuple):
            return [cls._skeleton(item, (*path, index), slots) for index, item in enumerate(node)]
        return node

    def render(self, columns: Mapping[str, Sequence[Any]], count: int) -> list[bytes]:
        if count == 0:
            return []
        text = self._format
        if not self._slots:
            return [text] * count
        values = [self._json_values(slot.values(columns), count) for slot in self._slots]
        return [text % row for row in zip(*values, strict=True)]

    def _json_values(self, column: Sequence[Any], count: int) -> list[bytes]:
        """Each value of a column as JSON text."""
        option = self._option
        try:
            array = orjson.dumps(
                column if isinstance(column, list) else list(column), option=option
            )
            values = array[1:-1].split(b",")
            if len(values) == count:
                return values
            # A value with a comma of its own (text, a list): one at a time.
            return [orjson.dumps(value, option=option) for value in column]
        except orjson.JSONEncodeError as exc:
            raise PayloadError(f"cannot encode as JSON: {exc}") from None


class CBORPayloadEncoder(_TemplateEncoder):
    """CBOR (RFC 8949) through cbor2."""

    __slots__ = ()

    def __init__(self, spec: CBORPayloadSpec, default_names: Sequence[str]) -> None:
        super().__init__(spec, default_names)
        self.content_type = "application/cbor"

    def _serialise(self, document: Any) -> bytes:
        try:
            encoded: bytes = cbor2.dumps(document)
        except cbor2.CBOREncodeError as exc:
            raise PayloadError(f"cannot encode as CBOR: {exc}") from None
        return encoded

    def decode(self, data: bytes) -> Any:
        """The CBOR item as Python data."""
        try:
            return cbor2.loads(data)
        except cbor2.CBORDecodeError as exc:
            raise PayloadError(f"not valid CBOR: {exc}") from None


class MsgPackPayloadEncoder(_TemplateEncoder):
    """MessagePack through msgpack, with the bin type for bytes."""

    __slots__ = ()

    def __init__(self, spec: MsgPackPayloadSpec, default_names: Sequence[str]) -> None:
        super().__init__(spec, default_names)
        self.content_type = "application/msgpack"

    def _serialise(self, document: Any) -> bytes:
        try:
            encoded: bytes = msgpack.packb(document, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"cannot encode as MessagePack: {exc}") from None
        return encoded

    def decode(self, data: bytes) -> Any:
        """The MessagePack object as Python data."""
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise PayloadError(f"not valid MessagePack: {exc}") from None


# ------------------------------------------------------------------------- text, csv, raw


class TextPayloadEncoder:
    """UTF-8 text from a :meth:`str.format` template."""

    __slots__ = ("_template", "content_type", "names")

    def __init__(self, spec: TextPayloadSpec) -> None:
        self.content_type = "text/plain"
        self.names = spec.names()
        self._template = spec.template

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """The text of one record."""
        try:
            return self._template.format_map(record).encode()
        except KeyError as exc:
            raise _missing(str(exc.args[0]), "template") from None
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"cannot format the record: {exc}", path="template") from None

    def encode_many(self, columns: Mapping[str, Sequence[Any]], count: int) -> list[bytes]:
        """The payloads of ``count`` records given as columns."""
        return encode_rows(self.encode, self.names, columns, count)

    def decode(self, data: bytes) -> Any:
        """The text as a str."""
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise PayloadError(f"not valid UTF-8: {exc}") from None

    def describe(self, data: bytes) -> list[DecodedField]:  # noqa: ARG002  # protocol
        """Nothing: only binary payloads are described field by field."""
        return []


class CSVPayloadEncoder:
    """One CSV line of the columns, quoted as RFC 4180 asks, without a line terminator."""

    __slots__ = ("_columns", "_delimiter", "_needs_quotes", "content_type", "names")

    def __init__(self, spec: CSVPayloadSpec, default_names: Sequence[str]) -> None:
        self.content_type = "text/csv"
        columns = spec.columns if spec.columns is not None else list(default_names)
        self.names = frozenset(columns)
        self._columns = tuple(
            (name, f"columns[{index}]" if spec.columns is not None else "")
            for index, name in enumerate(columns)
        )
        self._delimiter = spec.delimiter
        self._needs_quotes = re.compile(f'[{re.escape(spec.delimiter)}"\r\n]').search

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """The CSV line of one record."""
        cells: list[str] = []
        needs_quotes = self._needs_quotes
        for name, path in self._columns:
            try:
                cell = render_value(record[name])
            except KeyError:
                raise _missing(name, path) from None
            if needs_quotes(cell):
                cell = '"' + cell.replace('"', '""') + '"'
            cells.append(cell)
        return self._delimiter.join(cells).encode()

    def encode_many(self, columns: Mapping[str, Sequence[Any]], count: int) -> list[bytes]:
        """The payloads of ``count`` records given as columns."""
        return encode_rows(self.encode, self.names, columns, count)

    def decode(self, data: bytes) -> Any:
        """The line as a str."""
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise PayloadError(f"not valid UTF-8: {exc}") from None

    def describe(self, data: bytes) -> list[DecodedField]:  # noqa: ARG002  # protocol
        """Nothing: only binary payloads are described field by field."""
        return []


class RawPayloadEncoder:
    """The same constant bytes for every message."""

    __slots__ = ("_data", "content_type", "names")

    def __init__(self, spec: RawPayloadSpec) -> None:
        self.content_type = "application/octet-stream"
        self.names: frozenset[str] = frozenset()
        self._data = spec.data()

    def encode(self, record: Mapping[str, Any]) -> bytes:  # noqa: ARG002  # protocol
        """The constant payload."""
        return self._data

    def encode_many(self, columns: Mapping[str, Sequence[Any]], count: int) -> list[bytes]:
        """The payloads of ``count`` records given as columns."""
        return encode_rows(self.encode, self.names, columns, count)

    def decode(self, data: bytes) -> Any:
        """The payload bytes."""
        return bytes(data)

    def describe(self, data: bytes) -> list[DecodedField]:  # noqa: ARG002  # protocol
        """Nothing: only binary payloads are described field by field."""
        return []


def build_encoder(spec: PayloadSpec, *, default_names: Sequence[str]) -> Encoder:
    """Compile a payload spec into the encoder of one message type.

    ``default_names`` are the message's value names in order; they are the payload of a
    json/cbor/msgpack spec without template and the columns of a csv spec without
    ``columns``. Raises `PayloadError` when a binary layout cannot hold its constants.
    """
    if isinstance(spec, JSONPayloadSpec):
        return JSONPayloadEncoder(spec, default_names)
    if isinstance(spec, CBORPayloadSpec):
        return CBORPayloadEncoder(spec, default_names)
    if isinstance(spec, MsgPackPayloadSpec):
        return MsgPackPayloadEncoder(spec, default_names)
    if isinstance(spec, TextPayloadSpec):
        return TextPayloadEncoder(spec)
    if isinstance(spec, CSVPayloadSpec):
        return CSVPayloadEncoder(spec, default_names)
    if isinstance(spec, BinaryPayloadSpec):
        return BinaryPayloadEncoder(spec)
    return RawPayloadEncoder(spec)
