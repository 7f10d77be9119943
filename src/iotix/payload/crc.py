"""CRC-16 variants and CRC-32 for binary payload layouts.

Parameters follow the Rocksoft model as catalogued by Greg Cook's "Catalogue of
parametrised CRC algorithms" (reveng); each entry's check value is the CRC of the ASCII
bytes ``b"123456789"``:

============  ======  ======  ======  ======  =====  ======
algorithm     poly    init    refin   refout  xorout check
============  ======  ======  ======  ======  =====  ======
modbus        0x8005  0xFFFF  yes     yes     0x0000 0x4B37
ccitt-false   0x1021  0xFFFF  no      no      0x0000 0x29B1
xmodem        0x1021  0x0000  no      no      0x0000 0x31C3
kermit        0x1021  0x0000  yes     yes     0x0000 0x2189
arc           0x8005  0x0000  yes     yes     0x0000 0xBB3D
x25           0x1021  0xFFFF  yes     yes     0xFFFF 0x906E
crc32         (zlib / ISO-HDLC)                      0xCBF43926
============  ======  ======  ======  ======  =====  ======

The two unreflected variants use :func:`binascii.crc_hqx` (CRC-CCITT in C); the
reflected ones use a 256-entry table built once at import.
"""

from __future__ import annotations

import binascii
import zlib
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

    from iotix.payload.spec import CRC16Algorithm

__all__ = ["CRC16_ALGORITHMS", "crc16", "crc16_function", "crc32"]


def _reflected_table(reversed_poly: int) -> tuple[int, ...]:
    """The byte table of a reflected CRC-16, from the bit-reversed polynomial."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ reversed_poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


# 0xA001 is 0x8005 bit-reversed (CRC-16/ARC family), 0x8408 is 0x1021 bit-reversed.
_TABLE_8005: Final = _reflected_table(0xA001)
_TABLE_1021: Final = _reflected_table(0x8408)


def _reflected(table: tuple[int, ...], init: int, xorout: int) -> Callable[[bytes], int]:
    """A table-driven reflected CRC-16 with the given initial value and final XOR."""

    def compute(data: bytes) -> int:
        crc = init
        for byte in data:
            crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
        return crc ^ xorout

    return compute


def _ccitt_false(data: bytes) -> int:
    return binascii.crc_hqx(data, 0xFFFF)


def _xmodem(data: bytes) -> int:
    return binascii.crc_hqx(data, 0)


_CRC16: Final[dict[str, Callable[[bytes], int]]] = {
    "modbus": _reflected(_TABLE_8005, 0xFFFF, 0x0000),
    "ccitt-false": _ccitt_false,
    "xmodem": _xmodem,
    "kermit": _reflected(_TABLE_1021, 0x0000, 0x0000),
    "arc": _reflected(_TABLE_8005, 0x0000, 0x0000),
    "x25": _reflected(_TABLE_1021, 0xFFFF, 0xFFFF),
}

#: Every CRC-16 algorithm name accepted by :func:`crc16`.
CRC16_ALGORITHMS: Final = frozenset(_CRC16)


def crc16_function(algorithm: CRC16Algorithm) -> Callable[[bytes], int]:
    """The function computing one CRC-16 variant, for callers that run it per message."""
    try:
        return _CRC16[algorithm]
    except KeyError:
        raise ValueError(
            f"unknown CRC-16 algorithm {algorithm!r}; use one of {sorted(_CRC16)}"
        ) from None


def crc16(data: bytes, algorithm: CRC16Algorithm) -> int:
    """The CRC-16 of ``data`` with the named algorithm, as an int in 0..0xFFFF."""
    return crc16_function(algorithm)(data)


def crc32(data: bytes) -> int:
    """The CRC-32 (ISO-HDLC, as zlib and Ethernet) of ``data``, in 0..0xFFFFFFFF."""
    return zlib.crc32(data) & 0xFFFFFFFF
