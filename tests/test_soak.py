"""Soak: thousands of random steps of spot life and faults against the real daemon on moto.

The daemon is the real one (`daemon.build`: poll source, executor, store on
real aiobotocore clients against moto in server mode), driven round by round
(`await daemon.round()`, no timers) on a fake clock that the soak moves
forward, so grace periods and timeouts pass instantly. Each step does one
random thing to the world (an interruption notice, with or without an SQS-style
pushed notice; a spot termination; a re-fulfilment; a target health flip; an
injected StartInstances error or its end; a rebalance recommendation; a stray
or late notice; a draining hold; a person stopping a standby; a daemon restart
from its state file), moves time on, runs one round, and checks design.md's
invariants against what moto shows:

  1. a round that deregisters or stops never leaves the target group without a
     healthy target when it had one;
  2. a standby is never stopped while it is the only healthy target;
  3. every `SETTLE_EVERY` steps (and at the end) the faults stop and the spot is
     healthy: within a bounded number of rounds the guard is back in
     spot-healthy with every standby stopped (no forgotten On-Demand bill);
  4. no standby is started (by a decision on this round's observation) while
     another standby is running and healthy, and never are all three running;
  5. every phase change is on disk before its first command runs, is logged as
     exactly one `guard.transition` line, and the file always matches memory.

Memory is measured twice in the same settled state (on spot alone, no faults):
after the first settle at or past `WARMUP`, and at the end. Bounded: the bytes
reachable from the daemon (its guards, queues, clients and their connection
pools; `retained`), the asyncio tasks left, and the process's RSS, which counts
moto too (it keeps every instance it ever launched), so that bound is looser.
tracemalloc costs 6x the run time here, so it is opt-in for long runs
(SPOTGUARD_SOAK_TRACE=frames: allocations made under a spotguard frame, the
world's driver in spotguard/lab excepted).

The default run is `DEFAULT_STEPS` steps; SPOTGUARD_SOAK_STEPS=n makes a long
one, SPOTGUARD_SOAK_SEED=n replays a failure (the seed is in every failure
message), SPOTGUARD_SOAK_REPORT=path writes the measured figures as JSON.
This module drives moto's backend for the dynamics moto lacks; it never patches
or mocks spotguard's own code.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import sys
import time
import tracemalloc
import types
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import pytest
import structlog
from configs import daemon_settings

from spotguard import machine
from spotguard.daemon import build
from spotguard.machine import Deregister, Failed, Notice, Observed, Phase, Start, Stop
from spotguard.notify import Notifier
from spotguard.store import Store, differs

DEFAULT_STEPS = 600
STEPS = int(os.environ.get("SPOTGUARD_SOAK_STEPS", DEFAULT_STEPS))
SETTLE_EVERY = 150
WARMUP = 150  # steps before the memory baseline: caches, pools and moto's models fill up
# Growth allowed from the baseline to the end, both taken in the same settled state.
# The daemon's own state is small and bounded (a few KiB per guard; dedupe and
# queues are capped): 64 KiB of growth is a leak of tens of bytes per round.
MAX_HELD_GROWTH = 64 * 1024
MAX_TRACED_GROWTH = 256 * 1024
# RSS counts moto too, which keeps every instance and target it ever had: 1.7 to
# 4 KiB per step measured, and the allocator adds noise of a few hundred KiB. A
# floor plus twice moto's usual share per step is allowed: a leak of a response
# or an observation per round shows, moto and the allocator do not.
MAX_RSS_FLOOR = 2 * 1024 * 1024
MAX_RSS_PER_STEP = 4 * 1024
SETTLE_ROUNDS = 120  # rounds of 20 s a settled world may take to be back on spot alone
STANDBYS = 3
GRACE, READY, UNHEALTHY, HOLD = 120, 60, 20, 300
HEALTH_FLIPS = ("unhealthy", "initial", None, None)
START_ERRORS = ("InsufficientInstanceCapacity", "InstanceLimitExceeded", "IncorrectInstanceState")
TRACE_FRAMES = int(os.environ.get("SPOTGUARD_SOAK_TRACE", "0"))


class Clock:
    """The daemon's clock: moves only when the soak says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """An observer: the commands of the current round and the write-ahead check."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.transitions = 0
        self.problems: list[str] = []
        self.begin()

    def begin(self) -> None:
        self.observed: Observed | None = None
        self.commands: list[tuple[Any, Failed | None, Observed | None]] = []

    def event(self, guard: str, event: Any, old: Any, new: Any, at: float) -> None:
        if isinstance(event, Observed):
            self.observed = event

    def transition(self, guard: str, old: Any, new: Any, at: float, slot: Any = None) -> None:
        self.transitions += 1
        # Told after the save and before any command of the step: the file must hold it already.
        saved = self.store.load(guard, new.rules)
        if saved != replace(new, seen=None):
            self.problems.append(f"inv5: {old.phase.value} -> {new.phase.value} not on disk before its commands")

    def action(self, guard: str, command: Any, failed: Failed | None, seconds: float, at: float) -> None:
        # Commands after this round's Observed were decided on it; before it, on the last one.
        self.commands.append((command, failed, self.observed))


