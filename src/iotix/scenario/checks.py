"""Checks: thresholds over a run's metrics, k6-style (``e2e_latency.p99 < 200ms``).

A check is one line, ``METRIC OP VALUE[UNIT]``:

- :func:`parse_check` reads it into a :class:`Check`, or raises :class:`CheckError`
  (unknown metric or statistic, bad operator, bad number, a unit the metric cannot
  take). Every metric name is known statically (:data:`METRICS`), so a scenario is
  validated before anything runs.
- :func:`run_metrics` flattens a run's summary (:func:`iotix.engine.results.summarise`)
  and the probe's (:meth:`iotix.engine.probe.DeliveryTracker.summary`) into one
  ``{metric: value}`` dict in base units.
- :func:`evaluate` compares each check with those values and gives one
  :class:`~iotix.scenario.CheckResult` per check.

All three are pure functions (STYLE.md §1). The full language, for scenario authors, is
in ``docs/checks.md``.

Metrics, in base units (seconds, fractions, counts). ``<histogram>`` is any of
``connect_latency``, ``ack_latency``, ``e2e_latency``, ``schedule_lag``,
``intended_latency`` and ``reconnect_time``; ``<stat>`` any of ``p50``, ``p90``,
``p99``, ``p99_9`` (also written ``p99.9``), ``min``, ``mean`` and ``max``, and
``count`` (the number of samples). Every count metric also answers to ``<name>.count``.

==============================  ==========  ==============================================
metric                          unit        value, and when it is missing
==============================  ==========  ==============================================
``<histogram>.<stat>``          seconds     the run summary's histogram; ``e2e_latency``
                                            is the probe's when it has samples. Missing
                                            when the histogram has no samples
``<histogram>.count``           count       samples in the histogram (missing likewise)
``messages_sent``               count       publishes handed to the protocol
``messages_acked``              count       PUBACK / PUBCOMP received
``messages_failed``             count       publishes that will never be confirmed
``messages_in_flight``          count       sent, neither acked nor failed (yet)
``connects``                    count       CONNACKs accepted
``connect_attempts``            count       CONNECTs tried
``connect_failures``            count       attempts that failed
``reconnects``                  count       connections after a device's first
``disconnects``                 count       connections lost or closed
``commands_received``           count       commands delivered to devices
``commands_answered``           count       commands the devices answered
``devices_connected``           count       devices connected when the run (or the
                                            window) ended
``errors``                      count       sum of the summary's ``errors_by_kind``
``connect_errors.rate``         fraction    connect_failures / connect_attempts;
                                            missing when nothing was attempted
``messages_failed.rate``        fraction    messages_failed / messages_sent; missing
                                            when nothing was sent
``commands.answer_ratio``       fraction    commands_answered / commands_received;
                                            missing when no command arrived
``delivery_ratio``              fraction    the probe's (expected - lost) / expected;
                                            missing without a probe, or when the probe
                                            expected nothing
``lost``                        count       the probe's lost messages (no probe: missing)
``duplicates``                  count       the probe's duplicate arrivals (likewise)
``reordered``                   count       the probe's out-of-order arrivals (likewise)
``schema_checked``              count       the probe's messages checked against their model
``schema_errors``               count       those that did not match it (likewise)
``command_reply.<stat>``        seconds     ``command_reply``: a scenario's command sent
                                            to its reply
``commands_sent``               count       commands the scenario's actions sent
``command_replies``             count       replies within the timeout, of any status
``commands_rejected``           count       replies whose status was not ok
``command_timeouts``            count       commands without a reply in time
``command_reply_ratio``         fraction    command_replies / commands_sent; missing
                                            when no command was sent
``devices_connected.ratio``     fraction    devices_connected / the scenario's devices
``state.F.S``                   fraction    the share of fleet F's devices in state S (at
                                            the end of the run or window)
``state_reached.F.S``           fraction    the share of fleet F's devices that have been
                                            in state S since the run began
==============================  ==========  ==============================================

A ratio with nothing to divide by is *missing*, not 0 or 1: ``connect_errors.rate <
0.1%`` over a run that never tried to connect has proved nothing, so it fails.

Units. A bare number is in the metric's base unit. Durations take ``us`` (or ``µs``),
``ms``, ``s`` and ``m`` (minutes); ratios take ``%`` (``99.9%`` is 0.999); counts take
none. Thresholds are converted with decimal arithmetic, so ``250ms`` and ``0.25s`` give
the very same float.

Results. ``observed`` is in the unit the check was written in: milliseconds for
``< 200ms``, a percentage (99.95, not 0.9995) for ``>= 99.9%``, the base unit for a bare
number. The message is one line, the same shape whether the check passed or not:
``e2e_latency.p99 = 143.2 ms, expected < 200 ms``. A metric with no value (missing from
:func:`run_metrics`' dict, or NaN) fails the check with the reason, e.g.
``e2e_latency.p99: no e2e latency measured: run with a probe; expected < 200 ms``; it
is never an exception.
"""

