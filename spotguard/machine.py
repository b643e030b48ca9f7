"""The guard's state machine: every failover and failback rule, and nothing else.

`step(state, event, now)` takes one guard's state, one event and the current
time (passed in) and returns the new state and the commands to carry out. It
is level-triggered: decisions come from the latest observation plus
remembered notices, so a missed or repeated event is corrected by the next
observation. Deregister and Stop are decided only on an observation; a notice
or a failure, decided on a possibly stale view, may only start and register.
The last section answers the questions the shell asks (poll cadence, steady
guards, invariant 1), so no rule lives anywhere else.

This module must not do I/O, read a clock, or import asyncio, boto, structlog
or anything else with side effects.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, TypeVar

from spotguard import defaults

_D = TypeVar("_D")


def replace(obj: _D, /, **changes: Any) -> _D:
    """`obj` with `changes`: dataclasses.replace without re-running __init__, which was most of
    a step's time (the classes here validate nothing in __init__). Unknown names are refused."""
    unknown = changes.keys() - obj.__dataclass_fields__.keys()
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field {', '.join(sorted(unknown))}")
    copy = object.__new__(type(obj))
    copy.__dict__.update(obj.__dict__, **changes)
    return copy


# --------------------------------------------------------------------------- phases


class Phase(str, enum.Enum):
    SPOT_HEALTHY = "spot-healthy"
    STANDBY_STARTING = "standby-starting"
    BOTH_SERVING = "both-serving"
    SPOT_RESTORED = "spot-restored"
    STANDBY_DRAINING = "standby-draining"


# EC2 instance states in which an instance serves (or will).
LIVE_STATES = frozenset({"pending", "running"})
# States of an instance that will never serve again (`missing`: EC2 does not know the id).
GONE_STATES = frozenset({"shutting-down", "terminated", "missing"})
# ELBv2 target health states. A target absent from DescribeTargetHealth is not registered.
HEALTHY = "healthy"
DRAINING = "draining"
UNUSED = "unused"

# The readiness probe's verdicts on an instance's health check (sources/probe.py).
READY = "ready"  # it passed: registered now, the target is healthy after one check
WAITING = "waiting"  # it answered, not yet with success (refused, another status code, too slow)
SILENT = "silent"  # no answer at all yet: still booting, or no route from here
# A running instance still silent this long after launch is registered anyway: the
# probe cannot reach it (security group, routing), and the balancer may.
SILENT_FALLBACK = 60.0

# Re-issue StartInstances if the standby still shows `stopped` this long after the last try.
START_RETRY = 15.0
# When every standby failed, wait this long (doubling, capped) before trying the first again.
RETRY_BASE = 30.0
RETRY_CAP = 300.0


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Instance:
    """One EC2 instance as observed. `state` is the EC2 state name, or `missing`."""

    id: str
    state: str
    notice: bool = False  # spot request status says interruption (marked-for-*, instance-terminated-*)
    # Facts about the instance, not its state: two looks that differ only in these are the same.
    address: str | None = field(default=None, compare=False)  # private IPv4: where the readiness probe knocks
    launched: float | None = field(default=None, compare=False)  # EC2 LaunchTime (the last start), caller's clock
    probe: str | None = SILENT  # the readiness probe's verdict (READY, WAITING, SILENT) or None: cannot probe


@dataclass(frozen=True)
class Target:
    """One registered target of the guard's target group and its health state."""

    id: str
    health: str  # initial | healthy | unhealthy | unused | draining | unavailable


@dataclass(frozen=True)
class Observed:
    """A snapshot of the guard's world, taken by the poll source."""

    spots: tuple[Instance, ...] = ()  # the guard's current spot instances
    standbys: tuple[Instance, ...] = ()  # the guard's standbys, in config order
    targets: tuple[Target, ...] = ()  # every registered target of the target group
    target_group_gone: bool = False  # AWS says the target group does not exist
    requests_gone: tuple[str, ...] = ()  # spot request ids AWS does not know (cancelled, deleted)
    # Instances another guard owns (its spots, its standbys): never started, stopped,
    # registered or deregistered by this guard, whatever its config says. `disputed`
    # are those this guard claims itself (a standby that is a spot, a spot found by
    # an earlier guard's tags too): said once, then left alone.
    foreign: frozenset[str] = frozenset()
    disputed: frozenset[str] = frozenset()
    # Standbys `spotguard rehearse` is running now: not strays (no phase change, no alert),
    # but still a warm standby a real failover may take over.
    rehearsing: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Notice:
    """An interruption or rebalance notice for one instance (SQS, agent or poll)."""

    instance_id: str
    # interruption | rebalance | terminating (Auto Scaling is about to terminate it: an early notice)
    # | ready (the agent on the instance says it passes its own health check)
    kind: str = "interruption"
    # When EC2 reclaims the instance (epoch seconds), when the source says (IMDS instance-action
    # time, an EventBridge warning's time + NOTICE); None: NOTICE after it is heard.
    deadline: float | None = None


# Notices that doom a spot: it goes soon, and its replacement must be healthy first.
DOOMING = frozenset({"interruption", "terminating"})
# An interruption notice → the instance is reclaimed (EC2's two minutes, best effort).
NOTICE = 120.0


@dataclass(frozen=True)
class Scheduled:
    """An AWS Health scheduled change (retirement, maintenance, reboot, stop) for one instance."""

    instance_id: str
    code: str  # AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED, ...
    window: str  # when, as the event said it
    status: str = "upcoming"  # upcoming | open | closed
    kind: ClassVar[str] = "scheduled"  # as a Notice's, for the logs that name what was heard


Heard = Notice | Scheduled  # what the fast sources hand in, for one instance


@dataclass(frozen=True)
class Failed:
    """A command the executor could not carry out, with the AWS error code."""

    command: "Command"
    code: str


Event = Observed | Notice | Scheduled | Failed


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Start:
    instance_id: str


@dataclass(frozen=True)
class Stop:
    instance_id: str


@dataclass(frozen=True)
class Register:
    instance_id: str


@dataclass(frozen=True)
class Deregister:
    instance_id: str


@dataclass(frozen=True)
class Alert:
    """Something a person must hear about (no capacity, standby never healthy)."""

    text: str


Command = Start | Stop | Register | Deregister | Alert


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Rules:
    """The guard's settings that the rules read (durations in seconds)."""

    standbys: tuple[str, ...]
    failback_grace: float = defaults.FAILBACK_GRACE
    standby_ready_timeout: float = defaults.STANDBY_READY_TIMEOUT
    unhealthy_grace: float = defaults.UNHEALTHY_GRACE
    on_rebalance: str = defaults.ON_REBALANCE  # ignore | prewarm
    rebalance_hold: float = defaults.REBALANCE_HOLD
    poll_interval: float = defaults.POLL_INTERVAL  # how often the guard is observed when steady
    register_when: str = defaults.REGISTER_WHEN  # ready (its health check passes) | running
    capacity: int | None = None  # spot positions kept serving; None: the live spots first seen (GuardState.learned)
    late_warning: float = defaults.LATE_WARNING  # standby not healthy this long before a spot's deadline: said
    # The replacement late: a doomed spot leaves the target group this long before its deadline when
    # another target is healthy (a fleet), so requests drain from it instead of failing on it.
    deregister_ahead: float = defaults.DEREGISTER_AHEAD


