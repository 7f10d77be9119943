"""The commander against a real Mosquitto and real iotix worker devices (the thermostat
example: ``set_setpoint`` accepts 5 <= value <= 30 and replies after 0.2 s).

Each test runs its devices on its own range of device indices, so the tests can share
one broker: their client ids and topics never meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import paho.mqtt.client as paho
import pytest
from broker_helpers import TIMEOUT_S, stop_paho, until
from paho.mqtt.enums import CallbackAPIVersion

from iotix.clock import WallClock
from iotix.engine.commander import Commander, NoCommandsError, command_targets
from iotix.engine.worker import BrokerEndpoint, RunSettings, Worker
from iotix.model.loader import load_model, load_model_data, read_document

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from iotix.model.loader import LoadedModel
    from iotix.testing import MosquittoBroker

THERMOSTAT = Path(__file__).parents[2] / "examples" / "device-models" / "thermostat.yaml"
SEED = 1234
REPLY_DELAY_S = 0.2
"""The thermostat's ``set_setpoint`` reply delay."""


@contextlib.asynccontextmanager
async def running_devices(
    broker: MosquittoBroker, model: LoadedModel, indices: range
) -> AsyncIterator[Worker]:
    """Devices ``indices`` of ``model`` connected, subscribed to their commands, and
    running until the block ends."""
    ready: set[int] = set()
    worker = Worker(
        model,
        indices,
        RunSettings(
            devices=len(indices),
            brokers=(BrokerEndpoint(broker.host, broker.port),),
            seed=SEED,
            reconnect_min_s=0.2,
            reconnect_max_s=1.0,
        ),
        WallClock(),
        # Called once a device has subscribed to its command topic.
        on_connected=lambda row, _at_s: ready.add(row),
    )
    stop = asyncio.Event()
    run = asyncio.create_task(worker.run(stop), name="devices")
    try:
        await until(lambda: len(ready) == len(indices), TIMEOUT_S)
        yield worker
    finally:
        stop.set()
        await run


async def send_and_drain(
    broker: MosquittoBroker,
    model: LoadedModel,
    indices: range,
    command: str,
    payload: dict[str, Any],
    *,
    timeout_s: float = TIMEOUT_S,
) -> dict[str, Any]:
    """Send one command to every device, wait until each is answered or timed out,
    and return the commander's final summary."""
    targets = command_targets(model, indices, seed=SEED, command=command)
    async with Commander(broker.host, broker.port) as commander:
        await commander.send(targets, command, payload, timeout_s=timeout_s)
        async with asyncio.timeout(timeout_s + TIMEOUT_S):
            await commander.drain()
        return await commander.stop()


def test_every_device_replies_no_sooner_than_its_reply_delay(
    mosquitto_session: MosquittoBroker,
) -> None:
    model = load_model(THERMOSTAT)
    indices = range(8)

    async def scenario() -> tuple[dict[str, Any], Worker]:
        async with running_devices(mosquitto_session, model, indices) as worker:
            summary = await send_and_drain(
                mosquitto_session, model, indices, "set_setpoint", {"value": 22.5}
            )
            return summary, worker

    summary, worker = asyncio.run(scenario())
    assert summary["sent"] == summary["replied"] == summary["ok"] == 8
    assert summary["rejected"] == {}
    assert summary["timed_out"] == summary["late"] == summary["unexpected"] == 0
    assert summary["pending"] == 0
    latency = summary["reply_latency"]
    assert latency["count"] == 8
    assert latency["min_s"] >= REPLY_DELAY_S
    assert summary["reply_latency_hist"]["count"] == 8
    assert worker.counters.commands_received == 8


