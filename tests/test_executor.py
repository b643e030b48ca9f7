"""The executor against moto: commands done, idempotent against reality, errors as Failed."""

from __future__ import annotations

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from conftest import guard_for
from httpcapture import CaptureServer
from structlog.testing import capture_logs

from spotguard.aws import client, client_config, clients
from spotguard.executor import Executor
from spotguard.machine import Alert, Deregister, Failed, Register, Start, Stop

# Long enough for a request to leave over loopback however loaded the machine is.
LOOPBACK_DEADLINE = 3.0


@pytest.fixture
def guard(deployment):
    return guard_for(deployment)


@pytest.fixture
def executor(aws, guard):
    return Executor(aws.ec2, aws.elbv2, [guard])


def actions(logs):
    return [e for e in logs if e["event"] == "executor.action"]


async def test_start_and_stop_a_standby(executor, guard, deployment, moto_world):
    standby = deployment.standby_ids[0]
    with capture_logs() as logs:
        assert await executor.run(guard.name, Start(standby)) is None
        assert moto_world.states(standby) == {standby: "running"}
        assert await executor.run(guard.name, Stop(standby)) is None
        assert moto_world.states(standby) == {standby: "stopped"}
    logged = actions(logs)
    assert [(e["action"], e["outcome"], e["changed"], e["code"]) for e in logged] == [
        ("StartInstances", "ok", True, None), ("StopInstances", "ok", True, None)]  # the names metrics use too
    assert all(e["guard"] == guard.name and e["instance_id"] == standby for e in logged)
    assert all(isinstance(e["duration_ms"], int) and e["duration_ms"] >= 0 for e in logged)


async def test_start_running_is_success(executor, guard, deployment):
    with capture_logs() as logs:
        assert await executor.run(guard.name, Start(deployment.spot_instance_id)) is None
    assert (actions(logs)[0]["outcome"], actions(logs)[0]["changed"]) == ("ok", False)


async def test_stop_stopped_is_success(executor, guard, deployment):
    with capture_logs() as logs:
        assert await executor.run(guard.name, Stop(deployment.standby_ids[0])) is None
    assert (actions(logs)[0]["outcome"], actions(logs)[0]["changed"]) == ("ok", False)


async def test_deregister_absent_is_success(executor, guard, deployment, moto_world):
    standby = deployment.standby_ids[0]
    with capture_logs() as logs:
        assert await executor.run(guard.name, Deregister(standby)) is None
    assert (actions(logs)[0]["outcome"], actions(logs)[0]["changed"]) == ("ok", False)
    assert moto_world.health(deployment.target_group_arn) == {deployment.spot_instance_id: "healthy"}


async def test_register_then_deregister(executor, guard, deployment, moto_world):
    standby = deployment.standby_ids[0]
    assert await executor.run(guard.name, Start(standby)) is None
    assert await executor.run(guard.name, Register(standby)) is None
    assert await executor.run(guard.name, Register(standby)) is None  # again: still fine
    assert moto_world.health(deployment.target_group_arn) == {
        deployment.spot_instance_id: "healthy",
        standby: "healthy",
    }
    assert await executor.run(guard.name, Deregister(deployment.spot_instance_id)) is None
    assert moto_world.health(deployment.target_group_arn) == {standby: "healthy"}


async def test_register_uses_target_port(aws, deployment, moto_world):
    guard = guard_for(deployment, target_port=9090)
    executor = Executor(aws.ec2, aws.elbv2, [guard])
    standby = deployment.standby_ids[0]
    await executor.run(guard.name, Start(standby))
    assert await executor.run(guard.name, Register(standby)) is None
    reply = await aws.elbv2.describe_target_health(TargetGroupArn=deployment.target_group_arn)
    ports = {d["Target"]["Id"]: d["Target"]["Port"] for d in reply["TargetHealthDescriptions"]}
    assert ports == {deployment.spot_instance_id: deployment.target_port, standby: 9090}
    assert await executor.run(guard.name, Deregister(standby)) is None
    assert moto_world.health(deployment.target_group_arn) == {deployment.spot_instance_id: "healthy"}


