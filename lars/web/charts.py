"""Server-side SVG charts of calls and errors per time step, for the console's pages.

Pure functions from :class:`~lars.store.base.CallPoint` series to :class:`~markupsafe.Markup`
that a template inserts with ``{{ chart }}``: no JavaScript, no external file, no I/O.

- :func:`chart_svg` draws one bar per step, the errors stacked in red on top of the
  successes, so a bar's height is the step's calls and its red part the errors. The scale
  runs from 0 to the busiest step (its bar fills the plot). Two floors keep rare events
  visible at any scale, as a chart for finding failures must: a step with calls is at least
  :data:`MIN_BAR` high, and its errors at least :data:`MIN_ERR` of that (taken from the
  successes' part, so a bar's height still tells its calls).
- :func:`sparkline_svg` draws the calls per step as a line and a red dot at each step with
  errors, its height the errors on the same scale; it merges neighbouring steps so that
  there is at most a point per pixel.

For tests in a browser, the roots carry ``data-total-succ`` and ``data-total-err`` (and the
chart ``data-max-err``, the most errors in one step), and every red bar carries ``data-ts``
(its step's start, epoch seconds) and ``data-err``.

Colours are inline presentation attributes, so the charts look right without a stylesheet,
and the elements have classes (``lars-chart``, ``succ``, ``err``, ``axis``, ``legend``...)
so that a stylesheet can restyle them. Times are UTC. Coordinates are rounded to a tenth of
a pixel to keep the markup small: a day of minutes (1,440 bars) is about 70 kB.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from markupsafe import Markup, escape

from lars.store.base import CallPoint

#: Successes (a calm blue), errors (red), text, grid and frame.
SUCC_COLOUR = "#4e79a7"
ERR_COLOUR = "#d62728"
TEXT_COLOUR = "#555"
GRID_COLOUR = "#ddd"
AXIS_COLOUR = "#999"
#: The least height, pixels, of a bar of a step with calls, and of its errors.
MIN_BAR = 1.0
MIN_ERR = 1.0
#: The chart's margins around the plot, pixels: room for the heading and legend above,
#: the y labels left, the time labels below.
MARGIN_TOP = 24
MARGIN_RIGHT = 12
MARGIN_BOTTOM = 18
MARGIN_LEFT = 40
#: Horizontal room a time label needs, pixels (at the 10 px font).
LABEL_ROOM = 70
#: The chart's font size, pixels, and a generous average width of one of its characters.
FONT_SIZE = 10
CHAR_WIDTH = 6.0
#: Steps between time labels: the first that leaves at most as many labels as fit.
TICK_INTERVALS = (
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
    2 * 86400,
    7 * 86400,
    14 * 86400,
    28 * 86400,
)
DAY = 86400
_SVG_NS = "http://www.w3.org/2000/svg"
#: Month names, not the locale's.
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def fill(points: Sequence[CallPoint], start: int, end: int, step: int) -> list[CallPoint]:
    """One point per step from ``start`` (inclusive, a multiple of ``step``) to ``end``
    (exclusive), with zeros for the steps missing from ``points``.

    Points outside the period are ignored; a point inside it counts in the step that holds
    its ``ts`` (two points of one step are added up). ValueError if ``step`` is not
    positive or ``start`` not a multiple of it.
    """
    _check_period(start, step)
    count = _steps(start, end, step)
    succ = [0] * count
    err = [0] * count
    for p in points:
        if start <= p.ts < end:
            i = (p.ts - start) // step
            succ[i] += p.succ
            err[i] += p.err
    return [CallPoint(start + i * step, succ[i], err[i]) for i in range(count)]


def chart_svg(
    points: Sequence[CallPoint],
    *,
    start: int,
    end: int,
    step: int,
    width: int = 720,
    height: int = 200,
    title: str = "",
) -> Markup:
    """An SVG bar chart of ``points``'s calls and errors per step from ``start`` to ``end``
    (epoch seconds, as for :func:`fill`), ``width`` by ``height`` pixels.

    A heading with ``title`` (plain text, escaped) and what a bar counts ("calls per minute" when
    ``step`` is 60, else per step), a legend, a y axis from 0 to the busiest step, UTC time
    labels below (dates at midnight when the period is longer than a day). ``<title>`` and
    ``aria-label`` summarise: calls, errors and their share, the period. Without calls, the
    frame says "no calls in this period". ValueError for a bad period or a size too small
    for the plot.
    """
    series = fill(points, start, end, step)
    plot_w = width - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = height - MARGIN_TOP - MARGIN_BOTTOM
    if plot_w < 10 or plot_h < 10:
        raise ValueError(f"a chart of {width}x{height} pixels has no room for its plot")
    total_succ = sum(p.succ for p in series)
    total_err = sum(p.err for p in series)
    max_err = max((p.err for p in series), default=0)
    max_calls = max((p.succ + p.err for p in series), default=0)
    summary = f"{_totals(total_succ, total_err)} {_period(start, end)}"
    label = f"{title}: {summary}" if title else summary
    x0, y0 = MARGIN_LEFT, MARGIN_TOP
    x1, y1 = x0 + plot_w, y0 + plot_h
    caption = f"calls per {_unit(step)}"

    out = [
        f'<svg xmlns="{_SVG_NS}" class="lars-chart" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}"'
        f' data-total-succ="{total_succ}" data-total-err="{total_err}"'
        f' data-max-err="{max_err}" font-family="sans-serif" font-size="{FONT_SIZE}">',
        f"<title>{escape(label)}</title>",
        f'<text class="heading" x="{x0}" y="{y0 - 10}" fill="{TEXT_COLOUR}">',
    ]
    if title:
        out.append(f'<tspan font-weight="bold">{escape(title)}</tspan><tspan dx="6">')
        out.append(f"{caption}</tspan>")
    else:
        out.append(caption)
    out.append("</text>")
    out.append(
        f'<rect class="plot" x="{x0}" y="{y0}" width="{plot_w}" height="{plot_h}"'
        f' fill="none" stroke="{GRID_COLOUR}"/>'
    )
    if max_calls == 0:
        out.append(
            f'<text class="empty" x="{_n(x0 + plot_w / 2)}" y="{_n(y0 + plot_h / 2 + 3.5)}"'
            f' text-anchor="middle" fill="{TEXT_COLOUR}">no calls in this period</text>'
        )
    else:
        out.extend(_legend(x1, y0 - 10))
        out.append(
            f'<g class="axis y" fill="{TEXT_COLOUR}" text-anchor="end">'
            f'<text x="{x0 - 4}" y="{_n(y0 + 3.5)}">{_compact(max_calls)}</text>'
            f'<text x="{x0 - 4}" y="{_n(y1 + 3.5)}">0</text></g>'
        )
        out.extend(_bars(series, x0, y1, plot_w, plot_h, max_calls))
    out.append(
        f'<line class="axis x" x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}" stroke="{AXIS_COLOUR}"/>'
    )
    out.extend(_time_labels(start, len(series) * step, x0, plot_w, y1, width))
    out.append("</svg>")
    return Markup("".join(out))


def sparkline_svg(
    points: Sequence[CallPoint],
    *,
    start: int,
    end: int,
    step: int,
    width: int = 120,
    height: int = 24,
) -> Markup:
    """A tiny SVG line of ``points``'s calls per step from ``start`` to ``end`` (as for
    :func:`fill`), and a red dot at each step with errors, as high as its errors on the
    same scale (on the line when all of its calls failed, near the bottom when few did).

    ``<title>`` and ``aria-label`` give the totals and the period. Steps are merged in
    groups when there are more than ``width`` of them (a point per pixel at most).
    """
    series = fill(points, start, end, step)
    total_succ = sum(p.succ for p in series)
    total_err = sum(p.err for p in series)
    label = f"{_totals(total_succ, total_err)} {_period(start, end)}"
    out = [
        f'<svg xmlns="{_SVG_NS}" class="lars-spark" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}"'
        f' data-total-succ="{total_succ}" data-total-err="{total_err}">',
        f"<title>{escape(label)}</title>",
    ]
    pad = 1.5
    calls = [p.succ + p.err for p in series]
    errors = [p.err for p in series]
    if len(calls) > width > 0:
        group = math.ceil(len(calls) / width)
        calls = [sum(calls[i : i + group]) for i in range(0, len(calls), group)]
        errors = [sum(errors[i : i + group]) for i in range(0, len(errors), group)]
    top = max(calls, default=0)
    if top == 0:
        y = _n(height - pad)
        out.append(
            f'<line class="empty" x1="{pad}" y1="{y}" x2="{_n(width - pad)}" y2="{y}"'
            f' stroke="{GRID_COLOUR}" stroke-width="1"/>'
        )
    else:
        out.append(_polyline(calls, top, width, height, pad))
        if total_err:
            out.append(_dots(calls, errors, top, width, height, pad))
    out.append("</svg>")
    return Markup("".join(out))


# --- the parts --------------------------------------------------------------------------------


def _bars(
    series: Sequence[CallPoint], x0: int, y1: int, plot_w: int, plot_h: int, max_calls: int
) -> list[str]:
    """The bars: a group of successes' rectangles, a group of errors' rectangles."""
    slot = plot_w / len(series)
    # Wide bars have a gap between them; narrow ones overlap a little, for an even area
    # instead of anti-aliased stripes.
    gap = min(1.0, slot * 0.2) if slot >= 2 else -0.3
    bar_w = _n(slot - gap)
    scale = plot_h / max_calls
    succ = [f'<g class="succ" fill="{SUCC_COLOUR}">']
    err = [f'<g class="err" fill="{ERR_COLOUR}">']
    for i, p in enumerate(series):
        calls = p.succ + p.err
        if not calls:
            continue
        x = _n(x0 + i * slot + max(gap, 0.0) / 2)
        bar_h = max(calls * scale, MIN_BAR)
        err_h = min(max(p.err * scale, MIN_ERR), bar_h) if p.err else 0.0
        top = round(y1 - bar_h, 1)
        middle = round(y1 - bar_h + err_h, 1)
        if middle < y1:
            succ.append(
                f'<rect x="{x}" y="{_n(middle)}" width="{bar_w}" height="{_n(y1 - middle)}"/>'
            )
        if p.err:
            err.append(
                f'<rect data-ts="{p.ts}" data-err="{p.err}" x="{x}" y="{_n(top)}"'
                f' width="{bar_w}" height="{_n(middle - top)}"/>'
            )
    succ.append("</g>")
    err.append("</g>")
    return succ + err


def _legend(right: int, baseline: int) -> list[str]:
    """Two swatches and their names, ending at ``right``."""
    entries = (("calls", SUCC_COLOUR), ("errors", ERR_COLOUR))
    out = [f'<g class="legend" fill="{TEXT_COLOUR}">']
    x = right - sum(12 + len(name) * CHAR_WIDTH + 8 for name, _ in entries) + 8
    for name, colour in entries:
        out.append(
            f'<rect x="{_n(x)}" y="{baseline - 8}" width="8" height="8" fill="{colour}"/>'
            f'<text x="{_n(x + 12)}" y="{baseline}">{name}</text>'
        )
        x += 12 + len(name) * CHAR_WIDTH + 8
    out.append("</g>")
    return out


def _time_labels(start: int, span: int, x0: int, plot_w: int, y1: int, width: int) -> list[str]:
    """Ticks and UTC labels below the plot at round times, as many as fit."""
    if span <= 0:
        return []
    fits = max(2, plot_w // LABEL_ROOM)
    interval = next((i for i in TICK_INTERVALS if span / i <= fits), TICK_INTERVALS[-1])
    while span / interval > fits:
        interval *= 2
    long = span > DAY
    ticks = []
    labels = []
    t = -(-start // interval) * interval
    while t <= start + span:
        x = x0 + (t - start) / span * plot_w
        text = _time_label(t, long)
        half = len(text) * CHAR_WIDTH / 2
        if x - half >= 0 and x + half <= width:
            ticks.append(f"M{_n(x)} {y1}v3")
            labels.append(f'<text x="{_n(x)}" y="{y1 + 13}">{text}</text>')
        t += interval
    if not ticks:
        return []
    return [
        f'<path class="ticks" d="{"".join(ticks)}" stroke="{AXIS_COLOUR}"/>',
        f'<g class="axis x" fill="{TEXT_COLOUR}" text-anchor="middle">',
        *labels,
        "</g>",
    ]


def _sparkline_xs(count: int, width: int, pad: float) -> list[float]:
    """Where a sparkline's ``count`` points go across."""
    if count == 1:
        return [width / 2]
    return [pad + i * (width - 2 * pad) / (count - 1) for i in range(count)]