@dataclass(frozen=True)
class GuardState:
    rules: Rules
    phase: Phase = Phase.SPOT_HEALTHY
    since: float = 0.0  # when the phase was entered
    reason: str = "initial"  # why the phase was entered
    standby: str | None = None  # the standby this failover uses
    started_at: float | None = None  # when this standby was first asked to serve
    start_sent: float | None = None  # when StartInstances was last sent for it
    failed: frozenset[str] = frozenset()  # standbys given up on in this failover
    doomed: frozenset[str] = frozenset()  # spot instances with an interruption notice
    deadlines: tuple[tuple[str, float], ...] = ()  # (doomed spot, when EC2 reclaims it), in notice order
    warned: frozenset[str] = frozenset()  # doomed spots whose late replacement was said (once each)
    flagged: frozenset[str] = frozenset()  # of those, the ones the poll saw the request flag
    rebalanced: frozenset[str] = frozenset()  # spot instances with a rebalance recommendation
    unhealthy_since: float | None = None  # spot target first seen not healthy
    prewarm_at: float | None = None  # failover began on a rebalance recommendation
    retry_at: float | None = None  # every standby failed: try again then
    retries: int = 0
    outage_since: float | None = None  # no healthy target in the group since then
    watched: float | None = None  # when the last observation was stepped
    stray: bool = False  # the standby runs outside a failover (a person, a crash): drained after the grace
    ready: frozenset[str] = frozenset()  # live instances whose agent said they pass their health check
    unprobed: frozenset[str] = frozenset()  # live instances registered before they were seen ready (said once)
    learned: int = 0  # without Rules.capacity: the live spots of the first observation that had any
    short_said: int = 0  # lost spots no standby covers, as last said
    # A fleet (capacity above one) runs one slot per spot position: each a GuardState of its own,
    # stepped by the same rules; the guard's phase, standby... then summarise them (see Fleets).
    slots: tuple["GuardState", ...] = ()
    holds: tuple[str, ...] | None = None  # in a slot: the spot instances it holds; None: not a slot
    seen: Observed | None = None  # latest observation; never persisted


# EC2 errors on StartInstances that mean this standby cannot serve now: try the next one.
GIVE_UP_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        "InvalidInstanceID.NotFound",
        "InvalidInstanceID.Malformed",
        "UnauthorizedOperation",
        "UnsupportedOperation",
    }
)

Result = tuple[GuardState, tuple[Command, ...]]


# --------------------------------------------------------------------------- step


def step(state: GuardState, event: Event, now: float) -> Result:
    """Apply one event at time `now`; return the new state and the commands to run."""
    state = _learn(state, event)
    if state.slots or capacity(state) > 1:
        return _step_fleet(state, event, now)
    before = state.seen
    state, absorbed, decided = _step_one(state, event, now)
    if isinstance(event, Observed):
        absorbed += _losses(before, event)
    if decided is None:
        return state, absorbed
    return _watch_guard(state, event, now, absorbed + decided)


def _step_one(state: GuardState, event: Event, now: float) -> tuple[GuardState, tuple[Command, ...], tuple | None]:
    """One guard's or one slot's rules: (state, what absorbing the event said, what was decided or
    None when the event changed nothing worth deciding on)."""
    state = _rebase(state, now)
    if isinstance(event, Observed):
        state = _watch(state, now)
    state, changed, absorbed = _absorb(state, event, now)
    if not changed or state.seen is None or state.seen.target_group_gone:
        return state, absorbed, None
    state, decided = _DECIDE[state.phase](state, now)
    state, late = _warn_late(state, now)
    decided = _own(state, decided) + late
    if not isinstance(event, Observed):
        # A notice or a failure is decided on the last observation, which may be
        # old (a poll outage) or already overtaken by our own commands. Starting and
        # registering on it is safe; deregistering and stopping waits for the next
        # observation, which re-derives them (every command is level-triggered).
        decided = tuple(c for c in decided if not isinstance(c, (Deregister, Stop)))
    return state, absorbed, decided


def _watch_guard(state: GuardState, event: Event, now: float, commands: tuple[Command, ...]) -> Result:
    """What only the whole guard can say: capacity short, and (on an observation) an outage."""
    state, short = _warn_short(state)
    if not isinstance(event, Observed):
        return state, commands + short
    state, outage = _watch_outage(state, now)
    return state, commands + short + outage


def _learn(state: GuardState, event: Event) -> GuardState:
    """Without a configured capacity, the guard keeps the live spots of its first observation that had any."""
    if state.rules.capacity is not None or state.learned or not isinstance(event, Observed):
        return state
    return replace(state, learned=sum(1 for i in event.spots if i.state in LIVE_STATES))


def _warn_late(state: GuardState, now: float) -> Result:
    """Say once per notice when the replacement is not healthy `late_warning` before the spot dies."""
    if state.phase is not Phase.STANDBY_STARTING:
        return state, ()
    due = [(iid, d) for iid, d in state.deadlines
           if iid in state.doomed and iid not in state.warned and d - now <= state.rules.late_warning]
    if not due:
        return state, ()
    who = f"standby {state.standby}" if state.standby else "no standby"
    alerts = tuple(Alert(f"{who} not healthy {max(0.0, d - now):.0f}s before spot {iid} dies: the service may "
                         "go down with it") for iid, d in due)
    return replace(state, warned=state.warned | {iid for iid, _ in due}), alerts


def _warn_short(state: GuardState) -> Result:
    """Say once (and again if it grows) when more spots are lost than free standbys cover."""
    uncovered = _uncovered(state)
    if uncovered <= state.short_said:
        return (state if uncovered == state.short_said else replace(state, short_said=uncovered)), ()
    live = sum(1 for i in state.seen.spots if i.state in LIVE_STATES and i.id not in state.doomed)
    alert = Alert(f"capacity short by {uncovered}: {live} of {capacity(state)} spot instances running and no "
                  f"free standby to cover {'it' if uncovered == 1 else 'them'}")
    return replace(state, short_said=uncovered), (alert,)


def _uncovered(state: GuardState) -> int:
    """Spot positions lost that no standby is covering."""
    if not state.slots:
        return max(0, _short(state) - (0 if state.phase is Phase.SPOT_HEALTHY else 1))
    return sum(1 for s in state.slots if s.standby is None and s.seen is not None and _short(s) > 0)


def _own(state: GuardState, commands: tuple[Command, ...]) -> tuple[Command, ...]:
    """The last word on ownership: no command ever names an instance another guard owns."""
    foreign = state.seen.foreign
    return tuple(c for c in commands if isinstance(c, Alert) or c.instance_id not in foreign)


def _watch_outage(state: GuardState, now: float) -> Result:
    """Say loudly when the target group has no healthy target, and when it has one again."""
    up = any(t.health == HEALTHY for t in state.seen.targets)
    if not up and state.outage_since is None:
        alert = Alert("no healthy target in the target group: the service is down")
        return replace(state, outage_since=now), (alert,)
    if up and state.outage_since is not None:
        alert = Alert(f"service back: a healthy target again after {now - state.outage_since:.0f}s without one")
        return replace(state, outage_since=None), (alert,)
    return state, ()


