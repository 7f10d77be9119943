"""From a loaded scenario to a run plan, and from the run's outcome to its report.

:func:`plan_scenario` turns a :class:`~iotix.scenario.loader.LoadedScenario` (scaled by
``--scale`` for a quick CI run) into the fleets and settings the engine takes;
:func:`report_scenario` evaluates the checks on what the run measured and makes the
:class:`~iotix.scenario.RunReport` every report format is written from. The run itself
is the CLI's (its live view).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from iotix import __version__
from iotix.engine.fleet import FleetPlan
from iotix.engine.results import summarise
from iotix.engine.stages import Stage
from iotix.engine.worker import RunSettings, default_source_addresses
from iotix.scenario import CheckResult, RunReport
from iotix.scenario.checks import Check, evaluate, parse_check, run_metrics

if TYPE_CHECKING:
    from collections.abc import Mapping

    from iotix.engine.fleet import FleetResult
    from iotix.engine.worker import BrokerEndpoint
    from iotix.metrics import TimeSeries
    from iotix.scenario.loader import LoadedScenario


@dataclass(frozen=True)
class ScenarioPlan:
    """What the engine runs for a scenario."""

    fleets: list[FleetPlan]
    settings: RunSettings
    checks: list[Check]
    devices: int
    scale: float


def plan_scenario(
    scenario: LoadedScenario,
    *,
    scale: float = 1.0,
    brokers: tuple[BrokerEndpoint, ...] | None = None,
    routes: Mapping[str, Mapping[BrokerEndpoint, tuple[BrokerEndpoint, ...]]] | None = None,
) -> ScenarioPlan:
    """The fleets and settings of ``scenario``, with every fleet's devices and every
    duration multiplied by ``scale`` (at least one device a fleet); ``brokers`` replaces
    every fleet's broker (to point an example at your own); ``routes`` sends each fleet
    (by name) to other endpoints than its broker's (the fault proxies: one or more for
    each of its broker's endpoints, which its devices spread over), not the probe."""
    if not scale > 0:
        raise ValueError(f"scale must be above 0, not {scale}")
    total = scenario.devices
    fleets = []
    for fleet in scenario.fleets:
        devices = max(1, round(fleet.devices * scale))
        endpoints = brokers or fleet.brokers
        route = (routes or {}).get(fleet.name, {})
        overrides: dict[str, Any] = {
            "brokers": tuple(r for e in endpoints for r in route.get(e, (e,))),
            "username": fleet.username,
            "password": fleet.password,
            "qos": fleet.qos,
            "source_addresses": default_source_addresses(endpoints, devices),
            "credentials_file": None if fleet.credentials is None else str(fleet.credentials),
            "fleet": fleet.name,
            "adapter_options": dict(fleet.adapter),
            "adapter_timeout_s": fleet.adapter_timeout_s,
            "adapter_retries": fleet.adapter_retries,
        }
        if scenario.stages:
            # Each fleet follows the stages in proportion to its share of the devices.
            overrides["stages"] = tuple(
                Stage(stage.duration_s * scale, round(stage.devices * devices / total))
                for stage in scenario.stages
            )
        fleets.append(FleetPlan(fleet.model_path, devices, overrides))
    devices = sum(fleet.devices for fleet in fleets)
    settings = RunSettings(
        devices=devices,
        brokers=brokers or scenario.fleets[0].brokers,  # the probe subscribes here
        seed=scenario.seed,
        duration_s=scenario.duration_s * scale,
    )
    checks = [parse_check(expression, name) for name, expression in scenario.checks]
    return ScenarioPlan(fleets, settings, checks, devices, scale)


def report_scenario(
    scenario: LoadedScenario,
    plan: ScenarioPlan,
    outcome: FleetResult,
    series: TimeSeries,
    *,
    started_at: str,
    commands: Mapping[str, Any] | None = None,
    windowed: Mapping[int, CheckResult] | None = None,
    aborted: CheckResult | None = None,
) -> RunReport:
    """Evaluate the checks on the run's figures; the report of the run.

    ``commands`` is the summary of the scenario's command actions; ``windowed`` the
    results of the checks with a window (by index), evaluated by the conductor;
    ``aborted`` the live check that stopped the run, which fails whatever the end
    figures say."""
    summary = summarise(outcome.snapshot)
    if len(scenario.fleets) > 1:
        summary["fleets"] = {
            fleet.name: {
                "protocol": fleet.brokers[0].scheme,
                **summarise(outcome.by_fleet[number]),
            }
            for number, fleet in enumerate(scenario.fleets)
            if number in outcome.by_fleet
        }
    results = evaluate(plan.checks, run_metrics(summary, outcome.probe, commands, plan.devices))
    for i, result in (windowed or {}).items():
        results[i] = result
    if aborted is not None:
        results = [aborted if r.name == aborted.name else r for r in results]
    duration = summary["duration_s"]
    return RunReport(
        scenario=scenario.name,
        started_at=started_at,
        duration_s=float(duration) if duration is not None else math.nan,
        checks=results,
        summary=summary,
        time_series=[row.to_dict() for row in series.rows],
        probe=outcome.probe,
        worker_errors=list(outcome.worker_errors),
        metadata={
            "iotix": __version__,
            "scenario_file": str(scenario.path) if scenario.path else None,
            "seed": scenario.seed,
            "scale": plan.scale,
            "devices": plan.devices,
            "fleets": {
                fleet.name: f"{planned.devices} x {fleet.model.spec.name}"
                for fleet, planned in zip(scenario.fleets, plan.fleets, strict=True)
            },
            "brokers": sorted(
                {str(b) for planned in plan.fleets for b in planned.overrides["brokers"]}
            ),
            "interrupted": outcome.interrupted,
            "aborted": aborted is not None,
        },
    )


__all__ = ["ScenarioPlan", "plan_scenario", "report_scenario"]