class LogCounter:
    """A structlog processor counting event names and dropping the lines (the soak logs a lot)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, logger: Any, method: str, event: dict) -> dict:
        self.counts[event.get("event", "?")] += 1
        raise structlog.DropEvent


FIXED_MODULES = ("botocore.model", "botocore.hooks", "botocore.endpoint_provider", "botocore.docs",
                 "botocore.regions", "botocore.loaders")


def retained(*roots: Any) -> int:
    """Bytes of every object reachable from `roots`: what the daemon holds on to.

    Modules, classes, code, module globals and botocore's loaded service models
    are shared or fixed and do not grow with the soak, so the walk stops there (a
    function's globals would otherwise reach the whole interpreter, the models
    are 100k objects). Connection pools, queues, states and caches are walked."""
    shared = {id(vars(m)) for m in list(sys.modules.values()) if m is not None and hasattr(m, "__dict__")}
    seen: set[int] = set()
    todo = list(roots)
    total = 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen or id(obj) in shared or isinstance(obj, (type, types.ModuleType, types.CodeType)):
            continue
        if type(obj).__module__.startswith(FIXED_MODULES):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj, 0)
        todo.extend(gc.get_referents(obj))
    return total


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_settings(tmp_path: Path, world: Any, d: Any) -> Any:
    return daemon_settings(
        tmp_path, world, [d], poll="5s", grace=f"{GRACE}s", ready=f"{READY}s", unhealthy=f"{UNHEALTHY}s",
        guard={"on_rebalance": "prewarm", "rebalance_hold": f"{HOLD}s"},
    )


@dataclass
class Figures:
    steps: int = 0
    rounds: int = 0
    settles: int = 0
    seconds: float = 0.0
    baseline_step: int = 0
    held_growth: int = 0  # bytes reachable from the daemon
    traced_growth: int = 0  # bytes allocated under spotguard frames (SPOTGUARD_SOAK_TRACE only)
    rss_growth: int = 0  # the whole process, moto included
    task_growth: int = 0
    simulated_hours: float = 0.0
    transitions: int = 0


class Soak:
    """The world, the daemon and the random steps; `run` raises AssertionError on a violation."""

    def __init__(self, world: Any, d: Any, settings: Any, aws: Any, seed: int, counter: LogCounter) -> None:
        self.world, self.d, self.settings, self.aws = world, d, settings, aws
        self.counter = counter
        self.rng = random.Random(seed)
        self.seed = seed
        self.clock = Clock(float(int(time.time())))
        self.start_time = self.clock.now
        self.store = Store(settings.daemon.state_dir)
        self.recorder = Recorder(self.store)
        self.notifier = Notifier(None)
        self.daemon = self._build()
        self.history: deque[str] = deque(maxlen=25)
        self.touched: set[str] = set()  # targets with a health override or a draining hold
        self.figures = Figures()
        self.steps: list[tuple[int, Callable[[], str]]] = [
            (20, self.idle),
            (10, self.notice),
            (7, self.terminate),
            (9, self.fulfil),
            (12, self.flip_health),
            (6, self.inject_start_error),
            (6, self.clear_start_error),
            (5, self.rebalance),
            (3, self.stray_notice),
            (4, self.hold_draining),
            (2, self.external_stop),
            (2, self.restart),
        ]
        self._weights = [w for w, _ in self.steps]

    def _build(self) -> Any:
        daemon = build(self.settings, self.aws, self.notifier, observers=[self.recorder])
        daemon.clock = self.clock  # build() wires real parts; only the clock is the soak's
        return daemon

    # ------------------------------------------------------------------ the world's moves

    @property
    def guard(self) -> Any:
        return self.daemon.guards[self.d.name]

    def spot(self) -> str | None:
        """The request's instance while it is live."""
        iid = self.world.spot_instance_id(self.d.spot_request_id)
        return iid if iid and self.world.instance_state(iid) in ("pending", "running") else None

    def idle(self) -> str:
        return "idle"

    def notice(self) -> str:
        iid = self.spot()
        if iid is None:
            return "notice: no live spot"
        self.world.notice(self.d.spot_request_id)
        if self.rng.random() < 0.5:
            self.daemon.push(Notice(iid))  # the EventBridge warning via SQS, ahead of the poll
            return f"notice {iid} (+pushed)"
        return f"notice {iid}"

    def terminate(self) -> str:
        if self.spot() is None:
            return "terminate: no live spot"
        return f"terminate {self.world.terminate_spot(self.d.spot_request_id)}"

    def fulfil(self) -> str:
        if self.world.spot_instance_id(self.d.spot_request_id) and self.spot():
            return "fulfil: spot live"
        return f"fulfil {self.world.fulfil(self.d.spot_request_id)}"

    def flip_health(self) -> str:
        iid = self.rng.choice([self.spot() or self.d.standby_ids[0], *self.d.standby_ids])
        state = self.rng.choice(HEALTH_FLIPS)
        self.world.set_health(self.d.target_group_arn, iid, state)
        self.touched.add(iid)
        return f"health {iid} {state}"

    def inject_start_error(self) -> str:
        sid, code = self.rng.choice(self.d.standby_ids), self.rng.choice(START_ERRORS)
        self.world.inject_error("start", sid, code)
        return f"start error {sid} {code}"

    def clear_start_error(self) -> str:
        sid = self.rng.choice(self.d.standby_ids)
        self.world.clear_error("start", sid)
        return f"clear start error {sid}"

    def rebalance(self) -> str:
        iid = self.spot()
        if iid is None:
            return "rebalance: no live spot"
        self.daemon.push(Notice(iid, "rebalance"))
        return f"rebalance {iid}"

    def stray_notice(self) -> str:
        iid = self.rng.choice(["i-0123456789abcdef0", *self.d.standby_ids])
        self.daemon.push(Notice(iid, self.rng.choice(["interruption", "rebalance"])))
        return f"stray notice {iid}"

    def hold_draining(self) -> str:
        iid = self.rng.choice([self.spot() or self.d.standby_ids[0], *self.d.standby_ids])
        hold = self.rng.random() < 0.6
        self.world.hold_draining(self.d.target_group_arn, iid, hold)
        self.touched.add(iid)
        return f"hold draining {iid} {hold}"

    def external_stop(self) -> str:
        sid = self.rng.choice(self.d.standby_ids)
        if self.world.instance_state(sid) != "running":
            return f"external stop {sid}: not running"
        self.world.ec2_backend.stop_instances([sid])
        return f"external stop {sid}"

    def restart(self) -> str:
        self.daemon = self._build()  # kill -9 and start: only the state file survives
        return f"restart in {self.guard.state.phase.value}"

    # ------------------------------------------------------------------ driving

    async def run(self, steps: int) -> Figures:
        began = time.monotonic()
        if TRACE_FRAMES:
            tracemalloc.start(TRACE_FRAMES)
        try:
            baseline: dict[str, int] | None = None
            for n in range(1, steps + 1):
                action = self.rng.choices(self.steps, weights=self._weights)[0][1]
                self.history.append(f"step {n} t+{self.clock.now - self.start_time:.0f}s: {action()}")
                self.clock.now += self._dt()
                await self._round(f"step {n}")
                self.figures.steps = n
                if n % SETTLE_EVERY == 0 or n == steps:
                    await self.settle(n)
                    # Measured in the same settled state each time: on spot alone, no faults.
                    if baseline is None and (n >= WARMUP or n == steps):
                        baseline = self.memory()
            end = self.memory()
            self.figures.baseline_step = self.figures.steps if baseline is None else baseline["step"]
            self.figures.held_growth = end["held"] - baseline["held"]
            self.figures.traced_growth = end["traced"] - baseline["traced"]
            self.figures.rss_growth = end["rss"] - baseline["rss"]
            self.figures.task_growth = end["tasks"] - baseline["tasks"]
        finally:
            tracemalloc.stop()
            await self.notifier.close()
        self.figures.seconds = time.monotonic() - began
        self.figures.transitions = self.recorder.transitions
        self.figures.simulated_hours = (self.clock.now - self.start_time) / 3600
        return self.figures

    def memory(self) -> dict[str, int]:
        gc.collect()
        before_the_walk = rss()  # the walk below allocates a little itself
        traced = 0
        if tracemalloc.is_tracing():
            # spotguard/lab is the world's driver: moto objects it makes are moto's growth, not ours.
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [
                    tracemalloc.Filter(True, "*/spotguard/*", all_frames=True),
                    tracemalloc.Filter(False, "*/spotguard/lab/*", all_frames=True),
                ]
            )
            traced = sum(stat.size for stat in snapshot.statistics("filename"))
        return {
            "step": self.figures.steps,
            "held": retained(self.daemon),
            "traced": traced,
            "rss": before_the_walk,
            "tasks": len(asyncio.all_tasks()),
        }

    def _dt(self) -> float:
        r = self.rng.random()
        if r < 0.70:
            return self.rng.randint(1, 10)
        if r < 0.95:
            return self.rng.randint(10, 60)
        return self.rng.randint(60, 900)

    async def _round(self, label: str) -> None:
        self.recorder.begin()
        before_transitions = self.recorder.transitions, self.counter.counts["guard.transition"]
        await self.daemon.round()
        self.figures.rounds += 1
        self.check(label, before_transitions)

    async def settle(self, n: int) -> None:
        """The faults stop and a good spot serves: the guard must end on spot alone."""
        self.figures.settles += 1
        w, tg, rid = self.world, self.d.target_group_arn, self.d.spot_request_id
        for sid in self.d.standby_ids:
            w.clear_error("start", sid)
        for iid in self.touched:
            w.set_health(tg, iid, None)
            w.hold_draining(tg, iid, False)
        self.touched.clear()
        if self.spot() is not None and w._spot_request(rid)._status_code != "fulfilled":
            w.terminate_spot(rid)  # a noticed spot is doomed: let the interruption happen
        if self.spot() is None:
            w.fulfil(rid)
        spot = self.spot()
        self.history.append(f"settle after step {n}: spot {spot}")
        for k in range(SETTLE_ROUNDS):
            self.clock.now += 20
            await self._round(f"settle {n} round {k}")
            if self._settled(spot):
                return
        self.fail(f"inv3: not back on spot alone {SETTLE_ROUNDS} rounds after settling: {self._looks()}")

    def _settled(self, spot: str) -> bool:
        states = {sid: self.world.instance_state(sid) for sid in self.d.standby_ids}
        return (
            self.guard.state.phase is Phase.SPOT_HEALTHY
            and set(states.values()) == {"stopped"}
            and self._health() == {spot: "healthy"}
        )

    def _looks(self) -> str:
        g = self.guard.state
        states = {sid: self.world.instance_state(sid) for sid in self.d.standby_ids}
        return f"phase={g.phase.value} ({g.reason}) standby={g.standby} standbys={states} targets={self._health()}"

    # ------------------------------------------------------------------ invariants

    def _health(self) -> dict[str, str]:
        """The target group as DescribeTargetHealth answers, read from moto's backend (no HTTP)."""
        statuses = self.world.elbv2_backend.describe_target_health(self.d.target_group_arn, [])
        return {s.instance_id: s.status for s in statuses}

    def fail(self, message: str) -> None:
        steps = "\n  ".join(self.history)
        raise AssertionError(
            f"{message}\n(seed {self.seed}: SPOTGUARD_SOAK_SEED={self.seed} SPOTGUARD_SOAK_STEPS={STEPS})\n"
            f"last steps:\n  {steps}"
        )

    def check(self, label: str, before: tuple[int, int]) -> None:
        r = self.recorder
        if r.problems:
            self.fail(f"{label}: {r.problems[0]}")
        seen = r.observed
        if seen is None:
            self.fail(f"{label}: the round observed nothing")
        healthy_before = {t.id for t in seen.targets if t.health == "healthy"}
        after = self._health()
        done = [c for c, failed, _ in r.commands if failed is None]
        took = [c for c in done if isinstance(c, (Deregister, Stop))]
        # 1: capacity taken only while something healthy stays.
        if took and healthy_before and "healthy" not in after.values():
            self.fail(f"inv1: {label}: {took} left no healthy target (was {sorted(healthy_before)}, now {after})")
        # 2: the only healthy standby is never stopped.
        for c in took:
            if isinstance(c, Stop) and c.instance_id in healthy_before and not healthy_before - {c.instance_id}:
                self.fail(f"inv2: {label}: stopped {c.instance_id}, the only healthy target")
        # 4: one standby at a time.
        for c, _, decided_on in r.commands:
            if isinstance(c, Start) and decided_on is seen:
                serving = [
                    i.id for i in seen.standbys
                    if i.id != c.instance_id and i.state == "running" and i.id in healthy_before
                ]
                if serving:
                    self.fail(f"inv4: {label}: started {c.instance_id} while standby {serving[0]} serves")
        running = [sid for sid in self.d.standby_ids if self.world.instance_state(sid) in ("pending", "running")]
        if len(running) == len(self.d.standby_ids):
            self.fail(f"inv4: {label}: every standby running {running}")
        # 5: one log line per phase change, and the file matches memory.
        transitions = r.transitions - before[0]
        logged = self.counter.counts["guard.transition"] - before[1]
        if transitions != logged:
            self.fail(f"inv5: {label}: {transitions} phase changes, {logged} guard.transition lines")
        # A loaded state forgets start_sent (machine.resumed), and a poll alone writes nothing
        # (store.differs: `watched` rides along with the next write), so those may differ.
        state = machine.resumed(replace(self.guard.state, seen=None))
        stored = self.store.load(self.d.name, state.rules)
        if stored is not None and differs(machine.resumed(stored), state):
            self.fail(f"inv5: {label}: the state file differs from the guard's state")
        if self.counter.counts["guard.poll.failed"]:
            self.fail(f"{label}: a poll failed")


