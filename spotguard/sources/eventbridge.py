"""The events spotguard reads from its queue, and the one it sends: the one home of their format.

`parse(body)` reads one SQS message body for the SQS source and never raises:
an EventBridge event (EC2's spot events, the agent's copies, Auto Scaling
lifecycle actions, AWS Health scheduled changes), raw or in an SNS envelope,
or an Auto Scaling lifecycle hook's own message. It is strict about what
spotguard reads (source, detail-type, instance id, instance-action) and
lenient about the envelope fields it does not (version, time, account, region,
resources). `build(...)` makes the event the agent sends, with an id derived
from what the notice says, and never makes one `parse` would refuse;
`PATTERNS` are the EventBridge rules that deliver what `parse` understands.

This module must not do I/O, read a clock, or decide anything about guards.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

from spotguard import ids
from spotguard.machine import NOTICE

EC2 = "aws.ec2"
AGENT = "spotguard.agent"
AUTOSCALING = "aws.autoscaling"
HEALTH = "aws.health"
INTERRUPTION = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"
FULFILLMENT = "EC2 Spot Instance Request Fulfillment"
STATE_CHANGE = "EC2 Instance State-change Notification"
ASG_TERMINATE = "EC2 Instance-terminate Lifecycle Action"
ASG_LAUNCH = "EC2 Instance-launch Lifecycle Action"
HEALTH_EVENT = "AWS Health Event"
# The agent's own: the instance answers its health check on localhost (`spotguard agent --ready-url`).
READY = "spotguard Instance Ready"
# (source, detail-type) -> the Notice kind it carries; None: no notice, only a reason to poll sooner.
KINDS: dict[tuple[str, str], str | None] = {
    (EC2, INTERRUPTION): "interruption",
    (EC2, REBALANCE): "rebalance",
    (EC2, FULFILLMENT): None,
    (EC2, STATE_CHANGE): None,
    (AGENT, INTERRUPTION): "interruption",
    (AGENT, REBALANCE): "rebalance",
    (AGENT, READY): "ready",
    # Auto Scaling is about to terminate the instance (scale-in, capacity rebalancing):
    # an early notice. The hook's owner completes the action, never spotguard.
    (AUTOSCALING, ASG_TERMINATE): "terminating",
    (AUTOSCALING, ASG_LAUNCH): None,
}
ACTIONS = frozenset({"terminate", "stop", "hibernate"})
# An Auto Scaling lifecycle hook that targets SQS itself (not through EventBridge) sends its own shape.
HOOK_SERVICE = "AWS Auto Scaling"
TEST_NOTIFICATION = "autoscaling:TEST_NOTIFICATION"
HOOK_TRANSITIONS = {"autoscaling:EC2_INSTANCE_TERMINATING": "terminating", "autoscaling:EC2_INSTANCE_LAUNCHING": None}
# AWS Health: the EC2 events that announce something done to an instance at a time.
HEALTH_SERVICE = "EC2"
HEALTH_CATEGORY = "scheduledChange"
SNS_NESTING = 2  # an SNS topic may feed another topic; deeper than that is not a delivery path

# The EventBridge rules (on the default bus) that deliver everything `parse` acts on.
PATTERNS: dict[str, dict[str, Any]] = {
    "spot-interruption": {"source": [EC2], "detail-type": [INTERRUPTION]},
    "rebalance-recommendation": {"source": [EC2], "detail-type": [REBALANCE]},
    "spot-fulfillment": {"source": [EC2], "detail-type": [FULFILLMENT]},
    "instance-state-change": {"source": [EC2], "detail-type": [STATE_CHANGE]},
    "health-scheduled-change": {"source": [HEALTH], "detail-type": [HEALTH_EVENT],
                                "detail": {"service": [HEALTH_SERVICE], "eventTypeCategory": [HEALTH_CATEGORY]}},
}
# Only for spots in an Auto Scaling group (selected by tags): elsewhere it would only add traffic.
AUTOSCALING_PATTERN = ("autoscaling-lifecycle", {"source": [AUTOSCALING], "detail-type": [ASG_TERMINATE, ASG_LAUNCH]})

# The agent adds IMDS's instance-action time to its warning (EventBridge's own carries none).
ACTION_TIME = "instance-action-time"

LOG_CAP = 200  # characters of a bad value (a reason, an answer, an error) that may reach the log


# ---------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Parsed:
    """An event about one instance. `kind` is the Notice kind, or None for wake-only events."""

    event_id: str
    source: str
    detail_type: str
    instance_id: str
    kind: str | None
    deadline: float | None = None  # an interruption's: when EC2 reclaims the instance (epoch seconds)


@dataclass(frozen=True)
class Health:
    """An AWS Health scheduled change for EC2 instances: what (`code`), when, and its status."""

    event_id: str
    instance_ids: tuple[str, ...]
    code: str  # e.g. AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED
    status: str  # upcoming | open | closed
    window: str  # "2026-12-10 08:00 UTC to 2026-12-10 10:00 UTC" (`unknown` for a time not given)


@dataclass(frozen=True)
class Foreign:
    """A well-formed message that is not for spotguard (another source or kind); deleted."""

    source: str
    detail_type: str


@dataclass(frozen=True)
class Malformed:
    """A body that is not a message we understand, and why (short, capped)."""

    reason: str


Result = Parsed | Health | Foreign | Malformed


def parse(body: str) -> Result:
    """Parse one message body. Never raises."""
    try:
        message = json.loads(body)
    except (ValueError, TypeError, RecursionError):
        return Malformed("not json")
    try:
        return _message(message, SNS_NESTING)
    except _Bad as bad:
        return Malformed(cap(str(bad)))


class _Bad(Exception):
    pass


def _message(message: Any, nesting: int) -> Result:
    if not isinstance(message, dict):
        raise _Bad(f"not an object: {type(message).__name__}")
    if isinstance(message.get("TopicArn"), str) and isinstance(message.get("Type"), str):
        return _sns(message, nesting)
    if _is_hook(message):
        return _hook(message)
    if "detail-type" in message or "source" in message:
        return _event(message)
    raise _Bad("neither an EventBridge event, an SNS notification nor an Auto Scaling message")


def _is_hook(message: dict) -> bool:
    """An Auto Scaling message of its own shape: from a lifecycle hook that targets the queue,
    or a notification (both say Service "AWS Auto Scaling"; some senders leave it out)."""
    event = message.get("Event")
    return (message.get("Service") == HOOK_SERVICE or "LifecycleTransition" in message
            or isinstance(event, str) and event.startswith("autoscaling:"))


def _sns(envelope: dict, nesting: int) -> Result:
    """An SNS envelope (raw message delivery off): the event is the `Message` string."""
    kind = envelope["Type"]
    if kind != "Notification":  # SubscriptionConfirmation and the like: nothing to act on
        return Foreign("sns", kind)
    if nesting <= 0:
        raise _Bad("SNS envelopes nested too deep")
    inner = envelope.get("Message")
    if not isinstance(inner, str):
        raise _Bad("SNS Message missing or not a string")
    try:
        message = json.loads(inner)
    except (ValueError, RecursionError):
        return Foreign("sns", "Notification of text")  # a topic shared with people's messages
    return _message(message, nesting - 1)


def _event(event: dict) -> Result:
    source = _str(event, "source")
    detail_type = _str(event, "detail-type")
    if source == HEALTH and detail_type == HEALTH_EVENT:
        return _health(event)
    if (source, detail_type) not in KINDS:
        return Foreign(cap(source), cap(detail_type))
    event_id = _str(event, "id")
    detail = _detail(event)
    if source == AUTOSCALING and detail.get("LifecycleTransition") == TEST_NOTIFICATION:
        return Foreign(AUTOSCALING, TEST_NOTIFICATION)  # what a new hook sends first
    key = "EC2InstanceId" if source == AUTOSCALING else "instance-id"
    instance_id = _instance(detail, key)
    if detail_type == INTERRUPTION and not is_action(detail.get("instance-action")):
        raise _Bad(f"bad instance-action {cap(repr(detail.get('instance-action')))}")
    deadline = _deadline(event, detail) if detail_type == INTERRUPTION else None
    return Parsed(event_id, source, detail_type, instance_id, KINDS[source, detail_type], deadline)


def _deadline(event: dict, detail: dict) -> float | None:
    """When EC2 reclaims the instance: the agent's IMDS instance-action time, else the warning's
    own time plus the two-minute notice; None when neither is a readable time."""
    try:
        told = _at(detail.get(ACTION_TIME))
        if told is None:
            sent = _at(event.get("time"))
            told = None if sent is None else sent + timedelta(seconds=NOTICE)
        return (told if told.tzinfo else told.replace(tzinfo=timezone.utc)).timestamp() if told else None
    except (OverflowError, ValueError, OSError):  # a time at the edge of datetime's range
        return None


def _hook(message: dict) -> Result:
    """A lifecycle hook's own message to its SQS queue; or an Auto Scaling notification."""
    transition = message.get("LifecycleTransition")
    # autoscaling:TEST_NOTIFICATION, and the launch/terminate notifications sent after the fact
    if not isinstance(transition, str) or transition not in HOOK_TRANSITIONS:
        what = message.get("Event", transition)
        return Foreign(AUTOSCALING, cap(what if isinstance(what, str) else "unknown"))
    instance_id = _instance(message, "EC2InstanceId")
    event_id = message.get("LifecycleActionToken") or message.get("RequestId")
    if not isinstance(event_id, str):
        raise _Bad("LifecycleActionToken missing or not a string")
    return Parsed(event_id, AUTOSCALING, transition, instance_id, HOOK_TRANSITIONS[transition])


