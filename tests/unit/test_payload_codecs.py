"""Template, text, CSV and raw payloads: specs, encoders and differential property tests."""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

import cbor2
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from iotix.errors import PayloadError
from iotix.payload.codec import Encoder, build_encoder, render_value
from iotix.payload.spec import PayloadSpec, ValueReference, parse_placeholders

ADAPTER: TypeAdapter[PayloadSpec] = TypeAdapter(PayloadSpec)
DEFAULT_NAMES = ["device_id", "ts", "temperature"]
RECORD: dict[str, Any] = {"device_id": "meter-7", "ts": 1700000000, "temperature": 21.456}


def spec(data: dict[str, Any]) -> PayloadSpec:
    return ADAPTER.validate_python(data)


def build(data: dict[str, Any], default_names: list[str] | None = None) -> Encoder:
    return build_encoder(
        spec(data), default_names=DEFAULT_NAMES if default_names is None else default_names
    )


# ------------------------------------------------------------------------------ json


def test_json_without_template_is_a_flat_object_of_the_default_names_in_order() -> None:
    assert (
        build({"kind": "json"}).encode(RECORD)
        == b'{"device_id":"meter-7","ts":1700000000,"temperature":21.456}'
    )


def test_json_exact_placeholder_keeps_the_value_type() -> None:
    encoder = build(
        {"kind": "json", "template": {"t": "${temperature}", "on": "${on}", "x": "${x}"}}
    )
    assert json.loads(encoder.encode({"temperature": 21.5, "on": True, "x": None})) == {
        "t": 21.5,
        "on": True,
        "x": None,
    }


def test_json_placeholder_with_format_spec_becomes_text() -> None:
    encoder = build({"kind": "json", "template": {"t": "${temperature:.1f}"}})
    assert encoder.encode(RECORD) == b'{"t":"21.5"}'


def test_json_placeholder_inside_text_is_interpolated() -> None:
    encoder = build(
        {"kind": "json", "template": {"topic": "site/${device_id}/t=${temperature:.2f}"}}
    )
    assert encoder.encode(RECORD) == b'{"topic":"site/meter-7/t=21.46"}'


def test_interpolated_boolean_and_none_render_as_json_words() -> None:
    encoder = build({"kind": "json", "template": "a=${a} b=${b}"})
    assert encoder.encode({"a": False, "b": None}) == b'"a=false b="'


def test_double_dollar_is_a_literal_dollar() -> None:
    encoder = build({"kind": "json", "template": {"price": "$$${price}", "raw": "$${x}"}})
    assert encoder.encode({"price": 3}) == b'{"price":"$3","raw":"${x}"}'


def test_json_keys_may_be_placeholders() -> None:
    encoder = build({"kind": "json", "template": {"${device_id}": [{"ts": "${ts}"}]}})
    assert encoder.encode(RECORD) == b'{"meter-7":[{"ts":1700000000}]}'


def test_json_numeric_keys_from_yaml_are_written_as_text() -> None:
    assert build({"kind": "json", "template": {1: "${ts}"}}).encode(RECORD) == b'{"1":1700000000}'


def test_json_constant_template_encodes_the_same_bytes_every_time() -> None:
    encoder = build({"kind": "json", "template": {"v": 1, "tags": ["a", "b"]}})
    assert encoder.encode({}) == encoder.encode(RECORD) == b'{"v":1,"tags":["a","b"]}'


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(0, 9), max_size=3),
)


@given(
    rows=st.lists(st.tuples(JSON_VALUES, JSON_VALUES, st.integers(0, 9)), max_size=20),
    template=st.sampled_from(
        [
            None,
            {"a": "${a}", "nested": {"b": ["${b}", 1, "50%"], "c": "${c:03d}%"}},
            {"only": "${a}"},
            ["${c}", "${a}", {"k": "x ${b} y"}],
            {"const": "$$5 100%"},
        ]
    ),
)
def test_json_encode_many_is_encode_of_each_record(
    rows: list[tuple[Any, Any, int]], template: Any
) -> None:
    # encode_many renders text around slots and splits column arrays at their commas;
    # whatever the values (text with commas, lists, nan), the bytes are encode()'s.
    encoder = build({"kind": "json", "template": template}, default_names=["a", "b", "c"])
    columns = {name: [row[i] for row in rows] for i, name in enumerate("abc")}
    expected = [encoder.encode(dict(zip("abc", row, strict=True))) for row in rows]
    assert encoder.encode_many(columns, len(rows)) == expected


def test_json_encode_many_reports_a_missing_column_with_its_template_path() -> None:
    encoder = build({"kind": "json", "template": {"v": {"t": "${temperature}"}}})
    with pytest.raises(PayloadError, match=r"template\.v\.t") as caught:
        encoder.encode_many({"humidity": [1.0]}, 1)
    assert "temperature" in str(caught.value)


