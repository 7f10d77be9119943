"""MQTT connection rate of one worker, against a raw asyncio client in the same run.

One :class:`~iotix.engine.worker.Worker` (one process, pinned to one core) connects
``--devices`` devices to one Mosquitto (a fresh one per measurement, pinned to the
other core) with ``connect_rate_hz`` far above what it can reach, so that only the
``--concurrency`` attempts in flight per endpoint (64 by default: Mosquitto's listen
backlog is 100) hold it back. The figure is connections per second, from the first
attempt to the last CONNACK.

Baseline, in the same run and against an identical broker: a raw asyncio client
(uvloop) that opens as many TCP connections with the same concurrency, writes a
pre-built CONNECT frame on each (the same client ids) and waits for the CONNACK. The
contenders alternate ``--repeats`` times and the best of each is kept.

The devices' model sends once an hour, so almost nothing but connecting happens.

Run: ``.venv/bin/python bench/mqtt_connect_rate.py [--devices 10000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness import (
    pin_and_print_machine,
    pin_process,
    print_header,
    print_profile,
    require_open_files,
    run_loop,
)
from iotix.clock import WallClock
from iotix.engine.worker import BrokerEndpoint, RunSettings, Worker, parse_brokers
from iotix.metrics import Histogram
from iotix.model.loader import load_model_data
from iotix.model.runtime import DeviceBatch
from iotix.protocols.mqtt.packets import Connect, ProtocolVersion, encode
from iotix.testing import MosquittoBroker
from mqtt_throughput import RawMQTTClient, bench_model

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

TARGET_CONNECTIONS_PER_S = 5_000  # per worker
MAX_DEVICES = 15_000  # the open-file hard limit is 20,000 per process
CONNECT_TIMEOUT_S = 120.0

RAW = "raw asyncio"
IOTIX = "iotix worker"


@dataclass(frozen=True)
class Measurement:
    """One contender connecting every device once."""

    contender: str
    connections: int
    elapsed_s: float  # first attempt to last CONNACK
    failures: int
    latency_p50_s: float
    latency_p99_s: float
    cpu_share: float  # CPU-seconds of this process per wall second, over elapsed_s
    ratio: float | None = None  # connections/s over the raw client's

    @property
    def per_s(self) -> float:
        return self.connections / self.elapsed_s if self.elapsed_s else math.nan


@contextlib.contextmanager
def broker_address(url: str | None, core: int | None) -> Iterator[tuple[str, int]]:
    """A fresh Mosquitto pinned to ``core``, or the running one at ``url``."""
    if url is not None:
        endpoint = parse_brokers(url)[0]
        yield endpoint.host, endpoint.port
        return
    with MosquittoBroker() as broker:
        if broker.pid is not None:
            pin_process(broker.pid, core)
        yield broker.host, broker.port


# --- the raw client -------------------------------------------------------------------


async def raw_connect(
    host: str, port: int, frames: Sequence[bytes], concurrency: int
) -> Measurement:
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)
    clients: list[RawMQTTClient] = []
    latency = Histogram()
    last = [0.0]
    failures = 0

    async def connect(frame: bytes) -> None:
        nonlocal failures
        async with slots:
            started = time.monotonic()
            try:
                _, client = await loop.create_connection(lambda: RawMQTTClient(frame), host, port)
                clients.append(client)
                await client.connack
            except OSError:
                failures += 1
                return
        done = time.monotonic()
        latency.record(done - started)
        last[0] = max(last[0], done)

    first = time.monotonic()
    first_cpu = time.process_time()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S), asyncio.TaskGroup() as group:
            for index, frame in enumerate(frames):
                group.create_task(connect(frame), name=f"raw-connect-{index}")
        cpu_s = time.process_time() - first_cpu
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.abort()
    await asyncio.sleep(0)
    p50, p99 = latency.percentiles([50, 99])
    elapsed = last[0] - first
    return Measurement(RAW, latency.count, elapsed, failures, p50, p99, _share(cpu_s, elapsed))


def _share(cpu_s: float, elapsed_s: float) -> float:
    return cpu_s / elapsed_s if elapsed_s > 0 else math.nan


def connect_frames(devices: int) -> list[bytes]:
    """Pre-built CONNECTs with the worker's own client ids (MQTT 3.1.1, keepalive 60)."""
    model = load_model_data(bench_model(3600.0))
    ids = DeviceBatch(model.spec, indices=list(range(devices))).device_ids
    return [encode(Connect(i, keepalive_s=60), ProtocolVersion.V311) for i in ids]


# --- the worker -----------------------------------------------------------------------