def _health(event: dict) -> Result:
    detail = _detail(event)
    if detail.get("service") != HEALTH_SERVICE or detail.get("eventTypeCategory") != HEALTH_CATEGORY:
        return Foreign(HEALTH, cap(f"{detail.get('service')} {detail.get('eventTypeCategory')}"))
    instances = _affected(event, detail)
    if not instances:
        return Foreign(HEALTH, cap(f"{detail.get('eventTypeCode') or 'a scheduled change'} of no instance"))
    code = _str(detail, "eventTypeCode")
    status = detail.get("statusCode")
    when = window(_at(detail.get("startTime")), _at(detail.get("endTime")))
    return Health(_str(event, "id"), instances, cap(code), status if isinstance(status, str) else "unknown", when)


def _affected(event: dict, detail: dict) -> tuple[str, ...]:
    """The instance ids a Health event names: its affected entities, else its resources."""
    entities = detail.get("affectedEntities")
    named = [e.get("entityValue") for e in entities if isinstance(e, dict)] if isinstance(entities, list) else []
    resources = event.get("resources")
    if not named and isinstance(resources, list):
        named = [r.rsplit("/", 1)[-1] if isinstance(r, str) else r for r in resources]
    return tuple(dict.fromkeys(i for i in named if isinstance(i, str) and ids.INSTANCE_ID.fullmatch(i)))


