"""Declarative payload specs: how one message's record of values becomes bytes.

A device model names one :data:`PayloadSpec` per message type. The spec is pure data
(pydantic, frozen, ``extra="forbid"``) and is validated when the model loads, so every
mistake is reported with its field path before a single message is built. The codecs in
:mod:`iotix.payload.codec` and :mod:`iotix.payload.binary` compile a spec once into an
encoder and then run it per message.

Kinds, discriminated on ``kind``:

- ``json`` / ``cbor`` / ``msgpack``: a ``template`` of nested dicts, lists and scalars.
  A string that is exactly ``"${name}"`` becomes the value of ``name`` with its type;
  ``${name}`` or ``${name:.2f}`` inside other text is interpolated into the string;
  ``$$`` is a literal ``$``. No template means a flat object of the message's default
  names, in order.
- ``text``: a :meth:`str.format` template such as ``"{device_id} t={temperature:.1f}"``.
- ``csv``: one line without header of the named ``columns``.
- ``binary``: a byte layout of typed fields (:data:`BinaryFieldSpec`), with scale and
  offset, packed bit flags, strings, length and CRC fields.
- ``raw``: constant bytes given as ``hex`` or ``base64``.

Every spec has ``references()``, each value name it reads with the path where it is
read, and ``names()``, the set of those names, so the model layer can check them against
the device's fields.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import string
import struct
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

__all__ = [
    "FLOAT_TYPES",
    "INTEGER_TYPES",
    "BinaryBitSpec",
    "BinaryBitsFieldSpec",
    "BinaryBytesFieldSpec",
    "BinaryCRC16FieldSpec",
    "BinaryCRC32FieldSpec",
    "BinaryFieldSpec",
    "BinaryLengthFieldSpec",
    "BinaryNumberFieldSpec",
    "BinaryPayloadSpec",
    "BinaryStringFieldSpec",
    "CBORPayloadSpec",
    "CRC16Algorithm",
    "CSVPayloadSpec",
    "Endian",
    "FloatType",
    "IntegerType",
    "JSONPayloadSpec",
    "LinearScale",
    "MsgPackPayloadSpec",
    "NumberType",
    "PayloadSpec",
    "Placeholder",
    "RawPayloadSpec",
    "TextPayloadSpec",
    "ValueReference",
    "dotted_path",
    "integer_range",
    "parse_placeholders",
]

Endian = Literal["big", "little"]
IntegerType = Literal["u8", "u16", "u24", "u32", "u64", "i8", "i16", "i24", "i32", "i64"]
FloatType = Literal["f16", "f32", "f64"]
NumberType = Literal[
    "u8", "u16", "u24", "u32", "u64", "i8", "i16", "i24", "i32", "i64", "f16", "f32", "f64"
]
CRC16Algorithm = Literal["modbus", "ccitt-false", "xmodem", "kermit", "arc", "x25"]

#: Size in bytes of every integer type; the name says the signedness (u/i) and bit width.
INTEGER_TYPES: dict[str, int] = {
    "u8": 1,
    "u16": 2,
    "u24": 3,
    "u32": 4,
    "u64": 8,
    "i8": 1,
    "i16": 2,
    "i24": 3,
    "i32": 4,
    "i64": 8,
}
#: Size in bytes and ``struct`` code of every IEEE 754 type (``e`` is binary16).
FLOAT_TYPES: dict[str, tuple[int, str]] = {"f16": (2, "e"), "f32": (4, "f"), "f64": (8, "d")}

# The largest finite value of each float type, used for the physical range only; whether
# a value fits is decided by `struct` itself, which rounds before it checks.
_FLOAT_MAX: dict[str, float] = {
    "f16": 65504.0,
    "f32": 3.4028234663852886e38,
    "f64": 1.7976931348623157e308,
}

_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*"
_NAME = re.compile(_NAME_PATTERN)
# Placeholders may name a part of a structured value, such as `${location.lat}`.
_PLACEHOLDER_NAME_PATTERN = rf"{_NAME_PATTERN}(?:\.{_NAME_PATTERN})?"
_PLACEHOLDER_NAME = re.compile(_PLACEHOLDER_NAME_PATTERN)
# `$$` escapes a dollar; `${body}` is a placeholder; a `${` that does not close before
# another brace is malformed and is caught by the last alternative.
_PLACEHOLDER_TOKEN = re.compile(r"\$\$|\$\{(?P<body>[^{}]*)\}|\$\{")


def integer_range(int_type: str) -> tuple[int, int]:
    """The raw ``(min, max)`` an integer type holds, e.g. ``(-128, 127)`` for ``i8``."""
    bits = INTEGER_TYPES[int_type] * 8
    if int_type.startswith("i"):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


class ValueReference(NamedTuple):
    """A value name read by a payload, and where in the payload spec it is read."""

    name: str
    path: tuple[str | int, ...]


class Placeholder(NamedTuple):
    """One ``${name}`` or ``${name:spec}`` found in a template string."""

    name: str
    format_spec: str | None


def _check_format_spec(format_spec: str) -> None:
    """Raise `ValueError` unless the spec formats at least one of int, float or str."""
    for sample in (0, 0.0, ""):
        try:
            format(sample, format_spec)
        except ValueError:
            continue
        return
    raise ValueError(f"format spec {format_spec!r} is not valid for a number or a string")


def parse_placeholders(text: str) -> tuple[str | Placeholder, ...]:
    """Split a template string into literal text and placeholders.

    Raises `ValueError` on a malformed placeholder: an unclosed ``${``, an empty or
    invalid name, or a format spec that formats neither numbers nor strings.
    """
    parts: list[str | Placeholder] = []
    literal: list[str] = []
    position = 0
    for match in _PLACEHOLDER_TOKEN.finditer(text):
        literal.append(text[position : match.start()])
        position = match.end()
        if match.group(0) == "$$":
            literal.append("$")
            continue
        body = match.group("body")
        if body is None:
            raise ValueError(
                f"malformed placeholder at character {match.start()} of {text!r}: "
                "'${' must be closed by '}' and must not contain braces "
                "(write '$${' for a literal '${')"
            )
        name, colon, format_spec = body.partition(":")
        if not _PLACEHOLDER_NAME.fullmatch(name):
            raise ValueError(
                f"malformed placeholder '${{{body}}}' in {text!r}: "
                "the name must be a name such as `temperature` or `location.lat`"
            )
        if colon:
            _check_format_spec(format_spec)
        if "".join(literal):
            parts.append("".join(literal))
        literal.clear()
        parts.append(Placeholder(name, format_spec if colon else None))
    literal.append(text[position:])
    if "".join(literal):
        parts.append("".join(literal))
    return tuple(parts)


_TEMPLATE_SCALARS = (str, int, float, bool, type(None), bytes)


def _template_references(template: Any, path: tuple[str | int, ...]) -> Iterator[ValueReference]:
    """Walk a template, check it, and yield every name it reads; `ValueError` on errors."""
    if isinstance(template, dict):
        for key, value in template.items():
            if isinstance(key, str):
                yield from _template_references(key, (*path, key))
            elif not isinstance(key, _TEMPLATE_SCALARS):
                # pydantic reports only ValueError (not TypeError) as a validation error
                raise ValueError(  # noqa: TRY004
                    f"{dotted_path(path)}: unsupported key type {type(key).__name__}"
                )
            yield from _template_references(value, (*path, str(key)))
    elif isinstance(template, list | tuple):
        for index, item in enumerate(template):
            yield from _template_references(item, (*path, index))
    elif isinstance(template, str):
        try:
            parts = parse_placeholders(template)
        except ValueError as exc:
            raise ValueError(f"{dotted_path(path)}: {exc}") from None
        for part in parts:
            if isinstance(part, Placeholder):
                yield ValueReference(part.name, path)
    elif not isinstance(template, _TEMPLATE_SCALARS):
        raise ValueError(  # noqa: TRY004  # pydantic reports only ValueError
            f"{dotted_path(path)}: unsupported value of type {type(template).__name__} "
            "(use strings, numbers, booleans, null, lists and mappings; quote dates)"
        )


def dotted_path(path: Sequence[str | int]) -> str:
    """Render a path such as ``("template", "sensors", 0)`` as ``template.sensors[0]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


class _PayloadModel(BaseModel):
    """Base of every payload spec: immutable, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- templates


class _TemplatePayloadSpec(_PayloadModel):
    """Shared part of the json, cbor and msgpack specs."""

    template: Any = None

    @field_validator("template")
    @classmethod
    def _check_template(cls, template: Any) -> Any:
        for _ in _template_references(template, ("template",)):
            pass
        return template

    def references(self) -> tuple[ValueReference, ...]:
        """Every value name the template reads, with its path; none without a template."""
        return tuple(_template_references(self.template, ("template",)))

    def names(self) -> frozenset[str]:
        """The value names the template reads (the default names are not included)."""
        return frozenset(reference.name for reference in self.references())


class JSONPayloadSpec(_TemplatePayloadSpec):
    """A JSON document built from a template (compact, UTF-8)."""

    kind: Literal["json"]


class CBORPayloadSpec(_TemplatePayloadSpec):
    """A CBOR (RFC 8949) item built from a template."""

    kind: Literal["cbor"]


class MsgPackPayloadSpec(_TemplatePayloadSpec):
    """A MessagePack object built from a template."""

    kind: Literal["msgpack"]


class TextPayloadSpec(_PayloadModel):
    """UTF-8 text from a :meth:`str.format` template with named fields only."""

    kind: Literal["text"]
    template: str

    @field_validator("template")
    @classmethod
    def _check_template(cls, template: str) -> str:
        _text_references(template)
        return template

    def references(self) -> tuple[ValueReference, ...]:
        """Every value name the template reads."""
        return tuple(
            ValueReference(name, ("template",)) for name in _text_references(template=self.template)
        )

    def names(self) -> frozenset[str]:
        """The value names the template reads."""
        return frozenset(_text_references(self.template))


def _text_references(template: str) -> list[str]:
    """The names a `str.format` template reads; `ValueError` if it is not usable."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid format string: {exc} (write '{{{{' for a brace)") from None
    names: list[str] = []
    for _literal, field_name, format_spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name == "" or field_name.isdigit():
            message = "positional fields such as '{}' are not supported; name a value"
            raise ValueError(message)
        if not _NAME.fullmatch(field_name):
            raise ValueError(
                f"field {{{field_name}}} is not a plain name "
                "(attribute and index access are not supported)"
            )
        if conversion not in (None, "r", "s", "a"):
            raise ValueError(f"field {{{field_name}}} has unknown conversion !{conversion}")
        if format_spec:
            if "{" in format_spec:
                raise ValueError(
                    f"field {{{field_name}}}: nested fields in a format spec are not supported"
                )
            try:
                _check_format_spec(format_spec)
            except ValueError as exc:
                raise ValueError(f"field {{{field_name}}}: {exc}") from None
        names.append(field_name)
    return names


