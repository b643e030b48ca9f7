"""`spotguard check`: is this deployment ready for a spot interruption?
One line per check: ✓, ✗ with a fix, ! a warning.

`gather` makes the AWS calls and reads the daemon's saved state into a `Seen`; the
`*_lines` functions turn what was seen into `Line`s and are pure. Judged against the
daemon's phase, no line ever advises touching what a failover is using. What is
checked, and the exit codes, are in docs/operations.md. This module must not change
anything in AWS (every call is a Describe, GetCallerIdentity, GetQueueAttributes, an
EC2 DryRun or, with [ha], DescribeTable and GetItems) nor write a file.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, TextIO

from botocore.exceptions import ClientError

from spotguard import ha, machine, rehearsal, store
from spotguard.aws import AWS_ERRORS, INTERACTIVE_RETRIES, client, error_code
from spotguard.commands.common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, add_config_argument, load_or_report, run_aws
from spotguard.config import GuardSettings, Settings, format_duration
from spotguard.machine import SILENT_FALLBACK, GuardState, Phase
from spotguard.rehearsal import Rehearsal
from spotguard.sources.eventbridge import window
from spotguard.sources.poll import is_notice
from spotguard.sources.probe import FAIL as PROBE_FAIL
from spotguard.sources.probe import PASS, HealthCheck, check_once
from spotguard.timing import START_ESTIMATE, Budget, advised_delay, detection_seconds, health_check_seconds

OK, FAIL, WARN = "ok", "fail", "warn"
SYMBOLS = {OK: "✓", FAIL: "✗", WARN: "!"}

INSTANCE_NOT_FOUND = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
REQUEST_NOT_FOUND = frozenset({"InvalidSpotInstanceRequestID.NotFound", "InvalidSpotInstanceRequestID.Malformed"})
GROUP_NOT_FOUND = frozenset({"TargetGroupNotFound", "ValidationError"})
QUEUE_NOT_FOUND = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
TABLE_NOT_FOUND = "ResourceNotFoundException"
DRY_RUN_ALLOWED = "DryRunOperation"
DRY_RUN_DENIED = "UnauthorizedOperation"
DELAY_KEY = "deregistration_delay.timeout_seconds"
TAGGED_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")


@dataclass(frozen=True)
class Refused:
    """AWS or the network said no: the error code, and AWS's message."""

    code: str
    message: str = ""


@dataclass(frozen=True)
class Line:
    status: str  # ok | fail | warn
    text: str
    fix: str | None = None  # what to do, for fail and warn

    def render(self) -> str:
        return f"{SYMBOLS[self.status]} {self.text}" + (f" — {self.fix}" if self.fix else "")

    def with_text(self, text: str) -> "Line":
        return Line(self.status, text, self.fix)


@dataclass(frozen=True)
class GuardSeen:
    """What AWS said about one guard's resources (a `Refused` where it said no)."""

    group: Mapping[str, Any] | Refused  # DescribeTargetGroups' entry
    attributes: Mapping[str, str] | Refused  # target group attributes, key -> value
    health: Mapping[str, str] | Refused  # registered target id -> health state
    requests: Mapping[str, Mapping[str, Any] | Refused] = field(default_factory=dict)  # by request id
    instances: Mapping[str, Mapping[str, Any] | Refused] = field(default_factory=dict)  # by instance id
    tagged: tuple[Mapping[str, Any], ...] | Refused = ()  # instances carrying all the spot tags
    dry_runs: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (action, standby) -> code
    rehearsal: Rehearsal | str | None = None  # the last rehearsal, a reason it is unreadable, or None
    # The daemon's own view: its saved state (with [ha] the leader's), why it cannot be read, or None
    # when none is saved; and the standby `spotguard rehearse` is running now, if any.
    daemon: GuardState | str | None = None
    rehearsing: str | None = None
    # DescribeInstanceStatus' scheduled events of the guard's instances, by instance id.
    scheduled: Mapping[str, tuple[Mapping[str, Any], ...]] | Refused = field(default_factory=dict)
    # The readiness probe from this host against each running spot: id -> (address:port, outcome).
    probes: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def state(self) -> GuardState | None:
        return self.daemon if isinstance(self.daemon, GuardState) else None

    @property
    def failover(self) -> bool:
        """Whether the daemon is in a failover or failback now (any phase but spot-healthy)."""
        return self.state is not None and self.state.phase is not Phase.SPOT_HEALTHY and not self.state.stray


@dataclass(frozen=True)
class HaSeen:
    """What DynamoDB said about the [ha] table and its lease."""

    table: Mapping[str, Any] | Refused  # DescribeTable's Table
    leader: Mapping[str, Any] | Refused | None  # ha.leader(): None when no daemon ever held the lease
    now: float  # the wall clock the lease was judged by


@dataclass(frozen=True)
class Seen:
    identity: Mapping[str, Any] | Refused
    guards: Mapping[str, GuardSeen] = field(default_factory=dict)
    queue: Mapping[str, Any] | Refused | None = None  # queue attributes; None without [sources.sqs]
    ha: HaSeen | None = None  # None without [ha]


