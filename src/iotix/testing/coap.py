"""Real CoAP servers on free ports, for tests of CoAP devices.

Two servers, two purposes:

- :class:`LibCoAPServer` runs libcoap's ``coap-server`` (Debian ``libcoap3-bin``) as a
  process, the way :class:`~iotix.testing.MosquittoBroker` runs Mosquitto: on a free
  UDP port of 127.0.0.1, its debug log in a private directory, stopped after. It
  creates a resource for every path a device PUTs to (``-d``), answers GET on it, and
  with ``psk`` also listens for DTLS-PSK (``coaps://``) on the next port. What it
  received is parsed from its log (:meth:`LibCoAPServer.received`)::

      with LibCoAPServer() as server:
          run_devices(f"{server.url}/base")       # coap://127.0.0.1:PORT/base
          assert len(server.received()) == 100

- :class:`RecordingCoAPServer` is an in-process aiocoap server (an independent
  implementation of CoAP) for asyncio tests. It records every request (after
  block-wise reassembly) and every datagram in and out at its message layer, and can
  misbehave on chosen paths: answer with another code, drop the first transmission of
  each CON, or hold the response back (so it goes as a separate response)::

      async with RecordingCoAPServer(codes={"missing": 0x84}, drop_first={"flaky"}) as server:
          ...                                     # server.url, server.requests

Facts worth knowing:

- Debian installs ``coap-server`` under the name of its TLS library:
  ``coap-server-openssl``, ``coap-server-gnutls`` and ``coap-server-notls``; a plain
  ``coap-server`` is found first if there is one. DTLS needs one built with a TLS
  library.
- libcoap also listens on TCP on the same port (and TLS/DTLS on the next one with a
  key): all ports it needs are chosen free together, and a start that loses the race
  for one is retried on new ports.
- ``coap-server`` logs every PDU at verbosity 7; that log is how :meth:`received`
  knows what arrived, so keep ``verbosity`` at 7 when you count.
- aiocoap must be installed for :class:`RecordingCoAPServer` (it is a test
  dependency); importing this module does not import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from iotix.protocols.coap import (
    BlockOption,
    CoAPFormatError,
    CoAPMessage,
    Code,
    MessageType,
    OptionNumber,
    code_text,
    decode,
    encode,
    path_options,
)
from iotix.testing.process import ServerProcess, ServerProcessError, find_program, given_program

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence
    from types import TracebackType

__all__ = [
    "CoAPServerError",
    "CoAPServerNotFoundError",
    "LibCoAPServer",
    "ReceivedPDU",
    "RecordedDatagram",
    "RecordedRequest",
    "RecordingCoAPServer",
    "coap_get",
    "find_coap_server",
]

_BINARIES = ("coap-server", "coap-server-openssl", "coap-server-gnutls", "coap-server-notls")
_PORT_ATTEMPTS = 5
# How long a readiness GET waits for an answer.
_READY_TIMEOUT_S = 0.05
# coap_show_pdu's line (libcoap 4.3): "v:1 t:CON c:PUT i:5407 {01} [ Uri-Path:a ] :: 'x'"
_PDU_LINE = re.compile(
    r"^v:1 t:(?P<type>CON|NON|ACK|RST) c:(?P<code>\S+) i:(?P<mid>[0-9a-f]{4}) "
    r"\{(?P<token>[0-9a-f]*)\} \[(?P<options>.*?)\]( :: (?P<payload>.*))?$"
)


class CoAPServerError(ServerProcessError):
    """A CoAP test server could not be started; ``log_tail`` holds its last log lines."""

    _log_label = "coap-server"


class CoAPServerNotFoundError(CoAPServerError):
    """libcoap's ``coap-server`` is not installed (or none built with DTLS is)."""

    def __init__(self, *, dtls: bool) -> None:
        what = (
            "a coap-server built with DTLS (coap-server-openssl or -gnutls)"
            if dtls
            else "coap-server"
        )
        super().__init__(
            f"{what} is not installed: install libcoap's examples (Debian/Ubuntu package "
            "`libcoap3-bin`); in the iotix repository, run scripts/services"
        )


def find_coap_server(*, dtls: bool = False) -> Path | None:
    """The path of libcoap's ``coap-server`` (one with DTLS when ``dtls``), or None."""
    for name in _BINARIES:
        if dtls and name.endswith("-notls"):
            continue
        found = shutil.which(name)
        if found is not None:
            return Path(found)
    return None


