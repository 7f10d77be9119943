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
- Free ports, the retried start, the stop and the log are
  :class:`~iotix.testing.process.ServerProcess`'s (see :mod:`iotix.testing.process`);
  NATS logs ``address already in use`` when a port was taken. The NATS client port
  (``client_port``) is bound to ``host`` as well; nothing here uses it but NATS cannot
  run without it.
- The program is looked up on ``PATH`` and then in the ``sbin`` directories (Debian
  installs it as ``/usr/sbin/nats-server``), which a non-root ``PATH`` often lacks.

Nothing here is shared between servers: no module-level state, no global registry.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from iotix.errors import MQTTProtocolError
from iotix.protocols.mqtt.session import (
    ConnectedEvent,
    ConnectionRefusedEvent,
    MQTTClientSession,
    SessionSettings,
)
from iotix.testing.process import (
    ServerProcess,
    ServerProcessError,
    find_program,
    given_program,
    pick_free_ports,
)

if TYPE_CHECKING:
    import os

__all__ = [
    "NATSNotFoundError",
    "NATSServer",
    "NATSServerError",
    "find_nats_server",
    "mqtt_connack",
]

# Where packages put the server when `sbin` is not on PATH (Debian, source builds).
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
# NATS logs this once every listener (clients, MQTT) is open.
_READY = b"Server is ready"
_PORT_TAKEN = b"address already in use"
_CONNACK_TIMEOUT_S = 2.0


class NATSServerError(ServerProcessError):
    """A NATS server could not be configured, started or restarted."""

    _log_label = "nats-server"


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
    return find_program(program, after_path=_SBIN_DIRS)


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


class NATSServer(ServerProcess):
    """One ``nats-server`` process with JetStream and MQTT, on free ports.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. ``port`` is the
    MQTT port. ``extra_config`` lines are appended to the generated configuration. The
    private :attr:`directory` holds the configuration, the JetStream store and the log.
    """

    _program = "nats-server"
    _file_stem = "nats"
    _error = NATSServerError
    _readiness = "answer an MQTT CONNECT"
    _port_taken_markers = (_PORT_TAKEN,)

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        extra_config: tuple[str, ...] = (),
        binary: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 20.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(host=host, start_timeout_s=start_timeout_s, stop_timeout_s=stop_timeout_s)
        self._extra_config = tuple(extra_config)
        self._binary = Path(binary) if binary is not None else None
        self._name = f"iotix_test_{uuid.uuid4().hex[:8]}"

    # -- addresses -------------------------------------------------------------------

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
        return f"mqtt://{self._netloc(self.port)}"

    @property
    def server_name(self) -> str:
        """The ``server_name`` of the configuration (MQTT needs one)."""
        return self._name

    @property
    def config_path(self) -> Path:
        """The generated ``nats.conf``."""
        return self._require_dir() / "nats.conf"

    # -- hooks -----------------------------------------------------------------------

    def _resolve_binary(self) -> Path:
        given = self._binary
        binary = find_nats_server() if given is None else given_program(given, find_nats_server)
        if binary is None:
            raise NATSNotFoundError(str(given or "nats-server"))
        return binary.absolute()

    def _pick_ports(self) -> dict[str, int]:
        return pick_free_ports(self._host, ("client", "mqtt"))

    def _write_config(self) -> None:
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
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _command(self, binary: Path) -> list[str]:
        return [str(binary), "-c", str(self.config_path)]

    def _ready(self, log: bytes) -> bool:
        # The log says every listener is ours before the CONNACK is trusted: a port
        # taken by someone else must not pass for the server.
        return _READY in log and mqtt_connack(self._host, self._ports["mqtt"]) == 0

    def _describe(self) -> str:
        return f"ports {self._ports}, config {self.config_path}"
