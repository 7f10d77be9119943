"""The supervisor: splits a fleet into shards, runs a worker process per shard, merges
their snapshots, and notices workers that die.

A worker holds at most what its open-file limit allows (DESIGN.md: 20,000 here, not
raisable), so the number of workers is at least ``devices / connections_per_worker``.
Shards are contiguous index ranges: device ids stay stable whatever the worker count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import queue
import resource
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from iotix.clock import WallClock
from iotix.engine.probe import Probe
from iotix.engine.worker import BrokerEndpoint, RunSettings, Worker
from iotix.errors import IotixError
from iotix.metrics import Snapshot
from iotix.model.loader import load_model

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from multiprocessing.synchronize import Event as ProcessEvent

logger = logging.getLogger(__name__)

FILES_RESERVED = 200
"""Open files a worker keeps for itself (the interpreter, logs, pipes)."""


class WorkerDiedError(IotixError):
    """A worker process ended without its final snapshot."""


def connections_per_worker() -> int:
    """How many connections one worker process may hold: its hard open-file limit,
    less what the process needs for itself."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    return max(hard - FILES_RESERVED, 1)


def plan_shards(devices: int, workers: int) -> list[range]:
    """Contiguous, balanced index ranges, one per worker."""
    workers = max(1, min(workers, devices)) if devices else 1
    size, extra = divmod(devices, workers)
    shards, start = [], 0
    for number in range(workers):
        end = start + size + (1 if number < extra else 0)
        shards.append(range(start, end))
        start = end
    return shards


