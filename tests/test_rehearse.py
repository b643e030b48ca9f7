"""`spotguard rehearse` against moto (server mode): it times the standby, then leaves things as they were.

moto starts instances and makes targets healthy at once; the tests hold the
standby's target `initial` (MotoWorld.set_health), hold it `draining` after
deregistration (hold_draining) or hold the instance `pending`
(model_transitions) to reach the moment they want, then release or interrupt.
"As they were" is: every standby stopped, and the target group listing exactly
the targets it listed before.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from configs import write_config
from test_check import run_check, set_delay
from waiting import until

from spotguard import config, rehearsal
from spotguard.aws import client
from spotguard.commands.rehearse import Rehearser
from spotguard.machine import GuardState, Phase
from spotguard.store import Store


@pytest.fixture
def lab(deployment, moto_world, tmp_path):
    """The sound deployment, its config and what the target group lists before the rehearsal."""
    set_delay(moto_world, deployment, 30)
    path = write_config(tmp_path, moto_world, [deployment])
    return deployment, path, moto_world.health(deployment.target_group_arn)


async def start_rehearsal(world, session, path: Path, out: io.StringIO) -> tuple[Rehearser, asyncio.Task, list]:
    settings = config.load(path)
    stack = []
    ec2 = client("ec2", world.region, world.endpoint_url, session=session)
    elbv2 = client("elbv2", world.region, world.endpoint_url, session=session)
    clients = [await ec2.__aenter__(), await elbv2.__aenter__()]
    stack.extend([ec2, elbv2])
    rehearser = Rehearser(settings, settings.guards[0], ec2=clients[0], elbv2=clients[1], out=out, interval=0.02)
    return rehearser, asyncio.create_task(rehearser.run()), stack


async def finish(task: asyncio.Task, stack: list) -> int:
    try:
        return await asyncio.wait_for(task, 20)
    finally:
        for c in reversed(stack):
            await c.__aexit__(None, None, None)


def assert_as_found(world, d, before: dict[str, str]) -> None:
    assert set(world.states(*d.standby_ids).values()) == {"stopped"}
    assert world.health(d.target_group_arn) == before


async def test_a_rehearsal_times_the_standby_records_it_and_puts_everything_back(moto_world, aio_session, lab):
    d, path, before = lab
    sid = d.standby_ids[0]
    moto_world.set_health(d.target_group_arn, sid, "initial")
    moto_world.hold_draining(d.target_group_arn, sid)
    out = io.StringIO()
    rehearser, task, stack = await start_rehearsal(moto_world, aio_session, path, out)

    await until(lambda: sid in moto_world.registered_targets(d.target_group_arn), timeout=10.0)
    await until(lambda: "initial" in out.getvalue(), timeout=10.0)
    moto_world.set_health(d.target_group_arn, sid, None)  # moto's own answer: healthy
    await until(lambda: "draining" in out.getvalue(), timeout=10.0)
    assert not task.done() and moto_world.health(d.target_group_arn)[sid] == "draining"  # it waits out the drain
    moto_world.hold_draining(d.target_group_arn, sid, False)
    code = await finish(task, stack)

    assert code == 0, out.getvalue()
    assert_as_found(moto_world, d, before)
    lines = out.getvalue().splitlines()
    assert lines[1] == f"StartInstances {sid}"
    assert re.fullmatch(r"running after \d+\.\ds; RegisterTargets", lines[2])
    assert any(line.startswith("budget: detect 5s + ready ") and "+ drain 30s + margin 10s = " in line
               for line in lines)
    assert lines[-1].startswith("stopped after ")
    record_file = rehearsal.path(tmp_state(path), "lab")
    assert stat.S_IMODE(record_file.stat().st_mode) == 0o600
    record = rehearsal.read(tmp_state(path), "lab")
    assert (record.standby, record.outcome) == (sid, "healthy")
    assert 0 <= record.running <= record.registered <= record.healthy < 10
    assert json.loads(record_file.read_text())["version"] == 1

    # check reads it back: the measured readiness against the notice.
    _, check_lines = await run_check(moto_world, aio_session, path)
    (timing,) = [line.strip() for line in check_lines if line.strip()[2:].startswith("timing")]
    assert timing.startswith(f"✓ timing (rehearsed {record.at} on {sid}): detect 5s + ready ")


def tmp_state(path: Path) -> Path:
    return path.parent / "state"


def read_until(proc: subprocess.Popen, prefix: str, timeout: float = 30.0) -> list[str]:
    """The process's stdout lines up to one starting with `prefix`; fails at the deadline, never hangs."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
            if line.startswith(prefix):
                return
        lines.put(None)  # the process ended first

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not (seen and seen[-1].startswith(prefix)):
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no line starting {prefix!r} within {timeout}s; got {seen}") from None
        assert line is not None, f"the process ended before {prefix!r}: {seen}"
        seen.append(line)
    return seen


