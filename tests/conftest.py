"""Fixtures for every kind of test."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_on_path() -> Iterator[None]:
    """bench/ on ``sys.path`` for the test: the bench scripts import each other (and
    their harness) by name, as they do when run as scripts."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        yield
    finally:
        sys.path.remove(str(BENCH_DIR))
