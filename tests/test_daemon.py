"""The daemon end to end against moto in server mode: failover, failback, restarts.

The daemon runs as a user runs it (a TOML config, real aiobotocore clients on
moto's endpoint); the tests play EC2 by driving moto's backend through the
world: a notice flips the spot request's status while its instance runs, the
instance is terminated later, the persistent request is fulfilled again with a
new instance, and target health is set where ALB timing matters.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

import pytest
from configs import daemon_settings
from httpcapture import CaptureServer
from waiting import DEADLINE, until

from spotguard.daemon import build, serve
from spotguard.machine import Notice, Phase
from spotguard.notify import Notifier


@asynccontextmanager
async def running(settings, aws, notifier=None, *, kill: bool = False, observers=()):
    """The daemon in a task; on exit stopped as by SIGTERM, or with `kill` cancelled
    mid-flight as by kill -9 (only the state file survives)."""
    notifier = notifier or Notifier(None)
    await notifier.start()
    daemon = build(settings, aws, notifier, observers)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(daemon, settings, aws, stop))
    try:
        await until(lambda: daemon.rounds >= 1 or task.done(), what="first round")
        yield daemon
    finally:
        if kill:
            task.cancel()
        stop.set()
        await asyncio.wait([task], timeout=DEADLINE)
        assert task.done()
        await notifier.close()


def phase(daemon, name: str | None = None) -> Phase:
    guard = daemon.guards[name] if name else next(iter(daemon.guards.values()))
    return guard.state.phase


def health(world, d) -> dict[str, str]:
    return world.health(d.target_group_arn)


def state(world, iid: str) -> str:
    return world.states(iid)[iid]


async def fail_over(world, daemon, d):
    """Notice → standby healthy → doomed spot out; returns the doomed spot's id."""
    spot = d.spot_instance_id if daemon.rounds < 2 else _current_spot(world, d)
    world.notice(d.spot_request_id)
    await until(lambda: phase(daemon, d.name) is Phase.BOTH_SERVING, what="both-serving")
    await until(lambda: spot not in health(world, d), what="doomed spot deregistered")
    return spot


def _current_spot(world, d) -> str:
    return world._spot_request(d.spot_request_id).instance.id


async def replace_spot(world, daemon, d) -> str:
    """The doomed spot terminates; capacity returns with a new instance."""
    world.terminate_spot(d.spot_request_id)
    new = world.fulfil(d.spot_request_id)
    await until(lambda: health(world, d).get(new) == "healthy", what="new spot registered")
    return new


async def test_full_cycle_failover_then_failback_and_again(tmp_path, moto_world, deployment, aws):
    settings = daemon_settings(tmp_path, moto_world, [deployment], poll="1s", grace="2s")
    d, standby = deployment, deployment.standby_ids[0]
    # The standby will look like a fresh ALB target: `initial` until we say it passed a check.
    moto_world.set_health(d.target_group_arn, standby, "initial")
    async with running(settings, aws) as daemon:
        assert phase(daemon) is Phase.SPOT_HEALTHY
        noticed = time.monotonic()
        moto_world.notice(d.spot_request_id)
        await until(lambda: state(moto_world, standby) == "running", what="standby started")
        started_after = time.monotonic() - noticed
        assert started_after <= 1.0 + 2.0, f"standby started {started_after:.1f}s after the notice"

        await until(lambda: standby in health(moto_world, d), what="standby registered")
        rounds = daemon.rounds
        await until(lambda: daemon.rounds >= rounds + 2, what="two more rounds")
        # The standby is not healthy yet: the doomed spot must still be serving.
        assert health(moto_world, d)[d.spot_instance_id] == "healthy"
        assert phase(daemon) is Phase.STANDBY_STARTING

        moto_world.set_health(d.target_group_arn, standby, None)  # passed its first check
        await until(lambda: d.spot_instance_id not in health(moto_world, d), what="doomed spot out")
        assert phase(daemon) is Phase.BOTH_SERVING
        assert state(moto_world, d.standby_ids[1]) == "stopped"

        new = await replace_spot(moto_world, daemon, d)
        await until(lambda: phase(daemon) is Phase.SPOT_RESTORED, what="spot-restored")
        restored = time.monotonic()
        await until(lambda: standby not in health(moto_world, d), what="standby deregistered")
        assert time.monotonic() - restored >= 2.0 - 1.0  # the grace, less one poll of observation lag
        await until(lambda: state(moto_world, standby) == "stopped", what="standby stopped")
        await until(lambda: phase(daemon) is Phase.SPOT_HEALTHY, what="back to spot-healthy")
        assert health(moto_world, d) == {new: "healthy"}

        # And once more: the cycle repeats cleanly on the new spot.
        moto_world.notice(d.spot_request_id)
        await until(lambda: phase(daemon) is Phase.BOTH_SERVING, what="second failover")
        # The phase is recorded before its commands run: wait for the deregistration itself.
        await until(lambda: health(moto_world, d) == {standby: "healthy"}, what="serving on the standby alone")
        await replace_spot(moto_world, daemon, d)
        await until(lambda: phase(daemon) is Phase.SPOT_HEALTHY, what="second failback")
        assert state(moto_world, standby) == "stopped"
        assert state(moto_world, d.standby_ids[1]) == "stopped"


