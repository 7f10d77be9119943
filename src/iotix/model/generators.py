"""Columnar field generators: one object per field, one array element per device.

A generator is built once for a batch of devices and keeps its per-device state in
numpy arrays (a walk's position, a counter, the number of random draws so far). Each
``sample(rows, t, env)`` call evaluates the field for the selected rows at their virtual
times ``t`` (seconds since the run started) and returns an array aligned with ``rows``.
Randomness comes from :mod:`iotix.model.streams`, so results depend only on the seed,
the field and the device index, never on the batch.
"""

from __future__ import annotations

import csv
import os
import string
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from typing_extensions import override

from iotix.errors import ExpressionError, ReplayError
from iotix.model.expr import compile_expression
from iotix.model.spec import (
    BooleanFieldSpec,
    ChoiceSpec,
    ConstantFieldSpec,
    CounterFieldSpec,
    ExpressionFieldSpec,
    FieldSpec,
    GaussianFieldSpec,
    GaussianSpec,
    GPSAreaFieldSpec,
    GPSRouteFieldSpec,
    RandomWalkFieldSpec,
    ReplayFieldSpec,
    TemplateFieldSpec,
    TimestampFieldSpec,
    UniformFieldSpec,
    UniformSpec,
    UUIDFieldSpec,
    WaveFieldSpec,
    WeightedChoiceFieldSpec,
)
from iotix.model.streams import F64, Stream, cumulative_weights

Rows = npt.NDArray[np.intp]
Param = float | F64
"""A per-device parameter: a plain float shared by all, or one value per device."""

EARTH_RADIUS_M = 6_371_008.8


@dataclass
class BuildContext:
    """What generators need to know about the batch they are built for."""

    seed: int
    indices: npt.NDArray[np.int64]
    start_epoch_s: float = 0.0
    base_dir: Path | None = None
    _replay_cache: dict[Path, ReplayTable] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.indices)

    def stream(self, name: str) -> Stream:
        return Stream(self.seed, name, self.indices)

    def draw(self, value: Any, name: str) -> Any:
        """Resolve a plain value or a distribution into one value per device."""
        all_rows = slice(None)
        if isinstance(value, UniformSpec):
            drawn: F64 = value.low + (value.high - value.low) * self.stream(name).uniform(
                all_rows, 0
            )
            return _rounded(drawn, value.round)
        if isinstance(value, GaussianSpec):
            drawn = value.mean + value.stddev * self.stream(name).normal(all_rows, 0)
            if value.min is not None or value.max is not None:
                drawn = np.clip(drawn, value.min, value.max)
            return _rounded(drawn, value.round)
        if isinstance(value, ChoiceSpec):
            table = np.asarray(value.values)
            cumulative = cumulative_weights(value.weights, len(value.values))
            return table[self.stream(name).choice(all_rows, 0, cumulative)]
        return value

    def param(self, value: Any, name: str) -> Param:
        """Like :meth:`draw`, for numeric parameters."""
        drawn = self.draw(value, name)
        if isinstance(drawn, np.ndarray):
            return drawn.astype(np.float64)
        return float(drawn)

    def replay_table(self, path: Path) -> ReplayTable:
        resolved = path if path.is_absolute() or self.base_dir is None else self.base_dir / path
        table = self._replay_cache.get(resolved)
        if table is None:
            table = ReplayTable.load(resolved)
            self._replay_cache[resolved] = table
        return table


def at(param: Param, rows: Rows) -> Param:
    """The selected rows of a per-device parameter (a shared float stays as it is)."""
    return param[rows] if isinstance(param, np.ndarray) else param


class FieldGenerator(ABC):
    """Base of the generators. Settable ones (``settable = True``) also override
    ``current`` and ``set``, which commands use."""

    settable = False

    @abstractmethod
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        """The field's values for ``rows`` at their times ``t``."""

    def current(self, rows: Rows) -> Any:
        """The value a command sees for a settable field."""
        del rows
        raise TypeError(f"{type(self).__name__} is not settable")

    def set(self, rows: Rows, value: Any) -> None:
        del rows, value
        raise TypeError(f"{type(self).__name__} is not settable")