def test_json_encode_many_with_interpolated_keys_matches_encode() -> None:
    encoder = build({"kind": "json", "template": {"${device_id}": "${temperature}"}})
    columns = {"device_id": ["a", "b"], "temperature": [1.5, 2.5]}
    assert encoder.encode_many(columns, 2) == [b'{"a":1.5}', b'{"b":2.5}']


def test_json_decode_returns_the_document() -> None:
    assert build({"kind": "json"}).decode(b'{"a":[1,2.5]}') == {"a": [1, 2.5]}


def test_json_decode_of_garbage_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match="not valid JSON"):
        build({"kind": "json"}).decode(b"{")


def test_json_value_that_cannot_be_encoded_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match="cannot encode as JSON"):
        build({"kind": "json", "template": "${big}"}).encode({"big": 2**70})


def test_missing_record_name_is_reported_with_its_template_path() -> None:
    encoder = build({"kind": "json", "template": {"sensors": [{"value": "${humidity}"}]}})
    with pytest.raises(
        PayloadError, match=r"template\.sensors\[0\]\.value: .*no value named 'humidity'"
    ) as info:
        encoder.encode(RECORD)
    assert info.value.path == "template.sensors[0].value"


def test_missing_default_name_is_reported() -> None:
    with pytest.raises(PayloadError, match="no value named 'temperature'"):
        build({"kind": "json"}).encode({"device_id": "a", "ts": 1})


def test_format_spec_that_does_not_fit_the_value_is_a_payload_error() -> None:
    encoder = build({"kind": "json", "template": "${device_id:.2f}"})
    with pytest.raises(
        PayloadError, match=r"value 'device_id' = 'meter-7' cannot be formatted with '\.2f'"
    ):
        encoder.encode(RECORD)


# ------------------------------------------------------------------- cbor and msgpack


def test_cbor_template_decodes_with_cbor2() -> None:
    encoder = build({"kind": "cbor", "template": {"id": "${device_id}", "v": ["${temperature}"]}})
    assert cbor2.loads(encoder.encode(RECORD)) == {"id": "meter-7", "v": [21.456]}


def test_cbor_keeps_bytes_values() -> None:
    encoder = build({"kind": "cbor", "template": {"b": "${blob}"}})
    assert encoder.decode(encoder.encode({"blob": b"\x00\x01"})) == {"b": b"\x00\x01"}


def test_msgpack_without_template_decodes_with_msgpack() -> None:
    payload = build({"kind": "msgpack"}).encode(RECORD)
    assert msgpack.unpackb(payload) == RECORD


def test_msgpack_decode_of_garbage_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match="not valid MessagePack"):
        build({"kind": "msgpack"}).decode(b"\xc1")


def test_cbor_decode_of_garbage_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match="not valid CBOR"):
        build({"kind": "cbor"}).decode(b"\x1c")


@pytest.mark.parametrize(
    ("kind", "content_type"),
    [
        ("json", "application/json"),
        ("cbor", "application/cbor"),
        ("msgpack", "application/msgpack"),
        ("csv", "text/csv"),
    ],
)
def test_content_type_follows_the_kind(kind: str, content_type: str) -> None:
    assert build({"kind": kind}).content_type == content_type


def test_template_names_are_every_placeholder_name() -> None:
    payload = spec(
        {"kind": "json", "template": {"${device_id}": {"t": "${temperature}", "s": "${ts:d}"}}}
    )
    assert payload.names() == {"device_id", "temperature", "ts"}


def test_template_references_carry_the_path() -> None:
    payload = spec({"kind": "cbor", "template": {"sensors": [1, {"v": "x=${hum}"}]}})
    assert payload.references() == (ValueReference("hum", ("template", "sensors", 1, "v")),)


def test_encoder_names_without_template_are_the_default_names() -> None:
    assert build({"kind": "msgpack"}).names == frozenset(DEFAULT_NAMES)


def test_non_binary_payloads_describe_nothing() -> None:
    assert build({"kind": "json"}).describe(b"{}") == []


# -------------------------------------------------------------- template validation


def test_unclosed_placeholder_is_rejected_with_its_path() -> None:
    with pytest.raises(ValidationError, match=r"template\.a\[1\]: malformed placeholder"):
        spec({"kind": "json", "template": {"a": ["ok", "${temperature"]}})


def test_placeholder_with_an_invalid_name_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"malformed placeholder '\$\{1st\}'"):
        spec({"kind": "msgpack", "template": "${1st}"})


def test_empty_placeholder_is_rejected() -> None:
    with pytest.raises(ValidationError, match="malformed placeholder"):
        spec({"kind": "json", "template": "${}"})


