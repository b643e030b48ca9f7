"""Discord notifications for people: alerts and phase changes, best effort.

`Notifier.notify(text)` never blocks: it queues the text (a bounded queue;
dropped with `notify.dropped` when full) and one background task posts it with
discord-webhook in a worker thread. Discord down or slow costs a log line,
never a stalled failover. The webhook URL is a credential and never reaches a
log line or a repr.

This module must not retry, format messages or decide what is worth saying.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# Discord refuses content longer than this with a 400.
MAX_CONTENT = 2000
# Longest part of Discord's error answer we log (it says why: "Unknown Webhook", ...).
MAX_DETAIL = 300

# discord-webhook logs each error answer itself, unstructured; _send logs the
# same outcome as one structured line, so the library's copy is only noise.
# (The library itself is imported only when a webhook is set: it brings requests
# and urllib3, 3.7 MiB of a t4g.nano's memory, docs/benchmarks.md.)
logging.getLogger("discord_webhook").setLevel(logging.CRITICAL)


class Notifier:
    """Posts texts to one Discord webhook from a background task; no URL means log only."""

    def __init__(self, webhook_url: str | None, *, timeout: float = 5.0, queue_size: int = 100) -> None:
        self._url = webhook_url or None
        self._timeout = timeout
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._inflight: str | None = None  # the text being posted, for the log if close abandons it

    def __repr__(self) -> str:
        return f"Notifier(enabled={self.enabled}, timeout={self._timeout}, queued={self._queue.qsize()})"

    @property
    def enabled(self) -> bool:
        return self._url is not None

    def notify(self, text: str) -> None:
        """Queue `text` for Discord and return at once; dropped (and logged) if the queue is full."""
        if not self.enabled:
            log.info("notify.disabled", text=text)
            return
        if self._closed:
            log.warning("notify.dropped", reason="closed", text=text)
            return
        try:
            self._queue.put_nowait(text[:MAX_CONTENT])
        except asyncio.QueueFull:
            log.warning("notify.dropped", reason="queue full", queue_size=self._queue.maxsize, text=text)

    async def start(self) -> None:
        """Start the sending task (in the running loop); a no-op without a URL or when started."""
        if self.enabled and self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="spotguard-notify")

    async def close(self, deadline: float = 5.0) -> None:
        """Send what can be sent within `deadline` seconds, then stop; what is left is logged as dropped."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            await self._stop(task, deadline)
        while not self._queue.empty():
            log.warning("notify.dropped", reason="close deadline", text=self._queue.get_nowait())

    async def _stop(self, task: asyncio.Task[None], deadline: float) -> None:
        try:
            await asyncio.wait_for(self._queue.join(), timeout=deadline)
        except TimeoutError:
            pass
        task.cancel()
        # A post stuck in its worker thread cannot be interrupted; the thread ends
        # at the request timeout, and its result is discarded.
        await asyncio.gather(task, return_exceptions=True)
        if self._inflight is not None:
            log.warning("notify.dropped", reason="in flight at close", text=self._inflight)

    async def _run(self) -> None:
        while True:
            text = await self._queue.get()
            self._inflight = text
            try:
                await self._send(text)
                self._inflight = None  # left set only when cancelled mid-post
            finally:
                self._queue.task_done()

    async def _send(self, text: str) -> None:
        try:
            response = await asyncio.to_thread(self._post, text)
        except Exception as exc:  # anything: the notifier must outlive every failure
            # Class name only: requests' messages contain the URL, which is a secret.
            log.warning("notify.discord.failed", error=type(exc).__name__, text=text)
            return
        status = response.status_code
        if 200 <= status < 300:
            log.info("notify.discord.sent", status=status)
        else:
            detail = response.text[:MAX_DETAIL]
            log.warning("notify.discord.failed", status=status, detail=detail, text=text)

    def _post(self, text: str) -> Any:
        from discord_webhook import DiscordWebhook

        webhook = DiscordWebhook(url=self._url, content=text, timeout=self._timeout)
        return webhook.execute()
