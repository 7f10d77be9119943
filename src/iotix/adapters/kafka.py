"""Kafka devices: each message a record, produced through one aiokafka producer per
worker process to the endpoint's bootstrap server (``kafka://host:9092``).

A device has no connection of its own: a worker's devices share its producer (what a
fleet of devices behind a gateway or an ingestion service looks like to Kafka). A
device "connects" once the producer has fetched the cluster's metadata; while the
broker is unreachable at start, connecting fails with ``unreachable`` and the engine
retries it with backoff. A broker that goes away later does not disconnect the devices:
their records fail, counted per kind, until it is back.

Each record:

- topic: the message's topic made a legal Kafka topic name (see :func:`kafka_topic`:
  ``/`` becomes ``.``, characters outside ``[A-Za-z0-9._-]`` are dropped), or the
  ``topic`` option's template;
- key: the device id, so a device's records go to one partition, in order (the
  default partitioner hashes keys with murmur2, as the Java client does);
- value: the payload, as the model encodes it;
- headers: ``iotix-ts-ms`` and ``iotix-name`` from the engine, and ``iotix-seq``, the
  message's per-device sequence number, taken from the JSON payload's ``seq`` when the
  engine does not give it (omitted for payloads that are not JSON objects).

Options (``adapter_options`` of a run or a scenario fleet, ``--adapter-option``):

- ``acks``: ``0``, ``1`` (default) or ``all``. With 1 or ``all`` a message of QoS 1 or
  2 waits for the broker's acknowledgement: confirmed with its latency, or failed by
  kind. With 0 nothing is acknowledged: records are fire-and-forget, so run the fleet
  at QoS 0 too (``--qos 0``); a QoS 1 message sent with ``acks=0`` is counted failed,
  as ``not confirmed: kafka acks=0`` (the adapter's :attr:`KafkaAdapter.never_confirms`
  says so to an engine that asks);
- ``topic``: a template over ``{topic}`` (the model's topic, made legal as above),
  ``{message}`` (the message's name: ``telemetry``, an event's name) and
  ``{device_id}``; the result is made legal the same way. ``iotix.{message}`` sends
  every device's telemetry to one topic, ``iotix.telemetry``, rather than one topic per
  device. A template that can make no legal name (no placeholders and nothing legal,
  or text alone over 249 characters) is a configuration error;
- ``linger_ms``: how long the producer waits to fill a batch (default 0: send at
  once; a few milliseconds trade latency for fewer, larger requests);
- ``compression``: ``none`` (default), ``gzip``, ``snappy``, ``lz4`` or ``zstd`` (the
  last three need their Python packages: ``python-snappy``, ``lz4``, ``zstandard``
  or ``cramjam``, as aiokafka says);
- ``max_batch_size_bytes``: the largest batch per partition (default 16384);
- ``client_id``: the producer's client id (default ``iotix``).

Timing: the run's adapter timeout (``--adapter-option timeout=S``, 10 s by default) is
the producer's request timeout: a record not acknowledged within it fails. The
producer retries what Kafka calls retriable itself within that time (``retries`` of
the run does not apply); waiting for a new topic's metadata is bounded by the same
timeout, so a send takes at most about twice the timeout.

Error kinds: ``kafka timeout``, ``kafka unreachable`` (the broker is down or
refuses connections), ``kafka no leader``, ``kafka unknown topic`` (the topic does not
exist and the broker does not create topics, or metadata could not be fetched),
``kafka invalid topic`` (a topic name no rule can make legal), ``kafka too large``,
``kafka not authorized``, and ``kafka <ErrorName>`` for anything else aiokafka raises.

Topics are not created by the adapter: Kafka creates them on first use by default
(``auto.create.topics.enable``) and so does Tansu. Against a cluster that does not,
create them first; the ``topic`` option keeps their number small.
"""

from __future__ import annotations

import asyncio
import logging
import re
import string
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self

import orjson
from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka import codec as kafka_codec
from aiokafka import errors as kafka_errors

