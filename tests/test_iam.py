"""The IAM policies: exact statements for known configs, and proof against the calls the code makes.

The key tests run a real daemon (failover through SQS, failback, stop), then
`spotguard check` on the same config (operators run it on the controller with
the daemon's role), and a real agent against moto, record every AWS call their
aiobotocore clients make through botocore's own event system
(`before-parameter-build` on each client's `meta.events`), and check each
call, with the resources it names, against the generated policy with a small
IAM matcher. A call the policy does not allow fails the test, and so does a
granted action that neither the daemon nor check calls. Besides, every check
run in test_check.py is recorded and matched against the daemon's policy for
its config (test_check.run_check), so each of check's paths is covered.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
from configs import daemon_settings, write_config
from test_daemon import _warning, health, phase, replace_spot, running, state
from waiting import until

from spotguard import config
from spotguard.agent import Agent
from spotguard.aws import client
from spotguard.commands import iam_policy
from spotguard.iam import IamError, agent_policy, daemon_policy, setup_policy
from spotguard.lab.imds import InstanceMetadata
from spotguard.machine import Phase

ROOT = Path(__file__).resolve().parent.parent
TG = "arn:aws:elasticloadbalancing:ap-northeast-2:123456789012:targetgroup/inference/6d0ecf831eec9f09"
SCOPED = ("ec2:StartInstances", "ec2:StopInstances", "elasticloadbalancing:RegisterTargets",
          "elasticloadbalancing:DeregisterTargets", "sqs:", "dynamodb:")
# SQS batch calls are authorized as their single-message actions (SQS developer guide, batch actions).
BATCH_AS = {"DeleteMessageBatch": "DeleteMessage", "SendMessageBatch": "SendMessage",
            "ChangeMessageVisibilityBatch": "ChangeMessageVisibility"}
# DynamoDB transactions are authorized as the item actions inside them (DynamoDB developer
# guide, "Using IAM with DynamoDB transactions"); there is no TransactWriteItems IAM action.
TRANSACT_AS = {"ConditionCheck": "ConditionCheckItem", "Put": "PutItem", "Update": "UpdateItem",
               "Delete": "DeleteItem"}
# "No permissions are required to perform this operation" (STS API reference, GetCallerIdentity):
# an explicit deny cannot even stop it. check calls it to show who it runs as.
NO_PERMISSION = frozenset({"sts:GetCallerIdentity"})


# ---------------------------------------------------------------------- helpers


def load(tmp_path: Path, region: str, guards: list[dict], **keys: Any) -> config.Settings:
    """A config with no endpoint (a policy is only printed), loaded without the environment."""
    return config.load(write_config(tmp_path, None, guards, aws={"region": region}, **keys), env={})


def guard(name: str, tg: str, standbys: list[str], sir: str) -> dict:
    return {"name": name, "target_group_arn": tg, "spot_request_ids": [sir], "standby_instance_ids": standbys}


def by_sid(policy: dict) -> dict[str, dict]:
    return {s["Sid"]: s for s in policy["Statement"]}


def allows(policy: dict, action: str, resource: str) -> bool:
    """Whether an Allow statement covers (action, resource): IAM's case-insensitive action and
    case-sensitive resource wildcards. No Deny or conditions: our policies have none."""
    for s in policy["Statement"]:
        actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
        resources = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
        if (
            s["Effect"] == "Allow"
            and any(fnmatchcase(action.lower(), a.lower()) for a in actions)
            and any(fnmatchcase(resource, r) for r in resources)
        ):
            return True
    return False


def granted_actions(policy: dict) -> set[str]:
    return {a for s in policy["Statement"] for a in s["Action"]}


class Recorder:
    """Every API call made by the clients it is attached to, as (IAM action, request params)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def attach(self, *clients: Any) -> None:
        for c in clients:
            # Emitted once per API call (before retries), with the caller's own parameters.
            c.meta.events.register("before-parameter-build", self._record)

    def _record(self, params: dict, model: Any, **_: Any) -> None:
        prefix = model.service_model.signing_name  # "elasticloadbalancing" for elbv2: the IAM prefix
        if model.name == "TransactWriteItems":
            for item in params["TransactItems"]:
                ((kind, body),) = item.items()
                self.calls.append((f"{prefix}:{TRANSACT_AS[kind]}", {"TableName": body["TableName"]}))
            return
        self.calls.append((f"{prefix}:{BATCH_AS.get(model.name, model.name)}", dict(params)))

    def actions(self) -> set[str]:
        return {action for action, _ in self.calls}


