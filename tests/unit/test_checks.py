"""Checks: the threshold language, a run's metrics, and their evaluation."""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotix.engine.probe import DeliveryTracker
from iotix.engine.results import summarise
from iotix.errors import IotixError
from iotix.metrics import HISTOGRAM_NAMES, Histogram, Snapshot
from iotix.scenario import CheckResult
from iotix.scenario import checks as checks_module
from iotix.scenario.checks import (
    HISTOGRAM_STATS,
    METRICS,
    Check,
    CheckError,
    MetricKind,
    evaluate,
    parse_check,
    run_metrics,
)

DOCS = Path(__file__).parents[2] / "docs" / "checks.md"

SENT_MS = 1_700_000_000_000
"""An epoch in milliseconds for the probe's observations."""

# -- parsing: every form -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "metric", "op", "threshold", "unit"),
    [
        ("e2e_latency.p99 < 200ms", "e2e_latency.p99", "<", 0.2, "ms"),
        ("ack_latency.p50 <= 0.05s", "ack_latency.p50", "<=", 0.05, "s"),
        ("delivery_ratio >= 0.999", "delivery_ratio", ">=", 0.999, ""),
        ("delivery_ratio >= 99.9%", "delivery_ratio", ">=", 0.999, "%"),
        ("connect_errors.rate < 0.1%", "connect_errors.rate", "<", 0.001, "%"),
        ("messages_failed == 0", "messages_failed", "==", 0.0, ""),
        ("reconnects.count <= 10", "reconnects.count", "<=", 10.0, ""),
        ("schedule_lag.max < 1s", "schedule_lag.max", "<", 1.0, "s"),
        ("duplicates == 0", "duplicates", "==", 0.0, ""),
        ("devices_connected >= 100", "devices_connected", ">=", 100.0, ""),
        ("connect_latency.p90 > 500us", "connect_latency.p90", ">", 0.0005, "us"),
        ("connect_latency.p90 > 500\u00b5s", "connect_latency.p90", ">", 0.0005, "\u00b5s"),
        ("connect_latency.p90 > 500\u03bcs", "connect_latency.p90", ">", 0.0005, "\u03bcs"),
        ("intended_latency.mean != 2m", "intended_latency.mean", "!=", 120.0, "m"),
        ("schedule_lag.min >= 0", "schedule_lag.min", ">=", 0.0, ""),
        ("e2e_latency.p99_9 < 1.5", "e2e_latency.p99_9", "<", 1.5, ""),
        ("messages_failed.rate < 1%", "messages_failed.rate", "<", 0.01, "%"),
        ("commands.answer_ratio == 1", "commands.answer_ratio", "==", 1.0, ""),
        ("errors.count < 1e3", "errors.count", "<", 1000.0, ""),
        ("ack_latency.count > 0", "ack_latency.count", ">", 0.0, ""),
    ],
)
def test_parse_check_reads_every_form(
    text: str, metric: str, op: str, threshold: float, unit: str
) -> None:
    check = parse_check(text)

    assert (check.metric, check.op, check.threshold, check.unit) == (
        metric,
        op,
        threshold,
        unit,
    )


def test_parse_check_reads_p99_point_9_as_p99_9() -> None:
    assert parse_check("e2e_latency.p99.9 < 1s").metric == "e2e_latency.p99_9"


def test_parse_check_does_not_need_spaces() -> None:
    tight, spaced = parse_check("e2e_latency.p99<200ms"), parse_check("e2e_latency.p99 < 200ms")

    assert (tight.metric, tight.op, tight.threshold) == (spaced.metric, spaced.op, 0.2)


def test_parse_check_allows_a_space_before_the_unit() -> None:
    assert parse_check("e2e_latency.p99 < 200 ms").threshold == 0.2


def test_parse_check_keeps_the_threshold_as_written() -> None:
    check = parse_check("e2e_latency.p99 < 200ms")

    assert check.value == 200.0
    assert check.unit == "ms"


def test_parse_check_names_default_to_the_stripped_expression() -> None:
    check = parse_check("  delivery_ratio >= 99.9%  ")

    assert check.name == "delivery_ratio >= 99.9%"
    assert check.expression == "delivery_ratio >= 99.9%"


def test_parse_check_takes_a_given_name() -> None:
    check = parse_check("delivery_ratio >= 99.9%", name="no loss")

    assert check.name == "no loss"
    assert check.expression == "delivery_ratio >= 99.9%"