def _rebase(state: GuardState, now: float) -> GuardState:
    """Move every remembered time back when the clock has stepped back past them.

    Timers then count from the step instead of waiting out its length (an hour
    back must not mean an hour more of On-Demand). A step forward needs nothing:
    timers fire early, and every rule is safe whenever it fires.
    """
    marks = (state.since, state.started_at, state.start_sent, state.unhealthy_since, state.prewarm_at,
             state.outage_since, state.watched)
    latest = max(t for t in marks if t is not None)
    if now >= latest:
        return state
    back = now - latest

    def moved(t: float | None) -> float | None:
        return None if t is None else t + back

    return replace(
        state,
        since=state.since + back,
        started_at=moved(state.started_at),
        start_sent=moved(state.start_sent),
        unhealthy_since=moved(state.unhealthy_since),
        prewarm_at=moved(state.prewarm_at),
        outage_since=moved(state.outage_since),
        retry_at=moved(state.retry_at),
        watched=moved(state.watched),
    )


def _watch(state: GuardState, now: float) -> GuardState:
    """Timers count only the time the guard was watched.

    An observation long after the one before (the daemon frozen, stopped, or
    blind to AWS) moves the timers that give something a chance forward by the
    time nobody looked: a standby that booted meanwhile is registered and
    given its health check rather than given up on, and an unhealthy spot gets
    its whole grace. Phase times (`since`) and the outage clock stay as they
    were: they say what happened, for people.
    """
    last, state = state.watched, replace(state, watched=now)
    lost = 0.0 if last is None else now - last - watch_gap(state.rules)
    if lost <= 0:
        return state

    def later(t: float | None) -> float | None:
        # A mark set while nobody looked (a notice stepped during the gap) moves to now, not past it.
        return None if t is None else min(now, t + lost)

    return replace(
        state,
        started_at=later(state.started_at),
        unhealthy_since=later(state.unhealthy_since),
        prewarm_at=later(state.prewarm_at),
        retry_at=None if state.retry_at is None else state.retry_at + lost,  # a due time, not a mark
    )


def _losses(before: Observed | None, seen: Observed) -> tuple[Command, ...]:
    """One alert per configured resource that this observation first shows gone.

    Compared with the previous observation (never persisted), so a loss is said
    once per daemon start, not on every poll.
    """
    had = _lost(before) if before is not None else {}
    return tuple(Alert(text) for key, text in _lost(seen).items() if key not in had)


def _lost(seen: Observed) -> dict[str, str]:
    lost = {}
    if seen.target_group_gone:
        lost["target-group"] = "the target group is gone (deleted?): nothing can serve; no action until it is back"
    for rid in seen.requests_gone:
        lost[rid] = f"spot request {rid} is gone (cancelled?): its spot is no longer seen; fix spot_request_ids"
    for i in seen.standbys:
        if i.state in GONE_STATES:
            lost[i.id] = f"standby {i.id} is {i.state} (terminated?): it cannot serve; fix standby_instance_ids"
    for iid in sorted(seen.disputed):
        what = "standby" if iid in {i.id for i in seen.standbys} else "spot"
        lost[f"disputed {iid}"] = (f"{what} {iid} belongs to another guard (a spot there, or found by its tags "
                                   "first): this guard never touches it; fix the config")
    return lost


def _absorb(state: GuardState, event: Event, now: float) -> tuple[GuardState, bool, tuple[Command, ...]]:
    """Record what the event says about the world. Returns (state, changed, commands)."""
    if isinstance(event, Observed):
        return _observe(state, event, now), True, ()
    if isinstance(event, Notice):
        return _notice(state, event, now)
    if isinstance(event, Scheduled):
        return state, False, _scheduled(state, event)
    return _failed(state, event, now)


def _observe(state: GuardState, seen: Observed, now: float) -> GuardState:
    # Notices are forgotten once the instance is neither a spot of ours nor a target:
    # nothing can be done about it any more, and the state stays small.
    known = {i.id for i in seen.spots} | {t.id for t in seen.targets}
    flagged = {i.id for i in seen.spots if i.notice}
    # A notice is carried out once its spot is seen leaving (stopping, shutting down
    # or gone). One with stop/hibernate behaviour may be started again with the
    # same id: then it is a good spot, not a doomed one.
    left = {i.id for i in seen.spots if i.state not in LIVE_STATES}
    # ... and so is one whose request the poll flagged and now shows live and unflagged
    # again (restarted under the same id while nobody looked).
    cleared = {i.id for i in seen.spots if i.id in state.flagged and i.state in LIVE_STATES and not i.notice}
    state = _doom(state, flagged, now + NOTICE)
    over = left | cleared
    # Readiness belongs to one boot: forgotten once the instance is seen not live.
    live = {i.id for i in seen.spots + seen.standbys if i.state in LIVE_STATES}
    doomed = frozenset(state.doomed & known - over)
    # A reclaimed spot's deadline stays while its replacement is still coming: the ready
    # margin (negative) is told when the replacement is healthy; the next phase forgets it.
    coming = state.phase is Phase.STANDBY_STARTING
    deadlines = tuple(d for d in state.deadlines if d[0] in doomed or coming)
    return replace(
        state,
        seen=seen,
        doomed=doomed,
        deadlines=deadlines,
        warned=state.warned & doomed,
        flagged=frozenset((state.flagged | flagged) & known - over),
        rebalanced=frozenset(state.rebalanced & known),
        ready=frozenset(state.ready & live),
        unprobed=frozenset(state.unprobed & live),
    )


def _doom(state: GuardState, ids: set[str] | frozenset[str], deadline: float | None = None) -> GuardState:
    """Remember interruption notices and their deadlines; a real one turns a prewarm into a failover.

    A notice without a deadline of its own (the poll's flag, an early Auto Scaling notice)
    counts NOTICE from when it is heard: `deadline` is then that, from the caller's `now`.
    """
    new = set(ids) - state.doomed
    if not new:
        return state
    known = {iid for iid, _ in state.deadlines}
    added = tuple((iid, deadline) for iid in sorted(new) if iid not in known and deadline is not None)
    return replace(state, doomed=state.doomed | new, deadlines=state.deadlines + added, prewarm_at=None)


def _notice(state: GuardState, notice: Notice, now: float) -> tuple[GuardState, bool, tuple[Command, ...]]:
    iid = notice.instance_id
    if notice.kind == READY:
        if iid in state.ready:
            return state, False, ()
        return replace(state, ready=state.ready | {iid}), True, ()
    if iid in state.rules.standbys:
        return state, False, ()  # On-Demand standbys are never interrupted
    if notice.kind in DOOMING:
        if iid in state.doomed and notice.deadline is not None:
            return _deadline(state, iid, notice.deadline), False, ()  # the source's own time beats NOTICE
        if iid in state.doomed or _seen_leaving(state, iid):
            return state, False, ()  # known, or late: the spot is already going or gone
        return _doom(state, {iid}, notice.deadline if notice.deadline is not None else now + NOTICE), True, ()
    if iid in state.rebalanced or iid in state.doomed:
        return state, False, ()
    state = replace(state, rebalanced=state.rebalanced | {iid})
    if state.rules.on_rebalance != "prewarm":
        return state, False, (Alert(f"rebalance recommendation for spot {iid}; on_rebalance=ignore, no action"),)
    ours = state.seen is None or any(i.id == iid and i.state in LIVE_STATES for i in state.seen.spots)
    if state.phase is not Phase.SPOT_HEALTHY or not ours:
        return state, False, ()  # a standby is already up or coming up, or not our spot
    # Armed here, once per recommendation: spot-healthy reads it and clears it on the way back.
    return replace(state, prewarm_at=now), True, ()


