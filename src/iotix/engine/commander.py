"""The commander: sends commands to simulated devices and measures their replies.

A device model's ``commands`` section says where each device listens
(``devices/{device_id}/commands/{command}`` by default) and where it answers
(``devices/{device_id}/replies/{command}``, or a handler's own ``reply.topic``; no
reply at all for a handler with ``reply: null``). A worker's devices subscribe to
their command topic and publish the reply, a JSON object with ``device_id``,
``command`` and ``status`` (``ok``, ``rejected``, ``invalid_payload``,
``unknown_command``) unless the model shapes the payload itself.

- :func:`command_targets` renders, for devices of a model, the topic a command goes to
  and the topic its reply comes back on. Attributes such as ``{site}`` are drawn from
  the seed, so give the seed the devices run with.
- :class:`CommandTracker` is the pure core (STYLE.md §1): told when each command went
  out and when each reply came in, it matches replies to commands and counts ok,
  rejected (per status), timed out, late and unexpected replies, and the reply
  latency. It reads no clock: every time is passed in.
- :class:`Commander` is the thin async shell: one iotix MQTT connection that
  subscribes to the reply topics, publishes the commands at QoS 1 and feeds the
  tracker, with one loop timer for the next timeout (no polling).

Matching: per (device, command), commands form a FIFO queue; a reply answers the
oldest command of its device and command that has not been answered. If that command
has already timed out the reply is ``late``; if nothing was outstanding it is
``unexpected`` (a QoS 1 duplicate, or a reply to somebody else's command).

Reconciliation: ``sent == replied + timed_out + pending + no_reply_expected``, where
``replied == ok + sum(rejected) + no_status`` and ``late`` counts replies to commands
already counted in ``timed_out``.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from iotix.adapters.mqtt import open_connection
from iotix.errors import IotixError
from iotix.metrics import Histogram
from iotix.model.runtime import DeviceBatch
from iotix.protocols.mqtt.packets import ProtocolVersion, Subscription
from iotix.protocols.mqtt.session import (
    MessageReceivedEvent,
    PublishAckedEvent,
    SessionSettings,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Mapping, Sequence
    from pathlib import Path
    from types import TracebackType

    from iotix.adapters.mqtt import MQTTConnection
    from iotix.model.loader import LoadedModel
    from iotix.protocols.mqtt.session import Event

__all__ = [
    "FILTERS_PER_SUBSCRIBE",
    "SEND_BATCH",
    "CommandTarget",
    "CommandTracker",
    "Commander",
    "CommanderError",
    "InvalidCommandError",
    "NoCommandsError",
    "ReplyOutcome",
    "ReplySubscriptionError",
    "command_targets",
    "parse_reply",
]

logger = logging.getLogger(__name__)

SEND_BATCH = 500
"""Commands published per event-loop turn: a send to 100K devices yields in between."""

FILTERS_PER_SUBSCRIBE = 100
"""Reply topics per SUBSCRIBE packet."""

SUBSCRIBES_IN_FLIGHT = 8
"""SUBSCRIBE packets awaiting their SUBACK at once."""

DEFAULT_MAX_INFLIGHT = 100
"""The commander's QoS 1 window; further commands wait in its session's queue."""


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class CommanderError(IotixError):
    """Commands cannot be sent: the commander is not connected, or lost its broker."""


class NoCommandsError(CommanderError):
    """The device model has no ``commands`` section, so its devices listen for none."""

    def __init__(self, model: str, *, file: Path | None = None) -> None:
        where = f" ({file})" if file is not None else ""
        super().__init__(
            f"device model {model!r}{where} has no `commands` section: "
            "its devices do not listen for commands"
        )
        self.model = model
        self.file = file


class InvalidCommandError(CommanderError):
    """A command name that cannot be one level of an MQTT topic."""

    def __init__(self, command: str) -> None:
        super().__init__(
            f"command name {command!r} must be one non-empty topic level without '/', '+' or '#'"
        )
        self.command = command


class ReplySubscriptionError(CommanderError):
    """The broker refused to subscribe the commander to reply topics."""

    def __init__(self, topic_filters: Sequence[str], reason_codes: Sequence[int]) -> None:
        shown = ", ".join(
            f"{t!r} (0x{c:02X})" for t, c in zip(topic_filters, reason_codes, strict=True)
        )
        super().__init__(f"the broker refused the reply subscription of {shown}")
        self.topic_filters = tuple(topic_filters)
        self.reason_codes = tuple(reason_codes)


# ---------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandTarget:
    """Where one device takes a command, and where its reply comes back."""

    device_id: str
    topic: str
    reply_topic: str | None
    """None when the device's handler has ``reply: null``: no answer to wait for."""


