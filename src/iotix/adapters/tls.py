"""TLS for device connections: what to verify, which certificate each device presents.

:class:`TLSSettings` says how devices talk TLS: the CA that signs the server (or the
system trust store), an optional client certificate and key per device, and an
``insecure`` escape hatch for test brokers. The certificate and key are *templates*:
``certs/{device_id}.crt`` or ``certs/dev-{index:05d}.pem`` give each device its own file,
and a plain path (no placeholder) gives every device the same one. Literal braces in a
path are written doubled (``{{`` and ``}}``), as in :meth:`str.format`.

:class:`TLSContextCache` turns settings into :class:`ssl.SSLContext` objects for
:func:`iotix.adapters.mqtt.open_connection`'s ``ssl_context``. Contexts are shared:
devices with the same (certificate, key) pair get the same context object, so 100,000
devices that share a certificate build one context, not 100,000.

Memory, measured on CPython 3.11 with OpenSSL 3.0 (EC P-256 certificates):

- about 12 KiB per context with a ``ca_file`` holding one CA;
- about 0.8 MiB per context with the system trust store (``ca_file`` None): OpenSSL
  parses the whole bundle (Debian's is 220 KB, some 140 CAs) into every context.

So per-device certificates at scale want a ``ca_file``, and the cache's bound
(``max_contexts``) caps the total: 1,024 contexts cost about 12 MiB with a CA file and
about 800 MiB with the system store. An evicted context stays alive as long as a
connection uses it; a later device with the same files gets a new one.

File errors (missing, unreadable, not PEM, a key that does not match its certificate,
an encrypted key) are :class:`TLSConfigError` naming the file(s). Files shared by every
device are checked when the cache is made; a device's own files when its context is
first built.
"""

from __future__ import annotations

import logging
import ssl
import string
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from iotix.errors import IotixError

__all__ = ["TLSConfigError", "TLSContextCache", "TLSSettings"]

logger = logging.getLogger(__name__)

_PLACEHOLDERS: Final = frozenset({"device_id", "index"})
_MIN_VERSIONS: Final = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_DEFAULT_MAX_CONTEXTS: Final = 1024


