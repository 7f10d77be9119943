"""A user-space TCP proxy that injects network faults between devices and a broker.

Point devices at the proxy instead of the broker, then apply faults::

    async with FaultProxy(broker.host, broker.port) as proxy:
        endpoint = BrokerEndpoint("127.0.0.1", proxy.port)
        ...
        handle = proxy.apply(Latency(0.2, jitter_s=0.05, duration_s=10.0))
        proxy.apply(Partition(share=0.25, duration_s=5.0))
        handle.revert()  # or let duration_s run out
        report = proxy.stats()

Every fault is a frozen ``*Spec``-like dataclass with ``duration_s`` (None: until
reverted) and ``share`` (the fraction of connections it affects). :meth:`FaultProxy.apply`
makes it active at once and returns a :class:`FaultHandle`; a loop timer reverts it when
``duration_s`` runs out, :meth:`FaultHandle.revert` earlier (idempotent), and
:meth:`FaultProxy.stop` (also run when the task inside ``async with`` is cancelled)
reverts every fault and closes every socket. What both proxies share (the specs of
every fault, shares, handles, start, stop, apply and revert) is in
:mod:`iotix.faults.common`; this module adds the TCP faults and the forwarding.

**Which connections a share selects.** A connection is known by the client's source
address and port. Each gets a rank in [0, 1) from a hash of (proxy seed, address,
port); a fault of share ``s`` affects the connections whose rank is below ``s``. So the
choice is deterministic for a seed, applies the same way to connections made after the
fault began (a device that reconnects from a new port is drawn again), and shares
nest: with one seed, the connections of share 0.1 are among those of share 0.5.

**Semantics, chosen where the real thing leaves a choice:**

- :class:`Latency`: each chunk read is forwarded ``delay_s`` ± ``jitter_s`` later
  (uniform jitter), never before a chunk read earlier in the same direction. Several
  latencies on one connection add up.
- :class:`Bandwidth`: a token bucket per connection and direction (``burst_bytes``
  deep, refilled at ``bytes_per_s``); with several, the lowest rate wins.
- :class:`Blackhole`: nothing is forwarded either way and the sockets stay open; what
  arrives meanwhile is *dropped* (as a real blackhole would, without TCP's retransmits:
  the stream the broker sees then has a hole, which MQTT notices as garbage or a keep-
  alive timeout, just as devices behind a dead NAT eventually do).
- :class:`Reset`: a one-shot; the selected connections are reset (RST) at once. Its
  handle is inactive from the start and ``duration_s`` must be None.
- :class:`SlowClose`: when either side closes, the other side is closed ``delay_s``
  later (data in flight is still delivered). A half-close (EOF) counts as a close.
- :class:`Partition`: the selected connections are blackholed, and new connections from
  the selected share are refused.
- :class:`TargetDown`: the selected existing connections are reset and new ones
  refused, as if the broker had crashed.

**Failover.** :meth:`FaultProxy.retarget` moves the proxy to another target, as a
virtual IP moves to a second broker: new connections go there, and the existing ones
are reset so that their clients reconnect and land there (or, with
``reset_existing=False``, stay with the old target until they close).

"Refused" means accepted and reset at once: a user-space proxy cannot answer a SYN with
RST, so the client sees its connection reset before any reply instead of ECONNREFUSED.

**Cost.** Without a fault on a connection, a chunk read is written straight to the
other side: no copy, no timer. Work is per chunk, never per byte. Flow control: when
one side's write buffer fills, the proxy stops reading from the other side, and it
stops reading too while more than :data:`QUEUE_HIGH_BYTES` wait on a delay or rate
limit, so a slow side never makes the proxy buffer without bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from iotix.faults.common import (
    BaseFaultHandle,
    BaseFaultProxy,
    Blackhole,
    FaultSpec,
    Latency,
    selects,
    share_rank,
)

# BaseFaultHandle, Blackhole, FaultSpec, Latency, selects and share_rank live in
# iotix.faults.common (the UDP proxy uses them too) and are re-exported here.
__all__ = [
    "QUEUE_HIGH_BYTES",
    "TCP_FAULTS",
    "Bandwidth",
    "BaseFaultHandle",
    "Blackhole",
    "FaultHandle",
    "FaultProxy",
    "FaultSpec",
    "Latency",
    "Partition",
    "Reset",
    "SlowClose",
    "TargetDown",
    "selects",
    "share_rank",
]

QUEUE_HIGH_BYTES = 256 * 1024
"""Bytes waiting on a delay or rate limit, per direction, above which the proxy stops
reading from the sender (it reads again below a quarter of it)."""
_QUEUE_LOW_BYTES = QUEUE_HIGH_BYTES // 4
_BATCH_S = 0.001
"""Chunks due within this much of each other are written together, with one timer."""
_MIN_BURST_BYTES = 1024
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


# --- fault specs --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bandwidth(FaultSpec):
    """Limit each direction of each connection to ``bytes_per_s`` (token bucket)."""

    bytes_per_s: float
    burst_bytes: int = 16 * 1024
    """Bucket depth: how much may pass at once after a quiet spell. Chunks are cut in
    pieces this large, so it is at least :data:`_MIN_BURST_BYTES` (work per piece,
    never per byte)."""

    def __post_init__(self) -> None:
        super(Bandwidth, self).__post_init__()
        if self.bytes_per_s <= 0 or self.burst_bytes < _MIN_BURST_BYTES:
            msg = f"bytes_per_s must be positive and burst_bytes at least {_MIN_BURST_BYTES}"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Reset(FaultSpec):
    """Reset the selected connections now (a one-shot: ``duration_s`` must be None)."""

    def __post_init__(self) -> None:
        super(Reset, self).__post_init__()
        if self.duration_s is not None:
            msg = "Reset is a one-shot: it takes no duration_s"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class SlowClose(FaultSpec):
    """Pass a close from either side on to the other ``delay_s`` late."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class Partition(FaultSpec):
    """Blackhole the selected connections and refuse new ones from the selected share."""