@dataclass(frozen=True)
class ReceivedPDU:
    """A request or message ``coap-server`` logged as received."""

    type: str  # CON, NON, ACK, RST
    code: str  # PUT, POST, GET... or 2.04 for a response
    message_id: int
    path: tuple[str, ...]
    payload: str  # as libcoap prints it (text, or hex for binary bodies)
    options: str  # the option list as printed


def _free_udp_ports(host: str, count: int) -> list[int]:
    """``count`` consecutive ports, free for UDP and TCP on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                        sock = stack.enter_context(socket.socket(family, kind))
                        sock.bind((host, port))
            except OSError:
                continue
            return list(range(first, first + count))
    raise CoAPServerError(f"no {count} consecutive free ports on {host}")


def coap_get(host: str, port: int, path: str, *, timeout_s: float = 2.0) -> tuple[str, bytes]:
    """GET ``path`` from a CoAP server with a plain blocking socket: the response's code
    (``"2.05"``) and payload, every Block2 block of it fetched (RFC 7959 section 2.4).
    Raises :class:`TimeoutError` when nothing answers within ``timeout_s`` in all."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout_s
    body = b""
    block: BlockOption | None = None
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        while True:
            options = path_options(path.split("/"))
            if block is not None:
                options.append((int(OptionNumber.BLOCK2), block.encode()))
            request = CoAPMessage(
                MessageType.CON,
                Code.GET,
                int.from_bytes(os.urandom(2), "big"),
                os.urandom(4),
                tuple(options),
            )
            response = _exchange(sock, request, deadline, f"coap://{host}:{port}/{path}")
            body += response.payload
            received = response.block2
            if received is None or not received.more:
                return code_text(response.code), body
            block = BlockOption(received.number + 1, more=False, szx=received.szx)


def _exchange(sock: socket.socket, request: CoAPMessage, deadline: float, url: str) -> CoAPMessage:
    sock.sendall(encode(request))
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer from {url}")
        sock.settimeout(remaining)
        try:
            data = sock.recv(65535)
        except ConnectionRefusedError:
            raise TimeoutError(f"nothing listens at {url}") from None
        except TimeoutError:
            continue
        try:
            response = decode(data)
        except CoAPFormatError:
            continue
        if response.token == request.token and response.code != Code.EMPTY:
            if response.type is MessageType.CON:
                sock.sendall(encode(CoAPMessage(MessageType.ACK, Code.EMPTY, response.message_id)))
            return response


