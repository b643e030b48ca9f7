"""The Discord notifier against a real local HTTP server standing in for Discord."""

from __future__ import annotations

import io
import logging
import time
from typing import Iterator

import pytest
import structlog
from httpcapture import CaptureServer, Response, refused_url
from structlog.testing import capture_logs
from waiting import until

from spotguard import logs as spotguard_logs
from spotguard.notify import MAX_CONTENT, RETRY_CAP, Notifier, retry_after

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
        await until(lambda: events(entries, "notify.discord.sent"), timeout=5.0)
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
    await until(lambda: len(discord.requests) == 3, timeout=5.0)
    await notifier.close()
    assert [r.json["content"] for r in discord.requests] == ["one", "two", "three"]


async def test_long_text_is_cut_to_what_discord_accepts(discord):
    notifier = Notifier(webhook(discord.url), timeout=2.0)
    await notifier.start()
    notifier.notify("x" * 5000)
    await until(lambda: discord.requests, timeout=5.0)
    await notifier.close()
    assert len(discord.requests[0].json["content"]) == MAX_CONTENT


@pytest.mark.parametrize(
    ("status", "body", "logged"),
    [
        (500, {"message": "internal error"}, {"status": 500}),
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
        failed = await until(lambda: events(entries, "notify.discord.failed"), timeout=5.0)
        discord.respond(200)
        notifier.notify("second")
        await until(lambda: events(entries, "notify.discord.sent"), timeout=5.0)
    await notifier.close()
    assert failed[0] == {**failed[0], **logged, "text": "first", "log_level": "warning"}
    if isinstance(body, dict):  # Discord's reason is kept, the library's own log line is not
        assert body["message"] in failed[0]["detail"]
    assert [r.json["content"] for r in discord.requests] == ["first", "second"]


async def test_a_429_is_waited_out_and_the_text_sent_once(discord):
    discord.answer(lambda n: Response(429, {"message": "You are being rate limited.", "retry_after": 9},
                                      headers=(("Retry-After", "0.3"),)) if n == 0 else Response(200))
    notifier = Notifier(webhook(discord.url), timeout=2.0)
    await notifier.start()
    with capture_logs() as entries:
        notifier.notify("after the limit")
        await until(lambda: events(entries, "notify.discord.sent"), timeout=5.0)
    await notifier.close()
    first, second = discord.requests
    assert second.at - first.at >= 0.3  # the header's 0.3 s, not the body's 9 s
    assert [r.json["content"] for r in discord.requests] == ["after the limit"] * 2
    assert [e["retry_after"] for e in events(entries, "notify.discord.rate_limited")] == [0.3]
    assert events(entries, "notify.discord.failed") == []


class RateLimit:
    """Discord's webhook limit as a server plays it: `per_second` posts a second, then 429s
    with the Retry-After that would let the next one through."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.accepted: list[float] = []
        self.numbers: list[int] = []  # the requests answered 2xx

    def __call__(self, n: int) -> Response:
        now = time.monotonic()
        recent = [t for t in self.accepted if now - t < 1.0]
        if len(recent) >= self.per_second:
            wait = 1.0 - (now - recent[0])
            return Response(429, {"message": "You are being rate limited.", "retry_after": wait},
                            headers=(("Retry-After", f"{wait:.3f}"),))
        self.accepted.append(now)
        self.numbers.append(n)
        left = self.per_second - len(recent) - 1
        # wait=true (discord-webhook's default): 200 with the message, and the bucket's headers.
        return Response(200, {"id": str(n)},
                        headers=(("X-RateLimit-Remaining", str(left)), ("X-RateLimit-Reset-After", "1.0")))


async def test_a_burst_against_the_rate_limit_loses_nothing(discord):
    """Ten guards failing over at once: twenty messages, every one delivered, in order."""
    limit = RateLimit(per_second=10)
    discord.answer(limit)
    notifier = Notifier(webhook(discord.url), timeout=2.0)
    await notifier.start()
    texts = [f"[guard-{n % 10}] message {n}" for n in range(20)]
    with capture_logs() as entries:
        for text in texts:
            notifier.notify(text)
        await until(lambda: len(events(entries, "notify.discord.sent")) == 20, timeout=20.0)
        await notifier.close()
    delivered = [discord.requests[n].json["content"] for n in limit.numbers]
    assert delivered == texts
    assert events(entries, "notify.discord.failed") == [] and events(entries, "notify.dropped") == []


def test_retry_after_is_capped_and_read_from_header_or_body():
    class Answer:
        def __init__(self, headers: dict, body: object) -> None:
            self.headers, self._body = headers, body

        def json(self) -> object:
            return self._body

    assert retry_after(Answer({"Retry-After": "2.5"}, {"retry_after": 9})) == 2.5
    assert retry_after(Answer({}, {"retry_after": 4})) == 4
    assert retry_after(Answer({"Retry-After": "3600"}, {})) == RETRY_CAP
    assert retry_after(Answer({"Retry-After": "soon"}, "not an object")) == 1.0


async def test_a_trickling_webhook_is_given_up_at_the_deadline(discord):
    """requests' timeout is per read: a server sending a byte every 0.5 s would hold a post forever."""
    discord.respond(200, {"id": "1" * 50}, trickle=0.5)
    notifier = Notifier(webhook(discord.url), timeout=2.0, deadline=1.0)
    await notifier.start()
    with capture_logs() as entries:
        started = time.monotonic()
        notifier.notify("trickled")
        (failed,) = await until(lambda: events(entries, "notify.discord.failed"), timeout=5.0)
        assert 1.0 <= time.monotonic() - started < 3.0
        discord.respond(200)
        notifier.notify("next")  # the notifier goes on while the first post's thread still waits
        await until(lambda: events(entries, "notify.discord.sent"), timeout=5.0)
    await notifier.close()
    assert failed["error"] == "deadline" and failed["text"] == "trickled"


def test_a_process_exits_at_once_however_the_webhook_hangs(discord):
    """asyncio.run waits for its executor's threads at exit: a post must not be one of them."""
    import subprocess
    import sys

    discord.hold()
    code = (
        "import asyncio, sys\n"
        "from spotguard.notify import Notifier\n"
        "async def main():\n"
        "    n = Notifier(sys.argv[1], timeout=60.0, deadline=60.0)\n"
        "    await n.start(); n.notify('stuck')\n"
        "    await asyncio.sleep(0.3)\n"
        "    await n.close(deadline=0.2)\n"
        "asyncio.run(main())\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, webhook(discord.url)], timeout=30, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 5.0  # interpreter start, 0.3 s, 0.2 s; not the 60 s a post may take
    assert len(discord.requests) == 1


async def test_connection_refused_is_logged_not_raised():
    with refused_url() as url, capture_logs() as entries:
        notifier = Notifier(webhook(url), timeout=2.0)
        await notifier.start()
        notifier.notify("nobody listens")
        (failed,) = await until(lambda: events(entries, "notify.discord.failed"), timeout=5.0)
        await notifier.close()
    assert failed["error"] == "ConnectionError"


async def test_a_server_slower_than_the_timeout_is_a_failure(discord):
    discord.hold()
    notifier = Notifier(webhook(discord.url), timeout=0.3)
    await notifier.start()
    with capture_logs() as entries:
        notifier.notify("slow")
        (failed,) = await until(lambda: events(entries, "notify.discord.failed"), timeout=5.0)
    discord.release()
    await notifier.close()
    assert failed["error"] == "ReadTimeout"


async def test_a_stuck_server_blocks_neither_notify_nor_close(discord):
    discord.hold()
    notifier = Notifier(webhook(discord.url), timeout=10.0)
    await notifier.start()
    notifier.notify("stuck in flight")
    await until(lambda: discord.requests, timeout=5.0)  # the post is now waiting on the server
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
async def test_without_a_url_it_says_so_once_at_debug_and_then_nothing(url):
    """The texts are in the log already (guard.transition, guard.alert): a line per message
    saying Discord is off read like a failure at info (issue 20)."""
    notifier = Notifier(url)
    with capture_logs() as entries:
        await notifier.start()
        notifier.notify("failover started")
        notifier.notify("failover done")
    await notifier.close()
    assert not notifier.enabled
    assert entries == [{"event": "notify.disabled", "log_level": "debug"}]


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
