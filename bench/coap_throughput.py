"""CoAP devices (issue 5): 10,000 UDP endpoints in one worker, and the per-core ceiling.

This process is the worker: it is pinned to one core, the servers to the other. Two
parts (``--parts``), in this order:

``scale``
    Issue 5's target: ``--devices`` (10,000) CoAP devices in one
    :class:`~iotix.engine.message_worker.MessageWorker`, each with a UDP socket of its
    own, sending non-confirmable (NON) JSON telemetry (a ``PUT`` to
    ``/bench/devices/{device_id}/telemetry``, six fields: a payload of about 140 bytes,
    a datagram of about 190; 1 s of jitter) every ``--interval`` (10) s, so 1,000
    messages/s in all, against libcoap's ``coap-server``
    (:class:`~iotix.testing.coap.LibCoAPServer`, which creates a resource for every
    path PUT to and answers every NON with a NON 2.04, as a real server does), or with
    ``--scale-server sink`` against the lean UDP sink of the ceiling part. The devices
    connect as fast as the worker opens sockets (``--connect-rate``), then the fleet is
    held for ``--seconds`` (60) after ``--settle`` (3) s. Measured:

    - **set up**: the worker built (the model's batch of ``--devices``), then from
      ``run()`` to the last endpoint open;
    - **messages/s** the worker sent during the hold, against the schedule's
      ``devices / interval``;
    - **what the server received**: coap-server's own log (verbosity 7, one record per
      PDU), parsed once it has stopped growing after the run, or the sink's count;
      and the datagrams the kernel dropped at the server's socket because its receive
      buffer was full (the ``drops`` column of ``/proc/net/udp``). The counters
      reconcile when the server received every message the worker counted sent
      (setup and settle included) and none failed. libcoap 4.3.1 walks all its
      sessions (one per client address) on every pass of its loop: with 1,000 clients
      1,000 messages/s cost it about 6 % of its core (the log included), with 10,000
      clients 65 to 90 %, and it drops a few percent of them at its socket whenever
      it is not scheduled for a few hundred milliseconds. The sink costs 2 % and drops
      nothing;
    - **CPU**: this process's CPU time (``time.process_time``: the worker and this
      harness, which wakes once a second) over the hold, as a share of one core; the
      server's beside it (``/proc/PID/stat``);
    - **memory per device**: the highest figure of this process during the hold minus
      the one just before the worker was built (imports, the model and the server
      already there), over the devices, for the proportional set size (PSS), RSS and
      anonymous memory (``smaps_rollup``). In one process, PSS moves with the other
      processes that map the same libraries (other Pythons of this venv); anonymous
      memory (the heap) does not. Kernel socket memory is in none of them;
    - **schedule lag** (due time to send) of the hold: p50, p99, max.

``ceiling``
    The most one core does: a worker of ``--ceiling-devices`` (1,000) devices, each on
    its own socket, offered far more than it can send (every ``--ceiling-interval``,
    10 ms: 100,000 messages/s), against a lean UDP **sink** in a process of its own on
    the other core (a blocking ``recvfrom`` loop that answers a CON with a piggybacked
    ACK 2.04 and a NON with a NON 2.04, as coap-server does, and counts what it gets;
    coap-server, which logs to count, tops out at about 13,000 messages/s, the sink at
    about 100,000).
    Four contenders, each for ``--ceiling-seconds`` (8) after ``--ceiling-settle`` (2):

    - ``plain asyncio`` NON (the baseline): the same number of uvloop datagram
      endpoints (unconnected, ``sendto(datagram, server)`` as the adapter does), each
      sending its own pre-encoded NON PUT (the path and payload the model made for that
      device, encoded by :func:`iotix.protocols.coap.encode`) once per round of all
      sockets, as fast as it can, taking the responses between rounds;
    - ``iotix worker`` NON: the worker, its clock a :class:`~harness.BenchClock` that
      never runs more than the worker's tick (20 ms) past the earliest send still due,
      as in ``mqtt_throughput.py``: the worker always has a tick of schedule to send
      and sends it as fast as it can, without an ever larger catch-up;
    - ``plain asyncio`` CON: each endpoint keeps one pre-encoded CON in flight and
      sends it again as soon as its ACK comes (NSTART 1, as a device does);
    - ``iotix worker`` CON (QoS 1): the same clock, which also stands still while more
      than two messages per device are sent and not yet confirmed (a device sends one
      exchange at a time: without that brake its queue would only grow).

    Each is measured by messages sent per wall second and per CPU-second of this
    process (``time.process_time``), for CON also confirmed (ACKed 2.04) per
    CPU-second, which is the figure for CON; the sink's count over the same window
    shows whether it kept up (``sink/s``, and ``dropped/s`` at its socket). The plain
    NON flood outruns the sink: it gets fewer answers back than it sends, which
    flatters its CPU per message (a line says by how much the sink fell behind). The
    ratios iotix / plain, per CPU-second, are the figures to trust: absolute rates
    drift with what else runs on the machine.

Run: ``.venv/bin/python bench/coap_throughput.py [--parts scale,ceiling] [--devices 10000]
[--seconds 60]`` (about 2 minutes; needs libcoap's ``coap-server``, Debian
``libcoap3-bin``). Every server is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from harness import (
    BenchClock,
    Sample,
    Window,
    cpu_seconds,
    first_messages,
    pin_and_print_machine,
    pin_process,
    proc_sizes,
    raise_open_file_limit,
    room_sensor_fields,
    run_loop,
    stop_process,
    wait_until,
)
from iotix.clock import WallClock
from iotix.engine.message_worker import MessageWorker
from iotix.engine.worker import RunSettings, parse_brokers
from iotix.model.loader import load_model_data
from iotix.model.runtime import DeviceBatch
from iotix.protocols.coap import (
    CoAPMessage,
    Code,
    ContentFormat,
    MessageType,
    OptionNumber,
    encode,
    encode_uint,
    path_options,
)
from iotix.testing.coap import LibCoAPServer

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from iotix.metrics import Counters

TARGET_DEVICES = 10_000
TARGET_INTERVAL_S = 10.0
LAG_P99_BAR_S = 0.250  # issue 3's bar for MQTT, the only one the project has set
BASE_PATH = "bench"  # coap://127.0.0.1:PORT/bench: the devices' paths start with it
TICK_S = RunSettings.tick_s  # the worker's tick: the lead of the saturating clock
BACKLOG_PER_DEVICE = 2  # CON: messages sent and not yet confirmed, per device, at most
SETUP_TIMEOUT_S = 120.0
LOG_QUIET_S = 1.0  # coap-server's log unchanged this long: it has written everything
LOG_TIMEOUT_S = 30.0
STUCK_CHECK_S = 1.0  # plain CON: resend a CON unanswered this long (a lost datagram)
PLAIN = "plain asyncio"
SERVER_NAMES = {"coap-server": "coap-server", "sink": "UDP sink"}  # --scale-server
IOTIX = "iotix worker"


def coap_model(interval_s: float, jitter_s: float) -> dict[str, Any]:
    """A room sensor: six fields in a JSON payload of about 140 bytes, every
    ``interval_s`` (first sends spread over one interval), QoS 0 (NON)."""
    return {
        "name": "coap_sensor",
        "id": "sensor-{index:05d}",
        "fields": room_sensor_fields(),
        "messages": {
            "telemetry": {
                "topic": "devices/{device_id}/telemetry",
                "schedule": {"kind": "interval", "interval_s": interval_s, "jitter_s": jitter_s},
                "qos": 0,
            }
        },
    }


def worker_for(
    model: dict[str, Any], devices: int, url: str, clock: Any, args: argparse.Namespace, *, qos: int
) -> MessageWorker:
    rate = args.connect_rate if args.connect_rate > 0 else 1e9  # 0: as fast as it opens
    return MessageWorker(
        load_model_data(model),
        range(devices),
        RunSettings(
            devices=devices,
            brokers=parse_brokers(url),
            connect_rate_hz=rate,
            qos=qos,
            # coap-server creates a resource for a PUT (-d), and refuses a POST to one
            # that does not exist (4.05).
            adapter_options={"method": "PUT"},
        ),
        clock,
    )


@dataclass(frozen=True)
class Memory:
    """This process's memory, from ``/proc/self/smaps_rollup``, in bytes."""

    pss: int  # proportional set size: shared pages divided among their processes
    rss: int
    anonymous: int  # heap and other anonymous pages: what devices allocate

    @staticmethod
    def now() -> Memory:
        found = proc_sizes("smaps_rollup", ("Pss", "Rss", "Anonymous"))
        return Memory(found["Pss"], found["Rss"], found["Anonymous"])

    def peak(self, other: Memory) -> Memory:
        return Memory(
            max(self.pss, other.pss), max(self.rss, other.rss), max(self.anonymous, other.anonymous)
        )