@dataclass(frozen=True, slots=True)
class TargetDown(FaultSpec):
    """Reset the selected connections and refuse new ones: the broker looks crashed."""


TCP_FAULTS = (Latency, Bandwidth, Blackhole, Reset, SlowClose, Partition, TargetDown)
"""The fault kinds :class:`FaultProxy` applies."""


# --- handles ------------------------------------------------------------------------


class FaultHandle(BaseFaultHandle):
    """One fault applied by a :class:`FaultProxy`: revert it, read its counters."""

    __slots__ = (
        "bytes_delayed",
        "bytes_dropped",
        "closes_delayed",
        "connections_refused",
        "connections_reset",
    )

    def __init__(self, proxy: FaultProxy, spec: FaultSpec, now_s: float) -> None:
        super().__init__(proxy, spec, now_s)
        self.bytes_delayed = 0
        """Bytes held back by this latency or rate limit."""
        self.bytes_dropped = 0
        """Bytes thrown away while this blackhole or partition held."""
        self.connections_reset = 0
        self.connections_refused = 0
        self.closes_delayed = 0

    def counters(self) -> dict[str, int]:
        return {
            "bytes_delayed": self.bytes_delayed,
            "bytes_dropped": self.bytes_dropped,
            "connections_reset": self.connections_reset,
            "connections_refused": self.connections_refused,
            "closes_delayed": self.closes_delayed,
        }


# --- one proxied connection ---------------------------------------------------------