# What a scheduled change (AWS Health, DescribeInstanceStatus) means for a guard's instance;
# `check` says the same. Nothing is done about it: a spot's own notice or loss starts the failover.
SCHEDULED_ADVICE = {
    "standby": "it may not start for a failover then: see its scheduled events in the EC2 console, and "
               "replace it in standby_instance_ids if it cannot serve",
    "spot": "EC2 will act on it then; spotguard fails over when its notice comes or the spot goes",
}


def _deadline(state: GuardState, iid: str, deadline: float) -> GuardState:
    deadlines = tuple((i, deadline if i == iid else d) for i, d in state.deadlines)
    if iid not in {i for i, _ in deadlines}:
        deadlines += ((iid, deadline),)
    return replace(state, deadlines=deadlines)


def _scheduled(state: GuardState, event: Scheduled) -> tuple[Command, ...]:
    """Say what a scheduled change means for an instance of this guard, unless it is over."""
    iid = event.instance_id
    if event.status == "closed":
        return ()
    if iid in _own_standbys(state):
        role = "standby"
    elif state.seen is not None and any(i.id == iid for i in state.seen.spots) and iid not in state.seen.foreign:
        role = "spot"
    else:
        return ()
    return (Alert(f"{role} {iid} has a scheduled {event.code} ({event.window}): {SCHEDULED_ADVICE[role]}"),)


def _seen_leaving(state: GuardState, iid: str) -> bool:
    return state.seen is not None and any(i.id == iid and i.state not in LIVE_STATES for i in state.seen.spots)


def _failed(state: GuardState, failed: Failed, now: float) -> tuple[GuardState, bool, tuple[Command, ...]]:
    cmd = failed.command
    # Every command is re-derived from the next observation, so most failures need
    # nothing here: only a start of the chosen standby changes the plan.
    if not (isinstance(cmd, Start) and cmd.instance_id == state.standby and state.phase is Phase.STANDBY_STARTING):
        return state, False, ()
    if failed.code not in GIVE_UP_CODES:
        return replace(state, start_sent=None), False, ()  # transient: retry on the next observation
    alert = Alert(f"standby {cmd.instance_id} could not start ({failed.code}); trying the next standby")
    state = _give_up(state, cmd.instance_id, now)
    return state, True, (alert,)


def _give_up(state: GuardState, iid: str, now: float) -> GuardState:
    return _choose(replace(state, failed=state.failed | {iid}), now, keep=False)


def _choose(state: GuardState, now: float, keep: bool = True) -> GuardState:
    """Settle on a standby (the current one if `keep` and usable) and arm its ready timer."""
    current = state.standby if keep and state.standby not in state.failed else None
    sid = current or _pick(state)
    live = sid is not None and state.seen is not None and _instance(state, sid).state in LIVE_STATES
    if sid == state.standby and state.started_at is not None:
        return state
    return replace(state, standby=sid, started_at=now if live else None, start_sent=None)


# --------------------------------------------------------------------------- views


def _health(state: GuardState, iid: str) -> str | None:
    """The target's health state, or None when it is not registered."""
    for t in state.seen.targets:
        if t.id == iid:
            return t.health
    return None


def _registered(state: GuardState, iid: str) -> bool:
    return _health(state, iid) not in (None, UNUSED, DRAINING)


def _healthy(state: GuardState, iid: str) -> bool:
    return _health(state, iid) == HEALTHY


def _up(state: GuardState, iid: str) -> bool:
    """Healthy and running: a stopping instance can still look healthy until the next check."""
    return _healthy(state, iid) and _instance(state, iid).state == "running"


def _instance(state: GuardState, iid: str) -> Instance:
    for i in state.seen.standbys + state.seen.spots:
        if i.id == iid:
            return i
    return Instance(iid, "missing")


def _live_spots(state: GuardState) -> list[Instance]:
    return [i for i in state.seen.spots if i.state in LIVE_STATES and i.id not in state.doomed]


def _healthy_spots(state: GuardState) -> list[Instance]:
    return [i for i in _live_spots(state) if _healthy(state, i.id)]


def capacity(state: GuardState) -> int:
    """The spot positions the guard keeps serving: its rules' capacity, else the spots it first saw."""
    return state.rules.capacity if state.rules.capacity is not None else max(1, state.learned)


def _short(state: GuardState) -> int:
    """Positions no live spot holds (a doomed spot holds none: it is going)."""
    return capacity(state) - len(_live_spots(state))


def _covered(state: GuardState) -> Instance | None:
    """The newest healthy spot when healthy spots fill the capacity: the spots alone serve it."""
    healthy = _healthy_spots(state)
    return healthy[-1] if healthy and len(healthy) >= capacity(state) else None


def _own_standbys(state: GuardState) -> tuple[str, ...]:
    """The configured standbys this guard may use: none that another guard owns."""
    foreign = state.seen.foreign if state.seen is not None else frozenset()
    return tuple(s for s in state.rules.standbys if s not in foreign)


def _pick(state: GuardState) -> str | None:
    """The standby to use: one already running, else the first in order not given up on."""
    usable = [s for s in _own_standbys(state) if s not in state.failed]
    if state.seen is not None:
        for sid in usable:
            if _instance(state, sid).state in LIVE_STATES:
                return sid
    return usable[0] if usable else None


# --------------------------------------------------------------------------- safe commands


def _deregister(state: GuardState, ids: list[str]) -> tuple[Command, ...]:
    """Deregister `ids`, skipping any whose removal would leave no healthy target (invariant 1)."""
    remaining = state.seen.targets
    out: list[Command] = []
    for iid in ids:
        if not _registered(state, iid) or not may_take_out(remaining, iid):
            continue
        remaining = tuple(t for t in remaining if t.id != iid)
        out.append(Deregister(iid))
    return tuple(out)


def _stop(state: GuardState, iid: str) -> tuple[Command, ...]:
    """Stop a running instance unless it is the only healthy target."""
    if _instance(state, iid).state != "running":
        return ()
    if _healthy(state, iid) and not may_take_out(state.seen.targets, iid):
        return ()
    return (Stop(iid),)


def _register_new_spots(state: GuardState, now: float) -> Result:
    return _register(state, [i.id for i in _live_spots(state)], now)


def _register(state: GuardState, ids: Iterable[str], now: float) -> Result:
    """Register those of `ids` that run, are not registered, and are ready for their first health check.

    A target that passes its first check is healthy at once; one that fails it
    needs HealthyThresholdCount passes (5 × 30 s with AWS's defaults). So an
    instance is registered once it answers its health check (the probe, or its
    agent), unless that cannot be known: then as it runs, said once per boot.
    """
    out: tuple[Command, ...] = ()
    for iid in ids:
        inst = _instance(state, iid)
        if inst.state != "running" or _registered(state, iid):
            continue
        why = _unready_because(state, inst, now)
        if why == _NOT_YET:
            continue
        if why and iid not in state.unprobed:
            state = replace(state, unprobed=state.unprobed | {iid})
            out += (Alert(f"{iid} registered without knowing it is ready: {why}; if its first health check "
                          "fails it needs HealthyThresholdCount passes (run spotguard check)"),)
        out += (Register(iid),)
    return state, out


