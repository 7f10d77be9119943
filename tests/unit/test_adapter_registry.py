"""The adapter registry: built-in schemes resolve lazily, plugins come from entry points
(here a throw-away dist-info directory on sys.path, as an installed package leaves one),
and what cannot be found or loaded says why. Also broker addresses with a plugin's
scheme, and the memory adapter that tests of plugins lean on."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

import pytest

import iotix.adapters
from iotix.adapters.base import AdapterError, AdapterSettings, DeviceIdentity, OutgoingMessage
from iotix.adapters.memory import MemoryAdapter, MemoryHub
from iotix.adapters.registry import (
    BUILTIN_ADAPTERS,
    ENTRY_POINT_GROUP,
    MQTT_SCHEMES,
    AdapterNotFoundError,
    adapter_for,
    known_schemes,
)
from iotix.engine.worker import RunConfigError, parse_brokers

if TYPE_CHECKING:
    from pathlib import Path

    from iotix.adapters.base import Delivery


def _install_entry_points(site: Path, monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    """Make ``targets`` (scheme = "module:Class") entry points of a fake installed
    distribution: a dist-info directory on sys.path, which importlib.metadata reads."""
    dist_info = site / "fake_iotix_plugin-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-iotix-plugin\nVersion: 0.1\n", encoding="utf-8"
    )
    lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{name} = {value}" for name, value in targets.items())]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))


# --- built-in schemes -------------------------------------------------------------------


def test_builtin_adapters_are_named_not_imported_by_the_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if nothing had imported the module yet (both are put back after the test).
    monkeypatch.delitem(sys.modules, "iotix.adapters.memory")
    monkeypatch.delattr(iotix.adapters, "memory")
    assert BUILTIN_ADAPTERS["memory"] == "iotix.adapters.memory:MemoryAdapter"
    assert "iotix.adapters.memory" not in sys.modules

    found = adapter_for("memory")

    assert "iotix.adapters.memory" in sys.modules
    assert (found.__module__, found.__qualname__) == ("iotix.adapters.memory", "MemoryAdapter")


@pytest.mark.parametrize(("scheme", "name"), [("http", "HTTPAdapter"), ("https", "HTTPAdapter")])
def test_a_builtin_scheme_resolves_to_its_class(scheme: str, name: str) -> None:
    found = adapter_for(scheme)
    assert found.__name__ == name
    assert scheme in found.schemes


def test_the_memory_scheme_resolves_to_the_memory_adapter() -> None:
    assert adapter_for("memory") is MemoryAdapter


def test_every_builtin_and_mqtt_scheme_is_known() -> None:
    assert {*MQTT_SCHEMES, *BUILTIN_ADAPTERS} <= set(known_schemes())
    assert known_schemes() == sorted(known_schemes())


def test_an_unknown_scheme_is_not_found_and_the_error_names_the_known_ones() -> None:
    with pytest.raises(AdapterNotFoundError) as info:
        adapter_for("carrier-pigeon")
    assert info.value.scheme == "carrier-pigeon"
    message = str(info.value)
    assert "no adapter for carrier-pigeon://" in message
    assert ", ".join(known_schemes()) in message
    assert ENTRY_POINT_GROUP in message


# --- plugins from entry points -----------------------------------------------------------


def test_an_entry_point_makes_its_name_a_known_scheme_and_resolves_to_its_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_entry_points(tmp_path, monkeypatch, pigeon="iotix.adapters.memory:MemoryAdapter")
    assert "pigeon" in known_schemes()
    assert adapter_for("pigeon") is MemoryAdapter


def test_an_entry_point_to_a_missing_module_is_not_found_with_the_import_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_entry_points(tmp_path, monkeypatch, broken="iotix_no_such_plugin:Adapter")
    with pytest.raises(AdapterNotFoundError) as info:
        adapter_for("broken")
    assert info.value.scheme == "broken"
    assert "broken:// (iotix_no_such_plugin:Adapter) cannot be loaded" in str(info.value)
    assert "No module named 'iotix_no_such_plugin'" in str(info.value)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_an_entry_point_to_a_missing_class_is_not_found_with_the_attribute_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_entry_points(tmp_path, monkeypatch, typo="iotix.adapters.memory:MemoryAdaptor")
    with pytest.raises(AdapterNotFoundError, match="MemoryAdaptor") as info:
        adapter_for("typo")
    assert isinstance(info.value.__cause__, AttributeError)


def test_a_builtin_scheme_wins_over_an_entry_point_of_the_same_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_entry_points(tmp_path, monkeypatch, memory="iotix_no_such_plugin:Adapter")
    assert adapter_for("memory") is MemoryAdapter


# --- broker addresses ----------------------------------------------------------------------


def test_a_broker_address_may_have_a_registered_plugin_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_entry_points(tmp_path, monkeypatch, pigeon="iotix.adapters.memory:MemoryAdapter")
    [endpoint] = parse_brokers("pigeon://loft.example:7000/coop/")
    assert (endpoint.scheme, endpoint.host, endpoint.port, endpoint.path) == (
        "pigeon",
        "loft.example",
        7000,
        "/coop",
    )
    assert not endpoint.is_mqtt
    assert str(endpoint) == "pigeon://loft.example:7000/coop"


def test_a_plugin_scheme_has_no_default_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_entry_points(tmp_path, monkeypatch, pigeon="iotix.adapters.memory:MemoryAdapter")
    with pytest.raises(RunConfigError, match=r"pigeon:// has no default port"):
        parse_brokers("pigeon://loft.example")


def test_a_broker_address_with_an_unknown_scheme_is_refused_with_the_known_ones() -> None:
    with pytest.raises(RunConfigError) as info:
        parse_brokers("pigeon://loft.example:7000")
    message = str(info.value)
    assert "unsupported broker scheme 'pigeon'" in message
    assert all(f"{scheme}://" in message for scheme in known_schemes())


# --- the memory adapter ----------------------------------------------------------------------


@pytest.fixture
def hubs(monkeypatch: pytest.MonkeyPatch) -> dict[str, MemoryHub]:
    """The memory adapter's hubs, fresh for one test."""
    fresh: dict[str, MemoryHub] = {}
    monkeypatch.setattr(MemoryAdapter, "hubs", fresh)
    return fresh


