"""The lab end to end: spotguard (a real `spotguard run` process) through spot interruptions
on the embedded AWS, with real HTTP traffic through a health-checking load balancer.

The first tests check the lab's own parts against moto (EC2 transitions, the
balancer as moto's DescribeTargetHealth, an app dying mid-request, the
generated config); then the end-to-end runs, one per scenario. They run
at a high speed (scenario seconds per wall second) and with shorter grace and
re-fulfilment times than the demo, so the file stays well under a minute.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import pytest
from waiting import until

from spotguard import config
from spotguard.cli import build_parser
from spotguard.lab.app import InstanceApp
from spotguard.lab.balancer import Balancer, HealthCheck
from spotguard.lab.clock import ScenarioClock
from spotguard.lab.guard import write_config
from spotguard.lab.load import Sample, longest_outage
from spotguard.lab.report import summary
from spotguard.lab.run import LOAD_WINDOW, run_scenario
from spotguard.lab.scenario import Scenario
from spotguard.sim.playback import STANDBY, Cut, Numbers, script, timing
from spotguard.sim.world import run

SPEED = 50.0
# The demo's scenario with a shorter grace and capacity back sooner: the same cycle, fewer idle minutes.
QUICK = Scenario(refulfil_after=60.0, failback_grace=120.0, tail=10.0)


# --------------------------------------------------------------------------- the lab's parts


def test_transitions_hold_pending_and_stopping_until_time_passes(moto_world):
    d = moto_world.provision(standbys=1)
    sid, ec2 = d.standby_ids[0], moto_world.boto("ec2")
    moto_world.model_transitions(True)
    ec2.start_instances(InstanceIds=[sid])
    assert moto_world.states(sid) == {sid: "pending"}
    ec2.start_instances(InstanceIds=[sid])  # starting a pending instance keeps it booting
    assert moto_world.states(sid) == {sid: "pending"}
    moto_world.set_state(sid, "running")
    reply = ec2.stop_instances(InstanceIds=[sid])
    assert reply["StoppingInstances"][0]["CurrentState"]["Name"] == "stopping"
    assert moto_world.states(sid) == {sid: "stopping"}
    with pytest.raises(ec2.exceptions.ClientError, match="IncorrectInstanceState"):
        ec2.start_instances(InstanceIds=[sid])
    moto_world.set_state(sid, "stopped")
    assert moto_world.states(sid) == {sid: "stopped"}
    moto_world.terminate_spot(d.spot_request_id)
    new = moto_world.fulfil(d.spot_request_id, pending=True)  # a re-fulfilled spot boots too
    assert moto_world.states(new) == {new: "pending"}
    moto_world.model_transitions(False)
    ec2.start_instances(InstanceIds=[sid])
    assert moto_world.states(sid) == {sid: "running"}  # moto's own instant start once the lab lets go


async def test_describe_target_health_answers_from_the_balancer(moto_world):
    """A target warming up is initial, then unhealthy, then healthy; deregistered, it drains, then is gone."""
    d = moto_world.provision(standbys=1)
    sid, tg, elbv2 = d.standby_ids[0], d.target_group_arn, moto_world.boto("elbv2")
    moto_world.boto("ec2").start_instances(InstanceIds=[sid])
    clock = ScenarioClock(100.0)
    spot_app = InstanceApp(d.spot_instance_id, clock, warm_up=0.0, latency=0.1)
    standby_app = InstanceApp(sid, clock, warm_up=30.0, latency=0.1)
    apps = {d.spot_instance_id: spot_app, sid: standby_app}
    changes: list[tuple[str, str, str]] = []
    balancer = Balancer(
        clock, HealthCheck(interval=5.0, timeout=4.0), 20.0,
        resolve=lambda tid: apps[tid].address if tid in apps else None,
        live=lambda tid: moto_world.instance_state(tid) in ("pending", "running"),
        on_change=lambda *change: changes.append(change),
    )
    await balancer.start()
    moto_world.set_health_source(balancer.report)

    async def keep_syncing():
        while True:
            balancer.sync(moto_world.registered_targets(tg))
            await asyncio.sleep(0.005)

    syncing = asyncio.create_task(keep_syncing())
    try:
        await spot_app.start(moto_world.private_address(d.spot_instance_id), d.target_port)
        await until(lambda: balancer.healthy() == [d.spot_instance_id], timeout=10.0, what="spot healthy")
        elbv2.register_targets(TargetGroupArn=tg, Targets=[{"Id": sid}])
        assert moto_world.health(tg)[sid] == "initial"  # asked before any check: registration in progress
        await standby_app.start(moto_world.private_address(sid), d.target_port)
        await until(lambda: moto_world.health(tg).get(sid) == "unhealthy", timeout=10.0,
                    what="standby failing its checks")
        await until(lambda: moto_world.health(tg).get(sid) == "healthy", timeout=10.0, what="standby warmed up")
        assert [c[1:] for c in changes if c[0] == sid] == [
            ("unused", "initial"), ("initial", "unhealthy"), ("unhealthy", "healthy")]

        elbv2.deregister_targets(TargetGroupArn=tg, Targets=[{"Id": sid}])
        assert moto_world.health(tg)[sid] == "draining"  # at once, before the balancer's next sync
        async with aiohttp.ClientSession() as client:
            for _ in range(5):  # a draining target gets no new requests
                async with client.get(balancer.url + "/") as reply:
                    assert reply.headers["X-Served-By"] == d.spot_instance_id
        await until(lambda: sid not in moto_world.health(tg), timeout=10.0, what="drain over")
        assert moto_world.health(tg) == {d.spot_instance_id: "healthy"}
    finally:
        syncing.cancel()
        moto_world.set_health_source(None)
        await balancer.close()
        spot_app.kill()
        standby_app.kill()


async def test_a_killed_app_fails_its_requests_in_flight():
    clock = ScenarioClock(1.0)
    app = InstanceApp("i-0123456789abcdef0", clock, warm_up=0.0, latency=5.0)
    _, port = await app.start()
    async with aiohttp.ClientSession() as client:
        request = asyncio.create_task(client.get(f"http://127.0.0.1:{port}/"))
        await asyncio.sleep(0.2)
        app.kill()
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(request, 5)
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.get(f"http://127.0.0.1:{port}/health")


def test_generated_config_is_one_spotguard_accepts_with_scaled_durations(tmp_path, moto_world):
    d = moto_world.provision(standbys=1)
    path = write_config(
        tmp_path / "c.toml", region=moto_world.region, endpoint_url=moto_world.endpoint_url,
        state_dir=tmp_path / "state", guard_name="lab", target_group_arn=d.target_group_arn,
        spot_request_ids=(d.spot_request_id,), standby_ids=d.standby_ids, speed=25.0, poll_interval=5.0,
        failback_grace=600.0, standby_ready_timeout=300.0, unhealthy_grace=30.0,
    )
    settings = config.load(path)
    assert settings.daemon.poll_interval == 0.2 and settings.daemon.log_format == "json"
    guard = settings.guards[0]
    assert (guard.failback_grace, guard.standby_ready_timeout, guard.unhealthy_grace) == (24.0, 12.0, 1.2)
    assert guard.standby_instance_ids == d.standby_ids and guard.spot_request_ids == (d.spot_request_id,)


def test_longest_outage_is_the_longest_run_of_failures():
    def s(at, ok):
        return Sample(at, ok, 200 if ok else 503, None if ok else "503", None)

    samples = [s(0, True), s(1, False), s(2, False), s(3, True), s(4, False), s(9, False), s(12, True)]
    assert longest_outage(samples) == 8.0
    assert longest_outage([s(0, True)]) == 0.0


def test_demo_takes_the_users_numbers(capsys):
    from spotguard.commands.demo import run as demo_run
    from spotguard.commands.demo import scenario_changes

    args = build_parser("demo").parse_args(["demo", "--health-interval", "30", "--healthy-threshold", "5",
                                             "--warm-up", "60", "--register-when", "running"])
    assert scenario_changes(args) == {"health_interval": 30.0, "healthy_threshold": 5, "warm_up": 60.0,
                                      "register_when": "running"}
    bad = build_parser("demo").parse_args(["demo", "--health-interval", "5", "--health-timeout", "5"])
    assert demo_run(bad) == 2  # refused before anything starts
    assert capsys.readouterr().err == ("spotguard demo: health_timeout must be shorter than health_interval "
                                       "(ELBv2 rule)\n")


def test_demo_arguments():
    args = build_parser("demo").parse_args(["demo", "--compare", "--speed", "40"])
    assert (args.command, args.compare, args.speed, args.rate) == ("demo", True, 40.0, 50.0)
    for bad in ("0", "-1", "fast", "inf"):
        with pytest.raises(SystemExit):
            build_parser("demo").parse_args(["demo", "--speed", bad])


# --------------------------------------------------------------------------- end to end

# One model, two players: the lab (real processes, moto, a balancer, a scaled clock) and
# spotguard.sim (what `spotguard simulate` replays) must agree on a scenario's On-Demand
# seconds and outage. The sim acts at the poll that sees a change; the real daemon a second
# or few later at each of the cycle's hand-overs (SQS and the agent, the probe every 2 s, its
# own poll and target-health cadence), and at ×50 a tenth of a wall second lost to a busy
# host is 5 scenario seconds. So the lab may run longer by two polls and a tenth of the
# sim's figure (measured: 413–437 s of On-Demand against the sim's 405 s; 106.5 s of outage
# against 105 s), and never shorter by more than a poll.


def simulated(s: Scenario) -> tuple[float, float]:
    """The sim's answer for a one-interruption scenario: (standby seconds running, seconds without a healthy target)."""
    numbers = Numbers(boot=int(s.boot), warm_up=int(s.standby_warm), health_interval=int(s.health_interval),
                      healthy_threshold=s.healthy_threshold, unhealthy_threshold=s.unhealthy_threshold,
                      deregistration_delay=int(s.deregistration_delay), poll_interval=s.poll_interval,
                      failback_grace=s.failback_grace, standby_ready_timeout=s.standby_ready_timeout,
                      register_when=s.register_when)
    # The lab launches the new spot refulfil_after after the termination; the sim counts that from shutdown's end.
    refill = None if s.refulfil_after is None else int(s.refulfil_after) - timing(numbers).shutdown
    end = int(s.end_after if s.end_after is not None else s.expected_end())
    played = run(numbers.rules(), script([Cut(int(s.notice_at), refill)], end, numbers))
    return sum(sec for iid, sec in played.running if iid == STANDBY), played.dark