def default_workers(devices: int) -> int:
    """Enough workers for the open-file limit, and at least one per core."""
    needed = math.ceil(devices / connections_per_worker()) if devices else 1
    return max(needed, min(os.cpu_count() or 1, max(devices // 1_000, 1)))


def _raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class FleetResult:
    """How a run ended: the merged final snapshot and what went wrong, if anything."""

    snapshot: Snapshot
    worker_errors: list[str] = field(default_factory=list)
    interrupted: bool = False
    probe: dict[str, Any] | None = None
    """The probe subscriber's delivery summary (loss, duplicates, e2e latency)."""


class ProbeThread:
    """The probe subscriber on a thread of its own, beside the supervisor's loop: it
    must be subscribed before the devices send, and read until they are done."""

    def __init__(self, endpoint: BrokerEndpoint, sample: float) -> None:
        self.probe = Probe(endpoint.host, endpoint.port, sample=sample, client_id="iotix-probe")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="iotix-probe")

    def start(self) -> None:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.probe.start(), self._loop).result(timeout=15)
        except Exception:
            self._shutdown()
            raise

    def stop(self) -> dict[str, Any]:
        try:
            summary = asyncio.run_coroutine_threadsafe(self.probe.stop(), self._loop).result(
                timeout=15
            )
        finally:
            self._shutdown()
        return summary

    def _shutdown(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


@dataclass(frozen=True)
class _Job:
    """What a worker process is given."""

    model_path: str
    shard: range
    settings: RunSettings
    worker_id: int


def _worker_main(
    job: _Job,
    snapshots: multiprocessing.Queue[dict[str, Any]],
    stop: ProcessEvent,
) -> None:
    """A worker process: run one shard, sending snapshots to the supervisor."""
    model_path, shard, settings, worker_id = job.model_path, job.shard, job.settings, job.worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    _raise_open_file_limit()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    model = load_model(model_path)

    async def main() -> None:
        stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()

        done = False

        def relay() -> None:
            # The stop flag is shared by every worker: wait for it without ever setting
            # it, and give up once this worker is done.
            while not done:
                if stop.wait(0.2):
                    loop.call_soon_threadsafe(stop_event.set)
                    return

        waiter = loop.run_in_executor(None, relay)
        worker = Worker(
            model,
            shard,
            settings,
            WallClock(),
            worker_id=worker_id,
            on_snapshot=lambda snapshot: snapshots.put(
                {"final": False, "snapshot": snapshot.to_dict()}
            ),
        )
        final = await worker.run(stop_event)
        snapshots.put({"final": True, "snapshot": final.to_dict()})
        done = True
        await waiter

    asyncio.run(main())


@dataclass(frozen=True)
class FleetPlan:
    """One model's devices in a run."""

    model_path: Path
    devices: int


def plan_jobs(fleets: Sequence[FleetPlan], settings: RunSettings, workers: int) -> list[_Job]:
    """Shards for every fleet: workers shared in proportion to the fleets' sizes, at
    least one each; worker ids are unique across the run."""
    total = sum(f.devices for f in fleets) or 1
    jobs: list[_Job] = []
    for fleet in fleets:
        share = max(1, round(workers * fleet.devices / total))
        fleet_settings = replace(settings, devices=fleet.devices)
        for shard in plan_shards(fleet.devices, share):
            jobs.append(_Job(str(fleet.model_path), shard, fleet_settings, len(jobs)))
    return jobs


def run_fleet(
    fleets: Sequence[FleetPlan],
    settings: RunSettings,
    *,
    workers: int,
    on_snapshot: Callable[[Snapshot], None] | None = None,
    probe_sample: float | None = None,
) -> FleetResult:
    """Run the fleets in about ``workers`` processes until the duration ends or Ctrl-C.
    With ``probe_sample``, a probe subscriber on the first broker checks delivery for
    that fraction of the devices."""
    probe = None
    if probe_sample is not None:
        probe = ProbeThread(settings.brokers[0], probe_sample)
        probe.start()
    try:
        result = _run_workers(fleets, settings, workers=workers, on_snapshot=on_snapshot)
    finally:
        summary = probe.stop() if probe is not None else None
    if probe is not None:
        result.probe = summary
        result.snapshot.e2e_latency = probe.probe.tracker.e2e_latency
    return result


def _run_workers(
    fleets: Sequence[FleetPlan],
    settings: RunSettings,
    *,
    workers: int,
    on_snapshot: Callable[[Snapshot], None] | None,
) -> FleetResult:
    context = multiprocessing.get_context("spawn")
    snapshots: multiprocessing.Queue[dict[str, Any]] = context.Queue()
    stop = context.Event()
    jobs = plan_jobs(fleets, settings, workers)
    processes = [
        context.Process(
            target=_worker_main,
            args=(job, snapshots, stop),
            name=f"iotix-worker-{job.worker_id}",
            daemon=True,
        )
        for job in jobs
    ]
    for process in processes:
        process.start()
    latest: dict[int, Snapshot] = {}
    finished: set[int] = set()
    errors: list[str] = []
    interrupted = False
    deadline = None
    try:
        while len(finished) < len(processes):
            try:
                item = snapshots.get(timeout=0.5)
            except queue.Empty:
                item = None
            if item is not None:
                snapshot = Snapshot.from_dict(item["snapshot"])
                latest[snapshot.worker] = snapshot
                if item["final"]:
                    finished.add(snapshot.worker)
                if on_snapshot is not None and latest:
                    on_snapshot(Snapshot.merge(list(latest.values())))
            for number, process in enumerate(processes):
                if number in finished or process.is_alive():
                    continue
                # Give a snapshot still in the pipe a moment to arrive before judging.
                if deadline is None:
                    deadline = time.monotonic() + 2.0
                elif time.monotonic() > deadline:
                    shard = jobs[number].shard
                    errors.append(
                        f"worker {number} died (exit code {process.exitcode}) without its "
                        f"final snapshot; its devices {shard.start}-{shard.stop - 1} of "
                        f"{Path(jobs[number].model_path).name} are counted up to its last "
                        "snapshot"
                    )
                    finished.add(number)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        return _drain(processes, snapshots, latest, finished, errors, interrupted=True)
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=15)
            if process.is_alive():
                process.kill()
    merged = Snapshot.merge(list(latest.values())) if latest else Snapshot(worker=-1, at_s=0.0)
    return FleetResult(merged, errors, interrupted)


def _drain(
    processes: list[Any],
    snapshots: multiprocessing.Queue[dict[str, Any]],
    latest: dict[int, Snapshot],
    finished: set[int],
    errors: list[str],
    *,
    interrupted: bool,
) -> FleetResult:
    """After Ctrl-C: collect the workers' final snapshots while they disconnect."""
    deadline = time.monotonic() + 20.0
    while len(finished) < len(processes) and time.monotonic() < deadline:
        try:
            item = snapshots.get(timeout=0.5)
        except queue.Empty:
            continue
        snapshot = Snapshot.from_dict(item["snapshot"])
        latest[snapshot.worker] = snapshot
        if item["final"]:
            finished.add(snapshot.worker)
    merged = Snapshot.merge(list(latest.values())) if latest else Snapshot(worker=-1, at_s=0.0)
    return FleetResult(merged, errors, interrupted)
