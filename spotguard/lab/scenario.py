"""What a lab run plays (`Scenario`) and what came of it (`Outcome`): plain data, scenario seconds.

The default scenario is one spot interruption as EC2 makes it, at the scale of
a real deployment: a 120 s notice; a standby that boots in 20 s and loads its
model in 40 s; health checks every 5 s; a 60 s deregistration delay; spot
capacity back 3 minutes after the termination; spotguard's default 10 minute
failback grace. `unguarded()` is the same interruption with no standby and no
spotguard: the replacement spot is registered when it runs, as an Auto
Scaling group would, and nothing serves in between.

A fleet is `spots` persistent spot requests behind the one target group
(spotguard's capacity), `interrupted` of them noticed at the same moment. Its
service has a finite capacity, so losing targets shows as requests per second:
each instance serves `concurrency` requests at a time, and `clients` closed-loop
clients keep it busy (see load.py).

This module must not run anything; spotguard.lab.run plays a Scenario.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .timeline import Entry


@dataclass(frozen=True)
class Scenario:
    name: str = "with spotguard"
    guarded: bool = True  # spotguard and its stopped On-Demand standbys; else neither
    spots: int = 1  # persistent spot requests behind the target group (spotguard's capacity)
    interrupted: int = 1  # of them, noticed together at notice_at (the first ones)
    # EC2 (scenario seconds from the start of the load)
    notice_at: float = 30.0
    notice_period: float = 120.0  # notice → termination
    refulfil_after: float | None = 180.0  # termination → new spot instance; None: capacity never returns
    boot: float = 20.0  # pending → running
    stop_time: float = 10.0  # stopping → stopped
    # the service on each instance
    warm_up: float = 40.0  # running → serving (the model loading)
    standby_warm_up: float | None = None  # default: warm_up
    standbys: int = 1  # stopped On-Demand standbys, in spotguard's order
    no_capacity: int = 0  # the first N standbys refuse StartInstances with InsufficientInstanceCapacity
    latency: float = 0.25  # per request
    concurrency: int | None = None  # requests one instance serves at a time, the rest queue (None: no limit)
    # the load balancer (target group settings)
    health_interval: float = 5.0
    health_timeout: float = 4.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2
    deregistration_delay: float = 60.0
    # spotguard's config
    poll_interval: float = 5.0
    failback_grace: float = 600.0
    standby_ready_timeout: float = 300.0
    unhealthy_grace: float = 30.0
    register_when: str = "ready"  # ready | running
    on_rebalance: str = "ignore"  # ignore | prewarm
    # a rebalance recommendation for the spot this long before its notice (None: none)
    rebalance_before: float | None = None
    # a second interruption, of the new spot, when spotguard enters this phase
    second_notice_in: str | None = None
    second_notice_delay: float = 10.0
    # the end: when the cycle is over (spotguard back to spot-healthy with the
    # standby stopped; unguarded: the replacement healthy), or at end_after
    end_after: float | None = None
    tail: float = 20.0
    rate: float = 50.0  # requests per wall second (with clients: at most)
    clients: int | None = None  # closed-loop clients, each one request at a time (None: open loop at rate)

    def named(self, name: str) -> "Scenario":
        """This scenario with a named one's changes (SCENARIOS) applied."""
        return replace(self, **SCENARIOS[name].changes)

    def unguarded(self) -> "Scenario":
        return replace(self, name="without a standby", guarded=False)

    @property
    def standby_warm(self) -> float:
        return self.warm_up if self.standby_warm_up is None else self.standby_warm_up

    def expected_end(self) -> float:
        """A generous estimate of when the run ends, for its deadline (scenario seconds)."""
        if self.end_after is not None:
            return self.end_after + self.tail
        checks = self.health_interval * (self.healthy_threshold + self.unhealthy_threshold + 2)
        cycle = self.notice_period + (self.refulfil_after or 0.0) + self.boot + self.warm_up + checks
        if self.guarded:
            cycle += self.failback_grace + self.deregistration_delay + self.stop_time + 2 * self.poll_interval
        cycles = 2 if self.second_notice_in else 1
        return self.notice_at + cycles * (cycle + self.second_notice_delay) + self.tail

    def check(self) -> None:
        if self.refulfil_after is None and self.end_after is None:
            raise ValueError("a scenario where capacity never returns needs end_after")
        if self.second_notice_in and self.refulfil_after is None:
            raise ValueError("a second interruption needs a spot to interrupt: set refulfil_after")
        if not self.health_timeout < self.health_interval:
            raise ValueError("health_timeout must be shorter than health_interval (ELBv2 rule)")
        if not 0 <= self.no_capacity < self.standbys:
            raise ValueError("no_capacity must leave at least one standby that can start")
        if not 1 <= self.interrupted <= self.spots:
            raise ValueError("interrupted must be between 1 and spots")
        if (self.clients is not None and self.clients < 1) or (self.concurrency is not None and self.concurrency < 1):
            raise ValueError("clients and concurrency must be at least 1")
        if self.rebalance_before is not None and not 0 < self.rebalance_before < self.notice_at:
            raise ValueError("a rebalance recommendation must come after the start and before the notice: "
                             "0 < rebalance_before < notice_at")


