"""Metrics: histogram accuracy against numpy, exact merges, counters that reconcile."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from iotix.metrics import (
    ALL_WORKERS,
    HIGHEST_S,
    HISTOGRAM_NAMES,
    LOWEST_S,
    RELATIVE_ERROR,
    Counters,
    Histogram,
    Snapshot,
    TimeSeries,
)

# Values a latency histogram meets: in range, below the floor (zero, negative: clock
# skew) and above the ceiling.
any_value_s = st.floats(min_value=-10.0, max_value=10_000.0, allow_nan=False)
in_range_value_s = st.floats(min_value=LOWEST_S, max_value=HIGHEST_S)


def histogram_of(values_s: list[float] | np.ndarray) -> Histogram:
    histogram = Histogram()
    for value_s in values_s:
        histogram.record(float(value_s))
    return histogram


def json_round_trip(data: object) -> Any:
    return json.loads(json.dumps(data, allow_nan=False))


# -- Histogram: accuracy ---------------------------------------------------------------


def within_bucket_of(got: float, expected: float) -> bool:
    """The reported value is never below the true one and at most one bucket above."""
    return expected <= got <= expected * (1.0 + RELATIVE_ERROR) * (1.0 + 1e-12)


@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    size=st.integers(min_value=1, max_value=3000),
    log_median=st.floats(min_value=math.log(1e-4), max_value=math.log(10.0)),
    sigma=st.floats(min_value=0.05, max_value=2.0),
    q=st.floats(min_value=0.0, max_value=100.0),
)
def test_percentile_matches_numpy_on_lognormal_data(
    seed: int, size: int, log_median: float, sigma: float, q: float
) -> None:
    # Where q * size / 100 is within float noise of an integer, numpy's n * (q / 100)
    # and the exact rank may name neighbouring values: both are right, so skip those.
    rank = q * size / 100.0
    assume(abs(rank - round(rank)) > 1e-6 or q in {0.0, 100.0})
    rng = np.random.default_rng(seed)
    values = np.clip(rng.lognormal(log_median, sigma, size), LOWEST_S, HIGHEST_S)
    expected = float(np.percentile(values, q, method="inverted_cdf"))

    got = histogram_of(values).percentile(q)

    assert abs(got - expected) / expected <= 0.01
    assert within_bucket_of(got, expected)


@pytest.mark.parametrize("q", [1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0, 99.9, 99.99])
def test_report_percentiles_match_numpy(q: float) -> None:
    rng = np.random.default_rng(7)
    values = rng.lognormal(math.log(0.02), 1.0, 100_003)
    histogram = Histogram()
    histogram.record_many(values)

    expected = float(np.percentile(values, q, method="inverted_cdf"))

    assert within_bucket_of(histogram.percentile(q), expected)


def test_percentile_rank_is_not_moved_by_float_noise_in_q() -> None:
    # 1 % apart, so every value has a bucket of its own; 99.9 * 1000 / 100 is
    # 999.0000000000001 in floating point, and must still mean the 999th value.
    values = [1e-5 * 1.01**i for i in range(1000)]
    histogram = histogram_of(values)

    assert within_bucket_of(histogram.percentile(99.9), values[998])
    assert within_bucket_of(histogram.percentile(7.0), values[69])


@given(in_range_value_s)
def test_bucket_holds_value_within_relative_error(value_s: float) -> None:
    histogram = Histogram()
    histogram.record(value_s)
    (index,) = np.flatnonzero(histogram._counts)

    lower_s, upper_s = histogram_edges(int(index))

    assert lower_s <= value_s < upper_s
    assert within_bucket_of(upper_s, value_s)  # the edge a percentile reports


def histogram_edges(index: int) -> tuple[float, float]:
    from iotix import metrics  # noqa: PLC0415  # the edge tables are private

    return float(metrics._LOWER_EDGES_S[index]), float(metrics._UPPER_EDGES_S[index])


@given(in_range_value_s)
def test_single_value_is_every_percentile(value_s: float) -> None:
    histogram = histogram_of([value_s])

    assert histogram.percentiles([0.0, 1.0, 50.0, 99.9, 100.0]) == [value_s] * 5


def test_min_max_and_mean_are_exact() -> None:
    values = [0.0123456789, 0.5, 2.25, 1e-4 + 1e-12]
    histogram = histogram_of(values)

    assert histogram.min_s == min(values)
    assert histogram.max_s == max(values)
    assert histogram.percentile(0) == min(values)
    assert histogram.percentile(100) == max(values)
    assert histogram.mean_s == pytest.approx(sum(values) / len(values), rel=1e-15)
    assert histogram.count == 4


def test_percentile_is_clamped_to_max() -> None:
    histogram = histogram_of([0.01001, 0.01002])

    assert histogram.percentile(50) == 0.01002


# -- Histogram: range ------------------------------------------------------------------


def test_values_above_the_ceiling_are_counted_as_overflow() -> None:
    histogram = histogram_of([0.01, 0.02, 5000.0, 1e9])

    assert histogram.overflow_count == 2
    assert histogram.count == 4
    assert histogram.max_s == 1e9
    assert histogram.percentile(75) == 1e9  # overflow reports the exact maximum
    assert histogram.percentile(100) == 1e9
    assert histogram.to_dict()["overflow_count"] == 2


def test_the_ceiling_itself_is_not_overflow() -> None:
    histogram = histogram_of([HIGHEST_S])

    assert histogram.overflow_count == 0
    assert histogram.percentile(50) == HIGHEST_S


def test_values_below_the_floor_go_into_the_first_bucket() -> None:
    histogram = histogram_of([0.0, -0.002, 1e-9, LOWEST_S])

    assert histogram._counts[0] == 4
    assert histogram.overflow_count == 0
    assert histogram.min_s == -0.002  # exact, whatever the bucket
    # Never below the true value, and no further above it than the first bucket's edge.
    assert 1e-9 <= histogram.percentile(75) <= LOWEST_S * (1 + RELATIVE_ERROR)


def test_only_negative_values_report_them_exactly_at_the_extremes() -> None:
    histogram = histogram_of([-0.003, -0.001])

    assert histogram.percentile(0) == -0.003
    assert histogram.percentile(50) == -0.001  # first bucket's edge, clamped to max


def test_record_rejects_nan() -> None:
    histogram = Histogram()

    with pytest.raises(ValueError, match="nan"):
        histogram.record(math.nan)
    with pytest.raises(ValueError, match="nan"):
        histogram.record_many(np.array([0.1, math.nan]))
    assert histogram.count == 0


def test_percentile_rejects_q_outside_0_to_100() -> None:
    histogram = histogram_of([0.1])

    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        histogram.percentile(100.5)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        histogram.percentile(-1)


# -- Histogram: empty ------------------------------------------------------------------


def test_empty_histogram_reports_nan() -> None:
    histogram = Histogram()

    assert histogram.count == 0
    assert histogram.sum_s == 0.0
    assert math.isnan(histogram.percentile(50))
    assert math.isnan(histogram.percentile(0))
    assert math.isnan(histogram.min_s)
    assert math.isnan(histogram.max_s)
    assert math.isnan(histogram.mean_s)
    summary = histogram.summary()
    assert summary["count"] == 0
    assert all(math.isnan(v) for k, v in summary.items() if k != "count")


def test_empty_histogram_serialises_without_nan() -> None:
    data = Histogram().to_dict()

    assert data["min_s"] is None
    assert data["max_s"] is None
    assert Histogram.from_dict(json_round_trip(data)) == Histogram()


def test_record_many_of_an_empty_array_changes_nothing() -> None:
    histogram = Histogram()
    histogram.record_many(np.array([]))

    assert histogram == Histogram()


# -- Histogram: combining --------------------------------------------------------------


@given(st.lists(any_value_s, max_size=200))
def test_record_many_matches_record(values_s: list[float]) -> None:
    one_by_one = histogram_of(values_s)
    vectorised = Histogram()
    vectorised.record_many(np.array(values_s, dtype=np.float64))

    assert np.array_equal(vectorised._counts, one_by_one._counts)
    assert vectorised.min_s == one_by_one.min_s or math.isnan(one_by_one.min_s)
    assert vectorised.max_s == one_by_one.max_s or math.isnan(one_by_one.max_s)
    assert vectorised.sum_s == pytest.approx(one_by_one.sum_s, rel=1e-9, abs=1e-9)


@given(st.lists(any_value_s, max_size=100), st.lists(any_value_s, max_size=100))
def test_merge_equals_one_histogram_of_all_values(
    first_s: list[float], second_s: list[float]
) -> None:
    merged = histogram_of(first_s)
    merged.merge(histogram_of(second_s))
    single = histogram_of(first_s + second_s)

    assert np.array_equal(merged._counts, single._counts)
    assert merged.count == single.count
    assert merged.min_s == single.min_s or math.isnan(single.min_s)
    assert merged.max_s == single.max_s or math.isnan(single.max_s)
    assert merged.sum_s == pytest.approx(single.sum_s, rel=1e-9, abs=1e-9)
    assert merged.percentiles([50.0, 99.0]) == pytest.approx(
        single.percentiles([50.0, 99.0]), nan_ok=True
    )


def test_merge_leaves_the_other_histogram_unchanged() -> None:
    other = histogram_of([0.1, 0.2])
    before = other.copy()

    histogram_of([0.3]).merge(other)

    assert other == before


def test_copy_is_independent_and_reset_empties() -> None:
    histogram = histogram_of([0.1, 0.2])
    copy = histogram.copy()

    histogram.record(0.3)
    assert copy.count == 2
    assert histogram.count == 3

    histogram.reset()
    assert histogram == Histogram()
    histogram.record(0.5)  # the hot path still writes into the (reset) array
    assert histogram.count == 1
    assert histogram.percentile(50) == 0.5


def test_since_gives_the_values_recorded_after_an_earlier_state() -> None:
    histogram = histogram_of([0.001] * 100)
    earlier = histogram.copy()
    later_s = [0.1, 0.2, 0.3, 0.4]
    for value_s in later_s:
        histogram.record(value_s)

    interval = histogram.since(earlier)

    assert np.array_equal(interval._counts, histogram_of(later_s)._counts)
    assert interval.count == 4
    assert interval.sum_s == pytest.approx(sum(later_s))
    # Bounds, not exact: min at or below the true minimum, max at or above the maximum.
    assert interval.min_s <= 0.1 <= interval.min_s * (1 + RELATIVE_ERROR)
    assert interval.max_s == 0.4  # the bucket edge is clamped to the overall maximum
    assert within_bucket_of(interval.percentile(50), 0.2)


def test_since_an_unchanged_histogram_is_empty() -> None:
    histogram = histogram_of([0.1])

    assert histogram.since(histogram.copy()) == Histogram()


def test_since_rejects_a_histogram_that_is_not_earlier() -> None:
    with pytest.raises(ValueError, match="later state"):
        histogram_of([0.1]).since(histogram_of([0.2]))


# -- Histogram: serialisation ----------------------------------------------------------


@given(st.lists(any_value_s, max_size=200))
def test_histogram_round_trips_through_json(values_s: list[float]) -> None:
    histogram = histogram_of(values_s)

    restored = Histogram.from_dict(json_round_trip(histogram.to_dict()))

    assert restored == histogram


def test_to_dict_is_sparse() -> None:
    data = histogram_of([0.01] * 1000 + [0.5] * 10 + [9999.0]).to_dict()

    assert data["bucket_counts"] == [1000, 10]
    assert len(data["bucket_indexes"]) == 2
    assert data["overflow_count"] == 1
    assert data["count"] == 1011


def test_from_dict_rejects_another_layout() -> None:
    data = histogram_of([0.1]).to_dict()
    data["layout"] = {**data["layout"], "sub_buckets": 64}

    with pytest.raises(ValueError, match="layout"):
        Histogram.from_dict(data)


def test_from_dict_rejects_a_count_that_does_not_add_up() -> None:
    data = histogram_of([0.1]).to_dict()
    data["count"] = 2

    with pytest.raises(ValueError, match="count"):
        Histogram.from_dict(data)


def test_from_dict_rejects_a_bucket_out_of_range() -> None:
    data = histogram_of([0.1]).to_dict()
    data["bucket_indexes"] = [10**6]

    with pytest.raises(ValueError, match="out of range"):
        Histogram.from_dict(data)


def test_summary_names_its_units() -> None:
    summary = histogram_of([0.001 * i for i in range(1, 1001)]).summary()

    assert list(summary) == [
        "count",
        "min_s",
        "mean_s",
        "p50_s",
        "p90_s",
        "p99_s",
        "p99_9_s",
        "max_s",
    ]
    assert summary["count"] == 1000
    assert summary["min_s"] == 0.001
    assert summary["max_s"] == 1.0
    assert within_bucket_of(summary["p50_s"], 0.5)
    assert within_bucket_of(summary["p99_s"], 0.99)


# -- Counters --------------------------------------------------------------------------


def busy_counters() -> Counters:
    counters = Counters(connect_attempts=3, connects=2)
    counters.count_connect_failure("not authorised")
    for qos, outcome in [(0, "ok"), (0, "failed"), (1, "acked"), (1, "pending"), (2, "failed")]:
        counters.count_sent(qos, size_bytes=100)
        if outcome == "acked":
            counters.count_acked(qos)
        elif outcome == "failed":
            counters.count_failed(qos)
    counters.count_received(size_bytes=20)
    counters.count_error("TimeoutError")
    return counters


def test_counting_helpers_keep_totals_and_qos_in_step() -> None:
    counters = busy_counters()

    assert counters.messages_sent == 5
    assert counters.messages_sent_by_qos == {"0": 2, "1": 2, "2": 1}
    assert counters.messages_acked_by_qos == {"0": 0, "1": 1, "2": 0}
    assert counters.messages_failed_by_qos == {"0": 1, "1": 0, "2": 1}
    assert counters.bytes_sent == 500
    assert counters.connect_failures_by_reason == {"not authorised": 1}
    assert counters.errors_by_kind == {"TimeoutError": 1}


def test_in_flight_is_qos_1_and_2_sent_minus_acked_minus_failed() -> None:
    counters = busy_counters()

    assert counters.in_flight == 1
    assert counters.in_flight_by_qos() == {"0": 0, "1": 1, "2": 0}


def test_counters_that_account_for_every_message_reconcile() -> None:
    counters = busy_counters()

    assert counters.reconciles()
    assert counters.problems() == []


def test_acked_and_failed_beyond_sent_do_not_reconcile() -> None:
    counters = busy_counters()
    counters.count_acked(1)
    counters.count_acked(1)

    assert not counters.reconciles()
    assert counters.problems() == ["QoS 1: more acked + failed than sent"]


def test_totals_out_of_step_with_qos_do_not_reconcile() -> None:
    counters = busy_counters()
    counters.messages_sent += 1

    assert counters.problems() == ["messages_sent is not the sum of messages_sent_by_qos"]


def test_qos_0_acknowledgements_do_not_reconcile() -> None:
    counters = Counters()
    with pytest.raises(ValueError, match="QoS 0"):
        counters.count_acked(0)

    counters.messages_sent_by_qos["0"] = counters.messages_sent = 1
    counters.messages_acked_by_qos["0"] = counters.messages_acked = 1

    assert "QoS 0 publishes counted as acknowledged" in counters.problems()


def test_connect_accounting_is_reconciled() -> None:
    counters = Counters(connect_attempts=1, connects=1)
    counters.count_connect_failure("refused")

    assert counters.problems() == ["more connects + connect_failures than connect_attempts"]


def test_counters_merge_sums_every_count() -> None:
    first = busy_counters()
    second = busy_counters()
    second.count_error("OSError")
    second.count_connect_failure("timeout")
    second.connect_attempts += 1

    first.merge(second)

    assert first.messages_sent == 10
    assert first.messages_sent_by_qos == {"0": 4, "1": 4, "2": 2}
    assert first.in_flight == 2
    assert first.bytes_received == 40
    assert first.errors_by_kind == {"TimeoutError": 2, "OSError": 1}
    assert first.connect_failures_by_reason == {"not authorised": 2, "timeout": 1}
    assert first.reconciles()
    assert second.errors_by_kind == {"TimeoutError": 1, "OSError": 1}  # unchanged


def test_counters_round_trip_through_json() -> None:
    counters = busy_counters()

    restored = Counters.from_dict(json_round_trip(counters.to_dict()))

    assert restored == counters
    assert restored.errors_by_kind is not counters.errors_by_kind


def test_counters_from_dict_rejects_unknown_names_and_non_integers() -> None:
    with pytest.raises(ValueError, match="unknown counters"):
        Counters.from_dict({"messages_lost": 1})
    with pytest.raises(ValueError, match="integer"):
        Counters.from_dict({"messages_sent": 1.5})
    with pytest.raises(ValueError, match="integer"):
        Counters.from_dict({"errors_by_kind": {"x": "1"}})


def test_counters_from_dict_defaults_missing_counts_to_zero() -> None:
    assert Counters.from_dict({"messages_sent": 2}).messages_sent_by_qos == {
        "0": 0,
        "1": 0,
        "2": 0,
    }


# -- Snapshot --------------------------------------------------------------------------


def worker_snapshot(worker: int, at_s: float, ack_latencies_s: list[float]) -> Snapshot:
    snapshot = Snapshot(worker=worker, at_s=at_s, devices_connected=10)
    for latency_s in ack_latencies_s:
        snapshot.counters.count_sent(1, size_bytes=50)
        snapshot.counters.count_acked(1)
        snapshot.ack_latency.record(latency_s)
        snapshot.intended_latency.record(latency_s + 0.5)
        snapshot.schedule_lag.record(0.5)
    snapshot.connect_latency.record(0.02)
    return snapshot


def test_snapshot_merge_sums_workers() -> None:
    first = worker_snapshot(0, 10.0, [0.01, 0.02])
    second = worker_snapshot(1, 10.25, [0.03])

    merged = Snapshot.merge([first, second])

    assert merged.worker == ALL_WORKERS
    assert merged.at_s == 10.25
    assert merged.devices_connected == 20
    assert merged.counters.messages_acked == 3
    assert merged.counters.reconciles()
    assert merged.ack_latency == histogram_of([0.01, 0.02, 0.03])
    assert merged.connect_latency.count == 2
    assert merged.e2e_latency.count == 0
    assert merged.ack_latency.count == merged.counters.messages_acked


def test_snapshot_merge_leaves_its_inputs_unchanged() -> None:
    first = worker_snapshot(0, 1.0, [0.01])
    before = first.copy()

    Snapshot.merge([first, worker_snapshot(1, 1.0, [0.02])])

    assert first == before


def test_snapshot_merge_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no snapshots"):
        Snapshot.merge([])


def test_snapshot_round_trips_through_json() -> None:
    snapshot = worker_snapshot(3, 12.5, [0.01, 0.2, 5000.0])
    snapshot.e2e_latency.record(0.04)

    data = json_round_trip(snapshot.to_dict())

    assert Snapshot.from_dict(data) == snapshot
    assert set(data["histograms"]) == set(HISTOGRAM_NAMES)


def test_snapshot_from_dict_rejects_unknown_histograms() -> None:
    data = Snapshot(worker=0, at_s=1.0).to_dict()
    data["histograms"]["rtt"] = Histogram().to_dict()

    with pytest.raises(ValueError, match="unknown histograms"):
        Snapshot.from_dict(data)


# -- TimeSeries ------------------------------------------------------------------------


def cumulative_snapshots() -> list[Snapshot]:
    """Two workers, three seconds: 100, 200 and 0 acks a second; latency 10, 100, - ms."""
    worker_0 = Snapshot(worker=0, at_s=0.0)
    worker_1 = Snapshot(worker=1, at_s=0.0)
    merged: list[Snapshot] = []
    for second, (acks, latency_s) in enumerate([(100, 0.01), (200, 0.1), (0, 0.0)], start=1):
        for worker in (worker_0, worker_1):
            worker.at_s = float(second)
            worker.devices_connected = 5 * second
            for _ in range(acks // 2):
                worker.counters.count_sent(1, size_bytes=10)
                worker.counters.count_acked(1)
                worker.ack_latency.record(latency_s)
        worker_0.counters.count_sent(2, size_bytes=10)  # one more, never acked
        merged.append(Snapshot.merge([worker_0, worker_1]))
    return merged


def test_time_series_rows_have_per_second_rates() -> None:
    series = TimeSeries()
    rows = [series.add(snapshot) for snapshot in cumulative_snapshots()]

    assert series.rows == rows
    assert [row.at_s for row in rows] == [1.0, 2.0, 3.0]
    assert [row.interval_s for row in rows] == [1.0, 1.0, 1.0]
    assert [row.devices_connected for row in rows] == [10, 20, 30]
    assert [row.messages_sent_rate_hz for row in rows] == [101.0, 201.0, 1.0]
    assert [row.messages_acked_rate_hz for row in rows] == [100.0, 200.0, 0.0]
    assert [row.in_flight for row in rows] == [1, 2, 3]


def test_time_series_percentiles_cover_only_their_interval() -> None:
    series = TimeSeries()
    first, second, third = (series.add(s) for s in cumulative_snapshots())

    assert within_bucket_of(first.ack_latency_p50_s, 0.01)
    assert within_bucket_of(first.ack_latency_p99_s, 0.01)
    assert within_bucket_of(second.ack_latency_p50_s, 0.1)  # not mixed with second 1
    assert math.isnan(third.ack_latency_p50_s)  # no acks in that second
    assert math.isnan(third.schedule_lag_p99_s)


def test_time_series_rates_are_per_second_of_the_interval() -> None:
    snapshot = Snapshot(worker=0, at_s=0.5)
    for _ in range(10):
        snapshot.counters.count_sent(0, size_bytes=1)

    row = TimeSeries().add(snapshot)

    assert row.interval_s == 0.5
    assert row.messages_sent_rate_hz == 20.0


def test_time_series_starts_from_a_given_snapshot() -> None:
    start, *_ = cumulative_snapshots()
    later = start.copy()
    later.at_s = 3.0
    for _ in range(4):
        later.counters.count_sent(0, size_bytes=1)

    row = TimeSeries(start=start).add(later)

    assert row.interval_s == 2.0
    assert row.messages_sent_rate_hz == 2.0


def test_time_series_rows_serialise() -> None:
    row = TimeSeries().add(cumulative_snapshots()[0])

    data = row.to_dict()

    assert data["messages_acked_rate_hz"] == 100.0
    assert data["at_s"] == 1.0


def test_time_series_rejects_time_that_does_not_move_forward() -> None:
    series = TimeSeries()
    series.add(Snapshot(worker=0, at_s=1.0))

    with pytest.raises(ValueError, match="does not follow"):
        series.add(Snapshot(worker=0, at_s=1.0))
    with pytest.raises(ValueError, match="does not follow"):
        TimeSeries().add(Snapshot(worker=0, at_s=0.0))


def test_time_series_rejects_counts_that_go_down() -> None:
    series = TimeSeries()
    series.add(cumulative_snapshots()[1])

    with pytest.raises(ValueError, match="went down"):
        series.add(Snapshot(worker=ALL_WORKERS, at_s=5.0))
