"""Summaries of repeated measurements and the Markdown tables they are reported in.

Medians, not means: these machines are noisy, and one descheduled repetition
should move the figure as little as possible. p90 and min/max go alongside so
the spread is visible. This module must not measure anything.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p90: float
    min: float
    max: float

    def scaled(self, factor: float) -> "Summary":
        return Summary(self.n, self.median * factor, self.p90 * factor, self.min * factor, self.max * factor)


def summarize(values: Iterable[float]) -> Summary:
    xs = sorted(values)
    if not xs:
        raise ValueError("nothing to summarize")
    return Summary(len(xs), statistics.median(xs), percentile(xs, 0.9), xs[0], xs[-1])


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def fmt(value: float, digits: int = 3) -> str:
    """`digits` significant figures, without scientific notation for everyday sizes."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** digits:
        return f"{value:,.0f}"
    decimals = max(0, digits - 1 - int(f"{magnitude:e}".split("e")[1]))
    return f"{value:,.{decimals}f}"


def spread(s: Summary, digits: int = 3) -> str:
    """`min–max` as one cell."""
    return f"{fmt(s.min, digits)}–{fmt(s.max, digits)}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A Markdown table; `align` is one letter per column (l or r), right by default."""
    rows = [[str(c) for c in r] for r in rows]
    marks = [(":--" if (align[i:i + 1] or "r") == "l" else "--:") for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