class LibCoAPServer(ServerProcess):
    """libcoap's ``coap-server`` on free ports of ``host``: see the module docstring.

    ``psk`` enables DTLS-PSK on :attr:`dtls_port` (the port after :attr:`port`) with
    that key for every identity. ``dynamic_resources`` is how many resources PUTs may
    create (``-d``). ``extra_args`` are passed verbatim.
    """

    _program = "coap-server"
    _file_stem = "coap-server"
    _error = CoAPServerError
    _readiness = "answer a GET"
    _port_taken_markers = (b"in use",)

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        psk: str | None = None,
        dynamic_resources: int = 100_000,
        verbosity: int = 7,
        extra_args: Sequence[str] = (),
        binary: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(host=host, start_timeout_s=start_timeout_s, stop_timeout_s=stop_timeout_s)
        self._psk = psk
        self._dynamic_resources = dynamic_resources
        self._verbosity = verbosity
        self._extra_args = tuple(extra_args)
        self._binary = Path(binary) if binary is not None else None

    @property
    def port(self) -> int:
        """The plain CoAP (UDP) port."""
        return self._port("coap")

    @property
    def dtls_port(self) -> int:
        """The DTLS port (needs ``psk``): libcoap listens on the port after :attr:`port`."""
        if self._psk is None:
            raise CoAPServerError("the server has no DTLS listener: give it a psk")
        return self._port("dtls")

    @property
    def url(self) -> str:
        return f"coap://{self._netloc(self.port)}"

    @property
    def coaps_url(self) -> str:
        return f"coaps://{self._netloc(self.dtls_port)}"

    def received(self) -> list[ReceivedPDU]:
        """Every PDU the server logged as received, in order (needs verbosity 7)."""
        pdus = []
        incoming = False
        for line in self.log_text().splitlines():
            if " received " in line and line.rstrip().endswith("bytes"):
                incoming = True
                continue
            match = _PDU_LINE.match(line)
            if match is not None and incoming:
                options = match["options"]
                path = tuple(re.findall(r"Uri-Path:([^,\]]*?)(?:,|\s*$)", options.strip()))
                pdus.append(
                    ReceivedPDU(
                        match["type"],
                        match["code"],
                        int(match["mid"], 16),
                        tuple(segment.strip() for segment in path),
                        (match["payload"] or "").strip().strip("'"),
                        options.strip(),
                    )
                )
            incoming = False
        return pdus

    def requests(self, path_prefix: Sequence[str] = ()) -> list[ReceivedPDU]:
        """The received requests (not ACKs or RSTs) under ``path_prefix``."""
        prefix = tuple(path_prefix)
        return [
            pdu
            for pdu in self.received()
            if pdu.code in ("GET", "POST", "PUT", "DELETE", "FETCH", "PATCH", "iPATCH")
            and pdu.path[: len(prefix)] == prefix
        ]

    def get(self, path: str, *, timeout_s: float = 2.0) -> tuple[str, bytes]:
        """GET ``path`` (``"base/dev/telemetry"``) over plain CoAP: code and payload."""
        return coap_get(self._host, self.port, path, timeout_s=timeout_s)

    def _resolve_binary(self) -> Path:
        dtls = self._psk is not None
        given = self._binary
        binary = (
            find_coap_server(dtls=dtls) if given is None else given_program(given, find_program)
        )
        if binary is None:
            raise CoAPServerNotFoundError(dtls=dtls)
        return binary.absolute()

    def _pick_ports(self) -> dict[str, int]:
        if self._psk is None:
            return {"coap": _free_udp_ports(self._host, 1)[0]}
        coap, dtls = _free_udp_ports(self._host, 2)
        return {"coap": coap, "dtls": dtls}

    def _command(self, binary: Path) -> list[str]:
        command = [str(binary), "-A", self._host, "-p", str(self.port), "-v", str(self._verbosity)]
        if self._dynamic_resources:
            command += ["-d", str(self._dynamic_resources)]
        if self._psk is not None:
            command += ["-k", self._psk]
        return [*command, *self._extra_args]

    def _ready(self, log: bytes) -> bool:
        del log
        try:
            coap_get(self._host, self.port, "", timeout_s=_READY_TIMEOUT_S)
        except TimeoutError:
            return False
        return True


# --- an in-process aiocoap server ------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the server's resource saw it (a Block1 body reassembled)."""

    method: str
    path: tuple[str, ...]
    payload: bytes
    content_format: int | None
    remote: str
    query: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecordedDatagram:
    """One message at the server's message layer, in or out."""

    type: str  # CON, NON, ACK, RST
    code: str  # "0.02" (POST), "2.04"...
    message_id: int
    token: bytes
    path: tuple[str, ...]
    block1: tuple[int, bool, int] | None  # (number, more, szx)
    dropped: bool = False


@dataclass
class _Behaviour:
    codes: dict[tuple[str, ...], int]
    drop_first: set[tuple[str, ...]]
    hold: set[tuple[str, ...]]
    dropped: set[tuple[Any, int]] = field(default_factory=set)

    @staticmethod
    def matches(path: tuple[str, ...], prefixes: Collection[tuple[str, ...]]) -> bool:
        return any(path[: len(prefix)] == prefix for prefix in prefixes)


def _split(path: str) -> tuple[str, ...]:
    return tuple(segment for segment in path.split("/") if segment)