_NOT_YET = "not yet"


def _unready_because(state: GuardState, inst: Instance, now: float) -> str:
    """'' when `inst` may be registered as ready, _NOT_YET to wait, else why it is registered unproven."""
    if state.rules.register_when == "running" or inst.id in state.ready or inst.probe == READY:
        return ""
    if inst.probe is None:
        return "its health check cannot be probed from here"
    if inst.probe == SILENT and inst.launched is not None and now - inst.launched >= SILENT_FALLBACK:
        return f"no answer to the health-check probe {now - inst.launched:.0f}s after launch"
    return _NOT_YET


def _drop_doomed(state: GuardState) -> tuple[Command, ...]:
    return _deregister(state, sorted(state.doomed))


def _drop_stopped_standbys(state: GuardState) -> tuple[Command, ...]:
    """A stopped standby left in the target group (stopped by hand, say) is taken out:
    it cannot serve, and the group should list only what can. Never a healthy target."""
    return tuple(
        Deregister(s)
        for s in _own_standbys(state)
        if _health(state, s) == UNUSED and _instance(state, s).state not in LIVE_STATES
    )


def _tidy_other_standbys(state: GuardState) -> tuple[Command, ...]:
    """Standbys other than the chosen one drain and stop (invariant: one standby at a time)."""
    out: tuple[Command, ...] = ()
    for sid in _own_standbys(state):
        if sid == state.standby or _instance(state, sid).state not in LIVE_STATES:
            continue
        # Drain it when another target is healthy; a standby that is not healthy
        # itself may be stopped straight away, even with nothing healthy to drain to.
        drain = _deregister(state, [sid]) if _registered(state, sid) else ()
        out += drain or (() if _healthy(state, sid) else _stop(state, sid))
    return out


# --------------------------------------------------------------------------- transitions


def _enter(state: GuardState, phase: Phase, now: float, reason: str, **changes) -> GuardState:
    deadlines = tuple(d for d in state.deadlines if d[0] in state.doomed)
    return replace(state, phase=phase, since=now, reason=reason, unhealthy_since=None, deadlines=deadlines,
                   **changes)


def _failover(state: GuardState, now: float, reason: str, prewarm: bool = False) -> Result:
    """Serve on a standby: go straight to both-serving if it is already healthy."""
    prewarm_at = (state.prewarm_at or now) if prewarm else None
    state = _choose(replace(state, prewarm_at=prewarm_at, started_at=None, stray=False), now)
    if state.standby and _up(state, state.standby):
        return _serve(state, now, reason)
    state = _enter(state, Phase.STANDBY_STARTING, now, reason)
    return _decide_starting(state, now)


def _serve(state: GuardState, now: float, reason: str) -> Result:
    state = _enter(state, Phase.BOTH_SERVING, now, reason, retry_at=None, retries=0)
    return _decide_serving(state, now)


# --------------------------------------------------------------------------- phases


def _decide_spot_healthy(state: GuardState, now: float) -> Result:
    if _short(state) > 0:
        return _wait_uncovered(state, now) if _none_free(state) else _failover(state, now, _why_spot_lost(state))
    if state.prewarm_at is not None:
        return _failover(state, now, "rebalance recommendation, on_rebalance=prewarm", prewarm=True)
    if _covered(state) is None:
        since = state.unhealthy_since if state.unhealthy_since is not None else now
        state = replace(state, unhealthy_since=since)
        if now - since >= state.rules.unhealthy_grace and not _none_free(state):
            return _failover(state, now, f"spot target not healthy for {now - since:.0f}s")
        return _wait_uncovered(state, now)
    state = replace(state, unhealthy_since=None)
    stray = next((s for s in _own_standbys(state)
                  if _instance(state, s).state in LIVE_STATES and s not in state.seen.rehearsing), None)
    if stray:
        # A standby running outside a failover (a crash, or a person) gets the usual
        # grace and is then drained and stopped: no forgotten On-Demand bill. Said,
        # so that nobody is surprised when spotguard stops what they started.
        alert = Alert(f"standby {stray} is running outside a failover: spotguard drains and stops it after "
                      f"failback_grace ({state.rules.failback_grace:.0f}s) unless it is taken out of "
                      "standby_instance_ids")
        state = _enter(state, Phase.SPOT_RESTORED, now, f"standby {stray} running outside a failover",
                       standby=stray, stray=True)
        state, cmds = _decide_restored(state, now)
        return state, (alert,) + cmds
    state, cmds = _register_new_spots(state, now)
    return state, cmds + _drop_doomed(state) + _drop_stopped_standbys(state)


def _none_free(state: GuardState) -> bool:
    """A fleet's slot while every standby covers another position: it waits for one to be free."""
    return state.holds is not None and not _own_standbys(state)


def _wait_uncovered(state: GuardState, now: float) -> Result:
    """Serve on what there is: new spots registered, a doomed one kept until just before its deadline."""
    state, cmds = _register_new_spots(state, now)
    return state, cmds + _drop_dying(state, now) + _drop_stopped_standbys(state)


def _why_spot_lost(state: GuardState) -> str:
    doomed = next((i for i in state.seen.spots if i.id in state.doomed and i.state in LIVE_STATES), None)
    if doomed:
        return f"interruption notice for spot {doomed.id}"
    if not _live_spots(state):
        return "no running spot instance"
    if _short(state) > 0:
        return f"{len(_live_spots(state))} of {capacity(state)} spot instances running"
    return "spot target no longer healthy"


def _decide_starting(state: GuardState, now: float) -> Result:
    # Whichever standby is up serves, even one given up on a moment ago.
    up = next((s for s in _own_standbys(state) if _up(state, s)), None)
    if up:
        return _serve(replace(state, standby=up), now, f"standby {up} healthy")
    spot = _covered(state)
    if spot and (state.prewarm_at is None or state.standby is None):
        return _abort(state, now, f"spot {spot.id} healthy again before any standby")
    if state.standby is None:
        return _all_failed(state, now)
    sid = state.standby
    inst = _instance(state, sid)
    if inst.state in GONE_STATES:
        state = _give_up(state, sid, now)
        alert = Alert(f"standby {sid} is {inst.state}; trying the next standby")
        state, cmds = _decide_starting(state, now)
        return state, (alert,) + cmds
    if state.started_at is not None and now - state.started_at >= state.rules.standby_ready_timeout:
        return _ready_timeout(state, now)
    state, cmds = _bring_up(state, inst, now)
    return state, _drop_dying(state, now) + cmds


def _drop_dying(state: GuardState, now: float) -> tuple[Command, ...]:
    """A doomed spot still serving `deregister_ahead` before its deadline leaves the group while
    another target is healthy: the balancer stops sending it requests before it dies rather
    than after failed health checks. The last healthy target stays (invariant 1)."""
    ahead = state.rules.deregister_ahead
    dying = [iid for iid, d in state.deadlines if iid in state.doomed and now >= d - ahead]
    return _deregister(state, dying)


def _abort(state: GuardState, now: float, reason: str) -> Result:
    """The spot serves again before a standby could: back to spot-healthy, whose
    stray-standby rule gives a standby still running the grace and then stops it."""
    state = _enter(state, Phase.SPOT_HEALTHY, now, reason, **_FAILOVER_RESET)
    return _decide_spot_healthy(state, now)


