"""Two controllers, one leader: a DynamoDB lease, and the guards' states shared behind it.

`Leadership` acquires, renews and gives up the lease item; `leading()` is the
gate the daemon reads before each step and command, judged on this process's
monotonic clock. A guard's state is saved in one transaction fenced by the
lease, so a deposed leader's late write is refused and acts on nothing.
docs/ha.md describes the items, the protocol and each failure.

This module must not decide anything about guards or make EC2/ELBv2 calls; it
owns the lease and the shared-state items and nothing else in the table.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable

import structlog
from botocore.exceptions import ClientError

from . import store
from .aws import AWS_ERRORS, error_code
from .machine import GuardState, Rules

log = structlog.get_logger("spotguard.ha")

KEY = "pk"
LEASE_KEY = "lease"
GUARD_PREFIX = "guard/"
# Of the lease: renew this often, and keep this much of it unused as a margin
# for clock skew between hosts and a late wake-up of our own loop.
RENEW_FRACTION = 1 / 3
MARGIN_FRACTION = 0.1
MIN_MARGIN = 0.3
# DynamoDB calls of the lease get few retries: a renewal that is late is as
# good as lost, and the next one comes a third of a lease later.
MAX_ATTEMPTS = 2
CONDITION_FAILED = "ConditionalCheckFailedException"


def default_holder() -> str:
    """Host name and process id: unique per running daemon."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class LeaseItem:
    """The lease as the table shows it."""

    holder: str
    epoch: int
    expires: float  # the writer's wall clock

    def expired(self, now: float) -> bool:
        return self.expires < now


