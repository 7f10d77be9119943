"""A user-space UDP proxy that injects datagram faults between devices and a server.

Point devices (CoAP, LwM2M, plain UDP telemetry) at the proxy instead of the server,
then apply faults::

    async with UDPFaultProxy(server.host, server.port, seed=7) as proxy:
        endpoint = ("127.0.0.1", proxy.port)
        ...
        proxy.apply(Loss(0.05))  # 5 % of the datagrams, each way
        handle = proxy.apply(Reorder(0.1, delay_s=0.05, share=0.5, duration_s=30.0))
        handle.revert()  # or let duration_s run out
        report = proxy.stats()

**Sessions.** UDP has no connections, so the proxy keeps a session per client address
(host and port): its first datagram opens one upstream socket, connected to the target,
from which the target's replies are routed back to that client. A session with no
datagram either way for ``idle_timeout_s`` is closed (its upstream socket with it); the
client's next datagram opens a new one, on a new upstream port, as a NAT would.

**Faults** are :class:`~iotix.faults.common.FaultSpec` kinds, as for the TCP proxy, with
the same ``duration_s`` and ``share``, the same handles (:class:`UDPFaultHandle` adds
datagram counters) and the same reverts: when ``duration_s`` runs out, on
:meth:`~iotix.faults.common.BaseFaultHandle.revert`, and on :meth:`UDPFaultProxy.stop`
(also run when the task inside ``async with`` is cancelled); the bookkeeping is
:class:`~iotix.faults.common.BaseFaultProxy`'s. ``share`` selects client addresses by
the same hashed rank as the TCP proxy (:func:`~iotix.faults.common.share_rank` of the
seed and the client's address and port). Every fault applies to each datagram, in both
directions, decided when the datagram arrives at the proxy:

- :class:`~iotix.faults.common.Blackhole`: dropped (also when it starts while a datagram
  is held back by a delay).
- :class:`Loss`: dropped with ``probability``; several losses draw independently.
- :class:`Duplicate`: sent twice with ``probability`` (the copy right after the
  original); each duplicate fault adds its own copy.
- :class:`~iotix.faults.common.Latency`: sent ``delay_s`` ± ``jitter_s`` (uniform) later,
  never before a datagram that arrived earlier in the same direction (as netem with a
  FIFO child: jitter alone does not reorder; :class:`Reorder` does). Latencies add up.
- :class:`Reorder`: with ``probability``, held back ``delay_s`` more, outside that
  order, so the datagrams after it overtake it.

Draws come from one :class:`random.Random` per proxy, seeded by ``seed``: the same
datagrams arriving in the same order meet the same fate.

**Cost and bounds.** A datagram of a session without faults is sent on at once: no
copy, no timer. Held datagrams wait in a heap per session and direction with one timer;
past :data:`QUEUE_HIGH_DATAGRAMS` held in one direction, new ones are dropped (counted
as ``overflowed``), since UDP has no flow control to push back with.
"""

from __future__ import annotations

import asyncio
import heapq
import socket
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

from iotix.faults.common import (
    BaseFaultHandle,
    BaseFaultProxy,
    Blackhole,
    FaultSpec,
    Latency,
    selects,
    share_rank,
)

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "IDLE_TIMEOUT_S",
    "QUEUE_HIGH_DATAGRAMS",
    "UDP_FAULTS",
    "DatagramCounters",
    "Duplicate",
    "Loss",
    "Reorder",
    "UDPFaultHandle",
    "UDPFaultProxy",
]

QUEUE_HIGH_DATAGRAMS = 4096
"""Datagrams held back (delayed or reordered) per session and direction, above which
new ones are dropped."""
IDLE_TIMEOUT_S = 60.0
"""A session without a datagram either way for this long is closed (the default)."""
_BATCH_S = 0.001
"""Datagrams due within this much of each other are sent together, from one timer."""


# --- fault specs --------------------------------------------------------------------