async def worker_connect(
    host: str,
    port: int,
    devices: int,
    *,
    concurrency: int,
    rate_hz: float,
    profile: cProfile.Profile | None = None,
) -> Measurement:
    """Connect every device; with ``profile``, profile until the last CONNACK."""
    clock = WallClock()
    connected: list[float] = []
    worker = Worker(
        load_model_data(bench_model(3600.0)),
        range(devices),
        RunSettings(
            devices=devices,
            brokers=(BrokerEndpoint(host, port),),
            connect_rate_hz=rate_hz,
            connect_concurrency=concurrency,
        ),
        clock,
        on_connected=lambda _row, at_s: connected.append(at_s),
    )
    stop = asyncio.Event()
    if profile is not None:
        profile.enable()
    first = clock.now_s()  # the worker's ramp makes its first attempt right away
    first_cpu = time.process_time()
    running = asyncio.create_task(worker.run(stop), name="bench-worker")
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            while len(connected) < devices and not running.done():
                await asyncio.sleep(0.002)
        cpu_s = time.process_time() - first_cpu  # to within one 2 ms poll of the end
    finally:
        if profile is not None:
            profile.disable()
        stop.set()
        await running
    latency = worker.connect_latency
    p50, p99 = latency.percentiles([50, 99])
    elapsed = max(connected, default=first) - first
    failures = worker.counters.connect_failures
    return Measurement(IOTIX, len(connected), elapsed, failures, p50, p99, _share(cpu_s, elapsed))


# --- reporting ------------------------------------------------------------------------


def print_table(results: Sequence[Measurement]) -> None:
    header = (
        f"{'contender':<13} {'connections':>11} {'seconds':>8} {'conn/s':>9} "
        f"{'failures':>8} {'latency p50 ms':>14} {'p99 ms':>8} {'CPU %':>6} {'ratio':>7}"
    )
    print_header(header)
    for r in results:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        print(
            f"{r.contender:<13} {r.connections:>11,} {r.elapsed_s:>8.3f} {r.per_s:>9,.0f} "
            f"{r.failures:>8,} {r.latency_p50_s * 1000:>14.2f} {r.latency_p99_s * 1000:>8.2f} "
            f"{r.cpu_share * 100:>6.0f} {ratio:>7}"
        )


def verdict(ours: Measurement, raw: Measurement) -> str:
    met = ours.per_s >= TARGET_CONNECTIONS_PER_S and ours.connections > 0
    return (
        f"connection rate: iotix {ours.per_s:,.0f} connections/s per worker, "
        f"{ours.per_s / raw.per_s:.1%} of the raw client's {raw.per_s:,.0f} "
        f"(target {TARGET_CONNECTIONS_PER_S:,}): {'target met' if met else 'target MISSED'}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--devices", type=int, default=10_000, help="connections per run")
    parser.add_argument("--concurrency", type=int, default=64, help="connection attempts in flight")
    parser.add_argument("--rate-hz", type=float, default=1e6, help="the worker's connect rate")
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender; best kept")
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="use this running Mosquitto (mqtt://host:port) instead of a fresh one per run",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile the worker's first run and print the top N entries",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    args = parser.parse_args(argv)
    if not 0 < args.devices <= MAX_DEVICES:
        parser.error(f"--devices must be between 1 and {MAX_DEVICES:,} (open-file limit)")
    require_open_files(parser, args.devices + 100, args.devices)
    return args


def main(argv: Sequence[str] | None = None) -> list[Measurement]:
    args = parse_args(argv)
    _, server_core = pin_and_print_machine("mqtt_connect_rate", pin=not args.no_pin)
    print(
        f"# {args.devices:,} connections per run, {args.concurrency} attempts in flight, "
        f"worker connect_rate_hz {args.rate_hz:g}, best of {args.repeats} alternating runs, "
        f"{'the broker at ' + args.broker if args.broker else 'a fresh Mosquitto per run'}"
    )
    frames = connect_frames(args.devices)
    profile = cProfile.Profile() if args.profile else None
    best: dict[str, Measurement] = {}
    for repeat in range(args.repeats):
        with broker_address(args.broker, server_core) as (host, port):
            raw = run_loop(raw_connect(host, port, frames, args.concurrency))
        with broker_address(args.broker, server_core) as (host, port):
            ours = run_loop(
                worker_connect(
                    host,
                    port,
                    args.devices,
                    concurrency=args.concurrency,
                    rate_hz=args.rate_hz,
                    profile=profile if repeat == 0 else None,
                )
            )
        print(f"# run {repeat + 1}: raw {raw.per_s:,.0f}/s, iotix {ours.per_s:,.0f}/s")
        for result in (raw, ours):
            if result.contender not in best or result.per_s > best[result.contender].per_s:
                best[result.contender] = result
    raw, ours = best[RAW], best[IOTIX]
    results = [raw, Measurement(**{**ours.__dict__, "ratio": ours.per_s / raw.per_s})]
    print_table(results)
    print(verdict(results[1], raw))
    if profile is not None:
        print_profile(profile, args.profile, "the iotix worker connecting (first run)")
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