# --- the sink --------------------------------------------------------------------------

# A process of its own on the other core, so that its work is not charged to the
# sender. It answers requests as coap-server does (a CON with a piggybacked ACK 2.04, a
# NON with a NON 2.04 carrying the request's message id, as libcoap 4.3 does), counts
# what it received by type, and prints the counts for every line read on stdin.
SINK = textwrap.dedent(
    """
    import os, socket, sys, threading
    core = int(sys.argv[1])
    if core >= 0:
        os.sched_setaffinity(0, {core})
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind(("127.0.0.1", 0))
    counts = [0, 0, 0, 0]  # CON, NON, ACK, RST

    def report():
        for _ in sys.stdin:
            print(*counts, flush=True)

    threading.Thread(target=report, daemon=True).start()
    print("ready", sock.getsockname()[1], flush=True)
    buffer = bytearray(2048)
    view = memoryview(buffer)
    receive, send = sock.recvfrom_into, sock.sendto
    CON_ANSWER, NON_ANSWER = (0x60, 0x44), (0x50, 0x44)  # ACK 2.04, NON 2.04
    while True:
        size, addr = receive(buffer)
        first = buffer[0]
        kind = first >> 4 & 3
        counts[kind] += 1
        code = buffer[1]
        if kind < 2 and size >= 4 and 0 < code < 32:  # a request: CON or NON, 0.01-0.31
            token_end = 4 + (first & 15)
            answer = CON_ANSWER if kind == 0 else NON_ANSWER
            send(bytes((answer[0] | first & 15, answer[1])) + view[2:token_end], addr)
    """
)


