"""Stages: how many devices of a fleet are connected over a run (ramp up, hold, ramp down).

Semantics as in k6 or Locust: each :class:`Stage` moves the target number of connected
devices in a straight line from the previous stage's target (0 at the start) to its own
``devices`` over its ``duration_s``; a stage of zero duration is a step. After the last
stage its target holds. Targets above the fleet size count as the fleet size.

Devices are activated in index order: the device with index ``i`` (0-based in the fleet)
is active at ``t`` iff ``i < plan.target_at(t)``.

**Rounding rule.** The target is always the last whole number the line has reached: it
becomes ``k`` at the instant the line reaches ``k``, whether the line rises or falls
(``floor`` while rising, ``ceil`` while falling). So while ramping up, device ``i``
connects when the line reaches ``i + 1``; while ramping down, it disconnects when the
line reaches ``i``, and every interval in which a device is active is half-open,
``[on, off)``. The instant the line reaches ``k`` in a stage that starts at ``s`` with
target ``a`` and ends with ``b`` is computed in floating point, always as
``s + duration_s * ((k - a) / (b - a))`` (so it is exactly the stage's end for
``k = b``), and ``target_at`` is defined from those same instants, so
``activation_s(i) <= t`` agrees with ``i < target_at(t)`` to the last bit.

The module is pure (no clock, no asyncio): the engine asks it what should be connected.
:func:`parse_stages` reads the CLI's ``--stages 30s:1000,2m:1000,30s:0``.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from iotix.errors import IotixError

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy.typing as npt

__all__ = [
    "Stage",
    "StagePlan",
    "StageSpec",
    "StagesError",
    "parse_duration_s",
    "parse_stage_specs",
    "parse_stages",
]


class StagesError(IotixError):
    """A stage list is invalid. ``part`` is the offending part of the input (the whole
    text when no single part is to blame)."""

    def __init__(self, message: str, *, part: str) -> None:
        super().__init__(message)
        self.part = part


@dataclass(frozen=True, slots=True)
class Stage:
    """Move the target linearly to ``devices`` over ``duration_s`` seconds."""

    duration_s: float
    devices: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s >= 0):
            raise StagesError(
                f"a stage's duration must be finite and not negative, not {self.duration_s!r}",
                part=str(self.duration_s),
            )
        if isinstance(self.devices, bool) or not isinstance(self.devices, int):
            raise StagesError(
                f"a stage's devices must be an integer, not {self.devices!r}",
                part=str(self.devices),
            )
        if self.devices < 0:
            raise StagesError(
                f"a stage's devices must not be negative, not {self.devices}",
                part=str(self.devices),
            )


@dataclass(frozen=True, slots=True)
class StageSpec:
    """A stage as written, before the fleet size is known: ``devices`` or ``percent``
    (of the fleet, rounded down), exactly one of them."""

    duration_s: float
    devices: int | None = None
    percent: Fraction | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if (self.devices is None) == (self.percent is None):
            raise StagesError("give exactly one of devices and percent", part=self.text)
        if self.percent is not None and not 0 <= self.percent <= 100:
            raise StagesError(
                f"{float(self.percent):g}% is not between 0% and 100%: {self.text!r}",
                part=self.text,
            )

    def resolve(self, fleet_size: int | None) -> Stage:
        """The stage for a fleet of ``fleet_size`` devices (needed for a percentage)."""
        if self.devices is not None:
            return Stage(self.duration_s, self.devices)
        assert self.percent is not None  # noqa: S101 - __post_init__ guarantees one
        if fleet_size is None:
            raise StagesError(
                f"stage {self.text!r} is a percentage of the fleet, but the fleet size is "
                "not known",
                part=self.text,
            )
        return Stage(self.duration_s, math.floor(self.percent * fleet_size / 100))


# --- parsing ------------------------------------------------------------------------

_UNITS_S = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600)}
# ASCII digits only: `\d` would also take other scripts' digits.
_NUMBER = r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+"
# `ms` before `m`, or `500ms` would read as 500 minutes and a stray `s`.
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|h|m|s)")
_BARE_SECONDS = re.compile(rf"(?:{_NUMBER})")
_DEVICES = re.compile(r"[0-9]+")
_MAX_DIGITS = 18  # any fleet is far smaller; int() of a huge string is slow, then refused
_PERCENT = re.compile(rf"({_NUMBER})%")


def parse_duration_s(text: str) -> float:
    """``"30s"``, ``"2m"``, ``"1h"``, ``"250ms"``, ``"1m30s"`` or bare seconds ``"45"``,
    in seconds. Raises :class:`StagesError` quoting ``text``."""
    body = text.strip()
    position = 0
    if _BARE_SECONDS.fullmatch(body):
        total, position = _number(body, text), len(body)
    else:
        total = Fraction(0)
        for match in _DURATION_PART.finditer(body):
            if match.start() != position:
                break
            total += _number(match.group(1), text) * _UNITS_S[match.group(2)]
            position = match.end()
    if position == 0 or position != len(body):
        raise StagesError(
            f"bad duration {text!r}: write a number with a unit ms, s, m or h "
            "(30s, 2m, 1m30s, 500ms) or bare seconds (45)",
            part=text,
        )
    try:
        return float(total)
    except OverflowError:
        raise StagesError(f"duration {text!r} is too long", part=text) from None


def _number(text: str, part: str) -> Fraction:
    """An exact number from a string the grammar matched, refusing absurd lengths."""
    if len(text) > _MAX_DIGITS * 2:
        raise StagesError(f"{text!r} has too many digits", part=part)
    return Fraction(text)


def parse_stage_specs(text: str) -> tuple[StageSpec, ...]:
    """``"30s:1000,2m:50%,30s:0"`` as stage specs, before the fleet size is known.

    Each comma-separated part is ``DURATION:DEVICES``; DEVICES is a whole number or a
    percentage of the fleet (``50%``, ``12.5%``). Raises :class:`StagesError` quoting the
    bad part.
    """
    if not text.strip():
        raise StagesError(
            "no stages given: write DURATION:DEVICES,... such as 30s:1000,2m:1000,30s:0",
            part=text,
        )
    specs = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            raise StagesError(f"empty stage in {text!r} (a stray comma?)", part=raw)
        duration, colon, devices = part.partition(":")
        if not colon:
            raise StagesError(
                f"bad stage {part!r} in {text!r}: write DURATION:DEVICES, such as 30s:1000",
                part=part,
            )
        try:
            duration_s = parse_duration_s(duration)
        except StagesError as exc:
            raise StagesError(f"bad stage {part!r} in {text!r}: {exc}", part=part) from None
        devices = devices.strip()
        if _DEVICES.fullmatch(devices):
            if len(devices) > _MAX_DIGITS:
                raise StagesError(f"bad stage {part!r} in {text!r}: too many devices", part=part)
            specs.append(StageSpec(duration_s, devices=int(devices), text=part))
        elif match := _PERCENT.fullmatch(devices):
            percent = _number(match.group(1), part)
            if percent > 100:
                raise StagesError(
                    f"bad stage {part!r} in {text!r}: {devices} is more than the whole fleet",
                    part=part,
                )
            specs.append(StageSpec(duration_s, percent=percent, text=part))
        else:
            raise StagesError(
                f"bad stage {part!r} in {text!r}: devices {devices!r} is neither a whole "
                "number (1000) nor a percentage of the fleet (50%)",
                part=part,
            )
    return tuple(specs)


def parse_stages(text: str, *, fleet_size: int | None = None) -> tuple[Stage, ...]:
    """``"30s:1000,2m:1000,30s:0"`` as stages; percentages need ``fleet_size``.

    Raises :class:`StagesError` quoting the bad part.
    """
    return tuple(spec.resolve(fleet_size) for spec in parse_stage_specs(text))


# --- the plan -----------------------------------------------------------------------

# Phases of a device in `StagePlan.first_intervals`; rises after _DONE do not matter there.
_WAITING, _ACTIVE, _DONE = 0, 1, 2


class StagePlan:
    """Which devices of a fleet of ``fleet_size`` should be connected when.

    Times are seconds since the run start. Before 0 nothing is connected; after
    ``duration_s`` the last stage's target holds.
    """

    def __init__(self, stages: Sequence[Stage], fleet_size: int) -> None:
        if not stages:
            raise StagesError("a stage plan needs at least one stage", part="")
        if isinstance(fleet_size, bool) or not isinstance(fleet_size, int) or fleet_size < 0:
            raise StagesError(
                f"the fleet size must be a whole number, not {fleet_size!r}",
                part=str(fleet_size),
            )
        self.stages = tuple(stages)
        self.fleet_size = fleet_size
        # Per stage: start time, end time, target at the start (a) and at the end (b),
        # targets clamped to the fleet. Starts are a running sum, so each stage's end is
        # bit for bit the next stage's start.
        starts: list[float] = []
        ends: list[float] = []
        begins: list[int] = []
        targets: list[int] = []
        start_s, target = 0.0, 0
        for stage in self.stages:
            end_s = start_s + stage.duration_s
            starts.append(start_s)
            ends.append(end_s)
            begins.append(target)
            target = min(stage.devices, fleet_size)
            targets.append(target)
            start_s = end_s
        self._starts = starts
        self._ends = ends
        self._begins = begins
        self._targets = targets
        self.duration_s = start_s
        """The sum of the stages' durations."""

    def __repr__(self) -> str:
        return f"StagePlan({self.stages!r}, fleet_size={self.fleet_size})"

    # --- the target -----------------------------------------------------------

    def _stage_at(self, t_s: float) -> int:
        """The stage in force at ``t_s`` >= 0: the last one starting at or before it
        (zero-duration stages before others at the same instant are over)."""
        return bisect.bisect_right(self._starts, t_s) - 1

    def _reach_s(self, stage: int, level: int) -> float:
        """When the line of ``stage`` reaches ``level`` (between its a and b)."""
        a, b = self._begins[stage], self._targets[stage]
        return self._starts[stage] + self.stages[stage].duration_s * ((level - a) / (b - a))

    def target_at(self, t_s: float) -> int:
        """How many devices should be connected at ``t_s`` (devices 0 .. target-1)."""
        if math.isnan(t_s):
            raise StagesError("the time is NaN", part="nan")
        if t_s < 0:
            return 0
        j = self._stage_at(t_s)
        a, b = self._begins[j], self._targets[j]
        if t_s >= self._ends[j] or a == b:  # past the last stage, a step, or a hold
            return b
        # The levels the line passes, in the order it reaches them; their instants
        # never decrease, so a binary search finds how many it has reached by t_s.
        levels = range(a + 1, b + 1) if b > a else range(a - 1, b - 1, -1)
        reached = bisect.bisect_right(levels, t_s, key=lambda level: self._reach_s(j, level))
        return a + reached if b > a else a - reached

    # --- per device -----------------------------------------------------------

    def intervals(self, index: int) -> tuple[tuple[float, float], ...]:
        """Every ``[on, off)`` interval in which device ``index`` is active, in order;
        ``off`` is ``inf`` if it stays connected to the end (and after)."""
        level = index + 1  # device `index` is active while the target is >= level
        edges: list[tuple[float, bool]] = []
        for j in range(len(self.stages)):
            a, b = self._begins[j], self._targets[j]
            if a < level <= b:
                edges.append((self._reach_s(j, level), True))
            elif b < level <= a:
                edges.append((self._reach_s(j, level - 1), False))
        spans: list[tuple[float, float]] = []
        on: float | None = None
        for time_s, rising in edges:
            if rising:
                # Off and on again at one instant: it stays on.
                on = spans.pop()[0] if spans and spans[-1][1] == time_s else time_s
            else:
                assert on is not None  # noqa: S101 - the target falls only past a rise
                if time_s > on:  # a step up and down at one instant is no interval
                    spans.append((on, time_s))
                on = None
        if on is not None:
            spans.append((on, math.inf))
        return tuple(spans)

    def activation_s(self, index: int) -> float | None:
        """The earliest time device ``index`` becomes active; None if it never does."""
        spans = self.intervals(index)
        return spans[0][0] if spans else None

    def deactivation_s(self, index: int) -> float | None:
        """When device ``index`` ramps down after it first became active; None if it
        stays to the end or never becomes active. A later stage may activate it again
        (see :meth:`intervals`)."""
        spans = self.intervals(index)
        return spans[0][1] if spans and math.isfinite(spans[0][1]) else None

    def first_intervals(
        self, indices: npt.ArrayLike
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """:meth:`activation_s` and :meth:`deactivation_s` of many devices at once: two
        float arrays ``(on, off)`` with ``inf`` for None, so that device ``indices[n]``
        is first active on ``[on[n], off[n])`` and ``on <= t < off`` needs no special
        case. (Later intervals of a plan that ramps up again: :meth:`intervals`.)"""
        level = np.asarray(indices, dtype=np.int64) + 1
        on = np.full(level.shape, np.inf)
        off = np.full(level.shape, np.inf)
        phase = np.full(level.shape, _WAITING, dtype=np.int8)
        for j in range(len(self.stages)):
            a, b = self._begins[j], self._targets[j]
            start_s, d = self._starts[j], self.stages[j].duration_s
            if b > a:
                crossing = (a < level) & (level <= b)
                reach = start_s + d * ((level - a) / (b - a))
                first = crossing & (phase == _WAITING)
                on[first] = reach[first]
                # Ramped down and back up at the very same instant: never went off.
                back = crossing & (phase == _DONE) & (off == reach)
                off[back] = np.inf
                phase[first | back] = _ACTIVE
            elif b < a:
                crossing = (b < level) & (level <= a) & (phase == _ACTIVE)
                reach = start_s + d * ((level - 1 - a) / (b - a))
                empty = crossing & (reach == on)  # up and down at one instant
                on[empty] = np.inf
                phase[empty] = _WAITING
                down = crossing & ~empty
                off[down] = reach[down]
                phase[down] = _DONE
        return on, off