async def test_start_terminated_fails_incorrect_state(executor, guard, deployment, moto_world):
    old = moto_world.terminate_spot(deployment.spot_request_id)
    with capture_logs() as logs:
        failed = await executor.run(guard.name, Start(old))
    assert failed == Failed(Start(old), "IncorrectInstanceState")
    assert actions(logs)[0]["outcome"] == "failed"
    assert actions(logs)[0]["log_level"] == "warning"


async def test_unknown_instance_fails_not_found(executor, guard):
    ghost = "i-0123456789abcdef0"
    assert await executor.run(guard.name, Start(ghost)) == Failed(Start(ghost), "InvalidInstanceID.NotFound")
    assert await executor.run(guard.name, Stop(ghost)) == Failed(Stop(ghost), "InvalidInstanceID.NotFound")


async def test_insufficient_capacity(executor, guard, deployment, moto_world):
    first, second = deployment.standby_ids
    moto_world.inject_error("start", first, "InsufficientInstanceCapacity")
    assert await executor.run(guard.name, Start(first)) == Failed(Start(first), "InsufficientInstanceCapacity")
    assert moto_world.states(first) == {first: "stopped"}
    assert await executor.run(guard.name, Start(second)) is None  # only the chosen instance is refused
    moto_world.clear_error("start", first)
    assert await executor.run(guard.name, Start(first)) is None


async def test_register_stopped_instance_fails(executor, guard, deployment):
    # ELBv2 refuses to register an instance that is not running (InvalidTarget).
    standby = deployment.standby_ids[0]
    assert await executor.run(guard.name, Register(standby)) == Failed(Register(standby), "InvalidTarget")


async def test_target_group_gone(executor, guard, deployment, aws):
    await aws.elbv2.delete_load_balancer(LoadBalancerArn=deployment.load_balancer_arn)
    await aws.elbv2.delete_target_group(TargetGroupArn=deployment.target_group_arn)
    spot = deployment.spot_instance_id
    assert await executor.run(guard.name, Deregister(spot)) == Failed(Deregister(spot), "TargetGroupNotFound")


async def test_alert_is_not_the_executors(executor, guard):
    with capture_logs() as logs:
        assert await executor.run(guard.name, Alert("no capacity")) is None
    assert actions(logs) == []


async def test_network_error_is_failed_not_raised(guard, deployment, aio_session):
    async with clients("us-east-1", "http://127.0.0.1:9", session=aio_session, max_attempts=1) as (ec2, elbv2, _):
        executor = Executor(ec2, elbv2, [guard])
        standby = deployment.standby_ids[0]
        assert await executor.run(guard.name, Start(standby)) == Failed(Start(standby), "EndpointConnectionError")
        assert await executor.run(guard.name, Register(standby)) == Failed(Register(standby), "EndpointConnectionError")


async def test_deadline_is_failed_timeout(guard, deployment, aio_session, moto_world):
    async with clients(moto_world.region, moto_world.endpoint_url, session=aio_session) as (ec2, elbv2, _):
        executor = Executor(ec2, elbv2, [guard], deadline=0.0)
        standby = deployment.standby_ids[0]
        assert await executor.run(guard.name, Start(standby)) == Failed(Start(standby), "Timeout")


def test_client_config_and_error_codes():
    from botocore.exceptions import ClientError, EndpointConnectionError

    from spotguard.aws import SQS_LONG_POLL, client_config, error_code

    assert client_config("sqs").read_timeout > SQS_LONG_POLL
    assert client_config("ec2").retries == {"mode": "standard", "max_attempts": 5}
    assert client_config("ec2").connect_timeout <= 5
    ice = ClientError({"Error": {"Code": "InsufficientInstanceCapacity"}}, "StartInstances")
    assert error_code(ice) == "InsufficientInstanceCapacity"
    assert error_code(EndpointConnectionError(endpoint_url="http://x")) == "EndpointConnectionError"
    assert error_code(TimeoutError()) == "Timeout"


