"""MQTT at scale: a whole fleet held on this machine, against a raw client in the same run.

Issue 3's target: 100,000 concurrent MQTT devices of a realistic model on this 2-core,
24 GiB machine, against six or more local Mosquitto instances, each device publishing
JSON telemetry every 10 s and keeping alive, held for at least 2 minutes: all connected
within 20 s; schedule lag p99 at most 250 ms; client memory at most 6 KiB per device
(resident memory of all workers divided by devices); client CPU during the hold at most
40 % of one core; every message accounted for (what the brokers received equals what
was sent).

One command runs the whole measurement:

brokers
    ``--brokers`` Mosquittos (6; more if a broker would hold over 18,000 connections:
    each process has 20,000 open files at most), started on free ports by
    :class:`~iotix.testing.MosquittoBroker` (no persistence, ``max_connections -1``),
    with ``sys_interval 1`` so that each broker publishes its own count of PUBLISH
    packets received and of clients connected in ``$SYS`` (Mosquitto 2.0 does so every
    2 s, and only when the count has changed), and without the per-connection log
    lines (``log_type`` error, warning and information only: 200,000 lines of "New
    connection" cost the brokers CPU that the clients need). A thread per broker reads
    the two counts.
``raw`` (the baseline)
    A raw asyncio (uvloop) client in one process per shard (the same shards as the
    workers), no iotix import: it opens as many TCP connections spread over the brokers
    (device index modulo brokers, like the engine) and over ``--sources`` local
    addresses (127.0.1.x, bound with ``IP_BIND_ADDRESS_NO_PORT`` so that ports are
    chosen per destination), ``--concurrency`` attempts in flight per broker in all,
    writes a pre-built CONNECT (the devices' own client ids), waits for the CONNACK,
    then holds every connection for ``--hold`` seconds, writing a pre-built PUBLISH
    (the model's own topic and a payload it made) every ``--interval`` seconds per
    connection and a PINGREQ once per keepalive period (which MQTT would not even need
    while the connection publishes). On stop it writes DISCONNECT and closes.
``iotix``
    :func:`~iotix.engine.fleet.run_fleet`, as ``iotix run`` calls it, with an inline
    model (six fields, a JSON payload of about 145 bytes on a 43-byte topic, every
    ``--interval`` seconds with 1 s of jitter, QoS 0), one worker per shard, the same
    brokers, ``--sources`` addresses of its own (127.0.2.x, so that neither contender
    meets the other's TIME_WAIT sockets), the same concurrency split over the workers,
    and a connect rate that only the concurrency limits (``--connect-rate``).

Measured for each contender, from outside its processes:

- **connected in**: from the first connection attempt to the last CONNACK. The raw
  client reports both instants; for iotix they are read from the merged snapshots
  (every 0.25 s per worker): from the first one that counts an attempt to the first
  one in which every device is connected, so within about 0.25 s either way. The
  notes also give the time from the start of the client processes (interpreter,
  imports, the model) to the last CONNACK.
- **the hold**: starts when every device is connected and lasts ``--hold`` seconds.
  CPU is utime + stime of all client processes (``/proc/PID/stat``) over the hold, as
  a share of one core (the workers only: the fleet's supervisor is this process, whose
  share is printed apart; it merges 4 snapshots per worker and second). Memory is the
  sum of the client processes' proportional set sizes (PSS, ``smaps_rollup``: a page
  shared by several processes, such as the imports the workers inherit from the fork
  server, counts once in all), sampled every second during the hold, the highest sum
  kept, divided by the devices; the summed ``VmRSS``, which counts shared pages once
  per process, is printed beside it. The workers are the fork server's children (or
  this process's spawned children). Schedule lag (iotix) is the
  merged ``schedule_lag`` histogram of the hold only.
- **accounting**: messages sent (the raw client's writes; the fleet's
  ``messages_sent``, after it has stopped and every worker has sent its final
  snapshot) against the sum over the brokers of ``$SYS/broker/publish/messages/received``
  from before the part to after it, read once the counts have settled.

The table has a row per contender and a row of ratios (iotix over raw); then a verdict
per target. The notes split memory into a fixed cost (what a process holds before any
device: for iotix a spawned process that imports what a worker imports and loads the
model, for raw an interpreter with uvloop) and a cost per device, which projects the
figure to 100,000 devices in 6 processes from a smaller run.

Run: ``.venv/bin/python bench/mqtt_scale.py`` (100,000 devices, about 6 minutes) or
``--quick`` (10,000 devices, 30 s hold, about 1.5 minutes). Every phase has a timeout;
the brokers and every client process are stopped on the way out, by their pids.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import orjson

from harness import (
    cpu_seconds,
    figure,
    first_messages,
    pin_and_print_machine,
    print_header,
    proc_sizes,
    raise_open_file_limit,
    room_sensor_fields,
)
from iotix.engine.fleet import FleetPlan, plan_shards, run_fleet
from iotix.engine.worker import BrokerEndpoint, RunSettings
from iotix.model.loader import load_model, load_model_data
from iotix.model.runtime import DeviceBatch
from iotix.protocols.mqtt.packets import Connect, ProtocolVersion, encode, encode_publish
from iotix.testing import MosquittoBroker
from mqtt_throughput import hang_up, read_sys

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Iterator, Sequence
    from multiprocessing.connection import Connection

    from iotix.metrics import Snapshot
    from iotix.protocols.mqtt.packets import Publish

# The targets of issue 3.
TARGET_DEVICES = 100_000
TARGET_BROKERS = 6
TARGET_HOLD_S = 120.0
TARGET_CONNECT_S = 20.0
TARGET_LAG_P99_S = 0.250
TARGET_BYTES_PER_DEVICE = 6 * 1024
TARGET_CPU_SHARE = 0.40  # of one core, all client processes together

CONNECTIONS_PER_PROCESS = 18_000  # a client process or a broker: 20,000 open files at most
QUICK_DEVICES = 10_000
QUICK_HOLD_S = 30.0
SNAPSHOT_INTERVAL_S = 0.25  # the workers' snapshots: the resolution of "connected in"
SAMPLE_INTERVAL_S = 1.0  # RSS samples during the hold
SETTLE_TIMEOUT_S = 60.0  # for the brokers' $SYS counts to settle after a part
QUIET_S = 4.5  # no $SYS change for this long: settled (Mosquitto 2.0 ticks every 2 s)
START_TIMEOUT_S = 120.0  # client processes: start, import, build frames
STOP_TIMEOUT_S = 90.0  # client processes: stop, DISCONNECT, report
CLOSE_TIMEOUT_S = 30.0  # a raw client process to exit once its stdin is closed
RAW_SOURCE_NET = "127.0.1"
IOTIX_SOURCE_NET = "127.0.2"
RECEIVED_TOPIC = "$SYS/broker/publish/messages/received"
CONNECTED_TOPIC = "$SYS/broker/clients/connected"
# Mosquitto 2.0 logs "mosquitto version ... running" at `information` (MosquittoBroker
# waits for that line) and every connect and disconnect at `notice`: `none` resets the
# generated configuration's list, and notice stays out.
BROKER_CONFIG = (
    "sys_interval 1",
    "log_type none",
    "log_type error",
    "log_type warning",
    "log_type information",
)

RAW = "raw asyncio"
IOTIX = "iotix fleet"


def scale_model(interval_s: float) -> dict[str, Any]:
    """A room sensor: six fields in a JSON payload of about 145 bytes, every
    ``interval_s`` with 1 s of jitter, on a topic over a per-device attribute."""
    return {
        "name": "scale_sensor",
        "id": "sensor-{index:06d}",
        "attributes": {"site": {"kind": "choice", "values": ["paris", "berlin", "madrid", "oslo"]}},
        "fields": room_sensor_fields(),
        "messages": {
            "telemetry": {
                "topic": "bench/{site}/sensors/{device_id}/telemetry",
                "schedule": {"kind": "interval", "interval_s": interval_s, "jitter_s": 1},
                "qos": 0,
            }
        },
    }


@dataclass
class Measurement:
    """One contender holding the fleet."""

    contender: str
    devices: int
    processes: int
    connected: int = 0  # devices connected when the hold started (or when it gave up)
    connect_s: float = math.nan  # first attempt to last CONNACK
    launch_s: float = math.nan  # processes started to last CONNACK
    hold_s: float = 0.0  # how long every device stayed connected
    rss_max_bytes: int = 0  # highest sum of the client processes' VmRSS during the hold
    pss_max_bytes: int = 0  # the same for their proportional set sizes
    fixed_bytes: int = 0  # the processes' VmRSS before they hold any connection
    cpu_share: float = math.nan  # CPU-seconds of the client processes per wall second
    broker_cpu_share: float = math.nan
    broker_rss_max_bytes: int = 0
    harness_cpu_share: float = math.nan  # this process (the fleet's supervisor too)
    sent: int = 0
    received: int | None = None  # by the brokers, from their $SYS counts
    lag_p50_s: float = math.nan
    lag_p99_s: float = math.nan
    lag_max_s: float = math.nan
    lost_during_hold: int = 0  # connections that closed during the hold
    connect_failures: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.connected / self.connect_s if self.connect_s > 0 else math.nan

    @property
    def bytes_per_device(self) -> float:
        """Resident memory per device, pages shared between the processes (the fork
        server's imports, libraries) counted once: their summed PSS."""
        return self.pss_max_bytes / self.devices if self.pss_max_bytes else math.nan

    @property
    def marginal_bytes_per_device(self) -> float:
        """What a device adds to the client's memory, its processes' fixed cost apart."""
        if not self.rss_max_bytes or not self.fixed_bytes:
            return math.nan
        return (self.rss_max_bytes - self.fixed_bytes) / self.devices

    def projected_bytes_per_device(self, devices: int) -> float:
        """Memory per device at another fleet size, from the fixed and marginal costs."""
        processes = max(math.ceil(devices / CONNECTIONS_PER_PROCESS), 1)
        fixed_per_process = self.fixed_bytes / self.processes
        return fixed_per_process * processes / devices + self.marginal_bytes_per_device


# --- processes, from /proc ----------------------------------------------------------


def _kib_sum(pids: Sequence[int], file: str, key: str) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += proc_sizes(file, (key,), pid).get(key, 0)
    return total


def rss_bytes(pids: Sequence[int]) -> int:
    """The sum of ``VmRSS`` of ``pids`` (those that still exist)."""
    return _kib_sum(pids, "status", "VmRSS")


def pss_bytes(pids: Sequence[int]) -> int:
    """The sum of the proportional set sizes of ``pids``: pages shared between the
    processes (libraries) counted once in all."""
    return _kib_sum(pids, "smaps_rollup", "Pss")


def _children(parent: int) -> list[tuple[int, bytes]]:
    """(pid, cmdline) of the processes whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text(encoding="ascii")
            if int(stat.rpartition(")")[2].split()[1]) == parent:
                found.append((int(entry.name), (entry / "cmdline").read_bytes()))
    return found


def worker_pids() -> list[int]:
    """The fleet's workers: the children of multiprocessing's fork server (a child of
    this process), or this process's spawned children where there is no fork server
    (not the resource tracker, not the brokers)."""
    found = []
    for pid, cmdline in _children(os.getpid()):
        if b"forkserver" in cmdline:
            found += [child for child, _ in _children(pid)]
        elif b"spawn_main" in cmdline:
            found.append(pid)
    return sorted(found)


def kill_own_children(pids: Sequence[int]) -> None:
    """SIGKILL those of ``pids`` that are still workers of this process."""
    mine = set(worker_pids())
    for pid in pids:
        if pid in mine:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


class Sampler:
    """A thread that sums the RSS of the client and of the broker processes every
    ``SAMPLE_INTERVAL_S`` and keeps the highest sums; also a CPU window."""

    def __init__(self, pids: Sequence[int], broker_pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.broker_pids = list(broker_pids)
        self.rss_max_bytes = 0
        self.pss_max_bytes = 0
        self.broker_rss_max_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._started = (0.0, 0.0, 0.0, 0.0)
        self.cpu_share = math.nan
        self.broker_cpu_share = math.nan
        self.harness_cpu_share = math.nan
        self.window_s = 0.0

    def start(self) -> None:
        self._started = (
            time.monotonic(),
            cpu_seconds(self.pids),
            cpu_seconds(self.broker_pids),
            time.process_time(),
        )
        self._sample()
        self._thread.start()

    def _sample(self) -> None:
        self.rss_max_bytes = max(self.rss_max_bytes, rss_bytes(self.pids))
        self.pss_max_bytes = max(self.pss_max_bytes, pss_bytes(self.pids))
        self.broker_rss_max_bytes = max(self.broker_rss_max_bytes, rss_bytes(self.broker_pids))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def stop(self) -> None:
        """End the window (CPU shares over it); safe to call more than once."""
        if self._stop.is_set() or not self._thread.is_alive():
            return
        wall, cpu, broker_cpu, harness_cpu = self._started
        self._sample()
        self.window_s = time.monotonic() - wall
        self.cpu_share = (cpu_seconds(self.pids) - cpu) / self.window_s
        self.broker_cpu_share = (cpu_seconds(self.broker_pids) - broker_cpu) / self.window_s
        self.harness_cpu_share = (time.process_time() - harness_cpu) / self.window_s
        self._stop.set()
        self._thread.join(5)


# --- the brokers --------------------------------------------------------------------


class BrokerStats:
    """A broker's own counts from ``$SYS`` (PUBLISH packets received, clients
    connected), read by a thread with their arrival times.

    Mosquitto publishes a ``$SYS`` count (retained) only when it has changed since its
    last tick, so the latest count read, the retained copy sent on subscribing
    included, is the current one as of that tick; a count has settled once no change
    has come for longer than a tick (:data:`QUIET_S`).
    """

    def __init__(self, host: str, port: int) -> None:
        self._address = (host, port)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition()
        self.readings: dict[str, list[tuple[float, int]]] = {
            RECEIVED_TOPIC: [],
            CONNECTED_TOPIC: [],
        }

    def __enter__(self) -> Self:
        client_id = f"iotix-scale-sys-{self._address[1]}"
        topics = tuple(self.readings)
        self._sock, self._thread = read_sys(
            self._address, client_id, topics, self._on_publish, "broker-stats"
        )
        return self

    def _on_publish(self, at: float, packet: Publish) -> None:
        if packet.topic in self.readings:
            with self._changed:
                self.readings[packet.topic].append((at, int(packet.payload)))
                self._changed.notify_all()

    def __exit__(self, *exc: object) -> None:
        hang_up(self._sock, self._thread)

    def wait_for(self, topic: str, condition: Callable[[int], bool], timeout_s: float) -> int:
        """The latest count of ``topic`` once it meets ``condition``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                readings = self.readings[topic]
                if readings and condition(readings[-1][1]):
                    return readings[-1][1]
                left = deadline - time.monotonic()
                if left <= 0:
                    last = readings[-1][1] if readings else None
                    raise TimeoutError(f"{topic} of the broker at {self._address}: {last}")
                self._changed.wait(left)

    def settled(self, topic: str, after_s: float, timeout_s: float) -> int:
        """The count of ``topic`` once it has not changed for :data:`QUIET_S`, and not
        before ``after_s`` + :data:`QUIET_S` (0 if the broker never published one)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                readings = self.readings[topic]
                last_at = max(readings[-1][0] if readings else -math.inf, after_s)
                now = time.monotonic()
                if now - last_at >= QUIET_S:
                    return readings[-1][1] if readings else 0
                if now >= deadline:
                    raise TimeoutError(
                        f"{topic} of the broker at {self._address} still changing: "
                        f"{[value for _, value in readings[-3:]]}"
                    )
                self._changed.wait(min(last_at + QUIET_S, deadline) - now)


@dataclass
class Broker:
    process: MosquittoBroker
    stats: BrokerStats

    @property
    def endpoint(self) -> BrokerEndpoint:
        return BrokerEndpoint(self.process.host, self.process.port)


@contextlib.contextmanager
def brokers_running(count: int) -> Iterator[list[Broker]]:
    """``count`` fresh Mosquittos with their $SYS readers; every one stopped on exit."""
    with contextlib.ExitStack() as stack:
        brokers = []
        for _ in range(count):
            process = stack.enter_context(MosquittoBroker(extra_config=BROKER_CONFIG))
            stats = stack.enter_context(BrokerStats(process.host, process.port))
            brokers.append(Broker(process, stats))
        yield brokers


def broker_pids(brokers: Sequence[Broker]) -> list[int]:
    return [b.process.pid for b in brokers if b.process.pid is not None]


def received_settled(brokers: Sequence[Broker], after_s: float) -> int:
    """PUBLISH packets the brokers have received, once their counts have settled."""
    return sum(b.stats.settled(RECEIVED_TOPIC, after_s, SETTLE_TIMEOUT_S) for b in brokers)


def received_now(brokers: Sequence[Broker]) -> int:
    """The count before a part: the brokers are idle, so it has settled already unless
    a previous part's messages are still being counted."""
    return received_settled(brokers, time.monotonic() - QUIET_S)


