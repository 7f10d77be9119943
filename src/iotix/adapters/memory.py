"""An adapter that keeps every message in memory: for tests of the engine and of
plugins, and to see what a model sends without a server (``memory://NAME``).

Each endpoint name is one :class:`MemoryHub` in the worker's process. Options:
``refuse`` (a list of device ids whose connections are refused), ``fail_every`` (every
N-th message is not confirmed, with the error ``memory refused``) and ``latency_s`` (how
long a confirmation takes).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self

from iotix.adapters.base import AdapterError, Delivery

if TYPE_CHECKING:
    from types import TracebackType

    from iotix.adapters.base import AdapterSettings, DeviceIdentity, OutgoingMessage
    from iotix.engine.worker import BrokerEndpoint

__all__ = ["MemoryAdapter", "MemoryHub"]


@dataclass
class MemoryHub:
    """What the devices of one ``memory://NAME`` endpoint sent, in order."""

    messages: list[tuple[str, OutgoingMessage]] = field(default_factory=list)
    connected: set[str] = field(default_factory=set)


class _MemoryLink:
    def __init__(self, adapter: MemoryAdapter, device: DeviceIdentity) -> None:
        self.adapter = adapter
        self.device = device

    async def send(self, message: OutgoingMessage) -> Delivery:
        adapter = self.adapter
        started = time.perf_counter()
        adapter.count += 1
        if adapter.fail_every and adapter.count % adapter.fail_every == 0:
            return Delivery(sent=True, confirmed=False, error="memory refused")
        adapter.hub.messages.append((self.device.device_id, message))
        if adapter.latency_s:
            await asyncio.sleep(adapter.latency_s)
        return Delivery(
            sent=True, confirmed=message.confirm, latency_s=time.perf_counter() - started
        )

    async def aclose(self) -> None:
        self.adapter.hub.connected.discard(self.device.device_id)


class MemoryAdapter:
    """See the module docstring."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    hubs: ClassVar[dict[str, MemoryHub]] = {}
    """Every hub of this process, by endpoint name (tests read them)."""

    def __init__(self, endpoint: BrokerEndpoint, settings: AdapterSettings) -> None:
        options: dict[str, Any] = dict(settings.options)
        self.hub = self.hubs.setdefault(endpoint.host, MemoryHub())
        self.refuse = set(options.get("refuse", ()))
        self.fail_every = int(options.get("fail_every", 0))
        self.latency_s = float(options.get("latency_s", 0.0))
        self.count = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.hub.connected.clear()

    async def connect(self, device: DeviceIdentity) -> _MemoryLink:
        if device.device_id in self.refuse:
            raise AdapterError(f"{device.device_id} refused by the memory hub", kind="refused")
        self.hub.connected.add(device.device_id)
        return _MemoryLink(self, device)
