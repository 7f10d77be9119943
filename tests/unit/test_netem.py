"""netem detection: the real probe leaves no namespace behind, and missing tools are named.

These run the real ``ip`` and ``tc`` (the probe's whole point is what this machine can
do), so they are the unit tests' one exception to "no processes".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from iotix.faults import NetemSupport, netem, netem_support
from iotix.faults.netem import NETNS_PREFIX

if TYPE_CHECKING:
    from pathlib import Path

_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="netem and netns are Linux's")


def probe_namespaces() -> list[str]:
    """Names of the network namespaces the probe would have made, from ``ip netns list``."""
    ip = shutil.which("ip", path=_SEARCH)
    if ip is None:
        return []
    listing = subprocess.run(
        [ip, "netns", "list"], capture_output=True, text=True, check=False, timeout=10
    )
    names = [line.split()[0] for line in listing.stdout.splitlines() if line.strip()]
    return [name for name in names if name.startswith(NETNS_PREFIX)]


@linux_only
def test_the_real_probe_answers_within_seconds_and_leaves_no_namespace() -> None:
    start = time.monotonic()
    support = netem_support(timeout_s=5.0)
    elapsed = time.monotonic() - start
    assert isinstance(support, NetemSupport)
    assert isinstance(support.available, bool)
    assert support.reason  # why not, or what worked
    assert elapsed < 15.0  # 5 s for the probe, 5 s for the clean-up, and slack
    assert probe_namespaces() == []


@linux_only
def test_a_search_path_without_tc_says_tc_is_missing(tmp_path: Path) -> None:
    ip = shutil.which("ip", path=_SEARCH)
    if ip is not None:
        (tmp_path / "ip").symlink_to(ip)  # ip is there, tc is not
    support = netem_support(path=str(tmp_path))
    assert support == NetemSupport(
        available=False,
        reason=f"tc not found (searched {tmp_path}); it comes with iproute2",
    )


@linux_only
def test_a_search_path_with_tc_but_without_ip_says_ip_is_missing(tmp_path: Path) -> None:
    tc = tmp_path / "tc"
    tc.write_text("#!/bin/sh\nexit 0\n")
    tc.chmod(0o755)
    support = netem_support(path=str(tmp_path))
    assert not support.available
    assert support.reason.startswith("ip not found")


@linux_only
def test_without_net_admin_the_probe_stops_before_making_a_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if shutil.which("tc", path=_SEARCH) is None or shutil.which("ip", path=_SEARCH) is None:
        pytest.fail("iproute2 (tc, ip) is missing: run scripts/services", pytrace=False)
    monkeypatch.setattr(netem, "_may_administer_network", lambda: False)
    support = netem_support()
    assert not support.available
    assert support.reason.startswith("needs root or CAP_NET_ADMIN")
    assert probe_namespaces() == []


def test_netem_support_is_plain_data() -> None:
    support = NetemSupport(available=False, reason="Error: Specified qdisc kind is unknown.")
    assert (support.available, support.reason) == (False, "Error: Specified qdisc kind is unknown.")
    with pytest.raises(AttributeError):
        support.available = True  # type: ignore[misc]