class _Drawing(FieldGenerator):
    """A generator that draws fresh randomness on every sample."""

    def __init__(self, ctx: BuildContext, name: str) -> None:
        self._stream = ctx.stream(name)
        self._draws = np.zeros(ctx.size, dtype=np.uint64)

    def _next_draws(self, rows: Rows) -> npt.NDArray[np.uint64]:
        draws = self._draws[rows]
        self._draws[rows] = draws + np.uint64(1)
        return draws


def _rounded(values: F64, decimals: int | None) -> Any:
    """Values rounded to ``decimals``; ``round: 0`` gives integers."""
    if decimals is None:
        return values
    if decimals == 0:
        return np.round(values).astype(np.int64)
    return np.round(values, decimals)


class ConstantGenerator(FieldGenerator):
    settable = True

    def __init__(self, spec: ConstantFieldSpec, ctx: BuildContext, name: str) -> None:
        drawn = ctx.draw(spec.value, name)
        if isinstance(drawn, np.ndarray):
            self._values: npt.NDArray[Any] = drawn
        else:
            self._values = np.full(ctx.size, drawn, dtype=_dtype_of(drawn))

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        return self._values[rows]

    @override
    def current(self, rows: Rows) -> Any:
        return self._values[rows]

    @override
    def set(self, rows: Rows, value: Any) -> None:
        if self._values.dtype.kind in "iub" and not isinstance(value, int | bool | np.integer):
            self._values = self._values.astype(object if isinstance(value, str) else np.float64)
        elif self._values.dtype.kind == "U":
            self._values = self._values.astype(object)
        self._values[rows] = value


def _dtype_of(value: Any) -> Any:
    if isinstance(value, bool):
        return np.bool_
    if isinstance(value, int):
        return np.int64
    if isinstance(value, float):
        return np.float64
    return object


class CounterGenerator(FieldGenerator):
    settable = True

    def __init__(self, spec: CounterFieldSpec, ctx: BuildContext, name: str) -> None:
        self._start = ctx.param(spec.start, f"{name}.start")
        self._step = ctx.param(spec.step, f"{name}.step")
        self._wrap_at = spec.wrap_at
        self._round = spec.round
        self._values = np.zeros(ctx.size, dtype=np.float64) + self._start
        integral = all(
            isinstance(p, float) and p.is_integer() for p in (self._start, self._step)
        ) and (spec.wrap_at is None or float(spec.wrap_at).is_integer())
        self._integral = integral

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        values = self._values[rows]
        following = values + at(self._step, rows)
        if self._wrap_at is not None:
            following = np.where(following >= self._wrap_at, at(self._start, rows), following)
        self._values[rows] = following
        if self._integral and self._round is None:
            return values.astype(np.int64)
        return _rounded(values, self._round)

    @override
    def current(self, rows: Rows) -> Any:
        return self._values[rows]

    @override
    def set(self, rows: Rows, value: Any) -> None:
        self._values[rows] = value


class UniformGenerator(_Drawing):
    def __init__(self, spec: UniformFieldSpec, ctx: BuildContext, name: str) -> None:
        super().__init__(ctx, name)
        self._low = ctx.param(spec.low, f"{name}.low")
        self._high = ctx.param(spec.high, f"{name}.high")
        self._round = spec.round

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        low = at(self._low, rows)
        u = self._stream.uniform(rows, self._next_draws(rows))
        return _rounded(low + (at(self._high, rows) - low) * u, self._round)