def window(start: datetime | None, end: datetime | None) -> str:
    """`2026-12-10 08:00 UTC to 2026-12-10 10:00 UTC` (`unknown` for a missing end)."""
    def at(when: datetime | None) -> str:
        if when is None:
            return "unknown"
        try:
            return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).strftime(
                "%Y-%m-%d %H:%M UTC")
        except (OverflowError, ValueError):  # a year at the edge of datetime's range, shifted out of it
            return "unknown"
    return f"{at(start)} to {at(end)}"


def _at(value: Any) -> datetime | None:
    """A Health time: RFC 1123 ("Wed, 10 Dec 2026 08:00:00 GMT", what Health sends) or ISO 8601."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        pass
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _detail(event: dict) -> dict:
    detail = event.get("detail")
    if not isinstance(detail, dict):
        raise _Bad("detail missing or not an object")
    return detail


def _instance(table: dict, key: str) -> str:
    instance_id = _str(table, key)
    if not ids.INSTANCE_ID.fullmatch(instance_id):
        raise _Bad(f"bad {key} {cap(repr(instance_id))}")
    return instance_id


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
    parsed = parse(json.dumps(event))
    if not isinstance(parsed, Parsed):
        raise ValueError(parsed.reason if isinstance(parsed, Malformed) else f"{detail_type!r} is not the agent's")
    return event


def event_id(detail_type: str, instance_id: str, payload: str) -> str:
    """A UUID made from a SHA-256 of the notice (RFC 9562 UUIDv8, its name-based example)."""
    digest = hashlib.sha256(json.dumps([detail_type, instance_id, payload]).encode()).digest()
    number = int.from_bytes(digest[:16], "big")
    number = (number & ~(0xF << 76)) | (0x8 << 76)  # version 8
    number = (number & ~(0x3 << 62)) | (0x2 << 62)  # the RFC variant
    return str(uuid.UUID(int=number))
