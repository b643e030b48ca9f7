"""A pure model of the world a guard lives in, and a driver that plays scripts on it.

`World` models EC2 instances, one persistent spot request and an ALB target
group on a clock of whole seconds (leaping over the seconds in which nothing
changes); `run(rules, script, seed)` plays a `Script` (interruptions, faults,
outages) against `spotguard.machine.step` and returns the `Trace` of every
step, with what EC2 would bill and how long no target was healthy. The property
tests, bench/cycle.py and `spotguard simulate` (spotguard.sim.playback) stand on it.
spotguard.lab.world is a different thing: it serves the real AWS HTTP API (moto)
to a real daemon process, while this module calls `machine.step` directly, with
no sockets, processes or asyncio.

This module must not make any decision the machine should make: it only plays
the world and records. It never reads a wall clock, never does I/O, and uses no
randomness except the seeded `random.Random` that `run` builds from its seed.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field, fields

from spotguard.machine import (
    LIVE_STATES,
    NOTICE,
    READY,
    WAITING,
    Alert,
    Command,
    Deregister,
    Event,
    Failed,
    GuardState,
    Instance,
    Notice,
    Observed,
    Phase,
    Register,
    Rules,
    Start,
    Stop,
    Target,
    initial,
    next_due,
    poll_interval,
    replace,
    step,
)

# GuardState fields that only the rules change, not the recording of an observation.
_DECIDED = tuple(f.name for f in fields(GuardState)
                 if f.name not in ("seen", "watched", "doomed", "flagged", "rebalanced", "ready", "unprobed"))

FAULTS = ("ok", "ice", "ice-once", "broken", "slow")
# Failed events fed back for one event: a runaway loop of refusals is a bug, not a hang.
MAX_FEEDBACK = 20


# --------------------------------------------------------------------------- script


@dataclass(frozen=True)
class Timing:
    """Durations of the world (seconds, whole numbers so 1 s steps hit them exactly)."""

    boot: int = 20  # StartInstances → running
    warmup: int = 30  # running → app passes health checks
    stop: int = 15  # StopInstances → stopped
    shutdown: int = 5  # spot shutting-down → terminated
    notice_period: int = int(NOTICE)  # EC2's two minutes, as the machine assumes them
    check_interval: int = 10
    dereg_delay: int = 30
    unhealthy_threshold: int = 2
    healthy_threshold: int = 2
    slow_boot: int = 600  # boot time of a standby with the `slow` fault


@dataclass(frozen=True)
class Interrupt:
    """Interrupt the spot the request names at `at`; deliver Notice events `deliver` s later."""

    at: int
    refill: int | None = 60  # seconds after termination until the request is fulfilled again
    deliver: tuple[int, ...] = (1,)  # () = the poll is the only detector; 2+ = duplicates


@dataclass(frozen=True)
class InterruptWhen:
    """Interrupt `after` seconds after the machine first enters `phase` (at or after `armed`)."""

    phase: Phase
    after: int = 0
    refill: int | None = 60
    deliver: tuple[int, ...] = (1,)
    armed: int = 0


@dataclass(frozen=True)
class Rebalance:
    at: int
    deliver: tuple[int, ...] = (1,)


LATE = "late"  # StrayNotice id: the last interrupted spot that is no longer the current one


@dataclass(frozen=True)
class StrayNotice:
    """A notice for an id that is not (or no longer) the current spot: an unknown id, a
    standby, or `LATE`. Never for an id that will become a spot: ids are not reused, so
    a notice for a future spot would be a real interruption, not a stray."""

    at: int
    instance_id: str
    kind: str = "interruption"


@dataclass(frozen=True)
class Flap:
    """Health checks of `who` ("spot" = the current spot, or a standby index) fail for a while."""

    at: int
    who: str | int
    duration: int


@dataclass(frozen=True)
class ExternalStop:
    """A person stops standby number `index` (if it runs)."""

    at: int
    index: int


@dataclass(frozen=True)
class TerminateStandby:
    """A person terminates standby number `index` (whatever its state): it never comes back."""

    at: int
    index: int


@dataclass(frozen=True)
class PollGap:
    """No poll (Describe* failing) for `duration` seconds; notices still arrive."""

    at: int
    duration: int


@dataclass(frozen=True)
class Pause:
    """The daemon is stalled: nothing reaches the machine; queued events arrive after."""

    at: int
    duration: int


@dataclass(frozen=True)
class Restart:
    """The daemon is down for `down` seconds, then starts from its state file: the state
    without `seen` (never persisted). Notices queued meanwhile arrive after."""

    at: int
    down: int = 10


Action = (
    Interrupt | InterruptWhen | Rebalance | StrayNotice | Flap | ExternalStop | TerminateStandby | PollGap | Pause
    | Restart
)


@dataclass(frozen=True)
class Script:
    timing: Timing = Timing()
    faults: tuple[str, ...] = ()  # per standby, in order; missing entries are "ok"
    actions: tuple[Action, ...] = ()
    poll_every: int = 5  # seconds between polls (the steady interval, with `fast_poll`)
    fast_poll: bool = False  # poll as the daemon does: machine.poll_interval, FAST_POLL while busy
    end: int = 1200
    forget_terminated: bool = False
    spot_stops: bool = False  # interruption behaviour "stop": the same instance id comes back
    spot_healthy_at_start: bool = True
    # Skip the polls that cannot change anything (the world and the machine stand still until
    # the next change, the next due timer or the next scripted event): days in a blink, for
    # replaying long traces. Every step that decides something is still played.
    leap: bool = False


# --------------------------------------------------------------------------- trace


@dataclass(frozen=True)
class Snapshot:
    """The world at one moment: what a poll would return, and whose app is ready."""

    observed: Observed
    ready: frozenset[str]  # instances whose health checks would pass now
    spot: str | None  # the instance the spot request names
    noticed: bool  # the spot request carries an interruption notice

    def instance(self, iid: str) -> Instance | None:
        for i in self.observed.spots + self.observed.standbys:
            if i.id == iid:
                return i
        return None

    def health(self, iid: str) -> str | None:
        return next((t.health for t in self.observed.targets if t.id == iid), None)

    def healthy(self) -> frozenset[str]:
        return frozenset(t.id for t in self.observed.targets if t.health == "healthy")

    def live_standbys(self) -> tuple[str, ...]:
        return tuple(i.id for i in self.observed.standbys if i.state in LIVE_STATES)


@dataclass(frozen=True)
class Step:
    t: float
    event: Event
    before: GuardState
    after: GuardState
    commands: tuple[Command, ...]
    world_before: Snapshot  # before the commands ran
    world: Snapshot  # after the commands ran


@dataclass(frozen=True)
class Mark:
    """Something the script did to the world (for the checks: interruptions, flaps, ...)."""

    t: float
    kind: str  # interrupt | rebalance | stray | flap | ext-stop | terminate | pause | poll-gap | restart
    detail: str = ""
    until: float = 0.0


@dataclass(frozen=True)
class Trace:
    rules: Rules
    script: Script
    steps: tuple[Step, ...]
    marks: tuple[Mark, ...]
    end: float
    error: BaseException | None = None  # what step() raised, if it did
    running: tuple[tuple[str, float], ...] = ()  # (instance, seconds running): what EC2 bills
    dark: float = 0.0  # seconds without a healthy target
    log: tuple[tuple[float, str, str], ...] = ()  # (t, "healthy" | "unhealthy" | "reclaimed", instance)

    @property
    def final(self) -> GuardState:
        return self.steps[-1].after

    @property
    def world(self) -> Snapshot:
        return self.steps[-1].world

    def phases(self) -> list[Phase]:
        """The phase after each step, in order, repeats dropped (a single step may pass
        through phases that are then not listed: starting -> serving -> restored)."""
        out = [self.steps[0].before.phase] if self.steps else []
        for s in self.steps:
            if s.after.phase != out[-1]:
                out.append(s.after.phase)
        return out

    def commands(self) -> list[tuple[float, Command]]:
        return [(s.t, c) for s in self.steps for c in s.commands]

    def alerts(self) -> list[str]:
        return [c.text for _, c in self.commands() if isinstance(c, Alert)]

    def at(self, t: float) -> Step:
        """The last step at or before `t`."""
        found = self.steps[0]
        for s in self.steps:
            if s.t > t:
                break
            found = s
        return found


# --------------------------------------------------------------------------- world


@dataclass
class _Ec2:
    id: str
    state: str
    until: float | None = None  # when the current transitional state ends
    ready_at: float | None = None  # when the app starts passing checks
    fault: str = "ok"
    launched: float = 0.0  # EC2 LaunchTime: the last start
    ice_left: int = 0


@dataclass
class _Tg:
    id: str
    health: str = "initial"
    next_check: float = 0.0
    fails: int = 0
    passes: int = 0
    drain_until: float | None = None


@dataclass
class _Request:
    instance_id: str | None
    noticed: bool = False
    term_at: float | None = None
    refill: int | None = None
    refill_at: float | None = None
    serial: int = 0


class World:
    """EC2 instances, one persistent spot request and one target group, on one clock.

    The choices, so tests can reason about them:
      * EC2: `stopped` --Start--> `pending` (boot) --> `running`; `running` --Stop-->
        `stopping` (stop) --> `stopped`. Start while `stopping`/terminated and Stop
        while `pending` fail with IncorrectInstanceState; Start of a running or
        pending instance and Stop of a stopped/stopping one succeed (idempotent).
        A standby with the `ice` fault refuses every Start with
        InsufficientInstanceCapacity, `ice-once` only the first.
      * The app on an instance passes health checks once it has been `running` for
        `warmup` seconds, unless the instance is `broken` (never) or inside a flap.
        A `slow` standby boots `slow_boot` seconds (longer than its ready timeout).
      * Spot request (persistent, terminate on interruption): an interruption sets
        the status code to `instance-terminated-no-capacity` while the instance
        keeps running for `notice_period`; then `shutting-down` (shutdown) -->
        `terminated`. The request keeps naming the terminated instance (or forgets
        it with `forget_terminated`) until it is fulfilled again `refill` seconds
        after the termination, with a NEW instance id that boots like any other.
        With `spot_stops` (interruption behaviour "stop") the instance is stopped
        instead and the request later starts the SAME instance again.
      * ALB target group: RegisterTargets refuses an instance that is not
        `running` (InvalidTarget). A new target is `initial`; health checks run
        every `check_interval` seconds from registration. `initial` or `unused`
        --1 pass--> `healthy`; `healthy` --`unhealthy_threshold` fails-->
        `unhealthy` --`healthy_threshold` passes--> `healthy`; `initial` also turns
        `unhealthy` after `unhealthy_threshold` fails. The ALB learns that an
        instance left `running` only at its next check (`unused`), so a snapshot
        can show a stopping instance whose target still says `healthy`.
        DeregisterTargets puts a target in `draining` for `dereg_delay`, then it is
        absent; deregistering an absent or draining target is a no-op; registering
        a draining target cancels the drain (`initial` again). A terminating
        registered instance is deregistered by the ALB itself (draining).
    """

    def __init__(self, timing: Timing, standbys: tuple[str, ...], faults: tuple[str, ...], forget_terminated: bool,
                 spot_healthy: bool = True, spot_stops: bool = False):
        self.timing = timing
        self.spot_stops = spot_stops
        self.now = 0.0
        self.standbys = standbys
        self.forget_terminated = forget_terminated
        self.instances: dict[str, _Ec2] = {}
        self.targets: dict[str, _Tg] = {}
        self.flaps: dict[str, list[tuple[float, float]]] = {}
        for n, sid in enumerate(standbys):
            fault = faults[n] if n < len(faults) else "ok"
            ice = {"ice": 10**9, "ice-once": 1}.get(fault, 0)
            self.instances[sid] = _Ec2(sid, "stopped", fault=fault, ice_left=ice)
        spot = self._new_spot_id(0)
        self.instances[spot] = _Ec2(spot, "running", ready_at=0.0)
        self.request = _Request(spot, serial=1)
        if spot_healthy:
            self.targets[spot] = _Tg(spot, "healthy", next_check=timing.check_interval)
        self.alerts: list[str] = []
        self.changes = 0  # bumped by anything that may change the world outside the clock
        self.running: dict[str, float] = {}  # seconds each instance has been running: the bill
        self.dark = 0.0  # seconds without a healthy target: the outage
        # (t, what, instance id): a target turned "healthy" or "unhealthy" (any other health), a spot "reclaimed"
        self.log: list[tuple[float, str, str]] = []
        self._snap: tuple[tuple[float, int], Snapshot] | None = None
        self._next: tuple[tuple[float, int], float] | None = None

    @staticmethod
    def _new_spot_id(serial: int) -> str:
        return f"i-spot{serial}"

    # ------------------------------------------------------------------ time

    def advance(self, to: float) -> None:
        """Move the clock to `to`, second by second where anything changes, in one leap where nothing does."""
        while self.now < to:
            quiet_until = min(self.next_change(), to + 1) - 1
            if quiet_until > self.now:
                self._leap(quiet_until)
            else:
                self.now += 1
                self._second(self.now)

    def next_change(self) -> float:
        """The first second after now at which the world may change by itself (inf: never)."""
        key = (self.now, self.changes)
        if self._next is None or self._next[0] != key:
            self._next = (key, self._next_change())
        return self._next[1]

    def _next_change(self) -> float:
        now = self.now
        times = [inst.until for inst in self.instances.values() if inst.until is not None]
        times += [i.ready_at for i in self.instances.values() if i.ready_at is not None and i.ready_at > now]
        times += [edge for spans in self.flaps.values() for span in spans for edge in span if edge > now]
        times += [x for x in (self.request.term_at, self.request.refill_at) if x is not None]
        for tg in self.targets.values():
            if tg.drain_until is not None:
                times.append(tg.drain_until)
            elif not self._check_is_quiet(tg):
                times.append(tg.next_check)
        # The world is played in whole seconds: a change is seen at the first whole second at or after it.
        return float(max(now + 1, math.ceil(min(times)))) if times else math.inf

    def _check_is_quiet(self, tg: _Tg) -> bool:
        """Whether the next health check (and every one after, while nothing else changes) keeps the health."""
        inst = self.instances.get(tg.id)
        if inst is None or inst.state != "running":
            return tg.health == "unused" and tg.fails == 0 and tg.passes == 0
        if self._ready(tg.id, self.now):
            return tg.health == "healthy"
        return tg.health == "unhealthy"

    def _leap(self, to: float) -> None:
        """Seconds in which nothing changes but the counts: health checks that confirm, and the bill."""
        span, interval = to - self.now, self.timing.check_interval
        for tg in self.targets.values():
            if tg.drain_until is None and tg.next_check <= to:
                checks = math.floor((to - tg.next_check) / interval) + 1
                tg.next_check += checks * interval
                if tg.health == "healthy":
                    tg.fails, tg.passes = 0, tg.passes + checks
                elif tg.health == "unhealthy":
                    tg.passes, tg.fails = 0, tg.fails + checks
        self._count(span)
        self.now = to

    def _second(self, s: float) -> None:
        self._count(1)  # the second that ends now, as it was: what changes at `s` counts from `s` on
        t = self.timing
        for inst in self.instances.values():
            if inst.until is not None and s >= inst.until:
                inst.until = None
                if inst.state == "pending":
                    inst.state, inst.ready_at = "running", s + t.warmup
                elif inst.state == "stopping":
                    inst.state = "stopped"
                elif inst.state == "shutting-down":
                    inst.state = "terminated"
                    if self.forget_terminated and self.request.instance_id == inst.id:
                        self.request.instance_id = None
        self._spot_timers(s)
        for tg in list(self.targets.values()):
            if tg.drain_until is not None:
                if s >= tg.drain_until:
                    del self.targets[tg.id]
            elif s >= tg.next_check:
                tg.next_check = s + t.check_interval
                self._check(tg, s)

    def _count(self, seconds: float) -> None:
        """Add `seconds` of the present state to the bill (running instances) and to the outage."""
        for inst in self.instances.values():
            if inst.state == "running":
                self.running[inst.id] = self.running.get(inst.id, 0.0) + seconds
        if not any(tg.health == "healthy" for tg in self.targets.values()):
            self.dark += seconds

    def _spot_timers(self, s: float) -> None:
        req, t = self.request, self.timing
        if req.term_at is not None and s >= req.term_at:
            req.term_at = None
            inst = self.instances[req.instance_id]
            if inst.state in LIVE_STATES:
                self.log.append((s, "reclaimed", inst.id))
            if inst.state in LIVE_STATES and self.spot_stops:
                inst.state, inst.until, inst.ready_at = "stopping", s + t.stop, None
            elif inst.state in LIVE_STATES:
                inst.state, inst.until = "shutting-down", s + t.shutdown
                tg = self.targets.get(inst.id)
                if tg is not None and tg.drain_until is None:
                    # The ALB deregisters a terminating instance itself.
                    self._health(tg, "draining", s)
                    tg.drain_until = s + t.dereg_delay
            if req.refill is not None:
                req.refill_at = s + (t.stop if self.spot_stops else t.shutdown) + req.refill
        if req.refill_at is not None and s >= req.refill_at:
            req.refill_at = None
            if self.spot_stops:
                # Interruption behaviour "stop": the same instance is started again.
                inst = self.instances[req.instance_id]
                inst.state, inst.until, inst.ready_at, inst.launched = "pending", s + t.boot, None, s
                req.noticed = False
                return
            iid = self._new_spot_id(req.serial)
            req.serial += 1
            self.instances[iid] = _Ec2(iid, "pending", until=s + t.boot, launched=s)
            req.instance_id, req.noticed = iid, False

    def _ready(self, iid: str, s: float) -> bool:
        inst = self.instances.get(iid)
        if inst is None or inst.state != "running" or inst.fault == "broken":
            return False
        if inst.ready_at is None or s < inst.ready_at:
            return False
        return not any(a <= s < b for a, b in self.flaps.get(iid, ()))

    def _health(self, tg: _Tg, health: str, s: float) -> None:
        """Set a target's health, logging when it turns healthy and when it stops being healthy."""
        if (tg.health == "healthy") != (health == "healthy"):
            self.log.append((s, "healthy" if health == "healthy" else "unhealthy", tg.id))
        tg.health = health

    def _check(self, tg: _Tg, s: float) -> None:
        t = self.timing
        inst = self.instances.get(tg.id)
        if inst is None or inst.state != "running":
            self._health(tg, "unused", s)
            tg.fails, tg.passes = 0, 0
            return
        if self._ready(tg.id, s):
            tg.fails, tg.passes = 0, tg.passes + 1
            if tg.health in ("initial", "unused") or tg.passes >= t.healthy_threshold:
                self._health(tg, "healthy", s)
            return
        tg.passes, tg.fails = 0, tg.fails + 1
        if tg.health == "unused":
            tg.health = "initial"
        if tg.fails >= t.unhealthy_threshold:
            self._health(tg, "unhealthy", s)

    # ------------------------------------------------------------------ faults

    def interrupt(self, refill: int | None) -> str | None:
        """Interruption notice for the spot the request names; returns its id (even if gone)."""
        self.changes += 1
        req = self.request
        iid = req.instance_id
        if iid is None:
            return None
        inst = self.instances[iid]
        if inst.state in LIVE_STATES and not req.noticed:
            req.noticed, req.term_at, req.refill = True, self.now + self.timing.notice_period, refill
        return iid

    def flap(self, iid: str, until: float) -> None:
        self.changes += 1
        self.flaps.setdefault(iid, []).append((self.now, until))

    def terminate(self, iid: str) -> None:
        """TerminateInstances by hand: shutting-down, then terminated; the ALB drains its target."""
        self.changes += 1
        inst = self.instances[iid]
        if inst.state in ("shutting-down", "terminated"):
            return
        inst.state, inst.until, inst.ready_at = "shutting-down", self.now + self.timing.shutdown, None
        tg = self.targets.get(iid)
        if tg is not None and tg.drain_until is None:
            self._health(tg, "draining", self.now)
            tg.drain_until = self.now + self.timing.dereg_delay

    def external_stop(self, iid: str) -> None:
        self.changes += 1
        inst = self.instances[iid]
        if inst.state == "running":
            inst.state, inst.until, inst.ready_at = "stopping", self.now + self.timing.stop, None

    # ------------------------------------------------------------------ commands

    def apply(self, cmd: Command) -> Failed | None:
        """Carry out one command as the executor would; a refusal comes back as Failed."""
        self.changes += 1
        if isinstance(cmd, Alert):
            self.alerts.append(cmd.text)
            return None
        inst = self.instances.get(cmd.instance_id)
        if inst is None:
            return Failed(cmd, "InvalidInstanceID.NotFound")
        if isinstance(cmd, Start):
            return self._start(cmd, inst)
        if isinstance(cmd, Stop):
            return self._stop(cmd, inst)
        if isinstance(cmd, Register):
            return self._register(cmd, inst)
        if isinstance(cmd, Deregister):
            return self._deregister(cmd)
        raise TypeError(f"unknown command {cmd!r}")

    def _start(self, cmd: Start, inst: _Ec2) -> Failed | None:
        if inst.state in LIVE_STATES:
            return None
        if inst.state != "stopped":
            return Failed(cmd, "IncorrectInstanceState")
        if inst.ice_left > 0:
            inst.ice_left -= 1
            return Failed(cmd, "InsufficientInstanceCapacity")
        boot = self.timing.slow_boot if inst.fault == "slow" else self.timing.boot
        inst.state, inst.until, inst.ready_at, inst.launched = "pending", self.now + boot, None, self.now
        return None

    def _stop(self, cmd: Stop, inst: _Ec2) -> Failed | None:
        if inst.state in ("stopping", "stopped"):
            return None
        if inst.state != "running":
            return Failed(cmd, "IncorrectInstanceState")
        inst.state, inst.until, inst.ready_at = "stopping", self.now + self.timing.stop, None
        return None

    def _register(self, cmd: Register, inst: _Ec2) -> Failed | None:
        if inst.state != "running":
            return Failed(cmd, "InvalidTarget")
        tg = self.targets.get(inst.id)
        if tg is None or tg.drain_until is not None:
            self.targets[inst.id] = _Tg(inst.id, "initial", next_check=self.now + self.timing.check_interval)
        return None

    def _deregister(self, cmd: Deregister) -> Failed | None:
        tg = self.targets.get(cmd.instance_id)
        if tg is not None and tg.drain_until is None:
            self._health(tg, "draining", self.now)
            tg.drain_until = self.now + self.timing.dereg_delay
        return None

    # ------------------------------------------------------------------ views

    def observe(self) -> Observed:
        """The snapshot the poll source would return for this guard."""
        spots: tuple[Instance, ...] = ()
        iid = self.request.instance_id
        if iid is not None:
            state = self.instances[iid].state
            spots = (replace(self._instance(iid), notice=state in LIVE_STATES and self.request.noticed),)
        standbys = tuple(self._instance(s) for s in self.standbys)
        targets = tuple(Target(tg.id, tg.health) for tg in sorted(self.targets.values(), key=lambda x: x.id))
        return Observed(spots=spots, standbys=standbys, targets=targets)

    def _instance(self, iid: str) -> Instance:
        """As the poll sees it, with the readiness probe's verdict (the probe always reaches it here)."""
        inst = self.instances[iid]
        probe = READY if self._ready(iid, self.now) else WAITING
        return Instance(iid, inst.state, launched=inst.launched, probe=probe)

    def snapshot(self) -> Snapshot:
        # Cached per (second, change count): the driver asks before and after every step.
        key = (self.now, self.changes)
        if self._snap is None or self._snap[0] != key:
            ready = frozenset(i for i in self.instances if self._ready(i, self.now))
            snap = Snapshot(self.observe(), ready, self.request.instance_id, self.request.noticed)
            self._snap = (key, snap)
        return self._snap[1]


