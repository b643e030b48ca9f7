"""`spotguard setup --cloudformation`: the template cfn-lint accepts, and a stack in moto that check and setup accept.

cfn-lint (the version pinned in constraints-dev.txt) lints the templates of a
config with and without [ha] in one run: its start-up is most of its time.
The moto test creates the stack with CloudFormation in moto's server and asks
`spotguard check` and `spotguard setup --dry-run` what they see: setup's dry
run is the proof that the stack is what setup makes, since it compares every
queue, rule, target, policy statement and table with the same facts.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from configs import write_config
from test_check import marked, run_check
from test_setup import GUARD, queue_url, run_ha_setup, statuses

from spotguard import cli, config, iam
from spotguard.cloudformation import NEW_QUEUE_ATTRIBUTES, POLICY_SID, rules, template

LINT = Path(sys.executable).with_name("cfn-lint")
TABLE = "spotguard-ha"
TAGGED = {"name": "web", "spot_instance_tags": {"Role": "web"}, "standby_instance_ids": ["i-0123456789abcdef2"],
          "target_group_arn": "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123456789abcde0"}
SQS = "https://sqs.us-east-1.amazonaws.com/123456789012/spotguard"


def printed(path: Path, capsys: Any) -> tuple[int, str, str]:
    """`spotguard setup --cloudformation --config PATH` in this process: (exit code, stdout, stderr)."""
    code = cli.main(["setup", "--cloudformation", "--config", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cfn_lint_reports_nothing_with_and_without_ha(tmp_path, capsys):
    without = write_config(tmp_path, None, [GUARD], aws={"region": "us-east-1"}, sqs=SQS)
    (tmp_path / "ha").mkdir()
    # With [ha], a guard by tags too: the Auto Scaling rule is linted as well.
    with_ha = write_config(tmp_path / "ha", None, [GUARD, TAGGED], aws={"region": "us-east-1"},
                           sqs=SQS, ha={"table": TABLE})
    files = []
    for name, path in (("without-ha.json", without), ("with-ha.json", with_ha)):
        code, out, err = printed(path, capsys)
        assert (code, err) == (0, "")
        (tmp_path / name).write_text(out)
        files.append(str(tmp_path / name))

    assert LINT.exists(), "cfn-lint is a dev dependency (pinned in constraints-dev.txt)"
    # --include-checks I: not even the informational findings (DeletionPolicy on the stateful ones).
    lint = subprocess.run([str(LINT), "--include-checks", "I", "--", *files], capture_output=True, text=True,
                          timeout=60)
    assert (lint.returncode, lint.stdout, lint.stderr) == (0, "", "")
    with_ha_types = {r["Type"] for r in json.loads((tmp_path / "with-ha.json").read_text())["Resources"].values()}
    assert "AWS::DynamoDB::Table" in with_ha_types
    assert "spotguard-autoscaling-lifecycle" in (tmp_path / "with-ha.json").read_text()
    assert "AWS::DynamoDB::Table" not in (tmp_path / "without-ha.json").read_text()


def test_the_template_is_made_from_the_config_alone_and_names_what_it_names(tmp_path, capsys):
    # An endpoint nothing listens on: the template never calls AWS.
    path = write_config(tmp_path, None, [GUARD], aws={"region": "us-east-1", "endpoint_url": "http://127.0.0.1:9"},
                        sqs=SQS, ha={"table": TABLE})
    code, out, _ = printed(path, capsys)
    assert code == 0
    made = json.loads(out)
    settings = config.load(path, env={})
    assert made == template(settings)
    resources = made["Resources"]
    assert resources["Queue"]["Properties"] == {"QueueName": "spotguard", "MessageRetentionPeriod": 3600,
                                                "VisibilityTimeout": 30}
    assert {r["Properties"]["Name"] for r in resources.values() if r["Type"] == "AWS::Events::Rule"} == set(
        rules(settings))
    assert resources["DaemonRole"]["Properties"]["Policies"] == [
        {"PolicyName": "spotguard-daemon", "PolicyDocument": iam.daemon_policy(settings)}]
    assert resources["AgentRole"]["Properties"]["Policies"] == [
        {"PolicyName": "spotguard-agent", "PolicyDocument": iam.agent_policy(settings)}]
    assert resources["AgentInstanceProfile"]["Properties"] == {"InstanceProfileName": "spotguard-agent",
                                                               "Roles": [{"Ref": "AgentRole"}]}

    # Without [sources.sqs] or [ha]: the daemon's role alone (there is no queue for an agent to send to).
    bare = tmp_path / "bare"
    bare.mkdir()
    code, out, _ = printed(write_config(bare, None, [GUARD], aws={"region": "us-east-1"}), capsys)
    assert code == 0 and set(json.loads(out)["Resources"]) == {"DaemonRole", "DaemonInstanceProfile"}


def test_a_bad_config_exits_2_and_prints_no_template(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[aws]\nregoin = "us-east-1"\n')
    code, out, err = printed(bad, capsys)
    assert (code, out) == (2, "")
    assert "aws.region: required" in err


def test_a_queue_setup_cannot_make_exits_2_as_setup_does(tmp_path, capsys):
    fifo = write_config(tmp_path, None, [GUARD], aws={"region": "us-east-1"}, sqs=SQS + ".fifo")
    code, out, err = printed(fifo, capsys)
    assert (code, out) == (2, "")
    assert err == "spotguard setup: sources.sqs.queue_url: 'spotguard.fifo' is a FIFO queue; " \
                  "setup makes a standard queue only\n"
    with pytest.raises(SystemExit):  # argparse: one or the other
        cli.main(["setup", "--cloudformation", "--dry-run", "--config", str(fifo)])


def queue_attributes(world: Any, physical: str, name: str) -> str:
    """An attribute of the stack's queue (its physical id is a URL on amazonaws.com, not on moto's endpoint)."""
    sqs = world.boto("sqs")
    url = sqs.get_queue_url(QueueName=physical.rsplit("/", 1)[1])["QueueUrl"]
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[name])["Attributes"][name]


def resolve(value: Any, stack: dict[str, str], world: Any) -> Any:
    """A template value with Fn::GetAtt (Arn) and Fn::Sub (${X.Arn}) resolved against the stack's resources."""
    def arn(logical: str) -> str:
        if logical == "Queue":
            return queue_attributes(world, stack[logical], "QueueArn")
        return world.boto("events").describe_rule(Name=stack[logical])["Arn"]

    if isinstance(value, list):
        return [resolve(v, stack, world) for v in value]
    if isinstance(value, dict) and set(value) == {"Fn::GetAtt"}:
        logical, attribute = value["Fn::GetAtt"]
        assert attribute == "Arn"
        return arn(logical)
    if isinstance(value, dict) and set(value) == {"Fn::Sub"}:
        return value["Fn::Sub"].replace("${Queue.Arn}", arn("Queue"))
    if isinstance(value, dict):
        return {k: resolve(v, stack, world) for k, v in value.items()}
    return value


