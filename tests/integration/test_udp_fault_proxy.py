"""The UDP fault proxy between real UDP sockets on 127.0.0.1: an echo server (or a sink)
started by each test, and clients sending numbered datagrams through the proxy.

Datagrams are sent in batches, and each batch waits until the proxy, the server and the
client have accounted for every datagram (``settled``) before the next: loopback UDP
drops what overflows a socket's receive buffer, which would otherwise pass for loss.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import pytest
from broker_helpers import until

from iotix.faults import (
    Blackhole,
    Duplicate,
    Latency,
    Loss,
    Reorder,
    Reset,
    UDPFaultProxy,
    share_rank,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

_BATCH = 50


class Server(asyncio.DatagramProtocol):
    """A UDP server that records every datagram and, when ``echo``, sends it back."""

    def __init__(self, *, echo: bool) -> None:
        self.echo = echo
        self.received: list[bytes] = []
        self.peers: set[Any] = set()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        self.peers.add(addr)
        if self.echo and self.transport is not None:
            self.transport.sendto(data, addr)

    @property
    def port(self) -> int:
        assert self.transport is not None
        port: int = self.transport.get_extra_info("sockname")[1]
        return port


class Client(asyncio.DatagramProtocol):
    """A UDP socket connected to the proxy, recording what comes back."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.errors: list[Exception] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:  # noqa: ARG002
        self.received.append(data)

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    @property
    def address(self) -> Any:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")


@contextlib.asynccontextmanager
async def server(*, echo: bool = True) -> AsyncIterator[Server]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: Server(echo=echo), local_addr=("127.0.0.1", 0)
    )
    try:
        yield protocol
    finally:
        transport.close()


@contextlib.asynccontextmanager
async def client(port: int) -> AsyncIterator[Client]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        Client, remote_addr=("127.0.0.1", port)
    )
    try:
        yield protocol
    finally:
        transport.close()


def numbered(count: int, start: int = 0) -> list[bytes]:
    return [f"{n:06d}".encode() for n in range(start, start + count)]


def settled(proxy: UDPFaultProxy, target: Server, clients: list[Client], sent: int) -> bool:
    """Every datagram sent so far is accounted for, both ways, and none is held back."""
    to_target, to_client = proxy.to_target, proxy.to_client
    return (
        proxy.held() == 0
        and to_target.received == sent
        and len(target.received) == to_target.forwarded
        and to_client.received == (len(target.received) if target.echo else 0)
        and sum(len(c.received) for c in clients) == to_client.forwarded
    )


async def send_paced(
    proxy: UDPFaultProxy, target: Server, sender: Client, payloads: list[bytes]
) -> None:
    """Send ``payloads`` in batches, each once the previous one has settled."""
    sent = proxy.to_target.received
    for start in range(0, len(payloads), _BATCH):
        batch = payloads[start : start + _BATCH]
        for payload in batch:
            sender.send(payload)
        sent += len(batch)
        await until(lambda sent=sent: settled(proxy, target, [sender], sent))


async def round_trip(sender: Client, payload: bytes) -> None:
    """Send one datagram and wait for its echo."""
    sender.send(payload)
    await until(lambda: payload in sender.received)


def run(scenario: Callable[[], Any]) -> Any:
    return asyncio.run(scenario())


# --- plain forwarding and sessions --------------------------------------------------


def test_without_faults_every_datagram_goes_through_both_ways() -> None:
    async def scenario() -> dict[str, Any]:
        async with server() as target, UDPFaultProxy("127.0.0.1", target.port) as proxy:
            async with client(proxy.port) as sender:
                await send_paced(proxy, target, sender, numbered(200))
                assert sender.received == numbered(200)
                assert target.received == numbered(200)
                assert proxy.sessions == 1
            return proxy.stats()

    stats = run(scenario)
    for direction in ("to_target", "to_client"):
        assert stats[direction]["received"] == stats[direction]["forwarded"] == 200
        assert stats[direction]["dropped"] == 0
    assert stats["sessions_opened"] == 1
    assert stats["faults"] == []


