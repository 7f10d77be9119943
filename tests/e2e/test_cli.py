"""The ``iotix`` command line end to end: run as a subprocess, as a user runs it.

Exit codes are the CLI's contract: 0 success, 2 usage or invalid input. Output is read
as a pipe reads it (no colour, 80 columns), which is what CI logs and scripts see.
"""

from __future__ import annotations

import json
import re
import socket
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

import iotix

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable

    RunCLI = Callable[..., subprocess.CompletedProcess[str]]
    WriteFile = Callable[[str, str], Path]

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "examples" / "device-models"
THERMOSTAT = EXAMPLES_DIR / "thermostat.yaml"
COMMITTED_SCHEMA = REPO_ROOT / "schemas" / "device-model.schema.json"
MODEL_SUFFIXES = (".yaml", ".yml", ".json")
START = "2026-01-01T00:00:00Z"
EXIT_OK = 0
EXIT_INVALID = 2

EXAMPLE_FILES = sorted(p for p in EXAMPLES_DIR.iterdir() if p.suffix in MODEL_SUFFIXES)
# `kind: binary` in YAML, `"kind": "binary"` in JSON.
_BINARY_KIND = re.compile(r"""["']?kind["']?\s*:\s*["']?binary\b""")
BINARY_EXAMPLES = [p for p in EXAMPLE_FILES if _BINARY_KIND.search(p.read_text(encoding="utf-8"))]

VALID_MODEL = """
    name: sensor
    fields:
      temperature: {kind: uniform, low: 10, high: 30}
    messages:
      telemetry:
        schedule: {kind: interval, interval_s: 10}
    """

# `interval` for `interval_s`, on line 8.
TYPO_MODEL = """
    name: sensor
    fields:
      temperature: {kind: uniform, low: 10, high: 30}
    messages:
      telemetry:
        schedule:
          kind: interval
          interval: 10
    """

# A frame as a Modbus meter sends it: a scaled u16 and the CRC, low byte first.
METER_MODEL = """
    name: meter
    description: A meter that sends a binary frame
    fields:
      voltage: {kind: uniform, low: 220, high: 240, round: 1}
    messages:
      telemetry:
        schedule: {kind: interval, interval_s: 60}
        payload:
          kind: binary
          fields:
            - {name: voltage, type: u16, scale: 0.1}
            - {name: crc, type: crc16, algorithm: modbus, endian: little}
    """

TEXT_CONTENT_TYPES = ("application/json", "text/plain", "text/csv")


# --- helpers -------------------------------------------------------------------------


def _flat(text: str) -> str:
    """The text with every run of whitespace as one space, so wrapped lines rejoin."""
    return " ".join(text.split())


def _error_entries(stderr: str) -> list[str]:
    """Each `error ...` report of stderr, with its hint, as one flat string."""
    return [e.strip() for e in re.split(r"(?=\berror )", _flat(stderr)) if e.startswith("error ")]


def _json_lines(stdout: str) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in stdout.splitlines()]
    assert all(isinstance(r, dict) for r in records)
    return records


def _model_fields(path: Path) -> set[str]:
    return set(yaml.safe_load(path.read_text(encoding="utf-8"))["fields"])