from __future__ import annotations

import difflib
import enum
import math
import operator
import re
from dataclasses import dataclass
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, InvalidOperation
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from iotix.errors import IotixError
from iotix.metrics import HISTOGRAM_NAMES
from iotix.scenario import CheckResult

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "COMMAND_METRICS",
    "HISTOGRAM_STATS",
    "METRICS",
    "OPERATORS",
    "PROBE_METRICS",
    "STATE_METRIC",
    "Check",
    "CheckError",
    "Metric",
    "MetricKind",
    "evaluate",
    "metric_info",
    "parse_check",
    "run_metrics",
]


class CheckError(IotixError):
    """A check does not parse: unknown metric or statistic, bad operator, bad number, or
    a unit its metric cannot take. ``expression`` holds the check as written;
    ``suggestions`` the metric names close to a misspelt one (may be empty)."""

    def __init__(self, message: str, *, expression: str, suggestions: tuple[str, ...] = ()) -> None:
        super().__init__(f"check {expression!r}: {message}")
        self.expression = expression
        self.suggestions = suggestions


# ---------------------------------------------------------------------------------------
# The metrics
# ---------------------------------------------------------------------------------------


class MetricKind(enum.Enum):
    """What a metric measures, which decides its base unit and the units it takes."""

    DURATION = "seconds"
    RATIO = "fraction"
    COUNT = "count"


@dataclass(frozen=True)
class Metric:
    """A metric a check can name."""

    name: str
    kind: MetricKind
    description: str
    missing: str
    """Why a run may have no value for it, said to the person reading a failed check."""


HISTOGRAM_STATS: Mapping[str, str] = MappingProxyType(
    {
        # stat in a check -> key of Histogram.summary()
        "p50": "p50_s",
        "p90": "p90_s",
        "p99": "p99_s",
        "p99_9": "p99_9_s",
        "min": "min_s",
        "mean": "mean_s",
        "max": "max_s",
        "count": "count",
    }
)
"""The statistics of a histogram metric, and the :meth:`Histogram.summary` key of each."""

# Why a histogram may be empty, by histogram.
_HISTOGRAMS: dict[str, tuple[str, str]] = {
    "connect_latency": (
        "CONNECT sent to CONNACK received",
        "no connect latency measured: no connection completed",
    ),
    "ack_latency": (
        "publish written to PUBACK (QoS 1) or PUBCOMP (QoS 2) received",
        "no ack latency measured: no QoS 1 or 2 publish was acknowledged",
    ),
    "e2e_latency": (
        "intended send time to receipt by the probe subscriber",
        "no e2e latency measured: run with a probe",
    ),
    "schedule_lag": (
        "actual send time minus intended send time",
        "no schedule lag measured: no message was sent",
    ),
    "intended_latency": (
        "intended send time to ack received (coordinated omission included)",
        "no intended latency measured: no QoS 1 or 2 publish was acknowledged",
    ),
    "reconnect_time": (
        "a device's connection lost to the device connected again",
        "no reconnect time measured: no device reconnected",
    ),
}

_NOT_IN_SUMMARY = "not in the run summary"
_NO_PROBE = "no probe in this run: run with a probe"

