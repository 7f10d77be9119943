"""What the test servers (Mosquitto, NATS, RabbitMQ, Tansu, coap-server) share: one
lifecycle for a server program run as a child process, in :class:`ServerProcess`.

A fixture built on it starts one process of its own on free ports of 127.0.0.1, from
files generated in a private temporary directory, waits until the server answers, and
stops exactly the process it started. Each fixture only says what differs: its
command line, its configuration, how it knows the server is up, and which log lines
mean that a port was taken. :class:`ServerFixture` is the start/stop/``with`` protocol
alone, which the in-process :class:`~iotix.testing.embedded.EmbeddedBroker` shares.

Facts that hold for every one of them:

- Ports are picked by binding port 0 and passing the numbers to the server. Another
  process can take a port in between; the server then fails to bind, says so in its
  log, and the start is retried on new ports (up to five times).
- The server counts as up only once it answers a real request (or, where that is the
  only evidence, accepts connections after its log says every listener is its own). A
  port that accepts TCP is not yet a server that serves clients, and a port held by
  someone else must never pass for the server.
- While it starts, the process is watched: a process that exits fails the start at
  once, with the tail of its log in the error (``log_tail``), instead of waiting out
  ``start_timeout_s``. A failed start leaves nothing behind (no process, no directory).
- The server's stdout and stderr go to one log file in the private directory, appended
  to across restarts; :meth:`ServerProcess.log_text` still returns it after
  :meth:`ServerProcess.stop` has removed the directory.
- :meth:`ServerProcess.stop` sends the server's stop signal, then SIGKILL after
  ``stop_timeout_s``, and removes the directory; it is safe to call more than once.
  :meth:`ServerProcess.kill` crashes the server (SIGKILL) and keeps the directory and
  ports, so :meth:`ServerProcess.restart` can bring it back on the same ports.

Nothing here is shared between servers: no module-level state, no global registry.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Self

from iotix.errors import IotixError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType

__all__ = [
    "LaunchFailure",
    "ServerFixture",
    "ServerProcess",
    "ServerProcessError",
    "accepts_connections",
    "find_program",
    "given_program",
    "log_tail",
    "pick_free_ports",
    "read_log_since",
    "stop_process",
]

_log = logging.getLogger(__name__)

_PORT_ATTEMPTS = 5
_CONNECT_TIMEOUT_S = 0.2


class ServerProcessError(IotixError):
    """A test server could not be configured, started, stopped or restarted.

    ``log_tail`` holds the last lines of the server's log, where there is one.
    """

    # Names the log in the message: "--- mosquitto log (last lines) ---".
    _log_label: ClassVar[str] = "server"

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        label = self._log_label
        text = f"{message}\n--- {label} log (last lines) ---\n{log_tail}" if log_tail else message
        super().__init__(text)
        self.log_tail = log_tail


@dataclass(frozen=True)
class LaunchFailure:
    """A start that failed: the error to raise, and whether the server lost the race
    for a free port (then a start on new ports may succeed)."""

    error: ServerProcessError
    port_taken: bool = False


def log_tail(log: bytes, lines: int = 30) -> str:
    """The last ``lines`` lines of a server's log, for an error message."""
    return "\n".join(log.decode("utf-8", errors="replace").splitlines()[-lines:])


def read_log_since(path: Path, offset: int) -> bytes:
    """What a server wrote to its log after ``offset`` bytes."""
    with path.open("rb") as log:
        log.seek(offset)
        return log.read()


def stop_process(
    process: subprocess.Popen[bytes] | None,
    timeout_s: float,
    *,
    name: str,
    signum: int = signal.SIGTERM,
) -> None:
    """Stop a server this code started: ``signum``, then, after ``timeout_s``, a kill.
    Nothing to do when it is gone already."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        _log.warning("%s pid %d ignored signal %d; killing it", name, process.pid, signum)
        process.kill()
        process.wait()


def find_program(
    program: str, *, before_path: Sequence[str] = (), after_path: Sequence[str] = ()
) -> Path | None:
    """An executable ``program``: in the ``before_path`` directories, then on ``PATH``,
    then in the ``after_path`` ones (such as the ``sbin`` directories, which a non-root
    ``PATH`` often lacks); None when there is none."""
    for directory in before_path:
        candidate = Path(directory, program)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(program)
    if found is not None:
        return Path(found)
    for directory in after_path:
        candidate = Path(directory, program)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def given_program(given: Path, find: Callable[[str], Path | None]) -> Path | None:
    """The program a caller named instead of the default one: a path is taken as it is,
    a bare name is looked up with ``find``, like the default; None when it is no file."""
    found = given if os.sep in str(given) else find(str(given))
    return found if found is not None and found.is_file() else None


def pick_free_ports(host: str, names: tuple[str, ...]) -> dict[str, int]:
    """A free TCP port of ``host`` per name, all distinct: every socket stays bound until
    all are chosen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(family)) for _ in names]
        for sock in sockets:
            sock.bind((host, 0))
        return {name: sock.getsockname()[1] for name, sock in zip(names, sockets, strict=True)}