# ---------------------------------------------------------------------- pure: seen -> lines


def identity_line(identity: Mapping[str, Any] | Refused) -> Line:
    if isinstance(identity, Refused):
        return Line(FAIL, f"credentials: {identity.code}: {identity.message}".rstrip(": "),
                    "give this host working AWS credentials (instance profile, AWS_PROFILE or environment)")
    return Line(OK, f"credentials: {identity.get('Arn')} (account {identity.get('Account')})")


def group_lines(guard: GuardSettings, seen: GuardSeen, budget: Budget | None = None) -> list[Line]:
    """The target group: exists, takes instance targets, health check, deregistration delay."""
    arn = guard.target_group_arn
    group = seen.group
    if isinstance(group, Refused):
        if group.code in GROUP_NOT_FOUND:
            return [Line(FAIL, f"target group {arn} not found", f"fix guard {guard.name}'s target_group_arn")]
        return [_refused(f"target group {arn}", "elasticloadbalancing:DescribeTargetGroups", group)]
    name = group.get("TargetGroupName", arn)
    lines = []
    if group.get("TargetType", "instance") != "instance":
        lines.append(Line(FAIL, f"target group {name} takes {group['TargetType']} targets",
                          "spotguard registers instance ids: use a target group of target type instance"))
    else:
        lines.append(Line(OK, f"target group {name}: {group.get('Protocol')}:{group.get('Port')}, "
                              f"instance targets, in {group.get('VpcId')}"))
    lines.append(health_check_line(group, guard.register_when))
    lines.append(delay_line(name, arn, seen.attributes, budget))
    return lines


def group_health_seconds(group: Mapping[str, Any], register_when: str = "running") -> float:
    """timing.health_check_seconds at the group's settings (AWS's defaults where not reported)."""
    return health_check_seconds(float(group.get("HealthCheckIntervalSeconds", 30)),
                                int(group.get("HealthyThresholdCount", 5)), register_when)


def health_check_line(group: Mapping[str, Any], register_when: str = "running") -> Line:
    interval, threshold = group.get("HealthCheckIntervalSeconds", 30), group.get("HealthyThresholdCount", 5)
    what = f"health check: {group.get('HealthCheckPath') or group.get('HealthCheckProtocol', '')} every {interval}s, " \
           f"healthy after {threshold} passing"
    if register_when == "ready":
        return Line(OK, f"{what}: registered once it answers, a target is healthy after one check ({interval}s)")
    return Line(OK, f"{what}: registered as it runs, a target that answers late needs up to {threshold} × "
                    f"{interval}s = {format_duration(group_health_seconds(group))} (timing, below)")


def deregistration_delay(attributes: Mapping[str, str] | Refused) -> float | None:
    if isinstance(attributes, Refused) or DELAY_KEY not in attributes:
        return None
    return float(attributes[DELAY_KEY])


def delay_fix(arn: str, delay: float) -> str:
    """The command that sets the deregistration delay."""
    return (f"aws elbv2 modify-target-group-attributes --target-group-arn {arn} "
            f"--attributes Key={DELAY_KEY},Value={delay:.0f}")


def delay_line(name: str, arn: str, attributes: Mapping[str, str] | Refused, budget: Budget | None) -> Line:
    """The deregistration delay, against what the timing budget leaves for the drain."""
    if isinstance(attributes, Refused):
        return _refused(f"target group {name} attributes", "elasticloadbalancing:DescribeTargetGroupAttributes",
                        attributes)
    delay = deregistration_delay(attributes)
    if delay is None:
        return Line(WARN, f"deregistration delay of {name}: not reported", "check it in the console")
    text = f"deregistration delay {format_duration(delay)}"
    most = advised_delay(budget.detect, budget.ready) if budget is not None else None
    if most is not None and delay > most:
        return Line(WARN, f"{text}: more than the {format_duration(most)} the timing budget leaves (timing, below)")
    return Line(OK, text)


def spot_lines(guard: GuardSettings, seen: GuardSeen) -> list[Line]:
    if guard.spot_request_ids:
        return [request_line(rid, seen.requests.get(rid, Refused("NotDescribed")), seen)
                for rid in guard.spot_request_ids]
    return tagged_lines(guard, seen)


