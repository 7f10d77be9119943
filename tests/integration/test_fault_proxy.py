"""The fault proxy between iotix clients (and a Worker) and a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import TYPE_CHECKING, Any

import pytest
from broker_helpers import TIMEOUT_S, PahoClient, until

from iotix.adapters.mqtt import MQTTConnectError, MQTTConnection, open_connection
from iotix.clock import WallClock
from iotix.engine.worker import BrokerEndpoint, RunSettings, Worker
from iotix.faults import (
    Bandwidth,
    Blackhole,
    FaultProxy,
    Latency,
    Loss,
    Partition,
    Reset,
    SlowClose,
    TargetDown,
)
from iotix.model.loader import load_model_data
from iotix.protocols.mqtt.session import SessionSettings
from iotix.testing import MosquittoBroker

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

FAST_MODEL: dict[str, Any] = {
    "name": "pulse",
    "fields": {"n": {"kind": "counter"}},
    "messages": {
        "telemetry": {"schedule": {"kind": "interval", "interval_s": 0.1}, "qos": 1},
    },
}
_client_numbers = itertools.count()


async def connect(proxy: FaultProxy) -> MQTTConnection:
    settings = SessionSettings(client_id=f"iotix-proxy-test-{next(_client_numbers)}")
    return await open_connection("127.0.0.1", proxy.port, settings, timeout_s=5.0)


async def publish_acked(connection: MQTTConnection, payload: bytes = b"x") -> None:
    packet_id = connection.publish("iotix-test/proxy", payload, qos=1)
    assert packet_id is not None
    await connection.wait_acked(packet_id)


def worker_through(proxy: FaultProxy, devices: int) -> Worker:
    return Worker(
        load_model_data(FAST_MODEL),
        range(devices),
        RunSettings(
            devices=devices,
            brokers=(BrokerEndpoint("127.0.0.1", proxy.port),),
            reconnect_min_s=0.1,
            reconnect_max_s=0.3,
        ),
        WallClock(),
    )


@contextlib.contextmanager
def subscriber(broker: MosquittoBroker) -> Iterator[PahoClient]:
    """A paho subscriber on the broker itself (not through the proxy), to ``#``."""
    client = PahoClient()
    client.client.connect(broker.host, broker.port)
    client.client.loop_start()
    try:
        assert client.connack.wait(TIMEOUT_S)
        client.subscribe("#", 1)
        yield client
    finally:
        client.client.disconnect()
        client.close()


@pytest.fixture
def paho(mosquitto: MosquittoBroker) -> Iterator[PahoClient]:
    """A paho subscriber on ``mosquitto``, to ``#``."""
    with subscriber(mosquitto) as client:
        yield client


@pytest.fixture
def mosquitto_b(mosquitto_binary: Path) -> Iterator[MosquittoBroker]:
    """A second broker, to fail over to."""
    with MosquittoBroker(binary=mosquitto_binary) as broker:
        yield broker


@pytest.fixture
def paho_b(mosquitto_b: MosquittoBroker) -> Iterator[PahoClient]:
    """A paho subscriber on the second broker, to ``#``."""
    with subscriber(mosquitto_b) as client:
        yield client


def test_without_faults_the_proxy_is_transparent(
    mosquitto: MosquittoBroker, paho: PahoClient
) -> None:
    async def scenario() -> dict[str, Any]:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            connection = await connect(proxy)
            assert proxy.connections == 1
            await publish_acked(connection, b"through the proxy")
            await connection.disconnect()
            await until(lambda: proxy.connections == 0)
            return proxy.stats()

    stats = asyncio.run(scenario())
    message = paho.receive()
    assert (message.topic, message.payload) == ("iotix-test/proxy", b"through the proxy")
    assert stats["connections_accepted"] == 1
    assert stats["faults"] == []