def command_targets(
    model: LoadedModel, indices: Sequence[int], *, seed: int, command: str
) -> list[CommandTarget]:
    """The command and reply topics of devices ``indices`` of ``model`` for ``command``.

    Device ids and attributes come from ``seed``, as in the worker that runs the
    devices: give the same seed, or the topics name other devices. A command without a
    handler is allowed: the device answers ``unknown_command`` on the channel's
    ``reply_topic``. Raises :class:`NoCommandsError` when the model has no commands.
    """
    commands = model.spec.commands
    if commands is None:
        raise NoCommandsError(model.spec.name, file=model.path)
    if not command or any(c in command for c in "/+#"):
        raise InvalidCommandError(command)
    handler = commands.handlers.get(command)
    reply_template: str | None
    if handler is None:
        reply_template = commands.reply_topic
    elif handler.reply is None:
        reply_template = None
    else:
        # As the runtime does: an empty topic falls back to the channel's too.
        reply_template = handler.reply.topic or commands.reply_topic
    batch = DeviceBatch(model.spec, indices=list(indices), seed=seed, base_dir=model.base_dir)
    return [
        CommandTarget(
            device_id=batch.device_ids[row],
            topic=batch.render(commands.topic, row, command=command),
            reply_topic=(
                None
                if reply_template is None
                else batch.render(reply_template, row, command=command)
            ),
        )
        for row in range(batch.size)
    ]


# ---------------------------------------------------------------------------------------
# The pure core
# ---------------------------------------------------------------------------------------


class ReplyOutcome(enum.Enum):
    """What a reply turned out to be."""

    ON_TIME = "on_time"
    """It answered an outstanding command within its timeout."""
    LATE = "late"
    """It answered a command that had already timed out."""
    UNEXPECTED = "unexpected"
    """No command of that device and name was outstanding."""


class _State(enum.Enum):
    PENDING = "pending"
    TIMED_OUT = "timed_out"
    ANSWERED = "answered"


class _Outstanding:
    """One command awaiting its reply."""

    __slots__ = ("deadline_s", "sent_s", "state")

    def __init__(self, sent_s: float, deadline_s: float) -> None:
        self.sent_s = sent_s
        self.deadline_s = deadline_s
        self.state = _State.PENDING


