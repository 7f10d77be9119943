"""Reports of a run: JUnit XML for CI, Markdown for people, CSV for spreadsheets, JSON
for programs.

Every ``junit_xml``/``markdown``/``csv_*``/``json_report`` function is pure: a
:class:`~iotix.scenario.RunReport` in, text or bytes out. Only :func:`write_reports`
and :func:`append_github_summary` touch the file system.

The formats:

- **JUnit XML** (:func:`junit_xml`): a ``<testsuites>`` root holding one
  ``<testsuite name="iotix: <scenario>">``; one ``<testcase>`` per check (a failed
  check has a ``<failure type="threshold">``) and one ``run completed`` test case that
  has an ``<error type="worker_error">`` when a worker died. The metadata are
  ``<properties>``; ``<system-out>`` holds a short summary. Characters that XML 1.0
  forbids (most C0 controls, lone surrogates) are written as ``\\xNN``/``\\uNNNN``.
- **Markdown** (:func:`markdown`): a title with the verdict, a table of checks, the
  headline figures, latency percentiles in ms, worker errors, metadata. User text in
  tables is backslash-escaped (pipes included) and newlines become ``<br>``, so any
  name or message keeps the table intact; GitHub renders it in ``$GITHUB_STEP_SUMMARY``.
- **CSV** (:func:`csv_summary`): *one* table, so a spreadsheet opens it without
  asking, with the columns ``kind, name, passed, value, unit, expression, message``.
  ``kind`` is ``run`` (one row: the verdict and duration), ``check`` (one row per
  check: ``value`` is the observed value in the check's own unit), ``figure`` (the
  headline figures; latency percentiles in ms) or ``worker_error``. Empty cells mean
  "no value" (None, NaN or infinity). Text cells that a spreadsheet would take for a
  formula (starting with ``=``, ``+``, ``-``, ``@``) get a leading ``'``.
  :func:`csv_time_series` is the per-second rows, one column per row key.
- **JSON** (:func:`json_report`): every field of the report plus ``passed``; NaN and
  infinities become ``null``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from iotix.metrics import TimeSeriesRow

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from iotix.scenario import CheckResult, RunReport

__all__ = [
    "REPORT_FORMATS",
    "append_github_summary",
    "csv_summary",
    "csv_time_series",
    "json_report",
    "junit_xml",
    "markdown",
    "write_reports",
]

REPORT_FORMATS = ("junit", "markdown", "csv", "json", "html")
"""The formats :func:`write_reports` knows."""

RUN_COMPLETED = "run completed"
"""The JUnit test case that fails (as an error) when a worker died."""

# ---------------------------------------------------------------------------------------
# Shared: text cleaning and the headline figures
# ---------------------------------------------------------------------------------------

# XML 1.0 allows tab, LF, CR and the code points from U+0020 on, except the surrogates,
# U+FFFE and U+FFFF (XML 1.0 §2.2, production Char). The rest cannot even be written as character
# references, so they are spelt out instead. The other formats use the same cleaning:
# a terminal escape in a worker error is no more welcome in a spreadsheet.
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _spell(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _clean(text: object) -> str:
    """``text`` as a string without the characters XML 1.0 forbids."""
    return _FORBIDDEN.sub(_spell, str(text))


def _finite(value: Any) -> float | int | None:
    """A number, or None for None, NaN, infinities and anything not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# NaN and infinities are written as null by orjson itself; numpy scalars and arrays in a
# summary or a probe are serialised as numbers; metadata keys need not be strings.
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class _Figure(NamedTuple):
    key: str
    label: str
    value: float | int | None
    unit: str


# (summary key, label, unit): the figures every report shows, in this order.
_HEADLINE: tuple[tuple[str, str, str], ...] = (
    ("devices_connected", "Devices connected", ""),
    ("connects", "Connects", ""),
    ("connect_failures", "Connect failures", ""),
    ("messages_sent", "Messages sent", ""),
    ("messages_acked", "Messages acked", ""),
    ("messages_failed", "Messages failed", ""),
    ("messages_in_flight", "Messages in flight", ""),
    ("messages_sent_rate_hz", "Send rate", "Hz"),
)
_PERCENTILES = ("p50", "p99")


def _latencies_s(report: RunReport) -> dict[str, dict[str, Any]]:
    latencies = report.summary.get("latency_s")
    if not isinstance(latencies, dict):
        return {}
    return {str(name): stats for name, stats in latencies.items() if isinstance(stats, dict)}


def _ms(value_s: Any) -> float | None:
    value = _finite(value_s)
    return None if value is None else value * 1000.0


