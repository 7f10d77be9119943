"""What the benchmark scripts share: cores, processes, the measuring window, reporting.

Plain functions and dataclasses. The scripts import it by name (``from harness import
...``), as they import each other: run as ``.venv/bin/python bench/NAME.py``, bench/ is
on ``sys.path``, and the smoke tests put it there.

The model benchmarks import it too: what it imports is loaded before they take their
baselines, so it is not in their figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import platform
import pstats
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import uvloop

from iotix.clock import WallClock
from iotix.engine.message_worker import MessageWorker
from iotix.engine.worker import RunSettings, parse_brokers
from iotix.model.loader import load_model_data

if TYPE_CHECKING:
    import argparse
    import cProfile
    from collections.abc import Callable, Collection, Coroutine, Sequence

    from iotix.metrics import Counters
    from iotix.model.runtime import DeviceBatch, Message

T = TypeVar("T")

CLK_TCK = os.sysconf("SC_CLK_TCK")
BOUND_REFRESH_S = 0.0005  # how stale the BenchClock's lead bound may be (a numpy min)
FOLLOW_S = 0.01  # how often measure_message_worker copies the worker's count


# --- cores and processes --------------------------------------------------------------


def pin_cores(*, pin: bool) -> tuple[int | None, int | None]:
    """Pin this process to one CPU; return it and another CPU for the servers (the
    broker, the sink), so that sender and receiver do not share a core."""
    if not pin or not hasattr(os, "sched_setaffinity"):
        return None, None
    try:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[0]})
    except OSError:
        return None, None
    return cores[0], cores[1] if len(cores) > 1 else None


def pin_process(pid: int, core: int | None) -> None:
    if core is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {core})


def raise_open_file_limit() -> int:
    """Soft limit up to the hard one (one file per connection); returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def require_open_files(parser: argparse.ArgumentParser, files: int, devices: int) -> None:
    """Raise the open-file limit; a usage error if ``files`` do not fit under it."""
    limit = raise_open_file_limit()
    if files > limit:
        parser.error(f"--devices {devices} needs more open files than the limit {limit}")


