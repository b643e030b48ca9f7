"""Property tests for fleets: a guard of several spots over random interruptions and refills.

A small world of its own (spot positions, a standby pool, one target group, time in 5 s
polls) plays hypothesis's scripts against `machine.step` and carries out its commands as
EC2 and ELBv2 would. After every step the fleet invariants of issue 14 are checked: never
two slots on one standby; never the last healthy target taken out; a doomed spot leaves the
group only once its replacement is healthy or its deadline is near; no lost spot uncovered
while a standby is free; and once every spot is back and healthy, after the grace, no
standby runs. This module only drives the machine; it never edits it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotguard import machine
from spotguard.defaults import DEREGISTER_AHEAD
from spotguard.machine import (
    HEALTHY,
    LIVE_STATES,
    Deregister,
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
    step,
)

POLL, BOOT, CHECK, DRAIN, STOPPING, NOTICE = 5, 20, 10, 15, 10, 120
GRACE = 60.0


@dataclass
class Box:
    """One instance of the little world: its EC2 state, when that changes next, its target."""

    state: str
    until: float = 0.0  # when a pending/stopping state settles
    target: str | None = None  # initial | healthy | draining | None (not registered)
    target_until: float = 0.0
    doomed_at: float | None = None  # a spot's notice time
    healthy_ever: bool = True  # a standby that never gets healthy keeps this False


@dataclass
class Fleet:
    positions: int
    pool: tuple[str, ...]
    boxes: dict[str, Box] = field(default_factory=dict)
    holders: list[str | None] = field(default_factory=list)  # the spot instance of each position
    serial: int = 0

    def new_spot(self, pos: int, now: float, running: bool = False) -> str:
        self.serial += 1
        iid = f"i-spot{self.serial}"
        self.boxes[iid] = Box("running" if running else "pending", until=now + BOOT,
                              target="healthy" if running else None)
        self.holders[pos] = iid
        return iid

    def observe(self) -> Observed:
        spots = tuple(Instance(i, b.state, notice=b.doomed_at is not None, probe=None)
                      for i, b in self.boxes.items() if i not in self.pool and b.state != "gone")
        standbys = tuple(Instance(s, self.boxes[s].state, probe=None) for s in self.pool)
        targets = tuple(Target(i, b.target) for i, b in self.boxes.items() if b.target is not None)
        return Observed(spots=spots, standbys=standbys, targets=targets)

    def advance(self, now: float) -> None:
        for iid, b in self.boxes.items():
            if b.state == "pending" and now >= b.until:
                b.state = "running"
            if b.state == "stopping" and now >= b.until:
                b.state, b.target = "stopped", None
            if b.doomed_at is not None and now >= b.doomed_at + NOTICE and b.state in LIVE_STATES:
                b.state, b.target = "gone", None  # reclaimed: its target fails, the balancer drops it
            if b.target == "initial" and now >= b.target_until and b.state == "running" and b.healthy_ever:
                b.target = HEALTHY
            if b.target == "draining" and now >= b.target_until:
                b.target = None

    def carry_out(self, command: machine.Command, now: float) -> None:
        b = self.boxes.get(getattr(command, "instance_id", ""))
        if isinstance(command, Start) and b.state == "stopped":
            b.state, b.until = "pending", now + BOOT
        elif isinstance(command, Stop) and b.state in LIVE_STATES:
            b.state, b.until = "stopping", now + STOPPING
        elif isinstance(command, Register) and b.target in (None, "draining"):
            b.target, b.target_until = "initial", now + CHECK
        elif isinstance(command, Deregister) and b.target not in (None, "draining"):
            b.target, b.target_until = "draining", now + DRAIN


@st.composite
def scripts(draw):
    """(positions, pool, {poll: [(action, position)]}, a standby that never gets healthy or None)."""
    positions = draw(st.integers(2, 4))
    pool = tuple(f"i-sb{k}" for k in range(draw(st.integers(1, 3))))
    moves = draw(st.lists(st.tuples(st.integers(1, 80), st.sampled_from(["notice", "refill", "both"]),
                                    st.integers(0, positions - 1)), max_size=8))
    script: dict[int, list[tuple[str, int]]] = {}
    for t, action, pos in moves:
        script.setdefault(t, []).append((action, pos))
    sick = draw(st.none() | st.sampled_from(pool))
    return positions, pool, script, sick


def play(positions: int, pool: tuple[str, ...], script: dict, sick: str | None, tail: int = 120) -> None:
    world = Fleet(positions, pool, holders=[None] * positions)
    for s in pool:
        world.boxes[s] = Box("stopped", healthy_ever=s != sick)
    for pos in range(positions):
        world.new_spot(pos, 0.0, running=True)
    rules = Rules(standbys=pool, failback_grace=GRACE, poll_interval=POLL, register_when="running",
                  standby_ready_timeout=300.0, capacity=positions)
    state = initial(rules)
    quiet_from = None
    for n in range(0, max(script, default=0) + tail):
        now = float(n * POLL)
        for action, pos in script.get(n, []):
            spot = world.holders[pos]
            if action in ("notice", "both") and spot and world.boxes[spot].doomed_at is None:
                world.boxes[spot].doomed_at = now
                state, cmds = step(state, Notice(spot, deadline=now + NOTICE), now)
                for c in cmds:
                    world.carry_out(c, now)
            if action in ("refill", "both") and (spot is None or world.boxes[spot].state == "gone"):
                world.new_spot(pos, now)
        world.advance(now)
        for pos, spot in enumerate(world.holders):  # a reclaimed spot's request is fulfilled later (scripted)
            if spot and world.boxes[spot].state == "gone" and n > max(script, default=0):
                world.new_spot(pos, now)
        seen = world.observe()
        old = state
        state, cmds = step(state, seen, now)
        check_step(old, state, seen, cmds, world, now)
        for c in cmds:
            world.carry_out(c, now)
        all_back = all(world.boxes[s].target == HEALTHY and world.boxes[s].doomed_at is None
                       for s in world.holders if s)
        settled = all_back and n > max(script, default=0)
        quiet_from = (now if quiet_from is None else quiet_from) if settled else None
        if quiet_from is not None and now - quiet_from > GRACE + DRAIN + STOPPING + 4 * POLL:
            running = [s for s in pool if world.boxes[s].state != "stopped"]
            assert not running, f"standbys {running} still running {now - quiet_from:.0f}s after every spot was back"
            assert all(s.standby is None for s in state.slots)
            return
    raise AssertionError("the fleet never settled: every spot back and healthy, no standby running")


def check_step(old, state, seen: Observed, cmds, world: Fleet, now: float) -> None:
    slots = state.slots
    held = [s.standby for s in slots if s.standby]
    assert len(held) == len(set(held)), f"two slots on one standby: {held}"
    assert len(slots) == world.positions
    # Invariant 1 across the slots: the commands, carried out in order, leave a healthy target.
    healthy = {t.id for t in seen.targets if t.health == HEALTHY}
    for c in cmds:
        if isinstance(c, (Deregister, Stop)):
            healthy.discard(c.instance_id)
            assert healthy or not {t.id for t in seen.targets if t.health == HEALTHY}, f"{c} left none healthy"
    # A doomed spot leaves only once a standby of its slot is healthy, or just before its deadline.
    deadlines = dict(old.deadlines) | dict(state.deadlines)
    for c in cmds:
        if isinstance(c, Deregister) and c.instance_id in state.doomed | old.doomed:
            slot = next((s for s in slots if c.instance_id in s.holds), None)
            healthy_now = {t.id for t in seen.targets if t.health == HEALTHY}
            cover = slot is not None and (slot.standby in healthy_now or any(
                i.id in slot.holds and i.id in healthy_now and not i.notice and i.id not in slot.doomed
                for i in seen.spots))
            near = now >= deadlines.get(c.instance_id, now + NOTICE) - DEREGISTER_AHEAD
            assert cover or near, f"doomed {c.instance_id} out at {now} with no healthy replacement"
    # No lost position uncovered while a standby is free (stopped, held by no slot, not given up on).
    taken = set(held) | {f for s in slots for f in s.failed}
    free = [s for s in world.pool if s not in taken and world.boxes[s].state == "stopped"]
    lost = [k for k, s in enumerate(slots) if s.phase is Phase.SPOT_HEALTHY and not any(
        i.id in s.holds and i.state in LIVE_STATES and i.id not in s.doomed for i in seen.spots)]
    assert not (lost and free), f"slots {lost} uncovered while {free} are free"


# SPOTGUARD_FLEET_EXAMPLES=2000 for a longer search than the suite's.
PROPS = settings(max_examples=int(os.environ.get("SPOTGUARD_FLEET_EXAMPLES", 100)), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(scripts())
def test_fleet_invariants_over_random_interruptions_and_refills(case):
    play(*case)


def test_two_notices_at_once_start_two_standbys_and_all_settle():
    play(3, ("i-sb0", "i-sb1"), {2: [("notice", 0), ("notice", 1)]}, None)


def test_more_notices_than_standbys_cover_what_they_can_and_settle():
    play(4, ("i-sb0",), {2: [("notice", 0), ("notice", 1), ("notice", 2)], 40: [("refill", 0)]}, None)
