"""HTTP devices against a real aiohttp server: requests, headers, statuses, timeouts,
an unreachable endpoint, and whole fleets through the engine."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from broker_helpers import until

from iotix.adapters.base import (
    AdapterError,
    AdapterSettings,
    DeviceIdentity,
    OutgoingMessage,
)
from iotix.adapters.http import HTTPAdapter
from iotix.clock import WallClock
from iotix.engine.message_worker import MessageWorker
from iotix.engine.worker import RunSettings, parse_brokers
from iotix.model.loader import load_model_data

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

PULSE: dict[str, Any] = {
    "name": "pulse",
    "id": "pulse-{index}",
    "fields": {"n": {"kind": "counter"}},
    "messages": {
        "telemetry": {
            "topic": "devices/{device_id}/telemetry",
            "schedule": {"kind": "interval", "interval_s": 0.1},
        }
    },
}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Sink:
    """An HTTP server that records every request; ``status_for`` picks the answer."""

    port: int = 0
    requests: list[Request] = field(default_factory=list)
    status_for: Callable[[Request], int] = lambda _request: 204
    answer: Callable[[Request], web.Response | None] = lambda _request: None
    hold: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.Response:
        recorded = Request(
            request.method, request.path, dict(request.headers), await request.read()
        )
        self.requests.append(recorded)
        answer = self.answer(recorded)
        if answer is not None:
            return answer
        if self.hold is not None:
            await self.hold.wait()
        return web.Response(status=self.status_for(recorded))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def _sink(**kwargs: Any) -> AsyncIterator[Sink]:
    sink = Sink(**kwargs)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", sink.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sink.port = runner.addresses[0][1]
    try:
        yield sink
    finally:
        if sink.hold is not None:
            sink.hold.set()
        await runner.cleanup()


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_a_message_is_a_request_to_the_base_path_and_its_topic() -> None:
    async def scenario() -> tuple[Sink, Any]:
        async with _sink() as sink:
            endpoint = parse_brokers(f"http://127.0.0.1:{sink.port}/ingest")[0]
            settings = AdapterSettings(
                options={
                    "headers": {"Authorization": "Bearer {password}", "X-Device": "{device_id}"}
                }
            )
            async with HTTPAdapter(endpoint, settings) as adapter:
                link = await adapter.connect(DeviceIdentity("d-1", 1, "user", "tok-1"))
                delivery = await link.send(
                    OutgoingMessage(
                        "devices/d-1/telemetry", b'{"n":1}', headers={"iotix-ts-ms": "5"}
                    )
                )
            return sink, delivery

    sink, delivery = _run(scenario())
    assert delivery.confirmed
    assert delivery.latency_s is not None
    [request] = sink.requests
    assert (request.method, request.path, request.body) == (
        "POST",
        "/ingest/devices/d-1/telemetry",
        b'{"n":1}',
    )
    assert request.headers["Authorization"] == "Bearer tok-1"
    assert request.headers["X-Device"] == "d-1"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["iotix-ts-ms"] == "5"


def test_a_device_with_credentials_and_no_auth_header_uses_basic_auth() -> None:
    async def scenario() -> Sink:
        async with _sink() as sink:
            endpoint = parse_brokers(f"http://127.0.0.1:{sink.port}")[0]
            async with HTTPAdapter(endpoint, AdapterSettings(options={"method": "put"})) as adapter:
                link = await adapter.connect(DeviceIdentity("d-2", 2, "alice", "s3cret"))
                await link.send(OutgoingMessage("t", b"x"))
            return sink

    [request] = _run(scenario()).requests
    assert request.method == "PUT"
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()


def test_statuses_timeouts_and_an_unreachable_server_are_deliveries_not_exceptions() -> None:
    async def scenario() -> list[Any]:
        results = []
        async with _sink(status_for=lambda r: 503 if r.path.endswith("busy") else 201) as sink:
            endpoint = parse_brokers(f"http://127.0.0.1:{sink.port}")[0]
            async with HTTPAdapter(endpoint, AdapterSettings(timeout_s=0.3)) as adapter:
                link = await adapter.connect(DeviceIdentity("d", 0))
                results.append(await link.send(OutgoingMessage("ok", b"")))
                results.append(await link.send(OutgoingMessage("busy", b"")))
                sink.hold = asyncio.Event()  # the server stops answering
                results.append(await link.send(OutgoingMessage("slow", b"")))
        closed = parse_brokers(f"http://127.0.0.1:{_free_port()}")[0]
        async with HTTPAdapter(closed, AdapterSettings(timeout_s=2)) as adapter:
            link = await adapter.connect(DeviceIdentity("d", 0))
            results.append(await link.send(OutgoingMessage("gone", b"")))
        return results

    ok, busy, slow, gone = _run(scenario())
    assert ok.confirmed
    assert (busy.confirmed, busy.error) == (False, "http 503")
    assert (slow.sent, slow.confirmed, slow.error) == (True, False, "timeout")
    assert (gone.sent, gone.error) == (False, "unreachable")


def test_a_bad_method_or_header_template_is_a_configuration_error() -> None:
    endpoint = parse_brokers("http://127.0.0.1:1")[0]
    with pytest.raises(AdapterError, match="HTTP method 'GET'") as info:
        HTTPAdapter(endpoint, AdapterSettings(options={"method": "GET"}))
    assert info.value.kind == "configuration"

    async def bad_template() -> None:
        settings = AdapterSettings(options={"headers": {"X": "{nope}"}})
        async with HTTPAdapter(endpoint, settings) as adapter:
            await adapter.connect(DeviceIdentity("d", 0))

    with pytest.raises(AdapterError, match="header template"):
        _run(bad_template())


def _worker(port: int, devices: int, **settings: Any) -> MessageWorker:
    return MessageWorker(
        load_model_data(PULSE),
        range(devices),
        RunSettings(
            devices=devices,
            brokers=parse_brokers(f"http://127.0.0.1:{port}/api"),
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
            **settings,
        ),
        WallClock(),
    )


def test_a_fleet_of_http_devices_sends_every_message_and_counts_every_answer() -> None:
    async def scenario() -> tuple[Sink, MessageWorker]:
        failing = "pulse-3/telemetry"
        async with _sink(status_for=lambda r: 500 if r.path.endswith(failing) else 204) as sink:
            worker = _worker(sink.port, 10)
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: len(sink.requests) >= 100)
            stop.set()
            await running
            return sink, worker

    sink, worker = _run(scenario())
    counters = worker.counters
    assert counters.reconciles(), counters.problems()
    assert counters.messages_sent == len(sink.requests)
    failed = sum(1 for r in sink.requests if r.path.endswith("pulse-3/telemetry"))
    assert counters.messages_failed == failed
    assert counters.errors_by_kind == {"http 500": failed}
    assert counters.messages_acked == counters.messages_sent - failed
    assert worker.ack_latency.count == counters.messages_acked
    assert {r.path.split("/")[3] for r in sink.requests} == {f"pulse-{i}" for i in range(10)}


def test_http_devices_against_nothing_count_their_failures_by_kind() -> None:
    async def scenario() -> MessageWorker:
        worker = _worker(_free_port(), 3, adapter_timeout_s=1.0, duration_s=1.0)
        await worker.run()
        return worker

    counters = _run(scenario()).counters
    assert counters.messages_sent > 0
    assert counters.messages_acked == 0
    assert counters.errors_by_kind == {"unreachable": counters.messages_failed}
    assert counters.reconciles(), counters.problems()


KNOB: dict[str, Any] = {
    **PULSE,
    "fields": {"level": {"kind": "constant", "value": 1}},
    "commands": {"handlers": {"set_level": {"set": {"level": "payload.value"}}}},
}


@pytest.mark.parametrize("long_poll", [0, 1])
def test_devices_poll_for_commands_and_post_their_replies(long_poll: int) -> None:
    served: set[str] = set()

    def commands(request: Request) -> web.Response | None:
        if request.method != "GET":
            return None
        device = request.path.split("/")[-2]
        if device in served:
            return web.Response(status=204)
        served.add(device)
        return web.json_response({"command": "set_level", "payload": {"value": 5}})

    def replies(sink: Sink) -> list[Request]:
        return [r for r in sink.requests if "/replies/" in r.path]

    async def scenario() -> tuple[Sink, MessageWorker]:
        async with _sink(answer=commands) as sink:
            options = {"commands": {"interval": 0.1, "long_poll": long_poll}}
            worker = MessageWorker(
                load_model_data(KNOB),
                range(3),
                RunSettings(
                    devices=3,
                    brokers=parse_brokers(f"http://127.0.0.1:{sink.port}"),
                    adapter_options=options,
                ),
                WallClock(),
            )
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: len(replies(sink)) == 3)
            await until(lambda: b'"level":5' in sink.requests[-1].body)
            stop.set()
            await running
            return sink, worker

    sink, worker = _run(scenario())
    assert sorted(r.path for r in replies(sink)) == [
        f"/devices/pulse-{i}/replies/set_level" for i in range(3)
    ]
    assert all(b'"status":"ok"' in r.body for r in replies(sink))
    assert worker.counters.commands_received == worker.counters.commands_answered == 3


def test_a_refused_message_is_sent_again_as_many_times_as_configured() -> None:
    seen: set[bytes] = set()

    def first_refused(request: Request) -> int:
        if request.body in seen:
            return 204
        seen.add(request.body)
        return 503

    async def scenario() -> MessageWorker:
        async with _sink(status_for=first_refused) as sink:
            worker = _worker(sink.port, 2, adapter_retries=1)
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: worker.counters.messages_acked >= 10)
            stop.set()
            await running
            return worker

    counters = _run(scenario()).counters
    assert counters.messages_failed == 0
    assert counters.errors_by_kind == {"retried after http 503": counters.messages_acked}
    assert counters.reconciles(), counters.problems()