class Sink:
    """The sink process: its port, its CPU time, its counts by message type."""

    def __init__(self, core: int | None) -> None:
        command = [sys.executable, "-c", SINK, str(-1 if core is None else core)]
        self.process = subprocess.Popen(  # noqa: S603 - this interpreter, our script
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        if self.process.stdin is None or self.process.stdout is None:  # asked for above
            raise RuntimeError("the CoAP sink has no pipes")
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        ready = self.stdout.readline().split()
        if not ready or ready[0] != "ready":
            self.close()
            raise RuntimeError("the CoAP sink did not start")
        self.port = int(ready[1])

    def counts(self) -> tuple[int, int]:
        """(CON, NON) datagrams received so far."""
        self.stdin.write("\n")
        self.stdin.flush()
        con, non, _, _ = (int(n) for n in self.stdout.readline().split())
        return con, non

    def cpu_s(self) -> float:
        return cpu_seconds([self.process.pid])

    def close(self) -> None:
        stop_process(self.process)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- scale ----------------------------------------------------------------------------


@dataclass
class ScaleResult:
    devices: int
    interval_s: float
    server: str  # "coap-server" or "UDP sink"
    connected: int = 0
    build_s: float = math.nan  # the MessageWorker constructed
    setup_s: float = math.nan  # run() to the last endpoint open
    hold_s: float = math.nan
    sent_per_s: float = math.nan  # during the hold
    cpu_share: float = math.nan  # this process, during the hold
    server_cpu_share: float = math.nan
    base: Memory | None = None  # just before the worker was built
    peak: Memory | None = None  # the highest of each figure during the hold
    lag_p50_s: float = math.nan
    lag_p99_s: float = math.nan
    lag_max_s: float = math.nan
    sent: int = 0  # the whole run
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    received: int | None = None  # by the server: coap-server's log, or the sink's count
    server_drops: int | None = None  # datagrams the kernel dropped at the server's socket
    problems: list[str] = field(default_factory=list)

    @property
    def expected_per_s(self) -> float:
        return self.devices / self.interval_s

    def per_device_bytes(self, kind: str) -> float:
        """What the hold's peak adds to the base, per device: ``pss``, ``rss`` or
        ``anonymous``."""
        if self.base is None or self.peak is None:
            return math.nan
        return (getattr(self.peak, kind) - getattr(self.base, kind)) / self.devices


async def hold_scale(args: argparse.Namespace, url: str, server_pid: int) -> ScaleResult:
    result = ScaleResult(args.devices, args.interval, SERVER_NAMES[args.scale_server])
    model = coap_model(args.interval, jitter_s=min(1.0, args.interval / 10))
    gc.collect()
    result.base = result.peak = Memory.now()
    started = time.monotonic()
    worker = worker_for(model, args.devices, f"{url}/{BASE_PATH}", WallClock(), args, qos=0)
    result.build_s = time.monotonic() - started
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop), name="scale-worker")
    try:
        result.setup_s = await wait_until(
            lambda: worker.connected >= args.devices or running.done(),
            f"{args.devices:,} endpoints",
            SETUP_TIMEOUT_S,
        )
        result.connected = worker.connected
        if running.done():
            running.result()  # the worker's own failure
            raise RuntimeError("the worker stopped before every device was connected")
        await asyncio.sleep(args.settle)
        lag = worker.schedule_lag.copy()
        sent = worker.counters.messages_sent
        wall, cpu = time.monotonic(), time.process_time()
        server_cpu = cpu_seconds([server_pid])
        end = wall + args.seconds
        while (now := time.monotonic()) < end:
            await asyncio.sleep(min(1.0, end - now))
            result.peak = result.peak.peak(Memory.now())
        result.hold_s = time.monotonic() - wall
        result.cpu_share = (time.process_time() - cpu) / result.hold_s
        result.server_cpu_share = (cpu_seconds([server_pid]) - server_cpu) / result.hold_s
        result.sent_per_s = (worker.counters.messages_sent - sent) / result.hold_s
        held = worker.schedule_lag.since(lag)
        result.lag_p50_s, result.lag_p99_s = held.percentiles((50, 99))
        result.lag_max_s = held.max_s
        if worker.connected < args.devices:
            result.problems.append(f"{args.devices - worker.connected:,} devices lost")
    finally:
        stop.set()
        await running
    counters = worker.counters
    result.sent, result.failed = counters.messages_sent, counters.messages_failed
    result.errors = dict(counters.errors_by_kind)
    return result