class CSVPayloadSpec(_PayloadModel):
    """One CSV line (RFC 4180 quoting, no header, no line terminator)."""

    kind: Literal["csv"]
    columns: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1)
    delimiter: str = ","

    @field_validator("delimiter")
    @classmethod
    def _check_delimiter(cls, delimiter: str) -> str:
        if len(delimiter) != 1 or delimiter in '"\r\n':
            message = "the delimiter must be one character other than '\"', CR and LF"
            raise ValueError(message)
        return delimiter

    def references(self) -> tuple[ValueReference, ...]:
        """Every column name, with its path; none when the default names are used."""
        return tuple(
            ValueReference(name, ("columns", index))
            for index, name in enumerate(self.columns or ())
        )

    def names(self) -> frozenset[str]:
        """The column names (the default names are not included)."""
        return frozenset(self.columns or ())


class RawPayloadSpec(_PayloadModel):
    """Constant bytes, given as exactly one of ``hex`` or ``base64``."""

    kind: Literal["raw"]
    hex: str | None = None
    base64: str | None = None

    @field_validator("hex")
    @classmethod
    def _check_hex(cls, text: str | None) -> str | None:
        if text is not None:
            _decode_hex(text)
        return text

    @field_validator("base64")
    @classmethod
    def _check_base64(cls, text: str | None) -> str | None:
        if text is not None:
            try:
                base64.b64decode(text, validate=True)
            except binascii.Error as exc:
                raise ValueError(f"not valid base64: {exc}") from None
        return text

    @model_validator(mode="after")
    def _check_one_source(self) -> Self:
        if (self.hex is None) == (self.base64 is None):
            message = "set exactly one of 'hex' and 'base64'"
            raise ValueError(message)
        return self

    def data(self) -> bytes:
        """The constant payload bytes."""
        if self.hex is not None:
            return _decode_hex(self.hex)
        return base64.b64decode(self.base64 or "", validate=True)

    def references(self) -> tuple[ValueReference, ...]:
        """A raw payload reads no values."""
        return ()

    def names(self) -> frozenset[str]:
        """A raw payload reads no values."""
        return frozenset()


