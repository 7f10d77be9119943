"""`iotix run` as a user runs it: a real Mosquitto, a results file, exit codes."""

from __future__ import annotations

import json
import queue
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from iotix.testing import MosquittoBroker, find_mosquitto
from iotix.testing.embedded import EmbeddedBroker

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Iterator
    from pathlib import Path

    RunCLI = Callable[..., subprocess.CompletedProcess[str]]

THERMOSTAT = "examples/device-models/thermostat.yaml"


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("Mosquitto is not installed: run scripts/services", pytrace=False)
    with MosquittoBroker(binary=binary) as running:
        yield running


@pytest.fixture
def telemetry(broker: MosquittoBroker) -> Iterator[queue.Queue[bytes]]:
    """Thermostat telemetry as it reaches the broker: the sign a fleet is up."""
    received: queue.Queue[bytes] = queue.Queue()
    watcher = paho.Client(CallbackAPIVersion.VERSION2)
    watcher.on_message = lambda _c, _u, message: received.put(message.payload)
    watcher.connect(broker.host, broker.port)
    watcher.loop_start()
    watcher.subscribe("buildings/#", qos=0)
    yield received
    watcher.loop_stop()
    watcher.disconnect()
    watcher._reset_sockets()  # paho closes its wake-up socket pair only in __del__ (#627)


