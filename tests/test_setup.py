"""`spotguard setup` against moto's SQS and EventBridge in server mode.

setup runs with spotguard's own aiobotocore clients; the tests inspect the
account with plain boto3. "Changed nothing" is checked by comparing everything
the account describes (queue attributes including LastModifiedTimestamp, rules,
targets) before and after. moto does not enforce queue policies on delivery, so
the policy is checked as a document; the end-to-end test proves the rule ->
target -> queue wiring with events.put_events.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import replace
from typing import Any

import pytest
from configs import write_config

from spotguard.aws import client
from spotguard.cloudformation import POLICY_SID, RULES
from spotguard.commands.setup import run, setup
from spotguard.config import AwsSettings, Settings, SqsSettings
from spotguard.sources.eventbridge import INTERRUPTION, Health, Parsed, parse

QUEUE = "spotguard"
INSTANCE = "i-0123456789abcdef0"
# The guard in the config files setup reads: setup never looks at it, but a valid config has one.
GUARD = {
    "name": "inference",
    "target_group_arn": "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/inference/0123456789abcdef",
    "spot_request_ids": ["sir-8x4kq2bn"],
    "standby_instance_ids": ["i-0123456789abcdef1"],
}


def queue_url(world: Any, queue: str = QUEUE) -> str:
    return f"{world.endpoint_url}/123456789012/{queue}"


def settings_for(world: Any, queue: str = QUEUE) -> Settings:
    return Settings(
        aws=AwsSettings(region=world.region, endpoint_url=world.endpoint_url),
        sqs=SqsSettings(queue_url=queue_url(world, queue)),
    )


async def run_setup(
    world: Any, session: Any, settings: Settings, *, dry_run: bool = False
) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    async with client("sqs", world.region, world.endpoint_url, session=session) as sqs, client(
        "events", world.region, world.endpoint_url, session=session
    ) as events:
        code = await setup(settings, sqs, events, dry_run=dry_run, out=out, err=err)
    return code, out.getvalue().splitlines(), err.getvalue()


def statuses(lines: list[str]) -> set[str]:
    return {line.rsplit(": ", 1)[1] for line in lines}


def snapshot(world: Any) -> dict[str, Any]:
    """Everything setup could have touched, as the account describes it."""
    sqs, events = world.boto("sqs"), world.boto("events")
    queues = {}
    for url in sqs.list_queues().get("QueueUrls", []):
        queues[url] = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    rules = {}
    for rule in events.list_rules()["Rules"]:
        described = events.describe_rule(Name=rule["Name"])
        described.pop("ResponseMetadata")
        rules[rule["Name"]] = (described, events.list_targets_by_rule(Rule=rule["Name"])["Targets"])
    return {"queues": queues, "rules": rules}


def queue_policy(world: Any, queue: str = QUEUE) -> dict[str, Any]:
    sqs = world.boto("sqs")
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    return json.loads(sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])["Attributes"]["Policy"])


async def test_fresh_account_gets_everything_created(moto_world, aio_session):
    code, lines, err = await run_setup(moto_world, aio_session, settings_for(moto_world))

    assert (code, err) == (0, "")
    assert lines == [
        f"queue {QUEUE}: created",
        *(f"rule {name}: created" for name in RULES),
        f"queue policy statement {POLICY_SID}: created",
        *(f"target {name} -> {QUEUE}: created" for name in RULES),
    ]
    sqs, events = moto_world.boto("sqs"), moto_world.boto("events")
    url = sqs.get_queue_url(QueueName=QUEUE)["QueueUrl"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert (attributes["MessageRetentionPeriod"], attributes["VisibilityTimeout"]) == ("3600", "30")
    rule_arns = []
    for name, pattern in RULES.items():
        rule = events.describe_rule(Name=name)
        assert json.loads(rule["EventPattern"]) == pattern
        assert (rule["State"], rule.get("EventBusName", "default")) == ("ENABLED", "default")
        targets = events.list_targets_by_rule(Rule=name)["Targets"]
        assert targets == [{"Id": QUEUE, "Arn": attributes["QueueArn"]}]
        rule_arns.append(rule["Arn"])
    (statement,) = queue_policy(moto_world)["Statement"]
    assert statement == {
        "Sid": POLICY_SID,
        "Effect": "Allow",
        "Principal": {"Service": "events.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": attributes["QueueArn"],
        "Condition": {"ArnEquals": {"aws:SourceArn": sorted(rule_arns)}},
    }


async def test_second_run_finds_everything_and_changes_nothing(moto_world, aio_session):
    settings = settings_for(moto_world)
    await run_setup(moto_world, aio_session, settings)
    before = snapshot(moto_world)

    code, lines, err = await run_setup(moto_world, aio_session, settings)

    assert (code, err) == (0, "")
    assert len(lines) == 1 + 2 * len(RULES) + 1
    assert statuses(lines) == {"exists"}
    assert snapshot(moto_world) == before


async def test_dry_run_on_a_fresh_account_says_what_it_would_create_and_creates_nothing(moto_world, aio_session):
    before = snapshot(moto_world)

    code, lines, err = await run_setup(moto_world, aio_session, settings_for(moto_world), dry_run=True)

    assert (code, err) == (0, "")
    assert len(lines) == 1 + 2 * len(RULES) + 1
    assert statuses(lines) == {"would create"}
    assert snapshot(moto_world) == before == {"queues": {}, "rules": {}}


async def test_dry_run_after_setup_says_exists(moto_world, aio_session):
    settings = settings_for(moto_world)
    await run_setup(moto_world, aio_session, settings)
    before = snapshot(moto_world)

    code, lines, _ = await run_setup(moto_world, aio_session, settings, dry_run=True)

    assert code == 0 and statuses(lines) == {"exists"}
    assert snapshot(moto_world) == before


async def test_existing_queue_keeps_its_attributes_and_unrelated_policy_statement(moto_world, aio_session):
    sqs = moto_world.boto("sqs")
    url = sqs.create_queue(QueueName=QUEUE, Attributes={"VisibilityTimeout": "120"})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    theirs = {
        "Sid": "their-sns",
        "Effect": "Allow",
        "Principal": {"Service": "sns.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": arn,
    }
    sqs.set_queue_attributes(
        QueueUrl=url,
        Attributes={"Policy": json.dumps({"Version": "2012-10-17", "Id": "theirs", "Statement": [theirs]})},
    )

    code, lines, _ = await run_setup(moto_world, aio_session, settings_for(moto_world))

    assert code == 0
    assert lines[0] == f"queue {QUEUE}: exists"
    assert f"queue policy statement {POLICY_SID}: created" in lines
    policy = queue_policy(moto_world)
    assert policy["Id"] == "theirs"
    assert [s["Sid"] for s in policy["Statement"]] == ["their-sns", POLICY_SID]
    assert policy["Statement"][0] == theirs
    assert sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout"])["Attributes"] == {
        "VisibilityTimeout": "120"
    }


async def test_drifted_rule_target_and_statement_are_updated_and_others_kept(moto_world, aio_session):
    settings = settings_for(moto_world)
    await run_setup(moto_world, aio_session, settings)
    events, sqs = moto_world.boto("events"), moto_world.boto("sqs")
    drifted_rule, drifted_target = list(RULES)[0], list(RULES)[1]
    events.put_rule(Name=drifted_rule, EventPattern=json.dumps({"source": ["aws.ec2"]}), State="DISABLED")
    events.put_targets(Rule=drifted_target, Targets=[{"Id": QUEUE, "Arn": "arn:aws:sqs:us-east-1:123456789012:other"}])
    someone_else = {"Id": "someone-else", "Arn": "arn:aws:sqs:us-east-1:123456789012:x"}
    events.put_targets(Rule=drifted_target, Targets=[someone_else])
    url = sqs.get_queue_url(QueueName=QUEUE)["QueueUrl"]
    policy = queue_policy(moto_world)
    policy["Statement"][0]["Condition"]["ArnEquals"]["aws:SourceArn"] = ["arn:aws:events:us-east-1:123456789012:rule/x"]
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)})

    code, lines, _ = await run_setup(moto_world, aio_session, settings)

    assert code == 0
    assert [line for line in lines if not line.endswith(": exists")] == [
        f"rule {drifted_rule}: updated",
        f"queue policy statement {POLICY_SID}: updated",
        f"target {drifted_target} -> {QUEUE}: updated",
    ]
    assert [t["Id"] for t in events.list_targets_by_rule(Rule=drifted_target)["Targets"]] == [QUEUE, "someone-else"]
    _, again, _ = await run_setup(moto_world, aio_session, settings)
    assert statuses(again) == {"exists"}


def delivered(world: Any, *entries: dict[str, Any]) -> list[str]:
    """PutEvents `entries` on the default bus; the bodies that reach the queue through setup's rules."""
    events, sqs = world.boto("events"), world.boto("sqs")
    put = events.put_events(Entries=[{**e, "Detail": json.dumps(e["Detail"])} for e in entries])
    assert put["FailedEntryCount"] == 0
    url = sqs.get_queue_url(QueueName=QUEUE)["QueueUrl"]
    bodies: list[str] = []
    deadline = time.monotonic() + 5
    while not bodies and time.monotonic() < deadline:
        received = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        bodies = [m["Body"] for m in received.get("Messages", [])]
    # moto delivers a PutEvents batch at once: anything else is in the queue by now.
    more = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
    return bodies + [m["Body"] for m in more]


