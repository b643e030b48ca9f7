"""Discord notifications for people: alerts and phase changes, best effort and bounded.

`Notifier.notify(text)` never blocks: it queues the text (a bounded queue; what
does not fit is dropped and logged as `notify.dropped`). One background task
posts the texts in order with discord-webhook, each in a daemon thread, and
waits at most `deadline` seconds for it: a webhook that hangs or trickles costs
a log line, never a stalled failover or a hung shutdown. A 429 is honoured
(Retry-After, capped) and the same text tried again. The webhook URL is a
credential and never reaches a log line or a repr.

This module must not format messages or decide what is worth saying.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable

import structlog

log = structlog.get_logger(__name__)

# Discord refuses content longer than this with a 400.
MAX_CONTENT = 2000
# Longest part of Discord's error answer we log (it says why: "Unknown Webhook", ...).
MAX_DETAIL = 300
# One post, connection to last byte, ends within this many seconds or is given up.
POST_DEADLINE = 10.0
# A 429's Retry-After is waited out up to this long, at most this many times per text.
RETRY_CAP = 30.0
RATE_LIMIT_TRIES = 3
# Posts given up while their thread still waits on the webhook: past this many, no new
# post starts until one ends (texts wait in the queue, which drops what overflows).
MAX_STRANDED = 2

# discord-webhook logs each error answer itself, unstructured; _send logs the
# same outcome as one structured line, so the library's copy is only noise.
logging.getLogger("discord_webhook").setLevel(logging.CRITICAL)


class Notifier:
    """Posts texts to one Discord webhook from a background task; no URL means log only."""

    def __init__(self, webhook_url: str | None, *, timeout: float = 5.0, queue_size: int = 100,
                 deadline: float = POST_DEADLINE) -> None:
        self._url = webhook_url or None
        self._timeout = timeout
        self._deadline = deadline
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._inflight: str | None = None  # the text being posted, for the log if close abandons it
        self._stranded: set[threading.Thread] = set()

    def __repr__(self) -> str:
        return f"Notifier(enabled={self.enabled}, timeout={self._timeout}, queued={self._queue.qsize()})"

    @property
    def enabled(self) -> bool:
        return self._url is not None

    def notify(self, text: str) -> None:
        """Queue `text` for Discord and return at once; dropped (and logged) if the queue is full."""
        if not self.enabled:
            return  # said once at start; the text is in the log as its own event already
        if self._closed:
            log.warning("notify.dropped", reason="closed", text=text)
            return
        try:
            self._queue.put_nowait(text[:MAX_CONTENT])
        except asyncio.QueueFull:
            log.warning("notify.dropped", reason="queue full", queue_size=self._queue.maxsize, text=text)

    async def start(self) -> None:
        """Start the sending task (in the running loop); without a URL, say so once (debug)."""
        if not self.enabled:
            log.debug("notify.disabled")
        elif self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="spotguard-notify")

    async def close(self, deadline: float = 2.0) -> None:
        """Send what can be sent within `deadline` seconds, then stop; what is left is logged
        as dropped. Never waits for a post beyond that: a stuck one is abandoned."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(self._queue.join(), timeout=deadline)
            except TimeoutError:
                pass
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if self._inflight is not None:
                log.warning("notify.dropped", reason="in flight at close", text=self._inflight)
        while not self._queue.empty():
            log.warning("notify.dropped", reason="close deadline", text=self._queue.get_nowait())

    async def _run(self) -> None:
        while True:
            text = await self._queue.get()
            self._inflight = text
            try:
                await self._until_unstranded()
                await self._send(text)
                self._inflight = None  # left set only when cancelled mid-post
            finally:
                self._queue.task_done()

    async def _until_unstranded(self) -> None:
        while len(self._stranded) >= MAX_STRANDED:
            await asyncio.sleep(self._deadline / 10)
            self._stranded = {t for t in self._stranded if t.is_alive()}

    async def _send(self, text: str) -> None:
        for attempt in range(1, RATE_LIMIT_TRIES + 1):
            try:
                response = await self._in_thread(lambda: self._post(text))
            except TimeoutError:
                log.warning("notify.discord.failed", error="deadline", deadline=self._deadline, text=text)
                return
            except Exception as exc:  # anything: the notifier must outlive every failure
                # Class name only: requests' messages contain the URL, which is a secret.
                log.warning("notify.discord.failed", error=type(exc).__name__, text=text)
                return
            status = response.status_code
            if 200 <= status < 300:
                log.info("notify.discord.sent", status=status)
                await self._pace(response)
                return
            if status == 429 and attempt < RATE_LIMIT_TRIES:
                wait = retry_after(response)
                log.warning("notify.discord.rate_limited", retry_after=wait, attempt=attempt)
                await asyncio.sleep(wait)
                continue
            log.warning("notify.discord.failed", status=status, detail=response.text[:MAX_DETAIL], text=text)
            return

    async def _pace(self, response: Any) -> None:
        """Discord says when the next post would be refused: wait that out instead."""
        headers = response.headers
        if headers.get("X-RateLimit-Remaining") == "0":
            await asyncio.sleep(_seconds(headers.get("X-RateLimit-Reset-After"), 0.0))

    async def _in_thread(self, call: Callable[[], Any]) -> Any:
        """Run `call` in a daemon thread and wait at most the deadline: a thread that hangs
        is left behind (counted as stranded); it cannot keep the process from exiting."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Any] = loop.create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if result.done():
                return
            if error is not None:
                result.set_exception(error)
            else:
                result.set_result(value)

        def target() -> None:
            try:
                value, error = call(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting task
                value, error = None, exc
            try:
                loop.call_soon_threadsafe(settle, value, error)
            except RuntimeError:
                pass  # the loop is gone: nobody waits any more

        thread = threading.Thread(target=target, name="spotguard-notify-post", daemon=True)
        thread.start()
        try:
            return await asyncio.wait_for(asyncio.shield(result), timeout=self._deadline)
        except (TimeoutError, asyncio.CancelledError):
            if thread.is_alive():
                self._stranded.add(thread)
            raise

    def _post(self, text: str) -> Any:
        # Imported only when a webhook is set: it brings requests and urllib3 (docs/benchmarks.md).
        from discord_webhook import DiscordWebhook

        webhook = DiscordWebhook(url=self._url, content=text, timeout=self._timeout, rate_limit_retry=False)
        return webhook.execute()


def retry_after(response: Any) -> float:
    """Seconds a 429 asks to wait (Retry-After, else the JSON retry_after), at most RETRY_CAP."""
    wait = _seconds(response.headers.get("Retry-After"), None)
    if wait is None:
        try:
            wait = _seconds(response.json().get("retry_after"), None)
        except (ValueError, AttributeError):
            wait = None
    return min(RETRY_CAP, wait if wait is not None else 1.0)


def _seconds(value: Any, default: float | None) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return default
    return seconds if 0 <= seconds < float("inf") else default