def resources(action: str, params: dict, world: Any, queue_arns: dict[str, str]) -> list[str]:
    """The ARNs IAM authorizes `action` against, from the request (independently of spotguard.iam)."""
    if "InstanceIds" in params and action in ("ec2:StartInstances", "ec2:StopInstances"):
        return [f"arn:aws:ec2:{world.region}:{world.account_id}:instance/{i}" for i in params["InstanceIds"]]
    if action.startswith("elasticloadbalancing:") and action.endswith("Targets"):
        return [params["TargetGroupArn"]]
    if action.startswith("sqs:"):
        if "QueueName" in params:  # GetQueueUrl and CreateQueue name the queue, not its URL
            return [f"arn:aws:sqs:{world.region}:{world.account_id}:{params['QueueName']}"]
        return [queue_arns[params["QueueUrl"]]]
    if action.startswith("events:"):
        rule = params.get("Name", params.get("Rule"))
        return [f"arn:aws:events:{world.region}:{world.account_id}:rule/{rule}"]
    if action.startswith("dynamodb:"):
        tables = [params["TableName"]] if "TableName" in params else list(params["RequestItems"])
        return [f"arn:aws:dynamodb:{world.region}:{world.account_id}:table/{t}" for t in tables]
    return ["*"]


def refused(recorder: Recorder, policy: dict, world: Any, queue_arns: dict[str, str]) -> list[str]:
    return sorted(
        f"{action} on {arn}"
        for action, params in recorder.calls
        for arn in resources(action, params, world, queue_arns)
        if action not in NO_PERMISSION and not allows(policy, action, arn)
    )


async def check_with(recorder: Recorder, settings: config.Settings, world: Any, session: Any, aws: Any,
                     ddb: Any = None) -> list[str]:
    """`spotguard check` on the daemon's own clients (plus an STS one), recorded; its lines."""
    from spotguard.commands.check import check

    out = io.StringIO()
    async with client("sts", world.region, world.endpoint_url, session=session) as sts:
        recorder.attach(sts)
        await check(settings, config="config.toml", sts=sts, ec2=aws.ec2, elbv2=aws.elbv2, sqs=aws.sqs, dynamodb=ddb,
                    out=out)
    return out.getvalue().splitlines()


def cli(path: Path, *, agent: bool = False, setup: bool = False) -> int:
    return iam_policy.run(argparse.Namespace(config=str(path), agent=agent, setup=setup))


# ---------------------------------------------------------------------- pure


def test_the_example_config_gets_exactly_these_statements():
    settings = config.load(ROOT / "config.example.toml", env={})
    assert daemon_policy(settings) == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Describe",
                "Effect": "Allow",
                "Action": ["ec2:DescribeInstances", "ec2:DescribeSpotInstanceRequests", "ec2:DescribeInstanceStatus",
                           "elasticloadbalancing:DescribeTargetHealth", "elasticloadbalancing:DescribeTargetGroups",
                           "elasticloadbalancing:DescribeTargetGroupAttributes"],
                "Resource": "*",
            },
            {
                "Sid": "StartStopStandbys",
                "Effect": "Allow",
                "Action": ["ec2:StartInstances", "ec2:StopInstances"],
                "Resource": [
                    "arn:aws:ec2:ap-northeast-2:123456789012:instance/i-0a1b2c3d4e5f60718",
                    "arn:aws:ec2:ap-northeast-2:123456789012:instance/i-0f9e8d7c6b5a49382",
                ],
            },
            {
                "Sid": "RegisterTargets",
                "Effect": "Allow",
                "Action": ["elasticloadbalancing:RegisterTargets", "elasticloadbalancing:DeregisterTargets"],
                "Resource": [TG],
            },
            {
                "Sid": "ReadQueue",
                "Effect": "Allow",
                "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"],
                "Resource": "arn:aws:sqs:ap-northeast-2:123456789012:spotguard",
            },
        ],
    }
    assert agent_policy(settings) == {
        "Version": "2012-10-17",
        "Statement": [{"Sid": "SendToQueue", "Effect": "Allow", "Action": ["sqs:SendMessage"],
                       "Resource": "arn:aws:sqs:ap-northeast-2:123456789012:spotguard"}],
    }