def _figures(report: RunReport) -> list[_Figure]:
    """The headline figures, then p50 and p99 of each histogram in ms."""
    figures = [
        _Figure(key, label, _finite(report.summary.get(key)), unit)
        for key, label, unit in _HEADLINE
    ]
    for name, stats in _latencies_s(report).items():
        figures.extend(
            _Figure(f"{name}.{p}", f"{name} {p}", _ms(stats.get(f"{p}_s")), "ms")
            for p in _PERCENTILES
        )
    return figures


def _human(value: float | None, unit: str = "") -> str:
    """A number for people: thousands separated, about six significant digits."""
    if value is None:
        return "n/a"
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.6g}"
    return f"{text} {unit}" if unit else text


def _human_ms(value_ms: float | None) -> str:
    """Latency in ms with three significant digits (the histograms' own accuracy)."""
    if value_ms is None:
        return "n/a"
    if value_ms >= 999.5:
        return f"{value_ms:,.0f}"
    return f"{value_ms:.3g}"


def _observed(check: CheckResult) -> str:
    return "n/a" if check.observed is None else f"{check.observed:.6g}"


def _metadata_value(value: Any) -> str:
    """Metadata as they are: strings verbatim, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float | list | tuple | dict):
        return orjson.dumps(value, default=str, option=_JSON_OPTIONS).decode()
    return str(value)  # a Path, a URL...: its own text, not a quoted JSON string


def _verdict_line(report: RunReport) -> str:
    failed = sum(not check.passed for check in report.checks)
    parts = [f"{len(report.checks) - failed} of {len(report.checks)} checks passed"]
    if report.worker_errors:
        errors = len(report.worker_errors)
        parts.append(f"{errors} worker error{'s' if errors != 1 else ''}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------
# JUnit XML
# ---------------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    """A JUnit ``time``: seconds, three decimals, never negative or non-finite."""
    return f"{value:.3f}" if math.isfinite(value) and value > 0 else "0.000"


def _unique(names: Iterable[str], taken: set[str]) -> list[str]:
    """``names`` with a repeat suffixed `` (2)``, `` (3)``... (CI tools merge repeats)."""
    result = []
    for name in names:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name} ({n})"
        taken.add(candidate)
        result.append(candidate)
    return result


def _summary_text(report: RunReport) -> str:
    lines = [
        f"iotix scenario {report.scenario}: {'passed' if report.passed else 'failed'}",
        f"started {report.started_at}, ran {_human(_finite(report.duration_s), 's')}",
        _verdict_line(report),
    ]
    lines.extend(
        f"{figure.label}: {_human(figure.value, figure.unit)}"
        for figure in _figures(report)
        if figure.unit != "ms"
    )
    lines.extend(
        f"{name} (ms): p50 {_human_ms(_ms(stats.get('p50_s')))}, "
        f"p99 {_human_ms(_ms(stats.get('p99_s')))}"
        for name, stats in _latencies_s(report).items()
    )
    return _clean("\n".join(lines) + "\n")


def junit_xml(report: RunReport) -> bytes:
    """The run as JUnit XML (UTF-8): one test case per check plus ``run completed``."""
    failures = sum(not check.passed for check in report.checks)
    errors = 1 if report.worker_errors else 0
    tests = len(report.checks) + 1
    time = _seconds(report.duration_s)
    counts = {
        "tests": str(tests),
        "failures": str(failures),
        "errors": str(errors),
        "skipped": "0",
        "time": time,
    }
    root = ET.Element("testsuites", {"name": "iotix", **counts})
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            "name": _clean(f"iotix: {report.scenario}"),
            **counts,
            "timestamp": _clean(report.started_at),
        },
    )
    if report.metadata:
        properties = ET.SubElement(suite, "properties")
        for key, value in report.metadata.items():
            ET.SubElement(
                properties,
                "property",
                {"name": _clean(key), "value": _clean(_metadata_value(value))},
            )

    classname = _clean(f"iotix.{report.scenario}")
    names = _unique(
        (_clean(check.name) or "(unnamed check)" for check in report.checks), {RUN_COMPLETED}
    )
    for check, name in zip(report.checks, names, strict=True):
        case = ET.SubElement(
            suite, "testcase", {"classname": classname, "name": name, "time": "0.000"}
        )
        if not check.passed:
            message = check.message or f"{check.expression} failed"
            failure = ET.SubElement(
                case, "failure", {"message": _clean(message), "type": "threshold"}
            )
            failure.text = _clean(
                f"{check.expression}\nobserved: {_observed(check)}\n{check.message}"
            )

    case = ET.SubElement(
        suite, "testcase", {"classname": classname, "name": RUN_COMPLETED, "time": time}
    )
    if report.worker_errors:
        count = len(report.worker_errors)
        first = report.worker_errors[0].strip().splitlines()
        headline = f"{count} worker{'s' if count != 1 else ''} failed"
        error = ET.SubElement(
            case,
            "error",
            {
                "message": _clean(f"{headline}: {first[-1]}" if first else headline),
                "type": "worker_error",
            },
        )
        error.text = _clean("\n\n".join(report.worker_errors))

    ET.SubElement(suite, "system-out").text = _summary_text(report)
    ET.indent(root)
    buffer = io.BytesIO()
    ET.ElementTree(root).write(buffer, encoding="utf-8", xml_declaration=True)
    return buffer.getvalue() + b"\n"


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------

# Every ASCII punctuation character may be backslash-escaped (CommonMark §2.4); these are
# the ones that start emphasis, code, links, HTML, entities, strikethrough or (on
# GitHub) math, plus the backslash itself and the table's pipe (GFM §4.10).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~$])")
_NEWLINES = re.compile(r"\r\n|\r|\n")


def _md(text: object, *, newline: str = "<br>") -> str:
    """``text`` as literal inline Markdown: one line, safe in a table cell."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", _clean(text))
    return _NEWLINES.sub(newline, escaped)


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _fenced(text: str) -> str:
    """``text`` in a code block whose fence no backtick run inside can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text.rstrip()}\n{fence}"


def _by_fleet(report: RunReport) -> list[str]:
    """Each fleet's own figures (one protocol each, say), when there are several."""
    fleets = report.summary.get("fleets")
    if not isinstance(fleets, dict) or not fleets:
        return []
    lines = [
        "",
        "### By fleet",
        "",
        _row("Fleet", "Protocol", "Sent", "Acked", "Failed", "Ack p50 (ms)", "Ack p99 (ms)"),
        _row("---", "---", "---:", "---:", "---:", "---:", "---:"),
    ]
    for name, figures in fleets.items():
        ack = (figures.get("latency_s") or {}).get("ack_latency") or {}
        lines.append(
            _row(
                _md(name),
                _md(figures.get("protocol")),
                _human(_finite(figures.get("messages_sent"))),
                _human(_finite(figures.get("messages_acked"))),
                _human(_finite(figures.get("messages_failed"))),
                _human_ms(_ms(ack.get("p50_s"))),
                _human_ms(_ms(ack.get("p99_s"))),
            )
        )
    return lines