def test_targets_name_the_devices_a_worker_with_the_same_seed_runs() -> None:
    model = load_model(THERMOSTAT)
    worker = Worker(
        model,
        range(3, 9),
        RunSettings(devices=6, brokers=(BrokerEndpoint("127.0.0.1", 1883),), seed=SEED),
        WallClock(),
    )
    targets = command_targets(model, range(3, 9), seed=SEED, command="set_setpoint")
    assert [t.device_id for t in targets] == worker.batch.device_ids
    assert targets[0].topic == "devices/thermo-00003/commands/set_setpoint"
    assert targets[0].reply_topic == "devices/thermo-00003/replies/set_setpoint"


def test_command_topics_over_attributes_reach_devices_run_with_the_same_seed(
    mosquitto_session: MosquittoBroker,
) -> None:
    # The site is drawn per device from the seed: the commander must draw the same.
    data, _ = read_document(THERMOSTAT)
    data["commands"]["topic"] = "buildings/{site}/thermostats/{device_id}/commands/{command}"
    data["commands"]["reply_topic"] = "buildings/{site}/thermostats/{device_id}/replies"
    model = load_model_data(data, file=THERMOSTAT)
    indices = range(20, 32)
    targets = command_targets(model, indices, seed=SEED, command="set_setpoint")
    assert len({t.topic.split("/")[1] for t in targets}) > 1  # several sites

    async def scenario() -> dict[str, Any]:
        async with running_devices(mosquitto_session, model, indices):
            return await send_and_drain(
                mosquitto_session, model, indices, "set_setpoint", {"value": 19}
            )

    summary = asyncio.run(scenario())
    assert summary["ok"] == 12
    assert summary["timed_out"] == 0


def test_a_value_out_of_range_counts_as_rejected(mosquitto_session: MosquittoBroker) -> None:
    model = load_model(THERMOSTAT)
    indices = range(40, 45)

    async def scenario() -> dict[str, Any]:
        async with running_devices(mosquitto_session, model, indices):
            return await send_and_drain(
                mosquitto_session, model, indices, "set_setpoint", {"value": 35}
            )

    summary = asyncio.run(scenario())
    assert summary["replied"] == 5
    assert summary["ok"] == 0
    assert summary["rejected"] == {"rejected": 5}
    assert summary["reply_latency"]["min_s"] >= REPLY_DELAY_S


def test_an_unknown_command_counts_as_rejected_unknown_command(
    mosquitto_session: MosquittoBroker,
) -> None:
    model = load_model(THERMOSTAT)
    indices = range(50, 54)

    async def scenario() -> dict[str, Any]:
        async with running_devices(mosquitto_session, model, indices):
            return await send_and_drain(mosquitto_session, model, indices, "self_destruct", {})

    summary = asyncio.run(scenario())
    assert summary["replied"] == 4
    assert summary["rejected"] == {"unknown_command": 4}
    assert summary["timed_out"] == 0


def test_commands_to_devices_that_are_not_running_time_out(
    mosquitto_session: MosquittoBroker,
) -> None:
    model = load_model(THERMOSTAT)

    async def scenario() -> dict[str, Any]:
        return await send_and_drain(
            mosquitto_session, model, range(60, 66), "set_setpoint", {"value": 20}, timeout_s=0.3
        )

    summary = asyncio.run(scenario())
    assert summary["sent"] == summary["timed_out"] == 6
    assert summary["replied"] == summary["pending"] == 0
    assert summary["reply_latency"]["count"] == 0


def test_a_reply_after_the_timeout_counts_as_late(mosquitto_session: MosquittoBroker) -> None:
    model = load_model(THERMOSTAT)
    indices = range(70, 74)
    targets = command_targets(model, indices, seed=SEED, command="set_setpoint")

    async def scenario() -> dict[str, Any]:
        async with (
            running_devices(mosquitto_session, model, indices),
            Commander(mosquitto_session.host, mosquitto_session.port) as commander,
        ):
            # Shorter than the reply delay: every command times out, then its reply comes.
            await commander.send(targets, "set_setpoint", {"value": 20}, timeout_s=0.05)
            async with asyncio.timeout(TIMEOUT_S):
                await commander.drain()
            assert commander.stats()["timed_out"] == 4
            await until(lambda: commander.tracker.late == 4, TIMEOUT_S)
            return await commander.stop()

    summary = asyncio.run(scenario())
    assert summary["timed_out"] == summary["late"] == 4
    assert summary["replied"] == summary["unexpected"] == 0
    assert summary["reply_latency"]["count"] == 0


