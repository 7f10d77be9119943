"""A worker: one shard of a fleet, one event loop, MQTT connections to real brokers.

The worker owns a :class:`~iotix.model.runtime.DeviceBatch` for its devices and one
:class:`~iotix.adapters.mqtt.MQTTConnection` per connected device. Its loop asks the
batch for everything due, publishes it on the devices' connections (writes coalesce to
one per connection per loop iteration) and sleeps until the next due time. Devices
connect at a bounded rate with a bounded number of attempts in flight per broker, and
reconnect with capped exponential backoff and full jitter when they lose the broker.

Everything measured goes into :mod:`iotix.metrics` (counters and histograms); the
supervisor merges the workers' snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import math
import random
import re
import string
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

import numpy as np
import orjson

from iotix.adapters.mqtt import MQTTConnectError, MQTTConnection, open_connection
from iotix.adapters.registry import DEFAULT_PORTS, MQTT_SCHEMES, known_schemes
from iotix.adapters.tls import TLSConfigError, TLSContextCache, TLSSettings
from iotix.engine.credentials import Credentials, read_credentials
from iotix.engine.stages import Stage, StagePlan
from iotix.errors import IotixError, MQTTProtocolError
from iotix.metrics import Counters, Histogram, Snapshot
from iotix.model.connection import ConnectionTemplates
from iotix.model.runtime import CommandStatus, DeviceBatch, MessageKind
from iotix.protocols.mqtt.packets import ProtocolVersion, QoS0Frames, Subscription, Will
from iotix.protocols.mqtt.session import (
    DisconnectedEvent,
    MessageReceivedEvent,
    MQTTClientSession,
    PublishAckedEvent,
    SessionSettings,
    reason_name,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    import numpy.typing as npt

    from iotix.clock import Clock
    from iotix.model.loader import LoadedModel
    from iotix.model.runtime import Emission
    from iotix.protocols.mqtt.session import Event

logger = logging.getLogger(__name__)

DEFAULT_WEBSOCKET_PATH = "/mqtt"


class RunConfigError(IotixError):
    """A run's settings are unusable (a broker URL that does not parse, say)."""


@dataclass(frozen=True)
class BrokerEndpoint:
    """Where devices connect: an MQTT broker (``mqtt``, ``mqtts``, ``ws``, ``wss``), or
    the endpoint of another protocol's adapter (``http``, ``coap``, ``kafka``, a
    plugin's scheme), with its ``path`` (an HTTP base path, say)."""

    host: str
    port: int
    tls: bool = False
    websocket_path: str | None = None
    """MQTT over WebSockets at this path (``ws://``, ``wss://``); None: plain TCP."""
    scheme: str = "mqtt"
    """The URL scheme; MQTT endpoints say ``mqtt`` whatever their transport."""
    path: str = ""
    """The path of a non-MQTT endpoint's URL (``/ingest`` of ``http://h:80/ingest``)."""

    @property
    def is_mqtt(self) -> bool:
        return self.scheme == "mqtt"

    def __str__(self) -> str:
        if not self.is_mqtt:
            return f"{self.scheme}://{self.host}:{self.port}{self.path}"
        if self.websocket_path is not None:
            scheme = "wss" if self.tls else "ws"
            return f"{scheme}://{self.host}:{self.port}{self.websocket_path}"
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_brokers(text: str) -> tuple[BrokerEndpoint, ...]:
    """``mqtt://host:port[,host:port...]`` into endpoints: ``mqtts://`` for TLS,
    ``ws://host:port/path`` and ``wss://`` for MQTT over WebSockets (path ``/mqtt`` by
    default); ``http(s)://``, ``coap://``, ``kafka://`` or a plugin's scheme for the
    other protocols' adapters (see :mod:`iotix.adapters.registry`)."""
    scheme = "mqtt"
    if "://" in text:
        scheme, _, text = text.partition("://")
    if scheme not in MQTT_SCHEMES and scheme not in known_schemes():
        raise RunConfigError(
            f"unsupported broker scheme {scheme!r}; use one of "
            + ", ".join(f"{known}://" for known in known_schemes())
        )
    mqtt = scheme in MQTT_SCHEMES
    websocket = scheme in ("ws", "wss")
    endpoints = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        parsed = urlsplit(f"//{part}")
        try:
            port = parsed.port or DEFAULT_PORTS.get(scheme)
        except ValueError as exc:
            raise RunConfigError(f"bad port in broker address {part!r}") from exc
        if port is None:
            raise RunConfigError(f"{scheme}:// has no default port: write {scheme}://host:port")
        if not parsed.hostname:
            raise RunConfigError(f"no host in broker address {part!r}")
        if parsed.query or parsed.fragment:
            raise RunConfigError(f"a broker address has no query or fragment: {part!r}")
        if parsed.path and mqtt and not websocket:
            raise RunConfigError(
                f"a path in broker address {part!r} needs ws:// or wss:// (MQTT over WebSockets)"
            )
        if mqtt:
            endpoints.append(
                BrokerEndpoint(
                    parsed.hostname,
                    port,
                    tls=scheme in ("mqtts", "wss"),
                    websocket_path=(parsed.path or DEFAULT_WEBSOCKET_PATH) if websocket else None,
                )
            )
        else:
            endpoints.append(
                BrokerEndpoint(
                    parsed.hostname,
                    port,
                    tls=scheme.endswith("s") and scheme in ("https", "coaps"),
                    scheme=scheme,
                    path=parsed.path.rstrip("/"),
                )
            )
    if not endpoints:
        raise RunConfigError("no broker address given")
    if len({e.scheme for e in endpoints}) > 1:  # pragma: no cover - one scheme per text
        raise RunConfigError("one broker address has one scheme")
    return tuple(endpoints)


