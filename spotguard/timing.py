"""The failover's timing model against the spot notice: what has to fit into it, and the thresholds it is judged by.

`check` judges a deployment by it and `rehearse` prints a measured budget with it
(design.md § Timing budget). This module must not talk to AWS or read files.
"""

from __future__ import annotations

from dataclasses import dataclass

from spotguard.config import Settings, format_duration

NOTICE = 120.0  # spot interruption notice → instance gone (best effort)
SQS_DETECTION = 1.0  # SQS/agent notice → daemon, measured (README)
# Draining the doomed spot starts only once the standby is healthy, and must end
# before the spot is gone: a delay of the whole notice can never fit, and past
# ~100 s nothing is left for detection and the standby's start.
DRAIN_LIMIT = NOTICE
DRAIN_WARN = 100.0
# What a new target's health checks may take: the notice minus a ~60 s drain,
# ~20 s StartInstances → running and a few seconds of detection leaves ~30 s for
# the service to boot and pass its checks.
HEALTH_WARN = 30.0
# StartInstances → running on a stopped EBS-backed instance (design.md): used
# for an estimate until a rehearsal measures the real thing.
START_ESTIMATE = 20.0


def detection_seconds(settings: Settings) -> float:
    """How late the daemon may hear of a notice: ~1 s with SQS, else up to one poll."""
    poll = settings.daemon.poll_interval
    return min(SQS_DETECTION, poll) if settings.sqs is not None else poll


@dataclass(frozen=True)
class Budget:
    """A failover against the notice: detect it, get the standby healthy, drain the doomed spot."""

    detect: float
    ready: float  # StartInstances → healthy target
    drain: float  # the target group's deregistration delay
    notice: float = NOTICE

    @property
    def total(self) -> float:
        return self.detect + self.ready + self.drain

    @property
    def fits(self) -> bool:
        return self.total <= self.notice

    def text(self, ready: str | None = None) -> str:
        """`detect 5s + ready 25s + drain 30s = 1m of the 2m notice, 1m to spare`; `ready` words that part."""
        margin = self.notice - self.total
        end = f"{_s(margin)} to spare" if self.fits else f"{_s(-margin)} over"
        return (f"detect {_s(self.detect)} + {ready or 'ready ' + _s(self.ready)} + drain {_s(self.drain)} "
                f"= {_s(self.total)} of the {_s(self.notice)} notice, {end}")


def _s(seconds: float) -> str:
    return format_duration(round(seconds, 1))