# --------------------------------------------------------------------------- driver


@dataclass
class _Driver:
    rules: Rules
    script: Script
    rng: random.Random
    world: World = field(init=False)
    state: GuardState = field(init=False)
    steps: list[Step] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    queue: list[tuple[float, int, Event]] = field(default_factory=list)  # machine events by time
    actions: list[tuple[float, int, Action]] = field(default_factory=list)
    triggers: list[InterruptWhen] = field(default_factory=list)
    serial: int = 0
    blocked_until: float = -1.0  # pause: nothing reaches the machine before this
    no_poll_until: float = -1.0
    last_poll: float = float("-inf")
    restart_at: float | None = None

    def __post_init__(self) -> None:
        s = self.script
        self.world = World(
            s.timing, self.rules.standbys, s.faults, s.forget_terminated, s.spot_healthy_at_start, s.spot_stops
        )
        self.state = initial(self.rules, 0.0)
        for a in s.actions:
            if isinstance(a, InterruptWhen):
                self.triggers.append(a)
            else:
                self._schedule_action(a.at, a)

    def _schedule_action(self, at: float, action: Action) -> None:
        self.serial += 1
        heapq.heappush(self.actions, (at, self.serial, action))

    def _schedule_event(self, at: float, event: Event) -> None:
        self.serial += 1
        heapq.heappush(self.queue, (at, self.serial, event))

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        t = 0.0
        while t <= self.script.end:
            self.world.advance(t)
            while self.actions and self.actions[0][0] <= t:
                self._act(heapq.heappop(self.actions)[2], t)
            for event in self._due(t):
                self._feed(event, t)
            self._arm_triggers(t)
            t = self._leap(t) if self.script.leap else t + 1
        self.world.advance(self.script.end)  # a leap may pass the end: the bill runs to it

    def _leap(self, t: float) -> float:
        """The next second worth playing: t + 1, or past the polls that would change nothing."""
        if not self._still(t):
            return t + 1
        until = min(self.world.next_change(), next_due(self.state, t), self.script.end + 1,
                    self.actions[0][0] if self.actions else math.inf, self.queue[0][0] if self.queue else math.inf)
        interval = self._poll_interval()
        skipped = math.ceil((until - self.last_poll) / interval) - 1  # polls strictly before `until`
        if skipped <= 0:
            return t + 1
        self.last_poll += skipped * interval
        self.state = replace(self.state, watched=self.last_poll)  # what the skipped polls would have left
        return float(max(t + 1, math.ceil(until)))

    def _still(self, t: float) -> bool:
        """Whether the last step was this second's poll, and it changed nothing and commanded nothing."""
        if not self.steps or self.triggers or self.restart_at is not None:
            return False
        last = self.steps[-1]
        if last.t != t or self.last_poll != t or not isinstance(last.event, Observed) or last.commands:
            return False
        if t < self.blocked_until or t < self.no_poll_until:
            return False
        if self.world.snapshot().observed is not last.event:
            return False  # the world changed after the poll looked (a notice's commands ran first)
        # Only what recording the observation sets may differ: then the rules decided nothing
        # on it, and the same observation again (recorded already) decides nothing either.
        return all(getattr(last.after, f) == getattr(last.before, f) for f in _DECIDED)

    def _due(self, t: float) -> list[Event]:
        if t < self.blocked_until:
            return []
        if self.restart_at is not None and t >= self.restart_at:
            self.restart_at = None
            self.state = replace(self.state, seen=None)  # what the store loads back
        events: list[Event] = []
        while self.queue and self.queue[0][0] <= t:
            events.append(heapq.heappop(self.queue)[2])
        if t >= self.no_poll_until and t - self.last_poll >= self._poll_interval():
            self.last_poll = t
            poll: Event = self.world.snapshot().observed
            # Notices race the poll: sometimes they land just before it, sometimes just after.
            events.insert(self.rng.randrange(len(events) + 1) if events else 0, poll)
        return events

    def _poll_interval(self) -> float:
        if self.script.fast_poll:
            return poll_interval((self.state,), self.script.poll_every)
        return self.script.poll_every

    def _feed(self, event: Event, t: float) -> None:
        pending = [event]
        fed = 0
        while pending:
            ev = pending.pop(0)
            fed += 1
            if fed > MAX_FEEDBACK:
                raise RuntimeError(f"more than {MAX_FEEDBACK} refusals fed back at t={t}")
            before = self.state
            world_before = self.world.snapshot()
            after, commands = step(before, ev, t)
            failures = [f for f in (self.world.apply(c) for c in commands) if f is not None]
            self.state = after
            self.steps.append(Step(t, ev, before, after, commands, world_before, self.world.snapshot()))
            pending.extend(failures)

    def _arm_triggers(self, t: float) -> None:
        for trig in list(self.triggers):
            if t >= trig.armed and self.state.phase is trig.phase:
                self.triggers.remove(trig)
                self._schedule_action(t + trig.after, Interrupt(int(t + trig.after), trig.refill, trig.deliver))

    def _act(self, action: Action, t: float) -> None:
        w = self.world
        if isinstance(action, Interrupt):
            iid = w.interrupt(action.refill)
            self.marks.append(Mark(t, "interrupt", iid or ""))
            for d in action.deliver:
                # A notice delivered after a stop-behaviour spot has stopped and may be
                # running again under the same id cannot be told from a new notice for
                # it; EventBridge delivers within seconds, so such notices are not played.
                term_at = w.request.term_at
                late = w.spot_stops and (term_at is None or t + d >= term_at)
                if iid is not None and not late:
                    self._schedule_event(t + d, Notice(iid))
        elif isinstance(action, Rebalance):
            iid = w.request.instance_id
            self.marks.append(Mark(t, "rebalance", iid or ""))
            for d in action.deliver:
                if iid is not None:
                    self._schedule_event(t + d, Notice(iid, "rebalance"))
        elif isinstance(action, StrayNotice):
            iid = action.instance_id
            if iid == LATE:
                gone = [m.detail for m in self.marks
                        if m.kind == "interrupt" and m.detail and m.detail != w.request.instance_id]
                iid = gone[-1] if gone else ""
            if iid:
                self.marks.append(Mark(t, "stray", iid))
                self._schedule_event(t, Notice(iid, action.kind))
        elif isinstance(action, Flap):
            iid = w.request.instance_id if action.who == "spot" else self.rules.standbys[int(action.who)]
            if iid is not None:
                w.flap(iid, t + action.duration)
                self.marks.append(Mark(t, "flap", iid, t + action.duration))
        elif isinstance(action, ExternalStop):
            sid = self.rules.standbys[action.index]
            w.external_stop(sid)
            self.marks.append(Mark(t, "ext-stop", sid))
        elif isinstance(action, TerminateStandby):
            sid = self.rules.standbys[action.index]
            w.terminate(sid)
            self.marks.append(Mark(t, "terminate", sid))
        elif isinstance(action, PollGap):
            self.no_poll_until = max(self.no_poll_until, t + action.duration)
            self.marks.append(Mark(t, "poll-gap", until=t + action.duration))
        elif isinstance(action, Pause):
            self.blocked_until = max(self.blocked_until, t + action.duration)
            self.marks.append(Mark(t, "pause", until=t + action.duration))
        elif isinstance(action, Restart):
            self.blocked_until = max(self.blocked_until, t + action.down)
            self.marks.append(Mark(t, "restart", until=t + action.down))
            self.restart_at = t + action.down
        else:
            raise TypeError(f"unknown action {action!r}")