def agrees(lab: float, sim: float, s: Scenario) -> bool:
    return -s.poll_interval <= lab - sim <= 2 * s.poll_interval + 0.1 * sim


async def test_full_cycle_loses_no_request(moto_world):
    outcome = await run_scenario(QUICK, speed=SPEED, world=moto_world)
    assert outcome.completed and outcome.problem is None, outcome.problem
    assert outcome.sent > 200
    assert (outcome.failed, outcome.failures) == (0, {})
    # The recommended deployment: EventBridge and the spot's agent send to the queue, the poll reads the request;
    # whichever is first (a race on a loaded machine), the notice is heard once.
    heard = [e.data["path"] for e in outcome.entries if e.data.get("kind") == "heard"]
    assert len(heard) == 1 and heard[0] in ("SQS (EventBridge)", "SQS (the agent on the spot)",
                                            "its poll (the spot request's status)"), heard
    assert [e.data["instance"] for e in outcome.entries if e.data.get("kind") == "agent"] == [
        next(e.data["instance"] for e in outcome.entries if e.data.get("kind") == "notice")]
    assert outcome.transitions() == [
        ("spot-healthy", "standby-starting"),
        ("standby-starting", "both-serving"),
        ("both-serving", "spot-restored"),
        ("spot-restored", "standby-draining"),
        ("standby-draining", "spot-healthy"),
    ]
    assert outcome.standby_lead is not None and outcome.standby_lead > 10.0  # served before the spot died
    assert outcome.no_healthy_target == 0.0 and outcome.spotguard_exit == 0
    # Billed from standby running to stopping: the standby served the outage and the grace, then stopped.
    assert QUICK.refulfil_after + QUICK.failback_grace < outcome.on_demand_seconds < 900
    on_demand, dark = simulated(QUICK)
    assert dark == 0.0 and agrees(outcome.on_demand_seconds, on_demand, QUICK), on_demand
    assert moto_world.states(*outcome_standbys(outcome)) == {sid: "stopped" for sid in outcome_standbys(outcome)}
    assert "no request lost" in summary([outcome])


