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
import resource
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import uvloop

from iotix.adapters.tls import TLSContextCache, TLSSettings
from iotix.clock import WallClock
from iotix.engine.message_worker import MessageWorker
from iotix.engine.probe import DeliveryTracker, Probe
from iotix.engine.worker import BrokerEndpoint, DeviceAction, RunConfigError, RunSettings, Worker
from iotix.errors import IotixError
from iotix.metrics import Histogram, Snapshot
from iotix.model.loader import load_model

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Mapping, Sequence
    from multiprocessing.connection import Connection
    from multiprocessing.context import ForkServerContext, SpawnContext

    from iotix.engine.kafka_probe import KafkaProbe

logger = logging.getLogger(__name__)

T = TypeVar("T")

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


WorkerDeath = Literal["fail", "continue"]
"""What a run does when a worker process dies: stop the others at once, or go on."""


@dataclass
class FleetResult:
    """How a run ended: the merged final snapshot and what went wrong, if anything."""

    snapshot: Snapshot
    worker_errors: list[str] = field(default_factory=list)
    interrupted: bool = False
    probe: dict[str, Any] | None = None
    """The probe subscriber's delivery summary (loss, duplicates, e2e latency)."""
    by_fleet: dict[int, Snapshot] = field(default_factory=dict)
    """Each fleet's own merged final snapshot, by its number in the run (for figures
    compared across fleets: one protocol each, say)."""


PROBE_SCHEMES = frozenset({"mqtt", "kafka"})
"""Endpoint schemes whose devices a probe can follow: MQTT (a subscriber) and Kafka
(a consumer). HTTP and CoAP devices send to a server iotix does not see behind."""

_PROBE_DOCS = {"http": "http", "https": "http", "coap": "coap", "coaps": "coap"}

KAFKA_STREAM_PREFIX = "kafka:"
"""Before the streams a Kafka probe tracks: fleets of one model over MQTT and over
Kafka have devices of the same ids, whose messages must not count as duplicates."""

KAFKA_CATCH_UP_S = 10.0
"""How long, at the end of a run, a Kafka probe may take to read what was written."""


def probe_can_follow(endpoint: BrokerEndpoint) -> bool:
    """Whether a probe can follow the devices at ``endpoint`` (see :data:`PROBE_SCHEMES`)."""
    return endpoint.scheme in PROBE_SCHEMES


def probe_refusal(endpoint: BrokerEndpoint) -> str | None:
    """Why a probe cannot follow the devices at ``endpoint``; None when it can."""
    if probe_can_follow(endpoint):
        return None
    doc = _PROBE_DOCS.get(endpoint.scheme, "adapters")
    return (
        f"the probe follows MQTT and Kafka devices: it cannot follow {endpoint.scheme}:// "
        f"devices (see docs/{doc}.md)"
    )


def kafka_probe_pattern(fleets: Sequence[FleetPlan], settings: RunSettings) -> str | None:
    """The topics a Kafka probe reads: those the Kafka fleets produce to (their models'
    topics, or their ``topic`` option), as one regex; None when no fleet uses Kafka."""
    from iotix.engine.kafka_probe import fleet_topic_pattern  # noqa: PLC0415 - aiokafka only for Kafka runs

    patterns = set()
    for fleet in fleets:
        brokers: Sequence[BrokerEndpoint] = fleet.overrides.get("brokers", settings.brokers)
        if not any(endpoint.scheme == "kafka" for endpoint in brokers):
            continue
        options = fleet.overrides.get("adapter_options", settings.adapter_options)
        template = options.get("topic")
        spec = load_model(fleet.model_path).spec
        patterns.add(fleet_topic_pattern(spec, None if template is None else str(template)))
    return "|".join(f"(?:{pattern})" for pattern in sorted(patterns)) or None