def run(rules: Rules, script: Script, seed: int = 0, *, catch: bool = False) -> Trace:
    """Play `script` against the machine; with `catch`, an exception from step() ends the
    trace (kept in `Trace.error`) instead of propagating.

    A clock advances one second at a time. Each second the world moves first, then
    scripted actions fire, then the events due reach the machine: `Notice` events at
    their delivery times and, every `poll_every` seconds (or as
    `machine.poll_interval` says, with `fast_poll`), an `Observed` snapshot built
    exactly as `spotguard.sources.poll` builds it. A poll and notices due in the same
    second land in a seeded random order (the daemon steps notices before its round's
    Observed). Commands are carried out at once, in order; a refusal is stepped right
    away as `Failed` at the same `now`. `PollGap` drops polls, `Pause` holds every
    event back, `Restart` holds them back and then reloads the state without `seen`,
    as the store does. `TerminateStandby` is a person deleting a standby for good.
    """
    driver = _Driver(rules, script, random.Random(seed))
    error: BaseException | None = None
    try:
        driver.run()
    except Exception as exc:  # RecursionError included
        if not catch:
            raise
        error = exc
    w = driver.world
    return Trace(rules, script, tuple(driver.steps), tuple(driver.marks), float(script.end), error,
                 tuple(sorted(w.running.items())), w.dark, tuple(w.log))


def replay(rules: Rules, events: list[tuple[float, Event]]) -> list[tuple[GuardState, tuple[Command, ...]]]:
    """Step the machine through a bare event list (for minimal examples)."""
    state = initial(rules, 0.0)
    out = []
    for t, ev in events:
        state, cmds = step(state, ev, t)
        out.append((state, cmds))
    return out


__all__ = [
    "Action", "ExternalStop", "FAULTS", "Flap", "Interrupt", "InterruptWhen", "LATE", "Mark", "Pause", "PollGap",
    "Rebalance", "Restart", "Script", "Snapshot", "Step", "StrayNotice", "TerminateStandby", "Timing",
    "Trace", "World", "replay", "run",
]