def test_placeholder_with_nested_braces_is_rejected() -> None:
    with pytest.raises(ValidationError, match="malformed placeholder"):
        spec({"kind": "json", "template": "${a:{b}}"})


def test_placeholder_with_a_bad_format_spec_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"format spec '\.2q' is not valid"):
        spec({"kind": "cbor", "template": "${t:.2q}"})


def test_unsupported_template_value_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"template\.when: unsupported value of type set"):
        spec({"kind": "json", "template": {"when": {1, 2}}})


def test_parse_placeholders_splits_text_and_placeholders() -> None:
    assert [
        str(part) if isinstance(part, str) else part.name
        for part in parse_placeholders("a ${b:>4} c")
    ] == [
        "a ",
        "b",
        " c",
    ]


# ------------------------------------------------------------------------------ text


def test_text_template_formats_named_values() -> None:
    encoder = build({"kind": "text", "template": "{device_id} temp={temperature:.1f}"})
    assert encoder.encode(RECORD) == b"meter-7 temp=21.5"


def test_text_content_type_is_plain_text() -> None:
    assert build({"kind": "text", "template": "x"}).content_type == "text/plain"


def test_text_decode_returns_a_string() -> None:
    assert build({"kind": "text", "template": "x"}).decode("é".encode()) == "é"


def test_text_names_are_the_template_fields() -> None:
    assert spec({"kind": "text", "template": "{a}{b!r:>5}{{c}}"}).names() == {"a", "b"}


def test_text_missing_name_is_a_payload_error_naming_it() -> None:
    with pytest.raises(PayloadError, match="template: the record has no value named 'humidity'"):
        build({"kind": "text", "template": "{humidity}%"}).encode(RECORD)


def test_text_format_spec_that_does_not_fit_the_value_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match="cannot format the record"):
        build({"kind": "text", "template": "{device_id:.1f}"}).encode(RECORD)


def test_text_unbalanced_brace_is_rejected() -> None:
    with pytest.raises(ValidationError, match="not a valid format string"):
        spec({"kind": "text", "template": "{device_id"})


def test_text_positional_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match="positional fields"):
        spec({"kind": "text", "template": "{} {0}"})


def test_text_attribute_access_is_rejected() -> None:
    with pytest.raises(
        ValidationError, match=r"field \{device_id\.__class__\} is not a plain name"
    ):
        spec({"kind": "text", "template": "{device_id.__class__}"})


def test_text_bad_format_spec_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"field \{t\}: format spec"):
        spec({"kind": "text", "template": "{t:.2q}"})


# ------------------------------------------------------------------------------- csv


def test_csv_without_columns_writes_the_default_names_in_order() -> None:
    assert build({"kind": "csv"}).encode(RECORD) == b"meter-7,1700000000,21.456"


def test_csv_quotes_cells_with_the_delimiter_or_quotes() -> None:
    encoder = build({"kind": "csv", "columns": ["a", "b", "c"], "delimiter": ";"})
    assert (
        encoder.encode({"a": "x;y", "b": 'say "hi"', "c": "plain"}) == b'"x;y";"say ""hi""";plain'
    )


def test_csv_renders_booleans_and_none_like_json() -> None:
    encoder = build({"kind": "csv", "columns": ["a", "b"]})
    assert encoder.encode({"a": True, "b": None}) == b"true,"


def test_csv_missing_column_is_a_payload_error_with_its_path() -> None:
    with pytest.raises(PayloadError, match=r"columns\[1\]: the record has no value named 'rssi'"):
        build({"kind": "csv", "columns": ["ts", "rssi"]}).encode(RECORD)


def test_csv_multi_character_delimiter_is_rejected() -> None:
    with pytest.raises(ValidationError, match="delimiter must be one character"):
        spec({"kind": "csv", "delimiter": "::"})


def test_csv_names_are_the_columns() -> None:
    assert spec({"kind": "csv", "columns": ["ts", "rssi"]}).names() == {"ts", "rssi"}


# ------------------------------------------------------------------------------- raw


def test_raw_hex_payload_is_constant() -> None:
    assert build({"kind": "raw", "hex": "DE AD be ef"}).encode(RECORD) == b"\xde\xad\xbe\xef"


def test_raw_base64_payload_is_constant() -> None:
    assert build({"kind": "raw", "base64": "3q2+7w=="}).encode({}) == b"\xde\xad\xbe\xef"


def test_raw_payload_reads_no_names() -> None:
    assert build({"kind": "raw", "hex": "00"}).names == frozenset()


def test_raw_bad_hex_is_rejected_with_its_path() -> None:
    with pytest.raises(ValidationError, match=r"raw\.hex\n.*not valid hex"):
        spec({"kind": "raw", "hex": "xyz"})


def test_raw_bad_base64_is_rejected() -> None:
    with pytest.raises(ValidationError, match="not valid base64"):
        spec({"kind": "raw", "base64": "!!!"})


