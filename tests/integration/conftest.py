"""Integration fixtures: real servers on 127.0.0.1, on free ports, stopped after use.

- ``mosquitto``: a fresh Mosquitto 2 broker for one test (crash it, restart it, fill it).
- ``mosquitto_session``: one broker shared by the whole session, for tests that only
  publish and subscribe; use unique topics, since other tests share it.
- ``mosquitto_binary``: the installed ``mosquitto``, for tests that build their own
  :class:`~iotix.testing.MosquittoBroker` (several at once, password files, TLS).

A missing Mosquitto fails the tests that need it, with the fix, instead of skipping
them: a green run must mean the integration tests ran.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from iotix.testing import MosquittoBroker, find_mosquitto

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture(scope="session")
def mosquitto_binary() -> Path:
    """The installed ``mosquitto``; fails the test (not skips it) when there is none."""
    binary = find_mosquitto()
    if binary is None:
        pytest.fail(
            "Mosquitto 2 is not installed, and the integration tests start real brokers: "
            "run scripts/services (it installs Debian's `mosquitto` package).",
            pytrace=False,
        )
    return binary


@pytest.fixture
def mosquitto(mosquitto_binary: Path) -> Iterator[MosquittoBroker]:
    """A broker of its own for one test, stopped (and its directory removed) after it."""
    with MosquittoBroker(binary=mosquitto_binary) as broker:
        yield broker


@pytest.fixture(scope="session")
def mosquitto_session(mosquitto_binary: Path) -> Iterator[MosquittoBroker]:
    """One broker shared by every test of the session; do not kill or restart it."""
    with MosquittoBroker(binary=mosquitto_binary) as broker:
        yield broker
