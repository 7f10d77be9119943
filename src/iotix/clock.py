"""Clocks: the only place iotix reads time.

Core code takes a :class:`Clock`; tests and previews pass a :class:`VirtualClock`, which
moves only when told to, so a day of device behaviour is computed in milliseconds and
every assertion is on virtual time.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Seconds on a monotonic scale, and the wall-clock epoch it started at."""

    def now_s(self) -> float: ...

    @property
    def start_epoch_s(self) -> float: ...


class WallClock:
    """Real time: monotonic seconds since creation."""

    def __init__(self) -> None:
        self._origin = time.monotonic()
        self._start_epoch_s = time.time()

    def now_s(self) -> float:
        return time.monotonic() - self._origin

    @property
    def start_epoch_s(self) -> float:
        return self._start_epoch_s


class VirtualClock:
    """Time that moves only by :meth:`advance_to`; starts at 0 and ``start_epoch_s``."""

    def __init__(self, start_epoch_s: float = 0.0) -> None:
        self._now_s = 0.0
        self._start_epoch_s = start_epoch_s

    def now_s(self) -> float:
        return self._now_s

    @property
    def start_epoch_s(self) -> float:
        return self._start_epoch_s

    def advance_to(self, now_s: float) -> None:
        if now_s < self._now_s:
            raise ValueError(f"virtual time cannot go back from {self._now_s} to {now_s}")
        self._now_s = now_s
