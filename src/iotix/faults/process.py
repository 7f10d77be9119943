"""A :class:`~iotix.faults.FaultProxy` in a process of its own.

A proxied connection (or a UDP client's session) costs the proxy two open files (the
device's side and the broker's), and a process here may hold 20,000: one proxy process
carries at most about 9,900 connections. A scenario's fleets of more devices go through
several proxy processes (:data:`CONNECTIONS_PER_PROXY` each), spread like broker
endpoints.

:class:`ProxyProcess` offers what the scenario's conductor uses of a proxy (``port``,
``apply``, ``retarget``, ``stats``, ``stop``) over a pipe. The process stops its proxy,
reverting every fault, when told to, and when the pipe closes: a supervisor that is
killed leaves no proxy, and no fault, behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import resource
import signal
import threading
from typing import TYPE_CHECKING, Any

from iotix.faults.proxy import FaultProxy
from iotix.faults.udp import UDPFaultProxy

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from iotix.faults.proxy import FaultSpec

__all__ = ["CONNECTIONS_PER_PROXY", "ProxyProcess"]

CONNECTIONS_PER_PROXY = 9_000
"""Connections planned through one proxy process: two open files each, under the
20,000 a process may have here, with room for the process's own."""

REPLY_TIMEOUT_S = 15.0


def _raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _proxy_main(
    host: str,
    port: int,
    seed: int,
    udp: bool,  # noqa: FBT001 - a process's arguments are positional
    control: Connection,
) -> None:
    """The proxy process: serve until told to stop or until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    _raise_open_file_limit()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        proxy: FaultProxy | UDPFaultProxy = (
            UDPFaultProxy(host, port, seed=seed) if udp else FaultProxy(host, port, seed=seed)
        )
        await proxy.start()
        control.send(("ready", proxy.port))
        done = loop.create_future()

        def handle(command: tuple[Any, ...]) -> None:
            verb = command[0]
            if verb == "apply":
                proxy.apply(command[1])
            elif verb == "retarget":
                moved = (
                    proxy.retarget(command[1], command[2]) if isinstance(proxy, FaultProxy) else 0
                )
                control.send(("retargeted", moved))
            elif verb == "stats":
                control.send(("stats", proxy.stats()))
            elif not done.done():  # "stop"
                done.set_result(None)

        def relay() -> None:
            while True:
                try:
                    command = control.recv()
                except (EOFError, OSError):  # the supervisor is gone
                    command = ("stop",)
                loop.call_soon_threadsafe(handle, command)
                if command[0] == "stop":
                    return

        threading.Thread(target=relay, name="iotix-proxy-relay", daemon=True).start()
        await done
        await proxy.stop()
        with contextlib.suppress(OSError):
            control.send(("stopped", proxy.stats()))

    asyncio.run(main())


class ProxyProcess:
    """A fault proxy to ``host:port`` in a child process (see the module docstring):
    TCP (:class:`~iotix.faults.FaultProxy`), or with ``udp`` datagrams
    (:class:`~iotix.faults.udp.UDPFaultProxy`, which cannot fail over)."""

    def __init__(self, host: str, port: int, *, seed: int = 0, udp: bool = False) -> None:
        context = multiprocessing.get_context("spawn")
        self._control, child = context.Pipe()
        self._process = context.Process(
            target=_proxy_main,
            args=(host, port, seed, udp, child),
            name="iotix-proxy",
            daemon=True,
        )
        self._child = child
        self.udp = udp
        self._lock = threading.Lock()
        self._final: dict[str, Any] | None = None
        self.port = 0

    def start(self) -> None:
        """Start the process and wait until its proxy listens."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process (several can start side by side before :meth:`wait_ready`)."""
        self._process.start()
        self._child.close()

    def wait_ready(self) -> None:
        """Wait until the process's proxy listens."""
        self.port = int(self._reply("ready")[1])

    def _reply(self, expected: str) -> tuple[str, Any]:
        if not self._control.poll(REPLY_TIMEOUT_S):
            raise TimeoutError(f"the fault proxy process did not answer ({expected})")
        verb, value = self._control.recv()
        if verb != expected:  # pragma: no cover - one request at a time, under the lock
            raise RuntimeError(f"the fault proxy answered {verb!r}, not {expected!r}")
        return verb, value

    def apply(self, spec: FaultSpec) -> None:
        with self._lock:
            self._control.send(("apply", spec))

    def retarget(self, host: str, port: int) -> int:
        """Send new connections to ``host:port``; returns the connections reset."""
        with self._lock:
            self._control.send(("retarget", host, port))
            return int(self._reply("retargeted")[1])

    def stats(self) -> dict[str, Any]:
        if self._final is not None:
            return self._final
        with self._lock:
            self._control.send(("stats",))
            stats: dict[str, Any] = self._reply("stats")[1]
            return stats

    async def stop(self) -> None:
        """Stop the proxy (every fault reverted) and the process; keeps its last stats."""
        await asyncio.get_running_loop().run_in_executor(None, self._stop)

    def _stop(self) -> None:
        if not self._process.is_alive():
            return
        with self._lock:
            with contextlib.suppress(OSError):
                self._control.send(("stop",))
            with contextlib.suppress(OSError, EOFError, TimeoutError, RuntimeError):
                self._final = self._reply("stopped")[1]
        self._process.join(timeout=REPLY_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