def settled_log_count(server: LibCoAPServer) -> int:
    """The requests coap-server logged under BASE_PATH, once its log stops growing."""
    deadline = time.monotonic() + LOG_TIMEOUT_S
    size, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_size = len(server.log_text())
        if now_size != size:
            size, quiet_since = now_size, time.monotonic()
        elif time.monotonic() - quiet_since >= LOG_QUIET_S:
            break
        time.sleep(0.2)
    return len(server.requests([BASE_PATH]))


def settled_sink_count(the_sink: Sink) -> int:
    """The NON requests the sink received, once its count stops changing."""
    deadline = time.monotonic() + LOG_TIMEOUT_S
    count, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_count = the_sink.counts()[1]
        if now_count != count:
            count, quiet_since = now_count, time.monotonic()
        elif time.monotonic() - quiet_since >= LOG_QUIET_S:
            break
        time.sleep(0.2)
    return count


def udp_drops(port: int) -> int | None:
    """Datagrams the kernel dropped at the UDP socket of 127.0.0.1:``port`` (its
    receive buffer full: the server did not read fast enough), from /proc/net/udp."""
    local = f"0100007F:{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp").read_text(encoding="ascii").splitlines()[1:]:
            fields = line.split()
            if fields[1] == local:
                return int(fields[-1])
    return None


def scale_against(
    args: argparse.Namespace, url: str, pid: int, port: int, count: Callable[[], int]
) -> ScaleResult:
    drops = udp_drops(port)
    try:
        result = run_loop(hold_scale(args, url, pid))
    except (OSError, RuntimeError, TimeoutError) as exc:
        failed = ScaleResult(args.devices, args.interval, SERVER_NAMES[args.scale_server])
        failed.problems.append(f"the part failed: {exc!r}")
        return failed
    result.received = count()
    end_drops = udp_drops(port)
    if drops is not None and end_drops is not None:
        result.server_drops = end_drops - drops
    return result


def run_scale(args: argparse.Namespace, server_core: int | None) -> ScaleResult:
    if args.scale_server == "sink":
        with Sink(server_core) as the_sink:
            return scale_against(
                args,
                f"coap://127.0.0.1:{the_sink.port}",
                the_sink.process.pid,
                the_sink.port,
                lambda: settled_sink_count(the_sink),
            )
    # verbosity 7: every PDU in the log, which is how the server's count is known.
    with LibCoAPServer(verbosity=7, dynamic_resources=max(100_000, 2 * args.devices)) as server:
        if server.pid is not None:
            pin_process(server.pid, server_core)
        return scale_against(
            args, server.url, server.pid or 0, server.port, lambda: settled_log_count(server)
        )


