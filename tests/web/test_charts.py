"""The console's SVG charts: series filling, totals, proportions, escaping, parsed as XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TypedDict

import pytest
from markupsafe import Markup

from lars.store.base import CallPoint
from lars.web.charts import chart_svg, fill, sparkline_svg

NS = {"svg": "http://www.w3.org/2000/svg"}
#: 2023-11-15 00:00 UTC, a midnight.
T0 = 1_700_006_400


class Period(TypedDict):
    start: int
    end: int
    step: int


HOUR: Period = {"start": T0, "end": T0 + 3600, "step": 60}


def parse(svg: Markup) -> ET.Element:
    assert isinstance(svg, Markup)
    return ET.fromstring(str(svg))


def plot_box(root: ET.Element) -> tuple[float, float]:
    """The plot's top and bottom, from its frame."""
    frame = root.find("svg:rect[@class='plot']", NS)
    assert frame is not None
    top = float(frame.attrib["y"])
    return top, top + float(frame.attrib["height"])


def bar_heights(root: ET.Element) -> dict[float, float]:
    """Each bar's whole height (successes plus errors), by its left edge."""
    heights: dict[float, float] = {}
    for group in ("succ", "err"):
        for rect in root.iterfind(f"svg:g[@class='{group}']/svg:rect", NS):
            x = float(rect.attrib["x"])
            heights[x] = heights.get(x, 0.0) + float(rect.attrib["height"])
    return heights


def error_bars(root: ET.Element) -> dict[int, int]:
    """data-ts -> data-err of the red bars."""
    return {
        int(rect.attrib["data-ts"]): int(rect.attrib["data-err"])
        for rect in root.iterfind("svg:g[@class='err']/svg:rect", NS)
    }


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{{{NS['svg']}}}text")]


# --- fill ------------------------------------------------------------------------------------


def test_fill_puts_zeros_in_the_missing_steps() -> None:
    points = [CallPoint(T0 + 60, 5, 1), CallPoint(T0 + 180, 7, 0)]
    assert fill(points, T0, T0 + 300, 60) == [
        CallPoint(T0, 0, 0),
        CallPoint(T0 + 60, 5, 1),
        CallPoint(T0 + 120, 0, 0),
        CallPoint(T0 + 180, 7, 0),
        CallPoint(T0 + 240, 0, 0),
    ]


def test_fill_ignores_points_outside_the_period() -> None:
    points = [
        CallPoint(T0 - 60, 100, 100),
        CallPoint(T0, 1, 0),
        CallPoint(T0 + 120, 2, 2),
        CallPoint(T0 + 180, 100, 100),  # end is exclusive
    ]
    assert fill(points, T0, T0 + 180, 60) == [
        CallPoint(T0, 1, 0),
        CallPoint(T0 + 60, 0, 0),
        CallPoint(T0 + 120, 2, 2),
    ]


def test_fill_sums_points_into_their_step() -> None:
    points = [CallPoint(T0 + 60, 1, 0), CallPoint(T0 + 120, 2, 1), CallPoint(T0 + 660, 4, 0)]
    assert fill(points, T0, T0 + 1200, 600) == [CallPoint(T0, 3, 1), CallPoint(T0 + 600, 4, 0)]


def test_fill_of_an_end_between_steps_keeps_the_last_partial_step() -> None:
    assert [p.ts for p in fill([], T0, T0 + 150, 60)] == [T0, T0 + 60, T0 + 120]
    assert fill([], T0, T0, 60) == []


@pytest.mark.parametrize(("start", "step"), [(T0, 0), (T0, -60), (T0 + 30, 60)])
def test_fill_rejects_a_bad_period(start: int, step: int) -> None:
    with pytest.raises(ValueError, match="step"):
        fill([], start, start + 3600, step)


# --- chart_svg ---------------------------------------------------------------------------------


def test_chart_totals_and_data_attributes_are_exact() -> None:
    points = [CallPoint(T0, 12_000, 45), CallPoint(T0 + 600, 278, 22), CallPoint(T0 + 4000, 9, 9)]
    root = parse(chart_svg(points, **HOUR))
    assert root.attrib["data-total-succ"] == "12278"
    assert root.attrib["data-total-err"] == "67"
    assert root.attrib["data-max-err"] == "45"
    assert root.attrib["role"] == "img"
    summary = "12,345 calls, 67 errors (0.5%) over 1 hour, 00:00 to 01:00 UTC"
    assert root.attrib["aria-label"] == summary
    title = root.find("svg:title", NS)
    assert title is not None
    assert title.text == summary
    assert root[0] is title  # first, as assistive technology expects


