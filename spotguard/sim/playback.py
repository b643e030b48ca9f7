"""Replay a real spot trace through the machine: what each policy costs and how long the service is down.

A trace's 1 → 0 step is an interruption (its notice `NOTICE` seconds before) and
its 0 → 1 step the request fulfilled again: `script` turns that into a sim
`Script`, and `replay` plays it three ways on the same trace: `spotguard` (the
machine with one stopped standby), `no_standby` (the same daemon with no
standby: service again only once a new spot is healthy) and `on_demand` (no spot
at all). The timing model is the sim world's (boot, warm-up, health checks,
draining), which the lab's balancer shares.

This module must not do I/O or read a clock: the command prints, this computes.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from spotguard import defaults
from spotguard.machine import Phase, Rules
from spotguard.sim.world import Interrupt, Rebalance, Script, Timing, run
from spotguard.sim.world import Trace as SimTrace
from spotguard.timing import health_check_seconds
from spotguard.traces import Trace, TraceError

POLICIES = ("spotguard", "no_standby", "on_demand")
STANDBY = "i-standby"
HOURS_PER_MONTH = 730  # AWS prices a month as 730 hours


@dataclass(frozen=True)
class Numbers:
    """The user's numbers (seconds unless named otherwise); the defaults are AWS's own where AWS has one."""

    boot: int = 20  # StartInstances → running (a stopped EBS-backed instance)
    warm_up: int = 60  # running → the service answers its health check: the model load
    health_interval: int = 30  # HealthCheckIntervalSeconds (AWS default)
    healthy_threshold: int = 5  # HealthyThresholdCount (AWS default)
    unhealthy_threshold: int = 2  # UnhealthyThresholdCount (AWS default)
    deregistration_delay: int = 300  # deregistration_delay.timeout_seconds (AWS default)
    poll_interval: float = defaults.POLL_INTERVAL
    failback_grace: float = defaults.FAILBACK_GRACE
    standby_ready_timeout: float = defaults.STANDBY_READY_TIMEOUT
    on_rebalance: str = defaults.ON_REBALANCE
    rebalance_hold: float = defaults.REBALANCE_HOLD
    rebalance_lead: int = 0  # a rebalance recommendation this long before each notice (0: none)
    register_when: str = defaults.REGISTER_WHEN
    detect: str = "events"  # events: EventBridge/agent, ~1 s | poll: only the poll sees the notice
    on_demand_hourly: float | None = None
    spot_hourly: float | None = None

    def rules(self) -> Rules:
        """The machine's rules for the simulated guard: one standby, the user's settings."""
        return Rules(standbys=(STANDBY,), failback_grace=self.failback_grace,
                     standby_ready_timeout=self.standby_ready_timeout, on_rebalance=self.on_rebalance,
                     rebalance_hold=self.rebalance_hold, poll_interval=self.poll_interval,
                     register_when=self.register_when)


NOTICE = Timing.notice_period
DELIVERY = 1  # seconds from the notice to the daemon by EventBridge → SQS or the agent


@dataclass(frozen=True)
class Outcome:
    """One policy on one trace."""

    spot_seconds: float
    on_demand_seconds: float
    outage_seconds: float
    cost_per_month: float | None
    margins: tuple[float, ...] = ()  # per interruption: standby healthy → spot reclaimed (negative: late)


@dataclass(frozen=True)
class Replay:
    trace: str
    seconds: float  # replayed: from the first moment a spot runs to the end of the trace
    interruptions: int
    policies: dict[str, Outcome]

    @property
    def hours(self) -> float:
        return self.seconds / 3600


@dataclass(frozen=True)
class Cut:
    """One interruption of a trace, in seconds from the trace's first running spot."""

    notice: int
    refill: int | None  # reclaimed → the request fulfilled again (the world's Interrupt.refill); None: never
    rebalance: int | None = None  # when a rebalance recommendation came (on_rebalance = prewarm)

    @property
    def first(self) -> int:
        return self.notice if self.rebalance is None else self.rebalance


def timing(numbers: Numbers) -> Timing:
    return Timing(boot=numbers.boot, warmup=numbers.warm_up, check_interval=numbers.health_interval,
                  dereg_delay=numbers.deregistration_delay, unhealthy_threshold=numbers.unhealthy_threshold,
                  healthy_threshold=numbers.healthy_threshold)