def _check_probability(probability: float) -> None:
    if not 0.0 <= probability <= 1.0:
        msg = f"probability must be within 0 and 1, not {probability}"
        raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Loss(FaultSpec):
    """Drop each datagram with ``probability``."""

    probability: float

    def __post_init__(self) -> None:
        super(Loss, self).__post_init__()
        _check_probability(self.probability)


@dataclass(frozen=True, slots=True)
class Duplicate(FaultSpec):
    """Send each datagram twice with ``probability``."""

    probability: float

    def __post_init__(self) -> None:
        super(Duplicate, self).__post_init__()
        _check_probability(self.probability)


@dataclass(frozen=True, slots=True)
class Reorder(FaultSpec):
    """Hold each datagram back ``delay_s`` with ``probability``, letting later ones pass."""

    probability: float
    delay_s: float

    def __post_init__(self) -> None:
        super(Reorder, self).__post_init__()
        _check_probability(self.probability)
        if self.delay_s <= 0:
            msg = f"delay_s must be positive, not {self.delay_s}"
            raise ValueError(msg)


UDP_FAULTS = (Loss, Duplicate, Reorder, Latency, Blackhole)
"""The fault kinds :class:`UDPFaultProxy` applies."""


# --- handles and counters -----------------------------------------------------------


class UDPFaultHandle(BaseFaultHandle):
    """One fault applied by a :class:`UDPFaultProxy`: revert it, read its counters."""

    __slots__ = (
        "datagrams_delayed",
        "datagrams_dropped",
        "datagrams_duplicated",
        "datagrams_reordered",
    )

    def __init__(self, proxy: UDPFaultProxy, spec: FaultSpec, now_s: float) -> None:
        super().__init__(proxy, spec, now_s)
        self.datagrams_dropped = 0
        """Dropped by this loss or blackhole."""
        self.datagrams_duplicated = 0
        """Extra copies sent by this duplicate fault."""
        self.datagrams_reordered = 0
        """Held back by this reorder fault."""
        self.datagrams_delayed = 0
        """Delayed by this latency."""

    def counters(self) -> dict[str, int]:
        return {
            "datagrams_dropped": self.datagrams_dropped,
            "datagrams_duplicated": self.datagrams_duplicated,
            "datagrams_reordered": self.datagrams_reordered,
            "datagrams_delayed": self.datagrams_delayed,
        }


@dataclass(slots=True)
class DatagramCounters:
    """What happened to the datagrams of one direction, over all sessions
    (:attr:`UDPFaultProxy.to_target`, :attr:`UDPFaultProxy.to_client`)."""

    received: int = 0
    """Read by the proxy."""
    forwarded: int = 0
    """Sent on, duplicates included: ``received + duplicated - dropped`` once nothing
    is held back."""
    dropped: int = 0
    """By a loss, a blackhole or an overflow, or held back when a session closed."""
    duplicated: int = 0
    reordered: int = 0
    delayed: int = 0
    overflowed: int = 0
    """Dropped because too many datagrams were held back (also in ``dropped``)."""


# --- one session --------------------------------------------------------------------


