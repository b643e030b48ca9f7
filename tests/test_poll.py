"""The poll source against moto: what each guard sees, and how few calls it costs."""

from __future__ import annotations

import pytest
from conftest import guard_for
from structlog.testing import capture_logs

from spotguard.aws import clients
from spotguard.machine import Instance, Observed, Target
from spotguard.sources.poll import Poller, is_notice


async def observe_one(aws, guard) -> Observed:
    seen = await Poller(aws.ec2, aws.elbv2, [guard]).observe()
    return seen[guard.name]


async def test_healthy_picture(aws, deployment):
    d = deployment
    seen = await observe_one(aws, guard_for(d))
    assert seen == Observed(
        spots=(Instance(d.spot_instance_id, "running"),),
        standbys=tuple(Instance(s, "stopped") for s in d.standby_ids),
        targets=(Target(d.spot_instance_id, "healthy"),),
    )


@pytest.mark.parametrize(
    "code",
    ["instance-terminated-no-capacity", "instance-terminated-by-price", "marked-for-stop", "marked-for-hibernation"],
)
async def test_notice_flagged_while_running(aws, deployment, moto_world, code):
    moto_world.notice(deployment.spot_request_id, code)
    seen = await observe_one(aws, guard_for(deployment))
    assert seen.spots == (Instance(deployment.spot_instance_id, "running", notice=True),)


async def test_no_notice_once_the_instance_is_not_running(aws, deployment, moto_world):
    moto_world.notice(deployment.spot_request_id, "marked-for-stop")
    await aws.ec2.stop_instances(InstanceIds=[deployment.spot_instance_id])
    seen = await observe_one(aws, guard_for(deployment))
    assert seen.spots == (Instance(deployment.spot_instance_id, "stopped", notice=False),)


def test_notice_codes():
    assert is_notice("instance-terminated-capacity-oversubscribed")
    assert is_notice("instance-terminated-launch-group-constraint")
    assert is_notice("marked-for-termination")
    assert not is_notice("fulfilled")
    assert not is_notice("capacity-not-available")
    assert not is_notice(None)


async def test_terminated_spot_leaves_no_instance(aws, deployment, moto_world):
    moto_world.notice(deployment.spot_request_id)
    moto_world.terminate_spot(deployment.spot_request_id)
    seen = await observe_one(aws, guard_for(deployment))
    assert seen.spots == ()
    assert seen.targets == ()  # ELBv2 deregistered the terminated target


async def test_terminated_spot_still_named_by_its_request(aws, deployment, moto_world):
    # Between termination and re-fulfilment a request may still name its old instance.
    moto_world.terminate_spot(deployment.spot_request_id, keep_instance_id=True)
    seen = await observe_one(aws, guard_for(deployment))
    assert seen.spots == (Instance(deployment.spot_instance_id, "terminated", notice=False),)


async def test_refulfilled_request_has_new_instance(aws, deployment, moto_world):
    moto_world.terminate_spot(deployment.spot_request_id)
    new = moto_world.fulfil(deployment.spot_request_id)
    seen = await observe_one(aws, guard_for(deployment))
    assert new != deployment.spot_instance_id
    assert seen.spots == (Instance(new, "running"),)


async def test_tag_guard_finds_running_spots_only(aws, moto_world):
    d = moto_world.provision(standbys=1, spot_tags={"Role": "inference-spot", "Env": "lab"})
    guard = guard_for(d, spot_request_ids=(), spot_instance_tags=(("Role", "inference-spot"), ("Env", "lab")))
    # Same key, other value: not this guard's. Same tags but On-Demand: not a spot.
    moto_world.launch_spot(d.subnet_ids[0], {"Role": "other", "Env": "lab"})
    on_demand = moto_world.boto("ec2").run_instances(
        ImageId=d.image_id,
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {"ResourceType": "instance",
             "Tags": [{"Key": "Role", "Value": "inference-spot"}, {"Key": "Env", "Value": "lab"}]}
        ],
    )["Instances"][0]["InstanceId"]
    seen = await observe_one(aws, guard)
    assert seen.spots == (Instance(d.spot_instance_id, "running"),)
    assert on_demand not in {s.id for s in seen.spots}

    moto_world.terminate_spot(d.spot_request_id)
    new = moto_world.fulfil(d.spot_request_id)
    seen = await observe_one(aws, guard)
    assert seen.spots == (Instance(new, "running"),)  # the terminated one is history


async def test_missing_standby_does_not_blind_the_guard(aws, deployment):
    ghost = "i-0123456789abcdef0"
    guard = guard_for(deployment, standby_instance_ids=(ghost, *deployment.standby_ids))
    poller = Poller(aws.ec2, aws.elbv2, [guard])
    with capture_logs() as logs:
        seen = (await poller.observe())[guard.name]
    assert seen.standbys == (
        Instance(ghost, "missing"),
        *(Instance(s, "stopped") for s in deployment.standby_ids),
    )
    assert seen.spots == (Instance(deployment.spot_instance_id, "running"),)
    assert {"poll.describe.fallback", "poll.describe.not_found"} <= {e["event"] for e in logs}
    # One failed batch, then one call per id.
    assert poller.calls["DescribeInstances"] == 1 + 1 + len(deployment.standby_ids) + 1


async def test_unknown_spot_request_is_logged(aws, deployment):
    guard = guard_for(deployment, spot_request_ids=("sir-00000000", deployment.spot_request_id))
    with capture_logs() as logs:
        seen = await observe_one(aws, guard)
    assert seen.spots == (Instance(deployment.spot_instance_id, "running"),)
    assert {"event": "poll.spot_request.missing", "request_id": "sir-00000000", "guards": [guard.name],
            "log_level": "error"} in logs
    assert seen.requests_gone == ("sir-00000000",)


async def test_a_loss_is_logged_once_and_its_return_once(aws, deployment):
    guard = guard_for(deployment, spot_request_ids=("sir-00000000", deployment.spot_request_id))
    poller = Poller(aws.ec2, aws.elbv2, [guard])
    with capture_logs() as logs:
        for _ in range(3):
            await poller.observe()
    assert [e["event"] for e in logs if e["event"].startswith("poll.spot_request")] == ["poll.spot_request.missing"]
    poller.guards = (guard_for(deployment),)  # the config fixed
    with capture_logs() as logs:
        await poller.observe()
    assert {"event": "poll.found_again", "id": "sir-00000000", "log_level": "info"} in logs


async def test_two_guards_one_round_of_calls(aws, moto_world):
    a = moto_world.provision("a", standbys=2)
    b = moto_world.provision("b", standbys=1)
    guards = [guard_for(a, "a"), guard_for(b, "b")]
    poller = Poller(aws.ec2, aws.elbv2, guards)
    seen = await poller.observe()
    assert set(seen) == {"a", "b"}
    assert seen["b"].spots == (Instance(b.spot_instance_id, "running"),)
    assert seen["a"].standbys == tuple(Instance(s, "stopped") for s in a.standby_ids)
    assert dict(poller.calls) == {
        "DescribeSpotInstanceRequests": 1,
        "DescribeInstances": 1,
        "DescribeTargetHealth": 2,  # one per target group
    }


async def test_tag_and_request_guards_cost_one_extra_call(aws, moto_world):
    a = moto_world.provision("a", standbys=1)
    b = moto_world.provision("b", standbys=1, spot_tags={"Role": "b-spot"})
    guards = [guard_for(a, "a"), guard_for(b, "b", spot_request_ids=(), spot_instance_tags=(("Role", "b-spot"),))]
    poller = Poller(aws.ec2, aws.elbv2, guards)
    seen = await poller.observe()
    assert seen["b"].spots == (Instance(b.spot_instance_id, "running"),)
    assert poller.calls["DescribeInstances"] == 2  # by id, and by tag
    assert poller.calls["DescribeSpotInstanceRequests"] == 1


async def test_target_health_override_visible(aws, deployment, moto_world):
    d = deployment
    moto_world.set_health(d.target_group_arn, d.spot_instance_id, "unhealthy")
    seen = await observe_one(aws, guard_for(d))
    assert seen.targets == (Target(d.spot_instance_id, "unhealthy"),)


async def test_draining_target_stays_listed(aws, deployment, moto_world):
    d = deployment
    await aws.elbv2.deregister_targets(TargetGroupArn=d.target_group_arn, Targets=[{"Id": d.spot_instance_id}])
    assert (await observe_one(aws, guard_for(d))).targets == ()
    moto_world.set_health(d.target_group_arn, d.spot_instance_id, "draining")
    assert (await observe_one(aws, guard_for(d))).targets == (Target(d.spot_instance_id, "draining"),)
    moto_world.set_health(d.target_group_arn, d.spot_instance_id, None)
    assert (await observe_one(aws, guard_for(d))).targets == ()


async def test_stopped_registered_target_is_unused(aws, deployment):
    d = deployment
    standby = d.standby_ids[0]
    await aws.ec2.start_instances(InstanceIds=[standby])
    await aws.elbv2.register_targets(TargetGroupArn=d.target_group_arn, Targets=[{"Id": standby}])
    await aws.ec2.stop_instances(InstanceIds=[standby])
    seen = await observe_one(aws, guard_for(d))
    assert Target(standby, "unused") in seen.targets


async def test_missing_target_group_is_reported_for_its_guard_only(aws, moto_world):
    a = moto_world.provision("a", standbys=1)
    b = moto_world.provision("b", standbys=1)
    await aws.elbv2.delete_load_balancer(LoadBalancerArn=b.load_balancer_arn)  # frees the target group
    await aws.elbv2.delete_target_group(TargetGroupArn=b.target_group_arn)
    poller = Poller(aws.ec2, aws.elbv2, [guard_for(a, "a"), guard_for(b, "b")])
    with capture_logs() as logs:
        seen = await poller.observe()
    assert set(seen) == {"a", "b"}
    assert seen["b"].target_group_gone and seen["b"].targets == ()
    assert seen["b"].spots == (Instance(b.spot_instance_id, "running"),)  # the rest is still seen
    assert not seen["a"].target_group_gone and seen["a"].targets
    assert any(e["event"] == "poll.target_group.missing" and e["guards"] == ["b"] for e in logs)


