"""A private RabbitMQ node with the MQTT plugin on free ports, for interoperability tests.

:class:`RabbitMQServer` starts one RabbitMQ node of its own, never the system's: its
own node name (``iotix-test-<random>@localhost``), its own configuration, plugins file,
database, logs and Erlang cookie in a private temporary directory, its own ``epmd`` on a
free port, and free ports for AMQP, Erlang distribution and MQTT, all on 127.0.0.1. It
waits until the MQTT port answers a real CONNECT with a CONNACK, and stops exactly the
processes it started::

    from iotix.testing.rabbitmq import RabbitMQServer

    with RabbitMQServer() as server:
        run_my_devices(server.host, server.port)  # the MQTT port; server.url: mqtt://...

``kill()`` crashes the node (SIGKILL) and ``restart()`` brings it back on the same
ports with the same database, for reconnect tests.

Facts worth knowing (RabbitMQ 3.10, Debian's ``rabbitmq-server``, Erlang 25):

- The MQTT plugin of 3.10 speaks MQTT 3.1.1 (and 3.1) only: it closes a connection
  whose CONNECT has protocol level 5 without sending any CONNACK. MQTT 5 arrived in
  RabbitMQ 3.13.
- QoS 0 and 1 only: a subscription asking for QoS 2 is granted QoS 1, and a QoS 2
  PUBLISH is routed as QoS 1 and answered with PUBACK. Retained messages are replayed
  to exact-topic subscriptions only, and are lost when the node crashes.
- Anonymous MQTT clients log in as ``guest``, which RabbitMQ allows from loopback
  addresses only.
- Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that, run as root, switches to the
  ``rabbitmq`` user with ``su`` (who cannot read a private directory) and writes its
  output to ``/var/log/rabbitmq``. This module runs RabbitMQ's own script,
  ``/usr/lib/rabbitmq/bin/rabbitmq-server``, as the current user instead, and likewise
  RabbitMQ's own ``rabbitmqctl``.
- ``/etc/rabbitmq/rabbitmq-env.conf`` (which names the system node) and the other
  system files are never read: every path RabbitMQ looks up is set to one in the
  private directory, and the caller's ``RABBITMQ_*`` and ``ERL_*`` variables are not
  passed on. ``HOME`` is the private directory too, so the Erlang cookie is private.
- Erlang nodes register with ``epmd`` (port 4369 by default, shared by every node on
  the machine). This module starts an ``epmd`` of its own on a free port
  (``ERL_EPMD_PORT``) and tells Erlang never to start one itself (``-start_epmd
  false``), so the node neither touches nor leaves behind a machine-wide ``epmd``.
- The node runs in a process group of its own (the start script, the Erlang VM and its
  helper processes). :meth:`stop` asks ``rabbitmqctl stop`` first; whatever of that
  group is left after ``stop_timeout_s`` is killed by the group's id, then the
  ``epmd`` this object started is stopped by its pid.
- The first start takes 5 to 10 seconds: the MQTT plugin waits 3 to 6 seconds for
  cluster peers before it elects itself leader of its client-id tracker (hard-coded in
  3.10). A restart on the same database skips that wait.
- The ports are picked by binding port 0 and passing the numbers on. Another process
  can take one in between; the node then fails to start and the start is retried on
  new ports.

Nothing here is shared between servers: no module-level state, no global registry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

from iotix.errors import IotixError
from iotix.testing.nats import mqtt_connack
from iotix.testing.process import log_tail, read_log_since

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "RabbitMQNotFoundError",
    "RabbitMQServer",
    "RabbitMQServerError",
    "find_rabbitmq",
]

_log = logging.getLogger(__name__)

# RabbitMQ's own scripts (not a distribution's wrapper that switches user): Debian and
# RPM packages, Homebrew on Apple silicon and on Intel, then whatever PATH has.
_SCRIPT_DIRS = (
    "/usr/lib/rabbitmq/bin",
    "/opt/homebrew/opt/rabbitmq/sbin",
    "/usr/local/opt/rabbitmq/sbin",
)
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
_LOCAL_DIST = "-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false"
_PORT_TAKEN = (b"eaddrinuse", b"address already in use", b"Address already in use")
_PORT_ATTEMPTS = 5
_POLL_INTERVAL_S = 0.05
_CONNECT_TIMEOUT_S = 0.2
_LOG_TAIL_LINES = 40


class RabbitMQServerError(IotixError):
    """A RabbitMQ node could not be configured, started, stopped or restarted.

    ``log_tail`` holds the last lines of the node's log, where there is one.
    """

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        text = f"{message}\n--- rabbitmq log (last lines) ---\n{log_tail}" if log_tail else message
        super().__init__(text)
        self.log_tail = log_tail


class RabbitMQNotFoundError(RabbitMQServerError):
    """RabbitMQ (``rabbitmq-server``, ``rabbitmqctl``) or Erlang's ``epmd`` is missing."""

    def __init__(self, program: str) -> None:
        super().__init__(
            f"{program} is not installed: install RabbitMQ 3.10 or later with Erlang "
            "(Debian/Ubuntu package `rabbitmq-server`, which brings `erlang-base`)"
        )
        self.program = program


