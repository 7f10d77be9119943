"""Message payloads: declarative specs and the encoders compiled from them."""

from iotix.payload.spec import (
    BinaryFieldSpec,
    BinaryPayloadSpec,
    CBORPayloadSpec,
    CSVPayloadSpec,
    JSONPayloadSpec,
    MsgPackPayloadSpec,
    PayloadSpec,
    RawPayloadSpec,
    TextPayloadSpec,
    ValueReference,
)

__all__ = [
    "BinaryFieldSpec",
    "BinaryPayloadSpec",
    "CBORPayloadSpec",
    "CSVPayloadSpec",
    "JSONPayloadSpec",
    "MsgPackPayloadSpec",
    "PayloadSpec",
    "RawPayloadSpec",
    "TextPayloadSpec",
    "ValueReference",
]