def test_every_guard_lists_its_standbys_and_target_group(tmp_path):
    tg2 = "arn:aws:elasticloadbalancing:ap-northeast-2:210987654321:targetgroup/chat/0123456789abcdef"
    settings = load(tmp_path, "ap-northeast-2", [
        guard("inference", TG, ["i-0a1b2c3d4e5f60718", "i-0f9e8d7c6b5a49382"], "sir-8x4kq2bn"),
        guard("chat", tg2, ["i-0123456789abcdef0"], "sir-aaaabbbb"),
    ])
    statements = by_sid(daemon_policy(settings))
    assert statements["StartStopStandbys"]["Resource"] == [
        "arn:aws:ec2:ap-northeast-2:123456789012:instance/i-0a1b2c3d4e5f60718",
        "arn:aws:ec2:ap-northeast-2:123456789012:instance/i-0f9e8d7c6b5a49382",
        # Each guard's standbys are in its own target group's account.
        "arn:aws:ec2:ap-northeast-2:210987654321:instance/i-0123456789abcdef0",
    ]
    assert statements["RegisterTargets"]["Resource"] == [TG, tg2]


def test_no_wildcard_resource_on_anything_that_acts(tmp_path):
    settings = config.load(ROOT / "config.example.toml", env={})
    for policy in (daemon_policy(settings), agent_policy(settings)):
        for s in policy["Statement"]:
            assert s["Sid"].isalnum()  # IAM accepts only [A-Za-z0-9] in a Sid
            if any(a.startswith(SCOPED) for a in s["Action"]):
                arns = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
                assert arns and not any("*" in arn or "?" in arn for arn in arns), s
            else:
                assert all(a.split(":")[1].startswith("Describe") for a in s["Action"]), s


def test_the_partition_comes_from_the_target_group_arn(tmp_path):
    tg = "arn:aws-cn:elasticloadbalancing:cn-north-1:123456789012:targetgroup/web/6d0ecf831eec9f09"
    settings = load(tmp_path, "cn-north-1", [guard("web", tg, ["i-0a1b2c3d4e5f60718"], "sir-8x4kq2bn")],
                    sqs="https://sqs.cn-north-1.amazonaws.com.cn/123456789012/sg")
    statements = by_sid(daemon_policy(settings))
    assert statements["StartStopStandbys"]["Resource"] == [
        "arn:aws-cn:ec2:cn-north-1:123456789012:instance/i-0a1b2c3d4e5f60718"
    ]
    assert statements["ReadQueue"]["Resource"] == "arn:aws-cn:sqs:cn-north-1:123456789012:sg"


def test_without_a_queue_the_daemon_gets_no_sqs_and_the_agent_nothing(tmp_path, capsys):
    settings = load(tmp_path, "ap-northeast-2", [guard("inference", TG, ["i-0a1b2c3d4e5f60718"], "sir-8x4kq2bn")])
    policy = daemon_policy(settings)
    assert not any(a.startswith("sqs:") for a in granted_actions(policy))
    assert [s["Sid"] for s in policy["Statement"]] == ["Describe", "StartStopStandbys", "RegisterTargets"]
    with pytest.raises(IamError):
        agent_policy(settings)

    assert cli(tmp_path / "config.toml") == 0
    assert json.loads(capsys.readouterr().out) == policy
    assert cli(tmp_path / "config.toml", agent=True) == 2
    out, err = capsys.readouterr()
    assert out == "" and "[sources.sqs]" in err


