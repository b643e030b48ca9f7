"""The agent against a real IMDSv2 server and moto's SQS: notices become one message each, garbage none.

IMDS is spotguard.lab.imds.InstanceMetadata (tokens, 401s, 404s) or, for
garbage, a small aiohttp server of this file's own; SQS is moto in server mode
with real aiobotocore clients. The last test runs `spotguard agent` as a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp import web
from structlog.testing import capture_logs
from waiting import until

from spotguard.agent import Agent
from spotguard.aws import client
from spotguard.lab.imds import InstanceMetadata
from spotguard.machine import Notice
from spotguard.sources.eventbridge import INTERRUPTION, Malformed, Parsed, parse
from spotguard.sources.sqs import SqsSource

ID = "i-0aaaaaaaaaaaaaaa1"
AT = datetime(2026, 11, 28, 8, 22, tzinfo=timezone.utc)


class Clock:
    """The agent's token clock, moved by hand alongside the server's."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def imds() -> AsyncIterator[InstanceMetadata]:
    server = InstanceMetadata(ID)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def queue_url(moto_world) -> str:
    return moto_world.boto("sqs").create_queue(QueueName="spotguard")["QueueUrl"]


@pytest.fixture
async def sqs(moto_world, aio_session) -> AsyncIterator[Any]:
    async with client("sqs", moto_world.region, moto_world.endpoint_url, session=aio_session, max_attempts=1) as c:
        yield c


def drain(moto_world, queue_url: str) -> list[Parsed]:
    """Every message now in the queue, parsed (and deleted)."""
    sqs = moto_world.boto("sqs")
    out: list[Parsed] = []
    while True:
        got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not got:
            return out
        for message in got:
            parsed = parse(message["Body"])
            assert not isinstance(parsed, Malformed), parsed
            out.append(parsed)
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


def events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


async def test_nothing_is_sent_while_imds_answers_404(imds, sqs, queue_url, moto_world):
    async with Agent(imds.url, sqs, queue_url) as agent:
        for _ in range(3):
            assert await agent.poll_once() == []
    assert agent.instance_id == ID
    assert drain(moto_world, queue_url) == []


async def test_an_interruption_is_sent_once_and_parses(imds, sqs, queue_url, moto_world):
    async with Agent(imds.url, sqs, queue_url) as agent:
        await agent.poll_once()
        imds.set_interruption(AT, "stop")
        assert await agent.poll_once() == ["EC2 Spot Instance Interruption Warning"]
        for _ in range(5):
            assert await agent.poll_once() == []
    [parsed] = drain(moto_world, queue_url)
    assert (parsed.source, parsed.instance_id, parsed.kind) == ("spotguard.agent", ID, "interruption")