def test_a_reply_with_no_command_outstanding_counts_as_unexpected(
    mosquitto_session: MosquittoBroker,
) -> None:
    model = load_model(THERMOSTAT)
    [target] = command_targets(model, [80], seed=SEED, command="set_setpoint")
    assert target.reply_topic is not None
    reply = {"device_id": target.device_id, "command": "set_setpoint", "status": "ok"}

    async def scenario() -> dict[str, Any]:
        async with Commander(mosquitto_session.host, mosquitto_session.port) as commander:
            await commander.send([target], "set_setpoint", {"value": 20}, timeout_s=0.1)
            await commander.drain()  # timed out: nobody runs the device
            # A stranger answers twice: the first takes the timed-out command (late),
            # the second finds nothing outstanding.
            await asyncio.to_thread(publish, mosquitto_session, target.reply_topic, reply, 2)
            await until(lambda: commander.tracker.unexpected == 1, TIMEOUT_S)
            return await commander.stop()

    summary = asyncio.run(scenario())
    assert summary["timed_out"] == summary["late"] == summary["unexpected"] == 1


def test_sending_to_many_devices_lets_the_loop_run_between_batches(
    mosquitto_session: MosquittoBroker,
) -> None:
    model = load_model(THERMOSTAT)
    targets = command_targets(model, range(1000, 3000), seed=SEED, command="set_setpoint")

    async def scenario() -> tuple[int, dict[str, Any]]:
        turns = 0

        async def count_turns() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        async with Commander(
            mosquitto_session.host, mosquitto_session.port, send_batch=100
        ) as commander:
            counter = asyncio.create_task(count_turns(), name="turns")
            await commander.send(targets, "set_setpoint", {"value": 20}, timeout_s=0.5)
            counter.cancel()
            async with asyncio.timeout(TIMEOUT_S):
                await commander.drain()
            return turns, await commander.stop()

    turns, summary = asyncio.run(scenario())
    assert turns >= 2000 // 100
    assert summary["sent"] == summary["timed_out"] == 2000


def test_a_model_without_commands_is_a_clear_error() -> None:
    model = load_model_data(
        {
            "name": "pulse",
            "fields": {"n": {"kind": "counter"}},
            "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 1}}},
        }
    )
    with pytest.raises(NoCommandsError, match=r"'pulse' has no `commands` section") as caught:
        command_targets(model, range(3), seed=SEED, command="set_setpoint")
    assert caught.value.model == "pulse"


def test_a_handler_without_a_reply_expects_none() -> None:
    data, _ = read_document(THERMOSTAT)
    data["commands"]["handlers"]["set_setpoint"]["reply"] = None
    model = load_model_data(data, file=THERMOSTAT)
    targets = command_targets(model, range(2), seed=SEED, command="set_setpoint")
    assert [t.reply_topic for t in targets] == [None, None]
    # An unknown command is still answered, on the channel's reply topic.
    [unknown] = command_targets(model, [0], seed=SEED, command="nope")
    assert unknown.reply_topic == "devices/thermo-00000/replies/nope"


def publish(broker: MosquittoBroker, topic: str, payload: dict[str, Any], times: int) -> None:
    """Publish a JSON payload ``times`` times at QoS 1 with paho, waiting for each ack."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"paho-{uuid.uuid4()}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for _ in range(times):
            info = client.publish(topic, orjson.dumps(payload), qos=1)
            info.wait_for_publish(timeout=TIMEOUT_S)
            assert info.is_published()
    finally:
        client.disconnect()
        stop_paho(client)
