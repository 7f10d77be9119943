"""Metrics: latency histograms, counters that reconcile, snapshots and a time series.

This is the measurement core of the fleet engine. It is pure (STYLE.md §1): nothing
here reads a clock or does I/O. Workers update a :class:`Histogram` and
:class:`Counters` per message (the hot path), hand a :class:`Snapshot` to the
supervisor, which merges the snapshots of all workers (and of all machines) once a
second and feeds the merged one to a :class:`TimeSeries`.

Measurement must be true (DESIGN.md):

- latency is kept against the *intended* send time as well as the actual one
  (``intended_latency`` next to ``ack_latency``), and ``schedule_lag`` says how far
  behind its schedule the simulator runs, so coordinated omission cannot hide;
- :meth:`Counters.reconciles` checks that every sent message is accounted for
  (acknowledged, failed or still in flight), per QoS;
- histograms merge exactly: merging per-worker histograms gives the same buckets as
  recording every value into one.

Snapshots are *cumulative* since the run started: a worker never resets its metrics
between snapshots; per-second rates and percentiles are differences of successive
merged snapshots (:meth:`Histogram.since`, :class:`TimeSeries`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from math import frexp
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    import numpy.typing as npt

__all__ = [
    "ALL_WORKERS",
    "HISTOGRAM_NAMES",
    "QOS_KEYS",
    "Counters",
    "Histogram",
    "Snapshot",
    "TimeSeries",
    "TimeSeriesRow",
]

# ---------------------------------------------------------------------------------------
# Bucket layout (HdrHistogram's, over float seconds instead of integer ticks).
#
# math.frexp(v) = (m, e) with v = m * 2**e and m in [0.5, 1). Each octave
# [2**(e-1), 2**e) is cut into SUB_BUCKETS equal linear sub-buckets, sub-bucket
# t - SUB_BUCKETS where t = int(m * 2 * SUB_BUCKETS) is in [SUB_BUCKETS, 2 * SUB_BUCKETS).
# A bucket's width is then at most 1/SUB_BUCKETS of any value in it: with 128
# sub-buckets that is 0.78 %, i.e. two significant decimal digits, as HdrHistogram
# configured with numberOfSignificantValueDigits=2 (also 128 sub-buckets per octave).
#
# The raw key e * SUB_BUCKETS + t increases with v; subtracting the key of LOWEST_S
# makes the bucket that holds LOWEST_S bucket 0. Everything below LOWEST_S (zero and
# negative values included: clock skew between machines, a send slightly ahead of its
# schedule) is counted in bucket 0 as well. The last regular bucket is the one holding
# HIGHEST_S; values above HIGHEST_S go to one overflow bucket after it.
# ---------------------------------------------------------------------------------------

LOWEST_S = 1e-6
"""Smallest value with full precision; smaller values are counted in bucket 0."""
HIGHEST_S = 3600.0
"""Largest value with full precision; larger values are counted as overflow."""
SUB_BUCKETS = 128
"""Linear sub-buckets per octave: relative bucket width ≤ 1/128 ≈ 0.78 %."""
RELATIVE_ERROR = 1.0 / SUB_BUCKETS
"""Bound on (reported percentile - true percentile) / true percentile, within range."""

_SCALE = 2.0 * SUB_BUCKETS


def _raw_key(value_s: float) -> int:
    mantissa, exponent = frexp(value_s)
    return exponent * SUB_BUCKETS + int(mantissa * _SCALE)


_KEY_OFFSET = _raw_key(LOWEST_S)
_BUCKETS = _raw_key(HIGHEST_S) - _KEY_OFFSET + 1  # regular buckets, 0 .. _BUCKETS-1
_OVERFLOW = _BUCKETS  # index of the overflow bucket
_SIZE = _BUCKETS + 1


def _bucket_edges() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Lower and upper edge of every bucket: bucket i holds lower[i] <= v < upper[i]."""
    key = np.arange(_BUCKETS, dtype=np.int64) + _KEY_OFFSET
    # key = e * SUB_BUCKETS + t with t in [SUB_BUCKETS, 2 * SUB_BUCKETS): undo it.
    exponent = key // SUB_BUCKETS - 1
    mantissa_steps = key % SUB_BUCKETS + SUB_BUCKETS  # t, in units of 2**(e-8) below
    step_exponent = (exponent - int(math.log2(_SCALE))).astype(np.int32)
    lower = np.ldexp(mantissa_steps.astype(np.float64), step_exponent)
    upper = np.ldexp((mantissa_steps + 1).astype(np.float64), step_exponent)
    # Bucket 0 also holds everything below LOWEST_S; the overflow bucket everything above.
    lower[0] = -math.inf
    lower = np.append(lower, HIGHEST_S)
    upper = np.append(upper, math.inf)
    return lower, upper