async def test_put_events_reaches_the_queue_and_the_sqs_source_parses_it(moto_world, aio_session):
    # moto accepts a custom PutEvents with source aws.ec2 (real AWS refuses "aws."
    # sources from PutEvents) and delivers it through the rule's SQS target; it does
    # not evaluate the queue policy, so this proves the rule -> target -> queue wiring.
    await run_setup(moto_world, aio_session, settings_for(moto_world))
    detail = {"instance-id": INSTANCE, "instance-action": "terminate"}
    bodies = delivered(
        moto_world,
        {"Source": "aws.ec2", "DetailType": INTERRUPTION, "Detail": detail,
         "Resources": [f"arn:aws:ec2:us-east-1:123456789012:instance/{INSTANCE}"]},
        # A near-miss must not match: another source, same detail-type.
        {"Source": "custom.app", "DetailType": INTERRUPTION, "Detail": detail},
    )
    (body,) = bodies
    parsed = parse(body)
    assert isinstance(parsed, Parsed) and (parsed.source, parsed.instance_id, parsed.kind) == (
        "aws.ec2", INSTANCE, "interruption")


async def test_the_health_rule_delivers_ec2_scheduled_changes_only(moto_world, aio_session):
    await run_setup(moto_world, aio_session, settings_for(moto_world))
    detail = {"eventArn": "arn:aws:health:us-east-1::event/EC2/AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED/x",
              "service": "EC2", "eventTypeCode": "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED",
              "eventTypeCategory": "scheduledChange", "statusCode": "upcoming",
              "startTime": "Thu, 10 Dec 2026 08:00:00 GMT", "endTime": "Thu, 10 Dec 2026 10:00:00 GMT",
              "affectedEntities": [{"entityValue": INSTANCE}]}
    bodies = delivered(
        moto_world,
        {"Source": "aws.health", "DetailType": "AWS Health Event", "Detail": detail, "Resources": [INSTANCE]},
        # Health's other news does not reach the queue: an open issue, another service.
        {"Source": "aws.health", "DetailType": "AWS Health Event", "Detail": {**detail, "eventTypeCategory": "issue"}},
        {"Source": "aws.health", "DetailType": "AWS Health Event", "Detail": {**detail, "service": "RDS"}},
    )
    (body,) = bodies
    parsed = parse(body)
    assert isinstance(parsed, Health)
    assert (parsed.instance_ids, parsed.code, parsed.window) == (
        (INSTANCE,), "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED", "2026-12-10 08:00 UTC to 2026-12-10 10:00 UTC")


