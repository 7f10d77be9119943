"""Helpers for testing with iotix: real servers started on free ports and stopped after.

Used by iotix's own integration tests and benchmarks, and meant for users writing theirs::

    from iotix.testing import MosquittoBroker

    with MosquittoBroker() as broker:
        ...  # connect devices to broker.host, broker.port

Importing this package starts nothing and needs no test framework.
"""

from iotix.testing.mosquitto import (
    MosquittoBroker,
    MosquittoError,
    MosquittoNotFoundError,
    TLSListenerSpec,
    find_mosquitto,
)

__all__ = [
    "MosquittoBroker",
    "MosquittoError",
    "MosquittoNotFoundError",
    "TLSListenerSpec",
    "find_mosquitto",
]
