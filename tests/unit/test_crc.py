"""CRC-16 variants and CRC-32: catalogue check values and a bitwise reference."""

from __future__ import annotations

import binascii
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotix.payload.crc import CRC16_ALGORITHMS, crc16, crc16_function, crc32

if TYPE_CHECKING:
    from iotix.payload.spec import CRC16Algorithm

CHECK_INPUT = b"123456789"

# (poly, init, reflected, xorout) from the reveng catalogue, for the bitwise reference.
PARAMETERS: dict[str, tuple[int, int, bool, int]] = {
    "modbus": (0x8005, 0xFFFF, True, 0x0000),
    "ccitt-false": (0x1021, 0xFFFF, False, 0x0000),
    "xmodem": (0x1021, 0x0000, False, 0x0000),
    "kermit": (0x1021, 0x0000, True, 0x0000),
    "arc": (0x8005, 0x0000, True, 0x0000),
    "x25": (0x1021, 0xFFFF, True, 0xFFFF),
}


def reflect(value: int, width: int) -> int:
    return int(f"{value:0{width}b}"[::-1], 2)


def bitwise_crc16(data: bytes, algorithm: str) -> int:
    """The textbook shift-register CRC, one bit at a time, no tables."""
    poly, crc, reflected, xorout = PARAMETERS[algorithm]
    for byte in data:
        crc ^= (reflect(byte, 8) if reflected else byte) << 8
        for _ in range(8):
            crc = ((crc << 1) ^ poly if crc & 0x8000 else crc << 1) & 0xFFFF
    return (reflect(crc, 16) if reflected else crc) ^ xorout


@pytest.mark.parametrize(
    ("algorithm", "check"),
    [
        ("modbus", 0x4B37),
        ("ccitt-false", 0x29B1),
        ("xmodem", 0x31C3),
        ("kermit", 0x2189),
        ("arc", 0xBB3D),
        ("x25", 0x906E),
    ],
)
def test_crc16_gives_the_catalogue_check_value(algorithm: CRC16Algorithm, check: int) -> None:
    assert crc16(CHECK_INPUT, algorithm) == check


def test_crc32_gives_the_catalogue_check_value() -> None:
    assert crc32(CHECK_INPUT) == 0xCBF43926


def test_every_algorithm_has_a_reference() -> None:
    assert set(PARAMETERS) == CRC16_ALGORITHMS


@given(data=st.binary(max_size=64), algorithm=st.sampled_from(sorted(PARAMETERS)))
def test_crc16_matches_the_bitwise_reference(data: bytes, algorithm: CRC16Algorithm) -> None:
    assert crc16(data, algorithm) == bitwise_crc16(data, algorithm)


@given(data=st.binary(max_size=64))
def test_crc16_xmodem_matches_binascii(data: bytes) -> None:
    assert crc16(data, "xmodem") == binascii.crc_hqx(data, 0)


def test_crc16_of_nothing_is_the_initial_value_after_xorout() -> None:
    assert crc16(b"", "modbus") == 0xFFFF
    assert crc16(b"", "x25") == 0x0000


def test_crc16_function_rejects_an_unknown_algorithm() -> None:
    with pytest.raises(ValueError, match="crc-16/foo"):
        crc16_function("crc-16/foo")  # type: ignore[arg-type]