def _decode_hex(text: str) -> bytes:
    """Decode hex that may contain whitespace; `ValueError` names the problem."""
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise ValueError(
            f"not valid hex ({exc}); write pairs of hex digits, e.g. 'a1 b2'"
        ) from None


# ----------------------------------------------------------------------------- binary


class LinearScale:
    """The LoRaWAN-decoder convention ``physical = raw * scale + offset``.

    When ``1 / scale`` is a whole number (scale 0.1, 0.01, 0.001, ...) the conversion
    divides and multiplies by that number instead, so that raw 234 with scale 0.1 gives
    exactly 23.4 and not 23.400000000000002. ``to_raw`` and ``to_physical`` are plain
    functions chosen once here, because encoders call them once per value per message.
    """

    __slots__ = ("divisor", "is_identity", "offset", "scale", "to_physical", "to_raw")

    def __init__(self, scale: float, offset: float) -> None:
        self.scale = scale
        self.offset = offset
        #: True when raw and physical values are the same.
        self.is_identity = scale == 1 and offset == 0
        inverse = 1 / scale
        whole = round(inverse)
        #: ``1 / scale`` when it is a whole number of magnitude at least 2, else None.
        self.divisor = (
            float(whole)
            if abs(whole) >= 2 and abs(inverse - whole) <= 1e-9 * abs(inverse)
            else None
        )
        divisor = self.divisor
        if divisor is not None:

            def to_raw(physical: float) -> float:
                return (physical - offset) * divisor

            def to_physical(raw: float) -> float:
                return raw / divisor + offset

        else:

            def to_raw(physical: float) -> float:
                return (physical - offset) / scale

            def to_physical(raw: float) -> float:
                return raw * scale + offset

        #: The unrounded raw value of a physical value.
        self.to_raw: Callable[[float], float] = to_raw
        #: The physical value of a raw value.
        self.to_physical: Callable[[float], float] = to_physical


