"""Real Mosquitto 2 brokers on free ports, for tests and benchmarks.

:class:`MosquittoBroker` starts one ``mosquitto`` process on 127.0.0.1 at a free port,
from a configuration generated in a private temporary directory, waits until it accepts
connections, and stops exactly the process it started::

    from iotix.testing import MosquittoBroker

    with MosquittoBroker() as broker:
        run_my_devices(broker.host, broker.port)  # or broker.url: mqtt://127.0.0.1:PORT
        print(broker.log_text())

Several brokers can run at once (each has its own port and directory), which is how
scale runs spread connections over broker endpoints. ``kill()`` crashes the broker
(SIGKILL) and ``restart()`` brings it back on the same ports, for reconnect tests.

Facts worth knowing:

- Mosquitto must be installed (Debian/Ubuntu package ``mosquitto``; the repository's
  ``scripts/services`` installs it). The binary is looked up on ``PATH`` and then in the
  ``sbin`` directories, which a non-root ``PATH`` often lacks.
- Ports are picked by binding port 0 and passing the number to Mosquitto. Another
  process can take the port in between; Mosquitto then fails to bind and the start is
  retried on new ports. The broker counts as up only once its own log says it is
  running *and* its ports accept TCP connections, so a port taken by someone else is
  never mistaken for the broker.
- Open files: a process inherits its parent's ``RLIMIT_NOFILE``, and each client
  connection is a file. When the caller's soft limit is below its hard limit, the broker
  is started through util-linux ``prlimit`` with the soft limit raised to the hard one
  (the broker's pid is unchanged: ``prlimit`` execs Mosquitto). Where ``prlimit`` is
  missing the broker keeps the caller's limit. The hard limit itself is not raised.
- Run as root, Mosquitto 2 drops privileges to the ``mosquitto`` user, which cannot
  read the private directory; the generated configuration says ``user root`` then.
- The websockets listener is served by libwebsockets, which Debian's Mosquitto 2.0.11
  has built in (lws 4.1.6, with IPv6). Given an IPv4 address, that lws opens one
  dual-stack socket on *every* interface (``*:PORT``; lws issue #2290, fixed in lws 4.2)
  unless IPv6 is off for the listener: the generated configuration says
  ``socket_domain ipv4`` under a websockets listener on an IPv4 ``host``, and the
  listener then binds ``host`` only, like the plain MQTT and TLS ones (an IPv6 ``host``
  such as ``::1`` is bound as given). lws takes an address or an interface name, never a
  host name: ``listener PORT localhost`` opens nothing, without an error, so a broker
  with websockets needs an IP address for ``host``. Mosquitto 2.0 also refuses to start
  with a websockets listener alone ("Unable to start any listening sockets"); the plain
  MQTT listener is always there.
- Passwords are hashed by ``mosquitto_passwd -b`` (same package as the broker), so the
  file is in whatever format the installed broker reads. The password is an argument
  of that short-lived process, visible to ``ps``: meant for test credentials. Without
  ``mosquitto_passwd`` a broker with ``users`` cannot start, and
  :class:`MosquittoNotFoundError` says so.

Nothing here is shared between brokers: no module-level state, no global registry.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

from iotix.errors import IotixError
from iotix.testing.process import log_tail, read_log_since, stop_process

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from types import TracebackType

__all__ = [
    "MosquittoBroker",
    "MosquittoError",
    "MosquittoNotFoundError",
    "TLSListenerSpec",
    "find_mosquitto",
]

_log = logging.getLogger(__name__)

# Where packages put the broker when `sbin` is not on PATH (Debian, source builds,
# Homebrew on Apple silicon and on Intel).
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/usr/local/opt/mosquitto/sbin")
# Mosquitto logs this once every listener is open (stable wording since 1.x).
_RUNNING = re.compile(rb"mosquitto version \S+ running")
# What Mosquitto logs when a listener's port is taken: the race `start()` retries.
_PORT_TAKEN = (b"Address already in use", b"Unable to create websockets listener")
_PORT_ATTEMPTS = 5
_POLL_INTERVAL_S = 0.01
_CONNECT_TIMEOUT_S = 0.2
_LOG_TAIL_LINES = 30


class MosquittoError(IotixError):
    """A Mosquitto broker could not be configured, started or restarted.

    ``log_tail`` holds the last lines of the broker's log, where there is one.
    """

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        text = f"{message}\n--- mosquitto log (last lines) ---\n{log_tail}" if log_tail else message
        super().__init__(text)
        self.log_tail = log_tail


class MosquittoNotFoundError(MosquittoError):
    """A Mosquitto program (``mosquitto`` or ``mosquitto_passwd``) is not installed."""

    def __init__(self, program: str) -> None:
        super().__init__(
            f"{program} is not installed: install Mosquitto 2 (Debian/Ubuntu package "
            "`mosquitto`); in the iotix repository, run scripts/services"
        )
        self.program = program


@dataclass(frozen=True)
class TLSListenerSpec:
    """Files for a TLS listener (PEM paths); clients must present a certificate signed
    by ``cafile`` when ``require_certificate`` is true."""

    cafile: str | os.PathLike[str]
    certfile: str | os.PathLike[str]
    keyfile: str | os.PathLike[str]
    require_certificate: bool = False


def find_mosquitto(program: str = "mosquitto") -> Path | None:
    """The path of a Mosquitto program (``mosquitto``, ``mosquitto_passwd``), or None."""
    found = shutil.which(program)
    if found is not None:
        return Path(found)
    for directory in _SBIN_DIRS:
        candidate = Path(directory, program)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class MosquittoBroker:
    """One Mosquitto process on free ports, with a generated configuration.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. ``users`` maps
    user names to passwords for a password file; anonymous clients are allowed unless
    ``allow_anonymous`` is false. ``websockets`` and ``tls`` add listeners on further
    free ports. ``extra_config`` lines are appended to the configuration verbatim.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        users: Mapping[str, str] | None = None,
        allow_anonymous: bool = True,
        websockets: bool = False,
        tls: TLSListenerSpec | None = None,
        max_keepalive: int | None = None,
        max_inflight_messages: int | None = None,
        max_queued_messages: int | None = None,
        extra_config: Sequence[str] = (),
        binary: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        for name, password in (users or {}).items():
            if not name or ":" in name or "\n" in name or "\n" in password:
                raise MosquittoError(
                    f"invalid user {name!r}: a user name is non-empty and holds no ':' "
                    "or newline, a password holds no newline"
                )
        if websockets and not _is_ip_address(host):
            raise MosquittoError(
                f"a websockets listener needs an IP address, not {host!r}: Mosquitto's "
                "libwebsockets takes no host names (it would silently listen nowhere)"
            )
        self._host = host
        self._users = dict(users or {})
        self._allow_anonymous = allow_anonymous
        self._websockets = websockets
        self._tls = tls
        self._max_keepalive = max_keepalive
        self._max_inflight_messages = max_inflight_messages
        self._max_queued_messages = max_queued_messages
        self._extra_config = tuple(extra_config)
        self._binary = Path(binary) if binary is not None else None
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
    def port(self) -> int:
        """The plain MQTT port (kept after :meth:`stop`, to check that it is free)."""
        return self._port("mqtt")

    @property
    def websockets_port(self) -> int:
        """The MQTT-over-websockets port (needs ``websockets=True``)."""
        return self._port("websockets")

    @property
    def tls_port(self) -> int:
        """The MQTT-over-TLS port (needs ``tls=...``)."""
        return self._port("tls")

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT`` for the plain MQTT listener."""
        return f"mqtt://{self._netloc(self.port)}"

    @property
    def websockets_url(self) -> str:
        """``ws://HOST:PORT`` for the websockets listener."""
        return f"ws://{self._netloc(self.websockets_port)}"

    @property
    def tls_url(self) -> str:
        """``mqtts://HOST:PORT`` for the TLS listener."""
        return f"mqtts://{self._netloc(self.tls_port)}"

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
        """The private directory (configuration, password file, log), until :meth:`stop`."""
        return self._dir

    @property
    def config_path(self) -> Path:
        """The generated ``mosquitto.conf``."""
        return self._require_dir() / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        """The broker's log (its stderr and stdout), appended to across restarts."""
        return self._require_dir() / "mosquitto.log"

    def log_text(self) -> str:
        """Everything the broker has logged, also after :meth:`stop`."""
        if self._dir is None:
            return self._final_log
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return ""

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Start the broker on new free ports and wait until it accepts connections.

        Raises :class:`MosquittoNotFoundError` if Mosquitto is not installed and
        :class:`MosquittoError` (with the log tail) if it does not come up within
        ``start_timeout_s``. A failed start leaves nothing behind.
        """
        if self.running:
            raise MosquittoError(f"broker already running on port {self.port}")
        binary = self._resolve_binary()
        self._discard()  # what a killed broker left behind
        self._dir = Path(tempfile.mkdtemp(prefix="iotix-mosquitto-"))
        try:
            if self._users:
                self._write_password_file()
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
        """Crash the broker (SIGKILL) and reap it; the directory and ports are kept, so
        :meth:`restart` can bring it back."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def restart(self) -> None:
        """Stop the broker if it runs (gracefully) and start it again on the same ports.

        Raises :class:`MosquittoError` if it was never started or was stopped, or if a
        port has been taken meanwhile.
        """
        if self._dir is None or not self._ports:
            raise MosquittoError("restart() needs a broker that was started and not stopped")
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
        where = f" {self.url}" if "mqtt" in self._ports else ""
        return f"<MosquittoBroker{where} ({state})>"

    # -- internals -------------------------------------------------------------------

    def _port(self, listener: str) -> int:
        try:
            return self._ports[listener]
        except KeyError:
            if not self._ports:
                raise MosquittoError("the broker has not been started") from None
            raise MosquittoError(f"the broker has no {listener} listener") from None

    def _netloc(self, port: int) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{port}"

    def _require_dir(self) -> Path:
        if self._dir is None:
            raise MosquittoError("the broker is not started (or was stopped)")
        return self._dir

    def _resolve_binary(self) -> Path:
        if self._binary is None:
            binary = find_mosquitto()
        elif os.sep in str(self._binary):
            binary = self._binary
        else:  # a bare program name, looked up like the default one
            binary = find_mosquitto(str(self._binary))
        if binary is None or not binary.is_file():
            raise MosquittoNotFoundError(str(self._binary or "mosquitto"))
        return binary.absolute()  # Mosquitto runs in its own directory

    def _write_password_file(self) -> None:
        tool = find_mosquitto("mosquitto_passwd")
        if tool is None:
            raise MosquittoNotFoundError("mosquitto_passwd")
        path = self._require_dir() / "passwd"
        # `-b` takes the password as an argument, so it may hold ':' (`-U` would cut it
        # there); `-c` creates the file. The hash is whatever the installed broker reads.
        for index, (user, password) in enumerate(self._users.items()):
            create = ["-c"] if index == 0 else []
            result = subprocess.run(  # noqa: S603  (a fixed program, our own file)
                [str(tool), *create, "-b", str(path), user, password],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if result.returncode != 0:
                raise MosquittoError(
                    f"mosquitto_passwd failed for user {user!r} "
                    f"with exit status {result.returncode}",
                    log_tail=(result.stderr or result.stdout).strip(),
                )
        path.chmod(0o600)

    def _pick_ports(self) -> dict[str, int]:
        listeners = ["mqtt"]
        if self._websockets:
            listeners.append("websockets")
        if self._tls is not None:
            listeners.append("tls")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        with contextlib.ExitStack() as stack:
            # All bound at once, so the ports differ from each other.
            sockets = [stack.enter_context(socket.socket(family)) for _ in listeners]
            for sock in sockets:
                sock.bind((self._host, 0))
            return {
                name: sock.getsockname()[1] for name, sock in zip(listeners, sockets, strict=True)
            }

    def _config_lines(self) -> Iterator[str]:
        yield "# Generated by iotix.testing.MosquittoBroker; rewritten on every start."
        yield "persistence false"
        yield "log_dest stderr"
        yield "log_type error"
        yield "log_type warning"
        yield "log_type notice"
        yield "log_type information"
        yield "log_timestamp_format %Y-%m-%dT%H:%M:%S"
        yield "set_tcp_nodelay true"
        yield f"allow_anonymous {'true' if self._allow_anonymous else 'false'}"
        if self._users:
            yield f"password_file {self._require_dir() / 'passwd'}"
        if self._max_keepalive is not None:
            yield f"max_keepalive {self._max_keepalive}"
        if self._max_inflight_messages is not None:
            yield f"max_inflight_messages {self._max_inflight_messages}"
        if self._max_queued_messages is not None:
            yield f"max_queued_messages {self._max_queued_messages}"
        if os.geteuid() == 0:
            yield "user root"  # otherwise it drops to `mosquitto`, who cannot read our files
        # Listener options apply to the listener line above them. Paths are absolute
        # because Mosquitto runs in its own directory.
        yield f"listener {self._ports['mqtt']} {self._host}"
        yield "max_connections -1"
        if self._websockets:
            yield f"listener {self._ports['websockets']} {self._host}"
            yield "protocol websockets"
            yield "max_connections -1"
            if ":" not in self._host:
                # Without it, lws binds an IPv4 address's listener on every interface.
                yield "socket_domain ipv4"
        if self._tls is not None:
            yield f"listener {self._ports['tls']} {self._host}"
            yield "max_connections -1"
            yield f"cafile {Path(self._tls.cafile).absolute()}"
            yield f"certfile {Path(self._tls.certfile).absolute()}"
            yield f"keyfile {Path(self._tls.keyfile).absolute()}"
            yield f"require_certificate {'true' if self._tls.require_certificate else 'false'}"
        yield from self._extra_config

    def _command(self, binary: Path) -> list[str]:
        command = [str(binary), "-c", str(self.config_path)]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        prlimit = shutil.which("prlimit")
        if hard != resource.RLIM_INFINITY and soft < hard and prlimit is not None:
            # libwebsockets sizes its tables from the limit at start-up, so it has to be
            # raised before Mosquitto runs, not by prlimit(2) on the running process.
            command = [prlimit, f"--nofile={hard}:{hard}", "--", *command]
        return command

    def _launch_on_free_ports(self, binary: Path) -> None:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._ports = self._pick_ports()
            error = self._launch(binary)
            if error is None:
                return
            if not error.port_taken or attempt == _PORT_ATTEMPTS:
                raise error
            _log.debug("mosquitto lost the race for port(s) %s; retrying", self._ports)

    def _launch(self, binary: Path) -> _LaunchError | None:
        """Write the configuration, start the process and wait until it is up.

        Returns None when it is up; otherwise the process is gone and the error says why.
        """
        config = "\n".join(self._config_lines()) + "\n"
        self.config_path.write_text(config, encoding="utf-8")
        log_path = self.log_path
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603  (our binary, our config)
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self._dir,
            )
        _log.debug("started mosquitto pid %d on ports %s", self._process.pid, self._ports)
        return self._wait_until_up(self._process, log_offset)

    def _wait_until_up(
        self, process: subprocess.Popen[bytes], log_offset: int
    ) -> _LaunchError | None:
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            if process.poll() is not None:
                log = self._log_since(log_offset)
                return _LaunchError(
                    f"mosquitto exited with status {process.returncode} while starting "
                    f"(ports {self._ports}, config {self.config_path})",
                    log_tail=_tail(log),
                    port_taken=any(marker in log for marker in _PORT_TAKEN),
                )
            if _RUNNING.search(self._log_since(log_offset)) and all(
                _accepts_connections(self._host, port) for port in self._ports.values()
            ):
                return None
            if time.monotonic() >= deadline:
                process.kill()
                process.wait()
                return _LaunchError(
                    f"mosquitto did not accept connections on ports {self._ports} within "
                    f"{self._start_timeout_s:g} s (config {self.config_path})",
                    log_tail=_tail(self._log_since(log_offset)),
                )
            # Waiting on the process doubles as the poll interval and notices an exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(_POLL_INTERVAL_S)

    def _log_since(self, offset: int) -> bytes:
        return read_log_since(self.log_path, offset)

    def _terminate(self) -> None:
        stop_process(self._process, self._stop_timeout_s, name="mosquitto")

    def _discard(self) -> None:
        self._terminate()
        if self._dir is not None:
            self._final_log = self.log_text()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class _LaunchError(MosquittoError):
    """A start that failed; ``port_taken`` when it lost the race for a free port."""

    def __init__(self, message: str, *, log_tail: str, port_taken: bool = False) -> None:
        super().__init__(message, log_tail=log_tail)
        self.port_taken = port_taken


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _tail(log: bytes) -> str:
    return log_tail(log, _LOG_TAIL_LINES)
