"""Scenario actions on a running worker, against a real Mosquitto: disconnects with
and without DISCONNECT, offline time, reconnect storms, set, and credentials from CSV."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import numpy as np
from broker_helpers import TIMEOUT_S, PahoClient, until
from test_worker import STATUS_MODEL, worker_for

from iotix.engine.worker import DeviceAction, Worker, in_share
from iotix.testing import MosquittoBroker

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path


def _run(
    broker: MosquittoBroker,
    devices: int,
    steps: Callable[[Worker], Awaitable[None]],
    **settings: Any,
) -> Worker:
    async def scenario() -> Worker:
        worker = worker_for(broker, devices, **settings)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.connected == devices)
        await steps(worker)
        stop.set()
        await running
        return worker

    return asyncio.run(scenario())


def test_a_disconnect_of_a_share_drops_those_devices_for_their_offline_time(
    mosquitto: MosquittoBroker,
) -> None:
    chosen = int(in_share(np.arange(40), 0.25, 0).sum())
    touched: list[int] = []

    async def steps(worker: Worker) -> None:
        touched.append(worker.act(DeviceAction("disconnect", share=0.25, offline_s=0.5)))
        await until(lambda: worker.connected == 40 - chosen)
        await until(lambda: worker.connected == 40)

    worker = _run(mosquitto, 40, steps)
    assert touched == [chosen]
    assert 0 < chosen < 40
    assert worker.counters.reconnects == chosen
    assert worker.reconnect_time.count == chosen
    assert worker.reconnect_time.min_s >= 0.5  # they stayed away their offline time
    assert worker.counters.reconciles(), worker.counters.problems()


def test_a_reconnect_storm_brings_every_device_back_at_once(mosquitto: MosquittoBroker) -> None:
    async def steps(worker: Worker) -> None:
        assert worker.act(DeviceAction("reconnect_storm")) == 30
        await until(lambda: worker.counters.reconnects == 30 and worker.connected == 30)

    # With a backoff of up to a minute, only the storm's "at once" brings them back.
    worker = _run(mosquitto, 30, steps, reconnect_min_s=60.0, reconnect_max_s=60.0)
    assert worker.reconnect_time.count == 30
    assert worker.reconnect_time.max_s < 10.0
    assert worker.counters.disconnects == 30


def test_a_clean_disconnect_sends_no_will_and_a_drop_does(mosquitto: MosquittoBroker) -> None:
    paho = PahoClient()
    paho.client.connect(mosquitto.host, mosquitto.port)
    paho.client.loop_start()
    seen: list[bytes] = []

    def received(births: int, wills: int) -> bool:
        while not paho.messages.empty():
            seen.append(paho.messages.get_nowait().payload)
        return seen.count(b"offline") >= wills and len(seen) - seen.count(b"offline") >= births

    async def steps(worker: Worker) -> None:
        await until(lambda: received(births=4, wills=0))
        worker.act(DeviceAction("disconnect", clean=True))
        # Every device is back (a birth each); the broker dropped the wills.
        await until(lambda: received(births=8, wills=0))
        assert b"offline" not in seen
        worker.act(DeviceAction("disconnect"))
        await until(lambda: received(births=12, wills=4))

    try:
        assert paho.connack.wait(TIMEOUT_S)
        paho.subscribe("status/#", 1)
        worker = _run(mosquitto, 4, steps, model=STATUS_MODEL)
    finally:
        paho.client.disconnect()
        paho.close()
    assert seen.count(b"offline") == 4
    assert worker.counters.reconnects == 8


def test_set_gives_the_field_its_new_value_in_the_telemetry(mosquitto: MosquittoBroker) -> None:
    model: dict[str, Any] = {
        "name": "knob",
        "fields": {"level": {"kind": "constant", "value": 1}},
        "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 0.1}}},
    }
    paho = PahoClient()
    paho.client.connect(mosquitto.host, mosquitto.port)
    paho.client.loop_start()

    async def steps(worker: Worker) -> None:
        assert worker.act(DeviceAction("set", field="level", value=7)) == 3

    try:
        assert paho.connack.wait(TIMEOUT_S)
        paho.subscribe("devices/#", 0)

        async def wait_for_seven(worker: Worker) -> None:
            await steps(worker)
            levels: set[Any] = set()

            def seven_seen() -> bool:
                while not paho.messages.empty():
                    levels.add(json.loads(paho.messages.get_nowait().payload)["level"])
                return 7 in levels

            await until(seven_seen)

        _run(mosquitto, 3, wait_for_seven, model=model)
    finally:
        paho.client.disconnect()
        paho.close()


def test_credentials_from_a_csv_file_are_each_devices_own(
    mosquitto_binary: Path, tmp_path: Path
) -> None:
    users = {"alpha": "a-secret", "beta": "b-secret"}
    table = tmp_path / "credentials.csv"
    table.write_text(
        "device_id,username,password\n"
        "pulse-0,alpha,a-secret\n"
        "pulse-1,beta,wrong\n",  # refused by the broker
        encoding="utf-8",
    )
    model = {
        "name": "pulse",
        "id": "pulse-{index}",
        "fields": {"n": {"kind": "counter"}},
        "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 0.2}}},
    }
    with MosquittoBroker(binary=mosquitto_binary, users=users, allow_anonymous=False) as broker:

        async def scenario() -> Worker:
            worker = worker_for(broker, 3, model=model, credentials_file=str(table))
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: worker.connected == 1 and worker.counters.connect_failures >= 2)
            stop.set()
            await running
            return worker

        worker = asyncio.run(scenario())
    # pulse-0 got in; pulse-1's password is wrong; pulse-2 has no row, so no credentials.
    assert worker.counters.connects == 1
    assert sum(worker.counters.connect_failures_by_reason.values()) >= 2
