"""The guard's state machine: every failover and failback rule, and nothing else.

`step(state, event, now)` takes one guard's state, one event and the current
time (seconds since the epoch, passed in) and returns the new state and the
commands to carry out. It is level-triggered: decisions come from the latest
observation of the world plus remembered notices, so a missed or repeated event
is corrected by the next observation.

This module must not do I/O, read a clock, or import asyncio, boto, structlog
or anything else with side effects. The shell (daemon, executor, store) does
all of that; keeping it out is what lets the rules be tested by tables and by
property tests, and lets the lab replay a day in seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Iterable

# --------------------------------------------------------------------------- phases


class Phase(str, enum.Enum):
    SPOT_HEALTHY = "spot-healthy"
    STANDBY_STARTING = "standby-starting"
    BOTH_SERVING = "both-serving"
    SPOT_RESTORED = "spot-restored"
    STANDBY_DRAINING = "standby-draining"


# EC2 instance states in which an instance serves (or will).
LIVE_STATES = frozenset({"pending", "running"})
# ELBv2 target health states. A target absent from DescribeTargetHealth is not registered.
HEALTHY = "healthy"
DRAINING = "draining"
UNUSED = "unused"

# Re-issue StartInstances if the standby still shows `stopped` this long after the last try.
START_RETRY = 15.0
# When every standby failed, wait this long (doubling, capped) before trying the first again.
RETRY_BASE = 30.0
RETRY_CAP = 300.0


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Instance:
    """One EC2 instance as observed. `state` is the EC2 state name, or `missing`."""

    id: str
    state: str
    notice: bool = False  # spot request status says interruption (marked-for-*, instance-terminated-*)


@dataclass(frozen=True)
class Target:
    """One registered target of the guard's target group and its health state."""

    id: str
    health: str  # initial | healthy | unhealthy | unused | draining | unavailable


@dataclass(frozen=True)
class Observed:
    """A snapshot of the guard's world, taken by the poll source."""

    spots: tuple[Instance, ...] = ()  # the guard's current spot instances
    standbys: tuple[Instance, ...] = ()  # the guard's standbys, in config order
    targets: tuple[Target, ...] = ()  # every registered target of the target group


@dataclass(frozen=True)
class Notice:
    """An interruption or rebalance notice for one instance (SQS, agent or poll)."""

    instance_id: str
    kind: str = "interruption"  # interruption | rebalance


@dataclass(frozen=True)
class Failed:
    """A command the executor could not carry out, with the AWS error code."""

    command: "Command"
    code: str


@dataclass(frozen=True)
class Tick:
    """Time has passed; re-evaluate timers against the last observation."""


Event = Observed | Notice | Failed | Tick


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Start:
    instance_id: str


@dataclass(frozen=True)
class Stop:
    instance_id: str


@dataclass(frozen=True)
class Register:
    instance_id: str


@dataclass(frozen=True)
class Deregister:
    instance_id: str


@dataclass(frozen=True)
class Alert:
    """Something a person must hear about (no capacity, standby never healthy)."""

    text: str


Command = Start | Stop | Register | Deregister | Alert


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Rules:
    """The guard's settings that the rules read (durations in seconds)."""

    standbys: tuple[str, ...]
    failback_grace: float = 600.0
    standby_ready_timeout: float = 300.0
    unhealthy_grace: float = 30.0
    on_rebalance: str = "ignore"  # ignore | prewarm
    rebalance_hold: float = 1800.0


@dataclass(frozen=True)
class GuardState:
    rules: Rules
    phase: Phase = Phase.SPOT_HEALTHY
    since: float = 0.0  # when the phase was entered
    reason: str = "initial"  # why the phase was entered
    standby: str | None = None  # the standby this failover uses
    started_at: float | None = None  # when StartInstances was last sent for it
    failed: frozenset[str] = frozenset()  # standbys given up on in this failover
    doomed: frozenset[str] = frozenset()  # spot instances with a notice
    unhealthy_since: float | None = None  # spot target first seen not healthy
    prewarm_at: float | None = None  # failover began on a rebalance recommendation
    retry_at: float | None = None  # every standby failed: try again then
    retries: int = 0
    seen: Observed | None = field(default=None, compare=False)  # latest observation