# Counts read straight from the run summary, under the same name.
_SUMMARY_COUNTS: dict[str, str] = {
    "messages_sent": "publishes handed to the protocol",
    "messages_acked": "publishes acknowledged (PUBACK, PUBCOMP)",
    "messages_failed": "publishes that will never be confirmed",
    "messages_in_flight": "publishes sent, neither acknowledged nor failed",
    "connects": "connections accepted",
    "connect_attempts": "connections tried",
    "connect_failures": "connection attempts that failed",
    "reconnects": "connections after a device's first",
    "disconnects": "connections lost or closed",
    "commands_received": "commands delivered to devices",
    "commands_answered": "commands the devices answered",
    "devices_connected": "devices connected when the run (or the window) ended",
}

# Counts read from the probe's summary, under the same name.
_PROBE_COUNTS: dict[str, str] = {
    "lost": "messages the probe never received",
    "duplicates": "messages the probe received more than once",
    "reordered": "messages the probe received out of order",
    "schema_checked": "messages the probe checked against their device model",
    "schema_errors": "messages that did not match their device model",
}

_NO_COMMANDS = "no command was sent: add a command action to the scenario"

# Counts of the scenario's command actions (the commander's summary key in brackets).
_COMMAND_COUNTS: dict[str, tuple[str, str]] = {
    "commands_sent": ("sent", "commands the scenario's actions sent"),
    "command_replies": ("replied", "replies to them, in time, of any status"),
    "commands_rejected": ("rejected", "replies whose status was not ok"),
    "command_timeouts": ("timed_out", "commands without a reply in their timeout"),
}

PROBE_METRICS = frozenset(
    {"delivery_ratio", *_PROBE_COUNTS, *(f"{n}.count" for n in _PROBE_COUNTS)}
)
"""Metrics only the probe's end-of-run summary has (no window, no live value)."""

COMMAND_METRICS = frozenset(
    {
        "command_reply_ratio",
        *_COMMAND_COUNTS,
        *(f"{n}.count" for n in _COMMAND_COUNTS),
        *(f"command_reply.{stat}" for stat in HISTOGRAM_STATS),
    }
)
"""Metrics of the scenario's command actions (no live value)."""

# Ratios of two summary counts: name -> (numerator, denominator, description, missing).
_SUMMARY_RATIOS: dict[str, tuple[str, str, str, str]] = {
    "connect_errors.rate": (
        "connect_failures",
        "connect_attempts",
        "connect_failures / connect_attempts",
        "no connection was attempted",
    ),
    "messages_failed.rate": (
        "messages_failed",
        "messages_sent",
        "messages_failed / messages_sent",
        "no message was sent",
    ),
    "commands.answer_ratio": (
        "commands_answered",
        "commands_received",
        "commands_answered / commands_received",
        "no command was received",
    ),
}


def _build_metrics() -> dict[str, Metric]:
    metrics: dict[str, Metric] = {}

    def add(name: str, kind: MetricKind, description: str, missing: str) -> None:
        metrics[name] = Metric(name, kind, description, missing)
        if kind is MetricKind.COUNT and "." not in name:
            metrics[f"{name}.count"] = Metric(f"{name}.count", kind, description, missing)

    for histogram in HISTOGRAM_NAMES:
        description, missing = _HISTOGRAMS[histogram]
        for stat in HISTOGRAM_STATS:
            kind = MetricKind.COUNT if stat == "count" else MetricKind.DURATION
            add(f"{histogram}.{stat}", kind, f"{stat} of {description}", missing)
    for name, description in _SUMMARY_COUNTS.items():
        add(name, MetricKind.COUNT, description, _NOT_IN_SUMMARY)
    add("errors", MetricKind.COUNT, "errors of every kind", _NOT_IN_SUMMARY)
    for name, (_, _, description, missing) in _SUMMARY_RATIOS.items():
        add(name, MetricKind.RATIO, description, missing)
    add(
        "delivery_ratio",
        MetricKind.RATIO,
        "share of the messages the probe expected that it received",
        "no delivery measured: run with a probe, and let it receive messages",
    )
    for name, description in _PROBE_COUNTS.items():
        add(name, MetricKind.COUNT, description, _NO_PROBE)
    for stat in HISTOGRAM_STATS:
        kind = MetricKind.COUNT if stat == "count" else MetricKind.DURATION
        add(
            f"command_reply.{stat}",
            kind,
            f"{stat} of a command sent to its reply received",
            "no command reply measured: add a command action, to a model that replies",
        )
    for name, (_, description) in _COMMAND_COUNTS.items():
        add(name, MetricKind.COUNT, description, _NO_COMMANDS)
    add(
        "devices_connected.ratio",
        MetricKind.RATIO,
        "devices_connected / the run's devices",
        "the number of devices is not known here (a scenario knows it)",
    )
    add(
        "command_reply_ratio",
        MetricKind.RATIO,
        "command_replies / commands_sent",
        _NO_COMMANDS,
    )
    return metrics


