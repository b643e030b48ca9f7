"""The Prometheus endpoint: the daemon runs against moto with the Metrics observer,
and the tests scrape it over real HTTP and parse what Prometheus would parse.

The hooks' arithmetic (detection clock, standby seconds) is also checked on
hand-made events, where the daemon clock's `at` values are exact.
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import time
import urllib.error
import urllib.request

import pytest
from configs import daemon_settings
from observing import Told
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from test_daemon import phase, replace_spot, running
from waiting import until

import spotguard.daemon
from spotguard import __version__, config
from spotguard.machine import Failed, GuardState, Instance, Notice, Observed, Phase, Rules, Start, Stop, Target
from spotguard.metrics import Metrics, exposed, serve

PHASES = [p.value for p in Phase]


# ---------------------------------------------------------------------- scraping


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """One scrape, as Prometheus parses it: (sample name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def ascrape(url: str) -> dict[tuple[str, frozenset], float]:
    return await asyncio.to_thread(scrape, url)  # the event loop keeps running the daemon


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def phase_gauge(samples, guard: str) -> dict[str, float]:
    return {p: samples[("spotguard_phase", frozenset({"guard": guard, "phase": p}.items()))] for p in PHASES}


def current(samples, guard: str) -> str:
    gauge = phase_gauge(samples, guard)
    (on,) = [p for p, v in gauge.items() if v == 1]
    assert sum(gauge.values()) == 1, gauge
    return on


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def listening() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket this process listens on, from /proc."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            raw = bytes.fromhex(addr_hex)
            # /proc prints the address as host-order 32-bit words.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return found


# ---------------------------------------------------------------------- end to end


async def test_a_failover_and_failback_as_scraped(tmp_path, moto_world, deployment, aws):
    d = deployment
    first, standby = d.standby_ids  # the first has no capacity: the second serves
    port = free_port()
    settings = daemon_settings(tmp_path, moto_world, [d], poll="0.2s", grace="2s", daemon={"metrics_port": port})
    url = f"http://127.0.0.1:{port}/metrics"
    moto_world.inject_error("start", first, "InsufficientInstanceCapacity")
    moto_world.set_health(d.target_group_arn, standby, "initial")  # holds standby-starting
    moto_world.hold_draining(d.target_group_arn, standby)  # holds standby-draining
    name = d.name

    async def at(want: Phase, **after: str):
        """The scrape once the guard is in `want` (and, with `after`, that action is counted:
        moto changes the world before the executor hears back and the observer is told)."""
        await until(lambda: phase(daemon) is want, what=want.value)
        samples = await ascrape(url)
        end = time.monotonic() + 5.0
        while after and value(samples, "spotguard_aws_actions_total", guard=name, outcome="ok", **after) < 1:
            assert time.monotonic() < end, f"{after} never counted"
            await asyncio.sleep(0.02)
            samples = await ascrape(url)
        assert current(samples, name) == want.value
        return samples

    with exposed(settings.daemon.metrics_port, settings.guards) as metrics:
        assert metrics is not None
        async with running(settings, aws, observers=[metrics]) as daemon:
            metrics.watch_phases(daemon.guards)
            s = await at(Phase.SPOT_HEALTHY)
            assert value(s, "spotguard_failovers_total", guard=name) == 0
            assert value(s, "spotguard_standby_seconds_total", guard=name) == 0

            noticed = time.time()
            moto_world.notice(d.spot_request_id)
            await until(lambda: standby in moto_world.health(d.target_group_arn), what="standby registered")
            s = await at(Phase.STANDBY_STARTING, action="RegisterTargets")  # the last of the notice's actions
            assert value(s, "spotguard_failovers_total", guard=name) == 1
            assert value(s, "spotguard_phase_changes_total", guard=name,
                         **{"from": "spot-healthy", "to": "standby-starting"}) == 1
            assert value(s, "spotguard_aws_errors_total", guard=name, action="StartInstances",
                         code="InsufficientInstanceCapacity") == 1
            assert value(s, "spotguard_aws_actions_total", guard=name, action="StartInstances", outcome="failed") == 1
            assert value(s, "spotguard_aws_actions_total", guard=name, action="StartInstances", outcome="ok") == 1
            assert value(s, "spotguard_aws_actions_total", guard=name, action="RegisterTargets", outcome="ok") == 1
            latency = value(s, "spotguard_last_detection_latency_seconds", guard=name)
            # Both StartInstances calls (the refused one, then the next standby) on a local moto.
            assert 0 < latency < 5.0, latency
            assert latency <= time.time() - noticed
            assert value(s, "spotguard_detection_latency_seconds_count", guard=name) == 1
            assert value(s, "spotguard_detection_latency_seconds_sum", guard=name) == pytest.approx(latency)
            assert value(s, "spotguard_detection_latency_seconds_bucket", guard=name, le="5.0") == 1

            moto_world.set_health(d.target_group_arn, standby, None)  # passed its first check
            await until(lambda: d.spot_instance_id not in moto_world.health(d.target_group_arn), what="doomed spot out")
            s = await at(Phase.BOTH_SERVING, action="DeregisterTargets")
            assert value(s, "spotguard_aws_actions_total", guard=name, action="DeregisterTargets", outcome="ok") == 1
            assert value(s, "spotguard_standby_seconds_total", guard=name) > 0

            await replace_spot(moto_world, daemon, d)
            s = await at(Phase.SPOT_RESTORED)
            s = await at(Phase.STANDBY_DRAINING)
            moto_world.hold_draining(d.target_group_arn, standby, False)
            s = await at(Phase.SPOT_HEALTHY)
            ended = time.time()
            assert moto_world.states(standby)[standby] == "stopped"
            assert value(s, "spotguard_aws_actions_total", guard=name, action="StopInstances", outcome="ok") == 1
            assert value(s, "spotguard_failovers_total", guard=name) == 1
            cycle = ["spot-healthy", "standby-starting", "both-serving", "spot-restored", "standby-draining",
                     "spot-healthy"]
            for old, new in zip(cycle, cycle[1:]):
                assert value(s, "spotguard_phase_changes_total", guard=name,
                             **{"from": old, "to": new}) == 1, (old, new)
            changes = sum(v for (n, _), v in s.items() if n == "spotguard_phase_changes_total")
            assert changes == 5
            assert value(s, "spotguard_aws_errors_total", guard=name, action="StartInstances",
                         code="InsufficientInstanceCapacity") == 1
            assert value(s, "spotguard_detection_latency_seconds_count", guard=name) == 1

            # One standby ran for part of the cycle, and has stopped counting.
            served = value(s, "spotguard_standby_seconds_total", guard=name)
            assert 0.5 < served < ended - noticed, (served, ended - noticed)
            rounds = daemon.rounds
            await until(lambda: daemon.rounds >= rounds + 3, what="three more rounds")
            assert value(await ascrape(url), "spotguard_standby_seconds_total", guard=name) == served
            body = urllib.request.urlopen(url).read().decode()
            help_text = {f.name: f.documentation for f in text_string_to_metric_families(body)}
    assert all(n.startswith("spotguard_") and help_text[n] for n in help_text), help_text
    # Stopped with the daemon: the port is free again.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


async def test_without_metrics_port_nothing_listens(tmp_path, moto_world, deployment, aws):
    settings = daemon_settings(tmp_path, moto_world, [deployment])
    assert settings.daemon.metrics_port is None
    before = listening()
    with exposed(settings.daemon.metrics_port, settings.guards) as metrics:
        assert metrics is None
        async with running(settings, aws) as daemon:
            rounds = daemon.rounds
            await until(lambda: daemon.rounds >= rounds + 2, what="two rounds")
            assert listening() == before


def test_the_endpoint_listens_on_loopback_only():
    metrics = Metrics(["web"])
    server = serve(0, metrics)
    try:
        assert (server.host, server.port) == ("127.0.0.1", server.port)
        mine = {(a, p) for a, p in listening() if p == server.port}
        assert mine == {("127.0.0.1", server.port)}  # not 0.0.0.0, not ::
        assert current(scrape(server.url), "web") == "spot-healthy"
        # The kernel's table above is the whole answer: connecting to this host's other
        # addresses would send packets to a private range, which no test does.
    finally:
        server.close()
    assert not any(p == server.port for _, p in listening())


@pytest.mark.parametrize("address", ["127.0.0.2", "::1"])
def test_the_endpoint_listens_on_the_configured_address(address):
    """[daemon] metrics_address, as the daemon starts the endpoint: there and nowhere else.
    Loopback addresses only: the suite never sends to a private range."""
    try:
        port = free_port(address)
    except OSError:
        pytest.skip(f"{address} is not an address of this host")
    settings = config.Settings(aws=config.AwsSettings("us-east-1"),
                               daemon=config.DaemonSettings(metrics_port=port, metrics_address=address))
    host = f"[{address}]" if ":" in address else address
    with spotguard.daemon._metrics(settings) as metrics:
        assert metrics is not None
        assert {(a, p) for a, p in listening() if p == port} == {(address, port)}
        build = {"version": __version__, "python": platform.python_version()}
        assert value(scrape(f"http://{host}:{port}/metrics"), "spotguard_build_info", **build) == 1
    assert not any(p == port for _, p in listening())


def test_a_taken_port_is_logged_and_the_daemon_runs_on():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with capture_logs() as logs, exposed(port, ["web"]) as metrics:
            assert isinstance(metrics, Metrics)
            Told(metrics, RULES).event("web", Notice("i-0123456789abcdef0"), 1.0)  # still a working observer
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["metrics.serve.failed"]


# ---------------------------------------------------------------------- hook arithmetic


RULES = Rules(standbys=("i-standby",))


def state(p: Phase) -> GuardState:
    return GuardState(RULES, phase=p)


def observed(spot: str = "i-spot", *, notice: bool = False, standby: str = "stopped") -> Observed:
    return Observed(spots=(Instance(spot, "running", notice),), standbys=(Instance("i-standby", standby),))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


class Settings:
    name = "web"
    standby_instance_ids = ("i-standby",)


def test_detection_clock_runs_from_the_first_notice_to_the_start_that_succeeds():
    m = Metrics([Settings()])
    tell = Told(m, RULES)
    tell.event("web", observed(), 100.0)
    tell.event("web", Notice("i-standby"), 100.5)  # a standby is never interrupted: no clock
    tell.event("web", Notice("i-spot"), 101.0)
    m.transition("web", state(Phase.SPOT_HEALTHY), state(Phase.STANDBY_STARTING), 101.0)
    tell.event("web", observed(notice=True), 101.5)  # the poll sees it too: the same notice
    m.action("web", Start("i-standby"), Failed(Start("i-standby"), "InsufficientInstanceCapacity"), 0.2, 102.0)
    m.action("web", Start("i-other"), None, 0.3, 104.0)
    assert sample(m, "spotguard_last_detection_latency_seconds", guard="web") == 3.0
    assert sample(m, "spotguard_detection_latency_seconds_count", guard="web") == 1
    assert sample(m, "spotguard_aws_errors_total", guard="web", action="StartInstances",
                  code="InsufficientInstanceCapacity") == 1
    m.action("web", Start("i-other"), None, 0.3, 110.0)  # a re-issued start measures nothing
    assert sample(m, "spotguard_detection_latency_seconds_count", guard="web") == 1


def test_a_notice_served_without_a_start_drops_the_clock():
    m = Metrics(["web"])
    tell = Told(m, RULES)
    tell.event("web", Notice("i-new"), 200.0)  # in spot-restored: the standby already serves
    m.transition("web", state(Phase.SPOT_RESTORED), state(Phase.BOTH_SERVING), 200.0)
    m.action("web", Start("i-standby"), None, 0.1, 900.0)
    assert sample(m, "spotguard_detection_latency_seconds_count", guard="web") == 0
    tell.event("web", Notice("i-other", kind="rebalance"), 950.0)  # a recommendation starts no clock
    m.action("web", Start("i-standby"), None, 0.1, 960.0)
    assert sample(m, "spotguard_detection_latency_seconds_count", guard="web") == 0


def test_standby_seconds_count_from_each_event_while_the_last_observation_showed_it_running():
    m = Metrics(["web"])
    tell = Told(m, RULES)
    tell.event("web", observed(standby="running"), 10.0)
    tell.event("web", Notice("i-spot"), 12.0)  # any event advances the counter
    tell.event("web", observed(standby="running"), 15.0)
    assert sample(m, "spotguard_standby_seconds_total", guard="web") == 5.0
    tell.event("web", observed(standby="stopping"), 20.0)  # was running until this observation
    tell.event("web", observed(standby="stopped"), 30.0)
    tell.event("web", observed(standby="running"), 25.0)  # a clock stepped back counts nothing
    assert sample(m, "spotguard_standby_seconds_total", guard="web") == 10.0
    m.action("web", Stop("i-standby"), None, 0.1, 26.0)
    assert sample(m, "spotguard_aws_actions_total", guard="web", action="StopInstances", outcome="ok") == 1


def test_the_phase_gauge_follows_transitions_then_the_daemons_guards():
    m = Metrics(["web", "api"])
    m.transition("web", state(Phase.SPOT_HEALTHY), state(Phase.STANDBY_STARTING), 1.0)
    assert sample(m, "spotguard_phase", guard="web", phase="standby-starting") == 1
    assert sample(m, "spotguard_phase", guard="web", phase="spot-healthy") == 0

    class Guard:  # as daemon.Guard: a phase resumed from the state file, no transition told
        def __init__(self, p: Phase) -> None:
            self.state = state(p)

    guards = {"web": Guard(Phase.BOTH_SERVING), "api": Guard(Phase.SPOT_HEALTHY)}
    m.watch_phases(guards)
    assert sample(m, "spotguard_phase", guard="web", phase="both-serving") == 1
    assert sample(m, "spotguard_phase", guard="web", phase="standby-starting") == 0
    guards["api"].state = state(Phase.SPOT_RESTORED)  # as an [ha] follower adopts the leader's state
    assert sample(m, "spotguard_phase", guard="api", phase="spot-restored") == 1
    assert sum(sample(m, "spotguard_phase", guard="api", phase=p) for p in PHASES) == 1


def test_each_ready_margin_is_one_observation_of_the_histogram():
    m = Metrics([Settings()])
    tell = Told(m, RULES)
    tell.event("web", observed(), 100.0)
    tell.event("web", Notice("i-spot", deadline=220.0), 101.0)
    serving = Observed(spots=(Instance("i-spot", "running", True),), standbys=(Instance("i-standby", "running"),),
                       targets=(Target("i-spot", "healthy"), Target("i-standby", "healthy")))
    assert tell.event("web", serving, 190.0).phase is Phase.BOTH_SERVING
    tell.event("web", serving, 191.0)
    assert sample(m, "spotguard_ready_margin_seconds_count", guard="web") == 1
    assert sample(m, "spotguard_last_ready_margin_seconds", guard="web") == 30.0
    assert sample(m, "spotguard_ready_margin_seconds_bucket", guard="web", le="30.0") == 1
    assert sample(m, "spotguard_ready_margin_seconds_bucket", guard="web", le="20.0") == 0
