"""Blast radius and bounded waits: one guard's trouble never blinds another, no guard touches
what is not its own, one daemon per state directory, and nothing waits unbounded.

End to end against moto: AWS faults on one target group or one API, SQS notices
while the poll is stuck, configs that name another guard's instance, real
`spotguard run` processes (a second one on the same state directory, one frozen
with SIGSTOP, one stopped while its Discord webhook trickles), and a poll that
must page.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from configs import daemon_settings, write_config
from httpcapture import CaptureServer
from structlog.testing import capture_logs
from test_daemon import _warning, health, phase, running, state
from waiting import until

from spotguard.lab.world import ApiFault
from spotguard.machine import Phase
from spotguard.sources.poll import Poller

fault = pytest.mark.fault


def named(world, name: str, standbys: int = 1):
    return replace(world.provision(name, standbys=standbys), name=name)


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


# ---------------------------------------------------------------------- one guard's trouble is its own


@fault(fault="one target group's DescribeTargetHealth denied or stuck", phase="spot-healthy",
       outcome="only its guard is blind; another guard's notice is acted on within a poll")
@pytest.mark.parametrize("trouble", [
    ApiFault("DescribeTargetHealth", code="AccessDenied"),  # a wrong policy, a deleted permission
    ApiFault("DescribeTargetHealth", delay=30.0),  # throttled or stuck: the call never ends in time
], ids=["denied", "stuck"])
async def test_one_target_groups_trouble_never_blinds_another_guard(tmp_path, moto_world, aws, trouble):
    a, b = named(moto_world, "alpha"), named(moto_world, "beta")
    settings = daemon_settings(tmp_path, moto_world, [a, b], poll="0.2s")
    async with running(settings, aws) as daemon:
        moto_world.api_fault(replace(trouble, match=a.target_group_arn))
        noticed = time.monotonic()
        moto_world.notice(b.spot_request_id)  # the poll path alone: no SQS here
        await until(lambda: state(moto_world, b.standby_ids[0]) == "running", what="beta's standby started")
        assert time.monotonic() - noticed < 3.0  # a few 0.2 s polls, not alpha's 10 s call deadline (or forever)
        await until(lambda: phase(daemon, "beta") is Phase.BOTH_SERVING, what="beta fails over")
        assert phase(daemon, "alpha") is Phase.SPOT_HEALTHY and state(moto_world, a.standby_ids[0]) == "stopped"


@fault(fault="DescribeInstances stuck (throttled) when an SQS notice comes", phase="spot-healthy",
       outcome="the notice is acted on at once; the poll is not waited for")
async def test_an_sqs_notice_never_waits_for_a_stuck_poll(tmp_path, moto_world, deployment, aws):
    d, standby = deployment, deployment.standby_ids[0]
    sqs = moto_world.boto("sqs")
    url = sqs.create_queue(QueueName="spotguard")["QueueUrl"]
    settings = daemon_settings(tmp_path, moto_world, [d], poll="0.5s", sqs=url)
    async with running(settings, aws):
        moto_world.api_fault(ApiFault("DescribeInstances", delay=8.0))  # every round now hangs in the poll
        await until(lambda: moto_world.api_hits(ApiFault("DescribeInstances", delay=8.0)) >= 1, what="a poll stuck")
        sent = time.monotonic()
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(_warning(d.spot_instance_id)))
        await until(lambda: state(moto_world, standby) == "running", what="standby started")
        assert time.monotonic() - sent < 2.0, "the notice waited for the stuck poll"


@fault(fault="DescribeSpotInstanceRequests throttled", phase="spot-healthy", outcome="each retry logged as backing off")
async def test_a_throttled_poll_says_it_is_backing_off(tmp_path, moto_world, deployment, aws):
    settings = daemon_settings(tmp_path, moto_world, [deployment], poll="0.5s")
    with capture_logs() as logs:
        async with running(settings, aws):
            moto_world.api_fault(ApiFault("DescribeSpotInstanceRequests", code="RequestLimitExceeded"))
            await until(lambda: events(logs, "aws.retrying"), what="a retry said")
    retrying = events(logs, "aws.retrying")[0]
    assert (retrying["call"], retrying["code"], retrying["log_level"]) == (
        "ec2.DescribeSpotInstanceRequests", "RequestLimitExceeded", "warning")


# ---------------------------------------------------------------------- ownership


@fault(fault="a guard's standby_instance_ids names another guard's spot", phase="spot-restored",
       outcome="never started, stopped or registered by it; said once")
async def test_a_guard_never_stops_another_guards_serving_spot(tmp_path, moto_world, aws):
    a, b = named(moto_world, "alpha"), named(moto_world, "beta")
    wrong = {"name": "beta", "target_group_arn": b.target_group_arn, "spot_request_ids": [b.spot_request_id],
             "standby_instance_ids": [a.spot_instance_id, *b.standby_ids], "failback_grace": "1s"}
    settings = daemon_settings(tmp_path, moto_world, [a, wrong], poll="0.2s")
    with capture_logs() as logs:
        async with running(settings, aws) as daemon:
            rounds = daemon.rounds
            await until(lambda: daemon.rounds >= rounds + 15, what="fifteen rounds, five failback graces")
            assert phase(daemon, "beta") is Phase.SPOT_HEALTHY  # alpha's running spot is no stray standby of beta's
    assert state(moto_world, a.spot_instance_id) == "running"
    assert health(moto_world, a) == {a.spot_instance_id: "healthy"}
    assert a.spot_instance_id not in health(moto_world, b)
    said = [e for e in events(logs, "guard.alert") if e["guard"] == "beta" and "another guard" in e["text"]]
    assert len(said) == 1 and a.spot_instance_id in said[0]["text"]


@fault(fault="two guards' tags find the same spot", phase="spot-healthy",
       outcome="the first guard keeps it; the other never registers it in its group")
async def test_a_spot_two_guards_find_by_tags_is_the_first_guards(tmp_path, moto_world, aws):
    a = replace(moto_world.provision("alpha", standbys=1, spot_tags={"Role": "svc", "Team": "x"}), name="alpha")
    b = named(moto_world, "beta")
    # Written past check-config's rule (it refuses the overlap): the daemon must hold on its own.
    guards = [{"name": "alpha", "target_group_arn": a.target_group_arn,
               "spot_instance_tags": {"Role": "svc", "Team": "x"}, "standby_instance_ids": list(a.standby_ids)},
              {"name": "beta", "target_group_arn": b.target_group_arn, "spot_request_ids": [b.spot_request_id],
               "standby_instance_ids": list(b.standby_ids)}]
    poller_settings = daemon_settings(tmp_path, moto_world, guards)
    beta_by_tags = replace(poller_settings.guards[1], spot_request_ids=(), spot_instance_tags=(("Role", "svc"),))
    poller = Poller(aws.ec2, aws.elbv2, [poller_settings.guards[0], beta_by_tags])
    seen = await poller.observe()
    assert [i.id for i in seen["alpha"].spots] == [a.spot_instance_id]
    assert a.spot_instance_id not in [i.id for i in seen["beta"].spots]
    assert seen["beta"].disputed == {a.spot_instance_id} and a.spot_instance_id in seen["beta"].foreign


# ---------------------------------------------------------------------- real processes


class Daemon:
    """`spotguard run` as a process; its JSON log lines read back from a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "spotguard", "run", "--config", str(config)],
                                         stdout=out, stderr=subprocess.STDOUT)

    def events(self, name: str | None = None) -> list[dict]:
        lines = [line for line in self.log.read_text().splitlines() if line.startswith("{")]
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # being written
        return [e for e in out if name is None or e["event"] == name]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@fault(fault="a second `spotguard run` on the same state_dir", phase="any",
       outcome="exits 1 naming the holder's pid; the first runs on; status still reads")