def print_scale(r: ScaleResult, args: argparse.Namespace) -> None:
    mib = 1 / 2**20
    counted = "from its log" if r.server == "coap-server" else "by its own count"
    print(
        f"## scale: {r.devices:,} devices, one worker, NON PUT every {r.interval_s:g} s "
        f"against {r.server} (counted {counted}), hold {args.seconds:g} s after "
        f"{args.settle:g} s"
    )
    for problem in r.problems:
        print(f"#   problem: {problem}")
    if math.isnan(r.hold_s):
        return
    print(
        f"set up        worker built in {r.build_s:.2f} s; {r.connected:,} of {r.devices:,} "
        f"endpoints open in {r.setup_s:.2f} s ({r.connected / r.setup_s:,.0f}/s)"
    )
    print(
        f"sent          {r.sent_per_s:,.1f} messages/s during the hold, expected "
        f"{r.expected_per_s:,.1f} ({r.sent_per_s / r.expected_per_s:.3f} of it)"
    )
    print(
        f"CPU           this process {r.cpu_share:.1%} of one core "
        f"({r.cpu_share / r.sent_per_s * 1e6:.0f} µs per message); {r.server} "
        f"{r.server_cpu_share:.1%}"
    )
    if r.base is not None and r.peak is not None:
        print(
            f"memory        per device: PSS {r.per_device_bytes('pss') / 1024:.2f} KiB (from "
            f"{r.base.pss * mib:,.1f} to {r.peak.pss * mib:,.1f} MiB), RSS "
            f"{r.per_device_bytes('rss') / 1024:.2f} KiB, anonymous "
            f"{r.per_device_bytes('anonymous') / 1024:.2f} KiB (PSS also moves with other "
            f"processes mapping the same libraries; anonymous does not)"
        )
    print(
        f"schedule lag  p50 {r.lag_p50_s * 1000:.1f} ms, p99 {r.lag_p99_s * 1000:.1f} ms, "
        f"max {r.lag_max_s * 1000:.1f} ms"
    )
    errors = ", ".join(f"{kind} {count:,}" for kind, count in r.errors.items()) or "none"
    drops = "?" if r.server_drops is None else f"{r.server_drops:,}"
    received = "?" if r.received is None else f"{r.received:,} ({r.received - r.sent:+,})"
    print(
        f"counters      sent {r.sent:,} (the whole run), failed {r.failed:,}, errors: "
        f"{errors}; {r.server} received {received}; the kernel dropped {drops} at its "
        f"socket (receive buffer full)"
    )
    reconciled = r.received == r.sent and r.failed == 0 and r.sent > 0
    # Every datagram the worker counted reached the server's socket: read, or dropped
    # there because the server did not read in time.
    delivered = (
        r.received is not None
        and r.server_drops is not None
        and r.received + r.server_drops == r.sent
        and r.failed == 0
    )
    criteria = {
        "every device connected": r.connected == r.devices and not r.problems,
        "at least 99 % of the schedule sent": r.sent_per_s >= 0.99 * r.expected_per_s,
        "nothing failed": r.failed == 0,
        "every datagram at the server's socket": delivered,
        f"schedule lag p99 within {LAG_P99_BAR_S * 1000:g} ms": r.lag_p99_s <= LAG_P99_BAR_S,
    }
    missed = [what for what, met in criteria.items() if not met]
    print(
        f"verdict       the worker, {r.devices:,} devices at NON every {r.interval_s:g} s: "
        + (
            f"HOLDS ({', '.join(criteria)})"
            if not missed
            else f"does NOT hold: not {'; not '.join(missed)}"
        )
    )
    print(
        f"verdict       counters {'reconcile' if reconciled else 'do NOT reconcile'}: sent "
        f"{r.sent:,}, {r.server} received {received}"
        + (
            ""
            if reconciled or not r.server_drops
            else f"; the {r.server_drops:,} dropped at its socket make up "
            f"{'the difference' if delivered else 'part of it'}"
        )
    )
    if r.devices != TARGET_DEVICES or r.interval_s != TARGET_INTERVAL_S:
        print(
            f"#   not issue 5's size: it asks for {TARGET_DEVICES:,} devices every "
            f"{TARGET_INTERVAL_S:g} s"
        )