def cuts(trace: Trace, numbers: Numbers) -> tuple[list[Cut], int]:
    """The interruptions of `trace` and its length, both from its first running spot.

    A gap shorter than the world needs (shutdown + boot of the new spot) is stretched
    to it, and a notice never comes before the spot it is for runs.
    """
    if max(value for value, _ in trace.runs) > 1:
        raise TraceError(f"{trace.name}: simulate replays 1-node traces (values 0 and 1); this one has more")
    steps = list(trace.steps())
    first = next((at for at, value in steps if value >= 1), None)
    if first is None:
        raise TraceError(f"{trace.name}: no spot ever runs in this trace: nothing to replay")
    t = timing(numbers)
    out: list[Cut] = []
    back = 0.0  # when the world's current spot runs
    rel = [(round(at - first), value) for at, value in steps if at >= first]
    for i, (at, value) in enumerate(rel):
        if value != 0:
            continue
        notice = int(max(at - NOTICE, back))
        reclaimed = notice + NOTICE
        up = rel[i + 1][0] if i + 1 < len(rel) else None
        refill = None if up is None else max(0, up - reclaimed - t.shutdown - t.boot)
        rebalance = None
        if numbers.on_rebalance == "prewarm" and numbers.rebalance_lead > 0:
            rebalance = int(max(back, notice - numbers.rebalance_lead))
        out.append(Cut(notice, refill, rebalance))
        back = math.inf if refill is None else reclaimed + t.shutdown + refill + t.boot
    return out, math.ceil(trace.seconds - first)


def script(cut_list: list[Cut], end: int, numbers: Numbers) -> Script:
    """The sim script that plays `cut_list` on a fresh world until `end`, leaping over quiet time."""
    deliver = (DELIVERY,) if numbers.detect == "events" else ()
    actions: list = []
    for c in cut_list:
        if c.rebalance is not None:
            actions.append(Rebalance(c.rebalance, deliver))
        actions.append(Interrupt(c.notice, c.refill, deliver))
    return Script(timing=timing(numbers), actions=tuple(actions), poll_every=numbers.poll_interval,
                  fast_poll=True, end=end, leap=True)


def replay(trace: Trace, numbers: Numbers, cache: dict | None = None) -> Replay:
    """Every policy on `trace`; TraceError when the trace cannot be replayed.

    Played in episodes: from just before an interruption (or a run of overlapping
    ones) until the guard is back on spot alone, each on a fresh world; between
    them the spot simply runs. An episode already played (same cuts relative to
    its start: `cache`, shared across traces) is not played again, and a single
    interruption whose gap outlasts everything the failover does is the played
    episode of gap LONG, plus the rest of the gap at that episode's quiet rate.
    """
    cache = {} if cache is None else cache
    cut_list, seconds = cuts(trace, numbers)
    rules = numbers.rules()
    policies = {
        "spotguard": _policy(rules, cut_list, seconds, numbers, cache, margins=True),
        "no_standby": _policy(replace(rules, standbys=()), cut_list, seconds, numbers, cache),
        "on_demand": Outcome(0.0, seconds, 0.0, _cost(0.0, seconds, seconds, numbers)),
    }
    return Replay(trace.name, float(seconds), len(cut_list), policies)


LEAD = 10  # an episode starts at least this long before its first signal: the guard has seen its spot healthy
SETTLE = 60  # slack after the usual time the model takes to be back on spot alone
EXTEND = 600  # an episode not back on spot alone by its end plays again this much longer


@dataclass
class _Tally:
    spot: float = 0.0
    on_demand: float = 0.0
    dark: float = 0.0
    margins: tuple[float, ...] = ()

    def add(self, other: _Tally, times: float = 1.0) -> None:
        self.spot += times * other.spot
        self.on_demand += times * other.on_demand
        self.dark += times * other.dark