PORTS_PER_SOURCE = 25_000
"""Connections one source address takes to one endpoint (Linux's ephemeral ports are
32768-60999, about 28K; some are left for everything else)."""


def default_source_addresses(brokers: Sequence[BrokerEndpoint], devices: int) -> tuple[str, ...]:
    """Source addresses a fleet needs by default: none (the kernel picks) unless every
    broker is on the loopback network and one endpoint would take more connections than
    one address has ports for; then 127.0.1.1, 127.0.1.2, ... (all of 127.0.0.0/8 is
    local, no set-up needed)."""
    per_endpoint = math.ceil(devices / len(brokers)) if brokers else 0
    if per_endpoint <= PORTS_PER_SOURCE or not all(_is_loopback(b.host) for b in brokers):
        return ()
    count = math.ceil(per_endpoint / PORTS_PER_SOURCE)
    return tuple(str(ipaddress.IPv4Address("127.0.1.0") + n) for n in range(1, count + 1))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RunSettings:
    """How a fleet runs (the model says what its devices do)."""

    devices: int
    brokers: tuple[BrokerEndpoint, ...]
    seed: int = 0
    duration_s: float | None = None
    connect_rate_hz: float = 1_000.0
    connect_concurrency: int = 64
    """Connection attempts in flight per broker endpoint (Mosquitto's backlog is 100)."""
    qos: int | None = None
    """Override the model's QoS for every message."""
    version: ProtocolVersion = ProtocolVersion.V311
    keepalive_s: int = 60
    clean_start: bool = True
    username: str | None = None
    password: str | None = None
    source_addresses: tuple[str, ...] = ()
    max_inflight: int = 20
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    snapshot_interval_s: float = 1.0
    tick_s: float = 0.02
    """Shortest sleep between send rounds: messages due within one tick go out
    together (one sampling round, one write per connection). Schedule lag shows it."""
    max_tick_s: float = 0.1
    """Longest: a worker whose rounds are costly yet carry few messages (many devices
    sending rarely) lengthens its tick up to this (see ROUND_COST_SHARE)."""
    tls: TLSSettings | None = None
    """TLS for ``mqtts://`` endpoints (default: verify against the system store)."""
    stages: tuple[Stage, ...] = ()
    """How many devices should be connected when (ramp up, hold, ramp down); none:
    every device, from the start."""
    fleet: str | None = None
    """The fleet's name, which state counts go by (default: the model's name)."""
    adapter_options: Mapping[str, Any] = field(default_factory=dict)
    """A non-MQTT adapter's own settings (HTTP method and headers, CoAP confirmable...)."""
    adapter_timeout_s: float = 10.0
    """How long a non-MQTT adapter waits for a confirmation (an HTTP response...)."""
    adapter_retries: int = 0
    """How many times a non-MQTT message that was not confirmed is sent again."""
    credentials_file: str | None = None
    """A CSV file of per-device user names and passwords (see
    :mod:`iotix.engine.credentials`); they replace ``username`` and ``password``."""


SHARE_BUCKETS = 1 << 32


def in_share(indices: npt.ArrayLike, share: float, seed: int) -> npt.NDArray[np.bool_]:
    """Which of the devices ``indices`` a share (0 to 1) of a fleet picks: a device is
    in when a hash of (seed, index) falls below the share. Deterministic for a seed,
    independent of the worker layout, and nested: the devices of 10 % are among those
    of 50 %. Scenario actions and their commands pick devices with it."""
    limit = share * SHARE_BUCKETS
    return np.fromiter(
        (zlib.crc32(f"{seed}:{int(index)}".encode()) < limit for index in np.asarray(indices)),
        dtype=bool,
    )


@dataclass(frozen=True)
class DeviceAction:
    """Something a scenario does to a share of a fleet's devices, mid-run.

    - ``disconnect``: close their connections (``clean``: with DISCONNECT, so the
      broker drops their wills); they stay offline ``offline_s`` (sending nothing),
      then reconnect; with 0, they reconnect at once with backoff, as after a drop.
    - ``reconnect_storm``: drop their connections and reconnect at once, no backoff.
    - ``set``: give ``field`` (a constant, counter or random walk) the value ``value``.
    """

    kind: Literal["disconnect", "reconnect_storm", "set"]
    share: float = 1.0
    offline_s: float = 0.0
    clean: bool = False
    field: str | None = None
    value: Any = None