def test_each_client_address_gets_its_own_session_and_only_its_own_replies() -> None:
    async def scenario() -> None:
        async with (
            server() as target,
            UDPFaultProxy("127.0.0.1", target.port) as proxy,
            client(proxy.port) as first,
            client(proxy.port) as second,
        ):
            await round_trip(first, b"from first")
            await round_trip(second, b"from second")
            assert first.received == [b"from first"]
            assert second.received == [b"from second"]
            assert proxy.sessions == 2
            # Two upstream sockets: the server saw two distinct peers.
            assert len(target.peers) == 2

    run(scenario)


def test_an_idle_session_expires_and_the_next_datagram_opens_a_new_one() -> None:
    async def scenario() -> dict[str, Any]:
        async with (
            server() as target,
            UDPFaultProxy("127.0.0.1", target.port, idle_timeout_s=0.2) as proxy,
            client(proxy.port) as sender,
        ):
            await round_trip(sender, b"one")
            await until(lambda: proxy.sessions == 0)
            await round_trip(sender, b"two")
            assert proxy.sessions == 1
            assert len(target.peers) == 2  # a new upstream socket, as a NAT would
            return proxy.stats()

    stats = run(scenario)
    assert (stats["sessions_opened"], stats["sessions_expired"]) == (2, 1)


# --- faults, measured ---------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_loss_drops_its_probability_of_datagrams_in_each_direction(seed: int) -> None:
    async def scenario() -> tuple[dict[str, Any], int, int]:
        async with (
            server() as target,
            UDPFaultProxy("127.0.0.1", target.port, seed=seed) as proxy,
            client(proxy.port) as sender,
        ):
            handle = proxy.apply(Loss(0.1))
            await send_paced(proxy, target, sender, numbered(2000))
            return proxy.stats(), handle.datagrams_dropped, len(sender.received)

    stats, dropped_by_handle, echoed = run(scenario)
    to_target, to_client = stats["to_target"], stats["to_client"]
    assert to_target["received"] == 2000
    assert to_target["dropped"] / to_target["received"] == pytest.approx(0.1, abs=0.03)
    assert to_client["dropped"] / to_client["received"] == pytest.approx(0.1, abs=0.03)
    assert to_client["received"] == to_target["forwarded"]  # the server echoed each
    assert echoed == to_client["forwarded"]
    assert dropped_by_handle == to_target["dropped"] + to_client["dropped"]


def test_duplicate_sends_its_probability_of_datagrams_twice_in_each_direction() -> None:
    async def scenario() -> tuple[dict[str, Any], int, int]:
        async with (
            server() as target,
            UDPFaultProxy("127.0.0.1", target.port, seed=3) as proxy,
            client(proxy.port) as sender,
        ):
            proxy.apply(Duplicate(0.2))
            await send_paced(proxy, target, sender, numbered(2000))
            return proxy.stats(), len(target.received), len(sender.received)

    stats, at_server, echoed = run(scenario)
    to_target, to_client = stats["to_target"], stats["to_client"]
    assert to_target["duplicated"] / to_target["received"] == pytest.approx(0.2, abs=0.04)
    assert to_client["duplicated"] / to_client["received"] == pytest.approx(0.2, abs=0.04)
    assert at_server == 2000 + to_target["duplicated"]
    assert echoed == at_server + to_client["duplicated"]
    assert to_target["dropped"] == to_client["dropped"] == 0


def test_the_same_seed_drops_the_same_datagrams_and_another_seed_others() -> None:
    async def delivered(seed: int) -> list[bytes]:
        async with (
            server(echo=False) as target,
            UDPFaultProxy("127.0.0.1", target.port, seed=seed) as proxy,
            client(proxy.port) as sender,
        ):
            proxy.apply(Loss(0.3))
            await send_paced(proxy, target, sender, numbered(500))
            return target.received

    async def scenario() -> tuple[list[bytes], list[bytes], list[bytes]]:
        return await delivered(5), await delivered(5), await delivered(6)

    first, again, other = run(scenario)
    assert first == again  # from another client port: a share of 1 ignores it
    assert first != other
    assert 300 < len(first) < 400


