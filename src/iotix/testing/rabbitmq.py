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
- Free ports, the retried start, the stop and the log are
  :class:`~iotix.testing.process.ServerProcess`'s (see :mod:`iotix.testing.process`).
  A port taken before the node binds makes it fail with ``eaddrinuse``; a taken
  ``epmd`` port makes ``epmd`` exit. Either way the start is retried on new ports.

Nothing here is shared between servers: no module-level state, no global registry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from iotix.testing.nats import mqtt_connack
from iotix.testing.process import (
    LaunchFailure,
    ServerProcess,
    ServerProcessError,
    accepts_connections,
    find_program,
    pick_free_ports,
)

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


class RabbitMQServerError(ServerProcessError):
    """A RabbitMQ node could not be configured, started, stopped or restarted."""

    _log_label = "rabbitmq"


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
    return find_program(program, before_path=_SCRIPT_DIRS, after_path=_SBIN_DIRS)


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


class RabbitMQServer(ServerProcess):
    """One private RabbitMQ node with the MQTT plugin, on free ports.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. ``port`` is the
    MQTT port. ``extra_config`` lines (``rabbitmq.conf`` syntax) are appended to the
    generated configuration. :attr:`pid` is the process id of the node's start script,
    which is its process group's id too; the private :attr:`directory` holds the
    configuration, the database and the logs, and :attr:`log_path` is the node's console
    log.
    """

    _program = "rabbitmq-server"
    _file_stem = "rabbitmq"
    _noun = "node"
    _error = RabbitMQServerError
    _readiness = "answer an MQTT CONNECT"
    _port_taken_markers = _PORT_TAKEN
    _poll_interval_s = 0.05
    _log_tail_lines = 40
    # A process group of its own: the script, the VM and its helpers, which kill() and
    # a stuck stop() reach by the group's id, and nothing else.
    _own_process_group = True

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
        super().__init__(
            host="127.0.0.1", start_timeout_s=start_timeout_s, stop_timeout_s=stop_timeout_s
        )
        self._extra_config = tuple(extra_config)
        self._node = f"iotix-test-{uuid.uuid4().hex[:10]}@localhost"
        self._programs: _Programs | None = None
        self._epmd: subprocess.Popen[bytes] | None = None

    # -- addresses -------------------------------------------------------------------

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
        return f"mqtt://{self._netloc(self.port)}"

    @property
    def node_name(self) -> str:
        """The node's name, ``iotix-test-<random>@localhost``."""
        return self._node

    # -- lifecycle -------------------------------------------------------------------

    def kill(self) -> None:
        """Crash the node (SIGKILL to its process group) and reap it; ``epmd``, the
        directory and the ports are kept, so :meth:`restart` can bring it back."""
        process = self._process
        if process is not None and process.poll() is None:
            _kill_group(process)

    def __repr__(self) -> str:
        state = f"running, pid {self.pid}" if self.running else "not running"
        where = f" {self.url}" if self._ports else ""
        return f"<RabbitMQServer {self._node}{where} ({state})>"

    # -- hooks -----------------------------------------------------------------------

    def _resolve_binary(self) -> Path:
        server = find_rabbitmq("rabbitmq-server")
        if server is None:
            raise RabbitMQNotFoundError("rabbitmq-server")
        ctl = server.with_name("rabbitmqctl")
        if not ctl.is_file():
            raise RabbitMQNotFoundError("rabbitmqctl")
        epmd = _find_epmd()
        if epmd is None:
            raise RabbitMQNotFoundError("epmd")
        self._programs = _Programs(server=server, ctl=ctl, epmd=epmd)
        return server

    def _prepare_directory(self) -> None:
        directory = self._require_dir()
        for name in ("home", "mnesia", "log", "conf.d"):
            (directory / name).mkdir()

    def _pick_ports(self) -> dict[str, int]:
        return pick_free_ports(self._host, ("epmd", "amqp", "dist", "mqtt"))

    def _write_config(self) -> None:
        directory = self._require_dir()
        (directory / "rabbitmq.conf").write_text(self._config(), encoding="utf-8")
        (directory / "enabled_plugins").write_text("[rabbitmq_mqtt].\n", encoding="utf-8")
        (directory / "rabbitmq-env.conf").write_text("", encoding="utf-8")

    def _command(self, binary: Path) -> list[str]:
        return [str(binary)]

    def _ready(self, log: bytes) -> bool:
        # The log says the MQTT listener is ours before the CONNACK is trusted.
        listening = f"started MQTT TCP listener on {self._host}:{self._ports['mqtt']}".encode()
        return listening in log and mqtt_connack(self._host, self._ports["mqtt"]) == 0

    def _describe(self) -> str:
        return f"node {self._node}, ports {self._ports}"

    def _start_helpers(self) -> LaunchFailure | None:
        """Start the node's own ``epmd`` and wait until it listens."""
        assert self._programs is not None  # noqa: S101 - set by _resolve_binary()
        log_path = self._require_dir() / "epmd.log"
        with log_path.open("ab") as log:
            self._epmd = subprocess.Popen(  # noqa: S603  (Erlang's epmd, our port)
                [str(self._programs.epmd), "-address", self._host, "-port", str(self.epmd_port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self._dir,
                env=self._environment(),
            )
        deadline = time.monotonic() + 10.0
        while not accepts_connections(self._host, self.epmd_port):
            returncode = self._epmd.poll()
            if returncode is not None or time.monotonic() >= deadline:
                return self._launch_failure(
                    f"epmd did not listen on port {self.epmd_port}",
                    log_path.read_bytes(),
                    port_taken=returncode is not None,  # it exits when it finds the port taken
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._epmd.wait(self._poll_interval_s)
        return None

    def _stop_helpers(self) -> None:
        epmd, self._epmd = self._epmd, None
        if epmd is None or epmd.poll() is not None:
            return
        epmd.terminate()
        try:
            epmd.wait(self._stop_timeout_s)
        except subprocess.TimeoutExpired:
            epmd.kill()
            epmd.wait()

    def _terminate(self) -> None:
        """Stop the node gracefully (``rabbitmqctl stop``), by force if that fails."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        if self._programs is not None:
            ctl_dist_port = pick_free_ports(self._host, ("ctl",))["ctl"]
            try:
                result = subprocess.run(  # noqa: S603  (RabbitMQ's script, our node)
                    [str(self._programs.ctl), "-n", self._node, "stop"],
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

    # -- internals -------------------------------------------------------------------

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


@dataclass(frozen=True)
class _Programs:
    """The programs a node needs, found on every start."""

    server: Path
    ctl: Path
    epmd: Path


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