@pytest.mark.parametrize(
    "code,status",
    [("RequestLimitExceeded", 503), ("InternalError", 500)],
    ids=["throttled", "5xx"],
)
async def test_transient_errors_are_retried_by_botocore_then_failed(
    guard, deployment, aio_session, moto_world, code, status
):
    from spotguard.lab.world import ApiFault

    standby = deployment.standby_ids[0]
    # max_attempts=1: one retry after the first try (botocore counts retries, not tries).
    async with clients(moto_world.region, moto_world.endpoint_url, session=aio_session,
                       max_attempts=1) as (ec2, elbv2, _):
        executor = Executor(ec2, elbv2, [guard])
        once = moto_world.api_fault(ApiFault("StartInstances", code=code, status=status, times=1))
        assert await executor.run(guard.name, Start(standby)) is None  # the retry got through
        assert moto_world.api_hits(once) == 1
        moto_world.clear_api_fault(once)
        await executor.run(guard.name, Stop(standby))
        always = moto_world.api_fault(ApiFault("StartInstances", code=code, status=status))
        assert await executor.run(guard.name, Start(standby)) == Failed(Start(standby), code)
        assert moto_world.api_hits(always) == 2  # bounded: the machine decides what next
        assert moto_world.states(standby) == {standby: "stopped"}


async def test_a_slow_answer_past_the_deadline_is_failed_timeout(guard, deployment, aio_session, moto_world):
    """AWS carried the start out but its answer came too late: Failed(Timeout), and the start stands.

    A real proxy forwards the call and withholds AWS's reply, so the deadline runs out only
    after the request surely reached AWS. (With a short deadline and a slow server instead,
    a loaded machine could use up the deadline before the request left: nothing started,
    and the test failed in 2 of 3 full runs.) The deadline is what a loopback request needs
    to leave on any machine: the test lasts that long.
    """
    from awsproxy import AwsProxy

    standby = deployment.standby_ids[0]
    with AwsProxy(moto_world.endpoint_url) as proxy:
        held = proxy.hold("StartInstances", after=True)
        try:
            async with clients(moto_world.region, proxy.url, session=aio_session) as (ec2, elbv2, _):
                executor = Executor(ec2, elbv2, [guard], deadline=LOOPBACK_DEADLINE)
                assert await executor.run(guard.name, Start(standby)) == Failed(Start(standby), "Timeout")
            assert held.arrived.is_set() and proxy.actions.count("StartInstances") == 1
        finally:
            held.drop()
    # The request went on without us, as on AWS: a timed-out start may still start.
    assert moto_world.instance_state(standby) == "running"


# ---------------------------------------------------------------------- every botocore failure is a Failed


@pytest.fixture
def broken_aws():
    """A local HTTP server where AWS should be: it answers whatever the test sets."""
    with CaptureServer() as server:
        yield server


async def run_start(ec2, guard, standby) -> Failed | None:
    return await Executor(ec2, ec2, [guard]).run(guard.name, Start(standby))


async def test_an_unparsable_200_is_failed_not_raised(guard, deployment, broken_aws):
    broken_aws.respond(200, b"")  # a proxy answering 200 with an empty body
    async with client("ec2", "us-east-1", broken_aws.url, max_attempts=1) as ec2:
        assert await run_start(ec2, guard, "i-0123456789abcdef0") == Failed(
            Start("i-0123456789abcdef0"), "ResponseParserError")


async def test_a_read_timeout_is_failed_not_raised(guard, broken_aws, aio_session):
    broken_aws.hold()  # the server accepts and never answers
    config = client_config("ec2", max_attempts=1).merge(AioConfig(read_timeout=0.2))
    async with aio_session.create_client("ec2", "us-east-1", endpoint_url=broken_aws.url, config=config) as ec2:
        assert await run_start(ec2, guard, "i-0123456789abcdef0") == Failed(
            Start("i-0123456789abcdef0"), "ReadTimeoutError")


async def test_missing_credentials_are_failed_not_raised(guard, deployment, moto_world, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    async with client("ec2", moto_world.region, moto_world.endpoint_url, session=get_session(), max_attempts=1) as ec2:
        standby = deployment.standby_ids[0]
        assert await run_start(ec2, guard, standby) == Failed(Start(standby), "NoCredentialsError")
    assert moto_world.states(standby) == {standby: "stopped"}