def _memory(**options: object) -> MemoryAdapter:
    return MemoryAdapter(parse_brokers("memory://hub")[0], AdapterSettings(options=options))


def test_the_memory_adapter_keeps_each_message_and_confirms_what_asks_for_it(
    hubs: dict[str, MemoryHub],
) -> None:
    async def scenario() -> tuple[list[Delivery], set[str]]:
        async with _memory() as adapter:
            link = await adapter.connect(DeviceIdentity("d-1", 1))
            deliveries = [
                await link.send(OutgoingMessage("t", b"1")),
                await link.send(OutgoingMessage("t", b"2", confirm=False)),
            ]
            connected = set(hubs["hub"].connected)
            await link.aclose()
        return deliveries, connected

    (confirmed, unconfirmed), connected = asyncio.run(scenario())
    assert (confirmed.sent, confirmed.confirmed) == (True, True)
    assert (unconfirmed.sent, unconfirmed.confirmed) == (True, False)
    assert connected == {"d-1"}
    hub = hubs["hub"]
    assert [(device, m.payload) for device, m in hub.messages] == [("d-1", b"1"), ("d-1", b"2")]
    assert hub.connected == set()


def test_the_memory_adapter_refuses_the_devices_it_is_told_to(
    hubs: dict[str, MemoryHub],
) -> None:
    async def scenario() -> None:
        async with _memory(refuse=["d-2"]) as adapter:
            await adapter.connect(DeviceIdentity("d-2", 2))

    with pytest.raises(AdapterError, match="d-2 refused") as info:
        asyncio.run(scenario())
    assert info.value.kind == "refused"
    assert hubs["hub"].connected == set()


def test_the_memory_adapter_fails_every_nth_message(hubs: dict[str, MemoryHub]) -> None:
    async def scenario() -> list[Delivery]:
        async with _memory(fail_every=2) as adapter:
            link = await adapter.connect(DeviceIdentity("d", 0))
            return [await link.send(OutgoingMessage("t", bytes([n]))) for n in range(4)]

    deliveries = asyncio.run(scenario())
    assert [d.confirmed for d in deliveries] == [True, False, True, False]
    assert [d.error for d in deliveries] == [None, "memory refused", None, "memory refused"]
    assert [m.payload for _, m in hubs["hub"].messages] == [b"\x00", b"\x02"]