def request_line(rid: str, request: Mapping[str, Any] | Refused, seen: GuardSeen) -> Line:
    if isinstance(request, Refused):
        if request.code in REQUEST_NOT_FOUND:
            return Line(FAIL, f"spot request {rid} not found", "fix spot_request_ids (or aws.region)")
        return _refused(f"spot request {rid}", "ec2:DescribeSpotInstanceRequests", request)
    state, code = request.get("State"), request.get("Status", {}).get("Code")
    kind = request.get("Type", "one-time")
    if state in ("cancelled", "closed", "failed"):
        return Line(FAIL, f"spot request {rid} is {state} ({code})",
                    "it launches no more instances: create a persistent spot request and put its id in the config")
    iid = request.get("InstanceId")
    if not iid:
        if seen.failover:
            return Line(WARN, f"spot request {rid} has no instance yet ({code}): {_serving(seen.state)}")
        return Line(FAIL, f"spot request {rid} has no instance ({code})",
                    "wait until it is fulfilled (a guard without a running spot fails over at once)")
    text = f"spot request {rid}: {kind}, {state}; instance {iid}"
    instance = seen.instances.get(iid)
    running = _state(instance)
    if running != "running":
        if seen.failover:
            return Line(WARN, f"{text} is {running}: {_serving(seen.state)}")
        return Line(FAIL, f"{text} is {running}", "wait until the spot instance runs")
    if is_notice(code):  # the poll's own rule, so check and daemon agree
        if seen.failover:
            return Line(OK, f"{text} running with an interruption notice ({code}): {_serving(seen.state)}")
        return Line(WARN, f"{text} running with an interruption notice ({code})",
                    "a failover is due, and the daemon's state does not show one: is `spotguard run` running?")
    health = _health_text(iid, seen.health)
    if kind != "persistent":
        return Line(WARN, f"{text} running, {health}",
                    "a one-time request is not re-fulfilled after an interruption, so the standby would keep "
                    "running until you act: use a persistent request")
    return _spot_health_line(f"{text} running", iid, seen)


def tagged_lines(guard: GuardSettings, seen: GuardSeen) -> list[Line]:
    tags = ", ".join(f"{k}={v}" for k, v in guard.spot_instance_tags)
    if isinstance(seen.tagged, Refused):
        return [_refused(f"spot instances tagged {tags}", "ec2:DescribeInstances", seen.tagged)]
    spots = [i for i in seen.tagged if i.get("InstanceLifecycle") == "spot"]
    lines = [Line(WARN, f"instance {i['InstanceId']} has the spot tags {tags} but is On-Demand",
                  "spotguard ignores it; untag it if it is not meant as a spot")
             for i in seen.tagged if i.get("InstanceLifecycle") != "spot"]
    running = [i for i in spots if _state(i) == "running"]
    if not running and seen.failover:
        lines.append(Line(WARN, f"no running spot instance tagged {tags}: {_serving(seen.state)}"))
    elif not running:
        found = ", ".join(f"{i['InstanceId']} {_state(i)}" for i in spots) or "none found"
        lines.append(Line(FAIL, f"no running spot instance tagged {tags} ({found})",
                          "launch one, or fix spot_instance_tags"))
    for i in running:
        lines.append(_spot_health_line(f"spot instance {i['InstanceId']} (tagged {tags}) running",
                                       i["InstanceId"], seen))
    return lines


def _spot_health_line(text: str, iid: str, seen: GuardSeen) -> Line:
    health = seen.health
    state = None if isinstance(health, Refused) else health.get(iid)
    if seen.state is not None and iid in seen.state.doomed and state in (None, "draining"):
        return Line(OK, f"{text}, {state or 'out of the target group'}: taken out for the failover")
    if state in ("healthy", "initial") or isinstance(health, Refused):
        return Line(OK, f"{text}, {_health_text(iid, health)}")
    if state is None:
        return Line(WARN, f"{text}, not registered in the target group", "the daemon registers it once it runs")
    return Line(WARN, f"{text}, {state} in the target group",
                "the daemon fails over when the spot target stays unhealthy for unhealthy_grace")


def _health_text(iid: str, health: Mapping[str, str] | Refused) -> str:
    if isinstance(health, Refused):
        return f"target health unknown ({health.code})"
    state = health.get(iid)
    return f"{state} in the target group" if state else "not registered in the target group"


def standby_lines(guard: GuardSettings, seen: GuardSeen) -> list[Line]:
    vpc = seen.group.get("VpcId") if not isinstance(seen.group, Refused) else None
    spot_ids = {r.get("InstanceId") for r in seen.requests.values() if not isinstance(r, Refused)}
    if not isinstance(seen.tagged, Refused):
        spot_ids |= {i["InstanceId"] for i in seen.tagged if i.get("InstanceLifecycle") == "spot"}
    return [standby_line(sid, seen.instances.get(sid, Refused("NotDescribed")), vpc, sid in spot_ids, seen)
            for sid in guard.standby_instance_ids]


def standby_line(sid: str, described: Mapping[str, Any] | Refused, group_vpc: str | None, is_spot_of_guard: bool,
                 seen: GuardSeen) -> Line:
    """A standby exists, is On-Demand, in the group's VPC, and stopped; or, when the daemon
    is using it (a failover, a stray, a rehearsal), says so and never advises touching it."""
    health = seen.health
    if isinstance(described, Refused):
        if described.code in INSTANCE_NOT_FOUND:
            return Line(FAIL, f"standby {sid} not found", "fix standby_instance_ids (or aws.region)")
        return _refused(f"standby {sid}", "ec2:DescribeInstances", described)
    if described.get("InstanceLifecycle") == "spot" or is_spot_of_guard:
        return Line(FAIL, f"standby {sid} is a spot instance",
                    "a standby must be On-Demand: spot capacity is what is missing when it is needed")
    state, instance_vpc = _state(described), described.get("VpcId")
    if state != "stopped":
        registered = "" if isinstance(health, Refused) or sid not in health else f", {health[sid]} in the target group"
        in_use = _in_use(sid, seen)
        if in_use is not None:
            return in_use.with_text(f"standby {sid} is {state}{registered}: {in_use.text}")
        return Line(FAIL, f"standby {sid} is {state}, not stopped{registered}",
                    f"stop it (aws ec2 stop-instances --instance-ids {sid}); spotguard starts it for a failover")
    if group_vpc and instance_vpc != group_vpc:
        return Line(FAIL, f"standby {sid} is in {instance_vpc}, the target group in {group_vpc}",
                    f"the target group cannot take it: use a standby in {group_vpc}")
    return Line(OK, f"standby {sid}: stopped, On-Demand {described.get('InstanceType')}, in {instance_vpc}")