_LOWER_EDGES_S, _UPPER_EDGES_S = _bucket_edges()

_LAYOUT: dict[str, float | int] = {
    "lowest_s": LOWEST_S,
    "highest_s": HIGHEST_S,
    "sub_buckets": SUB_BUCKETS,
}

# A rank within this fraction of an integer is that integer: q = 99.9 is not exact in
# binary, and 99.9 * 1000 / 100 must still mean the 999th value, not the 1000th.
_RANK_TOLERANCE = 1e-9


_FEW = 64  # below this many values, record_many records them one by one


class Histogram:
    """Log-linear (HDR-style) histogram of values in seconds, 1 µs to 1 h, ±0.78 %.

    Backed by a fixed-size numpy ``int64`` array of bucket counts (32 KiB), plus the
    exact sum, minimum and maximum. See the module comments for the bucket layout.

    - :meth:`record` is the hot path: one ``frexp``, integer arithmetic and an
      increment through a memoryview of the array, no numpy call.
    - Values below :data:`LOWEST_S` (zero and negative ones included) are counted in
      the first bucket; values above :data:`HIGHEST_S` in an overflow bucket, reported
      by :attr:`overflow_count`. ``min_s`` and ``max_s`` stay exact either way.
      ``nan`` is rejected with :class:`ValueError`.
    - :meth:`percentile` reports the *upper edge* of the bucket holding the value at
      that rank (HdrHistogram's "highest equivalent value"), clamped to ``max_s``, so a
      reported percentile is never below the true one and, for values within range, at
      most :data:`RELATIVE_ERROR` above it. ``percentile(0)`` is ``min_s`` and
      ``percentile(100)`` is ``max_s``, exactly.
    - An empty histogram reports ``nan`` for ``min_s``, ``max_s``, ``mean_s`` and
      every percentile: a worker that sent nothing in a second is normal, not an error.
    - :meth:`merge` adds bucket counts, so merged buckets, count, min and max equal
      those of one histogram fed every value; ``sum_s`` is a float sum and agrees to
      rounding.
    """

    __slots__ = ("_counts", "_max_s", "_min_s", "_sum_s", "_view")

    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value

    def __init__(self) -> None:
        self._counts: npt.NDArray[np.int64] = np.zeros(_SIZE, dtype=np.int64)
        # A memoryview increments an element about twice as fast as numpy indexing.
        self._view = self._counts.data
        self._sum_s = 0.0
        self._min_s = math.inf
        self._max_s = -math.inf

    # -- recording ---------------------------------------------------------------------

    def record(self, value_s: float) -> None:
        """Count one value, in seconds. The hot path: keep it lean."""
        if LOWEST_S <= value_s <= HIGHEST_S:
            mantissa, exponent = frexp(value_s)
            index = exponent * SUB_BUCKETS + int(mantissa * _SCALE) - _KEY_OFFSET
        elif value_s < LOWEST_S:
            index = 0
        elif value_s > HIGHEST_S:
            index = _OVERFLOW
        else:
            raise ValueError("cannot record nan in a histogram")
        self._view[index] += 1
        self._sum_s += value_s
        # Comparisons, not min()/max(): a builtin call would cost more than the rest.
        if value_s < self._min_s:  # noqa: PLR1730
            self._min_s = value_s
        if value_s > self._max_s:  # noqa: PLR1730
            self._max_s = value_s

    def record_many(self, values_s: npt.ArrayLike) -> None:
        """Count every value of an array, in seconds; the same buckets as :meth:`record`."""
        values = np.asarray(values_s, dtype=np.float64).ravel()
        if np.isnan(values).any():
            raise ValueError("cannot record nan in a histogram")
        if values.size < _FEW:
            # A bincount over every bucket costs more than a few single records.
            for value in values.tolist():
                self.record(value)
            return
        # Clip before frexp so out-of-range values (and infinities) never reach the
        # integer cast; the masks then put them in the first and overflow buckets.
        mantissa, exponent = np.frexp(np.clip(values, LOWEST_S, HIGHEST_S))
        index = (
            exponent.astype(np.int64) * SUB_BUCKETS
            + (mantissa * _SCALE).astype(np.int64)
            - _KEY_OFFSET
        )
        index[values < LOWEST_S] = 0
        index[values > HIGHEST_S] = _OVERFLOW
        self._counts += np.bincount(index, minlength=_SIZE)
        self._sum_s += float(values.sum())
        self._min_s = min(self._min_s, float(values.min()))
        self._max_s = max(self._max_s, float(values.max()))

    # -- combining ---------------------------------------------------------------------

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s values to this histogram, in place."""
        self._counts += other._counts
        self._sum_s += other._sum_s
        self._min_s = min(self._min_s, other._min_s)
        self._max_s = max(self._max_s, other._max_s)

    def since(self, earlier: Histogram) -> Histogram:
        """The values recorded after ``earlier``, an earlier state of this histogram.

        Bucket counts, count and sum are exact differences. The exact minimum and
        maximum of the new values are not known: ``min_s`` becomes the tightest lower
        bound and ``max_s`` the tightest upper bound the buckets give, so percentiles of
        the result keep the guarantee of never being below the true value.

        Raises :class:`ValueError` if ``earlier`` has more values in any bucket, i.e. it
        is not an earlier state of this histogram.
        """
        counts = self._counts - earlier._counts
        if (counts < 0).any():
            raise ValueError("histogram is not a later state of the one subtracted from it")
        result = Histogram()
        result._counts[:] = counts
        nonzero = np.flatnonzero(counts)
        if nonzero.size:
            result._sum_s = self._sum_s - earlier._sum_s
            result._min_s = max(float(_LOWER_EDGES_S[nonzero[0]]), self._min_s)
            result._max_s = min(float(_UPPER_EDGES_S[nonzero[-1]]), self._max_s)
        return result

    def copy(self) -> Histogram:
        """An independent histogram with the same contents."""
        result = Histogram()
        result._counts[:] = self._counts
        result._sum_s = self._sum_s
        result._min_s = self._min_s
        result._max_s = self._max_s
        return result

    def reset(self) -> None:
        """Forget every value."""
        self._counts.fill(0)
        self._sum_s = 0.0
        self._min_s = math.inf
        self._max_s = -math.inf

    # -- reading -----------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Number of values recorded, overflow included."""
        return int(self._counts.sum())

    @property
    def overflow_count(self) -> int:
        """Number of values above :data:`HIGHEST_S`."""
        return int(self._counts[_OVERFLOW])

    @property
    def sum_s(self) -> float:
        """Sum of the values recorded, overflow and underflow included."""
        return self._sum_s

    @property
    def min_s(self) -> float:
        """Smallest value recorded, exact; ``nan`` when empty."""
        return self._min_s if self._max_s >= self._min_s else math.nan

    @property
    def max_s(self) -> float:
        """Largest value recorded, exact; ``nan`` when empty."""
        return self._max_s if self._max_s >= self._min_s else math.nan

    @property
    def mean_s(self) -> float:
        """Mean of the values, from their float sum (not the buckets); ``nan`` when empty."""
        count = self.count
        return self._sum_s / count if count else math.nan

    def percentile(self, q: float) -> float:
        """The value below or at which ``q`` percent of the values lie (nearest rank).

        ``q`` is in [0, 100]. The result is the upper edge of the bucket holding the
        value of rank ``ceil(q * count / 100)``, clamped to ``max_s``; ``min_s`` for
        ``q == 0``; ``nan`` when the histogram is empty. See the class docstring.
        """
        return self.percentiles((q,))[0]

    def percentiles(self, qs: Sequence[float]) -> list[float]:
        """:meth:`percentile` for several ``q`` at once, sharing one cumulative sum."""
        for q in qs:
            if not 0.0 <= q <= 100.0:
                raise ValueError(f"percentile must be in [0, 100], got {q!r}")
        cumulative = np.cumsum(self._counts)
        total = int(cumulative[-1])
        if total == 0:
            return [math.nan] * len(qs)
        results: list[float] = []
        for q in qs:
            if q == 0.0:
                results.append(self._min_s)
                continue
            target = q * total / 100.0
            rank = min(max(math.ceil(target - _RANK_TOLERANCE * target), 1), total)
            index = int(np.searchsorted(cumulative, rank, side="left"))
            results.append(min(float(_UPPER_EDGES_S[index]), self._max_s))
        return results

    def summary(self) -> dict[str, float]:
        """Count, min, mean, p50, p90, p99, p99.9 and max (seconds); ``nan`` when empty."""
        p50, p90, p99, p999 = self.percentiles((50.0, 90.0, 99.0, 99.9))
        return {
            "count": self.count,
            "min_s": self.min_s,
            "mean_s": self.mean_s,
            "p50_s": p50,
            "p90_s": p90,
            "p99_s": p99,
            "p99_9_s": p999,
            "max_s": self.max_s,
        }

    # -- serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly, sparse form: only the non-zero buckets are listed.

        ``min_s``/``max_s`` are ``None`` when empty (JSON has no nan). ``layout``
        records the bucket layout, so a snapshot from another build is not misread.
        """
        indexes = np.flatnonzero(self._counts[:_OVERFLOW])
        empty = self._max_s < self._min_s
        return {
            "layout": dict(_LAYOUT),
            "count": self.count,
            "sum_s": self._sum_s,
            "min_s": None if empty else self._min_s,
            "max_s": None if empty else self._max_s,
            "overflow_count": self.overflow_count,
            "bucket_indexes": indexes.tolist(),
            "bucket_counts": self._counts[indexes].tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        """The histogram :meth:`to_dict` described; :class:`ValueError` if inconsistent."""
        if data.get("layout") != _LAYOUT:
            raise ValueError(f"histogram layout {data.get('layout')!r} is not {_LAYOUT!r}")
        indexes = data["bucket_indexes"]
        counts = data["bucket_counts"]
        if len(indexes) != len(counts):
            raise ValueError("bucket_indexes and bucket_counts differ in length")
        result = cls()
        for index, count in zip(indexes, counts, strict=True):
            if not _is_int(index) or not 0 <= index < _OVERFLOW:
                raise ValueError(f"bucket index {index!r} out of range [0, {_OVERFLOW})")
            if not _is_int(count) or count < 0:
                raise ValueError(f"bucket count {count!r} is not a non-negative integer")
            result._counts[index] += count
        overflow = data["overflow_count"]
        if not _is_int(overflow) or overflow < 0:
            raise ValueError(f"overflow_count {overflow!r} is not a non-negative integer")
        result._counts[_OVERFLOW] = overflow
        if result.count != data["count"]:
            raise ValueError(f"count {data['count']!r} is not the sum of the buckets")
        if result.count:
            if data["min_s"] is None or data["max_s"] is None:
                raise ValueError("a non-empty histogram needs min_s and max_s")
            result._min_s = float(data["min_s"])
            result._max_s = float(data["max_s"])
            result._sum_s = float(data["sum_s"])
        return result

    # -- comparison --------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return (
            bool(np.array_equal(self._counts, other._counts))
            and self._sum_s == other._sum_s
            and self._min_s == other._min_s
            and self._max_s == other._max_s
        )

    def __repr__(self) -> str:
        return (
            f"Histogram(count={self.count}, min_s={self.min_s!r}, "
            f"p50_s={self.percentile(50)!r}, max_s={self.max_s!r})"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------

QOS_KEYS = ("0", "1", "2")
"""Keys of the per-QoS counters (strings, so the dicts survive JSON unchanged)."""


def _per_qos() -> dict[str, int]:
    return dict.fromkeys(QOS_KEYS, 0)


@dataclass(slots=True)
class Counters:
    """The engine's counters: cumulative, all integers, summed across workers.

    Message accounting, per QoS (the ``*_by_qos`` dicts) and in total:

    - ``messages_sent``: publishes handed to the protocol, whatever became of them;
    - ``messages_acked``: publishes the peer confirmed: PUBACK for QoS 1, PUBCOMP for
      QoS 2. QoS 0 has no acknowledgement and is never counted here, so
      ``messages_acked`` equals the number of ``ack_latency`` samples;
    - ``messages_failed``: publishes that will never be confirmed (not connected,
      write error, connection lost or ack timeout before the ack). For QoS 0, a
      publish that could not be written. At the end of a run, publishes still awaiting
      an ack should be counted failed, so nothing stays in flight.

    Use the ``count_*`` methods: they keep totals and per-QoS counts in step.
    """

    connect_attempts: int = 0
    connects: int = 0
    connect_failures: int = 0
    connect_failures_by_reason: dict[str, int] = field(default_factory=dict)
    disconnects: int = 0
    reconnects: int = 0
    messages_sent: int = 0
    messages_acked: int = 0
    messages_failed: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    commands_received: int = 0
    commands_answered: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    messages_sent_by_qos: dict[str, int] = field(default_factory=_per_qos)
    messages_acked_by_qos: dict[str, int] = field(default_factory=_per_qos)
    messages_failed_by_qos: dict[str, int] = field(default_factory=_per_qos)

    # -- hot-path helpers --------------------------------------------------------------

    def count_sent(self, qos: int, size_bytes: int, count: int = 1) -> None:
        """``count`` publishes of ``size_bytes`` in all handed to the protocol at ``qos``."""
        self.messages_sent += count
        self.messages_sent_by_qos[QOS_KEYS[qos]] += count
        self.bytes_sent += size_bytes

    def count_acked(self, qos: int) -> None:
        """One QoS 1 or 2 publish confirmed (PUBACK, PUBCOMP)."""
        if qos == 0:
            raise ValueError("QoS 0 publishes are never acknowledged")
        self.messages_acked += 1
        self.messages_acked_by_qos[QOS_KEYS[qos]] += 1

    def count_failed(self, qos: int, count: int = 1) -> None:
        """``count`` publishes that will never be confirmed (or, at QoS 0, written)."""
        self.messages_failed += count
        self.messages_failed_by_qos[QOS_KEYS[qos]] += count

    def count_received(self, size_bytes: int) -> None:
        """One message received by a device."""
        self.messages_received += 1
        self.bytes_received += size_bytes

    def count_connect_failure(self, reason: str) -> None:
        """One failed connection attempt (the attempt itself is counted apart)."""
        self.connect_failures += 1
        by_reason = self.connect_failures_by_reason
        by_reason[reason] = by_reason.get(reason, 0) + 1

    def count_error(self, kind: str, count: int = 1) -> None:
        """``count`` errors of ``kind`` (an exception class name, a reason code...)."""
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + count

    # -- accounting --------------------------------------------------------------------

    def in_flight_by_qos(self) -> dict[str, int]:
        """Publishes awaiting their ack, per QoS: sent - acked - failed (0 for QoS 0)."""
        result = {"0": 0}
        for key in QOS_KEYS[1:]:
            result[key] = (
                self.messages_sent_by_qos.get(key, 0)
                - self.messages_acked_by_qos.get(key, 0)
                - self.messages_failed_by_qos.get(key, 0)
            )
        return result

    @property
    def in_flight(self) -> int:
        """Publishes awaiting their ack: sent (QoS > 0) - acked - failed (QoS > 0)."""
        return sum(self.in_flight_by_qos().values())

    def problems(self) -> list[str]:
        """Every accounting identity that does not hold, in words (empty if none)."""
        found: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            values = value.values() if isinstance(value, dict) else (value,)
            if any(v < 0 for v in values):
                found.append(f"{f.name} has a negative count")
        for name in ("messages_sent", "messages_acked", "messages_failed"):
            by_qos: dict[str, int] = getattr(self, f"{name}_by_qos")
            if set(by_qos) - set(QOS_KEYS):
                found.append(f"{name}_by_qos has keys other than {QOS_KEYS}")
            if getattr(self, name) != sum(by_qos.values()):
                found.append(f"{name} is not the sum of {name}_by_qos")
        if self.messages_acked_by_qos.get("0", 0):
            found.append("QoS 0 publishes counted as acknowledged")
        sent = self.messages_sent_by_qos
        acked = self.messages_acked_by_qos
        failed = self.messages_failed_by_qos
        found.extend(
            f"QoS {key}: more acked + failed than sent"
            for key in QOS_KEYS
            if acked.get(key, 0) + failed.get(key, 0) > sent.get(key, 0)
        )
        if self.connect_failures != sum(self.connect_failures_by_reason.values()):
            found.append("connect_failures is not the sum of connect_failures_by_reason")
        if self.connects + self.connect_failures > self.connect_attempts:
            found.append("more connects + connect_failures than connect_attempts")
        if self.commands_answered > self.commands_received:
            found.append("more commands answered than received")
        return found

    def reconciles(self) -> bool:
        """True when every publish is accounted for exactly once.

        It guarantees, per QoS: sent == acked + failed + in flight with in flight >= 0
        (nothing acknowledged or failed that was not sent), no QoS 0 publish counted
        as acknowledged, the totals equal the sums of the per-QoS counts, and no count
        is negative. It also checks the connection accounting (connects + failures <=
        attempts, failures == sum by reason) and commands answered <= received.

        These identities are linear, so merged counters of workers that reconcile
        reconcile too; a failure points at a counting bug, not at the system under
        test. What it cannot prove: that a message counted sent was really written, or
        that in flight is not a leak; check ``in_flight == 0`` after a run drains.
        :meth:`problems` says which identity failed.
        """
        return not self.problems()

    # -- combining and serialisation ---------------------------------------------------

    def merge(self, other: Counters) -> None:
        """Add ``other``'s counts to these, in place."""
        for f in fields(self):
            mine = getattr(self, f.name)
            theirs = getattr(other, f.name)
            if isinstance(mine, dict):
                for key, count in theirs.items():
                    mine[key] = mine.get(key, 0) + count
            else:
                setattr(self, f.name, mine + theirs)

    def copy(self) -> Counters:
        """Independent counters with the same counts."""
        return Counters.from_dict(self.to_dict())

    def to_dict(self) -> dict[str, int | dict[str, int]]:
        """A JSON-friendly dict (copies of the per-key dicts)."""
        result: dict[str, int | dict[str, int]] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            result[f.name] = dict(value) if isinstance(value, dict) else value
        return result

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Counters:
        """Counters from :meth:`to_dict`; missing counts are 0, unknown names an error."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(f"unknown counters: {sorted(unknown)}")
        result = cls()
        for name, value in data.items():
            if isinstance(getattr(result, name), dict):
                if not isinstance(value, dict) or not all(
                    isinstance(k, str) and _is_int(v) for k, v in value.items()
                ):
                    raise ValueError(f"{name} must map names to integers")
                getattr(result, name).update(value)
            elif _is_int(value):
                setattr(result, name, value)
            else:
                raise ValueError(f"{name} must be an integer, got {value!r}")
        return result


# ---------------------------------------------------------------------------------------
# Snapshots and the per-second time series
# ---------------------------------------------------------------------------------------

HISTOGRAM_NAMES = (
    "connect_latency",
    "ack_latency",
    "e2e_latency",
    "schedule_lag",
    "intended_latency",
    "reconnect_time",
)
"""The histograms of a :class:`Snapshot`, every one in seconds."""

ALL_WORKERS = -1
"""The ``worker`` of a merged snapshot."""


@dataclass(slots=True)
class Snapshot:
    """A worker's cumulative metrics at ``at_s``, seconds since the run started.

    ``at_s`` is passed in (virtual or monotonic time from the injected clock); nothing
    here reads a clock. The histograms, all in seconds:

    - ``connect_latency``: CONNECT sent to CONNACK received;
    - ``ack_latency``: publish written to PUBACK (QoS 1) or PUBCOMP (QoS 2) received;
    - ``e2e_latency``: send timestamp to receipt by the probe subscriber;
    - ``schedule_lag``: actual send time minus intended send time;
    - ``intended_latency``: ack time minus *intended* send time, which keeps counting
      while the simulator falls behind (coordinated omission);
    - ``reconnect_time``: a device's connection lost (or closed by an action) to the
      device connected again (a reboot's offline time included).
    """

    worker: int
    at_s: float
    devices_connected: int = 0
    counters: Counters = field(default_factory=Counters)
    connect_latency: Histogram = field(default_factory=Histogram)
    ack_latency: Histogram = field(default_factory=Histogram)
    e2e_latency: Histogram = field(default_factory=Histogram)
    schedule_lag: Histogram = field(default_factory=Histogram)
    intended_latency: Histogram = field(default_factory=Histogram)
    reconnect_time: Histogram = field(default_factory=Histogram)
    states: dict[str, int] = field(default_factory=dict)
    """``fleet/state`` -> devices in that state (every device of the fleet, connected
    or not, is in one)."""
    states_reached: dict[str, int] = field(default_factory=dict)
    """``fleet/state`` -> devices that have been in that state since the run began."""

    def histograms(self) -> dict[str, Histogram]:
        """The histograms by name, in :data:`HISTOGRAM_NAMES` order."""
        return {name: getattr(self, name) for name in HISTOGRAM_NAMES}

    @classmethod
    def merge(cls, snapshots: Iterable[Snapshot]) -> Snapshot:
        """One snapshot of all workers: counts, histograms and devices summed.

        The result's ``worker`` is :data:`ALL_WORKERS` and its ``at_s`` the latest of
        the inputs. The inputs are not changed. Merge the latest snapshot of *every*
        worker (carrying a late worker's previous one forward), or the totals drop.
        """
        merged: Snapshot | None = None
        for snapshot in snapshots:
            if merged is None:
                merged = snapshot.copy()
                merged.worker = ALL_WORKERS
                continue
            merged.at_s = max(merged.at_s, snapshot.at_s)
            merged.devices_connected += snapshot.devices_connected
            merged.counters.merge(snapshot.counters)
            for mine, theirs in (
                (merged.states, snapshot.states),
                (merged.states_reached, snapshot.states_reached),
            ):
                for key, count in theirs.items():
                    mine[key] = mine.get(key, 0) + count
            for name, histogram in merged.histograms().items():
                histogram.merge(getattr(snapshot, name))
        if merged is None:
            raise ValueError("no snapshots to merge")
        return merged

    def since(self, earlier: Snapshot) -> Snapshot:
        """What happened between ``earlier`` (an earlier state of this snapshot) and
        this one: counts and histograms as differences (see :meth:`Histogram.since`),
        ``at_s`` the time between them, ``devices_connected`` as it is now.

        Raises :class:`ValueError` if ``earlier`` is not an earlier state of this one.
        """
        counters = Counters()
        for f in fields(Counters):
            mine, theirs = getattr(self.counters, f.name), getattr(earlier.counters, f.name)
            if isinstance(mine, dict):
                setattr(counters, f.name, {k: v - theirs.get(k, 0) for k, v in mine.items()})
            else:
                setattr(counters, f.name, mine - theirs)
        result = Snapshot(
            worker=self.worker,
            at_s=self.at_s - earlier.at_s,
            devices_connected=self.devices_connected,
            counters=counters,
            states=dict(self.states),  # gauges: as they are at the end
            states_reached=dict(self.states_reached),
        )
        for name, histogram in self.histograms().items():
            setattr(result, name, histogram.since(getattr(earlier, name)))
        return result

    def copy(self) -> Snapshot:
        """An independent snapshot with the same contents."""
        result = Snapshot(
            worker=self.worker,
            at_s=self.at_s,
            devices_connected=self.devices_connected,
            counters=self.counters.copy(),
            states=dict(self.states),
            states_reached=dict(self.states_reached),
        )
        for name, histogram in self.histograms().items():
            setattr(result, name, histogram.copy())
        return result

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict; histograms are sparse (see :meth:`Histogram.to_dict`)."""
        return {
            "worker": self.worker,
            "at_s": self.at_s,
            "devices_connected": self.devices_connected,
            "counters": self.counters.to_dict(),
            "histograms": {name: h.to_dict() for name, h in self.histograms().items()},
            "states": dict(self.states),
            "states_reached": dict(self.states_reached),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Snapshot:
        """The snapshot :meth:`to_dict` described; a missing histogram is empty."""
        histograms: Mapping[str, Any] = data.get("histograms", {})
        unknown = set(histograms) - set(HISTOGRAM_NAMES)
        if unknown:
            raise ValueError(f"unknown histograms: {sorted(unknown)}")
        result = cls(
            worker=int(data["worker"]),
            at_s=float(data["at_s"]),
            devices_connected=int(data.get("devices_connected", 0)),
            counters=Counters.from_dict(data.get("counters", {})),
            states={str(k): int(v) for k, v in data.get("states", {}).items()},
            states_reached={str(k): int(v) for k, v in data.get("states_reached", {}).items()},
        )
        for name, histogram in histograms.items():
            setattr(result, name, Histogram.from_dict(histogram))
        return result


@dataclass(frozen=True, slots=True)
class TimeSeriesRow:
    """What happened between two successive merged snapshots (normally one second).

    Rates are per second of ``interval_s``; percentiles are over the acks of that
    interval only (``nan`` when there were none) and follow :meth:`Histogram.percentile`.
    """

    at_s: float
    interval_s: float
    devices_connected: int
    in_flight: int
    messages_sent_rate_hz: float
    messages_acked_rate_hz: float
    messages_failed_rate_hz: float
    ack_latency_p50_s: float
    ack_latency_p99_s: float
    intended_latency_p99_s: float
    schedule_lag_p99_s: float

    def to_dict(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class TimeSeries:
    """Per-interval rows from successive cumulative, merged snapshots. Pure: no clock.

    Feed it the supervisor's merged snapshot once a second with :meth:`add`; each
    snapshot is compared with the previous one (the first with an empty run at
    ``at_s`` 0, unless ``start`` is given). ``rows`` keeps every row.
    """

    def __init__(self, start: Snapshot | None = None) -> None:
        self._previous = (
            start.copy() if start is not None else Snapshot(worker=ALL_WORKERS, at_s=0.0)
        )
        self.rows: list[TimeSeriesRow] = []

    def add(self, snapshot: Snapshot) -> TimeSeriesRow:
        """The row for the interval ending at ``snapshot.at_s``, also kept in ``rows``.

        Raises :class:`ValueError` if time did not move forward or a cumulative count
        went down (a snapshot that is not a later state of the previous one).
        """
        previous = self._previous
        interval_s = snapshot.at_s - previous.at_s
        if not interval_s > 0.0:
            raise ValueError(
                f"snapshot at {snapshot.at_s} s does not follow the one at {previous.at_s} s"
            )
        now, before = snapshot.counters, previous.counters
        sent = now.messages_sent - before.messages_sent
        acked = now.messages_acked - before.messages_acked
        failed = now.messages_failed - before.messages_failed
        if min(sent, acked, failed) < 0:
            raise ValueError(f"message counts went down between {previous.at_s} s and now")
        ack_p50_s, ack_p99_s = snapshot.ack_latency.since(previous.ack_latency).percentiles(
            (50.0, 99.0)
        )
        row = TimeSeriesRow(
            at_s=snapshot.at_s,
            interval_s=interval_s,
            devices_connected=snapshot.devices_connected,
            in_flight=now.in_flight,
            messages_sent_rate_hz=sent / interval_s,
            messages_acked_rate_hz=acked / interval_s,
            messages_failed_rate_hz=failed / interval_s,
            ack_latency_p50_s=ack_p50_s,
            ack_latency_p99_s=ack_p99_s,
            intended_latency_p99_s=snapshot.intended_latency.since(
                previous.intended_latency
            ).percentile(99.0),
            schedule_lag_p99_s=snapshot.schedule_lag.since(previous.schedule_lag).percentile(99.0),
        )
        self._previous = snapshot.copy()
        self.rows.append(row)
        return row
