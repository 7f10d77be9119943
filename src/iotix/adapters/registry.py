"""Which adapter serves a URL scheme: built-in names, then entry points.

Built-in adapters are named lazily (``"module:Class"``), so a run imports only the
protocol it uses. Third-party adapters come from the entry-point group
``iotix.adapters``: an entry point's name is the URL scheme, its value the class::

    [project.entry-points."iotix.adapters"]
    udpjson = "iotix_udp_json:UDPJSONAdapter"

MQTT (``mqtt``, ``mqtts``, ``ws``, ``wss``) is the engine's own path and is not in the
registry. A class can also be passed directly to the engine (for tests).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, cast

from iotix.errors import IotixError

if TYPE_CHECKING:
    from iotix.adapters.base import Adapter

__all__ = [
    "BUILTIN_ADAPTERS",
    "DEFAULT_PORTS",
    "ENTRY_POINT_GROUP",
    "MQTT_SCHEMES",
    "AdapterNotFoundError",
    "adapter_for",
    "known_schemes",
]

ENTRY_POINT_GROUP = "iotix.adapters"

MQTT_SCHEMES = ("mqtt", "mqtts", "ws", "wss")
"""Served by the engine's own MQTT path."""

BUILTIN_ADAPTERS: dict[str, str] = {
    "http": "iotix.adapters.http:HTTPAdapter",
    "https": "iotix.adapters.http:HTTPAdapter",
    "coap": "iotix.adapters.coap:CoAPAdapter",
    "coaps": "iotix.adapters.coap:CoAPAdapter",
    "kafka": "iotix.adapters.kafka:KafkaAdapter",
    "memory": "iotix.adapters.memory:MemoryAdapter",
}

DEFAULT_PORTS: dict[str, int] = {
    "mqtt": 1883,
    "mqtts": 8883,
    "ws": 80,
    "wss": 443,
    "http": 80,
    "https": 443,
    "coap": 5683,
    "coaps": 5684,
    "kafka": 9092,
    "memory": 0,
}
"""The port a scheme's addresses have when they give none."""


class AdapterNotFoundError(IotixError):
    """No adapter serves a URL scheme, or its class cannot be imported."""

    def __init__(self, message: str, *, scheme: str) -> None:
        super().__init__(message)
        self.scheme = scheme


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_schemes() -> list[str]:
    """Every scheme a broker address may have here: MQTT's, built-in, installed."""
    return sorted({*MQTT_SCHEMES, *BUILTIN_ADAPTERS, *_plugins()})


def adapter_for(scheme: str) -> type[Adapter]:
    """The adapter class for ``scheme``: built in, else from an installed entry point.

    Raises :class:`AdapterNotFoundError` naming the known schemes, or why the class
    did not import.
    """
    target = BUILTIN_ADAPTERS.get(scheme) or _plugins().get(scheme)
    if target is None:
        raise AdapterNotFoundError(
            f"no adapter for {scheme}://; known: {', '.join(known_schemes())} (third-party "
            f"adapters register in the entry-point group {ENTRY_POINT_GROUP!r})",
            scheme=scheme,
        )
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        found = getattr(module, attribute)
    except (ImportError, AttributeError) as exc:
        raise AdapterNotFoundError(
            f"the adapter for {scheme}:// ({target}) cannot be loaded: {exc}", scheme=scheme
        ) from exc
    return cast("type[Adapter]", found)