async def test_an_unreachable_endpoint_is_each_guards_poll_error(deployment, aio_session):
    # A port nothing listens on: the connection is refused at once (one attempt, no backoff).
    dead = "http://127.0.0.1:9"
    async with clients("us-east-1", dead, session=aio_session, max_attempts=1) as (ec2, elbv2, _):
        poller = Poller(ec2, elbv2, [guard_for(deployment), guard_for(deployment, "other")])
        with capture_logs() as logs:
            seen = await poller.observe()
    assert {name: (type(r).__name__, r.code) for name, r in seen.items()} == {
        "inference": ("PollError", "EndpointConnectionError"), "other": ("PollError", "EndpointConnectionError")}
    assert any(e["event"] == "poll.describe.failed" for e in logs)
    assert poller.errors[("DescribeSpotInstanceRequests", "EndpointConnectionError")] == 1


# ---------------------------------------------------------------------- steady guards reuse target health


async def test_a_steady_guards_health_is_reused_for_a_third_of_unhealthy_grace(aws, deployment):
    guard = guard_for(deployment, unhealthy_grace=30.0)
    poller = Poller(aws.ec2, aws.elbv2, [guard])
    described = []
    for now in (0.0, 5.0, 9.9, 10.0, 15.0):
        before = poller.calls["DescribeTargetHealth"]
        seen = await poller.observe(steady={guard.name}, now=now)
        described.append(poller.calls["DescribeTargetHealth"] - before)
        assert seen[guard.name].targets == (Target(deployment.spot_instance_id, "healthy"),)
    assert described == [1, 0, 0, 1, 0]
    assert poller.calls["DescribeSpotInstanceRequests"] == poller.calls["DescribeInstances"] == 5


async def test_a_guard_not_said_steady_is_described_every_round(aws, deployment):
    guard = guard_for(deployment)
    poller = Poller(aws.ec2, aws.elbv2, [guard])
    for now in (0.0, 1.0, 2.0):
        await poller.observe(steady=(), now=now)
    assert poller.calls["DescribeTargetHealth"] == 3


async def test_health_not_all_healthy_is_described_every_round(aws, deployment, moto_world):
    guard = guard_for(deployment, unhealthy_grace=30.0)
    poller = Poller(aws.ec2, aws.elbv2, [guard])
    moto_world.set_health(deployment.target_group_arn, deployment.spot_instance_id, "unhealthy")
    for now in (0.0, 1.0, 2.0):
        seen = await poller.observe(steady={guard.name}, now=now)
        assert seen[guard.name].targets == (Target(deployment.spot_instance_id, "unhealthy"),)
    assert poller.calls["DescribeTargetHealth"] == 3


async def test_an_instance_change_gets_the_group_described_in_the_same_round(aws, deployment, moto_world):
    guard = guard_for(deployment, unhealthy_grace=30.0)
    poller = Poller(aws.ec2, aws.elbv2, [guard])
    await poller.observe(steady={guard.name}, now=0.0)
    standby = deployment.standby_ids[0]
    moto_world.set_state(standby, "running")  # started by hand
    await aws.elbv2.register_targets(TargetGroupArn=deployment.target_group_arn, Targets=[{"Id": standby}])
    seen = await poller.observe(steady={guard.name}, now=1.0)
    assert poller.calls["DescribeTargetHealth"] == 2
    assert standby in {t.id for t in seen[guard.name].targets}


async def test_a_notice_in_the_request_status_gets_the_group_described(aws, deployment, moto_world):
    guard = guard_for(deployment, unhealthy_grace=30.0)
    poller = Poller(aws.ec2, aws.elbv2, [guard])
    await poller.observe(steady={guard.name}, now=0.0)
    moto_world.notice(deployment.spot_request_id)
    seen = await poller.observe(steady={guard.name}, now=1.0)
    assert seen[guard.name].spots[0].notice
    assert poller.calls["DescribeTargetHealth"] == 2


async def test_a_clock_stepped_back_gets_the_group_described(aws, deployment):
    guard = guard_for(deployment, unhealthy_grace=30.0)
    poller = Poller(aws.ec2, aws.elbv2, [guard])
    await poller.observe(steady={guard.name}, now=100.0)
    await poller.observe(steady={guard.name}, now=50.0)
    assert poller.calls["DescribeTargetHealth"] == 2


async def test_only_the_steady_guards_groups_are_reused(aws, moto_world):
    a = moto_world.provision("a", standbys=1)
    b = moto_world.provision("b", standbys=1)
    poller = Poller(aws.ec2, aws.elbv2, [guard_for(a, "a"), guard_for(b, "b")])
    await poller.observe(steady={"a", "b"}, now=0.0)
    for now in (1.0, 2.0, 3.0):
        await poller.observe(steady={"a"}, now=now)  # b is failing over
    assert poller.calls["DescribeTargetHealth"] == 2 + 3