async def test_the_message_carries_the_eventbridge_envelope(imds, sqs, queue_url, moto_world):
    imds.set_interruption(AT, "hibernate")
    async with Agent(imds.url, sqs, queue_url) as agent:
        await agent.poll_once()
    [message] = moto_world.boto("sqs").receive_message(QueueUrl=queue_url)["Messages"]
    body = json.loads(message["Body"])
    assert body["source"] == "spotguard.agent"
    # EventBridge's own warning has no time; the agent adds IMDS's, when the instance is reclaimed.
    assert body["detail"] == {"instance-id": ID, "instance-action": "hibernate",
                              "instance-action-time": AT.strftime("%Y-%m-%dT%H:%M:%SZ")}
    assert body["region"] == moto_world.region
    now = datetime.now(timezone.utc)
    sent = datetime.strptime(body["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((now - sent).total_seconds()) < 5


async def test_rebalance_then_interruption_are_two_messages(imds, sqs, queue_url, moto_world):
    async with Agent(imds.url, sqs, queue_url) as agent:
        imds.set_rebalance(AT - timedelta(minutes=10))
        assert await agent.poll_once() == ["EC2 Instance Rebalance Recommendation"]
        await agent.poll_once()
        imds.set_interruption(AT)
        assert await agent.poll_once() == ["EC2 Spot Instance Interruption Warning"]
        await agent.poll_once()
    kinds = [p.kind for p in drain(moto_world, queue_url)]
    assert sorted(kinds) == ["interruption", "rebalance"]


async def test_a_changed_notice_is_a_new_one(imds, sqs, queue_url, moto_world):
    async with Agent(imds.url, sqs, queue_url) as agent:
        imds.set_rebalance(AT)
        await agent.poll_once()
        imds.set_rebalance(AT + timedelta(hours=1))
        assert await agent.poll_once() == ["EC2 Instance Rebalance Recommendation"]
    assert len(drain(moto_world, queue_url)) == 2


async def test_a_restarted_agent_sends_the_same_event_id_and_a_new_notice_a_new_one(imds, sqs, queue_url, moto_world):
    imds.set_interruption(AT)
    ids = []
    for _ in range(2):  # two processes (a restart): the second remembers nothing the first sent
        async with Agent(imds.url, sqs, queue_url) as agent:
            assert await agent.poll_once() == [INTERRUPTION]
        [parsed] = drain(moto_world, queue_url)
        ids.append(parsed.event_id)
    assert ids[0] == ids[1]
    imds.set_interruption(AT + timedelta(hours=3))  # the (stopped, restarted) spot interrupted again
    async with Agent(imds.url, sqs, queue_url) as agent:
        assert await agent.poll_once() == [INTERRUPTION]
    [again] = drain(moto_world, queue_url)
    assert again.event_id != ids[0]


async def test_the_sqs_source_pushes_a_restarted_agents_notice_once(imds, sqs, queue_url, moto_world):
    # The agent's copy is dropped by its event id, in the source; that no guard owns ID is the daemon's business.
    pushed: list[Notice] = []
    source = SqsSource(sqs, queue_url, owns=lambda _: False, push=pushed.append, wait_seconds=0)

    async def read_queue() -> None:
        """Receive until a batch comes back empty (the source deletes what it reads)."""
        for _ in range(20):
            received = source.counts["received"]
            assert await source.receive_once()
            if source.counts["received"] == received:
                return
        raise AssertionError("queue never drained")

    imds.set_interruption(AT, "stop")
    for _ in range(2):
        async with Agent(imds.url, sqs, queue_url) as agent:
            await agent.poll_once()
    with capture_logs() as logs:
        await read_queue()
    assert pushed == [Notice(ID, "interruption", deadline=AT.timestamp())]
    assert len(events(logs, "source.sqs.duplicate")) == 1
    imds.set_interruption(AT + timedelta(hours=3), "stop")
    async with Agent(imds.url, sqs, queue_url) as agent:
        await agent.poll_once()
    await read_queue()
    assert pushed == [Notice(ID, "interruption", deadline=AT.timestamp()),
                      Notice(ID, "interruption", deadline=(AT + timedelta(hours=3)).timestamp())]
    assert drain(moto_world, queue_url) == []


async def test_the_token_is_refreshed_before_it_expires(imds, sqs, queue_url, moto_world):
    clock = Clock()
    async with Agent(imds.url, sqs, queue_url, token_ttl=600, clock=clock) as agent:
        with capture_logs() as logs:
            await agent.poll_once()
            # Just before the token's end on both clocks: the agent must replace it, not wait for a 401.
            clock.now += 590
            imds.advance(590)
            imds.set_interruption(AT)
            assert await agent.poll_once() == ["EC2 Spot Instance Interruption Warning"]
    assert [e["reason"] for e in events(logs, "agent.imds.token")] == ["first", "expiring"]
    assert events(logs, "agent.imds.token.rejected") == []
    assert events(logs, "agent.imds.failed") == []


async def test_an_expired_token_is_replaced_on_401_and_the_get_retried(imds, sqs, queue_url, moto_world):
    async with Agent(imds.url, sqs, queue_url) as agent:
        await agent.poll_once()
        # The server's clock jumps past the TTL while the agent's does not: its next GETs get 401.
        imds.advance(21601)
        imds.set_interruption(AT)
        with capture_logs() as logs:
            assert await agent.poll_once() == ["EC2 Spot Instance Interruption Warning"]
    assert len(events(logs, "agent.imds.token.rejected")) == 1  # both GETs, one refresh
    assert [e["reason"] for e in events(logs, "agent.imds.token")] == ["first"]
    assert events(logs, "agent.imds.failed") == []
    assert len(drain(moto_world, queue_url)) == 1


# ---------------------------------------------------------------------- garbage


class Garbage:
    """An IMDSv2 lookalike whose notice paths answer whatever `answer` says."""

    def __init__(self) -> None:
        self.answer: Callable[[], Any] = lambda: web.Response(status=404, text="<html>404</html>",
                                                              content_type="text/html")
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.instance_id: Callable[[], web.Response] = lambda: web.Response(text=ID, content_type="text/plain")
        self.released = asyncio.Event()  # set at teardown: hung handlers end so cleanup need not wait

    async def start(self) -> None:
        app = web.Application()
        app.router.add_put("/latest/api/token", self._token)
        app.router.add_get("/latest/meta-data/{path:.*}", self._get)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _token(self, request: web.Request) -> web.Response:
        return web.Response(text="garbage-token", content_type="text/plain")

    async def _get(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        answer = self.instance_id() if path == "instance-id" else self.answer()
        if answer is HANG:
            await asyncio.wait_for(self.released.wait(), 30)
            return web.Response(text="late")
        return answer


HANG = web.Response(text="never sent")


def hang() -> web.Response:
    return HANG


GARBAGE = {
    "html": (lambda: web.Response(text="<html><h1>Welcome</h1></html>", content_type="text/html"),
             "agent.imds.malformed"),
    "bad json": (lambda: web.Response(text='{"action": "terminate",', content_type="text/plain"),
                 "agent.imds.malformed"),
    "wrong shape": (lambda: web.Response(text='{"action": "reboot", "time": 5}', content_type="text/plain"),
                    "agent.imds.malformed"),
    "500": (lambda: web.Response(status=500, text="<html>Internal</html>", content_type="text/html"),
            "agent.imds.failed"),
    "hung": (hang, "agent.imds.failed"),
}


@pytest.fixture
async def garbage() -> AsyncIterator[Garbage]:
    server = Garbage()
    await server.start()
    yield server
    server.released.set()
    assert server.runner is not None
    await server.runner.cleanup()


@pytest.mark.parametrize("kind", sorted(GARBAGE))
async def test_garbage_is_logged_and_never_sent(kind, garbage, sqs, queue_url, moto_world):
    answer, logged = GARBAGE[kind]
    garbage.answer = answer
    # A short timeout only where it is the point (a hung answer); elsewhere a loaded machine's slow answer
    # would read as a failed GET, not the garbage under test.
    async with Agent(garbage.url, sqs, queue_url, timeout=0.3 if kind == "hung" else 2.0) as agent:
        with capture_logs() as logs:
            started = time.monotonic()
            assert await agent.poll_once() == []
            assert await agent.poll_once() == []
            assert time.monotonic() - started < 2.0  # the two paths are read side by side, cut at the timeout
    assert len(events(logs, logged)) == 4  # both paths, both polls
    assert drain(moto_world, queue_url) == []


async def test_instance_id_is_retried_until_imds_answers(garbage, sqs, queue_url, moto_world):
    garbage.instance_id = lambda: web.Response(status=503, text="<html>busy</html>", content_type="text/html")
    # Nothing here hangs: the agent's own timeout (a loaded machine can take longer than 0.3 s to answer).
    async with Agent(garbage.url, sqs, queue_url) as agent:
        with capture_logs() as logs:
            assert await agent.poll_once() == []
            garbage.instance_id = lambda: web.Response(text="<html>not an id</html>", content_type="text/html")
            assert await agent.poll_once() == []
            garbage.instance_id = lambda: web.Response(text="i-0123456789", content_type="text/plain")  # 10 digits
            assert await agent.poll_once() == []
            assert agent.instance_id is None
            garbage.instance_id = lambda: web.Response(text=ID, content_type="text/plain")
            garbage.answer = lambda: web.Response(text='{"noticeTime": "2026-11-28T08:00:00Z"}')
            assert await agent.poll_once() == ["EC2 Instance Rebalance Recommendation"]
    assert agent.instance_id == ID
    assert [(e["path"], e.get("status")) for e in events(logs, "agent.imds.failed")] == [("instance-id", 503)]
    malformed = [e["path"] for e in events(logs, "agent.imds.malformed")]
    # The rebalance answer on spot/instance-action is the wrong shape there: malformed, not sent.
    assert sorted(malformed) == ["instance-id", "instance-id", "spot/instance-action"]
    assert [p.instance_id for p in drain(moto_world, queue_url)] == [ID]


async def test_a_404_html_body_is_nothing_not_garbage(garbage, sqs, queue_url, moto_world):
    async with Agent(garbage.url, sqs, queue_url) as agent:
        with capture_logs() as logs:
            assert await agent.poll_once() == []
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []


# ---------------------------------------------------------------------- SQS failures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_an_unreachable_sqs_is_logged_and_the_notice_kept(imds, moto_world, aio_session):
    dead = f"http://127.0.0.1:{free_port()}"
    imds.set_interruption(AT)
    async with client("sqs", moto_world.region, dead, session=aio_session, max_attempts=1) as sqs:
        async with Agent(imds.url, sqs, f"{dead}/123456789012/spotguard") as agent:
            with capture_logs() as logs:
                assert await agent.poll_once() == []
                assert await agent.poll_once() == []
    failed = events(logs, "agent.sqs.failed")
    assert len(failed) == 2 and failed[0]["code"] == "EndpointConnectionError"
    assert agent.sent == {}


async def test_a_failed_send_is_retried_until_it_succeeds(imds, sqs, moto_world):
    # The queue does not exist yet: SendMessage fails until it does.
    url = f"{moto_world.endpoint_url}/123456789012/late-queue"
    imds.set_interruption(AT)
    async with Agent(imds.url, sqs, url) as agent:
        with capture_logs() as logs:
            assert await agent.poll_once() == []
        assert events(logs, "agent.sqs.failed")
        made = moto_world.boto("sqs").create_queue(QueueName="late-queue")["QueueUrl"]
        agent.queue_url = made
        assert await agent.poll_once() == ["EC2 Spot Instance Interruption Warning"]
        assert await agent.poll_once() == []
    assert len(drain(moto_world, made)) == 1


# ---------------------------------------------------------------------- run() and the process


async def test_run_forwards_a_notice_within_an_interval_and_stops(imds, sqs, queue_url, moto_world):
    stop = asyncio.Event()
    agent = Agent(imds.url, sqs, queue_url, interval=0.05)
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: agent.instance_id is not None, timeout=5.0)
        imds.set_interruption(AT)
        await until(lambda: agent.sent, timeout=5.0)
        await asyncio.sleep(0.2)  # several more polls: still one message
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert len(drain(moto_world, queue_url)) == 1


@pytest.mark.parametrize("region_from", ["environment", "imds"])
async def test_cli_forwards_and_exits_0_on_sigterm(imds, queue_url, moto_world, region_from):
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    env["AWS_ENDPOINT_URL"] = moto_world.endpoint_url
    if region_from == "environment":
        env["AWS_REGION"], imds.region = moto_world.region, "xx-nowhere-1"  # the environment wins
    else:
        imds.region = moto_world.region  # none set: the agent asks its instance metadata
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spotguard", "agent", "--queue-url", queue_url, "--imds-url", imds.url,
        "--interval", "0.1", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        imds.set_interruption(AT)
        got: list[Parsed] = []
        end = time.monotonic() + 15
        while not got:
            assert time.monotonic() < end, "the agent sent nothing"
            got = await asyncio.to_thread(drain, moto_world, queue_url)
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert [(p.instance_id, p.kind) for p in got] == [(ID, "interruption")]
    lines = [json.loads(line) for line in out.decode().splitlines()]
    names = [line["event"] for line in lines if line["event"] != "agent.imds.token"]
    told = [line for line in lines if line["event"] == "agent.region"]
    assert told == ([] if region_from == "environment" else [{**told[0], "region": moto_world.region}])
    names = [n for n in names if n != "agent.region"]
    assert names[0] == "agent.started" and "agent.sqs.sent" in names and names[-1] == "agent.stopped"
    assert "Traceback" not in err.decode()


async def test_no_region_anywhere_is_one_line_and_exit_1(queue_url, moto_world):
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    argv = [sys.executable, "-m", "spotguard", "agent", "--queue-url", queue_url, "--imds-url", "http://127.0.0.1:9"]
    done = await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    crashed = [json.loads(line) for line in done.stdout.splitlines() if "agent.crashed" in line]
    assert crashed and "no region: set AWS_REGION" in crashed[0]["detail"]


async def test_ready_is_said_once_per_boot_when_the_service_passes_its_health_check(imds, sqs, queue_url, moto_world):
    """`--ready-url`: the lab's instance service (503 while it loads its model, then 200) on this host."""
    from spotguard.agent import ReadyCheck
    from spotguard.lab.app import InstanceApp
    from spotguard.lab.clock import ScenarioClock
    from spotguard.sources.eventbridge import READY

    clock = ScenarioClock(1.0)
    app = InstanceApp(ID, clock, warm_up=3600.0, latency=0.0)
    host, port = await app.start()
    ready = ReadyCheck.of_url(f"http://{host}:{port}/health")
    try:
        async with Agent(imds.url, sqs, queue_url, ready=ready, boot_id=lambda: "boot-1") as agent:
            for _ in range(3):
                assert await agent.poll_once() == []  # warming up: 503
            app.ready_at = clock.now()
            assert await agent.poll_once() == [READY]
            assert await agent.poll_once() == []  # said once
        async with Agent(imds.url, sqs, queue_url, ready=ready, boot_id=lambda: "boot-1") as again:
            assert await again.poll_once() == [READY]  # a restarted agent says it again: same event id
        async with Agent(imds.url, sqs, queue_url, ready=ready, boot_id=lambda: "boot-2") as next_boot:
            assert await next_boot.poll_once() == [READY]
    finally:
        app.kill()
    first, repeated, rebooted = drain(moto_world, queue_url)
    assert (first.source, first.instance_id, first.kind) == ("spotguard.agent", ID, "ready")
    assert repeated.event_id == first.event_id and rebooted.event_id != first.event_id


def test_a_ready_url_is_checked_on_the_command_line():
    done = subprocess_run(["agent", "--queue-url", "http://127.0.0.1:9/q", "--ready-url", "http://127.0.0.1:8080/h",
                           "--ready-codes", "2xx"], env={"AWS_REGION": "us-east-1"})
    assert done.returncode == 2
    assert done.stderr.strip().startswith("spotguard agent: --ready-url/--ready-codes:")


def subprocess_run(args: list[str], env: dict[str, str]) -> Any:
    import subprocess

    return subprocess.run([sys.executable, "-m", "spotguard", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
