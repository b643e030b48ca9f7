"""The poll source: one batched look at EC2 and ELBv2 for every guard at once.

`Poller.observe()` returns each guard's `machine.Observed`: its spots (with the
interruption notice read from the spot request status), its standbys in config
order, and every target of its target group with its health. Per round, for
any number of guards: one DescribeSpotInstanceRequests, one DescribeInstances
by id (plus one by tag when a guard finds its spots by tags), and at most one
DescribeTargetHealth per target group; a steady guard's target health is
reused while `machine.health_reusable` allows. One bad id in a batch falls back
to one call per id, so it cannot blind every guard.

This module must not decide anything about failovers nor change the world.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Collection, Iterable, Sequence

import structlog

from spotguard.aws import AWS_ERRORS, error_code
from spotguard.machine import LIVE_STATES, Instance, Observed, Target, health_reusable

log = structlog.get_logger("spotguard.poll")

# Spot request status codes that mean the instance has been told to go.
NOTICE_CODES = frozenset(
    {
        "instance-terminated-by-price",
        "instance-terminated-no-capacity",
        "instance-terminated-capacity-oversubscribed",
        "instance-terminated-launch-group-constraint",
    }
)
NOTICE_PREFIX = "marked-for-"  # marked-for-stop, -hibernation, -termination

# Every state but terminated: a tag-found spot that is shutting down still counts
# (the machine sees it leave), a terminated one is history.
TAGGED_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")

MISSING = "missing"
# Codes that blame one id of a batch rather than the call: worth one call per id.
INSTANCE_BAD_ID = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
REQUEST_BAD_ID = frozenset({"InvalidSpotInstanceRequestID.NotFound", "InvalidSpotInstanceRequestID.Malformed"})
TG_NOT_FOUND = "TargetGroupNotFound"


# Each Describe, retries included, ends within this many seconds: a stuck or
# throttled endpoint costs the round seconds, not the notice's two minutes.
CALL_DEADLINE = 10.0

View = tuple[tuple[Instance, ...], tuple[Instance, ...]]  # a guard's spots and standbys


class PollError(Exception):
    """A Describe failed, so the guards it concerns are not observed this round."""

    def __init__(self, api: str, code: str):
        super().__init__(f"{api} failed: {code}")
        self.api = api
        self.code = code


def is_notice(status_code: str | None) -> bool:
    """Whether a spot request status code announces an interruption."""
    code = status_code or ""
    return code in NOTICE_CODES or code.startswith(NOTICE_PREFIX)


@dataclass(frozen=True)
class _Described:
    """A target group's targets as last described, and when (the caller's clock)."""

    targets: tuple[Target, ...]
    at: float


class Poller:
    """Describes the world of every guard in as few calls as it can."""

    def __init__(self, ec2: Any, elbv2: Any, guards: Iterable[Any], *, deadline: float = CALL_DEADLINE):
        self.ec2 = ec2
        self.elbv2 = elbv2
        self.guards = tuple(guards)
        self.deadline = deadline
        self.calls: Counter[str] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()  # (api, code) of every failed call
        self.gone: set[str] = set()  # ids AWS said were gone at the last look, logged once
        self.disputed: set[str] = set()  # ownership conflicts at the last look, logged once
        self.described: dict[str, _Described] = {}  # by target group arn
        self.views: dict[str, View] = {}  # guard: spots, standbys

    # ------------------------------------------------------------------ round

    async def observe(self, steady: Collection[str] = (), now: float = 0.0,
                      deliver: Callable[[str, Observed | PollError], None] | None = None
                      ) -> dict[str, Observed | PollError]:
        """One snapshot per guard, or the PollError that kept it from being observed.

        A failure blinds only the guards it concerns: a target group that cannot be
        described fails its guards alone, a failed tag lookup the guards that use
        tags; only the shared DescribeSpotInstanceRequests/DescribeInstances blind
        everyone. And a slow call delays only its own guards: `deliver(name, result)`
        is called for each guard as soon as its own calls are done. `steady` names
        the guards whose target health may be reused (machine.health_reusable),
        judged at `now`.
        """
        reusable = {g.target_group_arn for g in self.guards if g.name in steady and self._reusable(g, now)}
        groups = {arn: asyncio.ensure_future(self._group(arn, now))
                  for arn in _unique(g.target_group_arn for g in self.guards) if arn not in reusable}
        try:
            return await self._settle(groups, reusable, now, deliver or (lambda name, result: None))
        finally:
            for task in groups.values():  # none outlives the round, even when it ends early
                task.cancel()
            await asyncio.gather(*groups.values(), return_exceptions=True)

    async def _settle(self, groups: dict[str, asyncio.Future], reusable: set[str], now: float,
                      deliver: Callable[[str, Observed | PollError], None]) -> dict[str, Observed | PollError]:
        """Each guard's outcome, delivered as soon as its target group (or the shared EC2 calls) settle."""
        out: dict[str, Observed | PollError] = {}

        def settle(arn: str, targets: Any) -> None:
            for g in self.guards:
                if g.target_group_arn == arn:
                    out[g.name] = self._outcome(g, requests, views[g.name], targets, claims[g.name])
                    deliver(g.name, out[g.name])

        spot_view, tagged = await asyncio.gather(self._spot_view(), self._tagged_instances(), return_exceptions=True)
        if isinstance(spot_view, BaseException):
            for g in self.guards:
                out[g.name] = _reraise_bug(spot_view)
                deliver(g.name, out[g.name])
            return out
        requests, instances = spot_view
        views = {g.name: self._view(g, requests, instances, tagged) for g in self.guards}
        claims = _claims(self.guards, views)
        self._log_disputes(claims)
        # A steady guard whose instances changed since last round gets its group described now.
        for g in self.guards:
            if g.target_group_arn in reusable and views[g.name] != self.views.get(g.name):
                groups.setdefault(g.target_group_arn, asyncio.ensure_future(self._group(g.target_group_arn, now)))
        self.views.update({name: v for name, v in views.items() if not isinstance(v, PollError)})
        health: dict[str, Any] = {arn: self.described[arn].targets for arn in reusable if arn not in groups}
        for arn, targets in list(health.items()):
            settle(arn, targets)
        for next_done in asyncio.as_completed(list(groups.values())):
            arn, targets = await next_done
            if targets is not None:
                health[arn] = targets
            settle(arn, targets)
        self._log_gone(requests, health)
        return out

    def _outcome(self, guard: Any, requests: dict[str, dict], view: "View | PollError",
                 targets: "tuple[Target, ...] | PollError | None", claims: "_Claims") -> Observed | PollError:
        if isinstance(view, PollError):
            return view
        if isinstance(targets, PollError):
            return targets
        return self._assemble(guard, requests, view, targets, claims)

    def _reusable(self, guard: Any, now: float) -> bool:
        """Whether a steady guard's last described targets still do (machine.health_reusable)."""
        last = self.described.get(guard.target_group_arn)
        view = self.views.get(guard.name)
        if last is None or view is None:
            return False
        return health_reusable(guard.unhealthy_grace, last.targets, view[0], now - last.at)

    def _log_gone(self, requests: dict[str, dict], health: dict[str, Any]) -> None:
        """Log what went missing since the last look, and what came back."""
        gone = {rid for g in self.guards for rid in g.spot_request_ids if rid not in requests}
        gone |= {g.target_group_arn for g in self.guards if g.target_group_arn not in health}
        for rid in sorted(gone - self.gone):
            guards = [g.name for g in self.guards if rid in (g.target_group_arn, *g.spot_request_ids)]
            if rid.startswith("arn:"):
                log.error("poll.target_group.missing", target_group_arn=rid, guards=guards)
            else:
                log.error("poll.spot_request.missing", request_id=rid, guards=guards)
        for rid in sorted(self.gone - gone):
            log.info("poll.found_again", id=rid)
        self.gone = gone

    def _log_disputes(self, claims: dict[str, "_Claims"]) -> None:
        disputed = {(name, iid) for name, c in claims.items() for iid in c.disputed}
        for name, iid in sorted(disputed - self.disputed):
            log.error("poll.ownership.conflict", guard=name, instance_id=iid)
        self.disputed = disputed

    @staticmethod
    def _view(guard: Any, requests: dict[str, dict], instances: dict[str, dict], tagged: Any) -> "View | PollError":
        """The guard's spots and standbys, as this round's EC2 calls describe them."""
        spots: list[Instance] = []
        for rid in guard.spot_request_ids:
            spot = _spot_from_request(requests.get(rid), instances)
            if spot is not None:
                spots.append(spot)
        if guard.spot_instance_tags:
            if isinstance(tagged, BaseException):
                return _reraise_bug(tagged)
            known = {s.id for s in spots}
            spots.extend(
                _instance(i)
                for i in tagged
                if _has_tags(i, guard.spot_instance_tags) and i["InstanceId"] not in known
            )
        standbys = tuple(
            _instance(instances[sid]) if sid in instances else Instance(sid, MISSING)
            for sid in guard.standby_instance_ids
        )
        return tuple(spots), standbys

    @staticmethod
    def _assemble(guard: Any, requests: dict[str, dict], view: "View", targets: tuple[Target, ...] | None,
                  claims: "_Claims") -> Observed:
        return Observed(
            spots=tuple(i for i in view[0] if i.id not in claims.disputed),
            standbys=view[1],
            targets=targets or (),
            target_group_gone=targets is None,
            requests_gone=tuple(rid for rid in guard.spot_request_ids if rid not in requests),
            foreign=claims.foreign,
            disputed=claims.disputed,
        )

    # ------------------------------------------------------------------ EC2

    async def _spot_view(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """Spot requests by id, then every instance they name plus the standbys, by id."""
        request_ids = _unique(rid for g in self.guards for rid in g.spot_request_ids)
        requests = await self._describe_requests(request_ids) if request_ids else {}
        spot_ids = [r["InstanceId"] for r in requests.values() if r.get("InstanceId")]
        standby_ids = [sid for g in self.guards for sid in g.standby_instance_ids]
        instance_ids = _unique([*spot_ids, *standby_ids])
        instances = await self._describe_instances(instance_ids) if instance_ids else {}
        return requests, instances

    async def _describe_requests(self, ids: Sequence[str]) -> dict[str, dict]:
        async def one_call(batch: Sequence[str]) -> list[dict]:
            pages = self._pages("DescribeSpotInstanceRequests", self.ec2.describe_spot_instance_requests,
                                SpotInstanceRequestIds=list(batch))
            return [r for reply in await pages for r in reply.get("SpotInstanceRequests", [])]

        found = await self._batched("DescribeSpotInstanceRequests", one_call, ids, REQUEST_BAD_ID)
        return {r["SpotInstanceRequestId"]: r for r in found}

    async def _describe_instances(self, ids: Sequence[str]) -> dict[str, dict]:
        async def one_call(batch: Sequence[str]) -> list[dict]:
            replies = await self._pages("DescribeInstances", self.ec2.describe_instances, InstanceIds=list(batch))
            return [i for reply in replies for r in reply.get("Reservations", []) for i in r.get("Instances", [])]

        found = await self._batched("DescribeInstances", one_call, ids, INSTANCE_BAD_ID)
        return {i["InstanceId"]: i for i in found}

    async def _tagged_instances(self) -> list[dict]:
        """Spot instances carrying any tag key some guard looks for, not terminated.

        EC2 ANDs filters, so one call cannot ask for "guard A's tags OR guard B's";
        a `tag-key` filter on the union of keys fetches a superset in one call, and
        `_has_tags` matches each guard's full tag set. The lifecycle is checked here
        rather than with an `instance-lifecycle` filter, which moto does not implement.
        """
        keys = _unique(k for g in self.guards for k, _ in g.spot_instance_tags)
        if not keys:
            return []
        filters = [
            {"Name": "tag-key", "Values": keys},
            {"Name": "instance-state-name", "Values": list(TAGGED_STATES)},
        ]
        try:
            replies = await self._pages("DescribeInstances", self.ec2.describe_instances, Filters=filters)
        except AWS_ERRORS as exc:
            raise self._failed("DescribeInstances", exc) from exc
        found = [i for reply in replies for r in reply.get("Reservations", []) for i in r.get("Instances", [])]
        spots = [i for i in found if i.get("InstanceLifecycle") == "spot"]
        return sorted(spots, key=lambda i: (str(i.get("LaunchTime", "")), i["InstanceId"]))

    # ------------------------------------------------------------------ ELBv2

    async def _group(self, arn: str, now: float) -> tuple[str, tuple[Target, ...] | PollError | None]:
        """(arn, its targets), or the PollError of a group that could not be described, or None
        for a group that is gone."""
        try:
            targets = await self._one_group(arn)
        except PollError as failed:
            return arn, failed
        if targets is None:
            self.described.pop(arn, None)
        else:
            self.described[arn] = _Described(targets, now)
        return arn, targets

    async def _one_group(self, arn: str) -> tuple[Target, ...] | None:
        try:
            reply = await self._call(
                "DescribeTargetHealth", self.elbv2.describe_target_health, TargetGroupArn=arn
            )
        except AWS_ERRORS as exc:
            if error_code(exc) == TG_NOT_FOUND:
                return None  # logged once by _log_gone; the machine alerts
            raise self._failed("DescribeTargetHealth", exc, target_group_arn=arn) from exc
        return tuple(
            Target(d["Target"]["Id"], d.get("TargetHealth", {}).get("State", "unavailable"))
            for d in reply.get("TargetHealthDescriptions", [])
        )

    # ------------------------------------------------------------------ plumbing

    async def _call(self, api: str, method: Any, **kwargs: Any) -> dict:
        """One call, bounded: retries included, it may not take longer than the deadline."""
        self.calls[api] += 1
        async with asyncio.timeout(self.deadline):
            return await method(**kwargs)

    async def _pages(self, api: str, method: Any, **kwargs: Any) -> list[dict]:
        """Every page of a Describe that pages (NextToken), in order."""
        replies, token = [], None
        while True:
            reply = await self._call(api, method, **kwargs, **({"NextToken": token} if token else {}))
            replies.append(reply)
            token = reply.get("NextToken")
            if not token:
                return replies

    async def _batched(
        self, api: str, one_call: Any, ids: Sequence[str], bad_id: frozenset[str]
    ) -> list[dict]:
        """One call for all ids; when one id is bad, one call per id, skipping the bad ones."""
        try:
            return await one_call(ids)
        except AWS_ERRORS as exc:
            code = error_code(exc)
            if code not in bad_id:
                raise self._failed(api, exc) from exc
            if len(ids) == 1:
                log.error("poll.describe.not_found", api=api, id=ids[0], code=code)
                return []
            log.warning("poll.describe.fallback", api=api, code=code, ids=len(ids))
        found: list[dict] = []
        for one in ids:
            found.extend(await self._batched(api, one_call, [one], bad_id))
        return found

    def _failed(self, api: str, exc: BaseException, **where: str) -> PollError:
        code = error_code(exc)
        self.errors[(api, code)] += 1
        log.error("poll.describe.failed", api=api, code=code, error=str(exc), **where)
        return PollError(api, code)


@dataclass(frozen=True)
class _Claims:
    """Of the instances this round shows, which a guard must leave alone."""

    foreign: frozenset[str]  # owned by another guard: its spots and its standbys
    # claimed by this guard but owned elsewhere (a spot of an earlier guard, a standby that is a spot)
    disputed: frozenset[str]


def _claims(guards: Sequence[Any], views: dict[str, "View | PollError"]) -> dict[str, _Claims]:
    """Who owns each instance: a spot belongs to the first guard (in config order) that
    finds it, and an instance that is some guard's spot is no guard's standby."""
    spot_owner: dict[str, str] = {}
    for g in guards:
        view = views[g.name]
        if not isinstance(view, PollError):
            for i in view[0]:
                spot_owner.setdefault(i.id, g.name)
    standby_owner = {sid: g.name for g in guards for sid in g.standby_instance_ids}
    out = {}
    for g in guards:
        foreign = {iid for iid, owner in spot_owner.items() if owner != g.name}
        foreign |= {sid for sid, owner in standby_owner.items() if owner != g.name}
        view = views[g.name]
        mine = () if isinstance(view, PollError) else view[0]
        disputed = {i.id for i in mine if spot_owner[i.id] != g.name}
        disputed |= {sid for sid in g.standby_instance_ids if sid in spot_owner}
        out[g.name] = _Claims(frozenset(foreign | disputed), frozenset(disputed))
    return out


def _reraise_bug(result: Any) -> Any:
    """A PollError (or a result) passes; any other exception from a poll call is a bug: raised."""
    if isinstance(result, BaseException) and not isinstance(result, PollError):
        raise result
    return result


# ---------------------------------------------------------------------- helpers


def _spot_from_request(request: dict | None, instances: dict[str, dict]) -> Instance | None:
    """The request's current instance with its notice; None while it has none."""
    if not request or not request.get("InstanceId"):
        return None
    iid = request["InstanceId"]
    described = instances.get(iid)
    if described is None:
        return Instance(iid, MISSING)
    notice = described["State"]["Name"] in LIVE_STATES and is_notice(request.get("Status", {}).get("Code"))
    return replace(_instance(described), notice=notice)


def _instance(described: dict) -> Instance:
    launched = described.get("LaunchTime")
    return Instance(described["InstanceId"], described["State"]["Name"],
                    address=described.get("PrivateIpAddress"),
                    launched=launched.timestamp() if launched is not None else None)


def _has_tags(described: dict, wanted: Iterable[tuple[str, str]]) -> bool:
    tags = {t["Key"]: t["Value"] for t in described.get("Tags", [])}
    return all(tags.get(k) == v for k, v in wanted)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))

