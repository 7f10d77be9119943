"""Network faults injected in user space: a TCP proxy between devices and a broker.

Kernel netem is not available everywhere (not in our sandbox), so iotix degrades the
network itself: :class:`FaultProxy` forwards TCP between devices and one broker endpoint
and applies fault specs (:class:`Latency`, :class:`Bandwidth`, :class:`Blackhole`,
:class:`Reset`, :class:`SlowClose`, :class:`Partition`, :class:`TargetDown`) to all its
connections or to a deterministic share of them. See :mod:`iotix.faults.proxy`.
"""

from iotix.faults.proxy import (
    Bandwidth,
    Blackhole,
    FaultHandle,
    FaultProxy,
    FaultSpec,
    Latency,
    Partition,
    Reset,
    SlowClose,
    TargetDown,
    selects,
)

__all__ = [
    "Bandwidth",
    "Blackhole",
    "FaultHandle",
    "FaultProxy",
    "FaultSpec",
    "Latency",
    "Partition",
    "Reset",
    "SlowClose",
    "TargetDown",
    "selects",
]
