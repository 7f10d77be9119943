"""The Kafka probe: a consumer that counts what a Kafka fleet's records went through.

The MQTT :class:`~iotix.engine.probe.Probe` subscribes to the devices' topics; this one
reads the topics a :class:`~iotix.adapters.kafka.KafkaAdapter` fleet produces to, and
feeds every record to the same :class:`~iotix.engine.probe.DeliveryTracker`, so loss,
duplicates, reordering and end-to-end latency are counted alike for both protocols.

What a record tells the tracker (:func:`record_identity`, :func:`record_stream`):

- device id, seq and send time from the JSON payload's ``device_id``, ``seq`` and
  ``ts_ms`` (the default payload's, read by
  :func:`~iotix.engine.probe.parse_json_payload`): ``ts_ms`` is the *intended* send
  time, so latency includes schedule lag, as for MQTT;
- for a payload that is not such JSON (a binary codec), the record's key (the device
  id), and its ``iotix-seq`` and ``iotix-ts-ms`` headers; a record with neither is
  counted ``unparseable``;
- the stream (what seqs count within) is the ``iotix-name`` header, the message's name,
  else the topic's last dot-separated level (``...thermo-00001.telemetry`` ->
  ``telemetry``).

Which records: those of ``topics``, or of every topic whose whole name matches
``pattern`` (every non-internal topic by default), written after :meth:`KafkaProbe.start`
returned. Topics that appear later (Kafka creates them when the first device sends) are
found every ``refresh_s`` and read from their first record, so start the probe before
the devices and nothing is missed. With ``from_beginning`` the records already there
count too.

The probe assigns itself every partition (no consumer group, nothing committed), and
keeps its own position per partition: aiokafka would reset every position when the
assignment grows, and read old records again. :meth:`KafkaProbe.catch_up` waits until
it has read everything written so far; :meth:`KafkaProbe.stop` does that (for at most
``catch_up_s``), then finishes the tracker and returns its summary.

`iotix run --probe` and scenarios run one beside MQTT probes, on the same tracker
(:class:`~iotix.engine.fleet.ProbeThread`), reading the topics the fleets' models
produce to (:func:`fleet_topic_pattern`).

A broker that loses its storage while the probe runs (Tansu with memory storage,
restarted) restarts its offsets at 0; the probe then reads the partitions from their
new start, but seqs sent while it was down are lost, and counted so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
import zlib
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]

from iotix.adapters.kafka import kafka_topic, kafka_topic_pattern
from iotix.engine.probe import (
    SAMPLE_BUCKETS,
    DeliveryTracker,
    ProbeStartError,
    parse_json_payload,
    sample_buckets,
)
from iotix.model.runtime import DEFAULT_EVENT_TOPIC, DEFAULT_TOPIC

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from types import TracebackType

    from iotix.model.spec import DeviceModelSpec

__all__ = [
    "KafkaProbe",
    "KafkaProbeError",
    "fleet_topic_pattern",
    "record_identity",
    "record_stream",
]

logger = logging.getLogger(__name__)

NAME_HEADER = "iotix-name"
SEQ_HEADER = "iotix-seq"
TS_HEADER = "iotix-ts-ms"

_FETCH_WAIT_MS = 100
"""How long one fetch round waits for records: the probe's reaction time to a stop."""


class KafkaProbeError(ProbeStartError):
    """The probe could not reach the Kafka cluster at ``bootstrap_servers``."""

    def __init__(self, message: str, *, bootstrap_servers: str) -> None:
        super().__init__(message)
        self.bootstrap_servers = bootstrap_servers


# ---------------------------------------------------------------------------------------
# What a record says (pure)
# ---------------------------------------------------------------------------------------


def _header_int(headers: Mapping[str, bytes], name: str) -> int | None:
    value = headers.get(name)
    if value is None or not value.isdigit():
        return None
    return int(value)


def record_identity(
    key: bytes | None, value: bytes | None, headers: Mapping[str, bytes]
) -> tuple[str, int, int] | None:
    """``(device_id, seq, ts_ms)`` of a record, or None (see the module docstring):
    from the JSON payload, else from the key and the ``iotix-seq`` and ``iotix-ts-ms``
    headers."""
    if value:
        parsed = parse_json_payload(value)
        if parsed is not None:
            return parsed
    if not key:
        return None
    seq = _header_int(headers, SEQ_HEADER)
    ts_ms = _header_int(headers, TS_HEADER)
    if seq is None or ts_ms is None:
        return None
    try:
        device_id = key.decode()
    except UnicodeDecodeError:
        return None
    return device_id, seq, ts_ms


def record_stream(topic: str, headers: Mapping[str, bytes]) -> str:
    """The stream a record's seq counts in: its ``iotix-name`` header, else the topic's
    last dot-separated level."""
    name = headers.get(NAME_HEADER)
    if name:
        with contextlib.suppress(UnicodeDecodeError):
            return name.decode()
    return topic.rpartition(".")[2]