async def test_a_fleet_covers_two_lost_spots_with_two_standbys_and_releases_one_per_new_spot(
        tmp_path, moto_world, deployment, aws):
    """Three spot requests behind one target group (capacity 3), two standbys. Two notices at
    once start both standbys; each doomed spot serves until the standbys are healthy; after the
    spots are reclaimed, each refilled request releases one standby after the grace (the later
    in the pool first), and once both are back no standby runs."""
    d, (first, second) = deployment, deployment.standby_ids
    (request2, spot2), (request3, spot3) = moto_world.add_spot(d), moto_world.add_spot(d)
    settings = daemon_settings(tmp_path, moto_world, [d], poll="0.2s", grace="1s",
                               guard={"spot_request_ids": [d.spot_request_id, request2, request3]})
    assert settings.guards[0].rules().capacity == 3
    for sb in (first, second):
        moto_world.set_health(d.target_group_arn, sb, "initial")
    async with running(settings, aws) as daemon:
        await until(lambda: len(daemon.guards[d.name].state.slots) == 3, what="three slots")
        moto_world.notice(d.spot_request_id)
        moto_world.notice(request2)
        await until(lambda: {first, second} <= set(health(moto_world, d)), what="both standbys registered")
        rounds = daemon.rounds
        await until(lambda: daemon.rounds >= rounds + 2, what="two more rounds")
        # Full capacity meanwhile: both doomed spots serve beside the third.
        assert all(health(moto_world, d)[s] == "healthy" for s in (d.spot_instance_id, spot2, spot3))
        for sb in (first, second):
            moto_world.set_health(d.target_group_arn, sb, None)  # passed its first check
        await until(lambda: not {d.spot_instance_id, spot2} & set(health(moto_world, d)), what="doomed spots out")
        assert health(moto_world, d) == {first: "healthy", second: "healthy", spot3: "healthy"}
        moto_world.terminate_spot(d.spot_request_id)
        moto_world.terminate_spot(request2)
        new1 = moto_world.fulfil(d.spot_request_id)
        await until(lambda: health(moto_world, d).get(new1) == "healthy", what="first spot back")
        await until(lambda: state(moto_world, second) == "stopped", what="the later standby stopped")
        assert state(moto_world, first) == "running" and health(moto_world, d)[first] == "healthy"
        new2 = moto_world.fulfil(request2)
        await until(lambda: state(moto_world, first) == "stopped", what="the other standby stopped")
        await until(lambda: phase(daemon) is Phase.SPOT_HEALTHY, what="every slot back on spot")
        assert health(moto_world, d) == {new1: "healthy", new2: "healthy", spot3: "healthy"}


async def test_a_late_standby_is_said_and_its_doomed_spot_leaves_just_before_the_deadline(
        tmp_path, moto_world, deployment, aws):
    """Capacity 2, a standby that never gets healthy: the alert comes late_warning before the
    notice's deadline, and the doomed spot leaves the group deregister_ahead before it (the other
    spot serves), rather than failing health checks once it is gone."""
    d, standby = deployment, deployment.standby_ids[0]
    request2, spot2 = moto_world.add_spot(d)
    settings = daemon_settings(tmp_path, moto_world, [d], poll="0.2s",
                               guard={"spot_request_ids": [d.spot_request_id, request2], "late_warning": "6s",
                                      "deregister_ahead": "3s"})
    moto_world.set_health(d.target_group_arn, standby, "initial")  # and it stays so
    with CaptureServer() as discord:
        notifier = Notifier(discord.url + "/api/webhooks/1/secret")
        async with running(settings, aws, notifier) as daemon:
            deadline = daemon.clock() + 9.0
            daemon.push(Notice(d.spot_instance_id, deadline=deadline))
            late = f"not healthy 6s before spot {d.spot_instance_id} dies"
            await until(lambda: any(late in r.json["content"] for r in discord.requests), what="late alert")
            assert daemon.clock() < deadline - 5.0
            assert d.spot_instance_id in health(moto_world, d)
            await until(lambda: d.spot_instance_id not in health(moto_world, d), what="doomed spot out")
            out = daemon.clock()
            assert deadline - 3.0 - 0.5 <= out < deadline, (out, deadline)  # deregister_ahead, a poll's lag
            assert health(moto_world, d)[spot2] == "healthy"