def test_sigint_to_the_real_process_while_the_target_is_initial_puts_everything_back(moto_world, lab):
    d, path, before = lab
    sid = d.standby_ids[0]
    moto_world.set_health(d.target_group_arn, sid, "initial")  # never healthy: the rehearsal waits
    proc = subprocess.Popen(
        [sys.executable, "-m", "spotguard", "rehearse", "--config", str(path), "--guard", "lab"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )
    try:
        seen = read_until(proc, f"target {sid}: initial")
        assert moto_world.registered_targets(d.target_group_arn) == (d.spot_instance_id, sid)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 128 + signal.SIGINT, err
    out = "".join(seen) + rest
    assert f"interrupted (SIGINT): putting {sid} back" in out
    assert f"DeregisterTargets {sid}" in out and f"StopInstances {sid}" in out
    assert err == ""
    assert_as_found(moto_world, d, before)
    assert rehearsal.read(tmp_state(path), "lab") is None  # an interrupted rehearsal measured nothing


async def test_an_interrupt_while_the_standby_is_pending_stops_it(moto_world, aio_session, lab):
    d, path, before = lab
    sid = d.standby_ids[0]
    moto_world.model_transitions()
    out = io.StringIO()
    rehearser, task, stack = await start_rehearsal(moto_world, aio_session, path, out)

    await until(lambda: moto_world.instance_state(sid) == "pending", timeout=10.0)
    rehearser.interrupt(signal.SIGTERM, task)
    await until(lambda: moto_world.instance_state(sid) == "stopping", timeout=10.0)
    rehearser.interrupt(signal.SIGINT, task)  # a second signal while putting back: noted, not obeyed
    moto_world.set_state(sid, "stopped")
    code = await finish(task, stack)

    assert code == 128 + signal.SIGTERM
    assert "SIGINT: still putting" in out.getvalue()
    assert_as_found(moto_world, d, before)


@pytest.mark.parametrize("phase", [Phase.BOTH_SERVING, Phase.SPOT_RESTORED])
async def test_it_refuses_unless_the_guard_is_spot_healthy(moto_world, aio_session, lab, phase):
    d, path, before = lab
    settings = config.load(path)
    guard = settings.guards[0]
    Store(settings.daemon.state_dir).save("lab", GuardState(rules=guard.rules(), phase=phase, reason="a notice"))
    out = io.StringIO()
    _, task, stack = await start_rehearsal(moto_world, aio_session, path, out)

    assert await finish(task, stack) == 1
    assert out.getvalue() == (f"refused: guard lab is {phase.value} (a notice); "
                              "rehearse only while it is spot-healthy\n")
    assert_as_found(moto_world, d, before)


async def test_it_refuses_a_standby_that_is_not_stopped(moto_world, aio_session, lab):
    d, path, before = lab
    sid = d.standby_ids[0]
    moto_world.boto("ec2").start_instances(InstanceIds=[sid])
    out = io.StringIO()
    _, task, stack = await start_rehearsal(moto_world, aio_session, path, out)

    assert await finish(task, stack) == 1
    assert f"refused: standby {sid} is running, not stopped" in out.getvalue()
    assert moto_world.states(sid) == {sid: "running"} and moto_world.health(d.target_group_arn) == before


async def test_it_never_deregisters_the_only_healthy_target(moto_world, aio_session, lab):
    d, path, _ = lab
    sid = d.standby_ids[0]
    out = io.StringIO()
    moto_world.set_health(d.target_group_arn, sid, "initial")
    _, task, stack = await start_rehearsal(moto_world, aio_session, path, out)
    await until(lambda: "initial" in out.getvalue(), timeout=10.0)
    moto_world.set_health(d.target_group_arn, d.spot_instance_id, "unhealthy")  # the spot fails meanwhile
    moto_world.set_health(d.target_group_arn, sid, None)

    assert await finish(task, stack) == 1
    assert "it is the only healthy target" in out.getvalue()
    assert moto_world.health(d.target_group_arn)[sid] == "healthy"
    assert moto_world.states(sid) == {sid: "running"}


async def test_a_standby_never_healthy_is_recorded_put_back_and_reported_by_check(
    moto_world, aio_session, lab, tmp_path
):
    d, _, before = lab
    path = write_config(tmp_path, moto_world, [d], ready="0.3s")
    sid = d.standby_ids[0]
    moto_world.set_health(d.target_group_arn, sid, "unhealthy")
    out = io.StringIO()
    _, task, stack = await start_rehearsal(moto_world, aio_session, path, out)

    assert await finish(task, stack) == 1
    assert "rehearsal failed: not healthy within 0.3s (last: unhealthy)" in out.getvalue()
    moto_world.set_health(d.target_group_arn, sid, None)
    assert_as_found(moto_world, d, before)
    code, lines = await run_check(moto_world, aio_session, path)
    assert code == 0
    assert any(line.strip().startswith("! timing: rehearsed ") and "not healthy within 0.3s" in line for line in lines)


async def test_with_register_when_ready_it_waits_for_the_health_check_and_reports_answered_to_healthy(
        moto_world, aio_session, deployment, tmp_path):
    """The standby's service on its own private address: 503 while it loads, then 200."""
    from test_probe import Service

    d = deployment
    set_delay(moto_world, d, 30)
    sid = d.standby_ids[0]
    async with Service(503, address=moto_world.private_address(sid)) as service:
        path = write_config(tmp_path, moto_world, [d], guard={"register_when": "ready", "target_port": service.port})
        out = io.StringIO()
        rehearser, task, stack = await start_rehearsal(moto_world, aio_session, path, out)
        await until(lambda: len(service.heads) >= 2, timeout=10.0, what="the standby probed")
        assert sid not in moto_world.registered_targets(d.target_group_arn)  # not registered while it fails
        service.status = 200
        code = await finish(task, stack)
    assert code == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"running after \d+\.\ds; probing its health check", lines[2])
    assert lines[3] == f"health check from here: fail (HTTP {service.address}:{service.port})"
    assert re.fullmatch(rf"answers its health check \(HTTP {re.escape(service.address)}:{service.port}\) after "
                        r"\d+\.\ds", lines[4])
    assert lines[5] == "RegisterTargets"
    assert any(re.fullmatch(r"healthy after \d+\.\ds \(\d+\.\ds after it answered\)", line) for line in lines)
    recorded = rehearsal.read(Path(config.load(path).daemon.state_dir), d.name)
    assert recorded.ready is not None and recorded.ready <= recorded.registered <= recorded.healthy