class GaussianGenerator(_Drawing):
    def __init__(self, spec: GaussianFieldSpec, ctx: BuildContext, name: str) -> None:
        super().__init__(ctx, name)
        self._mean = ctx.param(spec.mean, f"{name}.mean")
        self._stddev = ctx.param(spec.stddev, f"{name}.stddev")
        self._min, self._max, self._round = spec.min, spec.max, spec.round

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        z = self._stream.normal(rows, self._next_draws(rows))
        values = at(self._mean, rows) + at(self._stddev, rows) * z
        if self._min is not None or self._max is not None:
            values = np.clip(values, self._min, self._max)
        return _rounded(values, self._round)


class RandomWalkGenerator(_Drawing):
    settable = True

    def __init__(self, spec: RandomWalkFieldSpec, ctx: BuildContext, name: str) -> None:
        super().__init__(ctx, name)
        start = ctx.param(spec.start, f"{name}.start")
        self._values = np.zeros(ctx.size, dtype=np.float64) + start
        self._step = ctx.param(spec.step, f"{name}.step")
        self._mean = None if spec.mean is None else ctx.param(spec.mean, f"{name}.mean")
        self._reversion = spec.reversion
        self._min, self._max, self._round = spec.min, spec.max, spec.round
        if self._min is not None or self._max is not None:
            np.clip(self._values, self._min, self._max, out=self._values)

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        values = self._values[rows]
        values += at(self._step, rows) * self._stream.normal(rows, self._next_draws(rows))
        if self._reversion and self._mean is not None:
            values += self._reversion * (at(self._mean, rows) - values)
        if self._min is not None or self._max is not None:
            np.clip(values, self._min, self._max, out=values)
        self._values[rows] = values
        return _rounded(values, self._round)

    @override
    def current(self, rows: Rows) -> Any:
        return _rounded(self._values[rows], self._round)

    @override
    def set(self, rows: Rows, value: Any) -> None:
        self._values[rows] = value


class WaveGenerator(_Drawing):
    def __init__(self, spec: WaveFieldSpec, ctx: BuildContext, name: str) -> None:
        super().__init__(ctx, name)
        self._shape = spec.shape
        self._period = ctx.param(spec.period_s, f"{name}.period_s")
        self._amplitude = ctx.param(spec.amplitude, f"{name}.amplitude")
        self._offset = ctx.param(spec.offset, f"{name}.offset")
        self._phase = ctx.param(spec.phase_s, f"{name}.phase_s")
        self._noise = ctx.param(spec.noise, f"{name}.noise")
        self._round = spec.round
        # On the wall clock, a daily wave peaks at the same time of day whenever it starts.
        self._epoch_s = ctx.start_epoch_s if spec.time_base == "wall" else 0.0

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        clock = t + self._epoch_s
        cycle = (clock + at(self._phase, rows)) / at(self._period, rows)
        frac = cycle - np.floor(cycle)
        if self._shape == "sine":
            unit = np.sin(2.0 * np.pi * frac)
        elif self._shape == "square":
            unit = np.where(frac < 0.5, 1.0, -1.0)
        elif self._shape == "sawtooth":
            unit = 2.0 * frac - 1.0
        else:  # triangle: -1 at the start, +1 at half period
            unit = 1.0 - 4.0 * np.abs(frac - 0.5)
        values = at(self._offset, rows) + at(self._amplitude, rows) * unit
        noise = at(self._noise, rows)
        if not (isinstance(noise, float) and noise == 0.0):
            values = values + noise * self._stream.normal(rows, self._next_draws(rows))
        return _rounded(values, self._round)


class ChoiceGenerator(_Drawing):
    def __init__(self, spec: WeightedChoiceFieldSpec, ctx: BuildContext, name: str) -> None:
        super().__init__(ctx, name)
        self._table = np.asarray(spec.values)
        self._cumulative = cumulative_weights(spec.weights, len(spec.values))

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        return self._table[self._stream.choice(rows, self._next_draws(rows), self._cumulative)]


class BooleanGenerator(_Drawing):
    def __init__(self, spec: BooleanFieldSpec, ctx: BuildContext, name: str) -> None:
        super().__init__(ctx, name)
        self._probability = ctx.param(spec.probability, f"{name}.probability")

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        return self._stream.uniform(rows, self._next_draws(rows)) < at(self._probability, rows)