def _sparkline_y(value: int, top: int, height: int, pad: float) -> str:
    return _n(height - pad - value / top * (height - 2 * pad))


def _polyline(calls: Sequence[int], top: int, width: int, height: int, pad: float) -> str:
    """A sparkline's line of ``calls`` scaled to ``top``; the inner points of flat runs
    are left out (a quiet hour is two points, not sixty)."""
    if len(calls) == 1:
        xs = [pad, width - pad]
        calls = [calls[0], calls[0]]
    else:
        xs = _sparkline_xs(len(calls), width, pad)
    ys = [_sparkline_y(v, top, height, pad) for v in calls]
    last = len(ys) - 1
    coords = [
        f"{_n(xs[i])},{y}"
        for i, y in enumerate(ys)
        if i in (0, last) or y != ys[i - 1] or y != ys[i + 1]
    ]
    return (
        f'<polyline class="calls" points="{" ".join(coords)}" fill="none"'
        f' stroke="{SUCC_COLOUR}" stroke-width="1.2" stroke-linejoin="round"/>'
    )


def _dots(
    calls: Sequence[int], errors: Sequence[int], top: int, width: int, height: int, pad: float
) -> str:
    """A sparkline's red dots, one per step with errors: one path of zero-length strokes
    with round caps."""
    xs = _sparkline_xs(len(calls), width, pad)
    moves = "".join(
        f"M{_n(xs[i])} {_sparkline_y(e, top, height, pad)}h0" for i, e in enumerate(errors) if e
    )
    return (
        f'<path class="err" d="{moves}" fill="none" stroke="{ERR_COLOUR}" stroke-width="2.5"'
        f' stroke-linecap="round"/>'
    )


