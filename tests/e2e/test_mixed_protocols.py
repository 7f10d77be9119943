"""The mixed-protocol example: one model over MQTT, HTTP, CoAP and Kafka in one run,
each against a real server started here, with its own figures in the reports, and the
probe's delivery figures over the MQTT and Kafka fleets."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

from iotix.testing import MosquittoBroker, find_mosquitto
from iotix.testing.coap import LibCoAPServer
from iotix.testing.tansu import TansuBroker

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Iterator
    from pathlib import Path

    RunCLI = Callable[..., subprocess.CompletedProcess[str]]


class HTTPSink:
    """An aiohttp server on its own thread that counts the requests it answers."""

    def __init__(self) -> None:
        self.requests = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-sink")
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        return web.Response(status=204)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    def __enter__(self) -> HTTPSink:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def servers() -> Iterator[tuple[MosquittoBroker, HTTPSink, LibCoAPServer, TansuBroker]]:
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("Mosquitto is not installed: run scripts/services", pytrace=False)
    with (
        MosquittoBroker(binary=binary) as mqtt,
        HTTPSink() as http,
        LibCoAPServer() as coap,
        TansuBroker() as kafka,
    ):
        yield mqtt, http, coap, kafka


def test_one_model_over_four_protocols_passes_with_figures_for_each(
    run_cli: RunCLI,
    tmp_path: Path,
    servers: tuple[MosquittoBroker, HTTPSink, LibCoAPServer, TansuBroker],
) -> None:
    mqtt, http, coap, kafka = servers
    done = run_cli(
        "run",
        "examples/scenarios/mixed-protocols.yaml",
        "--broker-for",
        f"mqtt={mqtt.url}",
        "--broker-for",
        f"api=http://127.0.0.1:{http.port}/ingest",
        "--broker-for",
        f"coap={coap.url}",
        "--broker-for",
        f"kafka={kafka.url}",
        "--scale",
        "0.1",
        "--report-dir",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    fleets = report["summary"]["fleets"]
    assert {name: figures["protocol"] for name, figures in fleets.items()} == {
        "over-mqtt": "mqtt",
        "over-http": "http",
        "over-coap": "coap",
        "over-kafka": "kafka",
    }
    for name, figures in fleets.items():
        assert figures["messages_sent"] > 0, name
        assert figures["messages_acked"] == figures["messages_sent"], name
    assert http.requests == fleets["over-http"]["messages_acked"]
    assert "### By fleet" in (tmp_path / "summary.md").read_text(encoding="utf-8")
    # The probe follows the MQTT fleet (a subscriber) and the Kafka fleet (a consumer),
    # one tracker for both: every message of either, once, though both fleets' devices
    # have the same ids; HTTP and CoAP devices it cannot follow.
    probe = report["probe"]
    followed = fleets["over-mqtt"]["messages_acked"] + fleets["over-kafka"]["messages_acked"]
    assert probe["unique"] == followed, probe
    assert (probe["lost"], probe["duplicates"]) == (0, 0), probe
    checks = {check["name"]: check["passed"] for check in report["checks"]}
    assert checks["MQTT and Kafka delivered"] is True