class Leadership:
    """Holds (or watches) the lease; `leading()` is the gate the daemon reads before acting."""

    def __init__(
        self,
        ddb: Any,
        table: str,
        *,
        lease: float,
        holder: str,
        notifier: Any = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ddb = ddb
        self.table = table
        self.lease = lease
        self.holder = holder
        self.notifier = notifier
        self.clock = clock
        self.monotonic = monotonic
        self.renew_every = lease * RENEW_FRACTION
        self.margin = max(MIN_MARGIN, lease * MARGIN_FRACTION)
        self.epoch: int | None = None  # set while we hold the lease
        self.valid_until = 0.0  # monotonic: act only before this
        self.seen: LeaseItem | None = None  # the lease as last read or written
        self.changed = asyncio.Event()  # set whenever leadership is won or lost
        self.aside_until = 0.0  # monotonic: after stepping aside, take no lease before this
        self._reported: tuple[str, int] | None = None  # the leader last logged as ha.follower

    # ------------------------------------------------------------------ the gate

    def leading(self) -> bool:
        """Whether this daemon may act now: it holds the lease and it is still valid by our own clock."""
        return self.epoch is not None and self.monotonic() < self.valid_until

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Acquire, renew, step down, until `stop` (then `release()` gives the lease up on a clean stop)."""
        while not stop.is_set():
            started = self.monotonic()
            await self.tick()
            delay = max(0.0, started + self.renew_every - self.monotonic())
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    async def tick(self) -> None:
        """One look at the lease: renew it if ours, else take it if it has run out."""
        self._check_validity()
        try:
            if self.epoch is not None:
                # A renewal answered after our lease ends is of no use: wait no longer than that.
                async with asyncio.timeout(max(0.0, self.valid_until - self.monotonic())):
                    await self._renew()
            else:
                async with asyncio.timeout(self.lease):
                    await self._observe_or_acquire()
        except AWS_ERRORS as exc:
            if not _condition_failed(exc):
                log.warning("ha.lease.failed", holder=self.holder, error=error_code(exc),
                            leading=self.epoch is not None)
            elif self.epoch is not None:
                self._step_down("another daemon holds the lease")
            # else: another daemon acquired between our read and our write; we follow it next tick
        self._check_validity()

    def _check_validity(self) -> None:
        if self.epoch is not None and not self.leading():
            self._step_down("the lease ran out before it could be renewed")

    async def _renew(self) -> None:
        sent, now = self.monotonic(), self.clock()
        await self.ddb.update_item(
            TableName=self.table,
            Key={KEY: {"S": LEASE_KEY}},
            UpdateExpression="SET expires = :exp, renewed = :now, lease = :lease",
            ConditionExpression="holder = :me AND epoch = :epoch",
            ExpressionAttributeValues={
                ":exp": _n(now + self.lease),
                ":now": _n(now),
                ":lease": _n(self.lease),
                ":me": {"S": self.holder},
                ":epoch": _n(self.epoch),
            },
        )
        if self.epoch is not None:  # not stepped down while the request was out
            self.valid_until = sent + self.lease - self.margin
            self.seen = LeaseItem(self.holder, self.epoch, now + self.lease)

    async def _observe_or_acquire(self) -> None:
        current = await self.read()
        now = self.clock()
        if current is not None and not current.expired(now):
            self.seen = current
            self._follow(current)
            return
        if self.monotonic() < self.aside_until:
            return  # stepped aside: the other controller gets the first chance
        await self._acquire()

    async def step_aside(self, reason: str, *, hold: float) -> None:
        """Give the lease up because this daemon cannot do the leader's job (it is blind
        to EC2/ELBv2 while DynamoDB still answers), and take none for `hold` seconds, so
        the other controller, which may see, leads. A no-op when not leading."""
        if self.epoch is None:
            return
        self.aside_until = self.monotonic() + hold
        log.error("ha.stepped_aside", holder=self.holder, epoch=self.epoch, reason=reason, hold=hold)
        self._notify(f"spotguard {self.holder} stepped aside (epoch {self.epoch}): {reason}")
        await self.release()
        self.changed.set()

    async def _acquire(self) -> None:
        sent, now = self.monotonic(), self.clock()
        reply = await self.ddb.update_item(
            TableName=self.table,
            Key={KEY: {"S": LEASE_KEY}},
            UpdateExpression=(
                "SET holder = :me, expires = :exp, acquired = :now, renewed = :now, lease = :lease, "
                "epoch = if_not_exists(epoch, :zero) + :one"
            ),
            ConditionExpression="attribute_not_exists(holder) OR expires < :now",
            ExpressionAttributeValues={
                ":me": {"S": self.holder},
                ":exp": _n(now + self.lease),
                ":now": _n(now),
                ":lease": _n(self.lease),
                ":zero": _n(0),
                ":one": _n(1),
            },
            ReturnValues="ALL_NEW",
        )
        epoch = int(reply["Attributes"]["epoch"]["N"])
        self.epoch, self.valid_until = epoch, sent + self.lease - self.margin
        self.seen = LeaseItem(self.holder, epoch, now + self.lease)
        self._reported = None
        log.info("ha.leader", holder=self.holder, epoch=epoch, lease=self.lease)
        self._notify(f"spotguard {self.holder} is now the leader (epoch {epoch})")
        self.changed.set()

    def _step_down(self, reason: str) -> None:
        epoch, self.epoch, self.valid_until = self.epoch, None, 0.0
        log.warning("ha.stepped_down", holder=self.holder, epoch=epoch, reason=reason)
        self._notify(f"spotguard {self.holder} stepped down (epoch {epoch}): {reason}")
        self.changed.set()

    def lost(self, reason: str) -> None:
        """The daemon found out (a fenced write) that the lease is no longer ours."""
        if self.epoch is not None:
            self._step_down(reason)

    async def release(self) -> None:
        """On a clean stop: end our lease now, so the follower need not wait it out. Best effort."""
        epoch = self.epoch
        if epoch is None:
            return
        self.epoch, self.valid_until = None, 0.0  # the gate closes before the lease is given up
        try:
            async with asyncio.timeout(self.renew_every):
                await self.ddb.update_item(
                    TableName=self.table,
                    Key={KEY: {"S": LEASE_KEY}},
                    UpdateExpression="SET expires = :past",
                    ConditionExpression="holder = :me AND epoch = :epoch",
                    ExpressionAttributeValues={":past": _n(0), ":me": {"S": self.holder}, ":epoch": _n(epoch)},
                )
        except AWS_ERRORS as exc:
            log.warning("ha.release.failed", holder=self.holder, epoch=epoch, error=error_code(exc))
            return
        log.info("ha.released", holder=self.holder, epoch=epoch)

    def _follow(self, current: LeaseItem) -> None:
        if self._reported != (current.holder, current.epoch):
            self._reported = (current.holder, current.epoch)
            log.info("ha.follower", holder=self.holder, leader=current.holder, epoch=current.epoch)

    def _notify(self, text: str) -> None:
        if self.notifier is not None:
            self.notifier.notify(text)

    # ------------------------------------------------------------------ the table

    async def read(self) -> LeaseItem | None:
        """The lease item (a consistent read), None when there is none yet."""
        reply = await self.ddb.get_item(TableName=self.table, Key={KEY: {"S": LEASE_KEY}}, ConsistentRead=True)
        return _lease_item(reply.get("Item"))

    async def save(self, guard: str, state: GuardState) -> bool:
        """Write a guard's state, fenced by our lease; False if it was not written (then do not act)."""
        epoch = self.epoch
        if epoch is None or not self.leading():
            return False
        document = json.dumps(store.encode(state, guard), sort_keys=True, allow_nan=False)
        try:
            await self.ddb.transact_write_items(
                TransactItems=[
                    {
                        "ConditionCheck": {
                            "TableName": self.table,
                            "Key": {KEY: {"S": LEASE_KEY}},
                            "ConditionExpression": "holder = :me AND epoch = :epoch",
                            "ExpressionAttributeValues": {":me": {"S": self.holder}, ":epoch": _n(epoch)},
                        }
                    },
                    {
                        "Put": {
                            "TableName": self.table,
                            "Item": {
                                KEY: {"S": GUARD_PREFIX + guard},
                                "state": {"S": document},
                                "holder": {"S": self.holder},
                                "epoch": _n(epoch),
                                "saved": _n(self.clock()),
                            },
                        }
                    },
                ]
            )
        except AWS_ERRORS as exc:
            code = error_code(exc)
            if code == "TransactionCanceledException" and _cancelled_by_condition(exc):
                log.error("ha.state.fenced", guard=guard, holder=self.holder, epoch=epoch)
                self.lost("a state write was refused: another daemon holds the lease")
            else:
                log.error("ha.state.save_failed", guard=guard, holder=self.holder, error=code)
            return False
        return True

    async def states(self, rules: dict[str, Rules], *, consistent: bool) -> dict[str, GuardState] | None:
        """The shared state of each named guard that has one; None if the table could not be read."""
        try:
            return await shared_states(self.ddb, self.table, rules, consistent=consistent)
        except AWS_ERRORS as exc:
            log.warning("ha.state.load_failed", holder=self.holder, error=error_code(exc))
            return None


