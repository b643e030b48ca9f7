"""The daily summary: its text by table, its schedule by zone, its message through a real HTTP server."""

from __future__ import annotations

import datetime as dt

import pytest
from httpcapture import CaptureServer
from observing import Told
from structlog.testing import capture_logs
from waiting import until

from spotguard.config import AwsSettings, DaemonSettings, DiscordSettings, GuardSettings, Settings
from spotguard.ledger import Estimate, Ledger
from spotguard.machine import GuardState, Instance, Notice, Observed, Phase, Rules, Start, Stop
from spotguard.notify import Notifier
from spotguard.summary import DailySummary, summary_text

H = 3600.0
SPOT, SB = "i-00000000000000001", "i-0000000000000000a"
UTC = dt.timezone.utc


def t(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def est(hours=24.0, spot=24.0, standby=0.0, od=1.0, sp=0.3) -> Estimate:
    cost = od_cost = saving = None
    if od is not None and sp is not None:
        cost, od_cost = spot * sp + standby * od, hours * od
        saving = od_cost - cost
    return Estimate(0.0, hours * H, hours, spot, standby, od, sp, cost, od_cost, saving)


UNTIL = "2026-11-29 09:30 KST"


@pytest.mark.parametrize(
    ("interruptions", "estimate", "expected"),
    [
        (0, est(), "[g] daily summary, 24 h to 2026-11-29 09:30 KST: no interruptions; standby never ran; "
                   "est. cost $7.20, saving $16.80 against On-Demand all day"),
        (1, est(spot=23.5, standby=0.25), "[g] daily summary, 24 h to 2026-11-29 09:30 KST: 1 interruption; "
                                          "standby ran 15m On-Demand; est. cost $7.30, saving $16.70 "
                                          "against On-Demand all day"),
        (3, est(standby=2.5, od=None), "[g] daily summary, 24 h to 2026-11-29 09:30 KST: 3 interruptions; "
                                       "standby ran 2h 30m On-Demand; "
                                       "cost unknown (set on_demand_hourly and spot_hourly)"),
        (0, est(hours=5, spot=5), "[g] daily summary, 24 h to 2026-11-29 09:30 KST (history covers only 5h 00m): "
                                  "no interruptions; standby never ran; est. cost $1.50, saving $3.50 "
                                  "against On-Demand all day"),
    ],
)
def test_text_by_table(interruptions, estimate, expected):
    assert summary_text("g", interruptions, estimate, UNTIL) == expected


def settings(tmp_path, url="http://127.0.0.1:9/api/webhooks/1/x", at="09:30", zone="Asia/Seoul") -> Settings:
    guard = GuardSettings(name="inference", target_group_arn="arn:x", standby_instance_ids=(SB,),
                          on_demand_hourly=1.0, spot_hourly=0.3)
    return Settings(aws=AwsSettings(region="us-east-1"), daemon=DaemonSettings(state_dir=tmp_path),
                    discord=DiscordSettings(webhook_url=url, daily_summary=at, timezone=zone), guards=(guard,))


@pytest.mark.parametrize(
    ("at", "zone", "now", "expected_utc"),
    [
        ("09:30", "Asia/Seoul", "2026-11-28 20:00", "2026-11-29 00:30"),  # 09:30 KST = 00:30 UTC
        ("09:30", "Asia/Seoul", "2026-11-29 00:29", "2026-11-29 00:30"),
        ("09:30", "Asia/Seoul", "2026-11-29 00:31", "2026-11-30 00:30"),
        ("09:00", "America/New_York", "2026-10-31 14:00", "2026-11-01 14:00"),  # 13:00 UTC in EDT; DST ends: 14:00
        ("00:00", "UTC", "2026-12-31 23:59", "2027-01-01 00:00"),
    ],
)
def test_next_fire_time_is_that_time_in_that_zone(tmp_path, at, zone, now, expected_utc):
    trigger = DailySummary(settings(tmp_path, at=at, zone=zone), Notifier(None)).trigger()
    fire = trigger.get_next_fire_time(None, dt.datetime.fromtimestamp(t(now), UTC))
    assert fire.astimezone(UTC) == dt.datetime.fromtimestamp(t(expected_utc), UTC)
    assert fire.strftime("%H:%M") == at  # in the zone's own wall time


def test_without_daily_summary_nothing_is_scheduled(tmp_path):
    off = DailySummary(settings(tmp_path, at=None), Notifier(None))
    off.start()
    assert off.trigger() is None and off.job is None
    off.shutdown()
    no_discord = Settings(aws=AwsSettings(region="us-east-1"))
    assert DailySummary(no_discord, Notifier(None)).trigger() is None


def record_a_day(tmp_path, end: float) -> None:
    """One failover in the last 24 h: 30 minutes on the standby."""
    book = Ledger(tmp_path, settings(tmp_path).guards)
    rules = Rules(standbys=(SB,))
    world = lambda sb, spot=SPOT: Observed(spots=(Instance(spot, "running"),), standbys=(Instance(SB, sb),))  # noqa: E731
    tell = Told(book, rules)
    tell.event("inference", world("stopped"), end - 30 * H)
    tell.event("inference", Notice(SPOT), end - 10 * H)
    book.transition("inference", GuardState(rules), GuardState(rules, phase=Phase.STANDBY_STARTING), end - 10 * H)
    book.action("inference", Start(SB), None, 0.1, end - 10 * H)
    tell.event("inference", world("running", "i-00000000000000002"), end - 9.75 * H)
    book.action("inference", Stop(SB), None, 0.1, end - 9.5 * H)


async def test_the_job_posts_each_guards_summary_through_the_notifier(tmp_path):
    end = t("2026-11-29 00:30")
    record_a_day(tmp_path, end)
    with CaptureServer() as discord:
        notifier = Notifier(discord.url + "/api/webhooks/1/token", timeout=2.0)
        await notifier.start()
        daily = DailySummary(settings(tmp_path, url=discord.url + "/api/webhooks/1/token"), notifier,
                             clock=lambda: end)
        daily.start()
        try:
            job = daily.job
            assert job.next_run_time.strftime("%H:%M %Z") == "09:30 KST"
            await job.func()  # what the scheduler runs at 09:30: the job itself, triggered now
        finally:
            daily.shutdown()
        await until(lambda: discord.requests, timeout=5.0)
        await notifier.close()
        (request,) = discord.requests
    assert request.json["content"] == (
        "[inference] daily summary, 24 h to 2026-11-29 09:30 KST: 1 interruption; standby ran 30m On-Demand; "
        "est. cost $7.70, saving $16.30 against On-Demand all day"
    )
    assert daily.job is None


async def test_a_guard_whose_ledger_cannot_be_read_does_not_stop_the_others(tmp_path):
    s = settings(tmp_path)
    two = Settings(aws=s.aws, daemon=s.daemon, discord=s.discord,
                   guards=(GuardSettings(name="broken", target_group_arn="arn:y"),) + s.guards)
    (tmp_path / "broken.ledger.jsonl").mkdir()  # a directory where the file should be: IsADirectoryError
    with CaptureServer() as discord, capture_logs() as logs:
        notifier = Notifier(discord.url + "/api/webhooks/1/token", timeout=2.0)
        await notifier.start()
        await DailySummary(two, notifier, clock=lambda: t("2026-11-29 00:30")).send()
        await notifier.close(deadline=5.0)
        sent = [r.json["content"] for r in discord.requests]
    assert len(sent) == 1 and sent[0].startswith("[inference]")
    assert [e["guard"] for e in logs if e["event"] == "summary.failed"] == ["broken"]


async def test_a_follower_sends_nothing(tmp_path):
    with capture_logs() as logs:
        await DailySummary(settings(tmp_path), Notifier(None), leading=lambda: False).send()
    assert [e["event"] for e in logs] == ["summary.skipped"]



def test_the_days_ready_margins_are_in_the_summary():
    text = summary_text("g", 2, est(standby=0.5), UNTIL, margins=[31.0, -4.0])
    assert ("2 interruptions; standby ran 30m On-Demand; ready margin min -4s, median +14s (standby healthy "
            "before the spot was reclaimed); est. cost") in text
