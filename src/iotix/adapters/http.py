"""HTTP devices: each message a request (POST by default) to the endpoint's base URL
and the message's topic, over keep-alive connections (aiohttp).

``http://host:port/base`` and a model topic ``devices/{device_id}/telemetry`` make
``POST http://host:port/base/devices/thermo-00001/telemetry`` with the payload as the
body. A 2xx response confirms the message; any other status, a timeout or a broken
connection is counted by kind (``http 503``, ``timeout``, ``reset``). HTTP always
answers, so every message is counted as acknowledged or failed, whatever the model's
QoS.

Options (``adapter_options`` of a run or a scenario fleet):

- ``method``: ``POST`` (default) or ``PUT``;
- ``content_type``: the body's type (default ``application/json``);
- ``headers``: a mapping of header names to templates over ``{device_id}``,
  ``{index}``, ``{username}`` and ``{password}`` (per-device tokens:
  ``{"Authorization": "Bearer {password}"}``);
- without such a header, a device with a user name and password sends them as HTTP
  basic authentication.

Each request carries ``iotix-ts-ms`` and ``iotix-name`` headers (the send time and the
message's name), so a back end can measure end-to-end latency.

**Commands** (option ``commands``): each device asks ``GET base/<path>`` for its
commands, where ``path`` is a template over ``{device_id}`` and ``{index}`` (default
``devices/{device_id}/commands``), every ``interval`` seconds (default 5). With
``long_poll`` (seconds) the request asks the server to hold it that long
(``?wait=<seconds>``) and the next one follows at once. An answer ``200`` with a JSON
body ``{"command": NAME, "payload": {...}}``, or a list of them, hands each command to
the device (its model's handler answers, on its reply topic, by POST like any message);
``204`` or ``404`` means none.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any, ClassVar, Self

import aiohttp
from yarl import URL

from iotix.adapters.base import AdapterError, Command, Delivery

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from iotix.adapters.base import AdapterSettings, DeviceIdentity, OutgoingMessage
    from iotix.engine.worker import BrokerEndpoint

__all__ = ["HTTPAdapter"]

METHODS = ("POST", "PUT")
URLS_PER_DEVICE = 64
"""A device's URLs are kept parsed, one per topic, up to this many (a topic template
with a sequence number in it would otherwise grow without bound)."""


class _HTTPLink:
    """One device: its headers, prepared once, and its command poller."""

    def __init__(self, adapter: HTTPAdapter, headers: Mapping[str, str]) -> None:
        self.adapter = adapter
        self.headers = dict(headers)
        self.urls: dict[str, URL] = {}
        self.poller: asyncio.Task[None] | None = None

    async def poll(self, device_id: str, url: str) -> None:
        """Ask for commands until closed (see the module docstring)."""
        adapter = self.adapter
        settings = adapter.commands
        interval_s = float(settings.get("interval", 5.0))
        wait_s = float(settings.get("long_poll", 0.0))
        params = {"wait": f"{wait_s:g}"} if wait_s else None
        timeout = aiohttp.ClientTimeout(total=wait_s + adapter.timeout_s)
        while adapter.session is not None:
            session = adapter.session
            try:
                async with session.get(
                    url, headers=self.headers, params=params, timeout=timeout
                ) as response:
                    body = await response.read()
                    status = response.status
            except (aiohttp.ClientError, OSError, TimeoutError):
                status, body = 0, b""
            if status == 200:
                adapter.deliver_commands(device_id, body)
            if not wait_s or status != 200:
                await asyncio.sleep(interval_s)

    async def send(self, message: OutgoingMessage) -> Delivery:
        adapter = self.adapter
        session = adapter.session
        if session is None:
            return Delivery(sent=False, error="not sent: adapter closed")
        url = self.urls.get(message.topic)
        if url is None:
            if len(self.urls) >= URLS_PER_DEVICE:
                self.urls.clear()
            url = URL(f"{adapter.base_url}/{message.topic.lstrip('/')}")
            self.urls[message.topic] = url
        headers = {**self.headers, **message.headers}
        started = time.perf_counter()
        try:
            async with session.request(
                adapter.method, url, data=message.payload, headers=headers
            ) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            return Delivery(sent=True, error="timeout")
        except aiohttp.ClientConnectorError:
            return Delivery(sent=False, error="unreachable")
        except (aiohttp.ClientError, OSError):
            return Delivery(sent=True, error="reset")
        latency = time.perf_counter() - started
        if 200 <= status < 300:
            return Delivery(sent=True, confirmed=True, latency_s=latency)
        return Delivery(sent=True, latency_s=latency, error=f"http {status}")

    async def aclose(self) -> None:
        poller, self.poller = self.poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller


class HTTPAdapter:
    """See the module docstring."""

    schemes: ClassVar[tuple[str, ...]] = ("http", "https")
    always_confirms: ClassVar[bool] = True

    def __init__(self, endpoint: BrokerEndpoint, settings: AdapterSettings) -> None:
        options: dict[str, Any] = dict(settings.options)
        self.method = str(options.get("method", "POST")).upper()
        if self.method not in METHODS:
            raise AdapterError(
                f"HTTP method {self.method!r}: devices send with one of {', '.join(METHODS)}",
                kind="configuration",
            )
        self.content_type = str(options.get("content_type", "application/json"))
        templates = options.get("headers") or {}
        if not isinstance(templates, dict):
            raise AdapterError(
                "HTTP headers are a mapping of names to templates", kind="configuration"
            )
        self.header_templates = {str(k): str(v) for k, v in templates.items()}
        self.base_url = f"{'https' if endpoint.tls else 'http'}://{endpoint.host}:{endpoint.port}{endpoint.path}"
        self.timeout_s = settings.timeout_s
        self.session: aiohttp.ClientSession | None = None
        commands = options.get("commands")
        if commands is not None and not isinstance(commands, dict):
            raise AdapterError(
                "HTTP commands is a mapping: {path, interval, long_poll}", kind="configuration"
            )
        self.commands: dict[str, Any] = dict(commands or {})
        self.on_command = settings.on_command

    async def __aenter__(self) -> Self:
        connector = aiohttp.TCPConnector(limit=0)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            headers={"Content-Type": self.content_type, "User-Agent": "iotix"},
            auto_decompress=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close()
            await asyncio.sleep(0)  # let the connector's transports close

    async def connect(self, device: DeviceIdentity) -> _HTTPLink:
        values = {
            "device_id": device.device_id,
            "index": device.index,
            "username": device.username or "",
            "password": device.password or "",
        }
        try:
            headers = {
                name: template.format(**values) for name, template in self.header_templates.items()
            }
        except (KeyError, IndexError, ValueError) as exc:
            raise AdapterError(f"HTTP header template: {exc}", kind="configuration") from exc
        if "Authorization" not in headers and device.username is not None:
            secret = f"{device.username}:{device.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(secret).decode("ascii")
        link = _HTTPLink(self, headers)
        if self.commands:
            path = str(self.commands.get("path", "devices/{device_id}/commands"))
            try:
                url = f"{self.base_url}/{path.format(**values).lstrip('/')}"
            except (KeyError, IndexError, ValueError) as exc:
                raise AdapterError(f"HTTP commands path: {exc}", kind="configuration") from exc
            link.poller = asyncio.create_task(link.poll(device.device_id, url))
        return link

    def deliver_commands(self, device_id: str, body: bytes) -> None:
        """Hand the commands of a poll's answer to the device (bad ones are skipped)."""
        if self.on_command is None:
            return
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            return
        for item in parsed if isinstance(parsed, list) else [parsed]:
            if isinstance(item, dict) and isinstance(item.get("command"), str):
                payload = json.dumps(item.get("payload", {})).encode()
                self.on_command(device_id, Command(item["command"], payload))