def _in_use(sid: str, seen: GuardSeen) -> Line | None:
    """What the daemon does with a standby that is not stopped, when it is its business."""
    daemon = seen.state
    if seen.rehearsing == sid:
        return Line(WARN, "being rehearsed (spotguard rehearse); it puts it back when done")
    if daemon is None:
        return None
    # A fleet's standby is its slot's; a one-spot guard's, the guard's own.
    holder = next((s for s in daemon.slots or (daemon,) if s.standby == sid), None)
    if holder is not None and holder.stray:
        return Line(WARN, f"running outside a failover since {_clock(holder.since)}: the daemon drains and stops it "
                          f"after failback_grace (by {_clock(holder.since + daemon.rules.failback_grace)})")
    if holder is not None:
        return Line(OK, _serving(holder))
    if daemon.slots and seen.failover:
        return Line(WARN, f"no slot uses it: the daemon takes it for the next lost spot, or drains and stops it "
                          f"({daemon.phase.value})")
    if seen.failover:
        return Line(WARN, f"the daemon drains and stops it: one standby serves a failover ({daemon.phase.value})")
    return None


def _serving(daemon: GuardState | None) -> str:
    assert daemon is not None
    return (f"the failover is under way ({daemon.phase.value} since {_clock(daemon.since)}, standby "
            f"{daemon.standby}: {daemon.reason})")


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(at))


def readiness_lines(guard: GuardSettings, seen: GuardSeen) -> list[Line]:
    """Whether the daemon can tell, from here, when an instance answers its health check."""
    if guard.register_when == "running" or isinstance(seen.group, Refused):
        return []
    check = HealthCheck.of_target_group(dict(seen.group))
    agent = ("run `spotguard agent --ready-url http://127.0.0.1:PORT/PATH` on the instances (their image), "
             "or set register_when = \"running\"")
    if isinstance(check, str):
        return [Line(WARN, f"readiness: {check} cannot be probed from here: standbys are registered as they run "
                           "and may need HealthyThresholdCount checks", agent)]
    if not seen.probes:
        return [Line(WARN, "readiness: no running spot to probe from here", "run `spotguard check` again once one "
                     "runs: the standbys are probed the same way")]
    lines = []
    for iid, (where, outcome) in seen.probes.items():
        path = check.path if check.protocol != "TCP" else ""
        what = f"readiness: spot {iid}'s health check ({check.protocol} {where}{path})"
        if outcome == PASS:
            lines.append(Line(OK, f"{what} passes from here: standbys are registered once they answer it"))
        elif outcome == PROBE_FAIL:
            lines.append(Line(WARN, f"{what} is reachable from here but does not pass (refused, or another status)",
                              "the balancer checks the same thing: fix the service or the target group's "
                              "health check (path, success codes)"))
        else:
            port = where.rsplit(":", 1)[-1]
            lines.append(Line(WARN, f"{what}: no answer from here within {check.timeout:.0f}s; standbys are then "
                                    f"registered {SILENT_FALLBACK:.0f}s after they start, unproven",
                              f"allow TCP {port} from this host in the instances' security group, or {agent}"))
    return lines


def scheduled_lines(guard: GuardSettings, seen: GuardSeen) -> list[Line]:
    """A warning per scheduled event (retirement, maintenance, reboot, stop) on a spot or
    standby of the guard that is neither completed nor cancelled."""
    if isinstance(seen.scheduled, Refused):
        return [Line(WARN, f"scheduled events: ec2:DescribeInstanceStatus said {seen.scheduled.code}",
                     "allow it to see retirements and maintenance of the guard's instances")]
    lines = []
    for iid, events in seen.scheduled.items():
        role = "standby" if iid in guard.standby_instance_ids else "spot"
        for event in events:
            description = str(event.get("Description", ""))
            if description.startswith(("[Completed]", "[Canceled]")):
                continue
            when = window(event.get("NotBefore"), event.get("NotAfter"))
            lines.append(Line(WARN, f"{role} {iid}: scheduled {event.get('Code')} ({when}): {description}",
                              machine.SCHEDULED_ADVICE[role]))
    return lines


