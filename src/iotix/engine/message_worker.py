"""A shard of devices that speak a protocol through an adapter (HTTP, CoAP, Kafka, a
plugin's): the same devices, schedules and measurements as the MQTT worker, one
message at a time.

The MQTT path (:class:`iotix.engine.worker.Worker`) batches writes to reach 100K devices
a machine; this one sends each message through its device's
:class:`~iotix.adapters.base.DeviceLink` and accounts for the
:class:`~iotix.adapters.base.Delivery` it returns, so every protocol lands in the same
counters and histograms:

- a message the adapter confirms (an HTTP response, a CoAP ACK, a Kafka ack: the
  model's QoS 1 or 2, or always for a protocol that always answers) is counted as QoS 1:
  sent, then acknowledged (with its latency) or failed (with its kind: ``http 503``,
  ``coap 4.04``, ``timeout``);
- a fire-and-forget message (CoAP non-confirmable, Kafka ``acks=0``) is counted as QoS 0.

A device that cannot connect is retried with capped, jittered backoff and counted per
kind; a device that is not connected sends nothing, as on the MQTT path.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from iotix.adapters.base import AdapterError, AdapterSettings, DeviceIdentity, OutgoingMessage
from iotix.adapters.registry import adapter_for
from iotix.engine.credentials import Credentials, read_credentials
from iotix.engine.stages import StagePlan
from iotix.engine.worker import DeviceAction, Doze, in_share, shard_snapshot
from iotix.errors import IotixError
from iotix.metrics import Counters, Histogram, Snapshot
from iotix.model.runtime import CommandStatus, DeviceBatch

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from iotix.adapters.base import Adapter, Command, Delivery, DeviceLink
    from iotix.clock import Clock
    from iotix.engine.worker import RunSettings
    from iotix.model.loader import LoadedModel
    from iotix.model.runtime import Message

__all__ = ["MessageWorker"]


_Queued = tuple["DeviceLink", OutgoingMessage, int, float]
"""A message waiting its turn: the link, the message, its QoS, its due time."""


STAGE_REVIEW_S = 0.1


class MessageWorker:
    """One shard: devices ``indices`` of ``model``, through the adapter of the run's
    endpoint scheme (or ``adapter_class``)."""

    def __init__(
        self,
        model: LoadedModel,
        indices: Sequence[int],
        settings: RunSettings,
        clock: Clock,
        *,
        worker_id: int = 0,
        on_snapshot: Callable[[Snapshot], None] | None = None,
        adapter_class: type[Adapter] | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.clock = clock
        self.worker_id = worker_id
        self.endpoint = settings.brokers[0]
        self.adapter_class = adapter_class or adapter_for(self.endpoint.scheme)
        self._always_confirms = bool(getattr(self.adapter_class, "always_confirms", False))
        self._never_confirms = False  # known once the adapter is made (Kafka acks=0)
        self.batch = DeviceBatch(
            model.spec,
            indices=list(indices),
            seed=settings.seed,
            start_epoch_s=clock.start_epoch_s,
            base_dir=model.base_dir,
        )
        self.batch.paused[:] = True
        self.first_index = int(self.batch.indices[0]) if self.batch.size else 0
        self.links: list[DeviceLink | None] = [None] * self.batch.size
        self._rows = {device_id: row for row, device_id in enumerate(self.batch.device_ids)}
        self.wanted = np.zeros(self.batch.size, dtype=bool)
        self.counters = Counters()
        self.connect_latency = Histogram()
        self.ack_latency = Histogram()
        self.intended_latency = Histogram()
        self.schedule_lag = Histogram()
        self.reconnect_time = Histogram()
        self.e2e_latency = Histogram()  # measured by a probe, not by the worker
        self.connected = 0
        self._on_snapshot = on_snapshot
        self._random = random.Random(f"{settings.seed}:worker:{worker_id}")  # noqa: S311 - jitter
        self._attempts = np.zeros(self.batch.size, dtype=np.int32)
        self._down_at = np.full(self.batch.size, -1.0)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._queues: dict[int, deque[_Queued]] = {}
        self._connecting = asyncio.Semaphore(settings.connect_concurrency)
        self._stopping = False
        self._connected_at_stop = 0
        self._adapter: Adapter | None = None
        self._doze = Doze()
        self._plan = StagePlan(settings.stages, settings.devices) if settings.stages else None
        self._credentials: Credentials | None = None
        if settings.credentials_file is not None:
            self._credentials = read_credentials(
                Path(settings.credentials_file), keep=[int(i) for i in self.batch.indices]
            )

    # --- the run --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> Snapshot:
        """Connect the devices, send until ``duration_s`` or ``stop``, then close them
        all and return the final snapshot."""
        stop = stop or asyncio.Event()
        settings = self.settings
        deadline = None if settings.duration_s is None else self.clock.now_s() + settings.duration_s
        adapter_settings = AdapterSettings(
            timeout_s=settings.adapter_timeout_s,
            options=dict(settings.adapter_options),
            on_command=self._on_command,
        )
        async with self.adapter_class(self.endpoint, adapter_settings) as adapter:
            self._adapter = adapter
            self._never_confirms = bool(getattr(adapter, "never_confirms", False))
            helpers = [
                asyncio.create_task(self._ramp(), name=f"worker-{self.worker_id}-ramp"),
                asyncio.create_task(self._report(), name=f"worker-{self.worker_id}-report"),
            ]
            try:
                await self._send_loop(stop, deadline)
            finally:
                self._stopping = True
                self._connected_at_stop = self.connected
                for task in helpers:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
                await self._drain()
                await self._close_all()
        snapshot = self.snapshot()
        if self._on_snapshot is not None:
            self._on_snapshot(snapshot)
        return snapshot

    async def _send_loop(self, stop: asyncio.Event, deadline: float | None) -> None:
        async def relay() -> None:
            await stop.wait()
            self._nudge()

        relaying = asyncio.create_task(relay())
        try:
            while not stop.is_set():
                now = self.clock.now_s()
                if deadline is not None and now >= deadline:
                    return
                messages = self.batch.advance(now)
                if messages:
                    sent_ms = str(round((self.clock.start_epoch_s + now) * 1000))
                    for message in messages:
                        self._dispatch(message, now, sent_ms)
                wake = max(min(self.batch.next_due_s(), now + 0.25), now + self.settings.tick_s)
                if deadline is not None:
                    wake = min(wake, deadline)
                # Sleep until the next due message, unless a command queued a reply or
                # the run stops first.
                await self._doze.sleep(wake - self.clock.now_s())
        finally:
            relaying.cancel()

    def _nudge(self) -> None:
        self._doze.nudge()

    async def _drain(self, timeout_s: float = 10.0) -> None:
        """Let the sends in flight finish (at most ``timeout_s``)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        for task in list(self._tasks):
            task.cancel()

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval_s)
            if self._on_snapshot is not None:
                self._on_snapshot(self.snapshot())

    def snapshot(self) -> Snapshot:
        return shard_snapshot(self)

    @property
    def connected_at_stop(self) -> int | None:
        """Devices connected when the run stopped; None while it runs."""
        return self._connected_at_stop if self._stopping else None

    # --- sending --------------------------------------------------------------------

    def _confirms(self, message: Message) -> bool:
        """Whether the engine waits for a confirmation: the model's QoS above 0, or a
        protocol that always answers (HTTP); never with one that cannot (Kafka acks=0)."""
        if self._never_confirms:
            return False
        qos = message.qos if self.settings.qos is None else self.settings.qos
        return qos > 0 or self._always_confirms

    def _dispatch(self, message: Message, now: float, sent_ms: str) -> None:
        """Hand one due message to its device (``sent_ms``: the tick's wall-clock time
        in milliseconds, for the message's headers)."""
        row = message.device_index - self.first_index
        link = self.links[row]
        confirm = self._confirms(message)
        qos = 1 if confirm else 0
        counters = self.counters
        counters.count_sent(qos, len(message.payload))
        lag = now - message.due_s
        self.schedule_lag.record(lag if lag > 0.0 else 0.0)
        if link is None:
            counters.count_failed(qos)
            counters.count_error("not sent: device not connected")
            return
        outgoing = OutgoingMessage(
            message.topic,
            message.payload,
            confirm,
            message.device_id,
            {"iotix-ts-ms": sent_ms, "iotix-name": message.name, "iotix-seq": str(message.seq)},
        )
        queue = self._queues.get(row)
        if queue is not None:  # the device is busy: its message waits its turn
            if len(queue) >= self.settings.max_inflight:
                self.counters.count_failed(qos)
                self.counters.count_error("not sent: device backed up")
                return
            queue.append((link, outgoing, qos, message.due_s))
            return
        self._queues[row] = deque()
        task = asyncio.create_task(self._send_in_turn(row, (link, outgoing, qos, message.due_s)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_in_turn(self, row: int, first: _Queued) -> None:
        """A device sends one message at a time, as a device on one connection does
        (an HTTP/1.1 request, a CoAP exchange, a produce call): the next waits for the
        answer to the one before. A task runs while the device has messages, no longer."""
        item = first
        try:
            while True:
                await self._send(*item)
                queue = self._queues[row]
                if not queue:
                    return
                item = queue.popleft()
        finally:
            left = self._queues.pop(row, None)
            for _, _, qos, _ in left or ():  # cancelled: what waited is not sent
                self.counters.count_failed(qos)
                self.counters.count_error("not sent: run ended")

    async def _send(
        self, link: DeviceLink, message: OutgoingMessage, qos: int, due_s: float
    ) -> None:
        started = self.clock.now_s()
        retries = self.settings.adapter_retries if qos else 0
        try:
            delivery = await link.send(message)
            # A message the peer did not confirm is sent again, as configured (a
            # protocol that retransmits by itself, CoAP, does so below this).
            while not delivery.confirmed and retries > 0:
                retries -= 1
                self.counters.count_error(f"retried after {delivery.error or 'no confirmation'}")
                delivery = await link.send(message)
        except asyncio.CancelledError:
            self.counters.count_failed(qos)
            self.counters.count_error("not confirmed: run ended")
            raise
        except Exception as exc:  # noqa: BLE001 - an adapter's bug must not kill the worker
            self.counters.count_failed(qos)
            self.counters.count_error(f"adapter error: {type(exc).__name__}")
            return
        self._account(delivery, qos, started, due_s)

    def _account(self, delivery: Delivery, qos: int, started: float, due_s: float) -> None:
        counters = self.counters
        if delivery.retransmissions:
            counters.count_error("retransmissions", delivery.retransmissions)
        if qos == 0:
            if not delivery.sent:
                counters.count_failed(0)
                counters.count_error(delivery.error or "not sent")
            return
        if delivery.confirmed:
            counters.count_acked(1)
            now = self.clock.now_s()
            latency = delivery.latency_s if delivery.latency_s is not None else now - started
            self.ack_latency.record(latency)
            self.intended_latency.record(max(now - due_s, latency))
        else:
            counters.count_failed(1)
            counters.count_error(delivery.error or "not confirmed")

    # --- connections ----------------------------------------------------------------

    async def _ramp(self) -> None:
        """Connect the devices the stages want (all without stages) at no more than
        ``connect_rate_hz``; close those a ramp down retires."""
        interval = 1.0 / self.settings.connect_rate_hz
        start = self.clock.now_s()
        plan = self._plan
        while True:
            target = (
                self.batch.indices < plan.target_at(self.clock.now_s() - start)
                if plan is not None
                else np.ones(self.batch.size, dtype=bool)
            )
            for row in np.flatnonzero(self.wanted & ~target).tolist():
                self.wanted[row] = False
                self._spawn(self._close(row))
            for row in np.flatnonzero(target & ~self.wanted).tolist():
                self.wanted[row] = True
                self._spawn(self._connect(row))
                await asyncio.sleep(interval)
            if plan is None:
                return
            await asyncio.sleep(STAGE_REVIEW_S)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _identity(self, row: int) -> DeviceIdentity:
        index = self.first_index + row
        device_id = self.batch.device_ids[row]
        settings = self.settings

        def fill(template: str | None) -> str | None:
            return None if template is None else template.format(device_id=device_id, index=index)

        username, password = fill(settings.username), fill(settings.password)
        if self._credentials is not None:
            found = self._credentials.for_device(device_id, index)
            username, password = found if found is not None else (None, None)
        return DeviceIdentity(device_id, index, username, password)

    async def _connect(self, row: int) -> None:
        adapter = self._adapter
        if adapter is None or self._stopping or not self.wanted[row] or self.links[row]:
            return
        async with self._connecting:
            self.counters.connect_attempts += 1
            started = self.clock.now_s()
            try:
                link = await adapter.connect(self._identity(row))
            except AdapterError as exc:
                self.counters.count_connect_failure(exc.kind)
                self._reconnect_later(row)
                return
        now = self.clock.now_s()
        self.connect_latency.record(now - started)
        if self._stopping or not self.wanted[row]:
            await link.aclose()
            return
        counters = self.counters
        counters.connects += 1
        if self._attempts[row]:
            counters.reconnects += 1
        if self._down_at[row] >= 0:
            self.reconnect_time.record(now - self._down_at[row])
            self._down_at[row] = -1.0
        self._attempts[row] = 0
        self.links[row] = link
        self.batch.paused[row] = False
        self.connected += 1

    def _reconnect_later(self, row: int, at_s: float | None = None) -> None:
        if self._stopping:
            return
        self._attempts[row] += 1
        if at_s is None:
            settings = self.settings
            ceiling = min(
                settings.reconnect_max_s,
                settings.reconnect_min_s * 2 ** (int(self._attempts[row]) - 1),
            )
            at_s = self.clock.now_s() + self._random.uniform(0, ceiling)

        async def later() -> None:
            await asyncio.sleep(max(at_s - self.clock.now_s(), 0.0))
            await self._connect(row)

        self._spawn(later())

    def _drop(self, row: int) -> DeviceLink | None:
        """Take a device off the air at once; returns its link, still to be closed."""
        link = self.links[row]
        if link is None:
            return None
        self.links[row] = None
        self.batch.paused[row] = True
        self.connected -= 1
        return link

    async def _close(self, row: int) -> None:
        link = self._drop(row)
        if link is not None:
            with contextlib.suppress(Exception):
                await link.aclose()

    async def _close_all(self) -> None:
        closing = [self._close(row) for row, link in enumerate(self.links) if link is not None]
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)

    # --- commands -------------------------------------------------------------------

    def _on_command(self, device_id: str, command: Command) -> None:
        """A command the adapter received for a device: its model's handler answers (the
        reply goes out as a message, through the same link)."""
        row = self._rows.get(device_id)
        if row is None:
            return
        counters = self.counters
        counters.commands_received += 1
        try:
            payload = orjson.loads(command.payload) if command.payload else {}
        except orjson.JSONDecodeError:
            payload = {"raw": command.payload.decode("utf-8", "replace")}
        try:
            status = self.batch.handle_command(row, command.name, payload, self.clock.now_s())
        except IotixError as exc:
            counters.count_error(f"command failed: {type(exc).__name__}")
            return
        if status is CommandStatus.OFFLINE:
            counters.count_error("command ignored: device offline")
            return
        counters.commands_answered += 1
        self._nudge()  # its reply may be due before the loop would wake

    # --- scenario actions -----------------------------------------------------------

    def act(self, action: DeviceAction) -> int:
        """As :meth:`iotix.engine.worker.Worker.act`: drop (for an offline time), storm
        or set, on this shard's devices in the action's share."""
        rows = np.flatnonzero(in_share(self.batch.indices, action.share, self.settings.seed))
        if action.kind == "set":
            if action.field is None:
                raise IotixError("a set action names a field")
            self.batch.set_field(action.field, rows, action.value)
            return len(rows)
        now = self.clock.now_s()
        touched = 0
        for row in rows.tolist():
            if self.links[row] is None:
                continue
            touched += 1
            self.counters.disconnects += 1
            self._down_at[row] = now
            link = self._drop(row)
            if link is not None:
                self._spawn(link.aclose())
            if action.kind == "reconnect_storm":
                self._reconnect_later(row, at_s=now)
            else:
                back = now + action.offline_s if action.offline_s > 0 else None
                if back is not None:
                    self.batch.offline_until_s[row] = back
                self._reconnect_later(row, at_s=back)
        return touched
