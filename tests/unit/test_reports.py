"""Reports of a run: JUnit XML read back by junitparser and ElementTree, Markdown tables
that stay tables, CSV the csv module reads, JSON that round-trips, files on disk."""

from __future__ import annotations

import csv
import io
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from junitparser import Error, Failure, JUnitXml, TestCase, TestSuite

from iotix.engine.results import summarise
from iotix.metrics import Snapshot, TimeSeries, TimeSeriesRow
from iotix.scenario import CheckResult, RunReport
from iotix.scenario.reports import (
    CSV_SUMMARY_COLUMNS,
    REPORT_FORMATS,
    append_github_summary,
    csv_summary,
    csv_time_series,
    json_report,
    junit_xml,
    markdown,
    write_reports,
)

if TYPE_CHECKING:
    from pathlib import Path

HOSTILE = 'p99 <&"> \x01\x1b[0m\ufffe|pipe'
"""XML's special characters, C0 controls XML 1.0 forbids, a non-character, a pipe."""
HOSTILE_CLEAN = 'p99 <&"> \\x01\\x1b[0m\\ufffe|pipe'
"""HOSTILE with the forbidden characters spelt out, as the reports write it."""


def passing_check(name: str = "p99 latency") -> CheckResult:
    return CheckResult(
        name=name,
        expression="ack_latency.p99 < 200ms",
        passed=True,
        observed=12.5,
        message="ack_latency.p99 12.5 ms < 200 ms",
    )


def failing_check(name: str = "no failures") -> CheckResult:
    return CheckResult(
        name=name,
        expression="messages_failed == 0",
        passed=False,
        observed=3.0,
        message="expected messages_failed == 0, saw 3",
    )


def run_summary() -> dict[str, Any]:
    """A real summary: two seconds of a small fleet, through the engine's summarise."""
    snapshot = Snapshot(worker=0, at_s=2.0, devices_connected=10)
    counters = snapshot.counters
    counters.connect_attempts = counters.connects = 10
    counters.messages_sent = counters.messages_acked = 20
    counters.messages_sent_by_qos["1"] = counters.messages_acked_by_qos["1"] = 20
    for n in range(20):
        snapshot.ack_latency.record(0.001 * (n + 1))
    return summarise(snapshot)


def time_series_rows() -> list[dict[str, Any]]:
    series = TimeSeries()
    for at_s in (1.0, 2.0):
        snapshot = Snapshot(worker=-1, at_s=at_s, devices_connected=10)
        snapshot.counters.messages_sent = int(10 * at_s)
        series.add(snapshot)
    return [row.to_dict() for row in series.rows]  # no acks: latency percentiles are NaN


def make_report(
    checks: list[CheckResult] | None = None,
    *,
    scenario: str = "smoke",
    worker_errors: list[str] | None = None,
    duration_s: float = 2.0,
) -> RunReport:
    return RunReport(
        scenario=scenario,
        started_at="2024-05-01T12:00:00+00:00",
        duration_s=duration_s,
        checks=[passing_check()] if checks is None else checks,
        summary=run_summary(),
        time_series=time_series_rows(),
        worker_errors=worker_errors or [],
        metadata={"seed": 42, "brokers": ["mqtt://127.0.0.1:1883"], "iotix": "0.1.0"},
    )


def suite_of(report: RunReport) -> TestSuite:
    xml = JUnitXml.fromstring(junit_xml(report))
    suites = list(xml)
    assert len(suites) == 1
    suite = suites[0]
    assert isinstance(suite, TestSuite)
    return suite


def cases_of(report: RunReport) -> dict[str, TestCase]:
    return {case.name: case for case in suite_of(report)}


def etree_suite(report: RunReport) -> ET.Element:
    root = ET.fromstring(junit_xml(report))  # noqa: S314 -- our own output, not untrusted
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    return suite


# -- JUnit XML -------------------------------------------------------------------------


def test_junit_passing_run_has_one_passing_case_per_check_and_run_completed() -> None:
    report = make_report([passing_check("a"), passing_check("b")])
    suite = suite_of(report)
    assert suite.name == "iotix: smoke"
    assert (suite.tests, suite.failures, suite.errors) == (3, 0, 0)
    assert suite.time == pytest.approx(2.0)
    assert suite.timestamp == "2024-05-01T12:00:00+00:00"
    cases = list(suite)
    assert [case.name for case in cases] == ["a", "b", "run completed"]
    assert all(case.classname == "iotix.smoke" and case.is_passed for case in cases)


