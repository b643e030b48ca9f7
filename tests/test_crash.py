"""kill -9 on either side of every AWS command of a failover and failback, then restart.

Each case runs the real `python -m spotguard run` against moto through an
`AwsProxy`. The proxy holds one chosen command: *before* it reaches AWS, or
*after* AWS carried it out with the reply withheld. When it is held the test
sends SIGKILL to the process (only the state file survives), drops the held
request, and starts a new process on the same state_dir. The world plays one
whole cycle meanwhile (notice → standby serves → spot replaced → failback).
Two more cases kill mid-poll, with no command in flight: in spot-healthy, so
the notice comes while the guard is down, and in spot-restored (the failback
grace is a timer, not a command).

Every case proves the same four things:
  * convergence: the cycle completes (back to spot-healthy, new spot healthy
    alone in the target group, standby stopped) and then stays put;
  * no needless repeat: AWS sees exactly one clean cycle of changes (start,
    register, deregister the doomed spot, register the new one, deregister
    and stop the standby), each once over both processes: the restart
    re-sends the held command only if AWS never saw it, and then within
    RESEND of its first poll; the second standby is never started;
  * write ahead: at the kill the state file already names the command's phase;
  * no outage: a thread samples DescribeTargetHealth straight from moto the
    whole time, and every sample has a healthy target.
Where AWS is still on its way at the kill (standby pending or stopping, its
target draining), the restarted process must also change nothing until it
settles.

A fleet's cases (FLEET_CASES) play the same with three spot requests behind
the target group, two standbys and notices for two spots at once: one kill in
each phase of that cycle. There each standby and each spot sees its own
commands exactly once, each standby covers one doomed position (never two for
one), and the sampler holds a stronger promise: never fewer healthy targets
than spot positions (a doomed spot serves until its own standby is healthy).

Cases wait on timers far more than they compute, so `played` plays them side
by side (PARALLEL at a time, each on its own deployment, proxy and processes)
and each test reports its own case.

This module must not import spotguard's daemon or reach into the process: it
only sees what an operator would (AWS, the state file, the logs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import boto3
import pytest
from awsproxy import AwsProxy, Hold, ProxyRequest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError
from configs import daemon_settings
from waiting import DEADLINE, TimedOut, until_blocking

# A lost command must reach AWS this soon after the restarted process's first poll.
RESEND = 5.0
# The health sampler's period: finer than a poll round, so any gap a command opens is seen.
SAMPLE_EVERY = 0.1
# Where a standby left pending or stopping at the kill ends up once it settles.
SETTLED = {"pending": "running", "stopping": "stopped"}
# Cases played side by side (each on its own deployment, proxy and processes).
PARALLEL = 4
# Polls after failback in which nothing may change any more.
SETTLE_POLLS = 2
# The id each command carries in its query parameters.
ID_PARAM = {
    "StartInstances": "InstanceId.1",
    "StopInstances": "InstanceId.1",
    "RegisterTargets": "Targets.member.1.Id",
    "DeregisterTargets": "Targets.member.1.Id",
}


# ---------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    action: str  # the AWS action held
    role: str  # whose command: standby | doomed spot | new spot; or poll: any poll while in `phase`
    phase: str  # the phase the state file must show at the kill
    after: bool = False  # held after AWS carried it out (reply withheld), else before it reached AWS
    note: str = ""  # said after the fault, for a poll crash
    # AWS still on its way: from the kill until the restarted process has polled SETTLE_POLLS
    # times, the standby is pending or stopping (a slow boot or shutdown) or its target draining.
    transient: str | None = None


@dataclass(frozen=True)
class FleetCase(Case):
    """A fleet's case: three spot requests behind one target group, two standbys, notices for two
    spots at once. `role` names whose command is held: `standby 2` (the second of the pool), `a
    standby`, `a doomed spot` or `a new spot` (the first such command for either of the two);
    `poll`: any poll while some slot is in `phase`. `phase` is the state file's phase of the slot
    that holds the command's instance (of some slot, for a poll). A transient state is the held
    command's standby's; only that standby must see no command until it settles."""


def fault(case: Case, outcome: str, *extra: pytest.MarkDecorator) -> pytest.param:
    """One row of the fault matrix: the case with its `fault` marker (and any extra marks)."""
    when = "after" if case.after else "before"
    if case.role == "poll":
        text, ident = f"kill -9 mid-poll in {case.phase}{case.note}", f"poll-in-{case.phase}"
    else:
        text = (f"kill -9 after AWS ran {case.action} ({case.role}), reply unread" if case.after
                else f"kill -9 before {case.action} ({case.role}) reaches AWS")
        ident = f"{when}-{case.action}-{case.role.replace(' ', '-')}"
        if case.transient:
            text += f", standby still {case.transient}"
            ident += f"-{case.transient}"
    if isinstance(case, FleetCase):
        text, ident = f"fleet of 3 spots, 2 noticed at once: {text}", f"fleet-{ident}"
    marks = (pytest.mark.fault(fault=text, phase=case.phase, outcome=outcome), *extra)
    return pytest.param(case, marks=marks, id=ident)


CASES = [
    fault(Case("DescribeTargetHealth", "poll", "spot-healthy", after=True, note="; the notice comes while it is down"),
          "converges: restart sees the notice and fails over, then back, as if never down"),
    fault(Case("StartInstances", "standby", "standby-starting"),
          "converges: restart sends the lost StartInstances in its first rounds (one in all)"),
    fault(Case("StartInstances", "standby", "standby-starting", after=True),
          "converges: restart sees the standby running, registers it, sends no second StartInstances"),
    fault(Case("StartInstances", "standby", "standby-starting", after=True, transient="pending"),
          "converges: restart waits for the pending standby (no second StartInstances), registers it once running"),
    fault(Case("RegisterTargets", "standby", "standby-starting"),
          "converges: restart registers the standby; the doomed spot serves until it is healthy"),
    fault(Case("RegisterTargets", "standby", "standby-starting", after=True),
          "converges: restart finds the standby registered and healthy, does not register it again"),
    fault(Case("DeregisterTargets", "doomed spot", "both-serving"),
          "converges: restart deregisters the doomed spot once, only with the standby healthy"),
    fault(Case("DeregisterTargets", "doomed spot", "both-serving", after=True),
          "converges: restart finds the doomed spot out of the target group, does not repeat"),
    fault(Case("RegisterTargets", "new spot", "both-serving"),
          "converges: restart registers the new spot, then fails back after the grace"),
    fault(Case("RegisterTargets", "new spot", "both-serving", after=True),
          "converges: restart finds the new spot registered and healthy, fails back after the grace"),
    fault(Case("DescribeTargetHealth", "poll", "spot-restored", after=True, note=" (failback grace running)"),
          "converges: restart resumes in spot-restored, then deregisters and stops the standby once"),
    fault(Case("DeregisterTargets", "standby", "standby-draining"),
          "converges: restart deregisters the standby (the new spot serves), then stops it"),
    fault(Case("DeregisterTargets", "standby", "standby-draining", after=True),
          "converges: restart finds the standby out of the target group and stops it"),
    fault(Case("DeregisterTargets", "standby", "standby-draining", after=True, transient="draining"),
          "converges: restart waits out the draining (no repeat, no stop before it ends), then stops the standby"),
    fault(Case("StopInstances", "standby", "standby-draining"),
          "converges: restart stops the drained standby; none left running"),
    fault(Case("StopInstances", "standby", "standby-draining", after=True),
          "converges: restart finds the standby stopped, back to spot-healthy without a second StopInstances"),
    fault(Case("StopInstances", "standby", "standby-draining", after=True, transient="stopping"),
          "converges: restart waits for the stopping standby (no second StopInstances), then spot-healthy"),
]


# Each kill in a phase of one fleet cycle: both standbys starting (one started, the other's start
# lost), both serving (one doomed spot out), one spot back (its slot restored, the other position
# still on its standby), one standby draining.
FLEET_CASES = [
    fault(FleetCase("StartInstances", "standby 2", "standby-starting"),
          "converges: restart starts the second standby once, not the first again; each doomed spot "
          "serves until its own standby is healthy"),
    fault(FleetCase("DeregisterTargets", "a doomed spot", "both-serving", after=True),
          "converges: restart does not deregister that spot again and deregisters the other once"),
    fault(FleetCase("DescribeTargetHealth", "poll", "spot-restored", after=True,
                    note=" (one spot back, the other position still on its standby)"),
          "converges: restart releases one standby per new spot, each after the grace"),
    fault(FleetCase("DeregisterTargets", "a standby", "standby-draining"),
          "converges: restart deregisters that standby once, then stops it; the other follows its own spot"),
]


# ---------------------------------------------------------------------- the harness


class HealthSampler:
    """Samples the target group's health from moto directly, in a thread, until stopped."""

    def __init__(self, endpoint_url: str, region: str, target_group_arn: str) -> None:
        # Its own session: boto3's default one must not build clients from many threads at once.
        self.elbv2 = boto3.session.Session().client("elbv2", region_name=region, endpoint_url=endpoint_url)
        self.arn = target_group_arn
        self.samples: list[dict[str, str]] = []
        self.sampled = threading.Event()  # set once the first sample is in
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                reply = self.elbv2.describe_target_health(TargetGroupArn=self.arn)
            except (BotoCoreError, ClientError):
                pass  # a moto hiccup is no outage: sample again
            else:
                health = {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in reply["TargetHealthDescriptions"]}
                self.samples.append(health)
                self.sampled.set()
            if self._stop.wait(SAMPLE_EVERY):
                return

    def __enter__(self) -> "HealthSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def latest(self) -> dict[str, str]:
        """The last sample taken (the test reads health from here rather than add calls of its own)."""
        self.sampled.wait(DEADLINE)
        return dict(self.samples[-1])

    def outages(self) -> list[dict[str, str]]:
        return [s for s in self.samples if "healthy" not in s.values()]