class _BinaryFieldBase(_PayloadModel):
    """What every binary field has: a unique name and an optional byte-order override."""

    name: str = Field(min_length=1)
    endian: Endian | None = None


def _check_source_or_value(source: str | None, value: object) -> None:
    if source is not None and value is not None:
        message = "set either 'source' (a value name) or 'value' (a constant), not both"
        raise ValueError(message)


class BinaryNumberFieldSpec(_BinaryFieldBase):
    """An integer or IEEE 754 float; ``physical = raw * scale + offset``.

    Integers round ``(physical - offset) / scale`` to the nearest raw value (ties to
    even). The value comes from ``source`` (a value name, default ``name``) or is the
    constant ``value``.
    """

    type: NumberType
    source: str | None = Field(default=None, min_length=1)
    value: int | float | None = None
    scale: float = 1.0
    offset: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        _check_source_or_value(self.source, self.value)
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"scale must be a finite, non-zero number, not {self.scale}")
        if not math.isfinite(self.offset):
            raise ValueError(f"offset must be a finite number, not {self.offset}")
        if self.value is not None:
            self.constant_raw()
        return self

    @property
    def linear_scale(self) -> LinearScale:
        """The scale and offset of this field."""
        return LinearScale(self.scale, self.offset)

    @property
    def value_source(self) -> str | None:
        """The value name read per message, or None for a constant."""
        return None if self.value is not None else (self.source or self.name)

    @property
    def size_bytes(self) -> int:
        """The size of the field on the wire."""
        if self.type in FLOAT_TYPES:
            return FLOAT_TYPES[self.type][0]
        return INTEGER_TYPES[self.type]

    def physical_range(self) -> tuple[float, float]:
        """The ``(low, high)`` physical values that fit the type after scale and offset."""
        if self.type in FLOAT_TYPES:
            raw_low, raw_high = -_FLOAT_MAX[self.type], _FLOAT_MAX[self.type]
            scaled = (raw_low * self.scale + self.offset, raw_high * self.scale + self.offset)
        else:
            int_low, int_high = integer_range(self.type)
            scale = self.linear_scale
            scaled = (scale.to_physical(int_low), scale.to_physical(int_high))
        return min(scaled), max(scaled)

    def constant_raw(self) -> int | float:
        """The raw value of the constant ``value``; `ValueError` if it does not fit."""
        if self.value is None:
            raise ValueError(f"field {self.name!r} has no constant value")
        low, high = self.physical_range()
        fits_message = (
            f"constant {self.value} does not fit {self.type} with scale {self.scale:g} "
            f"and offset {self.offset:g} (allowed {low:g} .. {high:g})"
        )
        scale = self.linear_scale
        if self.type in FLOAT_TYPES:
            raw_float = float(self.value) if scale.is_identity else scale.to_raw(self.value)
            try:
                struct.pack(FLOAT_TYPES[self.type][1], raw_float)
            except OverflowError:
                raise ValueError(fits_message) from None
            return raw_float
        if not math.isfinite(self.value):
            raise ValueError(f"constant {self.value} is not a finite number")
        raw = (
            self.value
            if scale.is_identity and isinstance(self.value, int)
            else round(scale.to_raw(self.value))
        )
        raw_low, raw_high = integer_range(self.type)
        if not raw_low <= raw <= raw_high:
            raise ValueError(fits_message)
        return raw