def test_junit_failed_check_has_threshold_failure_with_its_message() -> None:
    report = make_report([passing_check(), failing_check()])
    suite = suite_of(report)
    assert (suite.tests, suite.failures, suite.errors) == (3, 1, 0)
    case = cases_of(report)["no failures"]
    (failure,) = case.result
    assert isinstance(failure, Failure)
    assert failure.type == "threshold"
    assert failure.message == "expected messages_failed == 0, saw 3"
    assert "messages_failed == 0" in (failure.text or "")
    assert cases_of(report)["p99 latency"].is_passed


def test_junit_worker_error_fails_run_completed_as_an_error() -> None:
    report = make_report(worker_errors=["Traceback ...\nRuntimeError: worker 1 died"])
    suite = suite_of(report)
    assert (suite.tests, suite.failures, suite.errors) == (2, 0, 1)
    (error,) = cases_of(report)["run completed"].result
    assert isinstance(error, Error)
    assert error.message == "1 worker failed: RuntimeError: worker 1 died"
    assert "Traceback" in (error.text or "")
    assert cases_of(report)["p99 latency"].is_passed


def test_junit_without_checks_has_only_run_completed() -> None:
    suite = suite_of(make_report([]))
    assert (suite.tests, suite.failures, suite.errors) == (1, 0, 0)
    assert [case.name for case in suite] == ["run completed"]


def test_junit_escapes_xml_characters_and_spells_out_forbidden_ones() -> None:
    report = make_report(
        [failing_check(HOSTILE)], scenario=HOSTILE, worker_errors=[f"boom {HOSTILE}"]
    )
    data = junit_xml(report)
    assert b"\x01" not in data
    assert b"\x1b" not in data
    suite = suite_of(report)
    assert suite.name == f"iotix: {HOSTILE_CLEAN}"
    case = cases_of(report)[HOSTILE_CLEAN]
    assert case.classname == f"iotix.{HOSTILE_CLEAN}"
    # ElementTree, independently of junitparser, reads the same names back.
    names = [case.get("name") for case in etree_suite(report).iter("testcase")]
    assert names == [HOSTILE_CLEAN, "run completed"]


def test_junit_failure_message_keeps_special_characters_and_newlines() -> None:
    check = CheckResult("c", "x < 1", passed=False, observed=None, message='saw <&">\nno value')
    (failure,) = cases_of(make_report([check]))["c"].result
    assert failure.message == 'saw <&">\nno value'
    assert "observed: n/a" in (failure.text or "")


def test_junit_repeated_names_are_suffixed() -> None:
    checks = [passing_check("a"), passing_check("a"), passing_check("a (2)")]
    checks.append(passing_check("run completed"))
    names = [case.name for case in suite_of(make_report(checks))]
    assert names == ["a", "a (2)", "a (2) (2)", "run completed (2)", "run completed"]
    assert len(set(names)) == len(names)


def test_junit_nan_duration_and_observed_still_parse() -> None:
    check = CheckResult("c", "x < 1", passed=False, observed=math.nan, message="saw nan")
    report = make_report([check], duration_s=math.nan)
    suite = etree_suite(report)
    assert suite.get("time") == "0.000"
    assert suite_of(report).failures == 1


def test_junit_metadata_are_properties() -> None:
    suite = suite_of(make_report())
    properties = {p.name: p.value for p in suite.properties()}
    assert properties == {
        "seed": "42",
        "brokers": '["mqtt://127.0.0.1:1883"]',
        "iotix": "0.1.0",
    }


def test_junit_system_out_summarises_the_run() -> None:
    system_out = etree_suite(make_report([failing_check()])).findtext("system-out") or ""
    assert "iotix scenario smoke: failed" in system_out
    assert "Messages sent: 20" in system_out
    assert "ack_latency (ms): p50" in system_out


# -- Markdown --------------------------------------------------------------------------

UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def table_rows(text: str, header: str) -> list[str]:
    """The rows of the table whose header row starts with ``header``, without it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_markdown_title_says_passed() -> None:
    assert markdown(make_report()).startswith("## ✅ passed: iotix scenario smoke\n")


def test_markdown_title_says_failed() -> None:
    assert markdown(make_report([failing_check()])).startswith("## ❌ failed:")


def test_markdown_title_says_failed_on_worker_errors() -> None:
    text = markdown(make_report(worker_errors=["RuntimeError: died ``` fence"]))
    assert text.startswith("## ❌ failed:")
    assert "### Worker errors (1)" in text
    assert "````text\nRuntimeError: died ``` fence\n````" in text


def test_markdown_has_a_table_of_checks() -> None:
    rows = table_rows(markdown(make_report([passing_check(), failing_check()])), "| Check |")
    assert [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows] == [
        [
            "p99 latency",
            "ack\\_latency.p99 \\< 200ms",
            "12.5",
            "ack\\_latency.p99 12.5 ms \\< 200 ms",
            "✅ pass",
        ],
        [
            "no failures",
            "messages\\_failed == 0",
            "3",
            "expected messages\\_failed == 0, saw 3",
            "❌ fail",
        ],
    ]


def test_markdown_escapes_pipes_and_newlines_in_cells() -> None:
    check = CheckResult(HOSTILE, "a | b", passed=False, observed=None, message="one\ntwo")
    text = markdown(make_report([check], scenario="x|y\nz"))
    (row,) = table_rows(text, "| Check |")
    assert len(UNESCAPED_PIPE.findall(row)) == 6  # five cells, no more
    assert "a \\| b" in row
    assert "one<br>two" in row
    assert "\x01" not in text
    assert text.splitlines()[0] == "## ❌ failed: iotix scenario x\\|y z"


def test_markdown_without_checks_says_so() -> None:
    assert "No checks were defined." in markdown(make_report([]))


def test_markdown_shows_headline_figures_and_latency_in_ms() -> None:
    text = markdown(make_report())
    assert "| Devices connected | 10 |" in text
    assert "| Messages sent | 20 |" in text
    assert "| Connect failures | 0 |" in text
    (row,) = table_rows(text, "| Histogram |")
    name, count, p50_ms, p99_ms = (cell.strip() for cell in row.strip("|").split("|"))
    assert (name, count) == ("ack\\_latency", "20")
    assert float(p50_ms) == pytest.approx(10.0, rel=0.01)
    assert float(p99_ms) == pytest.approx(20.0, rel=0.01)


def test_markdown_shows_metadata() -> None:
    assert "| seed | 42 |" in markdown(make_report())


# -- CSV -------------------------------------------------------------------------------


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_csv_summary_has_a_run_row_a_row_per_check_and_the_figures() -> None:
    text = csv_summary(make_report([passing_check(), failing_check()]))
    assert text.splitlines()[0] == ",".join(CSV_SUMMARY_COLUMNS)
    rows = read_csv(text)
    assert rows[0]["kind"] == "run"
    assert (rows[0]["name"], rows[0]["passed"], rows[0]["value"]) == ("smoke", "false", "2.0")
    checks = [row for row in rows if row["kind"] == "check"]
    assert [(c["name"], c["passed"], c["value"]) for c in checks] == [
        ("p99 latency", "true", "12.5"),
        ("no failures", "false", "3.0"),
    ]
    assert checks[1]["message"] == "expected messages_failed == 0, saw 3"
    figures = {row["name"]: row for row in rows if row["kind"] == "figure"}
    assert figures["messages_sent"]["value"] == "20"
    assert figures["ack_latency.p99"]["unit"] == "ms"
    assert float(figures["ack_latency.p99"]["value"]) == pytest.approx(20.0, rel=0.01)


def test_csv_summary_keeps_hostile_text_in_its_cell() -> None:
    check = CheckResult(HOSTILE, 'a, "b"', passed=False, observed=math.nan, message="1\n2")
    rows = read_csv(csv_summary(make_report([check], worker_errors=["x,\ny"])))
    assert all(len(row) == len(CSV_SUMMARY_COLUMNS) for row in rows)
    (row,) = (row for row in rows if row["kind"] == "check")
    assert (row["name"], row["expression"], row["message"]) == (HOSTILE_CLEAN, 'a, "b"', "1\n2")
    assert row["value"] == ""  # NaN: no value
    (error,) = (row for row in rows if row["kind"] == "worker_error")
    assert error["message"] == "x,\ny"


def test_csv_summary_defuses_formulas() -> None:
    check = CheckResult("=HYPERLINK(1)", "-x < 1", passed=True, observed=-1.0, message="@a")
    (row,) = (row for row in read_csv(csv_summary(make_report([check]))) if row["kind"] == "check")
    assert (row["name"], row["expression"], row["message"]) == ("'=HYPERLINK(1)", "'-x < 1", "'@a")
    assert row["value"] == "-1.0"  # numbers are numbers


def test_csv_time_series_has_one_row_a_second() -> None:
    rows = read_csv(csv_time_series(make_report()))
    assert list(rows[0]) == [f.name for f in fields(TimeSeriesRow)]
    assert [row["at_s"] for row in rows] == ["1.0", "2.0"]
    assert [row["messages_sent_rate_hz"] for row in rows] == ["10.0", "10.0"]
    assert rows[0]["ack_latency_p99_s"] == ""  # NaN: no acks in that second


def test_csv_time_series_without_rows_is_just_the_header() -> None:
    report = make_report()
    report.time_series = []
    assert csv_time_series(report) == ",".join(f.name for f in fields(TimeSeriesRow)) + "\r\n"


# -- JSON ------------------------------------------------------------------------------


def test_json_report_round_trips() -> None:
    report = make_report([passing_check(), failing_check()], worker_errors=["died"])
    document = orjson.loads(json_report(report))
    assert document["passed"] is False
    assert document["scenario"] == "smoke"
    assert document["checks"][1] == {
        "name": "no failures",
        "expression": "messages_failed == 0",
        "passed": False,
        "observed": 3.0,
        "message": "expected messages_failed == 0, saw 3",
    }
    assert document["summary"] == orjson.loads(orjson.dumps(report.summary))
    assert document["worker_errors"] == ["died"]
    assert document["metadata"]["seed"] == 42
    assert len(document["time_series"]) == 2


def test_json_report_writes_nan_and_infinity_as_null() -> None:
    check = CheckResult(HOSTILE, "x < 1", passed=False, observed=math.inf, message="")
    report = make_report([check], duration_s=math.nan)
    document = orjson.loads(json_report(report))
    assert document["duration_s"] is None
    assert document["checks"][0]["observed"] is None
    assert document["checks"][0]["name"] == HOSTILE  # JSON can carry every character
    assert document["time_series"][0]["ack_latency_p99_s"] is None


# -- files -----------------------------------------------------------------------------


def test_write_reports_writes_every_format_into_a_new_directory(tmp_path: Path) -> None:
    report = make_report([failing_check()])
    directory = tmp_path / "reports" / "run-1"
    paths = write_reports(report, directory)
    assert {key: path.name for key, path in paths.items()} == {
        "junit": "junit.xml",
        "markdown": "summary.md",
        "csv": "summary.csv",
        "csv_time_series": "timeseries.csv",
        "json": "report.json",
        "html": "report.html",
    }
    assert all(path.parent == directory for path in paths.values())
    assert paths["junit"].read_bytes() == junit_xml(report)
    assert paths["markdown"].read_text(encoding="utf-8") == markdown(report)
    assert paths["csv"].read_bytes() == csv_summary(report).encode()
    assert paths["csv_time_series"].read_bytes() == csv_time_series(report).encode()
    assert paths["json"].read_bytes() == json_report(report)


def test_write_reports_writes_only_the_formats_asked_for(tmp_path: Path) -> None:
    paths = write_reports(make_report(), tmp_path, formats=["json", "junit"])
    assert set(paths) == {"json", "junit"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junit.xml", "report.json"]


def test_write_reports_takes_one_format_as_a_string(tmp_path: Path) -> None:
    assert set(write_reports(make_report(), tmp_path, formats="markdown")) == {"markdown"}


def test_write_reports_rejects_an_unknown_format_naming_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'pdf'") as raised:
        write_reports(make_report(), tmp_path / "out", formats=["json", "pdf"])
    assert all(name in str(raised.value) for name in REPORT_FORMATS)
    assert not (tmp_path / "out").exists()


def test_github_summary_is_not_written_when_unset(tmp_path: Path) -> None:
    assert append_github_summary(make_report(), environ={}) is None
    assert append_github_summary(make_report(), environ={"GITHUB_STEP_SUMMARY": ""}) is None
    assert list(tmp_path.iterdir()) == []


def test_github_summary_is_appended_when_set(tmp_path: Path) -> None:
    target = tmp_path / "step_summary.md"
    target.write_text("earlier step\n", encoding="utf-8")
    environ = {"GITHUB_STEP_SUMMARY": str(target)}
    report = make_report([failing_check()])
    assert append_github_summary(report, environ=environ) == target
    assert append_github_summary(report, environ=environ) == target
    text = target.read_text(encoding="utf-8")
    assert text.startswith("earlier step\n## ❌ failed")
    assert text.count(markdown(report)) == 2