async def test_spots_found_by_tags_get_the_auto_scaling_rule_too(moto_world, aio_session):
    from spotguard.config import GuardSettings

    tagged = GuardSettings(name="web", target_group_arn=GUARD["target_group_arn"],
                           spot_instance_tags=(("fleet", "web"),), standby_instance_ids=("i-0123456789abcdef1",))
    settings = replace(settings_for(moto_world), guards=(tagged,))
    code, lines, _ = await run_setup(moto_world, aio_session, settings)
    assert code == 0 and "rule spotguard-autoscaling-lifecycle: created" in lines
    assert "rule spotguard-autoscaling-lifecycle: created" not in (
        await run_setup(moto_world, aio_session, settings_for(moto_world, "other")))[1]
    detail = {"LifecycleActionToken": "87654321-4321-4321-4321-210987654321", "AutoScalingGroupName": "web",
              "LifecycleHookName": "drain", "EC2InstanceId": INSTANCE,
              "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING", "Origin": "AutoScalingGroup",
              "Destination": "EC2"}
    (body,) = delivered(moto_world, {"Source": "aws.autoscaling", "Detail": detail,
                                     "DetailType": "EC2 Instance-terminate Lifecycle Action"})
    parsed = parse(body)
    assert isinstance(parsed, Parsed) and (parsed.instance_id, parsed.kind) == (INSTANCE, "terminating")