@dataclass(frozen=True)
class Outcome:
    """One run's verdict; times in scenario seconds."""

    scenario: Scenario
    speed: float
    completed: bool
    problem: str | None  # why the run did not complete, or what went wrong around it
    sent: int
    failed: int
    failures: Mapping[str, int]  # failed requests by cause ("503", "502", "timeout", ...)
    longest_outage: float  # longest stretch in which every request failed
    no_healthy_target: float  # total time the balancer had no healthy target
    standby_lead: float | None  # least time the standby served before a spot died; None: it did not
    on_demand_seconds: float  # standby time in `running`
    spotguard_exit: int | None
    wall_seconds: float
    entries: tuple[Entry, ...] = field(default=(), repr=False)
    # capacity: the balancer's healthy targets from the start of the load, and what they served
    healthy: tuple[tuple[float, int], ...] = ()  # (when, healthy targets) at the start, each change, the end
    served: tuple[float, ...] = ()  # requests answered 200 per wall second, per LOAD_WINDOW of scenario time

    @property
    def fewest_healthy(self) -> int:
        return min((n for _, n in self.healthy), default=0)

    @property
    def below_capacity(self) -> float:
        """Time with fewer healthy targets than the scenario's spots."""
        spans = zip(self.healthy, self.healthy[1:])
        return sum(until - since for (since, n), (until, _) in spans if n < self.scenario.spots)

    @property
    def first_served(self) -> float:
        """The served rate of the first window: the whole fleet, before any notice (notice_at ≥ one window)."""
        return self.served[0] if self.served else 0.0

    @property
    def lowest_served(self) -> float:
        return min(self.served, default=0.0)

    @property
    def lost_requests(self) -> bool:
        return self.failed > 0

    def transitions(self, slot: int | None = None) -> list[tuple[str, str]]:
        """spotguard's phase changes in order, as (from, to); a fleet's, of one slot (numbered from 1)."""
        return [(e.data["from"], e.data["to"]) for e in self.entries
                if e.data.get("kind") == "transition" and e.data.get("slot") == slot]

    def alerts(self) -> list[str]:
        return [e.data["alert"] for e in self.entries if e.data.get("kind") == "alert"]


@dataclass(frozen=True)
class Named:
    """A scenario `spotguard demo --scenario NAME` plays: what it shows, its changes to the default."""

    what: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    lossless: bool = True  # spotguard is expected to lose no request (else the outage is the point)
    versus: Mapping[str, Any] | None = None  # a second run with spotguard and these changes, side by side


SCENARIOS: dict[str, Named] = {
    "interruption": Named("one spot interruption, capacity back 3 minutes later (the default)"),
    "no-capacity": Named("the first standby gets InsufficientInstanceCapacity; spotguard starts the second",
                         {"standbys": 2, "no_capacity": 1}),
    "slow-standby": Named("the standby loads its model for 2m30s, longer than the notice: the outage shown "
                          "honestly (rebalance-prewarm shows the way out)", {"standby_warm_up": 150.0},
                          lossless=False),
    "double": Named("the new spot is interrupted too, while the standby still serves",
                    {"second_notice_in": "spot-restored"}),
    "rebalance-prewarm": Named(
        "a rebalance recommendation 3 minutes before the notice and a standby slower than the notice: "
        "on_rebalance = prewarm (no outage) against ignore (the slow-standby outage), side by side",
        {"name": "spotguard, prewarm", "on_rebalance": "prewarm", "rebalance_before": 180.0, "notice_at": 200.0,
         "standby_warm_up": 150.0},
        versus={"name": "spotguard, ignore", "on_rebalance": "ignore"}),
    # The service is sized so three targets are its bottleneck: one request of 2 s at a time per
    # instance, nine clients (three per target, so none idles between requests), at most `rate`.
    "fleet": Named(
        "3 spots behind one target group, 2 interrupted at the same moment, 2 standbys: capacity kept at "
        "3 targets (without standbys it falls to 1 of 3 until the spot requests are fulfilled again)",
        {"spots": 3, "interrupted": 2, "standbys": 2, "latency": 2.0, "concurrency": 1, "clients": 9}),
}