def stop_process(process: subprocess.Popen[str], timeout_s: float = 10.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited within ``timeout_s``."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of ``pids`` (those that still exist), in seconds."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
            # The command name may hold spaces and parentheses: split after the last ')'.
            fields = stat.rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def proc_sizes(file: str, keys: Collection[str], pid: int | str = "self") -> dict[str, int]:
    """The sizes ``keys`` (``VmRSS``, ``Pss``...) in ``/proc/PID/FILE`` (``status``,
    ``smaps_rollup``), in bytes: the kernel writes kB. A key the file lacks is left out;
    a file that cannot be read raises OSError."""
    found = {}
    text = Path(f"/proc/{pid}/{file}").read_text(encoding="ascii", errors="replace")
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            found[key] = int(value.split()[0]) * 1024
    return found


# --- the machine ----------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return cpu


def machine(server_core: int | None, client_core: int | None) -> str:
    """The header line's facts: CPU, cores, how this process and the servers are
    pinned, Python and uvloop."""
    pinned = (
        "not pinned"
        if client_core is None
        else f"this process on core {client_core}, servers on core {server_core}"
    )
    return (
        f"{cpu_model()}, nproc {os.cpu_count()}, {pinned}, "
        f"Python {platform.python_version()}, uvloop {uvloop.__version__}"
    )


def pin_and_print_machine(
    script: str, *, pin: bool, note: str = ""
) -> tuple[int | None, int | None]:
    """:func:`pin_cores`, then the header line ``# SCRIPT: machine facts`` and ``note``."""
    client_core, server_core = pin_cores(pin=pin)
    print(f"# {script}: {machine(server_core, client_core)}{note}")
    return client_core, server_core


# --- the event loop -------------------------------------------------------------------


def run_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop, the engine's event loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float) -> float:
    """Poll ``condition``; return how long it took, or fail after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not done within {timeout_s:g} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


# --- the measuring window -------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A contender's counts at one instant, with this process's wall and CPU time."""

    wall_s: float
    cpu_s: float
    sent: int
    acked: int = 0
    clock_s: float = 0.0

    @staticmethod
    def take(sent: int, acked: int = 0, clock_s: float = 0.0) -> Sample:
        return Sample(time.monotonic(), time.process_time(), sent, acked, clock_s)


@dataclass(frozen=True)
class Window:
    """What a contender did between two samples."""

    start: Sample
    end: Sample

    @property
    def wall_s(self) -> float:
        return self.end.wall_s - self.start.wall_s

    @property
    def cpu_s(self) -> float:
        return self.end.cpu_s - self.start.cpu_s

    @property
    def cpu_share(self) -> float:
        return self.cpu_s / self.wall_s

    @property
    def sent(self) -> int:
        return self.end.sent - self.start.sent

    @property
    def acked(self) -> int:
        return self.end.acked - self.start.acked

    def rate(self, attribute: str) -> float:
        done: float = getattr(self.end, attribute) - getattr(self.start, attribute)
        return done / self.wall_s


@dataclass
class Result:
    """Items (requests, records) a contender had answered over one window."""

    name: str
    count: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.count / self.wall_s

    @property
    def cpu_per_item_us(self) -> float:
        return self.cpu_s / self.count * 1e6 if self.count else math.nan

    @property
    def per_cpu_s(self) -> float:
        return self.count / self.cpu_s if self.cpu_s else math.nan


async def measure(name: str, count: list[int], settle_s: float, seconds: float) -> Result:
    """Wait ``settle_s``, then measure ``count[0]`` (kept up to date by the contender)
    over ``seconds``."""
    await asyncio.sleep(settle_s)
    start = Sample.take(count[0])
    await asyncio.sleep(seconds)
    window = Window(start, Sample.take(count[0]))
    return Result(name, window.sent, window.wall_s, window.cpu_s)


async def measure_message_worker(url: str, topic: str, args: argparse.Namespace) -> Result:
    """One :class:`MessageWorker` of ``args.devices`` devices of :func:`sensor_model`
    sending on ``topic`` to ``url`` every ``args.interval`` seconds, on the wall clock:
    its acknowledged messages measured as :func:`measure` does, over ``args.seconds``
    after ``args.settle``. Says so if any failed."""
    worker = MessageWorker(
        load_model_data(sensor_model(topic, args.interval)),
        range(args.devices),
        RunSettings(devices=args.devices, brokers=parse_brokers(url), connect_rate_hz=100_000),
        WallClock(),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    count = [0]

    async def follow() -> None:
        while True:
            count[0] = worker.counters.messages_acked
            await asyncio.sleep(FOLLOW_S)

    follower = asyncio.create_task(follow())
    result = await measure("iotix MessageWorker", count, args.settle, args.seconds)
    stop.set()
    await running
    follower.cancel()
    counters = worker.counters
    if counters.messages_failed:
        print(f"  (iotix: {counters.messages_failed} failed: {counters.errors_by_kind})")
    return result


class BenchClock:
    """Wall-clock seconds for a benchmark worker, with brakes.

    - It stands still (at 0) until :meth:`release`, so that no device sends before the
      whole fleet is connected; then it runs at wall-clock speed from where it stood.
    - With ``lead_s``, after :meth:`follow`, it never runs more than ``lead_s`` past the
      earliest send still due in the batch: a worker that cannot keep up gets batches
      of ``lead_s`` of schedule, sent as fast as it can, instead of an ever larger
      catch-up. Without ``lead_s`` it is the wall clock, and latencies are true.
    - With ``backlog``, after :meth:`follow` with the worker's counters, it stands still
      while that many messages are sent (handed to the devices) and not yet confirmed
      or failed: a CoAP device has one CON exchange at a time, and what is due while it
      waits queues behind it.
    """

    def __init__(self, lead_s: float | None = None, backlog: int | None = None) -> None:
        self._lead_s = lead_s
        self._backlog = backlog
        self._batch: DeviceBatch | None = None
        self._counters: Counters | None = None
        self._origin = time.monotonic()
        self._start_epoch_s = time.time()
        self._held = True
        self._last = 0.0
        self._bound = 0.0
        self._bound_at = -math.inf

    @property
    def start_epoch_s(self) -> float:
        return self._start_epoch_s

    def follow(self, batch: DeviceBatch, counters: Counters | None = None) -> None:
        self._batch, self._counters = batch, counters

    def release(self) -> None:
        self._origin = time.monotonic() - self._last
        self._held = False

    def now_s(self) -> float:
        if self._held:
            return self._last
        if self._backlog is not None:
            counters = self._counters
            if (
                counters is not None
                and counters.messages_sent - counters.messages_acked - counters.messages_failed
                >= self._backlog
            ):
                return self._last
        now = time.monotonic() - self._origin
        if self._lead_s is not None and self._batch is not None:
            # next_due_s() is a numpy min over the batch: refresh the bound now and then,
            # not on every reading (the engine reads the clock once per acknowledgement).
            if now - self._bound_at > BOUND_REFRESH_S:
                self._bound = self._batch.next_due_s() + self._lead_s
                self._bound_at = now
            now = min(now, self._bound)
        self._last = max(self._last, now)
        return self._last


# --- what the devices send ------------------------------------------------------------

# What the plain baselines of the HTTP and Kafka benchmarks send: a fixed reading of the
# sensor of ``sensor_model``, about 150 bytes.
SENSOR_BODY = (
    b'{"device_id":"bench-00001","ts_ms":1700000000000,"seq":1,"temperature":21.37,'
    b'"humidity":45.2,"setpoint":21.0,"heating":false,"battery":99.5,"status":"ok"}'
)


def sensor_model(topic: str, interval_s: float) -> dict[str, Any]:
    """The sensor ``SENSOR_BODY`` is a reading of: JSON telemetry on ``topic`` every
    ``interval_s``, QoS 1."""
    return {
        "name": "bench",
        "id": "bench-{index:05d}",
        "fields": {
            "temperature": {"kind": "random_walk", "start": 21, "step": 0.1, "round": 2},
            "humidity": {"kind": "uniform", "low": 40, "high": 50, "round": 1},
            "setpoint": {"kind": "constant", "value": 21.0},
            "heating": {"kind": "expression", "expr": "temperature < setpoint"},
            "battery": {"kind": "counter", "start": 100, "step": -0.01, "round": 2},
            "status": {"kind": "constant", "value": "ok"},
        },
        "messages": {
            "telemetry": {
                "topic": topic,
                "schedule": {"kind": "interval", "interval_s": interval_s},
                "qos": 1,
            }
        },
    }


def room_sensor_fields() -> dict[str, Any]:
    """A room sensor's six fields, about 140 bytes of JSON: a reverting random walk, a
    daily wave with noise, two random readings, a draining battery, a status."""
    return {
        "temperature": {
            "kind": "random_walk",
            "start": {"kind": "gaussian", "mean": 21, "stddev": 1.5},
            "step": 0.1,
            "mean": 21,
            "reversion": 0.05,
            "min": -20,
            "max": 60,
            "round": 2,
        },
        "humidity": {
            "kind": "wave",
            "shape": "sine",
            "period_s": 86400,
            "amplitude": 8,
            "offset": 45,
            "noise": 0.5,
            "round": 1,
        },
        "pressure": {"kind": "gaussian", "mean": 1013.25, "stddev": 2, "round": 1},
        "co2": {"kind": "uniform", "low": 400, "high": 900, "round": 0},
        "battery": {"kind": "counter", "start": 100, "step": -0.01, "round": 2},
        "status": {"kind": "constant", "value": "ok"},
    }


def first_messages(batch: DeviceBatch, step_s: float) -> dict[int, Message]:
    """Each device's first message, by device index: ``batch`` advanced in steps of
    ``step_s`` until every device has sent one."""
    first: dict[int, Message] = {}
    now = 0.0
    while len(first) < batch.size:
        now += step_s
        for message in batch.advance(now):
            first.setdefault(message.device_index, message)
    return first


# --- reporting ------------------------------------------------------------------------


def figure(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    """``value * scale`` with thousands separators, or "-" for none."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value * scale:,.{digits}f}"


def print_header(header: str) -> None:
    """A table's header line and a rule under it."""
    print(header)
    print("-" * len(header))


def print_rates(results: Sequence[Result], rate: str, cpu_per_item: str, per_cpu_s: str) -> None:
    """A row per result: rate, CPU µs per item and items per CPU-second, under the
    column titles given."""
    print(f"{'':32} {rate:>10} {cpu_per_item:>11} {per_cpu_s:>10}")
    for result in results:
        print(
            f"{result.name:32} {result.rate:>10,.0f} {result.cpu_per_item_us:>11.1f} "
            f"{result.per_cpu_s:>10,.0f}"
        )


def print_profile(profile: cProfile.Profile, top: int, what: str) -> None:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    print(f"# cProfile of {what}, by own time")
    print(out.getvalue())
