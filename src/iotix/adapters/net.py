"""Opening TCP (and TLS) streams for many clients on one machine.

:func:`create_stream` is ``loop.create_connection`` with one difference that matters at
scale: a local source address is bound with ``IP_BIND_ADDRESS_NO_PORT``, so the kernel
picks the source port per destination at connect time. Bound the usual way (port 0 at
bind time) a port is taken for every destination at once, and one source address serves
about 28K connections in all instead of about 28K per broker endpoint (DESIGN.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

__all__ = ["create_stream"]

_ProtocolT = TypeVar("_ProtocolT", bound=asyncio.BaseProtocol)

_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2+


async def create_stream(
    protocol_factory: Callable[[], _ProtocolT],
    host: str,
    port: int,
    *,
    ssl: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    local_address: str | None = None,
) -> tuple[asyncio.BaseTransport, _ProtocolT]:
    """Connect ``protocol_factory``'s protocol to ``host:port`` (TLS with ``ssl``,
    checked against ``server_hostname`` or ``host``), from ``local_address`` if given."""
    loop = asyncio.get_running_loop()
    if local_address is None:
        return await loop.create_connection(
            protocol_factory,
            host,
            port,
            ssl=ssl,
            # Only meaningful with TLS: asyncio refuses it otherwise.
            server_hostname=server_hostname if ssl is not None else None,
        )
    sock = await _connected_socket(loop, host, port, local_address)
    try:
        return await loop.create_connection(
            protocol_factory,
            sock=sock,
            ssl=ssl,
            # With a socket instead of a host, TLS needs the name to check.
            server_hostname=(server_hostname or host) if ssl is not None else None,
        )
    except BaseException:
        sock.close()
        raise


async def _connected_socket(
    loop: asyncio.AbstractEventLoop, host: str, port: int, local_address: str
) -> socket.socket:
    try:
        address: tuple[Any, ...] = (str(ipaddress.ip_address(host)), port)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    except ValueError:  # a name: resolve it (IP literals, the usual case, need not)
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)  # noqa: FBT003 - the socket API
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
        sock.bind((local_address, 0))
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock
