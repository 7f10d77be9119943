"""The HTML report: well-formed polyglot markup, one SVG per chart, a point per row,
fault windows with their names, escaped user text, nothing fetched from elsewhere."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from typing import Any

from iotix.scenario import CheckResult, RunReport
from iotix.scenario.html import html_report

SCRIPT = "<script>alert(1)</script>"
CHARTS = ("chart-devices", "chart-messages", "chart-latency")


def row(at_s: float, **values: float) -> dict[str, Any]:
    base: dict[str, Any] = {
        "at_s": at_s,
        "interval_s": 1.0,
        "devices_connected": 100,
        "in_flight": 3,
        "messages_sent_rate_hz": 100.0,
        "messages_acked_rate_hz": 99.0,
        "messages_failed_rate_hz": 0.0,
        "ack_latency_p50_s": 0.004,
        "ack_latency_p99_s": 0.020,
        "intended_latency_p99_s": 0.021,
        "schedule_lag_p99_s": 0.001,
    }
    base.update(values)
    return base


def make_report(
    *,
    rows: list[dict[str, Any]] | None = None,
    scenario: str = "smoke",
    checks: list[CheckResult] | None = None,
    worker_errors: list[str] | None = None,
) -> RunReport:
    return RunReport(
        scenario=scenario,
        started_at="2024-05-01T12:00:00Z",
        duration_s=10.0,
        checks=checks
        if checks is not None
        else [
            CheckResult("p99 latency", "ack_latency.p99 < 200ms", True, 20.0, "20 ms < 200 ms"),
            CheckResult("no failures", "messages_failed == 0", False, 3.0, "saw 3"),
        ],
        summary={"devices_connected": 100, "messages_sent": 1000},
        time_series=rows if rows is not None else [row(float(n)) for n in range(1, 11)],
        worker_errors=worker_errors or [],
        metadata={"seed": 42, "broker": "mqtt://127.0.0.1:1883"},
    )


def parse(page: str) -> ET.Element:
    """The page read by an XML parser: it must be well-formed."""
    return ET.fromstring(page.removeprefix("<!DOCTYPE html>\n"))  # noqa: S314 -- our own output


def by_id(root: ET.Element, ident: str) -> ET.Element:
    found = root.find(f".//*[@id='{ident}']")
    assert found is not None, ident
    return found


def polylines(svg: ET.Element, key: str) -> list[ET.Element]:
    return [p for p in svg.iter("polyline") if p.get("data-series") == key]


def point_count(lines: list[ET.Element]) -> int:
    return sum(len(line.get("points", "").split()) for line in lines)


def assert_finite_coordinates(element: ET.Element) -> None:
    """Every point and coordinate attribute is a finite number (no nan, no inf)."""
    for node in element.iter():
        for point in node.get("points", "").split():
            assert all(math.isfinite(float(v)) for v in point.split(",")), point
        for name in ("x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "width", "height"):
            if name in node.attrib:
                assert math.isfinite(float(node.attrib[name])), (node.tag, name)


class _Tags(HTMLParser):
    """Every start tag as a browser's tokenizer sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, _attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)


def start_tags(page: str) -> list[str]:
    parser = _Tags()
    parser.feed(page)
    parser.close()
    return parser.tags


def test_page_is_an_html5_document_that_parses_as_xml() -> None:
    page = html_report(make_report())
    assert page.startswith("<!DOCTYPE html>\n<html")
    root = parse(page)
    assert root.tag == "html"
    assert root.find("head/meta[@charset='utf-8']") is not None


def test_header_shows_scenario_verdict_start_duration_and_metadata() -> None:
    root = parse(html_report(make_report()))
    header = root.find(".//header")
    assert header is not None
    text = "".join(header.itertext())
    assert "smoke" in text
    assert "failed" in text
    assert "2024-05-01T12:00:00Z" in text
    assert "10 s" in text
    assert "seed" in text
    assert "mqtt://127.0.0.1:1883" in text


def test_passing_run_says_passed() -> None:
    report = make_report(checks=[CheckResult("ok", "x < 1", True, 0.5, "fine")])
    root = parse(html_report(report))
    verdict = root.find(".//span[@class='verdict passed']")
    assert verdict is not None
    assert verdict.text == "passed"


