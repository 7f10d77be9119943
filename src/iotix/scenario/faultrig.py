"""A scenario's fault timeline: proxies between the fleets and their brokers.

:class:`FaultRig` starts one :class:`~iotix.faults.FaultProxy` per broker endpoint on an
event loop of its own (a thread beside the supervisor), hands out the proxies'
addresses for the fleets to connect to, puts each fault of the timeline in force at its
time, and stops everything (every fault reverted) when the run ends, fails or is
interrupted. The probe keeps the direct route: it measures what got through.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import TYPE_CHECKING, Any

from iotix.faults import (
    Bandwidth,
    Blackhole,
    FaultProxy,
    FaultSpec,
    Latency,
    Partition,
    Reset,
    SlowClose,
    TargetDown,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from iotix.engine.worker import BrokerEndpoint
    from iotix.scenario.spec import FaultEntry

START_TIMEOUT_S = 15.0


def proxy_fault(entry: FaultEntry, scale: float = 1.0) -> FaultSpec:
    """The proxy's fault for a scenario entry (durations multiplied by ``scale``)."""
    duration = None if entry.duration_s is None else entry.duration_s * scale
    common: dict[str, Any] = {"duration_s": duration, "share": entry.share}
    match entry.kind:
        case "latency":
            return Latency(delay_s=entry.delay_s, jitter_s=entry.jitter_s, **common)
        case "bandwidth":
            return Bandwidth(bytes_per_s=entry.bytes_per_s, **common)
        case "blackhole":
            return Blackhole(**common)
        case "reset":
            return Reset(**common)
        case "slow_close":
            return SlowClose(delay_s=entry.delay_s, **common)
        case "partition":
            return Partition(**common)
        case _:
            return TargetDown(**common)


def fault_label(entry: FaultEntry) -> str:
    """How reports name a fault: its kind, its share and where."""
    share = "" if entry.share == 1 else f" {entry.share:.0%}"
    where = f" @{entry.broker}" if entry.broker else ""
    return f"{entry.kind}{share}{where}"


class FaultRig:
    """The proxies and the timeline of one run. ``brokers`` maps each broker name of the
    scenario to its endpoints."""

    def __init__(
        self,
        faults: Sequence[FaultEntry],
        brokers: Mapping[str, tuple[BrokerEndpoint, ...]],
        *,
        scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.faults = list(faults)
        self.brokers = dict(brokers)
        self.scale = scale
        self.seed = seed
        self.proxies: dict[BrokerEndpoint, FaultProxy] = {}
        self._by_name: dict[str, list[FaultProxy]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="iotix-faults")
        self._timers: list[asyncio.TimerHandle] = []
        self.applied: list[dict[str, Any]] = []

    def start(self) -> dict[BrokerEndpoint, BrokerEndpoint]:
        """Start the proxies; returns each broker endpoint's replacement (the proxy)."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return {
            endpoint: dataclasses.replace(endpoint, host="127.0.0.1", port=proxy.port)
            for endpoint, proxy in self.proxies.items()
        }

    async def _start(self) -> None:
        for name, endpoints in self.brokers.items():
            for endpoint in endpoints:
                proxy = self.proxies.get(endpoint)
                if proxy is None:
                    proxy = FaultProxy(endpoint.host, endpoint.port, seed=self.seed)
                    await proxy.start()
                    self.proxies[endpoint] = proxy
                self._by_name.setdefault(name, []).append(proxy)

    def begin(self) -> None:
        """The run starts now: put the timeline on the proxies' clock."""
        self._loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        for entry in self.faults:
            self._timers.append(self._loop.call_later(entry.at_s * self.scale, self._apply, entry))

    def _apply(self, entry: FaultEntry) -> None:
        proxies = (
            self._by_name.get(entry.broker, []) if entry.broker else list(self.proxies.values())
        )
        spec = proxy_fault(entry, self.scale)
        for proxy in proxies:
            proxy.apply(spec)
        self.applied.append({"fault": fault_label(entry), "at_s": entry.at_s * self.scale})

    def windows(self) -> list[tuple[str, float, float]]:
        """(label, start, end) of each fault, seconds from the run's start, for reports."""
        return [
            (
                fault_label(entry),
                entry.at_s * self.scale,
                (entry.at_s + (entry.duration_s or 0.0)) * self.scale,
            )
            for entry in self.faults
        ]

    def stats(self) -> dict[str, Any]:
        """What each proxy saw and did."""
        return {str(endpoint): proxy.stats() for endpoint, proxy in self.proxies.items()}

    def stop(self) -> None:
        """Cancel what has not happened, revert every fault, stop the proxies."""
        if not self._thread.is_alive():
            self._loop.close()
            return

        async def stop_all() -> None:
            for timer in self._timers:
                timer.cancel()
            for proxy in self.proxies.values():
                await proxy.stop()

        try:
            asyncio.run_coroutine_threadsafe(stop_all(), self._loop).result(START_TIMEOUT_S)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()


__all__ = ["FaultRig", "fault_label", "proxy_fault"]
