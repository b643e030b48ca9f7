"""The Discord notifier against a real local HTTP server standing in for Discord."""

from __future__ import annotations

import io
import logging
import time
from typing import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from httpcapture import CaptureServer, async_wait_for, refused_url
from spotguard import logs as spotguard_logs
from spotguard.notify import MAX_CONTENT, Notifier

TOKEN = "SECRET-TOKEN-do-not-log"
WEBHOOK_PATH = f"/api/webhooks/123456789/{TOKEN}"


@pytest.fixture
def discord() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


def webhook(server_url: str) -> str:
    return server_url + WEBHOOK_PATH


def events(entries: list[dict], name: str) -> list[dict]:
    return [e for e in entries if e["event"] == name]


async def test_a_message_arrives_with_its_content(discord):
    notifier = Notifier(webhook(discord.url), timeout=2.0)
    await notifier.start()
    with capture_logs() as entries:
        notifier.notify("[inference] spot-healthy → standby-starting: notice for i-0abc")
        await async_wait_for(lambda: events(entries, "notify.discord.sent"))
    await notifier.close()
    (request,) = discord.requests
    assert request.method == "POST"
    assert request.path.startswith(WEBHOOK_PATH)
    assert request.headers["Content-Type"] == "application/json"
    assert request.json["content"] == "[inference] spot-healthy → standby-starting: notice for i-0abc"
    assert events(entries, "notify.discord.sent")[0]["status"] == 200


async def test_messages_arrive_in_order(discord):
    notifier = Notifier(webhook(discord.url), timeout=2.0)
    notifier.notify("one")  # queued before start: sent once started
    await notifier.start()
    notifier.notify("two")
    notifier.notify("three")
    await async_wait_for(lambda: len(discord.requests) == 3)
    await notifier.close()
    assert [r.json["content"] for r in discord.requests] == ["one", "two", "three"]


async def test_long_text_is_cut_to_what_discord_accepts(discord):
    notifier = Notifier(webhook(discord.url), timeout=2.0)
    await notifier.start()
    notifier.notify("x" * 5000)
    await async_wait_for(lambda: discord.requests)
    await notifier.close()
    assert len(discord.requests[0].json["content"]) == MAX_CONTENT


@pytest.mark.parametrize(
    ("status", "body", "logged"),
    [
        (500, {"message": "internal error"}, {"status": 500}),
        (429, {"message": "You are being rate limited.", "retry_after": 0.5, "global": False}, {"status": 429}),
        (404, {"message": "Unknown Webhook", "code": 10015}, {"status": 404}),
        (500, b"", {"error": "JSONDecodeError"}),  # discord-webhook parses every body as JSON
    ],
)
async def test_an_error_answer_is_logged_and_the_notifier_goes_on(discord, status, body, logged):
    discord.respond(status, body)
    notifier = Notifier(webhook(discord.url), timeout=2.0)
    await notifier.start()
    with capture_logs() as entries:
        notifier.notify("first")
        failed = await async_wait_for(lambda: events(entries, "notify.discord.failed"))
        discord.respond(200)
        notifier.notify("second")
        await async_wait_for(lambda: events(entries, "notify.discord.sent"))
    await notifier.close()
    assert failed[0] == {**failed[0], **logged, "text": "first", "log_level": "warning"}
    if isinstance(body, dict):  # Discord's reason is kept, the library's own log line is not
        assert body["message"] in failed[0]["detail"]
    assert [r.json["content"] for r in discord.requests] == ["first", "second"]


async def test_connection_refused_is_logged_not_raised():
    with refused_url() as url, capture_logs() as entries:
        notifier = Notifier(webhook(url), timeout=2.0)
        await notifier.start()
        notifier.notify("nobody listens")
        (failed,) = await async_wait_for(lambda: events(entries, "notify.discord.failed"))
        await notifier.close()
    assert failed["error"] == "ConnectionError"


async def test_a_server_slower_than_the_timeout_is_a_failure(discord):
    discord.hold()
    notifier = Notifier(webhook(discord.url), timeout=0.3)
    await notifier.start()
    with capture_logs() as entries:
        notifier.notify("slow")
        (failed,) = await async_wait_for(lambda: events(entries, "notify.discord.failed"))
    discord.release()
    await notifier.close()
    assert failed["error"] == "ReadTimeout"


