"""Never silent: a full disk, a blind poll, a cut-off leader or a broken worker is acted around and heard.

Against moto with real parts: the state directory on a real filesystem that
runs full or read-only (a small tmpfs; skipped where this machine cannot
mount one), Discord as a real local webhook, the daemon in-process or as a
`spotguard run` process, and [ha] leaders behind a real proxy that cuts only
their EC2 and ELBv2 calls.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from configs import daemon_settings, write_config
from httpcapture import CaptureServer
from structlog.testing import capture_logs
from test_daemon import health, phase, replace_spot, running, state
from waiting import until

from spotguard import store
from spotguard.daemon import build, serve
from spotguard.executor import Executor
from spotguard.lab.world import ApiFault
from spotguard.machine import Phase, Start
from spotguard.metrics import Metrics
from spotguard.notify import Notifier
from spotguard.sources.sqs import SqsSource

fault = pytest.mark.fault
SMALL = "64k"


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs under tmp_path: a real filesystem a test may fill or make read-only."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL},mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a file in `directory` until the filesystem says it is full; the file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def remount(mount: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)


@pytest.fixture
def discord():
    with CaptureServer() as server:
        yield server


def posted(discord: CaptureServer) -> list[str]:
    return [r.json["content"] for r in discord.requests]


async def fail_over_unsaved(moto_world, d, daemon, discord, logs) -> None:
    """A notice: the standby must start although no state can be written, and people hear it once."""
    standby = d.standby_ids[0]
    moto_world.notice(d.spot_request_id)
    await until(lambda: state(moto_world, standby) == "running", what="standby started on an unwritable disk")
    await until(lambda: phase(daemon) is Phase.BOTH_SERVING, what="both-serving, in memory")
    await until(lambda: any("state not saved" in p for p in posted(discord)), what="Discord told")
    assert len(events(logs, "guard.state.unsaved")) == 1


@fault(fault="state_dir disk full", phase="spot-healthy → both-serving",
       outcome="failover carried out; alert once; state written when space returns")
async def test_a_full_disk_never_blocks_a_failover(tmp_path, small_fs, moto_world, deployment, aws, discord):
    d = deployment
    settings = daemon_settings(tmp_path, moto_world, [d], daemon={"state_dir": str(small_fs / "state")})
    notifier = Notifier(discord.url + "/api/webhooks/1/x", timeout=2.0)
    metrics = Metrics(settings.guards)
    async with running(settings, aws, notifier, observers=[metrics]) as daemon:
        filler = fill(small_fs)
        with capture_logs() as logs:
            await fail_over_unsaved(moto_world, d, daemon, discord, logs)
            assert metrics.registry.get_sample_value("spotguard_state_unsaved", {"guard": d.name}) == 1
            filler.unlink()
            await until(lambda: events(logs, "guard.state.saved"), what="the state saved once there is room")
        await until(lambda: any("state saved again" in p for p in posted(discord)), what="Discord told it is saved")
        on_disk = store.peek(small_fs / "state", d.name, daemon.guards[d.name].state.rules)
        assert on_disk is not None and on_disk.phase is phase(daemon)
        assert metrics.registry.get_sample_value("spotguard_state_save_errors_total", {"guard": d.name}) >= 1
        assert metrics.registry.get_sample_value("spotguard_state_unsaved", {"guard": d.name}) == 0


@fault(fault="state_dir read-only", phase="spot-healthy → both-serving",
       outcome="failover carried out; alert once; state written when writable again")
async def test_a_read_only_state_dir_never_blocks_a_failover(tmp_path, small_fs, moto_world, deployment, aws, discord):
    d = deployment
    settings = daemon_settings(tmp_path, moto_world, [d], daemon={"state_dir": str(small_fs / "state")})
    async with running(settings, aws, Notifier(discord.url + "/api/webhooks/1/x", timeout=2.0)) as daemon:
        remount(small_fs, "ro")
        with capture_logs() as logs:
            await fail_over_unsaved(moto_world, d, daemon, discord, logs)
            assert "Read-only file system" in events(logs, "guard.state.unsaved")[0]["text"]
            remount(small_fs, "rw")
            await until(lambda: events(logs, "guard.state.saved"), what="saved once writable")


@fault(fault="state_dir removed", phase="spot-healthy → both-serving", outcome="made again; failover carried out")
async def test_a_removed_state_dir_is_made_again(tmp_path, moto_world, deployment, aws):
    d = deployment
    settings = daemon_settings(tmp_path, moto_world, [d])
    state_dir = settings.daemon.state_dir
    async with running(settings, aws) as daemon:
        moto_world.notice(d.spot_request_id)
        await until(lambda: phase(daemon) is Phase.BOTH_SERVING, what="both-serving")
        shutil.rmtree(state_dir)  # a person cleaning up, or a tmpfiles rule
        await replace_spot(moto_world, daemon, d)
        await until(lambda: phase(daemon) is not Phase.BOTH_SERVING, what="the next phase")
        saved = await until(lambda: store.peek(state_dir, d.name, daemon.guards[d.name].state.rules),
                            what="the state file written again")
        assert saved.phase is not Phase.BOTH_SERVING


@fault(fault="ledger unwritable", phase="spot-healthy → both-serving", outcome="logged; failover carried out")
async def test_an_unwritable_ledger_costs_a_log_line_not_a_failover(tmp_path, moto_world, deployment, aws):
    from spotguard.ledger import Ledger, ledger_path

    d = deployment
    settings = daemon_settings(tmp_path, moto_world, [d])
    state_dir = settings.daemon.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    ledger_path(state_dir, d.name).mkdir()  # a directory where the history is appended: every write fails
    with capture_logs() as logs:
        async with running(settings, aws, observers=[Ledger(state_dir, settings.guards)]) as daemon:
            moto_world.notice(d.spot_request_id)
            await until(lambda: phase(daemon) is Phase.BOTH_SERVING, what="both-serving")
            await until(lambda: d.spot_instance_id not in health(moto_world, d), what="doomed spot out")
    assert events(logs, "ledger.write.failed")
    assert store.peek(state_dir, d.name, daemon.guards[d.name].state.rules).phase is Phase.BOTH_SERVING


def run_daemon(config: Path, timeout: float = 30.0) -> tuple[int, list[dict]]:
    done = subprocess.run([sys.executable, "-m", "spotguard", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@fault(fault="state_dir not writable at start", phase="start", outcome="one line, exit 1, never READY")
def test_an_unwritable_state_dir_is_refused_before_ready(tmp_path, small_fs, moto_world, deployment):
    remount(small_fs, "ro")
    config = write_config(tmp_path, moto_world, [deployment], daemon={"state_dir": str(small_fs / "state")})
    code, lines = run_daemon(config)
    assert code == 1
    (line,) = [e for e in lines if e["event"] == "daemon.state_dir.unusable"]
    assert line["level"] == "critical" and "Read-only file system" in line["error"]
    assert not [e for e in lines if e["event"] in ("daemon.ready", "daemon.started")]


@fault(fault="AWS unreachable past blind_after", phase="spot-healthy",
       outcome="alert (error level, Discord) once; sight back said; poll errors counted")
async def test_blindness_is_loud_and_so_is_sight_coming_back(tmp_path, moto_world, deployment, aws, discord):
    d = deployment
    settings = daemon_settings(tmp_path, moto_world, [d], daemon={"blind_after": "1s"})
    metrics = Metrics(settings.guards)
    notifier = Notifier(discord.url + "/api/webhooks/1/x", timeout=2.0)
    async with running(settings, aws, notifier, observers=[metrics]):
        seen = metrics.registry.get_sample_value("spotguard_last_observation_timestamp_seconds", {"guard": d.name})
        assert seen is not None
        with capture_logs() as logs:
            # A removed permission: every round fails at once, without botocore's retries.
            cut = moto_world.api_fault(ApiFault("DescribeSpotInstanceRequests", code="UnauthorizedOperation"))
            await until(lambda: events(logs, "guard.blind"), what="blind said")
            (blind,) = events(logs, "guard.blind")
            assert blind["log_level"] == "error" and "UnauthorizedOperation" in blind["text"]
            await until(lambda: any("blind: no observation" in p for p in posted(discord)), what="Discord told")
            errors = metrics.registry.get_sample_value(
                "spotguard_poll_errors_total", {"guard": d.name, "api": "DescribeSpotInstanceRequests",
                                                "code": "UnauthorizedOperation"})
            assert errors and errors >= 1
            moto_world.clear_api_fault(cut)
            await until(lambda: events(logs, "guard.sight.back"), what="sight back said")
        assert len(events(logs, "guard.blind")) == 1
        await until(lambda: any("sight back" in p for p in posted(discord)), what="Discord told of sight")
        later = metrics.registry.get_sample_value("spotguard_last_observation_timestamp_seconds", {"guard": d.name})
        assert later > seen


class BuggyExecutor(Executor):
    """The executor with a bug planted in one path: an exception no AWS error explains."""

    async def run(self, guard_name, command):
        if isinstance(command, Start):
            raise RuntimeError("a bug in the executor")
        return await super().run(guard_name, command)


@fault(fault="a bug in a guard's worker", phase="spot-healthy → standby-starting",
       outcome="never lost: logged critical, the daemon stops with it (systemd restarts it)")
async def test_a_bug_in_a_worker_is_never_lost(tmp_path, moto_world, deployment, aws):
    d = deployment
    settings = daemon_settings(tmp_path, moto_world, [d])
    notifier = Notifier(None)
    daemon = build(settings, aws, notifier)
    daemon.executor = BuggyExecutor(aws.ec2, aws.elbv2, settings.guards)
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(serve(daemon, settings, aws, stop))
        await until(lambda: daemon.rounds >= 1, what="first round")
        moto_world.notice(d.spot_request_id)
        await until(task.done, what="the daemon stopped by the bug")
    with pytest.raises(RuntimeError, match="a bug in the executor"):
        task.result()
    assert events(logs, "guard.worker.failed")[0]["log_level"] == "critical"


@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_the_sqs_source_says_its_counts_on_every_stop(moto_world, aws, how):
    queue = moto_world.boto("sqs").create_queue(QueueName="counts")["QueueUrl"]
    source = SqsSource(aws.sqs, queue, owns=lambda _: False, push=lambda _: None, wait_seconds=1)
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(source.run(stop))
        await until(lambda: events(logs, "source.sqs.started"), what="started")
        if how == "stop":
            stop.set()
        else:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    (stopped,) = events(logs, "source.sqs.stopped")
    assert set(stopped) >= {"received", "notices", "malformed", "errors"}


@fault(fault="the [ha] leader cut off from EC2/ELBv2 only (DynamoDB answers)", phase="spot-healthy",
       outcome="it steps aside after blind_after; the follower leads and fails over")
async def test_a_leader_blind_to_ec2_steps_aside_for_the_follower(tmp_path, moto_world, deployment, table):
    from test_ha import PROC_DEADLINE, proxied_pair

    d, standby = deployment, deployment.standby_ids[0]
    async with proxied_pair(tmp_path, moto_world, [d], poll="0.5s", grace="1h",
                            daemon={"blind_after": "2s"}) as (leader, follower, lp, _):
        for action in ("DescribeSpotInstanceRequests", "DescribeInstances", "DescribeTargetHealth"):
            lp.hold(action, count=None)  # EC2 and ELBv2 never answer; DynamoDB still does
        await until(lambda: leader.events("ha.stepped_aside"), timeout=PROC_DEADLINE,
                    what="the blind leader steps aside")
        await until(follower.leads, timeout=PROC_DEADLINE, what="the follower leads")
        moto_world.notice(d.spot_request_id)
        await until(lambda: follower.events("guard.transition", to="both-serving"),
                    timeout=PROC_DEADLINE, what="failover by the follower")
        assert not leader.events("executor.action")
    assert [e["instance_id"] for e in follower.starts()] == [standby]


# ---------------------------------------------------------------------- no traceback from a botocore failure

def cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, **(env or {})}
    for name, value in list(environ.items()):
        if value is None:
            del environ[name]
    return subprocess.run([sys.executable, "-m", "spotguard", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=environ)


NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SECURITY_TOKEN": None,
                  "AWS_SESSION_TOKEN": None}


@pytest.mark.parametrize("verb", [["check"], ["setup", "--dry-run"], ["rehearse", "--guard", "lab"]])
def test_no_such_profile_is_one_line_for_every_verb(tmp_path, moto_world, deployment, verb):
    config = write_config(tmp_path, moto_world, [deployment], sqs=f"{moto_world.endpoint_url}/123456789012/q")
    done = cli(config, *verb, env={"AWS_PROFILE": "nosuch"})
    assert (done.returncode, done.stdout) == (1, ""), done
    assert done.stderr == f"spotguard {verb[0]}: ProfileNotFound: The config profile (nosuch) could not be found\n"


@pytest.mark.parametrize("trouble, code", [
    ("no credentials", "NoCredentialsError"),
    ("an access key without its secret", "PartialCredentialsError"),
    ("a 200 with an empty body", "ResponseParserError"),
    ("nothing listening", "EndpointConnectionError"),
])
def test_every_botocore_failure_is_a_line_not_a_traceback(tmp_path, moto_world, deployment, trouble, code):
    env: dict = {}
    endpoint = moto_world.endpoint_url
    with CaptureServer() as broken, socket_refusing() as refused:
        if trouble == "no credentials":
            env = NO_CREDENTIALS
        elif trouble == "an access key without its secret":
            env = {**NO_CREDENTIALS, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"}
        elif trouble == "a 200 with an empty body":
            broken.respond(200, b"")
            endpoint = broken.url
        else:
            endpoint = refused
        config = write_config(tmp_path, moto_world, [deployment], aws={"endpoint_url": endpoint},
                              sqs=f"{moto_world.endpoint_url}/123456789012/q")
        for verb in (["setup", "--dry-run"],):  # rehearse keeps its full retries: the per-verb test above covers it
            done = cli(config, *verb, env=env)
            assert "Traceback" not in done.stderr, done.stderr
            said = done.stdout + done.stderr  # SQS's JSON parser reads an empty 200 as {}: a reply without its fields
            assert done.returncode == 1 and (code in said or "AWS answered without" in said), done
        check = cli(config, "check", env=env)
    assert "Traceback" not in check.stderr and check.returncode == 1
    assert code in check.stdout + check.stderr  # said once, on the credentials line or as the one line


def socket_refusing():
    from httpcapture import refused_url

    return refused_url()
