"""The MQTT client session (3.1.1 and 5.0) as a state machine with no I/O.

Feed it what the socket received (``receive_data``) and send what it has queued
(``data_to_send``); tell it the time now and then (``tick``) so that it can keep the
connection alive. Verbs (``connect``, ``publish``, ``subscribe``, ...) queue packets; what
happens on the wire comes back as typed events. One object per device connection; the
state is small on purpose (a simulator holds 100,000 of these).

States::

    DISCONNECTED --connect()--> CONNECTING --CONNACK ok--> CONNECTED
         ^                          |  CONNACK refused            |  disconnect()
         |                          v                             v
         +-------- connection_lost() / refused / timeout --- DISCONNECTING

Acknowledgement flows (MQTT-4.3): QoS 1 is PUBLISH -> PUBACK; QoS 2 is PUBLISH -> PUBREC
-> PUBREL -> PUBCOMP. Outgoing QoS 1 and 2 messages are limited by an in-flight window
(the server's Receive Maximum in 5.0, ``max_inflight`` always); messages beyond it wait
in a queue. With a persistent session, unacknowledged messages survive
``connection_lost`` and are sent again after the next CONNACK, with the same packet id
and the DUP flag (MQTT-4.4.0-1).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from iotix.errors import MQTTProtocolError
from iotix.protocols.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    PacketReader,
    PingReq,
    PingResp,
    Property,
    ProtocolVersion,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    encode,
    encode_publish,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from iotix.protocols.mqtt.packets import Packet, Will

NO_PROPERTIES: Mapping[Property, Any] = MappingProxyType({})
MAX_PACKET_ID = 65_535

# MQTT 3.1.1 CONNACK return codes (MQTT-3.2.2.3) and their 5.0 equivalents, so callers
# can count refusals by one set of reasons whatever the version.
V311_CONNACK_REASONS = {
    1: 0x84,  # unacceptable protocol version -> unsupported protocol version
    2: 0x85,  # identifier rejected -> client identifier not valid
    3: 0x88,  # server unavailable
    4: 0x86,  # bad user name or password
    5: 0x87,  # not authorized
}
REASON_NAMES = {
    0x00: "success",
    0x04: "disconnect with will message",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x90: "topic name invalid",
    0x93: "receive maximum exceeded",
    0x94: "topic alias invalid",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9F: "connection rate exceeded",
}


class UnexpectedAckError(MQTTProtocolError):
    """An acknowledgement that fits no flow in progress (a protocol error, 0x82): a
    PUBACK for a QoS 2 message (what a broker without QoS 2 that takes the message as
    QoS 1 sends), an ack for a packet id not in flight, a PUBCOMP before the PUBREC.

    ``kind`` says which, without the packet id, for counting: ``PUBACK for a QoS 2
    message``, ``PUBREC for an unknown packet id``, ``PUBCOMP before PUBREC``."""

    def __init__(self, packet: str, packet_id: int, inflight_qos: int | None) -> None:
        if inflight_qos is None:
            kind = f"{packet} for an unknown packet id"
        elif packet == "PUBCOMP" and inflight_qos == 2:
            kind = "PUBCOMP before PUBREC"
        else:
            kind = f"{packet} for a QoS {inflight_qos} message"
        hint = ""
        if packet == "PUBACK" and inflight_qos == 2:
            hint = " (the server took it as QoS 1: it does not support QoS 2)"
        super().__init__(f"{kind}: packet id {packet_id}{hint}", reason_code=0x82)
        self.kind = kind
        self.packet_id = packet_id


def reason_name(code: int) -> str:
    """A reason code as words, for reports: ``0x86`` -> ``bad user name or password``."""
    return REASON_NAMES.get(code, f"reason 0x{code:02x}")


class SessionState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTING = "disconnecting"


# --- events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectedEvent:
    session_present: bool
    properties: Mapping[Property, Any] = field(default_factory=lambda: NO_PROPERTIES)


@dataclass(frozen=True, slots=True)
class ConnectionRefusedEvent:
    """The server refused the connection; ``reason_code`` is in 5.0 terms."""

    reason_code: int

    @property
    def reason(self) -> str:
        return reason_name(self.reason_code)


@dataclass(frozen=True, slots=True)
class PublishAckedEvent:
    """A QoS 1 or 2 message completed its flow (PUBACK or PUBCOMP, or a failing PUBREC)."""

    packet_id: int
    qos: int
    reason_code: int = 0


@dataclass(frozen=True, slots=True)
class MessageReceivedEvent:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Mapping[Property, Any] = field(default_factory=lambda: NO_PROPERTIES)


@dataclass(frozen=True, slots=True)
class SubscribedEvent:
    packet_id: int
    reason_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UnsubscribedEvent:
    packet_id: int
    reason_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PongEvent:
    pass


@dataclass(frozen=True, slots=True)
class DisconnectedEvent:
    """The connection ended: the server sent DISCONNECT (``by_server``), the keepalive
    expired, or the caller's ``disconnect`` completed."""

    reason_code: int = 0
    by_server: bool = False