def permission_lines(guard: GuardSettings, seen: GuardSeen) -> list[Line]:
    """StartInstances/StopInstances on each standby, from the DryRun answers (standbys not found are skipped)."""
    lines, allowed = [], []
    for sid in guard.standby_instance_ids:
        for action in ("StartInstances", "StopInstances"):
            code = seen.dry_runs.get((action, sid))
            if code is None:
                continue
            if code == DRY_RUN_ALLOWED:
                allowed.append((action, sid))
            elif code == DRY_RUN_DENIED:
                lines.append(Line(FAIL, f"not allowed to ec2:{action} {sid}",
                                  "grant it (`spotguard iam-policy --config PATH` prints the policy the daemon needs)"))
            else:
                lines.append(Line(WARN, f"could not check ec2:{action} on {sid}: {code}", None))
    if allowed:
        ids = ", ".join(dict.fromkeys(sid for _, sid in allowed))
        lines.insert(0, Line(OK, f"permissions: ec2:StartInstances/StopInstances allowed on {ids} (DryRun); "
                                 "RegisterTargets/DeregisterTargets have no DryRun and are not checked"))
    return lines


def budget_of(settings: Settings, guard: GuardSettings, seen: GuardSeen) -> tuple[Budget, str | None] | None:
    """The guard's timing budget (timing.py) and how its ready part was found: the last
    rehearsal's StartInstances → healthy, or an estimate that leaves out the service's boot."""
    drain = deregistration_delay(seen.attributes) or 0.0
    detect = detection_seconds(settings)
    last = seen.rehearsal
    if isinstance(last, Rehearsal) and last.healthy is not None:
        return Budget(detect, last.healthy, drain), None
    if last is None and not isinstance(seen.group, Refused):
        checks = group_health_seconds(seen.group, guard.register_when)
        return (Budget(detect, START_ESTIMATE + checks, drain),
                f"start ~{format_duration(START_ESTIMATE)} + health checks {format_duration(checks)}")
    return None


def timing_line(settings: Settings, guard: GuardSettings, seen: GuardSeen) -> Line:
    """The failover against the notice (timing.py): ✗ when it cannot fit, with the one change that fits."""
    last = seen.rehearsal
    rehearse_cmd = f"spotguard rehearse --config PATH --guard {guard.name}"
    if isinstance(last, str):
        return Line(WARN, f"timing: cannot read the last rehearsal: {last}", f"run `{rehearse_cmd}` again")
    if isinstance(last, Rehearsal) and last.healthy is None:
        return Line(WARN, f"timing: rehearsed {last.at} on {last.standby}: {last.outcome}",
                    "fix the standby's service, then rehearse again")
    found = budget_of(settings, guard, seen)
    if found is None:
        return Line(WARN, "timing: unknown (the target group could not be described)")
    budget, estimate = found
    if estimate is not None:
        text = f"timing: not rehearsed; leaving out your service's boot: {budget.text(estimate)}"
        if budget.fits:
            return Line(WARN, text, f"measure StartInstances → healthy with `{rehearse_cmd}`")
        return Line(FAIL, text, _change(guard, budget))
    assert isinstance(last, Rehearsal)
    text = f"timing (rehearsed {last.at} on {last.standby}): {budget.text()}"
    return Line(OK, text) if budget.fits else Line(FAIL, text, _change(guard, budget))


def _change(guard: GuardSettings, budget: Budget) -> str:
    delay = advised_delay(budget.detect, budget.ready)
    change = budget.change()
    return change if delay is None else f"{change}: {delay_fix(guard.target_group_arn, delay)}"


def phase_line(seen: GuardSeen) -> Line | None:
    """What the daemon's saved state says the guard is doing, when it says anything."""
    if isinstance(seen.daemon, str):
        return Line(WARN, f"daemon: its state cannot be read ({seen.daemon})", "see `spotguard status`")
    state = seen.state
    if state is None or state.phase is machine.INITIAL_PHASE and not state.doomed:
        return None
    if state.stray:
        return Line(WARN, f"daemon: {state.phase.value} since {_clock(state.since)}: {state.reason}")
    return Line(OK, f"daemon: {state.phase.value} since {_clock(state.since)}: {state.reason}")


def guard_lines(settings: Settings, guard: GuardSettings, seen: GuardSeen) -> list[Line]:
    found = budget_of(settings, guard, seen)
    phase = phase_line(seen)
    return [
        *([phase] if phase is not None else []),
        *group_lines(guard, seen, found[0] if found else None),
        *spot_lines(guard, seen),
        *standby_lines(guard, seen),
        *scheduled_lines(guard, seen),
        *readiness_lines(guard, seen),
        *permission_lines(guard, seen),
        timing_line(settings, guard, seen),
    ]


def queue_line(settings: Settings, queue: Mapping[str, Any] | Refused) -> Line:
    name = settings.sqs.queue_name if settings.sqs else None
    if isinstance(queue, Refused):
        if queue.code in QUEUE_NOT_FOUND:
            return Line(FAIL, f"queue {name} does not exist", "create it: spotguard setup --config PATH")
        return _refused(f"queue {name}", "sqs:GetQueueAttributes", queue)
    return Line(OK, f"queue {name}: exists ({queue.get('QueueArn')})")


def table_problem(table: Mapping[str, Any]) -> str | None:
    """Why a described table cannot hold the lease (its key is not pk, a string, alone), or None."""
    spec = ha.table_spec(str(table.get("TableName")))
    types = {a.get("AttributeName"): a.get("AttributeType") for a in table.get("AttributeDefinitions", [])}
    if table.get("KeySchema") == spec["KeySchema"] and types.get(ha.KEY) == "S":
        return None
    key = ", ".join(f"{k.get('AttributeName')} ({k.get('KeyType')}, {types.get(k.get('AttributeName'), '?')})"
                    for k in table.get("KeySchema", []))
    return f"its key is {key or 'unknown'}; spotguard needs {ha.KEY} (HASH, S) alone"


def table_line(settings: Settings, table: Mapping[str, Any] | Refused) -> Line:
    name = settings.ha.table if settings.ha else None
    setup = "`spotguard setup --config PATH` creates it"
    if isinstance(table, Refused):
        if table.code == TABLE_NOT_FOUND:
            return Line(FAIL, f"[ha] table {name} does not exist", setup)
        return _refused(f"[ha] table {name}", "dynamodb:DescribeTable", table)
    problem = table_problem(table)
    if problem is not None:
        return Line(FAIL, f"[ha] table {name}: {problem}",
                    "set ha.table to a new name: `spotguard setup --config PATH` creates it "
                    "(it never changes an existing table)")
    status = table.get("TableStatus", "ACTIVE")
    if status != "ACTIVE":
        return Line(WARN, f"[ha] table {name}: key {ha.KEY}, {status}", "wait until it is ACTIVE")
    return Line(OK, f"[ha] table {name}: key {ha.KEY}, {status}")


def leader_line(seen: HaSeen) -> Line:
    """Who holds the lease, as ha.leader() read it `seen.now`."""
    lease = seen.leader
    if isinstance(lease, Refused):
        return _refused("leader", "dynamodb:GetItem", lease)
    start = "start `spotguard run` with this config (on two hosts for [ha])"
    if lease is None:
        return Line(WARN, "no leader: no daemon holds the lease", start)
    who = f"{lease['holder']} (epoch {lease['epoch']})"
    left = float(lease["expires"]) - seen.now
    if lease["valid"]:
        return Line(OK, f"leader: {who}, lease valid for {_seconds(left)}")
    if float(lease["expires"]) <= 0:  # Leadership.release() on a clean stop
        return Line(WARN, f"no leader: {who} released the lease (a clean stop)", start)
    return Line(WARN, f"no leader: the lease of {who} expired {_seconds(-left)} ago and nobody renewed it",
                f"is `spotguard run` running and able to reach DynamoDB? {start}")


def table_usable(table: Mapping[str, Any] | Refused) -> bool:
    """Whether the lease is worth reading: the table exists with the right key (or DescribeTable was refused)."""
    if isinstance(table, Refused):
        return table.code != TABLE_NOT_FOUND
    return table_problem(table) is None


def ha_lines(settings: Settings, seen: HaSeen) -> list[Line]:
    table = table_line(settings, seen.table)
    return [table, leader_line(seen)] if table_usable(seen.table) else [table]


def _seconds(seconds: float) -> str:
    return format_duration(max(0, round(seconds)))


def _refused(thing: str, call: str, refused: Refused) -> Line:
    return Line(FAIL, f"{thing}: {call} said {refused.code}",
                "give these credentials read access, or check the network" if _is_access(refused.code) else None)


def _is_access(code: str) -> bool:
    return code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation")


def _state(described: Mapping[str, Any] | Refused | None) -> str:
    if described is None or isinstance(described, Refused):
        return "missing"
    return described.get("State", {}).get("Name", "unknown")


def report(settings: Settings, seen: Seen, config: str) -> list[str]:
    """The whole checklist as printed lines, summary last."""
    out = [Line(OK, f"config {config}: {len(settings.guards)} guard(s)").render()]
    identity = identity_line(seen.identity)
    out.append(identity.render())
    fails = warns = 0
    every = [identity]
    if identity.status != FAIL:
        for guard in settings.guards:
            out.append(f"guard {guard.name}:")
            lines = guard_lines(settings, guard, seen.guards[guard.name])
            out.extend("  " + line.render() for line in lines)
            every.extend(lines)
        if settings.sqs is not None and seen.queue is not None:
            queue = queue_line(settings, seen.queue)
            out.append(queue.render())
            every.append(queue)
        if settings.ha is not None and seen.ha is not None:
            for line in ha_lines(settings, seen.ha):
                out.append(line.render())
                every.append(line)
    else:
        out.append("(the other checks need working credentials: skipped)")
    fails = sum(line.status == FAIL for line in every)
    warns = sum(line.status == WARN for line in every)
    out.append(f"{_count(fails, 'problem')}, {_count(warns, 'warning')}")
    return out


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def passed(seen_lines: list[str]) -> bool:
    return not any(line.lstrip().startswith(SYMBOLS[FAIL]) for line in seen_lines)


# ---------------------------------------------------------------------- AWS: describes and DryRuns only


