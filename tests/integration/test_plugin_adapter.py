"""The example plugin (examples/plugins/iotix-udp-json) against a real UDP server: found
through the registry by its entry point, driven by the engine, and run by the CLI.

The plugin must be installed in the venv (scripts/setup does it): these tests fail, not
skip, when it is not, so a green run means a third party's adapter really works.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from broker_helpers import until

from iotix.adapters.base import (
    Adapter,
    AdapterError,
    AdapterSettings,
    Delivery,
    DeviceIdentity,
    OutgoingMessage,
)
from iotix.adapters.registry import adapter_for, known_schemes
from iotix.clock import WallClock
from iotix.engine.message_worker import MessageWorker
from iotix.engine.worker import RunSettings, parse_brokers
from iotix.model.loader import load_model_data

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
THERMOSTAT = REPO_ROOT / "examples" / "device-models" / "thermostat.yaml"
CLI_TIMEOUT_S = 60

PULSE: dict[str, Any] = {
    "name": "pulse",
    "id": "pulse-{index}",
    "fields": {"n": {"kind": "counter"}},
    "messages": {
        "telemetry": {
            "topic": "devices/{device_id}/telemetry",
            "schedule": {"kind": "interval", "interval_s": 0.1},
            "qos": 1,
        }
    },
}

Envelope = dict[str, Any]


@pytest.fixture
def udpjson() -> type[Adapter]:
    """The plugin's adapter class, from the registry; fails the test when the plugin is
    not installed."""
    if "udpjson" not in known_schemes():
        pytest.fail(
            "the example plugin iotix-udp-json is not installed in this venv (no `udpjson` "
            "entry point in the group iotix.adapters): run scripts/setup.",
            pytrace=False,
        )
    return adapter_for("udpjson")


class UDPServer(asyncio.DatagramProtocol):
    """Records every envelope it receives and answers ``ack <seq>`` to those
    ``ack_when`` picks."""

    def __init__(self, ack_when: Callable[[Envelope], bool]) -> None:
        self.ack_when = ack_when
        self.envelopes: list[Envelope] = []
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.DatagramTransport", transport)
        self.port = int(transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        envelope = json.loads(data)
        self.envelopes.append(envelope)
        if self._transport is not None and self.ack_when(envelope):
            self._transport.sendto(f"ack {envelope['seq']}\n".encode(), addr)

    def acked(self) -> list[Envelope]:
        return [e for e in self.envelopes if self.ack_when(e)]


@contextlib.asynccontextmanager
async def udp_server(
    ack_when: Callable[[Envelope], bool] = lambda _envelope: True,
) -> AsyncIterator[UDPServer]:
    """A UDP server on 127.0.0.1, on a port the kernel picks."""
    transport, server = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: UDPServer(ack_when), local_addr=("127.0.0.1", 0)
    )
    try:
        yield server
    finally:
        transport.close()


def _unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _quiet(envelope: Envelope) -> bool:
    return str(envelope["topic"]).endswith("/quiet")


# --- the adapter, through the registry ------------------------------------------------


def test_the_registry_finds_the_plugin_by_its_entry_point(udpjson: type[Adapter]) -> None:
    assert udpjson.__name__ == "UDPJSONAdapter"
    assert udpjson.schemes == ("udpjson",)
    [endpoint] = parse_brokers("udpjson://127.0.0.1:9")
    assert (endpoint.scheme, endpoint.host, endpoint.port) == ("udpjson", "127.0.0.1", 9)
    assert isinstance(udpjson(endpoint, AdapterSettings()), Adapter)


def test_an_option_the_plugin_does_not_know_is_a_configuration_error(
    udpjson: type[Adapter],
) -> None:
    endpoint = parse_brokers("udpjson://127.0.0.1:9")[0]
    with pytest.raises(AdapterError, match="takes no adapter options, not method") as info:
        udpjson(endpoint, AdapterSettings(options={"method": "PUT"}))
    assert info.value.kind == "configuration"


def test_a_message_is_one_datagram_holding_its_json_envelope(udpjson: type[Adapter]) -> None:
    async def scenario() -> tuple[list[Envelope], list[Delivery]]:
        async with udp_server() as server:
            endpoint = parse_brokers(f"udpjson://127.0.0.1:{server.port}")[0]
            async with udpjson(endpoint, AdapterSettings(timeout_s=5)) as adapter:
                link = await adapter.connect(DeviceIdentity("d-1", 1))
                deliveries = [
                    await link.send(OutgoingMessage("devices/d-1/t", b'{"n":1}')),
                    await link.send(OutgoingMessage("devices/d-1/raw", b"\xff\x00")),
                ]
                await link.aclose()
            return server.envelopes, deliveries

    before_ms = time.time() * 1000
    envelopes, deliveries = asyncio.run(scenario())
    text, binary = envelopes
    assert {k: v for k, v in text.items() if k != "ts_ms"} == {
        "device_id": "d-1",
        "topic": "devices/d-1/t",
        "payload": '{"n":1}',
        "seq": 1,
    }
    assert before_ms <= text["ts_ms"] <= time.time() * 1000
    assert base64.b64decode(binary["payload"]) == b"\xff\x00"
    assert binary["seq"] == 2
    assert all(d.sent and d.confirmed and d.latency_s is not None for d in deliveries)


def test_an_acked_message_is_confirmed_and_an_unacked_one_times_out(
    udpjson: type[Adapter],
) -> None:
    async def scenario() -> list[Delivery]:
        async with udp_server(ack_when=lambda e: not _quiet(e)) as server:
            endpoint = parse_brokers(f"udpjson://127.0.0.1:{server.port}")[0]
            async with udpjson(endpoint, AdapterSettings(timeout_s=0.3)) as adapter:
                link = await adapter.connect(DeviceIdentity("d", 0))
                return [
                    await link.send(OutgoingMessage("t/loud", b"1")),
                    await link.send(OutgoingMessage("t/quiet", b"2")),
                    await link.send(OutgoingMessage("t/loud", b"3")),
                ]
        raise AssertionError("unreachable")  # pragma: no cover

    acked, quiet, after = asyncio.run(scenario())
    assert (acked.sent, acked.confirmed, acked.error) == (True, True, None)
    assert acked.latency_s is not None
    assert (quiet.sent, quiet.confirmed, quiet.error) == (True, False, "timeout")
    assert after.confirmed  # the next message's ack is not mistaken for the lost one's


def test_a_message_not_to_confirm_is_fire_and_forget(udpjson: type[Adapter]) -> None:
    async def scenario() -> tuple[Delivery, list[Envelope]]:
        async with udp_server(ack_when=lambda _envelope: False) as server:
            endpoint = parse_brokers(f"udpjson://127.0.0.1:{server.port}")[0]
            async with udpjson(endpoint, AdapterSettings(timeout_s=30)) as adapter:
                link = await adapter.connect(DeviceIdentity("d", 0))
                delivery = await link.send(OutgoingMessage("t", b"x", confirm=False))
                await until(lambda: len(server.envelopes) == 1)
            return delivery, server.envelopes
        raise AssertionError("unreachable")  # pragma: no cover

    delivery, [envelope] = asyncio.run(scenario())
    assert delivery == Delivery(sent=True)
    assert envelope["payload"] == "x"


def test_nobody_listening_is_unreachable(udpjson: type[Adapter]) -> None:
    async def scenario() -> Delivery:
        endpoint = parse_brokers(f"udpjson://127.0.0.1:{_unused_udp_port()}")[0]
        async with udpjson(endpoint, AdapterSettings(timeout_s=30)) as adapter:
            link = await adapter.connect(DeviceIdentity("d", 0))
            return await link.send(OutgoingMessage("t", b"x"))

    delivery = asyncio.run(scenario())
    assert (delivery.sent, delivery.confirmed, delivery.error) == (True, False, "unreachable")


def test_closing_a_link_settles_the_sends_still_waiting(udpjson: type[Adapter]) -> None:
    async def scenario() -> tuple[Delivery, Delivery]:
        async with udp_server(ack_when=lambda _envelope: False) as server:
            endpoint = parse_brokers(f"udpjson://127.0.0.1:{server.port}")[0]
            async with udpjson(endpoint, AdapterSettings(timeout_s=30)) as adapter:
                link = await adapter.connect(DeviceIdentity("d", 0))
                waiting = asyncio.create_task(link.send(OutgoingMessage("t", b"x")))
                await until(lambda: len(server.envelopes) == 1)
                await link.aclose()
                return await waiting, await link.send(OutgoingMessage("t", b"y"))
        raise AssertionError("unreachable")  # pragma: no cover

    waited, after = asyncio.run(scenario())
    assert (waited.sent, waited.confirmed, waited.error) == (True, False, "closed")
    assert (after.sent, after.error) == (False, "not sent: link closed")


# --- the engine, end to end -----------------------------------------------------------


def _worker(port: int, devices: int, **settings: Any) -> MessageWorker:
    return MessageWorker(
        load_model_data(PULSE),
        range(devices),
        RunSettings(
            devices=devices,
            brokers=parse_brokers(f"udpjson://127.0.0.1:{port}"),
            adapter_timeout_s=0.3,
            **settings,
        ),
        WallClock(),
    )


@pytest.mark.usefixtures("udpjson")
def test_a_fleet_sends_every_message_and_counts_the_unacked_as_timeouts() -> None:
    def ack_when(envelope: Envelope) -> bool:
        return int(envelope["seq"]) % 3 != 0

    async def scenario() -> tuple[list[Envelope], list[Envelope], MessageWorker]:
        async with udp_server(ack_when) as server:
            worker = _worker(server.port, 5)
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: len(server.envelopes) >= 60)
            stop.set()
            await running
            return server.envelopes, server.acked(), worker
        raise AssertionError("unreachable")  # pragma: no cover

    envelopes, acked, worker = asyncio.run(scenario())
    counters = worker.counters
    assert counters.reconciles(), counters.problems()
    assert counters.messages_sent == len(envelopes)
    assert counters.messages_acked == len(acked)
    assert counters.messages_failed == len(envelopes) - len(acked) > 0
    assert counters.errors_by_kind == {"timeout": counters.messages_failed}
    assert worker.ack_latency.count == counters.messages_acked
    assert {e["device_id"] for e in envelopes} == {f"pulse-{i}" for i in range(5)}


@pytest.mark.usefixtures("udpjson")
def test_a_qos_0_fleet_fires_and_forgets() -> None:
    async def scenario() -> tuple[list[Envelope], MessageWorker]:
        async with udp_server(ack_when=lambda _envelope: False) as server:
            worker = _worker(server.port, 3, qos=0)
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: len(server.envelopes) >= 20)
            stop.set()
            await running
            sent = worker.counters.messages_sent
            await until(lambda: len(server.envelopes) == sent)  # the last are on their way
            return server.envelopes, worker
        raise AssertionError("unreachable")  # pragma: no cover

    envelopes, worker = asyncio.run(scenario())
    counters = worker.counters
    assert counters.reconciles(), counters.problems()
    assert counters.messages_sent == len(envelopes)
    assert (counters.messages_acked, counters.messages_failed) == (0, 0)
    assert counters.errors_by_kind == {}


# --- the CLI, end to end --------------------------------------------------------------


@pytest.mark.usefixtures("udpjson")
def test_the_cli_runs_a_model_against_a_plugin_scheme(tmp_path: Path) -> None:
    results = tmp_path / "results.json"

    async def scenario() -> tuple[int, str, list[Envelope]]:
        async with udp_server() as server:
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "iotix",
                "run",
                str(THERMOSTAT),
                "--broker",
                f"udpjson://127.0.0.1:{server.port}",
                # 10 thermostats send 4 messages in 3 s with the default seed (5 send one).
                "--devices",
                "10",
                "--duration",
                "3",
                "--results",
                str(results),
                cwd=REPO_ROOT,
                env={**os.environ, "NO_COLOR": "1", "PYTHONUTF8": "1"},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            async with asyncio.timeout(CLI_TIMEOUT_S):
                output, _ = await cli.communicate()
            assert cli.returncode is not None
            return cli.returncode, output.decode(), server.envelopes
        raise AssertionError("unreachable")  # pragma: no cover

    returncode, output, envelopes = asyncio.run(scenario())
    assert returncode == 0, output
    assert envelopes
    assert {e["device_id"] for e in envelopes} <= {f"thermo-{i:05d}" for i in range(10)}
    summary = json.loads(results.read_text(encoding="utf-8"))["summary"]
    assert summary["messages_sent"] == summary["messages_acked"] == len(envelopes)
    assert summary["counters_reconcile"]