def test_checks_table_has_one_styled_row_per_check() -> None:
    root = parse(html_report(make_report()))
    rows = root.findall(".//table[@class='checks']/tbody/tr")
    assert [r.get("class") for r in rows] == ["check pass", "check fail"]
    cells = ["".join(td.itertext()) for td in rows[1].findall("td")]
    assert cells == ["no failures", "messages_failed == 0", "3", "saw 3", "\u2717 fail"]


def test_no_checks_says_so() -> None:
    page = html_report(make_report(checks=[]))
    assert "No checks were defined." in page
    assert parse(page).find(".//table[@class='checks']") is None


def test_one_svg_per_chart() -> None:
    root = parse(html_report(make_report()))
    svgs = list(root.iter("svg"))
    assert [svg.get("id") for svg in svgs] == list(CHARTS)
    for svg in svgs:
        assert svg.find("title") is not None
        assert svg.get("viewBox")


def test_each_series_has_one_point_per_row() -> None:
    rows = [row(float(n)) for n in range(1, 61)]
    root = parse(html_report(make_report(rows=rows)))
    expected = {
        "chart-devices": ["devices_connected"],
        "chart-messages": ["messages_sent_rate_hz", "messages_acked_rate_hz"],
        "chart-latency": ["ack_latency_p50_s", "ack_latency_p99_s", "schedule_lag_p99_s"],
    }
    for chart, keys in expected.items():
        svg = by_id(root, chart)
        for key in keys:
            lines = polylines(svg, key)
            assert len(lines) == 1, key
            assert point_count(lines) == 60, key


def test_latency_is_drawn_in_ms() -> None:
    rows = [row(1.0, ack_latency_p99_s=0.2), row(2.0, ack_latency_p99_s=0.2)]
    root = parse(html_report(make_report(rows=rows)))
    ticks = [t.text for t in by_id(root, "chart-latency").iter("text") if t.get("class") == "tick"]
    assert "200" in ticks


def test_axes_have_ticks_and_labels() -> None:
    root = parse(html_report(make_report()))
    svg = by_id(root, "chart-messages")
    ticks = [t for t in svg.iter("text") if t.get("class") == "tick"]
    assert len(ticks) >= 4
    labels = ["".join(t.itertext()) for t in svg.iter("text") if t.get("class") == "axis-label"]
    assert labels == ["seconds since start", "msg/s"]


def test_nan_values_are_gaps_in_the_line() -> None:
    rows = [row(float(n)) for n in range(1, 11)]
    rows[4]["ack_latency_p99_s"] = math.nan
    rows[5]["ack_latency_p99_s"] = math.inf
    page = html_report(make_report(rows=rows))
    svg = by_id(parse(page), "chart-latency")
    assert_finite_coordinates(svg)
    lines = polylines(svg, "ack_latency_p99_s")
    assert [len(line.get("points", "").split()) for line in lines] == [4, 4]
    assert point_count(polylines(svg, "ack_latency_p50_s")) == 10


def test_all_nan_series_draws_nothing_and_says_no_values() -> None:
    rows = [row(float(n), ack_latency_p50_s=math.nan) for n in range(1, 4)]
    for r in rows:
        r["ack_latency_p99_s"] = r["schedule_lag_p99_s"] = math.nan
    svg = by_id(parse(html_report(make_report(rows=rows))), "chart-latency")
    assert list(svg.iter("polyline")) == []
    assert any(t.get("class") == "empty" for t in svg.iter("text"))


def test_a_lone_point_between_gaps_is_a_dot() -> None:
    rows = [
        row(1.0, ack_latency_p99_s=math.nan),
        row(2.0),
        row(3.0, ack_latency_p99_s=math.nan),
    ]
    svg = by_id(parse(html_report(make_report(rows=rows))), "chart-latency")
    assert point_count(polylines(svg, "ack_latency_p99_s")) == 1
    dots = [c for c in svg.iter("circle") if c.get("data-series") == "ack_latency_p99_s"]
    assert len(dots) == 1


