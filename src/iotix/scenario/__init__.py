"""Scenarios: a run described in one file (fleets, stages, checks) that ends in a
verdict and reports.

- :mod:`iotix.scenario.spec`: the scenario file's schema (pydantic) and its loader.
- :mod:`iotix.scenario.checks`: thresholds over a run's metrics (``e2e_latency.p99 <
  200ms``) and their evaluation.
- :mod:`iotix.scenario.reports`: JUnit XML, Markdown, CSV and JSON reports of a run;
  :mod:`iotix.scenario.html`: the self-contained HTML report.
- :mod:`iotix.scenario.runner`: a scenario's run plan, and its report once it has run.

The types the three share are here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CheckResult:
    """One check of a run, evaluated."""

    name: str
    """Unique within the run (a JUnit test case name)."""
    expression: str
    """As written in the scenario, e.g. ``e2e_latency.p99 < 200ms``."""
    passed: bool
    observed: float | None
    """The metric's value in the check's own unit (ms for ``200ms``, a percentage such
    as 99.95 for ``99.9%``, the base unit for a bare number); None when the run produced
    no value for it (then it fails)."""
    message: str
    """One line for a person: what was expected, what was seen."""


@dataclass
class RunReport:
    """What reports are made of: the run's identity, its verdict and its figures."""

    scenario: str
    """The scenario's name."""
    started_at: str
    """ISO 8601, UTC."""
    duration_s: float
    checks: list[CheckResult]
    summary: dict[str, Any]
    """:func:`iotix.engine.results.summarise` of the final snapshot."""
    time_series: list[dict[str, Any]] = field(default_factory=list)
    """One row a second (:meth:`iotix.metrics.TimeSeriesRow.to_dict`)."""
    probe: dict[str, Any] | None = None
    worker_errors: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    """Seed, brokers, fleets, iotix version: shown as they are."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """What the scenario did when: faults, actions, an abort (``at_s``, ``name``,
    ``what``)."""
    commands: dict[str, Any] | None = None
    """The summary of the scenario's command actions (sent, replied, timed out...)."""

    @property
    def passed(self) -> bool:
        """Every check passed and no worker died."""
        return all(check.passed for check in self.checks) and not self.worker_errors


__all__ = ["CheckResult", "RunReport"]
