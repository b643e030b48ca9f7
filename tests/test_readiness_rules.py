"""The readiness rules of the machine: an instance is registered once it answers its health check."""

from dataclasses import replace

import pytest

from spotguard.machine import (
    READY,
    SILENT,
    SILENT_FALLBACK,
    WAITING,
    Alert,
    GuardState,
    Instance,
    Notice,
    Observed,
    Phase,
    Register,
    Rules,
    Target,
    step,
    to_probe,
)

RULES = Rules(standbys=("i-s1", "i-s2"))
SPOT = Instance("i-a", "running", probe=READY)
LAUNCHED = 1000.0


def serving_standby(probe, launched=LAUNCHED, spot_health="healthy"):
    """Standby i-s1 running and not registered, the doomed spot still a target."""
    return Observed(
        spots=(SPOT,),
        standbys=(Instance("i-s1", "running", address="127.0.1.4", launched=launched, probe=probe),
                  Instance("i-s2", "stopped")),
        targets=(Target("i-a", spot_health),),
    )


def starting(seen, **kw):
    return GuardState(rules=kw.pop("rules", RULES), phase=Phase.STANDBY_STARTING, since=LAUNCHED, reason="test",
                      standby="i-s1", started_at=LAUNCHED, doomed=frozenset({"i-a"}), seen=seen, **kw)


def registers(commands):
    return [c.instance_id for c in commands if isinstance(c, Register)]


def alerts(commands):
    return [c.text for c in commands if isinstance(c, Alert)]


@pytest.mark.parametrize("probe,now,registered", [
    (READY, LAUNCHED + 20, True),
    (WAITING, LAUNCHED + 20, False),  # answers, not yet with success: warming up
    (WAITING, LAUNCHED + 200, False),  # the balancer would fail it too: standby_ready_timeout decides
    (SILENT, LAUNCHED + 20, False),  # still booting
    (SILENT, LAUNCHED + SILENT_FALLBACK - 1, False),
    (SILENT, LAUNCHED + SILENT_FALLBACK, True),  # no route from here: the balancer may have one
    (None, LAUNCHED + 20, True),  # cannot be probed (gRPC check, no address): registered as it runs
])
def test_a_standby_is_registered_when_its_probe_says_so(probe, now, registered):
    seen = serving_standby(probe)
    _, commands = step(starting(seen), seen, now)
    assert registers(commands) == (["i-s1"] if registered else [])


@pytest.mark.parametrize("probe", [WAITING, SILENT, None])
def test_register_when_running_ignores_the_probe(probe):
    seen = serving_standby(probe)
    state = starting(seen, rules=replace(RULES, register_when="running"))
    _, commands = step(state, seen, LAUNCHED + 1)
    assert registers(commands) == ["i-s1"]
    assert not alerts(commands)
    assert to_probe(state, seen) == ()


def test_registering_unproven_is_said_once_per_boot():
    seen = serving_standby(None)
    state, commands = step(starting(seen), seen, LAUNCHED + 5)
    assert alerts(commands) == ["i-s1 registered without knowing it is ready: its health check cannot be probed "
                                "from here; if its first health check fails it needs HealthyThresholdCount passes "
                                "(run spotguard check)"]
    state, commands = step(state, seen, LAUNCHED + 6)  # the Register failed, say: sent again, not said again
    assert registers(commands) == ["i-s1"] and not alerts(commands)
    stopped = replace(seen, standbys=(Instance("i-s1", "stopped"), seen.standbys[1]))
    state, _ = step(state, stopped, LAUNCHED + 7)
    assert state.unprobed == frozenset()  # a new boot is said again


def test_silent_fallback_names_the_wait():
    seen = serving_standby(SILENT)
    _, commands = step(starting(seen), seen, LAUNCHED + 75)
    assert alerts(commands)[0].startswith("i-s1 registered without knowing it is ready: no answer to the "
                                          "health-check probe 75s after launch;")


def test_the_agent_saying_ready_registers_at_once():
    seen = serving_standby(SILENT)
    state, commands = step(starting(seen), seen, LAUNCHED + 10)
    assert registers(commands) == []
    state, commands = step(state, Notice("i-s1", READY), LAUNCHED + 11)
    assert registers(commands) == ["i-s1"] and not alerts(commands)
    assert state.ready == frozenset({"i-s1"})
    again, commands = step(state, Notice("i-s1", READY), LAUNCHED + 12)
    assert again == state and commands == ()
    stopped = replace(seen, standbys=(Instance("i-s1", "stopped"), seen.standbys[1]))
    state, _ = step(state, stopped, LAUNCHED + 13)
    assert state.ready == frozenset()  # readiness belongs to one boot


def test_a_new_spot_waits_for_its_probe_too():
    old = Instance("i-a", "running", probe=READY)
    state = GuardState(rules=RULES, seen=Observed(spots=(old,), standbys=(Instance("i-s1", "stopped"),),
                                                  targets=(Target("i-a", "healthy"),)))
    new = Instance("i-b", "running", address="127.0.1.9", launched=LAUNCHED, probe=WAITING)
    seen = Observed(spots=(old, new), standbys=(Instance("i-s1", "stopped"),), targets=(Target("i-a", "healthy"),))
    state, commands = step(state, seen, LAUNCHED + 5)
    assert registers(commands) == []
    assert to_probe(state, seen) == (new,)
    seen = replace(seen, spots=(old, replace(new, probe=READY)))
    _, commands = step(state, seen, LAUNCHED + 7)
    assert registers(commands) == ["i-b"]


def test_only_running_unregistered_unowned_instances_are_probed():
    seen = Observed(
        spots=(Instance("i-a", "running"), Instance("i-b", "pending"), Instance("i-c", "running")),
        standbys=(Instance("i-s1", "running"), Instance("i-s2", "running")),
        targets=(Target("i-a", "healthy"), Target("i-s1", "draining")),
        foreign=frozenset({"i-c"}),
    )
    assert [i.id for i in to_probe(GuardState(rules=RULES), seen)] == ["i-s1", "i-s2"]
