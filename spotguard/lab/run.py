"""Plays one Scenario in the embedded AWS and returns its Outcome.

`run_scenario(scenario, speed=..., world=...)` builds the deployment in moto,
the fleet (EC2's clock and an app per running instance), the balancer, and
spotguard as a real subprocess; then sends load and plays the script (the
notice on every path, the termination, the new spot), puts everything on the
timeline and sums it up as an Outcome. docs/lab.md says what is modelled.
A fleet scenario has several spot requests behind the one target group; the
first `interrupted` are noticed together, terminated together and fulfilled
again together.

This module must not make a decision spotguard makes; it plays the world.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, TextIO

from ..machine import NOTICE
from ..sources.eventbridge import FULFILLMENT, INTERRUPTION, REBALANCE, STATE_CHANGE
from .balancer import Balancer, HealthCheck
from .clock import ScenarioClock, clock_text, span_text
from .fleet import Fleet
from .guard import SpotguardProcess, write_config
from .load import LoadGenerator, Sample, longest_outage, served_rates
from .scenario import Outcome, Scenario
from .timeline import Entry, Timeline

GUARD = "lab"
QUEUE = "spotguard-lab-events"
SETUP_TIMEOUT = 30.0  # wall seconds for the first spot to look healthy
# Load is summed up every LOAD_WINDOW scenario seconds and printed when something
# changed (who serves, failures) or LOAD_QUIET passed since the last line.
LOAD_WINDOW = 30.0
LOAD_QUIET = 180.0
# spotguard log lines worth a timeline entry besides transitions, actions and alerts.
LOUD_LEVELS = frozenset({"warning", "error", "critical"})
AGENT_INTERVAL = 1.0  # scenario seconds between an agent's metadata reads (the real agent's default)
# A notice's termination this close after a whole wall second still counts as on it: its deadline,
# announced in whole seconds, is early by no more (a scheduled notice is a few ms late on a busy host).
ON_THE_SECOND = 0.05
_SECONDS = re.compile(r"\b(\d+(?:\.\d+)?)s\b")


async def run_scenario(
    scenario: Scenario,
    *,
    speed: float,
    world: Any,
    out: TextIO | None = None,
    on_entry: Callable[[Entry], None] | None = None,
) -> Outcome:
    """Play `scenario` at `speed` in `world` (a started MotoWorld, reset here)."""
    scenario.check()
    return await _Run(scenario, speed, world, out, on_entry).play()


class _Run:
    def __init__(
        self,
        scenario: Scenario,
        speed: float,
        world: Any,
        out: TextIO | None,
        on_entry: Callable[[Entry], None] | None = None,
    ) -> None:
        self.s = scenario
        self.speed = speed
        self.world = world
        self.clock = ScenarioClock(speed)
        self.timeline = Timeline(self.clock, out, on_entry)
        self.phase = "spot-healthy"  # the latest transition's, of any slot
        self.phase_since = 0.0
        self.slots: dict[int | None, tuple[str, float]] = {}  # a fleet's slot (None: one spot) → (phase, since)
        self.requests: tuple[str, ...] = ()  # the persistent spot requests, the first one the deployment's
        self.first_spots: tuple[str, ...] = ()  # their instances when the lab began
        self.notices: list[tuple[str, float]] = []  # (spot id, when)
        self.terminations: list[tuple[str, float]] = []  # (spot id, when)
        self.fulfilled_at: float | None = None
        self.gaps: list[list[float]] = []  # [start, end] spans with no healthy target
        self.healthy_counts: list[tuple[float, int]] = []  # (when, healthy targets) at each change, from 0
        self.registered_by_lab: set[str] = set()
        self.heard: dict[tuple[str, str], str] = {}  # (kind, spot id) -> the path it was heard by first
        self.sent_events: list[str] = []  # detail-types the lab put on the queue as EventBridge
        self.queue_url: str | None = None
        self.agents: dict[str, SpotguardProcess] = {}  # `spotguard agent` on each running spot, by its id
        self.deployment: Any = None
        self.fleet: Fleet | None = None
        self.balancer: Balancer | None = None
        self.spotguard: SpotguardProcess | None = None
        self.load: LoadGenerator | None = None

    # ------------------------------------------------------------------ the run

    async def play(self) -> Outcome:
        began = time.monotonic()
        problem: str | None = None
        completed = False
        exit_code: int | None = None
        stop_load = asyncio.Event()
        tasks: list[asyncio.Task[Any]] = []
        load_task: asyncio.Task[None] | None = None
        with tempfile.TemporaryDirectory(prefix="spotguard-lab-") as tmp:
            try:
                await self._build()
                tasks.append(asyncio.create_task(self._keep_time()))
                await self._until(self._spot_serving, SETUP_TIMEOUT, "the first spot to be healthy")
                if self.s.guarded:
                    # The spots' agents run before the scenario begins; they need nothing of spotguard's,
                    # so they start beside it (each process takes a second or more to import).
                    await asyncio.gather(self._start_spotguard(Path(tmp)), self._sync_agents(wait=True))
                    tasks.append(asyncio.create_task(self._run_agents()))
                await self._on_the_second(self.s.notice_at)  # the first notice then needs no wait of its own
                self._begin()
                self.load = LoadGenerator(
                    f"{self.balancer.url}/",
                    self.clock,
                    rate=self.s.rate,
                    max_wall=self.clock.wall(self.s.expected_end() * 2) + 60,
                    origin=self.timeline.start,
                    clients=self.s.clients,
                )
                load_task = asyncio.create_task(self.load.run(stop_load))
                tasks.append(asyncio.create_task(self._report_load()))
                try:
                    await asyncio.wait_for(self._script(), self.clock.wall(self.s.expected_end() * 1.5) + 30)
                    completed = True
                except asyncio.TimeoutError:
                    problem = (f"the cycle did not finish by {clock_text(self.s.expected_end() * 1.5)} "
                               f"(phase {self.phase})")
                except _Aborted as exc:
                    problem = str(exc)
            finally:
                stop_load.set()
                if load_task is not None:
                    await asyncio.wait([load_task], timeout=10)
                await asyncio.gather(*(agent.stop() for agent in self.agents.values()))
                if self.spotguard is not None:
                    exit_code = await self.spotguard.stop()
                    if exit_code != 0 and problem is None:
                        problem = f"spotguard exited {exit_code}: {self.spotguard.stderr_tail()}"
                    if self.spotguard.reader_errors and problem is None:
                        problem = f"the lab failed reading spotguard's log: {self.spotguard.reader_errors[0]}"
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self._tear_down()
        return self._outcome(completed, problem, exit_code, time.monotonic() - began)

    async def _build(self) -> None:
        s, world = self.s, self.world
        world.reset()
        d = self.deployment = world.provision(GUARD, standbys=s.standbys if s.guarded else 0)
        self.requests = (d.spot_request_id, *(world.add_spot(d)[0] for _ in range(s.spots - 1)))
        self.first_spots = tuple(world.spot_instance_id(rid) for rid in self.requests)
        for sid in d.standby_ids[:s.no_capacity]:
            world.inject_error("start", sid, "InsufficientInstanceCapacity")
        elbv2 = world.boto("elbv2")
        elbv2.modify_target_group(
            TargetGroupArn=d.target_group_arn,
            HealthCheckIntervalSeconds=int(s.health_interval),
            HealthCheckTimeoutSeconds=int(s.health_timeout),
            HealthyThresholdCount=s.healthy_threshold,
            UnhealthyThresholdCount=s.unhealthy_threshold,
        )
        elbv2.modify_target_group_attributes(
            TargetGroupArn=d.target_group_arn,
            Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": str(int(s.deregistration_delay))}],
        )
        group = elbv2.describe_target_groups(TargetGroupArns=[d.target_group_arn])["TargetGroups"][0]
        check = HealthCheck.of_target_group(group)
        self.queue_url = world.boto("sqs").create_queue(QueueName=QUEUE)["QueueUrl"]
        world.model_transitions(True)

        self.fleet = Fleet(world, self.clock, self.timeline, boot=s.boot, stop_time=s.stop_time, latency=s.latency,
                           port=d.target_port, concurrency=s.concurrency, on_state=self._state_changed)
        for rid in self.requests:
            self.fleet.follow_spot_request(rid, warm_up=s.warm_up)
        for n, sid in enumerate(d.standby_ids, 1):
            self.fleet.watch(sid, "standby" if len(d.standby_ids) == 1 else f"standby-{n}", warm_up=s.standby_warm,
                             on_demand=True)
        self.balancer = Balancer(
            self.clock,
            check,
            s.deregistration_delay,
            self.fleet.address,
            self.fleet.live,
            on_change=self._target_changed,
            request_timeout=5.0,
        )
        await self.balancer.start()
        world.set_health_source(self.balancer.report)
        self._describe_setup(check)

    def _describe_setup(self, check: HealthCheck) -> None:
        s, d, say = self.s, self.deployment, self.timeline.say
        say(f"── {s.name} " + "─" * max(0, 66 - len(s.name)))
        say(f"  moto (EC2, ELBv2, SQS) at {self.world.endpoint_url}; load balancer at {self.balancer.url}")
        for n, (spot, rid) in enumerate(zip(self.first_spots, self.requests), 1):
            say(f"  spot-{n} = {spot} (spot request {rid})")
        for sid in d.standby_ids:
            say(f"  {self.timeline.label(sid)} = {sid} (stopped On-Demand)")
        say(
            f"  health check every {span_text(check.interval)}, healthy after {check.healthy_threshold} "
            f"(a new target: 1), unhealthy after {check.unhealthy_threshold}; "
            f"deregistration delay {span_text(s.deregistration_delay)}"
        )
        if s.clients:
            say(f"  load: {s.clients} clients through the load balancer, each sending its next request when the last "
                f"is answered (at most {s.rate:g} requests/s in all, wall)")
        else:
            say(f"  load: {s.rate:g} requests/s (wall) through the load balancer")
        if s.concurrency:
            say(f"  each instance serves {s.concurrency} request{'s' * (s.concurrency > 1)} at a time "
                f"({span_text(s.latency)} each); the others wait their turn")
        say("  instance metadata: an IMDSv2 on loopback for each running instance")
        if s.guarded:
            say("  notices reach spotguard three ways: EventBridge → SQS, `spotguard agent` on the spot (IMDS → SQS), "
                "and its own poll")
        say()

    def _begin(self) -> None:
        self.timeline.begin()
        self.healthy_counts.append((0.0, len(self.balancer.healthy())))
        serving = ", ".join(self.timeline.label(spot) for spot in self.first_spots)
        standbys = "standbys" if self.s.standbys > 1 else "standby"
        self.timeline.add("lab", f"load starts; {serving} serving" + (f"; {standbys} stopped" if self.s.guarded
                                                                        else ""))

    async def _tear_down(self) -> None:
        self.world.set_health_source(None)
        self.world.model_transitions(False)
        if self.fleet is not None:
            await self.fleet.close()
        if self.balancer is not None:
            await self.balancer.close()

    # ------------------------------------------------------------------ time passing

    async def _keep_time(self) -> None:
        """EC2's clock, the apps, the balancer's view of the target group; the ASG when unguarded."""
        pause = min(0.02, self.clock.wall(0.5))
        arn = self.deployment.target_group_arn
        while True:
            await self.fleet.tick()
            registered = self.world.registered_targets(arn)
            self.balancer.sync(registered)
            if not self.s.guarded:
                await self._register_replacement(registered)
            await asyncio.sleep(pause)

    async def _register_replacement(self, registered: tuple[str, ...]) -> None:
        for rid in self.requests:
            await self._register_new_spot(self.world.spot_instance_id(rid), registered)

    async def _register_new_spot(self, spot: str | None, registered: tuple[str, ...]) -> None:
        if spot is None or spot in registered or spot in self.registered_by_lab:
            return
        if self.world.instance_state(spot) != "running":
            return
        self.registered_by_lab.add(spot)
        await asyncio.to_thread(
            self.world.boto("elbv2").register_targets,
            TargetGroupArn=self.deployment.target_group_arn,
            Targets=[{"Id": spot}],
        )
        self.timeline.add("lab", f"{spot} registered by its Auto Scaling group", kind="asg", instance=spot)

    def _target_changed(self, tid: str, old: str, new: str) -> None:
        if new == "draining":
            text = f"{tid} draining for {span_text(self.s.deregistration_delay)}: no new requests"
        elif new == "gone":
            text = f"{tid} drained: deregistration complete"
        else:
            text = f"{tid} {new}"
        self.timeline.add("alb", text, kind="health", instance=tid, old=old, new=new)
        self._note_service()

    def _note_service(self) -> None:
        healthy = len(self.balancer.healthy())
        serving = bool(healthy)
        now = self.timeline.now()
        if self.timeline.started and healthy != self.healthy_counts[-1][1]:
            self.healthy_counts.append((now, healthy))
        if not serving and (not self.gaps or self.gaps[-1][1] >= 0):
            if self.timeline.started:
                self.gaps.append([now, -1.0])
                self.timeline.add("alb", "NO HEALTHY TARGET: every request fails", kind="gap")
        elif serving and self.gaps and self.gaps[-1][1] < 0:
            self.gaps[-1][1] = now
            span = now - self.gaps[-1][0]
            self.timeline.add("alb", f"a healthy target again after {span_text(span)} without one", kind="gap-end")

    # ------------------------------------------------------------------ spotguard

    async def _start_spotguard(self, tmp: Path) -> None:
        s, d, world = self.s, self.deployment, self.world
        config = write_config(
            tmp / "spotguard.toml",
            region=world.region,
            endpoint_url=world.endpoint_url,
            state_dir=tmp / "state",
            guard_name=GUARD,
            target_group_arn=d.target_group_arn,
            spot_request_ids=self.requests,
            standby_ids=d.standby_ids,
            speed=self.speed,
            poll_interval=s.poll_interval,
            failback_grace=s.failback_grace,
            standby_ready_timeout=s.standby_ready_timeout,
            unhealthy_grace=s.unhealthy_grace,
            register_when=s.register_when,
            on_rebalance=s.on_rebalance,
            queue_url=self.queue_url,
        )
        self.spotguard = SpotguardProcess(config, self._spotguard_said)
        self.timeline.say(f"  spotguard: python -m spotguard run --config {config.name} (durations ÷ {self.speed:g})")
        await self.spotguard.start()

    async def _run_agents(self) -> None:
        while True:
            await self._sync_agents(wait=False)
            await asyncio.sleep(min(0.05, self.clock.wall(1.0)))

    async def _sync_agents(self, *, wait: bool) -> None:
        """`spotguard agent` on every running spot, reading its metadata service, sending to the queue;
        with `wait`, until the new ones run."""
        env = {"AWS_ENDPOINT_URL": self.world.endpoint_url, "AWS_REGION": self.world.region}
        running = self.fleet.spot_metadata()
        for iid in [i for i in self.agents if i not in running]:
            asyncio.create_task(self.agents.pop(iid).stop())  # the host is gone, and its agent with it
        started = []
        for iid, url in running.items():
            if iid not in self.agents:
                argv = ["agent", "--queue-url", self.queue_url, "--imds-url", url,
                        "--interval", f"{self.clock.wall(AGENT_INTERVAL):g}"]
                self.agents[iid] = SpotguardProcess(None, lambda event, iid=iid: self._agent_said(iid, event),
                                                    argv=argv, ready_event="agent.started", env=env)
                started.append(self.agents[iid].start())
        if wait:
            await asyncio.gather(*started)
        else:
            for start in started:
                asyncio.create_task(start)

    def _agent_said(self, spot: str, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name == "agent.sqs.sent":
            self.timeline.add("agent", f"on {spot}: {event.get('detail_type')} read from IMDS, sent to SQS",
                              kind="agent", instance=spot)
        elif event.get("level") in LOUD_LEVELS:
            details = {k: v for k, v in event.items() if k not in ("event", "level", "timestamp")}
            self.timeline.add("agent", f"on {spot}: {event.get('level')}: {name} {json.dumps(details)}", kind="log")

    def _spotguard_said(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        at = self._when(event)
        add = lambda text, **data: self.timeline.add("spotguard", text, at=at, **data)  # noqa: E731
        if name == "guard.transition":
            slot = event.get("slot")
            self.phase, self.phase_since = event["to"], at
            self.slots[slot] = (event["to"], at if at is not None else self.timeline.now())
            if event["to"] == "standby-starting":
                for spot in self._noticed(event.get("spots") or ()):
                    if ("interruption", spot) not in self.heard:
                        self._heard(spot, "its poll (the spot request's status)", at)
            where = "" if slot is None else f"slot {slot}: "
            add(
                f"{where}{event['from']} → {event['to']}: {event.get('reason', '')}",
                kind="transition", slot=slot,
                **{"from": event["from"], "to": event["to"], "reason": event.get("reason")},
            )
        elif name == "executor.action":
            code = f" ({event['code']})" if event.get("code") else ""
            add(f"{event['action']} {event['instance_id']}: {event['outcome']}{code}", kind="action",
                action=event["action"], instance=event["instance_id"], outcome=event["outcome"])
        elif name == "guard.alert":
            text = self._in_scenario_time(self.timeline.humane(str(event.get("text"))))
            add(f"⚠ ALERT: {text}", kind="alert", alert=text)
        elif name == "source.sqs.notice" and event.get("kind") in ("interruption", "rebalance"):
            via = "the agent on the spot" if event.get("source") == "spotguard.agent" else "EventBridge"
            self._heard(str(event.get("instance_id")), f"SQS ({via})", at, str(event["kind"]))
        elif name == "daemon.ready":
            add("running: first observation done", kind="ready")
        elif event.get("level") in LOUD_LEVELS:
            details = {k: v for k, v in event.items() if k not in ("event", "level", "timestamp")}
            add(f"{event.get('level')}: {name} {json.dumps(details)}", kind="log")

    def _noticed(self, spots: list[str]) -> list[str]:
        """The noticed spots among a transition's (a fleet slot names its own); else the latest notice's."""
        noticed = [spot for spot, _ in self.notices if spot in spots]
        return noticed or [spot for spot, _ in self.notices[-1:]]

    def _heard(self, spot: str, path: str, at: float | None, kind: str = "interruption") -> None:
        """Which path brought spotguard each notice first (the others are duplicates it drops)."""
        if (kind, spot) in self.heard:
            return
        self.heard[(kind, spot)] = path
        what = "the notice" if kind == "interruption" else "the rebalance recommendation"
        self.timeline.add("spotguard", f"heard {what} for {spot} first by {path}", at=at, kind="heard",
                          instance=spot, path=path, notice=kind)

    def _in_scenario_time(self, text: str) -> str:
        """spotguard counts wall seconds: "after 2s" becomes "after 2s (≈1m40s in scenario time)"."""
        return _SECONDS.sub(lambda m: f"{m.group(0)} (≈{span_text(float(m.group(1)) * self.speed)} scenario)", text)

    def _when(self, event: dict[str, Any]) -> float | None:
        """The log line's own timestamp in scenario time (None: now)."""
        if not self.timeline.started:
            return None
        try:
            epoch = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()
        except (KeyError, ValueError):
            return None
        return self.clock.at_epoch(epoch) - self.timeline.start

    # ------------------------------------------------------------------ the script

    async def _script(self) -> None:
        s = self.s
        if s.rebalance_before is not None:
            await self._at(s.notice_at - s.rebalance_before)
            await self._recommend()
        await self._at(s.notice_at)
        await self._interrupt(self.requests[:s.interrupted])
        if s.second_notice_in:
            fulfilled = self.fulfilled_at
            await self._until_forever(
                lambda: self.phase == s.second_notice_in and self.phase_since >= (fulfilled or 0.0),
            )
            await self.clock.sleep(s.second_notice_delay)
            await self._interrupt(self.requests[:1])
        if s.end_after is not None:
            await self._at(s.end_after)
        else:
            await self._until_forever(self._cycle_over)
        self.timeline.add("lab", "cycle over" if s.end_after is None else "scenario end", kind="end")
        await self.clock.sleep(s.tail)

    async def _interrupt(self, requests: tuple[str, ...]) -> None:
        """The interruption of each request's spot, at the same moment: notices, terminations, new spots."""
        s, world = self.s, self.world
        await self._on_the_second()
        spots = [self._notice(rid) for rid in requests]
        await asyncio.gather(*(asyncio.to_thread(self._eventbridge, INTERRUPTION, {"instance-id": spot,
                                                                                    "instance-action": "terminate"},
                                                 spot) for spot in spots))
        await self.clock.sleep(s.notice_period)
        for rid, spot in zip(requests, spots):
            world.terminate_spot(rid)
            self.terminations.append((spot, self.timeline.now()))
            self.timeline.add("ec2", f"{spot} terminated: the spot capacity is reclaimed", kind="terminated",
                              instance=spot)
        await self.fleet.tick()
        if s.refulfil_after is None:
            return
        await self.clock.sleep(s.refulfil_after)
        for rid in requests:
            new = world.fulfil(rid, pending=True)
            await asyncio.to_thread(self._eventbridge, FULFILLMENT, {"spot-instance-request-id": rid,
                                                                     "instance-id": new}, new)
            await self.fleet.tick()
            self.timeline.add("ec2", f"spot capacity is back: the request launches {new} (pending; its fulfilment "
                                     "and state changes go to SQS as EventBridge sends them)", kind="fulfilled",
                              instance=new)
        self.fulfilled_at = self.timeline.now()

    async def _on_the_second(self, before: float = 0.0) -> None:
        """Wait (under a wall second) until a notice `before` scenario seconds from now would have its
        termination on a whole wall second (or up to ON_THE_SECOND past one).

        EC2 says when it terminates in whole seconds (IMDS's instance-action time, the EventBridge
        warning's time) and spotguard reads the spot's deadline off them; the lab's termination
        on a fraction would be announced up to a wall second early, which is `speed` scenario
        seconds: a fleet would take a doomed spot out that much sooner (deregister_ahead).
        """
        ends = time.time() + self.clock.wall(before + self.s.notice_period)
        if ends - math.floor(ends) > ON_THE_SECOND:
            await asyncio.sleep(math.ceil(ends) - ends)

    def _notice(self, rid: str) -> str:
        """EC2's notice for the request's spot: its status, its IMDS (the EventBridge copy is the caller's)."""
        spot = self.world.spot_instance_id(rid)
        self.world.notice(rid)
        imds = self._imds_notice(spot)
        self.notices.append((spot, self.timeline.now()))
        said = f"IMDS spot/instance-action {json.dumps(imds['instance_action'])}" if imds else "no IMDS listening"
        self.timeline.add(
            "ec2",
            f"INTERRUPTION NOTICE for {spot} (spot request instance-terminated-no-capacity; {said}): "
            f"terminated in {span_text(self.s.notice_period)}",
            kind="notice", instance=spot, **imds,
        )
        return spot

    async def _recommend(self) -> None:
        """EC2's rebalance recommendation for the spot: on its IMDS and as EventBridge sends it."""
        spot = self.world.spot_instance_id(self.deployment.spot_request_id)
        metadata = self.fleet.metadata(spot)
        answer = metadata.set_rebalance(datetime.now(timezone.utc)) if metadata is not None else None
        said = f"IMDS events/recommendations/rebalance {json.dumps(answer)}" if answer else "no IMDS listening"
        self.timeline.add("ec2", f"REBALANCE RECOMMENDATION for {spot} (an elevated risk of interruption; {said}; "
                                 f"spotguard's on_rebalance = {self.s.on_rebalance})", kind="rebalance", instance=spot)
        await asyncio.to_thread(self._eventbridge, REBALANCE, {"instance-id": spot}, spot)

    def _imds_notice(self, spot: str) -> dict[str, Any]:
        """The spot's IMDS answers the interruption: terminate when the scenario terminates it.

        The time is on the wall clock, as an agent on the host reads it: now plus
        the notice period in wall seconds. Returns the timeline data ({} with no IMDS).
        """
        metadata = self.fleet.metadata(spot)
        if metadata is None:
            return {}
        at = datetime.now(timezone.utc) + timedelta(seconds=self.clock.wall(self.s.notice_period))
        return {"imds": metadata.url, "instance_action": metadata.set_interruption(at)}

    def _eventbridge(self, detail_type: str, detail: dict[str, str], instance_id: str) -> None:
        """An EC2 event as EventBridge delivers it to an SQS queue (for the SQS source to read).

        An interruption warning's time is set back so that it plus EC2's two minutes falls
        when the lab terminates the spot: spotguard reads its deadline off it on the wall clock.
        """
        world, sent = self.world, datetime.now(timezone.utc)
        if detail_type == INTERRUPTION:
            sent += timedelta(seconds=self.clock.wall(self.s.notice_period) - NOTICE)
        event = {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": detail_type,
            "source": "aws.ec2",
            "account": world.account_id,
            "time": sent.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": world.region,
            "resources": [f"arn:aws:ec2:{world.region}:{world.account_id}:instance/{instance_id}"],
            "detail": detail,
        }
        world.boto("sqs").send_message(QueueUrl=self.queue_url, MessageBody=json.dumps(event))
        self.sent_events.append(detail_type)

    def _state_changed(self, instance_id: str, state: str) -> None:
        """EC2's state-change notification for every instance, as EventBridge sends it (off the loop).
        An instance leaving `running` takes its agent with it, before its metadata service goes."""
        agent = self.agents.pop(instance_id, None) if state != "running" else None
        if agent is not None:
            agent.kill()
            asyncio.create_task(agent.stop())
        sent = asyncio.get_running_loop().run_in_executor(
            None, self._eventbridge, STATE_CHANGE, {"instance-id": instance_id, "state": state}, instance_id)
        sent.add_done_callback(self._event_sent)

    def _event_sent(self, sent: asyncio.Future) -> None:
        if not sent.cancelled() and sent.exception() is not None:
            self.timeline.add("lab", f"EventBridge → SQS failed: {sent.exception()!r}", kind="log")

    def _cycle_over(self) -> bool:
        """Unguarded: every spot healthy again. Guarded: every slot back to spot-healthy since the new
        spots came (the last change after them), every standby stopped."""
        if self.fulfilled_at is None:
            return False
        if not self.s.guarded:
            spots = {self.world.spot_instance_id(rid) for rid in self.requests}
            return spots <= set(self.balancer.healthy())
        standbys = self.deployment.standby_ids
        return (
            all(phase == "spot-healthy" for phase, _ in self.slots.values())
            and max((since for _, since in self.slots.values()), default=0.0) >= self.fulfilled_at
            and all(self.world.instance_state(sid) == "stopped" for sid in standbys)
        )

    def _spot_serving(self) -> bool:
        return set(self.first_spots) <= set(self.balancer.healthy())

    async def _at(self, moment: float) -> None:
        await self.clock.sleep(moment - self.timeline.now())

    async def _until(self, predicate: Any, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise RuntimeError(f"lab setup: timed out after {timeout:g}s waiting for {what}")
            await asyncio.sleep(0.01)

    async def _until_forever(self, predicate: Any) -> None:
        """Wait for `predicate` (the caller's deadline bounds it); stop if spotguard dies."""
        while not predicate():
            if self.spotguard is not None and self.spotguard.returncode is not None:
                raise _Aborted(f"spotguard exited {self.spotguard.returncode}: {self.spotguard.stderr_tail()}")
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ load on the timeline

    async def _report_load(self) -> None:
        """Load lines: when requests start or stop failing, and per window when something changed."""
        assert self.load is not None
        seen, window_start, last_window, last_line, failing_since = 0, 0, 0.0, 0.0, None
        streak, last_servers = 0, None
        while True:
            await asyncio.sleep(0.02)
            samples = self.load.samples
            for sample in samples[seen:]:
                # By answer time: samples come in as answered, and a closed loop's queue answers late.
                at = sample.done_at if sample.done_at is not None else sample.sent_at
                if not sample.ok and failing_since is None:
                    failing_since, streak = at, 0
                    self.timeline.add("load", f"REQUESTS FAILING: {_cause(sample)}", kind="failing")
                if not sample.ok:
                    streak += 1
                elif failing_since is not None:
                    span = at - failing_since
                    self.timeline.add(
                        "load", f"requests succeed again; {streak} failed over {span_text(span)}", kind="recovered"
                    )
                    failing_since = None
            seen = len(samples)
            now = self.timeline.now()
            if now - last_window >= LOAD_WINDOW:
                window = samples[window_start:seen]
                servers = frozenset(s.served_by for s in window if s.ok)
                if servers != last_servers or not all(s.ok for s in window) or now - last_line >= LOAD_QUIET:
                    self.timeline.add("load", self._load_line(window, now - last_window), kind="load")
                    last_line = now
                window_start, last_window, last_servers = seen, now, servers

    def _load_line(self, window: list[Sample], span: float) -> str:
        ok = [s for s in window if s.ok]
        by: dict[str, int] = {}
        for s in ok:
            name = self.timeline.label(s.served_by)
            by[name] = by.get(name, 0) + 1
        served = ", ".join(f"{n} {100 * c // max(1, len(ok))}%" for n, c in sorted(by.items())) or "nobody"
        rate = len(window) / max(1e-9, self.clock.wall(span))
        return f"{rate:.0f} req/s, {len(window) - len(ok)} failed (last {span_text(span)}); served by {served}"

    # ------------------------------------------------------------------ verdict

    def _outcome(self, completed: bool, problem: str | None, exit_code: int | None, wall: float) -> Outcome:
        samples = list(self.load.samples) if self.load else []
        failures: dict[str, int] = {}
        for sample in samples:
            if not sample.ok:
                failures[_cause(sample)] = failures.get(_cause(sample), 0) + 1
        end = self.timeline.now()
        gaps = sum((e if e >= 0 else end) - b for b, e in self.gaps)
        return Outcome(
            scenario=self.s,
            speed=self.speed,
            completed=completed,
            problem=problem,
            sent=len(samples),
            failed=sum(failures.values()),
            failures=failures,
            longest_outage=longest_outage(samples),
            no_healthy_target=gaps,
            standby_lead=self._standby_lead(samples),
            on_demand_seconds=self.fleet.on_demand_seconds() if self.fleet is not None else 0.0,
            spotguard_exit=exit_code,
            wall_seconds=wall,
            entries=tuple(self.timeline.entries),
            healthy=tuple(self.healthy_counts + [(end, n) for _, n in self.healthy_counts[-1:]]),
            served=served_rates(samples, LOAD_WINDOW, self.clock),
        )

    def _standby_lead(self, samples: list[Sample]) -> float | None:
        """The least time, over the interruptions, the standby served before the spot died."""
        standbys = set(self.deployment.standby_ids) if self.deployment is not None else set()
        if not standbys or not self.terminations:
            return None
        leads = []
        for (spot, died), (_, noticed) in zip(self.terminations, self.notices):
            first = min(
                (s.sent_at for s in samples if s.ok and s.served_by in standbys and noticed <= s.sent_at <= died),
                default=None,
            )
            if first is None:
                return None
            leads.append(died - first)
        return min(leads)


class _Aborted(Exception):
    pass


def _cause(sample: Sample) -> str:
    """Why a request failed, in words (the balancer's own answers name no instance)."""
    if sample.status == 503:
        return "503 from a warming target (fail-open)" if sample.served_by else "503 no healthy target"
    if sample.status == 502:
        return "502 target died mid-request"
    if sample.status == 504:
        return "504 target did not answer"
    return sample.error or "?"