class _Side(asyncio.Protocol):
    """One socket of a proxied connection. It forwards what it reads to ``other``,
    straight away or through its queue when a delay or rate limit applies."""

    __slots__ = (
        "closed",
        "eof",
        "last_release_s",
        "link",
        "other",
        "queue",
        "queued_bytes",
        "reading_paused",
        "tat_s",
        "timer",
        "transport",
        "write_paused",
    )

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.other: _Side = self  # set by _Link
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.eof = False
        """This side closed: close the other once the queue is written."""
        self.write_paused = False
        self.reading_paused = False
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        """Chunks for ``other`` with their release times (non-decreasing)."""
        self.queued_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.last_release_s = 0.0
        self.tat_s = 0.0
        """Theoretical arrival time of the token bucket (GCRA form)."""

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast("asyncio.Transport", transport)
        self.link.side_made(self)

    def data_received(self, data: bytes) -> None:
        link = self.link
        if link.blackhole is not None:
            link.blackhole.bytes_dropped += len(data)
            return
        other = self.other.transport
        if not link.shaped and not self.queue and other is not None:
            other.write(data)  # the hot path: no fault on this connection
            return
        self._enqueue(data)

    def eof_received(self) -> bool | None:
        return None  # close our end too: a half-close is passed on as a close

    def pause_writing(self) -> None:
        self.write_paused = True
        self.other.update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.other.update_reading()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - Protocol API
        self.closed = True
        self.eof = True
        if self.timer is not None and self.other.closed:
            self.timer.cancel()
            self.timer = None
        # What the other side still had for us can go nowhere now.
        self.other.drop_queue()
        if not self.queue:
            self.link.close_later(self.other)
        self.link.side_lost()

    # --- forwarding -----------------------------------------------------------------

    def _enqueue(self, data: bytes) -> None:
        link = self.link
        loop = link.proxy.loop
        now = loop.time()
        size = len(data)
        release = now
        for handle in link.latencies:
            spec = cast("Latency", handle.spec)
            jitter = spec.jitter_s
            release += spec.delay_s + (link.proxy.rng.uniform(-jitter, jitter) if jitter else 0)
            handle.bytes_delayed += size
        release = max(release, now, self.last_release_s)  # order kept per direction
        limiter = link.bandwidth
        if limiter is None:
            self.last_release_s = release
            self.queue.append((release, data))
        else:
            self._limit(limiter, release, data)
        self.queued_bytes += size
        # Until the other side connects (see flush_pending) the chunks just wait.
        if self.timer is None and self.other.transport is not None:
            self._arm()
        if self.queued_bytes > QUEUE_HIGH_BYTES:
            self.update_reading()

    def _limit(self, limiter: FaultHandle, arrival_s: float, data: bytes) -> None:
        """Queue ``data`` in pieces of at most a bucketful, each released once the
        bucket holds enough tokens for it (GCRA: ``tat_s`` is when the bucket is full)."""
        spec = cast("Bandwidth", limiter.spec)
        rate = spec.bytes_per_s
        burst_s = spec.burst_bytes / rate
        step = spec.burst_bytes
        tat = self.tat_s
        release = arrival_s
        for offset in range(0, len(data), step):
            piece = data[offset : offset + step] if len(data) > step else data
            cost_s = len(piece) / rate
            release = max(release, tat + cost_s - burst_s)
            tat = max(tat, release) + cost_s
            self.queue.append((release, piece))
        if release > arrival_s:
            limiter.bytes_delayed += len(data)
        self.tat_s = tat
        self.last_release_s = release

    def _arm(self) -> None:
        loop = self.link.proxy.loop
        self.timer = loop.call_at(self.queue[0][0], self._release)

    def _release(self) -> None:
        self.timer = None
        due = self.link.proxy.loop.time() + _BATCH_S
        queue = self.queue
        chunks: list[bytes] = []
        while queue and queue[0][0] <= due:
            chunks.append(queue.popleft()[1])
        data = b"".join(chunks)
        self.queued_bytes -= len(data)
        target = self.other.transport
        blackhole = self.link.blackhole
        if blackhole is not None:
            blackhole.bytes_dropped += len(data)
        elif target is not None and not self.other.closed:
            target.write(data)
        if queue:
            self._arm()
        elif self.eof:
            self.link.close_later(self.other)
        self.update_reading()

    def flush_pending(self) -> None:
        """Write what waited for the other side to connect (due now or later)."""
        if self.queue and self.timer is None:
            self._arm()

    def drop_queue(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued_bytes = 0

    def update_reading(self) -> None:
        """Read from this side only while the other is connected and can take more, and
        the queue is short."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return
        other = self.other
        if self.reading_paused:
            if (
                not other.write_paused
                and other.transport is not None
                and self.queued_bytes <= _QUEUE_LOW_BYTES
            ):
                self.reading_paused = False
                transport.resume_reading()
        elif other.write_paused or other.transport is None or self.queued_bytes > QUEUE_HIGH_BYTES:
            self.reading_paused = True
            transport.pause_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def reset(self) -> None:
        """Abort with RST (SO_LINGER 0), not FIN: what a crashed peer or a middlebox sends."""
        transport = self.transport
        if transport is None or self.closed:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()


class _Link:
    """A proxied connection: the client's socket and ours to the target."""

    __slots__ = (
        "bandwidth",
        "blackhole",
        "client",
        "connect_done",
        "connecting",
        "latencies",
        "proxy",
        "rank",
        "shaped",
        "slow_close",
        "upstream",
    )

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.client.other = self.upstream
        self.upstream.other = self.client
        self.rank = 0.0
        self.connecting: asyncio.Task[Any] | None = None
        self.connect_done = False
        # The faults on this link, recomputed whenever one is applied or reverted, so
        # the per-chunk path reads attributes instead of scanning the active list.
        self.latencies: list[FaultHandle] = []
        self.bandwidth: FaultHandle | None = None
        self.blackhole: FaultHandle | None = None
        self.slow_close: FaultHandle | None = None
        self.shaped = False

    def refresh(self, active: list[FaultHandle]) -> None:
        mine = [h for h in active if selects(h.spec, self.rank)]
        self.latencies = [h for h in mine if isinstance(h.spec, Latency)]
        limits = [h for h in mine if isinstance(h.spec, Bandwidth)]
        self.bandwidth = min(
            limits, key=lambda h: cast("Bandwidth", h.spec).bytes_per_s, default=None
        )
        holes = [h for h in mine if isinstance(h.spec, Blackhole | Partition)]
        self.blackhole = holes[0] if holes else None
        slow = [h for h in mine if isinstance(h.spec, SlowClose)]
        self.slow_close = max(slow, key=lambda h: cast("SlowClose", h.spec).delay_s, default=None)
        self.shaped = bool(self.latencies) or self.bandwidth is not None

    def side_made(self, side: _Side) -> None:
        if side is self.client:
            self.proxy._accepted(self)  # noqa: SLF001 - the proxy's own bookkeeping
        else:
            self.client.update_reading()
            self.client.flush_pending()
            if self.client.closed:  # the client left while we connected
                self.close_later(self.upstream)

    def close_later(self, side: _Side) -> None:
        """Close ``side`` because its peer closed: now, or late under a SlowClose."""
        slow = self.slow_close
        if slow is None or side.closed or side.transport is None:
            if side is self.upstream and side.transport is None and self.connecting:
                self.connecting.cancel()
            side.close()
            return
        slow.closes_delayed += 1
        self.proxy.loop.call_later(cast("SlowClose", slow.spec).delay_s, side.close)

    def reset(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        self.client.reset()
        self.upstream.reset()

    def side_lost(self) -> None:
        if self.done():
            self.proxy._forget(self)  # noqa: SLF001 - the proxy's own bookkeeping

    def done(self) -> bool:
        upstream_done = self.upstream.closed or (
            self.upstream.transport is None and (self.connecting is None or self.connect_done)
        )
        return self.client.closed and upstream_done


# --- the proxy ----------------------------------------------------------------------


class FaultProxy(BaseFaultProxy[FaultHandle]):
    """A TCP proxy to ``target_host:target_port`` that applies faults (module docstring).

    ``seed`` decides which connections a ``share`` selects and the jitter drawn.
    """

    faults: ClassVar[tuple[type[FaultSpec], ...]] = TCP_FAULTS
    _wrong_fault = "a TCP proxy cannot apply {kind} (UDP faults need UDPFaultProxy)"

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            target_host, target_port, listen_host=listen_host, listen_port=listen_port, seed=seed
        )
        self._server: asyncio.AbstractServer | None = None
        self._links: set[_Link] = set()
        self.connections_accepted = 0
        self.retargets = 0
        """Times :meth:`retarget` moved the proxy to another target."""

    # --- lifecycle ------------------------------------------------------------------

    async def _listen(self) -> int:
        self._server = await self.loop.create_server(
            lambda: _Link(self).client, self.listen_host, self.listen_port
        )
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _shut(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for link in list(self._links):
            link.reset()
        await self._wait_idle(busy=bool(self._links))
        await server.wait_closed()

    @property
    def connections(self) -> int:
        """Connections open now (either socket still open)."""
        return len(self._links)

    # --- faults ---------------------------------------------------------------------

    def _handle(self, spec: FaultSpec, now_s: float) -> FaultHandle:
        return FaultHandle(self, spec, now_s)

    def _strike(self, handle: FaultHandle) -> None:
        spec = handle.spec
        if isinstance(spec, Reset | TargetDown):
            for link in [link for link in self._links if selects(spec, link.rank)]:
                link.reset()
                handle.connections_reset += 1
        if isinstance(spec, Reset):  # a one-shot: over once done
            handle.active = False
            handle.reverted_at_s = handle.applied_at_s

    def retarget(self, host: str, port: int, *, reset_existing: bool = True) -> int:
        """Forward connections to ``host:port`` from now on: a virtual IP moving to a
        second broker, which is how a scenario fails over.

        Connections accepted from now on connect to the new target. The existing ones
        (those still connecting to the old target too) are reset, so their clients
        reconnect and land on the new target; with ``reset_existing=False`` they stay
        with the old target until they close. Faults in force stay in force. Returns
        the number of connections reset.
        """
        self.target_host = host
        self.target_port = port
        self.retargets += 1
        if not reset_existing:
            return 0
        links = list(self._links)
        for link in links:
            link.reset()
        return len(links)

    def counters(self) -> dict[str, Any]:
        return {
            "retargets": self.retargets,
            "connections": self.connections,
            "connections_accepted": self.connections_accepted,
            "upstream_failures": self.upstream_failures,
        }

    def _refresh(self) -> None:
        active = self._active
        for link in self._links:
            link.refresh(active)

    # --- connections ----------------------------------------------------------------

    def _accepted(self, link: _Link) -> None:
        client = link.client
        assert client.transport is not None  # noqa: S101 - connection_made set it
        link.rank = share_rank(self.seed, client.transport.get_extra_info("peername"))
        for handle in self._active:
            if isinstance(handle.spec, Partition | TargetDown) and selects(handle.spec, link.rank):
                handle.connections_refused += 1
                client.reset()
                return
        self.connections_accepted += 1
        self._links.add(link)
        link.refresh(self._active)
        # Nothing to forward to until the target answers. (uvloop starts reading only
        # after connection_made, undoing a pause made in it: pause on the next turn.)
        self.loop.call_soon(client.update_reading)
        # The target as it is now: a retarget while this connects does not move it.
        link.connecting = self.loop.create_task(
            self._connect(link, self.target_host, self.target_port),
            name=f"iotix-fault-proxy-connect-{self.port}",
        )

    async def _connect(self, link: _Link, host: str, port: int) -> None:
        try:
            await self.loop.create_connection(lambda: link.upstream, host, port)
        except OSError:
            self.upstream_failures += 1
            link.client.reset()
        except asyncio.CancelledError:
            link.client.reset()
            raise
        finally:
            link.connect_done = True
            link.side_lost()

    def _forget(self, link: _Link) -> None:
        self._links.discard(link)
        if not self._links:
            self._now_idle()