def wait_brokers_idle(brokers: Sequence[Broker]) -> None:
    """Until every broker counts no client but our $SYS reader: the previous part's
    connections are gone before the next part connects."""
    for broker in brokers:
        broker.stats.wait_for(CONNECTED_TOPIC, lambda count: count <= 1, SETTLE_TIMEOUT_S)


def source_addresses(net: str, count: int) -> list[str]:
    return [f"{net}.{host}" for host in range(1, count + 1)]


# --- the raw client -----------------------------------------------------------------

# A process of its own (``python -c``), importing nothing of iotix: its memory is that
# of an interpreter, uvloop and its connections. It reads its plan from a pickle file
# and takes words on stdin ("go", "stop"); it reports JSON lines on stdout.
RAW_CLIENT_SOURCE = r'''
import asyncio, json, pickle, resource, socket, sys, threading, time
import uvloop

NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CONNACK_OK = b"\x20\x02\x00\x00"
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
ATTEMPTS = 3
ATTEMPT_TIMEOUT_S = 10.0

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def say(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class Stats:
    sent = 0
    pings = 0
    received_bytes = 0
    failures = 0
    lost = 0
    closed = 0
    last_connack_s = 0.0
    stopping = False
    all_closed = None


class Conn(asyncio.Protocol):
    __slots__ = ("transport", "first", "publish", "pending")

    def __init__(self, connect, publish, pending):
        self.transport = None
        self.first = connect
        self.publish = publish
        self.pending = pending

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.first)
        self.first = None

    def data_received(self, data):
        pending = self.pending
        if pending is not None:
            self.pending = None
            if pending.done():  # the attempt timed out meanwhile
                pass
            elif data[:4] == CONNACK_OK:
                Stats.last_connack_s = time.monotonic()
                pending.set_result(None)
            else:
                pending.set_exception(ConnectionError("refused: " + data[:4].hex()))
            data = data[4:]
        Stats.received_bytes += len(data)

    def connection_lost(self, exc):
        self.transport = None
        pending, self.pending = self.pending, None
        if pending is not None:
            if not pending.done():
                pending.set_exception(exc or ConnectionError("closed before CONNACK"))
            return
        if Stats.stopping:
            Stats.closed += 1
            if Stats.all_closed is not None and Stats.closed >= Stats.all_closed[1]:
                if not Stats.all_closed[0].done():
                    Stats.all_closed[0].set_result(None)
        else:
            Stats.lost += 1


async def open_one(loop, entry, brokers, sources, slots, conns):
    slot, source, connect, publish = entry
    host, port = brokers[slot]
    async with slots[slot]:
        for _ in range(ATTEMPTS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            transport = None
            pending = loop.create_future()
            try:
                sock.setblocking(False)
                if sources:
                    sock.setsockopt(socket.IPPROTO_IP, NO_PORT, 1)
                    sock.bind((sources[source], 0))
                async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
                    await loop.sock_connect(sock, (host, port))
                    transport, conn = await loop.create_connection(
                        lambda: Conn(connect, publish, pending), sock=sock
                    )
                    await pending
                conns.append(conn)
                return
            except (OSError, TimeoutError, ConnectionError):
                Stats.failures += 1
                if transport is not None:
                    transport.abort()
                else:
                    sock.close()


async def pump(conns, interval_s, keepalive_s, tick_s, stop):
    """Every tick, the connections of the tick's slot on two wheels: one PUBLISH per
    connection per interval, one PINGREQ per connection per keepalive period."""
    loop = asyncio.get_running_loop()
    publish_slots = max(round(interval_s / tick_s), 1)
    publish_wheel = [conns[k::publish_slots] for k in range(publish_slots)]
    ping_slots = max(round(keepalive_s / tick_s), 1) if keepalive_s else 0
    ping_wheel = [conns[k::ping_slots] for k in range(ping_slots)] if ping_slots else []
    start = loop.time()
    tick = 0
    sent = pings = 0
    while not stop.is_set():
        due = int((loop.time() - start) / tick_s)
        while tick <= due:
            for conn in publish_wheel[tick % publish_slots]:
                transport = conn.transport
                if transport is not None:
                    transport.write(conn.publish)
                    sent += 1
            if ping_slots and tick >= ping_slots:
                for conn in ping_wheel[tick % ping_slots]:
                    transport = conn.transport
                    if transport is not None:
                        transport.write(PINGREQ)
                        pings += 1
            tick += 1
        Stats.sent, Stats.pings = sent, pings
        try:
            await asyncio.wait_for(stop.wait(), max(start + tick * tick_s - loop.time(), 0))
        except TimeoutError:
            pass


async def main(config):
    loop = asyncio.get_running_loop()
    words = asyncio.Queue()

    def read_words():
        for line in sys.stdin:
            loop.call_soon_threadsafe(words.put_nowait, line.strip())
        loop.call_soon_threadsafe(words.put_nowait, "eof")

    threading.Thread(target=read_words, daemon=True).start()
    plan = config["plan"]
    brokers, sources = config["brokers"], config["sources"]
    say(event="ready", connections=len(plan))
    if await asyncio.wait_for(words.get(), config["life_s"]) != "go":
        return
    slots = [asyncio.Semaphore(config["concurrency"]) for _ in brokers]
    conns = []
    first = time.monotonic()
    try:
        async with asyncio.timeout(config["connect_timeout_s"]):
            await asyncio.gather(
                *(open_one(loop, entry, brokers, sources, slots, conns) for entry in plan)
            )
    except TimeoutError:
        pass
    del plan
    config.clear()
    say(
        event="connected",
        connected=len(conns),
        failures=Stats.failures,
        first_s=first,
        last_s=Stats.last_connack_s,
    )
    stop = asyncio.Event()
    pumping = asyncio.create_task(
        pump(conns, INTERVAL_S, KEEPALIVE_S, TICK_S, stop), name="raw-pump"
    )
    try:
        await asyncio.wait_for(words.get(), LIFE_S)
    except TimeoutError:
        pass
    stop.set()
    await pumping
    lost = Stats.lost
    Stats.stopping = True
    alive = [c for c in conns if c.transport is not None]
    Stats.all_closed = (loop.create_future(), len(alive))
    for conn in alive:
        conn.transport.write(DISCONNECT)
        conn.transport.close()  # after what is buffered has been written
    if alive:
        try:
            await asyncio.wait_for(Stats.all_closed[0], 20.0)
        except TimeoutError:
            pass
    say(
        event="done",
        sent=Stats.sent,
        pings=Stats.pings,
        received_bytes=Stats.received_bytes,
        lost=lost,
        closed=Stats.closed,
        unclosed=len(alive) - Stats.closed,
    )


with open(sys.argv[1], "rb") as file:
    CONFIG = pickle.load(file)
INTERVAL_S, KEEPALIVE_S, TICK_S = CONFIG["interval_s"], CONFIG["keepalive_s"], CONFIG["tick_s"]
LIFE_S = CONFIG["life_s"]
uvloop.run(main(CONFIG))
'''