# --- the ceiling: the contenders ------------------------------------------------------


@dataclass(frozen=True)
class CeilingResult:
    kind: str  # "NON" or "CON"
    contender: str
    sockets: int
    wall_s: float
    cpu_s: float
    sent: int  # in the window
    confirmed: int  # in the window (CON)
    sink_received: int  # in the window, of this kind
    sink_dropped: int  # in the window: datagrams the kernel dropped at the sink's socket
    sink_cpu_s: float
    failed: int = 0  # in the window (iotix)
    errors: dict[str, int] = field(default_factory=dict)  # in the window (iotix)

    @property
    def sent_per_s(self) -> float:
        return self.sent / self.wall_s

    @property
    def confirmed_per_s(self) -> float:
        return self.confirmed / self.wall_s

    @property
    def cpu_share(self) -> float:
        return self.cpu_s / self.wall_s

    @property
    def per_cpu_s(self) -> float:
        """The figure of merit: NON sent, CON confirmed, per CPU-second of this process."""
        done = self.confirmed if self.kind == "CON" else self.sent
        return done / self.cpu_s if self.cpu_s else math.nan


async def measure_window(
    kind: str,
    *,
    contender: str,
    sockets: int,
    counts: Callable[[], tuple[int, int]],
    the_sink: Sink,
    args: argparse.Namespace,
    counters: Counters | None = None,
) -> CeilingResult:
    """Wait ``--ceiling-settle``, then measure over ``--ceiling-seconds``: ``counts``
    gives (sent, confirmed) so far; ``counters``, a worker's, its failures."""
    await asyncio.sleep(args.ceiling_settle)
    column = 0 if kind == "CON" else 1
    sink_start, sink_cpu = the_sink.counts()[column], the_sink.cpu_s()
    drops = udp_drops(the_sink.port) or 0
    failed, errors = (
        (0, {}) if counters is None else (counters.messages_failed, dict(counters.errors_by_kind))
    )
    start = Sample.take(*counts())
    await asyncio.sleep(args.ceiling_seconds)
    window = Window(start, Sample.take(*counts()))
    if counters is not None:
        failed = counters.messages_failed - failed
        errors = {
            error: count - errors.get(error, 0)
            for error, count in counters.errors_by_kind.items()
            if count != errors.get(error, 0)
        }
    return CeilingResult(
        kind,
        contender,
        sockets,
        window.wall_s,
        window.cpu_s,
        window.sent,
        window.acked,
        the_sink.counts()[column] - sink_start,
        (udp_drops(the_sink.port) or 0) - drops,
        the_sink.cpu_s() - sink_cpu,
        failed,
        errors,
    )


def prebuilt_datagrams(model: dict[str, Any], devices: int, *, confirm: bool) -> list[bytes]:
    """Each device's PUT as the adapter would send it (its path, Content-Format JSON,
    a payload the model made for it), encoded once; CON with a 4-byte token."""
    spec = load_model_data(model).spec
    batch = DeviceBatch(spec, indices=list(range(devices)), seed=0)
    first = first_messages(batch, 0.01)
    content_format = (int(OptionNumber.CONTENT_FORMAT), encode_uint(int(ContentFormat.JSON)))
    datagrams = []
    for index in range(devices):
        message = first[index]
        options = (*path_options([BASE_PATH, *message.topic.split("/")]), content_format)
        datagrams.append(
            encode(
                CoAPMessage(
                    MessageType.CON if confirm else MessageType.NON,
                    Code.PUT,
                    index & 0xFFFF,
                    index.to_bytes(4, "big") if confirm else b"",
                    options,
                    message.payload,
                )
            )
        )
    return datagrams


@dataclass
class PlainStats:
    sent: int = 0
    confirmed: int = 0
    responses: int = 0
    running: bool = True


