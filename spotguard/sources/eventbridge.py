"""The EventBridge event format: EC2's spot events, and the agent's copies of them.

`parse(body)` reads one SQS message body for the SQS source; it is pure and
total (never raises): a well-formed event becomes `Parsed`, anything else
`Malformed` with a short reason.

This module must not do I/O or decide anything about guards.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

SOURCES = frozenset({"aws.ec2", "spotguard.agent"})
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
INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")
# Envelope fields we do not use but type-check when present. `id`, `detail-type`,
# `source` and `detail` are required: without them a message cannot be acted on.
OPTIONAL_STR = ("version", "account", "time", "region")

REASON_CAP = 200  # characters of a bad value that may reach the log


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
    if not INSTANCE_ID.fullmatch(instance_id):
        raise _Bad(f"bad instance-id {instance_id!r}")
    action = detail.get("instance-action")
    if detail_type == INTERRUPTION and not (isinstance(action, str) and action in ACTIONS):
        raise _Bad(f"bad instance-action {detail.get('instance-action')!r}")
    return Parsed(event_id, source, detail_type, instance_id, KINDS[detail_type])


def _str(table: dict, key: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise _Bad(f"{key} missing or not a string")
    return value


def cap(text: str) -> str:
    return text if len(text) <= REASON_CAP else text[:REASON_CAP] + "…"


