"""`spotguard rehearse`: a failover's standby half on the live deployment, timed, recorded for `check`, then undone.

What it refuses, how it puts things back and how it plays with a running daemon
are in docs/operations.md. This module must not decide failovers (it asks the
machine when it may start, hand over or deregister) nor write the daemon's state;
besides its own record it only starts, registers, deregisters and stops the one
standby it rehearses.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from spotguard import rehearsal, store
from spotguard.aws import AWS_ERRORS, client, error_code
from spotguard.commands.common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, add_config_argument, load_or_report, run_aws
from spotguard.config import GuardSettings, Settings, format_duration
from spotguard.machine import FAILOVER_PHASES, REHEARSAL_PHASE, SILENT_FALLBACK, GuardState, Target, may_take_out
from spotguard.rehearsal import Rehearsal
from spotguard.sources.probe import PASS, HealthCheck, check_once
from spotguard.timing import Budget, detection_seconds

POLL = 1.0  # seconds between describes while waiting
DRAIN_MARGIN = 60.0  # past the deregistration delay, stop waiting for a drain
STOP_DEADLINE = 600.0  # StopInstances → stopped, at most
ABSENT_TARGET = "InvalidTarget"  # DeregisterTargets of a target not in the group
# The standby in one of these while rehearse starts it: someone else (the daemon?) is stopping it.
TAKEN_STATES = frozenset({"stopping", "shutting-down", "terminated"})


# ---------------------------------------------------------------------- the rehearsal


class _Stop(Exception):
    """The rehearsal cannot go on: why, in words for the person running it."""


class Rehearser:
    """One rehearsal of one guard's first standby; `interrupt` is the signal handler's entry."""

    def __init__(self, settings: Settings, guard: GuardSettings, *, ec2: Any, elbv2: Any,
                 out: TextIO | None = None, interval: float = POLL, clock: Callable[[], float] = time.monotonic):
        self.settings, self.guard = settings, guard
        self.ec2, self.elbv2 = ec2, elbv2
        self.out = sys.stdout if out is None else out
        self.interval, self.clock = interval, clock
        self.standby = guard.standby_instance_ids[0]
        self.target: dict[str, Any] = {"Id": self.standby}
        if guard.target_port is not None:
            self.target["Port"] = int(guard.target_port)
        self.started = self.registered = False
        self.putting_back = False
        self.signal: int | None = None
        self.drain: float | None = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def interrupt(self, signum: int, task: asyncio.Task) -> None:
        """First signal: stop rehearsing and put things back. Later ones: noted, ignored."""
        if self.signal is None and not self.putting_back:
            self.signal = signum
            task.cancel()
            return
        self.signal = self.signal or signum
        self.say(f"{signal.Signals(signum).name}: still putting {self.standby} back; please wait")

    async def run(self) -> int:
        """Refuse, or rehearse and put back. 0 done, 1 refused or failed, 128+signal interrupted."""
        try:
            refusal = await self._refusal()
            if refusal:
                self.say(f"refused: {refusal}")
                return EXIT_FAILED
            with rehearsal.announced(self.settings.daemon.state_dir, self.guard.name, self.standby):
                return await self._rehearse()
        except asyncio.CancelledError:  # before the rehearsal began
            return await self._interrupted()

    async def _rehearse(self) -> int:
        """Start, measure, put back; the daemon knows the standby is being rehearsed meanwhile."""
        try:
            outcome = await self._measure()
        except asyncio.CancelledError:
            return await self._interrupted()
        except Exception:
            await self._put_back()  # a bug here must not leave an On-Demand standby running either
            raise
        ok = await self._put_back()
        if self.signal is not None:
            return 128 + self.signal
        return EXIT_OK if ok and outcome else EXIT_FAILED

    async def _interrupted(self) -> int:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        self.say(f"interrupted ({signal.Signals(self.signal or signal.SIGINT).name}): putting {self.standby} back")
        await self._put_back()
        return 128 + (self.signal or signal.SIGINT)

    # ------------------------------------------------------------------ before anything

    async def _refusal(self) -> str | None:
        saved = self._saved_state()
        if isinstance(saved, str):
            return saved
        if saved is not None and saved.phase is not REHEARSAL_PHASE:
            return (f"guard {self.guard.name} is {saved.phase.value} ({saved.reason}); "
                    f"rehearse only while it is {REHEARSAL_PHASE.value}")
        try:
            state = await self._instance_state()
            registered = await self._health()
            attributes = await self.elbv2.describe_target_group_attributes(TargetGroupArn=self.guard.target_group_arn)
        except AWS_ERRORS as exc:
            return f"cannot describe the standby or its target group: {error_code(exc)}"
        if state != "stopped":
            return f"standby {self.standby} is {state}, not stopped"
        if self.standby in registered:
            return f"standby {self.standby} is already in the target group ({registered[self.standby]})"
        delay = {a["Key"]: a["Value"] for a in attributes["Attributes"]}.get("deregistration_delay.timeout_seconds")
        self.drain = float(delay) if delay is not None else None
        if saved is None:
            self.say(f"note: no saved state for guard {self.guard.name} in {self.settings.daemon.state_dir} "
                     "(is the daemon running with this config?)")
        return None

    def _saved_state(self) -> GuardState | str | None:
        """The daemon's saved state; None when none is saved; a string when unreadable."""
        state_dir = self.settings.daemon.state_dir
        try:
            return store.peek(state_dir, self.guard.name, self.guard.rules())
        except (OSError, ValueError) as exc:
            return f"cannot read the guard's saved state {store.Store(state_dir).path(self.guard.name)}: {exc}"

    # ------------------------------------------------------------------ the measurement

    async def _measure(self) -> bool:
        """Start, register, wait healthy; record the result. False when it did not get healthy."""
        at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        began = self.clock()
        marks: dict[str, float] = {}
        deadline = began + self.guard.standby_ready_timeout
        try:
            self.say(f"StartInstances {self.standby}")
            self.started = True  # before the call: if it is interrupted, the standby may be starting
            await self.ec2.start_instances(InstanceIds=[self.standby])
            await self._until_running(deadline)
            marks["running"] = self.clock() - began
            if self.guard.register_when == "ready":
                self.say(f"running after {marks['running']:.1f}s; probing its health check")
                await self._until_ready(deadline, marks, began)
                self.say("RegisterTargets")
            else:
                self.say(f"running after {marks['running']:.1f}s; RegisterTargets")
            self.registered = True
            await self.elbv2.register_targets(TargetGroupArn=self.guard.target_group_arn, Targets=[self.target])
            marks["registered"] = self.clock() - began
            self.say(f"registered after {marks['registered']:.1f}s; waiting for healthy")
            await self._until_healthy(deadline)
            marks["healthy"] = self.clock() - began
        except _Stop as exc:
            self.say(f"rehearsal failed: {exc}")
            self._record(at, str(exc), marks)
            return False
        except AWS_ERRORS as exc:
            self.say(f"rehearsal failed: {error_code(exc)}")
            self._record(at, f"failed: {error_code(exc)}", marks)
            return False
        after = f" ({marks['healthy'] - marks['ready']:.1f}s after it answered)" if "ready" in marks else ""
        self.say(f"healthy after {marks['healthy']:.1f}s{after}")
        path = self._record(at, "healthy", marks)
        budget = Budget(detection_seconds(self.settings), marks["healthy"], self.drain or 0.0)
        drain = "" if self.drain is not None else " (deregistration delay unknown)"
        self.say(f"budget: {budget.text()}{drain}" + ("" if budget.fits else " — it does not fit"))
        self.say(f"recorded in {path}")
        return True

    def _record(self, at: str, outcome: str, marks: dict[str, float]) -> Path:
        rounded = {k: round(v, 2) for k, v in marks.items()}
        return rehearsal.write(self.settings.daemon.state_dir,
                               Rehearsal(self.guard.name, self.standby, at, outcome, **rounded))

    async def _until_running(self, deadline: float) -> None:
        while True:
            state = await self._instance_state()
            if state == "running":
                return
            if state in TAKEN_STATES:  # not "stopped": just after StartInstances EC2 may still say so
                raise _Stop(f"{self.standby} is {state}: changed by someone else (the daemon?)")
            await self._wait(deadline, f"not running within {format_duration(self.guard.standby_ready_timeout)}")

    async def _until_ready(self, deadline: float, marks: dict[str, float], began: float) -> None:
        """As the daemon does: probe the group's health check on the standby's address until it passes
        (or, unprobeable or silent for SILENT_FALLBACK, go on and say so)."""
        group = (await self.elbv2.describe_target_groups(TargetGroupArns=[self.guard.target_group_arn]))
        check = HealthCheck.of_target_group(group["TargetGroups"][0])
        if isinstance(check, str):
            self.say(f"{check} cannot be probed from here: registering it as it runs")
            return
        address = await self._address()
        port = check.port_for(self.guard.target_port, group["TargetGroups"][0].get("Port"))
        answered, last = False, None
        while True:
            outcome, heard = await check_once(address, int(port), check)
            answered |= heard
            if outcome == PASS:
                marks["ready"] = self.clock() - began
                self.say(f"answers its health check ({check.protocol} {address}:{port}) after {marks['ready']:.1f}s")
                return
            if outcome != last:
                self.say(f"health check from here: {outcome} ({check.protocol} {address}:{port})")
                last = outcome
            if not answered and self.clock() - began - marks["running"] >= SILENT_FALLBACK:
                self.say(f"no answer from {address}:{port} for {SILENT_FALLBACK:.0f}s: registering it unproven, "
                         "as the daemon would (see `spotguard check`)")
                return
            await self._wait(deadline, f"not answering its health check within "
                                       f"{format_duration(self.guard.standby_ready_timeout)} (last: {outcome})")

    async def _address(self) -> str:
        reply = await self.ec2.describe_instances(InstanceIds=[self.standby])
        return reply["Reservations"][0]["Instances"][0]["PrivateIpAddress"]

    async def _until_healthy(self, deadline: float) -> None:
        last = None
        while True:
            reply = await self.elbv2.describe_target_health(
                TargetGroupArn=self.guard.target_group_arn, Targets=[self.target])
            health = reply["TargetHealthDescriptions"][0]["TargetHealth"]
            state = health.get("State")
            if state == "healthy":
                return
            if state != last:
                self.say(f"target {self.standby}: {state} ({health.get('Reason', '')})")
                last = state
            if state in ("draining", "unused"):
                raise _Stop(f"target {self.standby} is {state}: changed by someone else (the daemon?)")
            await self._wait(deadline, f"not healthy within {format_duration(self.guard.standby_ready_timeout)} "
                                       f"(last: {state})")

    async def _wait(self, deadline: float, why: str) -> None:
        if self.clock() >= deadline:
            raise _Stop(why)
        await asyncio.sleep(self.interval)

    # ------------------------------------------------------------------ putting back

    async def _put_back(self) -> bool:
        """Deregister (wait out the drain) and stop, as far as this rehearsal did them. False if left."""
        self.putting_back = True
        try:
            handover = self._handover()
            if handover and (self.started or self.registered):
                self.say(f"leaving {self.standby} running and registered: {handover}")
                return False
            if self.registered:
                if not await self._may_deregister():
                    self.say(f"leaving {self.standby} registered and running: it is the only healthy target "
                             "(spotguard never empties a target group); the daemon will stop it once the spot serves")
                    return False
                await self._deregister()
            if self.started:
                await self._stop()
            return True
        except (AWS_ERRORS + (_Stop,)) as exc:
            code = error_code(exc) if not isinstance(exc, _Stop) else str(exc)
            self.say(f"could not put {self.standby} back: {code}; check it by hand "
                     f"(a running daemon stops a stray standby after failback_grace)")
            return False

    def _handover(self) -> str | None:
        saved = self._saved_state()
        if isinstance(saved, GuardState) and saved.phase in FAILOVER_PHASES:
            return f"a failover began meanwhile (guard {self.guard.name} is {saved.phase.value}: {saved.reason})"
        return None

    async def _may_deregister(self) -> bool:
        """Invariant 1, asked of the machine: another healthy target stays in the group."""
        targets = [Target(tid, state) for tid, state in (await self._health()).items()]
        return may_take_out(targets, self.standby)

    async def _deregister(self) -> None:
        began = self.clock()
        try:
            await self.elbv2.deregister_targets(TargetGroupArn=self.guard.target_group_arn, Targets=[self.target])
        except AWS_ERRORS as exc:
            if error_code(exc) != ABSENT_TARGET:  # someone deregistered it already: as wanted
                raise
        self.registered = False
        delay = self.drain if self.drain is not None else 300.0
        self.say(f"DeregisterTargets {self.standby}; draining (deregistration delay {format_duration(delay)})")
        deadline = began + delay + DRAIN_MARGIN
        while self.standby in await self._health():
            await self._wait(deadline, f"{self.standby} still draining after {format_duration(delay + DRAIN_MARGIN)}")
        self.say(f"drained after {self.clock() - began:.1f}s")

    async def _stop(self) -> None:
        began = self.clock()
        self.say(f"StopInstances {self.standby}")
        await self.ec2.stop_instances(InstanceIds=[self.standby])
        self.started = False
        deadline = began + STOP_DEADLINE
        while (state := await self._instance_state()) != "stopped":
            await self._wait(deadline, f"{self.standby} still {state} after {format_duration(STOP_DEADLINE)}")
        self.say(f"stopped after {self.clock() - began:.1f}s")

    # ------------------------------------------------------------------ describes

    async def _instance_state(self) -> str:
        reply = await self.ec2.describe_instances(InstanceIds=[self.standby])
        found = [i for r in reply.get("Reservations", []) for i in r.get("Instances", [])]
        return found[0]["State"]["Name"] if found else "missing"

    async def _health(self) -> dict[str, str]:
        """Every listed target of the group (registered or draining) → its state."""
        reply = await self.elbv2.describe_target_health(TargetGroupArn=self.guard.target_group_arn)
        return {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in reply["TargetHealthDescriptions"]}


# ---------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--guard", required=True, metavar="NAME", help="the guard to rehearse")


def run(args: argparse.Namespace) -> int:
    """`spotguard rehearse --config PATH --guard NAME`.

    Exit 0: rehearsed and put back (whether the budget fits is for `check` to
    judge); 1: refused, failed, or the standby left running on purpose; 2: bad
    config or no such guard; 128+N: stopped by signal N, and put back.
    """
    settings = load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    guard = next((g for g in settings.guards if g.name == args.guard), None)
    if guard is None:
        names = ", ".join(g.name for g in settings.guards)
        print(f"spotguard rehearse: no guard named {args.guard!r} (the config has: {names})", file=sys.stderr)
        return EXIT_CONFIG
    return run_aws("rehearse", _run(settings, guard))


async def _run(settings: Settings, guard: GuardSettings) -> int:
    region, endpoint = settings.aws.region, settings.aws.endpoint_url
    async with client("ec2", region, endpoint) as ec2, client("elbv2", region, endpoint) as elbv2:
        rehearser = Rehearser(settings, guard, ec2=ec2, elbv2=elbv2)
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, rehearser.interrupt, sig, task)
        try:
            return await rehearser.run()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