async def test_standby_warm_up_longer_than_the_notice_loses_requests_and_says_so(moto_world):
    scenario = replace(
        QUICK,
        name="slow standby",
        standby_warm_up=200.0,  # the model loads for longer than the 120 s notice
        standby_ready_timeout=100.0,
        refulfil_after=None,  # capacity does not come back: the standby must carry it
        end_after=330.0,
    )
    outcome = await run_scenario(scenario, speed=SPEED, world=moto_world)
    assert outcome.completed and outcome.problem is None, outcome.problem
    assert outcome.failed > 0
    # Once the spot is gone only the warming standby is registered: ALB fails open to it, and it answers 503.
    assert set(outcome.failures) <= {"503 no healthy target", "503 from a warming target (fail-open)",
                                     "502 target died mid-request"}
    assert outcome.standby_lead is None  # the standby never served before the spot died
    # The gap: from the termination until the standby passed its checks (~ +0:53 booted + 200 s warm-up).
    assert 60.0 < outcome.no_healthy_target < 140.0
    assert agrees(outcome.no_healthy_target, simulated(scenario)[1], scenario), simulated(scenario)
    assert 60.0 < outcome.longest_outage <= outcome.no_healthy_target + 10.0
    gap = [e for e in outcome.entries if e.data.get("kind") in ("gap", "gap-end")]
    assert [e.data["kind"] for e in gap] == ["gap", "gap-end"]
    # spotguard says so: before the spot dies (the standby is not healthy within standby_ready_timeout),
    # when the service goes down, and when it is back.
    alerts = [e for e in outcome.entries if e.data.get("kind") == "alert"]
    died = next(e.at for e in outcome.entries if e.data.get("kind") == "terminated")
    assert any("not healthy after" in e.data["alert"] and e.at < died for e in alerts)
    # ... and, before its deadline, that the standby is late for it.
    assert any("dies: the service may go down with it" in e.data["alert"] and e.at < died for e in alerts)
    down = [e for e in alerts if "no healthy target" in e.data["alert"]]
    back = [e for e in alerts if "service back" in e.data["alert"]]
    assert len(down) == len(back) == 1 and died < down[0].at < back[0].at
    assert down[0].at - died < 3 * scenario.poll_interval
    assert ("standby-starting", "both-serving") in outcome.transitions()  # and it served once warm
    assert "LOST" in summary([outcome])