class _Lane:
    """One direction of a session: the datagrams held back, in a heap by release time,
    and the one timer that sends them."""

    __slots__ = ("counters", "heap", "last_release_s", "ready", "send", "seq", "session", "timer")

    def __init__(
        self, session: _Session, counters: DatagramCounters, send: Callable[[bytes], None]
    ) -> None:
        self.session = session
        self.counters = counters
        self.send = send
        self.ready = False
        """Whether there is a socket to send on (upstream: once it is made)."""
        self.heap: list[tuple[float, int, bytes]] = []
        self.seq = 0
        """Tie-break in the heap: datagrams due at once go in arrival order."""
        self.timer: asyncio.TimerHandle | None = None
        self.last_release_s = 0.0
        """The latest release of an in-order datagram: the next may not go before it."""

    def receive(self, data: bytes) -> None:
        session = self.session
        proxy = session.proxy
        counters = self.counters
        counters.received += 1
        now = proxy.loop.time()
        session.last_active_s = now
        if not session.faulty and not self.heap and self.ready:
            counters.forwarded += 1
            self.send(data)  # the hot path: no fault on this session
            return
        if session.blackhole is not None:
            session.blackhole.datagrams_dropped += 1
            counters.dropped += 1
            return
        rng = proxy.rng
        for handle in session.losses:
            if rng.random() < cast("Loss", handle.spec).probability:
                handle.datagrams_dropped += 1
                counters.dropped += 1
                return
        copies = 1
        for handle in session.duplicates:
            if rng.random() < cast("Duplicate", handle.spec).probability:
                handle.datagrams_duplicated += 1
                counters.duplicated += 1
                copies += 1
        release = now
        for handle in session.latencies:
            spec = cast("Latency", handle.spec)
            jitter = spec.jitter_s
            release += spec.delay_s + (rng.uniform(-jitter, jitter) if jitter else 0.0)
            handle.datagrams_delayed += 1
        if session.latencies:
            counters.delayed += 1
        release = max(release, now)
        reordered = False
        for handle in session.reorders:
            spec_r = cast("Reorder", handle.spec)
            if rng.random() < spec_r.probability:
                handle.datagrams_reordered += 1
                release += spec_r.delay_s
                reordered = True
        if reordered:
            counters.reordered += 1  # outside the order: it does not hold the next back
        else:
            release = max(release, self.last_release_s)
            self.last_release_s = release
        for _ in range(copies):
            self._hold_or_send(release, now, data)

    def _hold_or_send(self, release: float, now: float, data: bytes) -> None:
        heap = self.heap
        # Nothing held is due before this one: sending it now keeps the order.
        if release <= now and self.ready and (not heap or heap[0][0] > release):
            self.counters.forwarded += 1
            self.send(data)
            return
        if len(heap) >= QUEUE_HIGH_DATAGRAMS:
            self.counters.overflowed += 1
            self.counters.dropped += 1
            return
        self.seq += 1
        heapq.heappush(heap, (release, self.seq, data))
        if heap[0][1] == self.seq:  # a new earliest: the timer must fire sooner
            self.arm()

    def arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.heap and self.ready:
            self.timer = self.session.proxy.loop.call_at(self.heap[0][0], self._release)

    def _release(self) -> None:
        self.timer = None
        session = self.session
        due = session.proxy.loop.time() + _BATCH_S
        heap = self.heap
        counters = self.counters
        while heap and heap[0][0] <= due:
            data = heapq.heappop(heap)[2]
            if session.blackhole is not None:
                session.blackhole.datagrams_dropped += 1
                counters.dropped += 1
            else:
                counters.forwarded += 1
                self.send(data)
        self.arm()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.counters.dropped += len(self.heap)
        self.heap.clear()
        self.ready = False


class _Upstream(asyncio.DatagramProtocol):
    """The session's socket to the target."""

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self.session.proxy._transport_made()  # noqa: SLF001 - the proxy's own bookkeeping
        self.session.upstream_made(cast("asyncio.DatagramTransport", transport))

    def datagram_received(self, data: bytes, addr: Any) -> None:  # noqa: ARG002 - Protocol API
        self.session.to_client.receive(data)

    def error_received(self, exc: Exception) -> None:  # noqa: ARG002 - Protocol API
        # An ICMP error for a datagram sent earlier: the target is not listening (now).
        self.session.proxy.upstream_errors += 1

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - Protocol API
        if self.made:
            self.session.proxy._transport_lost()  # noqa: SLF001 - the proxy's own bookkeeping


