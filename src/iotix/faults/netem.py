"""Whether kernel netem could inject faults here, found out without changing the host.

iotix injects network faults in user space (:class:`~iotix.faults.FaultProxy`,
:class:`~iotix.faults.UDPFaultProxy`), which works anywhere. Kernel netem would shape
real packets, but needs Linux, ``tc`` and ``ip`` (iproute2), CAP_NET_ADMIN, network
namespaces and the ``sch_netem`` module, which containers and CI sandboxes often lack.
:func:`netem_support` tries exactly what a netem backend would do, in a network
namespace of its own so the host's interfaces are never touched::

    support = netem_support()
    if not support.available:
        print(f"netem cannot be used here: {support.reason}")

The probe, in order, stopping at the first failure, whose message becomes ``reason``
verbatim (for example ``Error: Specified qdisc kind is unknown.`` when ``sch_netem`` is
missing):

1. Linux, and ``tc`` and ``ip`` found on the search path;
2. root, or CAP_NET_ADMIN in the effective set;
3. ``ip netns add iotix-netem-probe-<pid>-<random>``;
4. ``ip netns exec <ns> tc qdisc add dev lo root netem delay 1ms`` (the namespace's own
   loopback, which nothing else uses);
5. ``ip netns delete <ns>``, always run once step 3 was tried, whatever happened since.

Every command has a time limit, so the probe returns within seconds. No netem backend
is built on top of this yet: iotix's machines cannot run netem, and the user-space
proxies are the default.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["NETNS_PREFIX", "NetemSupport", "netem_support"]

_log = logging.getLogger(__name__)

NETNS_PREFIX = "iotix-netem-probe"
"""Names of the probe's namespaces start with this (then the pid and a random part)."""
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
"""Where iproute2 lives when ``sbin`` is not on PATH (a non-root shell on Debian)."""
_CAP_NET_ADMIN = 12  # bit number in the capability sets, linux/capability.h
_CLEANUP_TIMEOUT_S = 5.0
"""The delete always gets this long, whatever is left of the probe's time limit."""


@dataclass(frozen=True, slots=True)
class NetemSupport:
    """Whether netem can be used here and, when not, why (the first failure, verbatim)."""

    available: bool
    reason: str


def netem_support(*, path: str | None = None, timeout_s: float = 5.0) -> NetemSupport:
    """Probe whether kernel netem can be used here (module docstring), leaving no trace.

    ``path`` is where ``tc`` and ``ip`` are looked for (``os.pathsep``-separated, as
    PATH); None: PATH and then the usual ``sbin`` directories. ``timeout_s`` bounds
    the commands before the clean-up, which always gets its own few seconds.
    """
    if sys.platform != "linux":
        return NetemSupport(available=False, reason=f"netem is Linux's; this is {sys.platform}")
    search = (
        path if path is not None else os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    )
    tc = shutil.which("tc", path=search)
    if tc is None:
        return NetemSupport(
            available=False,
            reason=f"tc not found (searched {search}); it comes with iproute2",
        )
    ip = shutil.which("ip", path=search)
    if ip is None:
        return NetemSupport(
            available=False,
            reason=f"ip not found (searched {search}); it comes with iproute2",
        )
    if not _may_administer_network():
        return NetemSupport(
            available=False,
            reason=f"needs root or CAP_NET_ADMIN (running as uid {os.geteuid()} without it)",
        )
    deadline = time.monotonic() + timeout_s
    namespace = f"{NETNS_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"
    failure = _run([ip, "netns", "add", namespace], deadline)
    try:
        if failure is None:
            netem = ["qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
            failure = _run([ip, "netns", "exec", namespace, tc, *netem], deadline)
    finally:
        # Also after a failed add, which may have left the name behind half made.
        cleanup = _run([ip, "netns", "delete", namespace], time.monotonic() + _CLEANUP_TIMEOUT_S)
    if failure is not None:
        return NetemSupport(available=False, reason=failure)
    if cleanup is not None:
        _log.warning("could not delete the network namespace %s: %s", namespace, cleanup)
        return NetemSupport(
            available=False, reason=f"ip netns delete {namespace} failed: {cleanup}"
        )
    return NetemSupport(available=True, reason="netem qdisc added in a network namespace")


def _may_administer_network() -> bool:
    """Root, or CAP_NET_ADMIN in the effective set (as in a container given it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # noqa: PTH123 - one read
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _run(command: Sequence[str], deadline: float) -> str | None:
    """Run ``command`` until ``deadline``: None when it succeeded, else why it failed
    (its own message, verbatim)."""
    remaining = max(deadline - time.monotonic(), 0.1)
    try:
        done = subprocess.run(  # noqa: S603 - fixed arguments, absolute program paths
            list(command),
            capture_output=True,
            text=True,
            timeout=remaining,
            check=False,
            env={**os.environ, "LC_ALL": "C"},  # messages as in the docs, not translated
        )
    except subprocess.TimeoutExpired:
        return f"{' '.join(command)} did not finish within {remaining:.1f} s"
    except OSError as exc:
        return f"{' '.join(command)} could not run: {exc}"
    if done.returncode == 0:
        return None
    message = done.stderr.strip() or done.stdout.strip()
    return message or f"{' '.join(command)} exited with status {done.returncode}"
