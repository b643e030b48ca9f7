"""`spotguard setup`: create, idempotently, the AWS side of the SQS detection path and of [ha].

With [ha] the DynamoDB table; with [sources.sqs] the queue, one EventBridge rule
per kind of event the SQS source reads (eventbridge.PATTERNS, and the Auto
Scaling one when a guard finds its spots by tags), the queue policy statement
and the rules' targets, each printed
as created, exists or updated (docs/operations.md § 4); what each must be is
spotguard/cloudformation.py's. `--cloudformation` prints the same, and the
roles, as a template instead, and calls no AWS API. This module must not
touch the daemon's state, guards or any AWS API beyond SQS, EventBridge and
DynamoDB's table calls, and never deletes anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import AsyncExitStack
from typing import Any, TextIO

from botocore.exceptions import ClientError

from spotguard.aws import AWS_ERRORS, INTERACTIVE_RETRIES, client, error_code
from spotguard.cloudformation import (
    NEW_QUEUE_ATTRIBUTES,
    POLICY_ID,
    POLICY_SID,
    QueueRef,
    SetupError,
    policy_statement,
    queue_ref,
    rule_description,
    rules,
    target_id,
    template,
)
from spotguard.commands.common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, add_config_argument, load_or_report, run_aws
from spotguard.config import Settings
from spotguard.ha import table_spec
from spotguard.iam import VERSION, IamError

MISSING_QUEUE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})


def partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def merge_policy(existing: str | None, statement: dict[str, Any], queue_arn: str) -> dict[str, Any]:
    """The policy with our statement added or replaced (by Sid); every other statement kept."""
    policy = json.loads(existing) if existing else {"Version": VERSION, "Id": POLICY_ID.format(queue_arn=queue_arn)}
    statements = policy.get("Statement", [])
    if isinstance(statements, dict):  # IAM allows a lone statement object
        statements = [statements]
    others = [s for s in statements if not (isinstance(s, dict) and s.get("Sid") == POLICY_SID)]
    return {**policy, "Statement": [*others, statement]}


def our_statement(existing: str | None) -> dict[str, Any] | None:
    if not existing:
        return None
    statements = json.loads(existing).get("Statement", [])
    if isinstance(statements, dict):
        statements = [statements]
    return next((s for s in statements if isinstance(s, dict) and s.get("Sid") == POLICY_SID), None)


def normal(value: Any) -> Any:
    """A policy value in a canonical form: AWS may hand back a one-item list as a
    bare string and reorder lists, neither of which changes the meaning."""
    if isinstance(value, dict):
        return {k: normal(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [normal(v) for v in value]
        if len(items) == 1:
            return items[0]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    return value


# ---------------------------------------------------------------------- the steps


class _Report:
    def __init__(self, out: TextIO, dry_run: bool):
        self.out = out
        self.dry_run = dry_run

    def line(self, thing: str, status: str) -> None:
        if self.dry_run and status in ("created", "updated"):
            status = "would " + status[:-1]  # created -> would create, updated -> would update
        print(f"{thing}: {status}", file=self.out, flush=True)


async def setup(
    settings: Settings,
    sqs: Any,
    events: Any,
    *,
    dry_run: bool,
    out: TextIO | None = None,
    err: TextIO | None = None,
    dynamodb: Any = None,
) -> int:
    """Create or converge the [ha] table, then the queue, rules, policy statement and targets.

    Returns an exit code. `dynamodb` is needed only with [ha]. `out` (the lines)
    and `err` (problems) default to sys.stdout/sys.stderr as they are at call
    time, so a redirected or captured stream is honoured.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if settings.sqs is None and settings.ha is None:
        print("setup needs [sources.sqs] queue_url (the queue to create) or [ha] table in the config", file=err)
        return EXIT_CONFIG
    region = settings.aws.region
    try:
        ref = queue_ref(settings.sqs, region) if settings.sqs is not None else None
    except SetupError as exc:
        print(exc, file=err)
        return EXIT_CONFIG
    report = _Report(out, dry_run)
    try:
        if settings.ha is not None:
            await _table(dynamodb, settings.ha.table, report)
        if ref is None:
            return EXIT_OK
        queue_url, queue_arn, policy = await _queue(sqs, ref, region, report)
        wanted = rules(settings)
        rule_arns = [await _rule(events, name, pattern, ref, region, report) for name, pattern in wanted.items()]
        await _policy(sqs, queue_url, queue_arn, policy, rule_arns, report)
        for name in wanted:
            await _target(events, name, ref.name, queue_arn, report)
    except AWS_ERRORS as exc:
        message = exc.response["Error"].get("Message", "") if isinstance(exc, ClientError) else str(exc)
        print(f"setup failed: {error_code(exc)}: {message}", file=err)
        return EXIT_FAILED
    except SetupError as exc:
        print(f"setup failed: {exc}", file=err)
        return EXIT_FAILED
    if ref.account and f"/{ref.account}/" not in queue_url + "/" and not dry_run:
        print(f"note: the queue is {queue_url}, but sources.sqs.queue_url says {ref.url}", file=err)
    return EXIT_OK


