"""The seam between the fleet engine and a protocol: the adapter interface.

A protocol adapter puts one device's messages on the wire and says what became of each
one. The engine's MQTT path is built in and specialised (batched writes, 100K devices a
machine, see :mod:`iotix.engine.worker`); every other protocol — built in (HTTP, CoAP,
Kafka, memory) or a third party's — comes through this interface and runs in
:class:`iotix.engine.message_worker.MessageWorker`.

An adapter is a class, constructed once per worker process with the endpoint and the
run's :class:`AdapterSettings`, used as an async context manager (it owns what the
devices share: a connection pool, a producer, a socket table), and asked for one
:class:`DeviceLink` per device::

    async with adapter_class(endpoint, settings) as adapter:
        link = await adapter.connect(DeviceIdentity("thermo-00001", 1))
        delivery = await link.send(OutgoingMessage(topic, payload, confirm=True))
        await link.aclose()

What every send returns is one typed measurement, :class:`Delivery`: whether the
message went out, whether the peer confirmed it, the confirmation's latency and, when
it failed, a short kind ("http 503", "coap 4.04", "timeout") that the engine counts per
kind. So the statistics are the same for every protocol. An adapter raises
:class:`AdapterError` (or a subclass) for what stops a device from connecting; a
failed send is a :class:`Delivery`, never an exception. Third-party exceptions are
translated at the adapter's boundary (``raise AdapterError(...) from exc``).

Third-party adapters register under the entry-point group ``iotix.adapters``, by URL
scheme: ``myproto = "my_package.adapter:MyAdapter"`` makes ``myproto://host:port`` a
broker address (see :mod:`iotix.adapters.registry` and docs/adapters.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, runtime_checkable

from iotix.errors import IotixError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import TracebackType

    from iotix.engine.worker import BrokerEndpoint

__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterSettings",
    "Command",
    "Delivery",
    "DeviceIdentity",
    "DeviceLink",
    "OutgoingMessage",
]


class AdapterError(IotixError):
    """A device could not connect (or an adapter could not start): the endpoint is
    unreachable, refused the device, or the adapter is misconfigured. ``kind`` is what
    the engine counts it under (``unreachable``, ``refused``, ``http 401``...)."""

    def __init__(self, message: str, *, kind: str = "unreachable") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who a device is, for the adapter: its id, its index in the fleet, and the
    credentials the run gives it (templates already filled)."""

    device_id: str
    index: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message a device sends.

    ``topic`` is the model's rendered topic (a URL path for HTTP, a resource for CoAP,
    a topic for Kafka); ``confirm`` asks for a confirmation the adapter waits for (a
    model's QoS 1 or 2: HTTP always answers; CoAP sends it confirmable; Kafka waits for
    the broker's ack); ``key`` orders messages (Kafka's record key: the device id).
    ``headers`` carry the send time and sequence number where the protocol has headers.
    """

    topic: str
    payload: bytes
    confirm: bool = True
    key: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of one message: the typed measurement every adapter reports.

    ``sent``: it left the device (written to a socket, handed to a producer).
    ``confirmed``: the peer confirmed it (an HTTP 2xx, a CoAP ACK or 2.xx response, a
    Kafka ack). ``latency_s``: send to confirmation, or None. ``error``: why it was not
    sent or not confirmed, counted per kind (``http 503``, ``coap 4.04``, ``timeout``,
    ``reset``); None when all went well. ``retransmissions``: protocol-level resends
    (CoAP), counted too.
    """

    sent: bool
    confirmed: bool = False
    latency_s: float | None = None
    error: str | None = None
    retransmissions: int = 0


@dataclass(frozen=True, slots=True)
class Command:
    """A command a device received by its protocol's own means (an HTTP poll's answer,
    a CoAP PUT to the device's resource): its name and JSON body."""

    name: str
    payload: bytes


class DeviceLink(Protocol):
    """One device's connection through an adapter."""

    async def send(self, message: OutgoingMessage) -> Delivery:
        """Send one message; never raises for a failed send (see :class:`Delivery`)."""
        ...

    async def aclose(self) -> None:
        """Close the device's connection (idempotent)."""
        ...


@dataclass(frozen=True)
class AdapterSettings:
    """What a run tells every adapter (the endpoint comes separately).

    ``timeout_s`` bounds a confirmation (the engine sends a message that was not
    confirmed again as many times as the run's ``retries`` option says); ``options`` holds the
    protocol's own settings, from the model's or the run's ``adapter`` options (HTTP
    method and headers, CoAP method, Kafka acks...). ``on_command`` is called with each
    command a device receives by the protocol's own means.
    """

    timeout_s: float = 10.0
    options: Mapping[str, Any] = field(default_factory=dict)
    on_command: Callable[[str, Command], None] | None = None


@runtime_checkable
class Adapter(Protocol):
    """A protocol adapter: see the module docstring."""

    schemes: ClassVar[tuple[str, ...]]
    """The URL schemes it serves (``("http", "https")``)."""

    def __init__(self, endpoint: BrokerEndpoint, settings: AdapterSettings) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    async def connect(self, device: DeviceIdentity) -> DeviceLink:
        """One device's link; raises :class:`AdapterError` when it cannot connect."""
        ...
