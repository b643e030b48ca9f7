"""`spotguard demo`: a whole spot interruption on an embedded AWS, with real HTTP traffic.

`demo(speed=..., compare=...)` starts moto in this process, plays the default
Scenario with spotguard (and with `compare` the same interruption without a
standby), prints the live timeline and the summary, and returns the exit
status: 0 when spotguard's run completed without losing a request, 1 otherwise.
The run without a standby is expected to lose requests; it never fails the demo.

This module must not change the scenario's rules; it wires a world, runs, prints.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace
from typing import Any, TextIO

from .guard import DROPPED_ENV, SANDBOX_ENV
from .report import summary
from .run import run_scenario
from .scenario import SCENARIOS, Outcome, Scenario
from .world import MotoWorld

# A full cycle (notice, 10 minute grace, drain, stop: ~18 scenario minutes) in ~45 s.
DEFAULT_SPEED = 25.0


def demo(*, speed: float = DEFAULT_SPEED, compare: bool = False, rate: float = 50.0, out: TextIO | None = None,
         scenario: str = "interruption", **changes: Any) -> int:
    """Play the named scenario (scenario.SCENARIOS); `changes` are Scenario fields (warm_up, health_interval, ...)."""
    out = sys.stdout if out is None else out
    chosen = replace(Scenario(rate=rate).named(scenario), **changes)
    chosen.check()
    _sandbox()
    versus = SCENARIOS[scenario].versus
    runs = [chosen] + ([replace(chosen, **versus)] if versus else []) + ([chosen.unguarded()] if compare else [])
    print(f"scenario {scenario}: {SCENARIOS[scenario].what}", file=out)
    print(_intro(chosen, speed, runs), file=out, flush=True)
    with MotoWorld() as world:
        outcomes = asyncio.run(_play(runs, speed, world, out))
    print(summary(outcomes), file=out, end="", flush=True)
    guarded = outcomes[0]
    return 0 if guarded.completed and (guarded.failed == 0 or not SCENARIOS[scenario].lossless) else 1


async def _play(runs: list[Scenario], speed: float, world: MotoWorld, out: TextIO) -> list[Outcome]:
    outcomes = []
    for scenario in runs:
        outcomes.append(await run_scenario(scenario, speed=speed, world=world, out=out))
        print(file=out)
    return outcomes


def _sandbox() -> None:
    """Dummy credentials for this process's own clients: the lab only ever talks to moto."""
    for key in DROPPED_ENV:
        os.environ.pop(key, None)
    os.environ.update(SANDBOX_ENV)


def _intro(s: Scenario, speed: float, runs: list[Scenario]) -> str:
    played = "; then ".join(r.name for r in runs)
    recommended = (f"a rebalance recommendation comes at +{s.notice_at - s.rebalance_before:.0f}s, "
                   if s.rebalance_before is not None else "")
    what = ("one spot interruption" if s.spots == 1 else
            f"{s.interrupted} of {s.spots} spots behind one target group interrupted at the same moment")
    notice = ("the notice comes" if s.interrupted == 1 else f"{s.interrupted} notices come")
    dies = ("the spot dies" if s.interrupted == 1 else "the spots die")
    return (
        f"spotguard lab: {what} on an embedded AWS (moto), played {len(runs)} time"
        f"{'s' * (len(runs) > 1)}: {played}.\n"
        f"Scenario time runs ×{speed:g}: {recommended}{notice} at +{s.notice_at:.0f}s, {dies} "
        f"{s.notice_period:.0f}s later, capacity returns {s.refulfil_after or 0:.0f}s after that; "
        f"instances boot in {s.boot:.0f}s and load their model in {s.warm_up:.0f}s; "
        f"failback grace {s.failback_grace / 60:.0f} minutes; health check every {s.health_interval:g}s, healthy "
        f"after {s.healthy_threshold}, deregistration delay {s.deregistration_delay:g}s; "
        f"register_when = {s.register_when}.\n"
    )
