"""What the TCP and UDP fault proxies share: fault specs, shares, handles, bookkeeping.

:class:`~iotix.faults.proxy.FaultProxy` (streams) and
:class:`~iotix.faults.udp.UDPFaultProxy` (datagrams) differ in what they forward and
how a fault acts on it; they keep the same books, which live here:

- :class:`FaultSpec`, the base of every fault (``duration_s`` and ``share``), and the
  kinds both proxies apply (:class:`Latency`, :class:`Blackhole`);
- :func:`share_rank` and :func:`selects`: which clients a fault's share selects (a hash
  of the proxy's seed and the client's address and port, see docs/faults.md);
- :class:`BaseFaultHandle`: an applied fault, its timer and its revert;
- :class:`BaseFaultProxy`: start and stop (``async with``), the faults in force and
  applied so far, apply and revert, and the counters common to both.

Each proxy brings its listening socket (``_listen``/``_shut``), its own handle class
with the counters of what a fault did there, and how a fault acts on its connections
or sessions (``_refresh``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar

if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import TracebackType

__all__ = [
    "BaseFaultHandle",
    "BaseFaultProxy",
    "Blackhole",
    "FaultSpec",
    "Latency",
    "selects",
    "share_rank",
]

_STOP_TIMEOUT_S = 5.0
"""How long a stop waits for the connections or sessions it closed to be gone."""


# --- fault specs --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultSpec:
    """What every fault has: how long it lasts and which share of connections it hits."""

    duration_s: float | None = None
    """Reverted after this long; None: until reverted (or the proxy stops)."""
    share: float = 1.0
    """Fraction of connections affected, chosen by rank (see :func:`share_rank`)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            msg = f"share must be within 0 and 1, not {self.share}"
            raise ValueError(msg)
        if self.duration_s is not None and self.duration_s <= 0:
            msg = f"duration_s must be positive or None, not {self.duration_s}"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Latency(FaultSpec):
    """Forward every chunk ``delay_s`` ± ``jitter_s`` later, in order."""

    delay_s: float
    jitter_s: float = 0.0

    def __post_init__(self) -> None:
        super(Latency, self).__post_init__()
        if self.delay_s < 0 or self.jitter_s < 0:
            msg = "delay_s and jitter_s must not be negative"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Blackhole(FaultSpec):
    """Forward nothing either way (dropped, not held), keeping the sockets open."""


def selects(spec: FaultSpec, rank: float) -> bool:
    """Whether a fault applies to a connection of this rank (see :func:`share_rank`)."""
    return rank < spec.share


