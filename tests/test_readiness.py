"""register_when = "ready" end to end: the daemon registers a standby once it answers its health check.

The daemon runs against moto (a VPC of 127.N.0.0/16, so each instance's private
address is loopback); the standby's service is a real HTTP server bound to the
standby's own private address, or the agent on the "host" says it is ready
through moto's SQS.
"""

from __future__ import annotations

from configs import daemon_settings
from structlog.testing import capture_logs
from test_daemon import phase, running
from test_probe import ADDRESS, Service
from waiting import until

from spotguard.agent import Agent, ReadyCheck
from spotguard.lab.imds import InstanceMetadata
from spotguard.machine import Phase


async def test_a_standby_is_registered_once_it_answers_and_is_healthy_after_one_check(tmp_path, moto_world, aws):
    d = moto_world.provision(standbys=1)
    sid = d.standby_ids[0]
    async with Service(503, address=moto_world.private_address(sid)) as service:
        settings = daemon_settings(tmp_path, moto_world, [d], guard={"register_when": "ready",
                                                                    "target_port": service.port})
        with capture_logs() as logs:
            async with running(settings, aws) as daemon:
                moto_world.notice(d.spot_request_id)
                await until(lambda: moto_world.states(sid)[sid] == "running", what="standby started")
                # Warming up: it answers 503, and many probes and rounds later it is still not in the group.
                await until(lambda: len(service.heads) >= 3, what="the standby probed")
                rounds = daemon.rounds
                await until(lambda: daemon.rounds >= rounds + 3, what="three more rounds")
                assert sid not in moto_world.registered_targets(d.target_group_arn)
                assert phase(daemon) is Phase.STANDBY_STARTING
                service.status = 200
                await until(lambda: sid in moto_world.registered_targets(d.target_group_arn), what="registered")
                await until(lambda: phase(daemon) is Phase.BOTH_SERVING, what="both-serving")
    heads = {h.split(b"\r\n", 1)[0] for h in service.heads}
    assert heads == {b"GET /health HTTP/1.1"}  # the target group's own check: its path, on the traffic port
    ready = [e for e in logs if e["event"] == "probe.ready"]
    assert [(e["instance_id"], e["address"]) for e in ready] == [(sid, f"{service.address}:{service.port}")]
    assert not [e for e in logs if "registered without knowing" in str(e.get("text", ""))]


async def test_the_agent_saying_ready_registers_a_standby_the_daemon_cannot_reach(tmp_path, moto_world, aws):
    """Nothing answers on the standby's address from the daemon; the agent on it checks localhost."""
    d = moto_world.provision(standbys=1)
    sid = d.standby_ids[0]
    queue = moto_world.boto("sqs").create_queue(QueueName="spotguard")["QueueUrl"]
    settings = daemon_settings(tmp_path, moto_world, [d], sqs=queue, guard={"register_when": "ready"})
    imds = InstanceMetadata(sid)
    await imds.start()
    try:
        async with Service(200) as local, running(settings, aws) as daemon:
            moto_world.notice(d.spot_request_id)
            await until(lambda: phase(daemon) is Phase.STANDBY_STARTING, what="failover")
            await until(lambda: moto_world.states(sid)[sid] == "running", what="standby started")
            rounds = daemon.rounds
            await until(lambda: daemon.rounds >= rounds + 3, what="three more rounds")
            assert sid not in moto_world.registered_targets(d.target_group_arn)  # refused from here: waiting
            ready = ReadyCheck.of_url(f"http://{ADDRESS}:{local.port}/health")
            async with Agent(imds.url, aws.sqs, queue, ready=ready, boot_id=lambda: "boot") as agent:
                assert await agent.poll_once() == ["spotguard Instance Ready"]
            await until(lambda: sid in moto_world.registered_targets(d.target_group_arn), what="registered")
            await until(lambda: phase(daemon) is Phase.BOTH_SERVING, what="both-serving")
    finally:
        await imds.close()
