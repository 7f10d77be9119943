"""`iotix.testing.process.ServerProcess`, the lifecycle every test-server fixture shares,
checked with a tiny TCP server run by this Python interpreter."""

from __future__ import annotations

import socket
import sys
import textwrap
from pathlib import Path

import pytest

from iotix.testing.process import (
    ServerProcess,
    ServerProcessError,
    accepts_connections,
    pick_free_ports,
)

# Binds its port, logs "ready" and serves, like the servers the fixtures run. Modes:
# "crash" exits before binding, "mute" binds but never listens.
FAKE_SERVER = textwrap.dedent(
    """
    import signal, socket, sys

    host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode == "crash":
        print("fake: bad configuration", flush=True)
        sys.exit(3)
    sock = socket.socket()
    try:
        sock.bind((host, port))
    except OSError as exc:
        print(f"fake: {exc.strerror}", file=sys.stderr, flush=True)
        sys.exit(1)
    if mode == "mute":
        signal.pause()  # until the fixture gives up and stops it
    sock.listen()
    print("fake: ready", flush=True)
    while True:
        sock.accept()[0].close()
    """
)


class FakeServerError(ServerProcessError):
    _log_label = "fake"


class FakeServer(ServerProcess):
    _program = "fake-server"
    _file_stem = "fake"
    _error = FakeServerError
    _readiness = "accept connections"

    def __init__(self, mode: str = "serve", *, start_timeout_s: float = 10.0) -> None:
        super().__init__(host="127.0.0.1", start_timeout_s=start_timeout_s, stop_timeout_s=5.0)
        self.mode = mode
        self.forced_ports: list[int] = []  # picked before any free one, in order

    @property
    def port(self) -> int:
        return self._port("main")

    @property
    def url(self) -> str:
        return f"fake://{self._netloc(self.port)}"

    def _resolve_binary(self) -> Path:
        return Path(sys.executable)

    def _prepare_directory(self) -> None:
        (self._require_dir() / "fake.py").write_text(FAKE_SERVER, encoding="utf-8")

    def _pick_ports(self) -> dict[str, int]:
        if self.forced_ports:
            return {"main": self.forced_ports.pop(0)}
        return pick_free_ports(self._host, ("main",))

    def _command(self, binary: Path) -> list[str]:
        script = self._require_dir() / "fake.py"
        return [str(binary), str(script), self._host, str(self.port), self.mode]

    def _ready(self, log: bytes) -> bool:
        return b"fake: ready" in log and accepts_connections(self._host, self.port)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_start_returns_once_the_server_answers() -> None:
    with FakeServer() as server:
        assert server.running
        assert server.pid is not None
        assert accepts_connections(server.host, server.port)
        assert server.url == f"fake://127.0.0.1:{server.port}"
        assert repr(server) == f"<FakeServer {server.url} (running, pid {server.pid})>"


def test_stop_ends_the_process_removes_the_directory_and_keeps_the_log() -> None:
    server = FakeServer().start()
    directory = server.directory
    assert directory is not None
    server.stop()

    assert not server.running
    assert server.pid is None
    assert not directory.exists()
    assert port_is_free(server.port)
    assert "fake: ready" in server.log_text()
    server.stop()  # idempotent


def test_start_retries_on_new_ports_when_a_port_is_taken_before_the_server_binds() -> None:
    server = FakeServer()
    with socket.create_server(("127.0.0.1", 0)) as intruder:
        taken = intruder.getsockname()[1]
        server.forced_ports = [taken]
        with server:
            assert server.port != taken
            assert "Address already in use" in server.log_text()


def test_a_server_that_exits_while_starting_fails_with_its_log_and_leaves_nothing() -> None:
    server = FakeServer("crash")
    with pytest.raises(FakeServerError, match="fake-server exited with status 3") as raised:
        server.start()
    assert "fake: bad configuration" in raised.value.log_tail
    assert "--- fake log (last lines) ---" in str(raised.value)
    assert server.directory is None
    assert not server.running


def test_a_server_that_never_answers_is_killed_after_the_start_timeout() -> None:
    server = FakeServer("mute", start_timeout_s=0.3)
    with pytest.raises(FakeServerError, match=r"did not accept connections within 0\.3 s"):
        server.start()
    assert not server.running
    assert server.directory is None


def test_restart_after_a_kill_comes_back_on_the_same_port() -> None:
    with FakeServer() as server:
        port, pid = server.port, server.pid
        server.kill()
        assert not server.running
        server.restart()
        assert server.running
        assert server.pid != pid
        assert server.port == port
        assert accepts_connections(server.host, port)


def test_restart_needs_a_server_that_was_started_and_not_stopped() -> None:
    server = FakeServer()
    with pytest.raises(FakeServerError, match="restart"):
        server.restart()
    server.start().stop()
    with pytest.raises(FakeServerError, match="restart"):
        server.restart()


def test_ports_before_the_first_start_are_an_error() -> None:
    with pytest.raises(FakeServerError, match="has not been started"):
        _ = FakeServer().port


def test_a_running_server_cannot_be_started_again() -> None:
    with FakeServer() as server, pytest.raises(FakeServerError, match="already running"):
        server.start()


def test_free_ports_are_distinct() -> None:
    ports = pick_free_ports("127.0.0.1", ("a", "b", "c"))
    assert len(set(ports.values())) == 3
