"""Property tests for spotguard.machine: the five invariants of design.md, over random worlds.

Hypothesis draws a `spotguard.sim.Script` (interruptions at random times and in
every phase, refills, duplicate/late/stray notices, ICE, standbys that never get
healthy, health flaps, poll gaps, stalls, restarts) and `spotguard.sim.run` plays
it against `machine.step`. The checks below read the recorded trace after every
step. Hand-written scenarios play the story of design.md through the sim.

Every bug the random search found in the machine is pinned at the end by the
smallest event sequence that showed it, as a plain regression test. This module
must not edit or monkeypatch the machine; it only drives it.
"""

from __future__ import annotations

from dataclasses import replace
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from spotguard.machine import (
    READY,
    RETRY_CAP,
    SILENT,
    Alert,
    Deregister,
    Failed,
    Instance,
    Notice,
    Observed,
    Phase,
    Register,
    Rules,
    Scheduled,
    Start,
    Stop,
    Target,
    initial,
    step,
)
from spotguard.sim import (
    LATE,
    ExternalStop,
    Flap,
    Interrupt,
    InterruptWhen,
    Pause,
    PollGap,
    Rebalance,
    Restart,
    Script,
    StrayNotice,
    TerminateStandby,
    Timing,
    Trace,
    World,
    replay,
    run,
)

SERVING = (Phase.BOTH_SERVING, Phase.SPOT_RESTORED)
SLACK = 30


# --------------------------------------------------------------------------- strategies


@st.composite
def timings(draw) -> Timing:
    return Timing(
        boot=draw(st.integers(5, 40)),
        warmup=draw(st.integers(0, 60)),
        stop=draw(st.integers(5, 40)),
        shutdown=draw(st.integers(1, 10)),
        check_interval=draw(st.sampled_from([5, 10, 15, 30])),
        dereg_delay=draw(st.integers(0, 90)),
    )


def time_to_healthy(timing: Timing, poll: int) -> int:
    """Upper bound from StartInstances to a healthy target for a standby without faults."""
    return timing.boot + poll + timing.warmup + (timing.healthy_threshold + 1) * timing.check_interval + poll


# Short delays are over-weighted: races between a notice and the next poll live there.
soon = st.one_of(st.integers(0, 3), st.integers(0, 60))
refills = st.one_of(st.integers(0, 20), st.integers(0, 20), st.integers(0, 300), st.none())
deliveries = st.lists(st.one_of(st.integers(0, 3), st.integers(0, 200)), max_size=3).map(tuple)


def interruptions(horizon: int):
    """Interruptions at random times, or a few seconds after the guard enters some phase."""
    return st.one_of(
        st.builds(Interrupt, at=st.integers(5, horizon), refill=refills, deliver=deliveries),
        st.builds(
            InterruptWhen,
            phase=st.sampled_from([p for p in Phase if p is not Phase.SPOT_HEALTHY]),
            after=soon,
            refill=refills,
            deliver=deliveries,
            armed=st.one_of(st.just(0), st.integers(0, horizon)),
        ),
    )


def disturbances(n_standbys: int, horizon: int):
    """Everything else a guard meets: rebalances, stray notices, flaps, gaps, stalls,
    restarts, a person stopping a standby."""
    at = st.integers(5, horizon)
    who = st.sampled_from(["spot", *range(n_standbys)])
    ids = st.sampled_from(["i-unknown", "i-sb0", LATE])
    return st.one_of(
        st.builds(Rebalance, at=at, deliver=deliveries),
        st.builds(StrayNotice, at=at, instance_id=ids,
                  kind=st.sampled_from(["interruption", "rebalance", "terminating"])),
        st.builds(Flap, at=at, who=who, duration=st.integers(5, 120)),
        st.builds(PollGap, at=at, duration=st.integers(5, 120)),
        st.builds(Pause, at=at, duration=st.integers(5, 90)),
        st.builds(Restart, at=at, down=st.integers(1, 120)),
    ) | st.builds(ExternalStop, at=at, index=st.integers(0, n_standbys - 1))


@st.composite
def scenarios(draw, quiet_tail: bool = True) -> tuple[Rules, Script, int]:
    """(rules, script, seed). With `quiet_tail` the script ends long enough after its last
    scripted disturbance for invariant 3 to be checkable."""
    n = draw(st.integers(1, 3))
    standbys = tuple(f"i-sb{k}" for k in range(n))
    timing = draw(timings())
    poll = draw(st.sampled_from([1, 2, 5, 5, 10]))
    ready_timeout = time_to_healthy(timing, poll) + draw(st.integers(10, 120))
    timing = replace(timing, slow_boot=ready_timeout + draw(st.integers(10, 60)))
    rules = Rules(
        standbys=standbys,
        failback_grace=draw(st.integers(30, 300)),
        standby_ready_timeout=ready_timeout,
        unhealthy_grace=draw(st.integers(10, 60)),
        on_rebalance=draw(st.sampled_from(["ignore", "prewarm"])),
        rebalance_hold=draw(st.integers(30, 400)),
    )
    fault = st.sampled_from(["ok", "ok", "ok", "ice", "ice-once", "broken", "slow"])
    faults = tuple(draw(fault) for _ in range(n))
    horizon = 800
    # A first failover early on, so that the phase-triggered ones have phases to hit.
    acts: tuple = (draw(st.builds(Interrupt, at=st.integers(5, 200), refill=refills, deliver=deliveries)),)
    acts += tuple(draw(st.lists(interruptions(horizon), max_size=3)))
    acts += tuple(draw(st.lists(disturbances(n, horizon), max_size=6)))
    last = max([a.at for a in acts if hasattr(a, "at")]
               + [a.armed + 400 for a in acts if isinstance(a, InterruptWhen)] + [0])
    end = last + (failback_horizon(rules, Script(timing=timing, poll_every=poll)) + 600 if quiet_tail else 300)
    script = Script(
        timing=timing,
        faults=faults,
        actions=acts,
        poll_every=poll,
        end=end,
        forget_terminated=draw(st.booleans()),
        spot_stops=draw(st.booleans()),
    )
    return rules, script, draw(st.integers(0, 2**16))


