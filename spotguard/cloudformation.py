"""spotguard's AWS side, declared once: what `spotguard setup` makes, and the same as a CloudFormation template.

The facts here (which EventBridge rules, the new queue's attributes, the queue
policy statement, each rule's target, the config's queue checked) are read by
commands/setup.py, which converges an account to them call by call, and by
`template(settings)`, which declares them, with the daemon's and the agent's
roles and instance profiles, for `spotguard setup --cloudformation`. The
patterns are eventbridge's, the policies iam's, the table ha's: read, never
copied. This module must not talk to AWS; it only reads the settings it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from spotguard import iam, ids
from spotguard.config import Settings, SqsSettings
from spotguard.ha import table_spec
from spotguard.sources.eventbridge import AUTOSCALING_PATTERN, PATTERNS

# rule name -> event pattern. Short fixed slugs read better in the console than
# slugified detail-types, and stay well under EventBridge's 64-character limit.
RULES: dict[str, dict[str, Any]] = {ids.RULE_PREFIX + slug: pattern for slug, pattern in PATTERNS.items()}
# Messages are acted on within a second or deleted; an hour covers a daemon
# restart without keeping stale notices (a notice is worthless after 2 min).
NEW_QUEUE_ATTRIBUTES = {"MessageRetentionPeriod": "3600", "VisibilityTimeout": "30"}
POLICY_SID = "spotguard-eventbridge"
POLICY_ID = "{queue_arn}/SQSDefaultPolicy"  # the Id SQS's console gives a queue's first policy
EVENTS_PRINCIPAL = "events.amazonaws.com"
TARGET_ID_MAX = 64
ROLE_NAME_MAX = 64
FORMAT_VERSION = "2010-09-09"
# setup never deletes anything, and neither does deleting or replacing the stack: the table holds
# the lease and the guards' shared state, the queue may hold a notice the daemon has not read.
KEPT = {"DeletionPolicy": "Retain", "UpdateReplacePolicy": "Retain"}


class SetupError(Exception):
    """The config names a queue setup cannot make (exit 2)."""


@dataclass(frozen=True)
class QueueRef:
    """What the config's queue URL tells us before any AWS call."""

    url: str
    name: str
    account: str | None  # the URL's account segment, if it looks like one


def queue_ref(sqs: SqsSettings, region: str) -> QueueRef:
    """Check `[sources.sqs] queue_url`; SetupError if no usable queue name or a different region."""
    queue_url, name = sqs.queue_url, sqs.queue_name
    if name is None:
        raise SetupError(f"sources.sqs.queue_url: {queue_url!r} has no queue name in its path")
    if name.endswith(".fifo"):
        raise SetupError(f"sources.sqs.queue_url: {name!r} is a FIFO queue; setup makes a standard queue only")
    if not ids.QUEUE_NAME.fullmatch(name):
        raise SetupError(f"sources.sqs.queue_url: {name!r} is not a valid queue name ([A-Za-z0-9_-], 1-80)")
    named = ids.queue_region(urlsplit(queue_url).hostname or "")
    if named is not None and named != region:
        raise SetupError(f"sources.sqs.queue_url: the queue is in {named}, but aws.region is {region}")
    return QueueRef(queue_url, name, sqs.account)


def rules(settings: Settings) -> dict[str, dict[str, Any]]:
    """The rules this config needs: RULES, and Auto Scaling's lifecycle actions when a guard
    finds its spots by tags (only an Auto Scaling group's spots have no request ids to name)."""
    if not any(g.spot_instance_tags for g in settings.guards):
        return RULES
    slug, pattern = AUTOSCALING_PATTERN
    return {**RULES, ids.RULE_PREFIX + slug: pattern}


def rule_description(pattern: dict[str, Any]) -> str:
    return f"spotguard: {', '.join(pattern['detail-type'])} events from {pattern['source'][0]} to SQS"


def target_id(queue_name: str) -> str:
    """Our target's Id on each rule: from the queue, so two deployments in one account share the rules."""
    return queue_name[:TARGET_ID_MAX]


def policy_statement(queue_arn: Any, rule_arns: list[Any]) -> dict[str, Any]:
    """The queue policy's statement letting our rules (and no other) send to the queue.
    The ARNs may be strings or CloudFormation's Fn::GetAtt."""
    return {
        "Sid": POLICY_SID,
        "Effect": "Allow",
        "Principal": {"Service": EVENTS_PRINCIPAL},
        "Action": "sqs:SendMessage",
        "Resource": queue_arn,
        "Condition": {"ArnEquals": {"aws:SourceArn": rule_arns}},
    }


