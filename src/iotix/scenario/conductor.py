"""A scenario's timeline while it runs: fault proxies, faults, actions, live checks.

:class:`Conductor` runs on an event loop of its own (a thread beside the supervisor).
It starts fault proxies (:class:`~iotix.faults.process.ProxyProcess`, a
:class:`~iotix.faults.FaultProxy` in a process of its own: as many per fleet and broker
endpoint as its connections need, 9,000 each) when the scenario has faults or broker
actions, and hands out the proxies' addresses for the
fleets to connect to (the probe and the commander keep the direct route: they are the
back end, and measure what got through). It puts each fault in force at its time, does
each action at its time or the first time its condition holds, and stops everything
(every fault reverted) when the run ends, fails or is interrupted.

The supervisor's thread feeds it every merged snapshot (:meth:`Conductor.observe`):
that is where conditions and ``abort_on_fail`` checks are judged, and where the
snapshots at the edges of windowed checks are kept (to the snapshot interval, a
second by default). Device actions go to the workers through a
:class:`~iotix.engine.fleet.FleetControl`; commands go out through a
:class:`~iotix.engine.commander.Commander` per broker endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from iotix.engine.commander import Commander, CommandTracker, command_targets
from iotix.engine.fleet import probe_can_follow
from iotix.engine.results import summarise
from iotix.engine.worker import DeviceAction, in_share
from iotix.errors import IotixError
from iotix.faults import (
    Bandwidth,
    Blackhole,
    FaultSpec,
    Latency,
    Partition,
    Reset,
    SlowClose,
    TargetDown,
)
from iotix.faults.process import CONNECTIONS_PER_PROXY, ProxyProcess
from iotix.faults.udp import Duplicate, Loss, Reorder
from iotix.metrics import Histogram, Snapshot
from iotix.scenario import CheckResult
from iotix.scenario.checks import Check, evaluate, parse_check, run_metrics
from iotix.scenario.spec import (
    CommandActionSpec,
    DisconnectActionSpec,
    FailoverActionSpec,
    ReconnectStormActionSpec,
    RestartBrokerActionSpec,
    SetActionSpec,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from iotix.engine.fleet import FleetControl, ProbeThread
    from iotix.engine.worker import BrokerEndpoint
    from iotix.scenario.loader import LoadedScenario
    from iotix.scenario.spec import ActionEntry, CheckSpec, FaultEntry

START_TIMEOUT_S = 15.0

__all__ = ["Conductor", "fault_label", "proxy_fault"]


UDP_SCHEMES = frozenset({"coap", "coaps"})
"""Broker schemes whose fleets send datagrams: their faults go through a UDP proxy."""


def proxy_fault(entry: FaultEntry, scale: float = 1.0, *, udp: bool = False) -> FaultSpec:
    """The proxy's fault for a scenario entry (durations multiplied by ``scale``); for a
    UDP proxy, a partition or a target down is a blackhole (datagrams have no
    connections to refuse)."""
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
        case "loss":
            return Loss(probability=entry.probability, **common)
        case "duplicate":
            return Duplicate(probability=entry.probability, **common)
        case "reorder":
            return Reorder(probability=entry.probability, delay_s=entry.delay_s, **common)
        case "partition":
            return Blackhole(**common) if udp else Partition(**common)
        case _:
            return Blackhole(**common) if udp else TargetDown(**common)


def fault_label(entry: FaultEntry | ActionEntry, name: str | None = None) -> str:
    """How reports name a fault or an action: its name, its share and where."""
    share = getattr(entry, "share", 1.0)
    fleet, broker = getattr(entry, "fleet", None), getattr(entry, "broker", None)
    parts = [name or entry.kind]
    if share != 1:
        parts.append(f"{share:.0%}")
    if fleet:
        parts.append(f"of {fleet}")
    if broker:
        parts.append(f"@{broker}")
    return " ".join(parts)


def _lasts_s(entry: FaultEntry | ActionEntry) -> float:
    """How long a fault or an action is in force (0: an instant)."""
    if isinstance(entry, RestartBrokerActionSpec):
        return entry.down_for_s
    if isinstance(entry, DisconnectActionSpec):
        return entry.offline_s
    return getattr(entry, "duration_s", None) or 0.0


@dataclass(frozen=True)
class _Seen:
    """A merged snapshot, and the probe's end-to-end latency at the same time."""

    snapshot: Snapshot
    e2e: Histogram | None = None


