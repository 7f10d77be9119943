"""The engine's path for adapters (HTTP, CoAP, Kafka, plugins), driven through the
in-memory adapter: connects, refusals, failures by kind, actions and stages."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from broker_helpers import until

from iotix.adapters.memory import MemoryAdapter
from iotix.clock import WallClock
from iotix.engine.message_worker import MessageWorker
from iotix.engine.stages import Stage
from iotix.engine.worker import DeviceAction, RunSettings, in_share, parse_brokers
from iotix.model.loader import load_model_data

PULSE: dict[str, Any] = {
    "name": "pulse",
    "id": "pulse-{index}",
    "fields": {"level": {"kind": "constant", "value": 1}},
    "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 0.05}, "qos": 1}},
}


def _worker(hub: str, devices: int, **settings: Any) -> MessageWorker:
    settings.setdefault("reconnect_min_s", 0.05)
    settings.setdefault("reconnect_max_s", 0.2)
    MemoryAdapter.hubs.pop(hub, None)
    return MessageWorker(
        load_model_data(PULSE),
        range(devices),
        RunSettings(devices=devices, brokers=parse_brokers(f"memory://{hub}"), **settings),
        WallClock(),
    )


def _run(worker: MessageWorker, until_done: Any) -> MessageWorker:
    async def scenario() -> MessageWorker:
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until_done(worker)
        stop.set()
        await running
        return worker

    return asyncio.run(scenario())


def test_every_message_goes_through_the_adapter_and_is_acknowledged() -> None:
    async def enough(worker: MessageWorker) -> None:
        await until(lambda: worker.counters.messages_acked >= 200)

    worker = _run(_worker("plain", 5), enough)
    hub = MemoryAdapter.hubs["plain"]
    counters = worker.counters
    assert counters.reconciles(), counters.problems()
    assert counters.messages_acked == len(hub.messages) == counters.messages_sent
    assert {device for device, _ in hub.messages} == {f"pulse-{i}" for i in range(5)}
    assert worker.ack_latency.count == counters.messages_acked
    assert not hub.connected  # every link closed at the end


def test_refused_devices_are_counted_and_retried_and_failures_counted_by_kind() -> None:
    async def enough(worker: MessageWorker) -> None:
        await until(
            lambda: worker.counters.connect_failures >= 6 and worker.counters.messages_failed >= 5
        )

    worker = _run(
        _worker("picky", 4, adapter_options={"refuse": ["pulse-1"], "fail_every": 10}), enough
    )
    counters = worker.counters
    assert counters.connect_failures_by_reason == {"refused": counters.connect_failures}
    assert counters.connects == 3
    assert counters.errors_by_kind["memory refused"] == counters.messages_failed
    assert counters.reconciles(), counters.problems()


def test_actions_drop_storm_and_set_on_the_adapter_path() -> None:
    chosen = int(in_share(np.arange(20), 0.5, 0).sum())
    touched: list[int] = []

    async def steps(worker: MessageWorker) -> None:
        await until(lambda: worker.connected == 20)
        touched.append(worker.act(DeviceAction("disconnect", share=0.5, offline_s=0.3)))
        assert worker.connected == 20 - chosen
        await until(lambda: worker.connected == 20)
        touched.append(worker.act(DeviceAction("reconnect_storm")))
        await until(lambda: worker.connected == 20 and worker.counters.reconnects == chosen + 20)
        touched.append(worker.act(DeviceAction("set", field="level", value=7)))
        count = len(MemoryAdapter.hubs["acts"].messages)
        await until(lambda: len(MemoryAdapter.hubs["acts"].messages) > count + 40)

    worker = _run(_worker("acts", 20), steps)
    assert touched == [chosen, 20, 20]
    assert worker.reconnect_time.count == chosen + 20
    assert worker.reconnect_time.max_s >= 0.3
    last = MemoryAdapter.hubs["acts"].messages[-1][1].payload
    assert b'"level":7' in last


def test_stages_connect_and_retire_devices_on_the_adapter_path() -> None:
    async def steps(worker: MessageWorker) -> None:
        await until(lambda: worker.connected == 10)
        await until(lambda: worker.connected == 5)

    stages = (Stage(0.0, 10), Stage(0.5, 10), Stage(0.0, 5))
    worker = _run(_worker("staged", 10, stages=stages), steps)
    assert worker.counters.connects == 10
    assert worker.counters.reconciles(), worker.counters.problems()