METRICS: Mapping[str, Metric] = MappingProxyType(_build_metrics())
"""Every metric a check can name, by name (see the module docstring's table)."""

# Base name -> the statistics it takes after a dot (``e2e_latency`` -> p50, ...).
_STATS_BY_BASE: dict[str, list[str]] = {}
for _name in METRICS:
    _base, _dot, _stat = _name.rpartition(".")
    if _dot:
        _STATS_BY_BASE.setdefault(_base, []).append(_stat)
del _name, _base, _dot, _stat


# ---------------------------------------------------------------------------------------
# The language
# ---------------------------------------------------------------------------------------

OPERATORS: Mapping[str, Callable[[float, float], bool]] = MappingProxyType(
    {
        "<": operator.lt,
        "<=": operator.le,
        ">": operator.gt,
        ">=": operator.ge,
        "==": operator.eq,
        "!=": operator.ne,
    }
)
"""The comparison operators, ``observed OP threshold``."""

# Operators people write from other languages, and what they meant.
_OPERATOR_HINTS = {"=": "==", "=<": "<=", "=>": ">=", "<>": "!=", "=!": "!="}

# Units each kind of metric takes, and the factor from the unit to the base unit. The
# bare number ("") is in the base unit. "µ" is MICRO SIGN, "μ" GREEK SMALL LETTER MU:
# keyboards produce either.
_UNITS: dict[MetricKind, dict[str, Decimal]] = {
    MetricKind.DURATION: {
        "": Decimal(1),
        "us": Decimal("1e-6"),
        "\u00b5s": Decimal("1e-6"),
        "\u03bcs": Decimal("1e-6"),
        "ms": Decimal("1e-3"),
        "s": Decimal(1),
        "m": Decimal(60),
    },
    MetricKind.RATIO: {"": Decimal(1), "%": Decimal("0.01")},
    MetricKind.COUNT: {"": Decimal(1)},
}
_ALL_UNITS = {unit for units in _UNITS.values() for unit in units if unit}

# Exact decimal arithmetic for unit conversion: 250ms and 0.25s must be the same float.
_DECIMAL = Context(prec=200, Emax=MAX_EMAX, Emin=MIN_EMIN)

# The three parts of a check. The metric runs up to a space or an operator character;
# the operator is every operator character that follows, so "=>" is seen whole (and
# refused) rather than read as "=" then ">...".
_CHECK_RE = re.compile(r"\s*(?P<metric>[^\s<>=!~]*)\s*(?P<op>[<>=!~]*)\s*(?P<value>.*?)\s*")
_VALUE_RE = re.compile(
    r"(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<unit>[^\s\d.+-]*)"
)


@dataclass(frozen=True)
class Check:
    """A parsed check: ``metric op threshold``, the threshold in the metric's base unit."""

    name: str
    """Unique within a run; the expression unless given."""
    expression: str
    """As written (stripped), e.g. ``e2e_latency.p99 < 200ms``."""
    metric: str
    """A key of :data:`METRICS` (``p99.9`` normalised to ``p99_9``)."""
    op: str
    """A key of :data:`OPERATORS`."""
    threshold: float
    """In the metric's base unit: seconds, a fraction or a count."""
    unit: str
    """As written: ``ms``, ``%``..., or ``""`` for a bare number."""
    value: float
    """The threshold as written, in ``unit`` (200 for ``200ms``)."""

    @property
    def kind(self) -> MetricKind:
        """What the metric measures."""
        return metric_info(self.metric).kind


