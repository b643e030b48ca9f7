"""The operator's tools tell the truth while the daemon works: a rehearsal beside a running daemon,
a standby a person started, and the fast poll from a failover's first command.

End to end against moto, with the daemon running in this process and its Discord
messages caught by a real local webhook; `status` as the operator runs it.
"""

from __future__ import annotations

import io
import json
import time

from configs import daemon_settings, write_config
from httpcapture import CaptureServer
from structlog.testing import capture_logs
from test_daemon import _warning, health, phase, running, state
from test_rehearse import finish, start_rehearsal
from waiting import until

from spotguard.commands import status
from spotguard.ledger import Ledger
from spotguard.machine import Phase
from spotguard.notify import Notifier


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def posted(discord: CaptureServer) -> list[str]:
    return [r.json["content"] for r in discord.requests]


async def test_a_rehearsal_beside_a_running_daemon_is_announced_and_changes_no_phase(
    tmp_path, moto_world, deployment, aws, aio_session
):
    """The issue's case: a rehearsal with the daemon running made three phase changes and their
    messages, none documented, and status called the standby 'serving this failover'."""
    d, standby = deployment, deployment.standby_ids[0]
    path = write_config(tmp_path, moto_world, [d], poll="0.2s", grace="1s",
                        daemon={"log_format": "json"})
    settings = daemon_settings(tmp_path, moto_world, [d], poll="0.2s", grace="1s")
    assert settings.daemon.state_dir == tmp_path / "state"
    moto_world.hold_draining(d.target_group_arn, standby)  # the rehearsal's drain waits for the test
    with CaptureServer() as discord, capture_logs() as logs:
        notifier = Notifier(discord.url + "/api/webhooks/1/x", timeout=2.0)
        async with running(settings, aws, notifier, observers=[Ledger(settings.daemon.state_dir, settings.guards)]) \
                as daemon:
            out = io.StringIO()
            _, task, stack = await start_rehearsal(moto_world, aio_session, path, out)
            await until(lambda: health(moto_world, d).get(standby) == "draining", what="the rehearsal drains")
            await until(lambda: events(logs, "guard.rehearsal.started"), what="the daemon saw the rehearsal")
            doc = status.report(settings, time.time())["guards"][0]
            assert (doc["rehearsing"], doc["standby"], doc["stray"]) == (standby, None, None)
            text = status.render(status.report(settings, time.time()))
            assert f"{standby}" in text and "← being rehearsed (spotguard rehearse)" in text
            moto_world.hold_draining(d.target_group_arn, standby, False)
            assert await finish(task, stack) == 0, out.getvalue()
            await until(lambda: events(logs, "guard.rehearsal.ended"), what="the daemon saw it end")
            rounds = daemon.rounds
            await until(lambda: daemon.rounds >= rounds + 10, what="ten more rounds")
            assert phase(daemon) is Phase.SPOT_HEALTHY
            await until(lambda: any("rehearsal of standby" in p for p in posted(discord)), what="announced")
    assert events(logs, "guard.transition") == []  # no phase changed, nothing to explain
    assert not [e for e in events(logs, "guard.alert") if standby in e["text"]]
    assert state(moto_world, standby) == "stopped"


async def test_a_standby_started_by_hand_is_said_then_drained_after_the_grace(tmp_path, moto_world, deployment, aws):
    d, standby = deployment, deployment.standby_ids[0]
    settings = daemon_settings(tmp_path, moto_world, [d], poll="0.2s", grace="2s")
    with CaptureServer() as discord, capture_logs() as logs:
        ledger = Ledger(settings.daemon.state_dir, settings.guards)  # the seen file status reads
        notifier = Notifier(discord.url + "/api/webhooks/1/x", timeout=2.0)
        async with running(settings, aws, notifier, observers=[ledger]) as daemon:
            moto_world.boto("ec2").start_instances(InstanceIds=[standby])  # a person, from the console
            await until(lambda: phase(daemon) is Phase.SPOT_RESTORED, what="taken in")
            doc = status.report(settings, time.time())["guards"][0]
            assert (doc["standby"], doc["stray"]) == (None, standby)  # null outside a failover (status-json.md)
            text = status.render(status.report(settings, time.time()))
            assert "← running outside a failover: drained and stopped after failback_grace" in text
            await until(lambda: any("running outside a failover" in p for p in posted(discord)), what="said")
            await until(lambda: state(moto_world, standby) == "stopped", what="stopped after the grace")
    (alert,) = [e for e in events(logs, "guard.alert") if "outside a failover" in e["text"]]
    assert alert["text"] == (f"standby {standby} is running outside a failover: spotguard drains and stops it after "
                             "failback_grace (2s) unless it is taken out of standby_instance_ids")


async def test_the_fast_poll_begins_with_the_failovers_first_command(tmp_path, moto_world, deployment, aws):
    """The issue's case: StartInstances at :24.63, RegisterTargets at :29.61, a whole steady
    poll later. The phase change wakes the loop's cadence: the next look comes a second after."""
    d, standby = deployment, deployment.standby_ids[0]
    sqs = moto_world.boto("sqs")
    url = sqs.create_queue(QueueName="spotguard")["QueueUrl"]
    settings = daemon_settings(tmp_path, moto_world, [d], poll="5s", sqs=url)
    actions = Actions()
    async with running(settings, aws, observers=[actions]):
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(_warning(d.spot_instance_id)))
        await until(lambda: standby in health(moto_world, d), what="standby registered")
    gap = actions.at["Register"] - actions.at["Start"]
    assert gap < 2.5, f"RegisterTargets {gap:.2f}s after StartInstances: the 5 s poll, not the 1 s one"


class Actions:
    """An observer: when each kind of command was first carried out (the daemon's clock)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def action(self, guard, command, failed, seconds, at) -> None:
        self.at.setdefault(type(command).__name__, at)