class Guard:
    """`spotguard run` as real processes on one config and state_dir, one at a time."""

    def __init__(self, tmp_path: Path, config: Path, name: str) -> None:
        self.tmp_path = tmp_path
        self.config = config
        self.state_file = tmp_path / "state" / f"{name}.json"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        n = len(self.procs)
        out = open(self.tmp_path / f"run{n}.out", "w")
        err = open(self.tmp_path / f"run{n}.err", "w")
        with out, err:  # the child keeps its own copies of the descriptors
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "spotguard", "run", "--config", str(self.config)],
                stdout=out, stderr=err, env=dict(os.environ),
            ))

    @property
    def proc(self) -> subprocess.Popen:
        return self.procs[-1]

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL

    def terminate(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def phase(self) -> str:
        """The phase the state file shows; spot-healthy before the first save."""
        return self.saved().get("phase", "spot-healthy")

    def saved(self) -> dict:
        """The state file as JSON; {} before the first save."""
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}

    def slot_phases(self) -> list[str]:
        """A fleet's slots' phases as the state file shows them."""
        return [slot["phase"] for slot in self.saved().get("slots", [])]

    def logs(self) -> str:
        parts = []
        for n in range(len(self.procs)):
            for kind in ("out", "err"):
                text = (self.tmp_path / f"run{n}.{kind}").read_text()
                parts.append(f"--- run{n}.{kind}\n" + "\n".join(text.splitlines()[-25:]))
        return "\n".join(parts)

    def log_events(self, n: int) -> list[str]:
        lines = (self.tmp_path / f"run{n}.out").read_text().splitlines()
        return [json.loads(line)["event"] for line in lines if line.startswith("{")]