class TLSConfigError(IotixError):
    """TLS settings are invalid, or a certificate or key file cannot be used.

    ``field`` names the setting at fault (``cert_file``, ``ca_file``, ...); ``paths``
    holds the file(s) involved, expanded for the device, when a file is at fault.
    """

    def __init__(self, message: str, *, field: str, paths: tuple[Path, ...] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.paths = paths


@dataclass(frozen=True)
class TLSSettings:
    """How devices connect over TLS.

    - ``ca_file``: the CA certificate(s) that sign the server's certificate (a PEM
      file); None trusts the system store.
    - ``cert_file`` / ``key_file``: the client certificate and its private key (PEM,
      unencrypted), as templates with ``{device_id}`` and ``{index}`` placeholders.
      ``cert_file`` alone means the file holds the key too; ``key_file`` alone is an
      error.
    - ``insecure``: do not verify the server at all, neither its certificate nor its
      host name. Anyone on the path can then impersonate the broker and read or change
      every message. Only for test brokers with throwaway certificates; never against a
      broker that matters. Contradicts ``ca_file``, so both together are refused.
    - ``server_hostname``: the name to send (SNI) and to check the server certificate
      against, instead of the host connected to, e.g. when connecting to an IP address
      or through a tunnel.
    - ``min_version``: the oldest protocol accepted, ``"TLSv1.2"`` or ``"TLSv1.3"``.
    """

    ca_file: Path | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    server_hostname: str | None = None
    min_version: str = "TLSv1.2"

    def __post_init__(self) -> None:
        for name, template in (("cert_file", self.cert_file), ("key_file", self.key_file)):
            if template is not None:
                _check_template(name, template)
        if self.key_file is not None and self.cert_file is None:
            raise TLSConfigError(
                f"key_file {self.key_file!r} is given without cert_file: "
                "a private key is only used with its certificate",
                field="key_file",
            )
        if self.insecure and self.ca_file is not None:
            raise TLSConfigError(
                f"insecure=True skips server verification, so ca_file {self.ca_file} "
                "would be ignored: drop one of them",
                field="insecure",
            )
        if self.server_hostname is not None and not self.server_hostname.strip():
            # asyncio reads an empty server_hostname as "skip the host name check".
            raise TLSConfigError(
                "server_hostname is empty: give a host name, or None to use the host "
                "connected to (insecure=True is the explicit way to skip checks)",
                field="server_hostname",
            )
        if self.min_version not in _MIN_VERSIONS:
            raise TLSConfigError(
                f"min_version {self.min_version!r} is not one of {', '.join(_MIN_VERSIONS)}",
                field="min_version",
            )

    @property
    def per_device(self) -> bool:
        """Whether devices present different certificates (a template has a placeholder)."""
        return any(
            template is not None and _fields(template)
            for template in (self.cert_file, self.key_file)
        )

    def cert_path(self, device_id: str, index: int) -> Path | None:
        """The client certificate of one device, or None when devices present none."""
        return _expand(self.cert_file, device_id, index)

    def key_path(self, device_id: str, index: int) -> Path | None:
        """The private key of one device, or None when the certificate file holds it."""
        return _expand(self.key_file, device_id, index)


class TLSContextCache:
    """Client-side :class:`ssl.SSLContext` objects for devices, shared where possible.

    Without per-device certificates every device gets one context, built (and its files
    checked) here. With them, contexts are built on first use per distinct (certificate,
    key) pair and kept in a least-recently-used cache of at most ``max_contexts``; see
    the module docstring for the memory each costs. Not thread-safe: use it from the
    event loop that opens the connections.
    """

    def __init__(self, settings: TLSSettings, *, max_contexts: int = _DEFAULT_MAX_CONTEXTS) -> None:
        if max_contexts < 1:
            raise TLSConfigError(
                f"max_contexts is {max_contexts}; at least 1", field="max_contexts"
            )
        self.settings = settings
        self.max_contexts = max_contexts
        self.contexts_built = 0
        """How many contexts were built, for tests and metrics (evictions rebuild)."""
        self._shared: ssl.SSLContext | None = None
        self._by_files: OrderedDict[tuple[Path | None, Path | None], ssl.SSLContext] = OrderedDict()
        if settings.insecure:
            logger.warning(
                "TLS server verification is off (insecure=True): "
                "any server is trusted; use this only with test brokers"
            )
        if settings.per_device:
            # Not kept: it only proves that the shared files (the CA) load.
            self._build(None, None)
        else:
            # A plain path is the same for every device; expand it once.
            self._shared = self._build(settings.cert_path("", 0), settings.key_path("", 0))
            self.contexts_built = 1

    def context_for(self, device_id: str, index: int) -> ssl.SSLContext:
        """The context for one device: the shared one, or the one for its files."""
        if self._shared is not None:
            return self._shared
        cert = self.settings.cert_path(device_id, index)
        key = self.settings.key_path(device_id, index)
        files = (cert, key)
        context = self._by_files.get(files)
        if context is not None:
            self._by_files.move_to_end(files)
            return context
        context = self._build(cert, key)
        self.contexts_built += 1
        self._by_files[files] = context
        if len(self._by_files) > self.max_contexts:
            self._by_files.popitem(last=False)
        return context

    def __len__(self) -> int:
        """How many contexts are held now."""
        return 1 if self._shared is not None else len(self._by_files)

    def _build(self, cert: Path | None, key: Path | None) -> ssl.SSLContext:
        settings = self.settings
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = _MIN_VERSIONS[settings.min_version]
        if settings.insecure:
            context.check_hostname = False  # must go before verify_mode may drop
            context.verify_mode = ssl.CERT_NONE
        elif settings.ca_file is None:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            _load_ca(context, settings.ca_file)
        if cert is not None:
            _load_chain(context, cert, key)
        return context


# -- templates ---------------------------------------------------------------------------


def _fields(template: str) -> list[str]:
    """The placeholder names of a template (ValueError on unbalanced braces)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _check_template(name: str, template: str) -> None:
    if not template:
        raise TLSConfigError(f"{name} is empty: give a path, or None", field=name)
    try:
        fields = _fields(template)
    except ValueError as exc:
        raise TLSConfigError(
            f"{name} {template!r} is not a valid template ({exc}); "
            "write literal braces as '{{' and '}}'",
            field=name,
        ) from exc
    unknown = sorted(set(fields) - _PLACEHOLDERS)
    if unknown:
        shown = ", ".join("{" + field + "}" for field in unknown)
        raise TLSConfigError(
            f"{name} {template!r} uses {shown}; the placeholders are {{device_id}} and {{index}}",
            field=name,
        )
    try:  # a format spec that does not fit the value, e.g. {device_id:d}
        template.format(device_id="device", index=0)
    except ValueError as exc:
        raise TLSConfigError(f"{name} {template!r}: {exc}", field=name) from exc


def _expand(template: str | None, device_id: str, index: int) -> Path | None:
    if template is None:
        return None
    return Path(template.format(device_id=device_id, index=index))


# -- loading -----------------------------------------------------------------------------


def _require_file(field: str, path: Path) -> None:
    if path.is_file():
        return
    problem = "is a directory, not a file" if path.is_dir() else "does not exist"
    raise TLSConfigError(f"{field} {path} {problem}", field=field, paths=(path,))


def _load_ca(context: ssl.SSLContext, path: Path) -> None:
    _require_file("ca_file", path)
    try:
        context.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(
            f"ca_file {path} cannot be loaded: {_reason(exc)} (expected PEM certificates)",
            field="ca_file",
            paths=(path,),
        ) from exc


def _encrypted_key(cert: Path, key: Path | None) -> NoReturn:
    # Called by OpenSSL only for an encrypted key; without it OpenSSL would prompt on
    # the terminal, which would hang a simulation.
    path = key or cert
    raise TLSConfigError(
        f"key_file {path} is encrypted; iotix needs an unencrypted private key",
        field="key_file" if key is not None else "cert_file",
        paths=(path,),
    )


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    _require_file("cert_file", cert)
    if key is not None:
        _require_file("key_file", key)
    try:
        context.load_cert_chain(cert, key, password=lambda: _encrypted_key(cert, key))
    except (ssl.SSLError, OSError) as exc:
        raise _chain_error(cert, key, exc) from exc


def _chain_error(cert: Path, key: Path | None, exc: OSError) -> TLSConfigError:
    """Say which file is at fault: OpenSSL's "PEM lib" does not."""
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return TLSConfigError(
            f"key_file {key} does not belong to cert_file {cert} (key values mismatch)",
            field="key_file",
            paths=(cert, key) if key is not None else (cert,),
        )
    if b"-----BEGIN CERTIFICATE-----" not in _read(cert):
        return TLSConfigError(
            f"cert_file {cert} holds no PEM certificate ({_reason(exc)})",
            field="cert_file",
            paths=(cert,),
        )
    if b"PRIVATE KEY-----" not in _read(key or cert):
        if key is None:
            message = f"cert_file {cert} holds no PEM private key: give key_file"
        else:
            message = f"key_file {key} holds no PEM private key"
        return TLSConfigError(
            f"{message} ({_reason(exc)})",
            field="key_file" if key is not None else "cert_file",
            paths=(key or cert,),
        )
    return TLSConfigError(
        f"cert_file {cert} with key_file {key or cert} cannot be loaded: {_reason(exc)}",
        field="cert_file",
        paths=(cert, key) if key is not None else (cert,),
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return exc.strerror or str(exc)