async def shared_states(ddb: Any, table: str, rules: dict[str, Rules], *, consistent: bool) -> dict[str, GuardState]:
    """The shared state of each named guard that has one (the leader's, as it last saved it).
    AWS errors are the caller's; keys DynamoDB keeps leaving unprocessed are one too."""
    if not rules:
        return {}
    keys = [{KEY: {"S": GUARD_PREFIX + name}} for name in rules]
    found: dict[str, GuardState] = {}
    request = {table: {"Keys": keys, "ConsistentRead": consistent}}
    for _ in range(5):  # unprocessed keys come back under throttling; a few rounds settle them
        reply = await ddb.batch_get_item(RequestItems=request)
        for item in reply.get("Responses", {}).get(table, []):
            name = item[KEY]["S"][len(GUARD_PREFIX):]
            state = _decode(name, item, rules.get(name))
            if state is not None:
                found[name] = state
        request = reply.get("UnprocessedKeys") or {}
        if not request:
            return found
    raise ClientError({"Error": {"Code": "UnprocessedKeys", "Message": "DynamoDB kept keys unprocessed"}},
                      "BatchGetItem")


def _condition_failed(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and error_code(exc) == CONDITION_FAILED


def _cancelled_by_condition(exc: BaseException) -> bool:
    reasons = exc.response.get("CancellationReasons") or [] if isinstance(exc, ClientError) else []
    if reasons:
        return any(r.get("Code") == "ConditionalCheckFailed" for r in reasons)
    return "ConditionalCheckFailed" in str(exc)


def _decode(name: str, item: dict, rules: Rules | None) -> GuardState | None:
    if rules is None:
        return None
    try:
        return store.decode(json.loads(item["state"]["S"]), rules, name)
    except (KeyError, ValueError) as exc:
        log.error("ha.state.corrupt", guard=name, reason=str(exc))
        return None


def _lease_item(item: dict | None) -> LeaseItem | None:
    if not item or "holder" not in item:
        return None
    return LeaseItem(item["holder"]["S"], int(item["epoch"]["N"]), float(item["expires"]["N"]))


def _n(value: float | int) -> dict[str, str]:
    # DynamoDB numbers travel as strings; Decimal keeps a float's digits without an exponent.
    return {"N": str(Decimal(repr(value))) if isinstance(value, float) else str(value)}


# ---------------------------------------------------------------------- for check/status and setup


def table_spec(table: str) -> dict[str, Any]:
    """CreateTable's arguments: one string partition key, on-demand billing."""
    return {
        "TableName": table,
        "AttributeDefinitions": [{"AttributeName": KEY, "AttributeType": "S"}],
        "KeySchema": [{"AttributeName": KEY, "KeyType": "HASH"}],
        "BillingMode": "PAY_PER_REQUEST",
    }


async def leader(settings: Any, client: Any, *, now: float | None = None) -> dict[str, Any] | None:
    """Who leads, for `check` and `status`: holder, epoch, expires, valid; None without [ha] or no lease yet.

    `client` is a DynamoDB client; AWS errors are the caller's to report.
    """
    if settings.ha is None:
        return None
    reply = await client.get_item(TableName=settings.ha.table, Key={KEY: {"S": LEASE_KEY}}, ConsistentRead=True)
    item = _lease_item(reply.get("Item"))
    if item is None:
        return None
    now = time.time() if now is None else now
    return {"holder": item.holder, "epoch": item.epoch, "expires": item.expires, "valid": not item.expired(now)}
