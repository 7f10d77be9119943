"""Message payloads: declarative specs and the encoders compiled from them.

The model layer puts a :data:`PayloadSpec` in each message type, checks
``spec.references()`` against the device's fields, and calls
:func:`build_encoder` once per message type; the encoder's ``encode`` then runs once
per message. See ``docs/payloads.md`` for the language itself.
"""

from iotix.payload.binary import BinaryPayloadEncoder, DecodedField
from iotix.payload.codec import Encoder, build_encoder
from iotix.payload.spec import (
    BinaryBitsFieldSpec,
    BinaryBitSpec,
    BinaryBytesFieldSpec,
    BinaryCRC16FieldSpec,
    BinaryCRC32FieldSpec,
    BinaryFieldSpec,
    BinaryLengthFieldSpec,
    BinaryNumberFieldSpec,
    BinaryPayloadSpec,
    BinaryStringFieldSpec,
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
    "BinaryBitSpec",
    "BinaryBitsFieldSpec",
    "BinaryBytesFieldSpec",
    "BinaryCRC16FieldSpec",
    "BinaryCRC32FieldSpec",
    "BinaryFieldSpec",
    "BinaryLengthFieldSpec",
    "BinaryNumberFieldSpec",
    "BinaryPayloadEncoder",
    "BinaryPayloadSpec",
    "BinaryStringFieldSpec",
    "CBORPayloadSpec",
    "CSVPayloadSpec",
    "DecodedField",
    "Encoder",
    "JSONPayloadSpec",
    "MsgPackPayloadSpec",
    "PayloadSpec",
    "RawPayloadSpec",
    "TextPayloadSpec",
    "ValueReference",
    "build_encoder",
]
