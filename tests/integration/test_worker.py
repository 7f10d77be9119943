"""A worker against a real Mosquitto: crashes, restarts and reconnect storms."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import TYPE_CHECKING, Any

from broker_helpers import TIMEOUT_S, PahoClient, until

from iotix.clock import WallClock
from iotix.engine.stages import Stage
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


def worker_for(
    broker: MosquittoBroker,
    devices: int,
    *,
    model: dict[str, Any] = FAST_MODEL,
    on_connected: Callable[[int, float], None] | None = None,
    **settings: Any,
) -> Worker:
    """A worker of ``devices`` devices of ``model`` against ``broker``; quick reconnects
    unless ``settings`` say otherwise."""
    settings.setdefault("reconnect_min_s", 0.2)
    settings.setdefault("reconnect_max_s", 1.0)
    return Worker(
        load_model_data(model),
        range(devices),
        RunSettings(
            devices=devices, brokers=(BrokerEndpoint(broker.host, broker.port),), **settings
        ),
        WallClock(),
        on_connected=on_connected,
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

        worker = worker_for(
            mosquitto,
            devices,
            on_connected=on_connected,
            reconnect_min_s=2.0,
            reconnect_max_s=2.0,
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
        worker = worker_for(mosquitto, 20, model=model)
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
        worker = worker_for(
            mosquitto, 3, model=model, on_connected=lambda row, at: ready.append((row, at))
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
        assert paho.connack.wait(TIMEOUT_S)
        paho.subscribe("devices/+/replies/#", 1)
        worker = asyncio.run(scenario())
        reply = paho.receive()
    finally:
        paho.client.disconnect()
        paho.close()
    assert reply.topic == f"devices/{worker.batch.device_ids[1]}/replies/reboot"
    assert b'"status":"ok"' in reply.payload
    counters = worker.counters
    assert (counters.commands_answered, counters.disconnects, counters.reconnects) == (1, 1, 1)
    # Back after its offline time, not after the reconnect backoff's jitter.
    back_row, back_at = ready[3]
    assert back_row == 1
    assert back_at - max(at for _, at in ready[:3]) >= 0.5
    assert counters.reconciles(), counters.problems()


STATUS_MODEL: dict[str, Any] = {
    "name": "announcer",
    "attributes": {"site": "north"},
    "fields": {"n": {"kind": "counter"}},
    "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 0.1}}},
    "commands": {"handlers": {"reboot": {"offline_s": 0.3}}},
    "connection": {
        "will": {
            "topic": "status/{site}/{device_id}",
            "payload": {"kind": "text", "template": "offline"},
            "qos": 1,
        },
        "birth": {
            "topic": "status/{site}/{device_id}",
            "payload": {"kind": "json", "template": {"online": "${online}", "site": "${site}"}},
            "qos": 1,
        },
    },
}


def test_birth_on_every_connect_and_the_will_when_a_device_vanishes(
    mosquitto: MosquittoBroker,
) -> None:
    ready: list[int] = []
    paho = PahoClient()
    paho.client.connect(mosquitto.host, mosquitto.port)
    paho.client.loop_start()

    async def scenario() -> Worker:
        worker = worker_for(
            mosquitto, 2, model=STATUS_MODEL, on_connected=lambda row, _at: ready.append(row)
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: len(ready) == 2)
        paho.client.publish(f"devices/{worker.batch.device_ids[0]}/commands/reboot", b"{}", 1)
        await until(lambda: len(ready) == 3)
        stop.set()
        await running
        return worker

    try:
        assert paho.connack.wait(TIMEOUT_S)
        paho.subscribe("status/#", 1)
        worker = asyncio.run(scenario())
        # Two births, then device 0's will (it vanished), then its second birth; the
        # stop at the end sends DISCONNECT, so no other will.
        seen = [paho.receive() for _ in range(4)]
    finally:
        paho.client.disconnect()
        paho.close()
    first, second = worker.batch.device_ids
    births = [m for m in seen if m.payload != b"offline"]
    wills = [m for m in seen if m.payload == b"offline"]
    assert sorted(m.topic for m in births) == sorted(
        [f"status/north/{first}", f"status/north/{second}", f"status/north/{first}"]
    )
    assert births[0].payload == b'{"online":true,"site":"north"}'
    assert [m.topic for m in wills] == [f"status/north/{first}"]
    assert seen.index(wills[0]) < max(i for i, m in enumerate(seen) if m.topic.endswith(first))
    assert paho.messages.empty()
    assert worker.counters.reconciles(), worker.counters.problems()


def test_stages_connect_devices_in_index_order_and_retire_them_on_the_way_down(
    mosquitto: MosquittoBroker,
) -> None:
    # Up to 6 devices over 0.6 s, hold 0.6 s, down to 2 over 0.6 s: devices 0-1 stay,
    # 2-5 leave with DISCONNECT and do not come back.
    connected_over_time: list[int] = []
    order: list[int] = []

    async def scenario() -> Worker:
        worker = worker_for(
            mosquitto,
            6,
            stages=(Stage(0.6, 6), Stage(0.6, 6), Stage(0.6, 2)),
            on_connected=lambda row, _at: order.append(row),
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.connected == 6)
        connected_over_time.append(worker.connected)
        await until(lambda: worker.connected == 2)
        connected_over_time.append(worker.connected)
        # Retired, not lost: no longer wanted, so no reconnect was scheduled (a lost
        # device counts a disconnect before its reconnect; see the counters below).
        assert [device.wanted for device in worker.devices] == [True] * 2 + [False] * 4
        stop.set()
        await running
        return worker

    worker = asyncio.run(scenario())
    assert order == [0, 1, 2, 3, 4, 5]
    assert connected_over_time == [6, 2]
    counters = worker.counters
    assert (counters.connects, counters.disconnects, counters.reconnects) == (6, 0, 0)
    assert counters.reconciles(), counters.problems()


def test_a_broker_that_stops_reading_backs_devices_up_and_nothing_buffers_without_bound(
    mosquitto: MosquittoBroker,
) -> None:
    # A frozen broker (SIGSTOP) reads nothing: once the socket buffers are full the
    # transport pushes back, and the device's messages are counted as not sent rather
    # than queued in memory; when the broker runs again the device sends again.
    model = {
        "name": "firehose",
        "fields": {"blob": {"kind": "constant", "value": "x" * 60_000}},
        "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 0.005}}},
    }

    async def scenario() -> Worker:
        worker = worker_for(mosquitto, 1, model=model)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.connected == 1)
        pid = mosquitto.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            await until(lambda: worker.counters.errors_by_kind.get(BACKED_UP, 0) > 0)
            connection = worker.devices[0].connection
            assert connection is not None
            assert not connection.writable
        finally:
            os.kill(pid, signal.SIGCONT)
        await until(lambda: worker.devices[0].connection is not None and connection.writable)
        sent = worker.counters.messages_sent
        await until(lambda: worker.counters.messages_sent > sent + 10)
        stop.set()
        await running
        return worker

    worker = asyncio.run(scenario())
    assert worker.counters.reconciles(), worker.counters.problems()


BACKED_UP = "not sent: connection backed up"


def test_the_keepalive_wheel_keeps_silent_devices_connected(mosquitto: MosquittoBroker) -> None:
    # Mosquitto drops a client that sends nothing for 1.5 keepalive periods: devices
    # that send once an hour stay connected only if their PINGREQs go out on time.
    model = {
        "name": "silent",
        "fields": {"n": {"kind": "counter"}},
        "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 3600}}},
    }

    async def scenario() -> Worker:
        worker = worker_for(
            mosquitto,
            5,
            model=model,
            keepalive_s=1,
            duration_s=8.0,  # Mosquitto checks keepalives every few seconds
        )
        await worker.run()
        return worker

    worker = asyncio.run(scenario())
    counters = worker.counters
    assert (counters.connects, counters.disconnects, counters.reconnects) == (5, 0, 0)
