"""An SVG of one replayed trace: when the spot ran, when the standby served, when nothing did, and the cost.

`spotguard simulate --plot FILE.svg` draws it; plain SVG written here, so the
picture needs no plotting library. The bands come from one continuous play of
the whole trace per policy (the table's numbers come from spotguard.sim.playback,
which agrees with it, see tests/test_simulate.py). This module must never be
imported by the daemon: only the simulate verb loads it, and only when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from html import escape
from pathlib import Path

from spotguard.sim.playback import STANDBY, Numbers, Replay, cuts, script
from spotguard.sim.world import run
from spotguard.traces import SOURCE, Trace

WIDTH, LEFT, RIGHT = 980, 190, 20
BAND, BANDS_TOP = 16, 56
COST_TOP, COST_HEIGHT = 200, 190
NOTIONAL_SPOT = 0.3  # spot price as a share of On-Demand when no prices are given
COLOURS = {"spot": "#4c9a2a", "standby": "#2f6fb0", "spotguard": "#2f6fb0", "no_standby": "#888888",
           "on_demand": "#c0392b", "outage": "#c0392b"}


@dataclass(frozen=True)
class Timeline:
    """Intervals (start, end) in seconds from the first running spot, per band."""

    seconds: float
    spot: list[tuple[float, float]]
    standby: list[tuple[float, float]]
    outage: list[tuple[float, float]]  # spotguard
    outage_alone: list[tuple[float, float]]  # no standby


def paths(base: Path, n: int) -> list[Path]:
    """FILE for one trace; FILE-1.svg, FILE-2.svg, ... for several."""
    if n == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix or '.svg'}") for i in range(1, n + 1)]


def timeline(trace: Trace, numbers: Numbers) -> Timeline:
    cut_list, seconds = cuts(trace, numbers)
    play = script(cut_list, seconds, numbers)
    guarded = run(numbers.rules(), play)
    alone = run(replace(numbers.rules(), standbys=()), play)
    return Timeline(
        float(seconds),
        _spans(guarded, lambda w: (i := w.instance(w.spot)) is not None and i.state == "running", seconds),
        _spans(guarded, lambda w: (i := w.instance(STANDBY)) is not None and i.state == "running", seconds),
        _spans(guarded, lambda w: not w.healthy(), seconds),
        _spans(alone, lambda w: not w.healthy(), seconds),
    )


def _spans(played, holds, end: float) -> list[tuple[float, float]]:
    """Where `holds(world snapshot)` is true, read at every step (a change is seen within a poll)."""
    out: list[tuple[float, float]] = []
    since = None
    for s in played.steps:
        on = holds(s.world)
        if on and since is None:
            since = s.t
        elif not on and since is not None:
            out.append((since, s.t))
            since = None
    if since is not None:
        out.append((since, end))
    return out


def write(path: Path, trace: Trace, result: Replay, numbers: Numbers) -> None:
    path.write_text(svg(trace, result, numbers, timeline(trace, numbers)))


def svg(trace: Trace, result: Replay, numbers: Numbers, line: Timeline) -> str:
    x = _scale(line.seconds)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{COST_TOP + COST_HEIGHT + 70}" '
        'font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{escape(trace.name)}: '
        f'{result.hours:.0f} h, {result.interruptions} interruptions</text>',
        f'<text x="{LEFT}" y="40" fill="#555">boot {numbers.boot}s, warm-up {numbers.warm_up}s, health check '
        f'{numbers.health_interval}s × {numbers.healthy_threshold}, register_when {numbers.register_when}, '
        f'failback_grace {numbers.failback_grace:.0f}s</text>',
    ]
    rows = (("spot running", line.spot, "spot"), ("standby serving", line.standby, "standby"),
            (f"outage, spotguard: {_hours(line.outage)}", line.outage, "outage"),
            (f"outage, no standby: {_hours(line.outage_alone)}", line.outage_alone, "outage"))
    for n, (label, spans, colour) in enumerate(rows):
        y = BANDS_TOP + n * (BAND + 8)
        parts.append(f'<text x="{LEFT - 8}" y="{y + BAND - 4}" text-anchor="end">{label}</text>')
        parts.append(f'<rect x="{LEFT}" y="{y}" width="{x(line.seconds) - LEFT:.1f}" height="{BAND}" fill="#f2f2f2"/>')
        for a, b in spans:
            width = max(x(b) - x(a), 0.6)  # a short outage still shows
            parts.append(f'<rect x="{x(a):.1f}" y="{y}" width="{width:.1f}" height="{BAND}" '
                         f'fill="{COLOURS[colour]}"/>')
    parts += _costs(line, numbers, x)
    parts += _axis(line.seconds, x)
    parts.append(f'<text x="{LEFT}" y="{COST_TOP + COST_HEIGHT + 60}" fill="#777" font-size="10">'
                 f'Traces: {escape(SOURCE)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _hours(spans: list[tuple[float, float]]) -> str:
    total = sum(b - a for a, b in spans)
    return f"{total / 3600:,.1f} h" if total >= 3600 else f"{total:.0f} s"


def _scale(seconds: float):
    span = WIDTH - LEFT - RIGHT
    return lambda t: LEFT + span * t / seconds


def _costs(line: Timeline, numbers: Numbers, x) -> list[str]:
    od = numbers.on_demand_hourly if numbers.on_demand_hourly is not None else 1.0
    spot = numbers.spot_hourly if numbers.spot_hourly is not None else NOTIONAL_SPOT * od
    priced = numbers.on_demand_hourly is not None and numbers.spot_hourly is not None
    curves = {
        "spotguard": _cumulative([(line.spot, spot), (line.standby, od)], line.seconds),
        "no_standby": _cumulative([(line.spot, spot)], line.seconds),
        "on_demand": [(0.0, 0.0), (line.seconds, od * line.seconds / 3600)],
    }
    top = max(c[-1][1] for c in curves.values()) or 1.0

    def y(v: float) -> float:
        return COST_TOP + COST_HEIGHT - COST_HEIGHT * v / top

    unit = "USD" if priced else f"On-Demand hours (spot at {NOTIONAL_SPOT:.0%} of On-Demand; no prices given)"
    out = [f'<text x="{LEFT - 8}" y="{COST_TOP + 4}" text-anchor="end">cumulative cost</text>',
           f'<text x="{LEFT - 8}" y="{COST_TOP + 18}" text-anchor="end" fill="#555">{top:,.0f}</text>',
           f'<line x1="{LEFT}" y1="{y(0)}" x2="{WIDTH - RIGHT}" y2="{y(0)}" stroke="#999"/>']
    for n, (name, points) in enumerate(curves.items()):
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{COLOURS[name]}" stroke-width="2"/>')
        label = {"spotguard": "spotguard", "no_standby": "no standby", "on_demand": "On-Demand only"}[name]
        out.append(f'<text x="{LEFT + 10 + 160 * n}" y="{COST_TOP - 8}" fill="{COLOURS[name]}">'
                   f'■ {label}: {points[-1][1]:,.0f}</text>')
    out.append(f'<text x="{WIDTH - RIGHT}" y="{COST_TOP - 8}" text-anchor="end" fill="#555">{escape(unit)}</text>')
    return out


def _cumulative(rates: list[tuple[list[tuple[float, float]], float]], end: float) -> list[tuple[float, float]]:
    """The running total of hourly prices over the spans they apply to, as (t, total) points."""
    edges = sorted({0.0, end, *(t for spans, _ in rates for span in spans for t in span)})
    points, total = [(0.0, 0.0)], 0.0
    for a, b in zip(edges, edges[1:]):
        mid = (a + b) / 2
        rate = sum(price for spans, price in rates if any(s <= mid < e for s, e in spans))
        total += rate * (b - a) / 3600
        points.append((b, total))
    return points


def _axis(seconds: float, x) -> list[str]:
    days = seconds / 86400
    step = next(s for s in (1, 2, 5, 7, 14, 30, 60, 90) if days / s <= 12)
    base = COST_TOP + COST_HEIGHT
    out = []
    for d in range(0, int(days) + 1, step):
        out.append(f'<line x1="{x(d * 86400):.1f}" y1="{BANDS_TOP - 4}" x2="{x(d * 86400):.1f}" y2="{base + 4}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{x(d * 86400):.1f}" y="{base + 18}" text-anchor="middle">day {d}</text>')
    return out