def parse_check(text: str, name: str | None = None) -> Check:
    """The check ``text`` (``METRIC OP VALUE[UNIT]``), named ``name`` or its own text.

    Raises :class:`CheckError`, naming the problem, for an unknown metric (with the
    closest names), an unknown statistic, a bad operator, a bad number or a unit the
    metric cannot take.
    """
    expression = text.strip()
    if name is not None and not name.strip():
        raise CheckError("a check's name must not be empty", expression=expression)
    match = _CHECK_RE.fullmatch(text)
    if match is None:  # pragma: no cover - every part of the pattern may be empty
        raise CheckError("expected METRIC OP VALUE", expression=expression)
    raw_metric, op, raw_value = match["metric"], match["op"], match["value"]
    if not raw_metric:
        raise CheckError(
            "expected a metric first, as in 'e2e_latency.p99 < 200ms'", expression=expression
        )
    metric = _resolve_metric(raw_metric, expression)
    if op not in OPERATORS:
        raise CheckError(_operator_problem(raw_metric, op, raw_value), expression=expression)
    if not raw_value:
        raise CheckError(f"expected a threshold after {op!r}", expression=expression)
    value_match = _VALUE_RE.fullmatch(raw_value)
    if value_match is None:
        raise CheckError(
            f"bad threshold {raw_value!r}: expected a number and an optional unit, "
            "as in 200ms, 0.999, 99.9% or 10",
            expression=expression,
        )
    number, unit = value_match["number"], value_match["unit"]
    kind = metric_info(metric).kind
    scale = _unit_scale(metric, kind, unit, expression)
    try:
        exact = _DECIMAL.multiply(Decimal(number), scale)
        threshold = float(exact)
        value = float(Decimal(number))
    except InvalidOperation as exc:  # an exponent beyond even the decimal context's
        raise CheckError(f"bad number {number!r}: out of range", expression=expression) from exc
    if not (math.isfinite(threshold) and math.isfinite(value)):
        raise CheckError(f"bad number {number!r}: out of range", expression=expression)
    return Check(
        name=expression if name is None else name,
        expression=expression,
        metric=metric,
        op=op,
        threshold=threshold,
        unit=unit,
        value=value,
    )


STATE_METRIC = re.compile(
    r"(?P<which>state|state_reached)\.(?P<fleet>[A-Za-z_][A-Za-z0-9_-]*)\."
    r"(?P<state>[A-Za-z_][A-Za-z0-9_]*)"
)
"""``state.FLEET.STATE`` (the share of a fleet's devices in a state) and
``state_reached.FLEET.STATE`` (the share that has been in it): named by the scenario's
fleets and their models' states, so checked against them when a scenario loads."""


def metric_info(name: str) -> Metric:
    """What a metric a check may name is: one of :data:`METRICS`, or a state metric."""
    known = METRICS.get(name)
    if known is not None:
        return known
    match = STATE_METRIC.fullmatch(name)
    if match is None:
        raise KeyError(name)
    fleet, state = match["fleet"], match["state"]
    if match["which"] == "state":
        description = f"share of fleet {fleet}'s devices in state {state}"
    else:
        description = f"share of fleet {fleet}'s devices that have been in state {state}"
    return Metric(name, MetricKind.RATIO, description, f"no fleet {fleet} in this run")


def _resolve_metric(raw: str, expression: str) -> str:
    """The :data:`METRICS` key ``raw`` names, or a :class:`CheckError` saying why none."""
    name = raw[: -len("p99.9")] + "p99_9" if raw.endswith(".p99.9") else raw
    if name in METRICS or STATE_METRIC.fullmatch(name):
        return name
    base, dot, stat = name.rpartition(".")
    if not dot and name in _STATS_BY_BASE:
        # A histogram (or ratio family) named without its statistic.
        known = _STATS_BY_BASE[name]
        example = "p99" if "p99" in known else known[0]
        raise CheckError(
            f"{name} needs a statistic: {name}.{example} (one of {', '.join(known)})",
            expression=expression,
        )
    if dot and base in _STATS_BY_BASE:
        stats = ", ".join(_STATS_BY_BASE[base])
        raise CheckError(
            f"unknown statistic {stat!r} for {base}: use one of {stats}", expression=expression
        )
    if dot and base in METRICS:
        raise CheckError(f"{base} takes no statistic, not {stat!r}", expression=expression)
    close = tuple(difflib.get_close_matches(name, METRICS, n=3, cutoff=0.6))
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see docs/checks.md"
    raise CheckError(f"unknown metric {raw!r}{hint}", expression=expression, suggestions=close)