# --------------------------------------------------------------------------- checks


def check_safety(trace: Trace) -> None:
    """Invariants 1, 2, 5 at every step, and the time-bounded form of 4."""
    standbys = set(trace.rules.standbys)
    t = trace.script.timing
    two_live_bound = t.dereg_delay + t.stop + 3 * t.check_interval + 3 * trace.script.poll_every + SLACK
    two_live_since: float | None = None
    for s in trace.steps:
        seen = s.after.seen
        healthy = {x.id for x in seen.targets if x.health == "healthy"} if seen else set()
        dereg = {c.instance_id for c in s.commands if isinstance(c, Deregister)}
        stops = {c.instance_id for c in s.commands if isinstance(c, Stop)}
        if dereg:
            assert healthy - dereg, f"inv1: t={s.t} {s.commands} leaves no healthy target of {healthy}"
        for sid in stops & standbys & healthy:
            assert healthy - stops - dereg, f"inv2: t={s.t} stops {sid}, the only healthy target"
        b, a = s.before, s.after
        if (a.phase, a.since, a.reason) != (b.phase, b.since, b.reason):
            assert a.since == s.t, f"inv5: t={s.t} phase {a.phase} since={a.since}"
            assert a.reason, f"inv5: t={s.t} phase {a.phase} with empty reason"
        # Counted from when both are `running`: EC2 cannot stop a `pending` instance
        # (IncorrectInstanceState), so a slow boot holds the second one that long.
        live = tuple(i.id for i in s.world.observed.standbys if i.state == "running")
        if len(live) >= 2:
            two_live_since = s.t if two_live_since is None else two_live_since
            assert s.t - two_live_since <= two_live_bound, (
                f"inv4: standbys {live} all running since t={two_live_since} (now {s.t})"
            )
        else:
            two_live_since = None


def check_world_safety(trace: Trace) -> None:
    """Invariant 1 against the real target group: a Deregister never empties it of healthy
    targets (the machine's own earlier commands count as knowledge)."""
    for s in trace.steps:
        if any(isinstance(c, Deregister) for c in s.commands):
            assert s.world.healthy() or not s.world_before.healthy(), (
                f"inv1(world): t={s.t} {s.event} -> {s.commands}: "
                f"healthy {set(s.world_before.healthy())} -> none"
            )


def grace(rules: Rules) -> float:
    if rules.on_rebalance == "prewarm":
        return max(rules.failback_grace, rules.rebalance_hold)
    return rules.failback_grace


def failback_horizon(rules: Rules, script: Script) -> int:
    """How long a healthy, un-noticed spot needs for every standby to end stopped."""
    t, poll, n = script.timing, script.poll_every, len(rules.standbys)
    starting = n * (rules.standby_ready_timeout + poll) + time_to_healthy(t, poll)
    spot_registered = poll + t.warmup + 3 * t.check_interval
    return int(starting + spot_registered + grace(rules) + t.dereg_delay + t.stop + 4 * poll + 2 * SLACK)


def quiet_since(trace: Trace) -> float:
    """The time of the last scripted disturbance (or of a notice reaching the machine)."""
    times = [m.until if m.until else m.t for m in trace.marks]
    times += [s.t for s in trace.steps if isinstance(s.event, Notice)]
    return max(times, default=0.0)


def spot_ok(snap) -> bool:
    return snap.spot is not None and snap.spot in snap.ready and not snap.noticed


def check_failback(trace: Trace) -> bool:
    """Invariant 3. Returns whether the script let it apply."""
    q = quiet_since(trace)
    t0 = None
    for s in reversed(trace.steps):
        if s.t < q or not spot_ok(s.world):
            break
        t0 = s.t
    if t0 is None or trace.end - t0 < failback_horizon(trace.rules, trace.script):
        return False
    final, world = trace.final, trace.world
    states = {i.id: i.state for i in world.observed.standbys}
    assert final.phase is Phase.SPOT_HEALTHY, f"inv3: spot healthy since t={t0}, phase {final.phase} ({final.reason})"
    assert set(states.values()) == {"stopped"}, f"inv3: spot healthy since t={t0}, standbys {states}"
    assert world.health(world.spot) == "healthy", f"inv3: spot {world.spot} target {world.health(world.spot)}"
    return True


def faults_of(trace: Trace) -> list[str]:
    script = trace.script
    return list(script.faults) + ["ok"] * (len(trace.rules.standbys) - len(script.faults))