def test_tallest_bar_fills_the_plot_and_a_half_max_bar_is_half() -> None:
    points = [CallPoint(T0, 1000, 0), CallPoint(T0 + 60, 500, 0), CallPoint(T0 + 120, 400, 100)]
    root = parse(chart_svg(points, **HOUR))
    top, bottom = plot_box(root)
    heights = sorted(bar_heights(root).values())
    assert len(heights) == 3
    assert heights[-1] == pytest.approx(bottom - top, abs=0.05)
    assert heights[0] == pytest.approx((bottom - top) / 2, abs=0.1)
    assert heights[1] == pytest.approx((bottom - top) / 2, abs=0.1)
    # The stacked bar: its red part is a fifth of it, on top.
    (err,) = root.iterfind("svg:g[@class='err']/svg:rect", NS)
    assert float(err.attrib["height"]) == pytest.approx((bottom - top) / 10, abs=0.1)
    tops = [float(r.attrib["y"]) for r in root.iterfind("svg:g[@class='succ']/svg:rect", NS)]
    assert min(tops) == pytest.approx(top, abs=0.05)


def test_bars_stand_on_the_baseline_in_time_order() -> None:
    points = [CallPoint(T0 + 60 * i, 10 * (i + 1), 0) for i in range(0, 60, 3)]
    root = parse(chart_svg(points, **HOUR))
    _, bottom = plot_box(root)
    rects = list(root.iterfind("svg:g[@class='succ']/svg:rect", NS))
    assert len(rects) == 20
    for rect in rects:
        assert float(rect.attrib["y"]) + float(rect.attrib["height"]) == pytest.approx(bottom)
    xs = [float(r.attrib["x"]) for r in rects]
    hs = [float(r.attrib["height"]) for r in rects]
    assert xs == sorted(xs)
    assert hs == sorted(hs)


def test_error_bars_are_exactly_at_the_steps_with_errors() -> None:
    points = [
        CallPoint(T0, 100, 0),
        CallPoint(T0 + 300, 100, 3),
        CallPoint(T0 + 360, 0, 50),  # every call failed
        CallPoint(T0 + 1200, 100, 0),
        CallPoint(T0 + 3540, 1_000_000, 1),  # tiny next to the calls, still drawn
    ]
    root = parse(chart_svg(points, **HOUR))
    assert error_bars(root) == {T0 + 300: 3, T0 + 360: 50, T0 + 3540: 1}
    for rect in root.iterfind("svg:g[@class='err']/svg:rect", NS):
        assert float(rect.attrib["height"]) >= 1


def test_a_failure_burst_is_the_data_max_err_bar() -> None:
    points = [CallPoint(T0 + 60 * i, 500, 1 if i % 10 else 0) for i in range(60)]
    points[42] = CallPoint(T0 + 42 * 60, 20, 480)
    root = parse(chart_svg(points, **HOUR))
    bursts = [ts for ts, err in error_bars(root).items() if str(err) == root.attrib["data-max-err"]]
    assert bursts == [T0 + 42 * 60]


def test_title_is_escaped() -> None:
    svg = chart_svg([CallPoint(T0, 1, 0)], **HOUR, title='a <b> & "c"')
    assert "<b>" not in svg
    assert "&lt;b&gt; &amp;" in svg
    root = parse(svg)  # still well-formed
    assert root.attrib["aria-label"].startswith('a <b> & "c": 1 call, no errors')
    assert 'a <b> & "c"' in texts(root)[0]
    title = root.find("svg:title", NS)
    assert title is not None
    assert title.text is not None
    assert title.text.startswith('a <b> & "c": ')


def test_caption_says_what_a_bar_counts() -> None:
    point = [CallPoint(T0, 1, 0)]
    assert "calls per minute" in texts(parse(chart_svg(point, **HOUR)))[0]
    day = parse(chart_svg(point, start=T0, end=T0 + 86400, step=600))
    assert "calls per 10 minutes" in texts(day)[0]


def test_axes_show_zero_a_rounded_max_and_utc_times() -> None:
    root = parse(chart_svg([CallPoint(T0 + 60, 12_345, 6)], **HOUR))
    labels = texts(root)
    assert "0" in labels
    assert "12.4k" in labels
    assert {"00:10", "00:20", "00:30"} <= set(labels)
    assert "calls" in labels
    assert "errors" in labels