def test_reorder_holds_datagrams_back_so_later_ones_overtake_them() -> None:
    async def scenario() -> tuple[list[bytes], dict[str, Any]]:
        async with (
            server(echo=False) as target,
            UDPFaultProxy("127.0.0.1", target.port, seed=4) as proxy,
            client(proxy.port) as sender,
        ):
            handle = proxy.apply(Reorder(0.1, delay_s=0.05))
            await send_paced(proxy, target, sender, numbered(300))
            return target.received, handle.stats()

    received, stats = run(scenario)
    assert sorted(received) == numbered(300)  # nothing lost, nothing doubled
    assert received != numbered(300)
    # A datagram arriving after a later-numbered one was overtaken.
    overtaken = [d for i, d in enumerate(received) if any(e > d for e in received[:i])]
    assert overtaken
    assert len(overtaken) <= stats["datagrams_reordered"]
    assert 10 < stats["datagrams_reordered"] < 60


def test_latency_delays_each_way_and_jitter_does_not_reorder() -> None:
    async def scenario() -> tuple[float, list[bytes], int]:
        loop = asyncio.get_running_loop()
        async with (
            server() as target,
            UDPFaultProxy("127.0.0.1", target.port) as proxy,
            client(proxy.port) as sender,
        ):
            handle = proxy.apply(Latency(0.1))
            start = loop.time()
            await round_trip(sender, b"ping")
            elapsed = loop.time() - start
            handle.revert()
            jittery = proxy.apply(Latency(0.01, jitter_s=0.01))
            await send_paced(proxy, target, sender, numbered(200))
            return elapsed, target.received[1:], jittery.datagrams_delayed

    elapsed, received, delayed = run(scenario)
    # Out and back each wait 0.1 s (timers never fire early by more than the clock's
    # resolution).
    assert elapsed >= 0.19
    assert elapsed < 5.0
    assert received == numbered(200)  # in order
    assert delayed == 400  # both ways


def test_a_blackhole_drops_everything_until_reverted() -> None:
    async def scenario() -> tuple[int, dict[str, Any]]:
        async with (
            server() as target,
            UDPFaultProxy("127.0.0.1", target.port) as proxy,
            client(proxy.port) as sender,
        ):
            handle = proxy.apply(Blackhole())
            for payload in numbered(10):
                sender.send(payload)
            await until(lambda: handle.datagrams_dropped == 10)
            assert target.received == []
            handle.revert()
            handle.revert()  # idempotent
            assert proxy.active == []
            await round_trip(sender, b"after")
            return len(target.received), handle.stats()

    at_server, stats = run(scenario)
    assert at_server == 1
    assert stats["active"] is False
    assert stats["datagrams_dropped"] == 10


def test_a_fault_is_reverted_when_its_duration_ends() -> None:
    async def scenario() -> None:
        async with (
            server() as target,
            UDPFaultProxy("127.0.0.1", target.port) as proxy,
            client(proxy.port) as sender,
        ):
            handle = proxy.apply(Loss(1.0, duration_s=0.2))
            sender.send(b"lost")
            await until(lambda: handle.datagrams_dropped == 1)
            await until(lambda: not handle.active)
            assert handle.reverted_at_s is not None
            assert handle.reverted_at_s - handle.applied_at_s >= 0.19
            await round_trip(sender, b"through")
            assert target.received == [b"through"]

    run(scenario)


def test_a_blackhole_drops_datagrams_held_back_when_it_starts() -> None:
    async def scenario() -> dict[str, Any]:
        async with (
            server() as target,
            UDPFaultProxy("127.0.0.1", target.port) as proxy,
            client(proxy.port) as sender,
        ):
            proxy.apply(Latency(0.2))
            sender.send(b"held")
            await until(lambda: proxy.held() == 1)
            hole = proxy.apply(Blackhole())
            await until(lambda: proxy.held() == 0)
            assert target.received == []
            return hole.stats()

    assert run(scenario)["datagrams_dropped"] == 1


