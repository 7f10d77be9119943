"""The HTML report in a real browser: headless Chromium renders its charts and its
checks table, takes a screenshot, and logs no console error and no fetch.

Chromium comes from ``scripts/services`` (Debian's ``chromium``); without it these
tests fail, they never skip. ``python tests/e2e/test_html_report_browser.py`` writes
the documentation's screenshot, ``docs/images/report.png``.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from iotix.scenario import CheckResult, RunReport
from iotix.scenario.html import html_report

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_TIMEOUT_S = 60
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAULT_WINDOWS = (("broker restart", 20.0, 26.0), ("latency +150ms", 40.0, 50.0))

# What Chromium writes to stderr (with --enable-logging) when a page misbehaves: an
# uncaught exception, a console message, a resource it failed to fetch.
_PAGE_TROUBLE = ("Uncaught", ":CONSOLE(", "Failed to load resource", "net::ERR_")


def chromium() -> str:
    """Debian's Chromium, or a failure that says how to install it."""
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if found is None:
        pytest.fail(
            "headless Chromium is missing (/usr/bin/chromium): run scripts/services to "
            "install it (Debian package chromium)"
        )
    return found


def run_chromium(tmp_path: Path, page: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            *arguments,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=CHROMIUM_TIMEOUT_S,
        check=False,
    )


def realistic_report() -> RunReport:
    """A minute of 5,000 devices: a ramp, a broker restart at 20 s, latency at 40 s."""
    rows: list[dict[str, Any]] = []
    for second in range(1, 61):
        at_s = float(second)
        connected = min(5000, second * 500)
        if 20 <= second < 26:  # the broker restarts: devices drop and come back
            connected = max(0, 5000 - (26 - second) * 800)
        delay_s = 0.150 if 40 <= second < 50 else 0.0
        wave = 0.002 * math.sin(second / 4)
        acked = 0.0 if second in {21, 22} else connected * 0.98
        rows.append(
            {
                "at_s": at_s,
                "interval_s": 1.0,
                "devices_connected": connected,
                "in_flight": int(connected * 0.02),
                "messages_sent_rate_hz": float(connected),
                "messages_acked_rate_hz": acked,
                "messages_failed_rate_hz": connected * 0.02 if 20 <= second < 26 else 0.0,
                # No acks in those two seconds: the percentiles are NaN, gaps in the line.
                "ack_latency_p50_s": math.nan if acked == 0 else 0.008 + wave + delay_s,
                "ack_latency_p99_s": math.nan if acked == 0 else 0.031 + 2 * wave + delay_s,
                "intended_latency_p99_s": 0.033 + delay_s,
                "schedule_lag_p99_s": 0.0015 + (0.004 if 20 <= second < 26 else 0.0),
            }
        )
    return RunReport(
        scenario="fleet-5k <smoke> & restart",
        started_at="2024-05-01T12:00:00Z",
        duration_s=60.0,
        checks=[
            CheckResult(
                "p99 ack latency",
                "ack_latency.p99 < 200ms",
                True,
                181.0,
                "ack_latency.p99 181 ms < 200 ms",
            ),
            CheckResult(
                "everything acked",
                "messages_acked / messages_sent >= 99.9%",
                False,
                97.2,
                "expected >= 99.9 %, saw 97.2 %",
            ),
            CheckResult("all connected", "devices_connected == 5000", True, 5000.0, "5000 == 5000"),
        ],
        summary={
            "devices_connected": 5000,
            "connects": 9800,
            "connect_failures": 12,
            "messages_sent": 241_000,
            "messages_acked": 234_252,
            "messages_failed": 6_748,
            "messages_in_flight": 0,
            "messages_sent_rate_hz": 4016.7,
            "latency_s": {
                "ack_latency": {"count": 234_252, "p50_s": 0.0092, "p99_s": 0.181},
                "schedule_lag": {"count": 241_000, "p50_s": 0.0004, "p99_s": 0.0055},
            },
        },
        time_series=rows,
        metadata={"seed": 7, "brokers": ["mqtt://127.0.0.1:1883"], "iotix": "0.1.0"},
    )


def write_page(tmp_path: Path) -> Path:
    path = tmp_path / "report.html"
    path.write_text(html_report(realistic_report(), fault_windows=FAULT_WINDOWS), "utf-8")
    return path


def assert_page_behaved(stderr: str) -> None:
    trouble = [line for line in stderr.splitlines() if any(t in line for t in _PAGE_TROUBLE)]
    assert trouble == [], "\n".join(trouble)


def test_chromium_renders_the_charts_and_the_checks_table(tmp_path: Path) -> None:
    result = run_chromium(tmp_path, write_page(tmp_path), "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    for chart in ("chart-devices", "chart-messages", "chart-latency"):
        assert f'<svg class="chart" id="{chart}"' in dom
    assert dom.count("<polyline") >= 6
    assert dom.count('class="fault"') == 3 * len(FAULT_WINDOWS)
    assert '<table class="checks">' in dom
    assert dom.count('<tr class="check ') == 3
    assert "fleet-5k &lt;smoke&gt; &amp; restart" in dom
    assert "<script" not in dom
    assert_page_behaved(result.stderr)


def test_chromium_takes_a_screenshot(tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    result = run_chromium(
        tmp_path, write_page(tmp_path), f"--screenshot={shot}", "--window-size=1200,1600"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000  # a blank page is a few hundred bytes
    assert_page_behaved(result.stderr)


def save_documentation_screenshot(target: Path) -> int:
    """Render the realistic report to ``target`` (docs/images/report.png); its size."""
    import tempfile  # noqa: PLC0415 -- only this script path needs it

    with tempfile.TemporaryDirectory() as directory:
        tmp_path = Path(directory)
        shot = tmp_path / "shot.png"
        result = run_chromium(
            tmp_path,
            write_page(tmp_path),
            f"--screenshot={shot}",
            "--window-size=1000,1500",
            "--hide-scrollbars",
        )
        if result.returncode != 0 or not shot.exists():
            raise RuntimeError(result.stderr[-2000:])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    return target.stat().st_size


if __name__ == "__main__":
    sys.exit(0 if save_documentation_screenshot(REPO_ROOT / "docs/images/report.png") else 1)