@dataclass(slots=True)
class _Device:
    """One device's connection state. It is its connection's event handler and close
    callback itself: a closure per device would cost a few hundred bytes each."""

    worker: Worker
    row: int
    session: MQTTClientSession | None = None
    connection: MQTTConnection | None = None
    wanted: bool = False
    """Whether the stages want it connected now (always, without stages)."""
    attempts: int = 0
    down_at: float = -1.0
    """When its connection was lost, while it is away (for ``reconnect_time``)."""
    storm: bool = False
    """A reconnect storm dropped it: it reconnects at once, no backoff."""
    sent_at: dict[int, tuple[float, float, int]] | None = None
    """Packet id -> (sent at, due at, QoS) of each publish awaiting its ack."""

    def __call__(self, event: Event) -> None:
        self.worker._on_event(self, event)  # noqa: SLF001 - the worker's own device

    def closed(self) -> None:
        self.worker._down(self)  # noqa: SLF001

    def awaiting_ack(self, packet_id: int, sent_s: float, due_s: float, qos: int) -> None:
        if self.sent_at is None:
            self.sent_at = {}
        self.sent_at[packet_id] = (sent_s, due_s, qos)


GC_YOUNG_THRESHOLD = 50_000
"""Allocations between young collections while a worker runs (Python's default: 700)."""


@contextlib.contextmanager
def _collected_rarely() -> Iterator[None]:
    """Tune the cyclic garbage collector for a worker's many long-lived objects.

    Every connection leaves a few dozen container objects alive (session, futures,
    protocol, task); at the default thresholds the collector keeps walking them while
    devices connect, which cost a third of the connection rate
    (``bench/mqtt_connect_rate.py``). What exists before the run (the model, the batch)
    is frozen out of collections, and young collections come every
    :data:`GC_YOUNG_THRESHOLD` allocations. Restored afterwards.
    """
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, thresholds[1], thresholds[2])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


STAGE_REVIEW_S = 0.1
"""How often the ramp looks at the stages' target (a whole-shard numpy step)."""

ROUND_COST_SHARE = 0.02
"""A send round of few messages may take this share of the time at most: a shard whose
rounds cost 1 ms (a numpy sampling round, whatever few messages are due) waits 50 ms
between them, one of a few devices (0.1 ms) the minimum tick."""
BUSY_ROUND = 512
"""A round with more messages than this is busy: the tick shrinks back to ``tick_s``."""


def _next_tick(tick: float, messages: int, cost_s: float, settings: RunSettings) -> float:
    """The tick after a round of ``messages`` that took ``cost_s`` seconds."""
    if messages > BUSY_ROUND:
        return max(tick * 0.8, settings.tick_s)
    longest = max(settings.max_tick_s, settings.tick_s)
    wanted = min(max(cost_s / ROUND_COST_SHARE, settings.tick_s), longest)
    return tick + (wanted - tick) * 0.25  # smoothed: one slow round is no trend