def _operator_problem(metric: str, op: str, value: str) -> str:
    known = " ".join(OPERATORS)
    if not op:
        after = f" between {metric} and {value!r}" if value else f" after {metric}"
        return f"expected an operator ({known}){after}"
    if op in _OPERATOR_HINTS:
        return f"unknown operator {op!r}; did you mean {_OPERATOR_HINTS[op]!r}?"
    return f"unknown operator {op!r}; use one of {known}"


def _unit_scale(metric: str, kind: MetricKind, unit: str, expression: str) -> Decimal:
    """The factor from ``unit`` to ``metric``'s base unit, or a :class:`CheckError`."""
    units = _UNITS[kind]
    if unit in units:
        return units[unit]
    if unit not in _ALL_UNITS:
        raise CheckError(
            f"unknown unit {unit!r}: durations take us, µs, ms, s or m, ratios take %",
            expression=expression,
        )
    if kind is MetricKind.COUNT:
        takes = "a bare number"
    elif kind is MetricKind.RATIO:
        takes = "a fraction (0.999) or a percentage (99.9%)"
    else:
        takes = "us, µs, ms, s, m or a bare number of seconds"
    raise CheckError(
        f"{metric} is a {kind.name.lower()}: it takes {takes}, not {unit!r}",
        expression=expression,
    )


# ---------------------------------------------------------------------------------------
# A run's metrics
# ---------------------------------------------------------------------------------------


def _number(value: object) -> float | None:
    """``value`` as a float, or None if it is not a number (None, NaN, a bool...)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return None if math.isnan(result) else result


def _histogram_metrics(name: str, summary: Mapping[str, Any], out: dict[str, float]) -> None:
    """``name.<stat>`` for each statistic of a :meth:`Histogram.summary` with samples."""
    count = _number(summary.get("count"))
    if not count:
        return
    for stat, key in HISTOGRAM_STATS.items():
        value = _number(summary.get(key))
        if value is not None:
            out[f"{name}.{stat}"] = value


def run_metrics(
    summary: Mapping[str, Any],
    probe: Mapping[str, Any] | None,
    commands: Mapping[str, Any] | None = None,
    devices: int | None = None,
) -> dict[str, float]:
    """Every metric of a run with a value, flat, in base units (see the module doc).

    ``summary`` is :func:`iotix.engine.results.summarise` of the final snapshot,
    ``probe`` the probe's :meth:`~iotix.engine.probe.DeliveryTracker.summary` or None,
    ``commands`` the summary of the scenario's command actions (sent, replied,
    rejected, timed_out, reply_latency) or None, ``devices`` how many devices the run
    has (for ``devices_connected.ratio``) or None.
    Either may have been through JSON (NaN as null). A metric the run has no value for
    (an empty histogram, no probe, a ratio over zero, NaN) is left out: :func:`evaluate`
    fails its checks and says why.
    """
    out: dict[str, float] = {}
    latencies: Mapping[str, Any] = summary.get("latency_s") or {}
    for name in HISTOGRAM_NAMES:
        histogram = latencies.get(name)
        if isinstance(histogram, dict):
            _histogram_metrics(name, histogram, out)
    if probe is not None:
        probe_e2e = probe.get("e2e_latency")
        if isinstance(probe_e2e, dict) and _number(probe_e2e.get("count")):
            # The probe's end-to-end latency wins over the engine's.
            for stat in HISTOGRAM_STATS:
                out.pop(f"e2e_latency.{stat}", None)
            _histogram_metrics("e2e_latency", probe_e2e, out)
    for name in _SUMMARY_COUNTS:
        value = _number(summary.get(name))
        if value is not None:
            out[name] = value
    errors_by_kind = summary.get("errors_by_kind")
    if isinstance(errors_by_kind, dict):
        out["errors"] = float(sum(_number(v) or 0.0 for v in errors_by_kind.values()))
    for name, (numerator, denominator, _, _) in _SUMMARY_RATIOS.items():
        top, bottom = out.get(numerator), out.get(denominator)
        if top is not None and bottom:
            out[name] = top / bottom
    if probe is not None:
        for name in ("delivery_ratio", *_PROBE_COUNTS):
            value = _number(probe.get(name))
            if value is not None:
                out[name] = value
    _state_metrics(summary, out)
    connected = out.get("devices_connected")
    if devices and connected is not None:
        out["devices_connected.ratio"] = connected / devices
    if commands is not None:
        latency = commands.get("reply_latency")
        if isinstance(latency, dict):
            _histogram_metrics("command_reply", latency, out)
        for name, (key, _) in _COMMAND_COUNTS.items():
            value = commands.get(key)
            if isinstance(value, dict):  # counts by status
                value = sum(_number(v) or 0.0 for v in value.values())
            number = _number(value)
            if number is not None:
                out[name] = number
        sent = out.get("commands_sent")
        if sent:
            out["command_reply_ratio"] = out.get("command_replies", 0.0) / sent
    # Every count answers to <name>.count too.
    for name in list(out):
        alias = f"{name}.count"
        if alias in METRICS and alias not in out:
            out[alias] = out[name]
    return out


def _state_metrics(summary: Mapping[str, Any], out: dict[str, float]) -> None:
    """``state.F.S`` and ``state_reached.F.S``: shares of each fleet's devices."""
    for which, key in (("state", "states"), ("state_reached", "states_reached")):
        counts = summary.get(key)
        if not isinstance(counts, dict):
            continue
        now = summary.get("states")
        totals: dict[str, float] = {}
        for fleet_state, count in (now if isinstance(now, dict) else {}).items():
            fleet = str(fleet_state).rpartition("/")[0]
            totals[fleet] = totals.get(fleet, 0.0) + (_number(count) or 0.0)
        for fleet_state, count in counts.items():
            fleet, _, state = str(fleet_state).rpartition("/")
            number = _number(count)
            if totals.get(fleet) and number is not None:
                out[f"{which}.{fleet}.{state}"] = number / totals[fleet]


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------


