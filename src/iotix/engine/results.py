"""What a run reports: a summary of the merged metrics and the machine-readable results.

Pure functions of snapshots, so the live view, the end summary, the results file and
(later) the checks and reports all read the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from iotix import __version__

if TYPE_CHECKING:
    from iotix.engine.fleet import FleetResult
    from iotix.engine.worker import RunSettings
    from iotix.metrics import Snapshot, TimeSeries


def _finite(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value


def summarise(snapshot: Snapshot) -> dict[str, Any]:
    """The headline figures of a (merged) snapshot, JSON-ready."""
    counters = snapshot.counters
    duration_s = snapshot.at_s
    latencies = {
        name: {key: _finite(value) for key, value in histogram.summary().items()}
        for name, histogram in snapshot.histograms().items()
        if histogram.count
    }
    return {
        "duration_s": round(duration_s, 3),
        "devices_connected": snapshot.devices_connected,
        "connects": counters.connects,
        "connect_attempts": counters.connect_attempts,
        "connect_failures": counters.connect_failures,
        "connect_failures_by_reason": dict(counters.connect_failures_by_reason),
        "reconnects": counters.reconnects,
        "disconnects": counters.disconnects,
        "messages_sent": counters.messages_sent,
        "messages_acked": counters.messages_acked,
        "messages_failed": counters.messages_failed,
        "messages_in_flight": counters.in_flight,
        "messages_sent_rate_hz": (
            round(counters.messages_sent / duration_s, 1) if duration_s > 0 else None
        ),
        "bytes_sent": counters.bytes_sent,
        "commands_received": counters.commands_received,
        "commands_answered": counters.commands_answered,
        "errors_by_kind": dict(counters.errors_by_kind),
        "counters_reconcile": counters.reconciles(),
        "latency_s": latencies,
        "states": dict(snapshot.states),
        "states_reached": dict(snapshot.states_reached),
    }


def results_document(
    *,
    model_name: str,
    model_path: str,
    settings: RunSettings,
    workers: int,
    result: FleetResult,
    series: TimeSeries,
) -> dict[str, Any]:
    """Everything about a run, for ``--results out.json``."""
    run_settings = asdict(settings)
    run_settings["brokers"] = [str(b) for b in settings.brokers]
    run_settings["version"] = settings.version.name
    run_settings.pop("password", None)  # never write secrets to a results file
    return {
        "iotix": __version__,
        "model": {"name": model_name, "path": model_path},
        "settings": {**run_settings, "workers": workers},
        "interrupted": result.interrupted,
        "worker_errors": result.worker_errors,
        "probe": result.probe,
        "summary": summarise(result.snapshot),
        "final": result.snapshot.to_dict(),
        "time_series": [row.to_dict() for row in series.rows],
    }
