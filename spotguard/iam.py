"""Least-privilege IAM policies for the daemon and the agent, derived from the config.

`daemon_policy(settings)` is what the instance profile (or user) running
`spotguard run` needs, and nothing more:

* the Describe calls of the poll, on Resource "*" because AWS cannot scope
  them: ec2:DescribeInstances, ec2:DescribeSpotInstanceRequests and
  elasticloadbalancing:DescribeTargetHealth support no resource-level
  permissions (service authorization reference); and, for `spotguard check`
  run on the controller with its role, elasticloadbalancing:DescribeTargetGroups
  and DescribeTargetGroupAttributes, unscoped for the same reason (read-only);
* ec2:StartInstances / ec2:StopInstances on each guard's standbys only;
* elasticloadbalancing:RegisterTargets / DeregisterTargets on the guards'
  target groups only;
* with `[sources.sqs]`: sqs:ReceiveMessage and sqs:DeleteMessage on the queue
  (DeleteMessageBatch, which the source calls, is authorized as DeleteMessage),
  and sqs:GetQueueAttributes, which only `check` calls (does the queue exist);
* with `[ha]`: on the table only, dynamodb:GetItem and UpdateItem (read,
  acquire and renew the lease), BatchGetItem (load the guards' shared
  states), PutItem and ConditionCheckItem (the fenced state write: a
  TransactWriteItems call is authorized as the actions inside it, and
  there is no dynamodb:TransactWriteItems action to grant), and
  dynamodb:DescribeTable, which only `check` calls (the table's key). The
  table's account is the target groups' (one account, as for a queue URL
  without one).

`check`'s sts:GetCallerIdentity needs no permission (AWS allows it to anyone)
and its ec2 DryRuns are authorized as StartInstances/StopInstances on the
standbys, which the daemon has anyway; `status` with [ha] reads the lease with
GetItem. So the daemon's role can run `check` and `status` too.

`agent_policy(settings)` is sqs:SendMessage on the queue, for the spot
instance's role. Partition and account come from the target group ARNs (which
config.py validates); the queue's account from its URL.

A standby whose EBS volumes are encrypted with a customer-managed KMS key also
needs kms:CreateGrant on that key to start; the config does not name the key,
so that statement is the operator's to add.

This module must not talk to AWS: it only reads the settings it is given.
`main(args)` is the `spotguard iam-policy` entry (cli.py wires it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from spotguard.config import GuardSettings, Settings

EXIT_CONFIG = 2
VERSION = "2012-10-17"

DESCRIBE_ACTIONS = (
    "ec2:DescribeInstances",
    "ec2:DescribeSpotInstanceRequests",
    "elasticloadbalancing:DescribeTargetHealth",
    "elasticloadbalancing:DescribeTargetGroups",  # check
    "elasticloadbalancing:DescribeTargetGroupAttributes",  # check
)
INSTANCE_ACTIONS = ("ec2:StartInstances", "ec2:StopInstances")
TARGET_ACTIONS = ("elasticloadbalancing:RegisterTargets", "elasticloadbalancing:DeregisterTargets")
QUEUE_READ_ACTIONS = ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes")  # the last: check
QUEUE_SEND_ACTIONS = ("sqs:SendMessage",)
TABLE_ACTIONS = (
    "dynamodb:GetItem",
    "dynamodb:UpdateItem",
    "dynamodb:BatchGetItem",
    "dynamodb:PutItem",
    "dynamodb:ConditionCheckItem",
    "dynamodb:DescribeTable",  # check
)

_TG_ARN = re.compile(r"arn:(?P<partition>aws[-a-z]*):elasticloadbalancing:(?P<region>[^:]+):(?P<account>\d{12}):.+")
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}(?:\.fifo)?")


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


def queue_arn(settings: Settings) -> str:
    """`arn:<partition>:sqs:<aws.region>:<account>:<name>` for the configured queue URL."""
    if settings.sqs is None:
        raise IamError("no [sources.sqs] queue in this config")
    url, name, account = settings.sqs.queue_url, settings.sqs.queue_name, settings.sqs.account
    if name is None or not _QUEUE_NAME.fullmatch(name):
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
    match = _TG_ARN.fullmatch(guard.target_group_arn)
    if match is None:  # config.py already refuses such an ARN; a hand-built Settings may not
        raise IamError(f"guard {guard.name}: {guard.target_group_arn!r} is not a target group ARN")
    return match[part]


def _statement(sid: str, actions: tuple[str, ...], resources: str | list[str]) -> dict[str, Any]:
    return {"Sid": sid, "Effect": "Allow", "Action": list(actions), "Resource": resources}


def _unique(items: Any) -> list[str]:
    return list(dict.fromkeys(items))


def main(args: argparse.Namespace) -> int:
    """`spotguard iam-policy --config PATH [--agent]`: the policy as JSON on stdout; exit 2 on a bad config."""
    from spotguard.cli import _load_or_report  # lazily: cli imports this module lazily too

    settings = _load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    try:
        policy = agent_policy(settings) if args.agent else daemon_policy(settings)
    except IamError as exc:
        print(f"spotguard iam-policy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(policy, indent=2))
    return 0