@pytest.fixture
def quiet_logs():
    """Count log lines instead of printing thousands of them; the config is restored after."""
    saved = structlog.get_config()
    counter = LogCounter()
    structlog.configure(processors=[counter], cache_logger_on_first_use=False)
    try:
        yield counter
    finally:
        structlog.configure(**saved)


@pytest.mark.fault(fault="random faults for thousands of steps", phase="any", outcome="invariants hold, memory flat")
async def test_soak(tmp_path, moto_world, aws, quiet_logs):
    d = moto_world.provision("soak", standbys=STANDBYS)
    settings = write_settings(tmp_path, moto_world, d)
    seed = int(os.environ.get("SPOTGUARD_SOAK_SEED") or random.randrange(2**32))
    soak = Soak(moto_world, d, settings, aws, seed, quiet_logs)
    await soak.notifier.start()
    figures = await soak.run(STEPS)
    print(f"soak seed={seed} {figures}")
    if report := os.environ.get("SPOTGUARD_SOAK_REPORT"):
        Path(report).write_text(json.dumps({"seed": seed, **figures.__dict__}, indent=1) + "\n")
    assert figures.steps == STEPS
    assert figures.transitions > STEPS // 40, f"the soak hardly ever failed over: its steps are too tame (seed {seed})"
    if STEPS - figures.baseline_step < SETTLE_EVERY:
        return  # a short run checks the invariants only: no window to measure growth in
    measured = f"from step {figures.baseline_step} to {STEPS} (seed {seed}): {figures}"
    assert figures.task_growth <= 0, f"asyncio tasks left behind {measured}"
    assert figures.held_growth < MAX_HELD_GROWTH, f"the daemon holds more and more {measured}"
    assert figures.traced_growth < MAX_TRACED_GROWTH, f"spotguard allocations kept {measured}"
    rss_bound = MAX_RSS_FLOOR + MAX_RSS_PER_STEP * (STEPS - figures.baseline_step)
    assert figures.rss_growth < rss_bound, f"the process grows {measured}"
