"""Real NATS servers with their MQTT listener on free ports, for interoperability tests.

:class:`NATSServer` starts one ``nats-server`` process on 127.0.0.1, with JetStream and
the MQTT listener enabled, from a configuration generated in a private temporary
directory; it waits until the MQTT port answers a real CONNECT with a CONNACK, and
stops exactly the process it started::

    from iotix.testing.nats import NATSServer

    with NATSServer() as server:
        run_my_devices(server.host, server.port)  # the MQTT port; server.url: mqtt://...
        print(server.log_text())

``kill()`` crashes the server (SIGKILL) and ``restart()`` brings it back on the same
ports with the same JetStream store, for reconnect tests.

Facts worth knowing (NATS 2.9, Debian's ``nats-server``):

- NATS speaks MQTT 3.1.1 only. A CONNECT of another protocol level is answered with the
  3.1.1 CONNACK return code 1 (unacceptable protocol version), and the connection is
  closed.
- QoS 0 and 1 only: a subscription asking for QoS 2 is granted QoS 1, and a PUBLISH at
  QoS 2 is a protocol violation to NATS, which closes the connection.
- MQTT in NATS needs JetStream (sessions, retained messages and QoS 1 messages live in
  streams) and a ``server_name``. JetStream's store lives in the private directory and
  is kept across :meth:`restart`, so retained messages and persistent sessions survive
  a restart (they do not survive :meth:`stop`, which removes the directory).
- The first CONNECT makes NATS create the account's MQTT streams, which takes a moment:
  the server counts as up once a CONNECT got its CONNACK, so tests never race it.
- Ports are picked by binding port 0 and passing the numbers to NATS. Another process
  can take a port in between; NATS then fails to bind and the start is retried on new
  ports. The NATS client port (``client_port``) is bound to ``host`` as well; nothing
  here uses it but NATS cannot run without it.
- The program is looked up on ``PATH`` and then in the ``sbin`` directories (Debian
  installs it as ``/usr/sbin/nats-server``), which a non-root ``PATH`` often lacks.

Nothing here is shared between servers: no module-level state, no global registry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Self

from iotix.errors import IotixError, MQTTProtocolError
from iotix.protocols.mqtt.session import (
    ConnectedEvent,
    ConnectionRefusedEvent,
    MQTTClientSession,
    SessionSettings,
)
from iotix.testing.process import log_tail, read_log_since, stop_process

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "NATSNotFoundError",
    "NATSServer",
    "NATSServerError",
    "find_nats_server",
    "mqtt_connack",
]

_log = logging.getLogger(__name__)

# Where packages put the server when `sbin` is not on PATH (Debian, source builds).
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
# NATS logs this once every listener (clients, MQTT) is open.
_READY = b"Server is ready"
_PORT_TAKEN = b"address already in use"
_PORT_ATTEMPTS = 5
_POLL_INTERVAL_S = 0.02
_CONNACK_TIMEOUT_S = 2.0
_LOG_TAIL_LINES = 30


class NATSServerError(IotixError):
    """A NATS server could not be configured, started or restarted.

    ``log_tail`` holds the last lines of the server's log, where there is one.
    """

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        text = (
            f"{message}\n--- nats-server log (last lines) ---\n{log_tail}" if log_tail else message
        )
        super().__init__(text)
        self.log_tail = log_tail


class NATSNotFoundError(NATSServerError):
    """``nats-server`` is not installed."""

    def __init__(self, program: str) -> None:
        super().__init__(
            f"{program} is not installed: install NATS 2.9 or later (Debian/Ubuntu package "
            "`nats-server`)"
        )
        self.program = program


def find_nats_server(program: str = "nats-server") -> Path | None:
    """The path of ``nats-server``, or None."""
    found = shutil.which(program)
    if found is not None:
        return Path(found)
    for directory in _SBIN_DIRS:
        candidate = Path(directory, program)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def mqtt_connack(host: str, port: int, *, timeout_s: float = _CONNACK_TIMEOUT_S) -> int | None:
    """Send an MQTT 3.1.1 CONNECT and return the CONNACK's reason (0: accepted; a refusal
    in MQTT 5 terms, such as 0x87), or None when no CONNACK came (nothing listens, the
    peer closed, or it does not speak MQTT). Disconnects cleanly after a CONNACK.

    A readiness probe for brokers in other processes: a port that accepts TCP is not yet
    a broker that accepts clients (NATS and RabbitMQ open their MQTT port before they
    can serve it). Blocking; it drives iotix's own sans-I/O session over a socket.
    """
    session = MQTTClientSession(
        SessionSettings(client_id=f"iotix-ready-{uuid.uuid4().hex[:12]}", keepalive_s=0)
    )
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            session.connect()
            sock.sendall(session.data_to_send())
            while (left_s := deadline - time.monotonic()) > 0:
                sock.settimeout(left_s)
                data = sock.recv(4096)
                if not data:
                    return None
                for event in session.receive_data(data):
                    if isinstance(event, ConnectionRefusedEvent):
                        return event.reason_code
                    if isinstance(event, ConnectedEvent):
                        session.disconnect()
                        with contextlib.suppress(OSError):
                            sock.sendall(session.data_to_send())
                        return 0
    except (OSError, MQTTProtocolError):
        return None
    return None


class NATSServer:
    """One ``nats-server`` process with JetStream and MQTT, on free ports.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. ``port`` is the
    MQTT port. ``extra_config`` lines are appended to the generated configuration.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        extra_config: tuple[str, ...] = (),
        binary: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 20.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self._host = host
        self._extra_config = tuple(extra_config)
        self._binary = Path(binary) if binary is not None else None
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._name = f"iotix_test_{uuid.uuid4().hex[:8]}"
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._final_log = ""

    # -- addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address both listeners are bound to (127.0.0.1 unless given)."""
        return self._host

    @property
    def port(self) -> int:
        """The MQTT port (kept after :meth:`stop`, to check that it is free)."""
        return self._port("mqtt")

    @property
    def client_port(self) -> int:
        """The NATS protocol port."""
        return self._port("client")

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT`` for the MQTT listener."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"mqtt://{host}:{self.port}"

    @property
    def server_name(self) -> str:
        """The ``server_name`` of the configuration (MQTT needs one)."""
        return self._name

    # -- state -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the process this object started is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def directory(self) -> Path | None:
        """The private directory (configuration, JetStream store, log), until :meth:`stop`."""
        return self._dir

    @property
    def config_path(self) -> Path:
        """The generated ``nats.conf``."""
        return self._require_dir() / "nats.conf"

    @property
    def log_path(self) -> Path:
        """The server's log (its stderr and stdout), appended to across restarts."""
        return self._require_dir() / "nats.log"

    def log_text(self) -> str:
        """Everything the server has logged, also after :meth:`stop`."""
        if self._dir is None:
            return self._final_log
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return ""

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server on new free ports and wait until MQTT clients get a CONNACK.

        Raises :class:`NATSNotFoundError` if ``nats-server`` is not installed and
        :class:`NATSServerError` (with the log tail) if it does not come up within
        ``start_timeout_s``. A failed start leaves nothing behind.
        """
        if self.running:
            raise NATSServerError(f"server already running on port {self.port}")
        binary = self._resolve_binary()
        self._discard()
        self._dir = Path(tempfile.mkdtemp(prefix="iotix-nats-"))
        try:
            self._launch_on_free_ports(binary)
        except BaseException:
            self._discard()
            raise
        return self

    def stop(self) -> None:
        """Stop the process this object started (SIGTERM, then SIGKILL after
        ``stop_timeout_s``) and remove its directory. Safe to call more than once."""
        self._discard()

    def kill(self) -> None:
        """Crash the server (SIGKILL) and reap it; the directory and ports are kept, so
        :meth:`restart` can bring it back."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def restart(self) -> None:
        """Stop the server if it runs (gracefully) and start it again on the same ports,
        with the same JetStream store.

        Raises :class:`NATSServerError` if it was never started or was stopped, or if a
        port has been taken meanwhile.
        """
        if self._dir is None or not self._ports:
            raise NATSServerError("restart() needs a server that was started and not stopped")
        binary = self._resolve_binary()
        self._terminate()
        error = self._launch(binary)
        if error is not None:
            raise error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running, pid {self.pid}" if self.running else "not running"
        where = f" {self.url}" if self._ports else ""
        return f"<NATSServer{where} ({state})>"

    # -- internals -------------------------------------------------------------------

    def _port(self, listener: str) -> int:
        if not self._ports:
            raise NATSServerError("the server has not been started")
        return self._ports[listener]

    def _require_dir(self) -> Path:
        if self._dir is None:
            raise NATSServerError("the server is not started (or was stopped)")
        return self._dir

    def _resolve_binary(self) -> Path:
        if self._binary is None:
            binary = find_nats_server()
        elif os.sep in str(self._binary):
            binary = self._binary
        else:
            binary = find_nats_server(str(self._binary))
        if binary is None or not binary.is_file():
            raise NATSNotFoundError(str(self._binary or "nats-server"))
        return binary.absolute()

    def _launch_on_free_ports(self, binary: Path) -> None:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._ports = _pick_ports(self._host, ("client", "mqtt"))
            error = self._launch(binary)
            if error is None:
                return
            if not error.port_taken or attempt == _PORT_ATTEMPTS:
                raise error
            _log.debug("nats-server lost the race for port(s) %s; retrying", self._ports)

    def _config(self) -> str:
        directory = self._require_dir()
        # NATS's configuration format reads JSON strings, so json.dumps quotes them.
        client = json.dumps(f"{self._host}:{self._ports['client']}")
        mqtt = json.dumps(f"{self._host}:{self._ports['mqtt']}")
        lines = [
            "# Generated by iotix.testing.nats.NATSServer; rewritten on every start.",
            f"server_name: {json.dumps(self._name)}",
            f"listen: {client}",
            f"jetstream {{ store_dir: {json.dumps(str(directory))} }}",  # NATS adds /jetstream
            f"mqtt {{ listen: {mqtt} }}",
            *self._extra_config,
        ]
        return "\n".join(lines) + "\n"

    def _launch(self, binary: Path) -> _LaunchError | None:
        """Write the configuration, start the process and wait until it is up.

        Returns None when it is up; otherwise the process is gone and the error says why.
        """
        self.config_path.write_text(self._config(), encoding="utf-8")
        log_path = self.log_path
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603  (our binary, our config)
                [str(binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self._dir,
            )
        _log.debug("started nats-server pid %d on ports %s", self._process.pid, self._ports)
        return self._wait_until_up(self._process, log_offset)

    def _wait_until_up(
        self, process: subprocess.Popen[bytes], log_offset: int
    ) -> _LaunchError | None:
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            if process.poll() is not None:
                log = self._log_since(log_offset)
                return _LaunchError(
                    f"nats-server exited with status {process.returncode} while starting "
                    f"(ports {self._ports}, config {self.config_path})",
                    log_tail=_tail(log),
                    port_taken=_PORT_TAKEN in log,
                )
            # The log says every listener is ours before the CONNACK is trusted: a port
            # taken by someone else must not pass for the server.
            if _READY in self._log_since(log_offset) and (
                mqtt_connack(self._host, self._ports["mqtt"]) == 0
            ):
                return None
            if time.monotonic() >= deadline:
                process.kill()
                process.wait()
                return _LaunchError(
                    f"nats-server did not answer an MQTT CONNECT on port {self._ports['mqtt']} "
                    f"within {self._start_timeout_s:g} s (config {self.config_path})",
                    log_tail=_tail(self._log_since(log_offset)),
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(_POLL_INTERVAL_S)

    def _log_since(self, offset: int) -> bytes:
        return read_log_since(self.log_path, offset)

    def _terminate(self) -> None:
        stop_process(self._process, self._stop_timeout_s, name="nats-server")

    def _discard(self) -> None:
        self._terminate()
        if self._dir is not None:
            self._final_log = self.log_text()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class _LaunchError(NATSServerError):
    """A start that failed; ``port_taken`` when it lost the race for a free port."""

    def __init__(self, message: str, *, log_tail: str, port_taken: bool = False) -> None:
        super().__init__(message, log_tail=log_tail)
        self.port_taken = port_taken


def _pick_ports(host: str, names: tuple[str, ...]) -> dict[str, int]:
    """A free port per name, all distinct: every socket stays bound until all are chosen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(family)) for _ in names]
        for sock in sockets:
            sock.bind((host, 0))
        return {name: sock.getsockname()[1] for name, sock in zip(names, sockets, strict=True)}


def _tail(log: bytes) -> str:
    return log_tail(log, _LOG_TAIL_LINES)