Event = (
    ConnectedEvent
    | ConnectionRefusedEvent
    | PublishAckedEvent
    | MessageReceivedEvent
    | SubscribedEvent
    | UnsubscribedEvent
    | PongEvent
    | DisconnectedEvent
)


@dataclass(slots=True)
class _Outgoing:
    """A QoS 1 or 2 message of ours until its flow completes."""

    topic: bytes
    payload: bytes
    qos: int
    retain: bool
    properties: Mapping[Property, Any]
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent; waiting for PUBCOMP


@dataclass(slots=True)
class SessionSettings:
    """What a client asks for when it connects."""

    client_id: str
    version: ProtocolVersion = ProtocolVersion.V311
    keepalive_s: int = 60
    clean_start: bool = True
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Mapping[Property, Any] = field(default_factory=dict)
    max_inflight: int = 20
    topic_aliases: bool = True
    """Use topic aliases (5.0) when the server allows them."""


class MQTTClientSession:
    """One client connection's protocol state. See the module docstring."""

    __slots__ = (
        "_alias_maximum",
        "_alias_of",
        "_awaiting_pong_since_s",
        "_incoming_qos2",
        "_inflight",
        "_last_write_s",
        "_next_packet_id",
        "_out",
        "_pending",
        "_queued_ids",
        "_reader",
        "_send_window",
        "_server_aliases",
        "_subscribing",
        "_wrote",
        "settings",
        "state",
    )

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self.state = SessionState.DISCONNECTED
        self._reader = PacketReader(settings.version)
        self._out: list[bytes] = []
        self._wrote = False
        self._last_write_s = 0.0
        self._awaiting_pong_since_s: float | None = None
        self._next_packet_id = 1
        # packet id -> message, in send order (resent in that order after a reconnect).
        # Containers a QoS 0 device never needs start empty or as None (a simulator
        # holds 100,000 sessions: an empty deque is 760 bytes, an empty set 216).
        self._inflight: dict[int, _Outgoing] = {}  # insertion order = send order
        self._pending: deque[tuple[int, _Outgoing]] | None = None
        self._queued_ids: set[int] | None = None
        self._send_window = settings.max_inflight
        self._incoming_qos2: set[int] | None = None
        self._subscribing: set[int] | None = None
        self._alias_of: dict[bytes, int] | None = None  # MQTT 5 only
        self._alias_maximum = 0
        self._server_aliases: dict[int, str] | None = None

    # --- the byte interface ---------------------------------------------------------

    def data_to_send(self, now_s: float | None = None) -> bytes:
        """Everything queued for the wire, in order; empties the queue.

        ``now_s`` is when the caller writes it, which the keepalive counts from; without
        it the next ``tick`` takes its own time as that of the write, and a PINGREQ may
        then come up to one keepalive late."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        if now_s is None:
            self._wrote = True
        else:
            self._wrote = False
            self._last_write_s = now_s
        return data

    def receive_data(self, data: bytes) -> list[Event]:
        """Process bytes from the server; raises MQTTProtocolError on a broken peer (the
        caller then closes the connection, with ``reason_code`` in 5.0)."""
        events: list[Event] = []
        for packet in self._reader.feed(data):
            self._handle(packet, events)
        return events

    def connection_lost(self) -> list[Event]:
        """The transport closed. A persistent session keeps its unacknowledged messages
        for the next connection; a clean one forgets them."""
        was = self.state
        self.state = SessionState.DISCONNECTED
        self._reader = PacketReader(self.settings.version)
        self._out.clear()
        self._awaiting_pong_since_s = None
        self._alias_of = None
        self._server_aliases = None
        self._subscribing = None
        for message in self._inflight.values():
            message.released = message.released and message.qos == 2
        if was is SessionState.DISCONNECTED:
            return []
        return [DisconnectedEvent(reason_code=0x80 if was is not SessionState.DISCONNECTING else 0)]

    # --- verbs ----------------------------------------------------------------------

    def connect(self) -> None:
        if self.state is not SessionState.DISCONNECTED:
            raise MQTTProtocolError(f"connect() while {self.state.value}", reason_code=0x82)
        settings = self.settings
        if settings.clean_start:
            self._inflight.clear()
            self._pending = None
            self._queued_ids = None
            self._incoming_qos2 = None
        self.state = SessionState.CONNECTING
        self._queue(
            encode(
                Connect(
                    client_id=settings.client_id,
                    keepalive_s=settings.keepalive_s,
                    clean_start=settings.clean_start,
                    username=settings.username,
                    password=settings.password,
                    will=settings.will,
                    version=settings.version,
                    properties=settings.properties,
                ),
                settings.version,
            )
        )

    def publish(
        self,
        topic: str | bytes,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        properties: Mapping[Property, Any] = NO_PROPERTIES,
    ) -> int | None:
        """Queue a message. QoS 0 returns None; QoS 1 and 2 return the packet id, and
        wait in a queue while the in-flight window is full."""
        if self.state is not SessionState.CONNECTED:
            raise MQTTProtocolError(f"publish() while {self.state.value}", reason_code=0x82)
        topic_bytes = topic.encode() if isinstance(topic, str) else topic
        if qos == 0:
            self._send_publish(
                topic_bytes,
                payload,
                qos=0,
                retain=retain,
                properties=properties,
                packet_id=None,
                dup=False,
            )
            return None
        message = _Outgoing(topic_bytes, payload, qos, retain, properties)
        packet_id = self._allocate_id()
        if len(self._inflight) >= self._send_window:
            # The id is reserved now, so the caller can match the ack; it goes out when
            # an acknowledgement frees a slot.
            if self._pending is None or self._queued_ids is None:
                self._pending, self._queued_ids = deque(), set()
            self._pending.append((packet_id, message))
            self._queued_ids.add(packet_id)
            return packet_id
        self._inflight[packet_id] = message
        self._send_publish(
            topic_bytes,
            payload,
            qos=qos,
            retain=retain,
            properties=properties,
            packet_id=packet_id,
            dup=False,
        )
        return packet_id

    def publish_encoded_written(self, now_s: float) -> None:
        """The caller wrote QoS 0 PUBLISH packets it encoded itself at ``now_s``,
        after :meth:`data_to_send`: it counts as a write for the keepalive."""
        if self.state is not SessionState.CONNECTED:
            raise MQTTProtocolError(f"publish() while {self.state.value}", reason_code=0x82)
        self._wrote = False
        self._last_write_s = now_s

    def subscribe(self, subscriptions: Iterable[Subscription]) -> int:
        if self.state is not SessionState.CONNECTED:
            raise MQTTProtocolError(f"subscribe() while {self.state.value}", reason_code=0x82)
        packet_id = self._allocate_id()
        self._start_subscribing(packet_id)
        self._queue(encode(Subscribe(packet_id, tuple(subscriptions)), self.settings.version))
        return packet_id

    def unsubscribe(self, topic_filters: Iterable[str]) -> int:
        if self.state is not SessionState.CONNECTED:
            raise MQTTProtocolError(f"unsubscribe() while {self.state.value}", reason_code=0x82)
        packet_id = self._allocate_id()
        self._start_subscribing(packet_id)
        self._queue(encode(Unsubscribe(packet_id, tuple(topic_filters)), self.settings.version))
        return packet_id

    def disconnect(self, reason_code: int = 0) -> None:
        """Queue DISCONNECT; the caller closes the transport once it is sent."""
        if self.state not in (SessionState.CONNECTED, SessionState.CONNECTING):
            return
        self._queue(encode(Disconnect(reason_code), self.settings.version))
        self.state = SessionState.DISCONNECTING

    # --- time -----------------------------------------------------------------------

    def tick(self, now_s: float) -> list[Event]:
        """Keep the connection alive: PINGREQ after ``keepalive_s`` without sending
        (MQTT-3.1.2-23), and give up when no PINGRESP came within the keepalive."""
        if self._wrote:
            self._wrote = False
            self._last_write_s = now_s
        keepalive = self.settings.keepalive_s
        if self.state is not SessionState.CONNECTED or keepalive == 0:
            return []
        if self._awaiting_pong_since_s is not None:
            if now_s - self._awaiting_pong_since_s >= keepalive:
                self.state = SessionState.DISCONNECTED
                return [DisconnectedEvent(reason_code=0x8D)]
            return []
        if now_s - self._last_write_s >= keepalive:
            self._queue(encode(PingReq(), self.settings.version))
            self._awaiting_pong_since_s = now_s
        return []

    def next_tick_s(self) -> float:
        """When ``tick`` next has work, given what it knows of the last write."""
        keepalive = float(self.settings.keepalive_s)
        if self._awaiting_pong_since_s is not None:
            return self._awaiting_pong_since_s + keepalive
        return self._last_write_s + keepalive

    @property
    def inflight(self) -> int:
        """QoS 1 and 2 messages sent and not yet acknowledged."""
        return len(self._inflight)

    @property
    def queued(self) -> int:
        """QoS 1 and 2 messages waiting for a free slot in the in-flight window."""
        return 0 if self._pending is None else len(self._pending)

    # --- internals ------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        self._out.append(data)

    def _start_subscribing(self, packet_id: int) -> None:
        if self._subscribing is None:
            self._subscribing = set()
        self._subscribing.add(packet_id)

    def _done_subscribing(self, packet_id: int) -> None:
        if self._subscribing is not None:
            self._subscribing.discard(packet_id)

    def _allocate_id(self) -> int:
        # Ids in use are those in flight and the (un)subscriptions in progress.
        for _ in range(MAX_PACKET_ID):
            packet_id = self._next_packet_id
            self._next_packet_id = packet_id % MAX_PACKET_ID + 1
            if (
                packet_id not in self._inflight
                and (self._subscribing is None or packet_id not in self._subscribing)
                and (self._queued_ids is None or packet_id not in self._queued_ids)
            ):
                return packet_id
        raise MQTTProtocolError("no free packet identifier", reason_code=0x93)

    def _send_publish(
        self,
        topic: bytes,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        properties: Mapping[Property, Any],
        packet_id: int | None,
        dup: bool,
    ) -> None:
        version = self.settings.version
        if version is ProtocolVersion.V311:
            self._queue(
                encode_publish(topic, payload, qos=qos, retain=retain, dup=dup, packet_id=packet_id)
            )
            return
        props = dict(properties)
        wire_topic = topic
        if self._alias_maximum:
            if self._alias_of is None:
                self._alias_of = {}
            alias = self._alias_of.get(topic)
            if alias is not None:
                # MQTT-3.3.2.3.4: a known alias stands for the topic; send an empty name.
                props[Property.TOPIC_ALIAS] = alias
                wire_topic = b""
            elif len(self._alias_of) < self._alias_maximum:
                alias = len(self._alias_of) + 1
                self._alias_of[topic] = alias
                props[Property.TOPIC_ALIAS] = alias
        self._queue(
            encode(
                Publish(
                    topic=wire_topic.decode(),
                    payload=payload,
                    qos=qos,
                    retain=retain,
                    dup=dup,
                    packet_id=packet_id,
                    properties=props,
                ),
                version,
            )
        )

    def _fill_window(self) -> None:
        pending, queued = self._pending, self._queued_ids
        if pending is None or queued is None:
            return
        while pending and len(self._inflight) < self._send_window:
            packet_id, message = pending.popleft()
            queued.discard(packet_id)
            self._inflight[packet_id] = message
            self._send_publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                properties=message.properties,
                packet_id=packet_id,
                dup=False,
            )

    def _handle(self, packet: Packet, events: list[Event]) -> None:
        version = self.settings.version
        if self.state is SessionState.CONNECTING:
            if isinstance(packet, ConnAck):
                self._connack(packet, events)
                return
            if not isinstance(packet, Auth):
                # MQTT-3.2.0-1: the first packet from the server is CONNACK (or AUTH).
                raise MQTTProtocolError(
                    f"expected CONNACK, got {type(packet).__name__.upper()}", reason_code=0x82
                )
            return
        match packet:
            case Publish():
                self._incoming_publish(packet, events)
            case PubAck(packet_id=packet_id, reason_code=reason):
                message = self._inflight.pop(packet_id, None)
                if message is None or message.qos != 1:  # MQTT-4.3.2: QoS 1 flows only
                    raise UnexpectedAckError("PUBACK", packet_id, _qos_of(message))
                events.append(PublishAckedEvent(packet_id, 1, reason))
                self._fill_window()
            case PubRec(packet_id=packet_id, reason_code=reason):
                message = self._inflight.get(packet_id)
                if message is None or message.qos != 2:
                    raise UnexpectedAckError("PUBREC", packet_id, _qos_of(message))
                if reason >= 0x80:  # MQTT-4.3.3: a failed PUBREC ends the flow
                    del self._inflight[packet_id]
                    events.append(PublishAckedEvent(packet_id, 2, reason))
                    self._fill_window()
                    return
                message.released = True
                self._queue(encode(PubRel(packet_id), version))
            case PubComp(packet_id=packet_id, reason_code=reason):
                message = self._inflight.pop(packet_id, None)
                if message is None or not message.released:
                    raise UnexpectedAckError("PUBCOMP", packet_id, _qos_of(message))
                events.append(PublishAckedEvent(packet_id, 2, reason))
                self._fill_window()
            case PubRel(packet_id=packet_id):
                self._released(packet_id)
            case SubAck(packet_id=packet_id, reason_codes=codes):
                self._done_subscribing(packet_id)
                events.append(SubscribedEvent(packet_id, codes))
            case UnsubAck(packet_id=packet_id, reason_codes=codes):
                self._done_subscribing(packet_id)
                events.append(UnsubscribedEvent(packet_id, codes))
            case PingResp():
                self._awaiting_pong_since_s = None
                events.append(PongEvent())
            case Disconnect(reason_code=reason):
                self.state = SessionState.DISCONNECTED
                events.append(DisconnectedEvent(reason, by_server=True))
            case Auth():
                pass  # enhanced authentication is not supported; servers only send it on request
            case _:
                raise MQTTProtocolError(
                    f"a server does not send {type(packet).__name__.upper()}", reason_code=0x82
                )

    def _released(self, packet_id: int) -> None:
        """PUBREL of an incoming QoS 2 message: answer PUBCOMP even for an id we no
        longer hold (MQTT-4.3.3-11)."""
        if self._incoming_qos2 is not None:
            self._incoming_qos2.discard(packet_id)
        self._queue(encode(PubComp(packet_id), self.settings.version))

    def _connack(self, packet: ConnAck, events: list[Event]) -> None:
        version = self.settings.version
        reason = packet.reason_code
        if version is ProtocolVersion.V311 or 0 < reason < 0x80:
            # A 3.1.1 return code; under 5.0, whose CONNACK codes are 0 and 0x80 up, the
            # refusal of a server without 5.0 (3.1.1 MQTT-3.1.2-2: code 1, unacceptable
            # protocol level), read as paho-mqtt reads it: 0x84, unsupported version.
            reason = V311_CONNACK_REASONS.get(reason, 0x80) if reason else 0
        if reason >= 0x80:
            self.state = SessionState.DISCONNECTED
            events.append(ConnectionRefusedEvent(reason))
            return
        self.state = SessionState.CONNECTED
        self._awaiting_pong_since_s = None
        properties = packet.properties
        window = self.settings.max_inflight
        if version is ProtocolVersion.V5:
            window = min(window, int(properties.get(Property.RECEIVE_MAXIMUM, 65_535)))
            if self.settings.topic_aliases:
                self._alias_maximum = int(properties.get(Property.TOPIC_ALIAS_MAXIMUM, 0))
        self._send_window = max(window, 1)
        events.append(ConnectedEvent(packet.session_present, properties))
        self._resend(session_present=packet.session_present)
        self._fill_window()

    def _resend(self, *, session_present: bool) -> None:
        """After a reconnect: unacknowledged messages go again (MQTT-4.4.0-1), with DUP
        when the server kept our session. If it did not, they are new messages to it."""
        version = self.settings.version
        for packet_id, message in list(self._inflight.items()):
            if message.released and session_present:
                self._queue(encode(PubRel(packet_id), version))
                continue
            message.released = False
            self._send_publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                properties=message.properties,
                packet_id=packet_id,
                dup=session_present,
            )

    def _incoming_publish(self, packet: Publish, events: list[Event]) -> None:
        version = self.settings.version
        topic = packet.topic
        alias = packet.properties.get(Property.TOPIC_ALIAS) if packet.properties else None
        if alias is not None:
            if self._server_aliases is None:
                self._server_aliases = {}
            if topic:
                self._server_aliases[int(alias)] = topic
            else:
                known = self._server_aliases.get(int(alias))
                if known is None:
                    raise MQTTProtocolError(f"unknown topic alias {alias}", reason_code=0x94)
                topic = known
        qos = packet.qos
        if qos == 1:
            assert packet.packet_id is not None  # noqa: S101 - the reader guarantees it
            self._queue(encode(PubAck(packet.packet_id), version))
        elif qos == 2:
            assert packet.packet_id is not None  # noqa: S101 - the reader guarantees it
            self._queue(encode(PubRec(packet.packet_id), version))
            # Method A of MQTT-4.3.3: deliver once, remember the id until PUBREL.
            if self._incoming_qos2 is None:
                self._incoming_qos2 = set()
            elif packet.packet_id in self._incoming_qos2:
                return
            self._incoming_qos2.add(packet.packet_id)
        events.append(
            MessageReceivedEvent(topic, packet.payload, qos, packet.retain, packet.properties)
        )


def _qos_of(message: _Outgoing | None) -> int | None:
    return None if message is None else message.qos
