"""The ``iotix`` command line: validate models, preview what devices send, print schemas.

Exit codes: 0 success, 1 a check failed, 2 usage or invalid input. Errors are mapped
here, at the edge; the core raises only :mod:`iotix.errors`.
"""

from __future__ import annotations

import contextlib
import enum
import json
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
import yaml
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table

from iotix import __version__
from iotix.adapters.base import AdapterSettings
from iotix.adapters.mqtt import MQTTConnectError
from iotix.adapters.registry import adapter_for
from iotix.adapters.tls import TLSContextCache, TLSSettings
from iotix.engine.fleet import (
    FleetControl,
    FleetPlan,
    FleetResult,
    WorkerDeath,
    default_workers,
    probe_refusal,
    run_fleet,
)
from iotix.engine.probe import ProbeStartError
from iotix.engine.results import results_document, summarise
from iotix.engine.stages import StagePlan, parse_stages
from iotix.engine.worker import (
    BrokerEndpoint,
    RunConfigError,
    RunSettings,
    default_source_addresses,
    parse_brokers,
)
from iotix.errors import IotixError, ModelError
from iotix.metrics import Snapshot, TimeSeries, TimeSeriesRow
from iotix.model.conformance import Conformance
from iotix.model.loader import SUFFIXES, LoadedModel, load_model, parse_document
from iotix.model.protocols import check_protocol
from iotix.model.runtime import Message
from iotix.preview import PlannedCommand, Preview, preview_model
from iotix.protocols.mqtt.packets import ProtocolVersion
from iotix.scenario import RunReport
from iotix.scenario.chaos import dump_manifests, export_chaos, parse_selector
from iotix.scenario.conductor import Conductor
from iotix.scenario.loader import LoadedScenario, load_scenario, with_brokers
from iotix.scenario.reports import append_github_summary, json_report, write_reports
from iotix.scenario.runner import ScenarioPlan, plan_scenario, report_scenario
from iotix.schema import model_schema, scenario_schema
from iotix.testing.embedded import EmbeddedBroker

if TYPE_CHECKING:
    from types import FrameType


class OnWorkerDeath(enum.Enum):
    FAIL = "fail"
    CONTINUE = "continue"


EXIT_INVALID = 2
EXIT_RUN_FAILED = 3
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
        list[Path],
        typer.Argument(help="Model or scenario files (YAML or JSON), or directories of them."),
    ],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
) -> None:
    """Check device models and scenario files (a scenario with every model it names);
    exit 0 when all are valid, 2 when any is not.

    Each error names the file, the line, the field path, the problem and a hint.
    """
    out = Console(soft_wrap=True, highlight=False)
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    invalid = 0
    for file in _expand(files):
        try:
            if _is_scenario(file):
                scenario = load_scenario(file)
                what = (
                    f"scenario {scenario.name}: {_count(len(scenario.fleets), 'fleet')}, "
                    f"{_count(scenario.devices, 'device')}, "
                    f"{_count(len(scenario.faults), 'fault')}, "
                    f"{_count(len(scenario.actions), 'action')}, "
                    f"{_count(len(scenario.checks), 'check')}"
                )
            else:
                spec = load_model(file).spec
                protocols = ", ".join(spec.protocols) if spec.protocols else None
                what = (
                    f"{spec.name}: {_count(len(spec.fields), 'field')}, "
                    f"{_count(len(spec.messages), 'message')}, {_count(len(spec.events), 'event')}"
                    + (f", protocols {protocols}" if protocols else ", any protocol")
                )
        except ModelError as exc:
            invalid += 1
            _print_model_error(err, exc)
            continue
        if not quiet:
            out.print(f"[green]ok[/] {escape(str(file))} [dim]({escape(what)})[/]")
    if invalid:
        err.print(f"[red]{invalid} invalid file{'s' if invalid > 1 else ''}[/]")
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


def _ms(value: float) -> str:
    return "-" if value != value else f"{value * 1000:.1f}"  # noqa: PLR0124 - NaN test