class RawClientProcess:
    """One raw client process: its words in, its JSON reports out (a thread reads them,
    so that every wait has a timeout). Killed by pid if it outlives :meth:`close`."""

    def __init__(self, config_path: Path) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - this interpreter, our own code
            [sys.executable, "-c", RAW_CLIENT_SOURCE, str(config_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.process.pid
        self._reports: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"raw-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None  # noqa: S101 - PIPE was asked for
        for line in self.process.stdout:
            with contextlib.suppress(orjson.JSONDecodeError):
                self._reports.put(orjson.loads(line))
        self._reports.put(None)

    def say(self, word: str) -> None:
        assert self.process.stdin is not None  # noqa: S101 - PIPE was asked for
        with contextlib.suppress(OSError):
            self.process.stdin.write(word + "\n")
            self.process.stdin.flush()

    def expect(self, event: str, deadline: float) -> dict[str, Any]:
        """The next report, which must be ``event``, before ``deadline`` (monotonic)."""
        try:
            report = self._reports.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise TimeoutError(f"raw client {self.pid}: no {event!r} report in time") from None
        if report is None:
            raise RuntimeError(
                f"raw client {self.pid} ended (exit code {self.process.poll()}) before {event!r}"
            )
        if report.get("event") != event:
            raise RuntimeError(f"raw client {self.pid}: {report} instead of {event!r}")
        return report

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()  # EOF: the client stops by itself
        try:
            self.process.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(CLOSE_TIMEOUT_S)  # it has read to EOF: the pipe may close
        if self.process.stdout is not None:
            self.process.stdout.close()


def prebuilt_frames(model_data: dict[str, Any], devices: int, keepalive_s: int) -> list[bytes]:
    """CONNECT and PUBLISH frame of every device, alternately: the devices' own client
    ids and topics, and payloads the model made (one per device of a sample of 1,000,
    reused: they differ only in their values)."""
    spec = load_model_data(model_data).spec
    batch = DeviceBatch(spec, indices=list(range(devices)), seed=0)
    template = spec.messages["telemetry"].topic
    if template is None:
        raise ValueError("the scale model's telemetry has no topic")
    sample = DeviceBatch(spec, indices=list(range(min(devices, 1_000))), seed=0)
    payloads = {row: message.payload for row, message in first_messages(sample, 0.5).items()}
    version = ProtocolVersion.V311
    frames = []
    for row, device_id in enumerate(batch.device_ids):
        frames.append(encode(Connect(device_id, keepalive_s=keepalive_s), version))
        topic = batch.render(template, row).encode()
        frames.append(encode_publish(topic, payloads[row % sample.size], qos=0))
    return frames


def _start_raw_clients(
    args: argparse.Namespace,
    brokers: Sequence[Broker],
    sources: Sequence[str],
    directory: Path,
    stack: contextlib.ExitStack,
) -> list[RawClientProcess]:
    """A raw client process per shard, each with its plan; closed by ``stack``."""
    shards = plan_shards(args.devices, args.workers)
    frames = prebuilt_frames(scale_model(args.interval), args.devices, args.keepalive)
    print(
        f"# raw: {len(shards)} processes, PUBLISH frame {len(frames[1])} bytes, "
        f"{len(sources)} source addresses {sources[0]}..{sources[-1]}"
    )
    addresses = [(b.endpoint.host, b.endpoint.port) for b in brokers]
    children = []
    for number, shard in enumerate(shards):
        config = {
            "brokers": addresses,
            "sources": list(sources),
            "plan": [
                (i % len(addresses), i % len(sources), frames[2 * i], frames[2 * i + 1])
                for i in shard
            ],
            "concurrency": max(math.ceil(args.concurrency / len(shards)), 1),
            "interval_s": args.interval,
            "keepalive_s": args.keepalive,
            "tick_s": 0.02,
            "connect_timeout_s": args.connect_timeout,
            "life_s": args.connect_timeout + args.hold + STOP_TIMEOUT_S + 60,
        }
        path = directory / f"raw-{number}.pickle"
        path.write_bytes(pickle.dumps(config))
        child = RawClientProcess(path)
        stack.callback(child.close)
        children.append(child)
    return children


def _hold(seconds: float, children: Sequence[RawClientProcess], sampler: Sampler) -> list[int]:
    """Sample for ``seconds`` unless a client process ends; returns the ended ones."""
    sampler.start()
    held = time.monotonic()
    try:
        while (left := seconds - (time.monotonic() - held)) > 0:
            dead = [c.pid for c in children if c.process.poll() is not None]
            if dead:
                return dead
            time.sleep(min(0.5, left))
    finally:
        sampler.stop()
    return []


def run_raw(
    args: argparse.Namespace, brokers: Sequence[Broker], sources: Sequence[str]
) -> Measurement:
    result = Measurement(RAW, args.devices, args.workers)
    base = received_now(brokers)
    launched = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="iotix-scale-") as tmp, contextlib.ExitStack() as stack:
        children = _start_raw_clients(args, brokers, sources, Path(tmp), stack)
        result.processes = len(children)
        result.fixed_bytes = raw_fixed_bytes() * len(children)
        deadline = time.monotonic() + START_TIMEOUT_S
        for child in children:
            child.expect("ready", deadline)
        for child in children:
            child.say("go")
        deadline = time.monotonic() + args.connect_timeout + 30
        reports = [child.expect("connected", deadline) for child in children]
        result.connected = sum(r["connected"] for r in reports)
        result.connect_failures = sum(r["failures"] for r in reports)
        last = max(r["last_s"] for r in reports)
        result.connect_s = last - min(r["first_s"] for r in reports)
        result.launch_s = last - launched
        if result.connected < args.devices:
            result.problems.append(
                f"{args.devices - result.connected:,} connections not made within "
                f"{args.connect_timeout:g} s ({result.connect_failures:,} failed attempts)"
            )
        sampler = Sampler([child.pid for child in children], broker_pids(brokers))
        if dead := _hold(args.hold, children, sampler):
            result.problems.append(f"raw client processes {dead} ended during the hold")
        for child in children:
            child.say("stop")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        done = [child.expect("done", deadline) for child in children]
    stopped = time.monotonic()
    result.sent = sum(r["sent"] for r in done)
    result.lost_during_hold = sum(r["lost"] for r in done)
    result.hold_s = sampler.window_s if not result.lost_during_hold else 0.0
    _take_samples(result, sampler)
    if unclosed := sum(r["unclosed"] for r in done):
        result.problems.append(f"{unclosed:,} connections did not close within 20 s")
    _account(result, brokers, base, stopped)
    return result


# What a raw client process holds before its connections: the interpreter and uvloop.
RAW_FIXED_PROBE = (
    "import asyncio, json, pickle, resource, socket, sys, threading, time, uvloop\n"
    "uvloop.new_event_loop().close()\n"
    "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
)


def raw_fixed_bytes() -> int:
    """VmRSS of a raw client process before it holds anything."""
    out = subprocess.run(  # noqa: S603 - this interpreter, our own code
        [sys.executable, "-c", RAW_FIXED_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(out.stdout) * 1024


def _take_samples(result: Measurement, sampler: Sampler) -> None:
    result.rss_max_bytes = sampler.rss_max_bytes
    result.pss_max_bytes = sampler.pss_max_bytes
    result.cpu_share = sampler.cpu_share
    result.broker_cpu_share = sampler.broker_cpu_share
    result.broker_rss_max_bytes = sampler.broker_rss_max_bytes
    result.harness_cpu_share = sampler.harness_cpu_share


def _account(result: Measurement, brokers: Sequence[Broker], base: int, stopped: float) -> None:
    try:
        result.received = received_settled(brokers, stopped) - base
    except TimeoutError as exc:
        result.problems.append(f"the brokers' counts did not settle: {exc}")


# --- the iotix fleet ----------------------------------------------------------------


def _fixed_cost_probe(model_path: str, report: Connection) -> None:
    """In a process started like a worker (spawn, so this module is imported as the
    workers import it): what a worker holds before its devices, i.e. the interpreter,
    the imports and the model. Reports VmRSS in bytes."""
    import uvloop  # noqa: PLC0415 - what a worker imports

    from iotix.engine import fleet  # noqa: PLC0415, F401 - likewise

    load_model(model_path)
    loop = uvloop.new_event_loop()
    loop.close()
    report.send(rss_bytes([os.getpid()]))
    report.close()


def worker_fixed_bytes(model_path: Path) -> int:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_fixed_cost_probe, args=(str(model_path), send))
    process.start()
    send.close()
    try:
        if not receive.poll(60):
            return 0
        return int(receive.recv())
    except EOFError:
        return 0
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


class FleetMonitor:
    """The fleet's snapshot callback: notes when the first attempt and the last
    connection happen, starts the hold window, and ends the run after it.

    ``run_fleet`` stops when its ``stop`` event is set, after which every worker
    DISCONNECTs its devices and sends its final snapshot: this callback sets it once
    the hold is over (or connecting has taken too long).
    """

    def __init__(self, args: argparse.Namespace, brokers: Sequence[Broker]) -> None:
        self.devices = args.devices
        self.hold_s = args.hold
        self.connect_timeout_s = args.connect_timeout
        self.brokers = brokers
        self.launched = time.monotonic()
        self.first_attempt_at: float | None = None
        self.connected_at: float | None = None
        self.hold_start: Snapshot | None = None
        self.hold_end: Snapshot | None = None
        self.latest: Snapshot | None = None
        self.min_connected = args.devices
        self.most_connected = 0
        self.sampler: Sampler | None = None
        self.pids: list[int] = []
        self.stopping: str | None = None
        self.stop_event = threading.Event()

    def __call__(self, snapshot: Snapshot) -> None:
        now = time.monotonic()
        self.latest = snapshot
        self.most_connected = max(self.most_connected, snapshot.devices_connected)
        if self.stopping is not None:
            return
        if self.first_attempt_at is None and snapshot.counters.connect_attempts > 0:
            self.first_attempt_at = now
        if self.connected_at is None:
            if snapshot.devices_connected >= self.devices:
                self.connected_at = now
                self.hold_start = snapshot
                self.pids = worker_pids()
                self.sampler = Sampler(self.pids, broker_pids(self.brokers))
                self.sampler.start()
            elif now - self.launched > self.connect_timeout_s:
                self.stop(f"not every device connected within {self.connect_timeout_s:g} s")
            return
        self.min_connected = min(self.min_connected, snapshot.devices_connected)
        if now - self.connected_at >= self.hold_s:
            self.hold_end = snapshot
            self.stop("hold complete")

    def stop(self, reason: str) -> None:
        if self.stopping is None:
            self.stopping = reason
            if self.sampler is not None:
                self.sampler.stop()
            self.stop_event.set()

    def interrupt(self) -> None:
        """The watchdog: a run whose snapshots stopped coming is stopped all the same."""
        if self.stopping is None:
            self.stopping = "watchdog: no end of the hold in time"
            if self.sampler is not None:
                self.sampler.stop()
            self.stop_event.set()


def _fleet_settings(
    args: argparse.Namespace, brokers: Sequence[Broker], sources: Sequence[str], workers: int
) -> RunSettings:
    concurrency = max(math.ceil(args.concurrency / workers), 1)
    rate_hz = args.connect_rate / workers if args.connect_rate else 1e6
    print(
        f"# iotix: {workers} workers, {concurrency} attempts in flight per worker and broker, "
        f"connect rate {'unlimited' if not args.connect_rate else f'{rate_hz:g}/s per worker'}, "
        f"{len(sources)} source addresses {sources[0]}..{sources[-1]}"
    )
    return RunSettings(
        devices=args.devices,
        brokers=tuple(b.endpoint for b in brokers),
        duration_s=args.connect_timeout + args.hold + 60.0,  # the monitor ends it before
        connect_rate_hz=rate_hz,
        connect_concurrency=concurrency,
        keepalive_s=args.keepalive,
        source_addresses=tuple(sources),
        snapshot_interval_s=SNAPSHOT_INTERVAL_S,
    )


def _fleet_figures(result: Measurement, monitor: FleetMonitor, final: Snapshot | None) -> None:
    """What the monitor saw and the fleet's final snapshot, into ``result``."""
    if monitor.stopping not in (None, "hold complete"):
        result.problems.append(monitor.stopping)
    if monitor.first_attempt_at is not None and monitor.connected_at is not None:
        result.connect_s = monitor.connected_at - monitor.first_attempt_at
        result.launch_s = monitor.connected_at - monitor.launched
    result.connected = monitor.most_connected
    start, end = monitor.hold_start, monitor.hold_end
    if start is not None and end is not None:
        lag = end.schedule_lag.since(start.schedule_lag)
        result.lag_p50_s, result.lag_p99_s = lag.percentiles([50, 99])
        result.lag_max_s = lag.max_s
        result.lost_during_hold = end.counters.disconnects - start.counters.disconnects
        if monitor.sampler is not None and not result.lost_during_hold:
            result.hold_s = monitor.sampler.window_s
        if monitor.min_connected < result.devices:
            result.problems.append(
                f"as few as {monitor.min_connected:,} devices connected during the hold"
            )
    if monitor.sampler is not None:
        _take_samples(result, monitor.sampler)
    if final is not None:
        counters = final.counters
        result.sent = counters.messages_sent
        result.connect_failures = counters.connect_failures
        if counters.connect_failures_by_reason:
            result.problems.append(f"connect failures: {counters.connect_failures_by_reason}")
        if counters.errors_by_kind:
            result.problems.append(f"errors: {counters.errors_by_kind}")


def run_iotix(
    args: argparse.Namespace, brokers: Sequence[Broker], sources: Sequence[str]
) -> Measurement:
    workers = len(plan_shards(args.devices, args.workers))
    result = Measurement(IOTIX, args.devices, workers)
    settings = _fleet_settings(args, brokers, sources, workers)
    with tempfile.TemporaryDirectory(prefix="iotix-scale-") as tmp:
        model_path = Path(tmp, "scale_sensor.json")
        model_path.write_bytes(orjson.dumps(scale_model(args.interval)))
        result.fixed_bytes = worker_fixed_bytes(model_path) * workers
        base = received_now(brokers)
        monitor = FleetMonitor(args, brokers)
        watchdog = threading.Timer((settings.duration_s or 0.0) + 30.0, monitor.interrupt)
        watchdog.daemon = True
        watchdog.start()
        outcome = None
        try:
            outcome = run_fleet(
                [FleetPlan(model_path, args.devices)],
                settings,
                workers=workers,
                on_snapshot=monitor,
                stop=monitor.stop_event,
            )
        except KeyboardInterrupt:
            result.problems.append("interrupted before the fleet could stop in order")
        finally:
            watchdog.cancel()
            if monitor.sampler is not None:
                monitor.sampler.stop()
            kill_own_children(monitor.pids)  # normally gone: run_fleet joins them
    stopped = time.monotonic()
    _fleet_figures(result, monitor, outcome.snapshot if outcome is not None else monitor.latest)
    if outcome is not None:
        result.problems.extend(outcome.worker_errors)
    _account(result, brokers, base, stopped)
    return result


# --- reporting ----------------------------------------------------------------------


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or math.isnan(ours) or math.isnan(theirs) or not theirs:
        return "-"
    return f"{ours / theirs:.2f}"


def print_table(results: Sequence[Measurement]) -> None:
    header = (
        f"{'contender':<12} {'devices':>8} {'procs':>5} {'connected':>9} {'conn s':>7} "
        f"{'conn/s':>7} {'held s':>6} {'KiB/dev':>7} {'CPU %':>6} {'sent':>10} "
        f"{'received':>10} {'lag p50 ms':>10} {'lag p99 ms':>10}"
    )
    print_header(header)
    for r in results:
        received = "-" if r.received is None else f"{r.received:,}"
        print(
            f"{r.contender:<12} {r.devices:>8,} {r.processes:>5} {r.connected:>9,} "
            f"{figure(r.connect_s, digits=2):>7} {figure(r.per_s):>7} {figure(r.hold_s):>6} "
            f"{figure(r.bytes_per_device, 1 / 1024, 2):>7} {figure(r.cpu_share, 100, 1):>6} "
            f"{r.sent:>10,} {received:>10} {figure(r.lag_p50_s, 1000, 1):>10} "
            f"{figure(r.lag_p99_s, 1000, 1):>10}"
        )
    found = {r.contender: r for r in results}
    raw, ours = found.get(RAW), found.get(IOTIX)
    if raw is not None and ours is not None:
        print(
            f"{'iotix / raw':<12} {'':>8} {'':>5} {'':>9} "
            f"{_ratio(ours.connect_s, raw.connect_s):>7} {_ratio(ours.per_s, raw.per_s):>7} "
            f"{'':>6} {_ratio(ours.bytes_per_device, raw.bytes_per_device):>7} "
            f"{_ratio(ours.cpu_share, raw.cpu_share):>6}"
        )
    for r in results:
        print_notes(r)


def print_notes(r: Measurement) -> None:
    projected = r.projected_bytes_per_device(TARGET_DEVICES)
    mib = 1 / 2**20
    print(
        f"# {r.contender}: {r.connected:,} of {r.devices:,} connected, the last "
        f"{figure(r.launch_s, digits=2)} s after the processes were started; "
        f"{r.connect_failures:,} failed connection attempts, "
        f"{r.lost_during_hold:,} connections lost during the hold"
    )
    if not r.rss_max_bytes:
        print("#   memory, CPU: not sampled (no hold)")
    else:
        print(
            f"#   memory: PSS {figure(r.pss_max_bytes * mib, digits=1)} MiB at most (RSS "
            f"{figure(r.rss_max_bytes * mib, digits=1)} MiB, shared pages counted per process); "
            f"by RSS, {figure(r.fixed_bytes * mib, digits=1)} MiB fixed ({r.processes} freshly "
            f"started processes before any device) + "
            f"{figure(r.marginal_bytes_per_device, 1 / 1024, 2)} KiB per device, "
            f"projected at {TARGET_DEVICES:,} devices in "
            f"{math.ceil(TARGET_DEVICES / CONNECTIONS_PER_PROCESS)} processes: "
            f"{figure(projected, 1 / 1024, 2)} KiB per device"
        )
        print(
            f"#   during the hold: the brokers {figure(r.broker_cpu_share, 100, 1)} % CPU, "
            f"{figure(r.broker_rss_max_bytes * mib, digits=0)} MiB RSS; this process (the harness"
            f"{', the fleet supervisor' if r.contender == IOTIX else ''}) "
            f"{figure(r.harness_cpu_share, 100, 1)} % CPU"
            + (
                f"; schedule lag max {figure(r.lag_max_s, 1000, 1)} ms"
                if r.contender == IOTIX
                else ""
            )
        )
    for problem in r.problems:
        print(f"#   problem: {problem}")


def _verdict(what: str, *, met: bool | None) -> str:
    verdict = "not measured" if met is None else ("target met" if met else "target MISSED")
    return f"{what}: {verdict}"


def _at_most(value: float, target: float) -> bool | None:
    return None if math.isnan(value) else value <= target


def verdicts(results: Sequence[Measurement], brokers: int) -> list[str]:
    found = {r.contender: r for r in results}
    ours, raw = found.get(IOTIX), found.get(RAW)
    if ours is None:
        return ["no verdict: the iotix part did not run (--parts)"]

    def against(attribute: str, unit: str, scale: float = 1.0, digits: int = 2) -> str:
        value = math.nan if raw is None else getattr(raw, attribute)
        return "" if math.isnan(value) else f" (raw {figure(value, scale, digits)}{unit})"

    full = ours.connected == ours.devices
    held = full and not ours.lost_during_hold and not math.isnan(ours.cpu_share)
    lines = []
    if ours.devices < TARGET_DEVICES or brokers < TARGET_BROKERS:
        lines.append(
            f"# these verdicts are for {ours.devices:,} devices against {brokers} brokers, "
            f"not for the target's {TARGET_DEVICES:,} against {TARGET_BROKERS}"
        )
    size_met = ours.devices >= TARGET_DEVICES and brokers >= TARGET_BROKERS
    lines += [
        _verdict(
            f"scale: {ours.devices:,} devices against {brokers} Mosquittos, {ours.connected:,} "
            f"connected, held {figure(ours.hold_s)} s, {ours.lost_during_hold:,} lost (target "
            f"{TARGET_DEVICES:,} against {TARGET_BROKERS} or more for {TARGET_HOLD_S:g} s)",
            met=size_met and held and ours.hold_s >= TARGET_HOLD_S - 1.0,
        ),
        _verdict(
            f"connect: every device connected in {figure(ours.connect_s, digits=2)} s"
            f"{against('connect_s', ' s')} (target {TARGET_CONNECT_S:g} s)",
            met=full and _at_most(ours.connect_s, TARGET_CONNECT_S),
        ),
        _verdict(
            f"schedule lag during the hold: p99 {figure(ours.lag_p99_s, 1000, 1)} ms "
            f"(target {TARGET_LAG_P99_S * 1000:g} ms)",
            met=_at_most(ours.lag_p99_s, TARGET_LAG_P99_S),
        ),
        _verdict(
            f"memory: {figure(ours.bytes_per_device, 1 / 1024, 2)} KiB per device"
            f"{against('bytes_per_device', ' KiB', 1 / 1024)}"
            + (
                ""
                if ours.devices >= TARGET_DEVICES
                else f", projected at {TARGET_DEVICES:,} (from RSS, an upper bound): "
                f"{figure(ours.projected_bytes_per_device(TARGET_DEVICES), 1 / 1024, 2)} KiB"
            )
            + f" (target {TARGET_BYTES_PER_DEVICE / 1024:g} KiB)",
            met=_at_most(ours.bytes_per_device, TARGET_BYTES_PER_DEVICE),
        ),
        _verdict(
            f"CPU during the hold: {figure(ours.cpu_share, 100, 1)} % of one core"
            f"{against('cpu_share', ' %', 100, 1)} (target {TARGET_CPU_SHARE:.0%})",
            met=_at_most(ours.cpu_share, TARGET_CPU_SHARE),
        ),
    ]
    if ours.received is None:
        lines.append(_verdict("accounting: the brokers' counts could not be read", met=None))
    else:
        also = (
            ""
            if raw is None or raw.received is None
            else f" (raw {raw.sent:,} sent, {raw.received:,} received)"
        )
        lines.append(
            _verdict(
                f"accounting: {ours.sent:,} messages sent, {ours.received:,} received by the "
                f"brokers ({ours.received - ours.sent:+,}){also}",
                met=ours.received == ours.sent and ours.sent > 0 and held,
            )
        )
    return lines


# --- the run ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--devices",
        type=int,
        help=f"devices = connections ({TARGET_DEVICES:,}; --quick {QUICK_DEVICES:,})",
    )
    parser.add_argument(
        "--hold",
        type=float,
        help=f"seconds to hold the fleet ({TARGET_HOLD_S:g}; --quick {QUICK_HOLD_S:g})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: fewer devices, a shorter hold"
    )
    parser.add_argument(
        "--brokers",
        type=int,
        default=TARGET_BROKERS,
        help=f"Mosquittos (more if one would hold over {CONNECTIONS_PER_PROCESS:,} connections)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help=f"client processes of each contender (default: one per "
        f"{CONNECTIONS_PER_PROCESS:,} devices)",
    )
    parser.add_argument(
        "--sources",
        type=int,
        help="local source addresses per contender (default: one per 8,000 devices, at least 4)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="connection attempts in flight per broker, over all processes of a contender "
        "(Mosquitto's listen backlog is 100)",
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=0.0,
        help="new connections per second of the whole fleet (default 0: only the "
        "concurrency limits it)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=120.0,
        help="seconds for every device to connect (iotix: from the start of the workers) "
        "before the part gives up",
    )
    parser.add_argument("--interval", type=float, default=10.0, help="telemetry interval, s")
    parser.add_argument("--keepalive", type=int, default=60, help="MQTT keepalive, s")
    parser.add_argument(
        "--parts", default="raw,iotix", help="comma-separated parts to run: raw, iotix"
    )
    args = parser.parse_args(argv)
    if args.devices is None:
        args.devices = QUICK_DEVICES if args.quick else TARGET_DEVICES
    if args.hold is None:
        args.hold = QUICK_HOLD_S if args.quick else TARGET_HOLD_S
    needed = math.ceil(args.devices / CONNECTIONS_PER_PROCESS)
    if args.workers is None:
        args.workers = needed
    if args.devices < 1 or args.workers < needed:
        parser.error(
            f"{args.devices:,} devices need at least {needed} processes of at most "
            f"{CONNECTIONS_PER_PROCESS:,} connections (open-file limit)"
        )
    args.brokers = max(args.brokers, needed)
    if args.sources is None:
        args.sources = max(math.ceil(args.devices / 8_000), 4)
    if not 1 <= args.sources <= 254:
        parser.error("--sources must be between 1 and 254")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(args.parts) - {"raw", "iotix"}:
        parser.error(f"unknown parts: {sorted(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[Measurement]:
    args = parse_args(argv)
    limit = raise_open_file_limit()
    pin_and_print_machine("mqtt_scale", pin=False, note=f"; open-file limit {limit:,} per process")
    print(
        f"# {args.devices:,} devices, {args.brokers} Mosquittos, hold {args.hold:g} s, "
        f"QoS 0 JSON telemetry every {args.interval:g} s, keepalive {args.keepalive} s, "
        f"{args.concurrency} connection attempts in flight per broker"
    )
    results: list[Measurement] = []
    started = time.monotonic()
    with brokers_running(args.brokers) as brokers:
        parts = {"raw": (run_raw, RAW_SOURCE_NET), "iotix": (run_iotix, IOTIX_SOURCE_NET)}
        for name in args.parts:
            part, net = parts[name]
            wait_brokers_idle(brokers)
            print(f"# {name} part started at +{time.monotonic() - started:.0f} s")
            sys.stdout.flush()
            try:
                results.append(part(args, brokers, source_addresses(net, args.sources)))
            except (OSError, RuntimeError, TimeoutError) as exc:
                failed = Measurement(RAW if name == "raw" else IOTIX, args.devices, args.workers)
                failed.problems.append(f"the part failed: {exc!r}")
                results.append(failed)
    print(f"# done in {time.monotonic() - started:.0f} s")
    print_table(results)
    for line in verdicts(results, args.brokers):
        print(line)
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