def test_main_prints_the_agent_policy_and_refuses_a_bad_config(tmp_path, capsys):
    assert cli(ROOT / "config.example.toml", agent=True) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == agent_policy(config.load(ROOT / "config.example.toml", env={}))
    assert printed.startswith('{\n  "Version"')  # indented for people

    (tmp_path / "bad.toml").write_text('[aws]\nregion = "nowhere"\n')
    assert cli(tmp_path / "bad.toml") == 2
    out, err = capsys.readouterr()
    assert out == "" and "aws.region" in err


# ---------------------------------------------------------------------- against the code


@pytest.fixture
def queue(moto_world) -> tuple[str, dict[str, str]]:
    """A moto queue's URL, and moto's own ARN for it (not spotguard.iam's)."""
    sqs = moto_world.boto("sqs")
    url = sqs.create_queue(QueueName="spotguard")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, {url: arn}


async def test_every_call_of_a_daemon_cycle_and_check_is_allowed_and_every_grant_is_used(
        tmp_path, moto_world, deployment, aws, queue, aio_session):
    d, standby = deployment, deployment.standby_ids[0]
    url, queue_arns = queue
    settings = daemon_settings(tmp_path, moto_world, [d], poll="0.2s", grace="1s", sqs=url)
    recorder = Recorder()
    recorder.attach(*aws)
    async with running(settings, aws) as daemon:
        moto_world.notice(d.spot_request_id)
        moto_world.boto("sqs").send_message(QueueUrl=url, MessageBody=json.dumps(_warning(d.spot_instance_id)))
        await until(lambda: phase(daemon) is Phase.BOTH_SERVING, what="failover")
        await until(lambda: d.spot_instance_id not in health(moto_world, d), what="doomed spot deregistered")
        await replace_spot(moto_world, daemon, d)
        await until(lambda: phase(daemon) is Phase.SPOT_HEALTHY, what="failback")
        await until(lambda: state(moto_world, standby) == "stopped", what="standby stopped")
        await until(lambda: "sqs:DeleteMessage" in recorder.actions(), what="the message deleted")
    daemon_calls = recorder.actions()
    lines = await check_with(recorder, settings, moto_world, aio_session, aws)
    assert lines[-1].endswith("warning") and "queue spotguard: exists" in "\n".join(lines), lines

    policy = daemon_policy(settings)
    assert refused(recorder, policy, moto_world, queue_arns) == []
    # Least privilege the other way round: nothing granted that the cycle and check did not use.
    assert recorder.actions() - NO_PERMISSION == granted_actions(policy)
    # check's read-only extras are granted for check alone; the daemon itself never calls them.
    assert recorder.actions() - daemon_calls - NO_PERMISSION == {
        "elasticloadbalancing:DescribeTargetGroups", "elasticloadbalancing:DescribeTargetGroupAttributes",
        "sqs:GetQueueAttributes", "ec2:DescribeInstanceStatus"}


async def test_the_check_catches_a_missing_grant(tmp_path, moto_world, deployment, aws, queue):
    # The same recorder and matcher fail a policy that lacks a statement the daemon needs.
    d = deployment
    url, queue_arns = queue
    settings = daemon_settings(tmp_path, moto_world, [d], poll="0.2s", sqs=url)
    recorder = Recorder()
    recorder.attach(*aws)
    async with running(settings, aws):
        moto_world.boto("sqs").send_message(QueueUrl=url, MessageBody=json.dumps(_warning(d.spot_instance_id)))
        await until(lambda: "ec2:StartInstances" in recorder.actions(), what="the standby started")
        await until(lambda: "sqs:DeleteMessage" in recorder.actions(), what="the message deleted")
    policy = daemon_policy(settings)
    policy["Statement"] = [s for s in policy["Statement"] if s["Sid"] != "StartStopStandbys"]
    assert any(r.startswith("ec2:StartInstances on ") for r in refused(recorder, policy, moto_world, queue_arns))
    # A policy for another queue does not cover this one.
    other = daemon_settings(tmp_path, moto_world, [d], sqs=f"{url}-other")
    assert any(r.startswith("sqs:ReceiveMessage on ")
               for r in refused(recorder, daemon_policy(other), moto_world, queue_arns))