async def test_second_interruption_while_the_standby_drains(moto_world):
    scenario = replace(QUICK, name="second notice", failback_grace=60.0, second_notice_in="standby-draining")
    outcome = await run_scenario(scenario, speed=SPEED, world=moto_world)
    assert outcome.completed and outcome.problem is None, outcome.problem
    assert (outcome.failed, outcome.failures) == (0, {})
    phases = outcome.transitions()
    draining = phases.index(("spot-restored", "standby-draining"))
    # Back to the standby straight from draining: it is re-registered, never stopped in between.
    assert phases[draining + 1][0] == "standby-draining"
    assert phases[draining + 1][1] in ("standby-starting", "both-serving")
    notices = [e for e in outcome.entries if e.data.get("kind") == "notice"]
    assert len(notices) == 2
    stops = [e for e in outcome.entries if e.data.get("kind") == "action" and e.data.get("action") == "StopInstances"]
    assert all(e.at > notices[1].at for e in stops), "the standby was stopped before the second interruption"
    assert phases[-1] == ("standby-draining", "spot-healthy")
    assert len(stops) >= 1


async def test_prewarm_on_a_rebalance_recommendation_hides_a_standby_slower_than_the_notice(moto_world):
    """The rebalance-prewarm scenario's own run: the standby loads for 2m30s, longer than the
    notice, and still serves before the spot dies because it started on the recommendation.
    (Its `ignore` run is the slow-standby outage, played by the test above.)"""
    scenario = replace(QUICK.named("rebalance-prewarm"), refulfil_after=30.0, failback_grace=30.0)
    outcome = await run_scenario(scenario, speed=SPEED, world=moto_world)
    assert outcome.completed and outcome.problem is None, outcome.problem
    assert (outcome.failed, outcome.failures, outcome.no_healthy_target) == (0, {}, 0.0)
    kinds = [e.data.get("kind") for e in outcome.entries]
    assert kinds.index("rebalance") < kinds.index("notice")
    heard = {e.data["notice"] for e in outcome.entries if e.data.get("kind") == "heard"}
    assert "rebalance" in heard
    first = next(e for e in outcome.entries if e.data.get("kind") == "transition")
    assert first.data["to"] == "standby-starting" and "rebalance" in first.data["reason"]
    assert first.at < next(e.at for e in outcome.entries if e.data.get("kind") == "notice")
    assert outcome.standby_lead is not None and outcome.standby_lead > 60.0


