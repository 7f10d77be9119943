"""A worker against a real Mosquitto: crashes, restarts and reconnect storms."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from broker_helpers import TIMEOUT_S as PAHO_TIMEOUT_S
from broker_helpers import PahoClient

from iotix.clock import WallClock
from iotix.engine.worker import BrokerEndpoint, RunSettings, Worker
from iotix.model.loader import load_model_data

if TYPE_CHECKING:
    from collections.abc import Callable

    from iotix.testing import MosquittoBroker

FAST_MODEL: dict[str, Any] = {
    "name": "pulse",
    "fields": {"n": {"kind": "counter"}},
    "messages": {
        "telemetry": {"schedule": {"kind": "interval", "interval_s": 0.2}, "qos": 1},
    },
}
TIMEOUT_S = 20.0


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a condition the worker's own tasks make true (bounded)."""
    async with asyncio.timeout(TIMEOUT_S):
        while not condition():
            await asyncio.sleep(0.01)


def worker_for(broker: MosquittoBroker, devices: int, **settings: Any) -> Worker:
    return Worker(
        load_model_data(FAST_MODEL),
        range(devices),
        RunSettings(
            devices=devices,
            brokers=(BrokerEndpoint(broker.host, broker.port),),
            reconnect_min_s=0.2,
            reconnect_max_s=1.0,
            **settings,
        ),
        WallClock(),
        **({"on_connected": settings.pop("on_connected")} if "on_connected" in settings else {}),
    )


def test_every_device_comes_back_after_the_broker_restarts(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> Worker:
        worker = worker_for(mosquitto, 20)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.connected == 20 and worker.counters.messages_acked > 20)
        mosquitto.kill()
        await until(lambda: worker.connected == 0)
        mosquitto.restart()
        await until(lambda: worker.connected == 20)
        acked = worker.counters.messages_acked
        await until(lambda: worker.counters.messages_acked > acked + 20)
        stop.set()
        await running
        return worker

    worker = asyncio.run(scenario())
    counters = worker.counters
    assert counters.connects == 40
    assert counters.reconnects == 20
    assert counters.disconnects == 20
    assert counters.reconciles(), counters.problems()
    # Sent while the broker was down and never acknowledged: counted failed, not lost.
    assert counters.messages_sent == counters.messages_acked + counters.messages_failed


def test_devices_dropped_together_reconnect_spread_out_by_jitter(
    mosquitto: MosquittoBroker,
) -> None:
    reconnected: list[float] = []
    devices = 300

    async def scenario() -> None:
        first_round: set[int] = set()

        def on_connected(row: int, at_s: float) -> None:
            if row in first_round:
                reconnected.append(at_s)
            first_round.add(row)

        worker = Worker(
            load_model_data(FAST_MODEL),
            range(devices),
            RunSettings(
                devices=devices,
                brokers=(BrokerEndpoint(mosquitto.host, mosquitto.port),),
                reconnect_min_s=2.0,
                reconnect_max_s=2.0,
            ),
            WallClock(),
            on_connected=on_connected,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.connected == devices)
        mosquitto.kill()
        await until(lambda: worker.connected == 0)
        mosquitto.restart()
        await until(lambda: len(reconnected) == devices)
        stop.set()
        await running

    asyncio.run(scenario())
    start = min(reconnected)
    spread_s = max(reconnected) - start
    # Full jitter over a 2 s window: not in lockstep, and no 100 ms slot takes a crowd.
    assert spread_s > 1.0
    slots = [int((t - start) / 0.1) for t in reconnected]
    assert max(slots.count(s) for s in set(slots)) < devices * 0.2


def test_a_topic_no_publish_may_carry_is_an_error_per_message_not_a_crash(
    mosquitto: MosquittoBroker,
) -> None:
    # Half the devices render a topic with a wildcard in it: their messages are counted
    # as errors and never sent; the other half keep sending.
    model = {
        "name": "zoned",
        "attributes": {"zone": {"kind": "choice", "values": ["ok", "a+b"]}},
        "fields": {"n": {"kind": "counter"}},
        "messages": {
            "telemetry": {
                "topic": "zones/{zone}/{device_id}",
                "schedule": {"kind": "interval", "interval_s": 0.05},
            }
        },
    }

    async def scenario() -> Worker:
        worker = Worker(
            load_model_data(model),
            range(20),
            RunSettings(devices=20, brokers=(BrokerEndpoint(mosquitto.host, mosquitto.port),)),
            WallClock(),
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.counters.messages_sent >= 40)
        stop.set()
        await running
        return worker

    worker = asyncio.run(scenario())
    counters = worker.counters
    bad = sum(n for kind, n in counters.errors_by_kind.items() if kind.startswith("not sent: bad"))
    assert bad > 0
    assert counters.messages_sent >= 40
    assert counters.reconciles(), counters.problems()


def test_a_reboot_command_drops_the_connection_until_the_device_is_back(
    mosquitto: MosquittoBroker,
) -> None:
    model = {
        "name": "rebooter",
        "fields": {"n": {"kind": "counter"}},
        "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 0.1}}},
        "commands": {"handlers": {"reboot": {"offline_s": 0.5}}},
    }
    ready: list[tuple[int, float]] = []
    paho = PahoClient()
    paho.client.connect(mosquitto.host, mosquitto.port)
    paho.client.loop_start()

    async def scenario() -> Worker:
        worker = Worker(
            load_model_data(model),
            range(3),
            RunSettings(devices=3, brokers=(BrokerEndpoint(mosquitto.host, mosquitto.port),)),
            WallClock(),
            on_connected=lambda row, at: ready.append((row, at)),
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: len(ready) == 3)
        paho.client.publish(f"devices/{worker.batch.device_ids[1]}/commands/reboot", b"{}", 1)
        await until(lambda: len(ready) == 4)
        stop.set()
        await running
        return worker

    try:
        assert paho.connack.wait(PAHO_TIMEOUT_S)
        paho.subscribe("devices/+/replies/#", 1)
        worker = asyncio.run(scenario())
        reply = paho.receive()
    finally:
        paho.client.disconnect()
        paho.client.loop_stop()
    assert reply.topic == f"devices/{worker.batch.device_ids[1]}/replies/reboot"
    assert b'"status":"ok"' in reply.payload
    counters = worker.counters
    assert (counters.commands_answered, counters.disconnects, counters.reconnects) == (1, 1, 1)
    # Back after its offline time, not after the reconnect backoff's jitter.
    back_row, back_at = ready[3]
    assert back_row == 1
    assert back_at - max(at for _, at in ready[:3]) >= 0.5
    assert counters.reconciles(), counters.problems()