async def test_every_call_of_the_agent_is_allowed(tmp_path, moto_world, aio_session, queue):
    url, queue_arns = queue
    settings = load(tmp_path, moto_world.region, [
        guard("web", f"arn:aws:elasticloadbalancing:{moto_world.region}:{moto_world.account_id}:"
              "targetgroup/web/6d0ecf831eec9f09", ["i-0a1b2c3d4e5f60718"], "sir-8x4kq2bn"),
    ], sqs=url)
    imds = InstanceMetadata("i-0aaaaaaaaaaaaaaa1")
    await imds.start()
    recorder = Recorder()
    try:
        async with client("sqs", moto_world.region, moto_world.endpoint_url, session=aio_session) as sqs:
            recorder.attach(sqs)
            async with Agent(imds.url, sqs, url) as agent:
                imds.set_rebalance(datetime(2026, 11, 28, 8, 12, tzinfo=timezone.utc))
                imds.set_interruption(datetime(2026, 11, 28, 8, 22, tzinfo=timezone.utc))
                assert len(await agent.poll_once()) == 2
    finally:
        await imds.close()
    policy = agent_policy(settings)
    assert recorder.actions() == granted_actions(policy) == {"sqs:SendMessage"}
    assert refused(recorder, policy, moto_world, queue_arns) == []
    assert refused(recorder, daemon_policy(settings), moto_world, queue_arns) != []  # the daemon may not send