def _live_table(snapshot: Snapshot, row: TimeSeriesRow | None, devices: int) -> Table:
    counters = snapshot.counters
    table = Table(title="iotix run", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    table.add_row("devices connected", f"{snapshot.devices_connected:,} / {devices:,}")
    if snapshot.devices_connected < devices:  # ramping up (or reconnecting): show how far
        table.add_row(
            "", ProgressBar(total=devices, completed=snapshot.devices_connected, width=30)
        )
    table.add_row(
        "connects / failures",
        f"{counters.connects:,} / {counters.connect_failures:,}"
        + (
            f"  ({', '.join(f'{k}: {v}' for k, v in counters.connect_failures_by_reason.items())})"
            if counters.connect_failures_by_reason
            else ""
        ),
    )
    rate = "-" if row is None else f"{row.messages_sent_rate_hz:,.0f}"
    table.add_row("messages/s", rate)
    table.add_row(
        "sent / acked / failed",
        f"{counters.messages_sent:,} / {counters.messages_acked:,} / {counters.messages_failed:,}",
    )
    ack = snapshot.ack_latency
    if ack.count:
        p50, p99 = ack.percentiles((50.0, 99.0))
        table.add_row("ack latency p50 / p99", f"{_ms(p50)} / {_ms(p99)} ms")
    lag = snapshot.schedule_lag
    if lag.count:
        table.add_row("schedule lag p99", f"{_ms(lag.percentile(99.0))} ms")
    if counters.errors_by_kind:
        table.add_row(
            "errors", ", ".join(f"{k}: {v:,}" for k, v in counters.errors_by_kind.items())
        )
    return table


def _print_summary(console: Console, summary: dict[str, Any], errors: list[str]) -> None:
    console.print()
    console.print("[bold]Summary[/]")
    console.print(
        f"  devices: {summary['connects']:,} connects, {summary['connect_failures']:,} "
        f"connect failures, {summary['reconnects']:,} reconnects"
    )
    for reason, count in summary["connect_failures_by_reason"].items():
        console.print(f"    refused or failed: {escape(reason)}: {count:,}")
    console.print(
        f"  messages: {summary['messages_sent']:,} sent, {summary['messages_acked']:,} acked, "
        f"{summary['messages_failed']:,} failed, {summary['messages_in_flight']:,} in flight"
        + (
            f" ({summary['messages_sent_rate_hz']:,} msg/s)"
            if summary["messages_sent_rate_hz"] is not None
            else ""
        )
    )
    for name, figures in summary["latency_s"].items():
        parts = ", ".join(
            f"{key.removesuffix('_s')} {value * 1000:.1f}"
            for key, value in figures.items()
            if key != "count" and value is not None
        )
        console.print(f"  {name} (ms, {int(figures['count']):,} samples): {parts}")
    for kind, count in summary["errors_by_kind"].items():
        console.print(f"  [yellow]{escape(kind)}[/]: {count:,}")
    console.print(
        "  counters reconcile: "
        + ("[green]yes[/]" if summary["counters_reconcile"] else "[red]no[/]")
    )
    for error in errors:
        console.print(f"  [red]{escape(error)}[/]")


def _run_live(
    console: Console,
    fleets: list[FleetPlan],
    settings: RunSettings,
    *,
    workers: int,
    probe_sample: float | None,
    on_worker_death: WorkerDeath = "fail",
    conductor: Conductor | None = None,
) -> tuple[FleetResult, TimeSeries, dict[str, Any]]:
    """Run the fleets behind the live view, then print the end summary. A scenario's
    ``conductor`` sees every snapshot and passes actions to the workers."""
    devices = sum(fleet.devices for fleet in fleets)
    series = TimeSeries()
    extra: dict[str, Any] = {}
    if conductor is not None:
        extra = {
            "control": conductor.control,
            "stop": conductor.stop_run,
            "probe_brokers": conductor.probe_brokers(),
            "on_probe": conductor.attach_probe,
            "on_start": conductor.begin,
        }
    if probe_sample is not None:
        extra["probe_conformance"] = _conformance(fleets)
    with Live(console=console, refresh_per_second=4) as live:

        def show(snapshot: Snapshot) -> None:
            with contextlib.suppress(ValueError):  # snapshots from one instant: no rate
                series.add(snapshot)
            row = series.rows[-1] if series.rows else None
            live.update(_live_table(snapshot, row, devices))
            if conductor is not None:
                conductor.observe(snapshot)

        try:
            outcome = run_fleet(
                fleets,
                settings,
                workers=workers,
                on_snapshot=show,
                probe_sample=probe_sample,
                on_worker_death=on_worker_death,
                **extra,
            )
        except MQTTConnectError as exc:  # the probe subscribes before any device connects
            console.print(
                f"[bold red]error[/] the probe could not subscribe at {settings.brokers[0]}: "
                f"{escape(str(exc))}"
            )
            raise typer.Exit(EXIT_RUN_FAILED) from None
        except ProbeStartError as exc:  # the Kafka probe reads before any device sends
            console.print(f"[bold red]error[/] {escape(str(exc))}")
            raise typer.Exit(EXIT_RUN_FAILED) from None
    summary = summarise(outcome.snapshot)
    _print_summary(console, summary, outcome.worker_errors)
    if outcome.probe is not None:
        delivered = outcome.probe
        console.print(
            f"  probe: {delivered['unique']:,} of {delivered['expected']:,} expected messages "
            f"received, {delivered['lost']:,} lost, {delivered['duplicates']:,} duplicates, "
            f"{delivered['reordered']:,} reordered"
            + (
                f"; {delivered['unparseable']:,} without device_id/seq/ts_ms (binary, CBOR "
                "or templated payloads) not checked"
                if delivered["unparseable"]
                else ""
            )
        )
        if delivered.get("schema_checked"):
            console.print(
                f"  schema: {delivered['schema_checked']:,} messages checked against their "
                f"models, {delivered['schema_errors']:,} did not match"
            )
            for example in delivered.get("schema_error_examples") or []:
                console.print(f"    [yellow]{escape(str(example))}[/]")
    return outcome, series, summary


def _conformance(fleets: list[FleetPlan]) -> Conformance:
    """What the probe checks each message against: the fleets' models, by fleet."""
    return Conformance.from_models(
        (str(plan.overrides.get("fleet") or model.spec.name), model)
        for plan in fleets
        for model in [load_model(plan.model_path)]
    )


@app.command()
def run(
    model: Annotated[Path, typer.Argument(help="A model file, or a scenario file (YAML or JSON).")],
    broker: Annotated[
        str | None,
        typer.Option(
            help="Broker address(es): mqtt://host:port[,host:port...] (mqtts:// for TLS; "
            "ws://host:port/path and wss:// for MQTT over WebSockets). Required for a "
            "model; for a scenario, replaces the brokers the file names."
        ),
    ] = None,
    devices: Annotated[int, typer.Option(min=1, help="How many devices.")] = 10,
    duration: Annotated[
        float | None,
        typer.Option(
            min=0, help="Seconds to run; 0 runs until Ctrl-C. Default: 60, or the stages' total."
        ),
    ] = None,
    rate: Annotated[float, typer.Option(min=0.1, help="New connections per second.")] = 1000.0,
    stages: Annotated[
        str | None,
        typer.Option(
            help="Connected devices over time, DURATION:DEVICES,...: '30s:1000,2m:1000,30s:0' "
            "ramps up, holds and ramps down (DEVICES may be a % of --devices)."
        ),
    ] = None,
    qos: Annotated[
        int | None, typer.Option(min=0, max=2, help="QoS for every message (default: the model's).")
    ] = None,
    mqtt_version: Annotated[str, typer.Option(help="3.1.1 or 5.")] = "3.1.1",
    keepalive: Annotated[int, typer.Option(min=0, max=65535, help="Keepalive, seconds.")] = 60,
    persistent: Annotated[
        bool, typer.Option(help="Persistent sessions: unacked messages survive reconnects.")
    ] = False,
    username: Annotated[
        str | None, typer.Option(help="User name template, e.g. '{device_id}'.")
    ] = None,
    password: Annotated[str | None, typer.Option(help="Password template.")] = None,
    source_addresses: Annotated[
        str | None,
        typer.Option(help="Local addresses to spread connections over, e.g. 127.0.0.2,127.0.0.3."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes (default: from the fleet size).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Run seed: same seed, same device behaviour.")] = 0,
    tls_ca: Annotated[
        Path | None, typer.Option(help="CA file (PEM) for mqtts:// brokers; default: system store.")
    ] = None,
    tls_cert: Annotated[
        str | None,
        typer.Option(help="Client certificate (PEM), a template: 'certs/{device_id}.crt'."),
    ] = None,
    tls_key: Annotated[str | None, typer.Option(help="Client key (PEM), a template.")] = None,
    tls_insecure: Annotated[
        bool, typer.Option(help="Do not verify the broker (test brokers only).")
    ] = False,
    tls_server_name: Annotated[
        str | None, typer.Option(help="Name to verify the broker's certificate against.")
    ] = None,
    probe: Annotated[
        float | None,
        typer.Option(
            min=0.0001,
            max=1.0,
            help="Subscribe a probe that checks delivery (loss, duplicates, end-to-end "
            "latency) for this fraction of the devices, e.g. 1 or 0.1. JSON payloads with "
            "device_id, seq and ts_ms (the default payload) only.",
        ),
    ] = None,
    results: Annotated[
        Path | None, typer.Option(help="Write the results (JSON) to this file.")
    ] = None,
    on_worker_death: Annotated[
        OnWorkerDeath,
        typer.Option(
            help="A worker process that dies: 'fail' stops the run at once (exit code 3); "
            "'continue' runs the other workers to the end and reports it.",
        ),
    ] = OnWorkerDeath.FAIL,
    scale: Annotated[
        float,
        typer.Option(
            min=0.0001,
            help="Scenario only: multiply its devices and durations (0.1 for a quick CI run).",
        ),
    ] = 1.0,
    report_dir: Annotated[
        Path,
        typer.Option(help="Scenario only: where the reports go (JUnit, Markdown, CSV, JSON)."),
    ] = Path("iotix-report"),
    broker_for: Annotated[
        list[str] | None,
        typer.Option(
            help="Scenario only: NAME=URL puts the scenario's broker NAME at URL; repeat "
            "for more (--broker replaces them all)."
        ),
    ] = None,
    adapter_option: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE for an http://, coap://, kafka:// or plugin adapter (method=PUT, "
            "timeout=2, headers={...}); repeat for more. See docs/adapters.md."
        ),
    ] = None,
) -> None:
    """Run a fleet of MODEL devices against MQTT brokers (or HTTP, CoAP and Kafka
    endpoints), with a live view.

    Exit codes: 0 the run completed, 2 bad input, 3 the run failed (no device could
    connect, or a worker died).
    """
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    # SIGTERM (what CI runners and container engines send) stops the run as Ctrl-C
    # does: the devices disconnect, faults are reverted, the reports are written.
    signal.signal(signal.SIGTERM, _interrupt)
    if _is_scenario(model):
        _run_scenario(
            model,
            broker=broker,
            broker_for=broker_for or [],
            scale=scale,
            report_dir=report_dir,
            results=results,
            workers=workers,
            on_worker_death=on_worker_death,
        )
        return
    if broker is None:
        err.print("[bold red]error[/] --broker is required to run a model (mqtt://host:port)")
        raise typer.Exit(EXIT_INVALID)
    try:
        loaded = load_model(model)
        brokers = parse_brokers(broker)
        check_protocol(loaded, str(brokers[0]))  # refused before anything connects
        stage_list = parse_stages(stages, fleet_size=devices) if stages else ()
        if duration is None:
            duration = StagePlan(stage_list, devices).duration_s if stage_list else 60.0
        options, adapter_timeout_s, adapter_retries = _adapter_options(
            adapter_option or [], brokers, probe
        )
        tls = None
        if tls_ca or tls_cert or tls_key or tls_insecure or tls_server_name:
            tls = TLSSettings(
                ca_file=tls_ca,
                cert_file=tls_cert,
                key_file=tls_key,
                insecure=tls_insecure,
                server_hostname=tls_server_name,
            )
            if not any(b.tls for b in brokers):
                raise RunConfigError("TLS options need an mqtts:// broker address")
            if not tls.per_device:
                TLSContextCache(tls)  # load the files now: errors before anything connects
    except ModelError as exc:
        _print_model_error(err, exc)
        raise typer.Exit(EXIT_INVALID) from None
    except IotixError as exc:
        err.print(f"[bold red]error[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from None
    versions = {"3.1.1": ProtocolVersion.V311, "5": ProtocolVersion.V5, "5.0": ProtocolVersion.V5}
    if mqtt_version not in versions:
        raise typer.BadParameter("use 3.1.1 or 5", param_hint="--mqtt-version")
    sources = tuple(a.strip() for a in (source_addresses or "").split(",") if a.strip())
    if not sources:
        sources = default_source_addresses(brokers, devices)
    settings = RunSettings(
        devices=devices,
        brokers=brokers,
        seed=seed,
        duration_s=duration or None,
        connect_rate_hz=rate,
        qos=qos,
        version=versions[mqtt_version],
        keepalive_s=keepalive,
        clean_start=not persistent,
        username=username,
        password=password,
        source_addresses=sources,
        tls=tls,
        stages=stage_list,
        adapter_options=options,
        adapter_timeout_s=adapter_timeout_s,
        adapter_retries=adapter_retries,
    )
    worker_count = workers or default_workers(devices)
    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"[bold]{escape(loaded.spec.name)}[/]: {devices:,} devices, {worker_count} "
        f"worker{'s' if worker_count > 1 else ''}, "
        f"{', '.join(str(b) for b in brokers)}"
        + (f", {duration:g} s" if duration else ", until Ctrl-C")
        + (f", from {len(sources)} source addresses" if sources else "")
    )
    outcome, series, summary = _run_live(
        console,
        [FleetPlan(model, devices)],
        settings,
        workers=worker_count,
        probe_sample=probe,
        on_worker_death=on_worker_death.value,
    )
    if results is not None:
        document = results_document(
            model_name=loaded.spec.name,
            model_path=str(model),
            settings=settings,
            workers=worker_count,
            result=outcome,
            series=series,
        )
        results.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | JSON_OPTIONS))
        console.print(f"  results: {escape(str(results))}")
    died = outcome.worker_errors and on_worker_death is OnWorkerDeath.FAIL
    if died or summary["connects"] == 0:
        raise typer.Exit(EXIT_RUN_FAILED)