from iotix.adapters.base import AdapterError, Delivery

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import TracebackType

    from iotix.adapters.base import AdapterSettings, DeviceIdentity, OutgoingMessage
    from iotix.engine.worker import BrokerEndpoint

__all__ = ["KafkaAdapter", "kafka_error_kind", "kafka_topic", "kafka_topic_pattern"]

_log = logging.getLogger(__name__)

MAX_TOPIC_LENGTH: Final = 249
"""Kafka's limit on a topic name's length."""

ACKS: Final[dict[Any, int | str]] = {0: 0, 1: 1, "all": "all", -1: "all"}
"""The ``acks`` option's values, as aiokafka takes them (``-1`` is ``all``)."""

COMPRESSION: Final[dict[str, Callable[[], bool] | None]] = {
    "none": None,
    "gzip": kafka_codec.has_gzip,
    "snappy": kafka_codec.has_snappy,
    "lz4": kafka_codec.has_lz4,
    "zstd": kafka_codec.has_zstd,
}
"""Compression types, with the check that the library for it is installed."""

SEQ_HEADER: Final = "iotix-seq"
NAME_HEADER: Final = "iotix-name"
ACKS0_ERROR: Final = "not confirmed: kafka acks=0"

_ILLEGAL = re.compile(r"[^A-Za-z0-9._-]")

ANY_LEGAL: Final = "[A-Za-z0-9._-]*"
"""The regex of any run of characters a legal topic name may hold."""

# aiokafka's exceptions by what the engine counts them as. Looked up along the class's
# MRO, so a subclass lands with its parent; anything else is "kafka <ClassName>".
_ERROR_KINDS: Final[dict[type[BaseException], str]] = {
    kafka_errors.KafkaTimeoutError: "kafka timeout",
    kafka_errors.RequestTimedOutError: "kafka timeout",
    kafka_errors.KafkaConnectionError: "kafka unreachable",
    kafka_errors.NodeNotReadyError: "kafka unreachable",
    kafka_errors.NotLeaderForPartitionError: "kafka no leader",
    kafka_errors.LeaderNotAvailableError: "kafka no leader",
    kafka_errors.UnknownTopicOrPartitionError: "kafka unknown topic",
    kafka_errors.InvalidTopicError: "kafka invalid topic",
    kafka_errors.MessageSizeTooLargeError: "kafka too large",
    kafka_errors.RecordListTooLargeError: "kafka too large",
    kafka_errors.TopicAuthorizationFailedError: "kafka not authorized",
    TimeoutError: "kafka timeout",
    OSError: "kafka unreachable",
}


def kafka_topic(topic: str) -> str:
    """A legal Kafka topic name from a model's topic: ``/`` becomes ``.``, every other
    character outside ``[A-Za-z0-9._-]`` is dropped, and dots at either end go (they
    came from a leading or trailing ``/``).

    ``buildings/paris/thermostats/thermo-00001/telemetry`` becomes
    ``buildings.paris.thermostats.thermo-00001.telemetry``. Returns ``""`` when nothing
    legal is left, or the result is ``.``/``..`` or longer than 249 characters (Kafka's
    rules); the adapter counts such a message as ``kafka invalid topic``.
    """
    name = _ILLEGAL.sub("", topic.replace("/", ".")).strip(".")
    if len(name) > MAX_TOPIC_LENGTH:
        return ""
    return name


@dataclass
class _Piece:
    """A literal (its text made legal) or a placeholder (its regex) of a template."""

    text: str
    literal: bool
    dots_before: bool = False
    """The literal's leading dots may have gone (stripped at the name's start)."""
    dots_after: bool = False


