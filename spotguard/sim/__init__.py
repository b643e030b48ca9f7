"""spotguard.sim: the machine against a pure model of EC2 and an ALB, on a clock of whole seconds.

`run(rules, script, seed)` plays a `Script` (interruptions, refills, faults,
outages) on `World` and returns a `Trace` of every machine step; see
spotguard/sim/world.py. It is for the property tests, the benchmarks' cycle and
replaying real interruption traces (spotguard/sim/playback.py, `spotguard simulate`).
It must not read a wall clock, do I/O or use randomness other than the seeded
`random.Random` of `run`.
"""

from spotguard.sim.world import (
    FAULTS,
    LATE,
    Action,
    ExternalStop,
    Flap,
    Interrupt,
    InterruptWhen,
    Mark,
    Pause,
    PollGap,
    Rebalance,
    Restart,
    Script,
    Snapshot,
    Step,
    StrayNotice,
    TerminateStandby,
    Timing,
    Trace,
    World,
    replay,
    run,
)

__all__ = [
    "Action", "ExternalStop", "FAULTS", "Flap", "Interrupt", "InterruptWhen", "LATE", "Mark", "Pause", "PollGap",
    "Rebalance", "Restart", "Script", "Snapshot", "Step", "StrayNotice", "TerminateStandby", "Timing",
    "Trace", "World", "replay", "run",
]
