"""Deterministic random streams, addressed by (seed, stream name, device index, draw).

A ``random.Random`` per device costs about 2.5 KiB and cannot be evaluated for a batch.
Instead every random number iotix draws is a pure function of the run seed, the name of
the stream (which field, which parameter), the device index and the draw number, hashed
with the SplitMix64 finaliser. The same device therefore sends the same values whatever
the batch size, the worker it lands on or the other devices in the run, and a batch of
10,000 draws costs a handful of vectorised integer operations.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_DRAW = np.uint64(0xD1B54A32D192ED03)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_TO_UNIT = 2.0**-53


def _mix(x: U64) -> U64:
    """SplitMix64 finaliser: a bijection on 64-bit words with strong avalanche."""
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


class Stream:
    """One named stream of random numbers for a set of devices.

    ``indices`` are the devices' global indices; ``rows`` arguments select positions in
    that array, and ``draws`` says which draw of each selected device is wanted.
    """

    __slots__ = ("_keys", "name")

    def __init__(self, seed: int, name: str, indices: npt.NDArray[np.int64]) -> None:
        digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
        key = np.uint64(int.from_bytes(digest, "little"))
        self.name = name
        # One pre-mixed key per device: 8 bytes a device, and one multiply less per draw.
        self._keys: U64 = _mix(indices.astype(np.uint64) * _GOLDEN ^ key)

    def bits(self, rows: npt.NDArray[np.intp] | slice, draws: npt.ArrayLike) -> U64:
        """64 random bits per selected device for the given draw numbers."""
        draw_words = np.asarray(draws, dtype=np.uint64) * _DRAW
        return _mix(self._keys[rows] ^ draw_words)

    def uniform(self, rows: npt.NDArray[np.intp] | slice, draws: npt.ArrayLike) -> F64:
        """Uniform floats in [0, 1)."""
        return (self.bits(rows, draws) >> _S11).astype(np.float64) * _TO_UNIT

    def normal(self, rows: npt.NDArray[np.intp] | slice, draws: npt.ArrayLike) -> F64:
        """Standard normal floats (Box-Muller over two uniforms of consecutive draws)."""
        base = np.asarray(draws, dtype=np.uint64) * np.uint64(2)
        u1 = 1.0 - self.uniform(rows, base)  # in (0, 1]: log is finite
        u2 = self.uniform(rows, base + np.uint64(1))
        result: F64 = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return result

    def exponential(
        self, rows: npt.NDArray[np.intp] | slice, draws: npt.ArrayLike, rate: Any
    ) -> F64:
        """Exponential gaps with the given rate (per second)."""
        result: F64 = -np.log1p(-self.uniform(rows, draws)) / rate
        return result

    def choice(
        self,
        rows: npt.NDArray[np.intp] | slice,
        draws: npt.ArrayLike,
        cumulative: F64,
    ) -> npt.NDArray[np.intp]:
        """Indices into a weighted table, given its cumulative weights ending in 1.0."""
        picked: npt.NDArray[np.intp] = np.searchsorted(
            cumulative, self.uniform(rows, draws), side="right"
        )
        return np.minimum(picked, len(cumulative) - 1)


def cumulative_weights(weights: list[float] | None, count: int) -> F64:
    """Normalised cumulative weights for ``Stream.choice`` (even when ``weights`` is None)."""
    raw = np.ones(count) if weights is None else np.asarray(weights, dtype=np.float64)
    cumulative: F64 = np.cumsum(raw) / raw.sum()
    cumulative[-1] = 1.0
    return cumulative