async def test_without_sources_sqs_it_says_so_and_exits_2(moto_world, aio_session):
    settings = Settings(aws=AwsSettings(region=moto_world.region, endpoint_url=moto_world.endpoint_url))

    code, lines, err = await run_setup(moto_world, aio_session, settings)

    assert (code, lines) == (2, [])
    assert "[sources.sqs]" in err
    assert snapshot(moto_world) == {"queues": {}, "rules": {}}


@pytest.mark.parametrize(
    "url, problem",
    [
        ("https://sqs.us-east-1.amazonaws.com/", "has no queue name"),
        ("https://sqs.us-east-1.amazonaws.com/123456789012/q.fifo", "FIFO"),
        ("https://sqs.us-east-1.amazonaws.com/123456789012/bad%20name", "not a valid queue name"),
        ("https://sqs.eu-west-1.amazonaws.com/123456789012/spotguard", "in eu-west-1, but aws.region is us-east-1"),
    ],
)
async def test_unusable_queue_urls_exit_2_before_any_change(moto_world, aio_session, url, problem):
    settings = Settings(aws=AwsSettings(region="us-east-1", endpoint_url=moto_world.endpoint_url),
                        sqs=SqsSettings(queue_url=url))

    code, lines, err = await run_setup(moto_world, aio_session, settings)

    assert (code, lines) == (2, [])
    assert problem in err


def test_main_runs_setup_from_a_config_file(moto_world, tmp_path, capsys):
    config = str(write_config(tmp_path, moto_world, [GUARD], sqs=queue_url(moto_world)))

    assert run(argparse.Namespace(config=config, dry_run=True)) == 0
    assert statuses(capsys.readouterr().out.splitlines()) == {"would create"}
    assert run(argparse.Namespace(config=config, dry_run=False)) == 0
    assert statuses(capsys.readouterr().out.splitlines()) == {"created"}
    assert run(argparse.Namespace(config=config, dry_run=False)) == 0
    assert statuses(capsys.readouterr().out.splitlines()) == {"exists"}