class PlainEndpoint(asyncio.DatagramProtocol):
    """One baseline socket: counts the responses; for CON, sends its datagram again
    as soon as the ACK to it comes (one CON in flight, NSTART 1)."""

    def __init__(self, stats: PlainStats, datagram: bytes, server: tuple[str, int]) -> None:
        self.stats = stats
        self.datagram = datagram
        self.message_id = datagram[2:4]
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.outstanding = False
        self.progress = 0  # exchanges done; the stuck check compares it between checks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:  # noqa: ARG002
        stats = self.stats
        stats.responses += 1
        # An ACK (type 2) to our message id, while ours is in flight.
        if data[0] >> 4 & 3 == 2 and self.outstanding and data[2:4] == self.message_id:
            stats.confirmed += 1
            self.progress += 1
            self.outstanding = False
            if stats.running:
                self.send()

    def send(self) -> None:
        if self.transport is not None:
            self.transport.sendto(self.datagram, self.server)
            self.outstanding = True
            self.stats.sent += 1


async def plain(
    port: int, datagrams: list[bytes], the_sink: Sink, args: argparse.Namespace, *, confirm: bool
) -> CeilingResult:
    loop = asyncio.get_running_loop()
    server = ("127.0.0.1", port)
    stats = PlainStats()
    endpoints = [PlainEndpoint(stats, datagram, server) for datagram in datagrams]
    transports = []
    for endpoint in endpoints:
        transport, _ = await loop.create_datagram_endpoint(
            lambda endpoint=endpoint: endpoint, local_addr=("127.0.0.1", 0)
        )
        transports.append(transport)

    async def flood() -> None:
        sends = [
            (transport.sendto, datagram)
            for transport, datagram in zip(transports, datagrams, strict=True)
        ]
        while stats.running:
            for sendto, datagram in sends:
                sendto(datagram, server)
            stats.sent += len(sends)
            await asyncio.sleep(0)  # the responses, between rounds

    async def unstick() -> None:
        seen = [0] * len(endpoints)
        while stats.running:
            await asyncio.sleep(STUCK_CHECK_S)
            for i, endpoint in enumerate(endpoints):
                if endpoint.outstanding and endpoint.progress == seen[i]:
                    endpoint.send()  # lost: the sink never saw it, or its ACK was lost
                seen[i] = endpoint.progress

    if confirm:
        for endpoint in endpoints:
            endpoint.send()
        helper = asyncio.create_task(unstick(), name="plain-unstick")
    else:
        helper = asyncio.create_task(flood(), name="plain-flood")
    try:
        return await measure_window(
            "CON" if confirm else "NON",
            contender=PLAIN,
            sockets=len(endpoints),
            counts=lambda: (stats.sent, stats.confirmed),
            the_sink=the_sink,
            args=args,
        )
    finally:
        stats.running = False
        helper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await helper
        for transport in transports:
            transport.close()


async def iotix(
    port: int, the_sink: Sink, args: argparse.Namespace, *, confirm: bool
) -> CeilingResult:
    devices = args.ceiling_devices
    clock = BenchClock(TICK_S, BACKLOG_PER_DEVICE * devices if confirm else None)
    model = coap_model(args.ceiling_interval, jitter_s=0.0)
    worker = worker_for(
        model, devices, f"coap://127.0.0.1:{port}/{BASE_PATH}", clock, args, qos=int(confirm)
    )
    clock.follow(worker.batch, worker.counters)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop), name="ceiling-worker")
    try:
        await wait_until(
            lambda: worker.connected >= devices or running.done(),
            f"{devices:,} endpoints",
            SETUP_TIMEOUT_S,
        )
        if running.done():
            running.result()
            raise RuntimeError("the worker stopped before every device was connected")
        clock.release()
        counters = worker.counters
        result = await measure_window(
            "CON" if confirm else "NON",
            contender=IOTIX,
            sockets=devices,
            counts=lambda: (counters.messages_sent, counters.messages_acked),
            the_sink=the_sink,
            args=args,
            counters=counters,
        )
    finally:
        stop.set()
        await running
    return result


def run_ceiling(args: argparse.Namespace, server_core: int | None) -> list[CeilingResult]:
    model = coap_model(args.ceiling_interval, jitter_s=0.0)
    results = []
    with Sink(server_core) as the_sink:
        for confirm in (False, True):
            datagrams = prebuilt_datagrams(model, args.ceiling_devices, confirm=confirm)
            results.append(
                run_loop(plain(the_sink.port, datagrams, the_sink, args, confirm=confirm))
            )
            results.append(run_loop(iotix(the_sink.port, the_sink, args, confirm=confirm)))
    return results


