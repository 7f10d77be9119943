"""The run as one self-contained HTML page: verdict, checks, charts, figures.

:func:`html_report` is pure: a :class:`~iotix.scenario.RunReport` in, a string out. The
page needs nothing else: no scripts (none at all), no fonts, style sheets or images
from elsewhere, no network. Its CSS is inline and uses the system's fonts; its charts
are inline SVG drawn here, so they print and open in any browser, offline, years later.

The page is polyglot markup: HTML5 that is also well-formed XML (void elements are
closed, the only entities are the five XML ones), so tests and tools may read it with
an XML parser. No ``xmlns``: an HTML parser puts ``<svg>`` in the SVG namespace itself.

The charts, over :attr:`RunReport.time_series` (x: ``at_s``, seconds since the start):

- devices connected;
- messages sent and acked per second;
- latency in ms: ack p50, ack p99 and schedule lag p99.

Each series is one ``<polyline class="series" data-series="KEY">`` per run of values
that are numbers: a NaN, an infinity or a missing value is a gap, and a point with
no neighbour is also drawn as a dot. Fault windows, given as ``(name, start_s,
end_s)`` relative to the start, are translucent ``<rect class="fault">`` bands with
their names. All user text (names, expressions, messages, metadata, errors) goes
through :func:`html.escape` after :mod:`~iotix.scenario.reports`' cleaning of
control characters.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from iotix.scenario.reports import (
    _clean,
    _figures,
    _finite,
    _human,
    _human_ms,
    _latencies_s,
    _metadata_value,
    _ms,
    _observed,
    _verdict_line,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from iotix.scenario import RunReport

__all__ = ["html_report"]


def _text(value: object) -> str:
    """User text as HTML text or an attribute value: cleaned, then escaped."""
    return html.escape(_clean(value), quote=True)


# ---------------------------------------------------------------------------------------
# Charts: inline SVG
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Series:
    key: str
    """The time series row's key."""
    label: str
    colour: str
    dash: str
    """An SVG ``stroke-dasharray``, so the lines differ in greyscale print too."""
    scale: float = 1.0
    """Multiplies the row's value (1000 for seconds shown in ms)."""


@dataclass(frozen=True)
class _ChartSpec:
    slug: str
    title: str
    unit: str
    series: tuple[_Series, ...]


# Okabe-Ito colours: told apart with the common colour-vision deficiencies.
_CHARTS: tuple[_ChartSpec, ...] = (
    _ChartSpec(
        "devices",
        "Devices connected",
        "devices",
        (_Series("devices_connected", "connected", "#0072b2", ""),),
    ),
    _ChartSpec(
        "messages",
        "Messages per second",
        "msg/s",
        (
            _Series("messages_sent_rate_hz", "sent", "#0072b2", ""),
            _Series("messages_acked_rate_hz", "acked", "#009e73", "6 3"),
        ),
    ),
    _ChartSpec(
        "latency",
        "Latency",
        "ms",
        (
            _Series("ack_latency_p50_s", "ack p50", "#0072b2", "", 1000.0),
            _Series("ack_latency_p99_s", "ack p99", "#d55e00", "6 3", 1000.0),
            _Series("schedule_lag_p99_s", "schedule lag p99", "#cc79a7", "2 3", 1000.0),
        ),
    ),
)

# The drawing's geometry in SVG user units; the page scales the whole drawing.
_WIDTH, _HEIGHT = 720.0, 250.0
_LEFT, _RIGHT, _TOP, _BOTTOM = 64.0, 16.0, 30.0, 40.0
_PLOT_WIDTH = _WIDTH - _LEFT - _RIGHT
_PLOT_HEIGHT = _HEIGHT - _TOP - _BOTTOM
_TICKS = 5


def _number(value: float) -> str:
    """An SVG coordinate: one decimal is a tenth of a pixel at 100 %."""
    return f"{value:.1f}"