class Recorder:
    """An observer keeping what it is told, as metrics and the ledger will."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def event(self, guard, event, old, new, at):
        self.seen.append(("event", guard, type(event).__name__))

    def transition(self, guard, old, new, at, slot=None):
        self.seen.append(("transition", guard, old.phase, new.phase))

    def action(self, guard, command, failed, seconds, at):
        assert seconds >= 0
        self.seen.append(("action", guard, type(command).__name__, failed))


class Broken:
    def __getattr__(self, name):
        def hook(*args):
            raise RuntimeError("observer bug")
        return hook


async def test_observers_are_told_and_a_broken_one_stops_nothing(tmp_path, moto_world, deployment, aws):
    settings = daemon_settings(tmp_path, moto_world, [deployment])
    recorder = Recorder()
    async with running(settings, aws, observers=(Broken(), recorder)) as daemon:
        await fail_over(moto_world, daemon, deployment)
    name = deployment.name
    assert ("transition", name, Phase.SPOT_HEALTHY, Phase.STANDBY_STARTING) in recorder.seen
    assert ("transition", name, Phase.STANDBY_STARTING, Phase.BOTH_SERVING) in recorder.seen
    actions = [s[2] for s in recorder.seen if s[0] == "action"]
    assert actions[:2] == ["Start", "Register"] and "Deregister" in actions
    assert ("event", name, "Observed") in recorder.seen


async def test_two_guards_in_one_daemon(tmp_path, moto_world, aws):
    a = moto_world.provision("alpha", standbys=1)
    b = moto_world.provision("beta", standbys=1)
    settings = daemon_settings(tmp_path, moto_world, [_named(a, "alpha"), _named(b, "beta")])
    async with running(settings, aws) as daemon:
        await fail_over(moto_world, daemon, _named(a, "alpha"))
        assert phase(daemon, "beta") is Phase.SPOT_HEALTHY
        assert state(moto_world, b.standby_ids[0]) == "stopped"
        await fail_over(moto_world, daemon, _named(b, "beta"))
        for d, name in ((a, "alpha"), (b, "beta")):
            await replace_spot(moto_world, daemon, _named(d, name))
        await until(lambda: all(g.state.phase is Phase.SPOT_HEALTHY for g in daemon.guards.values()), what="both back")
        assert state(moto_world, a.standby_ids[0]) == state(moto_world, b.standby_ids[0]) == "stopped"
    # Counted once the daemon has stopped, so no round is half done: one batched
    # Describe of each kind per round for both guards.
    calls = daemon.poller.calls
    assert calls["DescribeSpotInstanceRequests"] == calls["DescribeInstances"] == daemon.rounds


async def test_steady_guards_health_is_reused_while_another_fails_over(tmp_path, moto_world, aws):
    """Target health of a spot-healthy guard is described once per unhealthy_grace / 3,
    not every round, even while another guard's failover polls every second."""
    a = moto_world.provision("alpha", standbys=1)
    b = moto_world.provision("beta", standbys=1)
    settings = daemon_settings(tmp_path, moto_world, [_named(a, "alpha"), _named(b, "beta")], unhealthy="90s")
    async with running(settings, aws) as daemon:
        await until(lambda: daemon.rounds >= 5, what="five steady rounds")
        assert daemon.poller.calls["DescribeTargetHealth"] == 2  # the first round's, then reused
        beta_described = daemon.poller.described[b.target_group_arn].at
        alpha_described = daemon.poller.described[a.target_group_arn].at
        await fail_over(moto_world, daemon, _named(a, "alpha"))
        assert daemon.poller.described[a.target_group_arn].at > alpha_described
        assert daemon.poller.described[b.target_group_arn].at == beta_described
        assert phase(daemon, "beta") is Phase.SPOT_HEALTHY


def _named(d, name):
    from dataclasses import replace

    return replace(d, name=name)