async def test_a_stuck_server_blocks_neither_notify_nor_close(discord):
    discord.hold()
    notifier = Notifier(webhook(discord.url), timeout=10.0)
    await notifier.start()
    notifier.notify("stuck in flight")
    await async_wait_for(lambda: discord.requests)  # the post is now waiting on the server
    with capture_logs() as entries:
        started = time.monotonic()
        for n in range(5):
            notifier.notify(f"queued {n}")
        assert time.monotonic() - started < 0.05
        started = time.monotonic()
        await notifier.close(deadline=0.3)
        closing = time.monotonic() - started
    discord.release()
    assert 0.25 <= closing < 1.0  # the deadline, not the 10 s request timeout
    dropped = events(entries, "notify.dropped")
    assert [e["text"] for e in dropped] == ["stuck in flight"] + [f"queued {n}" for n in range(5)]
    assert dropped[0]["reason"] == "in flight at close"


async def test_close_flushes_what_it_can(discord):
    notifier = Notifier(webhook(discord.url), timeout=2.0)
    await notifier.start()
    for n in range(3):
        notifier.notify(f"message {n}")
    with capture_logs() as entries:
        await notifier.close(deadline=5.0)
    assert len(discord.requests) == 3  # all sent before close returned
    assert events(entries, "notify.dropped") == []


async def test_a_full_queue_drops_and_logs():
    notifier = Notifier("http://127.0.0.1:9/api/webhooks/1/x", queue_size=2)  # never started
    with capture_logs() as entries:
        notifier.notify("kept 1")
        notifier.notify("kept 2")
        notifier.notify("dropped")
    (dropped,) = events(entries, "notify.dropped")
    assert dropped["text"] == "dropped" and dropped["reason"] == "queue full"
    with capture_logs() as entries:
        await notifier.close(deadline=0.1)  # never started: what is queued is logged, not lost silently
    assert [e["text"] for e in events(entries, "notify.dropped")] == ["kept 1", "kept 2"]


async def test_notify_after_close_is_dropped(discord):
    notifier = Notifier(webhook(discord.url), timeout=2.0)
    await notifier.start()
    await notifier.close()
    with capture_logs() as entries:
        notifier.notify("too late")
    assert events(entries, "notify.dropped")[0]["reason"] == "closed"
    assert discord.requests == []


@pytest.mark.parametrize("url", [None, ""])
async def test_without_a_url_messages_are_only_logged(url):
    notifier = Notifier(url)
    await notifier.start()
    with capture_logs() as entries:
        notifier.notify("failover started")
    await notifier.close()
    assert not notifier.enabled
    assert entries == [{"event": "notify.disabled", "log_level": "info", "text": "failover started"}]


async def test_the_url_never_reaches_a_log_line_or_repr(discord):
    """Every failure path, rendered for real (JSON to a stream) and as raw event dicts."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    out = io.StringIO()
    spotguard_logs.configure("json", out)
    try:
        with capture_logs() as entries:
            await _every_outcome(discord)
        # capture_logs bypasses the processors, so run the same paths rendered too.
        await _every_outcome(discord)
    finally:
        structlog.reset_defaults()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    assert {e["event"] for e in entries} >= {"notify.discord.sent", "notify.discord.failed", "notify.dropped"}
    assert TOKEN not in repr(entries)
    assert "notify.discord.failed" in out.getvalue()
    assert TOKEN not in out.getvalue()


async def _every_outcome(discord: CaptureServer) -> None:
    for url, status in ((webhook(discord.url), 200), (webhook(discord.url), 500)):
        discord.respond(status)
        notifier = Notifier(url, timeout=0.3)
        assert TOKEN not in repr(notifier)
        await notifier.start()
        notifier.notify(f"status {status}")
        await notifier.close(deadline=5.0)  # flushes: the answer is logged before it returns
    with refused_url() as url:
        notifier = Notifier(webhook(url), timeout=0.3)
        await notifier.start()
        notifier.notify("refused")
        await notifier.close(deadline=5.0)
    discord.respond(200)
    discord.hold()
    notifier = Notifier(webhook(discord.url), timeout=0.2)
    await notifier.start()
    notifier.notify("timeout")
    await notifier.close(deadline=2.0)
    notifier = Notifier(webhook(discord.url), timeout=5.0)
    await notifier.start()
    notifier.notify("abandoned")
    await notifier.close(deadline=0.1)
    discord.release()


def test_without_a_webhook_the_library_is_never_imported():
    # discord-webhook brings requests and urllib3 (3.7 MiB): a daemon without Discord skips them.
    import subprocess
    import sys

    code = (
        "import asyncio, sys\n"
        "from spotguard.notify import Notifier\n"
        "async def main():\n"
        "    n = Notifier(None); await n.start(); n.notify('x'); await n.close()\n"
        "asyncio.run(main())\n"
        "print('discord_webhook' in sys.modules, 'requests' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1] == "False False", done.stderr
