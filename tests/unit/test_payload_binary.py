"""Binary payload layouts: validation, packing, decoding and property tests."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from iotix.errors import PayloadError
from iotix.payload.binary import BinaryPayloadEncoder, DecodedField
from iotix.payload.codec import build_encoder
from iotix.payload.crc import crc16
from iotix.payload.spec import (
    INTEGER_TYPES,
    BinaryNumberFieldSpec,
    BinaryPayloadSpec,
    PayloadSpec,
    ValueReference,
    integer_range,
)

SMART_METER_YAML = """
kind: binary
endian: big
fields:
  - {name: start, type: u8, value: 0x68}
  - {name: length, type: length, int: u8}
  - {name: device_id, type: u32, source: device_number}
  - {name: energy_kwh, type: u32, scale: 0.001}
  - {name: voltage_v, type: u16, scale: 0.1}
  - {name: temperature_c, type: i16, scale: 0.01}
  - name: flags
    type: bits
    size_bytes: 1
    bits:
      - {name: tamper}
      - {name: relay_on}
      - {name: battery_low}
      - {name: tariff, width: 2}
  - {name: serial, type: string, length: 8, encoding: ascii}
  - {name: crc, type: crc16, algorithm: modbus, endian: little}
"""

SMART_METER_RECORD: dict[str, Any] = {
    "device_number": 0x01020304,
    "energy_kwh": 12345.678,
    "voltage_v": 230.4,
    "temperature_c": -5.25,
    "tamper": True,
    "relay_on": False,
    "battery_low": 1,
    "tariff": 2,
    "serial": "SM123456",
}

# Worked out by hand, field by field:
#   68                start byte
#   15                length: 4 + 4 + 2 + 2 + 1 + 8 = 21 bytes from device_id to serial
#   01 02 03 04       device_id 16909060
#   00 BC 61 4E       energy 12345.678 kWh / 0.001 = 12345678
#   09 00             voltage 230.4 V / 0.1 = 2304
#   FD F3             temperature -5.25 °C / 0.01 = -525, two's complement
#   B0                flags 1 0 1 10 000: tamper, relay off, battery low, tariff 2
#   53 4D 31 32 33 34 35 36   "SM123456"
#   2D BD             CRC-16/MODBUS 0xBD2D of the 23 bytes before it, low byte first
SMART_METER_FRAME_HEX = "68 15 01020304 00BC614E 0900 FDF3 B0 534D313233343536 2DBD"


def binary_spec(fields: list[dict[str, Any]], endian: str = "big") -> BinaryPayloadSpec:
    return BinaryPayloadSpec.model_validate({"kind": "binary", "endian": endian, "fields": fields})


def encoder(fields: list[dict[str, Any]], endian: str = "big") -> BinaryPayloadEncoder:
    return BinaryPayloadEncoder(binary_spec(fields, endian))


def smart_meter() -> BinaryPayloadEncoder:
    spec = TypeAdapter(PayloadSpec).validate_python(yaml.safe_load(SMART_METER_YAML))
    assert isinstance(spec, BinaryPayloadSpec)
    return BinaryPayloadEncoder(spec)


# ------------------------------------------------------------------------ smart meter


def test_smart_meter_frame_matches_the_hand_computed_bytes() -> None:
    assert smart_meter().encode(SMART_METER_RECORD) == bytes.fromhex(SMART_METER_FRAME_HEX)


def test_smart_meter_frame_decodes_to_physical_values() -> None:
    decoded = smart_meter().decode(bytes.fromhex(SMART_METER_FRAME_HEX))
    assert decoded == {
        "start": 0x68,
        "length": 21,
        "device_id": 0x01020304,
        "energy_kwh": 12345.678,
        "voltage_v": 230.4,
        "temperature_c": -5.25,
        "flags": {"tamper": 1, "relay_on": 0, "battery_low": 1, "tariff": 2},
        "serial": "SM123456",
        "crc": 0xBD2D,
    }


def test_describe_gives_offset_size_and_raw_bytes_of_each_field() -> None:
    described = smart_meter().describe(bytes.fromhex(SMART_METER_FRAME_HEX))
    assert described[3] == DecodedField(
        name="energy_kwh", offset=6, size=4, raw=bytes.fromhex("00BC614E"), value=12345.678
    )
    assert [(field.name, field.offset, field.size) for field in described][-2:] == [
        ("serial", 15, 8),
        ("crc", 23, 2),
    ]


def test_smart_meter_frame_has_a_fixed_size() -> None:
    assert smart_meter().frame_size_bytes == 25


def test_smart_meter_names_are_the_sources_read() -> None:
    assert smart_meter().names == {
        "device_number",
        "energy_kwh",
        "voltage_v",
        "temperature_c",
        "tamper",
        "relay_on",
        "battery_low",
        "tariff",
        "serial",
    }


def test_references_give_the_path_of_bit_groups() -> None:
    spec = TypeAdapter(PayloadSpec).validate_python(yaml.safe_load(SMART_METER_YAML))
    assert ValueReference("tariff", ("fields", 6, "bits", 3)) in spec.references()


def test_build_encoder_returns_a_binary_encoder_for_a_binary_spec() -> None:
    built = build_encoder(binary_spec([{"name": "a", "type": "u8"}]), default_names=["a"])
    assert built.content_type == "application/octet-stream"


# ----------------------------------------------------------------------------- decode


def test_decode_rejects_a_corrupted_crc() -> None:
    frame = bytearray.fromhex(SMART_METER_FRAME_HEX)
    frame[5] ^= 0x01
    with pytest.raises(PayloadError, match="'crc': CRC mismatch"):
        smart_meter().decode(bytes(frame))


def test_decode_rejects_a_wrong_length_field() -> None:
    layout = encoder([{"name": "n", "type": "length"}, {"name": "a", "type": "u16"}])
    with pytest.raises(PayloadError, match="'n' says 3 bytes"):
        layout.decode(bytes.fromhex("03 0001"))


def test_decode_rejects_a_short_frame() -> None:
    with pytest.raises(PayloadError, match="ends inside field 'serial'"):
        smart_meter().decode(bytes.fromhex(SMART_METER_FRAME_HEX)[:18])


def test_decode_rejects_trailing_bytes() -> None:
    with pytest.raises(PayloadError, match="layout ends after 2 bytes"):
        encoder([{"name": "a", "type": "u16"}]).decode(b"\x00\x01\x02")


def test_decode_rejects_a_prefixed_string_longer_than_the_frame() -> None:
    layout = encoder([{"name": "s", "type": "string", "prefix": "u8"}])
    with pytest.raises(PayloadError, match="'s': the frame ends inside the 5-byte string"):
        layout.decode(b"\x05abc")


# ------------------------------------------------------------------------------ types


def test_u24_packs_big_endian_by_hand() -> None:
    assert encoder([{"name": "a", "type": "u24"}]).encode({"a": 0x010203}) == b"\x01\x02\x03"


def test_i24_packs_little_endian_twos_complement() -> None:
    layout = encoder([{"name": "a", "type": "i24", "endian": "little"}])
    assert layout.encode({"a": -2}) == b"\xfe\xff\xff"


def test_f16_packs_as_ieee_half_precision() -> None:
    assert encoder([{"name": "a", "type": "f16"}]).encode({"a": 1.5}) == b"\x3e\x00"


def test_scaled_float_stores_the_raw_value() -> None:
    layout = encoder([{"name": "a", "type": "f32", "scale": 0.5, "offset": 10}])
    assert layout.encode({"a": 11.0}) == struct.pack(">f", 2.0)


def test_layout_endian_applies_to_every_field() -> None:
    layout = encoder([{"name": "a", "type": "u16"}, {"name": "b", "type": "u32"}], "little")
    assert layout.encode({"a": 1, "b": 2}) == bytes.fromhex("0100 02000000")


def test_field_endian_overrides_the_layout_endian() -> None:
    layout = encoder(
        [{"name": "a", "type": "u16"}, {"name": "b", "type": "u16", "endian": "little"}]
    )
    assert layout.encode({"a": 1, "b": 1}) == bytes.fromhex("0001 0100")


def test_integer_field_rounds_scaled_values_to_nearest() -> None:
    layout = encoder([{"name": "t", "type": "i16", "scale": 0.1, "offset": -40}])
    assert layout.encode({"t": 21.26}) == struct.pack(">h", 613)


def test_boolean_source_packs_as_one_in_an_integer_field() -> None:
    assert encoder([{"name": "a", "type": "u8"}]).encode({"a": True}) == b"\x01"


def test_bits_pack_msb_first_with_zero_padding() -> None:
    layout = encoder(
        [{"name": "f", "type": "bits", "size_bytes": 2, "bits": [
            {"name": "a"}, {"name": "b", "width": 3}, {"name": "c", "width": 4, "value": 9},
        ]}]
    )  # fmt: skip
    assert layout.encode({"a": True, "b": 5}) == bytes([0b1101_1001, 0])


def test_bits_of_three_bytes_pack_by_hand_in_the_field_endian() -> None:
    layout = encoder(
        [{"name": "f", "type": "bits", "size_bytes": 3, "endian": "little",
          "bits": [{"name": "a", "width": 24}]}]
    )  # fmt: skip
    assert layout.encode({"a": 0x010203}) == b"\x03\x02\x01"


def test_bits_accept_a_whole_float() -> None:
    layout = encoder([{"name": "f", "type": "bits", "size_bytes": 1, "bits": [{"name": "a"}]}])
    assert layout.encode({"a": 1.0}) == b"\x80"


def test_fixed_string_is_nul_padded_and_decodes_without_padding() -> None:
    layout = encoder([{"name": "s", "type": "string", "length": 4}])
    assert layout.encode({"s": "ab"}) == b"ab\0\0"


def test_prefixed_string_carries_its_byte_count() -> None:
    layout = encoder([{"name": "s", "type": "string", "prefix": "u16", "endian": "little"}])
    assert layout.encode({"s": "é"}) == b"\x02\x00\xc3\xa9"


def test_length_field_counts_the_actual_bytes_of_a_prefixed_string() -> None:
    layout = encoder(
        [
            {"name": "n", "type": "length"},
            {"name": "s", "type": "string", "prefix": "u8"},
            {"name": "crc", "type": "crc32"},
        ]
    )
    frame = layout.encode({"s": "hello"})
    assert frame[:7] == b"\x06\x05hello"


def test_length_field_range_can_include_itself() -> None:
    layout = encoder(
        [{"name": "n", "type": "length", "from": "n", "to": "a"}, {"name": "a", "type": "u16"}]
    )
    assert layout.encode({"a": 0}) == b"\x03\x00\x00"


def test_bytes_field_accepts_a_hex_string_source() -> None:
    layout = encoder([{"name": "b", "type": "bytes", "length": 2}])
    assert layout.encode({"b": "beef"}) == b"\xbe\xef"


def test_bytes_constant_is_packed_as_given() -> None:
    layout = encoder([{"name": "b", "type": "bytes", "length": 2, "hex": "CAFE"}])
    assert layout.encode({}) == b"\xca\xfe"


def test_crc_covers_only_the_named_range() -> None:
    layout = encoder(
        [
            {"name": "h", "type": "u8", "value": 0xFF},
            {"name": "a", "type": "bytes", "length": 9},
            {"name": "c", "type": "crc16", "algorithm": "xmodem", "from": "a", "to": "a"},
        ]
    )
    assert layout.encode({"a": b"123456789"})[-2:] == b"\x31\xc3"


def test_crc32_field_is_the_zlib_crc() -> None:
    layout = encoder(
        [
            {"name": "a", "type": "bytes", "length": 9},
            {"name": "c", "type": "crc32", "endian": "little"},
        ]
    )
    assert layout.encode({"a": b"123456789"})[-4:] == bytes.fromhex("2639F4CB")


def test_a_crc_may_cover_an_earlier_crc() -> None:
    layout = encoder(
        [
            {"name": "a", "type": "u8"},
            {"name": "c1", "type": "crc16", "algorithm": "arc"},
            {"name": "c2", "type": "crc16", "algorithm": "arc"},
        ]
    )
    frame = layout.encode({"a": 7})
    assert layout.decode(frame)["c2"] == int.from_bytes(frame[3:], "big")


def test_a_crc_may_cover_a_length_field_placed_after_it() -> None:
    layout = encoder(
        [
            {"name": "c", "type": "crc16", "algorithm": "kermit", "from": "n", "to": "s"},
            {"name": "n", "type": "length"},
            {"name": "s", "type": "string", "prefix": "u8"},
        ]
    )
    frame = layout.encode({"s": "abc"})
    assert int.from_bytes(frame[:2], "big") == crc16(b"\x04\x03abc", "kermit")


# ------------------------------------------------------------------- physical ranges


def number_field(**fields: Any) -> BinaryNumberFieldSpec:
    return BinaryNumberFieldSpec.model_validate({"name": "x", **fields})


def test_physical_range_applies_scale() -> None:
    assert number_field(type="u16", scale=0.1).physical_range() == (0.0, 6553.5)


def test_physical_range_applies_offset() -> None:
    assert number_field(type="i8", scale=0.5, offset=-40).physical_range() == (-104.0, 23.5)


def test_physical_range_is_ordered_for_a_negative_scale() -> None:
    assert number_field(type="u8", scale=-1).physical_range() == (-255.0, 0.0)


def test_physical_range_of_f16_is_the_largest_half() -> None:
    assert number_field(type="f16").physical_range() == (-65504.0, 65504.0)


# ------------------------------------------------------------------- encode errors


def test_encode_overflow_names_the_field_the_value_and_the_range() -> None:
    layout = encoder(
        [{"name": "a", "type": "u8"}, {"name": "voltage", "type": "u16", "scale": 0.1}]
    )
    with pytest.raises(
        PayloadError, match=r"'voltage': value 7000 .*allowed 0 \.\. 6553\.5"
    ) as info:
        layout.encode({"a": 1, "voltage": 7000})
    assert info.value.path == "fields[1]"


def test_encode_negative_value_in_unsigned_field_names_the_field() -> None:
    with pytest.raises(PayloadError, match="'a': value -1 is out of range"):
        encoder([{"name": "a", "type": "u32"}]).encode({"a": -1})


def test_encode_float_overflow_names_the_field() -> None:
    with pytest.raises(PayloadError, match="'h': value 70000 is out of range"):
        encoder([{"name": "h", "type": "f16"}]).encode({"h": 70000})


def test_encode_integer_beyond_any_float_in_a_float_field_names_the_field() -> None:
    with pytest.raises(PayloadError, match=r"'h': value 1000000\d* is out of range"):
        encoder([{"name": "h", "type": "f64"}]).encode({"h": 10**400})


def test_encode_text_in_a_float_field_names_the_field() -> None:
    with pytest.raises(PayloadError, match="'h' expects a number, got 'warm'"):
        encoder([{"name": "h", "type": "f32"}]).encode({"h": "warm"})


def test_encode_bit_overflow_names_the_bit_group() -> None:
    layout = encoder(
        [{"name": "f", "type": "bits", "size_bytes": 1, "bits": [{"name": "mode", "width": 2}]}]
    )
    with pytest.raises(
        PayloadError, match=r"f\.mode: value 4 is out of range \(allowed 0 \.\. 3\)"
    ):
        layout.encode({"mode": 4})


def test_encode_string_too_long_names_the_field() -> None:
    layout = encoder([{"name": "serial", "type": "string", "length": 4}])
    with pytest.raises(PayloadError, match="'serial': 'ABCDE' is 5 bytes, more than 4"):
        layout.encode({"serial": "ABCDE"})


def test_encode_non_ascii_in_ascii_string_names_the_field() -> None:
    layout = encoder([{"name": "s", "type": "string", "length": 4, "encoding": "ascii"}])
    with pytest.raises(PayloadError, match="'s': 'é' cannot be encoded as ascii"):
        layout.encode({"s": "é"})


def test_encode_missing_record_name_names_it() -> None:
    layout = encoder([{"name": "temperature", "type": "i16", "source": "temp_c"}])
    with pytest.raises(
        PayloadError, match="no value named 'temp_c' \\(read by field 'temperature'\\)"
    ):
        layout.encode({"temperature": 1})


def test_encode_text_in_a_number_field_names_the_field() -> None:
    with pytest.raises(PayloadError, match="'a' expects a finite number, got 'x'"):
        encoder([{"name": "a", "type": "u8"}]).encode({"a": "x"})


def test_encode_nan_in_an_integer_field_names_the_field() -> None:
    with pytest.raises(PayloadError, match="'a' expects a finite number, got nan"):
        encoder([{"name": "a", "type": "u8", "scale": 0.5}]).encode({"a": math.nan})


def test_encode_bytes_of_the_wrong_length_names_the_field() -> None:
    layout = encoder([{"name": "key", "type": "bytes", "length": 4}])
    with pytest.raises(PayloadError, match="'key' holds exactly 4 bytes, got 2"):
        layout.encode({"key": b"ab"})


def test_encode_length_overflow_of_a_prefixed_string_names_the_length_field() -> None:
    layout = encoder(
        [{"name": "n", "type": "length"}, {"name": "s", "type": "string", "prefix": "u16"}]
    )
    with pytest.raises(PayloadError, match="'n': length 302 is out of range"):
        layout.encode({"s": "x" * 300})


def test_build_rejects_a_constant_length_the_length_type_cannot_hold() -> None:
    spec = binary_spec(
        [{"name": "n", "type": "length"}, {"name": "b", "type": "bytes", "length": 256}]
    )
    with pytest.raises(PayloadError, match="'n': the covered fields are 256 bytes"):
        BinaryPayloadEncoder(spec)


# -------------------------------------------------------------- validation errors


def test_constant_overflowing_after_scale_is_rejected_with_its_path() -> None:
    fields = [
        {"name": "h", "type": "u8", "value": 0x68},
        {"name": "v", "type": "u8", "value": 30, "scale": 0.1},
    ]
    with pytest.raises(
        ValidationError, match=r"fields\.1\.u8\n.*constant 30 does not fit u8 with scale 0\.1"
    ):
        binary_spec(fields)


def test_unknown_from_name_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"fields\[1\]\.from: no field named 'hdr'"):
        binary_spec([{"name": "a", "type": "u8"}, {"name": "c", "type": "crc32", "from": "hdr"}])


def test_unknown_to_name_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"fields\[0\]\.to: no field named 'body'"):
        binary_spec([{"name": "n", "type": "length", "to": "body"}, {"name": "a", "type": "u8"}])


def test_range_from_after_to_is_rejected() -> None:
    fields = [
        {"name": "a", "type": "u8"},
        {"name": "b", "type": "u8"},
        {"name": "c", "type": "crc16", "algorithm": "arc", "from": "b", "to": "a"},
    ]
    with pytest.raises(
        ValidationError, match=r"fields\[2\] \('c'\): the range from 'b' to 'a' is empty"
    ):
        binary_spec(fields)


def test_crc_covering_itself_is_rejected() -> None:
    fields = [{"name": "a", "type": "u8"}, {"name": "c", "type": "crc32", "to": "c"}]
    with pytest.raises(ValidationError, match=r"fields\[1\] \('c'\): the CRC range covers itself"):
        binary_spec(fields)


def test_crc_as_first_field_without_range_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"fields\[0\] \('c'\): the range .* is empty"):
        binary_spec([{"name": "c", "type": "crc32"}, {"name": "a", "type": "u8"}])


def test_duplicate_field_names_are_rejected() -> None:
    with pytest.raises(ValidationError, match=r"fields\[2\]: duplicate field name 'a'"):
        binary_spec(
            [{"name": "a", "type": "u8"}, {"name": "b", "type": "u8"}, {"name": "a", "type": "u16"}]
        )


def test_duplicate_bit_names_are_rejected() -> None:
    bits = [{"name": "x"}, {"name": "x"}]
    with pytest.raises(ValidationError, match=r"bits\[1\]: duplicate bit name 'x'"):
        binary_spec([{"name": "f", "type": "bits", "size_bytes": 1, "bits": bits}])


def test_bits_wider_than_their_bytes_are_rejected() -> None:
    bits = [{"name": "a", "width": 5}, {"name": "b", "width": 4}]
    with pytest.raises(
        ValidationError, match="bits of 'flags' need 9 bits but size_bytes 1 holds 8"
    ):
        binary_spec([{"name": "flags", "type": "bits", "size_bytes": 1, "bits": bits}])


def test_bit_constant_wider_than_its_group_is_rejected() -> None:
    bits = [{"name": "a", "width": 2, "value": 4}]
    with pytest.raises(ValidationError, match=r"bits\.0\n.*constant 4 does not fit 2 bit"):
        binary_spec([{"name": "f", "type": "bits", "size_bytes": 1, "bits": bits}])


def test_source_and_value_together_are_rejected() -> None:
    with pytest.raises(ValidationError, match=r"either 'source' .* or 'value' .*, not both"):
        binary_spec([{"name": "a", "type": "u8", "source": "x", "value": 1}])


def test_zero_scale_is_rejected() -> None:
    with pytest.raises(ValidationError, match="scale must be a finite, non-zero number"):
        binary_spec([{"name": "a", "type": "u8", "scale": 0}])


def test_string_without_length_or_prefix_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"exactly one of 'length' .* and 'prefix'"):
        binary_spec([{"name": "s", "type": "string"}])


def test_string_constant_longer_than_its_length_is_rejected() -> None:
    with pytest.raises(ValidationError, match="constant 'ABCDE' is 5 bytes, more than 4"):
        binary_spec([{"name": "s", "type": "string", "length": 4, "value": "ABCDE"}])


def test_bad_hex_constant_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"fields\.0\.bytes\n.*not valid hex"):
        binary_spec([{"name": "b", "type": "bytes", "length": 2, "hex": "zz"}])


def test_hex_constant_of_the_wrong_length_is_rejected() -> None:
    with pytest.raises(ValidationError, match="hex constant is 1 bytes but length is 2"):
        binary_spec([{"name": "b", "type": "bytes", "length": 2, "hex": "01"}])


def test_unknown_field_type_is_rejected() -> None:
    with pytest.raises(ValidationError, match="'u128'"):
        binary_spec([{"name": "a", "type": "u128"}])


def test_unknown_key_in_a_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"fields\.0\.u8\.sclae"):
        binary_spec([{"name": "a", "type": "u8", "sclae": 0.1}])


# ------------------------------------------------------------------ property tests

NUMBER_TYPES = [*INTEGER_TYPES, "f16", "f32", "f64"]
SCALES = [0.1, 0.01, 0.001, 0.5, 2.0, 0.25, -0.1, 1.0]
ENDIANS = [None, "big", "little"]


@st.composite
def number_fields(draw: st.DrawFn, name: str) -> tuple[dict[str, Any], dict[str, Any], Any, float]:
    """A number field, its record entry, the decoded value expected and the tolerance."""
    type_name = draw(st.sampled_from(NUMBER_TYPES))
    spec: dict[str, Any] = {
        "name": name,
        "type": type_name,
        "endian": draw(st.sampled_from(ENDIANS)),
    }
    if type_name.startswith("f"):
        width = {"f16": 16, "f32": 32, "f64": 64}[type_name]
        value: Any = draw(st.floats(width=width, allow_nan=False, allow_infinity=False))
        tolerance = 0.0
    elif INTEGER_TYPES[type_name] <= 4 and draw(st.booleans()):
        # 64-bit raw values do not survive a trip through float scaling, so only
        # narrower types get a scale and an offset.
        spec["scale"] = draw(st.sampled_from(SCALES))
        spec["offset"] = draw(st.sampled_from([0, -40, 273.15, 1000]))
        low, high = BinaryNumberFieldSpec.model_validate(spec).physical_range()
        value = draw(st.floats(min_value=low, max_value=high))
        tolerance = abs(spec["scale"]) / 2 + 1e-9 * max(1.0, abs(value))
    else:
        low_int, high_int = integer_range(type_name)
        value = draw(st.integers(low_int, high_int))
        tolerance = 0.0
    if draw(st.integers(0, 4)) == 0:
        spec["value"] = value
        return spec, {}, value, tolerance
    spec["source"] = f"{name}_src"
    return spec, {f"{name}_src": value}, value, tolerance


@st.composite
def bits_fields(draw: st.DrawFn, name: str) -> tuple[dict[str, Any], dict[str, Any], Any, float]:
    size_bytes = draw(st.integers(1, 8))
    free = size_bytes * 8
    bits: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    expected: dict[str, int] = {}
    while free and (not bits or draw(st.booleans())):
        width = draw(st.integers(1, min(free, 16)))
        free -= width
        bit_name = f"{name}_b{len(bits)}"
        value = draw(st.booleans() if width == 1 else st.integers(0, (1 << width) - 1))
        bits.append({"name": bit_name, "width": width})
        record[bit_name] = value
        expected[bit_name] = int(value)
    spec = {"name": name, "type": "bits", "size_bytes": size_bytes, "bits": bits}
    spec["endian"] = draw(st.sampled_from(ENDIANS))
    return spec, record, expected, 0.0


@st.composite
def text_fields(draw: st.DrawFn, name: str) -> tuple[dict[str, Any], dict[str, Any], Any, float]:
    if draw(st.booleans()):
        length = draw(st.integers(1, 12))
        alphabet = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
        value = draw(st.text(alphabet, max_size=length))
        spec = {"name": name, "type": "string", "length": length, "encoding": "ascii"}
    else:
        value = draw(st.text(max_size=20))
        spec = {"name": name, "type": "string", "prefix": draw(st.sampled_from(["u8", "u16"]))}
    return spec, {name: value}, value, 0.0


@st.composite
def bytes_fields(draw: st.DrawFn, name: str) -> tuple[dict[str, Any], dict[str, Any], Any, float]:
    length = draw(st.integers(1, 8))
    value = draw(st.binary(min_size=length, max_size=length))
    source = value.hex() if draw(st.booleans()) else value
    return {"name": name, "type": "bytes", "length": length}, {name: source}, value, 0.0


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[dict[str, Any]], str, dict[str, Any], dict[str, Any]]:
    """Fields, layout endian, a record, and the decoded value expected per checked field."""
    count = draw(st.integers(1, 8))
    fields: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    expected: dict[str, tuple[Any, float]] = {}
    for index in range(count):
        name = f"f{index}"
        kind = draw(
            st.sampled_from([number_fields, number_fields, bits_fields, text_fields, bytes_fields])
        )
        spec, entries, value, tolerance = draw(kind(name))
        fields.append(spec)
        record.update(entries)
        expected[name] = (value, tolerance)
    if draw(st.booleans()):
        fields.insert(
            0, {"name": "len", "type": "length", "int": draw(st.sampled_from(["u16", "u32"]))}
        )
    crc = draw(
        st.sampled_from([None, "crc32", "modbus", "ccitt-false", "xmodem", "kermit", "arc", "x25"])
    )
    if crc == "crc32":
        fields.append({"name": "crc", "type": "crc32", "endian": draw(st.sampled_from(ENDIANS))})
    elif crc is not None:
        fields.append(
            {
                "name": "crc",
                "type": "crc16",
                "algorithm": crc,
                "endian": draw(st.sampled_from(ENDIANS)),
            }
        )
    return fields, draw(st.sampled_from(["big", "little"])), record, expected


@given(layouts())
def test_generated_layouts_decode_to_the_encoded_values(
    case: tuple[list[dict[str, Any]], str, dict[str, Any], dict[str, Any]],
) -> None:
    fields, endian, record, expected = case
    layout = encoder(fields, endian)
    decoded = layout.decode(layout.encode(record))
    for name, (value, tolerance) in expected.items():
        if tolerance:
            assert math.isclose(decoded[name], value, rel_tol=0, abs_tol=tolerance), name
        else:
            assert decoded[name] == value, name


@given(layouts())
def test_generated_fixed_layouts_have_their_announced_size(
    case: tuple[list[dict[str, Any]], str, dict[str, Any], dict[str, Any]],
) -> None:
    fields, endian, record, _ = case
    layout = encoder(fields, endian)
    frame = layout.encode(record)
    assert layout.frame_size_bytes in (None, len(frame))


STRUCT_CODES = {
    "u8": "B",
    "u16": "H",
    "u32": "I",
    "u64": "Q",
    "i8": "b",
    "i16": "h",
    "i32": "i",
    "i64": "q",
}


@st.composite
def integer_cases(draw: st.DrawFn) -> tuple[str, str, int]:
    type_name = draw(st.sampled_from(list(INTEGER_TYPES)))
    low, high = integer_range(type_name)
    return type_name, draw(st.sampled_from(["big", "little"])), draw(st.integers(low, high))


@given(integer_cases())
def test_integer_fields_pack_like_struct(case: tuple[str, str, int]) -> None:
    type_name, endian, value = case
    order = ">" if endian == "big" else "<"
    if type_name in STRUCT_CODES:
        expected = struct.pack(order + STRUCT_CODES[type_name], value)
    else:
        # 24-bit: the 32-bit struct packing without its most significant byte.
        wide = struct.pack(order + ("i" if type_name == "i24" else "I"), value)
        expected = wide[1:] if endian == "big" else wide[:3]
    layout = encoder([{"name": "a", "type": type_name}], endian)
    assert layout.encode({"a": value}) == expected


@given(integer_cases())
def test_integer_fields_unpack_like_struct(case: tuple[str, str, int]) -> None:
    type_name, endian, value = case
    layout = encoder([{"name": "a", "type": type_name}], endian)
    assert layout.decode(layout.encode({"a": value})) == {"a": value}


@given(
    type_name=st.sampled_from(["f16", "f32", "f64"]),
    endian=st.sampled_from(["big", "little"]),
    value=st.floats(width=16),
)
def test_float_fields_pack_like_struct(type_name: str, endian: str, value: float) -> None:
    code = {"f16": "e", "f32": "f", "f64": "d"}[type_name]
    expected = struct.pack(("<" if endian == "little" else ">") + code, value)
    assert encoder([{"name": "a", "type": type_name}], endian).encode({"a": value}) == expected
