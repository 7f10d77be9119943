"""Which protocols a device model is meant for, and the refusal to run it over another.

A model may list the protocol *families* it suits in its top-level ``protocols:``
(``[mqtt, coap]``). A family covers its secure and transport variants, so a model
declares what its devices speak, not how a given back end is reached:

============  =====================================  ======================================
family        broker URL schemes                     what the family can do for a model
============  =====================================  ======================================
``mqtt``      ``mqtt``, ``mqtts``, ``ws``, ``wss``   everything: commands, retain, will, birth
``http``      ``http``, ``https``                    commands by polling; no retain, will, birth
``coap``      ``coap``, ``coaps``                    commands to the device as a CoAP server
``kafka``     ``kafka``                              no commands, retain, will or birth
a plugin's    its own scheme only (``udpjson``)      what the plugin does
============  =====================================  ======================================

A model without ``protocols:`` runs over any protocol, as every model did before the
field existed. ``memory://`` (the in-memory adapter for tests, and for seeing what a model
sends without a server) takes any model, whatever it declares.

The loader checks the declared names (:func:`declared_protocol_issues`); the CLI and the
scenario loader refuse a model whose broker's scheme is outside them
(:func:`check_protocol`, :func:`protocol_refusal`) before anything connects.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from iotix.errors import IotixError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from iotix.model.loader import LoadedModel
    from iotix.model.spec import DeviceModelSpec

__all__ = [
    "ANY_MODEL_SCHEMES",
    "BUILTIN_FAMILIES",
    "ProtocolNotDeclaredError",
    "check_protocol",
    "declared_protocol_issues",
    "known_families",
    "protocol_family",
    "protocol_refusal",
    "runs_over",
]

BUILTIN_FAMILIES: dict[str, tuple[str, ...]] = {
    "mqtt": ("mqtt", "mqtts", "ws", "wss"),
    "http": ("http", "https"),
    "coap": ("coap", "coaps"),
    "kafka": ("kafka",),
}
"""Each built-in family and the broker URL schemes it covers."""

ANY_MODEL_SCHEMES = frozenset({"memory"})
"""Schemes that take any model: they are test sinks, not protocols a device speaks."""

_FAMILY_OF = {scheme: family for family, schemes in BUILTIN_FAMILIES.items() for scheme in schemes}


class ProtocolNotDeclaredError(IotixError):
    """A model is run over a protocol it does not declare.

    ``model`` is the model file (None for a model given as data), ``declared`` its
    ``protocols:`` and ``scheme`` the broker URL's scheme.
    """

    def __init__(
        self, message: str, *, model: Path | None, declared: tuple[str, ...], scheme: str
    ) -> None:
        super().__init__(message)
        self.model = model
        self.declared = declared
        self.scheme = scheme


def protocol_family(scheme: str) -> str:
    """The family of a broker URL scheme: ``mqtts`` → ``mqtt``, ``coaps`` → ``coap``; a
    plugin's scheme is a family of its own."""
    return _FAMILY_OF.get(scheme, scheme)


def known_families() -> list[str]:
    """The families a model may declare here: the built-in ones, then the schemes of the
    installed adapter plugins."""
    # Imported here: the registry reads the installed entry points, which only a model
    # declaring something other than a built-in family needs.
    from iotix.adapters.registry import known_schemes  # noqa: PLC0415 - see above

    plugins = sorted(
        s for s in known_schemes() if s not in _FAMILY_OF and s not in ANY_MODEL_SCHEMES
    )
    return [*BUILTIN_FAMILIES, *plugins]


def declared_protocol_issues(
    spec: DeviceModelSpec,
) -> Iterator[tuple[tuple[str | int, ...], str, str | None]]:
    """Problems of a model's ``protocols:`` list, each with its path: an unknown family
    (naming the known ones), a scheme written for its family, a duplicate."""
    if spec.protocols is None:
        return
    known: list[str] | None = None
    seen: dict[str, int] = {}
    for i, name in enumerate(spec.protocols):
        path: tuple[str | int, ...] = ("protocols", i)
        family = protocol_family(name)
        if name in _FAMILY_OF and family != name:
            yield path, f"{name!r} is a scheme of the {family!r} family", f"write {family!r}"
            continue
        if name not in BUILTIN_FAMILIES:
            known = known if known is not None else known_families()
            if name not in known:
                close = difflib.get_close_matches(name.lower(), known, n=1)
                yield (
                    path,
                    f"unknown protocol {name!r}",
                    (f"did you mean {close[0]!r}? " if close else "")
                    + f"known protocols: {', '.join(known)} (a plugin adds its scheme)",
                )
                continue
        if name in seen:
            yield path, f"{name!r} is listed twice (also protocols[{seen[name]}])", None
            continue
        seen[name] = i


def runs_over(spec: DeviceModelSpec, scheme: str) -> bool:
    """Whether a model may run over a broker URL scheme."""
    if spec.protocols is None or scheme in ANY_MODEL_SCHEMES:
        return True
    return protocol_family(scheme) in spec.protocols


def protocol_refusal(model: LoadedModel, broker_url: str) -> ProtocolNotDeclaredError | None:
    """Why ``model`` cannot run over ``broker_url`` (a broker URL, or just its scheme),
    or None when it can."""
    scheme = broker_url.partition("://")[0] if "://" in broker_url else broker_url
    spec = model.spec
    if runs_over(spec, scheme):
        return None
    declared = tuple(spec.protocols or ())
    what = f"model {spec.name}" + (f" ({model.path})" if model.path is not None else "")
    family = protocol_family(scheme)
    return ProtocolNotDeclaredError(
        f"{what} declares protocols: {', '.join(declared)}; it does not run over "
        f"{scheme}:// (the broker URL's scheme). Use a broker of a declared protocol, or "
        f"add {family} to the model's protocols if the model suits it.",
        model=model.path,
        declared=declared,
        scheme=scheme,
    )


def check_protocol(model: LoadedModel, broker_url: str) -> None:
    """Raise :class:`ProtocolNotDeclaredError` when ``model`` does not declare the
    protocol of ``broker_url`` (see :func:`protocol_refusal`)."""
    refusal = protocol_refusal(model, broker_url)
    if refusal is not None:
        raise refusal