async def _table(dynamodb: Any, table: str, report: _Report) -> None:
    """The [ha] table: created on-demand unless it exists; SetupError if it exists with another key."""
    thing = f"table {table}"
    spec = table_spec(table)
    try:
        current = (await dynamodb.describe_table(TableName=table))["Table"]
    except ClientError as exc:
        if error_code(exc) != "ResourceNotFoundException":
            raise
    else:
        if current.get("KeySchema") != spec["KeySchema"]:
            key = ", ".join(f"{k['AttributeName']} ({k['KeyType']})" for k in current.get("KeySchema", []))
            raise SetupError(f"table {table} exists with key {key}; spotguard needs pk (HASH, string) alone")
        report.line(thing, "exists")
        return
    report.line(thing, "created")
    if report.dry_run:
        return
    await dynamodb.create_table(**spec)
    # A new table takes a few seconds to become ACTIVE on AWS; the daemon needs it so.
    waiter = dynamodb.get_waiter("table_exists")
    await waiter.wait(TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})


async def _queue(sqs: Any, ref: QueueRef, region: str, report: _Report) -> tuple[str, str, str | None]:
    """(url, arn, policy) of the queue, created unless it exists (or it is a dry run)."""
    thing = f"queue {ref.name}"
    try:
        url = (await sqs.get_queue_url(QueueName=ref.name))["QueueUrl"]
    except ClientError as exc:
        if error_code(exc) not in MISSING_QUEUE:
            raise
    else:
        attributes = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn", "Policy"]))["Attributes"]
        report.line(thing, "exists")
        return url, attributes["QueueArn"], attributes.get("Policy")
    report.line(thing, "created")
    if report.dry_run:
        # Nothing to describe yet: the ARN a new queue would get, from the URL's account.
        arn = f"arn:{partition(region)}:sqs:{region}:{ref.account or '<account>'}:{ref.name}"
        return ref.url, arn, None
    url = (await sqs.create_queue(QueueName=ref.name, Attributes=NEW_QUEUE_ATTRIBUTES))["QueueUrl"]
    attributes = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]))["Attributes"]
    return url, attributes["QueueArn"], None


