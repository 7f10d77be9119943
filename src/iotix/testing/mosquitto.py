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
- Free ports, the retried start, the stop and the log are
  :class:`~iotix.testing.process.ServerProcess`'s (see :mod:`iotix.testing.process`).
  Mosquitto has no request to probe readiness with: the broker counts as up only once
  its own log says it is running *and* its ports accept TCP connections, so a port
  taken by someone else is never mistaken for the broker. A port taken before it binds
  makes it log ``Address already in use`` (``Unable to create websockets listener`` for
  the websockets one) and exit.
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

import ipaddress
import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from iotix.testing.process import (
    ServerProcess,
    ServerProcessError,
    accepts_connections,
    find_program,
    given_program,
    pick_free_ports,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

__all__ = [
    "MosquittoBroker",
    "MosquittoError",
    "MosquittoNotFoundError",
    "TLSListenerSpec",
    "find_mosquitto",
]

# Where packages put the broker when `sbin` is not on PATH (Debian, source builds,
# Homebrew on Apple silicon and on Intel).
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/usr/local/opt/mosquitto/sbin")
# Mosquitto logs this once every listener is open (stable wording since 1.x).
_RUNNING = re.compile(rb"mosquitto version \S+ running")
# What Mosquitto logs when a listener's port is taken: the race `start()` retries.
_PORT_TAKEN = (b"Address already in use", b"Unable to create websockets listener")


class MosquittoError(ServerProcessError):
    """A Mosquitto broker could not be configured, started or restarted."""

    _log_label = "mosquitto"


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
    return find_program(program, after_path=_SBIN_DIRS)


class MosquittoBroker(ServerProcess):
    """One Mosquitto process on free ports, with a generated configuration.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. ``users`` maps
    user names to passwords for a password file; anonymous clients are allowed unless
    ``allow_anonymous`` is false. ``websockets`` and ``tls`` add listeners on further
    free ports. ``extra_config`` lines are appended to the configuration verbatim. The
    private :attr:`directory` holds the configuration, the password file and the log.
    """

    _program = "mosquitto"
    _file_stem = "mosquitto"
    _noun = "broker"
    _error = MosquittoError
    _readiness = "accept connections"
    _port_taken_markers = _PORT_TAKEN
    _poll_interval_s = 0.01

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
        super().__init__(host=host, start_timeout_s=start_timeout_s, stop_timeout_s=stop_timeout_s)
        self._users = dict(users or {})
        self._allow_anonymous = allow_anonymous
        self._websockets = websockets
        self._tls = tls
        self._max_keepalive = max_keepalive
        self._max_inflight_messages = max_inflight_messages
        self._max_queued_messages = max_queued_messages
        self._extra_config = tuple(extra_config)
        self._binary = Path(binary) if binary is not None else None

    # -- addresses -------------------------------------------------------------------

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

    @property
    def config_path(self) -> Path:
        """The generated ``mosquitto.conf``."""
        return self._require_dir() / "mosquitto.conf"

    # -- hooks -----------------------------------------------------------------------

    def _resolve_binary(self) -> Path:
        given = self._binary
        binary = find_mosquitto() if given is None else given_program(given, find_mosquitto)
        if binary is None:
            raise MosquittoNotFoundError(str(given or "mosquitto"))
        return binary.absolute()  # Mosquitto runs in its own directory

    def _prepare_directory(self) -> None:
        if self._users:
            self._write_password_file()

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
        return pick_free_ports(self._host, tuple(listeners))

    def _write_config(self) -> None:
        config = "\n".join(self._config_lines()) + "\n"
        self.config_path.write_text(config, encoding="utf-8")

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

    def _ready(self, log: bytes) -> bool:
        return _RUNNING.search(log) is not None and all(
            accepts_connections(self._host, port) for port in self._ports.values()
        )

    def _describe(self) -> str:
        return f"ports {self._ports}, config {self.config_path}"


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
