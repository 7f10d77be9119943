"""`iotix run SCENARIO` with actions, windows, abort and failover, against real
Mosquittos; a supervisor killed mid-fault leaves nothing behind; `iotix chaos export`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from junitparser import Failure, JUnitXml

from iotix.testing import MosquittoBroker, find_mosquitto

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    RunCLI = Callable[..., subprocess.CompletedProcess[str]]

REPO_ROOT = Path(__file__).resolve().parents[2]
THERMOSTAT = REPO_ROOT / "examples" / "device-models" / "thermostat.yaml"
PULSE: dict[str, Any] = {
    "name": "pulse",
    "fields": {"n": {"kind": "counter"}},
    "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 0.1}}},
}
WAIT_S = 30.0


@pytest.fixture(scope="module")
def brokers() -> Iterator[tuple[MosquittoBroker, MosquittoBroker]]:
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("Mosquitto is not installed: run scripts/services", pytrace=False)
    with MosquittoBroker(binary=binary) as first, MosquittoBroker(binary=binary) as second:
        yield first, second


def _scenario(tmp_path: Path, **fields: Any) -> Path:
    pulse = tmp_path / "pulse.json"
    pulse.write_text(json.dumps(PULSE), encoding="utf-8")
    data: dict[str, Any] = {"name": "acts", "seed": 5, "probe": 1.0, **fields}
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _pulse(tmp_path: Path, broker: MosquittoBroker, devices: int, **fields: Any) -> Path:
    """A scenario of ``devices`` pulse devices (ten messages a second) on ``broker``."""
    return _scenario(
        tmp_path,
        brokers={"main": broker.url},
        fleets=[{"name": "p", "model": str(tmp_path / "pulse.json"), "devices": devices}],
        **fields,
    )


def _report(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "report.json").read_text(encoding="utf-8"))


def test_actions_happen_on_time_and_the_checks_see_them(
    run_cli: RunCLI, tmp_path: Path, brokers: tuple[MosquittoBroker, MosquittoBroker]
) -> None:
    broker, _ = brokers
    scenario = _scenario(
        tmp_path,
        brokers={"main": broker.url},
        fleets=[{"name": "thermo", "model": str(THERMOSTAT), "devices": 20, "qos": 1}],
        duration="8s",
        actions=[
            {"name": "drop", "kind": "disconnect", "at": "1s", "share": "50%", "offline": "1s"},
            {
                "name": "ask",
                "kind": "command",
                "at": "3s",
                "command": "set_setpoint",
                "payload": {"value": 24},
                "timeout": "2s",
            },
            {
                "name": "refuse",
                "kind": "command",
                "at": "3.5s",
                "command": "set_setpoint",
                "payload": {"value": 99},
                "share": "25%",
                "timeout": "2s",
            },
            {
                "name": "storm",
                "kind": "reconnect_storm",
                "when": "command_replies >= 0",
                "at": "5s",
            },
        ],
        checks=[
            {"name": "all answered", "check": "command_reply_ratio == 100%"},
            {"name": "answered quickly", "check": "command_reply.max < 1s"},
            "commands_rejected >= 1",
            "reconnect_time.max >= 1s",  # the dropped stayed away their offline time
            "reconnect_time.p50 < 500ms",  # the storm came back at once
            {"name": "drop window", "check": "disconnects >= 1", "during": "drop"},
            {"name": "all in at first", "check": "connects >= 20", "to": "1s"},
            {"name": "storm after", "check": "reconnects >= 20", "after": "storm"},
        ],
    )
    done = run_cli("run", str(scenario), "--report-dir", str(tmp_path / "r"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = _report(tmp_path / "r")
    names = [event["name"] for event in report["events"]]
    assert names == ["drop", "ask", "refuse", "storm"]
    drop, _, _, storm = report["events"]
    assert 0.9 <= drop["at_s"] < 2.0
    assert storm["at_s"] >= 5.0
    commands = report["commands"]
    assert commands["sent"] == commands["replied"] == 20 + refuse_count(report)
    assert sum(commands["rejected"].values()) >= 1
    actions = report["metadata"]["actions"]
    assert 0 < actions["drop"]["devices"] < 20
    assert actions["storm"]["devices"] == 20
    markdown = (tmp_path / "r" / "summary.md").read_text(encoding="utf-8")
    assert "### Timeline" in markdown
    assert "reconnect at once" in markdown
    assert 'id="timeline"' in (tmp_path / "r" / "report.html").read_text(encoding="utf-8")


def refuse_count(report: dict[str, Any]) -> int:
    """The devices the 25 % command went to: sent minus the 20 of the first."""
    return int(report["commands"]["sent"]) - 20


def test_a_window_check_fails_when_its_window_shows_the_problem(
    run_cli: RunCLI, tmp_path: Path, brokers: tuple[MosquittoBroker, MosquittoBroker]
) -> None:
    broker, _ = brokers
    scenario = _pulse(
        tmp_path,
        broker,
        5,
        duration="5s",
        faults=[{"name": "down", "kind": "target_down", "at": "1s", "duration": "2s"}],
        checks=[
            {"name": "whole run", "check": "connects >= 5"},
            {"name": "no drops while down", "check": "disconnects == 0", "during": "down"},
        ],
    )
    done = run_cli("run", str(scenario), "--report-dir", str(tmp_path / "r"))
    assert done.returncode == 1, done.stdout + done.stderr
    suite = JUnitXml.fromfile(str(tmp_path / "r" / "junit.xml"))
    failed = {case.name: bool(case.result) for s in suite for case in s}  # a result: failed
    assert failed["whole run"] is False
    assert failed["no drops while down"] is True
    [failure] = [r for s in suite for c in s for r in c.result if isinstance(r, Failure)]
    assert "from 1." in (failure.message or "")


def test_abort_on_fail_stops_the_run_at_the_first_failure(
    run_cli: RunCLI, tmp_path: Path, brokers: tuple[MosquittoBroker, MosquittoBroker]
) -> None:
    broker, _ = brokers
    scenario = _pulse(
        tmp_path,
        broker,
        5,
        duration="40s",
        checks=[{"check": "messages_sent < 20", "abort_on_fail": True}],
    )
    started = time.monotonic()
    done = run_cli("run", str(scenario), "--report-dir", str(tmp_path / "r"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert time.monotonic() - started < 30  # not the 40 s planned
    assert "aborted when messages_sent < 20 failed" in done.stdout
    report = _report(tmp_path / "r")
    assert report["metadata"]["aborted"] is True
    [check] = report["checks"]
    assert "run aborted" in check["message"]
    assert report["summary"]["duration_s"] < 30


def test_failover_moves_the_devices_to_the_second_broker(
    run_cli: RunCLI, tmp_path: Path, brokers: tuple[MosquittoBroker, MosquittoBroker]
) -> None:
    primary, secondary = brokers
    scenario = _scenario(
        tmp_path,
        brokers={"primary": primary.url, "secondary": secondary.url},
        fleets=[
            {"name": "p", "model": str(tmp_path / "pulse.json"), "devices": 6, "broker": "primary"}
        ],
        duration="6s",
        actions=[
            {"name": "move", "kind": "failover", "at": "2s", "broker": "primary", "to": "secondary"}
        ],
        checks=[
            "reconnects >= 6",
            {"name": "sending after the move", "check": "messages_sent > 100", "after": "move"},
            {"name": "back within seconds", "check": "reconnect_time.max < 5s"},
        ],
    )
    done = run_cli("run", str(scenario), "--report-dir", str(tmp_path / "r"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = _report(tmp_path / "r")
    [proxy] = report["metadata"]["fault_proxies"].values()
    assert proxy["retargets"] == 1
    assert proxy["target"]["port"] == secondary.port
    # The probe listened on both brokers: what went to either arrived.
    assert report["probe"]["unique"] > 0
    assert report["probe"]["lost"] <= 6 * 2  # at most the messages in flight at the move


def _listening_ports(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = str(fd.readlink())
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            ports.add(int(fields[1].split(":")[1], 16))
    return ports


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _proxies(pid: int) -> list[int]:
    """The fault proxy processes of a run (spawned children)."""
    found = []
    for child in _children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing.spawn" in command or b"spawn_main" in command:
            found.append(child)
    return found


def _proxy_ports(pid: int) -> set[int]:
    return {port for proxy in _proxies(pid) for port in _listening_ports(proxy)}


def _workers(pid: int) -> list[int]:
    """The worker processes of a run: children of its fork server (or of the run)."""
    found = []
    for child in _children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"forkserver" in command:
            found += _children(child)
    return found


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def _long_faulty_run(
    tmp_path: Path, broker: MosquittoBroker, reports: Path
) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """`iotix run` of 4 devices under a minute-long latency fault, as a process of its
    own, once its workers run; killed on the way out if it is still there."""
    scenario = _pulse(
        tmp_path,
        broker,
        4,
        duration="60s",
        faults=[{"kind": "latency", "at": "0s", "duration": "60s", "delay": "50ms"}],
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "iotix", "run", str(scenario), "--report-dir", str(reports)],
        cwd=REPO_ROOT,
        env={**os.environ, "NO_COLOR": "1", "PYTHONUTF8": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Running: its workers exist and its proxy listens.
        _wait(
            lambda: bool(_workers(process.pid)) and bool(_proxy_ports(process.pid)),
            "the run to start",
        )
        yield process, _workers(process.pid) + _proxies(process.pid)
        process.wait(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_supervisor_killed_mid_fault_leaves_no_fault_and_no_device_behind(
    tmp_path: Path, brokers: tuple[MosquittoBroker, MosquittoBroker]
) -> None:
    with _long_faulty_run(tmp_path, brokers[0], tmp_path / "r") as (process, children):
        ports = _proxy_ports(process.pid)
        os.kill(process.pid, signal.SIGKILL)
    # The workers and the proxy process see their control pipes close and stop by
    # themselves, the proxy reverting its fault...
    _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), "the children")
    # ... so nothing listens on the proxy's port any more.
    for port in ports:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, port


def test_a_stop_signal_in_the_middle_of_a_fault_reverts_it_and_still_reports(
    tmp_path: Path, brokers: tuple[MosquittoBroker, MosquittoBroker]
) -> None:
    with _long_faulty_run(tmp_path, brokers[0], tmp_path / "r") as (process, workers):
        # SIGTERM, as CI runners and container engines stop a job; iotix stops the run
        # as it does on Ctrl-C (SIGINT, which a shell's background jobs ignore).
        process.send_signal(signal.SIGTERM)
    report = _report(tmp_path / "r")
    assert report["metadata"]["interrupted"] is True
    [proxy] = report["metadata"]["fault_proxies"].values()
    [fault] = proxy["faults"]
    assert fault["active"] is False
    assert fault["reverted_at_s"] is not None
    _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), "the workers")


def test_chaos_export_writes_manifests_and_refuses_a_scenario_without_faults(
    run_cli: RunCLI, tmp_path: Path
) -> None:
    out = tmp_path / "chaos.yaml"
    done = run_cli(
        "chaos",
        "export",
        "examples/scenarios/flaky-cellular.yaml",
        "--namespace",
        "iot",
        "-o",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    documents = [d for d in yaml.safe_load_all(out.read_text(encoding="utf-8")) if d]
    assert {d["kind"] for d in documents} == {"NetworkChaos"}
    assert {d["metadata"]["namespace"] for d in documents} == {"iot"}
    assert "skipped" in done.stderr or "warning" in done.stderr  # the reset cannot map
    done = run_cli("chaos", "export", "examples/scenarios/smoke.yaml")
    assert done.returncode == 2
    assert "has no faults" in done.stderr


def test_validate_checks_scenarios_with_their_models(run_cli: RunCLI, tmp_path: Path) -> None:
    done = run_cli("validate", "examples/scenarios/")
    assert done.returncode == 0, done.stderr
    assert "scenario failover_storm: 1 fleet, 2000 devices, 0 faults, 3 actions" in done.stdout
    bad = _scenario(
        tmp_path,
        brokers={"main": "mqtt://127.0.0.1:1883"},
        fleets=[{"name": "p", "model": str(tmp_path / "pulse.json"), "devices": 1}],
        actions=[{"kind": "set", "at": "1s", "field": "nn", "value": 1}],
    )
    done = run_cli("validate", str(bad))
    assert done.returncode == 2
    assert "actions[0].field: unknown field of fleet 'p' 'nn'" in done.stderr


SWITCH: dict[str, Any] = {
    "name": "switch",
    "fields": {"n": {"kind": "counter"}},
    "messages": {"telemetry": {"schedule": {"kind": "interval", "interval_s": 0.2}}},
    "states": {
        "initial": "off",
        "states": {"off": {}, "on": {}, "broken": {}},
        "transitions": [{"from": "off", "to": "on", "on_command": "flip"}],
    },
    "commands": {"handlers": {"flip": {}}},
}


def test_every_device_reaching_a_state_is_a_check(
    run_cli: RunCLI, tmp_path: Path, brokers: tuple[MosquittoBroker, MosquittoBroker]
) -> None:
    broker, _ = brokers
    model = tmp_path / "switch.json"
    model.write_text(json.dumps(SWITCH), encoding="utf-8")
    scenario = _scenario(
        tmp_path,
        brokers={"main": broker.url},
        fleets=[{"name": "lights", "model": str(model), "devices": 8}],
        duration="4s",
        actions=[{"kind": "command", "when": "devices_connected >= 8", "command": "flip"}],
        checks=[
            {"name": "all on", "check": "state_reached.lights.on == 100%"},
            {"name": "still on", "check": "state.lights.on == 100%"},
            {"name": "none broken", "check": "state_reached.lights.broken == 0"},
            {"name": "all off at first", "check": "state.lights.off == 100%", "to": "0.5s"},
        ],
    )
    done = run_cli("run", str(scenario), "--report-dir", str(tmp_path / "r"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = _report(tmp_path / "r")
    assert report["summary"]["states"] == {"lights/off": 0, "lights/on": 8, "lights/broken": 0}
    # A state the model does not have is a configuration error, before anything runs.
    bad = _scenario(
        tmp_path,
        brokers={"main": broker.url},
        fleets=[{"name": "lights", "model": str(model), "devices": 8}],
        checks=["state_reached.lights.of == 100%", "state.lamps.on > 0"],
    )
    done = run_cli("run", str(bad))
    assert done.returncode == 2
    assert "unknown state of fleet 'lights' 'of'" in done.stderr
    assert "did you mean 'off'" in done.stderr
    assert "unknown fleet 'lamps'" in done.stderr


def test_datagram_faults_reach_a_coap_fleet_through_a_udp_proxy(
    run_cli: RunCLI, tmp_path: Path
) -> None:
    from iotix.testing.coap import LibCoAPServer  # noqa: PLC0415 - CoAP tests only

    with LibCoAPServer() as server:
        scenario = _scenario(
            tmp_path,
            brokers={"coap": server.url},
            fleets=[
                {
                    "name": "sensors",
                    "model": str(tmp_path / "pulse.json"),
                    "devices": 4,
                    "qos": 1,  # confirmable: lost datagrams are sent again
                    "adapter": {"ack_timeout_s": 0.2, "max_retransmit": 6},
                }
            ],
            duration="4s",
            faults=[
                {"name": "lossy", "kind": "loss", "at": "1s", "duration": "2s", "probability": 0.5}
            ],
            checks=[
                "messages_acked > 0",
                {"name": "resent while lossy", "check": "errors >= 1", "during": "lossy"},
            ],
        )
        data = yaml.safe_load(scenario.read_text(encoding="utf-8"))
        data.pop("probe")  # the probe is MQTT's
        scenario.write_text(yaml.safe_dump(data), encoding="utf-8")
        done = run_cli("run", str(scenario), "--report-dir", str(tmp_path / "r"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = _report(tmp_path / "r")
    assert report["summary"]["errors_by_kind"].get("retransmissions", 0) >= 1
    [proxy] = report["metadata"]["fault_proxies"].values()
    [fault] = proxy["faults"]
    assert fault["kind"] == "Loss"