class CommandTracker:
    """Matches replies to commands and counts what became of each command.

    Pure: every time is passed in, nothing here sleeps or does I/O. Per (device,
    command) the commands not answered yet form a FIFO list, oldest first:

    - :meth:`record_sent` appends a command, pending until its deadline.
    - :meth:`expire` turns every pending command whose deadline has passed into a
      timed-out one (``timed_out``).
    - :meth:`record_reply` takes the oldest command of the list. Pending: ``ON_TIME``,
      its latency recorded and its status counted in ``ok``, ``rejected[status]`` or
      ``no_status``. Timed out: ``LATE`` (``late``), no latency. None left:
      ``UNEXPECTED`` (``unexpected``).

    Memory: about 150 bytes per outstanding command. A command that times out stays
    in its list until a late reply takes it, so a device that never answers keeps
    one entry per command sent to it.
    """

    __slots__ = (
        "_deadlines",
        "_order",
        "_outstanding",
        "late",
        "no_reply_expected",
        "no_status",
        "ok",
        "pending",
        "rejected",
        "reply_latency",
        "sent",
        "timed_out",
        "unexpected",
        "unparseable",
    )

    def __init__(self) -> None:
        self._outstanding: dict[tuple[str, str], list[_Outstanding]] = {}
        # (deadline, tie-break, command); answered commands are dropped lazily.
        self._deadlines: list[tuple[float, int, _Outstanding]] = []
        self._order = itertools.count()
        self.sent = 0
        self.no_reply_expected = 0
        self.pending = 0
        self.ok = 0
        self.rejected: dict[str, int] = {}
        self.no_status = 0
        self.timed_out = 0
        self.late = 0
        self.unexpected = 0
        self.unparseable = 0
        self.reply_latency = Histogram()

    @property
    def replied(self) -> int:
        """Replies in time, whatever their status."""
        return self.ok + sum(self.rejected.values()) + self.no_status

    # -- recording ---------------------------------------------------------------------

    def record_sent(self, device_id: str, command: str, sent_s: float, timeout_s: float) -> None:
        """A command went to ``device_id``; it times out ``timeout_s`` after ``sent_s``."""
        outstanding = _Outstanding(sent_s, sent_s + timeout_s)
        queue = self._outstanding.get((device_id, command))
        if queue is None:
            self._outstanding[device_id, command] = [outstanding]
        else:
            queue.append(outstanding)
        heapq.heappush(self._deadlines, (outstanding.deadline_s, next(self._order), outstanding))
        self.sent += 1
        self.pending += 1

    def record_sent_without_reply(self) -> None:
        """A command went to a device whose handler sends no reply."""
        self.sent += 1
        self.no_reply_expected += 1

    def record_reply(
        self, device_id: str, command: str, status: str | None, received_s: float
    ) -> ReplyOutcome:
        """A reply of ``device_id`` to ``command`` arrived at ``received_s``.

        ``status`` None: the payload carries none (a model's own reply payload).
        """
        key = (device_id, command)
        queue = self._outstanding.get(key)
        if not queue:
            self.unexpected += 1
            return ReplyOutcome.UNEXPECTED
        oldest = queue.pop(0)  # lists stay short: one entry per command in flight
        if not queue:
            del self._outstanding[key]
        if oldest.state is _State.TIMED_OUT:
            oldest.state = _State.ANSWERED
            self.late += 1
            return ReplyOutcome.LATE
        oldest.state = _State.ANSWERED
        self.pending -= 1
        self.reply_latency.record(received_s - oldest.sent_s)
        if status == "ok":
            self.ok += 1
        elif status is None:
            self.no_status += 1
        else:
            self.rejected[status] = self.rejected.get(status, 0) + 1
        return ReplyOutcome.ON_TIME

    def note_unparseable(self) -> None:
        """Count a reply whose device or command could not be told."""
        self.unparseable += 1

    def expire(self, now_s: float) -> int:
        """Time out every pending command whose deadline is at or before ``now_s``;
        returns how many did."""
        deadlines = self._deadlines
        expired = 0
        while deadlines and deadlines[0][0] <= now_s:
            _, _, outstanding = heapq.heappop(deadlines)
            if outstanding.state is _State.PENDING:
                outstanding.state = _State.TIMED_OUT
                expired += 1
        self.timed_out += expired
        self.pending -= expired
        return expired

    # -- reading -----------------------------------------------------------------------

    def next_deadline_s(self) -> float | None:
        """When the next pending command times out; None when none is pending."""
        deadlines = self._deadlines
        # Answered commands leave their deadline behind; drop those on top.
        while deadlines and deadlines[0][2].state is not _State.PENDING:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def summary(self) -> dict[str, Any]:
        """The counts and the reply latency summary (seconds), as a plain dict."""
        return {
            "sent": self.sent,
            "replied": self.replied,
            "ok": self.ok,
            "rejected": dict(self.rejected),
            "no_status": self.no_status,
            "timed_out": self.timed_out,
            "late": self.late,
            "unexpected": self.unexpected,
            "unparseable": self.unparseable,
            "pending": self.pending,
            "no_reply_expected": self.no_reply_expected,
            "reply_latency": self.reply_latency.summary(),
        }