def fleet_topic_pattern(spec: DeviceModelSpec, topic_template: str | None = None) -> str:
    """The regex of every topic a Kafka fleet of ``spec`` devices produces to: its
    messages' and events' topics (the model's templates, or the adapter's ``topic``
    option, ``topic_template``) made legal as :func:`~iotix.adapters.kafka.kafka_topic`
    does. Placeholders that vary per device (``{device_id}``, attributes) match any
    legal text, so the pattern may take in a few topics the fleet does not use, but
    never misses one it does (see :func:`~iotix.adapters.kafka.kafka_topic_pattern`)."""
    model = re.escape(kafka_topic(spec.name))
    outlets = [(name, message.topic or DEFAULT_TOPIC) for name, message in spec.messages.items()]
    outlets += [(name, event.topic or DEFAULT_EVENT_TOPIC) for name, event in spec.events.items()]
    topics = set()
    for name, template in outlets:
        escaped = re.escape(kafka_topic(name))
        topics.add(
            kafka_topic_pattern(template, {"message": escaped, "event": escaped, "model": model})
        )
    any_topic = "|".join(f"(?:{topic})" for topic in sorted(topics))
    if topic_template is None:
        return any_topic
    names = "|".join(sorted({re.escape(kafka_topic(name)) for name, _ in outlets}))
    return kafka_topic_pattern(topic_template, {"topic": any_topic, "message": names})


# ---------------------------------------------------------------------------------------
# The async shell
# ---------------------------------------------------------------------------------------


