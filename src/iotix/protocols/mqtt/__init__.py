"""MQTT 3.1.1 and 5.0 without I/O.

- :mod:`~iotix.protocols.mqtt.packets`: the control packets as frozen dataclasses,
  ``encode`` / ``encode_publish`` (the hot path) and the incremental ``PacketReader``.
- :mod:`~iotix.protocols.mqtt.session`: the client state machine built on them.

Both are sans-I/O (STYLE.md §1): bytes in, bytes and events out; the adapters own the
sockets.
"""

from iotix.protocols.mqtt.packets import (
    NO_PROPERTIES,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PacketReader,
    PacketType,
    PingReq,
    PingResp,
    Properties,
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
    Will,
    encode,
    encode_properties,
    encode_publish,
)

__all__ = [
    "NO_PROPERTIES",
    "Auth",
    "ConnAck",
    "Connect",
    "Disconnect",
    "Packet",
    "PacketReader",
    "PacketType",
    "PingReq",
    "PingResp",
    "Properties",
    "Property",
    "ProtocolVersion",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "SubAck",
    "Subscribe",
    "Subscription",
    "UnsubAck",
    "Unsubscribe",
    "Will",
    "encode",
    "encode_properties",
    "encode_publish",
]