async def test_one_daemon_per_state_directory(tmp_path, moto_world, deployment):
    config = write_config(tmp_path, moto_world, [deployment], poll="0.5s")
    first = Daemon(config, tmp_path / "first.jsonl")
    try:
        await until(lambda: first.events("daemon.ready"), what="the first daemon ready")
        second = subprocess.run([sys.executable, "-m", "spotguard", "run", "--config", str(config)],
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        (line,) = [json.loads(x) for x in second.stdout.splitlines() if "daemon.already_running" in x]
        assert line["holder"] == f"pid {first.proc.pid}" and line["level"] == "critical"
        status = subprocess.run([sys.executable, "-m", "spotguard", "status", "--config", str(config)],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "guard lab: spot-healthy" in status.stdout
        assert first.proc.poll() is None
    finally:
        first.stop()


@fault(fault="the Discord webhook trickles its answer", phase="any",
       outcome="SIGTERM: the daemon exits within seconds; what was not sent is logged as dropped")
async def test_sigterm_ends_the_daemon_within_seconds_whatever_discord_does(tmp_path, moto_world, deployment):
    with CaptureServer() as discord:
        discord.respond(200, {"id": "1" * 200}, trickle=1.0)  # a byte a second: a post never ends on its own
        config = write_config(tmp_path, moto_world, [deployment], poll="0.5s",
                              discord={"webhook_url": discord.url + "/api/webhooks/1/token"})
        daemon = Daemon(config, tmp_path / "daemon.jsonl")
        try:
            await until(lambda: daemon.events("daemon.ready"), what="ready")
            moto_world.notice(deployment.spot_request_id)  # transitions and alerts to post
            await until(lambda: len(discord.requests) >= 1, what="a post stuck on the webhook")
            stopped = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(timeout=30) == 0
            took = time.monotonic() - stopped
        finally:
            daemon.stop()
    assert took < 5.0, f"{took:.1f}s from SIGTERM to exit"  # TimeoutStopSec is 60 s; a stuck post waited forever
    assert daemon.events("daemon.stopped") and daemon.events("notify.dropped")


@fault(fault="the daemon frozen (SIGSTOP) past standby_ready_timeout", phase="standby-starting",
       outcome="on waking it registers the standby that booted meanwhile; nothing given up or cold-started")
async def test_a_frozen_daemon_registers_the_standby_that_booted_meanwhile(tmp_path, moto_world, deployment):
    d, standby, second = deployment, deployment.standby_ids[0], deployment.standby_ids[1]
    moto_world.model_transitions()  # StartInstances leaves the standby pending until the test boots it
    # A 5 s ready timeout, a 10 s freeze; at a 0.5 s poll, gaps up to 3 s still count as watched.
    config = write_config(tmp_path, moto_world, [d], poll="0.5s", ready="5s")
    daemon = Daemon(config, tmp_path / "daemon.jsonl")
    try:
        await until(lambda: daemon.events("daemon.ready"), what="ready")
        moto_world.notice(d.spot_request_id)
        await until(lambda: state(moto_world, standby) == "pending", what="standby starting")
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            moto_world.set_state(standby, "running")  # it booted while nobody looked
            time.sleep(10.0)  # frozen past the ready timeout (a frozen process cannot be waited on)
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        await until(lambda: standby in health(moto_world, d), what="the booted standby registered")
        assert state(moto_world, second) == "stopped"  # no cold second standby
        assert not [e for e in daemon.events("executor.action") if e["instance_id"] == second]
        assert state(moto_world, standby) == "running"
        assert not [e for e in daemon.events("guard.alert") if "not healthy after" in e["text"]]
    finally:
        daemon.stop()


# ---------------------------------------------------------------------- a poll that must page


async def test_the_poll_pages_through_describe_instances(tmp_path, moto_world, deployment, aws):
    """moto pages DescribeInstances at 100 reservations, as AWS may: a page left unread was a
    standby seen `missing`, and with 50 guards a false failover."""
    ec2 = moto_world.boto("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    described = ec2.describe_instances(InstanceIds=[deployment.standby_ids[0]])
    subnet = described["Reservations"][0]["Instances"][0]["SubnetId"]
    extra = [ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet)["Instances"][0]["InstanceId"]
             for _ in range(105)]  # one reservation each
    ec2.stop_instances(InstanceIds=extra)
    settings = daemon_settings(tmp_path, moto_world, [deployment],
                               guard={"standby_instance_ids": [*deployment.standby_ids, *extra]})
    poller = Poller(aws.ec2, aws.elbv2, settings.guards)
    seen = (await poller.observe())[deployment.name]
    assert {i.state for i in seen.standbys} == {"stopped"}  # none `missing`
    assert len(seen.standbys) == 107 and poller.calls["DescribeInstances"] >= 2


def test_a_wall_clock_step_does_not_move_the_daemons_clock(monkeypatch):
    """Timers run on the monotonic clock: an NTP step of an hour (either way) is not an hour
    of ready timeout or grace. The daemon's `now` is the start's wall time plus monotonic time."""
    from spotguard import daemon as daemon_module

    clock = daemon_module.SteadyClock()
    before = clock()
    real = time.time
    for step in (3600.0, -3600.0):
        monkeypatch.setattr(daemon_module.time, "time", lambda step=step: real() + step)
        assert abs(clock() - before) < 5.0
    monkeypatch.undo()
    assert abs(daemon_module.SteadyClock()() - time.time()) < 1.0  # and it reads as wall time