class RecordingCoAPServer:
    """An aiocoap server on a free port of ``host``, recording what it receives.

    Every request path answers 2.04 (2.05 to a GET, with the last body PUT or POSTed
    there), except: paths under a prefix in ``codes`` answer with its code (``{"missing":
    0x84}`` for 4.04); under ``drop_first`` the first transmission of every CON is
    dropped (so the client must retransmit); under ``hold`` the response waits until
    :attr:`release` is set, so aiocoap acknowledges first and answers separately.
    Prefixes are paths like ``"base/missing"``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        codes: Mapping[str, int] | None = None,
        drop_first: Collection[str] = (),
        hold: Collection[str] = (),
    ) -> None:
        self.host = host
        self.port = 0
        self.requests: list[RecordedRequest] = []
        self.datagrams: list[RecordedDatagram] = []
        self.sent: list[RecordedDatagram] = []
        self.release = asyncio.Event()
        self.bodies: dict[tuple[str, ...], bytes] = {}
        self._behaviour = _Behaviour(
            {_split(path): code for path, code in (codes or {}).items()},
            {_split(path) for path in drop_first},
            {_split(path) for path in hold},
        )
        self._context: Any = None

    @property
    def url(self) -> str:
        return f"coap://{self.host}:{self.port}"

    def requests_under(self, prefix: str) -> list[RecordedRequest]:
        wanted = _split(prefix)
        return [r for r in self.requests if r.path[: len(wanted)] == wanted]

    async def __aenter__(self) -> Self:
        try:
            import aiocoap  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415 - optional
        except ImportError as exc:
            raise CoAPServerError(
                "RecordingCoAPServer needs aiocoap (pip install aiocoap)"
            ) from exc
        site = _make_site(self)
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self.port = _free_udp_ports(self.host, 1)[0]
            try:
                self._context = await aiocoap.Context.create_server_context(
                    site, bind=(self.host, self.port), transports=["udp6"]
                )
            except OSError:
                if attempt == _PORT_ATTEMPTS:
                    raise
                continue
            break
        self._intercept()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release.set()
        context, self._context = self._context, None
        if context is not None:
            await context.shutdown()

    def _intercept(self) -> None:
        """Wrap aiocoap's message layer: record datagrams both ways, drop first CONs."""
        behaviour = self._behaviour
        for token_manager in self._context.request_interfaces:
            manager = getattr(token_manager, "token_interface", None)
            if manager is None or not hasattr(manager, "dispatch_message"):
                continue
            incoming = manager.dispatch_message
            outgoing = manager.message_interface.send

            def dispatch(message: Any, incoming: Any = incoming) -> Any:
                record = _record(message)
                key = (message.remote, message.mid)
                drop = (
                    record.type == "CON"
                    and record.code.startswith("0.")
                    and behaviour.matches(record.path, behaviour.drop_first)
                    and key not in behaviour.dropped
                )
                if drop:
                    behaviour.dropped.add(key)
                    self.datagrams.append(_record(message, dropped=True))
                    return None
                self.datagrams.append(record)
                return incoming(message)

            def send(message: Any, outgoing: Any = outgoing) -> Any:
                self.sent.append(_record(message))
                return outgoing(message)

            manager.dispatch_message = dispatch
            manager.message_interface.send = send


def _record(message: Any, *, dropped: bool = False) -> RecordedDatagram:
    block1 = message.opt.block1
    code = int(message.code) if message.code is not None else 0
    return RecordedDatagram(
        str(message.mtype.name) if message.mtype is not None else "?",
        code_text(code),
        message.mid if message.mid is not None else -1,
        bytes(message.token),
        tuple(message.opt.uri_path),
        None if block1 is None else (block1.block_number, bool(block1.more), block1.size_exponent),
        dropped,
    )


def _make_site(server: RecordingCoAPServer) -> Any:
    from aiocoap import Code as AiocoapCode  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415
    from aiocoap import Message  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415
    from aiocoap.resource import PathCapable, Resource  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415

    behaviour = server._behaviour  # noqa: SLF001 - the server's own helper

    class Root(Resource, PathCapable):  # type: ignore[misc,unused-ignore]  # aiocoap is untyped
        async def render(self, request: Any) -> Any:
            path = tuple(request.opt.uri_path)
            method = str(request.code)
            server.requests.append(
                RecordedRequest(
                    method,
                    path,
                    bytes(request.payload),
                    None if request.opt.content_format is None else int(request.opt.content_format),
                    str(request.remote),
                    tuple(request.opt.uri_query),
                )
            )
            if behaviour.matches(path, behaviour.hold):
                await server.release.wait()
            for prefix, code in behaviour.codes.items():
                if path[: len(prefix)] == prefix:
                    return Message(code=AiocoapCode(code))
            if request.code == AiocoapCode.GET:
                body = server.bodies.get(path)
                if body is None:
                    return Message(code=AiocoapCode.NOT_FOUND)
                return Message(code=AiocoapCode.CONTENT, payload=body)
            server.bodies[path] = bytes(request.payload)
            return Message(code=AiocoapCode.CHANGED)

    return Root()