def _crc16_modbus(data: bytes) -> int:
    """CRC-16/MODBUS bit by bit (reflected poly 0xA001, init 0xFFFF), independent of iotix."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def _preview(run_cli: RunCLI, model: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("preview", str(model), "--start", START, *args, cwd=model.parent)


# --- version and help ----------------------------------------------------------------


def test_version_prints_the_package_version(run_cli: RunCLI) -> None:
    result = run_cli("--version")

    assert result.returncode == EXIT_OK
    assert result.stdout == f"iotix {iotix.__version__}\n"


def test_help_describes_iotix_and_lists_its_commands(run_cli: RunCLI) -> None:
    result = run_cli("--help")

    assert result.returncode == EXIT_OK
    assert "Simulate IoT devices" in _flat(result.stdout)
    for command in ("validate", "preview", "schema"):
        assert re.search(rf"\b{command}\b", result.stdout), command


@pytest.mark.parametrize(
    ("command", "purpose"),
    [
        ("validate", "Check device models"),
        ("preview", "Show what each device would send"),
        ("schema", "Print the JSON Schema of the device-model language"),
    ],
)
def test_subcommand_help_states_its_purpose(run_cli: RunCLI, command: str, purpose: str) -> None:
    result = run_cli(command, "--help")

    assert result.returncode == EXIT_OK
    assert purpose in _flat(result.stdout)


def test_preview_help_shows_the_command_syntax_with_its_time(run_cli: RunCLI) -> None:
    result = run_cli("preview", "--help")

    assert "NAME[@SECONDS][=JSON]" in result.stdout


# --- validate: the examples ----------------------------------------------------------


def test_validate_examples_prints_ok_for_every_example_file(run_cli: RunCLI) -> None:
    assert EXAMPLE_FILES, "examples/device-models/ holds no model files"

    result = run_cli("validate", "examples/device-models/")

    assert result.returncode == EXIT_OK, result.stderr
    ok_files = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")}
    assert ok_files == {f"examples/device-models/{p.name}" for p in EXAMPLE_FILES}


def test_validate_quiet_prints_nothing_for_valid_models(run_cli: RunCLI) -> None:
    result = run_cli("validate", "--quiet", "examples/device-models/")

    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout == ""


# --- validate: broken models ---------------------------------------------------------


def test_validate_reports_an_unknown_key_with_its_line_and_path(
    run_cli: RunCLI, write_file: WriteFile
) -> None:
    model = write_file("model.yaml", TYPO_MODEL)

    result = run_cli("validate", model.name, cwd=model.parent)

    assert result.returncode == EXIT_INVALID
    expected = "error model.yaml:8 messages.telemetry.schedule.interval: unknown field 'interval'"
    assert any(entry.startswith(expected) for entry in _error_entries(result.stderr))


def test_validate_reports_a_misspelt_key_once_with_the_key_it_meant(
    run_cli: RunCLI, write_file: WriteFile
) -> None:
    model = write_file("model.yaml", TYPO_MODEL)

    result = run_cli("validate", model.name, cwd=model.parent)

    # The typo is one mistake: no second error about the `interval_s` it left missing.
    assert result.returncode == EXIT_INVALID
    entries = _error_entries(result.stderr)
    assert len(entries) == 1
    assert "hint: did you mean 'interval_s'?" in entries[0]


def test_validate_suggests_the_generator_kind_a_typo_meant(
    run_cli: RunCLI, write_file: WriteFile
) -> None:
    model = write_file(
        "model.yaml",
        """
        name: sensor
        fields:
          temperature:
            kind: random-walk
            start: 20
            step: 0.1
        messages:
          telemetry:
            schedule: {kind: interval, interval_s: 10}
        """,
    )

    result = run_cli("validate", model.name, cwd=model.parent)

    assert result.returncode == EXIT_INVALID
    [entry] = _error_entries(result.stderr)
    assert entry.startswith("error model.yaml:4 fields.temperature: unknown kind 'random-walk'")
    assert "did you mean 'random_walk'?" in entry


# Each model below has one mistake: (the part after `name: sensor`, the start of the one
# error line, fragments the rest of that line must hold).
ONE_MISTAKE = {
    "dunder attribute in an expression": (
        """
        fields:
          temperature: {kind: uniform, low: 10, high: 30}
          sneaky: {kind: expression, expr: "temperature.__class__"}
        """,
        "error model.yaml:4 fields.sneaky.expr: ",
        ["'__class__' is not allowed"],
    ),
    "call of open in an expression": (
        """
        fields:
          temperature: {kind: uniform, low: 10, high: 30}
          sneaky: {kind: expression, expr: "open('/etc/passwd')"}
        """,
        "error model.yaml:4 fields.sneaky.expr: calling 'open' is not allowed",
        [],
    ),
    "message listing a missing field": (
        """
        fields:
          temperature: {kind: uniform, low: 10, high: 30}
        messages:
          telemetry:
            schedule: {kind: interval, interval_s: 10}
            fields: [temperature, pressure]
        """,
        "error model.yaml:7 messages.telemetry.fields[1]: ",
        ["'pressure'"],
    ),
    "replay of a missing CSV file": (
        """
        fields:
          load:
            kind: replay
            file: recordings/load.csv
            column: kw
        """,
        "error model.yaml:5 fields.load.file: ",
        ["recordings/load.csv", "cannot read"],
    ),
}
TELEMETRY = """
        messages:
          telemetry:
            schedule: {kind: interval, interval_s: 10}
        """


@pytest.mark.parametrize("mistake", ONE_MISTAKE)
def test_validate_reports_a_single_mistake_on_one_line_with_its_place(
    run_cli: RunCLI, write_file: WriteFile, mistake: str
) -> None:
    body, start, fragments = ONE_MISTAKE[mistake]
    text = "\n        name: sensor" + body + ("" if "messages:" in body else TELEMETRY)
    model = write_file("model.yaml", text)

    result = run_cli("validate", model.name, cwd=model.parent)

    assert result.returncode == EXIT_INVALID
    [entry] = _error_entries(result.stderr)
    assert entry.startswith(start)
    assert all(fragment in entry for fragment in fragments)


def test_validate_reports_a_circular_derivation_naming_both_fields(
    run_cli: RunCLI, write_file: WriteFile
) -> None:
    model = write_file(
        "model.yaml",
        """
        name: sensor
        fields:
          alpha: {kind: expression, expr: "beta + 1"}
          beta: {kind: expression, expr: "alpha * 2"}
        messages:
          telemetry:
            schedule: {kind: interval, interval_s: 10}
        """,
    )

    result = run_cli("validate", model.name, cwd=model.parent)

    assert result.returncode == EXIT_INVALID
    [entry] = _error_entries(result.stderr)
    assert re.match(r"error model\.yaml:[34] fields\.(alpha|beta): circular derivation", entry)
    problem = entry.partition("circular derivation")[2]
    assert "alpha" in problem
    assert "beta" in problem


def test_validate_reports_the_line_of_a_yaml_syntax_error(
    run_cli: RunCLI, write_file: WriteFile
) -> None:
    model = write_file(
        "model.yaml",
        """
        name: sensor
        messages:
          telemetry:
            topic: a: b
            schedule: {kind: interval, interval_s: 10}
        """,
    )

    result = run_cli("validate", model.name, cwd=model.parent)

    assert result.returncode == EXIT_INVALID
    [entry] = _error_entries(result.stderr)
    assert entry.startswith("error model.yaml:4 ")
    assert "invalid YAML" in entry


def test_validate_rejects_an_empty_file(run_cli: RunCLI, write_file: WriteFile) -> None:
    model = write_file("model.yaml", "")

    result = run_cli("validate", model.name, cwd=model.parent)

    assert result.returncode == EXIT_INVALID
    [entry] = _error_entries(result.stderr)
    assert entry.startswith("error model.yaml:1 ")
    assert "empty" in entry


def test_validate_rejects_a_file_that_is_not_yaml_or_json(
    run_cli: RunCLI, write_file: WriteFile
) -> None:
    model = write_file("model.txt", VALID_MODEL)

    result = run_cli("validate", model.name, cwd=model.parent)

    assert result.returncode == EXIT_INVALID
    [entry] = _error_entries(result.stderr)
    assert entry.startswith("error model.txt ")
    assert "unsupported file type '.txt'" in entry


def test_validate_rejects_a_missing_file(run_cli: RunCLI, tmp_path: Path) -> None:
    result = run_cli("validate", "missing.yaml", cwd=tmp_path)

    assert result.returncode == EXIT_INVALID
    [entry] = _error_entries(result.stderr)
    assert entry.startswith("error missing.yaml ")
    assert "no such file" in entry


def test_validate_prints_each_error_on_one_line(run_cli: RunCLI, write_file: WriteFile) -> None:
    # A long problem (the list of allowed functions) must not wrap: `FILE:LINE path:
    # problem` on one line is what editors' and CI's problem matchers read.
    model = write_file(
        "model.yaml",
        """
        name: sensor
        fields:
          temperature: {kind: uniform, low: 10, high: 30}
          sneaky: {kind: expression, expr: "open('/etc/passwd')"}
        messages:
          telemetry:
            schedule: {kind: interval, interval_s: 10}
        """,
    )

    result = run_cli("validate", model.name, cwd=model.parent)

    lines = result.stderr.splitlines()
    assert lines[0].startswith("error model.yaml:4 fields.sneaky.expr: ")
    assert lines[1:] == ["1 invalid file"]


# --- validate: several files at once -------------------------------------------------


@pytest.fixture
def mixed_validation(
    run_cli: RunCLI, write_file: WriteFile, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """`validate` over two valid files, a broken one and a missing one, in that order."""
    write_file("first.yaml", VALID_MODEL)
    write_file("broken.yaml", VALID_MODEL.replace("interval_s", "interval_ms"))
    write_file("second.yml", VALID_MODEL)
    return run_cli(
        "validate", "first.yaml", "broken.yaml", "second.yml", "missing.json", cwd=tmp_path
    )


def test_validate_of_several_files_prints_ok_for_the_valid_ones(
    mixed_validation: subprocess.CompletedProcess[str],
) -> None:
    ok_files = [line.split()[1] for line in mixed_validation.stdout.splitlines() if line]
    assert ok_files == ["first.yaml", "second.yml"]


def test_validate_of_several_files_prints_errors_for_the_invalid_ones(
    mixed_validation: subprocess.CompletedProcess[str],
) -> None:
    entries = _error_entries(mixed_validation.stderr)
    files = [entry.split()[1].partition(":")[0] for entry in entries]
    assert set(files) == {"broken.yaml", "missing.json"}
    assert "2 invalid files" in _flat(mixed_validation.stderr)


def test_validate_of_several_files_exits_2_when_any_is_invalid(
    mixed_validation: subprocess.CompletedProcess[str],
) -> None:
    assert mixed_validation.returncode == EXIT_INVALID


# --- preview: the thermostat as JSON lines -------------------------------------------


@pytest.fixture(scope="module")
def thermostat_preview(run_cli: RunCLI) -> subprocess.CompletedProcess[str]:
    return _preview(run_cli, THERMOSTAT, "--format", "json", "--devices", "2", "--count", "3")


@pytest.fixture(scope="module")
def thermostat_records(
    thermostat_preview: subprocess.CompletedProcess[str],
) -> list[dict[str, Any]]:
    assert thermostat_preview.returncode == EXIT_OK, thermostat_preview.stderr
    return _json_lines(thermostat_preview.stdout)


def test_preview_json_prints_one_object_per_line(
    thermostat_preview: subprocess.CompletedProcess[str],
) -> None:
    assert thermostat_preview.returncode == EXIT_OK, thermostat_preview.stderr
    lines = thermostat_preview.stdout.splitlines()
    assert lines
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_preview_json_sends_count_messages_per_device(
    thermostat_records: list[dict[str, Any]],
) -> None:
    per_device = Counter(r["device_id"] for r in thermostat_records)
    assert sorted(per_device.values()) == [3, 3]


def test_preview_json_messages_are_in_time_order(
    thermostat_records: list[dict[str, Any]],
) -> None:
    times = [r["t_s"] for r in thermostat_records]
    assert times == sorted(times)


def test_preview_json_decoded_holds_the_model_fields(
    thermostat_records: list[dict[str, Any]],
) -> None:
    fields = _model_fields(THERMOSTAT)
    for record in thermostat_records:
        assert fields <= set(record["decoded"]), record


def test_preview_with_the_same_seed_sends_the_same_messages(
    run_cli: RunCLI, thermostat_preview: subprocess.CompletedProcess[str]
) -> None:
    again = _preview(run_cli, THERMOSTAT, "--format", "json", "--devices", "2", "--count", "3")

    assert again.returncode == EXIT_OK, again.stderr
    assert again.stdout == thermostat_preview.stdout


def test_preview_with_another_seed_sends_other_values(
    run_cli: RunCLI, thermostat_records: list[dict[str, Any]]
) -> None:
    other = _preview(
        run_cli, THERMOSTAT, "--format", "json", "--devices", "2", "--count", "3", "--seed", "7"
    )

    assert other.returncode == EXIT_OK, other.stderr
    fields = _model_fields(THERMOSTAT)

    def values(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r["decoded"].items() if k in fields} for r in records]

    assert values(_json_lines(other.stdout)) != values(thermostat_records)


def test_preview_of_an_invalid_model_exits_2_with_the_error(
    run_cli: RunCLI, write_file: WriteFile
) -> None:
    model = write_file("model.yaml", VALID_MODEL.replace("interval_s", "interval_ms"))

    result = run_cli("preview", model.name, cwd=model.parent)

    assert result.returncode == EXIT_INVALID
    assert any(e.startswith("error model.yaml:") for e in _error_entries(result.stderr))


# --- preview: commands ---------------------------------------------------------------


@pytest.fixture(scope="module")
def accepted_command_records(run_cli: RunCLI) -> list[dict[str, Any]]:
    result = _preview(
        run_cli,
        THERMOSTAT,
        "--format",
        "json",
        "--devices",
        "2",
        "--count",
        "4",
        "--command",
        'set_setpoint@12={"value": 23}',
    )
    assert result.returncode == EXIT_OK, result.stderr
    return _json_lines(result.stdout)


def test_preview_command_is_answered_ok_after_the_reply_delay(
    accepted_command_records: list[dict[str, Any]],
) -> None:
    replies = [r for r in accepted_command_records if r["kind"] == "reply"]

    assert len(replies) == 2  # one per device
    for reply in replies:
        assert reply["name"] == "set_setpoint"
        assert reply["t_s"] == pytest.approx(12.2)
        assert reply["decoded"]["status"] == "ok"


def test_preview_command_sets_the_value_later_telemetry_carries(
    accepted_command_records: list[dict[str, Any]],
) -> None:
    later = [r for r in accepted_command_records if r["kind"] == "telemetry" and r["t_s"] > 12.2]

    assert later
    assert all(r["decoded"]["setpoint"] == 23 for r in later)


def test_preview_command_the_handler_refuses_is_answered_rejected(run_cli: RunCLI) -> None:
    result = _preview(
        run_cli,
        THERMOSTAT,
        "--format",
        "json",
        "--devices",
        "1",
        "--count",
        "3",
        "--command",
        'set_setpoint@12={"value": 99}',
    )

    assert result.returncode == EXIT_OK, result.stderr
    [reply] = [r for r in _json_lines(result.stdout) if r["kind"] == "reply"]
    assert reply["decoded"]["status"] == "rejected"


def test_preview_command_whose_payload_is_not_json_exits_2(run_cli: RunCLI) -> None:
    result = _preview(run_cli, THERMOSTAT, "--command", 'set_setpoint@12={"value": 2')

    assert result.returncode == EXIT_INVALID
    assert "--command" in result.stderr
    assert "not JSON" in result.stderr
    assert result.stdout == ""


def test_preview_start_that_is_not_iso_8601_exits_2(run_cli: RunCLI) -> None:
    result = run_cli("preview", str(THERMOSTAT), "--start", "yesterday")

    assert result.returncode == EXIT_INVALID
    assert "--start" in result.stderr
    assert "ISO 8601" in result.stderr
    assert result.stdout == ""


# --- preview: binary payloads --------------------------------------------------------


def test_crc16_modbus_reference_matches_the_check_value() -> None:
    # The catalogue check value of CRC-16/MODBUS, so the reference itself is trusted.
    assert _crc16_modbus(b"123456789") == 0x4B37


@pytest.fixture
def meter_model(write_file: WriteFile) -> Path:
    return write_file("meter.yaml", METER_MODEL)


@pytest.fixture(
    params=[*BINARY_EXAMPLES, None],
    ids=[*(p.name for p in BINARY_EXAMPLES), "meter-in-tmp"],
)
def binary_model(request: pytest.FixtureRequest, meter_model: Path) -> Path:
    """Each example with a binary payload, and a small meter written for the test."""
    path: Path | None = request.param
    return path or meter_model


def _preview_both_ways(
    run_cli: RunCLI, model: Path
) -> tuple[list[dict[str, Any]], subprocess.CompletedProcess[str]]:
    """The same preview as JSON records and as text."""
    args = ("--devices", "1", "--count", "3")
    as_json = _preview(run_cli, model, "--format", "json", *args)
    as_text = _preview(run_cli, model, *args)
    assert as_json.returncode == EXIT_OK, as_json.stderr
    assert as_text.returncode == EXIT_OK, as_text.stderr
    return _json_lines(as_json.stdout), as_text


def test_preview_text_shows_binary_payloads_as_hex(run_cli: RunCLI, binary_model: Path) -> None:
    records, as_text = _preview_both_ways(run_cli, binary_model)

    binary = [r for r in records if r["content_type"] not in TEXT_CONTENT_TYPES]
    assert binary
    for record in binary:
        spaced = bytes.fromhex(record["payload_hex"]).hex(" ")
        assert f"hex {spaced}" in as_text.stdout


def test_preview_json_fields_tile_the_binary_payload(run_cli: RunCLI, binary_model: Path) -> None:
    result = _preview(run_cli, binary_model, "--format", "json", "--devices", "1", "--count", "3")

    assert result.returncode == EXIT_OK, result.stderr
    described = [r for r in _json_lines(result.stdout) if "fields" in r]
    assert described
    for record in described:
        payload = bytes.fromhex(record["payload_hex"])
        offset = 0
        for field in record["fields"]:
            assert field["offset"] == offset, field
            assert bytes.fromhex(field["raw_hex"]) == payload[offset : offset + field["size"]]
            offset += field["size"]
        assert offset == len(payload)


def test_preview_text_tabulates_binary_fields(run_cli: RunCLI, meter_model: Path) -> None:
    records, as_text = _preview_both_ways(run_cli, meter_model)

    lines = as_text.stdout.splitlines()
    assert any(line.split() == ["offset", "field", "raw", "value"] for line in lines)
    for record in records:
        for field in record["fields"]:
            row = [
                str(field["offset"]),
                field["name"],
                *bytes.fromhex(field["raw_hex"]).hex(" ").split(),
                repr(field["value"]),
            ]
            assert row in [line.split() for line in lines], row


def test_preview_json_describes_binary_fields_by_offset_and_size(
    run_cli: RunCLI, meter_model: Path
) -> None:
    result = _preview(run_cli, meter_model, "--format", "json", "--devices", "1", "--count", "2")

    assert result.returncode == EXIT_OK, result.stderr
    for record in _json_lines(result.stdout):
        layout = [(f["name"], f["offset"], f["size"]) for f in record["fields"]]
        assert layout == [("voltage", 0, 2), ("crc", 2, 2)]


def test_preview_json_binary_u16_holds_the_scaled_value(run_cli: RunCLI, meter_model: Path) -> None:
    result = _preview(run_cli, meter_model, "--format", "json", "--devices", "1", "--count", "2")

    assert result.returncode == EXIT_OK, result.stderr
    for record in _json_lines(result.stdout):
        voltage = record["fields"][0]
        raw = int.from_bytes(bytes.fromhex(voltage["raw_hex"]), "big")
        assert voltage["value"] == pytest.approx(raw * 0.1)
        assert record["decoded"]["voltage"] == pytest.approx(raw * 0.1)
        assert 220 <= voltage["value"] <= 240


def test_preview_json_binary_crc_is_the_modbus_crc_of_the_frame(
    run_cli: RunCLI, meter_model: Path
) -> None:
    result = _preview(run_cli, meter_model, "--format", "json", "--devices", "1", "--count", "2")

    assert result.returncode == EXIT_OK, result.stderr
    for record in _json_lines(result.stdout):
        payload = bytes.fromhex(record["payload_hex"])
        crc = record["fields"][1]
        expected = _crc16_modbus(payload[:2])
        assert bytes.fromhex(crc["raw_hex"]) == expected.to_bytes(2, "little")
        assert crc["value"] == expected


# --- schema --------------------------------------------------------------------------


def test_schema_prints_the_committed_schema(run_cli: RunCLI) -> None:
    result = run_cli("schema")

    assert result.returncode == EXIT_OK, result.stderr
    committed = json.loads(COMMITTED_SCHEMA.read_text(encoding="utf-8"))
    assert json.loads(result.stdout) == committed


def test_schema_scenario_prints_the_committed_scenario_schema(run_cli: RunCLI) -> None:
    result = run_cli("schema", "--scenario")

    assert result.returncode == EXIT_OK, result.stderr
    committed = COMMITTED_SCHEMA.parent / "scenario.schema.json"
    assert json.loads(result.stdout) == json.loads(committed.read_text(encoding="utf-8"))


# --- declared protocols ----------------------------------------------------------------


def test_validate_shows_the_protocols_a_model_declares(run_cli: RunCLI) -> None:
    result = run_cli(
        "validate",
        "examples/device-models/door-sensor.yaml",
        "examples/device-models/thermostat.yaml",
    )

    assert result.returncode == EXIT_OK, result.stderr
    door, thermostat = result.stdout.splitlines()
    assert door.endswith("protocols mqtt)")
    assert thermostat.endswith("any protocol)")


def test_run_over_a_protocol_the_model_does_not_declare_exits_2_before_connecting(
    run_cli: RunCLI,
) -> None:
    # A real listener at the broker's address: after the refusal, nobody connected to it.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        result = run_cli(
            "run",
            "examples/device-models/door-sensor.yaml",
            "--broker",
            f"http://127.0.0.1:{port}/ingest",
            "--duration",
            "5",
        )
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()

    assert result.returncode == EXIT_INVALID, result.stdout + result.stderr
    error = result.stderr
    assert "examples/device-models/door-sensor.yaml" in error
    assert "declares protocols: mqtt" in error
    assert "it does not run over http://" in error
    assert result.stdout == ""
