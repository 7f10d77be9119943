"""Columnar send schedules: when each device's next message of one type is due.

A schedule keeps one ``due`` time per device (virtual seconds since the run started) and,
when some rows fire, moves their ``due`` forward. Jitter never accumulates: an interval
schedule keeps its un-jittered base times and jitters each send around them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from iotix.model.generators import BuildContext, Param, Rows, at
from iotix.model.spec import (
    BurstScheduleSpec,
    IntervalScheduleSpec,
    OnChangeScheduleSpec,
    PoissonScheduleSpec,
    ScheduleSpec,
)

if TYPE_CHECKING:
    from iotix.model.streams import F64


class Schedule(ABC):
    """Base: ``due`` holds each device's next due time; ``fire`` reschedules rows."""

    due: F64

    @abstractmethod
    def fire(self, rows: Rows) -> None:
        """Move the due time of ``rows``, which have just fired, to their next one."""


class _Unscheduled(Schedule):
    """For outlets that fire from samples (condition events), never from a clock."""

    def __init__(self) -> None:
        self.due = np.empty(0)

    def fire(self, rows: Rows) -> None:
        del rows  # nothing is ever due


UNSCHEDULED = _Unscheduled()


class IntervalSchedule(Schedule):
    def __init__(self, spec: IntervalScheduleSpec, ctx: BuildContext, name: str) -> None:
        self._interval: Param = ctx.param(spec.interval_s, f"{name}.interval_s")
        self._jitter = spec.jitter_s
        self._stream = ctx.stream(f"{name}.jitter")
        self._count = np.zeros(ctx.size, dtype=np.uint64)
        if spec.start == "spread":
            first = ctx.stream(f"{name}.start").uniform(slice(None), 0)
            self._base: F64 = first * self._interval
        else:
            self._base = np.zeros(ctx.size)
        self.due = self._base.copy()
        if self._jitter:
            self.due += self._jitter_for(np.arange(ctx.size, dtype=np.intp))
            np.maximum(self.due, 0.0, out=self.due)

    def _jitter_for(self, rows: Rows) -> F64:
        draws = self._count[rows]
        self._count[rows] = draws + np.uint64(1)
        return self._jitter * (2.0 * self._stream.uniform(rows, draws) - 1.0)

    def fire(self, rows: Rows) -> None:
        base = self._base[rows] + at(self._interval, rows)
        self._base[rows] = base
        if self._jitter:
            # Never earlier than the send just made: order per device is kept.
            self.due[rows] = np.maximum(base + self._jitter_for(rows), self.due[rows])
        else:
            self.due[rows] = base


class PoissonSchedule(Schedule):
    def __init__(self, rate_hz: Param, ctx: BuildContext, name: str) -> None:
        self._rate = rate_hz
        self._stream = ctx.stream(name)
        self._count = np.ones(ctx.size, dtype=np.uint64)
        everyone = np.arange(ctx.size, dtype=np.intp)
        self.due = self._stream.exponential(everyone, 0, self._rate)

    def fire(self, rows: Rows) -> None:
        draws = self._count[rows]
        self._count[rows] = draws + np.uint64(1)
        self.due[rows] += self._stream.exponential(rows, draws, at(self._rate, rows))


class BurstSchedule(Schedule):
    def __init__(self, spec: BurstScheduleSpec, ctx: BuildContext, name: str) -> None:
        self._every: Param = ctx.param(spec.every_s, f"{name}.every_s")
        self._count = spec.count
        self._spacing = spec.spacing_s
        self._position = np.zeros(ctx.size, dtype=np.int32)
        if spec.start == "spread":
            self._base: F64 = ctx.stream(f"{name}.start").uniform(slice(None), 0) * self._every
        else:
            self._base = np.zeros(ctx.size)
        self.due = self._base.copy()

    def fire(self, rows: Rows) -> None:
        position = self._position[rows] + 1
        finished = position >= self._count
        position[finished] = 0
        self._base[rows] += np.where(finished, at(self._every, rows), 0.0)
        self._position[rows] = position
        self.due[rows] = self._base[rows] + position * self._spacing


class OnChangeSchedule(Schedule):
    """Samples on a fixed interval; the runtime decides per sample whether to send."""

    def __init__(self, spec: OnChangeScheduleSpec, ctx: BuildContext, name: str) -> None:
        self._interval = spec.sample_interval_s
        first = ctx.stream(f"{name}.start").uniform(slice(None), 0)
        self.due = first * self._interval
        self.max_interval_s = spec.max_interval_s
        self.last_sent_s: F64 = np.full(ctx.size, -np.inf)
        self.last_values: dict[str, npt.NDArray[Any]] = {}
        self.deadband = spec.deadband

    def fire(self, rows: Rows) -> None:
        self.due[rows] += self._interval

    def changed(
        self,
        positions: Rows,
        rows: Rows,
        values: Mapping[str, Any],
        t: F64,
    ) -> npt.NDArray[np.bool_]:
        """Which rows must send now, updating the last-sent values of those that do.

        ``values`` maps each watched name to its column over the round's sampled rows
        (``positions`` select this message's rows in it). Numbers send when they moved
        past the deadband; anything else sends when it differs at all.
        """
        send = np.zeros(len(rows), dtype=bool)
        columns: list[tuple[str, npt.NDArray[Any]]] = []
        for name, column in values.items():
            if isinstance(column, Mapping):  # a GPS position: watch its parts
                columns += [(f"{name}.{k}", np.asarray(v)[positions]) for k, v in column.items()]
            else:
                columns.append((name, np.asarray(column)[positions]))
        for name, current in columns:
            numeric = current.dtype.kind in "biuf"
            previous = self.last_values.get(name)
            if previous is None:
                previous = (
                    np.full(len(self.due), np.nan) if numeric else np.full(len(self.due), None)
                )
                self.last_values[name] = previous
            before = previous[rows]
            if numeric and previous.dtype.kind == "f":
                band = self._band(name)
                # A first sample (NaN) always sends; `>` makes a zero deadband "any change".
                send |= np.isnan(before) | (np.abs(current - before) > band)
            else:
                send |= np.asarray(current != before, dtype=bool)
        if self.max_interval_s is not None:
            send |= t - self.last_sent_s[rows] >= self.max_interval_s
        sending = rows[send]
        for name, current in columns:
            self.last_values[name][sending] = current[send]
        self.last_sent_s[sending] = t[send]
        return send

    def _band(self, name: str) -> float:
        if isinstance(self.deadband, float | int):
            return float(self.deadband)
        head = name.partition(".")[0]
        return self.deadband.get(name, self.deadband.get(head, 0.0))


def build_schedule(spec: ScheduleSpec, ctx: BuildContext, name: str) -> Schedule:
    match spec:
        case IntervalScheduleSpec():
            return IntervalSchedule(spec, ctx, name)
        case PoissonScheduleSpec():
            return PoissonSchedule(ctx.param(spec.rate_hz, f"{name}.rate_hz"), ctx, name)
        case BurstScheduleSpec():
            return BurstSchedule(spec, ctx, name)
        case OnChangeScheduleSpec():
            return OnChangeSchedule(spec, ctx, name)
    raise TypeError(f"no schedule for {type(spec).__name__}")  # pragma: no cover