class TimestampGenerator(FieldGenerator):
    def __init__(self, spec: TimestampFieldSpec, ctx: BuildContext) -> None:
        self._format = spec.format
        self._start_ms = round(ctx.start_epoch_s * 1000)

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        millis = self._start_ms + np.round(t * 1000.0).astype(np.int64)
        if self._format == "epoch_ms":
            return millis
        if self._format == "epoch_s":
            return millis / 1000.0
        stamps = np.datetime_as_string(millis.astype("datetime64[ms]"), unit="ms")
        return np.char.add(stamps, "Z")


class UUIDGenerator(_Drawing):
    def __init__(self, spec: UUIDFieldSpec, ctx: BuildContext, name: str) -> None:
        super().__init__(ctx, name)
        self._per_device = spec.per == "device"

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        draws = np.zeros(len(rows), np.uint64) if self._per_device else self._next_draws(rows)
        high = self._stream.bits(rows, draws * np.uint64(2))
        low = self._stream.bits(rows, draws * np.uint64(2) + np.uint64(1))
        # RFC 9562 version 4: version nibble 4, variant bits 10.
        high = (high & np.uint64(0xFFFFFFFFFFFF0FFF)) | np.uint64(0x4000)
        low = (low & np.uint64(0x3FFFFFFFFFFFFFFF)) | np.uint64(0x8000000000000000)
        out = np.empty(len(rows), dtype=object)
        for i, (h, lo) in enumerate(zip(high.tolist(), low.tolist(), strict=True)):
            text = f"{h:016x}{lo:016x}"
            out[i] = f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
        return out


def template_names(template: str) -> list[str]:
    """The top-level names a str.format template reads (``{a.b:>3}`` reads ``a``)."""
    names = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name:
            head = field_name.split(".", 1)[0].split("[", 1)[0]
            names.append(head)
    return names


class TemplateGenerator(FieldGenerator):
    def __init__(self, spec: TemplateFieldSpec) -> None:
        self._template = spec.template
        self._names = template_names(spec.template)

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        columns = {name: _as_list(env[name], len(rows)) for name in set(self._names)}
        out = np.empty(len(rows), dtype=object)
        fmt = self._template.format
        for i in range(len(rows)):
            out[i] = fmt(**{name: column[i] for name, column in columns.items()})
        return out


def _as_list(value: Any, count: int) -> list[Any]:
    if isinstance(value, np.ndarray):
        listed: list[Any] = value.tolist()
        return listed
    if isinstance(value, Mapping):  # a GPS position: one per row, `{pos.lat}` works
        parts = {key: np.asarray(part).tolist() for key, part in value.items()}
        return [_Parts({key: part[i] for key, part in parts.items()}) for i in range(count)]
    return [value] * count