def liveness_bound(trace: Trace, t_notice: float) -> float | None:
    """How long after a notice the guard may take to serve on a standby, or None when the
    script gives it no fair chance (no fault-free standby, or standby flaps/stops)."""
    rules, script = trace.rules, trace.script
    t, poll = script.timing, script.poll_every
    faults = faults_of(trace)
    timeouts = sum(rules.standby_ready_timeout + poll for f in faults if f in ("broken", "slow"))
    bound = poll + t.stop + time_to_healthy(t, poll) + SLACK
    if "ok" in faults:
        # Worst case: every broken/slow standby before it times out first.
        bound += sum(rules.standby_ready_timeout + poll
                     for f in faults[: faults.index("ok")] if f in ("broken", "slow"))
    elif "ice-once" in faults:
        # Every standby fails once; after the retry wait the ice-once one starts.
        bound += 2 * timeouts + RETRY_CAP + poll
    else:
        return None
    standby_ids = set(rules.standbys)
    for m in trace.marks:
        if m.kind in ("pause", "poll-gap", "restart") and m.t <= t_notice + bound and m.until >= t_notice:
            # A blind spot can make a good standby miss its ready timeout: allow a full
            # round of timeouts and the longest retry wait on top of the gap itself.
            bound += (m.until - m.t) + len(faults) * (rules.standby_ready_timeout + poll) + RETRY_CAP
    for m in trace.marks:
        if m.kind in ("flap", "ext-stop") and m.detail in standby_ids and m.t <= t_notice + bound:
            return None
    return bound if t_notice + bound <= trace.end else None


def check_liveness(trace: Trace) -> int:
    """After each interruption of a live spot, a standby serves within the bound, unless a
    new spot is healthy first (the machine then gives the failover up). Returns how many
    interruptions were checked."""
    checked = 0
    for m in trace.marks:
        if m.kind != "interrupt" or not m.detail:
            continue
        hit = next((s for s in trace.steps if s.t >= m.t), None)
        if hit is None or hit.world_before.spot != m.detail:
            continue
        inst = hit.world_before.instance(m.detail)
        if inst is None or not inst.notice:
            continue  # the interruption found the spot already gone or already noticed
        bound = liveness_bound(trace, m.t)
        if bound is None:
            continue
        ok = any(
            m.t <= s.t <= m.t + bound
            and (
                (s.after.phase in SERVING and s.after.standby is not None
                 and s.world.health(s.after.standby) == "healthy")
                # a spot serving again once the interruption has been carried out: a new
                # instance, or (stop behaviour) the same one started again
                or (s.t > m.t + trace.script.timing.notice_period and s.world.spot is not None
                    and s.world.health(s.world.spot) == "healthy")
            )
            for s in trace.steps
        )
        assert ok, f"liveness: interruption of {m.detail} at t={m.t}; no standby serving by t={m.t + bound}"
        checked += 1
    return checked


def check_duplicate_notices(trace: Trace) -> None:
    for s in trace.steps:
        if isinstance(s.event, Notice):
            again, commands = step(s.after, s.event, s.t)
            assert again == s.after and commands == (), f"duplicate {s.event} at t={s.t} changed {commands}"


# --------------------------------------------------------------------------- properties


