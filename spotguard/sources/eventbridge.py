"""The EventBridge event format of EC2's spot events, both ways: the one home of its rules.

`parse(body)` reads one SQS message body for the SQS source and never raises;
`build(...)` makes the event the agent sends, with an id derived from what the
notice says, and never makes one `parse` would refuse.

This module must not do I/O, read a clock, or decide anything about guards.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from spotguard import ids

EC2 = "aws.ec2"
AGENT = "spotguard.agent"
SOURCES = frozenset({EC2, AGENT})
INTERRUPTION = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"
FULFILLMENT = "EC2 Spot Instance Request Fulfillment"
STATE_CHANGE = "EC2 Instance State-change Notification"
# detail-type -> the Notice kind it carries; None: no notice, only a reason to poll sooner.
KINDS: dict[str, str | None] = {
    INTERRUPTION: "interruption",
    REBALANCE: "rebalance",
    FULFILLMENT: None,
    STATE_CHANGE: None,
}
ACTIONS = frozenset({"terminate", "stop", "hibernate"})
# Envelope fields we do not use but type-check when present. `id`, `detail-type`,
# `source` and `detail` are required: without them a message cannot be acted on.
OPTIONAL_STR = ("version", "account", "time", "region")

LOG_CAP = 200  # characters of a bad value (a reason, an answer, an error) that may reach the log


# ---------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Parsed:
    """A well-formed event. `kind` is the Notice kind, or None for wake-only events."""

    event_id: str
    source: str
    detail_type: str
    instance_id: str
    kind: str | None


@dataclass(frozen=True)
class Malformed:
    """A body that is not an event we understand, and why (short, capped)."""

    reason: str


def parse(body: str) -> Parsed | Malformed:
    """Parse one message body as an EventBridge EC2 event. Never raises."""
    try:
        event = json.loads(body)
    except (ValueError, TypeError, RecursionError):
        return Malformed("not json")
    try:
        return _envelope(event)
    except _Bad as bad:
        return Malformed(cap(str(bad)))


class _Bad(Exception):
    pass


def _envelope(event: Any) -> Parsed:
    if not isinstance(event, dict):
        raise _Bad(f"not an object: {type(event).__name__}")
    event_id = _str(event, "id")
    detail_type = _str(event, "detail-type")
    source = _str(event, "source")
    for key in OPTIONAL_STR:
        if key in event and not isinstance(event[key], str):
            raise _Bad(f"{key} is not a string")
    resources = event.get("resources", [])
    if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
        raise _Bad("resources is not a list of strings")
    if source not in SOURCES:
        raise _Bad(f"unknown source {source!r}")
    if detail_type not in KINDS:
        raise _Bad(f"unknown detail-type {detail_type!r}")
    detail = event.get("detail")
    if not isinstance(detail, dict):
        raise _Bad("detail missing or not an object")
    instance_id = _str(detail, "instance-id")
    if not ids.INSTANCE_ID.fullmatch(instance_id):
        raise _Bad(f"bad instance-id {instance_id!r}")
    if detail_type == INTERRUPTION and not is_action(detail.get("instance-action")):
        raise _Bad(f"bad instance-action {detail.get('instance-action')!r}")
    return Parsed(event_id, source, detail_type, instance_id, KINDS[detail_type])


def _str(table: dict, key: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise _Bad(f"{key} missing or not a string")
    return value


def is_action(value: Any) -> bool:
    """Whether `value` is an instance action (isinstance first: `[] in ACTIONS` raises TypeError)."""
    return isinstance(value, str) and value in ACTIONS


def cap(text: str) -> str:
    return text if len(text) <= LOG_CAP else text[:LOG_CAP] + "…"


# ---------------------------------------------------------------------- building


def build(detail_type: str, detail: Mapping[str, str], *, payload: str, region: str, at: datetime) -> dict[str, Any]:
    """The agent's event for one notice; raises ValueError for one `parse` would refuse.

    `payload` is the canonical form of what the notice was read from (the IMDS
    answer); `at` (timezone-aware) is when it is sent. The id depends only on
    the notice, so sending it again (after a restart, a retry) repeats the id
    and the SQS source drops the copy; a new interruption has a new payload.
    """
    event = {
        "version": "0",
        "id": event_id(detail_type, str(detail.get("instance-id", "")), payload),
        "detail-type": detail_type,
        "source": AGENT,
        "time": at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [],
        "detail": dict(detail),
    }
    try:
        _envelope(event)
    except _Bad as bad:
        raise ValueError(str(bad)) from None
    return event


def event_id(detail_type: str, instance_id: str, payload: str) -> str:
    """A UUID made from a SHA-256 of the notice (RFC 9562 UUIDv8, its name-based example)."""
    digest = hashlib.sha256(json.dumps([detail_type, instance_id, payload]).encode()).digest()
    number = int.from_bytes(digest[:16], "big")
    number = (number & ~(0xF << 76)) | (0x8 << 76)  # version 8
    number = (number & ~(0x3 << 62)) | (0x2 << 62)  # the RFC variant
    return str(uuid.UUID(int=number))