def _bring_up(state: GuardState, inst: Instance, now: float) -> Result:
    state, cmds = _register_new_spots(state, now)
    cmds = _tidy_other_standbys(state) + cmds
    if inst.state == "stopped":
        if state.start_sent is None or now - state.start_sent >= START_RETRY:
            started = state.started_at if state.started_at is not None else now
            state = replace(state, start_sent=now, started_at=started)
            cmds += (Start(inst.id),)
        return state, cmds
    state, more = _register(state, [inst.id], now)
    return state, cmds + more


def _ready_timeout(state: GuardState, now: float) -> Result:
    sid = state.standby
    alert = Alert(f"standby {sid} not healthy after {state.rules.standby_ready_timeout:.0f}s")
    spot = _covered(state)
    if spot:  # only a prewarm gets here with a healthy spot: it is not worth more standbys
        next_state, cmds = _abort(state, now, f"spot {spot.id} healthy; giving up the prewarm")
        return next_state, (alert,) + cmds
    if len(_own_standbys(state)) == 1:
        # No other standby to try: keep this one (it may still come up) and remind later.
        state = replace(state, started_at=now)
        next_state, cmds = _bring_up(state, _instance(state, sid), now)
        return next_state, (alert,) + cmds
    if _pick(replace(state, failed=state.failed | {sid})) is None:
        # Every other standby failed earlier; their trouble (capacity) may be over.
        state = replace(state, failed=frozenset())
    # The one given up on is now an "other" standby: _tidy_other_standbys drains and stops it.
    next_state, cmds = _decide_starting(_give_up(state, sid, now), now)
    return next_state, (alert,) + cmds


def _all_failed(state: GuardState, now: float) -> Result:
    if state.retry_at is None:
        wait = min(RETRY_CAP, RETRY_BASE * 2**state.retries)
        state = replace(state, retry_at=now + wait)
        alert = Alert(f"no standby could start; retrying in {wait:.0f}s")
        state, cmds = _register_new_spots(state, now)
        return state, (alert,) + cmds
    if now < state.retry_at:
        return _register_new_spots(state, now)
    state = replace(state, failed=frozenset(), retry_at=None, retries=state.retries + 1)
    return _decide_starting(_choose(state, now, keep=False), now)


def _decide_serving(state: GuardState, now: float) -> Result:
    sid = state.standby
    inst = _instance(state, sid)
    if inst.state not in LIVE_STATES:
        return _failover(state, now, f"standby {sid} is {inst.state}")
    state, spots = _register_new_spots(state, now)
    state, own = _register(state, [sid], now)
    # A doomed spot leaves once the standby is healthy again (one drained and re-registered is not yet).
    drop = _drop_doomed(state) if _up(state, sid) else _drop_dying(state, now)
    cmds = drop + spots + _tidy_other_standbys(state) + own
    spot = _covered(state)
    if spot and _up(state, sid):
        state = _enter(state, Phase.SPOT_RESTORED, now, f"spot {spot.id} healthy")
        state, more = _decide_restored(state, now)
        cmds += more
    return state, cmds


def _decide_restored(state: GuardState, now: float) -> Result:
    sid = state.standby
    if _covered(state) is None:
        return _failover(state, now, _why_spot_lost(state))
    if _instance(state, sid).state not in LIVE_STATES:
        return _drain(state, now, f"standby {sid} stopped outside spotguard")
    state, registers = _register_new_spots(state, now)
    cmds = _drop_doomed(state) + registers + _tidy_other_standbys(state)
    if state.prewarm_at is not None:
        due, why = state.prewarm_at + state.rules.rebalance_hold, "no interruption within rebalance_hold"
    else:
        due, why = state.since + state.rules.failback_grace, "failback_grace passed"
    if now < due:
        return state, cmds
    state, more = _drain(state, now, why)
    return state, cmds + more


def _drain(state: GuardState, now: float, reason: str) -> Result:
    state = _enter(state, Phase.STANDBY_DRAINING, now, reason)
    return _decide_draining(state, now)


def _decide_draining(state: GuardState, now: float) -> Result:
    sid = state.standby
    if _covered(state) is None:
        return _failover(state, now, _why_spot_lost(state) + " while draining")
    inst = _instance(state, sid)
    cmds = _tidy_other_standbys(state)
    if inst.state not in LIVE_STATES and inst.state != "stopping":
        state = _enter(state, Phase.SPOT_HEALTHY, now, f"standby {sid} {inst.state}", **_FAILOVER_RESET)
        return state, cmds
    if _registered(state, sid):
        return state, cmds + _deregister(state, [sid])
    if _health(state, sid) == DRAINING:
        return state, cmds
    return state, cmds + _stop(state, sid)


# What a failover remembers, forgotten when the guard is back on spot alone.
_FAILOVER_RESET = dict(
    standby=None, started_at=None, start_sent=None, failed=frozenset(), prewarm_at=None, retry_at=None, retries=0,
    stray=False,
)

_DECIDE = {
    Phase.SPOT_HEALTHY: _decide_spot_healthy,
    Phase.STANDBY_STARTING: _decide_starting,
    Phase.BOTH_SERVING: _decide_serving,
    Phase.SPOT_RESTORED: _decide_restored,
    Phase.STANDBY_DRAINING: _decide_draining,
}


def resumed(state: GuardState) -> GuardState:
    """A state read back by a new process (a restart, or a takeover with [ha]).

    Whether the dead process's last StartInstances left it is unknown, so the
    start may be sent again at once rather than START_RETRY later: starting a
    pending or running standby is a no-op, and only a stopped one is started.
    """
    return replace(state, start_sent=None, slots=tuple(resumed(s) for s in state.slots))


def initial(rules: Rules, now: float = 0.0) -> GuardState:
    """A guard that has not yet seen the world: it starts in spot-healthy and observes."""
    return GuardState(rules=rules, phase=INITIAL_PHASE, since=now)


# --------------------------------------------------------------------------- fleets
# A guard that keeps more than one spot position serving runs one slot per position. A slot is
# a one-spot GuardState stepped by the rules above, unchanged: it sees the spots it holds, its
# own standby, the free standbys and the whole target group; what other slots hold is foreign
# to it, as another guard's instances are. The guard assigns spots to slots, steps the slots in
# turn (so two never take the same standby), keeps invariant 1 across their commands, and says
# what only the whole guard knows (losses, capacity short, outage).

# Which slot lacking a live spot takes a new one (lowest first): a position no standby covers,
# then one whose standby is not yet healthy (it serves nothing), then a serving one.
_CLAIM = {Phase.SPOT_HEALTHY: 0, Phase.STANDBY_STARTING: 1, Phase.BOTH_SERVING: 2}
# The guard's own phase is its most urgent slot's.
_URGENCY = (Phase.STANDBY_STARTING, Phase.BOTH_SERVING, Phase.STANDBY_DRAINING, Phase.SPOT_RESTORED,
            Phase.SPOT_HEALTHY)


