"""One failover/failback cycle as the machine sees it: the event trace for timing `machine.step`.

`record()` plays `CYCLE` through spotguard.sim (its model of EC2, an ALB target
group and a persistent spot request, driving the real machine) and returns every
(state before, event, now) the machine was given, in order: a steady spot, an
interruption notice (from SQS, a duplicate from the agent, and the poll's flagged
snapshot), the standby booting and passing its health check, the doomed spot
draining and terminating, the persistent request re-fulfilled, the failback
grace, the standby draining and stopping, and steady spot again.

The daemon's cadence is the machine's own (`machine.poll_interval`): one
Observed every `POLL` seconds in spot-healthy and every `machine.FAST_POLL`
seconds otherwise. Delays are AWS-like (boot 20 s, health checks every 10 s,
deregistration delay 30 s, spot gone 120 s after the notice).

Replaying the events from `initial()` reproduces the same states (the machine
is pure); `replay()` does that, and `check()` checks the cycle visited every
phase and ended where it began. This module must not time anything: run.py does.
"""

from __future__ import annotations

from dataclasses import dataclass

from spotguard.machine import Event, GuardState, Phase, Rules, initial, step
from spotguard.sim import Interrupt, Script, Timing, run

POLL = 5  # the daemon's default steady poll interval
NOTICE_AT = 301  # between two steady polls, so the SQS notice comes first
CAPACITY_BACK_AFTER = 474  # spot terminated → the request is fulfilled again (≈ t=900)
STEADY_AFTER = 300.0  # seconds of spot-healthy kept after the failback, like before the notice
SEED = 0  # orders a poll and notices due in the same second (spotguard.sim.run)

RULES = Rules(standbys=("i-standby1", "i-standby2"), failback_grace=600.0, standby_ready_timeout=300.0)

CYCLE = Script(
    # warmup 0: the app answers as soon as the instance runs, so one check makes it healthy.
    timing=Timing(boot=20, warmup=0, stop=5, shutdown=5, notice_period=120, check_interval=10, dereg_delay=30),
    # The SQS notice and the agent's copy of it, both a second after the interruption.
    actions=(Interrupt(NOTICE_AT, refill=CAPACITY_BACK_AFTER, deliver=(1, 1)),),
    poll_every=POLL,
    fast_poll=True,
    forget_terminated=True,  # the reopened request names no instance until it is fulfilled
    end=3600,  # long enough for the whole cycle; record() cuts it STEADY_AFTER past the failback
)


@dataclass(frozen=True)
class Step:
    state: GuardState  # the state the event was applied to
    event: Event
    now: float


def record() -> list[Step]:
    """The trace of one full cycle, produced by the real machine against spotguard.sim."""
    trace = run(RULES, CYCLE, SEED)
    back = next(
        (s.t for s in trace.steps if s.t > NOTICE_AT and s.after.phase is Phase.SPOT_HEALTHY
         and s.before.phase is not Phase.SPOT_HEALTHY),
        None,
    )
    if back is None:
        raise AssertionError(f"the cycle did not return to spot-healthy by t={CYCLE.end}: {trace.final.phase.value}")
    return [Step(s.before, s.event, s.t) for s in trace.steps if s.t <= back + STEADY_AFTER]


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
