"""The probe: a subscriber that counts what the devices' messages really went through.

DESIGN.md, "Measurement must be true": a probe subscriber receives (a sample of) the
devices' messages, each carrying its intended send timestamp (``ts_ms``) and a sequence
number (``seq``, per device and message type, from 0), so loss, duplicates and
reordering are counted, not guessed.

- :class:`DeliveryTracker` is the pure core (STYLE.md §1): fed one observation per
  message, it keeps per stream (device, message type) the highest ``seq`` seen and a
  bitmap window of the seqs that arrived, and counts received, duplicate, reordered and
  lost messages and the end-to-end latency. It reads no clock: the receive time is
  passed in.
- :func:`parse_json_payload` pulls ``device_id``, ``seq`` and ``ts_ms`` out of the
  default JSON telemetry payload (:mod:`iotix.model.runtime`).
- :func:`in_sample` decides, deterministically, which devices a sampling probe follows.
- :class:`SchemaTally` counts what a conformance check (such as
  :class:`iotix.model.conformance.Conformance`) said of the tracked messages.
- :class:`Probe` is the thin async shell: one iotix MQTT connection, one subscription,
  every received message fed to the tracker with the time of an injected wall clock,
  and, given a ``conformance`` check, checked against the device models.

What "expected" means: a stream's seqs start at 0, so a stream whose highest seq is
``h`` has sent at least ``h + 1`` messages. Seqs the probe never saw (including those
sent before it subscribed, and the last ones of a stream if they were all lost) are
beyond what it can tell: start the probe before the devices, and read ``expected`` as
"sent, as far as the probe can tell".
"""

from __future__ import annotations

import logging
import math
import time
import uuid
import zlib
from typing import TYPE_CHECKING, Any

import orjson

from iotix.adapters.mqtt import open_connection
from iotix.errors import IotixError
from iotix.metrics import Histogram
from iotix.protocols.mqtt.packets import ProtocolVersion, Subscription
from iotix.protocols.mqtt.session import MessageReceivedEvent, SessionSettings

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable
    from types import TracebackType

    from iotix.adapters.mqtt import MQTTConnection
    from iotix.protocols.mqtt.session import Event

__all__ = [
    "DEFAULT_WINDOW_SEQS",
    "SAMPLE_BUCKETS",
    "SCHEMA_ERROR_EXAMPLES",
    "DeliveryTracker",
    "Probe",
    "SchemaTally",
    "in_sample",
    "parse_json_payload",
    "sample_buckets",
    "topic_stream",
]

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_SEQS = 1024
"""Seqs per stream whose arrival is remembered exactly (a 128-byte bitmap)."""

SAMPLE_BUCKETS = 10_000
"""Devices hash into this many buckets; a sample of ``f`` keeps the first ``f * 10_000``."""

SCHEMA_ERROR_EXAMPLES = 5
"""Distinct conformance problems a :class:`SchemaTally` keeps as examples."""


# ---------------------------------------------------------------------------------------
# The pure core
# ---------------------------------------------------------------------------------------


class ProbeStartError(IotixError):
    """A probe could not start reading where the devices send (the Kafka probe's
    cluster unreachable, say): the run cannot measure delivery, so it does not begin."""