def print_ceiling(results: Sequence[CeilingResult], args: argparse.Namespace) -> None:
    print(
        f"## ceiling: one core, {args.ceiling_devices:,} sockets, into a UDP sink on the other "
        f"core (answers like coap-server), {args.ceiling_seconds:g} s after "
        f"{args.ceiling_settle:g} s; iotix offered "
        f"{args.ceiling_devices / args.ceiling_interval:,.0f} messages/s"
    )
    print(
        f"{'':4} {'contender':14} {'sent/s':>9} {'confirmed/s':>12} {'CPU':>6} "
        f"{'CPU µs/msg':>10} {'per CPU-s':>10} {'sink/s':>9} {'dropped/s':>9} {'sink CPU':>8}"
    )
    for r in results:
        done = r.confirmed if r.kind == "CON" else r.sent
        confirmed = f"{r.confirmed_per_s:,.0f}" if r.kind == "CON" else "-"
        print(
            f"{r.kind:4} {r.contender:14} {r.sent_per_s:>9,.0f} {confirmed:>12} "
            f"{r.cpu_share:>6.1%} {r.cpu_s / done * 1e6 if done else math.nan:>10.1f} "
            f"{r.per_cpu_s:>10,.0f} {r.sink_received / r.wall_s:>9,.0f} "
            f"{r.sink_dropped / r.wall_s:>9,.0f} {r.sink_cpu_s / r.wall_s:>8.1%}"
        )
    found = {(r.kind, r.contender): r for r in results}
    for kind, what in (("NON", "sent"), ("CON", "confirmed")):
        ours, plain_result = found.get((kind, IOTIX)), found.get((kind, PLAIN))
        if ours is None or plain_result is None:
            continue
        print(
            f"iotix / plain, {kind} {what} per CPU-second: "
            f"{ours.per_cpu_s / plain_result.per_cpu_s:.3f}"
        )
    for r in results:
        if r.sink_dropped:
            print(
                f"#   {r.kind} {r.contender}: the sink dropped "
                f"{r.sink_dropped / (r.sink_dropped + r.sink_received):.0%} of what reached it "
                f"(it could not read faster), so fewer answers came back to this contender "
                f"than to one the sink kept up with: its CPU per message is the lower for it"
            )
        if r.failed or r.errors:
            errors = ", ".join(f"{k} {v:,}" for k, v in r.errors.items()) or "none"
            print(
                f"#   {r.kind} {r.contender}: {r.failed:,} failed in the window; errors: {errors}"
            )


# --- the run --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--parts", default="scale,ceiling", help="comma-separated: scale, ceiling")
    parser.add_argument("--devices", type=int, default=TARGET_DEVICES, help="scale: devices")
    parser.add_argument(
        "--interval", type=float, default=TARGET_INTERVAL_S, help="scale: seconds between sends"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="scale: the hold, s")
    parser.add_argument("--settle", type=float, default=3.0, help="scale: before the hold, s")
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=0.0,
        help="scale: devices connected per second (default 0: as fast as sockets open)",
    )
    parser.add_argument(
        "--scale-server",
        choices=("coap-server", "sink"),
        default="coap-server",
        help="scale: libcoap's coap-server (counted from its log) or the lean sink",
    )
    parser.add_argument("--ceiling-devices", type=int, default=1_000)
    parser.add_argument(
        "--ceiling-interval", type=float, default=0.01, help="ceiling: iotix's send interval, s"
    )
    parser.add_argument("--ceiling-seconds", type=float, default=8.0)
    parser.add_argument("--ceiling-settle", type=float, default=2.0)
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(args.parts) - {"scale", "ceiling"}:
        parser.error(f"unknown parts: {sorted(unknown)}")
    if args.devices < 1 or args.ceiling_devices < 1:
        parser.error("--devices and --ceiling-devices must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    limit = raise_open_file_limit()
    _, server_core = pin_and_print_machine(
        "coap_throughput", pin=not args.no_pin, note=f"; open-file limit {limit:,} per process"
    )
    sys.stdout.flush()
    started = time.monotonic()
    found: dict[str, Any] = {}
    if "scale" in args.parts:
        found["scale"] = scale = run_scale(args, server_core)
        print_scale(scale, args)
        sys.stdout.flush()
    if "ceiling" in args.parts:
        found["ceiling"] = ceiling = run_ceiling(args, server_core)
        print_ceiling(ceiling, args)
    print(f"# done in {time.monotonic() - started:.0f} s")
    sys.stdout.flush()
    return found


if __name__ == "__main__":
    main()