class BinaryBitSpec(_PayloadModel):
    """One named group of bits inside a ``bits`` field; booleans pack as 1 and 0."""

    name: str = Field(min_length=1)
    width: int = Field(default=1, ge=1, le=64)
    source: str | None = Field(default=None, min_length=1)
    value: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        _check_source_or_value(self.source, self.value)
        if self.value is not None and self.value >= 1 << self.width:
            raise ValueError(
                f"constant {self.value} does not fit {self.width} bit(s) "
                f"(allowed 0 .. {(1 << self.width) - 1})"
            )
        return self

    @property
    def value_source(self) -> str | None:
        """The value name read per message, or None for a constant."""
        return None if self.value is not None else (self.source or self.name)


class BinaryBitsFieldSpec(_BinaryFieldBase):
    """Bit groups packed MSB first into an unsigned integer of ``size_bytes``.

    The first group takes the most significant bits; unused low bits are zero. The
    integer is stored in the field's byte order.
    """

    type: Literal["bits"]
    size_bytes: int = Field(ge=1, le=8)
    bits: list[BinaryBitSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        used_bits = sum(bit.width for bit in self.bits)
        if used_bits > self.size_bytes * 8:
            raise ValueError(
                f"bits of {self.name!r} need {used_bits} bits but size_bytes {self.size_bytes} "
                f"holds {self.size_bytes * 8}"
            )
        seen: set[str] = set()
        for index, bit in enumerate(self.bits):
            if bit.name in seen:
                raise ValueError(f"bits[{index}]: duplicate bit name {bit.name!r}")
            seen.add(bit.name)
        return self


class BinaryStringFieldSpec(_BinaryFieldBase):
    """Text of a fixed ``length`` (NUL-padded) or with a ``prefix`` byte count."""

    type: Literal["string"]
    source: str | None = Field(default=None, min_length=1)
    value: str | None = None
    length: int | None = Field(default=None, ge=1)
    prefix: Literal["u8", "u16"] | None = None
    encoding: Literal["ascii", "utf-8"] = "utf-8"

    @model_validator(mode="after")
    def _check(self) -> Self:
        _check_source_or_value(self.source, self.value)
        if (self.length is None) == (self.prefix is None):
            message = "set exactly one of 'length' (fixed size) and 'prefix' (u8 or u16)"
            raise ValueError(message)
        if self.value is not None:
            try:
                encoded = self.value.encode(self.encoding)
            except UnicodeEncodeError as exc:
                raise ValueError(f"constant {self.value!r} is not {self.encoding}: {exc}") from None
            limit = (
                self.length if self.length is not None else integer_range(self.prefix or "u8")[1]
            )
            if len(encoded) > limit:
                raise ValueError(
                    f"constant {self.value!r} is {len(encoded)} bytes, more than {limit}"
                )
        return self

    @property
    def value_source(self) -> str | None:
        """The value name read per message, or None for a constant."""
        return None if self.value is not None else (self.source or self.name)


class BinaryBytesFieldSpec(_BinaryFieldBase):
    """Bytes of a fixed ``length``, from ``source`` (bytes or hex text) or constant ``hex``."""

    type: Literal["bytes"]
    length: int = Field(ge=1)
    source: str | None = Field(default=None, min_length=1)
    hex: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        _check_source_or_value(self.source, self.hex)
        if self.hex is not None:
            constant = _decode_hex(self.hex)
            if len(constant) != self.length:
                raise ValueError(
                    f"hex constant is {len(constant)} bytes but length is {self.length}"
                )
        return self

    @property
    def value_source(self) -> str | None:
        """The value name read per message, or None for a constant."""
        return None if self.hex is not None else (self.source or self.name)


class _RangeFieldBase(_BinaryFieldBase):
    """A field computed over the fields ``from`` .. ``to`` (inclusive, by name)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True
    )

    from_: str | None = Field(default=None, alias="from")
    to: str | None = None


class BinaryLengthFieldSpec(_RangeFieldBase):
    """The byte length of a range of fields, as an unsigned integer.

    The default range is every field after this one, up to but not including the CRC
    fields at the end of the layout.
    """

    type: Literal["length"]
    int_type: Literal["u8", "u16", "u32"] = Field(default="u8", alias="int")

    @property
    def size_bytes(self) -> int:
        """The size of the field on the wire."""
        return INTEGER_TYPES[self.int_type]


class BinaryCRC16FieldSpec(_RangeFieldBase):
    """A CRC-16 of the bytes of a range of fields (default: every byte before it).

    Modbus RTU sends its CRC low byte first: set ``endian: little`` on that field.
    """

    type: Literal["crc16"]
    algorithm: CRC16Algorithm

    @property
    def size_bytes(self) -> int:
        """The size of the field on the wire."""
        return 2


class BinaryCRC32FieldSpec(_RangeFieldBase):
    """A CRC-32 (ISO-HDLC, as zlib) of a range of fields (default: every byte before it)."""

    type: Literal["crc32"]

    @property
    def size_bytes(self) -> int:
        """The size of the field on the wire."""
        return 4


BinaryFieldSpec = Annotated[
    BinaryNumberFieldSpec
    | BinaryBitsFieldSpec
    | BinaryStringFieldSpec
    | BinaryBytesFieldSpec
    | BinaryLengthFieldSpec
    | BinaryCRC16FieldSpec
    | BinaryCRC32FieldSpec,
    Field(discriminator="type"),
]

_CRC_TYPES = ("crc16", "crc32")


class BinaryPayloadSpec(_PayloadModel):
    """A byte layout: the fields in order, big-endian unless ``endian`` says otherwise."""

    kind: Literal["binary"]
    endian: Endian = "big"
    fields: list[BinaryFieldSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        seen: dict[str, int] = {}
        for index, field in enumerate(self.fields):
            if field.name in seen:
                raise ValueError(
                    f"fields[{index}]: duplicate field name {field.name!r} "
                    f"(first used by fields[{seen[field.name]}])"
                )
            seen[field.name] = index
        self.field_ranges()
        return self

    def field_ranges(self) -> dict[int, tuple[int, int]]:
        """For each length and CRC field index, the inclusive range of field indexes it covers.

        Raises `ValueError` (with the field path) for unknown or misordered names, an
        empty default range and a CRC that covers itself or a CRC after it.
        """
        index_of = {field.name: index for index, field in enumerate(self.fields)}
        trailing_crc_start = len(self.fields)
        while trailing_crc_start > 0 and self.fields[trailing_crc_start - 1].type in _CRC_TYPES:
            trailing_crc_start -= 1
        ranges: dict[int, tuple[int, int]] = {}
        for index, field in enumerate(self.fields):
            if not isinstance(field, _RangeFieldBase):
                continue
            is_crc = field.type in _CRC_TYPES
            if is_crc:
                default_first, default_last = 0, index - 1
            else:
                default_first, default_last = index + 1, trailing_crc_start - 1
            bounds: list[int] = []
            for key, name, default in (
                ("from", field.from_, default_first),
                ("to", field.to, default_last),
            ):
                if name is None:
                    bounds.append(default)
                elif name in index_of:
                    bounds.append(index_of[name])
                else:
                    raise ValueError(
                        f"fields[{index}].{key}: no field named {name!r} "
                        f"(fields: {', '.join(index_of)})"
                    )
            first, last = bounds
            if first > last:
                raise ValueError(
                    f"fields[{index}] ({field.name!r}): the range from "
                    f"{self.fields[first].name if first < len(self.fields) else 'the end'!r} "
                    f"to {self.fields[last].name if last >= 0 else 'the start'!r} is empty; "
                    "set 'from' and 'to'"
                )
            if is_crc:
                for covered in range(first, last + 1):
                    if covered >= index and self.fields[covered].type in _CRC_TYPES:
                        raise ValueError(
                            f"fields[{index}] ({field.name!r}): the CRC range covers "
                            f"{'itself' if covered == index else repr(self.fields[covered].name)}, "
                            "which is computed after it"
                        )
            ranges[index] = (first, last)
        return ranges

    def references(self) -> tuple[ValueReference, ...]:
        """Every value name the layout reads, with the path of the field that reads it."""
        found: list[ValueReference] = []
        for index, field in enumerate(self.fields):
            if isinstance(field, BinaryBitsFieldSpec):
                found.extend(
                    ValueReference(bit.value_source, ("fields", index, "bits", bit_index))
                    for bit_index, bit in enumerate(field.bits)
                    if bit.value_source is not None
                )
            elif not isinstance(field, _RangeFieldBase) and field.value_source is not None:
                found.append(ValueReference(field.value_source, ("fields", index)))
        return tuple(found)

    def names(self) -> frozenset[str]:
        """The value names the layout reads."""
        return frozenset(reference.name for reference in self.references())


PayloadSpec = Annotated[
    JSONPayloadSpec
    | CBORPayloadSpec
    | MsgPackPayloadSpec
    | TextPayloadSpec
    | CSVPayloadSpec
    | BinaryPayloadSpec
    | RawPayloadSpec,
    Field(discriminator="kind"),
]