def _step_fleet(state: GuardState, event: Event, now: float) -> Result:
    if isinstance(event, Scheduled):
        return state, _scheduled(state, event)
    before, state = state.seen, _rebase(state, now)
    slots = _sized(state, now)
    if not state.slots and state.seen is not None:  # a one-spot state becoming a fleet: its spots to slots
        slots = _assign(slots, state.seen)
    if isinstance(event, Observed):
        state = replace(state, seen=event, watched=now)
        slots = _assign(slots, event)
    elif isinstance(event, Notice) and _unheld(event.instance_id, state, slots):
        slots = _assign(slots, Observed(spots=(Instance(event.instance_id, "running"),)), keep=True)
    said: list[tuple[int, Command]] = []  # (slot, command)
    # Slots with a standby first: one they release is then free for a slot that needs it, in this step.
    for k in sorted(range(len(slots)), key=lambda k: (slots[k].standby is None, k)):
        others = frozenset().union(*(_holding(s) for j, s in enumerate(slots) if j != k))
        slot = slots[k] if state.seen is None else replace(slots[k], seen=_view(state.seen, slots[k], others))
        slot_event = _routed(slot, event)
        if slot_event is None:
            slots[k] = slot
            continue
        slots[k], absorbed, decided = _step_one(slot, slot_event, now)
        said += [(k, c) for c in absorbed + (decided or ())]
    state = _summary(state, slots)
    commands = _merged(state, said, isinstance(event, Observed))
    if isinstance(event, Observed):
        commands = _losses(before, event) + commands
    if state.seen is None or state.seen.target_group_gone:
        return state, commands
    return _watch_guard(state, event, now, commands)


def slot_rules(rules: Rules) -> Rules:
    """A fleet slot's rules: the guard's, for one spot position."""
    return replace(rules, capacity=1)


def _unheld(iid: str, state: GuardState, slots: list[GuardState]) -> bool:
    """A spot no slot holds yet (a notice before the first observation): it goes to a slot."""
    return iid not in state.rules.standbys and not any(iid in s.holds for s in slots)


def _sized(state: GuardState, now: float) -> list[GuardState]:
    """The slots, one per position: a one-spot guard's failover goes on as the first; an idle
    slot beyond the capacity goes (its spots are assigned again), a busy one once it is idle."""
    rules = slot_rules(state.rules)
    slots = list(state.slots) or [replace(state, rules=rules, holds=tuple(sorted(state.doomed)), learned=0,
                                          short_said=0, outage_since=None, seen=None)]
    slots += [GuardState(rules=rules, since=now, holds=()) for _ in range(capacity(state) - len(slots))]
    idle = [k for k, s in enumerate(slots) if s.phase is Phase.SPOT_HEALTHY and s.standby is None]
    for k in list(reversed(idle))[: max(0, len(slots) - capacity(state))]:
        del slots[k]
    return slots


def _assign(slots: list[GuardState], seen: Observed, keep: bool = False) -> list[GuardState]:
    """Each spot to one slot: held ones stay while seen (all of them with `keep`), a new live one
    goes to the slot that needs it most (_CLAIM), a serving standby last in the pool first."""
    if not keep:
        present = {i.id for i in seen.spots}
        slots = [replace(s, holds=tuple(i for i in s.holds if i in present)) for s in slots]
    held = {i for s in slots for i in s.holds}
    for inst in seen.spots:
        if inst.id in held or inst.state not in LIVE_STATES:
            continue
        k = min(range(len(slots)), key=lambda k: _claim(slots[k], seen, k))
        slots[k] = replace(slots[k], holds=slots[k].holds + (inst.id,))
    return slots if keep else _lend(slots, seen)


def _claim(slot: GuardState, seen: Observed, k: int) -> tuple:
    order = slot.rules.standbys.index(slot.standby) if slot.standby in slot.rules.standbys else 0
    return len(_good_spots(slot, seen)), _CLAIM.get(slot.phase, 3), -order, k


def _lend(slots: list[GuardState], seen: Observed) -> list[GuardState]:
    """A slot with neither a spot nor a standby (its spot doomed or gone, none free) takes a healthy
    spot from a slot whose standby serves: that standby then covers the other position at once,
    instead of the spot being lost while a standby drains after its grace."""
    healthy = {t.id for t in seen.targets if t.health == HEALTHY}
    up = healthy & {i.id for i in seen.standbys if i.state == "running"}
    for k, needy in enumerate(slots):
        if needy.standby is not None or _good_spots(needy, seen):
            continue
        donor = next((j for j, d in enumerate(slots) if d.standby in up and healthy & set(_good_spots(d, seen))), None)
        if donor is None:
            continue
        spot = next(i for i in _good_spots(slots[donor], seen) if i in healthy)
        slots[donor] = replace(slots[donor], holds=tuple(i for i in slots[donor].holds if i != spot))
        slots[k] = replace(needy, holds=needy.holds + (spot,))
    return slots


def _good_spots(slot: GuardState, seen: Observed) -> list[str]:
    """The live spots a slot holds that no notice dooms (the poll's flag counts before it is absorbed)."""
    return [i.id for i in seen.spots
            if i.id in slot.holds and i.state in LIVE_STATES and not i.notice and i.id not in slot.doomed]


def _holding(slot: GuardState) -> frozenset[str]:
    """What a slot keeps from the others: its spots, its standby, and those it gave up on (it tidies them)."""
    return frozenset(slot.holds) | slot.failed | ({slot.standby} if slot.standby else set())


def _view(seen: Observed, slot: GuardState, others: frozenset[str]) -> Observed:
    """The guard's observation as one slot sees it."""
    return replace(seen, spots=tuple(i for i in seen.spots if i.id in slot.holds), foreign=seen.foreign | others,
                   disputed=frozenset(), requests_gone=())


def _routed(slot: GuardState, event: Event) -> Event | None:
    """The event as one slot gets it: its view of an observation, a notice about its spot, a
    failure of its start; an agent's `ready` to every slot (only the one that knows it keeps it)."""
    if isinstance(event, Observed):
        return slot.seen
    if isinstance(event, Notice):
        return event if event.kind == READY or event.instance_id in slot.holds else None
    if isinstance(event, Failed):
        return event if getattr(event.command, "instance_id", None) in _holding(slot) else None
    return None  # a scheduled change: the guard answers it itself (_step_fleet)


def _merged(state: GuardState, said: list[tuple[int, Command]], observed: bool) -> tuple[Command, ...]:
    """The slots' commands as one list: none about what another slot now holds, no repeats,
    and across them all never the last healthy target out of the group (invariant 1)."""
    holders = {iid: k for k, s in enumerate(state.slots) for iid in _holding(s)}
    remaining = state.seen.targets if state.seen is not None else ()
    out: list[Command] = []
    for k, c in said:
        if c in out or (not isinstance(c, Alert) and holders.get(c.instance_id, k) != k):
            continue
        if observed and isinstance(c, (Deregister, Stop)) and any(t.id == c.instance_id for t in remaining):
            healthy = any(t.id == c.instance_id and t.health == HEALTHY for t in remaining)
            if healthy and not may_take_out(remaining, c.instance_id):
                continue
            remaining = tuple(t for t in remaining if t.id != c.instance_id)
        out.append(c)
    return tuple(out)