async def _rule(events: Any, name: str, pattern: dict[str, Any], ref: QueueRef, region: str,
                report: _Report) -> str:
    """The rule's ARN, after putting it if it is missing or drifted."""
    thing = f"rule {name}"
    try:
        current = await events.describe_rule(Name=name)
    except ClientError as exc:
        if error_code(exc) != "ResourceNotFoundException":
            raise
        current = None
    if current is not None:
        same = json.loads(current.get("EventPattern") or "null") == pattern and current.get("State") == "ENABLED"
        if same:
            report.line(thing, "exists")
            return current["Arn"]
        report.line(thing, "updated")
    else:
        report.line(thing, "created")
    if report.dry_run:
        if current is not None:
            return current["Arn"]
        return f"arn:{partition(region)}:events:{region}:{ref.account or '<account>'}:rule/{name}"
    put = await events.put_rule(
        Name=name,
        EventPattern=json.dumps(pattern),
        State="ENABLED",
        Description=rule_description(pattern),
    )
    return put["RuleArn"]


async def _policy(
    sqs: Any, queue_url: str, queue_arn: str, policy: str | None, rule_arns: list[str], report: _Report
) -> None:
    thing = f"queue policy statement {POLICY_SID}"
    wanted = policy_statement(queue_arn, sorted(rule_arns))
    current = our_statement(policy)
    if current is not None and normal(current) == normal(wanted):
        report.line(thing, "exists")
        return
    report.line(thing, "created" if current is None else "updated")
    if not report.dry_run:
        merged = merge_policy(policy, wanted, queue_arn)
        await sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"Policy": json.dumps(merged)})


async def _target(events: Any, rule: str, queue_name: str, queue_arn: str, report: _Report) -> None:
    wanted = {"Id": target_id(queue_name), "Arn": queue_arn}
    thing = f"target {rule} -> {queue_name}"
    try:
        targets = (await events.list_targets_by_rule(Rule=rule))["Targets"]
    except ClientError as exc:
        # Only in a dry run can the rule be missing here.
        if not (report.dry_run and error_code(exc) == "ResourceNotFoundException"):
            raise
        targets = []
    current = next((t for t in targets if t.get("Id") == wanted["Id"]), None)
    # Any Input/InputPath/InputTransformer would change the body the SQS source parses.
    if current == wanted:
        report.line(thing, "exists")
        return
    report.line(thing, "created" if current is None else "updated")
    if not report.dry_run:
        put = await events.put_targets(Rule=rule, Targets=[wanted])
        if put.get("FailedEntryCount"):
            failed = put["FailedEntries"][0]
            code = failed.get("ErrorCode", "PutTargetsFailed")
            raise ClientError({"Error": {"Code": code, "Message": failed.get("ErrorMessage", "")}}, "PutTargets")


# ---------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--dry-run", action="store_true", help="say what would be created or updated; change nothing")
    how.add_argument("--cloudformation", action="store_true",
                     help="print a CloudFormation template (JSON) of the same, with the daemon's and the agent's "
                          "roles; call no AWS API")


def run(args: argparse.Namespace) -> int:
    """`spotguard setup --config PATH [--dry-run | --cloudformation]`: exit 0 done, 1 AWS said no, 2 bad config."""
    settings = load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    if getattr(args, "cloudformation", False):
        return print_template(settings)
    return run_aws("setup", _run(settings, dry_run=args.dry_run))


def print_template(settings: Settings) -> int:
    """The template as JSON on stdout: JSON because CloudFormation reads it as it reads YAML, it needs
    no dependency, and json.dumps quotes every pattern string right. Exit 2 if none can be made."""
    try:
        made = template(settings)
    except (SetupError, IamError) as exc:
        print(f"spotguard setup: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(made, indent=2))
    return EXIT_OK


async def _run(settings: Settings, *, dry_run: bool) -> int:
    region, endpoint = settings.aws.region, settings.aws.endpoint_url
    async with AsyncExitStack() as stack:

        async def made(service: str) -> Any:
            return await stack.enter_async_context(client(service, region, endpoint, max_attempts=INTERACTIVE_RETRIES))

        sqs, events = await made("sqs"), await made("events")
        dynamodb = await made("dynamodb") if settings.ha is not None else None  # no DynamoDB client without [ha]
        return await setup(settings, sqs, events, dry_run=dry_run, dynamodb=dynamodb)