def run_json(run_cli: RunCLI, tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    results = tmp_path / "results.json"
    done = run_cli("run", *args, "--results", str(results))
    document = json.loads(results.read_text(encoding="utf-8")) if results.exists() else {}
    return done.returncode, document, done.stdout + done.stderr


def test_run_connects_every_device_and_accounts_for_every_message(
    run_cli: RunCLI, tmp_path: Path, broker: MosquittoBroker
) -> None:
    received: queue.Queue[bytes] = queue.Queue()
    probe = paho.Client(CallbackAPIVersion.VERSION2)
    probe.on_message = lambda _c, _u, message: received.put(message.payload)
    probe.connect(broker.host, broker.port)
    probe.loop_start()
    probe.subscribe("buildings/+/thermostats/+/telemetry", qos=1).__class__  # noqa: B018
    try:
        code, document, output = run_json(
            run_cli,
            tmp_path,
            THERMOSTAT,
            "--broker",
            broker.url,
            "--devices",
            "30",
            "--duration",
            "12",
            "--seed",
            "3",
            "--probe",
            "1",
        )
    finally:
        probe.loop_stop()
        probe.disconnect()
        probe._reset_sockets()  # as above
    assert code == 0, output
    summary = document["summary"]
    assert summary["connects"] == 30
    assert summary["connect_failures"] == 0
    assert summary["messages_sent"] > 0
    # The thermostat sends at QoS 1: every message is acknowledged, none in flight.
    assert summary["messages_acked"] == summary["messages_sent"]
    assert summary["counters_reconcile"] is True
    assert received.qsize() == summary["messages_sent"]
    assert document["settings"]["brokers"] == [broker.url]
    assert "password" not in document["settings"]
    assert summary["latency_s"]["ack_latency"]["count"] == summary["messages_acked"]
    # iotix's own probe agrees with paho: everything sent arrived, once.
    probe = document["probe"]
    assert probe["unique"] == summary["messages_sent"]
    assert (probe["lost"], probe["duplicates"]) == (0, 0)
    assert summary["latency_s"]["e2e_latency"]["count"] == probe["unique"]


def test_run_spreads_a_fleet_over_several_workers(
    run_cli: RunCLI, tmp_path: Path, broker: MosquittoBroker
) -> None:
    code, document, output = run_json(
        run_cli,
        tmp_path,
        THERMOSTAT,
        "--broker",
        broker.url,
        "--devices",
        "40",
        "--workers",
        "2",
        "--duration",
        "6",
    )
    assert code == 0, output
    assert document["settings"]["workers"] == 2
    assert document["summary"]["connects"] == 40


def test_run_with_stages_ramps_up_holds_and_ramps_down_for_their_total_time(
    run_cli: RunCLI, tmp_path: Path, broker: MosquittoBroker
) -> None:
    code, document, output = run_json(
        run_cli,
        tmp_path,
        THERMOSTAT,
        "--broker",
        broker.url,
        "--devices",
        "10",
        "--stages",
        "1s:10,1s:100%,0.5s:0,1s:0",
    )
    assert code == 0, output
    assert document["settings"]["duration_s"] == 3.5
    summary = document["summary"]
    assert summary["connects"] == 10
    assert summary["disconnects"] == 0  # retired devices said DISCONNECT: not a loss
    assert summary["devices_connected"] == 0


@pytest.mark.parametrize(
    ("stages", "quoted"),
    [("30s:10,2x:10", "'2x'"), ("30s", "'30s'"), ("10s:50%%", "'50%%'")],
)
def test_run_with_stages_that_do_not_parse_exits_2_quoting_the_part(
    run_cli: RunCLI, stages: str, quoted: str
) -> None:
    done = run_cli("run", THERMOSTAT, "--broker", "mqtt://127.0.0.1:1", "--stages", stages)
    assert done.returncode == 2, done.stdout + done.stderr
    assert quoted in done.stderr
    assert "Traceback" not in done.stderr


def test_run_over_websockets_with_a_probe_accounts_for_every_message(
    run_cli: RunCLI, tmp_path: Path
) -> None:
    with EmbeddedBroker(websocket=True) as embedded:
        code, document, output = run_json(
            run_cli,
            tmp_path,
            THERMOSTAT,
            "--broker",
            embedded.ws_url,
            "--devices",
            "5",
            "--duration",
            "6",
            "--probe",
            "1",
        )
    assert code == 0, output
    assert document["settings"]["brokers"] == [embedded.ws_url.replace("localhost", "127.0.0.1")]
    summary = document["summary"]
    assert summary["connects"] == 5
    assert summary["messages_sent"] > 0
    assert document["probe"]["received"] == summary["messages_sent"], document["probe"]
    assert document["probe"]["lost"] == 0


def test_run_reports_refused_devices_by_reason(run_cli: RunCLI, tmp_path: Path) -> None:
    binary = find_mosquitto()
    assert binary is not None
    with MosquittoBroker(binary=binary, users={"good": "secret"}, allow_anonymous=False) as secured:
        code, document, output = run_json(
            run_cli,
            tmp_path,
            THERMOSTAT,
            "--broker",
            secured.url,
            "--devices",
            "5",
            "--duration",
            "3",
            "--username",
            "good",
            "--password",
            "wrong",
        )
    assert code == 3, output
    reasons = document["summary"]["connect_failures_by_reason"]
    assert set(reasons) <= {"not authorized", "bad user name or password"}
    assert sum(reasons.values()) >= 5
    assert "Traceback" not in output


def test_run_with_a_broker_address_that_does_not_parse_exits_2(run_cli: RunCLI) -> None:
    done = run_cli("run", THERMOSTAT, "--broker", "gopher://example:1883")
    assert done.returncode == 2
    assert "unsupported broker scheme 'gopher'" in done.stderr
    assert "mqtt://" in done.stderr
    assert "coap://" in done.stderr


def test_run_with_tls_options_but_a_plain_broker_exits_2(run_cli: RunCLI) -> None:
    done = run_cli("run", THERMOSTAT, "--broker", "mqtt://127.0.0.1:1", "--tls-insecure")
    assert done.returncode == 2
    assert "mqtts://" in done.stderr


def test_run_with_a_missing_ca_file_exits_2_naming_it(run_cli: RunCLI, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere-ca.pem"
    done = run_cli("run", THERMOSTAT, "--broker", "mqtts://127.0.0.1:1", "--tls-ca", str(missing))
    assert done.returncode == 2
    assert "nowhere-ca.pem" in done.stderr


def test_demo_runs_a_mixed_fleet_on_its_embedded_broker(run_cli: RunCLI) -> None:
    done = run_cli("demo", "--devices", "40", "--duration", "6")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "40 connects, 0 connect failures" in done.stdout
    assert "counters reconcile: yes" in done.stdout
    assert "0 lost, 0 duplicates" in done.stdout
    assert "Try next" in done.stdout


def test_ctrl_c_stops_the_run_gracefully_with_its_figures(
    tmp_path: Path, broker: MosquittoBroker, telemetry: queue.Queue[bytes]
) -> None:
    import os  # noqa: PLC0415 - only this test sends signals
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    results = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "iotix",
            "run",
            THERMOSTAT,
            "--broker",
            broker.url,
            "--devices",
            "20",
            "--duration",
            "0",
            "--results",
            str(results),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        telemetry.get(timeout=30)  # devices are connected and sending
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output.decode()
    document = json.loads(results.read_text(encoding="utf-8"))
    assert document["interrupted"] is True
    assert document["summary"]["connects"] == 20
    assert document["summary"]["counters_reconcile"] is True
    assert b"Traceback" not in output


@pytest.mark.parametrize(
    ("policy", "code", "stops_early"), [("fail", 3, True), ("continue", 0, False)]
)
def test_a_worker_that_dies_is_reported_and_the_run_fails_or_goes_on_by_option(
    tmp_path: Path,
    broker: MosquittoBroker,
    telemetry: queue.Queue[bytes],
    policy: str,
    code: int,
    *,
    stops_early: bool,
) -> None:
    import os  # noqa: PLC0415 - only these tests manage processes
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    import psutil  # noqa: PLC0415 - comes with amqtt; finds the worker processes

    results = tmp_path / "results.json"
    command = [sys.executable, "-m", "iotix", "run", THERMOSTAT, "--broker", broker.url]
    command += ["--devices", "20", "--workers", "2", "--duration", "8"]
    command += ["--on-worker-death", policy]
    process = subprocess.Popen(
        [*command, "--results", str(results)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    try:
        telemetry.get(timeout=30)  # the workers are up and sending
        # Workers are forked by multiprocessing's fork server, a child of the run.
        [server] = [
            child
            for child in psutil.Process(process.pid).children()
            if "forkserver" in " ".join(child.cmdline())
        ]
        workers = server.children()
        assert len(workers) == 2
        workers[0].kill()
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, output.decode()
    document = json.loads(results.read_text(encoding="utf-8"))
    assert any("died" in error for error in document["worker_errors"])
    assert b"died" in output
    # The surviving worker's clock: cut short when the run fails, the full 8 s else.
    last_second = document["time_series"][-1]["at_s"]
    assert (last_second < 7) is stops_early, last_second