def test_a_check_is_frozen() -> None:
    check = parse_check("duplicates == 0")

    with pytest.raises(AttributeError):
        check.op = "!="  # type: ignore[misc]


def test_a_check_knows_its_metric_kind() -> None:
    assert parse_check("e2e_latency.p99 < 1s").kind is MetricKind.DURATION
    assert parse_check("e2e_latency.count > 1").kind is MetricKind.COUNT
    assert parse_check("delivery_ratio > 0.5").kind is MetricKind.RATIO


# -- parsing: errors ---------------------------------------------------------------------


def test_check_error_is_an_iotix_error_carrying_the_expression() -> None:
    with pytest.raises(CheckError) as caught:
        parse_check("nope < 1")

    assert isinstance(caught.value, IotixError)
    assert caught.value.expression == "nope < 1"
    assert str(caught.value).startswith("check 'nope < 1': ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # unknown metric, with close names
        ("e2e_latncy.p99 < 1s", "unknown metric 'e2e_latncy.p99'; did you mean e2e_latency.p99"),
        ("delivery_rate >= 0.9", "did you mean delivery_ratio"),
        ("zzz < 1", "unknown metric 'zzz'; see docs/checks.md"),
        # unknown statistic
        ("e2e_latency.p95 < 1s", "unknown statistic 'p95' for e2e_latency: use one of p50"),
        ("connect_errors.ratio < 1%", "unknown statistic 'ratio' for connect_errors"),
        ("messages_sent.rate < 1%", "unknown statistic 'rate' for messages_sent"),
        ("e2e_latency < 1s", "e2e_latency needs a statistic: e2e_latency.p99"),
        ("delivery_ratio.p99 > 0.9", "delivery_ratio takes no statistic, not 'p99'"),
        # bad operator
        ("delivery_ratio => 0.9", "unknown operator '=>'; did you mean '>='?"),
        ("delivery_ratio = 0.9", "unknown operator '='; did you mean '=='?"),
        ("delivery_ratio ~ 0.9", "unknown operator '~'; use one of < <= > >= == !="),
        ("delivery_ratio 0.9", "expected an operator (< <= > >= == !=) between delivery_ratio"),
        ("delivery_ratio", "expected an operator (< <= > >= == !=) after delivery_ratio"),
        # bad number
        ("delivery_ratio >=", "expected a threshold after '>='"),
        ("delivery_ratio >= high", "bad threshold 'high': expected a number"),
        ("delivery_ratio >= 0,9", "bad threshold '0,9'"),
        ("delivery_ratio >= nan", "bad threshold 'nan'"),
        ("messages_sent < 1e400", "bad number '1e400': out of range"),
        ("messages_sent < 1e99999999999999999999", "out of range"),
        ("e2e_latency.p99 < 200 ms extra", "bad threshold '200 ms extra'"),
        # wrong unit for the metric
        ("messages_sent < 5s", "messages_sent is a count: it takes a bare number, not 's'"),
        ("duplicates == 0%", "duplicates is a count: it takes a bare number, not '%'"),
        ("e2e_latency.p99 < 1%", "e2e_latency.p99 is a duration: it takes us"),
        ("delivery_ratio >= 5ms", "delivery_ratio is a ratio: it takes a fraction"),
        ("e2e_latency.count > 5ms", "e2e_latency.count is a count"),
        ("e2e_latency.p99 < 1h", "unknown unit 'h'"),
        # nothing to check
        ("", "expected a metric first"),
        ("< 5", "expected a metric first"),
    ],
)
def test_parse_check_rejects_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(CheckError, match=re.escape(message)):
        parse_check(text)


def test_an_unknown_metric_error_lists_close_names() -> None:
    with pytest.raises(CheckError) as caught:
        parse_check("e2e_latncy.p99 < 1s")

    assert "e2e_latency.p99" in caught.value.suggestions


def test_an_empty_name_is_refused() -> None:
    with pytest.raises(CheckError, match="name must not be empty"):
        parse_check("duplicates == 0", name=" ")


# -- units -------------------------------------------------------------------------------

decimal_text = st.decimals(
    min_value=Decimal("-1e9"), max_value=Decimal("1e9"), allow_nan=False, places=6
).map(lambda d: format(d, "f"))


@given(ms=decimal_text)
def test_a_threshold_in_ms_equals_the_same_in_s(ms: str) -> None:
    seconds = format(Decimal(ms).scaleb(-3), "f")

    assert (
        parse_check(f"e2e_latency.p99 < {ms}ms").threshold
        == parse_check(f"e2e_latency.p99 < {seconds}s").threshold
        == parse_check(f"e2e_latency.p99 < {seconds}").threshold
    )