def _summary(state: GuardState, slots: list[GuardState]) -> GuardState:
    """The guard as one phase for readers of one (the poll cadence, status's headline): its
    most urgent slot's; and the union of what the slots know of notices."""
    lead = min(slots, key=lambda s: _URGENCY.index(s.phase))
    return replace(
        state, slots=tuple(slots), phase=lead.phase, since=lead.since, reason=lead.reason, standby=lead.standby,
        stray=lead.stray, started_at=lead.started_at,
        doomed=frozenset().union(*(s.doomed for s in slots)),
        deadlines=tuple(d for s in slots for d in s.deadlines),
        warned=frozenset().union(*(s.warned for s in slots)),
    )


# --------------------------------------------------------------------------- questions the shell asks
# The daemon, the poll source and the operator's commands decide nothing of their
# own: where their behaviour depends on a guard's phase or on target health, they
# ask here, so every rule has one home and one set of tests.

# The phase of a guard with no saved state (also what `status` shows for one).
INITIAL_PHASE = Phase.SPOT_HEALTHY
# While any guard is away from spot-healthy, poll this often (seconds) so a
# failover or failback is not slowed by the steady-state interval.
FAST_POLL = 1.0
# A steady guard's target health may be reused for unhealthy_grace / this.
STEADY_HEALTH_SHARE = 3
# Phases in which a standby serves a failover: a rehearsal hands its standby
# over to the daemon rather than stopping it.
FAILOVER_PHASES = frozenset({Phase.STANDBY_STARTING, Phase.BOTH_SERVING})
# Phases in which the standby is healthy and serving (the spot's replacement is in place).
SERVING_PHASES = frozenset({Phase.BOTH_SERVING, Phase.SPOT_RESTORED})
# The only phase in which a rehearsal may start (nothing else is using a standby).
REHEARSAL_PHASE = Phase.SPOT_HEALTHY


# Between two observations, up to this many steady poll intervals count as watched
# time (15 s at the default 5 s poll: a round slowed by a retried call still counts).
WATCH_GAP_POLLS = 3


def watch_gap(rules: Rules) -> float:
    """The longest gap between observations that still counts as watching the guard."""
    return WATCH_GAP_POLLS * max(rules.poll_interval, FAST_POLL)


def poll_interval(states: Iterable[GuardState], steady: float) -> float:
    """Seconds until the next poll: `steady`, or FAST_POLL while any guard is busy."""
    busy = any(s.phase is not Phase.SPOT_HEALTHY for s in states)
    return min(FAST_POLL, steady) if busy else steady


def is_steady(state: GuardState) -> bool:
    """Spot-healthy with no interruption known: nothing for this guard to do but watch."""
    return state.phase is Phase.SPOT_HEALTHY and not state.doomed


def next_due(state: GuardState, now: float) -> float:
    """The first time after `now` at which time alone may change what the guard decides on an
    unchanged observation (a grace, a timeout, a retry); inf when only a change in the world can.

    Every rule compares `now` one way (a time passed stays passed), so a timer already due
    that changed nothing changes nothing later either. A simulator may skip the polls before
    this when the world stands still; the property tests hold it to that. Keep it in step
    with every `now` comparison of the rules.
    """
    rules, due = state.rules, [float("inf")]
    if state.phase is Phase.SPOT_HEALTHY and state.unhealthy_since is not None:
        due.append(state.unhealthy_since + rules.unhealthy_grace)
    if state.slots:
        return min(next_due(s, now) for s in state.slots)
    if state.phase is Phase.STANDBY_STARTING:
        due += [t + d for t, d in ((state.started_at, rules.standby_ready_timeout), (state.start_sent, START_RETRY))
                if t is not None]
        due += [state.retry_at] if state.retry_at is not None else []
        due += [d - rules.late_warning for iid, d in state.deadlines if iid in state.doomed and iid not in state.warned]
    due += [d - rules.deregister_ahead for iid, d in state.deadlines if iid in state.doomed]
    if state.phase is Phase.SPOT_RESTORED:
        due.append(state.prewarm_at + rules.rebalance_hold if state.prewarm_at is not None
                   else state.since + rules.failback_grace)
    if state.seen is not None and rules.register_when == "ready":
        due += [i.launched + SILENT_FALLBACK for i in state.seen.spots + state.seen.standbys
                if i.probe == SILENT and i.launched is not None]
    return min(t for t in due if t > now)


def slot_pairs(old: GuardState, new: GuardState) -> tuple[tuple[GuardState, GuardState], ...]:
    """Each slot of `new` beside what it was in `old` (a one-spot guard becoming a fleet was its first slot)."""
    before = old.slots or (old,)
    return tuple((before[k] if k < len(before) else initial(slot.rules, slot.since), slot)
                 for k, slot in enumerate(new.slots))


def transitions(old: GuardState, new: GuardState) -> tuple[tuple[int | None, GuardState, GuardState], ...]:
    """The phase changes a step made, for the logs: (slot number from 1, or None for a one-spot
    guard, the slot before, after). A fleet's slots change phase on their own."""
    if not new.slots:
        return ((None, old, new),) if new.phase is not old.phase else ()
    pairs = enumerate(slot_pairs(old, new), start=1)
    return tuple((k, was, slot) for k, (was, slot) in pairs if slot.phase is not was.phase)


def ready_margins(old: GuardState, new: GuardState, now: float) -> tuple[tuple[str, float], ...]:
    """The ready margins a step settled: for each doomed spot, seconds from its replacement
    healthy to its deadline (negative: the replacement was late; ~NOTICE: it was healthy already).

    Told once per notice: when the guard starts serving on its standby, for every deadline
    known before or at that step; and for a notice heard while it already serves.
    """
    if new.slots:
        return tuple(m for was, slot in slot_pairs(old, new) for m in ready_margins(was, slot, now))
    if new.phase not in SERVING_PHASES:
        return ()
    known = dict(old.deadlines)
    if old.phase not in SERVING_PHASES:
        return tuple((iid, d - now) for iid, d in {**known, **dict(new.deadlines)}.items())
    return tuple((iid, d - now) for iid, d in new.deadlines if iid not in known)


def health_reusable(unhealthy_grace: float, targets: Iterable[Target], spots: Iterable[Instance], age: float) -> bool:
    """Whether a steady guard may reuse target health described `age` seconds ago.

    Only while it is younger than unhealthy_grace / STEADY_HEALTH_SHARE, every
    target was healthy and every live spot was among them: target health matters
    to a steady guard only for noticing an unhealthy spot, which must last
    unhealthy_grace anyway, so reuse adds at most a third of the grace to that.
    """
    targets = tuple(targets)
    healthy = {t.id for t in targets if t.health == HEALTHY}
    live = {i.id for i in spots if i.state in LIVE_STATES}
    young = 0 <= age < unhealthy_grace / STEADY_HEALTH_SHARE
    return young and bool(healthy) and len(healthy) == len(targets) and live <= healthy


def may_take_out(targets: Iterable[Target], iid: str) -> bool:
    """Invariant 1: a target may leave the group only if another healthy target stays."""
    return any(t.health == HEALTHY and t.id != iid for t in targets)


def to_probe(state: GuardState, seen: Observed) -> tuple[Instance, ...]:
    """The instances of `seen` whose readiness the shell should probe: running, not registered."""
    if state.rules.register_when == "running":
        return ()
    registered = {t.id for t in seen.targets if t.health not in (UNUSED, DRAINING)}
    return tuple(i for i in seen.spots + seen.standbys
                 if i.state == "running" and i.id not in registered and i.id not in seen.foreign)