def _ticks(low: float, high: float) -> tuple[float, float, list[float]]:
    """A ``[low, high]`` widened to round steps (1, 2 or 5 times a power of ten), and
    the ticks; the plain ends when the numbers are too large or small for that."""
    span = high - low
    if not (math.isfinite(span) and span > 0):
        return low, high, [low, high]
    raw = span / _TICKS
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for multiple in (1.0, 2.0, 5.0, 10.0):
        step = multiple * magnitude
        if span / step <= _TICKS:
            break
    nice_low = math.floor(low / step) * step
    nice_high = math.ceil(high / step) * step
    if not (step > 0 and math.isfinite(nice_low) and math.isfinite(nice_high)):
        return low, high, [low, high]  # near the float limits: 1e308 or 1e-320
    count = round((nice_high - nice_low) / step)
    return nice_low, nice_high, [nice_low + n * step for n in range(count + 1)]


_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def _tick_label(value: float) -> str:
    """A short axis label: 0, 2.5, 40k, 1.2M, 3e+20."""
    size = abs(value)
    if size == 0:
        return "0"
    if size >= 1e15 or size < 1e-3:
        return f"{value:.3g}"
    for factor, prefix in _SI:
        if size >= factor:
            return f"{value / factor:.4g}{prefix}"
    return f"{value:.4g}"


def _domain(values: Sequence[float], *, minimum_span: float = 1.0) -> tuple[float, float]:
    """From 0 (or below) to the largest value; a span of at least ``minimum_span``."""
    low = min(0.0, *values) if values else 0.0
    high = max(0.0, *values) if values else 0.0
    if high - low <= 0:
        high = low + minimum_span
    return low, high


def _segments(points: list[tuple[float, float] | None]) -> list[list[tuple[float, float]]]:
    """The runs of points between gaps (None)."""
    segments: list[list[tuple[float, float]]] = [[]]
    for point in points:
        if point is None:
            if segments[-1]:
                segments.append([])
        else:
            segments[-1].append(point)
    return [segment for segment in segments if segment]


