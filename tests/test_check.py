"""`spotguard check` against a deployment in moto (server mode), and its pure line functions.

The sound deployment is MotoWorld.provision's, which sets the target group's
deregistration delay to 30 s as a real deployment needs (the AWS default,
300 s, cannot fit the 120 s notice). Each failure test breaks one thing and checks that the ✗ line
names the culprit by id. moto answers every EC2 DryRun with DryRunOperation,
so a denied DryRun is checked on the pure function.

Every check run here records the AWS calls it makes (test_iam's Recorder) and
checks each against `spotguard iam-policy`'s daemon policy for the same
config: operators run check on the controller with the daemon's role.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from configs import write_config
from waiting import until

from spotguard import cli, config, ha, machine, rehearsal
from spotguard.aws import client
from spotguard.commands.check import GuardSeen, HaSeen, Refused, check, leader_line, permission_lines
from spotguard.iam import daemon_policy
from spotguard.lab.world import Deployment, MotoWorld
from spotguard.machine import Phase
from spotguard.rehearsal import Rehearsal
from spotguard.timing import advised_delay

DELAY_KEY = "deregistration_delay.timeout_seconds"


def set_delay(world: MotoWorld, d: Deployment, seconds: int) -> None:
    world.boto("elbv2").modify_target_group_attributes(
        TargetGroupArn=d.target_group_arn, Attributes=[{"Key": DELAY_KEY, "Value": str(seconds)}]
    )


def delay(world: MotoWorld, d: Deployment) -> int:
    attributes = world.boto("elbv2").describe_target_group_attributes(TargetGroupArn=d.target_group_arn)["Attributes"]
    return int(next(a["Value"] for a in attributes if a["Key"] == DELAY_KEY))


@pytest.fixture
def sound(deployment: Deployment, moto_world: MotoWorld) -> Deployment:
    assert delay(moto_world, deployment) == 30, "provision sets what a real deployment needs"
    return deployment


async def run_check(world: MotoWorld, session: Any, path: Path) -> tuple[int, list[str]]:
    """check on `path`'s config; every AWS call it makes must be allowed by the daemon's policy."""
    from test_iam import Recorder, refused  # lazily: test_iam imports the daemon's test helpers

    settings = config.load(path)
    out = io.StringIO()
    region, endpoint = world.region, world.endpoint_url
    recorder = Recorder()
    async with AsyncExitStack() as stack:
        sts, ec2, elbv2, sqs = [await stack.enter_async_context(client(name, region, endpoint, session=session))
                                for name in ("sts", "ec2", "elbv2", "sqs")]
        ddb = None
        if settings.ha is not None:
            ddb = await stack.enter_async_context(client("dynamodb", region, endpoint, session=session))
        recorder.attach(*(c for c in (sts, ec2, elbv2, sqs, ddb) if c is not None))
        code = await check(settings, config=str(path), sts=sts, ec2=ec2, elbv2=elbv2, sqs=sqs, dynamodb=ddb, out=out)
    queues = {} if settings.sqs is None else {settings.sqs.queue_url: (
        f"arn:aws:sqs:{world.region}:{world.account_id}:{settings.sqs.queue_name}")}
    assert refused(recorder, daemon_policy(settings), world, queues) == []
    return code, out.getvalue().splitlines()


def marked(lines: list[str], symbol: str) -> list[str]:
    return [line.strip() for line in lines if line.strip().startswith(symbol)]


# ---------------------------------------------------------------------- the sound deployment


async def test_the_sound_deployment_passes(moto_world, aio_session, sound, tmp_path):
    code, lines = await run_check(moto_world, aio_session, write_config(tmp_path, moto_world, [sound]))

    assert code == 0, "\n".join(lines)
    assert marked(lines, "✗") == []
    ok = "\n".join(marked(lines, "✓"))
    assert "credentials: arn:aws:" in ok
    assert f"target group lab-tg: HTTP:{sound.target_port}, instance targets" in ok
    assert ("every 5s, healthy after 2 passing: registered as it runs, a target that answers late needs up to "
            "2 × 5s = 10s") in ok
    assert "deregistration delay 30s" in ok
    assert (f"spot request {sound.spot_request_id}: persistent, active; "
            f"instance {sound.spot_instance_id} running, healthy") in ok
    for sid in sound.standby_ids:
        assert f"standby {sid}: stopped, On-Demand" in ok
    assert "ec2:StartInstances/StopInstances allowed on " + ", ".join(sound.standby_ids) in ok
    # Not rehearsed yet: a warning with the estimate, not a failure.
    (timing,) = [line for line in marked(lines, "!") if "timing" in line]
    assert "not rehearsed" in timing and "spotguard rehearse --config PATH --guard lab" in timing
    assert not any("[ha]" in line or "leader" in line for line in lines)  # no [ha]: no table, no lease
    assert lines[-1] == "0 problems, 1 warning"


@pytest.mark.parametrize("service", ["answers", "refuses", "silent"])
async def test_readiness_is_probed_from_here_against_the_running_spot(moto_world, aio_session, sound, tmp_path,
                                                                      service):
    from test_probe import Service, Unanswering, closed_port

    address = moto_world.private_address(sound.spot_instance_id)
    moto_world.boto("elbv2").modify_target_group(TargetGroupArn=sound.target_group_arn, HealthCheckTimeoutSeconds=2)
    async with contextlib.AsyncExitStack() as stack:
        if service == "answers":
            port = (await stack.enter_async_context(Service(200, address=address))).port
        elif service == "silent":
            port = stack.enter_context(Unanswering(address)).port
        else:
            port = closed_port(address)
        path = write_config(tmp_path, moto_world, [sound], guard={"register_when": "ready", "target_port": port})
        code, lines = await run_check(moto_world, aio_session, path)
    assert code == 0, "\n".join(lines)
    found = [line.strip() for line in lines if "readiness:" in line]
    assert len(found) == 1, "\n".join(lines)
    line = found[0]
    where = f"spot {sound.spot_instance_id}'s health check (HTTP {address}:{port}/health)"
    assert line == {
        "answers": f"✓ readiness: {where} passes from here: standbys are registered once they answer it",
        "refuses": f"! readiness: {where} is reachable from here but does not pass (refused, or another status) "
                   "— the balancer checks the same thing: fix the service or the target group's health check "
                   "(path, success codes)",
        "silent": f"! readiness: {where}: no answer from here within 2s; standbys are then registered 60s after "
                  f"they start, unproven — allow TCP {port} from this host in the instances' security group, or "
                  "run `spotguard agent --ready-url http://127.0.0.1:PORT/PATH` on the instances (their image), or "
                  "set register_when = \"running\"",
    }[service]
    assert "registered once it answers, a target is healthy after one check (5s)" in "\n".join(lines)


def test_the_cli_runs_check_as_a_real_process(moto_world, sound, tmp_path):
    path = write_config(tmp_path, moto_world, [sound])
    argv = [sys.executable, "-m", "spotguard", "check", "--config", str(path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert (done.returncode, done.stderr) == (0, ""), done.stdout
    assert done.stdout.splitlines()[-1] == "0 problems, 1 warning"



def test_a_bad_config_exits_2_like_every_command(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[aws]\nregoin = "us-east-1"\n')

    assert cli.main(["check", "--config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "aws.region: required" in captured.err


# ---------------------------------------------------------------------- failures name the culprit


async def test_a_running_standby_fails_naming_it(moto_world, aio_session, sound, tmp_path):
    running = sound.standby_ids[1]
    moto_world.boto("ec2").start_instances(InstanceIds=[running])

    code, lines = await run_check(moto_world, aio_session, write_config(tmp_path, moto_world, [sound]))

    assert code == 1
    (fail,) = marked(lines, "✗")
    assert fail.startswith(f"✗ standby {running} is running, not stopped — stop it")
    assert f"aws ec2 stop-instances --instance-ids {running}" in fail


async def test_a_standby_that_does_not_exist_fails_naming_it(moto_world, aio_session, sound, tmp_path):
    ghost = "i-0123456789abcdef0"
    path = write_config(tmp_path, moto_world, [sound], guard={"standby_instance_ids": [sound.standby_ids[0], ghost]})

    code, lines = await run_check(moto_world, aio_session, path)

    assert code == 1
    assert marked(lines, "✗") == [f"✗ standby {ghost} not found — fix standby_instance_ids (or aws.region)"]
    # The missing one gets no DryRun; the other is still checked.
    assert any(f"allowed on {sound.standby_ids[0]} (DryRun)" in line for line in lines)


async def test_a_target_group_that_does_not_exist_fails_naming_it(moto_world, aio_session, sound, tmp_path):
    ghost = sound.target_group_arn.rsplit("/", 1)[0] + "/0123456789abcdef"
    path = write_config(tmp_path, moto_world, [sound], guard={"target_group_arn": ghost})

    code, lines = await run_check(moto_world, aio_session, path)

    assert code == 1
    assert marked(lines, "✗") == [f"✗ target group {ghost} not found — fix guard lab's target_group_arn"]


async def test_a_spot_request_that_does_not_exist_fails_naming_it(moto_world, aio_session, sound, tmp_path):
    path = write_config(tmp_path, moto_world, [sound], guard={"spot_request_ids": ["sir-0123456789abcdef0"]})

    code, lines = await run_check(moto_world, aio_session, path)

    assert code == 1
    assert marked(lines, "✗") == [
        "✗ spot request sir-0123456789abcdef0 not found — fix spot_request_ids (or aws.region)"]


async def test_a_spot_request_without_an_instance_fails(moto_world, aio_session, sound, tmp_path):
    moto_world.terminate_spot(sound.spot_request_id)

    code, lines = await run_check(moto_world, aio_session, write_config(tmp_path, moto_world, [sound]))

    assert code == 1
    (fail,) = marked(lines, "✗")
    assert fail.startswith(f"✗ spot request {sound.spot_request_id} has no instance (instance-terminated-no-capacity)")


async def test_a_standby_that_is_a_spot_instance_or_in_another_vpc_fails(moto_world, aio_session, sound, tmp_path):
    spot_standby = moto_world.launch_spot(sound.subnet_ids[1], {"Role": "oops"})
    moto_world.boto("ec2").stop_instances(InstanceIds=[spot_standby])
    other = moto_world.provision("other", standbys=1).standby_ids[0]
    path = write_config(tmp_path, moto_world, [sound], guard={"standby_instance_ids": [spot_standby, other]})

    code, lines = await run_check(moto_world, aio_session, path)

    assert code == 1
    fails = marked(lines, "✗")
    assert fails[0].startswith(f"✗ standby {spot_standby} is a spot instance — a standby must be On-Demand")
    assert fails[1].startswith(f"✗ standby {other} is in vpc-") and f"the target group in {sound.vpc_id}" in fails[1]


async def test_tagged_spot_instances_are_found_or_missed(moto_world, aio_session, sound, tmp_path):
    tags = {"spot_request_ids": None, "spot_instance_tags": {"Role": "inference-spot"}}
    path = write_config(tmp_path, moto_world, [sound], guard=tags)
    code, lines = await run_check(moto_world, aio_session, path)
    assert code == 1
    assert marked(lines, "✗")[0].startswith("✗ no running spot instance tagged Role=inference-spot (none found)")

    spot = moto_world.launch_spot(sound.subnet_ids[0], {"Role": "inference-spot"})
    code, lines = await run_check(moto_world, aio_session, path)
    assert code == 0
    assert (f"! spot instance {spot} (tagged Role=inference-spot) running, "
            "not registered in the target group") in "\n".join(marked(lines, "!"))


# ---------------------------------------------------------------------- the timing budget


async def test_a_deregistration_delay_the_budget_cannot_fit_fails_with_the_one_number_that_fits(
    moto_world, aio_session, deployment, tmp_path
):
    """The issue's case: AWS's default target group with the delay at 90 s. check printed
    `0 problems` while its own budget was 2m21s over; one number is now advised, everywhere."""
    path = write_config(tmp_path, moto_world, [deployment])
    moto_world.boto("elbv2").modify_target_group(
        TargetGroupArn=deployment.target_group_arn, HealthCheckIntervalSeconds=30, HealthyThresholdCount=5)
    set_delay(moto_world, deployment, 90)
    rehearsal.write(tmp_path / "state", Rehearsal("lab", deployment.standby_ids[0], "2026-11-28T21:30:00Z",
                                                  "healthy", healthy=60.0))
    code, lines = await run_check(moto_world, aio_session, path)
    assert code == 1
    (fail,) = marked(lines, "✗")
    advised = advised_delay(5.0, 60.0)  # poll detection, the rehearsal's ready
    assert advised == 45.0
    assert fail.startswith("✗ timing (rehearsed 2026-11-28T21:30:00Z on ")
    assert "detect 5s + ready 1m + drain 1m30s + margin 10s = 2m45s of the 2m notice, 45s over" in fail
    assert (f"set the deregistration delay to 45s or less: aws elbv2 modify-target-group-attributes "
            f"--target-group-arn {deployment.target_group_arn} --attributes Key={DELAY_KEY},Value=45") in fail
    assert "! deregistration delay 1m30s: more than the 45s the timing budget leaves" in "\n".join(lines)

    set_delay(moto_world, deployment, 45)  # the advice taken: it fits
    code, lines = await run_check(moto_world, aio_session, path)
    assert code == 0 and marked(lines, "✗") == []
    assert any(line.startswith("✓ deregistration delay 45s") for line in marked(lines, "✓"))


async def test_a_standby_too_slow_for_the_notice_is_told_to_start_earlier(moto_world, aio_session, sound, tmp_path):
    path = write_config(tmp_path, moto_world, [sound])
    rehearsal.write(tmp_path / "state", Rehearsal("lab", sound.standby_ids[0], "2026-11-28T21:30:00Z", "healthy",
                                                  healthy=110.0))
    code, lines = await run_check(moto_world, aio_session, path)
    assert code == 1
    (fail,) = marked(lines, "✗")
    assert "the standby needs 1m50s to be healthy, more than the notice leaves" in fail
    assert 'on_rebalance = "prewarm"' in fail


async def test_slow_health_checks_count_in_the_estimate(moto_world, aio_session, sound, tmp_path):
    moto_world.boto("elbv2").modify_target_group(
        TargetGroupArn=sound.target_group_arn, HealthCheckIntervalSeconds=30, HealthyThresholdCount=5
    )

    code, lines = await run_check(moto_world, aio_session, write_config(tmp_path, moto_world, [sound]))

    assert code == 1
    (health,) = [line for line in marked(lines, "✓") if line.startswith("✓ health check:")]
    assert "a target that answers late needs up to 5 × 30s = 2m30s" in health
    (fail,) = marked(lines, "✗")  # even without the service's boot, 2m30s of checks cannot fit the notice
    assert ("timing: not rehearsed; leaving out your service's boot: "
            "detect 5s + start ~20s + health checks 2m30s") in fail
    assert "the standby needs 2m50s to be healthy" in fail


@pytest.mark.parametrize(
    "healthy, symbol, expected",
    [
        (25.0, "✓", "detect 5s + ready 25s + drain 30s + margin 10s = 1m10s of the 2m notice, 50s to spare"),
        (90.0, "✗", "detect 5s + ready 1m30s + drain 30s + margin 10s = 2m15s of the 2m notice, 15s over"),
    ],
)
async def test_the_last_rehearsal_is_read_back_against_the_notice(
    moto_world, aio_session, sound, tmp_path, healthy, symbol, expected
):
    path = write_config(tmp_path, moto_world, [sound])
    rehearsal.write(tmp_path / "state", Rehearsal("lab", sound.standby_ids[0], "2026-11-28T21:30:00Z", "healthy",
                                                  running=12.0, registered=12.1, healthy=healthy))

    code, lines = await run_check(moto_world, aio_session, path)

    assert code == (0 if symbol == "✓" else 1)
    (timing,) = [line.strip() for line in lines if line.strip().startswith(f"{symbol} timing")]
    assert timing.startswith(f"{symbol} timing (rehearsed 2026-11-28T21:30:00Z on {sound.standby_ids[0]}): {expected}")


async def test_with_sqs_detection_is_a_second_and_a_missing_queue_fails(moto_world, aio_session, sound, tmp_path):
    queue_url = f"{moto_world.endpoint_url}/123456789012/spotguard"
    path = write_config(tmp_path, moto_world, [sound], sqs=queue_url)
    rehearsal.write(tmp_path / "state", Rehearsal("lab", sound.standby_ids[0], "2026-11-28T21:30:00Z", "healthy",
                                                  healthy=20.0))

    code, lines = await run_check(moto_world, aio_session, path)
    assert code == 1
    assert marked(lines, "✗") == ["✗ queue spotguard does not exist — create it: spotguard setup --config PATH"]
    assert any("detect 1s + ready 20s + drain 30s + margin 10s = 1m1s" in line for line in lines)

    moto_world.boto("sqs").create_queue(QueueName="spotguard")
    code, lines = await run_check(moto_world, aio_session, path)
    assert code == 0
    assert any(line.startswith("✓ queue spotguard: exists (arn:aws:sqs:") for line in lines)


async def test_an_unreachable_endpoint_fails_at_the_credentials_and_skips_the_rest(aio_session, tmp_path, moto_world):
    settings = config.load(write_config(tmp_path, moto_world, [moto_world.provision()]))
    dead = "http://127.0.0.1:9"
    out = io.StringIO()
    async with client("sts", "us-east-1", dead, session=aio_session, max_attempts=1) as sts:
        code = await check(settings, config="c.toml", sts=sts, ec2=None, elbv2=None, sqs=None, out=out)
    lines = out.getvalue().splitlines()
    assert code == 1
    assert lines[1].startswith("✗ credentials: EndpointConnectionError")
    assert lines[2:] == ["(the other checks need working credentials: skipped)", "1 problem, 0 warnings"]


# ---------------------------------------------------------------------- pure


def test_a_denied_dry_run_fails_and_names_the_action_and_standby():
    guard = config.GuardSettings(name="g", target_group_arn="arn", standby_instance_ids=("i-0aaaaaaaaaaaaaaaa",))
    sid = guard.standby_instance_ids[0]
    seen = GuardSeen(group={}, attributes={}, health={},
                     dry_runs={("StartInstances", sid): "DryRunOperation",
                               ("StopInstances", sid): "UnauthorizedOperation"})

    lines = permission_lines(guard, seen)

    assert [line.render() for line in lines] == [
        f"✓ permissions: ec2:StartInstances/StopInstances allowed on {sid} (DryRun); "
        "RegisterTargets/DeregisterTargets have no DryRun and are not checked",
        f"✗ not allowed to ec2:StopInstances {sid} — grant it (`spotguard iam-policy --config PATH` prints the "
        "policy the daemon needs)",
    ]


def test_a_refused_describe_names_the_call():
    guard = config.GuardSettings(name="g", target_group_arn="arn:tg", standby_instance_ids=("i-0aaaaaaaaaaaaaaaa",))
    from spotguard.commands.check import group_lines

    (line,) = group_lines(guard, GuardSeen(group=Refused("AccessDenied", "no"), attributes={}, health={}))

    assert line.render() == ("✗ target group arn:tg: elasticloadbalancing:DescribeTargetGroups said AccessDenied — "
                             "give these credentials read access, or check the network")


# ---------------------------------------------------------------------- [ha]

TABLE = "spotguard-ha"
HA = {"table": TABLE, "lease": "30s"}


async def test_with_ha_the_table_and_the_leader_are_checked(moto_world, aio_session, sound, tmp_path):
    moto_world.boto("dynamodb").create_table(**ha.table_spec(TABLE))
    path = write_config(tmp_path, moto_world, [sound], ha=HA)

    code, lines = await run_check(moto_world, aio_session, path)
    assert code == 0, "\n".join(lines)
    assert f"✓ [ha] table {TABLE}: key pk, ACTIVE" in lines
    assert ("! no leader: no daemon holds the lease — start `spotguard run` with this config "
            "(on two hosts for [ha])") in lines
    assert lines[-1] == "0 problems, 2 warnings"

    async with client("dynamodb", moto_world.region, moto_world.endpoint_url, session=aio_session) as ddb:
        leadership = ha.Leadership(ddb, TABLE, lease=30.0, holder="controller-a")
        await leadership.tick()
        code, lines = await run_check(moto_world, aio_session, path)
        assert code == 0
        (leader,) = [line for line in lines if "leader" in line]
        left = re.fullmatch(r"✓ leader: controller-a \(epoch 1\), lease valid for (\d+)s", leader)
        assert left and 20 <= int(left[1]) <= 30, leader  # a 30 s lease, less the time check took
        assert lines[-1] == "0 problems, 1 warning"

        await leadership.release()  # a clean stop
        code, lines = await run_check(moto_world, aio_session, path)
    assert code == 0
    assert any(line.startswith("! no leader: controller-a (epoch 1) released the lease (a clean stop)")
               for line in lines)


async def test_with_ha_a_missing_or_wrong_table_fails_naming_it(moto_world, aio_session, sound, tmp_path):
    path = write_config(tmp_path, moto_world, [sound], ha=HA)
    code, lines = await run_check(moto_world, aio_session, path)
    assert code == 1
    assert marked(lines, "✗") == [
        f"✗ [ha] table {TABLE} does not exist — `spotguard setup --config PATH` creates it"]
    assert not any("leader" in line for line in lines)  # no table, no lease to read

    moto_world.boto("dynamodb").create_table(
        TableName=TABLE, BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "N"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
    )
    code, lines = await run_check(moto_world, aio_session, path)
    assert code == 1
    (fail,) = marked(lines, "✗")
    assert fail == (f"✗ [ha] table {TABLE}: its key is id (HASH, N); spotguard needs pk (HASH, S) alone — "
                    "set ha.table to a new name: `spotguard setup --config PATH` creates it "
                    "(it never changes an existing table)")


def test_the_cli_makes_its_dynamodb_client_only_with_ha(moto_world, sound, tmp_path, capsys):
    moto_world.boto("dynamodb").create_table(**ha.table_spec(TABLE))
    assert cli.main(["check", "--config", str(write_config(tmp_path, moto_world, [sound], ha=HA))]) == 0
    assert f"✓ [ha] table {TABLE}: key pk, ACTIVE" in capsys.readouterr().out.splitlines()


def test_an_expired_lease_warns_with_its_age():
    now = time.time()
    lease = {"holder": "controller-b", "epoch": 7, "expires": now - 42.2, "valid": False}
    line = leader_line(HaSeen(table={}, leader=lease, now=now))
    assert line.render() == ("! no leader: the lease of controller-b (epoch 7) expired 42s ago and nobody renewed it "
                             "— is `spotguard run` running and able to reach DynamoDB? start `spotguard run` with "
                             "this config (on two hosts for [ha])")
    denied = leader_line(HaSeen(table={}, leader=Refused("AccessDeniedException", "no"), now=now))
    assert denied.render() == ("✗ leader: dynamodb:GetItem said AccessDeniedException — "
                               "give these credentials read access, or check the network")


# ---------------------------------------------------------------------- during a failover


DESTRUCTIVE = re.compile(
    r"stop-instances|deregister-targets|start-instances|\bstop it\b|\bstart it\b|\bderegister it\b")


async def test_check_in_every_phase_of_a_real_failover_never_fails_nor_advises_touching_it(
    moto_world, aio_session, sound, tmp_path, aws
):
    """The issue's case: in both-serving check said `✗ standby … is running … — stop it`.
    Through a whole failover and failback on a running daemon, no line is ✗ and none advises
    stopping, starting or deregistering anything; each phase is named."""
    from test_daemon import phase, replace_spot, running

    d, standby = sound, sound.standby_ids[0]
    path = write_config(tmp_path, moto_world, [d], poll="0.2s", grace="3s")
    settings = config.load(path)
    moto_world.set_health(d.target_group_arn, standby, "initial")  # holds standby-starting
    moto_world.hold_draining(d.target_group_arn, standby)  # holds standby-draining
    checked: dict[Phase, list[str]] = {}

    async def check_now(expected: Phase) -> None:
        code, lines = await run_check(moto_world, aio_session, path)
        assert phase(daemon) is expected, "the phase moved on while check ran: hold it longer"
        assert marked(lines, "✗") == [], "\n".join(lines)
        assert not [line for line in lines if DESTRUCTIVE.search(line)], "\n".join(lines)
        assert code == 0
        checked[expected] = lines

    async with running(settings, aws) as daemon:
        await check_now(Phase.SPOT_HEALTHY)
        moto_world.notice(d.spot_request_id)
        await until(lambda: phase(daemon) is Phase.STANDBY_STARTING and standby in moto_world.health(
            d.target_group_arn), what="standby-starting, standby registered")
        await check_now(Phase.STANDBY_STARTING)
        moto_world.set_health(d.target_group_arn, standby, None)  # passes its first check
        await until(lambda: phase(daemon) is Phase.BOTH_SERVING, what="both-serving")
        await until(lambda: d.spot_instance_id not in moto_world.health(d.target_group_arn), what="doomed spot out")
        await check_now(Phase.BOTH_SERVING)
        await replace_spot(moto_world, daemon, d)
        await until(lambda: phase(daemon) is Phase.SPOT_RESTORED, what="spot-restored")
        await check_now(Phase.SPOT_RESTORED)
        await until(lambda: phase(daemon) is Phase.STANDBY_DRAINING, what="standby-draining (held)")
        await check_now(Phase.STANDBY_DRAINING)
    serving = "\n".join(checked[Phase.BOTH_SERVING])
    assert f"✓ standby {standby} is running, healthy in the target group: the failover is under way" in serving
    assert "✓ daemon: both-serving since" in serving



async def test_scheduled_events_of_every_guarded_instance_are_warnings(moto_world, aio_session, sound, tmp_path):
    from datetime import datetime, timezone

    standby = sound.standby_ids[1]
    retire = datetime(2026, 12, 10, 8, 0, tzinfo=timezone.utc)
    moto_world.schedule_event(standby, "instance-retirement", "The instance is running on degraded hardware", retire)
    moto_world.schedule_event(sound.spot_instance_id, "system-maintenance", "Scheduled system maintenance", retire,
                              datetime(2026, 12, 10, 10, 0, tzinfo=timezone.utc))
    moto_world.schedule_event(sound.standby_ids[0], "instance-stop", "[Completed] The instance was stopped", retire)

    code, lines = await run_check(moto_world, aio_session, write_config(tmp_path, moto_world, [sound]))

    assert code == 0, "\n".join(lines)  # said, not failed: nothing is wrong yet
    scheduled = [line for line in marked(lines, "!") if "scheduled" in line]
    assert scheduled == [
        f"! spot {sound.spot_instance_id}: scheduled system-maintenance (2026-12-10 08:00 UTC to 2026-12-10 10:00 UTC):"
        f" Scheduled system maintenance — {machine.SCHEDULED_ADVICE['spot']}",
        f"! standby {standby}: scheduled instance-retirement (2026-12-10 08:00 UTC to unknown): The instance is "
        f"running on degraded hardware — {machine.SCHEDULED_ADVICE['standby']}",
    ]


def test_a_fleets_serving_standbys_are_each_their_slots():
    """Two standbys serve two lost spots of a fleet: check says each is a failover under way (its
    slot's), not the one-spot guard's 'one standby serves a failover'."""
    from spotguard.commands.check import _in_use
    from spotguard.machine import GuardState, Phase, Rules

    rules = Rules(standbys=("i-sb1", "i-sb2"), capacity=3)
    slot = replace(rules, capacity=1)
    slots = (GuardState(slot, Phase.BOTH_SERVING, 1e9, "standby i-sb1 healthy", "i-sb1", holds=()),
             GuardState(slot, Phase.STANDBY_STARTING, 1e9, "interruption notice for spot i-b", "i-sb2", holds=("i-b",)),
             GuardState(slot, Phase.SPOT_HEALTHY, 1e9, "initial", holds=("i-c",)))
    daemon = GuardState(rules, Phase.STANDBY_STARTING, 1e9, "interruption notice for spot i-b", "i-sb2", slots=slots)
    seen = GuardSeen(group={}, attributes={}, health={}, daemon=daemon)
    first, second = _in_use("i-sb1", seen), _in_use("i-sb2", seen)
    assert first.text.startswith("the failover is under way (both-serving") and "standby i-sb1" in first.text
    assert second.text.startswith("the failover is under way (standby-starting") and "standby i-sb2" in second.text
