"""The MQTT client session, driven by hand-made server packets (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from iotix.errors import MQTTProtocolError
from iotix.protocols.mqtt.packets import (
    ConnAck,
    Connect,
    Disconnect,
    Packet,
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
    encode,
)
from iotix.protocols.mqtt.session import (
    ConnectedEvent,
    ConnectionRefusedEvent,
    DisconnectedEvent,
    MessageReceivedEvent,
    MQTTClientSession,
    PongEvent,
    PublishAckedEvent,
    SessionSettings,
    SessionState,
    SubscribedEvent,
    UnexpectedAckError,
)

V311 = ProtocolVersion.V311
V5 = ProtocolVersion.V5


class Peer:
    """The server side of the test: decodes what the client sent, feeds it packets."""

    def __init__(self, session: MQTTClientSession) -> None:
        self.session = session
        self.version = session.settings.version
        self.reader = PacketReader(self.version)

    def sent(self) -> list[Packet]:
        return self.reader.feed(self.session.data_to_send())

    def send(self, *packets: Packet) -> list[Any]:
        data = b"".join(encode(p, self.version) for p in packets)
        return self.session.receive_data(data)


def connected(version: ProtocolVersion = V311, **settings: Any) -> Peer:
    session = MQTTClientSession(SessionSettings(client_id="dev-1", version=version, **settings))
    peer = Peer(session)
    session.connect()
    peer.sent()
    peer.send(ConnAck())
    return peer


def test_connect_sends_the_settings_and_a_connack_connects() -> None:
    session = MQTTClientSession(
        SessionSettings(client_id="dev-1", keepalive_s=30, username="u", password=b"p")
    )
    peer = Peer(session)
    session.connect()
    [connect] = peer.sent()
    assert isinstance(connect, Connect)
    assert (connect.client_id, connect.keepalive_s, connect.username, connect.password) == (
        "dev-1",
        30,
        "u",
        b"p",
    )
    assert peer.send(ConnAck()) == [ConnectedEvent(session_present=False)]
    assert session.state is SessionState.CONNECTED


@pytest.mark.parametrize(
    ("version", "code", "reason"),
    [(V311, 4, 0x86), (V311, 5, 0x87), (V5, 0x86, 0x86), (V5, 0x8A, 0x8A)],
)
def test_refused_connection_reports_the_reason_in_mqtt5_terms(
    version: ProtocolVersion, code: int, reason: int
) -> None:
    session = MQTTClientSession(SessionSettings(client_id="dev-1", version=version))
    peer = Peer(session)
    session.connect()
    [event] = peer.send(ConnAck(reason_code=code))
    assert event == ConnectionRefusedEvent(reason)
    assert session.state is SessionState.DISCONNECTED


@pytest.mark.parametrize(("code", "reason"), [(1, 0x84), (5, 0x87)])
def test_a_5_0_session_reads_a_3_1_1_refusal_as_the_refusal_it_is(code: int, reason: int) -> None:
    # A broker without 5.0 answers a 5.0 CONNECT with a 3.1.1 CONNACK, return code 1
    # (3.1.1 MQTT-3.1.2-2); 5.0 CONNACK reason codes are 0 and 0x80 up.
    session = MQTTClientSession(SessionSettings(client_id="dev-1", version=V5))
    session.connect()
    assert session.receive_data(bytes([0x20, 2, 0, code])) == [ConnectionRefusedEvent(reason)]
    assert session.state is SessionState.DISCONNECTED


def test_first_packet_other_than_connack_is_a_protocol_error() -> None:
    session = MQTTClientSession(SessionSettings(client_id="dev-1"))
    session.connect()
    with pytest.raises(MQTTProtocolError) as caught:
        session.receive_data(encode(PingResp(), V311))
    assert caught.value.reason_code == 0x82


def test_qos0_publish_is_sent_at_once_without_an_id() -> None:
    peer = connected()
    assert peer.session.publish("t/1", b"x") is None
    assert peer.sent() == [Publish("t/1", b"x")]


def test_packets_written_by_the_caller_count_as_a_write_for_the_keepalive() -> None:
    peer = connected(keepalive_s=10)
    session = peer.session
    session.tick(0.0)
    session.publish_encoded_written(8.0)
    assert session.next_tick_s() == 18.0
    session.tick(17.9)
    assert session.data_to_send(17.9) == b""
    session.tick(18.0)
    assert peer.reader.feed(session.data_to_send(18.0)) == [PingReq()]


def test_packets_written_by_the_caller_need_a_connected_session() -> None:
    session = MQTTClientSession(SessionSettings(client_id="dev-1"))
    with pytest.raises(MQTTProtocolError, match="while disconnected"):
        session.publish_encoded_written(1.0)


def test_qos1_publish_completes_on_puback() -> None:
    peer = connected()
    packet_id = peer.session.publish("t/1", b"x", qos=1)
    assert peer.sent() == [Publish("t/1", b"x", qos=1, packet_id=packet_id)]
    assert peer.session.inflight == 1
    assert peer.send(PubAck(packet_id)) == [PublishAckedEvent(packet_id, 1)]
    assert peer.session.inflight == 0


def test_qos2_publish_completes_through_pubrec_pubrel_pubcomp() -> None:
    peer = connected()
    packet_id = peer.session.publish("t/1", b"x", qos=2)
    peer.sent()
    assert peer.send(PubRec(packet_id)) == []
    assert peer.sent() == [PubRel(packet_id)]
    assert peer.send(PubComp(packet_id)) == [PublishAckedEvent(packet_id, 2)]


def test_failed_pubrec_ends_the_qos2_flow_with_its_reason() -> None:
    peer = connected(V5)
    packet_id = peer.session.publish("t/1", b"x", qos=2)
    peer.sent()
    assert peer.send(PubRec(packet_id, reason_code=0x97)) == [PublishAckedEvent(packet_id, 2, 0x97)]
    assert peer.sent() == []


def test_inflight_window_queues_the_rest_until_acks_free_slots() -> None:
    peer = connected(max_inflight=2)
    ids = [peer.session.publish("t", bytes([i]), qos=1) for i in range(5)]
    assert [p.packet_id for p in peer.sent()] == ids[:2]
    assert peer.session.queued == 3
    peer.send(PubAck(ids[0]))
    assert [p.payload for p in peer.sent()] == [bytes([2])]
    peer.send(PubAck(ids[1]), PubAck(ids[2]))
    assert [p.payload for p in peer.sent()] == [bytes([3]), bytes([4])]
    assert len(set(ids)) == 5


def test_server_receive_maximum_narrows_the_window() -> None:
    session = MQTTClientSession(SessionSettings(client_id="d", version=V5, max_inflight=50))
    peer = Peer(session)
    session.connect()
    peer.sent()
    peer.send(ConnAck(properties={Property.RECEIVE_MAXIMUM: 1}))
    session.publish("t", b"1", qos=1)
    session.publish("t", b"2", qos=1)
    assert len(peer.sent()) == 1


def test_topic_alias_replaces_a_known_topic_when_the_server_allows() -> None:
    session = MQTTClientSession(SessionSettings(client_id="d", version=V5))
    peer = Peer(session)
    session.connect()
    peer.sent()
    peer.send(ConnAck(properties={Property.TOPIC_ALIAS_MAXIMUM: 4}))
    session.publish("sensors/a/telemetry", b"1")
    session.publish("sensors/a/telemetry", b"2")
    first, second = peer.sent()
    assert isinstance(first, Publish)
    assert isinstance(second, Publish)
    assert (first.topic, first.properties[Property.TOPIC_ALIAS]) == ("sensors/a/telemetry", 1)
    assert (second.topic, second.properties[Property.TOPIC_ALIAS]) == ("", 1)


def test_no_topic_alias_without_the_servers_leave() -> None:
    peer = connected(V5)
    peer.session.publish("a", b"1")
    peer.session.publish("a", b"2")
    assert all(Property.TOPIC_ALIAS not in p.properties for p in peer.sent())  # type: ignore[union-attr]


def test_incoming_qos1_is_acknowledged_and_delivered() -> None:
    peer = connected()
    events = peer.send(Publish("cmd", b"go", qos=1, packet_id=7))
    assert events == [MessageReceivedEvent("cmd", b"go", 1, retain=False)]
    assert peer.sent() == [PubAck(7)]


def test_incoming_qos2_is_delivered_once_even_if_sent_again() -> None:
    peer = connected()
    first = peer.send(Publish("cmd", b"go", qos=2, packet_id=9))
    again = peer.send(Publish("cmd", b"go", qos=2, packet_id=9, dup=True))
    assert len(first) == 1
    assert again == []
    assert peer.sent() == [PubRec(9), PubRec(9)]
    peer.send(PubRel(9))
    assert peer.sent() == [PubComp(9)]


def test_incoming_topic_alias_is_resolved() -> None:
    peer = connected(V5)
    peer.send(Publish("cmd/x", b"1", properties={Property.TOPIC_ALIAS: 3}))
    [event] = peer.send(Publish("", b"2", properties={Property.TOPIC_ALIAS: 3}))
    assert event.topic == "cmd/x"


def test_unknown_incoming_topic_alias_is_a_protocol_error() -> None:
    peer = connected(V5)
    with pytest.raises(MQTTProtocolError) as caught:
        peer.send(Publish("", b"2", properties={Property.TOPIC_ALIAS: 3}))
    assert caught.value.reason_code == 0x94


def test_ack_for_an_unknown_id_is_a_protocol_error() -> None:
    peer = connected()
    with pytest.raises(UnexpectedAckError) as caught:
        peer.send(PubAck(42))
    assert caught.value.reason_code == 0x82
    assert caught.value.kind == "PUBACK for an unknown packet id"


def test_a_puback_for_a_qos2_message_is_a_protocol_error_that_says_so() -> None:
    # What RabbitMQ 3.10 answers a QoS 2 PUBLISH: it took the message as QoS 1.
    peer = connected()
    packet_id = peer.session.publish("t", b"x", qos=2)
    assert packet_id is not None
    with pytest.raises(UnexpectedAckError) as caught:
        peer.send(PubAck(packet_id))
    error = caught.value
    assert (error.reason_code, error.kind) == (0x82, "PUBACK for a QoS 2 message")
    assert str(error) == (
        f"PUBACK for a QoS 2 message: packet id {packet_id} "
        "(the server took it as QoS 1: it does not support QoS 2)"
    )


@pytest.mark.parametrize(
    ("qos", "ack", "kind"),
    [(1, PubRec, "PUBREC for a QoS 1 message"), (2, PubComp, "PUBCOMP before PUBREC")],
)
def test_an_ack_out_of_its_flow_names_the_mismatch_without_the_id(
    qos: int, ack: type[PubRec | PubComp], kind: str
) -> None:
    peer = connected()
    packet_id = peer.session.publish("t", b"x", qos=qos)
    assert packet_id is not None
    with pytest.raises(UnexpectedAckError) as caught:
        peer.send(ack(packet_id))
    assert (caught.value.kind, caught.value.packet_id) == (kind, packet_id)


def test_subscribe_and_its_suback() -> None:
    peer = connected()
    packet_id = peer.session.subscribe([Subscription("devices/d/commands/+", qos=1)])
    [subscribe] = peer.sent()
    assert isinstance(subscribe, Subscribe)
    assert subscribe.subscriptions[0].topic_filter == "devices/d/commands/+"
    assert peer.send(SubAck(packet_id, (1,))) == [SubscribedEvent(packet_id, (1,))]


def test_keepalive_pings_when_idle_and_a_pong_keeps_the_connection() -> None:
    peer = connected(keepalive_s=10)
    session = peer.session
    session.tick(0.0)
    assert session.next_tick_s() == 10.0
    session.tick(9.9)
    assert peer.sent() == []
    session.tick(10.0)
    assert peer.sent() == [PingReq()]
    assert peer.send(PingResp()) == [PongEvent()]
    assert session.tick(25.0) == []
    assert session.state is SessionState.CONNECTED


def test_keepalive_gives_up_when_no_pong_comes_within_the_keepalive() -> None:
    peer = connected(keepalive_s=10)
    session = peer.session
    session.tick(0.0)
    session.tick(10.0)
    assert peer.sent() == [PingReq()]
    assert session.tick(19.9) == []
    assert session.tick(20.0) == [DisconnectedEvent(reason_code=0x8D)]
    assert session.state is SessionState.DISCONNECTED


def test_sending_postpones_the_ping() -> None:
    peer = connected(keepalive_s=10)
    peer.session.tick(0.0)
    peer.session.publish("t", b"x")
    peer.sent()
    peer.session.tick(5.0)
    peer.session.tick(14.0)
    assert peer.sent() == []


def test_pings_follow_the_keepalive_when_writes_say_their_time() -> None:
    # A PINGREQ written at 10 is the last write: the next one is due at 20, not a
    # keepalive after the tick that noticed the write.
    peer = connected(keepalive_s=10)
    session = peer.session
    session.tick(0.0)  # the CONNECT went out at 0
    session.tick(10.0)
    assert peer.reader.feed(session.data_to_send(10.0)) == [PingReq()]
    peer.send(PingResp())
    assert session.next_tick_s() == 20.0
    session.tick(20.0)
    assert peer.reader.feed(session.data_to_send(20.0)) == [PingReq()]


def test_a_publish_written_at_a_time_postpones_the_ping_from_that_time() -> None:
    peer = connected(keepalive_s=10)
    session = peer.session
    session.tick(0.0)
    session.publish("t", b"x")
    session.data_to_send(7.0)
    assert session.next_tick_s() == 17.0
    session.tick(16.9)
    assert session.data_to_send(16.9) == b""


def test_persistent_session_resends_unacked_with_dup_after_reconnect() -> None:
    peer = connected(clean_start=False)
    session = peer.session
    packet_id = session.publish("t", b"keep", qos=1)
    peer.sent()
    assert session.connection_lost() == [DisconnectedEvent(reason_code=0x80)]
    session.connect()
    peer.reader = PacketReader(V311)
    [connect] = peer.sent()
    assert isinstance(connect, Connect)
    assert not connect.clean_start
    peer.send(ConnAck(session_present=True))
    assert peer.sent() == [Publish("t", b"keep", qos=1, dup=True, packet_id=packet_id)]


def test_a_lost_session_gets_the_unacked_messages_as_new_ones() -> None:
    peer = connected(clean_start=False)
    session = peer.session
    packet_id = session.publish("t", b"keep", qos=1)
    peer.sent()
    session.connection_lost()
    session.connect()
    peer.reader = PacketReader(V311)
    peer.sent()
    peer.send(ConnAck(session_present=False))
    assert peer.sent() == [Publish("t", b"keep", qos=1, packet_id=packet_id)]


def test_released_qos2_resends_pubrel_to_a_kept_session() -> None:
    peer = connected(clean_start=False)
    session = peer.session
    packet_id = session.publish("t", b"x", qos=2)
    peer.sent()
    peer.send(PubRec(packet_id))
    peer.sent()
    session.connection_lost()
    session.connect()
    peer.reader = PacketReader(V311)
    peer.sent()
    peer.send(ConnAck(session_present=True))
    assert peer.sent() == [PubRel(packet_id)]


def test_clean_start_forgets_unacked_messages() -> None:
    peer = connected()
    peer.session.publish("t", b"x", qos=1)
    peer.sent()
    peer.session.connection_lost()
    peer.session.connect()
    peer.reader = PacketReader(V311)
    peer.sent()
    peer.send(ConnAck())
    assert peer.sent() == []
    assert peer.session.inflight == 0


def test_server_disconnect_is_reported_with_its_reason() -> None:
    peer = connected(V5)
    assert peer.send(Disconnect(reason_code=0x8B)) == [
        DisconnectedEvent(reason_code=0x8B, by_server=True)
    ]
    assert peer.session.state is SessionState.DISCONNECTED


def test_disconnect_sends_disconnect_and_publish_is_then_refused() -> None:
    peer = connected()
    peer.session.disconnect()
    assert peer.sent() == [Disconnect()]
    with pytest.raises(MQTTProtocolError):
        peer.session.publish("t", b"x")