def find_rabbitmq(program: str = "rabbitmq-server") -> Path | None:
    """RabbitMQ's own ``rabbitmq-server`` or ``rabbitmqctl`` script, or None.

    RabbitMQ's script directories come first: Debian's ``/usr/sbin`` ones are wrappers
    that switch to the ``rabbitmq`` user when run as root.
    """
    for directory in _SCRIPT_DIRS:
        candidate = Path(directory, program)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(program)
    if found is not None:
        return Path(found)
    for directory in _SBIN_DIRS:
        candidate = Path(directory, program)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _find_epmd() -> Path | None:
    found = shutil.which("epmd")
    if found is not None:
        return Path(found)
    # Erlang's runtime directories, where a distribution does not link it into PATH.
    for root in ("/usr/lib/erlang", "/usr/local/lib/erlang"):
        for candidate in sorted(Path(root).glob("erts-*/bin/epmd"), reverse=True):
            if os.access(candidate, os.X_OK):
                return candidate
    return None


class RabbitMQServer:
    """One private RabbitMQ node with the MQTT plugin, on free ports.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. ``port`` is the
    MQTT port. ``extra_config`` lines (``rabbitmq.conf`` syntax) are appended to the
    generated configuration.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        extra_config: tuple[str, ...] = (),
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 20.0,
    ) -> None:
        if host not in ("127.0.0.1", "localhost"):
            # The node name is @localhost and guest may only log in from loopback.
            raise RabbitMQServerError(f"a private RabbitMQ node listens on 127.0.0.1, not {host}")
        self._host = "127.0.0.1"
        self._extra_config = tuple(extra_config)
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._node = f"iotix-test-{uuid.uuid4().hex[:10]}@localhost"
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ctl: Path | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._final_log = ""

    # -- addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address every listener is bound to: 127.0.0.1."""
        return self._host

    @property
    def port(self) -> int:
        """The MQTT port (kept after :meth:`stop`, to check that it is free)."""
        return self._port("mqtt")

    @property
    def amqp_port(self) -> int:
        """The AMQP 0-9-1 port (``RABBITMQ_NODE_PORT``)."""
        return self._port("amqp")

    @property
    def dist_port(self) -> int:
        """The Erlang distribution port (``RABBITMQ_DIST_PORT``)."""
        return self._port("dist")

    @property
    def epmd_port(self) -> int:
        """The port of the node's own ``epmd`` (``ERL_EPMD_PORT``)."""
        return self._port("epmd")

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT`` for the MQTT listener."""
        return f"mqtt://{self._host}:{self.port}"

    @property
    def node_name(self) -> str:
        """The node's name, ``iotix-test-<random>@localhost``."""
        return self._node

    # -- state -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The process id of the node's start script (its process group's id too) while
        it runs, else None."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the node this object started is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def directory(self) -> Path | None:
        """The private directory (configuration, database, logs), until :meth:`stop`."""
        return self._dir

    @property
    def log_path(self) -> Path:
        """The node's console log (its stdout and stderr), appended to across restarts."""
        return self._require_dir() / "rabbitmq.log"

    def log_text(self) -> str:
        """Everything the node has logged, also after :meth:`stop`."""
        if self._dir is None:
            return self._final_log
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return ""

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Start ``epmd`` and the node on new free ports, and wait until MQTT clients
        get a CONNACK.

        Raises :class:`RabbitMQNotFoundError` if RabbitMQ or ``epmd`` is not installed
        and :class:`RabbitMQServerError` (with the log tail) if the node does not come up
        within ``start_timeout_s``. A failed start leaves nothing behind.
        """
        if self.running:
            raise RabbitMQServerError(f"node already running on port {self.port}")
        programs = self._programs()
        self._discard()
        self._ctl = programs.ctl
        self._dir = Path(tempfile.mkdtemp(prefix="iotix-rabbitmq-"))
        try:
            for directory in ("home", "mnesia", "log", "conf.d"):
                (self._dir / directory).mkdir()
            self._launch_on_free_ports(programs)
        except BaseException:
            self._discard()
            raise
        return self

    def stop(self) -> None:
        """Stop the node (``rabbitmqctl stop``, then SIGKILL to what is left of its
        process group after ``stop_timeout_s``) and its ``epmd``, and remove the
        directory. Safe to call more than once."""
        self._discard()

    def kill(self) -> None:
        """Crash the node (SIGKILL to its process group) and reap it; ``epmd``, the
        directory and the ports are kept, so :meth:`restart` can bring it back."""
        process = self._process
        if process is not None and process.poll() is None:
            _kill_group(process)

    def restart(self) -> None:
        """Stop the node if it runs (gracefully) and start it again on the same ports,
        with the same database.

        Raises :class:`RabbitMQServerError` if it was never started or was stopped, or
        if a port has been taken meanwhile.
        """
        if self._dir is None or not self._ports or self._epmd is None:
            raise RabbitMQServerError("restart() needs a node that was started and not stopped")
        programs = self._programs()
        self._ctl = programs.ctl
        self._terminate()
        error = self._launch(programs.server)
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
        return f"<RabbitMQServer {self._node}{where} ({state})>"

    # -- internals -------------------------------------------------------------------

    def _port(self, name: str) -> int:
        if not self._ports:
            raise RabbitMQServerError("the node has not been started")
        return self._ports[name]

    def _require_dir(self) -> Path:
        if self._dir is None:
            raise RabbitMQServerError("the node is not started (or was stopped)")
        return self._dir

    def _programs(self) -> _Programs:
        server = find_rabbitmq("rabbitmq-server")
        if server is None:
            raise RabbitMQNotFoundError("rabbitmq-server")
        ctl = server.with_name("rabbitmqctl")
        if not ctl.is_file():
            raise RabbitMQNotFoundError("rabbitmqctl")
        epmd = _find_epmd()
        if epmd is None:
            raise RabbitMQNotFoundError("epmd")
        return _Programs(server=server, ctl=ctl, epmd=epmd)

    def _config(self) -> str:
        lines = [
            "# Generated by iotix.testing.rabbitmq.RabbitMQServer; rewritten on every start.",
            f"listeners.tcp.default = {self._host}:{self._ports['amqp']}",
            f"mqtt.listeners.tcp.default = {self._host}:{self._ports['mqtt']}",
            # Anonymous MQTT clients log in as guest, allowed from loopback only.
            "loopback_users.guest = true",
            "mqtt.allow_anonymous = true",
            "mqtt.default_user = guest",
            "mqtt.default_pass = guest",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            "log.console = true",
            "log.console.level = info",
            "log.file = false",
            *self._extra_config,
        ]
        return "\n".join(lines) + "\n"

    def _environment(self, *, ctl_dist_port: int | None = None) -> dict[str, str]:
        directory = self._require_dir()
        # The caller's RabbitMQ and Erlang settings would point at the system node.
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_")) and key != "CONF_ENV_FILE"
        }
        env.update(
            HOME=str(directory / "home"),  # the Erlang cookie lives here
            ERL_EPMD_PORT=str(self._ports["epmd"]),
            ERL_EPMD_ADDRESS=self._host,
            RABBITMQ_NODENAME=self._node,
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_NODE_IP_ADDRESS=self._host,
            RABBITMQ_NODE_PORT=str(self._ports["amqp"]),
            RABBITMQ_DIST_PORT=str(self._ports["dist"]),
            RABBITMQ_CONF_ENV_FILE=str(directory / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(directory / "rabbitmq.conf"),
            RABBITMQ_CONFIG_FILES=str(directory / "conf.d"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(directory / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(directory / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(directory / "mnesia"),
            RABBITMQ_LOG_BASE=str(directory / "log"),
            RABBITMQ_LOGS="-",
            RABBITMQ_PID_FILE=str(directory / "rabbitmq.pid"),
            RABBITMQ_MOTD_FILE=str(directory / "motd"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=_LOCAL_DIST,
            RABBITMQ_CTL_ERL_ARGS=_LOCAL_DIST,
        )
        if ctl_dist_port is not None:
            env["RABBITMQ_CTL_DIST_PORT_MIN"] = env["RABBITMQ_CTL_DIST_PORT_MAX"] = str(
                ctl_dist_port
            )
        return env

    def _launch_on_free_ports(self, programs: _Programs) -> None:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._ports = _pick_ports(self._host, ("epmd", "amqp", "dist", "mqtt"))
            error = self._start_epmd(programs.epmd) or self._launch(programs.server)
            if error is None:
                return
            self._stop_epmd()
            if not error.port_taken or attempt == _PORT_ATTEMPTS:
                raise error
            _log.debug("rabbitmq lost the race for port(s) %s; retrying", self._ports)

    def _start_epmd(self, epmd: Path) -> _LaunchError | None:
        log_path = self._require_dir() / "epmd.log"
        with log_path.open("ab") as log:
            self._epmd = subprocess.Popen(  # noqa: S603  (Erlang's epmd, our port)
                [str(epmd), "-address", self._host, "-port", str(self._ports["epmd"])],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self._dir,
                env=self._environment(),
            )
        deadline = time.monotonic() + 10.0
        while not _accepts_connections(self._host, self._ports["epmd"]):
            returncode = self._epmd.poll()
            if returncode is not None or time.monotonic() >= deadline:
                text = log_path.read_bytes()
                return _LaunchError(
                    f"epmd did not listen on port {self._ports['epmd']}",
                    log_tail=_tail(text),
                    port_taken=returncode is not None,  # it exits when it finds the port taken
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._epmd.wait(_POLL_INTERVAL_S)
        return None

    def _launch(self, server: Path) -> _LaunchError | None:
        """Write the configuration, start the node and wait until it is up.

        Returns None when it is up; otherwise the node is gone and the error says why.
        """
        directory = self._require_dir()
        (directory / "rabbitmq.conf").write_text(self._config(), encoding="utf-8")
        (directory / "enabled_plugins").write_text("[rabbitmq_mqtt].\n", encoding="utf-8")
        (directory / "rabbitmq-env.conf").write_text("", encoding="utf-8")
        log_path = self.log_path
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603  (RabbitMQ's script, our files)
                [str(server)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=directory,
                env=self._environment(),
                # A process group of its own: the script, the VM and its helpers, which
                # kill() and a stuck stop() reach by the group's id, and nothing else.
                start_new_session=True,
            )
        _log.debug(
            "started rabbitmq node %s pid %d on %s", self._node, self._process.pid, self._ports
        )
        return self._wait_until_up(self._process, log_offset)

    def _wait_until_up(
        self, process: subprocess.Popen[bytes], log_offset: int
    ) -> _LaunchError | None:
        deadline = time.monotonic() + self._start_timeout_s
        listening = f"started MQTT TCP listener on {self._host}:{self._ports['mqtt']}".encode()
        while True:
            if process.poll() is not None:
                log = self._log_since(log_offset)
                return _LaunchError(
                    f"rabbitmq-server exited with status {process.returncode} while starting "
                    f"(node {self._node}, ports {self._ports})",
                    log_tail=_tail(log),
                    port_taken=any(marker in log for marker in _PORT_TAKEN),
                )
            # The log says the MQTT listener is ours before the CONNACK is trusted.
            if listening in self._log_since(log_offset) and (
                mqtt_connack(self._host, self._ports["mqtt"]) == 0
            ):
                return None
            if time.monotonic() >= deadline:
                _kill_group(process)
                return _LaunchError(
                    f"rabbitmq node {self._node} did not answer an MQTT CONNECT on port "
                    f"{self._ports['mqtt']} within {self._start_timeout_s:g} s",
                    log_tail=_tail(self._log_since(log_offset)),
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(_POLL_INTERVAL_S)

    def _log_since(self, offset: int) -> bytes:
        return read_log_since(self.log_path, offset)

    def _terminate(self) -> None:
        """Stop the node gracefully (``rabbitmqctl stop``), by force if that fails."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        ctl = self._ctl
        if ctl is not None:
            ctl_dist_port = _pick_ports(self._host, ("ctl",))["ctl"]
            try:
                result = subprocess.run(  # noqa: S603  (RabbitMQ's script, our node)
                    [str(ctl), "-n", self._node, "stop"],
                    capture_output=True,
                    cwd=self._dir,
                    env=self._environment(ctl_dist_port=ctl_dist_port),
                    timeout=self._stop_timeout_s,
                    check=False,
                )
                if result.returncode != 0:
                    _log.warning(
                        "rabbitmqctl stop of %s failed (%d): %s",
                        self._node,
                        result.returncode,
                        (result.stderr or result.stdout).decode(errors="replace").strip(),
                    )
            except subprocess.TimeoutExpired:
                _log.warning("rabbitmqctl stop of %s timed out", self._node)
        try:
            process.wait(self._stop_timeout_s)
        except subprocess.TimeoutExpired:
            _log.warning("rabbitmq node %s did not stop; killing it", self._node)
        _kill_group(process)

    def _stop_epmd(self) -> None:
        epmd, self._epmd = self._epmd, None
        if epmd is None or epmd.poll() is not None:
            return
        epmd.terminate()
        try:
            epmd.wait(self._stop_timeout_s)
        except subprocess.TimeoutExpired:
            epmd.kill()
            epmd.wait()

    def _discard(self) -> None:
        try:
            self._terminate()
        finally:
            self._stop_epmd()
            if self._dir is not None:
                self._final_log = self.log_text()
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None


@dataclass(frozen=True)
class _Programs:
    """The programs a node needs, found on every start."""

    server: Path
    ctl: Path
    epmd: Path


class _LaunchError(RabbitMQServerError):
    """A start that failed; ``port_taken`` when it lost the race for a free port."""

    def __init__(self, message: str, *, log_tail: str, port_taken: bool = False) -> None:
        super().__init__(message, log_tail=log_tail)
        self.port_taken = port_taken


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group ``process`` leads, then reap ``process``.

    It was started in a session of its own, so the group is ours alone. The group is
    signalled only while ``process`` is not reaped: until then its pid, which is the
    group's id, cannot be reused by anyone else. (Once the start script has exited and
    been reaped, the VM it waited for has exited too.)
    """
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _pick_ports(host: str, names: tuple[str, ...]) -> dict[str, int]:
    """A free port per name, all distinct: every socket stays bound until all are chosen."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in names]
        for sock in sockets:
            sock.bind((host, 0))
        return {name: sock.getsockname()[1] for name, sock in zip(names, sockets, strict=True)}


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _tail(log: bytes) -> str:
    return log_tail(log, _LOG_TAIL_LINES)
