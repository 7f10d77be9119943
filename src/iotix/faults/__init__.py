"""Network faults injected in user space: TCP and UDP proxies between devices and servers.

Kernel netem is not available everywhere (not in our sandbox), so iotix degrades the
network itself: :class:`FaultProxy` forwards TCP between devices and one broker endpoint
and applies fault specs (:class:`Latency`, :class:`Bandwidth`, :class:`Blackhole`,
:class:`Reset`, :class:`SlowClose`, :class:`Partition`, :class:`TargetDown`) to all its
connections or to a deterministic share of them, and :meth:`FaultProxy.retarget` moves
it to another broker (failover). :class:`UDPFaultProxy` does the same for datagrams
(:class:`Loss`, :class:`Duplicate`, :class:`Reorder`, :class:`Latency`,
:class:`Blackhole`). :func:`netem_support` tells whether kernel netem could be used
here. See :mod:`iotix.faults.proxy`, :mod:`iotix.faults.udp` (both built on
:mod:`iotix.faults.common`) and :mod:`iotix.faults.netem`, and docs/faults.md.
"""

from iotix.faults.common import (
    BaseFaultHandle,
    Blackhole,
    FaultSpec,
    Latency,
    selects,
    share_rank,
)
from iotix.faults.netem import NetemSupport, netem_support
from iotix.faults.proxy import (
    TCP_FAULTS,
    Bandwidth,
    FaultHandle,
    FaultProxy,
    Partition,
    Reset,
    SlowClose,
    TargetDown,
)
from iotix.faults.udp import (
    UDP_FAULTS,
    Duplicate,
    Loss,
    Reorder,
    UDPFaultHandle,
    UDPFaultProxy,
)

__all__ = [
    "TCP_FAULTS",
    "UDP_FAULTS",
    "Bandwidth",
    "BaseFaultHandle",
    "Blackhole",
    "Duplicate",
    "FaultHandle",
    "FaultProxy",
    "FaultSpec",
    "Latency",
    "Loss",
    "NetemSupport",
    "Partition",
    "Reorder",
    "Reset",
    "SlowClose",
    "TargetDown",
    "UDPFaultHandle",
    "UDPFaultProxy",
    "netem_support",
    "selects",
    "share_rank",
]
