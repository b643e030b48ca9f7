"""Scenario time: the lab's one clock, running `speed` times faster than the wall.

Every duration in the lab is written in scenario seconds (a 120 s notice, a
20 s boot) and every part asks this clock to wait; the wall time taken is the
scenario time divided by `speed`, so all ratios are kept. Spotguard itself
runs in real time: its config gets the scaled durations (`wall()`).

This module must not know about AWS or HTTP; it only converts and waits.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScenarioClock:
    speed: float
    origin: float = field(default_factory=time.monotonic)  # wall monotonic time of scenario second 0

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError(f"speed must be positive, not {self.speed!r}")

    def now(self) -> float:
        """Scenario seconds since the origin."""
        return (time.monotonic() - self.origin) * self.speed

    def wall(self, seconds: float) -> float:
        """How long `seconds` of scenario time take on the wall."""
        return seconds / self.speed

    def at_epoch(self, epoch: float) -> float:
        """The scenario time of a wall-clock timestamp (seconds since the epoch)."""
        return (epoch - time.time() + time.monotonic() - self.origin) * self.speed

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, self.wall(seconds)))

    async def sleep_until(self, moment: float) -> None:
        await self.sleep(moment - self.now())

    def restarted(self) -> "ScenarioClock":
        """The same speed with second 0 now."""
        return ScenarioClock(self.speed)


def clock_text(seconds: float) -> str:
    """Scenario time for a timeline: +m:ss (or -m:ss before the origin)."""
    sign = "-" if seconds < 0 else "+"
    whole = int(abs(seconds))
    return f"{sign}{whole // 60}:{whole % 60:02d}"


def span_text(seconds: float) -> str:
    """A duration for people: 45s, 4m05s, 1h02m."""
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