def test_main_reports_config_problems_like_check_config(moto_world, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[aws]\nregoin = "us-east-1"\n')
    assert run(argparse.Namespace(config=str(bad), dry_run=False)) == 2
    assert "aws.region: required" in capsys.readouterr().err

    no_sqs = str(write_config(tmp_path, moto_world, [GUARD]))
    assert run(argparse.Namespace(config=no_sqs, dry_run=False)) == 2
    captured = capsys.readouterr()
    assert "[sources.sqs]" in captured.err and captured.out == ""


async def test_an_unreachable_endpoint_is_reported_and_exits_1(moto_world, aio_session):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens, the connection is refused at once
    settings = settings_for(moto_world)
    err = io.StringIO()
    async with client("sqs", moto_world.region, dead, session=aio_session, max_attempts=1) as sqs, client(
        "events", moto_world.region, dead, session=aio_session, max_attempts=1
    ) as events:
        code = await setup(settings, sqs, events, dry_run=False, out=io.StringIO(), err=err)

    assert code == 1
    assert err.getvalue().startswith("setup failed: EndpointConnectionError")


def test_the_cli_runs_setup_twice_without_a_change(moto_world, tmp_path):
    # `spotguard setup` as a person runs it: a real process, the config naming moto's endpoint.
    import os
    import subprocess
    import sys

    config = str(write_config(tmp_path, moto_world, [GUARD], sqs=queue_url(moto_world)))
    argv = [sys.executable, "-m", "spotguard", "setup", "--config", config]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    again = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert statuses(first.stdout.splitlines()) == {"created"}
    assert statuses(again.stdout.splitlines()) == {"exists"}


# ---------------------------------------------------------------------- [ha]: the lease table

TABLE = "spotguard-ha"


def ha_settings(world: Any, *, sqs: bool = False) -> Settings:
    from spotguard.config import HaSettings

    base = (settings_for(world) if sqs
            else Settings(aws=AwsSettings(region=world.region, endpoint_url=world.endpoint_url)))
    return Settings(aws=base.aws, sqs=base.sqs, ha=HaSettings(table=TABLE))


async def run_ha_setup(world: Any, session: Any, settings: Settings, *, dry_run: bool = False):
    out, err = io.StringIO(), io.StringIO()
    async with client("sqs", world.region, world.endpoint_url, session=session) as sqs, client(
        "events", world.region, world.endpoint_url, session=session
    ) as events, client("dynamodb", world.region, world.endpoint_url, session=session) as dynamodb:
        code = await setup(settings, sqs, events, dry_run=dry_run, out=out, err=err, dynamodb=dynamodb)
    return code, out.getvalue().splitlines(), err.getvalue()


async def test_ha_gets_an_on_demand_table_keyed_by_pk_and_a_second_run_changes_nothing(moto_world, aio_session):
    code, lines, err = await run_ha_setup(moto_world, aio_session, ha_settings(moto_world))

    assert (code, lines, err) == (0, [f"table {TABLE}: created"], "")
    table = moto_world.boto("dynamodb").describe_table(TableName=TABLE)["Table"]
    assert table["TableStatus"] == "ACTIVE"
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert table["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
    assert table["AttributeDefinitions"] == [{"AttributeName": "pk", "AttributeType": "S"}]
    # No queue and no rules without [sources.sqs].
    assert snapshot(moto_world) == {"queues": {}, "rules": {}}

    code, lines, _ = await run_ha_setup(moto_world, aio_session, ha_settings(moto_world))
    assert (code, lines) == (0, [f"table {TABLE}: exists"])


async def test_ha_dry_run_creates_no_table_and_with_sqs_the_table_comes_first(moto_world, aio_session):
    code, lines, _ = await run_ha_setup(moto_world, aio_session, ha_settings(moto_world, sqs=True), dry_run=True)
    assert code == 0 and lines[0] == f"table {TABLE}: would create" and statuses(lines) == {"would create"}
    assert moto_world.boto("dynamodb").list_tables()["TableNames"] == []

    code, lines, _ = await run_ha_setup(moto_world, aio_session, ha_settings(moto_world, sqs=True))
    assert code == 0 and lines[0] == f"table {TABLE}: created" and statuses(lines) == {"created"}
    assert len(lines) == 1 + 1 + 2 * len(RULES) + 1


async def test_ha_table_with_another_key_is_an_error_and_is_left_alone(moto_world, aio_session):
    ddb = moto_world.boto("dynamodb")
    ddb.create_table(TableName=TABLE, BillingMode="PAY_PER_REQUEST",
                     AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                     KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}])

    code, lines, err = await run_ha_setup(moto_world, aio_session, ha_settings(moto_world))

    assert (code, lines) == (1, [])
    assert err.startswith(f"setup failed: table {TABLE} exists with key id (HASH)")
    assert ddb.describe_table(TableName=TABLE)["Table"]["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]


def test_main_creates_the_ha_table_from_a_config_file(moto_world, tmp_path, capsys):
    path = write_config(tmp_path, moto_world, [GUARD], ha={"table": TABLE})

    assert run(argparse.Namespace(config=str(path), dry_run=False)) == 0
    assert capsys.readouterr().out.splitlines() == [f"table {TABLE}: created"]
    assert TABLE in moto_world.boto("dynamodb").list_tables()["TableNames"]
