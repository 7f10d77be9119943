"""A fault proxy in a process of its own, against a real Mosquitto: it forwards,
applies and reverts faults, fails over, reports, and stops when its pipe closes."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from broker_helpers import TIMEOUT_S, PahoClient

from iotix.faults import Blackhole
from iotix.faults.process import ProxyProcess

if TYPE_CHECKING:
    from iotix.testing import MosquittoBroker


def _connected_through(port: int) -> PahoClient:
    paho = PahoClient()
    paho.client.connect("127.0.0.1", port)
    paho.client.loop_start()
    assert paho.connack.wait(TIMEOUT_S), "no CONNACK through the proxy"
    return paho


def test_a_proxy_process_forwards_applies_faults_and_reports(
    mosquitto: MosquittoBroker,
) -> None:
    proxy = ProxyProcess(mosquitto.host, mosquitto.port, seed=1)
    proxy.start()
    try:
        paho = _connected_through(proxy.port)
        paho.subscribe("t/#", 1)  # a SUBACK: traffic both ways
        proxy.apply(Blackhole(duration_s=60.0))
        stats = proxy.stats()
        assert stats["connections"] == 1
        [fault] = stats["faults"]
        assert (fault["kind"], fault["active"]) == ("Blackhole", True)
        paho.client.disconnect()
        paho.close()
    finally:
        asyncio.run(proxy.stop())
    [fault] = proxy.stats()["faults"]  # kept from the stop: reverted
    assert fault["active"] is False


def test_a_proxy_process_fails_over_to_another_broker(
    mosquitto: MosquittoBroker, mosquitto_session: MosquittoBroker
) -> None:
    proxy = ProxyProcess(mosquitto.host, mosquitto.port)
    proxy.start()
    try:
        paho = _connected_through(proxy.port)
        assert proxy.retarget(mosquitto_session.host, mosquitto_session.port) == 1
        assert paho.disconnected.wait(TIMEOUT_S)  # its connection was reset
        paho.close()
        again = _connected_through(proxy.port)  # lands on the other broker
        stats = proxy.stats()
        assert stats["retargets"] == 1
        assert stats["target"]["port"] == mosquitto_session.port
        again.client.disconnect()
        again.close()
    finally:
        asyncio.run(proxy.stop())


def test_a_proxy_process_stops_when_its_supervisor_goes_away(
    mosquitto: MosquittoBroker,
) -> None:
    proxy = ProxyProcess(mosquitto.host, mosquitto.port)
    proxy.start()
    process = proxy._process  # the child this test watches
    proxy._control.close()  # as a killed supervisor's end closes
    deadline = time.monotonic() + TIMEOUT_S
    while process.is_alive():
        assert time.monotonic() < deadline, "the proxy process did not stop"
        process.join(timeout=0.1)
    assert process.exitcode == 0