def accepts_connections(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


class ServerFixture(abc.ABC):
    """A server a test starts and stops: :meth:`start` returns it once it serves,
    :meth:`stop` ends it; as a context manager, ``with`` does both."""

    @abc.abstractmethod
    def start(self) -> Self:
        """Start the server and return once it serves."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the server; safe to call more than once."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ServerProcess(ServerFixture):
    """The lifecycle of one server process on free ports: see the module docstring.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. A subclass names
    itself in the class attributes and fills in the hooks: :meth:`_resolve_binary`,
    :meth:`_pick_ports`, :meth:`_command` and :meth:`_ready` always; the others
    (:meth:`_prepare_directory`, :meth:`_write_config`, :meth:`_environment`,
    :meth:`_start_failed`, :meth:`_describe`, :meth:`_terminate` and the helper-process
    ones) where its server needs them.
    """

    # The program's name in log records and error messages ("mosquitto").
    _program: ClassVar[str]
    # Names the private directory (iotix-STEM-...) and the log in it (STEM.log).
    _file_stem: ClassVar[str]
    # What the server is called in messages: broker, server, node.
    _noun: ClassVar[str] = "server"
    # The fixture's own error class, raised for every failure but a missing program.
    _error: ClassVar[type[ServerProcessError]] = ServerProcessError
    # What a start waits for, for the timeout's message: "did not <readiness> within".
    _readiness: ClassVar[str] = "answer"
    # Log lines that mean a listener's port was taken: the race a start retries.
    _port_taken_markers: ClassVar[tuple[bytes, ...]] = (b"Address already in use",)
    _poll_interval_s: ClassVar[float] = 0.02
    _log_tail_lines: ClassVar[int] = 30
    # The graceful stop signal; SIGKILL follows after stop_timeout_s.
    _stop_signal: ClassVar[int] = signal.SIGTERM
    # Start the server in a session (process group) of its own.
    _own_process_group: ClassVar[bool] = False

    def __init__(self, *, host: str, start_timeout_s: float, stop_timeout_s: float) -> None:
        self._host = host
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._final_log = ""

    # -- addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address every listener is bound to (127.0.0.1 unless given)."""
        return self._host

    @property
    @abc.abstractmethod
    def port(self) -> int:
        """The main listener's port (kept after :meth:`stop`, to check that it is free)."""

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The address clients connect to (``scheme://HOST:PORT``)."""

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
        """The private directory (generated files, the server's data, the log), until
        :meth:`stop`."""
        return self._dir

    @property
    def log_path(self) -> Path:
        """The server's log (its stdout and stderr), appended to across restarts."""
        return self._require_dir() / f"{self._file_stem}.log"

    def log_text(self) -> str:
        """Everything the server has logged, also after :meth:`stop`."""
        if self._dir is None:
            return self._final_log
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return ""

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server on new free ports and wait until it is up.

        Raises the fixture's not-found error if its program is not installed, and its
        error (with the log tail) if the server does not come up within
        ``start_timeout_s``. A failed start leaves nothing behind.
        """
        if self.running:
            raise self._error(f"{self._noun} already running on port {self.port}")
        binary = self._resolve_binary()
        self._discard()  # what a killed server left behind
        self._dir = Path(tempfile.mkdtemp(prefix=f"iotix-{self._file_stem}-"))
        try:
            self._prepare_directory()
            self._launch_on_free_ports(binary)
        except BaseException:
            self._discard()
            raise
        return self

    def stop(self) -> None:
        """Stop the process this object started (the stop signal, then SIGKILL after
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
        in the same directory.

        Raises the fixture's error if it was never started or was stopped, or if a port
        has been taken meanwhile.
        """
        if self._dir is None or not self._ports:
            raise self._error(f"restart() needs a {self._noun} that was started and not stopped")
        binary = self._resolve_binary()
        self._terminate()
        failure = self._launch(binary)
        if failure is not None:
            raise failure.error

    def __repr__(self) -> str:
        state = f"running, pid {self.pid}" if self.running else "not running"
        where = f" {self.url}" if self._ports else ""
        return f"<{type(self).__name__}{where} ({state})>"

    # -- hooks -----------------------------------------------------------------------

    @abc.abstractmethod
    def _resolve_binary(self) -> Path:
        """The absolute path of the server program, looked up on every start and
        restart; raises the fixture's not-found error."""

    @abc.abstractmethod
    def _pick_ports(self) -> dict[str, int]:
        """New free ports, by listener name, for the next attempt to start."""

    @abc.abstractmethod
    def _command(self, binary: Path) -> list[str]:
        """The command line that runs the server (in its directory)."""

    @abc.abstractmethod
    def _ready(self, log: bytes) -> bool:
        """Whether the server is up, given what it logged since this launch."""

    def _prepare_directory(self) -> None:
        """Fill the new private directory before the first launch (once per start)."""

    def _write_config(self) -> None:
        """Write the configuration for the current ports (before every launch)."""

    def _environment(self) -> dict[str, str] | None:
        """The server's environment; None passes this process's on."""
        return None

    def _start_failed(self, log: bytes) -> bool:
        """Whether the log shows a failed start although the process still runs."""
        del log
        return False

    def _describe(self) -> str:
        """Where the server was started, for error messages."""
        return f"ports {self._ports}, directory {self._dir}"

    def _start_helpers(self) -> LaunchFailure | None:
        """Start processes the server needs before it runs, on the current ports."""
        return None

    def _stop_helpers(self) -> None:
        """Stop what :meth:`_start_helpers` started; safe to call more than once."""

    def _terminate(self) -> None:
        """Stop the server gracefully, by force after ``stop_timeout_s``."""
        stop_process(
            self._process, self._stop_timeout_s, name=self._program, signum=self._stop_signal
        )

    # -- internals -------------------------------------------------------------------

    def _port(self, listener: str) -> int:
        try:
            return self._ports[listener]
        except KeyError:
            if not self._ports:
                raise self._error(f"the {self._noun} has not been started") from None
            raise self._error(f"the {self._noun} has no {listener} listener") from None

    def _netloc(self, port: int) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{port}"

    def _require_dir(self) -> Path:
        if self._dir is None:
            raise self._error(f"the {self._noun} is not started (or was stopped)")
        return self._dir

    def _launch_on_free_ports(self, binary: Path) -> None:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._ports = self._pick_ports()
            failure = self._start_helpers() or self._launch(binary)
            if failure is None:
                return
            self._stop_helpers()
            if not failure.port_taken or attempt == _PORT_ATTEMPTS:
                raise failure.error
            _log.debug("%s lost the race for port(s) %s; retrying", self._program, self._ports)

    def _launch(self, binary: Path) -> LaunchFailure | None:
        """Write the configuration, start the process and wait until it is up.

        Returns None when it is up; otherwise the process is gone and the failure says
        why.
        """
        self._write_config()
        log_path = self.log_path
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603  (our binary, our files)
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self._dir,
                env=self._environment(),
                start_new_session=self._own_process_group,
            )
        _log.debug("started %s pid %d on ports %s", self._program, self._process.pid, self._ports)
        return self._wait_until_up(self._process, log_offset)

    def _wait_until_up(
        self, process: subprocess.Popen[bytes], log_offset: int
    ) -> LaunchFailure | None:
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            log = self._log_since(log_offset)
            if process.poll() is not None or self._start_failed(log):
                # A server may log its failed bind and linger a moment before exiting.
                self._terminate()
                log = self._log_since(log_offset)
                return self._launch_failure(
                    f"{self._program} exited with status {process.returncode} while starting "
                    f"({self._describe()})",
                    log,
                    port_taken=any(marker in log for marker in self._port_taken_markers),
                )
            if self._ready(log):
                return None
            if time.monotonic() >= deadline:
                self.kill()
                return self._launch_failure(
                    f"{self._program} did not {self._readiness} within "
                    f"{self._start_timeout_s:g} s ({self._describe()})",
                    self._log_since(log_offset),
                )
            # Waiting on the process doubles as the poll interval and notices an exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(self._poll_interval_s)

    def _launch_failure(
        self, message: str, log: bytes, *, port_taken: bool = False
    ) -> LaunchFailure:
        return LaunchFailure(
            self._error(message, log_tail=log_tail(log, self._log_tail_lines)), port_taken
        )

    def _log_since(self, offset: int) -> bytes:
        return read_log_since(self.log_path, offset)

    def _discard(self) -> None:
        try:
            self._terminate()
        finally:
            self._stop_helpers()
            if self._dir is not None:
                self._final_log = self.log_text()
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