def test_single_row_is_drawn() -> None:
    root = parse(html_report(make_report(rows=[row(1.0)])))
    for chart in CHARTS:
        svg = by_id(root, chart)
        assert sum(point_count([p]) for p in svg.iter("polyline")) >= 1
        assert list(svg.iter("circle"))


def test_no_time_series_says_so_and_draws_no_chart() -> None:
    page = html_report(make_report(rows=[]))
    assert "No time series" in page
    assert list(parse(page).iter("svg")) == []


def test_huge_values_stay_finite_coordinates() -> None:
    rows = [row(1.0, messages_sent_rate_hz=1e300), row(2.0, messages_sent_rate_hz=1.7e308)]
    rows[0]["devices_connected"] = 10**30
    root = parse(html_report(make_report(rows=rows)))
    assert_finite_coordinates(root)
    ticks = [t.text or "" for t in by_id(root, "chart-messages").iter("text")]
    assert any("e+" in tick for tick in ticks)


def test_fault_windows_are_shaded_with_their_names() -> None:
    windows = [("broker restart", 2.0, 4.0), ("latency +200ms", 6.0, 8.5)]
    root = parse(html_report(make_report(), fault_windows=windows))
    for chart in CHARTS:
        svg = by_id(root, chart)
        rects = [r for r in svg.iter("rect") if r.get("class") == "fault"]
        assert len(rects) == 2
        names = [t.text for t in svg.iter("text") if t.get("class") == "fault-name"]
        assert names == ["broker restart", "latency +200ms"]
        assert all(float(r.get("width", "0")) > 0 for r in rects)


def test_fault_window_beyond_the_rows_widens_the_time_axis() -> None:
    root = parse(html_report(make_report(), fault_windows=[("late", 20.0, 30.0)]))
    svg = by_id(root, "chart-devices")
    rect = next(r for r in svg.iter("rect") if r.get("class") == "fault")
    right_edge = float(rect.get("x", "0")) + float(rect.get("width", "0"))
    assert right_edge <= 720 - 16 + 0.1


def test_user_text_is_escaped() -> None:
    check = CheckResult(SCRIPT, f"x < 1 {SCRIPT}", False, None, SCRIPT)
    report = make_report(scenario=SCRIPT, checks=[check], worker_errors=[SCRIPT])
    report.metadata[SCRIPT] = SCRIPT
    page = html_report(report, fault_windows=[(SCRIPT, 1.0, 2.0)])
    assert "<script" not in page.lower()
    assert "script" not in start_tags(page)
    assert "&lt;script&gt;" in page
    root = parse(page)
    title = root.find("head/title")
    assert title is not None
    assert SCRIPT in (title.text or "")


def test_control_characters_are_spelt_out() -> None:
    page = html_report(make_report(scenario="a\x1b[31mb\x00"))
    assert "\x1b" not in page
    assert "\x00" not in page
    assert "\\x1b" in page
    parse(page)


def test_page_is_self_contained() -> None:
    page = html_report(make_report(), fault_windows=[("x", 1.0, 2.0)])
    # The metadata's own mqtt:// URL is text; nothing is an http(s) reference.
    assert "http://" not in page
    assert "https://" not in page
    assert "script" not in start_tags(page)
    for tag in ("link", "img", "iframe", "object", "embed"):
        assert tag not in start_tags(page)
    assert "@import" not in page
    assert not re.search(r"url\((?!#)", page)  # only url(#clip-...) references


def test_worker_errors_are_listed() -> None:
    page = html_report(make_report(worker_errors=["Traceback...\nRuntimeError: boom"]))
    section = by_id(parse(page), "worker-errors")
    assert "RuntimeError: boom" in "".join(section.itertext())


def test_headline_figures_table() -> None:
    root = parse(html_report(make_report()))
    cells = [
        ["".join(td.itertext()) for td in tr.findall("td")]
        for tr in root.findall(".//table[@class='figures']/tbody/tr")
    ]
    assert ["Devices connected", "100"] in cells
    assert ["Messages sent", "1,000"] in cells
    assert ["Connects", "n/a"] in cells