def test_a_period_over_a_day_has_dates() -> None:
    start = T0 - 86400
    root = parse(chart_svg([CallPoint(T0, 5, 0)], start=start, end=T0 + 86400, step=3600))
    assert "Nov 15" in texts(root)
    assert root.attrib["aria-label"].endswith(
        "over 2 days, 2023-11-14 00:00 to 2023-11-16 00:00 UTC"
    )


def test_an_empty_chart_is_a_frame_that_says_so() -> None:
    for points in ([], [CallPoint(T0 - 60, 9, 9)], [CallPoint(T0, 0, 0)]):
        root = parse(chart_svg(points, **HOUR, title="m"))
        assert root.find("svg:rect[@class='plot']", NS) is not None
        assert "no calls in this period" in texts(root)
        assert bar_heights(root) == {}
        assert root.attrib["data-total-succ"] == "0"
        assert root.attrib["data-total-err"] == "0"
        assert root.attrib["data-max-err"] == "0"
        assert root.attrib["aria-label"] == "m: no calls over 1 hour, 00:00 to 01:00 UTC"


def test_a_chart_too_small_for_its_plot_is_refused() -> None:
    with pytest.raises(ValueError, match="no room"):
        chart_svg([], **HOUR, width=40, height=40)


def test_a_day_of_minutes_renders_every_bar() -> None:
    points = [CallPoint(T0 + 60 * i, 100 + i % 50, 1 if i % 100 == 0 else 0) for i in range(1440)]
    svg = chart_svg(points, start=T0, end=T0 + 86400, step=60)
    root = parse(svg)
    assert len(bar_heights(root)) == 1440
    assert error_bars(root) == {T0 + 6000 * k: 1 for k in range(15)}
    assert root.attrib["data-total-succ"] == str(sum(p.succ for p in points))
    assert root.attrib["data-total-err"] == "15"
    assert len(svg) < 100_000
    # Coordinates carry at most one decimal.
    for rect in root.iter(f"{{{NS['svg']}}}rect"):
        for name in ("x", "y", "width", "height"):
            assert len(rect.attrib[name].partition(".")[2]) <= 1


# --- sparkline_svg ---------------------------------------------------------------------------


def test_sparkline_totals_and_title() -> None:
    points = [CallPoint(T0, 1000, 0), CallPoint(T0 + 600, 2000, 34), CallPoint(T0 + 9999, 5, 5)]
    root = parse(sparkline_svg(points, **HOUR))
    assert root.attrib["data-total-succ"] == "3000"
    assert root.attrib["data-total-err"] == "34"
    title = root.find("svg:title", NS)
    assert title is not None
    assert title.text == "3,034 calls, 34 errors (1.1%) over 1 hour, 00:00 to 01:00 UTC"
    assert root.find("svg:polyline[@class='calls']", NS) is not None
    dots = root.find("svg:path[@class='err']", NS)
    assert dots is not None
    assert dots.attrib["d"].count("M") == 1


def test_sparkline_without_errors_has_no_red() -> None:
    root = parse(sparkline_svg([CallPoint(T0, 10, 0)], **HOUR))
    assert root.find("svg:path[@class='err']", NS) is None
    assert root.attrib["data-total-err"] == "0"


def test_sparkline_line_stays_inside_and_peaks_at_the_busiest_step() -> None:
    points = [CallPoint(T0 + 60 * i, i, 0) for i in range(60)]
    root = parse(sparkline_svg(points, **HOUR, width=120, height=24))
    line = root.find("svg:polyline[@class='calls']", NS)
    assert line is not None
    coords = [tuple(map(float, xy.split(","))) for xy in line.attrib["points"].split()]
    assert all(0 <= x <= 120 and 0 <= y <= 24 for x, y in coords)
    assert min(coords, key=lambda c: c[1])[0] == max(x for x, _ in coords)


def test_empty_sparkline() -> None:
    root = parse(sparkline_svg([], **HOUR))
    assert root.attrib["data-total-succ"] == "0"
    assert root.find("svg:polyline", NS) is None
    title = root.find("svg:title", NS)
    assert title is not None
    assert title.text == "no calls over 1 hour, 00:00 to 01:00 UTC"


def test_sparkline_of_a_day_of_minutes_has_a_point_per_pixel_at_most() -> None:
    points = [CallPoint(T0 + 60 * i, i % 7, i % 2) for i in range(1440)]
    root = parse(sparkline_svg(points, start=T0, end=T0 + 86400, step=60))
    line = root.find("svg:polyline[@class='calls']", NS)
    assert line is not None
    assert len(line.attrib["points"].split()) <= 120
    assert root.attrib["data-total-err"] == "720"
