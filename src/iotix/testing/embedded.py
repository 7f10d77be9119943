"""An MQTT broker inside this process (amqtt), for ``iotix demo`` and quick starts.

:class:`EmbeddedBroker` runs an `amqtt <https://pypi.org/project/amqtt/>`_ broker on
127.0.0.1 at a free port, on a thread of its own with its own event loop, so it serves
clients in other processes (the fleet's workers) while this thread runs the supervisor::

    from iotix.testing.embedded import EmbeddedBroker

    with EmbeddedBroker() as broker:
        run_my_devices(broker.host, broker.port)  # or broker.url: mqtt://127.0.0.1:PORT
        print(broker.message_count, "messages published")

``EmbeddedBroker(websocket=True)`` adds an MQTT-over-WebSocket listener on a second
free port: ``broker.ws_url`` is ``ws://127.0.0.1:PORT/mqtt``.

Facts worth knowing:

- amqtt speaks MQTT 3.1.1 only: clients asking for 5.0 are refused. Anonymous clients
  are allowed; there are no users, no topic checks and no ``$SYS`` topics.
- It is a pure-Python broker, good for a demo fleet, not for load tests: measure
  against Mosquitto (:class:`iotix.testing.MosquittoBroker`).
- The WebSocket listener is amqtt's ``type: ws`` (served by the ``websockets`` library):
  it requires the ``mqtt`` subprotocol and answers ``426 Upgrade Required`` to plain
  HTTP, but it serves every path, not only ``/mqtt``. The tests check MQTT over
  WebSockets against it and against Mosquitto's websockets listener
  (:class:`iotix.testing.MosquittoBroker`, bound to 127.0.0.1 with ``socket_domain
  ipv4``).
- The port is picked by binding port 0 and passing the number to amqtt (it offers no
  public way to read back a port it chose itself). Another process can take the port in
  between; the start is then retried on a new port.
- amqtt and its state-machine library ``transitions`` log every connection and state
  change at INFO. While a broker runs, those loggers are set to ERROR unless someone
  configured their level explicitly; :meth:`EmbeddedBroker.stop` restores them. Two
  brokers with overlapping lifetimes share those loggers: the first one stopped makes
  them verbose again.
- ``message_count`` counts the PUBLISH packets the broker has read (retransmissions
  included), through an amqtt plugin hook. A PUBLISH is counted before the broker
  acknowledges it or forwards it, so once a client holds the PUBACK (or a subscriber
  the message) the count includes it.
- A client that connects and closes before sending CONNECT makes amqtt log an error and
  leak the socket (a ``ResourceWarning``): probe readiness with an MQTT client, not a
  bare TCP connection. :meth:`EmbeddedBroker.start` returns once the listening socket is
  open, so no probe is needed.

Nothing is shared between brokers: no module-level state. (amqtt itself keeps the
last broker's plugin manager in a module-level registry; that is amqtt's, not ours.)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

# amqtt ships inline annotations but no `py.typed` marker, so mypy treats it as
# untyped; every amqtt name used here is wrapped in a typed method of this module.
from amqtt.broker import Broker  # type: ignore[import-untyped]
from amqtt.errors import BrokerError  # type: ignore[import-untyped]
from amqtt.mqtt.packet import PUBLISH  # type: ignore[import-untyped]
from amqtt.plugins.base import BasePlugin  # type: ignore[import-untyped]

from iotix.errors import IotixError
from iotix.testing.process import ServerFixture

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["EmbeddedBroker", "EmbeddedBrokerError", "PublishCounterPlugin"]

_log = logging.getLogger(__name__)

# Loggers that report every connection and state change at INFO: amqtt's own, and the
# `transitions` state-machine library it drives its broker and sessions with.
_NOISY_LOGGERS = ("amqtt", "transitions")
_PORT_ATTEMPTS = 5
# How much longer than the broker's own start and stop deadlines (enforced on its loop)
# the calling thread waits, for a loop that is stuck in synchronous code.
_THREAD_GRACE_S = 2.0


class EmbeddedBrokerError(IotixError):
    """The embedded broker could not start, or did not stop in time.

    The cause (amqtt's error, or the socket error) is chained as ``__cause__``.
    """


class PublishCounterPlugin(BasePlugin):  # type: ignore[misc]  # amqtt is untyped: Any base
    """amqtt broker plugin counting the PUBLISH packets the broker reads.

    amqtt loads plugins by dotted path and builds them itself; :class:`EmbeddedBroker`
    finds this one among the broker's plugins to read ``publish_count``. The hook runs
    on the broker's loop; an ``int`` read from another thread is safe under the GIL.
    """

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.publish_count = 0

    async def on_mqtt_packet_received(self, *, packet: Any, session: Any = None) -> None:
        """Called for every packet read (``session`` is absent for CONNECT)."""
        del session
        header = packet.fixed_header
        if header is not None and header.packet_type == PUBLISH:
            self.publish_count += 1


@dataclass
class _Started:
    """What the broker's thread hands back once the broker listens."""

    port: int
    ws_port: int | None
    counter: PublishCounterPlugin


@dataclass
class _Handoff:
    """The one-shot rendezvous between :meth:`EmbeddedBroker.start` and the thread."""

    ready: threading.Event = field(default_factory=threading.Event)
    started: _Started | None = None
    failure: BaseException | None = None


class EmbeddedBroker(ServerFixture):
    """One amqtt broker on a free port, served by a thread with its own event loop.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. A stopped
    broker can be started again (on a new port). ``start_timeout_s`` bounds the start,
    ``stop_timeout_s`` the shutdown (amqtt's, then the thread's exit). ``websocket``
    adds a WebSocket listener (MQTT over WebSockets) on a port of its own.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        websocket: bool = False,
    ) -> None:
        self._host = host
        self._websocket = websocket
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._port: int | None = None
        self._ws_port: int | None = None
        self._counter: PublishCounterPlugin | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._handoff: _Handoff | None = None
        self._saved_levels: dict[str, int] = {}

    # -- addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the broker listens on (127.0.0.1 unless given)."""
        return self._host

    @property
    def port(self) -> int:
        """The broker's port (kept after :meth:`stop`, to check that it is free)."""
        if self._port is None:
            raise EmbeddedBrokerError("the embedded broker has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT``."""
        return f"mqtt://{self._bracketed_host}:{self.port}"

    @property
    def ws_port(self) -> int:
        """The WebSocket listener's port (a broker made with ``websocket=True``)."""
        if not self._websocket:
            raise EmbeddedBrokerError(
                "the embedded broker has no WebSocket listener: make it with websocket=True"
            )
        if self._ws_port is None:
            raise EmbeddedBrokerError("the embedded broker has not been started")
        return self._ws_port

    @property
    def ws_url(self) -> str:
        """``ws://HOST:PORT/mqtt`` (amqtt serves any path; ``/mqtt`` is the usual one)."""
        return f"ws://{self._bracketed_host}:{self.ws_port}/mqtt"

    @property
    def _bracketed_host(self) -> str:
        return f"[{self._host}]" if ":" in self._host else self._host

    # -- state -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the broker's thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def message_count(self) -> int:
        """PUBLISH packets received since the last start (kept after :meth:`stop`)."""
        return 0 if self._counter is None else self._counter.publish_count

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Start the broker and return once its port accepts TCP connections.

        Raises :class:`EmbeddedBrokerError`, with amqtt's error chained, if the broker
        fails to start or is not listening within ``start_timeout_s``. A failed start
        leaves no thread or logging change behind.
        """
        if self.running:
            raise EmbeddedBrokerError(f"the embedded broker already runs at {self.url}")
        self._quiet_noisy_loggers()
        try:
            self._launch()
        except BaseException:
            self._halt()
            self._restore_loggers()
            raise
        return self

    def stop(self) -> None:
        """Shut the broker down (clients are disconnected) and join its thread.

        Raises :class:`EmbeddedBrokerError` if the thread is still alive after
        ``stop_timeout_s`` (it is a daemon thread, so it does not keep the process
        alive). Safe to call more than once.
        """
        try:
            self._halt()
        finally:
            self._restore_loggers()

    def __repr__(self) -> str:
        where = f" {self.url}" if self._port is not None else ""
        return f"<EmbeddedBroker{where} ({'running' if self.running else 'not running'})>"

    # -- the calling thread's side ---------------------------------------------------

    def _launch(self) -> None:
        handoff = self._handoff = _Handoff()
        # The loop is made here so that `_halt` can reach it from this thread at once,
        # even before the broker's thread has started running it.
        loop = _new_event_loop()
        self._loop = loop
        self._stop_requested = asyncio.Event()  # binds to `loop` when first awaited
        self._thread = threading.Thread(
            target=self._serve_in_thread,
            args=(loop, self._stop_requested, handoff),
            name="iotix-embedded-broker",
            daemon=True,  # a broker stuck in shutdown must not keep the process alive
        )
        self._thread.start()
        if not handoff.ready.wait(self._start_timeout_s + _THREAD_GRACE_S):
            raise EmbeddedBrokerError(
                f"the embedded broker did not start within {self._start_timeout_s:g} s"
            )
        failure = handoff.failure
        if isinstance(failure, TimeoutError):  # the deadline enforced on the broker's loop
            raise EmbeddedBrokerError(
                f"the embedded broker did not start within {self._start_timeout_s:g} s"
            ) from failure
        if failure is not None:
            raise EmbeddedBrokerError(
                f"the embedded broker failed to start on {self._host}: {failure}"
            ) from failure
        assert handoff.started is not None  # noqa: S101 - set whenever `failure` is not
        self._port = handoff.started.port
        self._ws_port = handoff.started.ws_port
        self._counter = handoff.started.counter
        _log.debug("embedded MQTT broker listening at %s", self.url)

    def _halt(self) -> None:
        thread, loop, handoff = self._thread, self._loop, self._handoff
        stop_requested = self._stop_requested
        self._thread = self._loop = self._stop_requested = self._handoff = None
        if loop is None or stop_requested is None:
            return
        if thread is not None and thread.is_alive():
            # The loop is closed once the thread has finished: nothing left to ask then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_requested.set)
            thread.join(self._stop_timeout_s + _THREAD_GRACE_S)
            if thread.is_alive():
                raise EmbeddedBrokerError(
                    f"the embedded broker's thread did not finish within "
                    f"{self._stop_timeout_s + _THREAD_GRACE_S:g} s of being asked to stop"
                )
        if not loop.is_closed():  # the thread never ran it
            loop.close()
        failure = None if handoff is None else handoff.failure
        if failure is not None and handoff is not None and handoff.started is not None:
            raise EmbeddedBrokerError(
                f"the embedded broker at {self.url} did not shut down cleanly: {failure!r}"
            ) from failure

    def _quiet_noisy_loggers(self) -> None:
        for name in _NOISY_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:  # an explicit level is someone's choice
                self._saved_levels[name] = logger.level
                logger.setLevel(logging.ERROR)

    def _restore_loggers(self) -> None:
        for name, level in self._saved_levels.items():
            logging.getLogger(name).setLevel(level)
        self._saved_levels.clear()

    # -- the broker's thread ---------------------------------------------------------

    def _serve_in_thread(
        self, loop: asyncio.AbstractEventLoop, stop_requested: asyncio.Event, handoff: _Handoff
    ) -> None:
        # A Runner given a loop factory neither installs signal handlers (not the main
        # thread) nor sets this thread's current loop; closing it cancels what is left
        # and closes the loop.
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            try:
                runner.run(self._serve(stop_requested, handoff))
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                handoff.failure = exc
                if handoff.ready.is_set() and not stop_requested.is_set():
                    _log.error("the embedded MQTT broker failed: %r", exc)
            finally:
                handoff.ready.set()

    async def _serve(self, stop_requested: asyncio.Event, handoff: _Handoff) -> None:
        async with asyncio.timeout(self._start_timeout_s):
            broker, port, ws_port = await self._start_on_free_ports()
        try:
            handoff.started = _Started(port=port, ws_port=ws_port, counter=_find_counter(broker))
            handoff.ready.set()
            await stop_requested.wait()
        finally:
            async with asyncio.timeout(self._stop_timeout_s):
                await broker.shutdown()

    async def _start_on_free_ports(self) -> tuple[Any, int, int | None]:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            ports = _pick_ports(self._host, 2 if self._websocket else 1)
            port, ws_port = ports[0], (ports[1] if self._websocket else None)
            broker = Broker(_broker_config(self._host, port, ws_port))
            broker._subscriptions = _SnapshotIterDict()  # noqa: SLF001 - see the class
            try:
                await broker.start()
            except BrokerError as exc:
                # A listener that did start before another failed stays open otherwise.
                await _close_listeners(broker)
                if not _is_port_taken(exc) or attempt == _PORT_ATTEMPTS:
                    raise
                _log.debug("embedded broker lost the race for ports %s; retrying", ports)
            else:
                return broker, port, ws_port
        raise AssertionError("unreachable: the last attempt raises")  # pragma: no cover


class _SnapshotIterDict(dict[str, Any]):
    """A dict whose iteration walks a copy of its keys.

    amqtt 0.12 walks its subscription table with an ``await`` inside the loop when a
    client connects and retained messages exist (``Broker._handle_client_session``);
    another client subscribing meanwhile ends that client's session with
    "dictionary changed size during iteration". Devices publishing retained birth
    messages while others subscribe to their commands hit it within seconds.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().__iter__()))


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (the engine's loop; amqtt delivered 20-50 % more
    messages per second on it here), asyncio's own loop otherwise."""
    factory: Callable[[], asyncio.AbstractEventLoop]
    try:
        import uvloop  # noqa: PLC0415 - optional: not installed on Windows

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        factory = asyncio.new_event_loop
    return factory()