def share_rank(seed: int, peer: Any) -> float:
    """A client's place in [0, 1), from the seed and its address and port: a fault of
    share ``s`` selects the clients ranked below ``s``."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        key = f"{seed}|{peer[0]}|{peer[1]}"
    else:  # a Unix socket or an unknown peer: all such connections rank alike
        key = f"{seed}|{peer}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


# --- handles ------------------------------------------------------------------------


class BaseFaultHandle:
    """What every applied fault has, whichever proxy applied it: its spec, whether it is
    in force, when it began and ended, and :meth:`revert`. Each proxy's handle adds the
    counters of what the fault did there (:class:`~iotix.faults.proxy.FaultHandle` for
    TCP, :class:`~iotix.faults.udp.UDPFaultHandle` for UDP)."""

    __slots__ = ("_owner", "_timer", "active", "applied_at_s", "reverted_at_s", "spec")

    def __init__(self, owner: BaseFaultProxy[Any], spec: FaultSpec, now_s: float) -> None:
        self._owner = owner
        self._timer: asyncio.TimerHandle | None = None
        self.spec = spec
        self.active = True
        self.applied_at_s = now_s
        self.reverted_at_s: float | None = None

    def revert(self) -> None:
        """End the fault now; a no-op when it has ended already."""
        if not self.active:
            return
        self.active = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._owner._reverted(self)  # noqa: SLF001 - the proxy's own bookkeeping

    def expire_after(self, loop: asyncio.AbstractEventLoop, duration_s: float | None) -> None:
        """Revert the fault ``duration_s`` from now (None: never by itself)."""
        if duration_s is not None:
            self._timer = loop.call_later(duration_s, self.revert)

    def stats(self) -> dict[str, Any]:
        """The spec and counters, as plain data for reports."""
        return {
            "kind": type(self.spec).__name__,
            "spec": asdict(self.spec),
            "active": self.active,
            "applied_at_s": self.applied_at_s,
            "reverted_at_s": self.reverted_at_s,
            **self.counters(),
        }

    def counters(self) -> dict[str, int]:
        """What the fault did so far (the subclass's counters)."""
        return {}

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        return f"<{type(self).__name__} {self.spec!r} {state}>"


# --- the proxy ----------------------------------------------------------------------

HandleT = TypeVar("HandleT", bound=BaseFaultHandle)


class BaseFaultProxy(abc.ABC, Generic[HandleT]):
    """A proxy to ``target_host:target_port`` that applies faults: what the TCP and UDP
    proxies share. A subclass says which faults it takes (:attr:`faults`), makes their
    handles (:meth:`_handle`), opens and closes its socket (:meth:`_listen`,
    :meth:`_shut`) and puts the faults in force on what it forwards (:meth:`_refresh`).
    """

    faults: ClassVar[tuple[type[FaultSpec], ...]] = ()
    """The fault kinds this proxy applies."""
    _wrong_fault: ClassVar[str] = "this proxy cannot apply {kind}"
    """The message for a fault of another kind, ``{kind}`` its class name."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str,
        listen_port: int,
        seed: int,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.seed = seed
        self.rng = random.Random(seed)  # noqa: S311 - jitter and fault draws, not security
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._port: int | None = None
        self._active: list[HandleT] = []
        self._history: list[HandleT] = []
        self._idle: asyncio.Future[None] | None = None
        self.upstream_failures = 0
        """Connections (TCP) or sessions (UDP) dropped because the target could not be
        reached."""

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            msg = "the proxy is running already"
            raise RuntimeError(msg)
        self._loop = asyncio.get_running_loop()
        self._port = await self._listen()
        self._running = True

    async def stop(self) -> None:
        """Revert every fault, close every connection or session and stop listening."""
        if not self._running:
            return
        self._running = False
        # Everything that matters happens before the first await, so a stop run from a
        # cancelled task (``async with``'s exit) cannot be cut short halfway: _shut
        # closes everything before it awaits.
        for handle in list(self._active):
            handle.revert()
        await self._shut()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            msg = "the proxy has not started"
            raise RuntimeError(msg)
        return self._loop

    @property
    def port(self) -> int:
        """The port the proxy listens on (once started)."""
        if self._port is None:
            msg = "the proxy has not started"
            raise RuntimeError(msg)
        return self._port

    @property
    def active(self) -> list[HandleT]:
        """The faults in force now, oldest first."""
        return list(self._active)

    @abc.abstractmethod
    async def _listen(self) -> int:
        """Open the listening socket; returns its port."""

    @abc.abstractmethod
    async def _shut(self) -> None:
        """Stop listening and close every connection or session (all before the first
        await), then wait until they are gone."""

    async def _wait_idle(self, *, busy: bool, opening: Iterable[asyncio.Task[Any]] = ()) -> None:
        """Wait, at most a few seconds, for the ``opening`` tasks to end and, when
        ``busy``, for the subclass to call :meth:`_now_idle`."""
        self._idle = self.loop.create_future()
        if not busy:
            self._idle.set_result(None)
        tasks = list(opening)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_STOP_TIMEOUT_S):
                if tasks:
                    await asyncio.wait(tasks)
                await self._idle

    def _now_idle(self) -> None:
        """The last connection or socket has gone: a stop waiting for it may end."""
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    # --- faults ---------------------------------------------------------------------

    def apply(self, spec: FaultSpec) -> HandleT:
        """Put a fault in force now; it is reverted after ``spec.duration_s``."""
        if not isinstance(spec, self.faults):
            msg = self._wrong_fault.format(kind=type(spec).__name__)
            raise TypeError(msg)
        if not self._running:
            msg = "the proxy is not running"
            raise RuntimeError(msg)
        loop = self.loop
        handle = self._handle(spec, loop.time())
        self._history.append(handle)
        self._strike(handle)
        if handle.active:  # not a one-shot, which is over once struck
            self._active.append(handle)
            handle.expire_after(loop, spec.duration_s)
            self._refresh()
        return handle

    def stats(self) -> dict[str, Any]:
        """Counters of the proxy and of every fault applied so far, for reports."""
        return {
            "target": {"host": self.target_host, "port": self.target_port},
            **self.counters(),
            "faults": [handle.stats() for handle in self._history],
        }

    def counters(self) -> dict[str, Any]:
        """The proxy's own counters (the subclass's), as plain data."""
        return {}

    @abc.abstractmethod
    def _handle(self, spec: FaultSpec, now_s: float) -> HandleT:
        """A new handle for ``spec`` (the subclass's handle class)."""

    def _strike(self, handle: HandleT) -> None:
        """What a fault does at once when applied, before it is put in force; a one-shot
        marks its handle inactive here. Nothing by default."""

    def _reverted(self, handle: HandleT) -> None:
        handle.reverted_at_s = self.loop.time()
        with contextlib.suppress(ValueError):
            self._active.remove(handle)
        self._refresh()

    @abc.abstractmethod
    def _refresh(self) -> None:
        """Recompute which faults in force apply to each connection or session."""