def _lead(numbers: Numbers) -> int:
    """How long before its first signal an episode starts: whole polls, then half of one, so a
    notice lands midway between two polls (the average case when the poll is what sees it)."""
    poll = numbers.poll_interval
    return int(math.ceil(LEAD / poll) * poll + poll // 2)


def _settled_by(cut: Cut, rules: Rules, numbers: Numbers) -> float:
    """When the guard is usually back on spot alone after `cut` (inf: the spot never returns);
    an episode that is not gets longer (EXTEND) until it is."""
    if cut.refill is None:
        return math.inf
    t = timing(numbers)
    health = health_check_seconds(t.check_interval, t.healthy_threshold, rules.register_when) + t.check_interval
    hold = rules.rebalance_hold if cut.rebalance is not None else 0
    return (cut.notice + NOTICE + t.shutdown + cut.refill + t.boot + t.warmup + health + rules.failback_grace
            + hold + t.dereg_delay + t.stop + SETTLE)


def _long(rules: Rules, numbers: Numbers) -> int:
    """A gap longer than this leaves the failover done and the world quiet well before the spot returns."""
    t = timing(numbers)
    health = t.check_interval * (t.healthy_threshold + t.unhealthy_threshold + 2)
    return int(NOTICE + t.dereg_delay + rules.standby_ready_timeout + t.boot + t.warmup + health + SETTLE)


def _policy(rules: Rules, cut_list: list[Cut], seconds: int, numbers: Numbers, cache: dict,
            margins: bool = False) -> Outcome:
    total, done, i = _Tally(), 0, 0  # `done`: trace seconds accounted for
    while i < len(cut_list):
        start = max(done, cut_list[i].first - _lead(numbers))
        until, part = _settled_by(cut_list[i], rules, numbers), None
        while part is None:
            j = i + 1
            while j < len(cut_list) and cut_list[j].first - _lead(numbers) < until:
                until = max(until, _settled_by(cut_list[j], rules, numbers))
                j += 1
            end = int(min(until, seconds))
            shifted = [Cut(c.notice - start, c.refill, None if c.rebalance is None else c.rebalance - start)
                       for c in cut_list[i:j]]
            part = _episode(rules, shifted, end - start, numbers, cache, settle=end < seconds)
            until = end + EXTEND
        total.spot += start - done  # the spot alone ran until this episode
        total.add(part)
        total.margins += part.margins
        done, i = end, j
    total.spot += seconds - done
    cost = _cost(total.spot, total.on_demand, seconds, numbers)
    return Outcome(total.spot, total.on_demand, total.dark, cost, total.margins if margins else ())


def _episode(rules: Rules, shifted: list[Cut], end: int, numbers: Numbers, cache: dict,
             settle: bool) -> _Tally | None:
    """One episode on a fresh world, its long gaps cut to LONG and added back at the quiet rate;
    None when it should have settled (`settle`) and did not."""
    long, t = _long(rules, numbers), timing(numbers)
    short: list[Cut] = []
    shift = 0  # seconds of long gaps cut so far
    for c in shifted:
        c = Cut(c.notice - shift, c.refill, None if c.rebalance is None else c.rebalance - shift)
        back = None if c.refill is None else c.notice + NOTICE + t.shutdown + c.refill + t.boot
        if back is not None and back <= end - shift and c.refill > long:
            shift += c.refill - long
            c = replace(c, refill=long)
        short.append(c)
    played = _played(rules, short, end - shift, numbers, cache, settle)
    if played is None:
        return None
    out = _Tally()
    out.add(played)
    out.margins = played.margins
    if shift:
        out.add(_quiet_rate(rules, numbers, cache), shift)
    return out


def _quiet_rate(rules: Rules, numbers: Numbers, cache: dict) -> _Tally:
    """What one more second of a long gap adds: the standby's bill, or the outage without one."""
    long = _long(rules, numbers)
    cut = Cut(_lead(numbers), long)
    end = int(_settled_by(cut, rules, numbers)) + EXTEND
    base = _played(rules, [cut], end, numbers, cache, False)
    more = _played(rules, [replace(cut, refill=long + 1)], end + 1, numbers, cache, False)
    return _Tally(more.spot - base.spot, more.on_demand - base.on_demand, more.dark - base.dark)


def _played(rules: Rules, shifted: list[Cut], end: int, numbers: Numbers, cache: dict,
            settle: bool) -> _Tally | None:
    play = script(shifted, end, numbers)
    key = (rules, play)
    if key not in cache:
        cache[key] = _tally(run(rules, play), settle)
    return cache[key]


def _tally(played: SimTrace, settle: bool) -> _Tally | None:
    if played.error is not None:
        raise played.error
    if settle and not _on_spot_alone(played):
        return None
    od = sum(s for iid, s in played.running if iid == STANDBY)
    spot = sum(s for iid, s in played.running if iid != STANDBY)
    return _Tally(spot, od, played.dark, ready_margins(played.log))


def _on_spot_alone(played: SimTrace) -> bool:
    world = played.world
    standby = world.instance(STANDBY)
    return (played.final.phase is Phase.SPOT_HEALTHY and world.spot in world.healthy()
            and (standby is None or standby.state == "stopped"))


def _cost(spot: float, on_demand: float, seconds: float, numbers: Numbers) -> float | None:
    """USD per 730-hour month at the replayed rate, or None without both prices."""
    if numbers.on_demand_hourly is None or numbers.spot_hourly is None or seconds <= 0:
        return None
    dollars = (spot * numbers.spot_hourly + on_demand * numbers.on_demand_hourly) / 3600
    return dollars / (seconds / 3600) * HOURS_PER_MONTH


def ready_margins(log: tuple[tuple[float, str, str], ...]) -> tuple[float, ...]:
    """For each reclaimed spot: seconds from the standby turning healthy to the spot reclaimed.

    Positive when the standby was healthy first (counted from when that healthy spell
    began), negative when it turned healthy only after; no margin when it never did
    before the next spot was reclaimed.
    """
    out: list[float] = []
    healthy_since: float | None = None
    waiting: list[float] = []  # reclaimed before the standby was healthy
    for t, what, iid in log:
        if iid == STANDBY and what == "healthy":
            healthy_since = t
            out += [w - t for w in waiting]
            waiting = []
        elif iid == STANDBY:
            healthy_since = None
        elif what == "reclaimed":
            if healthy_since is not None:
                out.append(t - healthy_since)
            else:
                waiting = [t]
    return tuple(out)


def margin_summary(margins: tuple[float, ...]) -> dict[str, float | None]:
    return {"min": min(margins) if margins else None,
            "median": statistics.median(margins) if margins else None}