async def _ask(call: Any, **kwargs: Any) -> dict | Refused:
    try:
        return await call(**kwargs)
    except AWS_ERRORS as exc:
        return _refusal(exc)


def _refusal(exc: BaseException) -> Refused:
    message = exc.response.get("Error", {}).get("Message", "") if isinstance(exc, ClientError) else str(exc)
    return Refused(error_code(exc), message)


async def gather(settings: Settings, *, sts: Any, ec2: Any, elbv2: Any, sqs: Any, dynamodb: Any = None) -> Seen:
    """Everything the checks read. Stops after the identity when the credentials do not work.

    `dynamodb` is needed (and used) only with [ha].
    """
    identity = await _ask(sts.get_caller_identity)
    if isinstance(identity, dict):
        identity.pop("ResponseMetadata", None)
    if isinstance(identity, Refused):
        return Seen(identity)
    guards = {g.name: await _gather_guard(settings, g, ec2, elbv2) for g in settings.guards}
    states = await _daemon_states(settings, dynamodb)
    guards = {name: replace(seen, daemon=states.get(name)) for name, seen in guards.items()}
    queue = None
    if settings.sqs is not None:
        reply = await _ask(sqs.get_queue_attributes, QueueUrl=settings.sqs.queue_url, AttributeNames=["QueueArn"])
        queue = reply if isinstance(reply, Refused) else reply.get("Attributes", {})
    lease_seen = await _lease(settings, dynamodb) if settings.ha is not None else None
    return Seen(identity, guards, queue, lease_seen)


async def _daemon_states(settings: Settings, dynamodb: Any) -> dict[str, GuardState | str]:
    """Each guard's state as the daemon saved it: with [ha] the leader's shared state (what
    both controllers act on), else the state file; a reason where it cannot be read."""
    rules = {g.name: g.rules(settings.daemon.poll_interval) for g in settings.guards}
    if settings.ha is not None and dynamodb is not None:
        try:
            return dict(await ha.shared_states(dynamodb, settings.ha.table, rules, consistent=True))
        except AWS_ERRORS as exc:
            return {name: f"the [ha] table: {error_code(exc)}" for name in rules}
    found: dict[str, GuardState | str] = {}
    for name, guard_rules in rules.items():
        try:
            state = store.peek(settings.daemon.state_dir, name, guard_rules)
        except (OSError, ValueError) as exc:
            state = f"{type(exc).__name__}: {exc}"
        if state is not None:
            found[name] = state
    return found


async def _lease(settings: Settings, dynamodb: Any) -> HaSeen:
    assert settings.ha is not None
    reply = await _ask(dynamodb.describe_table, TableName=settings.ha.table)
    table = reply if isinstance(reply, Refused) else reply["Table"]
    if not table_usable(table):
        return HaSeen(table, None, time.time())
    now = time.time()
    try:
        lease = await ha.leader(settings, dynamodb, now=now)
    except AWS_ERRORS as exc:
        lease = _refusal(exc)
    return HaSeen(table, lease, now)


async def _gather_guard(settings: Settings, guard: GuardSettings, ec2: Any, elbv2: Any) -> GuardSeen:
    arn = guard.target_group_arn
    groups = await _ask(elbv2.describe_target_groups, TargetGroupArns=[arn])
    group: Mapping[str, Any] | Refused = groups if isinstance(groups, Refused) else groups["TargetGroups"][0]
    attributes: Mapping[str, str] | Refused = Refused("TargetGroupNotFound")
    health: Mapping[str, str] | Refused = Refused("TargetGroupNotFound")
    if not isinstance(group, Refused):
        reply = await _ask(elbv2.describe_target_group_attributes, TargetGroupArn=arn)
        attributes = reply if isinstance(reply, Refused) else {a["Key"]: a["Value"] for a in reply["Attributes"]}
        reply = await _ask(elbv2.describe_target_health, TargetGroupArn=arn)
        health = reply if isinstance(reply, Refused) else {
            d["Target"]["Id"]: d.get("TargetHealth", {}).get("State", "unavailable")
            for d in reply["TargetHealthDescriptions"]
        }
    requests = {rid: await _request(ec2, rid) for rid in guard.spot_request_ids}
    spot_ids = [r["InstanceId"] for r in requests.values() if not isinstance(r, Refused) and r.get("InstanceId")]
    instances = {iid: await _instance(ec2, iid) for iid in dict.fromkeys([*spot_ids, *guard.standby_instance_ids])}
    tagged = await _tagged(ec2, guard) if guard.spot_instance_tags else ()
    dry_runs = {}
    for sid in guard.standby_instance_ids:
        if isinstance(instances[sid], Refused):
            continue
        for action, call in (("StartInstances", ec2.start_instances), ("StopInstances", ec2.stop_instances)):
            reply = await _ask(call, InstanceIds=[sid], DryRun=True)
            # A DryRun never succeeds: it answers DryRunOperation (allowed) or an error.
            dry_runs[(action, sid)] = reply.code if isinstance(reply, Refused) else "NoDryRunAnswer"
    running = rehearsal.rehearsing(settings.daemon.state_dir, guard.name)
    known = [iid for iid, i in instances.items() if not isinstance(i, Refused)]
    if not isinstance(tagged, Refused):
        known += [i["InstanceId"] for i in tagged if i.get("InstanceLifecycle") == "spot"]
    return GuardSeen(group, attributes, health, requests, instances, tagged, dry_runs,
                     rehearsal.read(settings.daemon.state_dir, guard.name), rehearsing=running[0] if running else None,
                     scheduled=await _scheduled(ec2, known), probes=await _probes(guard, group, instances, tagged))