class KafkaProbe:
    """A consumer on a real Kafka cluster that feeds every record to a tracker.

    ``async with KafkaProbe("127.0.0.1:9092", pattern=r"buildings\\..*") as probe:``
    starts reading (see the module docstring); leaving the block catches up, stops and
    finishes the tracker. Records of devices outside the ``sample`` (see
    :func:`~iotix.engine.probe.in_sample`) are counted in ``skipped``; ``records``
    counts every record read; ``errors`` counts, by exception name, what went wrong
    while reading (a broker that went away), which the probe outlives. The receive time
    is ``wall_clock()``, epoch seconds. ``stream_prefix`` goes before every stream's
    name: a tracker shared with an MQTT probe keeps the Kafka fleets' streams apart from
    those of MQTT fleets whose devices have the same ids (two fleets of one model).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topics: Sequence[str] = (),
        pattern: str | None = None,
        sample: float = 1.0,
        tracker: DeliveryTracker | None = None,
        wall_clock: Callable[[], float] = time.time,
        from_beginning: bool = False,
        refresh_s: float = 0.5,
        request_timeout_s: float = 10.0,
        client_id: str | None = None,
        stream_prefix: str = "",
    ) -> None:
        if topics and pattern is not None:
            raise ValueError("a Kafka probe reads topics or a pattern, not both")
        self.bootstrap_servers = bootstrap_servers
        self.topics = tuple(topics)
        self.pattern = pattern
        self._match = re.compile(pattern).fullmatch if pattern is not None else None
        self.sample = sample
        self._sample_buckets = sample_buckets(sample)
        self.tracker = tracker if tracker is not None else DeliveryTracker()
        self.from_beginning = from_beginning
        self.refresh_s = refresh_s
        self.stream_prefix = stream_prefix
        self.records = 0
        self.skipped = 0
        self.errors: dict[str, int] = {}
        self._wall_clock = wall_clock
        self._request_timeout_ms = round(request_timeout_s * 1000)
        self._client_id = client_id or f"iotix-probe-{uuid.uuid4().hex[:12]}"
        self._consumer: Any = None
        self._admin: Any = None
        self._task: asyncio.Task[None] | None = None
        # The next offset to read, per partition: the probe's own positions.
        self._positions: dict[Any, int] = {}
        self._assigned: frozenset[Any] = frozenset()
        self._round_done = asyncio.Event()
        self._discover_at = 0.0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, and note where each partition that exists now ends: records from
        there on count. Raises :class:`KafkaProbeError` if the cluster is unreachable."""
        if self._task is not None:
            raise RuntimeError("the probe is already started")
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self._client_id,
            group_id=None,
            enable_auto_commit=False,
            # Only when a position is out of range (a broker that lost its log).
            auto_offset_reset="earliest",
            request_timeout_ms=self._request_timeout_ms,
            fetch_max_wait_ms=_FETCH_WAIT_MS,
        )
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self._client_id,
            request_timeout_ms=self._request_timeout_ms,
        )
        try:
            await consumer.start()
            await admin.start()
            self._consumer, self._admin = consumer, admin
            partitions = await self._matching_partitions()
            if partitions:
                self._assign(partitions)
                if not self.from_beginning:
                    ends = await consumer.end_offsets(list(partitions))
                    for partition, end in ends.items():
                        self._positions[partition] = end
                        consumer.seek(partition, end)
        except (kafka_errors.KafkaError, OSError) as exc:
            await self._close_clients(consumer, admin)
            raise KafkaProbeError(
                f"the Kafka probe could not read from {self.bootstrap_servers}: {exc}",
                bootstrap_servers=self.bootstrap_servers,
            ) from exc
        self._discover_at = time.monotonic() + self.refresh_s
        self._task = asyncio.create_task(self._consume(), name="kafka-probe")

    @property
    def started(self) -> bool:
        """Whether the probe is reading (started, and not stopped yet)."""
        return self._task is not None

    async def catch_up(self, timeout_s: float = 10.0) -> bool:
        """Wait until every record written to the probe's topics so far has been read
        (topics created meanwhile included); False if that took over ``timeout_s``."""
        if self._task is None or self._consumer is None:
            raise RuntimeError("the probe is not started")
        self._discover_at = 0.0  # find new topics in the next round, not in refresh_s
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    if self._task.done():
                        self._task.result()  # the reading task failed: say why
                    try:
                        if await self._caught_up():
                            return True
                    except (kafka_errors.KafkaError, OSError) as exc:
                        self._count_error(exc)
                    await self._next_round()
        except TimeoutError:
            return False

    async def stop(self, catch_up_s: float = 10.0) -> dict[str, Any]:
        """Read what was written before this call (for at most ``catch_up_s``), stop,
        and finish the tracker; returns its final summary."""
        task = self._task
        if task is not None:
            try:
                if catch_up_s > 0 and not task.done():
                    await self.catch_up(catch_up_s)
            finally:
                self._task = None
                task.cancel()
                try:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task  # raises what made the reading task fail, if anything
                finally:
                    consumer, admin, self._consumer, self._admin = (
                        self._consumer,
                        self._admin,
                        None,
                        None,
                    )
                    await self._close_clients(consumer, admin)
        return self.tracker.finish()

    async def __aenter__(self) -> KafkaProbe:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- the reading task ------------------------------------------------------------

    async def _consume(self) -> None:
        consumer = self._consumer
        while True:
            if time.monotonic() >= self._discover_at:
                self._discover_at = time.monotonic() + self.refresh_s
                try:
                    partitions = await self._matching_partitions()
                except (kafka_errors.KafkaError, OSError) as exc:
                    self._count_error(exc)
                else:
                    if not partitions <= self._assigned:
                        self._assign(self._assigned | partitions)
            if self._assigned:
                try:
                    batches = await consumer.getmany(timeout_ms=_FETCH_WAIT_MS)
                except kafka_errors.KafkaError as exc:
                    self._count_error(exc)
                    batches = {}
                received_epoch_s = self._wall_clock()
                for records in batches.values():
                    self._observe(records, received_epoch_s)
            else:
                await asyncio.sleep(self.refresh_s)
            self._round_done.set()

    def _observe(self, records: Iterable[Any], received_epoch_s: float) -> None:
        tracker = self.tracker
        for record in records:
            self._positions[TopicPartition(record.topic, record.partition)] = record.offset + 1
            self.records += 1
            if tracker.finished:
                continue  # a record after the end would make the tracker raise
            headers = {name: bytes(value) for name, value in record.headers}
            identity = record_identity(record.key, record.value, headers)
            if identity is None:
                tracker.note_unparseable()
                continue
            device_id, seq, ts_ms = identity
            if (
                self._sample_buckets < SAMPLE_BUCKETS
                and zlib.crc32(device_id.encode()) % SAMPLE_BUCKETS >= self._sample_buckets
            ):
                self.skipped += 1
                continue
            stream = self.stream_prefix + record_stream(record.topic, headers)
            tracker.observe(device_id, stream, seq, ts_ms, received_epoch_s)

    def _assign(self, partitions: frozenset[Any]) -> None:
        """Read ``partitions`` from the probe's own positions: assigning resets every
        position in aiokafka, so each is set again (new partitions from their start)."""
        consumer = self._consumer
        consumer.assign(list(partitions))
        for partition in partitions:
            consumer.seek(partition, self._positions.setdefault(partition, 0))
        self._assigned = partitions

    async def _matching_partitions(self) -> frozenset[Any]:
        """The partitions of the probe's topics, as the cluster has them now."""
        names = [
            name
            for name in await self._admin.list_topics()
            if not name.startswith("__")
            and (name in self.topics if self.topics else self._match is None or self._match(name))
        ]
        if not names:
            return frozenset()
        return frozenset(
            TopicPartition(topic["topic"], partition["partition"])
            for topic in await self._admin.describe_topics(names)
            if topic["error_code"] == 0
            for partition in topic["partitions"]
        )

    async def _caught_up(self) -> bool:
        partitions = await self._matching_partitions()
        if not partitions <= self._assigned:
            return False  # the reading task has yet to pick up new topics
        ends = await self._consumer.end_offsets(list(partitions))
        return all(self._positions.get(partition, 0) >= end for partition, end in ends.items())

    async def _next_round(self) -> None:
        self._round_done.clear()
        await self._round_done.wait()

    def _count_error(self, exc: BaseException) -> None:
        kind = type(exc).__name__
        if kind not in self.errors:
            logger.warning("the Kafka probe could not read: %s", exc)
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @staticmethod
    async def _close_clients(consumer: Any, admin: Any) -> None:
        if consumer is not None:
            await consumer.stop()
        if admin is not None:
            await admin.close()