def parse_reply(payload: bytes) -> tuple[str | None, str | None, str | None]:
    """``(device_id, command, status)`` from a JSON object reply; None for any that is
    missing or not a string (or all three when the payload is not a JSON object)."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, None, None
    if type(data) is not dict:
        return None, None, None
    device_id, command, status = data.get("device_id"), data.get("command"), data.get("status")
    return (
        device_id if type(device_id) is str else None,
        command if type(command) is str else None,
        status if type(status) is str else None,
    )


# ---------------------------------------------------------------------------------------
# The async shell
# ---------------------------------------------------------------------------------------


_AMBIGUOUS = ("", "")
"""A reply topic shared by several (device, command) pairs: the payload must say."""


class Commander:
    """Sends commands over one MQTT connection and tracks the devices' replies.

    ``async with Commander(host, port) as commander:`` connects; :meth:`send` publishes
    a command to many devices; :meth:`drain` waits until every command is answered or
    timed out; leaving the block (or :meth:`stop`) disconnects and returns the summary.

    Times are the event loop's (``loop.time()``): the timeout timer runs on it, so the
    latencies do too. A command's latency runs from the moment it is handed to the
    connection, so a full QoS 1 window (``max_inflight``) counts in it, as it would
    for a real backend. Replies arriving retained are stale and skipped.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tracker: CommandTracker | None = None,
        client_id: str | None = None,
        version: ProtocolVersion = ProtocolVersion.V311,
        username: str | None = None,
        password: str | None = None,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        connect_timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        websocket_path: str | None = None,
        send_batch: int = SEND_BATCH,
        filters_per_subscribe: int = FILTERS_PER_SUBSCRIBE,
    ) -> None:
        if send_batch < 1 or filters_per_subscribe < 1:
            raise ValueError("send_batch and filters_per_subscribe must be at least 1")
        self.host = host
        self.port = port
        self.tracker = tracker if tracker is not None else CommandTracker()
        self.publish_refused = 0
        self.retained_skipped = 0
        self._settings = SessionSettings(
            client_id=client_id or f"iotix-commander-{uuid.uuid4().hex[:12]}",
            version=version,
            username=username,
            password=None if password is None else password.encode(),
            max_inflight=max_inflight,
        )
        self._connect_timeout_s = connect_timeout_s
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._websocket_path = websocket_path
        self._send_batch = send_batch
        self._filters_per_subscribe = filters_per_subscribe
        self._connection: MQTTConnection | None = None
        self._subscribed: set[str] = set()
        self._subscribing = asyncio.Lock()
        # Reply topic -> the (device, command) answering on it, for replies whose
        # payload does not say (a model's own payload).
        self._topic_keys: dict[str, tuple[str, str]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at_s = 0.0
        self._settled = asyncio.Event()
        self._settled.set()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect; reply topics are subscribed to as commands go out."""
        if self._connection is not None:
            raise RuntimeError("the commander is already started")
        self._connection = await open_connection(
            self.host,
            self.port,
            self._settings,
            on_event=self._on_event,
            timeout_s=self._connect_timeout_s,
            ssl_context=self._ssl_context,
            server_hostname=self._server_hostname,
            websocket_path=self._websocket_path,
        )

    async def stop(self) -> dict[str, Any]:
        """Disconnect; returns :meth:`stats` as of now, plus ``reply_latency_hist``
        (:meth:`Histogram.to_dict`). Commands whose deadline passed count as timed out;
        those still within it stay ``pending``."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.tracker.expire(asyncio.get_running_loop().time())
        self._settled.set()  # nothing can answer any more: release drain()
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            await connection.disconnect()
        summary = self.stats()
        summary["reply_latency_hist"] = self.tracker.reply_latency.to_dict()
        return summary

    async def __aenter__(self) -> Commander:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- verbs -------------------------------------------------------------------------

    async def send(
        self,
        targets: Sequence[CommandTarget],
        command: str,
        payload: Mapping[str, Any],
        *,
        timeout_s: float,
    ) -> None:
        """Publish ``command`` with ``payload`` as its JSON body to every target, at QoS 1.

        Reply topics not subscribed yet are subscribed to first (the broker confirms
        before any command goes out, so no reply is missed). Targets go out
        :data:`SEND_BATCH` at a time, yielding to the loop in between. A command not
        answered within ``timeout_s`` counts as timed out. Returns once every command
        is handed to the connection, not when the replies are in (see :meth:`drain`).
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self._live_connection()
        body = orjson.dumps(dict(payload))
        loop = asyncio.get_running_loop()
        tracker = self.tracker
        topic_keys = self._topic_keys
        for start in range(0, len(targets), self._send_batch):
            batch = targets[start : start + self._send_batch]
            await self._subscribe_replies(batch)
            connection = self._live_connection()  # it may have closed meanwhile
            sent_s = loop.time()
            for target in batch:
                connection.publish(target.topic, body, qos=1)
                reply_topic = target.reply_topic
                if reply_topic is None:
                    tracker.record_sent_without_reply()
                    continue
                tracker.record_sent(target.device_id, command, sent_s, timeout_s)
                key = (target.device_id, command)
                known = topic_keys.setdefault(reply_topic, key)
                if known != key:
                    topic_keys[reply_topic] = _AMBIGUOUS
            if tracker.pending:
                self._settled.clear()
                self._arm_timer()
            await asyncio.sleep(0)

    async def drain(self) -> None:
        """Wait until no command is pending: each one answered or timed out. Bounded
        by the longest timeout of the commands sent."""
        await self._settled.wait()

    def stats(self) -> dict[str, Any]:
        """The tracker's :meth:`~CommandTracker.summary` so far, plus ``publish_refused``
        (commands the broker refused in its PUBACK, MQTT 5) and ``retained_skipped``."""
        summary = self.tracker.summary()
        summary["publish_refused"] = self.publish_refused
        summary["retained_skipped"] = self.retained_skipped
        return summary

    # -- internals ---------------------------------------------------------------------

    def _live_connection(self) -> MQTTConnection:
        connection = self._connection
        if connection is None:
            raise CommanderError("the commander is not started")
        if connection.closed:
            raise CommanderError(f"the commander lost its broker {self.host}:{self.port}")
        return connection

    async def _subscribe_replies(self, targets: Sequence[CommandTarget]) -> None:
        """Subscribe to the targets' reply topics not subscribed yet, and wait for the
        broker to confirm. Serialised, so a concurrent send never publishes before a
        subscription it relies on is in place."""
        async with self._subscribing:
            subscribed = self._subscribed
            topics = list(
                dict.fromkeys(
                    t.reply_topic
                    for t in targets
                    if t.reply_topic is not None and t.reply_topic not in subscribed
                )
            )
            size = self._filters_per_subscribe
            chunks = [topics[i : i + size] for i in range(0, len(topics), size)]
            for first in range(0, len(chunks), SUBSCRIBES_IN_FLIGHT):
                window = chunks[first : first + SUBSCRIBES_IN_FLIGHT]
                connection = self._live_connection()
                acks = await asyncio.gather(
                    *(
                        connection.subscribe([Subscription(topic, qos=1) for topic in chunk])
                        for chunk in window
                    )
                )
                for chunk, ack in zip(window, acks, strict=True):
                    # SUBACK codes of 0x80 and above refuse a filter [MQTT-3.9.3].
                    refused = [
                        (topic, code)
                        for topic, code in zip(chunk, ack.reason_codes, strict=False)
                        if code >= 0x80
                    ]
                    if refused:
                        raise ReplySubscriptionError(
                            [topic for topic, _ in refused], [code for _, code in refused]
                        )
                    subscribed.update(chunk)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, MessageReceivedEvent):
            if event.retain:
                self.retained_skipped += 1
                return
            self._on_reply(event.topic, event.payload)
        elif isinstance(event, PublishAckedEvent) and event.reason_code >= 0x80:
            self.publish_refused += 1

    def _on_reply(self, topic: str, payload: bytes) -> None:
        tracker = self.tracker
        device_id, command, status = parse_reply(payload)
        if device_id is None or command is None:
            key = self._topic_keys.get(topic)
            if key is None or key is _AMBIGUOUS:
                tracker.note_unparseable()
                return
            device_id, command = key
        tracker.record_reply(device_id, command, status, asyncio.get_running_loop().time())
        if not tracker.pending:
            self._settled.set()

    def _arm_timer(self) -> None:
        """Have the loop wake at the next deadline (earlier timers are kept: they fire,
        find nothing or less to expire, and arm the next one)."""
        deadline_s = self.tracker.next_deadline_s()
        if deadline_s is None:
            return
        if self._timer is not None:
            if self._timer_at_s <= deadline_s:
                return
            self._timer.cancel()
        self._timer_at_s = deadline_s
        self._timer = asyncio.get_running_loop().call_at(deadline_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        tracker = self.tracker
        tracker.expire(asyncio.get_running_loop().time())
        if tracker.pending:
            self._arm_timer()
        else:
            self._settled.set()