@dataclass
class _Mark:
    """A window's edge: the last snapshot before it (where a window starting there
    starts) and the first after it (where a window ending there ends), so that a
    window takes in everything that happened within it, and up to one snapshot
    interval more on either side."""

    at_s: float
    before: _Seen | None = None
    after: _Seen | None = None


class Conductor:
    """The proxies, the timeline and the live checks of one scenario run.

    ``fleet_devices`` is each fleet's device count as planned (after ``--scale``);
    ``override`` replaces every broker (``--broker``)."""

    def __init__(
        self,
        scenario: LoadedScenario,
        *,
        fleet_devices: Sequence[int],
        control: FleetControl,
        stop: threading.Event,
        scale: float = 1.0,
        override: tuple[BrokerEndpoint, ...] | None = None,
    ) -> None:
        self.scenario = scenario
        self.fleet_devices = list(fleet_devices)
        self.control = control
        self.stop_run = stop
        self.scale = scale
        self.brokers: dict[str, tuple[BrokerEndpoint, ...]] = {
            name: override or endpoints for name, endpoints in _broker_endpoints(scenario).items()
        }
        self.proxies: dict[tuple[str, BrokerEndpoint, int], ProxyProcess] = {}
        self.happened: dict[str, tuple[float, float]] = {}
        """Name -> (start, end) of each fault and action that took place, seconds from
        the run's start (as the conductor's clock saw them)."""
        self.events: list[dict[str, Any]] = []
        self.aborted: CheckResult | None = None
        self.commands = CommandTracker()
        self._commanders: dict[BrokerEndpoint, Commander] = {}
        self._current_broker = {fleet.name: fleet.broker for fleet in scenario.fleets}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="iotix-scenario")
        self._timers: list[asyncio.TimerHandle] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        self._began: float | None = None
        self._probe: ProbeThread | None = None
        self._marks: dict[float, _Mark] = {}
        self._last: _Seen = _Seen(Snapshot(worker=-1, at_s=0.0), Histogram())
        self._windowed = any(
            spec.during or spec.after or spec.from_s is not None or spec.to_s is not None
            for spec in scenario.check_specs
        )
        self._conditions: list[tuple[int, Check]] = [
            (i, parse_check(action.when))
            for i, action in enumerate(scenario.actions)
            if action.when is not None
        ]
        self._fired: set[int] = set()
        self._aborts: list[tuple[CheckSpec, Check]] = [
            (spec, parse_check(spec.check, spec.name))
            for spec in scenario.check_specs
            if spec.abort_on_fail
        ]
        for spec in scenario.check_specs:
            for edge in (spec.from_s, spec.to_s):
                if edge is not None:
                    self._mark(edge * scale)

    # --- set-up -------------------------------------------------------------------

    @property
    def needs_proxies(self) -> bool:
        return bool(self.scenario.faults) or any(
            isinstance(a, RestartBrokerActionSpec | FailoverActionSpec)
            for a in self.scenario.actions
        )

    def start(self) -> dict[str, dict[BrokerEndpoint, tuple[BrokerEndpoint, ...]]]:
        """Start the loop and the proxies; returns, per fleet, each broker endpoint's
        replacements (its proxies, over which its devices spread), empty when the
        scenario needs no proxies."""
        self._thread.start()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        routes: dict[str, dict[BrokerEndpoint, tuple[BrokerEndpoint, ...]]] = {}
        for (fleet, endpoint, _), proxy in self.proxies.items():
            replacement = dataclasses.replace(endpoint, host="127.0.0.1", port=proxy.port)
            route = routes.setdefault(fleet, {})
            route[endpoint] = (*route.get(endpoint, ()), replacement)
        return routes

    def _start(self) -> None:
        if not self.needs_proxies:
            return
        for fleet, devices in zip(self.scenario.fleets, self.fleet_devices, strict=True):
            endpoints = self.brokers[fleet.broker]
            per_endpoint = math.ceil(devices / len(endpoints))
            for endpoint in endpoints:
                for number in range(max(1, math.ceil(per_endpoint / CONNECTIONS_PER_PROXY))):
                    self.proxies[(fleet.name, endpoint, number)] = ProxyProcess(
                        endpoint.host,
                        endpoint.port,
                        seed=self.scenario.seed,
                        udp=endpoint.scheme in UDP_SCHEMES,
                    )
        for proxy in self.proxies.values():
            proxy.launch()
        for proxy in self.proxies.values():
            proxy.wait_ready()

    def probe_brokers(self) -> list[BrokerEndpoint]:
        """Where the probe reads: every MQTT broker and Kafka cluster a fleet uses or
        fails over to (see :func:`~iotix.engine.fleet.probe_can_follow`), directly (not
        through the fault proxies)."""
        names = {fleet.broker for fleet in self.scenario.fleets} | {
            a.to for a in self.scenario.actions if isinstance(a, FailoverActionSpec)
        }
        found: list[BrokerEndpoint] = []
        for name in sorted(names):
            for endpoint in self.brokers[name]:
                if probe_can_follow(endpoint) and endpoint not in found:
                    found.append(endpoint)
        return found

    def attach_probe(self, probe: ProbeThread) -> None:
        """The probe, for the end-to-end latency at the windows' edges."""
        self._probe = probe

    def begin(self) -> None:
        """The run starts now: put the timeline on the conductor's clock."""
        self._began = time.monotonic()
        self._loop.call_soon_threadsafe(self._schedule)

    def elapsed_s(self) -> float:
        return 0.0 if self._began is None else time.monotonic() - self._began

    def _schedule(self) -> None:
        for i, fault in enumerate(self.scenario.faults):
            self._later(fault.at_s * self.scale, self._apply_fault, i)
        for i, action in enumerate(self.scenario.actions):
            if action.when is None and action.at_s is not None:
                self._later(action.at_s * self.scale, self._act, i)

    def _later(self, delay_s: float, callback: Any, *args: Any) -> None:
        at = max(0.0, delay_s - self.elapsed_s())
        self._timers.append(self._loop.call_later(at, callback, *args))

    # --- the timeline (on the conductor's loop) -------------------------------------

    def _happen(self, name: str, entry: FaultEntry | ActionEntry, what: str) -> None:
        start = self.elapsed_s()
        end = start + _lasts_s(entry) * self.scale
        with self._lock:
            self.happened[name] = (start, end)
        self.events.append({"at_s": round(start, 3), "name": name, "what": what})
        for spec in self.scenario.check_specs:
            if spec.during == name:
                self._mark(start)
                self._mark(end)
            elif spec.after == name:
                self._mark(end)
                if spec.for_s is not None:
                    self._mark(end + spec.for_s * self.scale)

    def _mark(self, at_s: float) -> None:
        with self._lock:
            self._marks.setdefault(at_s, _Mark(at_s))

    def _proxies_of(self, broker: str | None, fleet: str | None) -> list[ProxyProcess]:
        return [
            proxy
            for (fleet_name, _, _), proxy in self.proxies.items()
            if (fleet is None or fleet_name == fleet)
            and (broker is None or self._current_broker[fleet_name] == broker)
        ]

    def _apply_fault(self, i: int) -> None:
        entry = self.scenario.faults[i]
        for proxy in self._proxies_of(entry.broker, entry.fleet):
            proxy.apply(proxy_fault(entry, self.scale, udp=proxy.udp))
        name = self.scenario.fault_names[i]
        self._happen(name, entry, f"fault {fault_label(entry)}")

    def _act(self, i: int) -> None:
        action = self.scenario.actions[i]
        name = self.scenario.action_names[i]
        label = fault_label(action)
        if isinstance(action, RestartBrokerActionSpec):
            for proxy in self._proxies_of(action.broker, action.fleet):
                down = Blackhole if proxy.udp else TargetDown
                proxy.apply(down(duration_s=action.down_for_s * self.scale))
            self._happen(name, action, f"{label}: down for {action.down_for_s * self.scale:g} s")
        elif isinstance(action, FailoverActionSpec):
            targets = self.brokers[action.to]
            moved = 0
            for number, proxy in enumerate(self._proxies_of(action.broker, action.fleet)):
                target = targets[number % len(targets)]
                moved += proxy.retarget(target.host, target.port)
            for fleet in self.scenario.fleets:
                if self._current_broker[fleet.name] == action.broker and action.fleet in (
                    None,
                    fleet.name,
                ):
                    self._current_broker[fleet.name] = action.to
            self._happen(name, action, f"{label}: to {action.to}, {moved} connections reset")
        elif isinstance(action, CommandActionSpec):
            self._spawn(self._command(action, name, label))
        else:
            self._device_action(action, name, label)

    def _fleets_of(self, fleet: str | None) -> list[int]:
        return [i for i, f in enumerate(self.scenario.fleets) if fleet is None or f.name == fleet]

    def _device_action(
        self,
        action: DisconnectActionSpec | ReconnectStormActionSpec | SetActionSpec,
        name: str,
        label: str,
    ) -> None:
        if isinstance(action, DisconnectActionSpec):
            device_action = DeviceAction(
                "disconnect",
                share=action.share,
                offline_s=action.offline_s * self.scale,
                clean=action.clean,
            )
            what = f"{label}: offline {action.offline_s * self.scale:g} s"
        elif isinstance(action, ReconnectStormActionSpec):
            device_action = DeviceAction("reconnect_storm", share=action.share)
            what = f"{label}: reconnect at once"
        else:
            device_action = DeviceAction(
                "set", share=action.share, field=action.field, value=action.value
            )
            what = f"{label}: {action.field} = {action.value!r}"
        for number in self._fleets_of(action.fleet):
            self.control.send(number, name, device_action)
        self._happen(name, action, what)

    async def _command(self, action: CommandActionSpec, name: str, label: str) -> None:
        self._happen(name, action, f"{label}: {action.command}")
        for number in self._fleets_of(action.fleet):
            fleet = self.scenario.fleets[number]
            indices = np.flatnonzero(
                in_share(np.arange(self.fleet_devices[number]), action.share, self.scenario.seed)
            ).tolist()
            if not indices:
                continue
            targets = command_targets(
                fleet.model, indices, seed=self.scenario.seed, command=action.command
            )
            commander = await self._commander(self.brokers[self._current_broker[fleet.name]][0])
            await commander.send(
                targets, action.command, action.payload, timeout_s=action.timeout_s
            )

    async def _commander(self, endpoint: BrokerEndpoint) -> Commander:
        commander = self._commanders.get(endpoint)
        if commander is None:
            commander = Commander(
                endpoint.host,
                endpoint.port,
                tracker=self.commands,
                client_id=f"iotix-commander-{len(self._commanders)}",
                websocket_path=endpoint.websocket_path,
            )
            self._commanders[endpoint] = commander
            await commander.start()
        return commander

    def _spawn(self, coroutine: Any) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                error = finished.exception()
                self.events.append(
                    {"at_s": round(self.elapsed_s(), 3), "name": "error", "what": str(error)}
                )

        task.add_done_callback(done)

    # --- what the supervisor sees (its thread) --------------------------------------

    def observe(self, snapshot: Snapshot) -> None:
        """A merged snapshot of the run: judge conditions and abort checks, keep the
        snapshots windows start and end at."""
        now = self.elapsed_s()
        metrics: dict[str, float] | None = None
        for i, condition in self._conditions:
            action = self.scenario.actions[i]
            if i in self._fired or (action.at_s is not None and now < action.at_s * self.scale):
                continue
            metrics = metrics or run_metrics(
                summarise(snapshot), None, self.command_summary(), sum(self.fleet_devices)
            )
            if condition.metric in metrics and evaluate([condition], metrics)[0].passed:
                self._fired.add(i)
                self._loop.call_soon_threadsafe(self._act, i)
        if self.aborted is None:
            for spec, check in self._aborts:
                if now < spec.abort_after_s * self.scale:
                    continue
                metrics = metrics or run_metrics(
                    summarise(snapshot), None, devices=sum(self.fleet_devices)
                )
                if check.metric not in metrics:
                    continue  # nothing to judge yet
                result = evaluate([check], metrics)[0]
                if not result.passed:
                    self.aborted = dataclasses.replace(
                        result, message=f"{result.message} (at {now:.1f} s: run aborted)"
                    )
                    self.events.append(
                        {"at_s": round(now, 3), "name": "abort", "what": result.message}
                    )
                    self.stop_run.set()
                    break
        with self._lock:
            due = [mark for mark in self._marks.values() if mark.after is None and mark.at_s <= now]
        if not self._windowed:
            return
        e2e = self._probe.e2e_latency() if self._probe is not None else None
        seen = _Seen(snapshot, e2e)
        for mark in due:
            mark.before, mark.after = self._last, seen
        self._last = seen

    # --- windows, after the run -----------------------------------------------------

    def window_of(self, spec: CheckSpec) -> tuple[float, float | None] | str:
        """A windowed check's (start, end) in seconds from the run's start (None: the
        run's end), or why it has none."""
        if spec.during is not None or spec.after is not None:
            name = spec.during or spec.after or ""
            with self._lock:
                happened = self.happened.get(name)
            if happened is None:
                return f"{name} never happened"
            start, end = happened
            if spec.during is not None:
                return (start, end)
            return (end, None if spec.for_s is None else end + spec.for_s * self.scale)
        start = (spec.from_s or 0.0) * self.scale
        return (start, None if spec.to_s is None else spec.to_s * self.scale)

    def windowed_results(
        self, final: Snapshot, final_e2e: Histogram | None
    ) -> dict[int, CheckResult]:
        """The result of every windowed check (by its index), against the snapshots
        kept at its edges; the run's end is ``final``."""
        results: dict[int, CheckResult] = {}
        for i, spec in enumerate(self.scenario.check_specs):
            if (
                spec.during is None
                and spec.after is None
                and spec.from_s is None
                and (spec.to_s is None)
            ):
                continue
            check = parse_check(spec.check, spec.name)
            window = self.window_of(spec)
            if isinstance(window, str):
                results[i] = _failed(check, f"no window: {window}")
                continue
            start, end = window
            first = self._edge(start, starting=True)
            last = _Seen(final, final_e2e) if end is None else self._edge(end, starting=False)
            if last is None:  # the run ended before the window did
                last = _Seen(final, final_e2e)
            if first is None:
                results[i] = _failed(check, f"no snapshot at {start:.1f} s: the run ended before")
                continue
            try:
                between = last.snapshot.since(first.snapshot)
            except ValueError:
                results[i] = _failed(check, "the counts went down between the window's edges")
                continue
            probe = None
            if last.e2e is not None:
                e2e = last.e2e.since(first.e2e) if first.e2e is not None else last.e2e
                probe = {"e2e_latency": e2e.summary()}
            metrics = run_metrics(summarise(between), probe, None, sum(self.fleet_devices))
            result = evaluate([check], metrics)[0]
            where = "to the end" if end is None else f"to {end:.1f} s"
            results[i] = dataclasses.replace(
                result, message=f"{result.message} (from {start:.1f} s {where})"
            )
        return results

    def _edge(self, at_s: float, *, starting: bool) -> _Seen | None:
        if at_s <= 0 and starting:
            return _Seen(Snapshot(worker=-1, at_s=0.0), Histogram())
        with self._lock:
            mark = self._marks.get(at_s)
        if mark is None:
            return None
        return mark.before if starting else mark.after

    # --- the end --------------------------------------------------------------------

    def windows(self) -> list[tuple[str, float, float]]:
        """(label, start, end) of everything that happened, for reports."""
        with self._lock:
            return [(name, start, end) for name, (start, end) in self.happened.items()]

    def stats(self) -> dict[str, Any]:
        """What each proxy saw and did, by fleet and endpoint."""
        return {
            f"{fleet} -> {endpoint}" + (f" #{number + 1}" if number else ""): p.stats()
            for (fleet, endpoint, number), p in self.proxies.items()
        }

    def command_summary(self) -> dict[str, Any] | None:
        return self.commands.summary() if self.commands.sent else None

    def stop(self) -> None:
        """Cancel what has not happened, wait for the commands' replies (at most their
        timeouts), revert every fault, stop the proxies."""
        if not self._thread.is_alive():
            self._loop.close()
            return

        async def stop_all() -> None:
            for timer in self._timers:
                timer.cancel()
            for task in list(self._tasks):
                task.cancel()
            for commander in self._commanders.values():
                with contextlib.suppress(OSError, IotixError):
                    await commander.stop()
            for proxy in self.proxies.values():
                await proxy.stop()

        try:
            self._call(stop_all())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(START_TIMEOUT_S)


def _failed(check: Check, why: str) -> CheckResult:
    return CheckResult(
        name=check.name, expression=check.expression, passed=False, observed=None, message=why
    )


def _broker_endpoints(scenario: LoadedScenario) -> Mapping[str, tuple[BrokerEndpoint, ...]]:
    from iotix.engine.worker import parse_brokers  # noqa: PLC0415 - parsed by the loader already

    return {name: parse_brokers(url) for name, url in scenario.spec.brokers.items()}
