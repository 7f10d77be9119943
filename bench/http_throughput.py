"""HTTP devices: client CPU per request of an iotix worker against a plain aiohttp loop.

A minimal keep-alive HTTP server (a raw asyncio responder answering ``204 No
Content``, in a process of its own pinned to the other core) takes the requests. On
this process's core, in the same run, at the same offered load:

``plain``
    The baseline: one aiohttp ``ClientSession`` and ``--devices`` tasks, each POSTing a
    fixed ~150-byte JSON body every ``--interval`` seconds over keep-alive.
``iotix``
    One :class:`~iotix.engine.message_worker.MessageWorker` with ``--devices`` devices
    of a model sending a JSON reading every ``--interval`` seconds through the HTTP
    adapter: the model evaluated, the payload encoded, every answer counted and its
    latency recorded.

Both are measured over ``--seconds`` after ``--settle`` seconds: requests answered per
second and this process's CPU time per request (``time.process_time``). With
``--repeat N`` (15) the two alternate N times, each going first in turn, and the median
of the N ratios is the verdict: on this virtual machine one pair's ratio moves by ±20 %
from pair to pair (the plain loop's own cost by ±10 %), so many short pairs (5 s after
1 s) say more than a few long ones. Requests per CPU-second is the per-core ceiling at
that load's mix; iotix's overhead is how much more CPU a request costs it than the plain
loop (target: at most 15 %). ``--max`` also runs the plain loop closed (each task POSTs
again as soon as it is answered): the most a core does with aiohttp here.

Run: ``.venv/bin/python bench/http_throughput.py [--devices 200] [--interval 0.1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import uvloop

from iotix.clock import WallClock
from iotix.engine.message_worker import MessageWorker
from iotix.engine.worker import RunSettings, parse_brokers
from iotix.model.loader import load_model_data

if TYPE_CHECKING:
    from collections.abc import Iterator

SERVER = textwrap.dedent(
    """
    import asyncio, os, sys
    import uvloop

    ANSWER = b"HTTP/1.1 204 No Content\\r\\nServer: sink\\r\\n\\r\\n"

    class Sink(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer, self.count = transport, b"", 0
        def data_received(self, data):
            buffer = self.buffer + data
            while True:
                end = buffer.find(b"\\r\\n\\r\\n")
                if end < 0:
                    break
                head = buffer[:end].lower()
                length = 0
                at = head.find(b"content-length:")
                if at >= 0:
                    length = int(head[at + 15:].split(b"\\r\\n", 1)[0])
                if len(buffer) < end + 4 + length:
                    break
                buffer = buffer[end + 4 + length:]
                self.transport.write(ANSWER)
            self.buffer = buffer

    async def main(port):
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Sink, "127.0.0.1", port, backlog=1024)
        print("ready", flush=True)
        await server.serve_forever()

    if len(sys.argv) > 2:
        os.sched_setaffinity(0, {int(sys.argv[2])})
    uvloop.run(main(int(sys.argv[1])))
    """
)

BODY = (
    b'{"device_id":"bench-00001","ts_ms":1700000000000,"seq":1,"temperature":21.37,'
    b'"humidity":45.2,"setpoint":21.0,"heating":false,"battery":99.5,"status":"ok"}'
)

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
    "messages": {
        "telemetry": {
            "topic": "devices/{device_id}/telemetry",
            "schedule": {"kind": "interval", "interval_s": 0.1},
            "qos": 1,
        }
    },
}


@dataclass
class Result:
    name: str
    requests: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_per_request_us(self) -> float:
        return self.cpu_s / self.requests * 1e6 if self.requests else float("nan")

    @property
    def per_cpu_s(self) -> float:
        return self.requests / self.cpu_s if self.cpu_s else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(core: int | None) -> Iterator[int]:
    port = free_port()
    command = [sys.executable, "-c", SERVER, str(port)]
    if core is not None:
        command.append(str(core))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)  # noqa: S603
    try:
        if process.stdout is None or process.stdout.readline().strip() != "ready":
            raise RuntimeError("the sink server did not start")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


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


async def plain(port: int, args: argparse.Namespace, *, closed: bool) -> Result:
    url = f"http://127.0.0.1:{port}/api/devices/bench/telemetry"
    count = [0]
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def device(offset: float) -> None:
            loop = asyncio.get_running_loop()
            due = loop.time() + offset
            while not stop.is_set():
                if not closed:
                    await asyncio.sleep(max(due - loop.time(), 0.0))
                    due += args.interval
                async with session.post(url, data=BODY, headers=headers) as response:
                    await response.read()
                count[0] += 1

        tasks = [
            asyncio.create_task(device(i * args.interval / args.devices))
            for i in range(args.devices)
        ]
        result = await measure(
            "plain aiohttp, closed loop" if closed else "plain aiohttp",
            count,
            args.settle,
            args.seconds,
        )
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


async def iotix(port: int, args: argparse.Namespace) -> Result:
    model = dict(MODEL)
    model["messages"] = {
        "telemetry": {
            **MODEL["messages"]["telemetry"],
            "schedule": {"kind": "interval", "interval_s": args.interval},
        }
    }
    worker = MessageWorker(
        load_model_data(model),
        range(args.devices),
        RunSettings(
            devices=args.devices,
            brokers=parse_brokers(f"http://127.0.0.1:{port}/api"),
            connect_rate_hz=100_000,
        ),
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
    counters = worker.counters
    if counters.messages_failed:
        print(f"  (iotix: {counters.messages_failed} failed: {counters.errors_by_kind})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between sends")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--max", action="store_true", help="also the closed-loop ceiling")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--repeat", type=int, default=15, help="alternate the two N times")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    client_core = server_core = None
    if not args.no_pin and len(cores) >= 2:
        client_core, server_core = cores[0], cores[1]
        os.sched_setaffinity(0, {client_core})
    offered = args.devices / args.interval
    print(
        f"HTTP devices: {args.devices} devices every {args.interval:g} s "
        f"(offered {offered:,.0f} req/s), client on core {client_core}, "
        f"server on core {server_core}, {args.seconds:g} s after {args.settle:g} s"
    )
    results: list[Result] = []
    ratios: list[float] = []
    with server(server_core) as port:
        for turn in range(max(1, args.repeat)):
            # Alternate who goes first, so neither always runs on a warmer (or more
            # fragmented) process.
            if turn % 2:
                ours = uvloop.run(iotix(port, args))
                baseline = uvloop.run(plain(port, args, closed=False))
            else:
                baseline = uvloop.run(plain(port, args, closed=False))
                ours = uvloop.run(iotix(port, args))
            results += [baseline, ours]
            ratios.append(ours.per_cpu_s / baseline.per_cpu_s)
        if args.max:
            results.append(uvloop.run(plain(port, args, closed=True)))
    print(f"{'':32} {'req/s':>10} {'CPU µs/req':>11} {'req/CPU-s':>10}")
    for result in results:
        print(
            f"{result.name:32} {result.rate:>10,.0f} {result.cpu_per_request_us:>11.1f} "
            f"{result.per_cpu_s:>10,.0f}"
        )
    ratio = statistics.median(ratios)
    print(
        f"iotix / plain, requests per CPU-second: {ratio:.3f}"
        + (f" (median of {', '.join(f'{r:.3f}' for r in ratios)})" if len(ratios) > 1 else "")
        + f"; overhead {1 / ratio - 1:+.1%} CPU per request (target at most +15 %)"
    )


if __name__ == "__main__":
    main()
