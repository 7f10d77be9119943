"""`iotix run SCENARIO`: a verdict, reports and exit codes, against a real Mosquitto."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from junitparser import Failure, JUnitXml

from iotix.testing import MosquittoBroker, find_mosquitto

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Iterator

    RunCLI = Callable[..., subprocess.CompletedProcess[str]]

THERMOSTAT = "examples/device-models/thermostat.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("Mosquitto is not installed: run scripts/services", pytrace=False)
    with MosquittoBroker(binary=binary) as running:
        yield running


def scenario_file(tmp_path: Path, broker_url: str, checks: list[str], seconds: float = 4) -> Path:
    model = (tmp_path / "thermostat.yaml").resolve()
    model.write_text(_thermostat_text(), encoding="utf-8")
    path = tmp_path / "scenario.yaml"
    path.write_text(
        json.dumps(
            {
                "name": "e2e",
                "seed": 3,
                "brokers": {"main": broker_url},
                "fleets": [{"name": "t", "model": str(model), "devices": 6}],
                "duration": f"{seconds}s",
                "probe": 1.0,
                "checks": checks,
            }
        ),
        encoding="utf-8",
    )
    return path


def _thermostat_text() -> str:
    from iotix.cli import example_models  # noqa: PLC0415 - the shipped examples

    return (example_models() / "thermostat.yaml").read_text(encoding="utf-8")


def test_the_smoke_example_passes_and_writes_every_report(
    run_cli: RunCLI, tmp_path: Path, broker: MosquittoBroker
) -> None:
    reports = tmp_path / "reports"
    done = run_cli(
        "run",
        "examples/scenarios/smoke.yaml",
        "--broker",
        broker.url,
        "--scale",
        "0.1",
        "--report-dir",
        str(reports),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout
    suite = next(iter(JUnitXml.fromfile(str(reports / "junit.xml"))))
    names = [case.name for case in suite]
    assert "everything delivered" in names
    assert "run completed" in names
    assert suite.failures == 0
    assert suite.errors == 0
    assert {p.name for p in reports.iterdir()} == {
        "junit.xml",
        "summary.md",
        "summary.csv",
        "timeseries.csv",
        "report.json",
        "report.html",
    }
    assert "✅ passed" in (reports / "summary.md").read_text(encoding="utf-8")


def _mqtt_only(path: Path) -> bool:
    """Examples whose brokers are all MQTT run against one Mosquitto; the mixed-protocol
    example has a test of its own, with a server for each protocol."""
    brokers = yaml.safe_load(path.read_text(encoding="utf-8"))["brokers"].values()
    return all(str(url).startswith(("mqtt://", "mqtts://")) for url in brokers)


@pytest.mark.parametrize(
    "example",
    sorted(p.name for p in (REPO_ROOT / "examples" / "scenarios").glob("*.yaml") if _mqtt_only(p)),
)
def test_every_example_scenario_passes_at_a_tenth_of_its_size(
    run_cli: RunCLI, tmp_path: Path, broker: MosquittoBroker, example: str
) -> None:
    done = run_cli(
        "run",
        f"examples/scenarios/{example}",
        "--broker",
        broker.url,
        "--scale",
        "0.1",
        "--report-dir",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_check_that_fails_fails_the_run_with_exit_code_1(
    run_cli: RunCLI, tmp_path: Path, broker: MosquittoBroker
) -> None:
    scenario = scenario_file(
        tmp_path, broker.url, ["delivery_ratio >= 0.999", "e2e_latency.p99 < 1us"]
    )
    done = run_cli("run", str(scenario), "--report-dir", str(tmp_path / "r"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL" in done.stdout
    suite = next(iter(JUnitXml.fromfile(str(tmp_path / "r" / "junit.xml"))))
    results = {case.name: case.result for case in suite}
    assert results["delivery_ratio >= 0.999"] == []
    [failure] = results["e2e_latency.p99 < 1us"]
    assert isinstance(failure, Failure)
    assert "expected < 1 us" in (failure.message or "")


def test_a_scenario_whose_brokers_are_all_unreachable_is_a_failed_run(
    run_cli: RunCLI, tmp_path: Path
) -> None:
    # The probe cannot subscribe either: said plainly, no traceback.
    scenario = scenario_file(tmp_path, "mqtt://127.0.0.1:1", ["delivery_ratio >= 0.9"], 2)
    done = run_cli("run", str(scenario), "--report-dir", str(tmp_path / "r"))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "the probe could not subscribe at mqtt://127.0.0.1:1" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        (["e2e_latncy.p99 < 1s"], "e2e_latency.p99"),
        (["delivery_ratio >= 0.99 ms"], "delivery_ratio"),
    ],
)
def test_a_check_that_does_not_parse_is_exit_code_2_before_anything_connects(
    run_cli: RunCLI, tmp_path: Path, checks: list[str], expected: str
) -> None:
    scenario = scenario_file(tmp_path, "mqtt://127.0.0.1:1", checks)
    done = run_cli("run", str(scenario), "--report-dir", str(tmp_path / "r"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "checks[0]" in done.stderr
    assert expected in done.stderr
    assert not (tmp_path / "r").exists()


def test_a_model_without_a_broker_is_exit_code_2(run_cli: RunCLI) -> None:
    done = run_cli("run", THERMOSTAT)
    assert done.returncode == 2
    assert "--broker is required" in done.stderr


PULSE = {
    "name": "pulse",
    "fields": {"n": {"kind": "counter"}},
    "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 0.1}}},
}


def fault_scenario(tmp_path: Path, broker_url: str, qos: int, **fields: object) -> Path:
    """Eight devices sending ten messages a second each, for 5 s."""
    model = (tmp_path / "pulse.json").resolve()
    model.write_text(json.dumps(PULSE), encoding="utf-8")
    path = tmp_path / "faults.yaml"
    path.write_text(
        json.dumps(
            {
                "name": "faulty",
                "brokers": {"main": broker_url},
                "fleets": [{"name": "t", "model": str(model), "devices": 8, "qos": qos}],
                "duration": "5s",
                **fields,
            }
        ),
        encoding="utf-8",
    )
    return path


def test_injected_latency_shows_in_the_ack_latency_and_in_the_report(
    run_cli: RunCLI, tmp_path: Path, broker: MosquittoBroker
) -> None:
    # Both directions are delayed: a PUBACK takes twice the delay while the fault lasts.
    scenario = fault_scenario(
        tmp_path,
        broker.url,
        1,
        faults=[{"kind": "latency", "at": "1s", "duration": "2s", "delay": "300ms"}],
        checks=["ack_latency.max >= 500ms", "ack_latency.p50 < 300ms"],
    )
    done = run_cli("run", str(scenario), "--report-dir", str(tmp_path / "r"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 faults, 0 actions, through 1 proxies" in done.stdout
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert 'class="fault"' in page
    assert "latency" in page
    report = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    [stats] = report["metadata"]["fault_proxies"].values()
    assert stats["faults"][0]["bytes_delayed"] > 0


def test_a_partition_loses_messages_and_the_devices_carry_on_after_it(
    run_cli: RunCLI, tmp_path: Path, broker: MosquittoBroker
) -> None:
    # The probe goes straight to the broker: it sees what the partition kept away.
    scenario = fault_scenario(
        tmp_path,
        broker.url,
        0,
        probe=1.0,
        faults=[{"kind": "partition", "at": "1s", "duration": "2s"}],
        checks=["delivery_ratio < 0.999", "messages_sent > 0"],
    )
    done = run_cli("run", str(scenario), "--report-dir", str(tmp_path / "r"))
    assert done.returncode == 0, done.stdout + done.stderr
