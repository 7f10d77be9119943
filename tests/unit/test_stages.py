"""Stages: the target number of connected devices over a run, per device and in bulk."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from iotix.engine.stages import (
    Stage,
    StagePlan,
    StagesError,
    parse_duration_s,
    parse_stage_specs,
    parse_stages,
)
from iotix.errors import IotixError

# --- strategies ---------------------------------------------------------------------

durations = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 3.0, 7.3, 30.0, 120.0]),
    st.floats(min_value=0.0, max_value=1_000.0, allow_nan=False, allow_infinity=False),
)
stage_lists = st.lists(
    st.builds(Stage, duration_s=durations, devices=st.integers(0, 300)), min_size=1, max_size=6
)
fleet_sizes = st.integers(0, 250)


def _plans() -> st.SearchStrategy[StagePlan]:
    return st.builds(StagePlan, stage_lists, fleet_sizes)


def _probe_times(plan: StagePlan, data: st.DataObject) -> list[float]:
    """Arbitrary times, and the instants where the target changes with their neighbours
    (where float rounding would show)."""
    times = data.draw(
        st.lists(st.floats(-1.0, plan.duration_s + 5.0, allow_nan=False), max_size=20)
    )
    for index in data.draw(st.lists(st.integers(0, plan.fleet_size), max_size=10)):
        for on, off in plan.intervals(index):
            for edge in (on, off):
                if math.isfinite(edge):
                    times += [math.nextafter(edge, -math.inf), edge, math.nextafter(edge, math.inf)]
    return times


def _active(plan: StagePlan, index: int, t_s: float) -> bool:
    return any(on <= t_s < off for on, off in plan.intervals(index))


# --- parsing ------------------------------------------------------------------------


def test_the_documented_example_parses() -> None:
    assert parse_stages("30s:1000,2m:1000,30s:0") == (
        Stage(30.0, 1000),
        Stage(120.0, 1000),
        Stage(30.0, 0),
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("45", 45.0),
        ("1.5m", 90.0),
        ("1m30s", 90.0),
        ("1h0m1s", 3601.0),
        (".5s", 0.5),
        ("0", 0.0),
        (" 10s ", 10.0),
    ],
)
def test_durations_take_units_ms_s_m_h_or_bare_seconds(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


def test_spaces_around_parts_are_allowed() -> None:
    assert parse_stages(" 10s : 5 , 20s:0 ") == (Stage(10.0, 5), Stage(20.0, 0))


def test_a_percentage_is_resolved_against_the_fleet_rounding_down() -> None:
    assert parse_stages("10s:50%,10s:12.5%,5s:100%", fleet_size=1001) == (
        Stage(10.0, 500),
        Stage(10.0, 125),
        Stage(5.0, 1001),
    )


def test_a_percentage_without_the_fleet_size_is_an_error_quoting_it() -> None:
    specs = parse_stage_specs("10s:100,20s:50%")
    assert specs[1].percent == Fraction(50)
    with pytest.raises(StagesError, match="'20s:50%'") as caught:
        parse_stages("10s:100,20s:50%")
    assert caught.value.part == "20s:50%"


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("", ""),
        ("   ", "   "),
        ("30s", "30s"),
        ("30s:1000,", ""),
        ("30s:1000,,10s:0", ""),
        ("30x:1000", "30x:1000"),
        ("30s:1000,2min:1000", "2min:1000"),
        ("1m30:5", "1m30:5"),
        ("s:10", "s:10"),
        ("-5s:10", "-5s:10"),
        ("30s:-1", "30s:-1"),
        ("30s:1.5", "30s:1.5"),
        ("30s:ten", "30s:ten"),
        ("30s:150%", "30s:150%"),
        ("30s:%", "30s:%"),
        ("1e3s:10", "1e3s:10"),
        ("30s:10:20", "30s:10:20"),
        ("٣s:10", "٣s:10"),  # an Arabic-Indic digit is not a digit here
    ],
)
def test_bad_stages_are_rejected_quoting_the_bad_part(text: str, part: str) -> None:
    with pytest.raises(StagesError) as caught:
        parse_stages(text, fleet_size=100)
    assert caught.value.part == part
    if part.strip():
        assert repr(part) in str(caught.value)
    assert isinstance(caught.value, IotixError)


@given(st.text(alphabet="0123456789.:,%smh x-", max_size=30))
@example("9" * 400 + "s:1")
@example("1s:" + "9" * 5000)
@example("1s:" + "9" * 5000 + "%")
def test_any_text_parses_or_raises_a_stages_error_quoting_a_part_of_it(text: str) -> None:
    error: StagesError | None = None
    stages: tuple[Stage, ...] = ()
    try:
        stages = parse_stages(text, fleet_size=100)
    except StagesError as exc:
        error = exc
    if error is not None:
        assert error.part in text
    else:
        assert stages
        assert all(s.duration_s >= 0 and s.devices >= 0 for s in stages)


@pytest.mark.parametrize(
    ("duration_s", "devices"), [(-1.0, 10), (math.nan, 10), (math.inf, 10), (1.0, -1)]
)
def test_invalid_stages_are_refused(duration_s: float, devices: int) -> None:
    with pytest.raises(StagesError):
        Stage(duration_s, devices)


def test_a_plan_needs_a_stage() -> None:
    with pytest.raises(StagesError):
        StagePlan((), 10)


# --- the target ---------------------------------------------------------------------


def test_ramp_hold_ramp_down_in_the_documented_example() -> None:
    plan = StagePlan(parse_stages("30s:1000,2m:1000,30s:0"), fleet_size=1000)
    assert plan.duration_s == 180.0
    assert plan.target_at(-1.0) == 0
    assert plan.target_at(0.0) == 0
    assert plan.target_at(15.0) == 500
    assert plan.target_at(30.0) == 1000
    assert plan.target_at(100.0) == 1000
    assert plan.target_at(165.0) == 500
    assert plan.target_at(180.0) == 0
    assert plan.target_at(1e9) == 0


def test_the_target_is_the_last_whole_number_the_line_reached() -> None:
    # 10 devices over 10 s: the line reaches k at k seconds, up and down.
    plan = StagePlan((Stage(10.0, 10), Stage(10.0, 0)), fleet_size=10)
    assert [plan.target_at(t) for t in (0.0, 0.99, 1.0, 9.99, 10.0)] == [0, 0, 1, 9, 10]
    # Falling: 10 until the line reaches 9 at 11 s, then 9, ..., 0 at 20 s.
    assert [plan.target_at(t) for t in (10.5, 11.0, 15.5, 19.99, 20.0)] == [10, 9, 5, 1, 0]


def test_last_target_holds_after_the_stages() -> None:
    plan = StagePlan((Stage(5.0, 7),), fleet_size=10)
    assert plan.target_at(5.0) == 7
    assert plan.target_at(500.0) == 7


def test_targets_above_the_fleet_count_as_the_fleet_and_the_ramp_keeps_its_length() -> None:
    plan = StagePlan((Stage(10.0, 100),), fleet_size=10)
    assert plan.target_at(5.0) == 5
    assert plan.target_at(10.0) == 10
    assert plan.activation_s(9) == 10.0


def test_a_zero_duration_stage_is_a_step() -> None:
    plan = StagePlan(parse_stages("0s:50,10s:50,0:0,5s:0"), fleet_size=100)
    assert plan.target_at(0.0) == 50
    assert plan.target_at(9.999) == 50
    assert plan.target_at(10.0) == 0
    assert plan.activation_s(49) == 0.0
    assert plan.deactivation_s(49) == 10.0
    assert plan.activation_s(50) is None


def test_up_and_down_at_one_instant_activates_nobody() -> None:
    plan = StagePlan(parse_stages("5s:0,0s:10,0s:0,5s:0"), fleet_size=10)
    assert plan.target_at(5.0) == 0
    assert plan.intervals(0) == ()
    assert plan.activation_s(0) is None
    on, off = plan.first_intervals(np.arange(10))
    assert np.isinf(on).all()
    assert np.isinf(off).all()


def test_down_and_up_at_one_instant_keeps_devices_connected() -> None:
    plan = StagePlan(parse_stages("0s:10,5s:10,0s:0,0s:10"), fleet_size=10)
    assert plan.intervals(3) == ((0.0, math.inf),)
    assert plan.deactivation_s(3) is None
    on, off = plan.first_intervals([3])
    assert on.tolist() == [0.0]
    assert off.tolist() == [math.inf]


def test_a_device_ramped_down_and_up_again_has_two_intervals() -> None:
    plan = StagePlan(parse_stages("10s:10,10s:0,10s:10"), fleet_size=10)
    assert plan.intervals(0) == ((1.0, 20.0), (21.0, math.inf))
    assert plan.activation_s(0) == 1.0
    assert plan.deactivation_s(0) == 20.0


def test_per_device_times_in_the_documented_example() -> None:
    plan = StagePlan(parse_stages("30s:1000,2m:1000,30s:0"), fleet_size=1000)
    assert plan.activation_s(0) == pytest.approx(0.03)
    assert plan.activation_s(999) == 30.0
    assert plan.deactivation_s(999) == pytest.approx(150.03)
    assert plan.deactivation_s(0) == 180.0
    assert plan.activation_s(1000) is None
    assert plan.deactivation_s(1000) is None


def test_a_device_that_stays_has_no_deactivation() -> None:
    plan = StagePlan((Stage(10.0, 10),), fleet_size=10)
    assert plan.deactivation_s(0) is None


def test_nan_time_is_refused() -> None:
    with pytest.raises(StagesError):
        StagePlan((Stage(1.0, 1),), 1).target_at(math.nan)


# --- properties ---------------------------------------------------------------------


@given(_plans(), st.data())
def test_target_never_exceeds_the_fleet_and_never_goes_negative(
    plan: StagePlan, data: st.DataObject
) -> None:
    for t in _probe_times(plan, data):
        assert 0 <= plan.target_at(t) <= plan.fleet_size


@given(_plans(), st.data())
def test_target_is_monotone_within_each_stage(plan: StagePlan, data: st.DataObject) -> None:
    start = 0.0
    previous = 0
    for stage in plan.stages:
        end = start + stage.duration_s
        target = min(stage.devices, plan.fleet_size)
        if stage.duration_s > 0:
            fractions = sorted(data.draw(st.lists(st.floats(0, 1), min_size=2, max_size=10)))
            times = [t for t in (start + f * stage.duration_s for f in fractions) if t < end]
            values = [plan.target_at(t) for t in times]
            step = 1 if target >= previous else -1
            assert values == sorted(values, reverse=step < 0)
            assert all(min(previous, target) <= v <= max(previous, target) for v in values)
        start, previous = end, target


@given(_plans(), st.data())
def test_device_is_active_iff_its_index_is_below_the_target(
    plan: StagePlan, data: st.DataObject
) -> None:
    for t in _probe_times(plan, data):
        target = plan.target_at(t)
        for index in {0, max(target - 1, 0), target, plan.fleet_size - 1} - {-1}:
            assert (index < target) == _active(plan, index, t), (index, t, target)


@given(_plans(), st.data())
def test_activation_s_agrees_with_target_at_to_the_last_bit(
    plan: StagePlan, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, max(plan.fleet_size - 1, 0)))
    activation = plan.activation_s(index)
    deactivation = plan.deactivation_s(index)
    assume(activation is not None)
    assert activation is not None
    end = math.inf if deactivation is None else deactivation
    for t in (
        math.nextafter(activation, -math.inf),
        activation,
        math.nextafter(activation, math.inf),
        math.nextafter(end, -math.inf),
        end,
    ):
        if t < end:
            assert (activation <= t) == (index < plan.target_at(t)), t
    if deactivation is not None:
        assert index >= plan.target_at(deactivation)


@given(_plans(), st.data())
def test_the_rounding_rule_is_floor_rising_and_ceil_falling_up_to_float_rounding(
    plan: StagePlan, data: st.DataObject
) -> None:
    start, previous = 0.0, 0  # stages start at the float running sum, as in the plan
    for stage in plan.stages:
        target = min(stage.devices, plan.fleet_size)
        end = start + stage.duration_s
        if start < end and target != previous:
            t = data.draw(st.floats(start, end, exclude_max=True))
            s, d = Fraction(start), Fraction(stage.duration_s)
            line = previous + (target - previous) * (Fraction(t) - s) / d
            exact = math.floor(line) if target > previous else math.ceil(line)
            got = plan.target_at(t)
            # They may differ only within float rounding of the instants at which the
            # line reaches the levels in between.
            disputed = range(min(got, exact) + 1, max(got, exact) + 1)
            if target < previous:
                disputed = range(min(got, exact), max(got, exact))
            for level in disputed:
                reach = s + d * (level - previous) / (target - previous)
                assert math.isclose(t, float(reach), rel_tol=1e-12, abs_tol=1e-12)
        start, previous = end, target


@given(_plans(), st.data())
def test_bulk_intervals_equal_the_per_device_ones(plan: StagePlan, data: st.DataObject) -> None:
    indices = np.array(
        data.draw(st.lists(st.integers(0, plan.fleet_size + 3), max_size=30)), dtype=np.int64
    )
    on, off = plan.first_intervals(indices)
    for position, index in enumerate(indices.tolist()):
        activation = plan.activation_s(index)
        deactivation = plan.deactivation_s(index)
        assert on[position] == (math.inf if activation is None else activation)
        assert off[position] == (math.inf if deactivation is None else deactivation)


def test_bulk_intervals_for_twenty_thousand_devices() -> None:
    plan = StagePlan(parse_stages("60s:20000,5m:20000,60s:0"), fleet_size=20_000)
    on, off = plan.first_intervals(np.arange(20_000))
    assert on.shape == off.shape == (20_000,)
    assert (np.diff(on) >= 0).all()  # activated in index order
    assert (np.diff(off) <= 0).all()  # the last in goes out first
    assert on[-1] == 60.0
    assert off[0] == plan.duration_s
