"""The Mosquitto fixtures and `iotix.testing.MosquittoBroker`, checked with paho-mqtt.

paho is an independent client here: if it can exchange messages through the broker at
every QoS, be refused with the broker's reason code and notice a crash, the broker the
fixtures start is a real, usable one. Every wait has a timeout; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import shutil
import socket
import ssl
import struct
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pytest
from broker_helpers import TIMEOUT_S, PahoClient, port_is_free

from iotix.testing import MosquittoBroker, MosquittoError, TLSListenerSpec

if TYPE_CHECKING:
    from collections.abc import Iterator


NOT_AUTHORIZED = 0x87  # MQTT 5 CONNACK reason code; paho maps 3.1.1's code 5 to it too
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp

_client_numbers = itertools.count()


@contextlib.contextmanager
def paho_client(
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None = None,
    transport: Literal["tcp", "websockets"] = "tcp",
    **credentials: str,
) -> Iterator[PahoClient]:
    """Connect, wait for the CONNACK (success or not), and disconnect afterwards."""
    paho = PahoClient(transport=transport, **credentials)
    if tls is not None:
        paho.client.tls_set_context(tls)
    paho.client.connect(host, port, keepalive=30)
    paho.client.loop_start()
    try:
        assert paho.connack.wait(TIMEOUT_S), "no CONNACK"
        yield paho
    finally:
        paho.client.disconnect()
        paho.close()


@contextlib.contextmanager
def connected(broker: MosquittoBroker, **credentials: str) -> Iterator[PahoClient]:
    """A client the broker accepted."""
    with paho_client(broker.host, broker.port, **credentials) as paho:
        assert paho.connack_reason is not None
        assert not paho.connack_reason.is_failure, paho.connack_reason
        yield paho


def exchange(broker: MosquittoBroker, topic: str, qos: int, count: int = 10) -> None:
    """Publish ``count`` messages from one client to another, checking each arrives."""
    with connected(broker) as subscriber, connected(broker) as publisher:
        subscriber.subscribe(topic, qos)
        for number in range(count):
            info = publisher.client.publish(topic, f"message {number}".encode(), qos=qos)
            info.wait_for_publish(timeout=TIMEOUT_S)
            assert info.is_published()
        received = [subscriber.receive() for _ in range(count)]
    assert [m.payload for m in received] == [f"message {n}".encode() for n in range(count)]
    assert {m.qos for m in received} == {qos}
    assert {m.topic for m in received} == {topic}


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the fixtures ------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_session_broker_delivers_messages_at_each_qos(
    mosquitto_session: MosquittoBroker, qos: int
) -> None:
    exchange(mosquitto_session, f"iotix/test/session/qos{qos}", qos)


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_fresh_broker_delivers_messages_at_each_qos(mosquitto: MosquittoBroker, qos: int) -> None:
    exchange(mosquitto, f"iotix/test/fresh/qos{qos}", qos)


def test_fixture_broker_listens_on_loopback_at_a_free_port(mosquitto: MosquittoBroker) -> None:
    assert mosquitto.host == "127.0.0.1"
    assert mosquitto.port not in (0, 1883)
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert mosquitto.running
    assert "running" in mosquitto.log_text()


def test_function_fixture_gives_each_test_its_own_broker(
    mosquitto: MosquittoBroker, mosquitto_session: MosquittoBroker
) -> None:
    assert mosquitto.port != mosquitto_session.port
    assert mosquitto.pid != mosquitto_session.pid


# -- MosquittoBroker ---------------------------------------------------------------------


def test_two_brokers_run_at_once_on_different_ports(mosquitto_binary: Path) -> None:
    with (
        MosquittoBroker(binary=mosquitto_binary) as one,
        MosquittoBroker(binary=mosquitto_binary) as two,
    ):
        assert one.port != two.port
        assert one.pid != two.pid
        with connected(one), connected(two):
            pass


def test_kill_drops_connections_and_restart_brings_the_same_port_back(
    mosquitto: MosquittoBroker,
) -> None:
    port = mosquitto.port
    with connected(mosquitto) as client:
        mosquitto.kill()
        assert client.disconnected.wait(TIMEOUT_S), "the client did not notice the crash"
    assert not mosquitto.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((mosquitto.host, port), timeout=TIMEOUT_S)

    mosquitto.restart()

    assert mosquitto.running
    assert mosquitto.port == port
    exchange(mosquitto, "iotix/test/restarted", qos=1, count=1)


def test_restart_of_a_running_broker_keeps_its_port(mosquitto: MosquittoBroker) -> None:
    port, pid = mosquitto.port, mosquitto.pid
    mosquitto.restart()
    assert (mosquitto.port, mosquitto.running) == (port, True)
    assert mosquitto.pid != pid
    assert pid is not None
    assert not process_exists(pid)


def test_password_file_refuses_wrong_credentials(mosquitto_binary: Path) -> None:
    users = {"device-1": "s3cret:with colon"}
    with MosquittoBroker(binary=mosquitto_binary, users=users, allow_anonymous=False) as broker:
        for username, password in [("device-1", "wrong"), ("nobody", "s3cret:with colon")]:
            with paho_client(
                broker.host, broker.port, username=username, password=password
            ) as client:
                assert client.connack_reason is not None
                assert client.connack_reason.is_failure
                assert client.connack_reason.value == NOT_AUTHORIZED


def test_password_file_accepts_right_credentials(mosquitto_binary: Path) -> None:
    users = {"device-1": "s3cret:with colon", "device-2": "other"}
    with MosquittoBroker(binary=mosquitto_binary, users=users, allow_anonymous=False) as broker:
        for username, password in users.items():
            with connected(broker, username=username, password=password):
                pass


def test_stop_ends_the_process_and_frees_the_port(mosquitto_binary: Path) -> None:
    broker = MosquittoBroker(binary=mosquitto_binary).start()
    try:
        pid, port, directory = broker.pid, broker.port, broker.directory
        assert pid is not None
        assert directory is not None
        with connected(broker):
            pass
    finally:
        broker.stop()

    assert not process_exists(pid)
    assert not directory.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((broker.host, port), timeout=TIMEOUT_S)
    assert port_is_free(broker.host, port)
    assert "terminating" in broker.log_text()  # the log outlives the directory
    broker.stop()  # idempotent


def test_start_retries_when_the_free_port_is_taken_before_mosquitto_binds(
    mosquitto_binary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = MosquittoBroker(binary=mosquitto_binary)
    real_pick_ports = broker._pick_ports
    with socket.create_server(("127.0.0.1", 0)) as intruder:
        taken = intruder.getsockname()[1]
        picks = iter([{"mqtt": taken}])
        monkeypatch.setattr(broker, "_pick_ports", lambda: next(picks, None) or real_pick_ports())
        with broker:
            assert broker.port != taken
            assert "Address already in use" in broker.log_text()
            with connected(broker):
                pass


def test_a_broker_that_cannot_start_reports_its_log_and_leaves_nothing(
    mosquitto_binary: Path,
) -> None:
    broker = MosquittoBroker(binary=mosquitto_binary, extra_config=["no_such_option 1"])
    with pytest.raises(MosquittoError, match="no_such_option") as raised:
        broker.start()
    assert "no_such_option" in raised.value.log_tail
    assert broker.directory is None
    assert not broker.running


def test_broker_gets_the_hard_open_file_limit(mosquitto_binary: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))
    broker = MosquittoBroker(binary=mosquitto_binary)
    try:
        broker.start()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        limits = Path(f"/proc/{broker.pid}/limits").read_text(encoding="utf-8")
        # prlimit execs Mosquitto: the pid is the broker's own.
        assert Path(f"/proc/{broker.pid}/exe").resolve() == mosquitto_binary.resolve()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        broker.stop()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == [str(hard), str(hard)]


def test_broker_options_reach_the_configuration(mosquitto_binary: Path) -> None:
    with MosquittoBroker(
        binary=mosquitto_binary,
        max_keepalive=120,
        max_inflight_messages=5,
        max_queued_messages=50,
        websockets=True,
    ) as broker:
        config = broker.config_path.read_text(encoding="utf-8").splitlines()
        assert broker.websockets_port not in (broker.port, 0)
        assert broker.websockets_url == f"ws://127.0.0.1:{broker.websockets_port}"
        with connected(broker):
            pass
    for line in [
        f"listener {broker.port} 127.0.0.1",
        f"listener {broker.websockets_port} 127.0.0.1",
        "protocol websockets",
        "socket_domain ipv4",
        "max_connections -1",
        "persistence false",
        "set_tcp_nodelay true",
        "max_keepalive 120",
        "max_inflight_messages 5",
        "max_queued_messages 50",
    ]:
        assert line in config


def test_websockets_listener_speaks_mqtt(mosquitto_binary: Path) -> None:
    with MosquittoBroker(binary=mosquitto_binary, websockets=True) as broker:
        port = broker.websockets_port
        with paho_client(broker.host, port, transport="websockets") as client:
            assert client.connack_reason is not None
            assert not client.connack_reason.is_failure


def listening_addresses(port: int) -> set[tuple[str, int]]:
    """Every (address, port) a TCP socket of this machine listens on for ``port``, read
    from /proc/net/tcp and tcp6 (addresses as 32-bit words in host byte order)."""
    found = set()
    for table, family in [("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)]:
        lines = Path("/proc/net", table).read_text(encoding="ascii").splitlines()[1:]
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, _, port_hex = local.partition(":")
            if state != LISTEN or int(port_hex, 16) != port:
                continue
            words = (int(address[i : i + 8], 16) for i in range(0, len(address), 8))
            raw = b"".join(struct.pack("=I", word) for word in words)
            found.add((socket.inet_ntop(family, raw), port))
    return found


def test_every_listener_binds_the_loopback_address_only(mosquitto_binary: Path) -> None:
    # Mosquitto 2.0.11's libwebsockets binds an IPv4 websockets listener on every
    # interface (`*:PORT`, IPv4 and IPv6) unless the listener says `socket_domain ipv4`.
    with MosquittoBroker(binary=mosquitto_binary, websockets=True) as broker:
        listening = {
            port: listening_addresses(port) for port in (broker.port, broker.websockets_port)
        }
    assert listening == {
        broker.port: {("127.0.0.1", broker.port)},
        broker.websockets_port: {("127.0.0.1", broker.websockets_port)},
    }


def test_a_websockets_listener_needs_an_ip_address(mosquitto_binary: Path) -> None:
    # libwebsockets takes no host name: `listener PORT localhost` would open nothing.
    with pytest.raises(MosquittoError, match="needs an IP address, not 'localhost'"):
        MosquittoBroker(binary=mosquitto_binary, websockets=True, host="localhost")


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (EC P-256)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: run scripts/services", pytrace=False)
    directory = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, capture_output=True, check=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=iotix test CA")  # fmt: skip
    for name, extension in [("server", "subjectAltName=IP:127.0.0.1"), ("client", "")]:
        run("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=iotix test {name}")  # fmt: skip
        (directory / f"{name}.ext").write_text(extension + "\n", encoding="utf-8")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem",
            "-extfile", f"{name}.ext")  # fmt: skip
    return {name: directory / name for name in [
        "ca.pem", "server.pem", "server.key", "client.pem", "client.key"]}  # fmt: skip


def client_tls(tls_files: dict[str, Path], *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls_files["ca.pem"])
    if with_certificate:
        context.load_cert_chain(tls_files["client.pem"], tls_files["client.key"])
    return context


def tls_broker(mosquitto_binary: Path, tls_files: dict[str, Path]) -> MosquittoBroker:
    spec = TLSListenerSpec(
        cafile=tls_files["ca.pem"],
        certfile=tls_files["server.pem"],
        keyfile=tls_files["server.key"],
        require_certificate=True,
    )
    return MosquittoBroker(binary=mosquitto_binary, tls=spec)


def test_tls_listener_accepts_a_client_certificate_signed_by_its_ca(
    mosquitto_binary: Path, tls_files: dict[str, Path]
) -> None:
    with tls_broker(mosquitto_binary, tls_files) as broker:
        assert broker.tls_url == f"mqtts://127.0.0.1:{broker.tls_port}"
        context = client_tls(tls_files, with_certificate=True)
        with paho_client(broker.host, broker.tls_port, tls=context) as client:
            assert client.connack_reason is not None
            assert not client.connack_reason.is_failure


def test_tls_listener_requiring_certificates_refuses_a_client_without_one(
    mosquitto_binary: Path, tls_files: dict[str, Path]
) -> None:
    with tls_broker(mosquitto_binary, tls_files) as broker:
        paho = PahoClient()
        paho.client.tls_set_context(client_tls(tls_files, with_certificate=False))
        try:
            # TLS 1.3 finishes the client's side of the handshake before the server
            # checks for a certificate, so the refusal arrives as a connect error or
            # as a closed connection, never as a CONNACK.
            paho.client.connect(broker.host, broker.tls_port)
        except (ssl.SSLError, OSError):
            return
        paho.client.loop_start()
        try:
            assert paho.disconnected.wait(TIMEOUT_S), "the broker kept the connection"
            assert not paho.connack.is_set()
        finally:
            paho.client.disconnect()
            paho.close()
