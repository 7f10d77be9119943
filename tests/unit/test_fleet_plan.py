"""How a fleet is split into worker shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotix.engine.fleet import FleetPlan, plan_jobs, plan_shards
from iotix.engine.worker import (
    BrokerEndpoint,
    RunConfigError,
    RunSettings,
    default_source_addresses,
    parse_brokers,
)


@pytest.mark.parametrize(("devices", "workers"), [(10, 3), (100_000, 6), (5, 8), (1, 1)])
def test_shards_cover_every_device_once_in_balanced_contiguous_ranges(
    devices: int, workers: int
) -> None:
    shards = plan_shards(devices, workers)
    assert [i for shard in shards for i in shard] == list(range(devices))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    assert len(shards) == min(workers, devices)


def test_workers_are_shared_between_fleets_in_proportion() -> None:
    settings = RunSettings(devices=0, brokers=(BrokerEndpoint("127.0.0.1", 1883),))
    jobs = plan_jobs(
        [FleetPlan(Path("a.yaml"), 900), FleetPlan(Path("b.yaml"), 100)], settings, workers=4
    )
    by_model: dict[str, int] = {}
    for job in jobs:
        by_model[job.model_path] = by_model.get(job.model_path, 0) + len(job.shard)
    assert by_model == {"a.yaml": 900, "b.yaml": 100}
    assert [job.worker_id for job in jobs] == list(range(len(jobs)))
    assert sum(1 for job in jobs if job.model_path == "b.yaml") == 1


def test_broker_urls_parse_into_endpoints() -> None:
    assert parse_brokers("mqtt://127.0.0.1:1884,127.0.0.2") == (
        BrokerEndpoint("127.0.0.1", 1884),
        BrokerEndpoint("127.0.0.2", 1883),
    )
    assert parse_brokers("mqtts://broker.local") == (
        BrokerEndpoint("broker.local", 8883, tls=True),
    )


def test_websocket_urls_parse_with_their_path_defaulting_to_mqtt() -> None:
    assert parse_brokers("ws://127.0.0.1:9001,127.0.0.2:9002/ws") == (
        BrokerEndpoint("127.0.0.1", 9001, websocket_path="/mqtt"),
        BrokerEndpoint("127.0.0.2", 9002, websocket_path="/ws"),
    )
    [secure] = parse_brokers("wss://broker.local")
    assert secure == BrokerEndpoint("broker.local", 443, tls=True, websocket_path="/mqtt")
    assert str(secure) == "wss://broker.local:443/mqtt"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("gopher://x:1", "unsupported broker scheme"),
        ("mqtt://x:port", "bad port"),
        ("mqtt://", "no broker"),
        ("mqtt://x:1883/path", "needs ws:// or wss://"),
        ("ws://x:80/mqtt?a=1", "no query"),
    ],
)
def test_bad_broker_urls_are_refused_with_the_reason(text: str, problem: str) -> None:
    with pytest.raises(RunConfigError, match=problem):
        parse_brokers(text)


def test_a_large_fleet_on_loopback_brokers_gets_source_addresses_by_default() -> None:
    brokers = parse_brokers("mqtt://127.0.0.1:1883,127.0.0.1:1884")
    assert default_source_addresses(brokers, 50_000) == ()  # 25,000 per endpoint fit
    assert default_source_addresses(brokers, 120_000) == (
        "127.0.1.1",
        "127.0.1.2",
        "127.0.1.3",
    )
    assert default_source_addresses(parse_brokers("mqtt://localhost"), 30_000) == (
        "127.0.1.1",
        "127.0.1.2",
    )


def test_remote_brokers_get_no_source_addresses_by_default() -> None:
    # Which local addresses reach a remote broker is the network's business.
    assert default_source_addresses(parse_brokers("mqtt://10.0.0.5,127.0.0.1"), 500_000) == ()
    assert default_source_addresses(parse_brokers("mqtt://broker.example"), 500_000) == ()
