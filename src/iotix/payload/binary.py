"""Binary payloads: compile a :class:`BinaryPayloadSpec` layout once, pack it per message.

Compilation turns the layout into *segments*: maximal runs of fixed-size fields that
share one byte order become a single precompiled :class:`struct.Struct`, and each
length-prefixed string is a segment of its own. Encoding a message is then one
converter call per field (read the record, scale, range-check) and one ``pack`` per
segment. Length fields over fixed-size fields are constants computed at build time;
other length fields and every CRC are patched into the packed frame afterwards, CRCs in
layout order so that a CRC may cover an earlier CRC.

Types without a ``struct`` code are handled by hand: 24-bit integers and bit groups of
3, 5, 6 or 7 bytes pack through :meth:`int.to_bytes` into an ``Ns`` slot.

Decoding walks the fields in order, verifies every length and CRC field and returns
the physical values; :meth:`BinaryPayloadEncoder.describe` returns the same walk field
by field, with offsets and raw bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from iotix.errors import PayloadError
from iotix.payload.crc import crc16_function, crc32
from iotix.payload.spec import (
    FLOAT_TYPES,
    INTEGER_TYPES,
    BinaryBitsFieldSpec,
    BinaryBytesFieldSpec,
    BinaryCRC16FieldSpec,
    BinaryCRC32FieldSpec,
    BinaryLengthFieldSpec,
    BinaryNumberFieldSpec,
    BinaryStringFieldSpec,
    integer_range,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from iotix.payload.spec import BinaryFieldSpec, BinaryPayloadSpec, Endian

__all__ = ["BinaryPayloadEncoder", "DecodedField"]

_BYTE_ORDER: Final = {"big": ">", "little": "<"}
_INTEGER_CODES: Final = {
    "u8": "B",
    "u16": "H",
    "u32": "I",
    "u64": "Q",
    "i8": "b",
    "i16": "h",
    "i32": "i",
    "i64": "q",
}
_UNSIGNED_CODES: Final = {1: "B", 2: "H", 4: "I", 8: "Q"}
# The smallest magnitude that overflows each float type once rounded to nearest-even:
# halfway between the largest finite value and the next power of two (struct rounds the
# same way before it checks). Every finite float64 fits f64.
_FLOAT_OVERFLOW: Final = {"f16": 65520.0, "f32": float(2**128 - 2**103), "f64": math.inf}


@dataclass(frozen=True, slots=True)
class DecodedField:
    """One field of a decoded binary frame: where it is, its bytes and its value.

    ``value`` is the physical value (after scale and offset), a dict of bit values for a
    ``bits`` field, ``str`` for strings, ``bytes`` for bytes, ``int`` for length and CRC
    fields (verified against the frame).
    """

    name: str
    offset: int
    size: int
    raw: bytes
    value: Any


@dataclass(slots=True)
class _Field:
    """A compiled field: how to get its struct argument and how to read it back."""

    index: int
    name: str
    path: str
    spec: BinaryFieldSpec
    # Size on the wire, or None for a length-prefixed string.
    size_bytes: int | None
    # Struct code inside its segment ("" for a variable field, which packs itself).
    code: str
    # The byte order the code depends on, or None when it does not (bytes, u8, ...).
    byte_order: str | None
    convert: Callable[[Mapping[str, Any]], Any]
    read: Callable[[bytes, int], tuple[Any, int]]


@dataclass(slots=True)
class _Segment:
    """Consecutive fixed fields packed by one Struct, or one variable field (no Struct)."""

    packer: struct.Struct | None
    converters: tuple[Callable[[Mapping[str, Any]], Any], ...]
    field_indexes: tuple[int, ...]


def _missing(name: str, source: str, path: str) -> PayloadError:
    return PayloadError(
        f"the record has no value named {source!r} (read by field {name!r})", path=path
    )


def _constant(value: Any) -> Callable[[Mapping[str, Any]], Any]:
    def convert(_record: Mapping[str, Any]) -> Any:
        return value

    return convert


def _from_record(
    source: str, name: str, path: str, convert_value: Callable[[Any], Any]
) -> Callable[[Mapping[str, Any]], Any]:
    """A converter reading ``source`` from the record and passing it to ``convert_value``."""

    def convert(record: Mapping[str, Any]) -> Any:
        try:
            value = record[source]
        except KeyError:
            raise _missing(name, source, path) from None
        return convert_value(value)

    return convert


def _range_text(spec: BinaryNumberFieldSpec) -> str:
    low, high = spec.physical_range()
    return f"allowed {low:g} .. {high:g} for {spec.type}" + (
        ""
        if spec.linear_scale.is_identity
        else f" with scale {spec.scale:g}, offset {spec.offset:g}"
    )


# ------------------------------------------------------------------------------ numbers


def _integer_value_converter(
    spec: BinaryNumberFieldSpec, path: str, order: Endian
) -> Callable[[Any], Any]:
    """Physical value → struct argument for an integer field, with its range check."""
    low, high = integer_range(spec.type)
    scale = spec.linear_scale
    identity = scale.is_identity
    to_raw = scale.to_raw
    size = INTEGER_TYPES[spec.type]
    signed = spec.type.startswith("i")
    by_hand = spec.type not in _INTEGER_CODES
    name = spec.name

    def convert(value: Any) -> Any:
        if identity and type(value) is int:
            raw = value
        else:
            try:
                raw = round(value if identity else to_raw(value))
            except (TypeError, ValueError, OverflowError):
                raise PayloadError(
                    f"field {name!r} expects a finite number, got {value!r}", path=path
                ) from None
        if not low <= raw <= high:
            raise PayloadError(
                f"field {name!r}: value {value!r} is out of range ({_range_text(spec)})",
                path=path,
            )
        if by_hand:
            return raw.to_bytes(size, order, signed=signed)
        return raw

    return convert


def _float_value_converter(spec: BinaryNumberFieldSpec, path: str) -> Callable[[Any], Any]:
    """Physical value → struct argument for a float field, with its overflow check."""
    scale = spec.linear_scale
    identity = scale.is_identity
    to_raw = scale.to_raw
    limit = _FLOAT_OVERFLOW[spec.type]
    name = spec.name

    def convert(value: Any) -> Any:
        if not isinstance(value, int | float):
            raise PayloadError(f"field {name!r} expects a number, got {value!r}", path=path)
        try:
            raw = float(value) if identity else to_raw(value)
        except OverflowError:  # an int beyond any float
            raw = math.nan
        else:
            if -limit < raw < limit or not math.isfinite(raw):
                return raw
        raise PayloadError(
            f"field {name!r}: value {value!r} is out of range ({_range_text(spec)})", path=path
        )

    return convert


def _number_field(spec: BinaryNumberFieldSpec, index: int, path: str, order: Endian) -> _Field:
    scale = spec.linear_scale
    identity = scale.is_identity
    to_physical = scale.to_physical
    size = spec.size_bytes
    if spec.type in FLOAT_TYPES:
        code = FLOAT_TYPES[spec.type][1]
        convert_value = _float_value_converter(spec, path)
    else:
        code = _INTEGER_CODES.get(spec.type, f"{size}s")
        convert_value = _integer_value_converter(spec, path, order)
    source = spec.value_source
    convert = (
        _from_record(source, spec.name, path, convert_value)
        if source is not None
        else _constant(convert_value(spec.value))
    )
    if code.endswith("s"):
        signed = spec.type.startswith("i")

        def read(data: bytes, offset: int) -> tuple[Any, int]:
            raw = int.from_bytes(data[offset : offset + size], order, signed=signed)
            return (raw if identity else to_physical(raw)), size

    else:
        unpack_from = struct.Struct(_BYTE_ORDER[order] + code).unpack_from

        def read(data: bytes, offset: int) -> tuple[Any, int]:
            (raw,) = unpack_from(data, offset)
            return (raw if identity else to_physical(raw)), size

    # Single bytes and hand-packed `Ns` slots do not care about the segment's byte order.
    byte_order = None if size == 1 or code.endswith("s") else _BYTE_ORDER[order]
    return _Field(index, spec.name, path, spec, size, code, byte_order, convert, read)


# --------------------------------------------------------------------------------- bits


def _bits_field(spec: BinaryBitsFieldSpec, index: int, path: str, order: Endian) -> _Field:
    size = spec.size_bytes
    constant_bits = 0
    # (shift, max, source, bit name, bit path) for every bit group read from the record.
    dynamic: list[tuple[int, int, str, str, str]] = []
    layout: list[tuple[str, int, int]] = []
    used = 0
    for bit_index, bit in enumerate(spec.bits):
        used += bit.width
        shift = size * 8 - used
        mask = (1 << bit.width) - 1
        layout.append((bit.name, shift, mask))
        if bit.value is not None:
            constant_bits |= bit.value << shift
        else:
            dynamic.append(
                (shift, mask, bit.value_source or bit.name, bit.name, f"{path}.bits[{bit_index}]")
            )
    code = _UNSIGNED_CODES.get(size, f"{size}s")
    by_hand = code.endswith("s")
    name = spec.name

    def convert(record: Mapping[str, Any]) -> Any:
        packed = constant_bits
        for shift, mask, source, bit_name, bit_path in dynamic:
            try:
                value = record[source]
            except KeyError:
                raise _missing(f"{name}.{bit_name}", source, bit_path) from None
            if type(value) is not int:
                if isinstance(value, bool | int) or (
                    isinstance(value, float) and value.is_integer()
                ):
                    value = int(value)
                else:
                    raise PayloadError(
                        f"bit field {name}.{bit_name} expects an integer or a boolean, "
                        f"got {value!r}",
                        path=bit_path,
                    )
            if not 0 <= value <= mask:
                raise PayloadError(
                    f"bit field {name}.{bit_name}: value {value!r} is out of range "
                    f"(allowed 0 .. {mask})",
                    path=bit_path,
                )
            packed |= value << shift
        return packed.to_bytes(size, order) if by_hand else packed

    def read(data: bytes, offset: int) -> tuple[Any, int]:
        packed = int.from_bytes(data[offset : offset + size], order)
        return {bit_name: (packed >> shift) & mask for bit_name, shift, mask in layout}, size

    byte_order = None if size == 1 or by_hand else _BYTE_ORDER[order]
    return _Field(index, spec.name, path, spec, size, code, byte_order, convert, read)


# ------------------------------------------------------------------------ text and bytes


def _string_field(spec: BinaryStringFieldSpec, index: int, path: str, order: Endian) -> _Field:
    encoding = spec.encoding
    name = spec.name
    length = spec.length
    prefix = (
        struct.Struct(_BYTE_ORDER[order] + _UNSIGNED_CODES[INTEGER_TYPES[spec.prefix]])
        if spec.prefix is not None
        else None
    )
    limit = length if length is not None else integer_range(spec.prefix or "u8")[1]

    def encode_text(value: Any) -> bytes:
        if type(value) is not str:
            raise PayloadError(f"field {name!r} expects a string, got {value!r}", path=path)
        try:
            encoded = value.encode(encoding)
        except UnicodeEncodeError:
            raise PayloadError(
                f"field {name!r}: {value!r} cannot be encoded as {encoding}", path=path
            ) from None
        if len(encoded) > limit:
            raise PayloadError(
                f"field {name!r}: {value!r} is {len(encoded)} bytes, more than {limit}",
                path=path,
            )
        return encoded

    def decode_text(raw: bytes) -> str:
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            raise PayloadError(
                f"field {name!r}: bytes {raw.hex()} are not {encoding}", path=path
            ) from None

    if prefix is None:
        fixed_length = limit  # the spec sets exactly one of length and prefix
        convert_value: Callable[[Any], Any] = encode_text

        def read(data: bytes, offset: int) -> tuple[Any, int]:
            return decode_text(data[offset : offset + fixed_length].rstrip(b"\0")), fixed_length

        size: int | None = fixed_length
        code = f"{fixed_length}s"
    else:
        prefix_packer = prefix

        def convert_value(value: Any) -> Any:
            encoded = encode_text(value)
            return prefix_packer.pack(len(encoded)) + encoded

        def read(data: bytes, offset: int) -> tuple[Any, int]:
            (count,) = prefix_packer.unpack_from(data, offset)
            start = offset + prefix_packer.size
            if start + count > len(data):
                raise PayloadError(
                    f"field {name!r}: the frame ends inside the {count}-byte string", path=path
                )
            return decode_text(data[start : start + count]), prefix_packer.size + count

        size = None
        code = ""
    source = spec.value_source
    convert = (
        _from_record(source, name, path, convert_value)
        if source is not None
        else _constant(convert_value(spec.value))
    )
    return _Field(index, name, path, spec, size, code, None, convert, read)


def _bytes_field(spec: BinaryBytesFieldSpec, index: int, path: str) -> _Field:
    length = spec.length
    name = spec.name

    def convert_value(value: Any) -> Any:
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
        elif isinstance(value, str):
            try:
                data = bytes.fromhex(value)
            except ValueError:
                raise PayloadError(
                    f"field {name!r}: {value!r} is not valid hex", path=path
                ) from None
        else:
            raise PayloadError(
                f"field {name!r} expects bytes or a hex string, got {value!r}", path=path
            )
        if len(data) != length:
            raise PayloadError(
                f"field {name!r} holds exactly {length} bytes, got {len(data)}", path=path
            )
        return data

    def read(data: bytes, offset: int) -> tuple[Any, int]:
        return bytes(data[offset : offset + length]), length

    source = spec.value_source
    convert = (
        _from_record(source, name, path, convert_value)
        if source is not None
        else _constant(bytes.fromhex(spec.hex or ""))
    )
    return _Field(index, name, path, spec, length, f"{length}s", None, convert, read)


# ---------------------------------------------------------------------- length and CRC


def _computed_field(
    spec: BinaryLengthFieldSpec | BinaryCRC16FieldSpec | BinaryCRC32FieldSpec,
    index: int,
    path: str,
    order: Endian,
) -> _Field:
    """A length or CRC field: packed as 0 (or a known constant), patched after packing."""
    size = spec.size_bytes
    code = _UNSIGNED_CODES[size]
    unpack_from = struct.Struct(_BYTE_ORDER[order] + code).unpack_from

    def read(data: bytes, offset: int) -> tuple[Any, int]:
        return unpack_from(data, offset)[0], size

    byte_order = None if size == 1 else _BYTE_ORDER[order]
    return _Field(index, spec.name, path, spec, size, code, byte_order, _constant(0), read)


@dataclass(frozen=True, slots=True)
class _Patch:
    """A length or CRC written into the packed frame over fields ``first`` .. ``last``."""

    index: int
    first: int
    last: int
    packer: struct.Struct
    # None for a length field; the CRC function otherwise.
    checksum: Callable[[bytes], int] | None
    maximum: int


def _compile_field(spec: BinaryFieldSpec, index: int, default_order: Endian) -> _Field:
    path = f"fields[{index}]"
    order: Endian = spec.endian or default_order
    if isinstance(spec, BinaryNumberFieldSpec):
        return _number_field(spec, index, path, order)
    if isinstance(spec, BinaryBitsFieldSpec):
        return _bits_field(spec, index, path, order)
    if isinstance(spec, BinaryStringFieldSpec):
        return _string_field(spec, index, path, order)
    if isinstance(spec, BinaryBytesFieldSpec):
        return _bytes_field(spec, index, path)
    return _computed_field(spec, index, path, order)


def _segments(fields: list[_Field]) -> list[_Segment]:
    """Group fixed fields into Structs: a new one at each variable field or order change."""
    segments: list[_Segment] = []
    codes: list[str] = []
    members: list[_Field] = []
    order: str | None = None

    def close() -> None:
        if members:
            packer = struct.Struct((order or ">") + "".join(codes))
            segments.append(
                _Segment(
                    packer,
                    tuple(member.convert for member in members),
                    tuple(member.index for member in members),
                )
            )
            codes.clear()
            members.clear()

    for field in fields:
        if field.size_bytes is None:
            close()
            order = None
            segments.append(_Segment(None, (field.convert,), (field.index,)))
            continue
        if field.byte_order is not None and order is not None and field.byte_order != order:
            close()
            order = None
        if field.byte_order is not None:
            order = field.byte_order
        codes.append(field.code)
        members.append(field)
    close()
    return segments


class BinaryPayloadEncoder:
    """Packs records into frames of a binary layout, and decodes frames back."""

    __slots__ = (
        "_fields",
        "_fixed_offsets",
        "_patches",
        "_ranges",
        "_segments",
        "content_type",
        "frame_size_bytes",
        "names",
    )

    def __init__(self, spec: BinaryPayloadSpec) -> None:
        self.content_type = "application/octet-stream"
        self.names = spec.names()
        fields = [
            _compile_field(field, index, spec.endian) for index, field in enumerate(spec.fields)
        ]
        sizes = [field.size_bytes for field in fields]
        fixed_offsets: list[int] | None = None
        if all(size is not None for size in sizes):
            fixed_offsets = [0]
            for size in sizes:
                fixed_offsets.append(fixed_offsets[-1] + (size or 0))
        patches: list[_Patch] = []
        self._ranges = spec.field_ranges()
        for index, (first, last) in self._ranges.items():
            field = fields[index]
            field_spec = field.spec
            packer = struct.Struct((field.byte_order or ">") + field.code)
            maximum = (1 << (8 * packer.size)) - 1
            if isinstance(field_spec, BinaryLengthFieldSpec):
                covered = sizes[first : last + 1]
                if all(size is not None for size in covered):
                    # Every covered field has a fixed size: the length is a constant.
                    length_bytes = sum(size or 0 for size in covered)
                    if length_bytes > maximum:
                        raise PayloadError(
                            f"field {field.name!r}: the covered fields are {length_bytes} "
                            f"bytes, more than {field_spec.int_type} holds",
                            path=field.path,
                        )
                    field.convert = _constant(length_bytes)
                    continue
                checksum = None
            elif isinstance(field_spec, BinaryCRC16FieldSpec):
                checksum = crc16_function(field_spec.algorithm)
            else:
                checksum = crc32
            patches.append(_Patch(index, first, last, packer, checksum, maximum))
        self._fields = fields
        self._segments = _segments(fields)
        # Lengths first, as a CRC may cover a length field placed after it; then CRCs
        # in layout order, as a CRC may cover an earlier CRC (never a later one).
        self._patches = tuple(
            sorted(patches, key=lambda patch: (patch.checksum is not None, patch.index))
        )
        self._fixed_offsets = fixed_offsets
        #: The size of every frame, or None when the layout has length-prefixed strings.
        self.frame_size_bytes = fixed_offsets[-1] if fixed_offsets is not None else None

    # -------------------------------------------------------------------------- encode

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Pack one record into a frame; `PayloadError` names the field that cannot be."""
        segments = self._segments
        if len(segments) == 1 and not self._patches:
            segment = segments[0]
            if segment.packer is None:
                return bytes(segment.converters[0](record))
            return segment.packer.pack(*[convert(record) for convert in segment.converters])
        chunks = [
            segment.packer.pack(*[convert(record) for convert in segment.converters])
            if segment.packer is not None
            else segment.converters[0](record)
            for segment in segments
        ]
        if not self._patches:
            return b"".join(chunks)
        frame = bytearray(b"".join(chunks))
        offsets = self._fixed_offsets or self._offsets(chunks)
        self._apply_patches(frame, offsets)
        return bytes(frame)

    def _offsets(self, chunks: list[bytes]) -> list[int]:
        """Start of every field, plus the frame end, for a frame with variable fields."""
        offsets: list[int] = []
        position = 0
        fields = self._fields
        for segment, chunk in zip(self._segments, chunks, strict=True):
            if segment.packer is None:
                offsets.append(position)
            else:
                field_position = position
                for index in segment.field_indexes:
                    offsets.append(field_position)
                    field_position += fields[index].size_bytes or 0
            position += len(chunk)
        offsets.append(position)
        return offsets

    def _apply_patches(self, frame: bytearray, offsets: list[int]) -> None:
        for patch in self._patches:
            start, end = offsets[patch.first], offsets[patch.last + 1]
            if patch.checksum is None:
                value = end - start
                if value > patch.maximum:
                    field = self._fields[patch.index]
                    raise PayloadError(
                        f"field {field.name!r}: length {value} is out of range "
                        f"(allowed 0 .. {patch.maximum})",
                        path=field.path,
                    )
            else:
                value = patch.checksum(bytes(frame[start:end]))
            patch.packer.pack_into(frame, offsets[patch.index], value)

    # -------------------------------------------------------------------------- decode

    def describe(self, data: bytes) -> list[DecodedField]:
        """Decode a frame field by field; `PayloadError` if it is short, long or corrupt."""
        data = bytes(data)
        decoded: list[DecodedField] = []
        offsets: list[int] = []
        position = 0
        for field in self._fields:
            if field.size_bytes is not None and position + field.size_bytes > len(data):
                raise PayloadError(
                    f"the frame is {len(data)} bytes and ends inside field {field.name!r} "
                    f"(bytes {position} .. {position + field.size_bytes - 1})",
                    path=field.path,
                )
            try:
                value, size = field.read(data, position)
            except struct.error:
                raise PayloadError(
                    f"the frame is {len(data)} bytes and ends inside field {field.name!r}",
                    path=field.path,
                ) from None
            offsets.append(position)
            decoded.append(
                DecodedField(field.name, position, size, data[position : position + size], value)
            )
            position += size
        offsets.append(position)
        if position != len(data):
            raise PayloadError(
                f"the frame is {len(data)} bytes but the layout ends after {position} bytes"
            )
        self._verify(data, offsets, decoded)
        return decoded

    def _verify(self, data: bytes, offsets: list[int], decoded: list[DecodedField]) -> None:
        for index, (first, last) in self._ranges.items():
            field = self._fields[index]
            start, end = offsets[first], offsets[last + 1]
            stored = decoded[index].value
            spec = field.spec
            if isinstance(spec, BinaryLengthFieldSpec):
                if stored != end - start:
                    raise PayloadError(
                        f"field {field.name!r} says {stored} bytes but the fields it covers "
                        f"are {end - start} bytes",
                        path=field.path,
                    )
                continue
            checksum = (
                crc16_function(spec.algorithm) if isinstance(spec, BinaryCRC16FieldSpec) else crc32
            )
            expected = checksum(data[start:end])
            if stored != expected:
                raise PayloadError(
                    f"field {field.name!r}: CRC mismatch, the frame has 0x{stored:X} but its "
                    f"bytes give 0x{expected:X}",
                    path=field.path,
                )

    def encode_many(self, columns: Mapping[str, Sequence[Any]], count: int) -> list[bytes]:
        """The frames of ``count`` records given as columns."""
        names = tuple(self.names)
        if not names:
            return [self.encode({}) for _ in range(count)]
        rows = zip(*(columns[name] for name in names), strict=True)
        return [self.encode(dict(zip(names, row, strict=True))) for row in rows]

    def decode(self, data: bytes) -> dict[str, Any]:
        """The physical value of every field of a frame, by field name."""
        return {field.name: field.value for field in self.describe(data)}