def _strip_edge(pieces: list[_Piece], *, leading: bool) -> None:
    """Strip the dots :func:`kafka_topic` removes at one end of the name from the
    literals there: for certain when nothing comes before them, optionally when only
    placeholders that may render empty (or as dots) do."""
    behind_placeholder = False
    for piece in pieces if leading else reversed(pieces):
        if not piece.literal:
            if not any(re.fullmatch(f"(?:{piece.text})", dots) for dots in ("", ".")):
                return  # it renders to something that stays: the edge ends here
            behind_placeholder = True
            continue
        stripped = piece.text.lstrip(".") if leading else piece.text.rstrip(".")
        if stripped != piece.text and behind_placeholder:
            if leading:
                piece.dots_before = True
            else:
                piece.dots_after = True
        piece.text = stripped
        if stripped:
            return


def kafka_topic_pattern(template: str, values: Mapping[str, str] | None = None) -> str:
    """A regex (for :func:`re.fullmatch`) that every name :func:`kafka_topic` makes of
    ``template`` rendered (``str.format``) matches: how a probe finds a fleet's topics.

    ``values`` gives, per placeholder name, the regex of what it renders to (legal
    characters only: ``re.escape(kafka_topic(name))``, say); any other placeholder, or
    one with a conversion or a format spec, may be any run of legal characters. The
    character rule is applied to the literal text here; the dots :func:`kafka_topic`
    strips from either end are matched as the placeholders next to them allow
    (``{site}/x`` renders to ``paris.x``, or to ``x`` when the site is empty). A
    superset, then, of the names the template renders to, never less.
    """
    values = values or {}
    pieces: list[_Piece] = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        if literal:
            pieces.append(_Piece(_ILLEGAL.sub("", literal.replace("/", ".")), literal=True))
        if name is not None:
            regex = values.get(name) if not spec and not conversion else None
            pieces.append(_Piece(ANY_LEGAL if regex is None else regex, literal=False))
    _strip_edge(pieces, leading=True)
    _strip_edge(pieces, leading=False)
    return "".join(
        r"\.*" * piece.dots_before + re.escape(piece.text) + r"\.*" * piece.dots_after
        if piece.literal
        else f"(?:{piece.text})"
        for piece in pieces
    )


def kafka_error_kind(exc: BaseException) -> str:
    """What the engine counts an exception of a send as (see the module docstring)."""
    for cls in type(exc).__mro__:
        kind = _ERROR_KINDS.get(cls)
        if kind is not None:
            return kind
    return f"kafka {type(exc).__name__}"