async def test_no_capacity_for_the_first_standby_the_second_serves(moto_world):
    outcome = await run_scenario(replace(QUICK.named("no-capacity"), failback_grace=30.0), speed=SPEED,
                                 world=moto_world)
    assert outcome.completed and outcome.problem is None, outcome.problem
    assert (outcome.failed, outcome.failures) == (0, {})
    starts = [(e.data["instance"], e.data["outcome"]) for e in outcome.entries
              if e.data.get("kind") == "action" and e.data.get("action") == "StartInstances"]
    assert [how for _, how in starts] == ["failed", "ok"] and starts[0][0] != starts[1][0]
    assert any("could not start (InsufficientInstanceCapacity); trying the next standby" in a
               for a in outcome.alerts())


async def test_a_fleet_keeps_three_targets_serving_through_two_interruptions_at_once(moto_world):
    """The fleet scenario: 3 spots behind one target group, 2 noticed at the same moment, 2 standbys.
    With spotguard each doomed spot serves until its own standby is healthy, so the balancer never
    has fewer than 3 healthy targets; each new spot then releases one standby after the grace. Without
    standbys, capacity falls to the one spot left until the requests are fulfilled again. (Capacity in
    requests per second: one request of `latency` at a time per instance, closed-loop clients.)"""
    # ×50: one target serves 12.5 requests per wall second. The standbys warm in 10 s, not 40: healthy
    # 70 scenario seconds before their spots' deadlines (1.4 wall s), room for a loaded host's lag.
    fleet = replace(QUICK.named("fleet"), refulfil_after=30.0, warm_up=20.0, standby_warm_up=10.0, latency=4.0,
                    failback_grace=20.0, deregistration_delay=20.0, tail=5.0)
    one_target = fleet.concurrency * SPEED / fleet.latency
    guarded = await run_scenario(fleet, speed=SPEED, world=moto_world)
    standbys = outcome_standbys(guarded)
    assert moto_world.states(*standbys) == {sid: "stopped" for sid in standbys} and len(standbys) == 2
    alone = await run_scenario(fleet.unguarded(), speed=SPEED, world=moto_world)
    for outcome in (guarded, alone):
        assert outcome.completed and outcome.problem is None, outcome.problem
        notices = [e.at for e in outcome.entries if e.data.get("kind") == "notice"]
        assert len(notices) == 2 and notices[1] - notices[0] < 1.0
    assert (guarded.failed, guarded.fewest_healthy, guarded.below_capacity) == (0, 3, 0.0), _story(guarded)
    assert max(n for _, n in guarded.healthy) >= 4  # each doomed spot served beside its healthy standby
    # Each lost spot had its own slot and standby, and each new spot released one after the grace.
    cycle = [("spot-healthy", "standby-starting"), ("standby-starting", "both-serving"),
             ("both-serving", "spot-restored"), ("spot-restored", "standby-draining"),
             ("standby-draining", "spot-healthy")]
    slots = {e.data["slot"] for e in guarded.entries if e.data.get("kind") == "transition"}
    assert len(slots) == 2 and all(guarded.transitions(slot) == cycle for slot in slots), guarded.transitions
    back = max(e.at for e in guarded.entries if e.data.get("kind") == "fulfilled")
    released = [e.at for e in guarded.entries if e.data.get("action") == "DeregisterTargets"
                and e.data.get("instance") in standbys]
    assert len(released) == 2 and min(released) > back + fleet.failback_grace
    # Without standbys: one target of three from the terminations until the new spots are healthy.
    assert alone.fewest_healthy == 1 and alone.below_capacity > fleet.refulfil_after + fleet.boot  # + the warm-up
    # Served requests per second, a wall figure, only as a bound (a busy host can only lower it): the one spot
    # left served what one target can. (With spotguard it is three targets' worth or more: docs/lab.md.)
    assert _mean_served(alone, *_short_span(alone)) < 1.3 * one_target
    assert "never fewer than 3 healthy targets" in summary([guarded, alone])


