"""The ``iotix`` command line: validate models, preview what devices send, print schemas.

Exit codes: 0 success, 1 a check failed, 2 usage or invalid input. Errors are mapped
here, at the edge; the core raises only :mod:`iotix.errors`.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape

from iotix import __version__
from iotix.errors import IotixError, ModelError
from iotix.model.loader import SUFFIXES, LoadedModel, load_model
from iotix.model.runtime import Message
from iotix.preview import PlannedCommand, Preview, preview_model
from iotix.schema import model_schema

EXIT_INVALID = 2
JSON_OPTIONS = orjson.OPT_NON_STR_KEYS  # CBOR and MessagePack maps may have integer keys


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _shown(value: Any) -> str:
    """A decoded binary value as a person reads it: bit groups as name=value pairs."""
    if isinstance(value, dict):
        return " ".join(f"{name}={part}" for name, part in value.items())
    return repr(value)


def _jsonable(value: Any) -> Any:
    """How preview JSON shows what JSON has no type for (bytes as hex)."""
    if isinstance(value, bytes | bytearray):
        return value.hex()
    return str(value)


app = typer.Typer(
    name="iotix",
    help=(
        "Simulate IoT devices, from one to hundreds of thousands, to test IoT back ends.\n\n"
        "Start with `iotix preview examples/device-models/thermostat.yaml`, then read "
        "docs/model-language.md to write your own device model."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"iotix {__version__}")
        raise typer.Exit


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Simulate IoT devices to test IoT back ends."""