class _Session:
    """One client address: its upstream socket, its two lanes and the faults on it."""

    __slots__ = (
        "address",
        "blackhole",
        "closed",
        "duplicates",
        "expiry",
        "faulty",
        "last_active_s",
        "latencies",
        "losses",
        "opening",
        "proxy",
        "rank",
        "reorders",
        "to_client",
        "to_target",
        "upstream",
    )

    def __init__(self, proxy: UDPFaultProxy, address: Any) -> None:
        self.proxy = proxy
        self.address = address
        self.rank = share_rank(proxy.seed, address)
        self.upstream: asyncio.DatagramTransport | None = None
        self.opening: asyncio.Task[Any] | None = None
        self.closed = False
        self.last_active_s = proxy.loop.time()
        self.expiry: asyncio.TimerHandle | None = None
        self.to_target = _Lane(self, proxy.to_target, self._send_to_target)
        self.to_client = _Lane(self, proxy.to_client, self._send_to_client)
        self.to_client.ready = True  # the listening socket is there already
        # The faults on this session, recomputed whenever one is applied or reverted,
        # so the per-datagram path reads attributes instead of scanning the active list.
        self.blackhole: UDPFaultHandle | None = None
        self.losses: list[UDPFaultHandle] = []
        self.duplicates: list[UDPFaultHandle] = []
        self.latencies: list[UDPFaultHandle] = []
        self.reorders: list[UDPFaultHandle] = []
        self.faulty = False

    def refresh(self, active: list[UDPFaultHandle]) -> None:
        mine = [h for h in active if selects(h.spec, self.rank)]
        holes = [h for h in mine if isinstance(h.spec, Blackhole)]
        self.blackhole = holes[0] if holes else None
        self.losses = [h for h in mine if isinstance(h.spec, Loss)]
        self.duplicates = [h for h in mine if isinstance(h.spec, Duplicate)]
        self.latencies = [h for h in mine if isinstance(h.spec, Latency)]
        self.reorders = [h for h in mine if isinstance(h.spec, Reorder)]
        self.faulty = bool(mine)

    def _send_to_target(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.sendto(data)

    def _send_to_client(self, data: bytes) -> None:
        self.proxy._send_to_client(data, self.address)  # noqa: SLF001 - the proxy's own

    def upstream_made(self, transport: asyncio.DatagramTransport) -> None:
        if self.closed:
            transport.close()
            return
        self.upstream = transport
        self.to_target.ready = True
        self.to_target.arm()  # what arrived while the socket was made

    def held(self) -> bool:
        return bool(self.to_target.heap or self.to_client.heap)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if self.opening is not None:
            self.opening.cancel()
        self.to_target.close()
        self.to_client.close()
        if self.upstream is not None:
            self.upstream.close()


class _Listener(asyncio.DatagramProtocol):
    """The proxy's socket that clients send to."""

    def __init__(self, proxy: UDPFaultProxy) -> None:
        self.proxy = proxy
        self.made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: ARG002
        self.made = True
        self.proxy._transport_made()  # noqa: SLF001 - the proxy's own bookkeeping

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.proxy._from_client(data, addr)  # noqa: SLF001 - the proxy's own bookkeeping

    def error_received(self, exc: Exception) -> None:  # noqa: ARG002 - Protocol API
        # An ICMP error for a reply sent earlier: that client has gone.
        self.proxy.client_errors += 1

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - Protocol API
        if self.made:
            self.proxy._transport_lost()  # noqa: SLF001 - the proxy's own bookkeeping


# --- the proxy ----------------------------------------------------------------------


class UDPFaultProxy(BaseFaultProxy[UDPFaultHandle]):
    """A UDP proxy to ``target_host:target_port`` that applies faults (module docstring).

    ``seed`` decides which client addresses a ``share`` selects and every draw (loss,
    duplication, reordering, jitter).
    """

    faults: ClassVar[tuple[type[FaultSpec], ...]] = UDP_FAULTS
    _wrong_fault = "a UDP proxy cannot apply {kind} (TCP faults need FaultProxy)"

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int = 0,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        if idle_timeout_s <= 0:
            msg = f"idle_timeout_s must be positive, not {idle_timeout_s}"
            raise ValueError(msg)
        super().__init__(
            target_host, target_port, listen_host=listen_host, listen_port=listen_port, seed=seed
        )
        self.idle_timeout_s = idle_timeout_s
        self._listener: asyncio.DatagramTransport | None = None
        self._target: tuple[socket.AddressFamily, Any] | None = None
        self._sessions: dict[Any, _Session] = {}
        self._open_transports = 0
        self.to_target = DatagramCounters()
        self.to_client = DatagramCounters()
        self.sessions_opened = 0
        self.sessions_expired = 0
        self.upstream_errors = 0
        """ICMP errors on upstream sockets: the target did not listen."""
        self.client_errors = 0
        """ICMP errors on the listening socket: a client had gone."""

    # --- lifecycle ------------------------------------------------------------------

    async def _listen(self) -> int:
        loop = self.loop
        # Resolved once, so that a session opens its socket without a lookup.
        infos = await loop.getaddrinfo(self.target_host, self.target_port, type=socket.SOCK_DGRAM)
        family, _, _, _, address = infos[0]
        self._target = (family, address)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Listener(self), local_addr=(self.listen_host, self.listen_port)
        )
        self._listener = transport
        port: int = transport.get_extra_info("sockname")[1]
        return port

    async def _shut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.close()
        opening = [s.opening for s in self._sessions.values() if s.opening is not None]
        for session in list(self._sessions.values()):
            session.close()
        self._sessions.clear()
        await self._wait_idle(busy=bool(self._open_transports), opening=opening)

    @property
    def sessions(self) -> int:
        """Client addresses with a session now."""
        return len(self._sessions)

    def held(self) -> int:
        """Datagrams held back now (delayed or reordered), both directions."""
        return sum(len(s.to_target.heap) + len(s.to_client.heap) for s in self._sessions.values())

    # --- faults ---------------------------------------------------------------------

    def _handle(self, spec: FaultSpec, now_s: float) -> UDPFaultHandle:
        return UDPFaultHandle(self, spec, now_s)

    def counters(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "sessions_opened": self.sessions_opened,
            "sessions_expired": self.sessions_expired,
            "upstream_failures": self.upstream_failures,
            "upstream_errors": self.upstream_errors,
            "client_errors": self.client_errors,
            "to_target": asdict(self.to_target),
            "to_client": asdict(self.to_client),
        }

    def _refresh(self) -> None:
        active = self._active
        for session in self._sessions.values():
            session.refresh(active)

    # --- sessions -------------------------------------------------------------------

    def _from_client(self, data: bytes, address: Any) -> None:
        session = self._sessions.get(address)
        if session is None:
            session = self._open(address)
        session.to_target.receive(data)

    def _send_to_client(self, data: bytes, address: Any) -> None:
        if self._listener is not None:
            self._listener.sendto(data, address)

    def _open(self, address: Any) -> _Session:
        session = _Session(self, address)
        self._sessions[address] = session
        self.sessions_opened += 1
        session.refresh(self._active)
        session.expiry = self.loop.call_at(
            session.last_active_s + self.idle_timeout_s, self._expire, session
        )
        session.opening = self.loop.create_task(
            self._connect(session), name=f"iotix-udp-fault-proxy-open-{self.port}"
        )
        return session

    async def _connect(self, session: _Session) -> None:
        assert self._target is not None  # noqa: S101 - start() set it
        family, address = self._target
        try:
            await self.loop.create_datagram_endpoint(
                lambda: _Upstream(session), remote_addr=address, family=family
            )
        except OSError:
            self.upstream_failures += 1
            self._close(session)
        finally:
            session.opening = None

    def _expire(self, session: _Session) -> None:
        session.expiry = None
        now = self.loop.time()
        due = session.last_active_s + self.idle_timeout_s
        if session.held():  # still delivering: as good as active
            due = max(due, now + self.idle_timeout_s)
        if due > now:  # active since the timer was set: look again then
            session.expiry = self.loop.call_at(due, self._expire, session)
            return
        self.sessions_expired += 1
        self._close(session)

    def _close(self, session: _Session) -> None:
        session.close()
        if self._sessions.get(session.address) is session:
            del self._sessions[session.address]

    def _transport_made(self) -> None:
        self._open_transports += 1

    def _transport_lost(self) -> None:
        self._open_transports -= 1
        if self._open_transports == 0:
            self._now_idle()