# moto's CloudFormation warns from its in-process server each time it parses the template.
@pytest.mark.filterwarnings("ignore:Tried to parse .*QueuePolicy")
async def test_a_stack_from_the_template_is_what_setup_makes_and_check_accepts(moto_world, aio_session, deployment,
                                                                             tmp_path, capsys):
    """moto's CloudFormation creates the queue (with its attributes), the rules with their
    targets, the table, the roles with their inline policies and the instance profiles. It has no
    AWS::SQS::QueuePolicy: it skips that resource with a warning and lists it as a blank resource,
    so the stack completes without the queue policy (and it keeps each role's inline policy as a
    Python repr, read back here with ast.literal_eval). The test then puts the template's own
    policy document on the queue (its Fn::GetAtt and Fn::Sub resolved against the stack), and
    only then does setup's dry run find everything as it would make it."""
    path = write_config(tmp_path, moto_world, [deployment], sqs=queue_url(moto_world), ha={"table": TABLE})
    settings = config.load(path)
    code, body, _ = printed(path, capsys)
    assert code == 0
    cfn = moto_world.boto("cloudformation")
    cfn.create_stack(StackName="spotguard", TemplateBody=body, Capabilities=["CAPABILITY_NAMED_IAM"])
    assert cfn.describe_stacks(StackName="spotguard")["Stacks"][0]["StackStatus"] == "CREATE_COMPLETE"
    # moto lists the skipped QueuePolicy as a blank resource (no logical id, no type).
    stack = {r["LogicalResourceId"]: r["PhysicalResourceId"]
             for r in cfn.describe_stack_resources(StackName="spotguard")["StackResources"] if r.get("ResourceType")}
    assert set(stack) == set(json.loads(body)["Resources"]) - {"QueuePolicy"}
    # setup keeps an existing queue's attributes, so its dry run cannot vouch for them: here they are.
    for name, value in NEW_QUEUE_ATTRIBUTES.items():
        assert queue_attributes(moto_world, stack["Queue"], name) == value

    code, lines = await run_check(moto_world, aio_session, path)
    assert code == 0 and marked(lines, "✗") == [], "\n".join(lines)
    assert f"✓ queue spotguard: exists (arn:aws:sqs:{moto_world.region}:{moto_world.account_id}:spotguard)" in lines
    assert f"✓ [ha] table {TABLE}: key pk, ACTIVE" in lines

    code, lines, _ = await run_ha_setup(moto_world, aio_session, settings, dry_run=True)
    assert code == 0
    assert [line for line in lines if not line.endswith(": exists")] == [
        f"queue policy statement {POLICY_SID}: would create"]  # moto's missing QueuePolicy, and only that
    policy = resolve(json.loads(body)["Resources"]["QueuePolicy"]["Properties"]["PolicyDocument"], stack, moto_world)
    sqs = moto_world.boto("sqs")
    sqs.set_queue_attributes(QueueUrl=sqs.get_queue_url(QueueName="spotguard")["QueueUrl"],
                             Attributes={"Policy": json.dumps(policy)})
    code, lines, _ = await run_ha_setup(moto_world, aio_session, settings, dry_run=True)
    assert code == 0
    assert statuses(lines) == {"exists"} and len(lines) == 1 + 1 + 2 * len(rules(settings)) + 1

    iam_client = moto_world.boto("iam")
    for who, policy in (("daemon", iam.daemon_policy(settings)), ("agent", iam.agent_policy(settings))):
        name = f"spotguard-{who}"
        # moto keeps an inline policy CloudFormation gave it as the dict's Python repr, not as JSON.
        document = iam_client.get_role_policy(RoleName=name, PolicyName=name)["PolicyDocument"]
        assert ast.literal_eval(document) == policy
        profile = iam_client.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == [name]
        trust = iam_client.get_role(RoleName=name)["Role"]["AssumeRolePolicyDocument"]
        assert trust == iam.instance_trust_policy()
