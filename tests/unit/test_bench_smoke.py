"""The benchmark scripts in bench/ run end to end at a trivial size, so they never rot.

Only the shape of their results is checked: timings on a shared machine say nothing.
"""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.usefixtures("bench_on_path")


def test_model_eval_reports_every_path_and_contender() -> None:
    model_eval = importlib.import_module("model_eval")
    argv = ["--devices", "50", "--baseline-devices", "3", "--rounds", "2"]
    results = model_eval.main([*argv, "--repeats", "1", "--seconds", "0", "--no-pin"])

    thermostat = {(r.path, r.implementation) for r in results if r.model == "thermostat"}
    assert thermostat == {
        (path, implementation)
        for path in ("sample", "advance")
        for implementation in ("batch", "naive objects", "one-device batches")
    }
    assert all(r.values_per_s > 0 and r.speedup > 0 for r in results)
    assert all(r.messages_per_s > 0 for r in results if r.path == "advance")


def test_model_memory_reports_both_methods() -> None:
    model_memory = importlib.import_module("model_memory")
    results = model_memory.main(["--devices", "50", "--rounds", "1", "--in-process"])

    thermostat = {r.method: r for r in results if r.model == "thermostat"}
    assert set(thermostat) == {"tracemalloc", "rss"}
    traced = thermostat["tracemalloc"]
    assert traced.devices == 50
    assert traced.messages > 0
    assert traced.built_bytes > 0
    assert traced.peak_bytes >= traced.kept_bytes > 0