@given(us=decimal_text)
def test_a_threshold_in_us_equals_the_same_in_ms(us: str) -> None:
    ms = format(Decimal(us).scaleb(-3), "f")

    assert (
        parse_check(f"ack_latency.max < {us}us").threshold
        == parse_check(f"ack_latency.max < {us}\u00b5s").threshold
        == parse_check(f"ack_latency.max < {ms}ms").threshold
    )


@given(percent=decimal_text)
def test_a_percentage_equals_the_same_fraction(percent: str) -> None:
    fraction = format(Decimal(percent).scaleb(-2), "f")

    assert (
        parse_check(f"delivery_ratio >= {percent}%").threshold
        == parse_check(f"delivery_ratio >= {fraction}").threshold
    )


@given(minutes=st.integers(min_value=0, max_value=10_000))
def test_a_threshold_in_minutes_is_sixty_seconds_each(minutes: int) -> None:
    assert parse_check(f"schedule_lag.max < {minutes}m").threshold == minutes * 60.0


# -- the metric table --------------------------------------------------------------------


def test_every_histogram_has_every_statistic() -> None:
    for histogram in HISTOGRAM_NAMES:
        for stat in HISTOGRAM_STATS:
            assert f"{histogram}.{stat}" in METRICS


def test_every_count_has_a_count_alias() -> None:
    counts = [name for name, m in METRICS.items() if m.kind is MetricKind.COUNT and "." not in name]

    assert counts
    assert all(f"{name}.count" in METRICS for name in counts)


def test_the_module_docstring_and_the_docs_name_every_metric() -> None:
    histograms = [*HISTOGRAM_NAMES, "command_reply"]
    histogram_metrics = {f"{h}.{stat}" for h in histograms for stat in HISTOGRAM_STATS}
    aliases = {name for name in METRICS if name.endswith(".count")}
    named = [*histograms, *(set(METRICS) - histogram_metrics - aliases)]
    for text in (checks_module.__doc__ or "", DOCS.read_text(encoding="utf-8")):
        for name in named:
            assert f"`{name}`" in text, name
        for stat in HISTOGRAM_STATS:
            assert f"`{stat}`" in text, stat


# -- run_metrics on a real run -----------------------------------------------------------


def final_snapshot() -> Snapshot:
    """A merged-looking snapshot: 10 devices, 100 QoS 1 publishes, 2 failed."""
    snapshot = Snapshot(worker=0, at_s=60.0, devices_connected=10)
    counters = snapshot.counters
    counters.connect_attempts = 12
    counters.connects = 10
    counters.count_connect_failure("refused")
    counters.count_connect_failure("timeout")
    counters.reconnects = 1
    counters.disconnects = 1
    for index in range(100):
        counters.count_sent(1, size_bytes=50)
        if index < 98:
            counters.count_acked(1)
            snapshot.ack_latency.record(0.010 + index / 10_000)
            snapshot.intended_latency.record(0.020 + index / 10_000)
        snapshot.schedule_lag.record(0.001)
    counters.count_failed(1, count=2)
    counters.commands_received = 4
    counters.commands_answered = 3
    counters.count_error("TimeoutError", 2)
    counters.count_error("OSError")
    for _ in range(10):
        snapshot.connect_latency.record(0.005)
    return snapshot


def probe_summary() -> dict[str, Any]:
    tracker = DeliveryTracker()
    for seq in (0, 1, 3, 3, 2, 5):  # 4 lost, the second 3 a duplicate, 2 reordered
        tracker.observe("d1", "telemetry", seq, SENT_MS, SENT_MS / 1000 + 0.25)
    return tracker.finish()


def test_run_metrics_reads_the_histograms_in_seconds() -> None:
    snapshot = final_snapshot()

    metrics = run_metrics(summarise(snapshot), None)

    ack = snapshot.ack_latency.summary()
    assert metrics["ack_latency.p50"] == ack["p50_s"]
    assert metrics["ack_latency.p99"] == ack["p99_s"]
    assert metrics["ack_latency.p99_9"] == ack["p99_9_s"]
    assert metrics["ack_latency.min"] == pytest.approx(0.010)
    assert metrics["ack_latency.max"] == pytest.approx(0.0197)
    assert metrics["ack_latency.mean"] == ack["mean_s"]
    assert metrics["ack_latency.count"] == 98
    assert metrics["connect_latency.p90"] == pytest.approx(0.005, rel=0.01)
    assert metrics["schedule_lag.max"] == pytest.approx(0.001)