def _expand(paths: list[Path]) -> list[Path]:
    """Files as given; directories become the model files they contain."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in SUFFIXES))
        else:
            files.append(path)
    return files


def _print_model_error(console: Console, error: ModelError) -> None:
    for issue in error.issues:
        where = str(issue.file) if issue.file is not None else "<model>"
        if issue.line is not None:
            where += f":{issue.line}"
        console.print(
            f"[bold red]error[/] [cyan]{escape(where)}[/] "
            f"[bold]{escape(issue.dotted_path)}[/]: {escape(issue.problem)}"
        )
        if issue.hint:
            console.print(f"      [dim]hint:[/] {escape(issue.hint)}")


@app.command()
def validate(
    files: Annotated[
        list[Path], typer.Argument(help="Model files (YAML or JSON) or directories of them.")
    ],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
) -> None:
    """Check device models; exit 0 when all are valid, 2 when any is not.

    Each error names the file, the line, the field path, the problem and a hint.
    """
    out = Console(soft_wrap=True, highlight=False)
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    invalid = 0
    for file in _expand(files):
        try:
            loaded = load_model(file)
        except ModelError as exc:
            invalid += 1
            _print_model_error(err, exc)
            continue
        if not quiet:
            spec = loaded.spec
            out.print(
                f"[green]ok[/] {escape(str(file))} "
                f"[dim]({spec.name}: {_count(len(spec.fields), 'field')}, "
                f"{_count(len(spec.messages), 'message')}, {_count(len(spec.events), 'event')})[/]"
            )
    if invalid:
        err.print(f"[red]{invalid} invalid model file{'s' if invalid > 1 else ''}[/]")
        raise typer.Exit(EXIT_INVALID)


def _parse_start(text: str | None) -> float:
    if text is None:
        return datetime.now(tz=UTC).timestamp()
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an ISO 8601 time, e.g. 2026-01-01T00:00:00Z", param_hint="--start"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _parse_command(text: str) -> PlannedCommand:
    """``NAME[@SECONDS][=JSON]``, e.g. ``set_setpoint@30={"value": 23}``."""
    head, _, payload_text = text.partition("=")
    name, _, at_text = head.partition("@")
    try:
        at_s = float(at_text) if at_text else 0.0
    except ValueError:
        raise typer.BadParameter(
            f"{at_text!r} is not a number of seconds", param_hint="--command"
        ) from None
    try:
        payload = json.loads(payload_text) if payload_text else {}
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(
            f"the payload of {name!r} is not JSON: {exc.msg}", param_hint="--command"
        ) from None
    return PlannedCommand(name=name.strip(), payload=payload, at_s=at_s)


def _message_json(preview: Preview, message: Message) -> dict[str, Any]:
    encoder = preview.batch.encoder_for(message)
    record: dict[str, Any] = {
        "device_id": message.device_id,
        "kind": message.kind.value,
        "name": message.name,
        "t_s": round(message.due_s, 6),
        "topic": message.topic,
        "seq": message.seq,
        "qos": message.qos,
        "content_type": encoder.content_type,
        "payload_hex": message.payload.hex(),
    }
    try:
        record["decoded"] = encoder.decode(message.payload)
    except IotixError as exc:
        record["decode_error"] = str(exc)
    fields = encoder.describe(message.payload)
    if fields:
        record["fields"] = [
            {
                "name": f.name,
                "offset": f.offset,
                "size": f.size,
                "raw_hex": f.raw.hex(),
                "value": f.value,
            }
            for f in fields
        ]
    return record


def _show_preview(console: Console, preview: Preview, loaded: LoadedModel) -> None:
    description = loaded.spec.description
    console.print(
        f"[bold]{escape(loaded.spec.name)}[/]"
        + (f" — {escape(description)}" if description else "")
    )
    for result in preview.commands:
        console.print(
            f"[magenta]command[/] {escape(result.command)} -> {escape(result.device_id)} "
            f"at +{result.at_s:.3f}s: {result.status.value}"
        )
    for message in preview.messages:
        encoder = preview.batch.encoder_for(message)
        console.print(
            f"[dim]+{message.due_s:10.3f}s[/] [cyan]{escape(message.device_id)}[/] "
            f"[yellow]{message.kind.value}[/]"
            f"{'' if message.name == message.kind.value else ' ' + escape(message.name)} "
            f"[dim]→[/] {escape(message.topic)} [dim]({len(message.payload)} B, "
            f"{encoder.content_type})[/]"
        )
        if encoder.content_type in ("application/json", "text/plain", "text/csv"):
            console.print("    " + escape(message.payload.decode("utf-8", "replace")))
            continue
        console.print(f"    hex {message.payload.hex(' ')}")
        fields = encoder.describe(message.payload)
        if fields:
            # Plain columns rather than a rich table: a table wraps to the terminal's
            # width, and a long bit-field value is easier to read on one line.
            rows = [("offset", "field", "raw", "value")] + [
                (str(f.offset), f.name, f.raw.hex(" "), _shown(f.value)) for f in fields
            ]
            widths = [max(len(row[i]) for row in rows) for i in range(3)]
            for number, row in enumerate(rows):
                line = "    " + "  ".join(
                    cell.ljust(w) for cell, w in zip(row, widths, strict=False)
                )
                line += "  " + row[3]
                console.print(f"[dim]{escape(line)}[/]" if number == 0 else escape(line))
        else:
            try:
                decoded = encoder.decode(message.payload)
            except IotixError as exc:
                console.print(f"    [red]cannot decode: {escape(str(exc))}[/]")
            else:
                if not isinstance(decoded, bytes):  # raw payloads: the hex says it all
                    text = orjson.dumps(decoded, default=_jsonable, option=JSON_OPTIONS)
                    console.print("    " + escape(text.decode()))
    if preview.horizon_reached:
        console.print("[yellow]stopped at the preview horizon (7 days of virtual time)[/]")


@app.command()
def preview(
    model: Annotated[Path, typer.Argument(help="A model file (YAML or JSON).")],
    devices: Annotated[int, typer.Option(min=1, max=10_000, help="How many devices.")] = 3,
    count: Annotated[int, typer.Option(min=1, max=10_000, help="Messages per device.")] = 5,
    seed: Annotated[int, typer.Option(help="Run seed: same seed, same messages.")] = 0,
    first_index: Annotated[int, typer.Option(min=0, help="Index of the first device.")] = 0,
    start: Annotated[
        str | None,
        typer.Option(help="Wall-clock start of the virtual run (ISO 8601); default now."),
    ] = None,
    command: Annotated[
        list[str] | None,
        typer.Option(
            help="Send a command to every device: NAME\\[@SECONDS]\\[=JSON], e.g. "
            "'set_setpoint@30={\"value\": 23}'. Repeatable."
        ),
    ] = None,
    output: Annotated[
        str, typer.Option("--format", help="text (for people) or json (one object per line).")
    ] = "text",
) -> None:
    """Show what each device would send, in virtual time (returns at once).

    Binary payloads are shown as hex and decoded field by field.
    """
    if output not in ("text", "json"):
        raise typer.BadParameter("use text or json", param_hint="--format")
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    planned = [_parse_command(c) for c in command or []]
    try:
        loaded = load_model(model)
        result = preview_model(
            loaded,
            devices=devices,
            count=count,
            seed=seed,
            start_epoch_s=_parse_start(start),
            first_index=first_index,
            commands=planned,
        )
    except ModelError as exc:
        _print_model_error(err, exc)
        raise typer.Exit(EXIT_INVALID) from None
    except IotixError as exc:
        err.print(f"[bold red]error[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from None
    if output == "json":
        for message in result.messages:
            record = _message_json(result, message)
            sys.stdout.write(orjson.dumps(record, default=_jsonable, option=JSON_OPTIONS).decode())
            sys.stdout.write("\n")
        return
    _show_preview(Console(highlight=False, soft_wrap=True), result, loaded)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the device-model language (for editors and CI)."""
    sys.stdout.write(json.dumps(model_schema(), indent=2) + "\n")


def main() -> None:
    """Console-script entry point."""
    app()