def _story(outcome) -> str:
    """spotguard's transitions and actions and the balancer's changes, for a failing assertion."""
    kinds = ("notice", "transition", "action", "health", "alert", "terminated")
    return "\n".join(f"{e.at:7.1f} {e.text}" for e in outcome.entries if e.data.get("kind") in kinds)


def _short_span(outcome) -> tuple[float, float]:
    """From the terminations to the first target healthy again (scenario seconds)."""
    died = max(e.at for e in outcome.entries if e.data.get("kind") == "terminated")
    healthy = min(e.at for e in outcome.entries
                  if e.data.get("kind") == "health" and e.data.get("new") == "healthy" and e.at > died)
    return died, healthy


def _mean_served(outcome, start: float, end: float) -> float:
    """The mean served rate over the whole load windows within [start, end]."""
    inside = [rate for k, rate in enumerate(outcome.served)
              if start <= k * LOAD_WINDOW and (k + 1) * LOAD_WINDOW <= end]
    assert inside, (start, end, outcome.served)
    return sum(inside) / len(inside)


def test_named_scenarios_and_the_list(capsys):
    from spotguard.commands.demo import run as demo_run
    from spotguard.lab.scenario import SCENARIOS

    assert Scenario().named("interruption") == Scenario()
    assert (Scenario().named("no-capacity").standbys, Scenario().named("no-capacity").no_capacity) == (2, 1)
    with pytest.raises(ValueError, match="no_capacity must leave at least one standby"):
        replace(Scenario(), no_capacity=1).check()
    with pytest.raises(ValueError, match="interrupted must be between 1 and spots"):
        replace(Scenario(), interrupted=2).check()
    assert demo_run(build_parser("demo").parse_args(["demo", "--scenario", "list"])) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(SCENARIOS)
    assert demo_run(build_parser("demo").parse_args(["demo", "--scenario", "storm"])) == 2
    assert "no scenario 'storm'" in capsys.readouterr().err


def outcome_standbys(outcome) -> list[str]:
    return sorted({e.data["instance"] for e in outcome.entries if e.data.get("action") == "StartInstances"})


def test_demo_without_the_lab_extra_says_how_to_get_it():
    import subprocess
    import sys

    # moto made unimportable, as on an install without the extra.
    code = "import sys; sys.modules['moto'] = None; from spotguard.cli import main; sys.exit(main(['demo']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "pip install -e '.[lab]'" in done.stderr and "spotguard[lab]" in done.stderr