class _Parts(dict[str, Any]):
    """A structured value whose parts a format string reads as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ExpressionGenerator(FieldGenerator):
    def __init__(self, spec: ExpressionFieldSpec) -> None:
        self._expression = compile_expression(spec.expr)
        self._round = spec.round

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        values = self._expression(env)
        if not isinstance(values, np.ndarray) or values.shape != (len(rows),):
            values = np.broadcast_to(np.asarray(values), (len(rows),)).copy()
        if self._round is not None and values.dtype.kind == "f":
            return _rounded(values, self._round)
        return values


def _offset_latlon(
    lat: F64, lon: F64, north_m: F64 | float, east_m: F64 | float
) -> tuple[F64, F64]:
    """Move points by metres north and east (equirectangular; fine below ~100 km)."""
    dlat = np.degrees(np.asarray(north_m) / EARTH_RADIUS_M)
    dlon = np.degrees(np.asarray(east_m) / (EARTH_RADIUS_M * np.cos(np.radians(lat))))
    return lat + dlat, lon + dlon


class GPSAreaGenerator(_Drawing):
    """Each device sits at its own point of the circle, jittering by ``jitter_m``."""

    def __init__(self, spec: GPSAreaFieldSpec, ctx: BuildContext, name: str) -> None:
        super().__init__(ctx, name)
        place = ctx.stream(f"{name}.place")
        everyone = slice(None)
        # sqrt keeps the points uniform over the disc's area, not crowded at its centre.
        radius = spec.radius_m * np.sqrt(place.uniform(everyone, 0))
        angle = 2.0 * np.pi * place.uniform(everyone, 1)
        centre_lat = np.full(ctx.size, spec.center.lat)
        centre_lon = np.full(ctx.size, spec.center.lon)
        self._lat, self._lon = _offset_latlon(
            centre_lat, centre_lon, radius * np.cos(angle), radius * np.sin(angle)
        )
        self._jitter_m = spec.jitter_m

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        lat, lon = self._lat[rows], self._lon[rows]
        if self._jitter_m:
            draws = self._next_draws(rows) * np.uint64(2)
            north = self._jitter_m * self._stream.normal(rows, draws)
            east = self._jitter_m * self._stream.normal(rows, draws + np.uint64(1))
            lat, lon = _offset_latlon(lat, lon, north, east)
        zeros = np.zeros(len(rows))
        return {"lat": np.round(lat, 7), "lon": np.round(lon, 7), "heading": zeros, "speed": zeros}


@dataclass(frozen=True)
class _Route:
    lat: F64
    lon: F64
    cumulative_m: F64  # distance from the first waypoint to each waypoint
    heading_deg: F64  # heading of each leg

    @classmethod
    def build(cls, points: list[tuple[float, float]]) -> _Route:
        lat = np.array([p[0] for p in points])
        lon = np.array([p[1] for p in points])
        phi1, phi2 = np.radians(lat[:-1]), np.radians(lat[1:])
        dphi, dlmb = phi2 - phi1, np.radians(lon[1:] - lon[:-1])
        a = np.sin(dphi / 2) ** 2 + np.cos(phi1) * np.cos(phi2) * np.sin(dlmb / 2) ** 2
        legs = 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
        y = np.sin(dlmb) * np.cos(phi2)
        x = np.cos(phi1) * np.sin(phi2) - np.sin(phi1) * np.cos(phi2) * np.cos(dlmb)
        heading = (np.degrees(np.arctan2(y, x)) + 360.0) % 360.0
        return cls(lat, lon, np.concatenate([[0.0], np.cumsum(legs)]), heading)

    @property
    def length_m(self) -> float:
        return float(self.cumulative_m[-1])


class GPSRouteGenerator(FieldGenerator):
    """Position along a route at a constant speed: a pure function of time."""

    def __init__(self, spec: GPSRouteFieldSpec, ctx: BuildContext, name: str) -> None:
        self._routes = [_Route.build([(p.lat, p.lon) for p in route]) for route in spec.routes]
        cumulative = cumulative_weights(spec.route_weights, len(self._routes))
        self._route_of = ctx.stream(f"{name}.route").choice(slice(None), 0, cumulative)
        self._speed = ctx.param(spec.speed_mps, f"{name}.speed_mps")
        self._start = ctx.param(spec.start_fraction, f"{name}.start_fraction")
        self._loop = spec.loop

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        n = len(rows)
        lat, lon, heading = np.empty(n), np.empty(n), np.empty(n)
        speed = np.broadcast_to(np.asarray(at(self._speed, rows), dtype=np.float64), (n,))
        start = np.broadcast_to(np.asarray(at(self._start, rows), dtype=np.float64), (n,))
        route_of = self._route_of[rows]
        for number, route in enumerate(self._routes):
            mask = route_of == number
            if not mask.any():
                continue
            length = route.length_m
            travelled = start[mask] * length + speed[mask] * t[mask]
            if self._loop:
                along, backwards = np.mod(travelled, length), np.zeros(mask.sum(), dtype=bool)
            else:  # ping-pong: out and back
                lap = np.mod(travelled, 2 * length)
                backwards = lap > length
                along = np.where(backwards, 2 * length - lap, lap)
            leg = np.clip(np.searchsorted(route.cumulative_m, along, side="right") - 1, 0, None)
            leg = np.minimum(leg, len(route.lat) - 2)
            span = route.cumulative_m[leg + 1] - route.cumulative_m[leg]
            frac = np.divide(
                along - route.cumulative_m[leg], span, out=np.zeros_like(along), where=span > 0
            )
            lat[mask] = route.lat[leg] + frac * (route.lat[leg + 1] - route.lat[leg])
            lon[mask] = route.lon[leg] + frac * (route.lon[leg + 1] - route.lon[leg])
            heading[mask] = np.where(
                backwards, (route.heading_deg[leg] + 180.0) % 360.0, route.heading_deg[leg]
            )
        return {
            "lat": np.round(lat, 7),
            "lon": np.round(lon, 7),
            "heading": np.round(heading, 1),
            "speed": speed.copy(),
        }


@dataclass(frozen=True)
class ReplayTable:
    """A CSV file parsed once: its columns, numeric where every value parses."""

    path: Path
    columns: dict[str, npt.NDArray[Any]]
    rows: int

    @classmethod
    def load(cls, path: Path) -> ReplayTable:
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if not header:
                    raise ReplayError("the file is empty; it needs a header row", file=path)
                records = []
                for line_number, record in enumerate(reader, start=2):
                    if not record:
                        continue
                    if len(record) != len(header):
                        raise ReplayError(
                            f"row has {len(record)} values but the header has {len(header)}",
                            file=path,
                            line=line_number,
                        )
                    records.append(record)
        except OSError as exc:
            raise ReplayError(f"cannot read the replay file: {exc.strerror}", file=path) from exc
        except UnicodeDecodeError as exc:
            raise ReplayError("the file is not UTF-8 text", file=path) from exc
        except csv.Error as exc:
            raise ReplayError(f"malformed CSV: {exc}", file=path) from exc
        if not records:
            raise ReplayError("the file has a header but no data rows", file=path)
        columns: dict[str, npt.NDArray[Any]] = {}
        for position, name in enumerate(header):
            raw = [record[position] for record in records]
            try:
                columns[name.strip()] = np.array([float(value) for value in raw])
            except ValueError:
                columns[name.strip()] = np.array(raw, dtype=object)
        return cls(path, columns, len(records))

    def column(self, name: str) -> npt.NDArray[Any]:
        try:
            return self.columns[name]
        except KeyError:
            known = ", ".join(self.columns)
            raise ReplayError(f"no column {name!r}; columns: {known}", file=self.path) from None


class ReplayGenerator(FieldGenerator):
    def __init__(self, spec: ReplayFieldSpec, ctx: BuildContext) -> None:
        table = ctx.replay_table(spec.file)
        self._values = table.column(spec.column)
        self._rows = table.rows
        self._loop = spec.loop
        # Keyed by the file, not the field: all columns of one file stay on the same row.
        stagger_stream = ctx.stream(f"replay:{Path(os.path.normpath(spec.file)).as_posix()}")
        stagger = stagger_stream.uniform(slice(None), 0) if spec.stagger else None
        self._times: F64 | None = None
        if spec.time_column is None:
            self._next = (
                np.zeros(ctx.size, dtype=np.int64)
                if stagger is None
                else np.floor(stagger * table.rows).astype(np.int64)
            )
            return
        times = table.column(spec.time_column)
        if times.dtype.kind != "f":
            raise ReplayError(f"time column {spec.time_column!r} is not numeric", file=table.path)
        if np.any(np.diff(times) < 0):
            raise ReplayError(
                f"time column {spec.time_column!r} must not decrease", file=table.path
            )
        self._times = times - times[0]
        gaps = np.diff(self._times)
        # One period of a looped recording ends one typical gap after its last row.
        self._span = float(self._times[-1] + (np.median(gaps) if len(gaps) else 1.0))
        self._warp = spec.time_warp
        self._offset = np.zeros(ctx.size) if stagger is None else stagger * self._span

    @override
    def sample(self, rows: Rows, t: F64, env: Mapping[str, Any]) -> Any:
        if self._times is None:
            position = self._next[rows]
            self._next[rows] = position + 1
            picked = position % self._rows if self._loop else np.minimum(position, self._rows - 1)
        else:
            recorded = t * self._warp + self._offset[rows]
            if self._loop:
                recorded = np.mod(recorded, self._span)
            picked = np.searchsorted(self._times, recorded, side="right") - 1
            picked = np.clip(picked, 0, self._rows - 1)
        return self._values[picked]


def build_generator(spec: FieldSpec, ctx: BuildContext, name: str) -> FieldGenerator:
    """The generator for one field spec; ``name`` keys its random streams."""
    match spec:
        case ConstantFieldSpec():
            return ConstantGenerator(spec, ctx, name)
        case CounterFieldSpec():
            return CounterGenerator(spec, ctx, name)
        case UniformFieldSpec():
            return UniformGenerator(spec, ctx, name)
        case GaussianFieldSpec():
            return GaussianGenerator(spec, ctx, name)
        case RandomWalkFieldSpec():
            return RandomWalkGenerator(spec, ctx, name)
        case WaveFieldSpec():
            return WaveGenerator(spec, ctx, name)
        case WeightedChoiceFieldSpec():
            return ChoiceGenerator(spec, ctx, name)
        case BooleanFieldSpec():
            return BooleanGenerator(spec, ctx, name)
        case TimestampFieldSpec():
            return TimestampGenerator(spec, ctx)
        case UUIDFieldSpec():
            return UUIDGenerator(spec, ctx, name)
        case TemplateFieldSpec():
            return TemplateGenerator(spec)
        case GPSAreaFieldSpec():
            return GPSAreaGenerator(spec, ctx, name)
        case GPSRouteFieldSpec():
            return GPSRouteGenerator(spec, ctx, name)
        case ReplayFieldSpec():
            return ReplayGenerator(spec, ctx)
        case ExpressionFieldSpec():
            return ExpressionGenerator(spec)
    raise TypeError(f"no generator for {type(spec).__name__}")  # pragma: no cover


def dependencies(spec: FieldSpec) -> set[str]:
    """The names a field reads from other fields, attributes and built-ins."""
    if isinstance(spec, ExpressionFieldSpec):
        try:
            return set(compile_expression(spec.expr).names)
        except ExpressionError:
            return set()
    if isinstance(spec, TemplateFieldSpec):
        return set(template_names(spec.template))
    return set()


def value_bounds(spec: FieldSpec) -> tuple[float, float] | None:
    """The range a numeric field stays in, where the spec makes it certain."""
    if isinstance(spec, RandomWalkFieldSpec | GaussianFieldSpec):
        if spec.min is not None and spec.max is not None:
            return (spec.min, spec.max)
        return None
    if isinstance(spec, UniformFieldSpec):
        if isinstance(spec.low, float | int) and isinstance(spec.high, float | int):
            return (float(spec.low), float(spec.high))
        return None
    if isinstance(spec, ConstantFieldSpec):
        value = spec.value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return (float(value), float(value))
        if isinstance(value, UniformSpec):
            return (value.low, value.high)
        return None
    if isinstance(spec, WaveFieldSpec):
        numbers = (spec.amplitude, spec.offset, spec.noise)
        if all(isinstance(v, float | int) for v in numbers):
            amplitude, offset, noise = (float(v) for v in numbers)  # type: ignore[arg-type]
            if noise == 0.0:
                return (offset - abs(amplitude), offset + abs(amplitude))
        return None
    return None


__all__ = [
    "BuildContext",
    "FieldGenerator",
    "ReplayTable",
    "build_generator",
    "dependencies",
    "template_names",
    "value_bounds",
]