class _StreamWindow:
    """What one stream (device, message type) has delivered so far.

    The window holds the last ``window_seqs`` seqs up to ``highest_seq``: seq ``s`` lives
    in bit ``s % window_seqs`` of ``bits`` (a ring), set once it arrived. When the
    highest seq moves on, a new seq takes over the slot of the seq ``window_seqs``
    below it, which leaves the window: counted in ``evicted_missing`` if it never
    arrived. Memory is therefore fixed per stream, whatever the number of messages.
    """

    __slots__ = ("bits", "evicted_missing", "highest_seq", "in_window")

    def __init__(self, window_seqs: int) -> None:
        self.bits = bytearray((window_seqs + 7) // 8)
        self.highest_seq = -1
        # Seqs of the window that arrived (the bitmap's population count).
        self.in_window = 0
        # Seqs that left the window without arriving, less late arrivals from below it.
        self.evicted_missing = 0


def _count_set_bits(bits: bytearray, start_slot: int, length: int, window_seqs: int) -> int:
    """Set bits among ``length`` consecutive slots of the ring from ``start_slot``."""
    value = int.from_bytes(bits, "little")
    end_slot = start_slot + length
    if end_slot <= window_seqs:
        return ((value >> start_slot) & ((1 << length) - 1)).bit_count()
    head = (value >> start_slot) & ((1 << (window_seqs - start_slot)) - 1)
    tail = value & ((1 << (end_slot - window_seqs)) - 1)
    return head.bit_count() + tail.bit_count()


class DeliveryTracker:
    """Counts delivery per stream from (device, stream, seq, sent, received) observations.

    Pure: nothing here reads a clock or does I/O. Per stream it keeps a
    :class:`_StreamWindow`; what each arrival of seq ``s`` counts as, with ``h`` the
    stream's highest seq so far and ``W`` the window (``window_seqs``):

    ============================  ============================================
    arrival                       counted as
    ============================  ============================================
    ``s > h``                     received; seqs ``h+1 .. s-1`` become gaps
    ``h - W < s <= h``, new       received, reordered (it fills a gap)
    ``h - W < s <= h``, seen      duplicate (latency not recorded)
    ``s <= h - W``                received, reordered and ``below_window``: it
                                  fills one of the stream's evicted gaps
    ============================  ============================================

    - ``received`` counts every arrival, duplicates included; ``unique`` those that
      are not duplicates.
    - ``expected`` is the sum over streams of highest seq + 1 (see the module doc).
    - ``lost`` is computed, not kept: gaps never filled. :meth:`lost_so_far` leaves
      the last ``grace_seqs`` seqs of each stream a chance to arrive; after
      :meth:`finish`, every gap is lost. At the end, ``unique + lost == expected``.
    - ``e2e_latency`` records received - sent (seconds) for every arrival that is not
      a duplicate. ``sent`` is the message's *intended* send time, so schedule lag is
      included (coordinated omission). A negative difference (the sender's clock ahead
      of the probe's) is recorded as 0 and counted in ``clock_skew``;
      ``max_clock_skew_s`` is the largest such difference.

    Memory bound: per stream, a bitmap of ``ceil(window_seqs / 8)`` bytes (128 with
    the default window of 1024) plus about 250 bytes of fixed overhead (the window
    object, its small ints and its dict entry keyed by (device id, stream)), whatever
    the number of messages. Exactness: duplicates and reordering are exact within the
    window. An arrival from below it cannot be told from a duplicate of a seq that did
    arrive; it is taken as a late first arrival (``below_window`` says how many), so a
    duplicate that late would count as received and hide one lost message.
    """

    __slots__ = (
        "_streams",
        "_window_seqs",
        "below_window",
        "clock_skew",
        "duplicates",
        "e2e_latency",
        "expected",
        "finished",
        "max_clock_skew_s",
        "received",
        "reordered",
        "schema",
        "unparseable",
    )

    def __init__(self, *, window_seqs: int = DEFAULT_WINDOW_SEQS) -> None:
        if window_seqs < 1:
            raise ValueError(f"window_seqs must be at least 1, got {window_seqs}")
        self._window_seqs = window_seqs
        self._streams: dict[tuple[str, str], _StreamWindow] = {}
        self.received = 0
        self.duplicates = 0
        self.reordered = 0
        self.below_window = 0
        self.expected = 0
        self.clock_skew = 0
        self.max_clock_skew_s = 0.0
        self.unparseable = 0
        self.finished = False
        self.e2e_latency = Histogram()
        #: The conformance counts of the tracked messages, when they are checked (a
        #: probe with a ``conformance`` sets it); they join the summary then.
        self.schema: SchemaTally | None = None

    @property
    def window_seqs(self) -> int:
        """Seqs per stream remembered exactly."""
        return self._window_seqs

    @property
    def stream_count(self) -> int:
        """Streams (device, message type) seen so far."""
        return len(self._streams)

    @property
    def unique(self) -> int:
        """Arrivals that were not duplicates."""
        return self.received - self.duplicates

    # -- recording ---------------------------------------------------------------------

    def observe(
        self,
        device_id: str,
        stream: str,
        seq: int,
        sent_epoch_ms: int,
        received_epoch_s: float,
    ) -> None:
        """Count one message of ``device_id``'s ``stream``. The hot path: keep it lean."""
        if seq < 0:
            raise ValueError(f"seq must not be negative, got {seq}")
        if self.finished:
            raise RuntimeError("the tracker is finished: no message can arrive any more")
        key = (device_id, stream)
        state = self._streams.get(key)
        if state is None:
            state = self._streams[key] = _StreamWindow(self._window_seqs)
        window_seqs = self._window_seqs
        highest_seq = state.highest_seq
        self.received += 1
        if seq == highest_seq + 1:
            # The common case, in order: seq takes over the slot of seq - W.
            self.expected += 1
            state.highest_seq = seq
            slot = seq % window_seqs
            mask = 1 << (slot & 7)
            bits = state.bits
            if seq < window_seqs or not bits[slot >> 3] & mask:
                if seq >= window_seqs:
                    state.evicted_missing += 1  # seq - W leaves without having arrived
                bits[slot >> 3] |= mask
                state.in_window += 1
            # else: seq - W had arrived and leaves, seq arrives: the bit stays set.
        elif seq > highest_seq:
            self.expected += seq - highest_seq
            self._advance(state, seq)
            slot = seq % window_seqs
            state.bits[slot >> 3] |= 1 << (slot & 7)
            state.in_window += 1
        elif seq > highest_seq - window_seqs:
            slot = seq % window_seqs
            mask = 1 << (slot & 7)
            if state.bits[slot >> 3] & mask:
                self.duplicates += 1
                return
            state.bits[slot >> 3] |= mask
            state.in_window += 1
            self.reordered += 1
        else:
            self.reordered += 1
            self.below_window += 1
            if state.evicted_missing > 0:
                state.evicted_missing -= 1
        latency_s = received_epoch_s - sent_epoch_ms / 1000.0
        if latency_s < 0.0:
            self.clock_skew += 1
            self.max_clock_skew_s = max(self.max_clock_skew_s, -latency_s)
            latency_s = 0.0
        self.e2e_latency.record(latency_s)

    def _advance(self, state: _StreamWindow, new_highest_seq: int) -> None:
        """Move the stream's window up to ``new_highest_seq``, evicting the oldest seqs."""
        window_seqs = self._window_seqs
        highest_seq = state.highest_seq
        bits = state.bits
        if new_highest_seq - highest_seq >= window_seqs:
            # A jump of a whole window: every seq in it leaves, and so do the skipped
            # seqs below the new window (highest+1 .. new-W), none of which arrived.
            state.evicted_missing += min(highest_seq + 1, window_seqs) - state.in_window
            state.evicted_missing += new_highest_seq - window_seqs - highest_seq
            bits[:] = bytes(len(bits))
            state.in_window = 0
        else:
            for seq in range(highest_seq + 1, new_highest_seq + 1):
                if seq < window_seqs:
                    continue  # a slot never used yet: already clear
                # The slot of seq held seq - W, which leaves the window now.
                slot = seq % window_seqs
                mask = 1 << (slot & 7)
                if bits[slot >> 3] & mask:
                    bits[slot >> 3] ^= mask
                    state.in_window -= 1
                else:
                    state.evicted_missing += 1
        state.highest_seq = new_highest_seq

    def note_unparseable(self) -> None:
        """Count a message the probe could not read a device id, seq or timestamp from."""
        self.unparseable += 1

    # -- reading -----------------------------------------------------------------------

    def lost_so_far(self, grace_seqs: int) -> int:
        """Gaps counted as lost now, giving the last ``grace_seqs`` seqs of each stream
        a chance to arrive late.

        A missing seq ``s`` of a stream counts when ``s <= highest - grace_seqs``; gaps
        that left the window always count. ``grace_seqs`` 0 counts every gap (what
        :meth:`finish` reports); a grace of ``window_seqs`` or more counts only the
        gaps evicted from the windows. Costs O(streams * window_seqs / 64) with a
        grace, O(streams) without.
        """
        if grace_seqs < 0:
            raise ValueError(f"grace_seqs must not be negative, got {grace_seqs}")
        window_seqs = self._window_seqs
        lost = 0
        for state in self._streams.values():
            lost += state.evicted_missing
            lowest_seq = max(state.highest_seq - window_seqs + 1, 0)
            if grace_seqs == 0:
                lost += state.highest_seq - lowest_seq + 1 - state.in_window
                continue
            counted = state.highest_seq - grace_seqs - lowest_seq + 1
            if counted <= 0:
                continue
            arrived = _count_set_bits(state.bits, lowest_seq % window_seqs, counted, window_seqs)
            lost += counted - arrived
        return lost

    def finish(self) -> dict[str, Any]:
        """End of the run: no message can arrive any more, so every gap is lost.

        Returns the final :meth:`summary`; observing after this is an error.
        """
        self.finished = True
        return self.summary()

    def summary(self, *, grace_seqs: int = 0) -> dict[str, Any]:
        """The counts, ``delivery_ratio`` and the latency summary, as a plain dict.

        ``lost`` is :meth:`lost_so_far` with ``grace_seqs`` (every gap by default).
        ``delivery_ratio`` is (expected - lost) / expected, ``nan`` when nothing was
        expected. ``e2e_latency`` is :meth:`Histogram.summary` (seconds). With a
        :attr:`schema` tally, its :meth:`SchemaTally.summary` keys join in.
        """
        lost = self.lost_so_far(grace_seqs)
        expected = self.expected
        schema = {} if self.schema is None else self.schema.summary()
        return {
            "streams": len(self._streams),
            "received": self.received,
            "unique": self.unique,
            "expected": expected,
            "lost": lost,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "below_window": self.below_window,
            "unparseable": self.unparseable,
            "clock_skew": self.clock_skew,
            "max_clock_skew_s": self.max_clock_skew_s,
            "delivery_ratio": (expected - lost) / expected if expected else math.nan,
            "finished": self.finished,
            "e2e_latency": self.e2e_latency.summary(),
            **schema,
        }


class SchemaTally:
    """How many tracked messages a conformance check looked at, how many it refused,
    and the first :data:`SCHEMA_ERROR_EXAMPLES` distinct problems it gave. Pure."""

    __slots__ = ("checked", "errors", "examples")

    def __init__(self) -> None:
        self.checked = 0
        self.errors = 0
        self.examples: list[str] = []

    def record(self, problem: str | None) -> None:
        """Count one checked message; ``problem`` is None when it conformed."""
        self.checked += 1
        if problem is None:
            return
        self.errors += 1
        examples = self.examples
        if len(examples) < SCHEMA_ERROR_EXAMPLES and problem not in examples:
            examples.append(problem)

    def summary(self) -> dict[str, Any]:
        """``schema_checked``, ``schema_errors`` and ``schema_error_examples``."""
        return {
            "schema_checked": self.checked,
            "schema_errors": self.errors,
            "schema_error_examples": list(self.examples),
        }


def parse_json_payload(payload: bytes) -> tuple[str, int, int] | None:
    """``(device_id, seq, ts_ms)`` from a JSON object payload, or None.

    None when the payload is not JSON, not an object, or lacks a string ``device_id``,
    a non-negative integer ``seq`` or a numeric ``ts_ms`` (a float is rounded to
    milliseconds). Booleans are not numbers here.
    """
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict:
        return None
    device_id = data.get("device_id")
    seq = data.get("seq")
    ts_ms = data.get("ts_ms")
    if type(device_id) is not str or type(seq) is not int or seq < 0:
        return None
    if type(ts_ms) is float:
        if not math.isfinite(ts_ms):
            return None
        ts_ms = round(ts_ms)
    elif type(ts_ms) is not int:
        return None
    return device_id, seq, ts_ms


def sample_buckets(sample: float) -> int:
    """How many of the :data:`SAMPLE_BUCKETS` hash buckets a sample of ``sample`` keeps.

    ``ceil(sample * 10_000)``: bucket ``b`` is kept when ``b < sample * 10_000``, with the
    float noise of the product removed (``0.0003 * 10_000`` is 3.0000000000000004, and
    must keep 3 buckets, not 4).
    """
    if not 0.0 < sample <= 1.0:
        raise ValueError(f"sample must be in (0, 1], got {sample!r}")
    return math.ceil(sample * SAMPLE_BUCKETS - 1e-6)


def in_sample(device_id: str, sample: float) -> bool:
    """Whether a probe sampling the fraction ``sample`` of devices follows this one:
    ``zlib.crc32(device_id) % 10_000 < sample * 10_000`` (see :func:`sample_buckets`).

    Deterministic across processes and machines (CRC-32 of the UTF-8 id, not
    ``hash()``), so every probe of a run follows the same devices, and a larger sample
    contains a smaller one.
    """
    return zlib.crc32(device_id.encode()) % SAMPLE_BUCKETS < sample_buckets(sample)


def topic_stream(topic: str) -> str:
    """The stream of a message: its topic's last level (``.../telemetry`` -> ``telemetry``)."""
    return topic.rpartition("/")[2]


# ---------------------------------------------------------------------------------------
# The async shell
# ---------------------------------------------------------------------------------------


class Probe:
    """A subscriber on a real broker that feeds every message it receives to a tracker.

    ``async with Probe(host, port) as probe:`` connects and subscribes to
    ``topic_filter`` at QoS 1; leaving the block disconnects and finishes the tracker.
    Messages of devices outside the ``sample`` (see :func:`in_sample`) are counted in
    ``skipped`` and not tracked; sampling happens here, after the broker has delivered
    them, so subscribe to a narrower filter to spare the probe's connection. Retained
    messages (old ones the broker replays on subscribing) are counted in
    ``retained_skipped``, not tracked. The receive time is ``wall_clock()``, epoch
    seconds; the stream is ``stream_of(topic)``, the topic's last level by default.

    With ``conformance`` (a callable of topic and payload giving None or a problem, such
    as :class:`iotix.model.conformance.Conformance`), every tracked message is also
    checked, and the summary gains ``schema_checked``, ``schema_errors`` and
    ``schema_error_examples`` (:class:`SchemaTally`, kept on the tracker so that probes
    sharing one tracker share the counts too).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        topic_filter: str = "#",
        sample: float = 1.0,
        tracker: DeliveryTracker | None = None,
        wall_clock: Callable[[], float] = time.time,
        stream_of: Callable[[str], str] = topic_stream,
        client_id: str | None = None,
        version: ProtocolVersion = ProtocolVersion.V311,
        connect_timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        websocket_path: str | None = None,
        conformance: Callable[[str, bytes], str | None] | None = None,
    ) -> None:
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._websocket_path = websocket_path
        self._sample_buckets = sample_buckets(sample)
        self.host = host
        self.port = port
        self.topic_filter = topic_filter
        self.sample = sample
        self.tracker = tracker if tracker is not None else DeliveryTracker()
        self._conformance = conformance
        if conformance is not None and self.tracker.schema is None:
            self.tracker.schema = SchemaTally()
        self.skipped = 0
        self.retained_skipped = 0
        self._wall_clock = wall_clock
        self._stream_of = stream_of
        self._settings = SessionSettings(
            client_id=client_id or f"iotix-probe-{uuid.uuid4().hex[:12]}", version=version
        )
        self._connect_timeout_s = connect_timeout_s
        self._connection: MQTTConnection | None = None

    async def start(self) -> None:
        """Connect and subscribe; messages count from the moment the broker confirms."""
        if self._connection is not None:
            raise RuntimeError("the probe is already started")
        connection = await open_connection(
            self.host,
            self.port,
            self._settings,
            on_event=self._on_event,
            timeout_s=self._connect_timeout_s,
            ssl_context=self._ssl_context,
            server_hostname=self._server_hostname,
            websocket_path=self._websocket_path,
        )
        self._connection = connection
        try:
            await connection.subscribe([Subscription(self.topic_filter, qos=1)])
        except BaseException:
            connection.abort()
            self._connection = None
            raise

    async def stop(self) -> dict[str, Any]:
        """Disconnect and finish the tracker; returns its final summary."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            await connection.disconnect()
        return self.tracker.finish()

    async def __aenter__(self) -> Probe:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def _on_event(self, event: Event) -> None:
        if not isinstance(event, MessageReceivedEvent) or self.tracker.finished:
            return  # a message after the end of the run would make the tracker raise
        if event.retain:
            self.retained_skipped += 1
            return
        parsed = parse_json_payload(event.payload)
        if parsed is None:
            self.tracker.note_unparseable()
            return
        device_id, seq, ts_ms = parsed
        if (
            self._sample_buckets < SAMPLE_BUCKETS
            and zlib.crc32(device_id.encode()) % SAMPLE_BUCKETS >= self._sample_buckets
        ):
            self.skipped += 1
            return
        tracker = self.tracker
        tracker.observe(device_id, self._stream_of(event.topic), seq, ts_ms, self._wall_clock())
        if self._conformance is not None and tracker.schema is not None:
            tracker.schema.record(self._conformance(event.topic, event.payload))
