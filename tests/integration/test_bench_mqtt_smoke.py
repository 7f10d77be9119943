"""The MQTT benchmark scripts in bench/ run end to end at a trivial size, so they never rot.

Each runs against a Mosquitto this test starts (``--broker``), with a handful of
devices. Only the shape of the results is checked: timings on a shared machine say
nothing.
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, Any

import pytest

from iotix.testing import MosquittoBroker

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

DEVICES = 8


pytestmark = pytest.mark.usefixtures("bench_on_path")


@pytest.fixture
def sys_broker(mosquitto_binary: Path) -> Iterator[MosquittoBroker]:
    """A broker that publishes its $SYS counts, which the throughput script reads."""
    with MosquittoBroker(binary=mosquitto_binary, extra_config=["sys_interval 1"]) as broker:
        yield broker


def throughput(broker: MosquittoBroker, *argv: str) -> list[Any]:
    module = importlib.import_module("mqtt_throughput")
    common = ["--devices", str(DEVICES), "--settle", "0.2", "--no-pin", "--broker", broker.url]
    results: list[Any] = module.main([*common, *argv])
    return results


def test_mqtt_throughput_measures_the_worker_against_the_broker_ceiling(
    sys_broker: MosquittoBroker,
) -> None:
    # $SYS counts come every 2 s: a window of 4.5 s holds at least two of them.
    results = throughput(
        sys_broker, "--parts", "broker", "--seconds", "4.5", "--ceiling-connections", "4"
    )

    rows = [(r.part, r.contender, r.connections) for r in results]
    assert rows == [
        ("broker", "raw frames", DEVICES),
        ("broker", "raw frames", 4),
        ("broker", "iotix worker", DEVICES),
    ]
    assert all(r.sent_per_s > 0 and r.broker_per_s > 0 for r in results)
    assert 0 < results[-1].ratio < math.inf


def test_mqtt_throughput_measures_the_sink_and_qos1(sys_broker: MosquittoBroker) -> None:
    results = throughput(sys_broker, "--parts", "sink,qos1", "--seconds", "1", "--qos1-load", "0.5")

    found = {(r.part, r.contender): r for r in results}
    assert set(found) == {
        ("sink", "raw frames"),
        ("sink", "iotix worker"),
        ("qos1 max", "iotix worker"),
        ("qos1 50%", "iotix worker"),
    }
    assert all(r.per_cpu_s > 0 for r in results)
    assert found["sink", "iotix worker"].ratio > 0
    paced = found["qos1 50%", "iotix worker"]
    assert found["qos1 max", "iotix worker"].acked_per_s > 0
    assert paced.acked_per_s > 0
    assert 0 < paced.ack_p50_s <= paced.ack_p99_s <= paced.ack_p999_s


def test_mqtt_connect_rate_races_the_worker_against_a_raw_client(
    mosquitto: MosquittoBroker,
) -> None:
    module = importlib.import_module("mqtt_connect_rate")
    results = module.main(
        ["--devices", "50", "--repeats", "1", "--no-pin", "--broker", mosquitto.url]
    )

    assert [r.contender for r in results] == ["raw asyncio", "iotix worker"]
    assert all(r.connections == 50 and r.failures == 0 for r in results)
    assert all(r.per_s > 0 and r.latency_p50_s > 0 for r in results)
    assert results[1].ratio > 0


def test_mqtt_scale_holds_a_small_fleet_and_accounts_for_every_message() -> None:
    module = importlib.import_module("mqtt_scale")
    results = module.main(
        ["--devices", "60", "--hold", "3", "--brokers", "2", "--interval", "1", "--sources", "2"]
    )

    assert [r.contender for r in results] == ["raw asyncio", "iotix fleet"]
    for result in results:
        assert result.connected == 60, result.problems
        assert result.lost_during_hold == 0
        assert result.sent > 0
        assert result.received == result.sent
        assert result.pss_max_bytes > 0
    iotix = results[1]
    assert iotix.lag_p99_s < 1.0