def props(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def play(rules: Rules, script: Script, seed: int) -> Trace:
    note(f"rules={rules!r}")
    note(f"script={script!r}")
    note(f"seed={seed}")
    return run(rules, script, seed)


def safety_case(case: tuple[Rules, Script, int]) -> None:
    trace = play(*case)
    check_safety(trace)
    check_world_safety(trace)
    check_duplicate_notices(trace)


def failback_case(case: tuple[Rules, Script, int]) -> None:
    trace = play(*case)
    check_failback(trace)
    check_liveness(trace)


@props(300)
@given(scenarios(quiet_tail=False))
def test_safety_invariants_after_every_step(case):
    safety_case(case)


@props(200)
@given(scenarios())
def test_failback_and_liveness(case):
    failback_case(case)


@props(30)
@given(scenarios(quiet_tail=False))
def test_same_script_same_trace(case):
    first, second = run(*case), run(*case)
    assert first.steps == second.steps and first.marks == second.marks


@props(40)
@given(scenarios(quiet_tail=False), st.integers(1, 10**6))
def test_a_clock_step_back_leaves_no_remembered_time_in_the_future(case, back):
    """Whatever the step, timers count from now, not from a time that has not come yet
    (which would hold a standby, or a retry, for the length of the step); and the
    commands decided at the stepped-back time still keep invariant 1."""
    trace = play(*case)
    for s in trace.steps[:: max(1, len(trace.steps) // 25)]:
        now = s.t - back
        after, commands = step(s.before, s.event, now)
        remembered = (after.since, after.started_at, after.start_sent, after.unhealthy_since, after.prewarm_at,
                      after.outage_since)
        assert all(t is None or t <= now for t in remembered), f"t={s.t} stepped to {now}: {after}"
        dereg = {c.instance_id for c in commands if isinstance(c, Deregister)}
        healthy = {x.id for x in after.seen.targets if x.health == "healthy"} if after.seen else set()
        assert not dereg or healthy - dereg, f"inv1: t={s.t} stepped back: {commands}"


@props(40)
@given(scenarios(quiet_tail=False), st.sampled_from(["upcoming", "open", "closed"]))
def test_a_scheduled_change_only_ever_alerts(case, status):
    """An AWS Health scheduled change, whenever it comes and for whichever instance, changes
    no state and sends no command but an alert, and alerts only for this guard's own
    standbys and spots while the change is not over."""
    trace = play(*case)
    for s in trace.steps[:: max(1, len(trace.steps) // 25)]:
        state = s.after
        spots = {i.id for i in state.seen.spots} if state.seen else set()
        for iid in {*state.rules.standbys, *spots, "i-unknown"}:
            after, commands = step(state, Scheduled(iid, "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED", "w", status), s.t)
            assert after == state
            assert all(isinstance(c, Alert) for c in commands), commands
            ours = iid in state.rules.standbys or iid in spots
            assert len(commands) == (1 if ours and status != "closed" else 0), (iid, commands)


@st.composite
def terminations(draw) -> tuple[Rules, Script, int]:
    """A scenario in which a person terminates some standbys at random times."""
    rules, script, seed = draw(scenarios(quiet_tail=False))
    n = len(rules.standbys)
    kills = draw(st.lists(st.builds(TerminateStandby, at=st.integers(5, 800), index=st.integers(0, n - 1)),
                          min_size=1, max_size=n))
    return rules, replace(script, actions=script.actions + tuple(kills)), seed


@props(60)
@given(terminations())
def test_a_terminated_standby_is_said_once_and_never_started(case):
    """Safety holds; a standby seen gone is never sent StartInstances again; its loss is
    said once per daemon start (a restart forgets the last observation, so it may say it again)."""
    trace = run(*case, catch=True)
    note(f"case={case!r}")
    assert trace.error is None, trace.error
    check_safety(trace)
    check_world_safety(trace)
    restarts = sum(1 for m in trace.marks if m.kind == "restart")
    seen_gone: set[str] = set()
    for s in trace.steps:
        assert not any(isinstance(c, Start) and c.instance_id in seen_gone for c in s.commands), (
            f"t={s.t} starts a standby already seen gone: {s.commands}"
        )
        if s.after.seen is not None:
            seen_gone |= {i.id for i in s.after.seen.standbys if i.state in ("shutting-down", "terminated")}
    for sid in trace.rules.standbys:
        said = [a for a in trace.alerts() if a.startswith(f"standby {sid} is") and "fix standby_instance_ids" in a]
        assert len(said) <= 1 + restarts, f"{sid}: {said}"


# --------------------------------------------------------------------------- scenarios

A, B = "i-sb0", "i-sb1"


def served(trace: Trace) -> None:
    """Every scenario must also keep the invariants."""
    assert trace.error is None
    check_safety(trace)
    check_world_safety(trace)
    check_duplicate_notices(trace)


def first(trace: Trace, pred, after: float = -1.0):
    return next((s for s in trace.steps if s.t > after and pred(s)), None)


def test_full_cycle_failover_then_failback():
    rules = Rules(standbys=(A, B), failback_grace=120)
    trace = run(rules, Script(actions=(Interrupt(60, refill=30),), end=900))
    served(trace)
    assert trace.phases() == [
        Phase.SPOT_HEALTHY,
        Phase.STANDBY_STARTING,
        Phase.BOTH_SERVING,
        Phase.SPOT_RESTORED,
        Phase.STANDBY_DRAINING,
        Phase.SPOT_HEALTHY,
    ]
    cmds = [c for _, c in trace.commands()]
    assert cmds == [
        Start(A),
        Register(A),
        Deregister("i-spot0"),  # only once the standby is healthy
        Register("i-spot1"),
        Deregister(A),  # failback_grace after the new spot is healthy
        Stop(A),  # only once the drain is over
    ]
    restored = first(trace, lambda s: s.after.phase is Phase.SPOT_RESTORED)
    drained = first(trace, lambda s: s.after.phase is Phase.STANDBY_DRAINING)
    assert drained.t - restored.t == pytest.approx(rules.failback_grace, abs=trace.script.poll_every)
    assert trace.world.health("i-spot1") == "healthy"
    assert {i.state for i in trace.world.observed.standbys} == {"stopped"}


def test_interruption_during_spot_restored_serves_on_the_standby_again():
    rules = Rules(standbys=(A,), failback_grace=300)
    again = InterruptWhen(Phase.SPOT_RESTORED, after=20, refill=None)
    trace = run(rules, Script(actions=(Interrupt(60, refill=10), again), end=900))
    served(trace)
    second = [m for m in trace.marks if m.kind == "interrupt"][1]
    assert trace.at(second.t - 1).after.phase is Phase.SPOT_RESTORED
    back = first(trace, lambda s: s.after.phase is not Phase.SPOT_RESTORED, after=second.t)
    assert back.after.phase is Phase.BOTH_SERVING and back.after.standby == A
    assert back.t - second.t <= 2  # the SQS notice: no waiting for the standby, it already serves
    assert [c for _, c in trace.commands() if isinstance(c, Start)] == [Start(A)]
    assert trace.final.phase is Phase.BOTH_SERVING and trace.world.health(A) == "healthy"


def test_interruption_while_standby_drains_re_registers_it():
    rules = Rules(standbys=(A,), failback_grace=60)
    timing = Timing(dereg_delay=90)
    # Poll-only detection, as when this test was written: an SQS notice between polls
    # then hit bug 5 (pinned below).
    again = InterruptWhen(Phase.STANDBY_DRAINING, after=10, refill=None, deliver=())
    trace = run(rules, Script(timing=timing, actions=(Interrupt(60, refill=10), again), end=900))
    served(trace)
    second = [m for m in trace.marks if m.kind == "interrupt"][1]
    assert trace.at(second.t - 1).world.health(A) == "draining"
    later = [(t, c) for t, c in trace.commands() if t >= second.t]
    assert later[0] == (second.t, Register(A))
    assert Stop(A) not in [c for _, c in trace.commands()]
    serving = first(trace, lambda s: s.after.phase is Phase.BOTH_SERVING, after=second.t)
    assert serving is not None and serving.world.health(A) == "healthy"
    assert trace.final.phase is Phase.BOTH_SERVING


def test_interruption_while_standby_stops_waits_then_starts_it_again():
    rules = Rules(standbys=(A,), failback_grace=60)
    timing = Timing(dereg_delay=5, stop=40)
    again = InterruptWhen(Phase.STANDBY_DRAINING, after=15, refill=None, deliver=())
    trace = run(rules, Script(timing=timing, actions=(Interrupt(60, refill=10), again), end=900))
    served(trace)
    second = [m for m in trace.marks if m.kind == "interrupt"][1]
    assert trace.at(second.t - 1).world.instance(A).state == "stopping"
    restart = first(trace, lambda s: Start(A) in s.commands, after=second.t)
    assert restart is not None and restart.world_before.instance(A).state == "stopped"
    assert trace.final.phase is Phase.BOTH_SERVING and trace.world.health(A) == "healthy"


def test_ice_on_the_first_standby_uses_the_second():
    rules = Rules(standbys=(A, B))
    trace = run(rules, Script(faults=("ice", "ok"), actions=(Interrupt(60, refill=None),), end=600))
    served(trace)
    cmds = [c for _, c in trace.commands()]
    assert [c for c in cmds if isinstance(c, Start)] == [Start(A), Start(B)]
    assert any(isinstance(c, Alert) and A in c.text and "InsufficientInstanceCapacity" in c.text for c in cmds)
    assert trace.final.phase is Phase.BOTH_SERVING and trace.final.standby == B
    assert trace.world.instance(A).state == "stopped" and trace.world.health(B) == "healthy"


@pytest.mark.parametrize("register_when", ["ready", "running"])
def test_ready_timeout_gives_way_to_the_next_standby_and_stops_the_first(register_when):
    rules = Rules(standbys=(A, B), standby_ready_timeout=100, register_when=register_when)
    trace = run(rules, Script(faults=("broken", "ok"), actions=(Interrupt(60, refill=None),), end=900))
    served(trace)
    gave_up = first(trace, lambda s: Start(B) in s.commands)
    assert gave_up.t == pytest.approx(60 + rules.standby_ready_timeout, abs=trace.script.poll_every)
    assert any(isinstance(c, Alert) and A in c.text and "not healthy" in c.text for c in gave_up.commands)
    stopped = first(trace, lambda s: Stop(A) in s.commands)
    if register_when == "running":
        assert Deregister(A) in gave_up.commands  # the doomed spot still serves: draining A is safe
        assert stopped is not None and stopped.t > gave_up.t
    else:
        # Its probe never passed, so it never joined the group: stopped at once, nothing to drain.
        assert not any(Register(A) in s.commands or Deregister(A) in s.commands for s in trace.steps)
        assert stopped is gave_up
    assert trace.final.phase is Phase.BOTH_SERVING and trace.final.standby == B
    assert trace.world.instance(A).state == "stopped" and trace.world.health(B) == "healthy"


def test_rebalance_with_prewarm_starts_the_standby_and_drains_it_after_the_hold():
    rules = Rules(standbys=(A,), on_rebalance="prewarm", rebalance_hold=300, failback_grace=600)
    trace = run(rules, Script(actions=(Rebalance(50, deliver=(1,)),), end=900))
    served(trace)
    # The spot is healthy all along, so the step that sees the standby healthy passes
    # through both-serving straight to spot-restored (phases() lists phases after steps).
    assert trace.phases() == [
        Phase.SPOT_HEALTHY,
        Phase.STANDBY_STARTING,
        Phase.SPOT_RESTORED,
        Phase.STANDBY_DRAINING,
        Phase.SPOT_HEALTHY,
    ]
    assert [c for _, c in trace.commands()] == [Start(A), Register(A), Deregister(A), Stop(A)]
    drained = first(trace, lambda s: s.after.phase is Phase.STANDBY_DRAINING)
    assert drained.t == pytest.approx(51 + rules.rebalance_hold, abs=trace.script.poll_every)
    assert trace.world.health("i-spot0") == "healthy"  # the spot was never touched
    assert trace.world.instance(A).state == "stopped"


def test_rebalance_with_ignore_only_alerts():
    rules = Rules(standbys=(A,), on_rebalance="ignore")
    trace = run(rules, Script(actions=(Rebalance(50, deliver=(1, 2, 30)),), end=400))
    served(trace)
    assert [c for _, c in trace.commands()] == [
        Alert("rebalance recommendation for spot i-spot0; on_rebalance=ignore, no action")]
    assert trace.phases() == [Phase.SPOT_HEALTHY]


def test_two_interruptions_in_one_minute():
    rules = Rules(standbys=(A,), failback_grace=120)
    again = InterruptWhen(Phase.SPOT_RESTORED, after=0, refill=20)
    trace = run(rules, Script(actions=(Interrupt(30, refill=0), again), end=1500))
    served(trace)
    starts = [c for _, c in trace.commands() if isinstance(c, Start)]
    assert starts == [Start(A)]  # the standby serves through both
    assert trace.final.phase is Phase.SPOT_HEALTHY and trace.world.instance(A).state == "stopped"
    assert trace.world.health("i-spot2") == "healthy"


def test_stray_and_duplicate_notices_change_nothing():
    rules = Rules(standbys=(A,))
    acts = (
        StrayNotice(40, "i-unknown"),
        StrayNotice(41, A),
        StrayNotice(42, A, "rebalance"),
        StrayNotice(43, "i-unknown"),
    )
    trace = run(rules, Script(actions=acts, end=300))
    served(trace)
    assert trace.commands() == [] and trace.phases() == [Phase.SPOT_HEALTHY]


def test_late_notice_for_a_replaced_spot_changes_nothing():
    rules = Rules(standbys=(A,), failback_grace=60)
    late = StrayNotice(700, LATE)  # i-spot0, long gone; i-spot1 serves
    trace = run(rules, Script(actions=(Interrupt(30, refill=0), late), end=900))
    served(trace)
    assert any(m.kind == "stray" and m.detail == "i-spot0" for m in trace.marks)
    assert [t for t, _ in trace.commands() if t >= 700] == []
    assert trace.final.phase is Phase.SPOT_HEALTHY


# --------------------------------------------------------------------------- fixed bugs
#
# Each test below is the smallest event sequence found for one machine bug, now fixed:
# the comments tell what the machine did then, the assertions what it must do.

S0, S1 = "i-s0", "i-s1"


def spot(iid: str, state: str = "running", notice: bool = False) -> Instance:
    return Instance(iid, state, notice, probe=READY if state == "running" else SILENT)


def sb(iid: str, state: str) -> Instance:
    """A standby whose service answers its health check whenever it runs (readiness has its own tests)."""
    return Instance(iid, state, probe=READY if state == "running" else SILENT)


def tg(*pairs: str) -> tuple[Target, ...]:
    """tg("i-s0:healthy", "i-sb0:draining")"""
    return tuple(Target(*p.split(":")) for p in pairs)


def all_commands(results, since: float, events) -> list:
    return [c for (t, _), (_, cmds) in zip(events, results) if t >= since for c in cmds]


def test_bug1_standby_stopping_behind_a_healthy_target():
    rules = Rules(standbys=(A,))
    events = [
        # Failover straight to an already healthy standby: both-serving, Deregister(i-s0).
        (0, Observed((spot(S0, notice=True),), (sb(A, "running"),), tg(f"{S0}:healthy", f"{A}:healthy"))),
        # A person stops the standby; the ALB has not run a check since: still `healthy`.
        # both-serving -> _failover -> _serve -> _decide_serving -> _failover -> ...
        (10, Observed((spot(S0, notice=True),), (sb(A, "stopping"),), tg(f"{S0}:draining", f"{A}:healthy"))),
    ]
    state, _ = replay(rules, events)[-1]
    assert state.phase is not Phase.BOTH_SERVING  # it cannot serve on a stopping standby


def test_bug2_new_spot_left_unregistered_while_no_standby_starts():
    rules = Rules(standbys=(A,))
    events = [
        (0, Observed((spot(S0, notice=True),), (sb(A, "stopped"),), tg(f"{S0}:healthy"))),  # Start(A)
        (0, Failed(Start(A), "InsufficientInstanceCapacity")),  # all failed, retry in 30 s
        # The old spot is gone, the request was fulfilled again: a running spot and an
        # empty target group. The machine retries Start(A) forever and leaves i-s1 out.
        (200, Observed((spot(S1),), (sb(A, "stopped"),), ())),
    ]
    results = replay(rules, events)
    assert Register(S1) in results[-1][1]


def test_bug2_healthy_spot_does_not_end_a_failover_whose_standby_never_gets_healthy():
    rules = Rules(standbys=(A,), standby_ready_timeout=120, failback_grace=60)
    events = [
        (0, Observed((spot(S0, notice=True),), (sb(A, "stopped"),), tg(f"{S0}:healthy"))),  # Start(A)
        (20, Observed((spot(S0, notice=True),), (sb(A, "running"),), tg(f"{S0}:healthy"))),  # Register(A)
    ]
    # From t=200 on a new spot serves; A never passes a health check.
    events += [
        (t, Observed((spot(S1),), (sb(A, "running"),), tg(f"{S1}:healthy", f"{A}:unhealthy")))
        for t in range(200, 1400, 20)
    ]
    results = replay(rules, events)
    assert any(c in (Deregister(A), Stop(A)) for c in all_commands(results, 200, events))
    # The replayed world never carries the commands out: the guard stays in draining,
    # asking again for A (still registered here) to go.
    assert results[-1][0].phase is Phase.STANDBY_DRAINING and results[-1][1] == (Deregister(A),)


def test_bug3_given_up_standby_is_not_stopped_while_nothing_is_healthy():
    # At a 60 s poll the 110 s between the observations below count as watched time.
    rules = Rules(standbys=(A, B), standby_ready_timeout=120, poll_interval=60)
    events = [
        (0, Observed((spot(S0, notice=True),), (sb(A, "stopped"), sb(B, "stopped")), tg(f"{S0}:healthy"))),  # Start(A)
        (20, Observed((spot(S0, notice=True),), (sb(A, "running"), sb(B, "stopped")),
                      tg(f"{S0}:healthy"))),  # Register(A)
        # Ready timeout, the spot is gone: Start(B), but A (registered, unhealthy) runs on:
        # _tidy_other_standbys only deregisters a registered standby, and _deregister
        # refuses whenever no target is healthy, even when A itself is not healthy.
        (130, Observed((spot(S0, "terminated"),), (sb(A, "running"), sb(B, "stopped")), tg(f"{A}:unhealthy"))),
        (140, Observed((spot(S0, "terminated"),), (sb(A, "running"), sb(B, "pending")), tg(f"{A}:unhealthy"))),
        (160, Observed((spot(S0, "terminated"),), (sb(A, "running"), sb(B, "running")), tg(f"{A}:unhealthy"))),
    ]
    results = replay(rules, events)
    assert any(c in (Deregister(A), Stop(A)) for c in all_commands(results, 130, events))


def test_bug4_repicked_running_standby_never_times_out():
    rules = Rules(standbys=(A, B), standby_ready_timeout=120)
    events = [
        (0, Observed((spot(S0, notice=True),), (sb(A, "stopped"), sb(B, "stopped")), tg(f"{S0}:healthy"))),  # Start(A)
        (20, Observed((spot(S0, notice=True),), (sb(A, "running"), sb(B, "stopped")),
                      tg(f"{S0}:healthy"))),  # Register(A)
        # Ready timeout while the doomed spot still serves: Deregister(A), Start(B) ...
        (125, Observed((spot(S0, notice=True),), (sb(A, "running"), sb(B, "stopped")),
                       tg(f"{S0}:healthy", f"{A}:unhealthy"))),
        (125, Failed(Start(B), "InsufficientInstanceCapacity")),  # ... B has no capacity: all failed
        # Retry after 30 s: _pick prefers the running A, with started_at=None (from _give_up).
        (155, Observed((spot(S0, "terminated"),), (sb(A, "running"), sb(B, "stopped")), ())),
    ]
    events += [
        (t, Observed((spot(S0, "terminated"),), (sb(A, "running"), sb(B, "stopped")), tg(f"{A}:unhealthy")))
        for t in range(160, 1000, 20)
    ]
    results = replay(rules, events)
    later = all_commands(results, 156, events)
    # By 155 + ready timeout the guard must give up on A again (alert) and try B again.
    assert Start(B) in later or any(isinstance(c, Alert) and A in c.text for c in later)


def test_bug5_notice_while_standby_starts_draining_deregisters_the_last_healthy_target():
    rules = Rules(standbys=(A,), failback_grace=60)
    events = [
        (0, Observed((spot(S0, notice=True),), (sb(A, "stopped"),), tg(f"{S0}:healthy"))),  # Start(A)
        (20, Observed((spot(S0, notice=True),), (sb(A, "running"),), tg(f"{S0}:healthy"))),  # Register(A)
        (40, Observed((spot(S0, notice=True),), (sb(A, "running"),),
                      tg(f"{S0}:healthy", f"{A}:healthy"))),  # Deregister(S0)
        (200, Observed((spot(S1),), (sb(A, "running"),), tg(f"{S1}:healthy", f"{A}:healthy"))),  # spot-restored
        (260, Observed((spot(S1),), (sb(A, "running"),), tg(f"{S1}:healthy", f"{A}:healthy"))),  # grace: Deregister(A)
        # SQS notice for the new spot before the next poll (the daemon steps notices before
        # the round's Observed). seen still says A healthy, so the machine fails over to A,
        # deregisters S1 and does not re-register A: both targets drain, none is healthy.
        (261, Notice(S1)),
    ]
    results = replay(rules, events)
    assert results[-2][1] == (Deregister(A),)
    assert Deregister(S1) not in results[-1][1]


def test_bug5_notice_during_a_poll_outage_deregisters_the_only_healthy_target():
    rules = Rules(standbys=(A, B), standby_ready_timeout=32)
    timing = Timing(boot=5, warmup=0, stop=5, shutdown=1, check_interval=5, dereg_delay=0)
    acts = (
        Interrupt(8, refill=None, deliver=()),  # seen by the poll at t=8: Start(A)
        PollGap(17, duration=114),  # Describe* fail from t=17 on: the last picture has A `initial`
        StrayNotice(130, "i-unknown"),  # any notice: timers fire against the t=16 picture
    )
    trace = run(rules, Script(timing=timing, actions=acts, poll_every=1, end=300))
    step130 = first(trace, lambda s: isinstance(s.event, Notice))
    # A has been healthy for ~100 s and the spot is gone; the machine gives up on A as
    # "not healthy after 32s" and deregisters it: nothing healthy is left.
    assert step130.world_before.healthy() == {A}
    assert Deregister(A) not in step130.commands


def test_bug6_standby_given_up_on_ice_is_never_retried():
    rules = Rules(standbys=(A, B), standby_ready_timeout=120)
    events = [
        (0, Observed((spot(S0, notice=True),), (sb(A, "stopped"), sb(B, "stopped")), tg(f"{S0}:healthy"))),  # Start(A)
        (0, Failed(Start(A), "InsufficientInstanceCapacity")),  # give up A: Start(B)
        (20, Observed((spot(S0, notice=True),), (sb(A, "stopped"), sb(B, "running")),
                      tg(f"{S0}:healthy"))),  # Register(B)
    ]
    # B never gets healthy. At its ready timeout _ready_timeout finds no other standby
    # (A is in `failed`) and keeps B, re-arming its timer forever; A, whose capacity
    # problem may long be over, is never tried again (the all-failed retry never comes).
    events += [
        (t, Observed((spot(S0, "terminated"),), (sb(A, "stopped"), sb(B, "running")), tg(f"{B}:unhealthy")))
        for t in range(140, 1500, 20)
    ]
    results = replay(rules, events)
    assert Start(A) in all_commands(results, 140, events)


def test_bug7_spot_with_stop_behaviour_is_never_used_again():
    rules = Rules(standbys=(A,))
    events = [
        (0, Observed((spot(S0, notice=True),), (sb(A, "stopped"),), tg(f"{S0}:healthy"))),  # Start(A)
        (20, Observed((spot(S0, notice=True),), (sb(A, "running"),), tg(f"{S0}:healthy"))),  # Register(A)
        (40, Observed((spot(S0, notice=True),), (sb(A, "running"),),
                      tg(f"{S0}:healthy", f"{A}:healthy"))),  # Deregister(S0)
        # Interruption behaviour "stop" (status marked-for-stop): the same instance stops ...
        (130, Observed((spot(S0, "stopped"),), (sb(A, "running"),), tg(f"{A}:healthy"))),
        # ... and the persistent request starts it again: same id, no notice.
        (300, Observed((spot(S0),), (sb(A, "running"),), tg(f"{A}:healthy"))),
    ]
    results = replay(rules, events)
    assert Register(S0) in results[-1][1]


def test_bug8_standby_healthy_just_after_its_timeout_is_ignored():
    rules = Rules(standbys=(A, B), standby_ready_timeout=120)
    events = [
        (0, Observed((spot(S0, notice=True),), (sb(A, "stopped"), sb(B, "stopped")), tg(f"{S0}:healthy"))),  # Start(A)
        (96, Observed((spot(S0, notice=True),), (sb(A, "running"), sb(B, "stopped")),
                      tg(f"{S0}:healthy"))),  # Register(A)
        # (A poll outage delayed the registration.) Ready timeout: Start(B).
        (125, Observed((spot(S0, "shutting-down"),), (sb(A, "running"), sb(B, "stopped")), tg(f"{A}:initial"))),
        # One check later A is healthy and serves alone; B is broken.
        (126, Observed((spot(S0, "terminated"),), (sb(A, "running"), sb(B, "pending")), tg(f"{A}:healthy"))),
    ]
    events += [
        (t, Observed((spot(S0, "terminated"),), (sb(A, "running"), sb(B, "running")),
                     tg(f"{A}:healthy", f"{B}:unhealthy")))
        for t in range(130, 1000, 20)
    ]
    results = replay(rules, events)
    # The guard should serve on the healthy A (and stop B); it waits on B forever, re-arming
    # B's timer (bug 6) while both On-Demand instances run.
    assert any(state.phase is Phase.BOTH_SERVING for state, _ in results)
    # B is registered (unhealthy) in the replayed world and A is healthy: B is drained.
    assert Deregister(B) in all_commands(results, 126, events)


def test_bug1_via_the_sim():
    rules = Rules(standbys=(A,))
    trace = run(rules, Script(actions=(Interrupt(30, refill=None), ExternalStop(300, 0)), end=600), catch=True)
    assert trace.error is None


# --------------------------------------------------------------------------- several guards: ownership

# Guard A owns its spot and its standby; guard B's config wrongly names them too (A's spot
# as a standby, as issue 21 reproduced; A's spot found by B's broader tag selector too).
A_SPOT, A_STANDBY = "i-a0000000000000001", "i-a0000000000000002"
B_SPOT, B_STANDBY = "i-b0000000000000001", "i-b0000000000000002"
FOREIGN = frozenset({A_SPOT, A_STANDBY})
B_RULES = Rules(standbys=(A_SPOT, B_STANDBY), failback_grace=30, standby_ready_timeout=40, unhealthy_grace=10,
                rebalance_hold=30)
STATES = ["pending", "running", "stopping", "stopped", "shutting-down", "terminated"]
HEALTH = ["initial", "healthy", "unhealthy", "unused", "draining"]


@st.composite
def b_observations(draw) -> Observed:
    """What B's poll could show: its own spot, maybe A's spot (a broader tag selector), both
    standbys (one of them A's spot), and any targets in B's group, A's instances included."""
    spots = [Instance(B_SPOT, draw(st.sampled_from(STATES)), draw(st.booleans()))]
    if draw(st.booleans()):
        spots.append(Instance(A_SPOT, draw(st.sampled_from(STATES)), draw(st.booleans())))
    standbys = (Instance(A_SPOT, draw(st.sampled_from(STATES))), Instance(B_STANDBY, draw(st.sampled_from(STATES))))
    ids = draw(st.lists(st.sampled_from([A_SPOT, A_STANDBY, B_SPOT, B_STANDBY]), unique=True))
    targets = tuple(Target(i, draw(st.sampled_from(HEALTH))) for i in ids)
    disputed = frozenset({A_SPOT})  # B claims it (standby, maybe spot) but A owns it
    return Observed(spots=tuple(spots), standbys=standbys, targets=targets, foreign=FOREIGN, disputed=disputed)


b_events = st.one_of(
    b_observations(),
    st.builds(Notice, st.sampled_from([A_SPOT, A_STANDBY, B_SPOT, B_STANDBY]),
              st.sampled_from(["interruption", "rebalance", "terminating"])),
    st.builds(Scheduled, st.sampled_from([A_SPOT, A_STANDBY, B_SPOT, B_STANDBY]),
              st.just("AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED"), st.just("w"),
              st.sampled_from(["upcoming", "open", "closed"])),
    st.builds(Failed, st.builds(Start, st.sampled_from([A_SPOT, B_STANDBY])),
              st.sampled_from(["InsufficientInstanceCapacity", "RequestLimitExceeded"])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(1, 120), b_events), min_size=1, max_size=60))
def test_no_command_ever_names_another_guards_instance(events):
    """Issue 21: B's standby list named A's spot, and B stopped A's serving spot after its grace."""
    t, state, alerted = 0.0, initial(B_RULES, 0.0), False
    for gap, event in events:
        t += gap
        state, commands = step(state, event, t)
        named = [c for c in commands if not isinstance(c, Alert) and c.instance_id in FOREIGN]
        assert named == [], (event, commands)
        alerted |= any(isinstance(c, Alert) and A_SPOT in c.text and "another guard" in c.text for c in commands)
    if any(isinstance(e, Observed) for _, e in events):
        assert alerted  # the disputed standby is said, once the guard has seen it


def _decisions(trace: Trace) -> list:
    """Every step that commanded something or changed the state, as (t, event, commands, state)."""
    def plain(state):
        return replace(state, watched=None)
    return [(s.t, s.event, s.commands, plain(s.after)) for s in trace.steps
            if s.commands or plain(s.after) != plain(s.before)]


@props(60)
@given(scenarios(quiet_tail=False))
def test_leaping_plays_what_every_second_plays(case):
    """The leaps `simulate` takes (the world's quiet seconds, the polls that change nothing
    before machine.next_due) decide exactly what a second-by-second play decides."""
    rules, script, seed = case
    with patch.object(World, "next_change", lambda world: world.now + 1):
        slow = run(rules, replace(script, leap=False), seed)
    fast = play(rules, replace(script, leap=True), seed)
    assert _decisions(fast) == _decisions(slow)
    assert (fast.running, fast.dark, fast.log) == (slow.running, slow.dark, slow.log)
