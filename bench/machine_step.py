"""Benchmark 1: the cost of `machine.step`, over one full failover/failback cycle.

Two views of the same trace (bench/cycle.py):
  * throughput: the whole cycle replayed from the initial state, events/s;
  * per event: each (event kind, phase) group timed on its own, µs per step,
    next to the daemon's per-event write-ahead check (store.differs
    compared before and after), which runs once per step in `Daemon.apply`.

This module must not do I/O beyond returning its report.
"""

from __future__ import annotations

import time
from collections import defaultdict

import cycle
from stats import fmt, spread, summarize, table

from spotguard.machine import FAST_POLL, Instance, Observed, Rules, Target, initial, step
from spotguard.store import differs  # the daemon's own check, so a change to it shows here

REPEATS = 21  # each repeat times the whole cycle, every group and the check once, interleaved
GROUP_MIN_STEPS = 1000  # a group's events are looped until at least this many steps per repeat


def run(quick: bool = False) -> str:
    steps = cycle.record()
    phases = cycle.check(steps)
    repeats = 5 if quick else REPEATS
    groups: dict[tuple[str, str], list[cycle.Step]] = defaultdict(list)
    for s in steps:
        groups[(cycle.kind(s.event), s.state.phase.value)].append(s)
    order = sorted(groups, key=lambda k: (-len(groups[k]), k))
    pairs = [(s.state, after.state) for s, after in zip(steps, steps[1:])]

    # Interleaved so that a noisy moment spreads over every figure instead of skewing one.
    rates: list[float] = []
    group_us: dict[tuple[str, str], list[float]] = defaultdict(list)
    check_us: list[float] = []
    steady_us: dict[int, list[float]] = defaultdict(list)
    for _ in range(repeats):
        began = time.perf_counter()
        cycle.replay(steps)
        rates.append(len(steps) / (time.perf_counter() - began))
        for key in order:
            group_us[key].append(_per_step_us(groups[key]))
        check_us.append(_check_us(pairs))
        for spots in STEADY_SPOTS:
            steady_us[spots].append(_steady_us(spots))
    rate, check = summarize(rates), summarize(check_us)
    rows = []
    for key in order:
        cost = summarize(group_us[key])
        rows.append([key[0], key[1], len(groups[key]), fmt(cost.median), fmt(cost.p90), spread(cost)])
    mean_step = 1e6 / rate.median

    counts: dict[str, int] = defaultdict(int)
    for s in steps:
        counts[cycle.kind(s.event)] += 1
    mix = ", ".join(f"{n:,} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    sizes = sorted({len(s.event.targets) for s in steps if isinstance(s.event, Observed)})
    return "\n\n".join(
        [
            f"One cycle is {len(steps):,} events ({mix}) over "
            f"{steps[-1].now / 60:.0f} simulated minutes, through "
            f"{' → '.join(p.value for p in phases)} → spot-healthy; "
            f"played on spotguard.sim's model of EC2 and an ALB; one Observed per poll (every {cycle.POLL} s "
            f"in spot-healthy, {FAST_POLL:g} s otherwise: machine.poll_interval, as the daemon polls). "
            f"1 spot, 2 standbys, {sizes[0]}–{sizes[-1]} targets per snapshot. "
            f"{repeats} interleaved runs of every row.",
            table(
                ["measure", "median", "p90", "min–max"],
                [
                    ["whole cycle, events/s", fmt(rate.median), fmt(rate.p90), spread(rate)],
                    ["whole cycle, µs/event (1e6 / median events/s)", fmt(mean_step), "", ""],
                    [
                        "daemon write-ahead check per event, µs (store.differs(old, new))",
                        fmt(check.median), fmt(check.p90), spread(check),
                    ],
                    *[[f"a steady guard of {n} spot{'s' * (n > 1)} (capacity {n}), µs per Observed",
                       fmt(c.median), fmt(c.p90), spread(c)]
                      for n, c in ((n, summarize(steady_us[n])) for n in STEADY_SPOTS)],
                ],
                align="l",
            ),
            "Per event kind and the phase it arrives in (µs per `step`; each group looped "
            f"to ≥{GROUP_MIN_STEPS:,} steps per run):",
            table(["event", "phase", "in cycle", "median µs", "p90 µs", "min–max µs"], rows, align="ll"),
        ]
    )


def _per_step_us(members: list[cycle.Step]) -> float:
    loops = max(1, -(-GROUP_MIN_STEPS // len(members)))
    began = time.perf_counter()
    for _ in range(loops):
        for s in members:
            step(s.state, s.event, s.now)
    return (time.perf_counter() - began) * 1e6 / (loops * len(members))


STEADY_SPOTS = (1, 4)  # a one-spot guard, and a fleet of four (one slot per spot)


def _steady_us(spots: int) -> float:
    """µs per step of a steady guard of `spots` spots on an unchanged observation, as every poll brings."""
    live = tuple(Instance(f"i-spot{k}", "running", probe=None) for k in range(spots))
    seen = Observed(spots=live, standbys=(Instance("i-standby", "stopped"),),
                    targets=tuple(Target(i.id, "healthy") for i in live))
    state, _ = step(initial(Rules(standbys=("i-standby",), capacity=spots)), seen, 0.0)
    began = time.perf_counter()
    for n in range(1, GROUP_MIN_STEPS + 1):
        state, _ = step(state, seen, n * 5.0)
    return (time.perf_counter() - began) * 1e6 / GROUP_MIN_STEPS


def _check_us(pairs: list) -> float:
    began = time.perf_counter()
    for old, new in pairs:
        differs(old, new)
    return (time.perf_counter() - began) * 1e6 / len(pairs)