def _chart(
    spec: _ChartSpec,
    rows: Sequence[dict[str, Any]],
    fault_windows: Sequence[tuple[str, float, float]],
) -> str:
    times = [_finite(row.get("at_s")) for row in rows]
    columns: dict[str, list[float | None]] = {}
    for series in spec.series:
        column: list[float | None] = []
        for row in rows:
            value = _finite(row.get(series.key))
            scaled = None if value is None else _finite(float(value) * series.scale)
            column.append(scaled)
        columns[series.key] = column

    faults = [
        (str(name), min(start, end), max(start, end))
        for name, start, end in fault_windows
        if _finite(start) is not None and _finite(end) is not None
    ]
    x_values = [float(t) for t in times if t is not None]
    x_values += [edge for _, start, end in faults for edge in (start, end)]
    x_low, x_high, x_ticks = _ticks(*_domain(x_values))
    y_values = [value for column in columns.values() for value in column if value is not None]
    y_low, y_high, y_ticks = _ticks(*_domain(y_values))

    def x_of(value: float) -> float:
        return _LEFT + (value - x_low) / (x_high - x_low) * _PLOT_WIDTH

    def y_of(value: float) -> float:
        return _TOP + _PLOT_HEIGHT - (value - y_low) / (y_high - y_low) * _PLOT_HEIGHT

    bottom = _TOP + _PLOT_HEIGHT
    right = _LEFT + _PLOT_WIDTH
    parts = [
        (
            f'<svg class="chart" id="chart-{spec.slug}" viewBox="0 0 {_WIDTH:.0f} {_HEIGHT:.0f}"'
            f' width="{_WIDTH:.0f}" height="{_HEIGHT:.0f}" role="img"'
            f' aria-labelledby="chart-{spec.slug}-title">'
        ),
        f'<title id="chart-{spec.slug}-title">{_text(spec.title)} ({_text(spec.unit)})</title>',
        (
            f'<clipPath id="clip-{spec.slug}"><rect x="{_number(_LEFT)}" y="{_number(_TOP)}"'
            f' width="{_number(_PLOT_WIDTH)}" height="{_number(_PLOT_HEIGHT)}"/></clipPath>'
        ),
    ]

    # Fault windows first, so the lines are drawn over them.
    for name, start, end in faults:
        x0, x1 = x_of(start), x_of(end)
        parts.append(
            f'<g class="fault-window"><rect class="fault" x="{_number(x0)}" y="{_number(_TOP)}"'
            f' width="{_number(max(x1 - x0, 1.0))}" height="{_number(_PLOT_HEIGHT)}">'
            f"<title>{_text(name)}: {_tick_label(start)} s to {_tick_label(end)} s</title>"
            f'</rect><text class="fault-name" x="{_number(x0 + 3)}" y="{_number(_TOP + 12)}"'
            f' clip-path="url(#clip-{spec.slug})">{_text(name)}</text></g>'
        )

    # Grid and axes.
    for tick in y_ticks:
        tick_y = _number(y_of(tick))
        parts.append(
            f'<line class="grid" x1="{_number(_LEFT)}" y1="{tick_y}"'
            f' x2="{_number(right)}" y2="{tick_y}"/>'
            f'<text class="tick" x="{_number(_LEFT - 6)}" y="{tick_y}" text-anchor="end"'
            f' dominant-baseline="middle">{_tick_label(tick)}</text>'
        )
    for tick in x_ticks:
        tick_x = _number(x_of(tick))
        parts.append(
            f'<line class="axis" x1="{tick_x}" y1="{_number(bottom)}" x2="{tick_x}"'
            f' y2="{_number(bottom + 5)}"/>'
            f'<text class="tick" x="{tick_x}" y="{_number(bottom + 18)}"'
            f' text-anchor="middle">{_tick_label(tick)}</text>'
        )
    parts.append(
        f'<path class="axis" d="M{_number(_LEFT)} {_number(_TOP)}V{_number(bottom)}'
        f'H{_number(right)}"/>'
        f'<text class="axis-label" x="{_number(_LEFT + _PLOT_WIDTH / 2)}"'
        f' y="{_number(_HEIGHT - 4)}" text-anchor="middle">seconds since start</text>'
        f'<text class="axis-label" x="{_number(_LEFT - 6)}" y="{_number(_TOP - 12)}"'
        f' text-anchor="end">{_text(spec.unit)}</text>'
    )

    # The series, then their legend above the plot.
    for series in spec.series:
        points = [
            None if t is None or v is None else (x_of(float(t)), y_of(v))
            for t, v in zip(times, columns[series.key], strict=True)
        ]
        dash = f' stroke-dasharray="{series.dash}"' if series.dash else ""
        for segment in _segments(points):
            coordinates = " ".join(f"{_number(x)},{_number(y)}" for x, y in segment)
            parts.append(
                f'<polyline class="series" data-series="{series.key}" points="{coordinates}"'
                f' fill="none" stroke="{series.colour}" stroke-width="2"{dash}'
                f' clip-path="url(#clip-{spec.slug})"/>'
            )
            if len(segment) == 1:  # a lone point draws no line: show it as a dot
                x, y = segment[0]
                parts.append(
                    f'<circle class="dot" data-series="{series.key}" cx="{_number(x)}"'
                    f' cy="{_number(y)}" r="3" fill="{series.colour}"/>'
                )
    legend_x = _LEFT + 8
    for series in spec.series:
        dash = f' stroke-dasharray="{series.dash}"' if series.dash else ""
        parts.append(
            f'<g class="legend"><line x1="{_number(legend_x)}" y1="{_number(_TOP - 16)}"'
            f' x2="{_number(legend_x + 24)}" y2="{_number(_TOP - 16)}" stroke="{series.colour}"'
            f' stroke-width="2"{dash}/><text x="{_number(legend_x + 30)}"'
            f' y="{_number(_TOP - 16)}" dominant-baseline="middle">{_text(series.label)}</text></g>'
        )
        legend_x += 40 + 7 * len(series.label)
    if not y_values:
        parts.append(
            f'<text class="empty" x="{_number(_LEFT + _PLOT_WIDTH / 2)}"'
            f' y="{_number(_TOP + _PLOT_HEIGHT / 2)}" text-anchor="middle">no values</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------

_CSS = """
:root { color-scheme: light; --ok: #17663a; --bad: #a61b1b; --muted: #5b6470; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 960px; padding: 24px 20px 48px; color: #1d2126;
  background: #fff; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
  "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 22px; margin: 0 0 6px; overflow-wrap: anywhere; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #d8dde3;
  padding-bottom: 4px; }
.verdict { display: inline-block; padding: 2px 10px; border-radius: 12px; color: #fff;
  font-weight: 600; margin-right: 8px; vertical-align: 2px; font-size: 14px; }
.verdict.passed { background: var(--ok); }
.verdict.failed { background: var(--bad); }
.subtitle { color: var(--muted); margin: 0; }
table { border-collapse: collapse; width: 100%; margin: 4px 0; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #e3e7eb;
  vertical-align: top; }
th { background: #f3f5f7; font-weight: 600; }
td { white-space: pre-wrap; overflow-wrap: anywhere; }
td.number, th.number { text-align: right; font-variant-numeric: tabular-nums;
  white-space: nowrap; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 13px; }
tr.fail td { background: #fdf0f0; }
.result { font-weight: 600; white-space: nowrap; }
tr.pass .result { color: var(--ok); }
tr.fail .result { color: var(--bad); }
table.meta { width: auto; }
table.meta th { background: none; color: var(--muted); font-weight: 500; }
figure { margin: 12px 0 20px; break-inside: avoid; page-break-inside: avoid; }
figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { display: block; width: 100%; max-width: 720px; height: auto; }
svg text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  fill: #3a4048; }
svg .axis { stroke: #6b737d; fill: none; }
svg .grid { stroke: #e3e7eb; }
svg .fault { fill: #e69f00; fill-opacity: 0.18; stroke: #e69f00; stroke-opacity: 0.6; }
svg .fault-name { fill: #8a5a00; font-weight: 600; }
svg .empty { fill: var(--muted); font-size: 13px; }
pre { background: #f6f7f9; border: 1px solid #e3e7eb; padding: 8px 10px; overflow-x: auto;
  white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; }
p.none { color: var(--muted); }
@media print {
  body { max-width: none; padding: 0; font-size: 11pt; }
  .verdict { print-color-adjust: exact; -webkit-print-color-adjust: exact; }
  h2 { break-after: avoid; page-break-after: avoid; }
}
"""


def _header(report: RunReport) -> list[str]:
    verdict = "passed" if report.passed else "failed"
    parts = [
        "<header>",
        (
            f'<h1><span class="verdict {verdict}">{verdict}</span>'
            f'<span class="scenario">{_text(report.scenario)}</span></h1>'
        ),
        (
            f'<p class="subtitle">iotix scenario, started <time>{_text(report.started_at)}</time>,'
            f" ran {_text(_human(_finite(report.duration_s), 's'))}: "
            f"{_text(_verdict_line(report))}.</p>"
        ),
    ]
    if report.metadata:
        parts.append('<table class="meta"><tbody>')
        parts.extend(
            f"<tr><th>{_text(key)}</th><td><code>{_text(_metadata_value(value))}</code></td></tr>"
            for key, value in report.metadata.items()
        )
        parts.append("</tbody></table>")
    parts.append("</header>")
    return parts


def _checks(report: RunReport) -> list[str]:
    parts = ['<section id="checks">', "<h2>Checks</h2>"]
    if not report.checks:
        parts.append('<p class="none">No checks were defined.</p>')
    else:
        parts += [
            (
                '<table class="checks"><thead><tr><th>Check</th><th>Expression</th>'
                '<th class="number">Observed</th><th>Message</th><th>Result</th></tr></thead>'
                "<tbody>"
            )
        ]
        for check in report.checks:
            outcome = "pass" if check.passed else "fail"
            mark = "\u2713 pass" if check.passed else "\u2717 fail"
            parts.append(
                f'<tr class="check {outcome}"><td>{_text(check.name)}</td>'
                f"<td><code>{_text(check.expression)}</code></td>"
                f'<td class="number">{_text(_observed(check))}</td>'
                f'<td>{_text(check.message)}</td><td class="result">{mark}</td></tr>'
            )
        parts.append("</tbody></table>")
    parts.append("</section>")
    return parts


def _charts(report: RunReport, fault_windows: Sequence[tuple[str, float, float]]) -> list[str]:
    parts = ['<section id="charts">', "<h2>Time series</h2>"]
    if not report.time_series:
        parts.append('<p class="none">No time series: the run recorded no rows.</p>')
    else:
        parts.extend(
            f'<figure id="figure-{spec.slug}"><figcaption>{_text(spec.title)}'
            f" ({_text(spec.unit)})</figcaption>"
            f"{_chart(spec, report.time_series, fault_windows)}</figure>"
            for spec in _CHARTS
        )
    parts.append("</section>")
    return parts


def _worker_errors(report: RunReport) -> list[str]:
    if not report.worker_errors:
        return []
    parts = [
        '<section id="worker-errors">',
        f"<h2>Worker errors ({len(report.worker_errors)})</h2>",
    ]
    parts.extend(f"<pre>{_text(error.rstrip())}</pre>" for error in report.worker_errors)
    parts.append("</section>")
    return parts


def _timeline(report: RunReport) -> list[str]:
    """What the scenario did when: its faults and actions (and an abort)."""
    if not report.events:
        return []
    parts = [
        '<section id="timeline">',
        "<h2>Timeline</h2>",
        (
            '<table class="timeline"><thead><tr><th class="number">At (s)</th><th>Name</th>'
            "<th>What</th></tr></thead><tbody>"
        ),
    ]
    parts.extend(
        f'<tr><td class="number">{_text(_human(_finite(event.get("at_s"))))}</td>'
        f"<td>{_text(event.get('name'))}</td><td>{_text(event.get('what'))}</td></tr>"
        for event in report.events
    )
    parts.append("</tbody></table></section>")
    return parts


def _figures_section(report: RunReport) -> list[str]:
    parts = [
        '<section id="figures">',
        "<h2>Figures</h2>",
        (
            '<table class="figures"><thead><tr><th>Figure</th><th class="number">Value</th>'
            "</tr></thead><tbody>"
        ),
    ]
    parts.extend(
        f'<tr><td>{_text(figure.label)}</td><td class="number">'
        f"{_text(_human(figure.value, figure.unit))}</td></tr>"
        for figure in _figures(report)
        if figure.unit != "ms"
    )
    parts.append("</tbody></table>")
    latencies = _latencies_s(report)
    if latencies:
        parts.append(
            '<table class="latency"><thead><tr><th>Latency (ms)</th><th class="number">Count'
            '</th><th class="number">p50</th><th class="number">p99</th></tr></thead><tbody>'
        )
        parts.extend(
            f"<tr><td>{_text(name)}</td>"
            f'<td class="number">{_text(_human(_finite(stats.get("count"))))}</td>'
            f'<td class="number">{_text(_human_ms(_ms(stats.get("p50_s"))))}</td>'
            f'<td class="number">{_text(_human_ms(_ms(stats.get("p99_s"))))}</td></tr>'
            for name, stats in latencies.items()
        )
        parts.append("</tbody></table>")
    parts.append("</section>")
    return parts


def html_report(
    report: RunReport, *, fault_windows: Sequence[tuple[str, float, float]] = ()
) -> str:
    """The run as one self-contained HTML5 page (module doc); ``fault_windows`` are
    ``(name, start_s, end_s)`` relative to the run's start, shaded on every chart."""
    verdict = "passed" if report.passed else "failed"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8"/>',
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
        '<meta name="generator" content="iotix"/>',
        f"<title>iotix: {_text(report.scenario)} ({verdict})</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        f'<body class="{verdict}">',
        *_header(report),
        "<main>",
        *_checks(report),
        *_charts(report, fault_windows),
        *_timeline(report),
        *_worker_errors(report),
        *_figures_section(report),
        "</main>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"