def test_a_share_selects_client_addresses_by_their_rank() -> None:
    seed, share = 11, 0.5

    async def scenario() -> tuple[list[bool], list[bool]]:
        async with (
            server() as target,
            UDPFaultProxy("127.0.0.1", target.port, seed=seed) as proxy,
            contextlib.AsyncExitStack() as stack,
        ):
            clients = [await stack.enter_async_context(client(proxy.port)) for _ in range(20)]
            proxy.apply(Blackhole(share=share))
            for number, sender in enumerate(clients):
                sender.send(b"%d" % number)
            await until(lambda: settled(proxy, target, clients, 20))
            selected = [share_rank(seed, c.address) < share for c in clients]
            answered = [bool(c.received) for c in clients]
            return selected, answered

    selected, answered = run(scenario)
    assert answered == [not s for s in selected]
    assert any(selected)
    assert not all(selected)


# --- stopping -----------------------------------------------------------------------


def test_stop_reverts_every_fault_and_closes_every_session() -> None:
    async def scenario() -> None:
        async with server() as target:
            proxy = UDPFaultProxy("127.0.0.1", target.port)
            await proxy.start()
            async with client(proxy.port) as sender:
                await round_trip(sender, b"hello")
                handles = [proxy.apply(Latency(0.1)), proxy.apply(Loss(0.5, duration_s=5.0))]
                await proxy.stop()
                assert [h.active for h in handles] == [False, False]
                assert proxy.active == []
                assert proxy.sessions == 0
                # Nothing listens any more: the kernel answers with ICMP unreachable.
                sender.send(b"anyone?")
                await until(
                    lambda: any(isinstance(e, ConnectionRefusedError) for e in sender.errors)
                )
            await proxy.stop()  # idempotent

    run(scenario)


def test_cancelling_the_task_running_the_proxy_reverts_faults_and_closes_sessions() -> None:
    async def scenario() -> None:
        ready: asyncio.Future[UDPFaultProxy] = asyncio.get_running_loop().create_future()
        async with server() as target:

            async def run_proxy() -> None:
                async with UDPFaultProxy("127.0.0.1", target.port) as proxy:
                    ready.set_result(proxy)
                    await asyncio.Event().wait()  # until cancelled

            task = asyncio.create_task(run_proxy(), name="udp-proxy")
            proxy = await ready
            async with client(proxy.port) as sender:
                await round_trip(sender, b"hello")
                handle = proxy.apply(Reorder(0.5, delay_s=1.0))
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert not handle.active
                assert proxy.active == []
                assert proxy.sessions == 0
                assert proxy._open_transports == 0

    run(scenario)


# --- under uvloop, and what the proxy refuses ---------------------------------------


def test_under_uvloop_loss_and_latency_apply_and_sessions_close() -> None:
    import uvloop  # noqa: PLC0415 - a dependency of iotix on Linux, the loop the workers run

    async def scenario() -> tuple[float, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        async with server() as target:
            proxy = UDPFaultProxy("127.0.0.1", target.port, seed=2)
            async with proxy, client(proxy.port) as sender:
                latency = proxy.apply(Latency(0.05))
                start = loop.time()
                await round_trip(sender, b"ping")
                elapsed = loop.time() - start
                latency.revert()
                proxy.apply(Loss(0.2))
                await send_paced(proxy, target, sender, numbered(1000))
            assert proxy.sessions == 0
            assert proxy._open_transports == 0
            return elapsed, proxy.stats()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        elapsed, stats = runner.run(scenario())
    assert elapsed >= 0.09  # uvloop's clock ticks in ms
    to_target = stats["to_target"]
    # The ping went through before the loss began.
    assert to_target["dropped"] / (to_target["received"] - 1) == pytest.approx(0.2, abs=0.05)


def test_a_tcp_fault_is_refused_by_the_udp_proxy() -> None:
    async def scenario() -> None:
        async with UDPFaultProxy("127.0.0.1", 9) as proxy:
            with pytest.raises(TypeError, match="Reset"):
                proxy.apply(Reset())

    run(scenario)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Loss(1.5),
        lambda: Duplicate(-0.1),
        lambda: Reorder(0.5, delay_s=0),
        lambda: Loss(0.5, share=2.0),
    ],
    ids=["loss>1", "duplicate<0", "reorder-no-delay", "share>1"],
)
def test_fault_specs_reject_values_out_of_range(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="must"):
        make()