def _format_number(value: float, *, shortest: bool = False) -> str:
    """``value`` for a person: integers without ``.0``, others shortest or to 6 digits."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if shortest else format(value, ".6g")


def _with_unit(number: str, check: Check) -> str:
    if check.unit == "%":
        return f"{number}%"
    if check.unit:
        return f"{number} {check.unit}"
    return f"{number} s" if check.kind is MetricKind.DURATION else number


def _expected(check: Check) -> str:
    return f"expected {check.op} {_with_unit(_format_number(check.value, shortest=True), check)}"


def _evaluate_one(check: Check, metrics: Mapping[str, float]) -> CheckResult:
    value = metrics.get(check.metric)
    if value is None or math.isnan(value):
        why = metric_info(check.metric).missing
        seen = f"{check.metric} = NaN" if value is not None else check.metric
        return CheckResult(
            name=check.name,
            expression=check.expression,
            passed=False,
            observed=None,
            message=f"{seen}: {why}; {_expected(check)}",
        )
    passed = OPERATORS[check.op](value, check.threshold)
    observed = float(value / float(_UNITS[check.kind][check.unit]))
    return CheckResult(
        name=check.name,
        expression=check.expression,
        passed=passed,
        observed=observed,
        message=(
            f"{check.metric} = {_with_unit(_format_number(observed), check)}, {_expected(check)}"
        ),
    )


def evaluate(checks: Sequence[Check], metrics: Mapping[str, float]) -> list[CheckResult]:
    """One result per check, in order, against ``metrics`` (from :func:`run_metrics`).

    The comparison is in base units, so rounding the observed value to the check's unit
    never flips a verdict. ``observed`` is in the check's unit (ms for ``200ms``, a
    percentage for ``99.9%``). A metric missing from ``metrics``, or NaN, fails its
    check with the reason; nothing here raises on a run's figures.
    """
    return [_evaluate_one(check, metrics) for check in checks]