def _broker_config(host: str, port: int, ws_port: int | None = None) -> dict[str, Any]:
    """amqtt's configuration: one TCP listener (and a WebSocket one when *ws_port* is
    given), anonymous access, our counter.

    Giving ``plugins`` replaces amqtt's defaults (packet and event loggers, and the
    ``$SYS`` plugin, whose use of ``psutil`` raises a DeprecationWarning in 0.12).
    """
    listeners: dict[str, dict[str, Any]] = {
        "default": {"type": "tcp", "bind": f"{host}:{port}"},
    }
    if ws_port is not None:
        listeners["ws"] = {"type": "ws", "bind": f"{host}:{ws_port}"}
    return {
        "listeners": listeners,
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            f"{PublishCounterPlugin.__module__}.{PublishCounterPlugin.__qualname__}": {},
        },
    }


def _find_counter(broker: Any) -> PublishCounterPlugin:
    for plugin in broker.plugins_manager.plugins:
        if isinstance(plugin, PublishCounterPlugin):
            return plugin
    raise EmbeddedBrokerError("amqtt did not load the message counter plugin")


def _pick_ports(host: str, count: int) -> list[int]:
    """*count* distinct free ports: all sockets stay bound until every port is chosen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(family))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


async def _close_listeners(broker: Any) -> None:
    """Close the listeners of a broker whose start failed. amqtt keeps them in the
    private ``_servers`` and closes them only in ``shutdown``, which a broker that never
    started refuses."""
    for server in getattr(broker, "_servers", {}).values():
        with contextlib.suppress(Exception):
            await server.close_instance()


def _is_port_taken(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE
