"""An embedded AWS for tests and the lab: moto in server mode, made to act like EC2.

`MotoWorld` runs moto's threaded server on 127.0.0.1, builds a deployment
through the real API (`provision`: VPC, subnets, ALB, target group, a
persistent spot request with its instance, stopped standbys) and adds the
dynamics moto lacks by driving moto's backend objects in-process: spot
interruptions and re-fulfilment, target health, AWS errors and slow answers
(`api_fault`), what a person does by hand, and, for the lab, EC2's `pending`
and `stopping` states and a live health source. spotguard's own clients talk
to it over HTTP exactly as to AWS; nothing here fakes or wraps them.

This module must not be imported by the daemon's production path. Its patches
are class-level on moto's backends and live while a world is started; at most
one world runs per process, and instance state changes take one lock because
the lab drives the world while the server thread answers.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from html import escape
from typing import Any, Callable, Mapping

import boto3
from moto.backends import get_backend
from moto.core import DEFAULT_ACCOUNT_ID
from moto.core.responses import BaseResponse
from moto.core.utils import utcnow
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models.instances import InstanceBackend, InstanceState
from moto.elbv2.models import ELBv2Backend, FakeHealthStatus
from moto.server import ThreadedMotoServer

DEFAULT_REGION = "us-east-1"
# Each world's VPC is 127.N.0.0/16 (N unique among the worlds running on this host, held by a
# lock file): moto gives instances loopback private addresses, so the lab's services bind them
# and every probe, health check and request stays on loopback; never a private range.
NETWORKS = range(1, 255)
SPOT_TYPE = "g5.xlarge"
HEALTH_STATES = frozenset({"initial", "healthy", "unhealthy", "unused", "draining", "unavailable"})
# The reason codes ELBv2 gives with each state, so overridden answers look real.
HEALTH_REASONS: dict[str, tuple[str | None, str | None]] = {
    "initial": ("Elb.RegistrationInProgress", "Target registration is in progress"),
    "healthy": (None, None),
    "unhealthy": ("Target.FailedHealthChecks", "Health checks failed"),
    "unused": ("Target.InvalidState", "Target is in the stopped state"),
    "draining": ("Target.DeregistrationInProgress", "Target deregistration is in progress"),
    "unavailable": ("Elb.InternalError", "Health checks are unavailable"),
}
ACTIONS = frozenset({"start", "stop"})
# EC2's instance state codes, for states the world sets itself.
STATE_CODES = {
    "pending": 0,
    "running": 16,
    "shutting-down": 32,
    "terminated": 48,
    "stopping": 64,
    "stopped": 80,
}

# A health source answers DescribeTargetHealth for a target group: given the
# group's ARN and the ids moto has registered, the state of every target to
# list (registered ones, and deregistered ones still draining), or None to
# leave the group to moto. It is called on moto's server thread.
HealthSource = Callable[[str, tuple[str, ...]], Mapping[str, str] | None]


@dataclass(frozen=True)
class Deployment:
    """What `provision` built, by id."""

    name: str
    vpc_id: str
    subnet_ids: tuple[str, ...]
    security_group_id: str
    image_id: str
    load_balancer_arn: str
    target_group_arn: str
    target_port: int
    spot_request_id: str
    spot_instance_id: str
    standby_ids: tuple[str, ...]


@dataclass(frozen=True)
class ApiFault:
    """How one API action misbehaves: late by `delay` seconds, then (with a `code`)
    an error answered with HTTP `status`; for `times` requests (None: until cleared),
    only for requests with a parameter equal to `match` (an instance id, an ARN) when given.

    Throttling is `code="RequestLimitExceeded"` (EC2) or `"Throttling"` (ELBv2) with
    status 400 (EC2 answers 503 too); a 5xx is e.g. `code="InternalError", status=500`;
    a slow endpoint is a `delay` with no code.
    """

    action: str  # the API's name, e.g. "StartInstances", "DescribeTargetHealth"
    code: str | None = None
    status: int = 400
    delay: float = 0.0
    times: int | None = None
    match: str | None = None
    message: str | None = None


# ---------------------------------------------------------------------- physics


class _Physics:
    """The world's overrides, read by the patched moto methods below."""

    def __init__(self) -> None:
        self.health: dict[tuple[str, str], str] = {}  # (target group arn, target id) -> state
        self.errors: dict[tuple[str, str], tuple[str, str]] = {}  # (action, instance id) -> (code, message)
        self.draining: set[tuple[str, str]] = set()  # (target group arn, target id) drains when deregistered
        self.health_source: HealthSource | None = None
        self.transitions = False  # Start/StopInstances leave pending/stopping for the driver to settle
        self.api_faults: dict[ApiFault, int] = {}  # fault -> requests it has answered
        # Instance state changes from the driver's thread and moto's server thread.
        self.lock = threading.RLock()

    def clear(self) -> None:
        self.health.clear()
        self.errors.clear()
        self.draining.clear()
        self.health_source = None
        self.transitions = False
        self.api_faults.clear()

    def api_fault_for(self, action: str, params: Mapping[str, Any]) -> ApiFault | None:
        """The first armed fault for this request, counted as one hit."""
        values = {v for vs in params.values() for v in (vs if isinstance(vs, list) else [vs])}
        with self.lock:
            for fault, hits in self.api_faults.items():
                if fault.action != action or (fault.match is not None and fault.match not in values):
                    continue
                if fault.times is not None and hits >= fault.times:
                    continue
                self.api_faults[fault] = hits + 1
                return fault
        return None


_PHYSICS = _Physics()
_ORIGINALS: dict[tuple[type, str], Callable[..., Any]] = {}


def _check_transition(backend: Any, action: str, instance_ids: list[str]) -> None:
    """Raise what EC2 would for an injected error or a state EC2 refuses."""
    refused = {"start": ("terminated", "shutting-down", "stopping"), "stop": ("terminated", "shutting-down")}
    for iid in instance_ids:
        injected = _PHYSICS.errors.get((action, iid))
        if injected:
            raise EC2ClientError(*injected)
        instance = backend.get_instance_by_id(iid)
        # Unknown ids fall through: moto itself answers InvalidInstanceID.NotFound.
        if instance is not None and instance.state in refused[action]:
            verb = "started" if action == "start" else "stopped"
            raise EC2ClientError(
                "IncorrectInstanceState",
                f"The instance '{iid}' is not in a state from which it can be {verb}.",
            )


def _start_instances(self: Any, instance_ids: list[str]) -> Any:
    with _PHYSICS.lock:
        _check_transition(self, "start", instance_ids)
        done = _ORIGINALS[(InstanceBackend, "start_instances")](self, instance_ids)
        for instance, previous in done:
            if previous.name == "stopped":
                instance.launch_time = utcnow()  # EC2's LaunchTime is the last start; moto keeps the first
        # moto runs at once; EC2 boots first. A pending instance stays pending.
        _hold(done, "pending", from_states=("stopped", "pending"))
        return done


def _stop_instances(self: Any, instance_ids: list[str]) -> Any:
    with _PHYSICS.lock:
        _check_transition(self, "stop", instance_ids)
        done = _ORIGINALS[(InstanceBackend, "stop_instances")](self, instance_ids)
        _hold(done, "stopping", from_states=("pending", "running", "stopping"))
        return done


def _hold(done: list[tuple[Any, Any]], state: str, *, from_states: tuple[str, ...]) -> None:
    """With transitions modelled, leave changed instances in `state` for the driver to settle."""
    if not _PHYSICS.transitions:
        return
    for instance, previous in done:
        if previous.name in from_states:
            instance._state = InstanceState(state, STATE_CODES[state])


def _describe_target_health(self: Any, target_group_arn: str, targets: list[dict[str, Any]]) -> Any:
    """moto's answer, with the world's health overrides applied.

    moto stores no health: it builds a FakeHealthStatus per target on every
    call from the registration and the instance state (registered → healthy,
    stopped → unused), and a whole-group call lists only registered targets. So
    the override sits here, at the one place that answers DescribeTargetHealth:
    registered targets get their overridden state, and a deregistered target
    whose override is `draining` stays listed, as ELBv2 lists it while it drains.
    """
    source = _PHYSICS.health_source
    group = self.target_groups.get(target_group_arn)
    if source is not None and group is not None:
        answer = source(target_group_arn, tuple(group.targets))
        if answer is not None:
            return _sourced(self, group, targets, answer)
    statuses = _ORIGINALS[(ELBv2Backend, "describe_target_health")](self, target_group_arn, targets)
    overrides = {tid: st for (arn, tid), st in _PHYSICS.health.items() if arn == target_group_arn}
    listed = {s.instance_id for s in statuses}
    for arn, tid in _PHYSICS.draining:
        # Held draining only while deregistered: a re-registered target shows its real health.
        if arn == target_group_arn and tid not in listed and tid not in overrides:
            overrides[tid] = "draining"
    if not overrides:
        return statuses
    listed = set()
    for status in statuses:
        listed.add(status.instance_id)
        if status.instance_id in overrides:
            _apply(status, overrides[status.instance_id])
    if not targets:
        group = self.target_groups[target_group_arn]
        for tid, state in overrides.items():
            gone = group.deregistered_targets.get(tid) or group.terminated_targets.get(tid)
            if state == "draining" and tid not in listed and gone:
                status = FakeHealthStatus(tid, gone["Port"], group.health_check_port, state)
                statuses.append(_apply(status, state))
    return statuses


def _sourced(backend: Any, group: Any, targets: list[dict[str, Any]], answer: Mapping[str, str]) -> Any:
    """DescribeTargetHealth from a health source's answer; asked-for targets it does not list fall to moto."""
    wanted = [t["Id"] for t in targets] if targets else list(answer)
    statuses = []
    for tid in wanted:
        if tid not in answer:
            statuses.append(group.health_for({"Id": tid}, backend.ec2_backend))
            continue
        known = group.targets.get(tid) or group.deregistered_targets.get(tid) or group.terminated_targets.get(tid)
        port = known["Port"] if known else group.port
        statuses.append(_apply(FakeHealthStatus(tid, port, group.health_check_port, answer[tid]), answer[tid]))
    return statuses


def _apply(status: Any, state: str) -> Any:
    status.status = state
    status.reason, status.description = HEALTH_REASONS[state]
    return status


# Sent by the world's own boto clients (building and inspecting), so an ApiFault
# only ever hits the system under test.
_OWN_HEADER = "X-Motoworld-Own"


def _moto_call_action(self: Any) -> Any:
    # A late request can outlive its world (a fault's delay past the test's end):
    # once uninstalled, the class holds moto's own method again.
    return _ORIGINALS.get((BaseResponse, "call_action"), BaseResponse.call_action)(self)


def _call_action(self: Any) -> Any:
    """Every API request passes here: an armed ApiFault makes it late, or fail."""
    if self.headers.get(_OWN_HEADER):
        return _moto_call_action(self)  # the world's own looks are never faulted
    fault = _PHYSICS.api_fault_for(self._get_action(), self.querystring or {})
    if fault is None:
        return _moto_call_action(self)
    if fault.delay:
        time.sleep(fault.delay)  # on the server's request thread: other requests go on
    if not fault.code:
        return _moto_call_action(self)
    message = escape(fault.message or _ERROR_MESSAGES.get(fault.code, fault.code))
    # Written here rather than by moto's serializer, which wants the code in the service's model.
    if self.service_name == "ec2":
        body = (
            f"<Response><Errors><Error><Code>{escape(fault.code)}</Code><Message>{message}</Message>"
            f"</Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
        )
    else:
        kind = "Receiver" if fault.status >= 500 else "Sender"
        body = (
            f"<ErrorResponse><Error><Type>{kind}</Type><Code>{escape(fault.code)}</Code><Message>{message}</Message>"
            f"</Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
        )
    return fault.status, {"Content-Type": "text/xml"}, body