# ---------------------------------------------------------------------- the template


def template(settings: Settings) -> dict[str, Any]:
    """The CloudFormation template of what `spotguard setup` makes for `settings`, plus the daemon's
    role and instance profile and, with [sources.sqs], the agent's. SetupError or iam.IamError when
    the config names what cannot be made or granted."""
    base = _base_name(settings)
    resources: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    if settings.ha is not None:
        resources["Table"] = {"Type": "AWS::DynamoDB::Table", "Properties": table_spec(settings.ha.table), **KEPT}
        outputs["Table"] = {"Description": "the [ha] table", "Value": {"Ref": "Table"}}
    if settings.sqs is not None:
        resources.update(_detection(settings, queue_ref(settings.sqs, settings.aws.region)))
        outputs["QueueUrl"] = {"Description": "[sources.sqs] queue_url", "Value": {"Ref": "Queue"}}
    resources.update(_role("Daemon", f"{base}-daemon", iam.daemon_policy(settings)))
    outputs["DaemonInstanceProfile"] = {"Description": "the controller's instance profile",
                                        "Value": {"Ref": "DaemonInstanceProfile"}}
    if settings.sqs is not None:
        resources.update(_role("Agent", f"{base}-agent", iam.agent_policy(settings)))
        outputs["AgentInstanceProfile"] = {"Description": "the spot hosts' instance profile (spotguard agent)",
                                           "Value": {"Ref": "AgentInstanceProfile"}}
    return {
        "AWSTemplateFormatVersion": FORMAT_VERSION,
        # The policies name the config's region and account (iam.py): the stack belongs there.
        "Description": f"spotguard setup --cloudformation, for {settings.aws.region}: what setup makes, and roles",
        "Resources": resources,
        "Outputs": outputs,
    }


def _detection(settings: Settings, ref: QueueRef) -> dict[str, Any]:
    """The queue, one rule per kind of event with the queue as its target, and the queue policy."""
    queue_arn = {"Fn::GetAtt": ["Queue", "Arn"]}
    # CloudFormation's queue properties are integers; the SQS API's attributes strings.
    attributes = {key: int(value) for key, value in NEW_QUEUE_ATTRIBUTES.items()}
    resources: dict[str, Any] = {
        "Queue": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": ref.name, **attributes}, **KEPT},
    }
    target = {"Id": target_id(ref.name), "Arn": queue_arn}
    for name, pattern in rules(settings).items():
        resources[_logical_id(name)] = {"Type": "AWS::Events::Rule", "Properties": {
            "Name": name, "Description": rule_description(pattern), "EventPattern": pattern,
            "State": "ENABLED", "Targets": [target],
        }}
    rule_arns = [{"Fn::GetAtt": [_logical_id(name), "Arn"]} for name in rules(settings)]
    document = {"Version": iam.VERSION, "Id": {"Fn::Sub": POLICY_ID.format(queue_arn="${Queue.Arn}")},
                "Statement": [policy_statement(queue_arn, rule_arns)]}
    resources["QueuePolicy"] = {"Type": "AWS::SQS::QueuePolicy",
                                "Properties": {"Queues": [{"Ref": "Queue"}], "PolicyDocument": document}}
    return resources


def _role(who: str, name: str, policy: dict[str, Any]) -> dict[str, Any]:
    """A role EC2 instances assume, with `policy` inline, and its instance profile of the same name."""
    return {
        f"{who}Role": {"Type": "AWS::IAM::Role", "Properties": {
            "RoleName": name, "AssumeRolePolicyDocument": iam.instance_trust_policy(),
            "Policies": [{"PolicyName": name, "PolicyDocument": policy}],
        }},
        f"{who}InstanceProfile": {"Type": "AWS::IAM::InstanceProfile", "Properties": {
            "InstanceProfileName": name, "Roles": [{"Ref": f"{who}Role"}],
        }},
    }


def _base_name(settings: Settings) -> str:
    """What the roles are named after: the queue, else the [ha] table, else spotguard; short enough
    for IAM's 64 characters once -daemon or -agent is added."""
    if settings.sqs is not None and settings.sqs.queue_name:
        base = settings.sqs.queue_name
    elif settings.ha is not None:
        base = settings.ha.table
    else:
        base = "spotguard"
    return base[: ROLE_NAME_MAX - len("-daemon")]


def _logical_id(rule_name: str) -> str:
    """spotguard-spot-interruption -> SpotguardSpotInterruption (logical ids are alphanumeric)."""
    return "".join(part.capitalize() for part in rule_name.split("-"))
