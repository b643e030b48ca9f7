"""The daily Discord summary: one message per guard at `[notify.discord] daily_summary`.

`summary_text` builds the message (interruptions, standby hours, cost over the
last 24 hours, ledger.Estimate's formula) and is pure; `DailySummary` schedules
it with apscheduler at HH:MM in the configured time zone and hands each text to
the notifier.

This module must not post to Discord itself, decide anything about failover,
or write files.
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
import zoneinfo
from pathlib import Path
from typing import Any, Callable

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from spotguard import ledger
from spotguard.ledger import Estimate

log = structlog.get_logger(__name__)

DAY = 86400.0
JOB_ID = "spotguard-daily-summary"
# A summary missed by up to this much (the nano was busy or asleep) is still sent.
MISFIRE_GRACE = 3600


# --------------------------------------------------------------------------- text


def summary_text(guard: str, interruptions: int, est: Estimate, until: str, margins: list[float] | None = None) -> str:
    """The message for one guard over the window ending `until` (already formatted)."""
    parts = [_interruptions(interruptions), _standby(est.standby_hours)]
    if margins:
        parts.append(f"ready margin min {min(margins):+.0f}s, median {statistics.median(margins):+.0f}s "
                     "(standby healthy before the spot was reclaimed)")
    if est.cost is None:
        parts.append("cost unknown (set on_demand_hourly and spot_hourly)")
    else:
        parts.append(f"est. cost ${est.cost:.2f}, saving ${est.saving:.2f} against On-Demand all day")
    covered = "" if est.hours >= 24 - 1e-9 else f" (history covers only {_hours(est.hours)})"
    return f"[{guard}] daily summary, 24 h to {until}{covered}: " + "; ".join(parts)


def _interruptions(n: int) -> str:
    if n == 0:
        return "no interruptions"
    return f"{n} interruption{'s' if n != 1 else ''}"


def _standby(hours: float) -> str:
    if hours <= 0:
        return "standby never ran"
    return f"standby ran {_hours(hours)} On-Demand"


def _hours(hours: float) -> str:
    minutes = round(hours * 60)
    h, m = divmod(minutes, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m"


# --------------------------------------------------------------------------- scheduler


class DailySummary:
    """Sends `summary_text` for every guard once a day; start()/shutdown() in the daemon's loop."""

    def __init__(self, settings: Any, notifier: Any, state_dir: Path | str | None = None,
                 clock: Callable[[], float] = time.time, leading: Callable[[], bool] = lambda: True) -> None:
        self.settings = settings
        self.leading = leading  # with [ha]: only the lease holder (whose ledger is current) sends
        self.notifier = notifier
        self.state_dir = Path(state_dir if state_dir is not None else settings.daemon.state_dir)
        self.clock = clock
        self._scheduler: AsyncIOScheduler | None = None

    def __repr__(self) -> str:
        return f"DailySummary(at={self.at!r}, timezone={self.zone_name!r}, running={self._scheduler is not None})"

    @property
    def at(self) -> str | None:
        discord = self.settings.discord
        return discord.daily_summary if discord is not None else None

    @property
    def zone_name(self) -> str:
        discord = self.settings.discord
        return discord.timezone if discord is not None else "UTC"

    def trigger(self) -> CronTrigger | None:
        """When the job fires, or None when no daily summary is configured."""
        if self.at is None:
            return None
        hour, minute = (int(x) for x in self.at.split(":"))
        return CronTrigger(hour=hour, minute=minute, timezone=zoneinfo.ZoneInfo(self.zone_name))

    @property
    def job(self) -> Any:
        """The scheduled apscheduler job (None until started, or without daily_summary)."""
        return self._scheduler.get_job(JOB_ID) if self._scheduler is not None else None

    def start(self) -> None:
        """Schedule the job (call from within the running event loop); a no-op without daily_summary."""
        trigger = self.trigger()
        if trigger is None or self._scheduler is not None:
            return
        scheduler = AsyncIOScheduler(timezone=zoneinfo.ZoneInfo(self.zone_name))
        scheduler.add_job(self.send, trigger, id=JOB_ID, coalesce=True, misfire_grace_time=MISFIRE_GRACE)
        scheduler.start()
        self._scheduler = scheduler
        log.info("summary.scheduled", at=self.at, timezone=self.zone_name)

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    async def send(self) -> None:
        """The job: one message per guard about the last 24 h (a coroutine: runs in the loop)."""
        if not self.leading():
            log.info("summary.skipped", reason="not leading")
            return
        end = self.clock()
        until = dt.datetime.fromtimestamp(end, zoneinfo.ZoneInfo(self.zone_name)).strftime("%Y-%m-%d %H:%M %Z")
        for guard in self.settings.guards:
            try:
                text = self.text(guard, end, until)
            except Exception as exc:  # noqa: BLE001 - one guard's unreadable ledger must not cost the others
                log.error("summary.failed", guard=guard.name, error=type(exc).__name__, detail=str(exc))
                continue
            self.notifier.notify(text)
            log.info("summary.sent", guard=guard.name)

    def text(self, guard: Any, end: float, until: str) -> str:
        view = ledger.read(self.state_dir, guard.name)
        est = view.estimate(end - DAY, end, guard.on_demand_hourly, guard.spot_hourly)
        margins = [m.seconds for m in view.margins(end - DAY, end)]
        return summary_text(guard.name, len(view.interruptions(end - DAY, end)), est, until, margins)