_PATCHES: dict[tuple[type, str], Callable[..., Any]] = {
    (BaseResponse, "call_action"): _call_action,
    (InstanceBackend, "start_instances"): _start_instances,
    (InstanceBackend, "stop_instances"): _stop_instances,
    (ELBv2Backend, "describe_target_health"): _describe_target_health,
}


def _install() -> None:
    if _ORIGINALS:
        raise RuntimeError("a MotoWorld is already running in this process")
    for (cls, name), patched in _PATCHES.items():
        _ORIGINALS[(cls, name)] = getattr(cls, name)
        setattr(cls, name, patched)


def _uninstall() -> None:
    for (cls, name), original in _ORIGINALS.items():
        setattr(cls, name, original)
    _ORIGINALS.clear()
    _PHYSICS.clear()


# ---------------------------------------------------------------------- world


class MotoWorld:
    """moto on a free local port, plus the EC2 behaviour tests and the lab need."""

    def __init__(self, region: str = DEFAULT_REGION, account_id: str = DEFAULT_ACCOUNT_ID):
        self.region = region
        self.account_id = account_id
        self._server: ThreadedMotoServer | None = None
        self._boto: dict[str, Any] = {}
        self._network: Any = None  # the lock file holding this world's 127.N.0.0/16
        self.network = 0
        self.target_port = 0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "MotoWorld":
        # werkzeug logs every request at INFO on stderr; keep errors only.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.network, self._network = _claim_network()
        self.target_port = _free_port(f"127.{self.network}.0.1")
        _install()
        # port=0 works: werkzeug binds an ephemeral port and get_host_and_port reports it.
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        try:
            self._server.start()
        except BaseException:
            _uninstall()
            self._network.close()
            raise
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
            self._boto.clear()
            _uninstall()
            self._network.close()

    def __enter__(self) -> "MotoWorld":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("MotoWorld is not started")
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    def reset(self) -> None:
        """Forget every resource and every override: a blank account."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=10) as reply:
            reply.read()
        _PHYSICS.clear()

    def boto(self, service: str) -> Any:
        """A plain boto3 client on the world, for building and inspecting it (cached)."""
        if service not in self._boto:
            made = boto3.client(service, region_name=self.region, endpoint_url=self.endpoint_url)
            made.meta.events.register("before-sign", _mark_own)
            self._boto[service] = made
        return self._boto[service]

    @property
    def ec2_backend(self) -> Any:
        return get_backend("ec2")[self.account_id][self.region]

    @property
    def elbv2_backend(self) -> Any:
        return get_backend("elbv2")[self.account_id][self.region]

    # ------------------------------------------------------------ building

    def provision(
        self,
        name: str = "lab",
        *,
        standbys: int = 1,
        spot_tags: Mapping[str, str] | None = None,
    ) -> Deployment:
        """A service behind an ALB: one persistent spot request, `standbys` stopped standbys.

        `spot_tags` are put on the spot instances the request launches (now and
        on every re-fulfilment), for guards that find their spot by tags.
        """
        ec2, elbv2 = self.boto("ec2"), self.boto("elbv2")
        vpc = ec2.create_vpc(CidrBlock=f"127.{self.network}.0.0/16")["Vpc"]["VpcId"]
        # /20s: moto never gives back a terminated instance's address, and a long
        # soak fulfils thousands of spot instances (a /24 ran out at about 250).
        subnets = tuple(
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"127.{self.network}.{16 * i}.0/20",
                              AvailabilityZone=f"{self.region}{az}")["Subnet"]["SubnetId"]
            for i, az in enumerate("ab")
        )
        sg = ec2.create_security_group(GroupName=f"{name}-sg", Description=name, VpcId=vpc)["GroupId"]
        lb = elbv2.create_load_balancer(Name=f"{name}-alb", Subnets=list(subnets), SecurityGroups=[sg])[
            "LoadBalancers"
        ][0]["LoadBalancerArn"]
        tg = elbv2.create_target_group(
            Name=f"{name}-tg",
            Protocol="HTTP",
            Port=self.target_port,
            VpcId=vpc,
            TargetType="instance",
            HealthCheckPath="/health",
            HealthCheckIntervalSeconds=5,
            HealthyThresholdCount=2,
        )["TargetGroups"][0]["TargetGroupArn"]
        # As design.md asks of a real deployment: draining must fit in the 120 s notice.
        elbv2.modify_target_group_attributes(
            TargetGroupArn=tg, Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "30"}]
        )
        elbv2.create_listener(
            LoadBalancerArn=lb, Protocol="HTTP", Port=80, DefaultActions=[{"Type": "forward", "TargetGroupArn": tg}]
        )
        image = self._image_id()
        request = self._request_spot(ec2, name, image, subnets[0], sg, spot_tags or {})
        spot = request["InstanceId"]
        standby_ids = self._standbys(ec2, name, image, subnets[1], sg, standbys)
        elbv2.register_targets(TargetGroupArn=tg, Targets=[{"Id": spot}])
        return Deployment(
            name=name,
            vpc_id=vpc,
            subnet_ids=subnets,
            security_group_id=sg,
            image_id=image,
            load_balancer_arn=lb,
            target_group_arn=tg,
            target_port=self.target_port,
            spot_request_id=request["SpotInstanceRequestId"],
            spot_instance_id=spot,
            standby_ids=standby_ids,
        )

    def launch_spot(self, subnet_id: str, tags: Mapping[str, str]) -> str:
        """A running spot instance launched directly (as a fleet or ASG would), tagged."""
        reply = self.boto("ec2").run_instances(
            ImageId=self._image_id(),
            InstanceType=SPOT_TYPE,
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet_id,
            InstanceMarketOptions={"MarketType": "spot"},
            TagSpecifications=[{"ResourceType": "instance", "Tags": _tag_list(tags)}],
        )
        return reply["Instances"][0]["InstanceId"]

    def _image_id(self) -> str:
        # Any of moto's bundled AMIs; reading the backend avoids listing 1000+ images over HTTP.
        return next(iter(self.ec2_backend.amis))

    def add_spot(self, d: Deployment) -> tuple[str, str]:
        """Another persistent spot request for `d`'s service, its instance registered in the
        target group (a fleet behind one target group); (request id, instance id)."""
        request = self._request_spot(self.boto("ec2"), d.name, d.image_id, d.subnet_ids[0], d.security_group_id, {})
        self.boto("elbv2").register_targets(TargetGroupArn=d.target_group_arn, Targets=[{"Id": request["InstanceId"]}])
        return request["SpotInstanceRequestId"], request["InstanceId"]

    def _request_spot(
        self, ec2: Any, name: str, image: str, subnet: str, sg: str, tags: Mapping[str, str]
    ) -> dict[str, Any]:
        tag_specs = [{"ResourceType": "spot-instances-request", "Tags": [{"Key": "Name", "Value": f"{name}-spot"}]}]
        if tags:
            # AWS only takes request tags here (instances get theirs from a launch
            # template); moto copies "instance" tags onto every instance it launches
            # for the request, which is the effect a launch template would have.
            tag_specs.append({"ResourceType": "instance", "Tags": _tag_list(tags)})
        reply = ec2.request_spot_instances(
            InstanceCount=1,
            Type="persistent",
            InstanceInterruptionBehavior="terminate",
            LaunchSpecification={
                "ImageId": image,
                "InstanceType": SPOT_TYPE,
                "SubnetId": subnet,
                "SecurityGroupIds": [sg],
            },
            TagSpecifications=tag_specs,
        )
        return reply["SpotInstanceRequests"][0]

    def _standbys(self, ec2: Any, name: str, image: str, subnet: str, sg: str, count: int) -> tuple[str, ...]:
        if count == 0:
            return ()
        reply = ec2.run_instances(
            ImageId=image,
            InstanceType=SPOT_TYPE,
            MinCount=count,
            MaxCount=count,
            SubnetId=subnet,
            SecurityGroupIds=[sg],
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": f"{name}-standby"}]}],
        )
        ids = tuple(i["InstanceId"] for i in reply["Instances"])
        ec2.stop_instances(InstanceIds=list(ids))
        states = _states(ec2, ids)
        if set(states.values()) != {"stopped"}:
            raise RuntimeError(f"standbys did not stop: {states}")
        return ids

    # ------------------------------------------------------------ spot dynamics

    def notice(self, request_id: str, code: str = "instance-terminated-no-capacity") -> None:
        """The interruption notice: the request's status changes, its instance keeps running."""
        request = self._spot_request(request_id)
        request._status_code = code
        request.status_message = f"Spot capacity is being reclaimed ({code})."

    def terminate_spot(
        self,
        request_id: str,
        code: str = "instance-terminated-no-capacity",
        *,
        keep_instance_id: bool = False,
    ) -> str:
        """The interruption itself: the instance terminates, the persistent request reopens.

        The request is left `open` with `code` and, unless `keep_instance_id`, no
        instance. ELBv2 deregisters the terminated target, as it does on AWS.
        Returns the terminated instance's id.
        """
        request = self._spot_request(request_id)
        if request.instance is None:
            raise RuntimeError(f"{request_id} has no instance to terminate")
        instance_id = request.instance.id
        self.ec2_backend.terminate_instances([instance_id])
        self.elbv2_backend.notify_terminate_instances([instance_id])
        request.state = "open" if request.type == "persistent" else "closed"
        request._status_code = code
        request.status_message = "Your Spot request is waiting for capacity."
        if not keep_instance_id:
            request.instance = None
        return instance_id

    def fulfil(self, request_id: str, *, pending: bool = False) -> str:
        """Spot capacity is back: the persistent request launches a new instance.

        It is `running` at once, or with `pending` left booting until the
        driver calls `set_state(id, "running")`.
        """
        request = self._spot_request(request_id)
        if request.instance is not None and request.instance.state != "terminated":
            raise RuntimeError(f"{request_id} already has a live instance {request.instance.id}")
        with _PHYSICS.lock:
            instance = request.launch_instance()
            if pending:
                instance._state = InstanceState("pending", STATE_CODES["pending"])
            request.instance = instance
        request.state = "active"
        request._status_code = "fulfilled"
        request.status_message = "Your Spot request is fulfilled."
        return instance.id

    def spot_instance_id(self, request_id: str) -> str | None:
        """The instance the spot request names now (None while it has none)."""
        instance = self._spot_request(request_id).instance
        return instance.id if instance is not None else None

    def _spot_request(self, request_id: str) -> Any:
        try:
            return self.ec2_backend.spot_instance_requests[request_id]
        except KeyError:
            raise KeyError(f"no spot request {request_id} in the world") from None

    # ------------------------------------------------------------ ELBv2 and EC2 answers

    def set_health(self, target_group_arn: str, instance_id: str, state: str | None) -> None:
        """What DescribeTargetHealth says for this target from now on; None forgets it.

        Overrides are sticky until changed: they survive (de)registration, so a
        driver that models draining or `initial` after a re-register sets them.
        """
        key = (target_group_arn, instance_id)
        if state is None:
            _PHYSICS.health.pop(key, None)
            return
        if state not in HEALTH_STATES:
            raise ValueError(f"unknown target health state {state!r}")
        _PHYSICS.health[key] = state

    def hold_draining(self, target_group_arn: str, instance_id: str, hold: bool = True) -> None:
        """Once deregistered, this target is listed as `draining` until released.

        Unlike `set_health(..., "draining")`, the hold does not touch the target
        while it is registered, so a re-registration shows its real health.
        """
        key = (target_group_arn, instance_id)
        (_PHYSICS.draining.add if hold else _PHYSICS.draining.discard)(key)

    def inject_error(self, action: str, instance_id: str, code: str, message: str | None = None) -> None:
        """Make StartInstances or StopInstances of this instance answer `code` until cleared."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {sorted(ACTIONS)}")
        _PHYSICS.errors[(action, instance_id)] = (code, message or _ERROR_MESSAGES.get(code, code))

    def clear_error(self, action: str, instance_id: str) -> None:
        _PHYSICS.errors.pop((action, instance_id), None)

    def api_fault(self, fault: ApiFault) -> ApiFault:
        """Arm `fault` (see ApiFault) until `clear_api_fault`; returns it, the key for `api_hits`."""
        with _PHYSICS.lock:
            _PHYSICS.api_faults[fault] = 0
        return fault

    def clear_api_fault(self, fault: ApiFault | None = None) -> None:
        """Disarm one fault, or every one."""
        with _PHYSICS.lock:
            if fault is None:
                _PHYSICS.api_faults.clear()
            else:
                _PHYSICS.api_faults.pop(fault, None)

    def api_hits(self, fault: ApiFault) -> int:
        """How many requests `fault` has answered so far."""
        with _PHYSICS.lock:
            return _PHYSICS.api_faults.get(fault, 0)

    # ------------------------------------------------------------ a person's hands

    def delete_target_group(self, target_group_arn: str) -> None:
        """Delete a target group as a person would: its listeners first, then the group."""
        elbv2 = self.boto("elbv2")
        group = elbv2.describe_target_groups(TargetGroupArns=[target_group_arn])["TargetGroups"][0]
        for lb in group.get("LoadBalancerArns", []):
            for listener in elbv2.describe_listeners(LoadBalancerArn=lb)["Listeners"]:
                forwards = {a.get("TargetGroupArn") for a in listener.get("DefaultActions", [])}
                if target_group_arn in forwards:
                    elbv2.delete_listener(ListenerArn=listener["ListenerArn"])
        elbv2.delete_target_group(TargetGroupArn=target_group_arn)

    def cancel_spot_request(self, request_id: str) -> None:
        """CancelSpotInstanceRequests; moto forgets the request at once (AWS after a while)."""
        self.boto("ec2").cancel_spot_instance_requests(SpotInstanceRequestIds=[request_id])

    def terminate_instance(self, instance_id: str) -> None:
        """TerminateInstances, e.g. a standby deleted by hand; ELBv2 drops its target."""
        self.boto("ec2").terminate_instances(InstanceIds=[instance_id])
        self.elbv2_backend.notify_terminate_instances([instance_id])

    # ------------------------------------------------------------ the lab's clockwork

    def model_transitions(self, on: bool = True) -> None:
        """StartInstances leaves instances `pending` and StopInstances `stopping`.

        They stay there until the driver calls `set_state` (the lab does after
        the boot or shutdown time), as EC2 takes its time. Cleared by `reset`.
        """
        _PHYSICS.transitions = on

    def set_state(self, instance_id: str, state: str) -> None:
        """Move an instance to an EC2 state, as time passing would (running, stopped, ...)."""
        if state not in STATE_CODES:
            raise ValueError(f"unknown instance state {state!r}")
        with _PHYSICS.lock:
            instance = self.ec2_backend.get_instance_by_id(instance_id)
            if instance is None:
                raise KeyError(f"no instance {instance_id} in the world")
            # A new object, not a mutation: a Describe on the server thread reads name and code together.
            instance._state = InstanceState(state, STATE_CODES[state])

    def schedule_event(self, instance_id: str, code: str, description: str, not_before: Any,
                       not_after: Any = None) -> None:
        """Give an instance a scheduled event (instance-retirement, system-maintenance, ...) as EC2
        does ahead of one; DescribeInstanceStatus then lists it (moto has no events of its own)."""
        instance = self.ec2_backend.get_instance_by_id(instance_id)
        if instance is None:
            raise KeyError(f"no instance {instance_id} in the world")
        event = {"InstanceEventId": f"instance-event-{len(getattr(instance, 'events', ())):017x}", "Code": code,
                 "Description": description, "NotBefore": not_before}
        if not_after is not None:
            event["NotAfter"] = not_after
        # moto serializes an attribute named as the reply member (Events -> events); a new list, not a mutation.
        instance.events = [*getattr(instance, "events", ()), event]

    def set_health_source(self, source: HealthSource | None) -> None:
        """Answer DescribeTargetHealth from `source` (see HealthSource); None gives it back to moto.

        A source's answer replaces `set_health`/`hold_draining` for its group.
        It runs on moto's server thread: it must be thread-safe and quick.
        """
        _PHYSICS.health_source = source

    def private_address(self, instance_id: str) -> str:
        """An instance's private IPv4 address (loopback: the world's VPC is 127.N.0.0/16)."""
        address = self.ec2_backend.get_instance_by_id(instance_id).private_ip
        if not ipaddress.ip_address(address).is_loopback:
            raise ValueError(f"{instance_id} has {address}, outside loopback: the lab never binds or sends there")
        return address

    def instance_state(self, instance_id: str) -> str | None:
        """An instance's EC2 state read from the backend (no API call); None when unknown."""
        instance = self.ec2_backend.get_instance_by_id(instance_id)
        return instance.state if instance is not None else None

    def registered_targets(self, target_group_arn: str) -> tuple[str, ...]:
        """The ids moto has registered in a target group, read from the backend."""
        # tuple() of a dict copies it in one step under the GIL: safe beside the server thread.
        return tuple(self.elbv2_backend.target_groups[target_group_arn].targets)

    # ------------------------------------------------------------ looking

    def states(self, *instance_ids: str) -> dict[str, str]:
        """EC2 state names of these instances, as DescribeInstances reports them."""
        return _states(self.boto("ec2"), instance_ids)

    def health(self, target_group_arn: str) -> dict[str, str]:
        """Target id → health state, as DescribeTargetHealth reports it."""
        reply = self.boto("elbv2").describe_target_health(TargetGroupArn=target_group_arn)
        return {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in reply["TargetHealthDescriptions"]}


