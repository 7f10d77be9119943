"""Memory of model state per device: a ``DeviceBatch`` of 100,000 devices.

For each model (default: the thermostat, and the PLC when ``plc.json`` exists) a fresh
child process builds the batch and runs ``advance`` over a few send periods, dropping
the messages, so what is left is the state a running shard keeps: generator and
schedule columns, device ids, cached topics, sequence numbers. Two children measure it
two ways, each after the imports, the model load and a small warm-up batch, so that
none of those is counted:

``tracemalloc``
    Bytes allocated and still live (Python objects and numpy buffers, which numpy
    reports to tracemalloc), right after construction and after the rounds, plus the
    peak while the rounds ran (their messages included).
``rss``
    The growth of the resident set (``VmRSS`` in ``/proc/self/status``) over the same
    steps, in a child without tracemalloc, whose own bookkeeping would inflate it, and
    the peak (``VmHWM``, reset before the batch is built). After the rounds the freed
    messages leave the heap in holes the allocator keeps, so "kept" is read after
    glibc's ``malloc_trim(0)`` hands whole free pages back; the figure before the trim
    is shown too, as "untrimmed". Even trimmed, RSS counts half-used pages and pymalloc
    arenas, so it is an upper bound on the state.

The target (from the issue) is at most 1 KiB per device for the thermostat at 100,000
devices.

Run: ``.venv/bin/python bench/model_memory.py [--model PATH] [--devices 100000]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness import print_header, proc_sizes
from iotix.model.loader import load_model
from model_eval import add_model_option, default_models, machine, new_batch, round_step_s

if TYPE_CHECKING:
    from collections.abc import Sequence

    from iotix.model.runtime import DeviceBatch

TARGET_BYTES_PER_DEVICE = 1024  # thermostat, 100,000 devices
METHODS = ("tracemalloc", "rss")


@dataclass(frozen=True)
class MemoryMeasurement:
    """Bytes one way of measuring attributes to a batch of ``devices`` devices."""

    model: str
    method: str  # "tracemalloc" or "rss"
    devices: int
    rounds: int
    messages: int  # sent over the rounds (and dropped)
    built_bytes: int  # after construction
    kept_bytes: int  # after the rounds: the state that persists
    peak_bytes: int  # highest while the rounds ran
    untrimmed_bytes: int  # rss: before malloc_trim; tracemalloc: same as kept_bytes

    @property
    def kept_per_device(self) -> float:
        return self.kept_bytes / self.devices

    @property
    def built_per_device(self) -> float:
        return self.built_bytes / self.devices


def rss_bytes(field: str = "VmRSS") -> int:
    """A size from /proc/self/status (``VmRSS``, ``VmHWM``); 0 where there is none."""
    try:
        return proc_sizes("status", (field,)).get(field, 0)
    except OSError:
        return 0


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0); harmless where it fails."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")


def trim_heap() -> None:
    """Give whole free pages of the C heap back to the OS (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _run(batch: DeviceBatch, rounds: int, step_s: float) -> int:
    """Advance ``rounds`` send periods, dropping the messages; how many were sent."""
    sent = 0
    for number in range(1, rounds + 1):
        sent += len(batch.advance(number * step_s))
    return sent


def measure(model_path: Path, *, devices: int, rounds: int, method: str) -> MemoryMeasurement:
    """One measurement, in this process: call it in a fresh one (see ``main``)."""
    model = load_model(model_path)
    step_s = round_step_s(model.spec)
    # Warm-up: lazy imports, first-use caches and numpy's small-block pools are not the
    # batch's state, so they are paid before the baseline is taken.
    _run(new_batch(model, range(10)), 2, step_s)
    gc.collect()
    if method == "tracemalloc":
        tracemalloc.start()
        read = lambda: tracemalloc.get_traced_memory()[0]  # noqa: E731 - one-liner
    elif method == "rss":
        trim_heap()
        read = rss_bytes
    else:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    before = read()
    if method == "rss":
        reset_peak_rss()
    batch = new_batch(model, range(devices))
    gc.collect()
    built = read() - before
    if method == "tracemalloc":
        tracemalloc.reset_peak()
    sent = _run(batch, rounds, step_s)
    gc.collect()
    untrimmed = read() - before
    if method == "tracemalloc":
        kept = untrimmed
        peak = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
    else:
        trim_heap()
        kept = read() - before
        peak = rss_bytes("VmHWM") - before
    return MemoryMeasurement(
        model=model.spec.name,
        method=method,
        devices=devices,
        rounds=rounds,
        messages=sent,
        built_bytes=built,
        kept_bytes=kept,
        peak_bytes=peak,
        untrimmed_bytes=untrimmed,
    )


def measure_in_child(
    model_path: Path, *, devices: int, rounds: int, method: str
) -> MemoryMeasurement:
    """``measure`` in a fresh interpreter, so nothing earlier skews its baseline."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        method,
        "--model",
        str(model_path),
        "--devices",
        str(devices),
        "--rounds",
        str(rounds),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)  # noqa: S603 - our own script, no shell
    return MemoryMeasurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def print_table(results: list[MemoryMeasurement]) -> None:
    header = (
        f"{'model':<12} {'method':<12} {'devices':>8} {'messages':>9} "
        f"{'built B/dev':>12} {'kept B/dev':>11} {'untrimmed':>10} {'peak B/dev':>11} "
        f"{'kept MiB':>9}"
    )
    print_header(header)
    for r in results:
        print(
            f"{r.model:<12} {r.method:<12} {r.devices:>8,} {r.messages:>9,} "
            f"{r.built_per_device:>12,.0f} {r.kept_per_device:>11,.0f} "
            f"{r.untrimmed_bytes / r.devices:>10,.0f} {r.peak_bytes / r.devices:>11,.0f} "
            f"{r.kept_bytes / 2**20:>9,.1f}"
        )


def print_verdict(results: list[MemoryMeasurement]) -> None:
    for r in results:
        if r.model == "thermostat":
            met = "met" if r.kept_per_device <= TARGET_BYTES_PER_DEVICE else "MISSED"
            print(
                f"thermostat {r.method}: {r.kept_per_device:,.0f} B/device kept at "
                f"{r.devices:,} devices (target <= {TARGET_BYTES_PER_DEVICE}): {met}"
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_model_option(parser)
    parser.add_argument("--devices", type=int, default=100_000, help="devices in the batch")
    parser.add_argument("--rounds", type=int, default=3, help="send periods to advance")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process instead of fresh children (less exact; for tests)",
    )
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[MemoryMeasurement]:
    args = parse_args(argv)
    models = args.model or default_models()
    if args.child:  # a fresh child started by measure_in_child: one JSON line out
        result = measure(models[0], devices=args.devices, rounds=args.rounds, method=args.child)
        print(json.dumps(asdict(result)))
        return [result]
    facts = machine()
    print(
        f"# model_memory: {facts['cpu']}, nproc {facts['nproc']}, "
        f"Python {facts['python']}, numpy {facts['numpy']}"
    )
    how = measure if args.in_process else measure_in_child
    results = [
        how(path, devices=args.devices, rounds=args.rounds, method=method)
        for path in models
        for method in METHODS
    ]
    print_table(results)
    print_verdict(results)
    return results


if __name__ == "__main__":
    main()