# --- text --------------------------------------------------------------------------------------


def _check_period(start: int, step: int) -> None:
    if step <= 0:
        raise ValueError(f"a chart's step must be positive, got {step}")
    if start % step:
        raise ValueError(f"a chart's start must be a multiple of its step {step}, got {start}")


def _steps(start: int, end: int, step: int) -> int:
    """How many steps start from ``start`` (inclusive) before ``end``."""
    return max(0, -(-(end - start) // step))


def _n(value: float) -> str:
    """A coordinate to a tenth of a pixel, without a useless ``.0``."""
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return "0" if text == "-0" else text


def _compact(count: int) -> str:
    """A count to three significant digits: 950, 1.23k, 45.6k, 789k, 1.2M."""
    if count < 1000:
        return str(count)
    value = float(count)
    for suffix in ("k", "M", "G", "T"):
        value /= 1000
        digits = 2 if value < 10 else 1 if value < 100 else 0
        text = f"{value:.{digits}f}"
        if float(text) < 1000:
            if "." in text:
                text = text.rstrip("0").rstrip(".")
            return text + suffix
    return f"{value:.0f}T"


def _totals(succ: int, err: int) -> str:
    """``12,345 calls, 67 errors (0.5%)``, ``12 calls, no errors``, ``no calls``."""
    calls = succ + err
    if not calls:
        return "no calls"
    text = f"{calls:,} {'call' if calls == 1 else 'calls'}"
    if not err:
        return f"{text}, no errors"
    share = err * 100 / calls
    if share < 0.1:
        percent = "<0.1%"
    elif share > 99.9 and err < calls:
        percent = ">99.9%"
    else:
        percent = f"{share:.1f}".removesuffix(".0") + "%"
    return f"{text}, {err:,} {'error' if err == 1 else 'errors'} ({percent})"


def _period(start: int, end: int) -> str:
    """``over 1 hour, 12:00 to 13:00 UTC``, with dates when the ends fall on two days."""
    same_day = end - start < DAY and start // DAY == (end - 1) // DAY
    form = "%H:%M" if same_day else "%Y-%m-%d %H:%M"
    first = time.strftime(form, time.gmtime(start))
    last = time.strftime(form, time.gmtime(end))
    return f"over {_duration(end - start)}, {first} to {last} UTC"


def _duration(seconds: int) -> str:
    """``1 hour``, ``10 minutes``, ``2 days``, ``90 seconds``: the largest whole unit."""
    for unit, size in (("day", DAY), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds} {'second' if seconds == 1 else 'seconds'}"


def _unit(step: int) -> str:
    """What one step is, for "calls per ...": ``minute``, ``10 minutes``, ``hour``."""
    return _duration(step).removeprefix("1 ")


def _time_label(ts: int, long: bool) -> str:
    """``HH:MM`` UTC; over more than a day, midnights are dates (``Mar 05``)."""
    when = time.gmtime(ts)
    if long and ts % DAY == 0:
        return f"{_MONTHS[when.tm_mon - 1]} {when.tm_mday:02d}"
    return f"{when.tm_hour:02d}:{when.tm_min:02d}"