_ERROR_MESSAGES = {
    "InsufficientInstanceCapacity": (
        "We currently do not have sufficient capacity in the Availability Zone you requested."
    ),
    "RequestLimitExceeded": "Request limit exceeded.",
    "Throttling": "Rate exceeded",
    "InternalError": "An internal error has occurred",
    "ServiceUnavailable": "The service is unavailable. Please try again shortly.",
}


def _claim_network() -> tuple[int, Any]:
    """An N for 127.N.0.0/16 that no other world on this host uses, and the locked file that holds it."""
    folder = os.path.join(tempfile.gettempdir(), f"spotguard-lab-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for n in NETWORKS:
        held = open(os.path.join(folder, f"127.{n}.lock"), "a")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return n, held
        except BlockingIOError:
            held.close()
    raise RuntimeError(f"every 127.N.0.0/16 of {folder} is held by another running world")


def _free_port(address: str) -> int:
    """A port free on `address` now: the world's target group port, which every instance's service binds."""
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _mark_own(request: Any, **_: Any) -> None:
    request.headers[_OWN_HEADER] = "1"


def _tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _states(ec2: Any, ids: tuple[str, ...] | list[str]) -> dict[str, str]:
    reply = ec2.describe_instances(InstanceIds=list(ids))
    return {i["InstanceId"]: i["State"]["Name"] for r in reply["Reservations"] for i in r["Instances"]}

