"""Least-privilege IAM policies for the daemon and the agent, derived from the settings.

`daemon_policy` is what the controller's role needs to run the daemon (and `check`
and `status`), `agent_policy` what a spot host's role needs, and `setup_policy`
what the person (or pipeline) running `spotguard setup` needs, once, and
`instance_trust_policy` who may assume the first two's roles; operators
read what each grants in docs/operations.md. This module must not talk to AWS: it only
reads the settings it is given.
"""

from __future__ import annotations

from typing import Any

from spotguard import ids
from spotguard.config import GuardSettings, Settings

VERSION = "2012-10-17"

# AWS cannot scope these to a resource (service authorization reference), so they
# go on "*"; the ones marked check are `check`'s, read-only.
DESCRIBE_ACTIONS = (
    "ec2:DescribeInstances",
    "ec2:DescribeSpotInstanceRequests",
    "ec2:DescribeInstanceStatus",  # check: scheduled events
    "elasticloadbalancing:DescribeTargetHealth",
    "elasticloadbalancing:DescribeTargetGroups",  # the readiness probe (its health check), check
    "elasticloadbalancing:DescribeTargetGroupAttributes",  # check
)
# On each guard's standbys only; check's EC2 DryRuns are authorized as these too.
INSTANCE_ACTIONS = ("ec2:StartInstances", "ec2:StopInstances")
# On the guards' target groups only.
TARGET_ACTIONS = ("elasticloadbalancing:RegisterTargets", "elasticloadbalancing:DeregisterTargets")
# On the queue only. DeleteMessageBatch, which the SQS source calls, is authorized as DeleteMessage.
QUEUE_READ_ACTIONS = ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes")  # the last: check
QUEUE_SEND_ACTIONS = ("sqs:SendMessage",)
# On the [ha] table only: read, acquire and renew the lease (GetItem, UpdateItem; status reads
# the lease with GetItem too), load the shared states (BatchGetItem), and the fenced state write,
# a TransactWriteItems that IAM authorizes as the item actions inside it (there is no
# dynamodb:TransactWriteItems action to grant).
TABLE_ACTIONS = (
    "dynamodb:GetItem",
    "dynamodb:UpdateItem",
    "dynamodb:BatchGetItem",
    "dynamodb:PutItem",
    "dynamodb:ConditionCheckItem",
    "dynamodb:DescribeTable",  # check
)

# What `spotguard setup` calls, once, to create the AWS side (not the daemon's business):
# the queue and its policy, the EventBridge rules (all named spotguard-…) and their
# targets, and with [ha] the table.
SETUP_QUEUE_ACTIONS = ("sqs:GetQueueUrl", "sqs:CreateQueue", "sqs:GetQueueAttributes", "sqs:SetQueueAttributes")
SETUP_RULE_ACTIONS = ("events:DescribeRule", "events:PutRule", "events:ListTargetsByRule", "events:PutTargets")
SETUP_TABLE_ACTIONS = ("dynamodb:DescribeTable", "dynamodb:CreateTable")


# Who may assume the daemon's and the agent's roles: EC2 instances, through an instance profile.
INSTANCE_PRINCIPAL = "ec2.amazonaws.com"


class IamError(Exception):
    """No policy can be written for these settings (exit 2)."""


def daemon_policy(settings: Settings) -> dict[str, Any]:
    """The IAM policy document the daemon needs for `settings`."""
    statements = [
        _statement("Describe", DESCRIBE_ACTIONS, "*"),
        _statement("StartStopStandbys", INSTANCE_ACTIONS, _standby_arns(settings)),
        _statement("RegisterTargets", TARGET_ACTIONS, _unique(g.target_group_arn for g in settings.guards)),
    ]
    if settings.sqs is not None:
        statements.append(_statement("ReadQueue", QUEUE_READ_ACTIONS, queue_arn(settings)))
    if settings.ha is not None:
        statements.append(_statement("LeaseTable", TABLE_ACTIONS, table_arn(settings)))
    return {"Version": VERSION, "Statement": statements}


def agent_policy(settings: Settings) -> dict[str, Any]:
    """The IAM policy document `spotguard agent` needs; IamError without [sources.sqs]."""
    if settings.sqs is None:
        raise IamError("the agent sends to the [sources.sqs] queue, and this config has none")
    return {"Version": VERSION, "Statement": [_statement("SendToQueue", QUEUE_SEND_ACTIONS, queue_arn(settings))]}


