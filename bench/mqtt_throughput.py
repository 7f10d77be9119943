"""MQTT publish throughput of one worker, against the ceiling of what it publishes into.

One :class:`~iotix.engine.worker.Worker` (one process, one event loop, pinned to one
core) with ``--devices`` devices of an inline model sends QoS 0 JSON telemetry as fast
as it can, and is raced, in the same run, against a raw writer of pre-built frames over
as many connections. Three parts:

``broker``
    Into a fresh Mosquitto (pinned to the other core). Baseline: the **raw flood**, one
    asyncio connection per device that sends CONNECT and then writes pre-built QoS 0
    PUBLISH frames (the model's own topics and payloads) in coalesced batches, as fast
    as TCP flow control lets it: the broker is then the bottleneck, so its ingest rate
    is the broker's ceiling. Mosquitto 2.0 ingests less over 1,000 connections than
    over a few dozen (here 140-200K against 215-230K messages/s, with a plateau from
    16 to 64 connections), so the flood runs twice: over as many connections as the
    worker has (like for like) and over ``--ceiling-connections`` (32); the higher of
    the two is the ceiling.
    Every contender is measured on the broker's side, by Mosquitto's own count of
    PUBLISH packets received (``$SYS/broker/publish/messages/received``), and on the
    sender's side (frames handed to the transport; for the raw flood this includes what
    fills the socket buffers, so only the broker's figure is its rate).
``sink``
    Into a discard sink (a separate process on the other core that answers each
    connection's CONNECT with a CONNACK and throws every later byte away): what the
    sender itself can do, per CPU-second of this process (``time.process_time``).
``qos1``
    QoS 1 into Mosquitto with an in-flight window of ``--max-inflight`` per device:
    first as fast as it can (messages/s, acknowledged/s), then on the wall clock at
    each ``--qos1-load`` fraction of that rate (25 % and 70 %), for PUBACK latencies
    (their percentiles are of the window's acknowledgements).

"As fast as it can": the engine catches up on every send its schedule missed, so a
worker offered more than it can send builds ever larger batches (its loop, its
connects and its deadline starve, and memory grows without bound). The saturating runs
therefore give the worker a :class:`BenchClock` that follows the wall clock but never
runs more than ``--lead-ms`` past the earliest send still due: the worker always has
``--lead-ms`` of schedule to send, and sends it as fast as it can. The default lead is
the worker's tick (``RunSettings.tick_s``, 20 ms): the schedule one send round gathers,
so one write per connection carries what a device has due in a tick (20 messages at
the 1 ms interval). A shorter lead cuts the engine's batches below what it makes on its
own. The clock also
stands still until every device is connected, so that no measurement includes the
connection ramp. Rates are read over a window of ``--seconds`` after ``--settle``
seconds of sending.

Run: ``.venv/bin/python bench/mqtt_throughput.py [--devices 1000] [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Self

from harness import (
    BenchClock,
    Sample,
    Window,
    figure,
    first_messages,
    pin_and_print_machine,
    pin_process,
    print_header,
    print_profile,
    require_open_files,
    run_loop,
    wait_until,
)
from iotix.engine.worker import BrokerEndpoint, RunSettings, Worker, parse_brokers
from iotix.model.loader import load_model_data
from iotix.model.runtime import DeviceBatch
from iotix.protocols.mqtt.packets import (
    ConnAck,
    Connect,
    PacketReader,
    ProtocolVersion,
    Publish,
    Subscribe,
    Subscription,
    encode,
    encode_publish,
)
from iotix.testing import MosquittoBroker

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from types import TracebackType

    from iotix.metrics import Histogram
    from iotix.model.loader import LoadedModel

TARGET_CEILING_FRACTION = 0.90  # of the broker's ingest ceiling, measured in the same run
TARGET_SINK_PER_CORE = 500_000  # messages per CPU-second into a discard sink
RECEIVED_TOPIC = "$SYS/broker/publish/messages/received"
SYS_CONFIG = ("sys_interval 1",)  # Mosquitto 2.0 then publishes $SYS every 2 s
CONNACK_OK = b"\x20\x02\x00\x00"
CONNECT_CONCURRENCY = 64  # attempts in flight per endpoint (Mosquitto's backlog is 100)
CONNECT_TIMEOUT_S = 60.0
BATCH_FRAMES = 64  # pre-built frames per write of the raw writers (about 10 KB)
PUMP_WRITES = 16  # writes per connection before the raw writer lets the others run

RAW = "raw frames"
IOTIX = "iotix worker"


def bench_model(interval_s: float) -> dict[str, Any]:
    """A sensor with a JSON payload of about 120 bytes, sending every ``interval_s``."""
    return {
        "name": "bench_sensor",
        "id": "sensor-{index:05d}",
        "fields": {
            "temperature": {
                "kind": "random_walk",
                "start": 21,
                "step": 0.1,
                "min": -20,
                "max": 60,
                "round": 2,
            },
            "humidity": {
                "kind": "wave",
                "shape": "sine",
                "period_s": 600,
                "amplitude": 10,
                "offset": 50,
                "round": 1,
            },
            "battery": {"kind": "counter", "start": 100, "step": -0.001, "round": 3},
            "status": {"kind": "constant", "value": "ok"},
        },
        "messages": {
            "telemetry": {
                "topic": "bench/{device_id}/telemetry",
                "schedule": {"kind": "interval", "interval_s": interval_s},
                "qos": 0,
            }
        },
    }


@dataclass(frozen=True)
class Measurement:
    """One contender over one measurement window."""

    part: str  # "broker", "sink", "qos1 max" or "qos1 N%" (offered N % of the maximum)
    contender: str
    connections: int
    sent_per_s: float  # messages handed to the transport, per wall second
    cpu_share: float  # CPU-seconds of this process per wall second
    broker_per_s: float | None  # PUBLISH packets Mosquitto counted, per second
    acked_per_s: float | None = None
    ack_p50_s: float | None = None
    ack_p99_s: float | None = None
    ack_p999_s: float | None = None
    schedule_kept: float | None = None  # BenchClock seconds per wall second
    ratio: float | None = None  # this contender's figure over the raw writer's

    @property
    def per_cpu_s(self) -> float:
        """Messages sent per CPU-second of this process."""
        return self.sent_per_s / self.cpu_share if self.cpu_share else math.nan


# --- the broker's own count ---------------------------------------------------------


def read_sys(
    address: tuple[str, int],
    client_id: str,
    topics: Sequence[str],
    on_publish: Callable[[float, Publish], None],
    name: str,
) -> tuple[socket.socket, threading.Thread]:
    """Subscribe to ``topics`` (the broker's $SYS counts) on a connection of its own,
    and start a thread ``name`` that calls ``on_publish(arrival time, packet)`` for
    every PUBLISH until the connection ends. A thread, not a task: its readings must
    not wait for the event loop of the process it measures. Stop it with
    :func:`hang_up`."""
    sock = socket.create_connection(address, timeout=10)
    try:
        reader = _subscribe(sock, address, client_id, topics)
    except BaseException:
        sock.close()
        raise
    thread = threading.Thread(
        target=_read_publishes, args=(sock, reader, on_publish), name=name, daemon=True
    )
    thread.start()
    return sock, thread


def _subscribe(
    sock: socket.socket, address: tuple[str, int], client_id: str, topics: Sequence[str]
) -> PacketReader:
    version = ProtocolVersion.V311
    sock.sendall(encode(Connect(client_id, keepalive_s=0), version))
    reader = PacketReader(version)
    packets: list[Any] = []
    while not packets:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"the broker at {address} closed the connection")
        packets = reader.feed(data)
    if not isinstance(packets[0], ConnAck) or packets[0].reason_code != 0:
        raise ConnectionError(f"the broker at {address} refused: {packets[0]}")
    sock.sendall(encode(Subscribe(1, tuple(Subscription(topic) for topic in topics)), version))
    sock.settimeout(None)
    return reader


def _read_publishes(
    sock: socket.socket, reader: PacketReader, on_publish: Callable[[float, Publish], None]
) -> None:
    with contextlib.suppress(OSError):
        while data := sock.recv(65536):
            at = time.monotonic()
            for packet in reader.feed(data):
                if isinstance(packet, Publish):
                    on_publish(at, packet)


def hang_up(sock: socket.socket | None, reading: threading.Thread | None) -> None:
    """Close a $SYS connection and wait for the thread that reads it."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    if reading is not None:
        reading.join(5)


class BrokerCounter:
    """Mosquitto's own count of PUBLISH packets received, as it publishes it in $SYS.

    A thread reads the count with its arrival time (the broker publishes it every two
    seconds with ``sys_interval 1``); :meth:`rate` is the slope between the first and
    the last reading inside a window.
    """

    def __init__(self, host: str, port: int) -> None:
        self._address = (host, port)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.readings: list[tuple[float, int]] = []

    def __enter__(self) -> Self:
        self._sock, self._thread = read_sys(
            self._address, "iotix-bench-sys", (RECEIVED_TOPIC,), self._on_publish, "broker-counter"
        )
        return self

    def _on_publish(self, at: float, packet: Publish) -> None:
        # A retained copy is the count as of the last tick, not of now.
        if not packet.retain:
            self.readings.append((at, int(packet.payload)))

    def __exit__(self, *exc: object) -> None:
        hang_up(self._sock, self._thread)

    def rate(self, window: Window) -> float | None:
        """PUBLISH packets per second the broker counted inside ``window`` (None if it
        published fewer than two counts in it: the window is too short)."""
        inside = [r for r in self.readings if window.start.wall_s <= r[0] <= window.end.wall_s]
        if len(inside) < 2:
            return None
        (t0, v0), (t1, v1) = inside[0], inside[-1]
        return (v1 - v0) / (t1 - t0)


@contextlib.contextmanager
def mosquitto(url: str | None, core: int | None) -> Iterator[tuple[str, int, BrokerCounter]]:
    """(host, port, $SYS counter) of a fresh Mosquitto pinned to ``core``, or of the
    running one at ``url`` (it must publish $SYS: ``sys_interval 1``)."""
    if url is not None:
        endpoint = parse_brokers(url)[0]
        with BrokerCounter(endpoint.host, endpoint.port) as counter:
            yield endpoint.host, endpoint.port, counter
        return
    with MosquittoBroker(extra_config=SYS_CONFIG) as broker:
        if broker.pid is not None:
            pin_process(broker.pid, core)
        with BrokerCounter(broker.host, broker.port) as counter:
            yield broker.host, broker.port, counter


# --- the discard sink -----------------------------------------------------------------

# A separate process, so that its work is not charged to the sender. It answers the
# first bytes of every connection (the client's CONNECT: nothing else comes before the
# CONNACK) with a CONNACK, and reads everything after into one shared buffer.
SINK_SOURCE = """
import asyncio, os, signal, sys
core = int(sys.argv[1])
if core >= 0:
    os.sched_setaffinity(0, {core})
try:
    import uvloop
    new_loop = uvloop.new_event_loop
except ImportError:
    new_loop = asyncio.new_event_loop
BUFFER = bytearray(1 << 18)
received = 0

class Sink(asyncio.BufferedProtocol):
    greeted = False
    def connection_made(self, transport):
        self.transport = transport
    def get_buffer(self, hint):
        return BUFFER
    def buffer_updated(self, size):
        global received
        received += size
        if not self.greeted:
            self.greeted = True
            self.transport.write(b"\\x20\\x02\\x00\\x00")

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    await stop
    print(received, flush=True)

new_loop().run_until_complete(main())
"""


class DiscardSink:
    """The sink process on 127.0.0.1, a free port; stopped (SIGTERM) on exit."""

    def __init__(self, core: int | None) -> None:
        self._core = core
        self._process: subprocess.Popen[str] | None = None
        self.port = 0
        self.received_bytes = 0

    def __enter__(self) -> Self:
        self._process = subprocess.Popen(  # noqa: S603 - this interpreter, our own code
            [sys.executable, "-c", SINK_SOURCE, str(-1 if self._core is None else self._core)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None  # noqa: S101 - PIPE was asked for
        self.port = int(self._process.stdout.readline())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            out, _ = self._process.communicate(timeout=10)
            with contextlib.suppress(ValueError):
                self.received_bytes = int(out.strip() or 0)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


# --- the raw writer -------------------------------------------------------------------


class RawMQTTClient(asyncio.Protocol):
    """A raw MQTT connection: it writes a pre-built CONNECT and settles :attr:`connack`
    with the broker's answer, or with the connection's end."""

    def __init__(self, connect_frame: bytes) -> None:
        self._connect_frame = connect_frame
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        transport.write(self._connect_frame)  # type: ignore[attr-defined]  # likewise

    def data_received(self, data: bytes) -> None:
        if not self.connack.done():
            if data[:4] == CONNACK_OK:
                self.connack.set_result(None)
            else:
                self.connack.set_exception(ConnectionError(f"refused: {data[:4].hex()}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(exc or ConnectionError("closed before CONNACK"))


class RawWriter:
    """Connections that write pre-built frames as fast as TCP flow control allows."""

    def __init__(self) -> None:
        self.sent = 0
        self.running = False
        self.connections: list[_RawConnection] = []


class _RawConnection(RawMQTTClient):
    def __init__(self, writer: RawWriter, connect_frame: bytes, batch: bytes, frames: int):
        super().__init__(connect_frame)
        self._writer = writer
        self._batch = batch
        self._frames = frames
        self._paused = False

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self.pump()

    def pump(self) -> None:
        """Write batches until the transport pushes back; give the others a turn after
        ``PUMP_WRITES`` writes, since a fast reader may never push back."""
        transport, writer = self.transport, self._writer
        if transport is None or transport.is_closing():
            return
        for _ in range(PUMP_WRITES):
            if self._paused or not writer.running:
                return
            transport.write(self._batch)
            writer.sent += self._frames
        asyncio.get_running_loop().call_soon(self.pump)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def prebuilt_frames(model: LoadedModel, devices: int) -> list[tuple[bytes, bytes]]:
    """(CONNECT, batch of ``BATCH_FRAMES`` PUBLISH frames) per device: the model's own
    client ids, topics and payloads, so both contenders put the same bytes on the wire."""
    batch = DeviceBatch(model.spec, indices=list(range(devices)), seed=0, base_dir=None)
    first = first_messages(batch, 0.01)
    version = ProtocolVersion.V311
    frames = []
    for index in range(devices):
        message = first[index]
        connect = encode(Connect(batch.device_ids[index], keepalive_s=60), version)
        publish = encode_publish(message.topic.encode(), message.payload, qos=0)
        frames.append((connect, publish * BATCH_FRAMES))
    return frames


async def raw_flood(
    host: str, port: int, frames: list[tuple[bytes, bytes]], *, settle_s: float, window_s: float
) -> tuple[Window, float]:
    """Connect every raw connection (64 attempts in flight), flood, and return the
    measurement window and the connection time."""
    loop = asyncio.get_running_loop()
    writer = RawWriter()
    slots = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(connect_frame: bytes, batch: bytes) -> None:
        async with slots:
            _, connection = await loop.create_connection(
                lambda: _RawConnection(writer, connect_frame, batch, BATCH_FRAMES), host, port
            )
            writer.connections.append(connection)
            await connection.connack

    started = time.monotonic()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S), asyncio.TaskGroup() as group:
            for index, (connect_frame, batch) in enumerate(frames):
                group.create_task(connect(connect_frame, batch), name=f"raw-connect-{index}")
        connect_s = time.monotonic() - started
        writer.running = True
        for connection in writer.connections:
            connection.pump()
        await asyncio.sleep(settle_s)
        first = Sample.take(writer.sent)
        await asyncio.sleep(window_s)
        last = Sample.take(writer.sent)
    finally:
        writer.running = False
        for connection in writer.connections:
            connection.abort()
    await asyncio.sleep(0)  # let the transports close
    return Window(first, last), connect_s


# --- the worker -----------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerRun:
    window: Window
    connect_s: float
    acks: Histogram
    errors: dict[str, int]


async def drive_worker(
    worker: Worker,
    clock: BenchClock,
    *,
    settle_s: float,
    window_s: float,
    profile: cProfile.Profile | None = None,
) -> WorkerRun:
    """Run ``worker`` until all its devices are connected, release the clock, and
    measure one window after ``settle_s`` (profiled, with ``profile``)."""
    stop = asyncio.Event()
    devices = len(worker.devices)
    running = asyncio.create_task(worker.run(stop), name="bench-worker")
    counters = worker.counters
    try:
        connect_s = await wait_until(
            lambda: worker.connected == devices or running.done(), "connect", CONNECT_TIMEOUT_S
        )
        if running.done():
            await running  # it failed: say why
        clock.release()
        await asyncio.sleep(settle_s)
        first = Sample.take(counters.messages_sent, counters.messages_acked, clock.now_s())
        acks_before = worker.ack_latency.copy()
        if profile is not None:
            profile.enable()
        try:
            await asyncio.sleep(window_s)
        finally:
            if profile is not None:
                profile.disable()
        last = Sample.take(counters.messages_sent, counters.messages_acked, clock.now_s())
        acks = worker.ack_latency.since(acks_before)
    finally:
        stop.set()
        await running
    return WorkerRun(Window(first, last), connect_s, acks, dict(counters.errors_by_kind))


def new_worker(
    host: str,
    port: int,
    devices: int,
    *,
    interval_s: float,
    qos: int,
    lead_s: float | None,
    max_inflight: int = 20,
) -> tuple[Worker, BenchClock]:
    clock = BenchClock(lead_s)
    worker = Worker(
        load_model_data(bench_model(interval_s)),
        range(devices),
        RunSettings(
            devices=devices,
            brokers=(BrokerEndpoint(host, port),),
            connect_rate_hz=1e6,
            connect_concurrency=CONNECT_CONCURRENCY,
            qos=qos,
            max_inflight=max_inflight,
        ),
        clock,
    )
    clock.follow(worker.batch)
    return worker, clock


def run_worker(
    host: str,
    port: int,
    args: argparse.Namespace,
    *,
    qos: int = 0,
    interval_s: float | None = None,
    saturate: bool = True,
    profile: cProfile.Profile | None = None,
) -> WorkerRun:
    worker, clock = new_worker(
        host,
        port,
        args.devices,
        interval_s=args.interval_ms / 1000 if interval_s is None else interval_s,
        qos=qos,
        lead_s=args.lead_ms / 1000 if saturate else None,
        max_inflight=args.max_inflight,
    )
    run = run_loop(
        drive_worker(worker, clock, settle_s=args.settle, window_s=args.seconds, profile=profile)
    )
    if run.errors:
        print(f"# worker errors (QoS {qos}): {run.errors}")
    return run


# --- the parts ------------------------------------------------------------------------


def measurement(
    part: str,
    contender: str,
    connections: int,
    window: Window,
    broker_per_s: float | None = None,
    **extra: Any,
) -> Measurement:
    return Measurement(
        part=part,
        contender=contender,
        connections=connections,
        sent_per_s=window.rate("sent"),
        cpu_share=window.cpu_share,
        broker_per_s=broker_per_s,
        **extra,
    )


def broker_part(
    args: argparse.Namespace, frames: list[tuple[bytes, bytes]], server_core: int | None
) -> list[Measurement]:
    """The raw flood over as many connections as the worker has, and over the number
    that gives this broker its best ceiling; then the worker."""
    results = []
    for connections in dict.fromkeys((args.devices, min(args.ceiling_connections, args.devices))):
        with mosquitto(args.broker, server_core) as (host, port, counter):
            window, _ = run_loop(
                raw_flood(
                    host, port, frames[:connections], settle_s=args.settle, window_s=args.seconds
                )
            )
            results.append(measurement("broker", RAW, connections, window, counter.rate(window)))
    with mosquitto(args.broker, server_core) as (host, port, counter):
        run = run_worker(host, port, args)
        ours = measurement(
            "broker",
            IOTIX,
            args.devices,
            run.window,
            counter.rate(run.window),
            schedule_kept=run.window.rate("clock_s"),
        )
    ceiling = max((r.broker_per_s or 0.0 for r in results), default=0.0)
    if ours.broker_per_s is not None and ceiling:
        ours = replace(ours, ratio=ours.broker_per_s / ceiling)
    return [*results, ours]


def sink_part(
    args: argparse.Namespace, frames: list[tuple[bytes, bytes]], server_core: int | None
) -> list[Measurement]:
    with DiscardSink(server_core) as sink:
        window, _ = run_loop(
            raw_flood("127.0.0.1", sink.port, frames, settle_s=args.settle, window_s=args.seconds)
        )
    raw = measurement("sink", RAW, len(frames), window)
    profile = cProfile.Profile() if args.profile else None
    with DiscardSink(server_core) as sink:
        run = run_worker("127.0.0.1", sink.port, args, profile=profile)
    ours = measurement(
        "sink", IOTIX, args.devices, run.window, schedule_kept=run.window.rate("clock_s")
    )
    ours = replace(ours, ratio=ours.per_cpu_s / raw.per_cpu_s)
    if profile is not None:
        print_profile(profile, args.profile, "the iotix worker into the discard sink")
    return [raw, ours]


def qos1_part(args: argparse.Namespace, server_core: int | None) -> list[Measurement]:
    results = []
    with mosquitto(args.broker, server_core) as (host, port, counter):
        run = run_worker(host, port, args, qos=1)
        fastest = measurement(
            "qos1 max",
            IOTIX,
            args.devices,
            run.window,
            counter.rate(run.window),
            acked_per_s=run.window.rate("acked"),
            schedule_kept=run.window.rate("clock_s"),
        )
        results.append(fastest)
    # Offered on the wall clock, the latencies are true; at loads below the maximum
    # they are less those of the worker's own queue.
    for load in args.qos1_load:
        offered = max(fastest.acked_per_s or 0.0, 1.0) * load
        interval_s = max(args.devices / offered, 0.001)
        with mosquitto(args.broker, server_core) as (host, port, counter):
            run = run_worker(host, port, args, qos=1, interval_s=interval_s, saturate=False)
            p50, p99, p999 = run.acks.percentiles([50, 99, 99.9])
            results.append(
                measurement(
                    f"qos1 {load:.0%}",
                    IOTIX,
                    args.devices,
                    run.window,
                    counter.rate(run.window),
                    acked_per_s=run.window.rate("acked"),
                    ack_p50_s=p50,
                    ack_p99_s=p99,
                    ack_p999_s=p999,
                )
            )
    return results


# --- reporting ------------------------------------------------------------------------


def print_table(results: Sequence[Measurement]) -> None:
    header = (
        f"{'part':<11} {'contender':<13} {'conns':>6} {'sent msg/s':>11} {'broker msg/s':>13} "
        f"{'CPU %':>6} {'msg/CPU-s':>10} {'acked/s':>9} {'ack p50/p99/p99.9 ms':>22} "
        f"{'ratio':>7}"
    )
    print_header(header)
    for r in results:
        latency = (
            "-"
            if r.ack_p50_s is None
            else "/".join(figure(v, 1000, 2) for v in (r.ack_p50_s, r.ack_p99_s, r.ack_p999_s))
        )
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        print(
            f"{r.part:<11} {r.contender:<13} {r.connections:>6,} {figure(r.sent_per_s):>11} "
            f"{figure(r.broker_per_s):>13} {figure(r.cpu_share, 100):>6} "
            f"{figure(r.per_cpu_s):>10} {figure(r.acked_per_s):>9} {latency:>22} {ratio:>7}"
        )
    for r in results:
        if r.schedule_kept is not None:
            print(
                f"# {r.part}, {r.contender}: clock ran {r.schedule_kept:.3f} s per wall second "
                "(below 1: the worker was saturated, as meant)"
            )


def verdicts(results: Sequence[Measurement]) -> list[str]:
    lines = []
    found = {(r.part, r.contender): r for r in results}
    floods = [r for r in results if r.part == "broker" and r.contender == RAW and r.broker_per_s]
    ours = found.get(("broker", IOTIX))
    if ours is not None and floods:
        if ours.ratio is None or ours.broker_per_s is None:
            lines.append("broker ceiling: not measured (window too short for $SYS readings)")
        else:
            best = max(floods, key=lambda r: r.broker_per_s or 0.0)
            met = ours.ratio >= TARGET_CEILING_FRACTION
            alike = [r for r in floods if r.connections == ours.connections]
            also = (
                f"; {ours.broker_per_s / alike[0].broker_per_s:.1%} of the flood over as many "
                f"connections ({figure(alike[0].broker_per_s)} msg/s)"
                if alike and alike[0] is not best and alike[0].broker_per_s
                else ""
            )
            lines.append(
                f"broker ceiling: iotix {figure(ours.broker_per_s)} msg/s into Mosquitto = "
                f"{ours.ratio:.1%} of its ceiling, {figure(best.broker_per_s)} msg/s "
                f"(raw flood, {best.connections:,} connections){also} "
                f"(target {TARGET_CEILING_FRACTION:.0%}): "
                f"{'target met' if met else 'target MISSED'}"
            )
    sink = found.get(("sink", IOTIX))
    if sink is not None:
        met = sink.per_cpu_s >= TARGET_SINK_PER_CORE
        raw_sink = found.get(("sink", RAW))
        against = (
            ""
            if raw_sink is None or sink.ratio is None
            else f", {sink.ratio:.1%} of the raw writer's {figure(raw_sink.per_cpu_s)}"
        )
        lines.append(
            f"discard sink: iotix {figure(sink.per_cpu_s)} msg per CPU-second{against} "
            f"(target {TARGET_SINK_PER_CORE:,}): {'target met' if met else 'target MISSED'}"
        )
    for qos1 in results:
        if qos1.part.startswith("qos1"):
            latency = (
                ""
                if qos1.ack_p50_s is None
                else (
                    f", PUBACK latency p50 {figure(qos1.ack_p50_s, 1000, 2)} ms, "
                    f"p99 {figure(qos1.ack_p99_s, 1000, 2)} ms, "
                    f"p99.9 {figure(qos1.ack_p999_s, 1000, 2)} ms"
                )
            )
            lines.append(
                f"{qos1.part}: {figure(qos1.acked_per_s)} acknowledged msg/s, "
                f"{figure(qos1.cpu_share, 100)} % CPU{latency} (recorded)"
            )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--devices", type=int, default=1000, help="devices = connections")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before the window")
    parser.add_argument(
        "--interval-ms", type=float, default=1.0, help="each device's telemetry interval"
    )
    parser.add_argument(
        "--lead-ms",
        type=float,
        default=RunSettings.tick_s * 1000,
        help="schedule a saturated worker may run ahead of its oldest due send "
        "(default: the worker's tick, what one round gathers at most rates)",
    )
    parser.add_argument(
        "--ceiling-connections",
        type=int,
        default=32,
        help="connections of the second raw flood (Mosquitto ingests most with a few dozen)",
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="use this running Mosquitto (mqtt://host:port, with sys_interval set) for every "
        "measurement instead of a fresh one per measurement",
    )
    parser.add_argument("--max-inflight", type=int, default=20, help="QoS 1 window per device")
    parser.add_argument(
        "--qos1-load",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[0.25, 0.7],
        help="offered loads of the QoS 1 latency runs, as fractions of the QoS 1 maximum "
        "(comma-separated)",
    )
    parser.add_argument(
        "--parts",
        default="broker,sink,qos1",
        help="comma-separated parts to run: broker, sink, qos1",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile the worker into the sink and print the top N entries",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    args = parser.parse_args(argv)
    require_open_files(parser, args.devices * 2 + 100, args.devices)
    return args


def main(argv: Sequence[str] | None = None) -> list[Measurement]:
    args = parse_args(argv)
    _, server_core = pin_and_print_machine("mqtt_throughput", pin=not args.no_pin)
    print(
        f"# {args.devices:,} devices/connections, QoS 0 JSON telemetry every "
        f"{args.interval_ms:g} ms per device (saturating, lead {args.lead_ms:g} ms), "
        f"window {args.seconds:g} s after {args.settle:g} s"
    )
    frames = prebuilt_frames(load_model_data(bench_model(args.interval_ms / 1000)), args.devices)
    print(f"# PUBLISH frame: {len(frames[0][1]) // BATCH_FRAMES} bytes")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    results: list[Measurement] = []
    if "broker" in parts:
        results += broker_part(args, frames, server_core)
    if "sink" in parts:
        results += sink_part(args, frames, server_core)
    if "qos1" in parts:
        results += qos1_part(args, server_core)
    print_table(results)
    for line in verdicts(results):
        print(line)
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
