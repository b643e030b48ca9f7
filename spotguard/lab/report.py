"""The lab's verdict for people: one column per run, side by side, then a sentence per run.

This module must not run anything; it formats Outcomes.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .clock import span_text
from .scenario import Outcome

LABEL_WIDTH = 40
COLUMN_WIDTH = 20


def summary(outcomes: Sequence[Outcome]) -> str:
    speed = outcomes[0].speed
    rows: list[tuple[str, Callable[[Outcome], str]]] = [
        ("requests sent", lambda o: str(o.sent)),
        ("requests failed", lambda o: str(o.failed)),
        ("longest outage (every request failing)", lambda o: span_text(o.longest_outage)),
        ("time with no healthy target", lambda o: span_text(o.no_healthy_target)),
        ("standby serving before the spot died", _lead),
        ("On-Demand seconds used", lambda o: f"{o.on_demand_seconds:.0f} s" if o.scenario.guarded else "0 s"),
        ("wall time of the run", lambda o: f"{o.wall_seconds:.1f} s"),
    ]
    spots = max(o.scenario.spots for o in outcomes)
    if spots > 1:  # a fleet: what matters is how much of it serves, not only whether anything does
        at = [label for label, _ in rows].index("time with no healthy target") + 1
        rows[at:at] = _fleet_rows(spots)
    causes = sorted({cause for o in outcomes for cause in o.failures})
    lines = [
        "",
        f"Summary (scenario time: the lab ran ×{speed:g}, so 1 s here took {1000 / speed:.0f} ms; "
        "requests are real HTTP)",
        "",
        " " * LABEL_WIDTH + "".join(f"{o.scenario.name:>{COLUMN_WIDTH}}" for o in outcomes),
    ]
    for label, cell in rows:
        lines.append(f"{label:<{LABEL_WIDTH}}" + "".join(f"{cell(o):>{COLUMN_WIDTH}}" for o in outcomes))
        if label == "requests failed":
            for cause in causes:
                cells = "".join(f"{o.failures.get(cause, 0) or '':>{COLUMN_WIDTH}}" for o in outcomes)
                lines.append(f"  {cause:<{LABEL_WIDTH - 2}}" + cells)
    lines.append("")
    lines.extend(verdict(o) for o in outcomes)
    return "\n".join(lines) + "\n"


def _fleet_rows(spots: int) -> list[tuple[str, Callable[[Outcome], str]]]:
    return [
        (f"fewest healthy targets (of {spots} spots)", lambda o: str(o.fewest_healthy)),
        (f"time with fewer than {spots} healthy", lambda o: span_text(o.below_capacity)),
        ("requests served/s, first 30s (wall)", lambda o: f"{o.first_served:.1f}"),
        ("requests served/s, lowest 30s (wall)", lambda o: f"{o.lowest_served:.1f}"),
    ]


def _fleet_verdict(o: Outcome) -> str:
    spots = o.scenario.spots
    text = f"{o.failed} of {o.sent} requests failed; " if o.failed else f"no request lost out of {o.sent}; "
    if o.fewest_healthy >= spots:
        text += f"never fewer than {spots} healthy targets"
    else:
        text += (f"capacity fell to {o.fewest_healthy} of {spots} targets for {span_text(o.below_capacity)} "
                 f"(time with fewer than {spots})")
    text += f"; served {o.lowest_served:.1f} requests/s at the lowest against {o.first_served:.1f} at first"
    alerts = o.alerts() if o.scenario.guarded else []
    return text + (f"; spotguard alerted {len(alerts)}x ({alerts[0]})" if alerts else "")


def _lead(o: Outcome) -> str:
    if not o.scenario.guarded:
        return "-"
    return span_text(o.standby_lead) if o.standby_lead is not None else "never"


def verdict(o: Outcome) -> str:
    head = f"{o.scenario.name}: "
    if not o.completed:
        return head + f"INCOMPLETE: {o.problem}"
    if o.scenario.spots > 1:
        return head + _fleet_verdict(o)
    if o.scenario.guarded:
        if o.failed == 0:
            lead = f"; the standby served {span_text(o.standby_lead)} before the spot died" if o.standby_lead else ""
            text = f"no request lost out of {o.sent}{lead}"
        else:
            text = f"LOST {o.failed} of {o.sent} requests; longest outage {span_text(o.longest_outage)}"
        alerts = o.alerts()
        if alerts:
            text += f"; spotguard alerted {len(alerts)}x ({alerts[0]})"
        return head + text
    return head + (
        f"{o.failed} of {o.sent} requests failed; the service was down {span_text(o.longest_outage)} "
        "(termination → replacement booted, warmed up and healthy)"
    )