def test_latency_delays_the_puback_both_ways(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            connection = await connect(proxy)
            handle = proxy.apply(Latency(0.2))
            start = loop.time()
            await publish_acked(connection)
            elapsed = loop.time() - start
            handle.revert()
            await connection.disconnect()
            return elapsed, handle.bytes_delayed

    elapsed, delayed = asyncio.run(scenario())
    # PUBLISH out and PUBACK back each wait 0.2 s (timers never fire early by more
    # than the clock's resolution).
    assert elapsed >= 0.39
    assert elapsed < 5.0
    assert delayed > 0


def test_bandwidth_paces_a_large_message(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            connection = await connect(proxy)
            handle = proxy.apply(Bandwidth(100_000, burst_bytes=10_000))
            start = loop.time()
            await publish_acked(connection, b"p" * 60_000)
            elapsed = loop.time() - start
            await connection.disconnect()
            return elapsed, handle.bytes_delayed

    elapsed, delayed = asyncio.run(scenario())
    # 60 KB at 100 KB/s with a 10 KB bucket: at least 0.5 s.
    assert elapsed >= 0.45
    assert elapsed < 10.0
    assert delayed > 0


def test_reset_makes_worker_devices_reconnect(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> tuple[Worker, int]:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            worker = worker_through(proxy, 5)
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: worker.connected == 5 and worker.counters.messages_acked > 5)
            handle = proxy.apply(Reset())
            assert not handle.active
            assert proxy.active == []
            await until(lambda: worker.counters.reconnects >= 5 and worker.connected == 5)
            acked = worker.counters.messages_acked
            await until(lambda: worker.counters.messages_acked > acked + 5)
            stop.set()
            await running
            return worker, handle.connections_reset

    worker, reset = asyncio.run(scenario())
    assert reset == 5
    assert worker.counters.reconnects >= 5
    assert worker.counters.reconciles(), worker.counters.problems()


def test_a_partition_keeps_messages_from_the_broker_until_it_ends(
    mosquitto: MosquittoBroker, paho: PahoClient
) -> None:
    arrivals: list[float] = []
    paho.client.on_message = lambda _c, _u, _m: arrivals.append(time.monotonic())

    async def scenario() -> tuple[float, float, dict[str, Any]]:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            worker = worker_through(proxy, 5)
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: worker.connected == 5 and len(arrivals) > 5)
            handle = proxy.apply(Partition(duration_s=1.0))
            sent = worker.counters.messages_sent
            await until(lambda: not handle.active)
            assert handle.reverted_at_s is not None
            assert worker.counters.messages_sent > sent  # devices kept sending meanwhile
            after = len(arrivals)
            await until(lambda: len(arrivals) > after + 5)
            stop.set()
            await running
            assert worker.counters.reconciles(), worker.counters.problems()
            return handle.applied_at_s, handle.reverted_at_s, handle.stats()

    applied, reverted, stats = asyncio.run(scenario())
    # asyncio's loop clock is time.monotonic; allow for messages already on their way.
    during = [t for t in arrivals if applied + 0.05 <= t < reverted]
    assert during == []
    assert reverted - applied >= 0.99
    assert stats["bytes_dropped"] > 0


def test_a_partition_refuses_new_connections_of_its_share(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> int:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            handle = proxy.apply(Partition())
            with pytest.raises(MQTTConnectError):
                await connect(proxy)
            handle.revert()
            connection = await connect(proxy)
            await publish_acked(connection)
            await connection.disconnect()
            return handle.connections_refused

    assert asyncio.run(scenario()) == 1


def test_target_down_resets_and_refuses_until_reverted(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> dict[str, Any]:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            existing = await connect(proxy)
            handle = proxy.apply(TargetDown())
            await existing.wait_closed()
            with pytest.raises(MQTTConnectError):
                await connect(proxy)
            handle.revert()
            handle.revert()  # idempotent
            assert proxy.active == []
            connection = await connect(proxy)
            await publish_acked(connection)
            await connection.disconnect()
            return handle.stats()

    stats = asyncio.run(scenario())
    assert (stats["connections_reset"], stats["connections_refused"]) == (1, 1)
    assert stats["active"] is False


def test_a_fault_is_reverted_when_its_duration_ends(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> None:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            connection = await connect(proxy)
            handle = proxy.apply(Blackhole(duration_s=0.3))
            assert proxy.active == [handle]
            await until(lambda: not handle.active)
            assert proxy.active == []
            # Nothing was in flight during the blackhole, so the stream is intact.
            await publish_acked(connection)
            await connection.disconnect()

    asyncio.run(scenario())


def test_slow_close_delays_passing_a_close_on(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            connection = await connect(proxy)
            handle = proxy.apply(SlowClose(0.3))
            start = loop.time()
            mosquitto.kill()  # the broker's side closes; ours hears of it late
            await connection.wait_closed()
            return loop.time() - start, handle.closes_delayed

    elapsed, delayed = asyncio.run(scenario())
    assert elapsed >= 0.29
    assert delayed == 1


def test_stop_reverts_every_fault_and_closes_every_connection(
    mosquitto: MosquittoBroker,
) -> None:
    async def scenario() -> None:
        proxy = FaultProxy(mosquitto.host, mosquitto.port)
        await proxy.start()
        connection = await connect(proxy)
        handles = [proxy.apply(Latency(0.1)), proxy.apply(Blackhole(duration_s=0.5))]
        await proxy.stop()
        assert [h.active for h in handles] == [False, False]
        assert proxy.active == []
        assert proxy.connections == 0
        await connection.wait_closed()

    asyncio.run(scenario())


def test_cancelling_the_task_running_the_proxy_reverts_faults_and_closes_sockets(
    mosquitto: MosquittoBroker,
) -> None:
    async def scenario() -> None:
        ready: asyncio.Future[FaultProxy] = asyncio.get_running_loop().create_future()

        async def run_proxy() -> None:
            async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
                ready.set_result(proxy)
                await asyncio.Event().wait()  # until cancelled

        task = asyncio.create_task(run_proxy(), name="proxy")
        proxy = await ready
        connection = await connect(proxy)
        handle = proxy.apply(Partition(share=1.0))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not handle.active
        assert proxy.active == []
        assert proxy.connections == 0
        await connection.wait_closed()
        with pytest.raises(MQTTConnectError):  # nothing listens any more
            await connect(proxy)

    asyncio.run(scenario())


def test_a_share_of_a_half_refuses_some_new_connections_and_not_others(
    mosquitto: MosquittoBroker,
) -> None:
    async def refused(seed: int) -> list[bool]:
        async with FaultProxy(mosquitto.host, mosquitto.port, seed=seed) as proxy:
            proxy.apply(Partition(share=0.5))
            outcome = []
            for _ in range(20):
                try:
                    connection = await connect(proxy)
                except MQTTConnectError:
                    outcome.append(True)
                else:
                    outcome.append(False)
                    await connection.disconnect()
            return outcome

    outcome = asyncio.run(refused(7))
    # Source ports differ per connection, so both groups are drawn.
    assert any(outcome)
    assert not all(outcome)


def test_under_uvloop_faults_apply_and_resets_are_resets(mosquitto: MosquittoBroker) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[float, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            connection = await connect(proxy)
            latency = proxy.apply(Latency(0.1, jitter_s=0.01))
            start = loop.time()
            await publish_acked(connection)
            elapsed = loop.time() - start
            latency.revert()
            down = proxy.apply(TargetDown(duration_s=0.5))
            await connection.wait_closed()
            with pytest.raises(MQTTConnectError):
                await connect(proxy)
            await until(lambda: not down.active)
            connection = await connect(proxy)
            await publish_acked(connection)
            await connection.disconnect()
            return elapsed, down.stats()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        elapsed, stats = runner.run(scenario())
    assert elapsed >= 0.17  # two delays of 0.1 ± 0.01 (uvloop's clock ticks in ms)
    assert (stats["connections_reset"], stats["connections_refused"]) == (1, 1)


def test_after_retarget_a_reconnecting_client_lands_on_the_second_broker(
    mosquitto: MosquittoBroker,
    mosquitto_b: MosquittoBroker,
    paho: PahoClient,
    paho_b: PahoClient,
) -> None:
    async def scenario() -> tuple[int, dict[str, Any]]:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            connection = await connect(proxy)
            await publish_acked(connection, b"before")
            reset = proxy.retarget(mosquitto_b.host, mosquitto_b.port)
            await connection.wait_closed()  # reset: the client must reconnect
            connection = await connect(proxy)  # to the same address as before
            await publish_acked(connection, b"after")
            await connection.disconnect()
            await until(lambda: proxy.connections == 0)
            return reset, proxy.stats()

    reset, stats = asyncio.run(scenario())
    assert paho.receive().payload == b"before"
    assert paho_b.receive().payload == b"after"
    # B has the message that was acknowledged to the client, so A never will.
    assert paho.messages.empty()
    assert paho_b.messages.empty()
    assert reset == 1
    assert stats["retargets"] == 1
    assert stats["target"] == {"host": mosquitto_b.host, "port": mosquitto_b.port}
    assert stats["connections_accepted"] == 2


def test_retarget_without_reset_keeps_existing_connections_on_the_old_broker(
    mosquitto: MosquittoBroker,
    mosquitto_b: MosquittoBroker,
    paho: PahoClient,
    paho_b: PahoClient,
) -> None:
    async def scenario() -> int:
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            existing = await connect(proxy)
            reset = proxy.retarget(mosquitto_b.host, mosquitto_b.port, reset_existing=False)
            newer = await connect(proxy)
            await publish_acked(existing, b"old route")
            await publish_acked(newer, b"new route")
            await existing.disconnect()
            await newer.disconnect()
            return reset

    assert asyncio.run(scenario()) == 0
    assert paho.receive().payload == b"old route"
    assert paho_b.receive().payload == b"new route"
    assert paho.messages.empty()
    assert paho_b.messages.empty()


def test_retarget_fails_worker_devices_over_to_the_second_broker(
    mosquitto: MosquittoBroker, mosquitto_b: MosquittoBroker
) -> None:
    on_a: list[str] = []
    on_b: list[str] = []

    async def scenario(paho_a: PahoClient, paho_b: PahoClient) -> Worker:
        paho_a.client.on_message = lambda _c, _u, m: on_a.append(m.topic)
        paho_b.client.on_message = lambda _c, _u, m: on_b.append(m.topic)
        async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
            worker = worker_through(proxy, 5)
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: worker.connected == 5 and len(on_a) > 5)
            assert on_b == []
            assert proxy.retarget(mosquitto_b.host, mosquitto_b.port) == 5
            await until(
                lambda: worker.counters.reconnects >= 5 and worker.connected == 5 and len(on_b) > 5
            )
            # Every device is on B now: A hears nothing more while B hears plenty.
            heard_by_a, heard_by_b = len(on_a), len(on_b)
            await until(lambda: len(on_b) > heard_by_b + 10)
            assert len(on_a) == heard_by_a
            stop.set()
            await running
            return worker

    with subscriber(mosquitto) as paho_a, subscriber(mosquitto_b) as paho_b:
        worker = asyncio.run(scenario(paho_a, paho_b))
    assert worker.counters.reconciles(), worker.counters.problems()


def test_a_udp_fault_is_refused_by_the_tcp_proxy() -> None:
    async def scenario() -> None:
        async with FaultProxy("127.0.0.1", 9) as proxy:
            with pytest.raises(TypeError, match="Loss"):
                proxy.apply(Loss(0.5))

    asyncio.run(scenario())


class _Sink(asyncio.Protocol):
    """A target that accepts a connection and never reads from it."""

    def __init__(self, transports: list[asyncio.BaseTransport]) -> None:
        self.transports = transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.append(transport)
        transport.pause_reading()  # type: ignore[attr-defined]


@pytest.mark.parametrize("fault", [None, Latency(0.01)], ids=["plain", "latency"])
def test_a_target_that_does_not_read_stops_the_proxy_reading(fault: Latency | None) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        accepted: list[asyncio.BaseTransport] = []
        server = await loop.create_server(lambda: _Sink(accepted), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with FaultProxy("127.0.0.1", port) as proxy:
                if fault is not None:
                    proxy.apply(fault)
                transport, _ = await loop.create_connection(
                    asyncio.Protocol, "127.0.0.1", proxy.port
                )
                try:
                    transport.write(b"z" * (64 * 1024 * 1024))  # type: ignore[attr-defined]
                    (link,) = proxy._links
                    # Paused for the target's sake (not only while it connected).
                    await until(
                        lambda: (
                            link.client.reading_paused
                            and link.upstream.transport is not None
                            and (link.upstream.write_paused or link.client.queued_bytes > 0)
                        )
                    )
                    upstream = link.upstream.transport
                    assert upstream is not None
                    # What the proxy holds is bounded by its high-water marks, and
                    # the rest waits in the sender's own buffer.
                    held = upstream.get_write_buffer_size() + link.client.queued_bytes
                    assert held < 4 * 1024 * 1024
                    assert transport.get_write_buffer_size() > 0  # type: ignore[attr-defined]
                finally:
                    transport.abort()
        finally:
            for sink in accepted:
                sink.abort()  # type: ignore[attr-defined]
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