async def _probes(guard: GuardSettings, group: Mapping[str, Any] | Refused,
                  instances: Mapping[str, Mapping[str, Any] | Refused],
                  tagged: tuple[Mapping[str, Any], ...] | Refused) -> dict[str, tuple[str, str]]:
    """The target group's health check sent from here to each running spot's private address."""
    if guard.register_when == "running" or isinstance(group, Refused):
        return {}
    check = HealthCheck.of_target_group(dict(group))
    if isinstance(check, str):
        return {}
    spots = [i for i in instances.values() if not isinstance(i, Refused) and i["InstanceId"] not in
             guard.standby_instance_ids]
    if not isinstance(tagged, Refused):
        spots += [i for i in tagged if i.get("InstanceLifecycle") == "spot"]
    port = check.port_for(guard.target_port, group.get("Port"))
    out = {}
    for spot in spots:
        if _state(spot) == "running" and spot.get("PrivateIpAddress") and port:
            outcome, _ = await check_once(spot["PrivateIpAddress"], int(port), check)
            out[spot["InstanceId"]] = (f"{spot['PrivateIpAddress']}:{port}", outcome)
    return out


async def _request(ec2: Any, rid: str) -> dict | Refused:
    reply = await _ask(ec2.describe_spot_instance_requests, SpotInstanceRequestIds=[rid])
    if isinstance(reply, Refused):
        return reply
    found = reply.get("SpotInstanceRequests", [])
    return found[0] if found else Refused("InvalidSpotInstanceRequestID.NotFound")  # moto answers an empty list


async def _instance(ec2: Any, iid: str) -> dict | Refused:
    reply = await _ask(ec2.describe_instances, InstanceIds=[iid])
    if isinstance(reply, Refused):
        return reply
    found = [i for r in reply.get("Reservations", []) for i in r.get("Instances", [])]
    return found[0] if found else Refused("InvalidInstanceID.NotFound")


async def _scheduled(ec2: Any, instance_ids: list[str]) -> dict[str, tuple[dict, ...]] | Refused:
    """Scheduled events by instance, for instances that exist (one unknown id fails the call)."""
    if not instance_ids:
        return {}
    reply = await _ask(ec2.describe_instance_status, InstanceIds=list(dict.fromkeys(instance_ids)),
                       IncludeAllInstances=True)
    if isinstance(reply, Refused):
        return reply
    return {s["InstanceId"]: tuple(s.get("Events", ())) for s in reply.get("InstanceStatuses", []) if s.get("Events")}


async def _tagged(ec2: Any, guard: GuardSettings) -> tuple[dict, ...] | Refused:
    filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in guard.spot_instance_tags]
    filters.append({"Name": "instance-state-name", "Values": list(TAGGED_STATES)})
    reply = await _ask(ec2.describe_instances, Filters=filters)
    if isinstance(reply, Refused):
        return reply
    return tuple(i for r in reply.get("Reservations", []) for i in r.get("Instances", []))


async def check(settings: Settings, *, config: str, sts: Any, ec2: Any, elbv2: Any, sqs: Any,
                dynamodb: Any = None, out: TextIO | None = None) -> int:
    """Print the checklist; 0 when nothing is ✗, else 1. `dynamodb` only with [ha]."""
    out = sys.stdout if out is None else out
    seen = await gather(settings, sts=sts, ec2=ec2, elbv2=elbv2, sqs=sqs, dynamodb=dynamodb)
    lines = report(settings, seen, config)
    for line in lines:
        print(line, file=out, flush=True)
    return EXIT_OK if passed(lines) else EXIT_FAILED


# ---------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)


def run(args: argparse.Namespace) -> int:
    """`spotguard check --config PATH`: exit 0 ready, 1 something is ✗, 2 bad config."""
    settings = load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    return run_aws("check", _run(settings, args.config))


async def _run(settings: Settings, config: str) -> int:
    async with AsyncExitStack() as stack:

        async def made(service: str) -> Any:
            return await stack.enter_async_context(
                client(service, settings.aws.region, settings.aws.endpoint_url, max_attempts=INTERACTIVE_RETRIES))

        sts, ec2, elbv2, sqs = [await made(name) for name in ("sts", "ec2", "elbv2", "sqs")]
        dynamodb = await made("dynamodb") if settings.ha is not None else None  # no DynamoDB client without [ha]
        return await check(settings, config=config, sts=sts, ec2=ec2, elbv2=elbv2, sqs=sqs, dynamodb=dynamodb)
