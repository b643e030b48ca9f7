"""One failover/failback cycle as the machine sees it: the event trace for timing `machine.step`.

`record()` plays a small model of EC2 and an ALB against the real machine and
returns every (state before, event, now) the machine was given, in order: a
steady spot, an interruption notice (from SQS, a duplicate from the agent, and
the poll's flagged snapshot), the standby booting and passing its health check,
the doomed spot draining and terminating, the persistent request re-fulfilled,
the failback grace, the standby draining and stopping, and steady spot again.

The daemon's cadence is copied: one Observed per round, every `POLL` seconds in
spot-healthy and every `FAST_POLL` seconds otherwise, plus one Tick between
rounds (a timer source's view; today's daemon sends none, so Ticks are reported
on their own). Delays are AWS-like (standby boot 20 s, first health check
10 s, deregistration delay 30 s, spot gone 120 s after the notice).

Replaying the events from `initial()` reproduces the same states (the machine
is pure); `replay()` does that and checks the cycle ended where it began.
This module must not time anything: run.py does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spotguard.machine import (
    Deregister,
    Event,
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
    Tick,
    initial,
    step,
)

POLL, FAST_POLL = 5.0, 1.0
BOOT, FIRST_CHECK, DEREG_DELAY, STOPPING = 20.0, 10.0, 30.0, 5.0
NOTICE_AT, SPOT_GONE_AFTER, CAPACITY_BACK_AT, SPOT_BOOT = 300.0, 120.0, 900.0, 30.0
STEADY_AFTER = 300.0  # seconds of spot-healthy kept after the failback, like before the notice

RULES = Rules(standbys=("i-standby1", "i-standby2"), failback_grace=600.0, standby_ready_timeout=300.0)


@dataclass
class Model:
    """EC2 instance states and target health, changed by commands and by the clock."""

    spots: dict[str, str] = field(default_factory=lambda: {"i-spot1": "running"})
    noticed: set[str] = field(default_factory=set)
    standbys: dict[str, str] = field(default_factory=lambda: {s: "stopped" for s in RULES.standbys})
    targets: dict[str, str] = field(default_factory=lambda: {"i-spot1": "healthy"})
    later: list[tuple[float, str, str, str | None]] = field(default_factory=list)  # (due, table, id, value)

    def snapshot(self) -> Observed:
        return Observed(
            spots=tuple(Instance(i, s, notice=i in self.noticed) for i, s in self.spots.items()),
            standbys=tuple(Instance(i, s) for i, s in self.standbys.items()),
            targets=tuple(Target(i, h) for i, h in self.targets.items()),
        )

    def act(self, command: object, now: float) -> None:
        if isinstance(command, Start):
            self.standbys[command.instance_id] = "pending"
            self._at(now + BOOT, "standbys", command.instance_id, "running")
        elif isinstance(command, Stop):
            self.standbys[command.instance_id] = "stopping"
            self._at(now + STOPPING, "standbys", command.instance_id, "stopped")
        elif isinstance(command, Register):
            self.targets[command.instance_id] = "initial"
            self._at(now + FIRST_CHECK, "targets", command.instance_id, "healthy")
        elif isinstance(command, Deregister):
            self.targets[command.instance_id] = "draining"
            self._at(now + DEREG_DELAY, "targets", command.instance_id, None)

    def _at(self, due: float, table: str, iid: str, value: str | None) -> None:
        self.later.append((due, table, iid, value))

    def advance(self, now: float) -> None:
        due = [c for c in self.later if c[0] <= now]
        self.later = [c for c in self.later if c[0] > now]
        for _, table, iid, value in sorted(due):
            entries = getattr(self, table)
            if value is None:
                entries.pop(iid, None)
            elif table != "targets" or entries.get(iid) == "initial":
                entries[iid] = value  # a health check only passes for a target still registered


@dataclass(frozen=True)
class Step:
    state: GuardState  # the state the event was applied to
    event: Event
    now: float


def record() -> list[Step]:
    """The trace of one full cycle, produced by the real machine against the model."""
    world, steps = Model(), []
    state, now, back = initial(RULES, 0.0), 0.0, None

    def feed(event: Event, at: float) -> None:
        nonlocal state
        steps.append(Step(state, event, at))
        state, commands = step(state, event, at)
        for command in commands:
            world.act(command, at)

    while back is None or now < back + STEADY_AFTER:
        world.advance(now)
        _script(world, now)
        if NOTICE_AT <= now < NOTICE_AT + POLL and not steps_have_notice(steps):
            feed(Notice("i-spot1"), now)  # SQS
            feed(Notice("i-spot1"), now)  # the agent's copy of the same notice
        feed(world.snapshot(), now)
        interval = POLL if state.phase is Phase.SPOT_HEALTHY else FAST_POLL
        feed(Tick(), now + interval / 2)
        if back is None and now > CAPACITY_BACK_AT and state.phase is Phase.SPOT_HEALTHY:
            back = now
        now += interval
    return steps


def steps_have_notice(steps: list[Step]) -> bool:
    return any(isinstance(s.event, Notice) for s in steps)


def _script(world: Model, now: float) -> None:
    """What AWS does on its own: the notice, the spot's end, capacity coming back."""
    if now >= NOTICE_AT and "i-spot1" in world.spots:
        world.noticed.add("i-spot1")
        if now >= NOTICE_AT + SPOT_GONE_AFTER:
            # The persistent request reopens with no instance; ELB forgets the terminated target.
            del world.spots["i-spot1"]
            world.targets.pop("i-spot1", None)
    if now >= CAPACITY_BACK_AT and "i-spot2" not in world.spots:
        world.spots["i-spot2"] = "pending"
        world._at(now + SPOT_BOOT, "spots", "i-spot2", "running")


def replay(steps: list[Step]) -> GuardState:
    """Apply the trace's events from the initial state; the state at the end."""
    state = initial(RULES, 0.0)
    for s in steps:
        state, _ = step(state, s.event, s.now)
    return state


def check(steps: list[Step]) -> list[Phase]:
    """The phases the cycle went through, after checking it is complete and reproducible."""
    phases = list(dict.fromkeys(s.state.phase for s in steps))
    if set(phases) != set(Phase):
        raise AssertionError(f"the cycle missed phases: visited {[p.value for p in phases]}")
    end = replay(steps)
    if end.phase is not Phase.SPOT_HEALTHY or end.standby is not None:
        raise AssertionError(f"the cycle did not end in spot-healthy: {end.phase.value}, standby {end.standby}")
    return phases


def kind(event: Event) -> str:
    return type(event).__name__