@pytest.mark.parametrize(
    "stop_in",
    [Phase.STANDBY_STARTING, Phase.BOTH_SERVING, Phase.SPOT_RESTORED, Phase.STANDBY_DRAINING],
)
async def test_restart_in_each_phase_converges(tmp_path, moto_world, deployment, aws, stop_in):
    d, standby, second = deployment, deployment.standby_ids[0], deployment.standby_ids[1]
    # A grace longer than the test holds the first daemon in spot-restored.
    grace = "1h" if stop_in is Phase.SPOT_RESTORED else "1s"
    settings = daemon_settings(tmp_path, moto_world, [d], grace=grace)
    moto_world.set_health(d.target_group_arn, standby, "initial")  # holds it in standby-starting
    moto_world.hold_draining(d.target_group_arn, standby)  # holds it in standby-draining
    async with running(settings, aws, kill=True) as daemon:
        moto_world.notice(d.spot_request_id)
        await until(lambda: standby in health(moto_world, d), what="standby registered")
        if stop_in is not Phase.STANDBY_STARTING:
            moto_world.set_health(d.target_group_arn, standby, None)
            await until(lambda: phase(daemon) is Phase.BOTH_SERVING, what="both-serving")
        if stop_in in (Phase.SPOT_RESTORED, Phase.STANDBY_DRAINING):
            await replace_spot(moto_world, daemon, d)
        await until(lambda: phase(daemon) is stop_in, what=stop_in.value)

    # The restart resumes from the state file, then finishes the cycle.
    settings = daemon_settings(tmp_path, moto_world, [d], grace="1s")
    assert build(settings, aws, Notifier(None)).guards[d.name].state.phase is stop_in
    moto_world.set_health(d.target_group_arn, standby, None)
    moto_world.hold_draining(d.target_group_arn, standby, False)
    async with running(settings, aws) as daemon:
        if stop_in in (Phase.STANDBY_STARTING, Phase.BOTH_SERVING):
            await replace_spot(moto_world, daemon, d)
        await until(lambda: phase(daemon) is Phase.SPOT_HEALTHY, what="cycle finished after restart")
        assert state(moto_world, standby) == "stopped"
        assert state(moto_world, second) == "stopped", "a second standby was started needlessly"
        assert set(health(moto_world, d).values()) == {"healthy"}


async def test_phase_changes_and_alerts_are_posted_to_discord(tmp_path, moto_world, deployment, aws):
    d = deployment
    settings = daemon_settings(tmp_path, moto_world, [d])
    with CaptureServer() as discord:
        notifier = Notifier(discord.url + "/api/webhooks/1/secret")
        moto_world.inject_error("start", d.standby_ids[0], "InsufficientInstanceCapacity")
        async with running(settings, aws, notifier) as daemon:
            await fail_over(moto_world, daemon, d)
            await until(lambda: len(discord.requests) >= 3, timeout=DEADLINE)
        texts = [r.json["content"] for r in discord.requests]
    assert any("spot-healthy → standby-starting" in t for t in texts), texts
    assert any("InsufficientInstanceCapacity" in t for t in texts), texts
    assert any("standby-starting → both-serving" in t for t in texts), texts
    assert state(moto_world, d.standby_ids[1]) == "running"


async def test_a_pushed_notice_starts_the_standby_without_waiting_for_a_poll(tmp_path, moto_world, deployment, aws):
    # The fast path the SQS source and the agent use: the loop wakes at once, and the
    # notice is acted on before the round's poll.
    d, standby = deployment, deployment.standby_ids[0]
    settings = daemon_settings(tmp_path, moto_world, [d], poll="60s")
    async with running(settings, aws) as daemon:
        rounds = daemon.rounds
        daemon.push(Notice(d.spot_instance_id))
        await until(lambda: state(moto_world, standby) == "running", timeout=5.0, what="standby started")
        assert daemon.rounds <= rounds + 1
        # A notice for an instance no guard owns is dropped, not fatal.
        daemon.push(Notice("i-0123456789abcdef0"))
        await until(lambda: daemon.rounds >= rounds + 2, timeout=5.0, what="another round")
        assert state(moto_world, d.standby_ids[1]) == "stopped"


async def test_an_eventbridge_warning_on_sqs_starts_the_standby_at_once(tmp_path, moto_world, deployment, aws):
    # [sources.sqs]: the EventBridge rule's message arrives long before the next poll.
    d, standby = deployment, deployment.standby_ids[0]
    sqs = moto_world.boto("sqs")
    queue_url = sqs.create_queue(QueueName="spotguard")["QueueUrl"]
    settings = daemon_settings(tmp_path, moto_world, [d], poll="60s", sqs=queue_url)
    async with running(settings, aws) as daemon:
        sent = time.monotonic()
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(_warning(d.spot_instance_id)))
        await until(lambda: state(moto_world, standby) == "running", timeout=10.0, what="standby started")
        assert time.monotonic() - sent < 5.0
        assert phase(daemon) in (Phase.STANDBY_STARTING, Phase.BOTH_SERVING)

        def queue_empty() -> bool:
            attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
            return attrs["ApproximateNumberOfMessages"] == attrs["ApproximateNumberOfMessagesNotVisible"] == "0"

        await until(queue_empty, what="the message deleted")


