"""The CoAP benchmark script (``bench/coap_throughput.py``) runs end to end at a trivial
size, so it never rots.

Both parts run with a handful of devices against the servers the script starts itself
(libcoap's ``coap-server``, its UDP sink), unpinned, so that the test process keeps its
cores. Only the shape of the results is checked: timings on a shared machine say nothing.
"""

from __future__ import annotations

import importlib

import pytest

from iotix.testing.coap import find_coap_server

DEVICES = 40


pytestmark = pytest.mark.usefixtures("bench_on_path")


@pytest.fixture
def _coap_server() -> None:
    if find_coap_server() is None:
        pytest.fail(
            "libcoap's coap-server is not installed, and the CoAP benchmark starts it: "
            "run scripts/services (it installs Debian's `libcoap3-bin`).",
            pytrace=False,
        )


@pytest.mark.usefixtures("_coap_server")
def test_coap_throughput_holds_a_small_fleet_and_measures_the_ceiling() -> None:
    module = importlib.import_module("coap_throughput")
    found = module.main(
        [
            *("--devices", str(DEVICES), "--interval", "1", "--seconds", "2", "--settle", "0.5"),
            *("--ceiling-devices", "8", "--ceiling-seconds", "0.5", "--ceiling-settle", "0.2"),
            "--no-pin",
        ]
    )

    scale = found["scale"]
    assert scale.connected == DEVICES, scale.problems
    assert scale.sent > 0
    assert scale.failed == 0
    # Every datagram reached coap-server's socket: read, or dropped there on a busy machine.
    assert scale.received + scale.server_drops == scale.sent
    assert scale.sent_per_s > 0
    assert scale.lag_p99_s < 1.0
    assert scale.peak is not None
    ceiling = found["ceiling"]
    assert [(r.kind, r.contender) for r in ceiling] == [
        ("NON", "plain asyncio"),
        ("NON", "iotix worker"),
        ("CON", "plain asyncio"),
        ("CON", "iotix worker"),
    ]
    assert all(r.sent > 0 and r.per_cpu_s > 0 for r in ceiling)
    assert all(r.confirmed > 0 for r in ceiling if r.kind == "CON")
