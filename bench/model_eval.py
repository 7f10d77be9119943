"""Model evaluation throughput: the columnar ``DeviceBatch`` against per-device loops.

For each model (default: the thermostat, and the PLC when ``plc.json`` exists) this
measures, on one core and in the same run, two paths:

``sample``
    Field sampling only: every field of every device, evaluated once per round at
    successive virtual times. Figure: field values/s = devices x fields x rounds / s.
``advance``
    The whole ``DeviceBatch.advance(now_s)`` path the engine runs: schedules, field
    sampling, state transitions, condition events and payload encoding into
    ``Message`` objects. Figures: messages/s, and field values/s counted as the model
    fields the messages carry.

Each path is raced against baselines that do the same work one device at a time:

``naive objects`` (thermostat only)
    One Python object per device with its own ``random.Random(seed + index)``,
    evaluating the thermostat's semantics in a plain loop and building the same JSON
    with ``json.dumps``: what a straightforward simulator would do.
``one-device batches`` (any model)
    One ``DeviceBatch(spec, indices=[i])`` per device, evaluated one by one: the same
    code without the batching, so the ratio is the value of batching. It is slow, so
    it runs over ``--baseline-devices`` devices; per-value rates do not depend on how
    many independent devices a loop visits.

Rounds of all contenders are interleaved (batch, baselines, batch, ...) and the best of
several repetitions is kept, after a warm-up round, so that drift on a shared machine
hits every contender alike; the ratios are the figures to trust (DESIGN.md, "Limits").

Run: ``.venv/bin/python bench/model_eval.py [--model PATH] [--devices 10000]``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from harness import cpu_model, pin_cores, print_header
from iotix.model.loader import load_model
from iotix.model.runtime import DEFAULT_EVENT_TOPIC, DEFAULT_TOPIC, DeviceBatch, Message
from iotix.model.runtime import MessageKind as Kind
from iotix.model.runtime import _Env as Env  # private on purpose: see batch_sampler
from iotix.model.spec import (
    BurstScheduleSpec,
    ChoiceSpec,
    ConstantFieldSpec,
    CounterFieldSpec,
    ExpressionFieldSpec,
    GaussianSpec,
    IntervalScheduleSpec,
    OnChangeScheduleSpec,
    PoissonScheduleSpec,
    RandomWalkFieldSpec,
    UniformSpec,
    WaveFieldSpec,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from iotix.model.loader import LoadedModel
    from iotix.model.spec import DeviceModelSpec

    Round = Callable[[], tuple[int, int]]
    """One round of work; returns (field values, messages) produced."""

MODELS_DIR = Path(__file__).resolve().parent.parent / "examples" / "device-models"
THERMOSTAT = MODELS_DIR / "thermostat.yaml"
PLC = MODELS_DIR / "plc.json"
TARGET_VALUES_PER_S = 1_000_000  # thermostat, field sampling, one core
SEED = 42
START_EPOCH_S = 1_700_000_000.0

FieldT = TypeVar("FieldT")

BATCH = "batch"
NAIVE = "naive objects"
SINGLES = "one-device batches"


@dataclass(frozen=True)
class Measurement:
    """The best repetition of one contender on one path."""

    model: str
    path: str  # "sample" or "advance"
    implementation: str
    devices: int
    values_per_s: float
    messages_per_s: float
    speedup: float  # the batch's values/s divided by this contender's (1.0 for the batch)


# --- the race -------------------------------------------------------------------------


def race(
    contenders: dict[str, Round], *, rounds: int, repeats: int, budget_s: float
) -> dict[str, tuple[float, float]]:
    """Best (values/s, messages/s) per contender, repetitions interleaved.

    Stops after ``repeats`` repetitions or once ``budget_s`` has passed, whichever comes
    first, but always times at least one repetition of every contender.
    """
    for one_round in contenders.values():
        one_round()  # warm-up: first-use caches (topics, numpy dispatch) are not timed
    best: dict[str, tuple[float, float]] = {}
    started = time.perf_counter()
    for _ in range(repeats):
        for name, one_round in contenders.items():
            gc.collect()
            values = messages = 0
            begin = time.perf_counter()
            for _ in range(rounds):
                done_values, done_messages = one_round()
                values += done_values
                messages += done_messages
            elapsed = time.perf_counter() - begin
            rate = (values / elapsed, messages / elapsed)
            if name not in best or rate[0] > best[name][0]:
                best[name] = rate
        if time.perf_counter() - started > budget_s:
            break
    return best


def round_step_s(spec: DeviceModelSpec) -> float:
    """Virtual seconds per round: the model's shortest send period, so that most devices
    send about one message per ``advance`` round."""
    periods = []
    for message in spec.messages.values():
        schedule = message.schedule
        if isinstance(schedule, IntervalScheduleSpec):
            periods.append(_typical(schedule.interval_s))
        elif isinstance(schedule, BurstScheduleSpec):
            periods.append(_typical(schedule.every_s))
        elif isinstance(schedule, OnChangeScheduleSpec):
            periods.append(schedule.sample_interval_s)
        elif isinstance(schedule, PoissonScheduleSpec):
            periods.append(1.0 / _typical(schedule.rate_hz))
    return min(periods, default=10.0)


def _typical(value: Any) -> float:
    if isinstance(value, UniformSpec):
        return (value.low + value.high) / 2.0
    if isinstance(value, GaussianSpec):
        return value.mean
    return float(value)


def values_per_message(spec: DeviceModelSpec) -> dict[tuple[Kind, str], int]:
    """How many model fields each kind of message carries (replies carry none)."""
    counts = {
        (Kind.TELEMETRY, name): len(message.fields or spec.fields)
        for name, message in spec.messages.items()
    }
    counts.update({(Kind.EVENT, name): len(e.fields or ()) for name, e in spec.events.items()})
    return counts


def field_values(messages: list[Message], counts: dict[tuple[Kind, str], int]) -> int:
    return sum(counts.get((m.kind, m.name), 0) for m in messages)


# --- the contenders -------------------------------------------------------------------


def batch_sampler(batch: DeviceBatch, step_s: float) -> Round:
    """Field sampling of the whole batch, nothing else.

    The benchmark calls ``_sample_fields`` with an ``_Env`` on purpose: that private
    method is the model evaluation alone, without schedules, events and encoding, and
    it is what the "field values per second" target is about. ``advance`` is measured
    separately, through the public API.
    """
    rows = np.arange(batch.size, dtype=np.intp)
    per_round = batch.size * len(batch.spec.fields)
    clock = itertools.count(1)

    def one_round() -> tuple[int, int]:
        t = np.full(batch.size, next(clock) * step_s)
        batch._sample_fields(Env(batch, rows, t))  # noqa: SLF001 - see the docstring
        return per_round, 0

    return one_round


def batch_advancer(batch: DeviceBatch, step_s: float) -> Round:
    counts = values_per_message(batch.spec)
    clock = itertools.count(1)

    def one_round() -> tuple[int, int]:
        out = batch.advance(next(clock) * step_s)
        return field_values(out, counts), len(out)

    return one_round


def singles_sampler(singles: list[DeviceBatch], step_s: float) -> Round:
    row = np.zeros(1, dtype=np.intp)
    per_round = len(singles) * (len(singles[0].spec.fields) if singles else 0)
    clock = itertools.count(1)

    def one_round() -> tuple[int, int]:
        t = np.full(1, next(clock) * step_s)
        for single in singles:
            single._sample_fields(Env(single, row, t))  # noqa: SLF001 - as batch_sampler
        return per_round, 0

    return one_round


def singles_advancer(singles: list[DeviceBatch], step_s: float) -> Round:
    counts = values_per_message(singles[0].spec) if singles else {}
    clock = itertools.count(1)

    def one_round() -> tuple[int, int]:
        now_s = next(clock) * step_s
        out: list[Message] = []
        for single in singles:
            out += single.advance(now_s)
        return field_values(out, counts), len(out)

    return one_round


# --- the naive thermostat -------------------------------------------------------------


class BaselineMismatchError(ValueError):
    """thermostat.yaml no longer has the shape the hand-written baseline mirrors."""


_COMPARISON = re.compile(r"^\s*(\w+)\s*([<>]=?)\s*(-?[\d.]+)\s*$")
_BELOW_MARGIN = re.compile(r"^\s*(\w+)\s*<\s*(\w+)\s*-\s*([\d.]+)\s*$")


def _plain(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BaselineMismatchError(f"{where} is no longer a plain number")
    return float(value)


def _field(spec: DeviceModelSpec, name: str, kind: type[FieldT]) -> FieldT:
    found = spec.fields[name]
    if not isinstance(found, kind):
        raise BaselineMismatchError(f"fields.{name} is no longer {kind.__name__}")
    return found


def _threshold(source: str | None, field: str, where: str) -> tuple[bool, float]:
    """``field > x`` or ``field < x`` as (above, x)."""
    match = _COMPARISON.match(source or "")
    if match is None or match[1] != field:
        raise BaselineMismatchError(f"{where} is no longer '{field} < or > number'")
    return match[2].startswith(">"), float(match[3])


@dataclass(frozen=True)
class ThermostatParams:
    """The numbers of thermostat.yaml, read from the spec so both sides stay in step."""

    start_mean: float
    start_stddev: float
    walk_step: float
    walk_mean: float
    reversion: float
    walk_min: float
    walk_max: float
    walk_round: int | None
    wave_period_s: float
    wave_amplitude: float
    wave_offset: float
    wave_phase_s: float
    wave_noise: float
    wave_round: int | None
    setpoint: float
    heating_margin: float
    battery_start: float
    battery_step: float
    battery_round: int | None
    interval_s: float
    jitter_s: float
    spread: bool
    alarm_above: float
    alarm_clear_below: float

    @classmethod
    def from_spec(cls, spec: DeviceModelSpec) -> ThermostatParams:
        fields = spec.fields
        expected = ["temperature", "humidity", "setpoint", "heating", "battery"]
        if list(fields) != expected:
            raise BaselineMismatchError(f"fields are {list(fields)}, expected {expected}")
        walk = _field(spec, "temperature", RandomWalkFieldSpec)
        wave = _field(spec, "humidity", WaveFieldSpec)
        setpoint = _field(spec, "setpoint", ConstantFieldSpec)
        heating = _field(spec, "heating", ExpressionFieldSpec)
        battery = _field(spec, "battery", CounterFieldSpec)
        if not isinstance(walk.start, GaussianSpec) or walk.start.min or walk.start.max:
            raise BaselineMismatchError("fields.temperature.start is no longer a gaussian")
        margin = _BELOW_MARGIN.match(heating.expr)
        if margin is None or (margin[1], margin[2]) != ("temperature", "setpoint"):
            raise BaselineMismatchError("fields.heating is no longer 'temperature < setpoint - x'")
        if wave.shape != "sine" or battery.wrap_at is not None:
            raise BaselineMismatchError("humidity is not a sine or battery wraps")
        if list(spec.messages) != ["telemetry"] or list(spec.events) != ["overheat"]:
            raise BaselineMismatchError("messages or events changed")
        message = spec.messages["telemetry"]
        schedule = message.schedule
        if not isinstance(schedule, IntervalScheduleSpec) or message.fields is not None:
            raise BaselineMismatchError("messages.telemetry is no longer an interval of all")
        if message.payload.kind != "json" or getattr(message.payload, "template", None):
            raise BaselineMismatchError("messages.telemetry no longer has the default JSON")
        alarm = spec.events["overheat"]
        above, on = _threshold(alarm.when, "temperature", "events.overheat.when")
        below, off = _threshold(alarm.clear_when, "temperature", "events.overheat.clear_when")
        if not above or below or not alarm.send_clear or alarm.fields != ["temperature"]:
            raise BaselineMismatchError("events.overheat changed shape")
        if spec.states is not None or alarm.payload is not None:
            raise BaselineMismatchError("the thermostat grew states or an event payload")
        return cls(
            start_mean=walk.start.mean,
            start_stddev=walk.start.stddev,
            walk_step=_plain(walk.step, "temperature.step"),
            walk_mean=_plain(walk.mean, "temperature.mean"),
            reversion=walk.reversion,
            walk_min=-math.inf if walk.min is None else walk.min,
            walk_max=math.inf if walk.max is None else walk.max,
            walk_round=walk.round,
            wave_period_s=_plain(wave.period_s, "humidity.period_s"),
            wave_amplitude=_plain(wave.amplitude, "humidity.amplitude"),
            wave_offset=_plain(wave.offset, "humidity.offset"),
            wave_phase_s=_plain(wave.phase_s, "humidity.phase_s"),
            wave_noise=_plain(wave.noise, "humidity.noise"),
            wave_round=wave.round,
            setpoint=_plain(setpoint.value, "setpoint.value"),
            heating_margin=float(margin[3]),
            battery_start=_plain(battery.start, "battery.start"),
            battery_step=_plain(battery.step, "battery.step"),
            battery_round=battery.round,
            interval_s=_plain(schedule.interval_s, "telemetry.interval_s"),
            jitter_s=schedule.jitter_s,
            spread=schedule.start == "spread",
            alarm_above=on,
            alarm_clear_below=off,
        )


class NaiveThermostat:
    """One thermostat as one object, the way a simple simulator would write it."""

    __slots__ = (
        "alarm",
        "alarm_seq",
        "base_s",
        "battery",
        "device_id",
        "due_s",
        "event_topic",
        "index",
        "p",
        "rng",
        "seq",
        "setpoint",
        "temperature",
        "topic",
    )

    def __init__(self, spec: DeviceModelSpec, p: ThermostatParams, index: int) -> None:
        self.p = p
        self.index = index
        self.rng = rng = random.Random(SEED + index)
        names: dict[str, Any] = {"index": index, "model": spec.name}
        for name, value in spec.attributes.items():
            if isinstance(value, ChoiceSpec):
                names[name] = rng.choices(value.values, value.weights)[0]
            elif isinstance(value, str | int | float):
                names[name] = value
            else:
                raise BaselineMismatchError(f"attributes.{name} is neither a choice nor plain")
        self.device_id = spec.id.format(**names)
        names["device_id"] = self.device_id
        message = spec.messages["telemetry"]
        self.topic = (message.topic or DEFAULT_TOPIC).format(message="telemetry", **names)
        event = spec.events["overheat"]
        self.event_topic = (event.topic or DEFAULT_EVENT_TOPIC).format(event="overheat", **names)
        start = rng.gauss(p.start_mean, p.start_stddev)
        self.temperature = min(max(start, p.walk_min), p.walk_max)
        self.setpoint = p.setpoint
        self.battery = p.battery_start
        self.seq = self.alarm_seq = 0
        self.alarm = False
        self.base_s = rng.random() * p.interval_s if p.spread else 0.0
        self.due_s = max(0.0, self.base_s + p.jitter_s * rng.uniform(-1.0, 1.0))

    def sample(self, t: float) -> tuple[float, float, float, bool, float]:
        """Every field once, at virtual time ``t``."""
        p, rng = self.p, self.rng
        walk = self.temperature + p.walk_step * rng.gauss(0.0, 1.0)
        walk += p.reversion * (p.walk_mean - walk)
        walk = min(max(walk, p.walk_min), p.walk_max)
        self.temperature = walk
        temperature = walk if p.walk_round is None else round(walk, p.walk_round)
        cycle = (t + p.wave_phase_s) / p.wave_period_s
        humidity = p.wave_offset + p.wave_amplitude * math.sin(2.0 * math.pi * (cycle % 1.0))
        humidity += p.wave_noise * rng.gauss(0.0, 1.0)
        if p.wave_round is not None:
            humidity = round(humidity, p.wave_round)
        battery = self.battery
        self.battery = battery + p.battery_step
        if p.battery_round is not None:
            battery = round(battery, p.battery_round)
        heating = temperature < self.setpoint - p.heating_margin
        return temperature, humidity, self.setpoint, heating, battery

    def advance(self, now_s: float, out: list[Message], start_epoch_s: float) -> None:
        """Append every message due by ``now_s``: alarms first, then telemetry."""
        p = self.p
        while self.due_s <= now_s:
            due_s = self.due_s
            temperature, humidity, setpoint, heating, battery = self.sample(due_s)
            ts_ms = round((start_epoch_s + due_s) * 1000.0)
            rising = not self.alarm and temperature > p.alarm_above
            clearing = self.alarm and temperature < p.alarm_clear_below
            if rising or clearing:
                self.alarm = rising
                record = {
                    "device_id": self.device_id,
                    "event": "overheat",
                    "severity": "major",
                    "active": rising,
                    "state": "default",
                    "ts_ms": ts_ms,
                    "seq": self.alarm_seq,
                    "temperature": temperature,
                }
                out.append(self._message("overheat", Kind.EVENT, record, due_s, self.alarm_seq))
                self.alarm_seq += 1
            record = {
                "device_id": self.device_id,
                "ts_ms": ts_ms,
                "seq": self.seq,
                "temperature": temperature,
                "humidity": humidity,
                "setpoint": setpoint,
                "heating": heating,
                "battery": battery,
            }
            out.append(self._message("telemetry", Kind.TELEMETRY, record, due_s, self.seq))
            self.seq += 1
            self.base_s += p.interval_s
            jittered = self.base_s + p.jitter_s * self.rng.uniform(-1.0, 1.0)
            self.due_s = max(jittered, due_s)

    def _message(
        self, name: str, kind: Kind, record: dict[str, Any], due_s: float, seq: int
    ) -> Message:
        return Message(
            device_index=self.index,
            device_id=self.device_id,
            name=name,
            kind=kind,
            topic=self.topic if kind is Kind.TELEMETRY else self.event_topic,
            payload=json.dumps(record, separators=(",", ":")).encode(),
            due_s=due_s,
            seq=seq,
            qos=1,
        )


def naive_sampler(devices: list[NaiveThermostat], step_s: float) -> Round:
    per_round = len(devices) * 5
    clock = itertools.count(1)

    def one_round() -> tuple[int, int]:
        t = next(clock) * step_s
        for device in devices:
            device.sample(t)
        return per_round, 0

    return one_round


def naive_advancer(devices: list[NaiveThermostat], spec: DeviceModelSpec, step_s: float) -> Round:
    counts = values_per_message(spec)
    clock = itertools.count(1)

    def one_round() -> tuple[int, int]:
        now_s = next(clock) * step_s
        out: list[Message] = []
        for device in devices:
            device.advance(now_s, out, START_EPOCH_S)
        return field_values(out, counts), len(out)

    return one_round


# --- one model ------------------------------------------------------------------------


def new_batch(model: LoadedModel, indices: Sequence[int]) -> DeviceBatch:
    return DeviceBatch(
        model.spec,
        indices=np.asarray(indices, dtype=np.int64),
        seed=SEED,
        start_epoch_s=START_EPOCH_S,
        base_dir=model.base_dir,
    )


def contenders_for(
    model: LoadedModel, path: str, sizes: dict[str, int], params: ThermostatParams | None
) -> dict[str, Round]:
    """Fresh devices for each path, so that one path's rounds do not age the other's."""
    spec, step_s, sample = model.spec, round_step_s(model.spec), path == "sample"
    batch = new_batch(model, range(sizes[BATCH]))
    found = {BATCH: batch_sampler(batch, step_s) if sample else batch_advancer(batch, step_s)}
    if params is not None:
        naive = [NaiveThermostat(spec, params, i) for i in range(sizes[NAIVE])]
        found[NAIVE] = (
            naive_sampler(naive, step_s) if sample else naive_advancer(naive, spec, step_s)
        )
    singles = [new_batch(model, [i]) for i in range(sizes[SINGLES])]
    found[SINGLES] = (
        singles_sampler(singles, step_s) if sample else singles_advancer(singles, step_s)
    )
    return found


def benchmark_model(
    model: LoadedModel,
    *,
    devices: int,
    baseline_devices: int,
    rounds: int,
    repeats: int,
    budget_s: float,
) -> list[Measurement]:
    """Both paths of one model, each raced against its baselines."""
    try:
        params: ThermostatParams | None = ThermostatParams.from_spec(model.spec)
    except BaselineMismatchError:
        if model.spec.name == "thermostat":
            raise  # the thermostat's naive baseline must not disappear silently
        params = None
    sizes = {BATCH: devices, NAIVE: devices, SINGLES: min(baseline_devices, devices)}
    results = []
    for path in ("sample", "advance"):
        contenders = contenders_for(model, path, sizes, params)
        best = race(contenders, rounds=rounds, repeats=repeats, budget_s=budget_s)
        batch_rate = best[BATCH][0]
        results += [
            Measurement(
                model=model.spec.name,
                path=path,
                implementation=kind,
                devices=sizes[kind],
                values_per_s=values,
                messages_per_s=messages,
                speedup=batch_rate / values if values else math.inf,
            )
            for kind, (values, messages) in best.items()
        ]
    return results


# --- reporting ------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    return {
        "cpu": cpu_model(),
        "nproc": str(os.cpu_count()),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def print_table(results: list[Measurement]) -> None:
    header = (
        f"{'model':<12} {'path':<8} {'implementation':<19} {'devices':>8} "
        f"{'field values/s':>15} {'messages/s':>12} {'batch / this':>13}"
    )
    print_header(header)
    for r in results:
        messages = f"{r.messages_per_s:,.0f}" if r.path == "advance" else "-"
        speedup = "1 (itself)" if r.implementation == BATCH else f"{r.speedup:,.1f}x"
        print(
            f"{r.model:<12} {r.path:<8} {r.implementation:<19} {r.devices:>8,} "
            f"{r.values_per_s:>15,.0f} {messages:>12} {speedup:>13}"
        )


def print_verdict(results: list[Measurement]) -> None:
    """The target is set on sampling; the full path is held against the same figure."""
    for r in results:
        if r.model == "thermostat" and r.implementation == BATCH:
            reached = r.values_per_s >= TARGET_VALUES_PER_S
            if r.path == "sample":
                verdict = "target met" if reached else "target MISSED"
            else:
                verdict = "above" if reached else "below"
                verdict += " the target's figure (the target is set on sampling)"
            print(
                f"thermostat {r.path}: {r.values_per_s:,.0f} field values/s per core "
                f"(target {TARGET_VALUES_PER_S:,}): {verdict}"
            )


def default_models() -> list[Path]:
    return [path for path in (THERMOSTAT, PLC) if path == THERMOSTAT or path.exists()]


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model PATH``, repeatable: the models :func:`default_models` stands in for."""
    parser.add_argument(
        "--model",
        action="append",
        type=Path,
        help="model file (repeatable); default: thermostat, and the PLC when present",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_model_option(parser)
    parser.add_argument("--devices", type=int, default=10_000, help="devices in the batch")
    parser.add_argument(
        "--baseline-devices",
        type=int,
        default=200,
        help="devices in the one-device-batches baseline (it is slow)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="rounds per repetition")
    parser.add_argument("--repeats", type=int, default=5, help="most repetitions; best kept")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="time budget per path and model"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one core")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Measurement]:
    args = parse_args(argv)
    core, _ = pin_cores(pin=not args.no_pin)
    facts = machine()
    print(
        f"# model_eval: {facts['cpu']}, nproc {facts['nproc']}, "
        f"{'not pinned' if core is None else f'pinned to core {core}'}, "
        f"Python {facts['python']}, numpy {facts['numpy']}"
    )
    print(
        f"# rounds/repetition {args.rounds}, at most {args.repeats} repetitions or "
        f"{args.seconds:g} s per path, best kept; one warm-up round each"
    )
    results: list[Measurement] = []
    for path in args.model or default_models():
        results += benchmark_model(
            load_model(path),
            devices=args.devices,
            baseline_devices=args.baseline_devices,
            rounds=args.rounds,
            repeats=args.repeats,
            budget_s=args.seconds,
        )
    print_table(results)
    print_verdict(results)
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