def test_the_cli_prints_the_same_policies():
    import json as _json
    import subprocess
    import sys
    from pathlib import Path

    from spotguard import config as _config
    from spotguard.iam import agent_policy as _agent
    from spotguard.iam import daemon_policy as _daemon
    from spotguard.iam import setup_policy as _setup

    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    settings = _config.load(example)
    for extra, expected in (([], _daemon(settings)), (["--agent"], _agent(settings)), (["--setup"], _setup(settings))):
        done = subprocess.run(
            [sys.executable, "-m", "spotguard", "iam-policy", "--config", str(example), *extra],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert _json.loads(done.stdout) == expected


# ---------------------------------------------------------------------- [ha]


def test_ha_adds_the_table_actions_on_the_table_only(tmp_path):
    settings = load(tmp_path, "ap-northeast-2", [guard("inference", TG, ["i-0a1b2c3d4e5f60718"], "sir-8x4kq2bn")],
                    ha={"table": "spotguard"})
    assert by_sid(daemon_policy(settings))["LeaseTable"] == {
        "Sid": "LeaseTable",
        "Effect": "Allow",
        "Action": ["dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:BatchGetItem", "dynamodb:PutItem",
                   "dynamodb:ConditionCheckItem", "dynamodb:DescribeTable"],
        "Resource": "arn:aws:dynamodb:ap-northeast-2:123456789012:table/spotguard",
    }
    tg2 = "arn:aws:elasticloadbalancing:ap-northeast-2:210987654321:targetgroup/chat/0123456789abcdef"
    two = load(tmp_path, "ap-northeast-2", [
        guard("inference", TG, ["i-0a1b2c3d4e5f60718"], "sir-8x4kq2bn"),
        guard("chat", tg2, ["i-0123456789abcdef0"], "sir-aaaabbbb"),
    ], ha={"table": "spotguard"})
    with pytest.raises(IamError, match="ha.table"):
        daemon_policy(two)


async def test_every_call_of_an_ha_daemon_cycle_is_allowed_and_every_grant_is_used(tmp_path, moto_world, deployment,
                                                                                  aws, aio_session):
    from spotguard import ha
    from spotguard.daemon import build, serve
    from spotguard.notify import Notifier

    d, standby = deployment, deployment.standby_ids[0]
    moto_world.boto("dynamodb").create_table(**ha.table_spec("spotguard-ha"))
    settings = daemon_settings(tmp_path, moto_world, [d], poll="0.2s", grace="1s",
                               ha={"table": "spotguard-ha", "lease": "3s", "holder": "a"})
    recorder = Recorder()
    recorder.attach(*aws)
    async with client("dynamodb", moto_world.region, moto_world.endpoint_url, session=aio_session) as ddb:
        recorder.attach(ddb)
        notifier = Notifier(None)
        leadership = ha.Leadership(ddb, "spotguard-ha", lease=3.0, holder="a")
        daemon = build(settings, aws, notifier, ha=leadership)
        stop = asyncio.Event()
        task = asyncio.create_task(serve(daemon, settings, aws, stop))
        try:
            await until(lambda: daemon.loaded_epoch == 1, what="leading")
            moto_world.notice(d.spot_request_id)
            await until(lambda: phase(daemon) is Phase.BOTH_SERVING, what="failover")
            await until(lambda: d.spot_instance_id not in health(moto_world, d), what="doomed spot deregistered")
            await replace_spot(moto_world, daemon, d)
            await until(lambda: phase(daemon) is Phase.SPOT_HEALTHY, what="failback")
            await until(lambda: state(moto_world, standby) == "stopped", what="standby stopped")
        finally:
            stop.set()
            await asyncio.wait([task], timeout=15)
        daemon_calls = recorder.actions()
        lines = await check_with(recorder, settings, moto_world, aio_session, aws, ddb)
        assert "✓ [ha] table spotguard-ha: key pk, ACTIVE" in lines, lines

    policy = daemon_policy(settings)
    assert refused(recorder, policy, moto_world, {}) == []
    assert recorder.actions() - NO_PERMISSION == granted_actions(policy)
    assert "dynamodb:DescribeTable" not in daemon_calls and "dynamodb:DescribeTable" in recorder.actions()


# ---------------------------------------------------------------------- setup


async def test_every_call_of_setup_is_allowed_and_every_grant_is_used(tmp_path, moto_world, deployment, aio_session):
    from spotguard.commands.setup import setup

    url = f"{moto_world.endpoint_url}/{moto_world.account_id}/spotguard"
    settings = daemon_settings(tmp_path, moto_world, [deployment], sqs=url, ha={"table": "spotguard-ha"})
    recorder = Recorder()
    async with client("sqs", moto_world.region, moto_world.endpoint_url, session=aio_session) as sqs, client(
        "events", moto_world.region, moto_world.endpoint_url, session=aio_session
    ) as events, client("dynamodb", moto_world.region, moto_world.endpoint_url, session=aio_session) as ddb:
        recorder.attach(sqs, events, ddb)
        for _ in range(2):  # a fresh account, then one where everything exists
            assert await setup(settings, sqs, events, dry_run=False, out=io.StringIO(), err=io.StringIO(),
                               dynamodb=ddb) == 0
    policy = setup_policy(settings)
    assert refused(recorder, policy, moto_world, {url: f"arn:aws:sqs:{moto_world.region}:"
                                                   f"{moto_world.account_id}:spotguard"}) == []
    assert recorder.actions() == granted_actions(policy)
    # The daemon's own role could not have run it.
    assert not recorder.actions() & {"sqs:CreateQueue", "events:PutRule", "dynamodb:CreateTable"} & granted_actions(
        daemon_policy(settings))


def test_setup_policy_needs_something_to_set_up(tmp_path):
    settings = load(tmp_path, "ap-northeast-2", [guard("inference", TG, ["i-0a1b2c3d4e5f60718"], "sir-8x4kq2bn")])
    with pytest.raises(IamError, match="neither"):
        setup_policy(settings)
    assert cli(tmp_path / "config.toml", setup=True) == 2