def _json_seq(payload: bytes) -> int | None:
    """The ``seq`` of a JSON object payload (a non-negative integer), else None.

    The rule of :func:`iotix.engine.probe.parse_json_payload` for ``seq``, kept here
    because adapters sit below the engine and must not import it.
    """
    if not payload.startswith(b"{"):
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    seq = data.get("seq") if type(data) is dict else None
    return seq if type(seq) is int and seq >= 0 else None


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Done callback of a record nobody awaits: read its outcome, so a failure is not
    logged as "exception never retrieved"."""
    if not future.cancelled():
        future.exception()


class _KafkaLink:
    """One device: nothing of its own but its id; records go through the adapter."""

    __slots__ = ("adapter", "device_id")

    def __init__(self, adapter: KafkaAdapter, device_id: str) -> None:
        self.adapter = adapter
        self.device_id = device_id

    async def send(self, message: OutgoingMessage) -> Delivery:
        return await self.adapter.produce(message)

    async def aclose(self) -> None:
        return None


class KafkaAdapter:
    """See the module docstring."""

    schemes: ClassVar[tuple[str, ...]] = ("kafka",)

    def __init__(self, endpoint: BrokerEndpoint, settings: AdapterSettings) -> None:
        options: dict[str, Any] = dict(settings.options)
        unknown = set(options) - {
            "acks",
            "topic",
            "linger_ms",
            "compression",
            "max_batch_size_bytes",
            "client_id",
        }
        if unknown:
            raise AdapterError(
                f"unknown Kafka option(s): {', '.join(sorted(unknown))}", kind="configuration"
            )
        acks = options.get("acks", 1)
        if isinstance(acks, str):
            acks = acks.strip().lower()
            acks = int(acks) if acks in ("0", "1", "-1") else acks
        if isinstance(acks, bool) or acks not in ACKS:
            raise AdapterError(f"Kafka acks {acks!r}: use 0, 1 or all", kind="configuration")
        self.acks = ACKS[acks]
        self.never_confirms = self.acks == 0
        """True with ``acks=0``: no record is ever acknowledged, so an engine should
        count every message as QoS 0 (fire-and-forget)."""
        self.topic_template: str | None = None
        if options.get("topic") is not None:
            self.topic_template = str(options["topic"])
            try:
                self.topic_template.format(topic="t", message="m", device_id="d")
            except (KeyError, IndexError, ValueError) as exc:
                raise AdapterError(
                    f"Kafka topic template {self.topic_template!r}: {exc} (it may use "
                    "{topic}, {message} and {device_id})",
                    kind="configuration",
                ) from exc
            self._check_topic_template(self.topic_template)
        compression = str(options.get("compression", "none")).lower()
        if compression not in COMPRESSION:
            raise AdapterError(
                f"Kafka compression {compression!r}: use one of {', '.join(COMPRESSION)}",
                kind="configuration",
            )
        available = COMPRESSION[compression]
        if available is not None and not available():
            raise AdapterError(
                f"Kafka compression {compression} needs its library, which is not installed",
                kind="configuration",
            )
        self.compression = None if compression == "none" else compression
        self.linger_ms = self._number(options, "linger_ms", 0)
        self.max_batch_size_bytes = self._number(options, "max_batch_size_bytes", 16384)
        if self.max_batch_size_bytes < 1:
            raise AdapterError("Kafka max_batch_size_bytes must be positive", kind="configuration")
        self.client_id = str(options.get("client_id", "iotix"))
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        self.bootstrap_servers = f"{host}:{endpoint.port}"
        self.timeout_s = settings.timeout_s
        self.producer: AIOKafkaProducer | None = None
        self.background_errors: dict[str, int] = {}
        """Failures of records nobody waited for (QoS 0 with ``acks`` 1 or all), by
        kind: the engine counts them as sent, this says what became of them."""
        self._topics: dict[str, str] = {}
        self._starting = asyncio.Lock()
        self._start_attempts = 0
        self._start_error: AdapterError | None = None
        self._warned_acks0 = False

    @staticmethod
    def _check_topic_template(template: str) -> None:
        """Refuse a template none of whose names Kafka could take: one without
        placeholders that makes no legal name, or one whose text alone is too long."""
        rendered = template.format(topic="", message="", device_id="")
        fixed = _ILLEGAL.sub("", rendered.replace("/", ".")).strip(".")
        has_placeholders = any(
            name is not None for _, name, _, _ in string.Formatter().parse(template)
        )
        if len(fixed) > MAX_TOPIC_LENGTH:
            raise AdapterError(
                f"Kafka topic template {template!r} makes names longer than Kafka's "
                f"{MAX_TOPIC_LENGTH} characters",
                kind="configuration",
            )
        if not fixed and not has_placeholders:
            raise AdapterError(
                f"Kafka topic template {template!r} makes no legal topic name (Kafka takes "
                "letters, digits, '.', '_' and '-'; '/' becomes '.')",
                kind="configuration",
            )

    @staticmethod
    def _number(options: Mapping[str, Any], name: str, default: int) -> int:
        value = options.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise AdapterError(
                f"Kafka {name} is a whole number, not {value!r}", kind="configuration"
            )
        return value

    # --- the producer ---------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            # Sends what is still batched (records nobody waits for) within the timeout.
            await producer.stop()

    async def _ready_producer(self) -> AIOKafkaProducer:
        """The started producer; starts it on first use (or after a failed start).

        Devices that waited while a start failed fail with it, without starting again:
        a fleet connecting to an unreachable broker makes one attempt at a time, not
        one per device.
        """
        producer = self.producer
        if producer is not None:
            return producer
        attempts_seen = self._start_attempts
        async with self._starting:
            producer = self.producer  # another device may have started it meanwhile
            if producer is not None:
                return producer
            failed = self._start_error
            if self._start_attempts != attempts_seen and failed is not None:
                raise AdapterError(str(failed), kind=failed.kind)  # a new one: fresh traceback
            self._start_attempts += 1
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap_servers,
                client_id=self.client_id,
                acks=self.acks,
                linger_ms=self.linger_ms,
                compression_type=self.compression,
                max_batch_size=self.max_batch_size_bytes,
                request_timeout_ms=max(round(self.timeout_s * 1000), 1),
            )
            try:
                await producer.start()
            except kafka_errors.KafkaError as exc:
                await producer.stop()
                self._start_error = AdapterError(
                    f"Kafka at {self.bootstrap_servers}: {exc}",
                    kind="unreachable",
                )
                raise self._start_error from exc
            self._start_error = None
            self.producer = producer
            return producer

    async def connect(self, device: DeviceIdentity) -> _KafkaLink:
        await self._ready_producer()
        return _KafkaLink(self, device.device_id)

    # --- records --------------------------------------------------------------------

    def topic_for(self, message: OutgoingMessage) -> str:
        """The Kafka topic of a message (see the module docstring); ``""`` when it has
        no legal name."""
        topic = self._topics.get(message.topic)
        if topic is None:
            topic = self._topics[message.topic] = kafka_topic(message.topic)
        if self.topic_template is None:
            return topic
        return kafka_topic(
            self.topic_template.format(
                topic=topic, message=message.headers.get(NAME_HEADER, ""), device_id=message.key
            )
        )

    def headers_for(self, message: OutgoingMessage) -> list[tuple[str, bytes]]:
        """The record's headers: the engine's, and ``iotix-seq`` where it can be had."""
        headers = [(name, value.encode()) for name, value in message.headers.items()]
        if SEQ_HEADER not in message.headers:
            seq = _json_seq(message.payload)
            if seq is not None:
                headers.append((SEQ_HEADER, str(seq).encode()))
        return headers

    async def produce(self, message: OutgoingMessage) -> Delivery:
        """Produce one record; never raises for a failed send (see
        :class:`~iotix.adapters.base.Delivery`)."""
        producer = self.producer
        if producer is None:
            return Delivery(sent=False, error="not sent: adapter closed")
        topic = self.topic_for(message)
        if not topic:
            return Delivery(sent=False, error="kafka invalid topic")
        started = time.perf_counter()
        try:
            future = await producer.send(
                topic,
                message.payload,
                key=message.key.encode() if message.key else None,
                headers=self.headers_for(message),
            )
        except (kafka_errors.KafkaError, OSError, TimeoutError) as exc:
            return Delivery(sent=False, error=kafka_error_kind(exc))
        if self.never_confirms:
            # acks=0: the future only says the request was written; nothing to wait for.
            future.add_done_callback(_retrieve)
            if message.confirm:
                self._warn_acks0()
                return Delivery(sent=True, error=ACKS0_ERROR)
            return Delivery(sent=True)
        if not message.confirm:
            future.add_done_callback(self._count_background)
            return Delivery(sent=True)
        try:
            await future
        except (kafka_errors.KafkaError, OSError, TimeoutError) as exc:
            return Delivery(sent=True, error=kafka_error_kind(exc))
        return Delivery(sent=True, confirmed=True, latency_s=time.perf_counter() - started)

    def _count_background(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            kind = kafka_error_kind(exc)
            self.background_errors[kind] = self.background_errors.get(kind, 0) + 1

    def _warn_acks0(self) -> None:
        if not self._warned_acks0:
            self._warned_acks0 = True
            _log.warning(
                "Kafka acks=0 acknowledges nothing, yet messages of QoS 1 or 2 are sent: "
                "they are counted as %r; run the fleet at QoS 0 (--qos 0)",
                ACKS0_ERROR,
            )