@dataclass
class Crash:
    """The kill to inflict, and what was true when it came."""

    hold: Hold  # the kill comes once it holds a request, which is then dropped
    # For a command held before AWS saw it: the restart must send it again within RESEND of its first poll.
    resent: Callable[[ProxyRequest], bool] | None = None
    phase: str | None = None  # what the state file said at the kill
    saved: dict | None = None  # the whole state file at the kill (a fleet's slots with it)
    forwarded: int = 0  # requests AWS had seen at the kill
    restarted: float = float("inf")  # monotonic time the second process was started


class Scene:
    """One case: the world, the proxy, the guard's processes and the crash to inflict."""

    def __init__(self, world, deployment, proxy: AwsProxy, guard: Guard, crash: Crash, transient: str | None) -> None:
        self.world, self.d, self.proxy, self.guard, self.crash = world, deployment, proxy, guard, crash
        self.transient = transient  # the standby's state from the kill until it settles
        self.standby = deployment.standby_ids[0]  # the standby in it: the held command's, once held
        self.settled_at: float | None = None  # when the transient state ended

    def until(self, predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
        """until_blocking that plays the crash between looks; a failure shows what AWS saw and the logs."""

        def done() -> bool:
            if predicate() and not self._crash_pending():
                return True
            self._crash_if_due()
            self._settle()
            self.check_resent()
            if self.guard.proc.poll() is not None:
                self.fail(f"spotguard exited ({self.guard.proc.returncode}) waiting for {what}")
            return False

        try:
            until_blocking(done, timeout, what=what)
            return
        except TimedOut as timed_out:
            why = str(timed_out)
        self.fail(why)

    def _crash_pending(self) -> bool:
        """The hold caught its request but the kill has not come yet: nothing is settled until it has."""
        return self.crash.phase is None and bool(self.crash.hold.requests)

    def fail(self, why: str) -> None:
        requests = self.proxy.requests
        seen = f"{commands(requests)} and {len(requests) - len(commands(requests))} Describe calls"
        raise AssertionError(f"{why}\nAWS saw {seen}\n{self.guard.logs()}")

    def _crash_if_due(self) -> None:
        crash = self.crash
        if crash.phase is not None or not crash.hold.arrived.is_set():
            return
        crash.phase = self.guard.phase()  # written ahead: it must already name the command's phase
        crash.saved = self.guard.saved()
        self.guard.kill9()
        crash.forwarded = len(self.proxy.requests)
        crash.hold.drop()  # before: AWS never sees it; after: the dead process never hears back
        held = crash.hold.requests[0]
        self.standby = held.params.get(ID_PARAM.get(held.action, ""), self.standby)
        if self.transient == "draining":
            self.world.hold_draining(self.d.target_group_arn, self.standby)
        elif self.transient:
            self.world.set_state(self.standby, self.transient)
        crash.restarted = time.monotonic()
        self.guard.start()

    def _settle(self) -> None:
        """End the transient state once the restarted process has seen it SETTLE_POLLS times."""
        if not self.transient or self.crash.phase is None:
            return
        polls = [r for r in self.proxy.requests[self.crash.forwarded:] if r.action == "DescribeSpotInstanceRequests"]
        if len(polls) < SETTLE_POLLS:
            return
        if self.transient == "draining":
            self.world.hold_draining(self.d.target_group_arn, self.standby, False)
        else:
            self.world.set_state(self.standby, SETTLED[self.transient])
        self.transient, self.settled_at = None, time.monotonic()

    def check_resent(self, final: bool = False) -> None:
        """Fail once RESEND has passed since the restarted process's first poll without the lost command."""
        crash = self.crash
        if crash.resent is None or crash.phase is None:
            return
        # The dead process's loop polls on while its command is held, so a poll of its may
        # still be on its way at the kill: the clock starts at the new process's first poll.
        since = [r for r in self.proxy.requests[crash.forwarded:] if r.at >= crash.restarted]
        first_poll = next((r.at for r in since if r.action == "DescribeSpotInstanceRequests"), None)
        if first_poll is None or (not final and time.monotonic() - first_poll < RESEND):
            return
        if not any(crash.resent(r) and r.at - first_poll <= RESEND for r in since):
            self.fail(f"the restarted process did not send the lost command within {RESEND}s of its first poll")
        crash.resent = None  # seen in time: stop checking

    def polls(self) -> int:
        return self.proxy.actions.count("DescribeSpotInstanceRequests")


Ids = Callable[[], str | None] | str | frozenset[str]


def matcher(action: str, instance_id: Ids) -> Callable[[ProxyRequest], bool]:
    """Requests of `action` for one instance (`instance_id` may be looked up at request time),
    or for any of a set of them."""
    def match(request: ProxyRequest) -> bool:
        wanted = instance_id() if callable(instance_id) else instance_id
        wanted = frozenset() if wanted is None else frozenset({wanted}) if isinstance(wanted, str) else wanted
        return request.action == action and request.params.get(ID_PARAM[action]) in wanted
    return match


def commands(requests: list[ProxyRequest]) -> list[tuple[str, str]]:
    """The changes AWS was asked to make, in order, as (action, instance id)."""
    return [(r.action, r.params.get(ID_PARAM[r.action], "?")) for r in requests if r.action in ID_PARAM]


# ---------------------------------------------------------------------- the test


def arm(case: Case, proxy: AwsProxy, guard: Guard, ids: dict[str, Ids]) -> Crash:
    if case.role == "poll":
        # Judged on the proxy's thread as the request arrives: the held poll keeps the
        # process in `phase` until the kill, however slowly this thread gets to it.
        def match(request: ProxyRequest) -> bool:
            phases = guard.slot_phases() if isinstance(case, FleetCase) else [guard.phase()]
            return request.action == case.action and case.phase in phases
    else:
        match = matcher(case.action, ids[case.role])
    hold = proxy.hold(case.action, after=case.after, match=match)

    def resent(request: ProxyRequest) -> bool:
        """The held command again: the same action for the same instance."""
        key = ID_PARAM[case.action]
        return request.action == case.action and any(request.params.get(key) == h.params.get(key)
                                                      for h in hold.requests)
    return Crash(hold, resent=None if case.after or case.role == "poll" else resent)


def play(case: Case, world, d, tmp_path: Path) -> None:
    """One case, start to finish, on its own deployment and proxy; AssertionError when a promise breaks."""
    standby, spare, doomed = d.standby_ids[0], d.standby_ids[1], d.spot_instance_id

    def new_spot() -> str | None:
        current = world.spot_instance_id(d.spot_request_id)
        return current if current not in (None, doomed) else None

    with AwsProxy(world.endpoint_url) as proxy:
        daemon_settings(tmp_path, world, [d], poll="0.2s", grace="1s", aws={"endpoint_url": proxy.url})
        guard = Guard(tmp_path, tmp_path / "config.toml", d.name)
        crash = arm(case, proxy, guard, {"standby": standby, "doomed spot": doomed, "new spot": new_spot})
        scene = Scene(world, d, proxy, guard, crash, case.transient)
        with HealthSampler(world.endpoint_url, world.region, d.target_group_arn) as sampler:
            guard.start()
            try:
                scene.until(lambda: scene.polls() >= 1, "the first poll")
                world.notice(d.spot_request_id)
                scene.until(lambda: sampler.latest() == {standby: "healthy"}, "serving on the standby alone")
                # The doomed spot goes only once it is out of the target group, as the ALB would drain it.
                world.terminate_spot(d.spot_request_id)
                new = world.fulfil(d.spot_request_id)
                scene.until(lambda: guard.phase() == "spot-healthy" and world.instance_state(standby) == "stopped",
                            "failed back: spot-healthy, standby stopped")
                settled, polls = len(proxy.requests), scene.polls()
                scene.until(lambda: scene.polls() >= polls + SETTLE_POLLS, "a few more polls")
                scene.check_resent(final=True)
            finally:
                guard.terminate()

    if crash.phase is None:
        scene.fail(f"the crash never came: {case}")
    assert crash.phase == case.phase, "the state file did not name the phase before its command ran"
    # AWS saw one clean cycle: each change exactly once, whichever side of it the process died on.
    assert commands(proxy.requests) == [
        ("StartInstances", standby),
        ("RegisterTargets", standby),
        ("DeregisterTargets", doomed),
        ("RegisterTargets", new),
        ("DeregisterTargets", standby),
        ("StopInstances", standby),
    ]
    assert commands(proxy.requests[settled:]) == [], "still changing things after failback"
    if case.transient:
        assert scene.settled_at is not None, f"the standby never stopped being {case.transient}"
        early = [r for r in proxy.requests[crash.forwarded:] if r.action in ID_PARAM and r.at < scene.settled_at]
        assert early == [], f"acted while the standby was still {case.transient}: {commands(early)}"
    assert world.health(d.target_group_arn) == {new: "healthy"}
    assert world.states(standby, spare) == {standby: "stopped", spare: "stopped"}
    assert len(sampler.samples) >= 10 and sampler.outages() == [], f"no healthy target: {sampler.outages()[:3]}"
    assert guard.proc.returncode == 0 and guard.log_events(len(guard.procs) - 1)[-1] == "daemon.stopped"


def play_fleet(case: FleetCase, world, d, requests: tuple[str, str, str], tmp_path: Path) -> None:
    """One fleet case: `requests` (d's spot request first) behind d's target group, d's two standbys.
    The first two spots get their notices at once; once both standbys serve, they are replaced one
    after the other, so one position is back (restored) while the other is still on its standby."""
    first, second, third = requests
    s1, s2 = d.standby_ids
    doomed = {r: world.spot_instance_id(r) for r in (first, second)}
    keeper = world.spot_instance_id(third)
    new: dict[str, str] = {}

    with AwsProxy(world.endpoint_url) as proxy:
        daemon_settings(tmp_path, world, [d], poll="0.2s", grace="1s", aws={"endpoint_url": proxy.url},
                        guard={"spot_request_ids": list(requests)})
        guard = Guard(tmp_path, tmp_path / "config.toml", d.name)
        ids = {"standby 2": s2, "a standby": frozenset({s1, s2}), "a doomed spot": frozenset(doomed.values()),
               "a new spot": lambda: frozenset(new.values())}
        crash = arm(case, proxy, guard, ids)
        scene = Scene(world, d, proxy, guard, crash, case.transient)
        with HealthSampler(world.endpoint_url, world.region, d.target_group_arn) as sampler:
            guard.start()
            try:
                scene.until(lambda: scene.polls() >= 1, "the first poll")
                for request in (first, second):
                    world.notice(request)
                serving = {s1: "healthy", s2: "healthy", keeper: "healthy"}
                scene.until(lambda: sampler.latest() == serving, "both doomed spots out, both standbys serving")
                positions = covering(guard.saved())
                # The doomed spots go only once out of the target group, as the ALB would drain them.
                for request in (first, second):
                    world.terminate_spot(request)
                new[first] = world.fulfil(first)
                scene.until(lambda: sampler.latest().get(new[first]) == "healthy", "the first new spot serving")
                new[second] = world.fulfil(second)
                scene.until(lambda: guard.phase() == "spot-healthy"
                            and {world.instance_state(s) for s in (s1, s2)} == {"stopped"},
                            "failed back: spot-healthy, both standbys stopped")
                settled, polls = len(proxy.requests), scene.polls()
                scene.until(lambda: scene.polls() >= polls + SETTLE_POLLS, "a few more polls")
                scene.check_resent(final=True)
            finally:
                guard.terminate()

    if crash.phase is None:
        scene.fail(f"the crash never came: {case}")
    held = crash.hold.requests[0].params.get(ID_PARAM.get(case.action, ""))
    slots = crash.saved.get("slots", [])
    at_kill = [s["phase"] for s in slots if case.role == "poll" or held in s["holds"] or held == s["standby"]]
    assert case.phase in at_kill, f"the state file did not name the slot's phase before its command ran: {slots}"
    # One standby for each doomed position, never two.
    assert positions == {s1: [doomed[first]], s2: [doomed[second]]} or positions == {
        s1: [doomed[second]], s2: [doomed[first]]}, f"standbys and the positions they cover: {positions}"
    # AWS saw one clean cycle per position: each change exactly once, whichever side of it the process died on.
    done = commands(proxy.requests)
    per_instance = {iid: [action for action, i in done if i == iid] for iid in {i for _, i in done}}
    assert per_instance == {
        s1: ["StartInstances", "RegisterTargets", "DeregisterTargets", "StopInstances"],
        s2: ["StartInstances", "RegisterTargets", "DeregisterTargets", "StopInstances"],
        doomed[first]: ["DeregisterTargets"],
        doomed[second]: ["DeregisterTargets"],
        new[first]: ["RegisterTargets"],
        new[second]: ["RegisterTargets"],
    }, done
    assert commands(proxy.requests[settled:]) == [], "still changing things after failback"
    if case.transient:
        assert scene.settled_at is not None, f"the standby never stopped being {case.transient}"
        early = [r for r in proxy.requests[crash.forwarded:] if r.action in ID_PARAM and r.at < scene.settled_at
                 and r.params.get(ID_PARAM[r.action]) == scene.standby]
        assert early == [], f"acted on the standby while it was still {case.transient}: {commands(early)}"
    assert world.health(d.target_group_arn) == {new[first]: "healthy", new[second]: "healthy", keeper: "healthy"}
    # A doomed spot served until its own standby was healthy: never fewer healthy targets than spot positions.
    short = [s for s in sampler.samples if list(s.values()).count("healthy") < len(requests)]
    assert len(sampler.samples) >= 10 and short == [], f"capacity short: {short[:3]}"
    assert guard.proc.returncode == 0 and guard.log_events(len(guard.procs) - 1)[-1] == "daemon.stopped"


def covering(saved: dict) -> dict[str, list[str]]:
    """Each slot's standby and the spots the slot holds, from a fleet's state file."""
    return {s["standby"]: sorted(s["holds"]) for s in saved.get("slots", []) if s["standby"] is not None}


@pytest.fixture(scope="module")
def played(request, moto_server, tmp_path_factory) -> dict[Case, BaseException | None]:
    """Every selected case played at once, PARALLEL at a time, each on its own deployment.

    A case waits on timers far more than it computes, so playing them side by
    side costs little more than the slowest one. Each test then reports its own
    case's outcome (the exception, traceback and logs included).
    """
    mine = [i for i in request.session.items if i.module is request.module and hasattr(i, "callspec")]
    cases = [i.callspec.params["case"] for i in mine if "case" in i.callspec.params]
    moto_server.reset()
    base = tmp_path_factory.mktemp("crash")
    provisioning = threading.Lock()

    def one(numbered: tuple[int, Case]) -> BaseException | None:
        n, case = numbered
        with provisioning:  # building goes one at a time: moto's backends are not built for racing creates
            deployment = moto_server.provision(f"c{n}", standbys=2)
            more = [moto_server.add_spot(deployment)[0] for _ in range(2)] if isinstance(case, FleetCase) else []
        tmp_path = base / f"c{n}"
        tmp_path.mkdir()
        try:
            if isinstance(case, FleetCase):
                play_fleet(case, moto_server, deployment, (deployment.spot_request_id, *more), tmp_path)
            else:
                play(case, moto_server, deployment, tmp_path)
        except BaseException as exc:  # noqa: BLE001 - handed to the case's own test
            return exc
        return None

    # The longest (a fleet's) first, so that none of them ends the run alone.
    order = sorted(enumerate(cases), key=lambda numbered: not isinstance(numbered[1], FleetCase))
    with ThreadPoolExecutor(PARALLEL, thread_name_prefix="crash-case") as pool:
        return dict(zip([case for _, case in order], pool.map(one, order)))


@pytest.mark.parametrize("case", CASES)
def test_kill9_then_restart_converges(played, case: Case):
    error = played[case]
    if error is not None:
        raise error


@pytest.mark.parametrize("case", FLEET_CASES)
def test_kill9_in_a_fleet_cycle_then_restart_converges(played, case: FleetCase):
    """Three spots, two noticed at once, two standbys: both doomed spots' replacements serve,
    one standby per position, none left running after the grace, and capacity never short."""
    error = played[case]
    if error is not None:
        raise error


# ---------------------------------------------------------------------- the proxy itself


@pytest.fixture
def proxy(moto_world):
    with AwsProxy(moto_world.endpoint_url) as made:
        yield made


def _client(world, proxy: AwsProxy, service: str, **config):
    """A boto3 client through the proxy that tries once: what the proxy does is what it sees."""
    return boto3.client(service, region_name=world.region, endpoint_url=proxy.url,
                        config=Config(retries={"total_max_attempts": 1}, **config))


def _in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_proxy_holds_a_command_before_or_after_aws_carries_it_out(moto_world, deployment, proxy):
    world, standby = moto_world, deployment.standby_ids[0]
    ec2 = _client(world, proxy, "ec2")
    before = proxy.hold("StartInstances", match=matcher("StartInstances", standby))
    thread, outcome = _in_thread(lambda: ec2.start_instances(InstanceIds=[standby]))
    assert before.arrived.wait(DEADLINE)
    assert world.instance_state(standby) == "stopped" and "StartInstances" not in proxy.actions
    before.release()
    thread.join(DEADLINE)
    assert outcome[0]["StartingInstances"][0]["InstanceId"] == standby
    assert world.instance_state(standby) == "running" and proxy.actions == ["StartInstances"]

    after = proxy.hold("StopInstances", after=True)
    thread, outcome = _in_thread(lambda: ec2.stop_instances(InstanceIds=[standby]))
    assert after.arrived.wait(DEADLINE)
    assert world.instance_state(standby) == "stopped"  # AWS did it; the reply is withheld
    after.drop()
    thread.join(DEADLINE)
    assert isinstance(outcome[0], Exception), outcome  # the connection closed with no reply
    assert proxy.actions == ["StartInstances", "StopInstances"] and len(after.requests) == 1


def test_proxy_reads_json_protocol_actions_and_blackholes(moto_world, proxy):
    sqs = _client(moto_world, proxy, "sqs")
    sqs.create_queue(QueueName="crash")
    assert proxy.actions == ["CreateQueue"]
    assert proxy.requests[0].params == {"QueueName": "crash"}  # SQS speaks JSON: X-Amz-Target and a JSON body
    proxy.blackhole()
    with pytest.raises(ReadTimeoutError):  # a short read timeout only here: moto may be slow on a busy box
        _client(moto_world, proxy, "sqs", read_timeout=0.5).list_queues()
    proxy.blackhole(False)
    assert sqs.list_queues()["QueueUrls"][0].endswith("/crash")
    assert proxy.actions == ["CreateQueue", "ListQueues"]