def test_run_metrics_leaves_out_empty_histograms() -> None:
    metrics = run_metrics(summarise(final_snapshot()), None)

    assert not any(name.startswith("e2e_latency.") for name in metrics)


def test_run_metrics_reads_the_counters_with_count_aliases() -> None:
    metrics = run_metrics(summarise(final_snapshot()), None)

    assert metrics["messages_sent"] == metrics["messages_sent.count"] == 100
    assert metrics["messages_acked"] == 98
    assert metrics["messages_failed"] == 2
    assert metrics["messages_in_flight"] == 0
    assert metrics["connects"] == 10
    assert metrics["connect_attempts"] == 12
    assert metrics["connect_failures"] == 2
    assert metrics["reconnects.count"] == 1
    assert metrics["disconnects"] == 1
    assert metrics["commands_received"] == 4
    assert metrics["commands_answered"] == 3
    assert metrics["devices_connected"] == 10
    assert metrics["errors"] == metrics["errors.count"] == 3


def test_run_metrics_computes_the_ratios() -> None:
    metrics = run_metrics(summarise(final_snapshot()), None)

    assert metrics["connect_errors.rate"] == 2 / 12
    assert metrics["messages_failed.rate"] == 2 / 100
    assert metrics["commands.answer_ratio"] == 3 / 4


def test_a_ratio_over_zero_is_missing() -> None:
    metrics = run_metrics(summarise(Snapshot(worker=0, at_s=1.0)), None)

    assert metrics["connect_attempts"] == 0
    assert "connect_errors.rate" not in metrics
    assert "messages_failed.rate" not in metrics
    assert "commands.answer_ratio" not in metrics


def test_run_metrics_without_a_probe_has_no_delivery_metrics() -> None:
    metrics = run_metrics(summarise(final_snapshot()), None)

    for name in ("delivery_ratio", "lost", "duplicates", "reordered", "lost.count"):
        assert name not in metrics


def test_run_metrics_reads_the_probe() -> None:
    metrics = run_metrics(summarise(final_snapshot()), probe_summary())

    assert metrics["delivery_ratio"] == 5 / 6
    assert metrics["lost"] == metrics["lost.count"] == 1
    assert metrics["duplicates"] == 1
    assert metrics["reordered"] == 1
    assert metrics["e2e_latency.count"] == 5
    assert metrics["e2e_latency.p99"] == pytest.approx(0.25, rel=0.01)


def test_the_probe_e2e_latency_wins_over_the_engine() -> None:
    snapshot = final_snapshot()
    snapshot.e2e_latency.record(9.0)

    metrics = run_metrics(summarise(snapshot), probe_summary())

    assert metrics["e2e_latency.max"] == pytest.approx(0.25, rel=0.01)
    assert metrics["e2e_latency.count"] == 5


def test_the_engine_e2e_latency_stands_when_the_probe_has_none() -> None:
    snapshot = final_snapshot()
    snapshot.e2e_latency.record(9.0)

    metrics = run_metrics(summarise(snapshot), DeliveryTracker().finish())

    assert metrics["e2e_latency.max"] == 9.0
    assert "delivery_ratio" not in metrics  # nothing expected: NaN, left out


def test_run_metrics_reads_summaries_that_went_through_json() -> None:
    summary = summarise(final_snapshot())
    probe = DeliveryTracker().finish()
    through_json = json.loads(json.dumps({"s": summary, "p": probe}).replace("NaN", "null"))

    assert run_metrics(through_json["s"], through_json["p"]) == run_metrics(summary, probe)


# -- evaluate ----------------------------------------------------------------------------


def evaluate_one(text: str, metrics: dict[str, float]) -> CheckResult:
    (result,) = evaluate([parse_check(text)], metrics)
    return result


def test_a_passing_check_reports_in_the_check_unit() -> None:
    result = evaluate_one("e2e_latency.p99 < 200ms", {"e2e_latency.p99": 0.1432})

    assert result.passed
    assert result.observed == pytest.approx(143.2)
    assert result.message == "e2e_latency.p99 = 143.2 ms, expected < 200 ms"


