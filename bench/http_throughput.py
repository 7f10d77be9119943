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
import socket
import statistics
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import aiohttp
import uvloop

from harness import (
    SENSOR_BODY,
    Result,
    measure,
    measure_message_worker,
    pin_cores,
    print_rates,
    stop_process,
)

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
        stop_process(process)


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
                async with session.post(url, data=SENSOR_BODY, headers=headers) as response:
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
    url = f"http://127.0.0.1:{port}/api"
    return await measure_message_worker(url, "devices/{device_id}/telemetry", args)


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
    client_core, server_core = pin_cores(pin=not args.no_pin)
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
    print_rates(results, "req/s", "CPU µs/req", "req/CPU-s")
    ratio = statistics.median(ratios)
    print(
        f"iotix / plain, requests per CPU-second: {ratio:.3f}"
        + (f" (median of {', '.join(f'{r:.3f}' for r in ratios)})" if len(ratios) > 1 else "")
        + f"; overhead {1 / ratio - 1:+.1%} CPU per request (target at most +15 %)"
    )


if __name__ == "__main__":
    main()
