"""The failover's timing model against the spot notice: the one place its numbers are worked out.

A failover fits when detection, the standby's way to healthy (StartInstances →
healthy in the target group: start, boot, model load, health checks) and the
doomed spot's drain (the deregistration delay), plus a margin, fit in the
two-minute notice (design.md § Timing budget). `check` judges a deployment by it,
`rehearse` prints its measured budget with it, and the deregistration delay the
docs advise is `advised_delay` of the figures they quote (a test keeps them in step).

This module must not talk to AWS or read files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spotguard.config import Settings, format_duration
from spotguard.machine import NOTICE  # spot interruption notice → instance gone (best effort)

SQS_DETECTION = 1.0  # SQS/agent notice → daemon (docs/benchmarks.md: p99 28 ms by SQS, ~1 s by the agent)
# The notice is best effort and the instance-action time is to the second: leave this much
# unspent, so the drain ends before the spot is reclaimed rather than at the same moment.
MARGIN = 10.0
# StartInstances → running on a stopped EBS-backed instance (design.md): used for an
# estimate until a rehearsal measures the real thing.
START_ESTIMATE = 20.0
# A drain shorter than this cuts long requests short; below it, spotguard advises another change.
MIN_DRAIN = 10.0
DRAIN_STEP = 5.0  # advised delays are rounded down to a multiple of this


def detection_seconds(settings: Settings) -> float:
    """How late the daemon may hear of a notice: ~1 s with SQS, else up to one poll."""
    poll = settings.daemon.poll_interval
    return min(SQS_DETECTION, poll) if settings.sqs is not None else poll


def health_check_seconds(interval: float, healthy_threshold: int, register_when: str = "running") -> float:
    """How long a new target may take to pass its health checks once its service answers.

    Registered when ready, it passes its first check: one `interval`. Registered as
    it runs, it fails checks while it warms and then needs `healthy_threshold` of them.
    """
    return interval if register_when == "ready" else interval * healthy_threshold


def advised_delay(detect: float, ready: float) -> float | None:
    """The longest deregistration delay that fits (a multiple of DRAIN_STEP), or None when
    even MIN_DRAIN does not: then the standby itself is too slow for the notice."""
    room = NOTICE - MARGIN - detect - ready
    if room < MIN_DRAIN:
        return None
    return math.floor(room / DRAIN_STEP) * DRAIN_STEP


@dataclass(frozen=True)
class Budget:
    """A failover against the notice: detect it, get the standby healthy, drain the doomed spot."""

    detect: float
    ready: float  # StartInstances → healthy target
    drain: float  # the target group's deregistration delay
    notice: float = NOTICE

    @property
    def total(self) -> float:
        return self.detect + self.ready + self.drain + MARGIN

    @property
    def fits(self) -> bool:
        return self.total <= self.notice

    def text(self, ready: str | None = None) -> str:
        """`detect 5s + ready 25s + drain 30s + margin 10s = 1m10s of the 2m notice, 50s to spare`."""
        spare = self.notice - self.total
        end = f"{_s(spare)} to spare" if self.fits else f"{_s(-spare)} over"
        return (f"detect {_s(self.detect)} + {ready or 'ready ' + _s(self.ready)} + drain {_s(self.drain)} "
                f"+ margin {_s(MARGIN)} = {_s(self.total)} of the {_s(self.notice)} notice, {end}")

    def change(self) -> str:
        """The one change that makes the budget fit: a shorter deregistration delay when one
        is long enough to drain, else a faster (or earlier) standby."""
        delay = advised_delay(self.detect, self.ready)
        if delay is not None:
            return f"set the deregistration delay to {_s(delay)} or less"
        return (f"the standby needs {_s(self.ready)} to be healthy, more than the notice leaves: make its boot "
                "and model load faster, or set on_rebalance = \"prewarm\" so it starts on the rebalance "
                "recommendation")


def _s(seconds: float) -> str:
    return format_duration(round(seconds, 1))