class Doze:
    """A send loop's sleep until its next due message, which :meth:`nudge` cuts short (a
    command queued a reply that is due sooner, or the run stops)."""

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: asyncio.Future[None] | None = None

    async def sleep(self, delay_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiting = waiting = loop.create_future()
        timer = loop.call_later(max(delay_s, 0.0), _wake, waiting)
        try:
            await waiting
        finally:
            timer.cancel()
            self._waiting = None

    def nudge(self) -> None:
        if self._waiting is not None:
            _wake(self._waiting)


def _wake(waiting: asyncio.Future[None]) -> None:
    if not waiting.done():
        waiting.set_result(None)


def _command_pattern(template: str) -> tuple[str, re.Pattern[str]]:
    """The subscription filter for a command topic template, and a regex that pulls
    the command's name out of a topic it matches."""
    parts = []
    regex = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        parts.append(literal)
        regex.append(re.escape(literal))
        if name is None:
            continue
        if name == "command":
            parts.append("+")
            regex.append(r"(?P<command>[^/]+)")
        else:  # rendered per device, as written (a format spec such as :05d included)
            parts.append(
                "{"
                + name
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            regex.append(r"[^/]+")
    return "".join(parts), re.compile("".join(regex) + "$")


class Shard(Protocol):
    """What a snapshot is made of: a worker's figures (the MQTT worker's and the
    adapters' :class:`~iotix.engine.message_worker.MessageWorker`)."""

    worker_id: int
    clock: Clock
    settings: RunSettings
    model: LoadedModel
    batch: DeviceBatch
    connected: int
    counters: Counters
    connect_latency: Histogram
    ack_latency: Histogram
    e2e_latency: Histogram
    schedule_lag: Histogram
    intended_latency: Histogram
    reconnect_time: Histogram

    @property
    def connected_at_stop(self) -> int | None: ...


def shard_snapshot(shard: Shard) -> Snapshot:
    """A worker's snapshot. Its final one counts the devices connected when the run
    stopped (``connected_at_stop``), not after the disconnects that end every run."""
    fleet = shard.settings.fleet or shard.model.spec.name
    now, reached = shard.batch.state_counts()
    at_stop = shard.connected_at_stop
    return Snapshot(
        worker=shard.worker_id,
        at_s=shard.clock.now_s(),
        devices_connected=shard.connected if at_stop is None else at_stop,
        counters=shard.counters,
        connect_latency=shard.connect_latency,
        ack_latency=shard.ack_latency,
        e2e_latency=shard.e2e_latency,
        schedule_lag=shard.schedule_lag,
        intended_latency=shard.intended_latency,
        reconnect_time=shard.reconnect_time,
        states={f"{fleet}/{state}": count for state, count in now.items()},
        states_reached={f"{fleet}/{state}": count for state, count in reached.items()},
    )


class Worker:
    """One shard: devices ``indices`` of ``model``."""

    def __init__(
        self,
        model: LoadedModel,
        indices: Sequence[int],
        settings: RunSettings,
        clock: Clock,
        *,
        worker_id: int = 0,
        on_snapshot: Callable[[Snapshot], None] | None = None,
        on_connected: Callable[[int, float], None] | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.clock = clock
        self.worker_id = worker_id
        self.batch = DeviceBatch(
            model.spec,
            indices=list(indices),
            seed=settings.seed,
            start_epoch_s=clock.start_epoch_s,
            base_dir=model.base_dir,
        )
        self.first_index = int(self.batch.indices[0]) if self.batch.size else 0
        # A device sends only while connected: messages due before are not made at all.
        self.batch.paused[:] = True
        self.devices = [_Device(self, row) for row in range(self.batch.size)]
        self.counters = Counters()
        self.connect_latency = Histogram()
        self.ack_latency = Histogram()
        self.intended_latency = Histogram()
        self.schedule_lag = Histogram()
        self.e2e_latency = Histogram()
        self.reconnect_time = Histogram()
        self.connected = 0
        self._on_snapshot = on_snapshot
        self._on_connected = on_connected
        self._random = random.Random(f"{settings.seed}:worker:{worker_id}")  # noqa: S311 - jitter
        self._stopping = False
        self._connected_at_stop = 0
        self._doze = Doze()
        self._rebooting: list[_Device] = []
        self._wheel: dict[int, list[MQTTConnection]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._endpoint_slots = [
            asyncio.Semaphore(settings.connect_concurrency) for _ in settings.brokers
        ]
        commands = model.spec.commands
        self._commands = None if commands is None else _command_pattern(commands.topic)
        self._frames = QoS0Frames(settings.version)
        self._connection = ConnectionTemplates(model.spec)
        self._plan = StagePlan(settings.stages, settings.devices) if settings.stages else None
        self._topics: dict[tuple[MessageKind, str], list[bytes | None]] = {}
        uses_tls = any(endpoint.tls for endpoint in settings.brokers)
        self._tls = TLSContextCache(settings.tls or TLSSettings()) if uses_tls else None
        self._credentials: Credentials | None = None
        if settings.credentials_file is not None:
            self._credentials = read_credentials(
                Path(settings.credentials_file), keep=[int(i) for i in self.batch.indices]
            )

    @property
    def connected_at_stop(self) -> int | None:
        """Devices connected when the run stopped; None while it runs."""
        return self._connected_at_stop if self._stopping else None

    # --- the run --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> Snapshot:
        """Connect the devices, send until ``duration_s`` or ``stop``, then disconnect
        them all and return the final snapshot."""
        stop = stop or asyncio.Event()
        settings = self.settings
        deadline = None if settings.duration_s is None else self.clock.now_s() + settings.duration_s
        name = f"worker-{self.worker_id}"
        with _collected_rarely():
            return await self._run(stop, deadline, name)

    async def _run(self, stop: asyncio.Event, deadline: float | None, name: str) -> Snapshot:
        settings = self.settings
        helpers = [
            asyncio.create_task(self._ramp(), name=f"{name}-ramp"),
            asyncio.create_task(self._report(), name=f"{name}-report"),
            asyncio.create_task(self._keepalive(), name=f"{name}-keepalive"),
            asyncio.create_task(self._relay(stop), name=f"{name}-stop"),
        ]
        tick = settings.tick_s
        try:
            while not stop.is_set():
                now = self.clock.now_s()
                if deadline is not None and now >= deadline:
                    break
                began = time.perf_counter()
                emissions = self.batch.advance_emissions(now)
                self._send(emissions)
                if self._rebooting:
                    self._reboot()
                messages = sum(len(e.rows) for e in emissions)
                tick = _next_tick(tick, messages, time.perf_counter() - began, settings)
                # At least one tick between rounds: a round per distinct due time would
                # cost a numpy round and a write per message at ordinary rates.
                wake = max(min(self.batch.next_due_s(), now + 0.25), now + tick)
                if deadline is not None:
                    wake = min(wake, deadline)
                # Sleep until the next due message, unless a command queued a reply or
                # the run is stopped first (see _nudge).
                await self._doze.sleep(wake - self.clock.now_s())
        finally:
            self._stopping = True
            self._connected_at_stop = self.connected
            for task in [*helpers, *self._tasks]:
                task.cancel()
            await asyncio.gather(*helpers, *self._tasks, return_exceptions=True)
            await self._disconnect_all()
        snapshot = self.snapshot()
        if self._on_snapshot is not None:
            self._on_snapshot(snapshot)
        return snapshot

    def snapshot(self) -> Snapshot:
        return shard_snapshot(self)

    def act(self, action: DeviceAction) -> int:
        """Apply a scenario action to this shard's devices in its share; returns how
        many devices it touched (connected ones for a disconnect or a storm)."""
        rows = np.flatnonzero(in_share(self.batch.indices, action.share, self.settings.seed))
        if action.kind == "set":
            if action.field is None:
                raise ValueError("a set action names a field")
            self.batch.set_field(action.field, rows, action.value)
            return len(rows)
        now = self.clock.now_s()
        touched = 0
        for row in rows.tolist():
            device = self.devices[row]
            connection = device.connection
            if connection is None or connection.closed:
                continue
            touched += 1
            if action.kind == "reconnect_storm":
                device.storm = True
                connection.drop()
                continue
            if action.offline_s > 0:
                self.batch.offline_until_s[row] = now + action.offline_s
            if action.clean:
                self._spawn(connection.disconnect(), f"disconnect-{row}")
            else:
                connection.drop()
        return touched

    def _keep_alive_at(self, connection: MQTTConnection, at_s: float) -> None:
        """Put a connection on the keepalive wheel for the second after ``at_s``."""
        self._wheel.setdefault(math.ceil(at_s), []).append(connection)

    async def _keepalive(self) -> None:
        """One wheel of one-second slots keeps every connection alive: each connection
        is visited when its keepalive falls due (PINGREQ after ``keepalive_s`` without
        sending), not polled, and a closed one simply drops off."""
        loop = asyncio.get_running_loop()
        second = math.floor(loop.time())
        wheel = self._wheel
        while True:
            await asyncio.sleep(max(second + 1 - loop.time(), 0.0))
            now = loop.time()
            while second <= now:
                for connection in wheel.pop(second, ()):
                    at = connection.keepalive(now)
                    if at is not None:
                        wheel.setdefault(max(math.ceil(at), second + 1), []).append(connection)
                second += 1

    async def _relay(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._nudge()

    def _nudge(self) -> None:
        """End the send loop's sleep now (a reply is due, or the run stops)."""
        self._doze.nudge()

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval_s)
            if self._on_snapshot is not None:
                self._on_snapshot(self.snapshot())

    # --- sending --------------------------------------------------------------------

    def _send(self, emissions: list[Emission]) -> None:
        """Hand one round of emissions to the connections: QoS 0 as pre-encoded packets
        gathered per connection (one write each), QoS 1 and 2 through the session's
        in-flight window. Counters and the lag histogram are updated per emission."""
        now = self.clock.now_s()
        qos_override = self.settings.qos
        gathered: dict[int, list[bytes]] = {}
        for emission in emissions:
            qos = emission.qos if qos_override is None else qos_override
            if qos == 0:
                skipped = self._gather(emission, gathered)
            else:
                skipped = self._publish_acked(emission, qos, now)
            self._account(emission, qos, now, skipped)
        devices = self.devices
        unsent = 0
        for row, packets in gathered.items():
            connection = devices[row].connection
            if connection is None or not connection.publish_encoded(b"".join(packets)):
                unsent += len(packets) // 3
        if unsent:
            # Closed between gathering and writing: counted as sent, then failed.
            self.counters.count_failed(0, unsent)
            self.counters.count_error("not sent: connection closed", unsent)

    def _gather(self, emission: Emission, gathered: dict[int, list[bytes]]) -> list[int]:
        """Append the QoS 0 packets of an emission to each device's list (header, topic,
        payload: three items per message); return the positions not sent."""
        devices = self.devices
        frames = self._frames
        headers = frames.headers(retain=emission.retain)
        table_size = frames.TABLE_SIZE
        parts = self._topic_parts(emission)
        pick = gathered.get
        skipped: list[int] = []
        for position, (row, payload) in enumerate(
            zip(emission.rows, emission.payloads, strict=True)
        ):
            connection = devices[row].connection
            if connection is None or not connection.writable:
                self._unwritable(connection)
                skipped.append(position)
                continue
            part = parts[row] if parts is not None else None
            if part is None:
                part = self._topic_part(emission, position, parts)
                if part is None:
                    skipped.append(position)
                    continue
            size = len(part) + len(payload)
            header = headers[size] if size < table_size else self._big_header(emission, size)
            if header is None:
                skipped.append(position)
                continue
            packets = pick(row)
            if packets is None:
                gathered[row] = [header, part, payload]
            else:
                packets += (header, part, payload)
        return skipped

    def _unwritable(self, connection: MQTTConnection | None) -> None:
        if connection is None or connection.closed:
            # The device is between connections: a real one would not send either.
            self.counters.count_error("not sent: device not connected")
        else:
            # TCP pushes back (the broker reads slower than the devices send): like a
            # device whose socket buffer is full, the message is dropped, and said so.
            self.counters.count_error("not sent: connection backed up")

    def _topic_parts(self, emission: Emission) -> list[bytes | None] | None:
        """The encoded topic of each device for an outlet's emissions (a telemetry
        message or an event has one topic per device); None for replies, whose topic
        changes with the command."""
        if emission.kind is MessageKind.REPLY:
            return None
        key = (emission.kind, emission.name)
        parts = self._topics.get(key)
        if parts is None:
            parts = self._topics[key] = [None] * self.batch.size
        return parts

    def _topic_part(
        self, emission: Emission, position: int, parts: list[bytes | None] | None
    ) -> bytes | None:
        """Encode (and check) a topic the first time a device sends on it."""
        try:
            part = self._frames.topic_part(emission.topics[position])
        except MQTTProtocolError as exc:
            self.counters.count_error(f"not sent: bad topic ({exc})")
            return None
        if parts is not None:
            parts[emission.rows[position]] = part
        return part

    def _big_header(self, emission: Emission, size: int) -> bytes | None:
        try:
            return self._frames.header(size, retain=emission.retain)
        except MQTTProtocolError:
            self.counters.count_error("not sent: payload too large for MQTT")
            return None

    def _publish_acked(self, emission: Emission, qos: int, now: float) -> list[int]:
        """QoS 1 and 2: one session publish per message, its send time kept for the ack."""
        devices = self.devices
        skipped: list[int] = []
        for position, (row, topic, payload, due) in enumerate(
            zip(
                emission.rows,
                emission.topics,
                emission.payloads,
                emission.due_s.tolist(),
                strict=True,
            )
        ):
            device = devices[row]
            connection = device.connection
            if connection is None or connection.closed:
                self.counters.count_error("not sent: device not connected")
                skipped.append(position)
                continue
            try:
                packet_id = connection.publish(topic, payload, qos=qos, retain=emission.retain)
            except MQTTProtocolError:
                self.counters.count_error("not sent: payload too large for MQTT")
                skipped.append(position)
                continue
            if packet_id is not None:
                device.awaiting_ack(packet_id, now, due, qos)
        return skipped

    def _account(self, emission: Emission, qos: int, now: float, skipped: list[int]) -> None:
        payloads = emission.payloads
        due = emission.due_s
        if skipped:
            sent = np.ones(len(payloads), dtype=bool)
            sent[skipped] = False
            due = due[sent]
            payloads = [p for p, keep in zip(payloads, sent.tolist(), strict=True) if keep]
        if payloads:
            self.counters.count_sent(qos, sum(map(len, payloads)), len(payloads))
            self.schedule_lag.record_many(np.maximum(now - due, 0.0))

    # --- connections ----------------------------------------------------------------

    async def _ramp(self) -> None:
        """Connect the devices the stages want (all of them without stages) at no more
        than ``connect_rate_hz``, and disconnect those a ramp down retires.

        The stages follow the run's clock; the pacing of new connections follows the
        event loop's (a socket's time, whatever clock the devices run on)."""
        clock = self.clock
        loop = asyncio.get_running_loop()
        start = clock.now_s()
        interval = 1.0 / self.settings.connect_rate_hz
        plan = self._plan
        wanted = np.zeros(self.batch.size, dtype=bool)
        queue: deque[_Device] = deque()
        slot = loop.time()  # when the next connection may start
        review = slot  # when to look at the stages again
        while True:
            now = loop.time()
            if now >= review:
                # Stages move in steps of STAGE_REVIEW_S; without them, all at once.
                target = (
                    self.batch.indices < plan.target_at(clock.now_s() - start)
                    if plan is not None
                    else np.ones(self.batch.size, dtype=bool)
                )
                for row in np.flatnonzero(wanted & ~target).tolist():
                    self._retire(self.devices[row])
                if not queue:
                    slot = max(slot, now)  # no burst to make up for an idle spell
                for row in np.flatnonzero(target & ~wanted).tolist():
                    device = self.devices[row]
                    device.wanted = True
                    if device.connection is None:
                        queue.append(device)
                wanted = target
                review = now + STAGE_REVIEW_S if plan is not None else math.inf
            while queue and slot <= now:
                device = queue.popleft()
                if device.wanted and device.connection is None:
                    self._spawn(self._connect(device), f"connect-{device.row}")
                slot += interval
            if plan is None and not queue:
                return
            wake = min(slot if queue else math.inf, review)
            await asyncio.sleep(max(wake - loop.time(), 0.0))

    def _retire(self, device: _Device) -> None:
        """A ramp down: DISCONNECT (the broker then drops the will) and stay away."""
        device.wanted = False
        if device.connection is not None and not device.connection.closed:
            self._spawn(device.connection.disconnect(), f"retire-{device.row}")

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _session_settings(self, device: _Device) -> SessionSettings:
        settings = self.settings
        index = self.first_index + device.row
        device_id = self.batch.device_ids[device.row]

        def fill(template: str | None) -> str | None:
            return None if template is None else template.format(device_id=device_id, index=index)

        username, password = fill(settings.username), fill(settings.password)
        if self._credentials is not None:
            found = self._credentials.for_device(device_id, index)
            username, password = found if found is not None else (None, None)
        will = self._connection.will(self.batch, device.row)
        return SessionSettings(
            client_id=device_id,
            version=settings.version,
            keepalive_s=settings.keepalive_s,
            clean_start=settings.clean_start,
            username=username,
            password=None if password is None else password.encode(),
            will=None if will is None else Will(will.topic, will.payload, will.qos, will.retain),
            max_inflight=settings.max_inflight,
        )

    async def _connect(self, device: _Device) -> None:
        """One device's connection: open it, live while it stays up, then come back."""
        if not device.wanted or self._stopping:
            return
        connection = await self._open(device)
        if connection is None:
            return
        self._up(device, connection)
        # No task waits for the connection to close: a callback does, and the
        # keepalive wheel keeps it alive (a task and a timer per device cost 3 KB).
        connection.add_close_callback(device.closed)
        self._keep_alive_at(connection, asyncio.get_running_loop().time())
        if self._commands is not None:
            topic_filter = self.batch.render(self._commands[0], device.row)
            with contextlib.suppress(MQTTConnectError):  # lost first: _down ran
                await connection.subscribe([Subscription(topic_filter, qos=1)])
        self._birth(device, connection)
        if self._on_connected is not None and not connection.closed:
            self._on_connected(device.row, self.clock.now_s())  # ready for commands too

    async def _open(self, device: _Device) -> MQTTConnection | None:
        """One attempt; None when it failed (a retry is then scheduled if it may help)."""
        settings = self.settings
        index = self.first_index + device.row
        slot = index % len(settings.brokers)
        endpoint = settings.brokers[slot]
        sources = settings.source_addresses
        counters = self.counters
        async with self._endpoint_slots[slot]:
            counters.connect_attempts += 1
            started = self.clock.now_s()
            try:
                context = None
                if endpoint.tls and self._tls is not None:
                    context = self._tls.context_for(self.batch.device_ids[device.row], index)
                connection = await open_connection(
                    endpoint.host,
                    endpoint.port,
                    self._session_settings(device),
                    on_event=device,
                    local_address=sources[index % len(sources)] if sources else None,
                    session=device.session,
                    ssl_context=context,
                    server_hostname=settings.tls.server_hostname if settings.tls else None,
                    websocket_path=endpoint.websocket_path,
                    keepalive_timer=False,
                )
            except TLSConfigError as exc:
                # A device's own certificate is missing or broken: retrying will not help.
                counters.count_connect_failure(f"TLS setup: {exc.field}")
                return None
            except MQTTConnectError as exc:
                counters.count_connect_failure(exc.kind)
                self._reconnect_later(device)
                return None
        self.connect_latency.record(self.clock.now_s() - started)
        if not device.wanted:  # retired by a ramp down while it connected
            self._spawn(connection.disconnect(), f"retire-{device.row}")
        return connection

    def _birth(self, device: _Device, connection: MQTTConnection) -> None:
        """Publish the model's birth message, if it has one, on every new connection."""
        birth = self._connection.birth(self.batch, device.row)
        if birth is None or connection.closed:
            return
        now = self.clock.now_s()
        packet_id = connection.publish(
            birth.topic, birth.payload, qos=birth.qos, retain=birth.retain
        )
        self.counters.count_sent(birth.qos, len(birth.payload))
        self.schedule_lag.record(0.0)
        if packet_id is not None:
            device.awaiting_ack(packet_id, now, now, birth.qos)

    def _up(self, device: _Device, connection: MQTTConnection) -> None:
        counters = self.counters
        counters.connects += 1
        if device.attempts:
            counters.reconnects += 1
        if device.down_at >= 0:
            self.reconnect_time.record(self.clock.now_s() - device.down_at)
            device.down_at = -1.0
        device.attempts = 0
        device.connection = connection
        device.session = connection.session
        self.batch.paused[device.row] = False
        self.connected += 1

    def _down(self, device: _Device) -> None:
        self.connected -= 1
        self.batch.paused[device.row] = True
        why = device.connection.close_reason if device.connection is not None else None
        device.connection = None
        if self.settings.clean_start:
            self._fail_unacked(device, why)  # a clean session will not send them again
        if self._stopping or not device.wanted:
            return
        self.counters.disconnects += 1
        now = self.clock.now_s()
        device.down_at = now
        back_at = float(self.batch.offline_until_s[device.row])
        if device.storm:
            device.storm = False
            device.attempts = 1
            self._spawn(self._connect(device), f"storm-{device.row}")
        elif back_at > now:
            # A reboot: the device comes back when its offline time is over.
            device.attempts = 1
            self._spawn(self._connect_at(device, back_at), f"reboot-{device.row}")
        else:
            self._reconnect_later(device)

    async def _connect_at(self, device: _Device, at_s: float) -> None:
        await asyncio.sleep(max(at_s - self.clock.now_s(), 0.0))
        if device.connection is None:  # a ramp may have brought it back meanwhile
            await self._connect(device)

    def _reboot(self) -> None:
        """Drop the connections of devices a command sent offline (``offline_s``), after
        this round wrote their replies: no DISCONNECT, so the broker sends their will."""
        for device in self._rebooting:
            if device.connection is not None:
                device.connection.drop()
        self._rebooting.clear()

    def _fail_unacked(self, device: _Device, why: str | None = None) -> None:
        """Count what awaits an ack as failed; when the broker or the network ended the
        connection, also as the error ``not acknowledged: WHY`` (the connection's
        ``close_reason``), one per message."""
        if device.sent_at:
            for _, _, qos in device.sent_at.values():
                self.counters.count_failed(qos)
            if why:
                self.counters.count_error(f"not acknowledged: {why}", len(device.sent_at))
            device.sent_at.clear()

    def _reconnect_later(self, device: _Device) -> None:
        if self._stopping:
            return
        device.attempts += 1
        settings = self.settings
        # Capped exponential backoff with full jitter: devices dropped together do not
        # come back together.
        ceiling = min(
            settings.reconnect_max_s, settings.reconnect_min_s * 2 ** (device.attempts - 1)
        )
        at_s = self.clock.now_s() + self._random.uniform(0, ceiling)
        self._spawn(self._connect_at(device, at_s), f"reconnect-{device.row}")

    async def _disconnect_all(self) -> None:
        """DISCONNECT every device; what is still unacknowledged then counts as failed,
        so the counters reconcile with nothing left in flight."""
        closing = [
            device.connection.disconnect()
            for device in self.devices
            if device.connection is not None and not device.connection.closed
        ]
        if closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 10.0)
        for device in self.devices:
            self._fail_unacked(device)

    # --- events ---------------------------------------------------------------------

    def _on_event(self, device: _Device, event: Event) -> None:
        counters = self.counters
        if isinstance(event, PublishAckedEvent):
            sent = None if device.sent_at is None else device.sent_at.pop(event.packet_id, None)
            if event.reason_code >= 0x80:
                counters.count_failed(event.qos)
                counters.count_error(f"publish refused: {reason_name(event.reason_code)}")
            else:
                counters.count_acked(event.qos)
            if sent is not None and event.reason_code < 0x80:
                now = self.clock.now_s()
                self.ack_latency.record(now - sent[0])
                self.intended_latency.record(now - sent[1])
        elif isinstance(event, MessageReceivedEvent):
            counters.count_received(len(event.payload))
            self._command(device, event)
        elif isinstance(event, DisconnectedEvent) and event.by_server:
            counters.count_error(f"server disconnect: {reason_name(event.reason_code)}")

    def _command(self, device: _Device, event: MessageReceivedEvent) -> None:
        if self._commands is None:
            return
        match = self._commands[1].match(event.topic)
        if match is None:
            return
        counters = self.counters
        if event.retain:
            # Only a message the broker kept and hands over on subscribing comes with
            # retain set (a live one arrives without it): an old command, not one for now.
            counters.count_error("command ignored: retained")
            return
        counters.commands_received += 1
        try:
            payload = orjson.loads(event.payload) if event.payload else {}
        except orjson.JSONDecodeError:
            payload = {"raw": event.payload.decode("utf-8", "replace")}
        now = self.clock.now_s()
        try:
            status = self.batch.handle_command(device.row, match["command"], payload, now)
            self._nudge()  # its reply may be due sooner than the loop would wake
            if self.batch.offline_until_s[device.row] > now:
                self._rebooting.append(device)
        except IotixError as exc:
            counters.count_error(f"command failed: {type(exc).__name__}")
            return
        if status is CommandStatus.OFFLINE:
            counters.count_error("command ignored: device offline")
            return  # an offline device does not answer
        counters.commands_answered += 1