def test_raw_with_both_hex_and_base64_is_rejected() -> None:
    with pytest.raises(ValidationError, match="exactly one of 'hex' and 'base64'"):
        spec({"kind": "raw", "hex": "00", "base64": "AA=="})


def test_raw_with_neither_hex_nor_base64_is_rejected() -> None:
    with pytest.raises(ValidationError, match="exactly one of 'hex' and 'base64'"):
        spec({"kind": "raw"})


def test_unknown_payload_kind_is_rejected() -> None:
    with pytest.raises(ValidationError, match="'protobuf'"):
        spec({"kind": "protobuf"})


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"json\.tempalte"):
        spec({"kind": "json", "tempalte": {}})


# -------------------------------------------------------------------- property tests

NAMES = ["a", "b", "c", "temp_c", "_x"]
# Values every one of JSON, CBOR and MessagePack carries unchanged.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
LITERAL_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="$"), max_size=8)
RECORDS = st.fixed_dictionaries(dict.fromkeys(NAMES, SCALARS))


def substitute(template: Any, record: dict[str, Any]) -> Any:
    """The object a template should produce, worked out independently of the codec."""
    if isinstance(template, dict):
        return {key: substitute(value, record) for key, value in template.items()}
    if isinstance(template, list):
        return [substitute(item, record) for item in template]
    if isinstance(template, str):
        exact = re.fullmatch(r"\$\{(\w+)\}", template)
        if exact:
            return record[exact.group(1)]
        return re.sub(r"\$\{(\w+)\}", lambda match: render_value(record[match.group(1)]), template)
    return template


def interpolated_text(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(NAMES))
    return draw(LITERAL_TEXT) + "${" + name + "}" + draw(LITERAL_TEXT)


LEAVES = (
    SCALARS.filter(lambda value: not isinstance(value, str))
    | LITERAL_TEXT
    | st.sampled_from(NAMES).map(lambda name: "${" + name + "}")
    | st.composite(interpolated_text)()
)
TEMPLATES = st.recursive(
    LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(LITERAL_TEXT, children, max_size=4)
    ),
    max_leaves=12,
).filter(lambda template: template is not None)  # no template means the default object


@given(template=TEMPLATES, record=RECORDS)
def test_json_template_decodes_with_json_to_the_substituted_template(
    template: Any, record: dict[str, Any]
) -> None:
    encoded = build({"kind": "json", "template": template}).encode(record)
    assert json.loads(encoded) == substitute(template, record)


@given(template=TEMPLATES, record=RECORDS)
def test_cbor_template_decodes_with_cbor2_to_the_substituted_template(
    template: Any, record: dict[str, Any]
) -> None:
    encoded = build({"kind": "cbor", "template": template}).encode(record)
    assert cbor2.loads(encoded) == substitute(template, record)


@given(template=TEMPLATES, record=RECORDS)
def test_msgpack_template_decodes_with_msgpack_to_the_substituted_template(
    template: Any, record: dict[str, Any]
) -> None:
    encoded = build({"kind": "msgpack", "template": template}).encode(record)
    assert msgpack.unpackb(encoded, strict_map_key=False) == substitute(template, record)


@given(record=RECORDS, delimiter=st.sampled_from([",", ";", "\t", "|"]))
def test_csv_line_parses_with_the_csv_module_to_the_rendered_values(
    record: dict[str, Any], delimiter: str
) -> None:
    line = build({"kind": "csv", "columns": NAMES, "delimiter": delimiter}).encode(record).decode()
    parsed = next(csv.reader(io.StringIO(line, newline=""), delimiter=delimiter))
    assert parsed == [render_value(record[name]) for name in NAMES]


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "json"},
        {"kind": "json", "template": {"t": "${temperature}", "id": "dev-${device_id}"}},
        {"kind": "cbor"},
        {"kind": "msgpack"},
        {"kind": "text", "template": "{device_id} {temperature:.1f}"},
        {"kind": "csv"},
        {"kind": "raw", "hex": "cafe"},
        {
            "kind": "binary",
            "fields": [
                {"name": "temperature", "type": "i16", "scale": 0.1},
                {"name": "crc", "type": "crc16", "algorithm": "modbus"},
            ],
        },
    ],
    ids=lambda spec: f"{spec['kind']}-template" if spec.get("template") else spec["kind"],
)
def test_encode_many_equals_encoding_each_record(spec: dict[str, Any]) -> None:
    encoder = build_encoder(
        TypeAdapter(PayloadSpec).validate_python(spec), default_names=("device_id", "temperature")
    )
    columns = {"device_id": ["a", "b", "c"], "temperature": [20.5, -3.0, 11.2]}
    records = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
    assert encoder.encode_many(columns, 3) == [encoder.encode(r) for r in records]