def _adapter_options(
    texts: list[str], brokers: tuple[BrokerEndpoint, ...], probe: float | None
) -> tuple[dict[str, Any], float, int]:
    """``--adapter-option`` values (each value read as YAML: numbers, lists, mappings),
    checked by building the adapter now; and the confirmation timeout and the retries
    among them."""
    options: dict[str, Any] = {}
    for text in texts:
        key, equals, value = text.partition("=")
        if not equals or not key.strip():
            raise RunConfigError(f"--adapter-option takes KEY=VALUE, not {text!r}")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise RunConfigError(f"--adapter-option {key.strip()}: {exc}") from None
    timeout = options.pop("timeout", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise RunConfigError(f"--adapter-option timeout is a number of seconds, not {timeout!r}")
    timeout_s = float(timeout)
    retries = options.pop("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise RunConfigError(f"--adapter-option retries is a whole number, not {retries!r}")
    endpoint = brokers[0]
    if endpoint.is_mqtt:
        if options or texts:
            raise RunConfigError("--adapter-option is for http://, coap://, kafka:// endpoints")
        return options, timeout_s, retries
    refusal = probe_refusal(endpoint) if probe is not None else None
    if refusal is not None:
        raise RunConfigError(refusal)
    adapter_for(endpoint.scheme)(endpoint, AdapterSettings(timeout_s=timeout_s, options=options))
    return options, timeout_s, retries


def _interrupt(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001 - handler API
    raise KeyboardInterrupt


def _is_scenario(path: Path) -> bool:
    """A scenario file is a mapping with ``fleets``; anything else is read as a model
    (whose loader then says what is wrong with it)."""
    try:
        data, _ = parse_document(path.read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError, ModelError):
        return False
    return isinstance(data, dict) and "fleets" in data


EXIT_CHECKS_FAILED = 1


def _conductor(
    scenario: LoadedScenario,
    plan: ScenarioPlan,
    *,
    scale: float,
    override: tuple[BrokerEndpoint, ...] | None,
) -> tuple[Conductor, ScenarioPlan]:
    """Start the scenario's conductor (and its fault proxies, if it needs them); the
    plan whose fleets go through the proxies (the probe goes direct, to see what got
    through)."""
    conductor = Conductor(
        scenario,
        fleet_devices=[fleet.devices for fleet in plan.fleets],
        control=FleetControl(),
        stop=threading.Event(),
        scale=scale,
        override=override,
    )
    routes = conductor.start()
    if routes:
        plan = plan_scenario(scenario, scale=scale, brokers=override, routes=routes)
    return conductor, plan


def _scenario_report(
    scenario: LoadedScenario,
    plan: ScenarioPlan,
    outcome: FleetResult,
    series: TimeSeries,
    conductor: Conductor,
    started_at: str,
) -> RunReport:
    """The run's report: checks over the run and its windows, what the scenario did."""
    commands = conductor.command_summary()
    report = report_scenario(
        scenario,
        plan,
        outcome,
        series,
        started_at=started_at,
        commands=commands,
        windowed=conductor.windowed_results(
            outcome.snapshot, outcome.snapshot.e2e_latency if outcome.probe else None
        ),
        aborted=conductor.aborted,
    )
    report.events = conductor.events
    report.commands = commands
    if conductor.control.reports:
        report.metadata["actions"] = conductor.control.reports
    if conductor.proxies:
        report.metadata["fault_proxies"] = conductor.stats()
    return report


def _show_checks(console: Console, report: RunReport) -> None:
    console.print("[bold]Checks[/]")
    for check in report.checks:
        mark = "[green]pass[/]" if check.passed else "[bold red]FAIL[/]"
        console.print(f"  {mark}  {escape(check.name)}: {escape(check.message)}")
    if not report.checks:
        console.print("  (none defined)")


def _load_scenario_for_run(
    path: Path, broker: str | None, broker_for: list[str], scale: float
) -> tuple[LoadedScenario, tuple[BrokerEndpoint, ...] | None, ScenarioPlan]:
    """The scenario, its broker overrides and its plan; exit 2 on any problem."""
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        scenario = load_scenario(path)
        if broker_for:
            named = dict(item.partition("=")[::2] for item in broker_for)
            if "" in named.values():
                raise RunConfigError("--broker-for takes NAME=URL")
            scenario = with_brokers(scenario, named)
        override = parse_brokers(broker) if broker else None
        if override is not None:  # --broker replaces every fleet's broker
            for fleet in scenario.fleets:
                check_protocol(fleet.model, str(override[0]))
        plan = plan_scenario(scenario, scale=scale, brokers=override)
    except ModelError as exc:
        _print_model_error(err, exc)
        raise typer.Exit(EXIT_INVALID) from None
    except IotixError as exc:
        err.print(f"[bold red]error[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from None
    return scenario, override, plan


def _run_scenario(
    path: Path,
    *,
    broker: str | None,
    broker_for: list[str],
    scale: float,
    report_dir: Path,
    results: Path | None,
    workers: int | None,
    on_worker_death: OnWorkerDeath,
) -> None:
    """``iotix run SCENARIO``: the run, its checks, its reports, and the exit code."""
    scenario, override, plan = _load_scenario_for_run(path, broker, broker_for, scale)
    worker_count = workers or default_workers(plan.devices)
    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"[bold]scenario {escape(scenario.name)}[/]: {plan.devices:,} devices in "
        f"{len(plan.fleets)} fleet{'s' if len(plan.fleets) > 1 else ''}, "
        f"{plan.settings.duration_s:g} s, {len(plan.checks)} checks"
        + (f", scale {scale:g}" if scale != 1 else "")
    )
    conductor, plan = _conductor(scenario, plan, scale=scale, override=override)
    if conductor.proxies:
        console.print(
            f"  {len(scenario.faults)} faults, {len(scenario.actions)} actions, through "
            f"{len(conductor.proxies)} proxies"
        )
    elif scenario.actions:
        console.print(f"  {len(scenario.actions)} actions")
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        outcome, series, _ = _run_live(
            console,
            plan.fleets,
            plan.settings,
            workers=worker_count,
            probe_sample=scenario.probe,
            on_worker_death=on_worker_death.value,
            conductor=conductor,
        )
    finally:
        conductor.stop()  # every fault reverted, whatever happened
    windows = conductor.windows()
    report = _scenario_report(scenario, plan, outcome, series, conductor, started_at)
    _show_checks(console, report)
    written = write_reports(report, report_dir, fault_windows=windows)
    append_github_summary(report)
    console.print(
        f"  reports: {escape(str(report_dir))}/ ({', '.join(p.name for p in written.values())})"
    )
    if results is not None:
        results.write_bytes(json_report(report))
        console.print(f"  results: {escape(str(results))}")
    run_failed = outcome.worker_errors or report.summary["connects"] == 0
    if run_failed:
        console.print("[bold red]the run failed[/]")
        raise typer.Exit(EXIT_RUN_FAILED)
    if not report.passed:
        if conductor.aborted is not None:
            console.print(
                f"[bold red]aborted[/] when {escape(conductor.aborted.name)} failed: "
                f"{escape(conductor.aborted.message)}"
            )
        console.print("[bold red]checks failed[/]")
        raise typer.Exit(EXIT_CHECKS_FAILED)
    console.print("[bold green]passed[/]")


DEMO_FLEETS = (
    # model file, share of the devices: a mix that sends a few hundred messages a
    # second at 1,000 devices, which the embedded broker handles comfortably.
    ("thermostat.yaml", 0.4),
    ("smart-meter.yaml", 0.2),
    ("door-sensor.yaml", 0.2),
    ("gps-tracker.yaml", 0.2),
)

DEMO_EPILOGUE = """
[bold]What you just saw[/]
  {devices:,} simulated devices of {models} models connected to an MQTT broker that iotix
  started inside this process. Each device sent what its model says (JSON, binary
  frames with CRCs, CBOR), on its own schedule, and a probe subscriber checked that every
  message arrived exactly once and measured how long it took.

[bold]Try next[/]
  iotix preview examples/device-models/smart-meter.yaml      what one model sends, decoded
  iotix run examples/device-models/thermostat.yaml --broker mqtt://YOUR-BROKER:1883 \\
      --devices 1000 --duration 60 --probe 0.1 --results run.json
  iotix run examples/scenarios/smoke.yaml --broker mqtt://YOUR-BROKER:1883
                                                            a verdict and CI reports
  docs/model-language.md                                    write a model of your own device
  docs/running.md                                           every option of iotix run
"""


def example_models() -> Path:
    """The example device models: shipped in the package, or beside it in a checkout."""
    shipped = Path(__file__).parent / "examples" / "device-models"
    if shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parents[2] / "examples" / "device-models"


@app.command()
def demo(
    devices: Annotated[int, typer.Option(min=4, max=5_000, help="How many devices.")] = 1000,
    duration: Annotated[float, typer.Option(min=1, help="Seconds to run.")] = 30.0,
    broker: Annotated[
        str | None,
        typer.Option(help="Use this broker instead of starting an embedded one."),
    ] = None,
) -> None:
    """See a fleet working within a minute: several example models, an embedded MQTT
    broker (unless --broker is given), a live view, and what to try next."""
    console = Console(highlight=False, soft_wrap=True)
    models = example_models()
    fleets = []
    remaining = devices
    for number, (name, share) in enumerate(DEMO_FLEETS):
        count = remaining if number == len(DEMO_FLEETS) - 1 else max(1, round(devices * share))
        remaining -= count
        fleets.append(FleetPlan(models / name, count))
    embedded: EmbeddedBroker | None = None
    try:
        if broker is None:
            console.print("Starting an embedded MQTT broker (amqtt) ...")
            embedded = EmbeddedBroker().start()
            broker = embedded.url
        endpoints = parse_brokers(broker)
        for fleet in fleets:
            check_protocol(load_model(fleet.model_path), str(endpoints[0]))
    except ModelError as exc:
        _print_model_error(Console(stderr=True), exc)
        raise typer.Exit(EXIT_INVALID) from None
    except IotixError as exc:
        Console(stderr=True).print(f"[bold red]error[/] {escape(str(exc))}")
        if embedded is not None:
            embedded.stop()
        raise typer.Exit(EXIT_INVALID) from None
    settings = RunSettings(
        devices=devices, brokers=endpoints, duration_s=duration, connect_rate_hz=250.0
    )
    console.print(
        f"[bold]iotix demo[/]: {devices:,} devices ("
        + ", ".join(f"{f.devices:,} {f.model_path.stem}" for f in fleets)
        + f") on {broker} for {duration:g} s"
    )
    try:
        outcome, _, summary = _run_live(console, fleets, settings, workers=1, probe_sample=1.0)
    finally:
        if embedded is not None:
            embedded.stop()
    console.print(DEMO_EPILOGUE.format(devices=devices, models=len(fleets)))
    if outcome.worker_errors or summary["connects"] == 0:
        raise typer.Exit(EXIT_RUN_FAILED)


@app.command()
def schema(
    scenario: Annotated[
        bool, typer.Option("--scenario", help="The scenario file's schema instead.")
    ] = False,
) -> None:
    """Print the JSON Schema of the device-model language, or of scenario files (for
    editors and CI)."""
    document = scenario_schema() if scenario else model_schema()
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


chaos_app = typer.Typer(
    name="chaos",
    help="Play a scenario's faults with Chaos Mesh on Kubernetes (docs/chaos-mesh.md).",
    no_args_is_help=True,
)
app.add_typer(chaos_app)


@chaos_app.command("export")
def chaos_export(
    scenario: Annotated[Path, typer.Argument(help="The scenario file (YAML or JSON).")],
    namespace: Annotated[
        str, typer.Option(help="The namespace of the chaos objects and of the pods.")
    ] = "default",
    selector: Annotated[
        list[str] | None,
        typer.Option(
            help="A label of the device pods, key=value; repeat for more "
            "(default: app.kubernetes.io/name=iotix)."
        ),
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(help="A cron expression: Schedule objects instead of NetworkChaos."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the YAML here, not to stdout.")
    ] = None,
) -> None:
    """Chaos Mesh manifests for a scenario's faults: NetworkChaos, or Schedule with
    --schedule."""
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        export = export_chaos(
            load_scenario(scenario),
            namespace=namespace,
            selector=parse_selector(selector) if selector else None,
            schedule=schedule,
        )
    except ModelError as exc:  # ScenarioError: file, line, field path, hint
        _print_model_error(err, exc)
        raise typer.Exit(EXIT_INVALID) from None
    except IotixError as exc:  # ChaosExportError: no faults, bad namespace/selector/cron
        err.print(f"[bold red]error[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from None
    for note in (*export.warnings, *(str(s) for s in export.skipped)):
        err.print(f"[yellow]warning[/] {escape(note)}")
    text = dump_manifests(export)
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        err.print(
            f"[bold red]error[/] cannot write {escape(str(output))}: "
            f"{escape(exc.strerror or str(exc))}"
        )
        raise typer.Exit(EXIT_INVALID) from None


def main() -> None:
    """Console-script entry point."""
    app()