def test_a_failing_check_reports_the_same_way() -> None:
    result = evaluate_one("e2e_latency.p99 < 200ms", {"e2e_latency.p99": 0.25})

    assert not result.passed
    assert result.observed == pytest.approx(250.0)
    assert result.message == "e2e_latency.p99 = 250 ms, expected < 200 ms"


def test_a_percentage_check_observes_a_percentage() -> None:
    result = evaluate_one("delivery_ratio >= 99.9%", {"delivery_ratio": 0.9995})

    assert result.passed
    assert result.observed == pytest.approx(99.95)
    assert result.message == "delivery_ratio = 99.95%, expected >= 99.9%"


def test_a_bare_fraction_check_observes_a_fraction() -> None:
    result = evaluate_one("delivery_ratio >= 0.999", {"delivery_ratio": 0.99899})

    assert not result.passed
    assert result.observed == 0.99899
    assert result.message == "delivery_ratio = 0.99899, expected >= 0.999"


def test_a_bare_duration_reads_in_seconds() -> None:
    result = evaluate_one("schedule_lag.max < 1", {"schedule_lag.max": 0.5})

    assert result.message == "schedule_lag.max = 0.5 s, expected < 1 s"


def test_a_count_check_reads_as_an_integer() -> None:
    result = evaluate_one("messages_failed == 0", {"messages_failed": 3.0})

    assert not result.passed
    assert result.observed == 3
    assert result.message == "messages_failed = 3, expected == 0"


@pytest.mark.parametrize(
    ("op", "passed"),
    [("<", False), ("<=", True), (">", False), (">=", True), ("==", True), ("!=", False)],
)
def test_every_operator_compares_observed_to_threshold(op: str, passed: bool) -> None:
    assert evaluate_one(f"reconnects {op} 10", {"reconnects": 10.0}).passed is passed


def test_the_verdict_is_taken_in_base_units() -> None:
    # 0.3 s is not exactly 300 ms in binary; the comparison must not depend on it.
    assert evaluate_one("ack_latency.p99 <= 300ms", {"ack_latency.p99": 0.3}).passed


def test_a_missing_metric_fails_and_says_why() -> None:
    result = evaluate_one("e2e_latency.p99 < 200ms", {})

    assert not result.passed
    assert result.observed is None
    assert result.message == (
        "e2e_latency.p99: no e2e latency measured: run with a probe; expected < 200 ms"
    )


def test_a_missing_probe_metric_fails_and_says_why() -> None:
    result = evaluate_one("duplicates == 0", run_metrics(summarise(final_snapshot()), None))

    assert not result.passed
    assert "run with a probe" in result.message


def test_a_ratio_over_zero_fails_and_says_why() -> None:
    metrics = run_metrics(summarise(Snapshot(worker=0, at_s=1.0)), None)

    result = evaluate_one("connect_errors.rate < 0.1%", metrics)

    assert not result.passed
    assert result.message == ("connect_errors.rate: no connection was attempted; expected < 0.1%")


def test_a_nan_metric_fails_and_says_so() -> None:
    result = evaluate_one("delivery_ratio >= 99.9%", {"delivery_ratio": math.nan})

    assert not result.passed
    assert result.observed is None
    assert result.message.startswith("delivery_ratio = NaN: no delivery measured")


def test_evaluate_keeps_the_order_names_and_expressions() -> None:
    checks = [
        parse_check("messages_failed == 0", name="nothing failed"),
        parse_check("delivery_ratio >= 99.9%"),
    ]

    results = evaluate(checks, {"messages_failed": 0.0})

    assert [r.name for r in results] == ["nothing failed", "delivery_ratio >= 99.9%"]
    assert [r.expression for r in results] == [c.expression for c in checks]
    assert [r.passed for r in results] == [True, False]


def test_checks_over_a_real_run_read_well() -> None:
    metrics = run_metrics(summarise(final_snapshot()), probe_summary())
    checks: list[Check] = [
        parse_check("ack_latency.p99 < 50ms"),
        parse_check("messages_failed.rate < 1%"),
        parse_check("delivery_ratio >= 99.9%"),
    ]

    results = evaluate(checks, metrics)

    assert [r.passed for r in results] == [True, False, False]
    assert results[1].message == "messages_failed.rate = 2%, expected < 1%"
    assert results[2].message == "delivery_ratio = 83.3333%, expected >= 99.9%"


def test_an_empty_histogram_summary_gives_no_metric() -> None:
    histogram = Histogram()
    summary = {"latency_s": {"ack_latency": histogram.summary()}}

    assert run_metrics(summary, None) == {}