def markdown(report: RunReport) -> str:
    """The run for people, and for ``$GITHUB_STEP_SUMMARY``."""
    verdict = "✅ passed" if report.passed else "❌ failed"
    lines = [
        f"## {verdict}: iotix scenario {_md(report.scenario, newline=' ')}",
        "",
        (
            f"Started {_md(report.started_at, newline=' ')}, ran "
            f"{_human(_finite(report.duration_s), 's')}: {_verdict_line(report)}."
        ),
        "",
        "### Checks",
        "",
    ]
    if report.checks:
        lines += [
            _row("Check", "Expression", "Observed", "Message", "Result"),
            _row("---", "---", "---:", "---", "---"),
        ]
        lines.extend(
            _row(
                _md(check.name),
                _md(check.expression),
                _observed(check),
                _md(check.message),
                "✅ pass" if check.passed else "❌ fail",
            )
            for check in report.checks
        )
    else:
        lines.append("No checks were defined.")

    lines += ["", "### Figures", "", _row("Figure", "Value"), _row("---", "---:")]
    lines.extend(
        _row(figure.label, _human(figure.value, figure.unit))
        for figure in _figures(report)
        if figure.unit != "ms"
    )
    latencies = _latencies_s(report)
    if latencies:
        lines += [
            "",
            "### Latency (ms)",
            "",
            _row("Histogram", "Count", "p50", "p99"),
            _row("---", "---:", "---:", "---:"),
        ]
        lines.extend(
            _row(
                _md(name),
                _human(_finite(stats.get("count"))),
                _human_ms(_ms(stats.get("p50_s"))),
                _human_ms(_ms(stats.get("p99_s"))),
            )
            for name, stats in latencies.items()
        )
    lines += _by_fleet(report)
    if report.events:
        lines += [
            "",
            "### Timeline",
            "",
            _row("At (s)", "Name", "What"),
            _row("---:", "---", "---"),
        ]
        lines.extend(
            _row(_human(_finite(event.get("at_s"))), _md(event.get("name")), _md(event.get("what")))
            for event in report.events
        )
    if report.worker_errors:
        lines += ["", f"### Worker errors ({len(report.worker_errors)})"]
        for error in report.worker_errors:
            lines += ["", _fenced(_clean(error))]
    if report.metadata:
        lines += ["", "### Metadata", "", _row("Key", "Value"), _row("---", "---")]
        lines.extend(
            _row(_md(key), _md(_metadata_value(value))) for key, value in report.metadata.items()
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------

CSV_SUMMARY_COLUMNS = ("kind", "name", "passed", "value", "unit", "expression", "message")
"""The columns of :func:`csv_summary`."""

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(value: object) -> str:
    """A text cell a spreadsheet shows as text, never evaluates as a formula (OWASP)."""
    text = _clean(value)
    return f"'{text}" if text.startswith(_FORMULA_START) else text


def _csv_value(value: Any) -> str:
    """A cell: numbers in full precision, booleans as true/false, no value empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        number = _finite(value)
        return "" if number is None else repr(number)
    return _csv_text(value)


def _csv(rows: Iterable[Iterable[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)  # RFC 4180: CRLF, quotes only where needed
    return buffer.getvalue()


def csv_summary(report: RunReport) -> str:
    """One table: the run, its checks, its figures and its worker errors (module doc)."""
    rows = [
        CSV_SUMMARY_COLUMNS,
        (
            "run",
            _csv_text(report.scenario),
            _csv_value(report.passed),
            _csv_value(report.duration_s),
            "s",
            "",
            _csv_text(f"started {report.started_at}; {_verdict_line(report)}"),
        ),
    ]
    rows.extend(
        (
            "check",
            _csv_text(check.name),
            _csv_value(check.passed),
            _csv_value(check.observed),
            "",
            _csv_text(check.expression),
            _csv_text(check.message),
        )
        for check in report.checks
    )
    rows.extend(
        ("figure", figure.key, "", _csv_value(figure.value), figure.unit, "", "")
        for figure in _figures(report)
    )
    rows.extend(
        ("worker_error", f"worker error {n}", "", "", "", "", _csv_text(error))
        for n, error in enumerate(report.worker_errors, start=1)
    )
    return _csv(rows)


def csv_time_series(report: RunReport) -> str:
    """One row a second; the header is the rows' keys (``TimeSeriesRow``'s when none)."""
    header: dict[str, None] = {}  # an ordered set: keys in the order first seen
    for row in report.time_series:
        header.update(dict.fromkeys(row))
    columns = list(header) or [f.name for f in fields(TimeSeriesRow)]
    return _csv(
        [
            [_csv_text(column) for column in columns],
            *([_csv_value(row.get(column)) for column in columns] for row in report.time_series),
        ]
    )


# ---------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------


def json_report(report: RunReport) -> bytes:
    """Everything in the report, plus its verdict ``passed``, as indented JSON."""
    document: dict[str, Any] = {"passed": report.passed}
    document.update((f.name, getattr(report, f.name)) for f in fields(report))
    return orjson.dumps(
        document,
        default=str,  # metadata are shown as they are: a Path, a URL object... as text
        option=_JSON_OPTIONS | orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE,
    )


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def write_reports(
    report: RunReport,
    directory: Path,
    formats: Iterable[str] = REPORT_FORMATS,
    *,
    fault_windows: Sequence[tuple[str, float, float]] = (),
) -> dict[str, Path]:
    """Write the reports in ``formats`` into ``directory`` (created if missing).

    Files: ``junit.xml``, ``summary.md``, ``summary.csv`` and ``timeseries.csv`` (both
    for ``csv``), ``report.json``, ``report.html`` (:mod:`iotix.scenario.html`; fault
    windows shaded when given). Returns their paths by key: the format's name, and
    ``csv_time_series`` for ``timeseries.csv``. An unknown format raises
    :class:`ValueError` before anything is written.
    """
    wanted = [formats] if isinstance(formats, str) else list(dict.fromkeys(formats))
    unknown = [name for name in wanted if name not in REPORT_FORMATS]
    if unknown:
        raise ValueError(
            f"unknown report format(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(REPORT_FORMATS)}"
        )
    contents: dict[str, tuple[str, bytes]] = {}
    for name in wanted:
        if name == "junit":
            contents["junit"] = ("junit.xml", junit_xml(report))
        elif name == "markdown":
            contents["markdown"] = ("summary.md", markdown(report).encode())
        elif name == "csv":
            contents["csv"] = ("summary.csv", csv_summary(report).encode())
            contents["csv_time_series"] = ("timeseries.csv", csv_time_series(report).encode())
        elif name == "html":
            # html builds on this module's helpers: imported here, not at the top.
            from iotix.scenario.html import html_report  # noqa: PLC0415

            page = html_report(report, fault_windows=fault_windows)
            contents["html"] = ("report.html", page.encode())
        else:
            contents["json"] = ("report.json", json_report(report))
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, (filename, data) in contents.items():
        path = directory / filename
        path.write_bytes(data)
        paths[key] = path
    return paths


def append_github_summary(
    report: RunReport, environ: Mapping[str, str] = os.environ
) -> Path | None:
    """Append :func:`markdown` to the file ``GITHUB_STEP_SUMMARY`` names, if it is set.

    Returns that file's path, or None (and writes nothing) outside GitHub Actions.
    """
    target = environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    path = Path(target)
    with path.open("a", encoding="utf-8") as summary:
        summary.write(markdown(report) + "\n")
    return path