def _warning(instance_id: str) -> dict:
    return {
        "version": "0",
        "id": "7bf73129-1428-4cd3-a780-95db273d1602",
        "detail-type": "EC2 Spot Instance Interruption Warning",
        "source": "aws.ec2",
        "account": "123456789012",
        "time": "2026-11-28T08:20:00Z",
        "region": "us-east-1",
        "resources": [f"arn:aws:ec2:us-east-1:123456789012:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "instance-action": "terminate"},
    }


def _rebalance(instance_id: str) -> dict:
    return {
        **_warning(instance_id),
        "id": "c7e7e1b2-0d5a-4a51-9a55-5d4bd1b0f1a9",
        "detail-type": "EC2 Instance Rebalance Recommendation",
        "detail": {"instance-id": instance_id},
    }


def _queue(tmp_path, world, d, **kw):
    sqs = world.boto("sqs")
    url = sqs.create_queue(QueueName="spotguard")["QueueUrl"]
    settings = daemon_settings(tmp_path, world, [d], sqs=url, **kw)
    return sqs, url, settings


@pytest.mark.parametrize("policy", ["ignore", "prewarm"])
async def test_rebalance_recommendation_then_nothing(tmp_path, moto_world, deployment, aws, policy):
    d, standby = deployment, deployment.standby_ids[0]
    rules = {"on_rebalance": policy, "rebalance_hold": "2s"}
    sqs, url, settings = _queue(tmp_path, moto_world, d, poll="0.2s", grace="1h", guard=rules)
    async with running(settings, aws) as daemon:
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(_rebalance(d.spot_instance_id)))
        if policy == "ignore":
            # Noise: nothing starts, however long we look.
            rounds = daemon.rounds
            await until(lambda: daemon.rounds >= rounds + 10, what="ten rounds")
            assert state(moto_world, standby) == "stopped" and phase(daemon) is Phase.SPOT_HEALTHY
            return
        await until(lambda: phase(daemon) is Phase.SPOT_RESTORED, what="prewarmed: both serving")
        assert health(moto_world, d) == {d.spot_instance_id: "healthy", standby: "healthy"}
        # No interruption within rebalance_hold (not the 1 h failback_grace): back to spot alone.
        await until(lambda: phase(daemon) is Phase.SPOT_HEALTHY, what="prewarm given back")
        assert state(moto_world, standby) == "stopped"
        assert health(moto_world, d) == {d.spot_instance_id: "healthy"}


async def test_rebalance_prewarm_then_interruption(tmp_path, moto_world, deployment, aws):
    d, standby = deployment, deployment.standby_ids[0]
    rules = {"on_rebalance": "prewarm", "rebalance_hold": "2s"}
    sqs, url, settings = _queue(tmp_path, moto_world, d, poll="0.2s", grace="1h", guard=rules)
    async with running(settings, aws) as daemon:
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(_rebalance(d.spot_instance_id)))
        await until(lambda: phase(daemon) is Phase.SPOT_RESTORED, what="prewarmed: both serving")
        moto_world.notice(d.spot_request_id)
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(_warning(d.spot_instance_id)))
        await until(lambda: health(moto_world, d) == {standby: "healthy"}, what="doomed spot out")
        # The interruption turned the prewarm into a failover: rebalance_hold no longer applies.
        rounds = daemon.rounds
        await until(lambda: daemon.rounds >= rounds + 15, what="past rebalance_hold")
        assert phase(daemon) is Phase.BOTH_SERVING and state(moto_world, standby) == "running"


async def test_an_sqs_notice_starts_the_right_guards_standby(tmp_path, moto_world, aws):
    a = _named(moto_world.provision("alpha", standbys=1), "alpha")
    b = _named(moto_world.provision("beta", standbys=1), "beta")
    sqs = moto_world.boto("sqs")
    url = sqs.create_queue(QueueName="spotguard")["QueueUrl"]
    settings = daemon_settings(tmp_path, moto_world, [a, b], poll="60s", sqs=url)
    async with running(settings, aws) as daemon:
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(_warning(b.spot_instance_id)))
        await until(lambda: state(moto_world, b.standby_ids[0]) == "running", timeout=10.0, what="beta's standby")
        assert state(moto_world, a.standby_ids[0]) == "stopped"
        assert phase(daemon, "alpha") is Phase.SPOT_HEALTHY
