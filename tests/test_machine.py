"""Table tests: every rule of the phase table in design.md, one row each."""

from dataclasses import replace

import pytest

from spotguard import machine
from spotguard.machine import (
    Alert,
    Deregister,
    Failed,
    GuardState,
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

RULES = Rules(
    standbys=("i-s1", "i-s2"),
    failback_grace=600,
    standby_ready_timeout=300,
    unhealthy_grace=30,
    rebalance_hold=1800,
)
S, P, H, D = Phase.SPOT_HEALTHY, Phase.STANDBY_STARTING, Phase.BOTH_SERVING, Phase.SPOT_RESTORED
DR = Phase.STANDBY_DRAINING


def world(spots="", standbys="s1:stopped s2:stopped", targets=""):
    """A compact Observed: `spots` like "a:running! b:running" (! = notice), targets "a:healthy"."""

    def inst(word, notice=False):
        iid, state = word.split(":")
        state = state.rstrip("!")
        # Every running instance here answers its health check (readiness has its own tests).
        probe = machine.READY if state == "running" else machine.SILENT
        return Instance(f"i-{iid}", state, notice=word.endswith("!"), probe=probe)

    return Observed(
        spots=tuple(inst(w) for w in spots.split()),
        standbys=tuple(inst(w) for w in standbys.split()),
        targets=tuple(Target(f"i-{w.split(':')[0]}", w.split(":")[1]) for w in targets.split()),
    )


def at(phase, seen, **kw):
    """A guard in `phase` since t=0 that has already observed `seen` (and its notices)."""
    flagged = frozenset(i.id for i in seen.spots if i.notice)
    kw["doomed"] = kw.get("doomed", frozenset()) | flagged
    return GuardState(rules=kw.pop("rules", RULES), phase=phase, since=0.0, reason="test", seen=seen, **kw)


HEALTHY_SPOT = world("a:running", targets="a:healthy")
DOWN = Alert("no healthy target in the target group: the service is down")

# (name, state, event, now, expected phase, expected commands)
ROWS = [
    # --- spot-healthy
    ("steady", at(S, HEALTHY_SPOT), HEALTHY_SPOT, 10, S, ()),
    ("notice by sqs", at(S, HEALTHY_SPOT), Notice("i-a"), 10, P, (Start("i-s1"),)),
    ("notice by poll", at(S, HEALTHY_SPOT), world("a:running!", targets="a:healthy"), 10, P, (Start("i-s1"),)),
    ("spot gone", at(S, HEALTHY_SPOT), world("", targets="a:unused"), 10, P, (Start("i-s1"), DOWN)),
    ("spot stopping", at(S, HEALTHY_SPOT), world("a:stopping", targets="a:unhealthy"), 10, P, (Start("i-s1"), DOWN)),
    (
        "unhealthy within grace",
        at(S, HEALTHY_SPOT, unhealthy_since=0.0),
        world("a:running", targets="a:unhealthy"),
        29,
        S,
        (DOWN,),
    ),
    (
        "unhealthy past grace",
        at(S, HEALTHY_SPOT, unhealthy_since=0.0),
        world("a:running", targets="a:unhealthy"),
        30,
        P,
        (Start("i-s1"), DOWN),
    ),
    ("new spot registered", at(S, world()), world("a:running"), 10, S, (Register("i-a"), DOWN)),
    (
        "rebalance ignored",
        at(S, HEALTHY_SPOT),
        Notice("i-a", "rebalance"),
        10,
        S,
        (Alert("rebalance recommendation for spot i-a; on_rebalance=ignore, no action"),),
    ),
    (
        "rebalance prewarm",
        at(S, HEALTHY_SPOT, rules=replace(RULES, on_rebalance="prewarm")),
        Notice("i-a", "rebalance"),
        10,
        P,
        (Start("i-s1"),),
    ),
    (
        "stray standby gets the grace, and people hear so",
        at(S, HEALTHY_SPOT),
        world("a:running", "s1:running s2:stopped", "a:healthy s1:healthy"),
        10,
        D,
        (Alert("standby i-s1 is running outside a failover: spotguard drains and stops it after failback_grace "
               "(600s) unless it is taken out of standby_instance_ids"),),
    ),
    (
        "a standby being rehearsed is no stray",
        at(S, HEALTHY_SPOT),
        replace(world("a:running", "s1:running s2:stopped", "a:healthy s1:healthy"), rehearsing=frozenset({"i-s1"})),
        10,
        S,
        (),
    ),
    (
        "a notice mid-rehearsal takes the warm rehearsed standby",
        at(S, replace(world("a:running", "s1:running s2:stopped", "a:healthy s1:healthy"),
                      rehearsing=frozenset({"i-s1"}))),
        Notice("i-a"),
        10,
        H,
        (),
    ),
    ("notice for a standby ignored", at(S, HEALTHY_SPOT), Notice("i-s1"), 10, S, ()),
    ("auto scaling terminating the spot: an early notice", at(S, HEALTHY_SPOT), Notice("i-a", "terminating"), 10, P,
     (Start("i-s1"),)),
    ("auto scaling terminating a standby: ignored", at(S, HEALTHY_SPOT), Notice("i-s2", "terminating"), 10, S, ()),
    (
        "scheduled change for a standby: said, nothing done",
        at(S, HEALTHY_SPOT),
        Scheduled("i-s2", "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED", "W"),
        10,
        S,
        (Alert("standby i-s2 has a scheduled AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED (W): it may not start for a "
               "failover then: see its scheduled events in the EC2 console, and replace it in standby_instance_ids "
               "if it cannot serve"),),
    ),
    (
        "scheduled change for the spot: said, the failover waits for its notice",
        at(S, HEALTHY_SPOT),
        Scheduled("i-a", "AWS_EC2_SYSTEM_MAINTENANCE_EVENT", "W", "open"),
        10,
        S,
        (Alert("spot i-a has a scheduled AWS_EC2_SYSTEM_MAINTENANCE_EVENT (W): EC2 will act on it then; spotguard "
               "fails over when its notice comes or the spot goes"),),
    ),
    ("scheduled change that is over: quiet", at(S, HEALTHY_SPOT),
     Scheduled("i-s1", "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED", "W", "closed"), 10, S, ()),
    ("scheduled change for someone else's instance: quiet", at(S, HEALTHY_SPOT),
     Scheduled("i-zz", "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED", "W"), 10, S, ()),
    ("scheduled change for a standby another guard owns: quiet",
     at(S, replace(HEALTHY_SPOT, foreign=frozenset({"i-s2"}))),
     Scheduled("i-s2", "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED", "W"), 10, S, ()),
    (
        "stopped standby left registered: deregistered",
        at(S, HEALTHY_SPOT),
        world("a:running", "s1:stopped s2:stopped", "a:healthy s1:unused"),
        10,
        S,
        (Deregister("i-s1"),),
    ),
    # --- standby-starting
    (
        "booting: wait",
        at(P, world("a:running!", "s1:pending s2:stopped", "a:healthy"), standby="i-s1", started_at=0.0,
           start_sent=0.0),
        world("a:running!", "s1:pending s2:stopped", "a:healthy"),
        5,
        P,
        (),
    ),
    (
        "running: register",
        at(P, world(), standby="i-s1", started_at=0.0, start_sent=0.0, doomed=frozenset({"i-a"})),
        world("a:running!", "s1:running s2:stopped", "a:healthy"),
        20,
        P,
        (Register("i-s1"),),
    ),
    (
        "registered, initial: wait (spot not deregistered)",
        at(P, world(), standby="i-s1", started_at=0.0, start_sent=0.0),
        world("a:running!", "s1:running s2:stopped", "a:healthy s1:initial"),
        25,
        P,
        (),
    ),
    (
        "standby healthy: doomed spot drains",
        at(P, world(), standby="i-s1", started_at=0.0, start_sent=0.0),
        world("a:running!", "s1:running s2:stopped", "a:healthy s1:healthy"),
        40,
        H,
        (Deregister("i-a"),),
    ),
    (
        "ICE: next standby",
        at(P, world("a:running!", "s1:stopped s2:stopped", "a:healthy"), standby="i-s1", started_at=0.0,
           start_sent=0.0),
        Failed(Start("i-s1"), "InsufficientInstanceCapacity"),
        1,
        P,
        (
            Alert("standby i-s1 could not start (InsufficientInstanceCapacity); trying the next standby"),
            Start("i-s2"),
        ),
    ),
    (
        "throttled start: nothing new",
        at(P, world("a:running!", "s1:stopped s2:stopped", "a:healthy"), standby="i-s1", started_at=0.0,
           start_sent=0.0),
        Failed(Start("i-s1"), "RequestLimitExceeded"),
        1,
        P,
        (),
    ),
    (
        "stopping standby: wait, then start",
        at(P, world(), standby="i-s1"),
        world("a:running!", "s1:stopping s2:stopped", "a:healthy"),
        1,
        P,
        (),
    ),
    (
        "ready timeout: next standby, first stopped",
        at(P, world(), standby="i-s1", started_at=0.0, start_sent=0.0),
        world("a:running!", "s1:running s2:stopped", "a:healthy s1:unhealthy"),
        300,
        P,
        (Alert("standby i-s1 not healthy after 300s"), Deregister("i-s1"), Start("i-s2")),
    ),
    # --- both-serving
    (
        "serving: nothing to do",
        at(H, world(), standby="i-s1", doomed=frozenset({"i-a"})),
        world("a:running!", "s1:running s2:stopped", "a:draining s1:healthy"),
        50,
        H,
        (),
    ),
    (
        "new spot: register",
        at(H, world(), standby="i-s1"),
        world("b:running", "s1:running s2:stopped", "s1:healthy"),
        300,
        H,
        (Register("i-b"),),
    ),
    (
        "new spot healthy: grace starts",
        at(H, world(), standby="i-s1"),
        world("b:running", "s1:running s2:stopped", "s1:healthy b:healthy"),
        310,
        D,
        (),
    ),
    (
        "standby stopped by hand: start again",
        at(H, world(), standby="i-s1"),
        world("", "s1:stopped s2:stopped", ""),
        310,
        P,
        (Start("i-s1"), DOWN),
    ),
    # --- spot-restored
    (
        "within grace",
        at(D, world(), standby="i-s1"),
        world("b:running", "s1:running s2:stopped", "s1:healthy b:healthy"),
        599,
        D,
        (),
    ),
    (
        "grace passed: drain standby",
        at(D, world(), standby="i-s1"),
        world("b:running", "s1:running s2:stopped", "s1:healthy b:healthy"),
        600,
        DR,
        (Deregister("i-s1"),),
    ),
    (
        "notice during grace",
        at(D, world(), standby="i-s1"),
        world("b:running!", "s1:running s2:stopped", "s1:healthy b:healthy"),
        100,
        H,
        (Deregister("i-b"),),
    ),
    # --- standby-draining
    (
        "draining: wait",
        at(DR, world(), standby="i-s1"),
        world("b:running", "s1:running s2:stopped", "s1:draining b:healthy"),
        650,
        DR,
        (),
    ),
    (
        "drained: stop",
        at(DR, world(), standby="i-s1"),
        world("b:running", "s1:running s2:stopped", "b:healthy"),
        700,
        DR,
        (Stop("i-s1"),),
    ),
    (
        "stopped: back to spot-healthy",
        at(DR, world(), standby="i-s1"),
        world("b:running", "s1:stopped s2:stopped", "b:healthy"),
        710,
        S,
        (),
    ),
    (
        "notice while draining: re-register",
        at(DR, world(), standby="i-s1"),
        world("b:running!", "s1:running s2:stopped", "s1:draining b:healthy"),
        660,
        P,
        (Register("i-s1"),),
    ),
    (
        "notice while stopping: wait for stopped",
        at(DR, world(), standby="i-s1"),
        world("b:running!", "s1:stopping s2:stopped", "b:healthy"),
        705,
        P,
        (),
    ),
    (
        "crash before deregister: deregister again",
        at(DR, world(), standby="i-s1"),
        world("b:running", "s1:running s2:stopped", "s1:healthy b:healthy"),
        650,
        DR,
        (Deregister("i-s1"),),
    ),
]


@pytest.mark.parametrize("name,state,event,now,phase,commands", ROWS, ids=[r[0] for r in ROWS])
def test_rule(name, state, event, now, phase, commands):
    new, cmds = step(state, event, now)
    assert new.phase is phase
    assert cmds == commands
    if new.phase is not state.phase:
        assert new.since == now and new.reason


@pytest.mark.fault(fault="notice delivered twice", phase="spot-healthy", outcome="the second changes nothing")
def test_duplicate_notice_changes_nothing():
    state, _ = step(at(S, HEALTHY_SPOT), Notice("i-a"), 10)
    again, cmds = step(state, Notice("i-a"), 11)
    assert again == state and cmds == ()


def test_never_deregisters_last_healthy_target():
    # The doomed spot is the only healthy target and the standby is not healthy yet.
    state = at(H, world(), standby="i-s1", doomed=frozenset({"i-a"}))
    new, cmds = step(state, world("a:running!", "s1:running s2:stopped", "a:healthy s1:unhealthy"), 5)
    assert Deregister("i-a") not in cmds


def test_never_stops_standby_that_is_the_only_healthy_target():
    state = at(DR, world(), standby="i-s1")
    _, cmds = step(state, world("b:running", "s1:running s2:stopped", "s1:healthy b:unhealthy"), 700)
    assert not any(isinstance(c, (Stop, Deregister)) for c in cmds)


def test_all_standbys_fail_then_retry_with_backoff():
    state = at(P, world("a:running!", "s1:stopped s2:stopped", "a:healthy"), standby="i-s1", start_sent=0.0)
    state, _ = step(state, Failed(Start("i-s1"), "InsufficientInstanceCapacity"), 1)
    state, cmds = step(state, Failed(Start("i-s2"), "InsufficientInstanceCapacity"), 2)
    assert cmds[-1] == Alert("no standby could start; retrying in 30s")
    same = world("a:running!", "s1:stopped s2:stopped", "a:healthy")
    state, cmds = step(state, same, 20)
    assert cmds == ()
    state, cmds = step(state, same, 32)
    assert cmds == (Start("i-s1"),)


@pytest.mark.fault(fault="notice before the first poll", phase="spot-healthy",
                   outcome="remembered; failover on the first observation")
def test_nothing_decided_before_first_observation():
    state, cmds = step(initial(RULES), Notice("i-a"), 1)
    assert cmds == () and state.doomed == {"i-a"}
    state, cmds = step(state, HEALTHY_SPOT, 2)
    assert state.phase is P and cmds == (Start("i-s1"),)


def test_prewarm_drains_after_rebalance_hold():
    rules = replace(RULES, on_rebalance="prewarm")
    state = at(D, world(), rules=rules, standby="i-s1", prewarm_at=0.0)
    seen = world("a:running", "s1:running s2:stopped", "s1:healthy a:healthy")
    assert step(state, seen, 1799)[0].phase is D
    assert step(state, seen, 1800) [1] == (Deregister("i-s1"),)


def test_outage_is_said_once_and_its_end_with_its_length():
    state, cmds = step(at(S, HEALTHY_SPOT), world("a:running", targets="a:unhealthy"), 10)
    assert cmds == (DOWN,)
    state, cmds = step(state, world("a:running", targets="a:unhealthy"), 11)
    assert cmds == ()
    state, cmds = step(state, HEALTHY_SPOT, 25)
    assert cmds == (Alert("service back: a healthy target again after 15s without one"),)
    assert state.outage_since is None


# --- the world changing under the guard


def test_a_lost_target_group_is_said_once_and_holds_every_action():
    gone = replace(world("a:running!", targets=""), target_group_gone=True)
    state, cmds = step(at(S, HEALTHY_SPOT), gone, 10)
    assert cmds == (Alert("the target group is gone (deleted?): nothing can serve; no action until it is back"),)
    assert state.phase is S
    # Nothing is started for the notice or the empty group, however long it lasts.
    state, cmds = step(state, gone, 100)
    assert cmds == () and state.phase is S
    state, cmds = step(state, Notice("i-b"), 101)
    assert cmds == ()
    # Back: the remembered notice (heard by the poll at 10: reclaimed at 130) is acted on, late.
    state, cmds = step(state, world("a:running!", targets="a:healthy"), 102)
    assert state.phase is P and cmds == (
        Start("i-s1"), Alert("standby i-s1 not healthy 28s before spot i-a dies: the service may go down with it"))


def test_a_lost_spot_request_and_a_terminated_standby_are_said_once():
    seen = replace(world("", "s1:terminated s2:stopped", "a:healthy"), requests_gone=("sir-1",))
    state, cmds = step(at(S, HEALTHY_SPOT), seen, 10)
    alerts = [c.text for c in cmds if isinstance(c, Alert)]
    assert any("spot request sir-1 is gone" in t for t in alerts)
    assert any("standby i-s1 is terminated" in t for t in alerts)
    # The spot can no longer be seen: the guard fails over, on the standby that is left.
    assert state.phase is P and Start("i-s2") in cmds
    later = replace(world("", "s1:missing s2:pending", "a:healthy"), requests_gone=("sir-1",))
    _, cmds = step(state, later, 20)
    assert not [c for c in cmds if isinstance(c, Alert)]  # terminated -> missing is the same loss


@pytest.mark.fault(fault="clock jumps back 1 h", phase="spot-restored",
                   outcome="grace restarts from the jump, not an hour more On-Demand")
def test_a_clock_step_back_restarts_timers_instead_of_waiting_it_out():
    seen = world("b:running", "s1:running s2:stopped", "s1:healthy b:healthy")
    state = at(D, seen, standby="i-s1")
    state = replace(state, since=1000.0)
    # At 1500 (grace 600 not over) the clock steps back an hour.
    state, cmds = step(state, seen, 1500 - 3600)
    assert state.phase is D and cmds == () and state.since == 1500 - 3600
    state, cmds = step(state, seen, 1500 - 3600 + 599)
    assert state.phase is D
    state, cmds = step(state, seen, 1500 - 3600 + 600)
    assert state.phase is DR and cmds == (Deregister("i-s1"),)


# --------------------------------------------------------------------------- questions the shell asks


@pytest.mark.parametrize(
    "phases, steady, expected",
    [
        ((S,), 5.0, 5.0),  # all spot-healthy: the configured interval
        ((S, S), 30.0, 30.0),
        ((S, P), 5.0, 1.0),  # any guard busy: the fast poll for every guard
        ((DR,), 5.0, 1.0),
        ((D,), 0.2, 0.2),  # never slower than configured
        ((), 5.0, 5.0),
    ],
)
def test_poll_interval_by_phase(phases, steady, expected):
    states = [GuardState(rules=RULES, phase=p) for p in phases]
    assert machine.poll_interval(states, steady) == expected


@pytest.mark.parametrize(
    "phase, doomed, expected",
    [
        (S, frozenset(), True),
        (S, frozenset({"i-a"}), False),  # a notice waits for its failover
        (P, frozenset(), False),
        (H, frozenset(), False),
        (D, frozenset(), False),
        (DR, frozenset(), False),
    ],
)
def test_is_steady(phase, doomed, expected):
    assert machine.is_steady(GuardState(rules=RULES, phase=phase, doomed=doomed)) is expected


@pytest.mark.parametrize(
    "targets, spots, age, expected",
    [
        ("a:healthy", "a:running", 0.0, True),
        ("a:healthy", "a:running", 9.9, True),
        ("a:healthy", "a:running", 10.0, False),  # a third of the 30 s grace, no longer
        ("a:healthy", "a:running", -1.0, False),  # the clock stepped back: describe again
        ("a:healthy s1:healthy", "a:running", 5.0, True),
        ("a:healthy s1:initial", "a:running", 5.0, False),  # any target not healthy
        ("", "a:running", 5.0, False),  # nothing healthy to reuse
        ("a:healthy", "a:running b:pending", 5.0, False),  # a live spot not among the targets
        ("a:healthy", "a:running b:stopped", 5.0, True),  # a spot that is not live does not count
    ],
)
def test_health_reusable(targets, spots, age, expected):
    seen = world(spots, targets=targets)
    assert machine.health_reusable(30.0, seen.targets, seen.spots, age) is expected


@pytest.mark.parametrize(
    "targets, iid, expected",
    [
        ("a:healthy s1:healthy", "a", True),
        ("a:healthy s1:initial", "a", False),  # invariant 1: s1 is not yet healthy
        ("a:unhealthy s1:healthy", "a", True),
        ("a:healthy", "a", False),
        ("a:healthy", "s1", True),  # taking out a target that is not the healthy one
        ("", "a", False),
    ],
)
def test_may_take_out(targets, iid, expected):
    assert machine.may_take_out(world(targets=targets).targets, f"i-{iid}") is expected


def test_initial_phase_is_where_a_new_guard_starts():
    assert initial(RULES).phase is machine.INITIAL_PHASE is S
    assert machine.REHEARSAL_PHASE is S
    assert machine.FAILOVER_PHASES == {P, H}


# --------------------------------------------------------------------------- a freeze in each phase
# The daemon frozen (SIGSTOP, a paused VM), down, or blind to AWS: the next
# observation comes long after the last. Timers count only watched time, so
# nothing is given up on for the time nobody looked. Each row: a guard last
# watched at t=0, observed again at t=150 (a 60 s ready timeout, a 15 s watch gap).

QUICK = replace(RULES, standby_ready_timeout=60)
FROZEN = 150

FREEZES = [
    # The case: the standby booted while the daemon was stopped. It is
    # registered and given its health check, not stopped for a cold second standby.
    ("standby-starting: booted meanwhile", at(P, world("a:running!", "s1:pending s2:stopped", "a:healthy"),
     rules=QUICK, standby="i-s1", started_at=0.0, start_sent=0.0, watched=0.0),
     world("a:running!", "s1:running s2:stopped", "a:healthy"), P, (Register("i-s1"),)),
    ("standby-starting: healthy meanwhile", at(P, world("a:running!", "s1:pending s2:stopped", "a:healthy"),
     rules=QUICK, standby="i-s1", started_at=0.0, start_sent=0.0, watched=0.0),
     world("a:running!", "s1:running s2:stopped", "a:healthy s1:healthy"), H, (Deregister("i-a"),)),
    ("spot-healthy: an unhealthy spot that recovered meanwhile", at(S, world("a:running", targets="a:unhealthy"),
     rules=QUICK, unhealthy_since=0.0, watched=0.0), HEALTHY_SPOT, S, ()),
    ("both-serving: nothing is due", at(H, world("", "s1:running s2:stopped", "s1:healthy"),
     rules=QUICK, standby="i-s1", started_at=0.0, watched=0.0),
     world("", "s1:running s2:stopped", "s1:healthy"), H, ()),
    ("spot-restored: the grace ran out meanwhile, the standby drains", at(D, world("b:running", "s1:running s2:stopped",
     "b:healthy s1:healthy"), rules=QUICK, standby="i-s1", started_at=0.0, watched=0.0),
     world("b:running", "s1:running s2:stopped", "b:healthy s1:healthy"), D, ()),
    ("standby-draining: the drain ended meanwhile, the standby stops", at(DR, world("b:running",
     "s1:running s2:stopped", "b:healthy s1:draining"), rules=QUICK, standby="i-s1", watched=0.0),
     world("b:running", "s1:running s2:stopped", "b:healthy"), DR, (Stop("i-s1"),)),
]


@pytest.mark.parametrize("name,state,event,phase,commands", FREEZES, ids=[f[0] for f in FREEZES])
def test_a_freeze(name, state, event, phase, commands):
    after, cmds = step(state, event, FROZEN)
    assert (after.phase, cmds) == (phase, commands)


def test_the_same_standby_is_given_up_on_when_the_whole_timeout_was_watched():
    """The control for the first freeze row: watched all along, the timeout stands."""
    state = at(P, world("a:running!", "s1:pending s2:stopped", "a:healthy"), rules=QUICK, standby="i-s1",
               started_at=0.0, start_sent=0.0, watched=0.0)
    for t in range(5, 61, 5):
        state, cmds = step(state, world("a:running!", "s1:running s2:stopped", "a:healthy"), t)
    assert Alert("standby i-s1 not healthy after 60s") in cmds and Start("i-s2") in cmds
    assert state.standby == "i-s2"


def test_a_backoff_waits_out_its_time_after_a_freeze():
    state = at(P, world("a:running!", "s1:stopped s2:stopped", "a:healthy"), standby=None,
               failed=frozenset({"i-s1", "i-s2"}), retry_at=60.0, watched=0.0)
    state, cmds = step(state, world("a:running!", "s1:stopped s2:stopped", "a:healthy"), FROZEN)
    assert cmds == () and state.retry_at == 60.0 + FROZEN - machine.watch_gap(RULES)


# --- deadlines: when EC2 reclaims a doomed spot, and saying so when the standby is late


LATE = Alert("standby i-s1 not healthy 30s before spot i-a dies: the service may go down with it")


def test_a_notice_keeps_its_deadline_the_poll_counts_two_minutes_from_when_it_saw_it():
    state, _ = step(at(S, HEALTHY_SPOT), Notice("i-a", deadline=1100.0), 1000)
    assert state.deadlines == (("i-a", 1100.0),)
    state, _ = step(at(S, HEALTHY_SPOT), world("a:running!", targets="a:healthy"), 1000)
    assert state.deadlines == (("i-a", 1000.0 + machine.NOTICE),)
    # The source's own time, heard after the poll's flag, replaces the estimate; a repeat changes nothing.
    state, cmds = step(state, Notice("i-a", deadline=1090.0), 1001)
    assert state.deadlines == (("i-a", 1090.0),) and cmds == ()
    assert step(state, Notice("i-a"), 1002)[0].deadlines == (("i-a", 1090.0),)


def test_a_late_standby_is_said_once_thirty_seconds_before_the_spot_dies():
    state, _ = step(at(S, HEALTHY_SPOT), Notice("i-a", deadline=1120.0), 1000)
    starting = world("a:running!", "s1:pending s2:stopped", targets="a:healthy")
    state, cmds = step(state, starting, 1089)
    assert state.phase is P and cmds == ()
    assert machine.next_due(state, 1089) == 1090.0  # a simulator must not leap past the warning
    state, cmds = step(state, starting, 1090)
    assert cmds == (LATE,) and state.warned == {"i-a"}
    state, cmds = step(state, starting, 1095)
    assert cmds == ()
    # The spot gone: never warned again; its deadline stays until the standby serves (for the margin).
    state, cmds = step(state, world("a:terminated", "s1:running s2:stopped", targets="a:draining"), 1125)
    assert state.deadlines == (("i-a", 1120.0),) and state.warned == frozenset()
    assert not any(isinstance(c, Alert) and "dies" in c.text for c in cmds)


def test_a_standby_healthy_in_time_is_never_called_late():
    state, _ = step(at(S, HEALTHY_SPOT), Notice("i-a", deadline=1120.0), 1000)
    state, _ = step(state, world("a:running!", "s1:running s2:stopped", targets="a:healthy s1:initial"), 1050)
    state, cmds = step(state, world("a:running!", "s1:running s2:stopped", targets="a:healthy s1:healthy"), 1060)
    assert state.phase is H and not any(isinstance(c, Alert) for c in cmds)
    state, cmds = step(state, world("a:running!", "s1:running s2:stopped", targets="a:draining s1:healthy"), 1110)
    assert not any(isinstance(c, Alert) for c in cmds)


def test_the_ready_margin_is_told_once_when_the_standby_serves_early_late_or_already():
    noticed, _ = step(at(S, HEALTHY_SPOT), Notice("i-a", deadline=1120.0), 1000)
    coming = world("a:running!", "s1:running s2:stopped", targets="a:healthy s1:initial")
    starting, _ = step(noticed, coming, 1040)
    serving, _ = step(starting, world("a:running!", "s1:running s2:stopped", targets="a:healthy s1:healthy"), 1086)
    assert serving.phase is H and machine.ready_margins(starting, serving, 1086) == (("i-a", 34.0),)
    later, _ = step(serving, world("a:running!", "s1:running s2:stopped", targets="a:draining s1:healthy"), 1090)
    assert machine.ready_margins(serving, later, 1090) == ()
    # Late: the spot is reclaimed while the standby still warms; told (negative) once it is healthy.
    gone, _ = step(starting, world("a:terminated", "s1:running s2:stopped", targets="a:draining s1:initial"), 1125)
    assert gone.phase is P and gone.deadlines == (("i-a", 1120.0),)
    back, _ = step(gone, world("a:terminated", "s1:running s2:stopped", targets="s1:healthy"), 1130)
    assert back.phase is H and machine.ready_margins(gone, back, 1130) == (("i-a", -10.0),)
    assert back.deadlines == ()
    # Already serving (a prewarm, a second notice): the replacement was healthy when the notice came.
    prewarmed = at(H, world("b:running", "s1:running s2:stopped", "b:healthy s1:healthy"), standby="i-s1")
    noticed, _ = step(prewarmed, Notice("i-b", deadline=2120.0), 2000)
    assert machine.ready_margins(prewarmed, noticed, 2000) == (("i-b", 120.0),)


# --- capacity: a guard of several spots covers each one it loses with a standby of its own

FLEET = replace(RULES, capacity=2)
TWO = world("a:running b:running", targets="a:healthy b:healthy")


def test_a_fleet_starts_a_standby_for_one_doomed_spot_and_keeps_it_serving_until_the_standby_is_healthy():
    state, cmds = step(at(S, TWO, rules=FLEET), Notice("i-a", deadline=1120.0), 1000)
    assert state.phase is P and cmds == (Start("i-s1"),)
    doomed = world("a:running! b:running", "s1:running s2:stopped", "a:healthy b:healthy s1:initial")
    state, cmds = step(state, doomed, 1050)
    assert state.phase is P and not any(isinstance(c, Deregister) for c in cmds)  # full capacity meanwhile
    state, cmds = step(state, world("a:running! b:running", "s1:running s2:stopped",
                                    "a:healthy b:healthy s1:healthy"), 1060)
    assert state.phase is H and Deregister("i-a") in cmds


def test_a_fleets_late_standby_leaves_the_doomed_spot_out_just_before_its_deadline():
    state, _ = step(at(S, TWO, rules=FLEET), Notice("i-a", deadline=1120.0), 1000)
    late = world("a:running! b:running", "s1:pending s2:stopped", "a:healthy b:healthy")
    state, cmds = step(state, late, 1114)
    assert not any(isinstance(c, Deregister) for c in cmds)
    assert machine.next_due(state, 1114) == 1115.0
    state, cmds = step(state, late, 1115)
    assert Deregister("i-a") in cmds  # b stays healthy: the balancer drains a before it dies
    # A one-spot guard never takes its last healthy target out, deadline or not.
    alone, _ = step(at(S, HEALTHY_SPOT), Notice("i-a", deadline=1120.0), 1000)
    alone, cmds = step(alone, world("a:running!", "s1:pending s2:stopped", "a:healthy"), 1116)
    assert not any(isinstance(c, Deregister) for c in cmds)


def test_a_fleet_fails_back_once_its_spots_fill_the_capacity_again():
    serving = at(H, world("b:running", "s1:running s2:stopped", "b:healthy s1:healthy"), rules=FLEET,
                 standby="i-s1")
    state, cmds = step(serving, world("b:running", "s1:running s2:stopped", "b:healthy s1:healthy"), 10)
    assert state.phase is H  # one spot of two: the standby still covers the other
    state, cmds = step(state, world("b:running c:running", "s1:running s2:stopped",
                                    "b:healthy c:healthy s1:healthy"), 20)
    assert state.phase is D and state.reason == "spot i-c healthy"
    # Losing one again during the grace goes back to serving on the standby.
    state, _ = step(state, world("b:running", "s1:running s2:stopped", "b:healthy s1:healthy"), 30)
    assert state.phase is H


def test_without_a_capacity_the_guard_keeps_the_spots_it_first_saw():
    state, _ = step(initial(Rules(standbys=("i-s1",))), TWO, 0)
    assert (state.learned, machine.capacity(state), len(state.slots)) == (2, 2, 2)
    state, cmds = step(state, world("b:running", targets="a:draining b:healthy"), 10)
    assert state.phase is P and Start("i-s1") in cmds and state.reason == "no running spot instance"
    assert [s.phase for s in state.slots] == [P, S] and state.slots[0].standby == "i-s1"


THREE = world("a:running b:running c:running", targets="a:healthy b:healthy c:healthy")


def test_each_lost_spot_gets_its_own_standby_and_the_rest_are_said_as_capacity_short():
    state, cmds = step(at(S, THREE, rules=replace(RULES, capacity=3)),
                       world("a:running! b:running! c:running!", targets="a:healthy b:healthy c:healthy"), 10)
    short = Alert("capacity short by 1: 0 of 3 spot instances running and no free standby to cover it")
    assert (Start("i-s1"), Start("i-s2")) == tuple(c for c in cmds if isinstance(c, Start)) and short in cmds
    assert [(s.phase, s.standby, s.holds) for s in state.slots] == [
        (P, "i-s1", ("i-a",)), (P, "i-s2", ("i-b",)), (S, None, ("i-c",))]
    state, cmds = step(state, world("a:running! b:running! c:running!", "s1:pending s2:pending",
                                    "a:healthy b:healthy c:healthy"), 11)
    assert not any(isinstance(c, (Alert, Deregister)) for c in cmds)  # said once; every doomed spot serves on
    # The covered spots leave once their standbys are healthy; the uncovered one serves until just
    # before its deadline (10 + 120): then the balancer drains it rather than fail requests on it.
    both = world("a:running! b:running! c:running!", "s1:running s2:running",
                 "a:healthy b:healthy c:healthy s1:healthy s2:healthy")
    state, cmds = step(state, both, 60)
    assert [s.phase for s in state.slots] == [H, H, S]
    assert [c for c in cmds if isinstance(c, Deregister)] == [Deregister("i-a"), Deregister("i-b")]
    left = world("a:running! b:running! c:running!", "s1:running s2:running", "c:healthy s1:healthy s2:healthy")
    state, cmds = step(state, left, 124)
    assert not any(isinstance(c, Deregister) for c in cmds) and machine.next_due(state, 124) == 125.0
    state, cmds = step(state, left, 125)
    assert [c for c in cmds if isinstance(c, Deregister)] == [Deregister("i-c")]
    # One spot back (pending counts: capacity is coming): it takes the uncovered position.
    state, _ = step(state, world("a:running! b:running! d:pending", "s1:pending s2:pending",
                                 "a:healthy b:healthy c:draining"), 126)
    assert state.short_said == 0 and state.slots[2].holds == ("i-d",)


def test_each_new_spot_releases_one_standby_the_last_in_the_pool_first():
    """Two standbys serve for two lost spots. Each new healthy spot releases one after the grace:
    the later standby in standby_instance_ids first (the pool's order is the user's preference)."""
    serving = world("", "s1:running s2:running", "s1:healthy s2:healthy")
    state, _ = step(at(S, TWO, rules=FLEET), world("a:terminated b:terminated", "s1:running s2:running",
                                                   "s1:healthy s2:healthy"), 0)
    state, _ = step(state, serving, 1)
    assert [(s.phase, s.standby) for s in state.slots] == [(H, "i-s1"), (H, "i-s2")]
    one = world("c:running", "s1:running s2:running", "c:healthy s1:healthy s2:healthy")
    state, cmds = step(state, one, 10)
    assert [(s.phase, s.holds) for s in state.slots] == [(H, ()), (D, ("i-c",))]
    assert machine.transitions(serving_state := state, state) == ()
    state, cmds = step(state, one, 10 + 600)
    assert state.slots[1].phase is Phase.STANDBY_DRAINING and cmds == (Deregister("i-s2"),)
    changes = machine.transitions(serving_state, state)
    assert [(k, a.phase, b.phase) for k, a, b in changes] == [(2, D, Phase.STANDBY_DRAINING)]
    state, cmds = step(state, world("c:running", "s1:running s2:running", "c:healthy s1:healthy"), 620)
    assert cmds == (Stop("i-s2"),)
    both = world("c:running d:running", "s1:running s2:stopped", "c:healthy d:healthy s1:healthy")
    state, _ = step(state, both, 630)
    assert [(s.phase, s.holds) for s in state.slots] == [(D, ("i-d",)), (S, ("i-c",))]
    state, cmds = step(state, both, 630 + 600)
    assert cmds == (Deregister("i-s1"),)


def test_a_new_spot_goes_to_a_standby_still_starting_before_one_that_serves():
    state, _ = step(at(S, TWO, rules=FLEET), world("a:terminated b:terminated", "s1:running s2:pending",
                                                   "s1:healthy"), 0)
    assert [s.phase for s in state.slots] == [H, P]
    state, cmds = step(state, world("c:running", "s1:running s2:running", "c:healthy s1:healthy"), 5)
    assert [(s.phase, s.holds, s.stray) for s in state.slots] == [(H, (), False), (D, ("i-c",), True)]
    assert Stop("i-s2") not in cmds  # the standby it no longer needs gets the stray's grace, said
    assert any(isinstance(c, Alert) and "i-s2 is running outside a failover" in c.text for c in cmds)


def test_two_slots_never_take_the_last_healthy_target_out_together():
    """Each slot alone may drop its doomed spot (another target is healthy); together they may not."""
    state, _ = step(at(S, TWO, rules=FLEET), world("a:running! b:running!", "s1:running s2:running",
                                                   "a:healthy b:healthy s1:initial s2:initial"), 0)
    state, cmds = step(state, world("a:running! b:running!", "s1:running s2:running",
                                    "a:healthy b:healthy s1:initial s2:initial"), 115)
    assert [c for c in cmds if isinstance(c, Deregister)] == [Deregister("i-a")]