def setup_policy(settings: Settings) -> dict[str, Any]:
    """What `spotguard setup` needs for `settings`; IamError when it would create nothing."""
    if settings.sqs is None and settings.ha is None:
        raise IamError("setup creates the [sources.sqs] queue and the [ha] table, and this config has neither")
    statements = []
    if settings.sqs is not None:
        statements.append(_statement("CreateQueue", SETUP_QUEUE_ACTIONS, queue_arn(settings)))
        statements.append(_statement("CreateRules", SETUP_RULE_ACTIONS, rule_arns(settings)))
    if settings.ha is not None:
        statements.append(_statement("CreateTable", SETUP_TABLE_ACTIONS, table_arn(settings)))
    return {"Version": VERSION, "Statement": statements}


def instance_trust_policy() -> dict[str, Any]:
    """The trust policy of a role an EC2 instance assumes (the controller's, a spot host's)."""
    statement = {"Effect": "Allow", "Principal": {"Service": INSTANCE_PRINCIPAL}, "Action": "sts:AssumeRole"}
    return {"Version": VERSION, "Statement": [statement]}


def rule_arns(settings: Settings) -> str:
    """`arn:<partition>:events:<aws.region>:<account>:rule/spotguard-*`: the default bus's spotguard rules."""
    account = _one_account(settings, "the EventBridge rules have no account of their own")
    partition = _arn_part(settings.guards[0], "partition")
    return f"arn:{partition}:events:{settings.aws.region}:{account}:rule/{ids.RULE_PREFIX}*"


def queue_arn(settings: Settings) -> str:
    """`arn:<partition>:sqs:<aws.region>:<account>:<name>` for the configured queue URL."""
    if settings.sqs is None:
        raise IamError("no [sources.sqs] queue in this config")
    url, name, account = settings.sqs.queue_url, settings.sqs.queue_name, settings.sqs.account
    if name is None or not ids.QUEUE_NAME.fullmatch(name):
        raise IamError(f"sources.sqs.queue_url: {url!r} does not end in a queue name")
    if account is None:
        account = _one_account(settings, f"sources.sqs.queue_url: {url!r} names no account")
    partition = _arn_part(settings.guards[0], "partition")
    return f"arn:{partition}:sqs:{settings.aws.region}:{account}:{name}"


def table_arn(settings: Settings) -> str:
    """`arn:<partition>:dynamodb:<aws.region>:<account>:table/<name>` for the [ha] table."""
    if settings.ha is None:
        raise IamError("no [ha] table in this config")
    account = _one_account(settings, f"ha.table: {settings.ha.table!r} has no account of its own")
    partition = _arn_part(settings.guards[0], "partition")
    return f"arn:{partition}:dynamodb:{settings.aws.region}:{account}:table/{settings.ha.table}"


def _one_account(settings: Settings, what: str) -> str:
    accounts = _unique(_arn_part(g, "account") for g in settings.guards)
    if len(accounts) != 1:
        raise IamError(f"{what}, and the target groups name several")
    return accounts[0]


def _standby_arns(settings: Settings) -> list[str]:
    # A guard's standbys are registered in its target group, so they live in that group's account.
    return _unique(
        f"arn:{_arn_part(g, 'partition')}:ec2:{settings.aws.region}:{_arn_part(g, 'account')}:instance/{iid}"
        for g in settings.guards
        for iid in g.standby_instance_ids
    )


def _arn_part(guard: GuardSettings, part: str) -> str:
    match = ids.TARGET_GROUP_ARN.fullmatch(guard.target_group_arn)
    if match is None:  # config.py already refuses such an ARN; a hand-built Settings may not
        raise IamError(f"guard {guard.name}: {guard.target_group_arn!r} is not a target group ARN")
    return match[part]


def _statement(sid: str, actions: tuple[str, ...], resources: str | list[str]) -> dict[str, Any]:
    return {"Sid": sid, "Effect": "Allow", "Action": list(actions), "Resource": resources}


def _unique(items: Any) -> list[str]:
    return list(dict.fromkeys(items))