class ProbeThread:
    """The probe on a thread of its own, beside the supervisor's loop: it must be
    reading before the devices send, and read until they are done.

    Each endpoint gets a probe of its kind: a subscriber on an MQTT broker
    (:class:`~iotix.engine.probe.Probe`), a consumer on a Kafka cluster
    (:class:`~iotix.engine.kafka_probe.KafkaProbe`, reading the topics that match
    ``kafka_pattern``: see :func:`kafka_probe_pattern`). One tracker counts what arrived
    anywhere: a scenario whose devices fail over from one broker to another, or whose
    fleets use both protocols, gets one delivery summary."""

    def __init__(
        self,
        endpoint: BrokerEndpoint | Sequence[BrokerEndpoint],
        sample: float,
        tls: TLSSettings | None = None,
        conformance: Callable[[str, bytes], str | None] | None = None,
        kafka_pattern: str | None = None,
    ) -> None:
        endpoints = [endpoint] if isinstance(endpoint, BrokerEndpoint) else list(endpoint)
        for at in endpoints:
            refusal = probe_refusal(at)
            if refusal is not None:
                raise RunConfigError(refusal)
        context = None
        if any(e.tls for e in endpoints):
            tls = tls or TLSSettings()
            if tls.per_device:  # the devices' own certificates are theirs: CA only
                tls = replace(tls, cert_file=None, key_file=None)
            context = TLSContextCache(tls).context_for("iotix-probe", 0)
        self.tracker = DeliveryTracker()
        self.probes: list[Probe] = []
        self.kafka_probes: list[KafkaProbe] = []
        for at in endpoints:
            if at.scheme == "kafka":
                from iotix.engine.kafka_probe import KafkaProbe  # noqa: PLC0415 - aiokafka only for Kafka runs

                host = f"[{at.host}]" if ":" in at.host else at.host
                self.kafka_probes.append(
                    KafkaProbe(
                        f"{host}:{at.port}",
                        pattern=kafka_pattern,
                        sample=sample,
                        tracker=self.tracker,
                        stream_prefix=KAFKA_STREAM_PREFIX,
                    )
                )
                continue
            number = len(self.probes)
            self.probes.append(
                Probe(
                    at.host,
                    at.port,
                    sample=sample,
                    client_id="iotix-probe" + (f"-{number}" if number else ""),
                    ssl_context=context if at.tls else None,
                    server_hostname=tls.server_hostname if tls else None,
                    websocket_path=at.websocket_path,
                    tracker=self.tracker,
                    conformance=conformance,
                )
            )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="iotix-probe")

    def start(self) -> None:
        self._thread.start()

        async def start_all() -> None:
            for probe in self.probes:
                await probe.start()
            for kafka_probe in self.kafka_probes:
                await kafka_probe.start()

        try:
            asyncio.run_coroutine_threadsafe(start_all(), self._loop).result(timeout=15)
        except Exception:
            with contextlib.suppress(Exception):
                self._call(self._stop_all(catch_up_s=0), timeout_s=5)
            self._shutdown()
            raise

    def e2e_latency(self) -> Histogram:
        """A copy of the end-to-end latency so far (taken on the probe's own thread)."""

        async def copy() -> Histogram:
            return self.tracker.e2e_latency.copy()

        return self._call(copy(), timeout_s=5)

    async def _stop_all(self, catch_up_s: float = KAFKA_CATCH_UP_S) -> dict[str, Any]:
        # Records stay in Kafka: read everything written before the end (the devices
        # are done), for every Kafka probe at once, before anything finishes the tracker.
        started = [kafka_probe for kafka_probe in self.kafka_probes if kafka_probe.started]
        if started and catch_up_s > 0:
            caught = await asyncio.gather(
                *(kafka_probe.catch_up(catch_up_s) for kafka_probe in started),
                return_exceptions=True,
            )
            for kafka_probe, done in zip(started, caught, strict=True):
                if done is not True:
                    logger.warning(
                        "the Kafka probe at %s did not read every record within %g s (%s): "
                        "those it did not read are not counted",
                        kafka_probe.bootstrap_servers,
                        catch_up_s,
                        done if isinstance(done, BaseException) else "timed out",
                    )
        summary: dict[str, Any] = {}
        for probe in self.probes:
            summary = await probe.stop()
        for kafka_probe in self.kafka_probes:
            summary = await kafka_probe.stop(catch_up_s=0)
        return summary

    def _call(self, coroutine: Coroutine[Any, Any, T], *, timeout_s: float) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=timeout_s)

    def stop(self) -> dict[str, Any]:
        try:
            summary: dict[str, Any] = self._call(
                self._stop_all(), timeout_s=15 + (KAFKA_CATCH_UP_S if self.kafka_probes else 0)
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
    fleet: int = 0
    """The index of the job's fleet in the run."""


STOP = "stop"
"""The control word that ends a worker's run (anything else on the pipe is an action)."""


def _worker_main(job: _Job, snapshots: Connection, control: Connection) -> None:
    """A worker process: run one shard, sending snapshots to the supervisor.

    Each worker has pipes of its own (snapshots out; the stop word and scenario actions
    in): a worker that is killed mid-write breaks only its own pipe, never a lock the
    others share. A worker reports how many devices each action touched.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    _raise_open_file_limit()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    model = load_model(job.model_path)
    sending = threading.Lock()  # snapshots from the loop, action reports from there too

    def send(item: dict[str, Any]) -> None:
        with sending:
            snapshots.send(item)

    async def main() -> None:
        stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        done = threading.Event()
        # MQTT has the engine's batched path; every other protocol goes through its
        # adapter, a message at a time.
        worker_class = Worker if job.settings.brokers[0].is_mqtt else MessageWorker
        worker = worker_class(
            model,
            job.shard,
            job.settings,
            WallClock(),
            worker_id=job.worker_id,
            on_snapshot=lambda snapshot: send({"final": False, "snapshot": snapshot.to_dict()}),
        )

        def act(label: str, action: DeviceAction) -> None:
            try:
                touched = worker.act(action)
            except IotixError as exc:
                send({"action": label, "error": str(exc)})
            else:
                send({"action": label, "devices": touched})

        def relay() -> None:
            while not done.is_set():
                if not control.poll(0.2):
                    continue
                try:
                    item = control.recv()
                except (EOFError, OSError):
                    item = STOP
                if item == STOP:
                    loop.call_soon_threadsafe(stop_event.set)
                    return
                label, action = item
                loop.call_soon_threadsafe(act, label, action)

        waiter = loop.run_in_executor(None, relay)
        final = await worker.run(stop_event)
        send({"final": True, "snapshot": final.to_dict()})
        done.set()
        await waiter

    asyncio.run(main())


@dataclass(frozen=True)
class FleetPlan:
    """One model's devices in a run."""

    model_path: Path
    devices: int
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """RunSettings fields this fleet has of its own (brokers, username, qos, stages...)."""


def plan_jobs(fleets: Sequence[FleetPlan], settings: RunSettings, workers: int) -> list[_Job]:
    """Shards for every fleet: workers shared in proportion to the fleets' sizes, at
    least one each; worker ids are unique across the run."""
    total = sum(f.devices for f in fleets) or 1
    jobs: list[_Job] = []
    for number, fleet in enumerate(fleets):
        share = max(1, round(workers * fleet.devices / total))
        fleet_settings = replace(settings, **{**fleet.overrides, "devices": fleet.devices})
        for shard in plan_shards(fleet.devices, share):
            jobs.append(_Job(str(fleet.model_path), shard, fleet_settings, len(jobs), number))
    return jobs


class FleetControl:
    """Scenario actions for a running fleet's workers, from any thread.

    :meth:`send` passes an action to the workers of one fleet (or all); before the
    workers exist, actions wait and go out as they start. :attr:`reports` collects,
    per action label, the devices each worker touched, and any error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._supervisor: _Supervisor | None = None
        self._waiting: list[tuple[int | None, str, DeviceAction]] = []
        self.reports: dict[str, dict[str, Any]] = {}

    def send(self, fleet: int | None, label: str, action: DeviceAction) -> None:
        """Have the workers of fleet number ``fleet`` (None: every fleet) do ``action``."""
        with self._lock:
            self.reports.setdefault(label, {"devices": 0, "workers": 0, "errors": []})
            if self._supervisor is None:
                self._waiting.append((fleet, label, action))
            else:
                self._supervisor.send(fleet, (label, action))

    def attach(self, supervisor: _Supervisor | None) -> None:
        with self._lock:
            self._supervisor = supervisor
            waiting, self._waiting = self._waiting, []
            if supervisor is not None:
                for fleet, label, action in waiting:
                    supervisor.send(fleet, (label, action))

    def reported(self, item: Mapping[str, Any]) -> None:
        with self._lock:
            report = self.reports.setdefault(
                item["action"], {"devices": 0, "workers": 0, "errors": []}
            )
            report["workers"] += 1
            if "error" in item:
                report["errors"].append(item["error"])
            else:
                report["devices"] += item["devices"]


def run_fleet(
    fleets: Sequence[FleetPlan],
    settings: RunSettings,
    *,
    workers: int,
    on_snapshot: Callable[[Snapshot], None] | None = None,
    probe_sample: float | None = None,
    on_worker_death: WorkerDeath = "fail",
    stop: threading.Event | None = None,
    control: FleetControl | None = None,
    probe_brokers: Sequence[BrokerEndpoint] | None = None,
    on_probe: Callable[[ProbeThread], None] | None = None,
    on_start: Callable[[], None] | None = None,
    probe_conformance: Callable[[str, bytes], str | None] | None = None,
) -> FleetResult:
    """Run the fleets in about ``workers`` processes until the duration ends, Ctrl-C,
    or ``stop`` is set (then every worker disconnects its devices and reports).

    With ``probe_sample``, a probe on the first broker (or on each of
    ``probe_brokers``: MQTT brokers and Kafka clusters, see :class:`ProbeThread`)
    checks delivery for that fraction of the devices; ``on_probe``
    is given it once it has subscribed. A worker that dies is reported in
    ``worker_errors``; ``probe_conformance`` checks each message the probe tracks
    against the device models. With ``on_worker_death="fail"`` the others are stopped at once,
    with ``"continue"`` they run on to the end. ``control`` passes scenario actions to
    the workers while they run; ``on_start`` is called once the workers are started
    (where a scenario's timeline begins)."""
    probe = None
    if probe_sample is not None:
        endpoints = tuple(probe_brokers or settings.brokers[:1])
        over_kafka = any(endpoint.scheme == "kafka" for endpoint in endpoints)
        probe = ProbeThread(
            endpoints,
            probe_sample,
            settings.tls,
            conformance=probe_conformance,
            kafka_pattern=kafka_probe_pattern(fleets, settings) if over_kafka else None,
        )
        probe.start()
        if on_probe is not None:
            on_probe(probe)
    try:
        result = _run_workers(
            fleets,
            settings,
            workers=workers,
            on_snapshot=on_snapshot,
            on_worker_death=on_worker_death,
            stop=stop,
            control=control,
            on_start=on_start,
        )
    finally:
        summary = probe.stop() if probe is not None else None
    if probe is not None:
        result.probe = summary
        result.snapshot.e2e_latency = probe.tracker.e2e_latency
    return result


WORKER_PRELOAD = ("iotix.engine.fleet", "iotix.model.loader", "numpy", "uvloop", "orjson")
"""Imported once by the fork server, shared by every worker (copy on write)."""


def _worker_context() -> ForkServerContext | SpawnContext:
    """Workers fork from a fork server that has imported iotix, numpy and uvloop: each
    imported them itself before (the spawn method), about 65 MiB a worker, and a 100K
    fleet needs at least six workers. The server starts clean (no threads, no loop),
    so forking from it is as safe as spawning; where it is missing, spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    return context


class _Supervisor:
    """The worker processes of one run, their pipes, and what they reported."""

    def __init__(
        self,
        jobs: list[_Job],
        on_snapshot: Callable[[Snapshot], None] | None,
        control: FleetControl | None = None,
    ) -> None:
        context = _worker_context()
        self.jobs = jobs
        self.on_snapshot = on_snapshot
        self.control = control
        self._sending = threading.Lock()
        self.readers: dict[Connection, int] = {}
        self.controls: list[Connection] = []
        self.processes: list[Any] = []
        self.latest: dict[int, Snapshot] = {}
        self.errors: list[str] = []
        for job in jobs:
            snapshot_out, snapshot_in = context.Pipe(duplex=False)
            control_out, control_in = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker_main,
                args=(job, snapshot_in, control_out),
                name=f"iotix-worker-{job.worker_id}",
                daemon=True,
            )
            process.start()
            # The child's ends, closed here: a child that dies reads as EOF.
            snapshot_in.close()
            control_out.close()
            self.readers[snapshot_out] = job.worker_id
            self.controls.append(control_in)
            self.processes.append(process)

    def collect(self, timeout_s: float) -> None:
        """Take in what the workers sent within ``timeout_s``; notice the dead."""
        for ready in wait(list(self.readers), timeout=timeout_s):
            reader = cast("Connection", ready)
            number = self.readers[reader]
            try:
                item = reader.recv()
            except (EOFError, OSError):
                del self.readers[reader]
                self._died(number)
                continue
            if "action" in item:
                if self.control is not None:
                    self.control.reported(item)
                continue
            snapshot = Snapshot.from_dict(item["snapshot"])
            self.latest[snapshot.worker] = snapshot
            if item["final"]:
                del self.readers[reader]
            if self.on_snapshot is not None:
                self.on_snapshot(Snapshot.merge(list(self.latest.values())))

    def _died(self, number: int) -> None:
        process = self.processes[number]
        process.join(timeout=5)
        job = self.jobs[number]
        self.errors.append(
            f"worker {number} died (exit code {process.exitcode}) without its final "
            f"snapshot; its devices {job.shard.start}-{job.shard.stop - 1} of "
            f"{Path(job.model_path).name} are counted up to its last snapshot"
        )

    def finish(self, timeout_s: float = 30.0) -> None:
        """Stop every worker and take in their final snapshots (at most ``timeout_s``)."""
        self.stop_all()
        deadline = time.monotonic() + timeout_s
        while self.readers and time.monotonic() < deadline:
            with contextlib.suppress(KeyboardInterrupt):
                self.collect(0.5)

    def stop_all(self) -> None:
        self.send(None, STOP)

    def send(self, fleet: int | None, item: Any) -> None:
        """``item`` to the workers of fleet ``fleet`` (None: all) that still run."""
        with self._sending:
            for job, control in zip(self.jobs, self.controls, strict=True):
                if fleet is None or job.fleet == fleet:
                    with contextlib.suppress(OSError):
                        control.send(item)

    def close(self) -> None:
        self.stop_all()
        for process in self.processes:
            process.join(timeout=15)
            if process.is_alive():
                process.kill()

    def merged(self) -> Snapshot:
        if not self.latest:
            return Snapshot(worker=-1, at_s=0.0)
        return Snapshot.merge(list(self.latest.values()))

    def merged_by_fleet(self) -> dict[int, Snapshot]:
        groups: dict[int, list[Snapshot]] = {}
        for worker, snapshot in self.latest.items():
            groups.setdefault(self.jobs[worker].fleet, []).append(snapshot)
        return {fleet: Snapshot.merge(snapshots) for fleet, snapshots in groups.items()}


def _run_workers(
    fleets: Sequence[FleetPlan],
    settings: RunSettings,
    *,
    workers: int,
    on_snapshot: Callable[[Snapshot], None] | None,
    on_worker_death: WorkerDeath,
    stop: threading.Event | None,
    control: FleetControl | None = None,
    on_start: Callable[[], None] | None = None,
) -> FleetResult:
    try:
        supervisor = _Supervisor(plan_jobs(fleets, settings, workers), on_snapshot, control)
    except KeyboardInterrupt:
        # Stopped while the workers started: those started see their pipes close
        # (EOF) and stop by themselves; nothing ran, so there is nothing to count.
        return FleetResult(Snapshot(worker=-1, at_s=0.0), interrupted=True)
    interrupted = False
    try:
        if control is not None:
            control.attach(supervisor)
        if on_start is not None:
            on_start()
        while supervisor.readers:
            supervisor.collect(0.5)
            if (stop is not None and stop.is_set()) or (
                supervisor.errors and on_worker_death == "fail"
            ):
                supervisor.finish()
    except KeyboardInterrupt:
        # Ctrl-C: every worker DISCONNECTs its devices and sends its final snapshot.
        interrupted = True
        supervisor.finish()
    finally:
        if control is not None:
            control.attach(None)
        supervisor.close()
    return FleetResult(
        supervisor.merged(),
        supervisor.errors,
        interrupted,
        by_fleet=supervisor.merged_by_fleet(),
    )
