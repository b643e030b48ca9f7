"""The SQS source: EventBridge EC2 events (and the agent's copies) from a queue, as notices.

`SqsSource.run(stop)` long-polls the queue that the EventBridge rules (and
`spotguard agent`) feed. Each body is parsed by `parse()`, a pure, total
function: an interruption warning or a rebalance recommendation for an
instance some guard owns becomes one `machine.Notice` handed to `push`;
a spot fulfilment or an instance state change only calls `wake` (the poll will
see what changed, sooner). Notices are deduplicated by event id and by
(instance, kind), in bounded memory.

Every message is deleted once handled, including those about instances no
guard owns and malformed ones: left in the queue they would come back every
visibility timeout for days. Nothing a message says can crash the loop or
cause an action other than a notice; AWS failures are logged and retried with
a capped backoff.

This module must not decide anything about guards (the machine does, and the
poll stays the backstop that corrects a wrong or missed message) nor call any
AWS API but ReceiveMessage and DeleteMessageBatch.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Hashable

import structlog

from spotguard.aws import SQS_LONG_POLL, error_code
from spotguard.machine import Notice
from spotguard.sources.eventbridge import STATE_CHANGE, Malformed, Parsed, cap as _cap, parse

log = structlog.get_logger("spotguard.sqs")

MAX_MESSAGES = 10  # ReceiveMessage and DeleteMessageBatch both cap at 10
DEDUPE_KEYS = 4096
# A stop/hibernate spot can be started again with the same id and interrupted
# again later; a notice for the same (instance, kind) is a duplicate only this long.
NOTICE_WINDOW = 600.0
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 30.0


# ---------------------------------------------------------------------- dedupe


class _Seen:
    """Keys seen lately: an LRU of at most `size` keys, each forgotten after `window` s."""

    def __init__(self, size: int, window: float | None = None):
        self.size = size
        self.window = window
        self._keys: OrderedDict[Hashable, float] = OrderedDict()

    def check_and_add(self, key: Hashable, now: float) -> bool:
        """True if `key` was seen within the window; records it either way."""
        at = self._keys.pop(key, None)
        seen = at is not None and (self.window is None or now - at < self.window)
        self._keys[key] = at if seen and at is not None else now
        while len(self._keys) > self.size:
            self._keys.popitem(last=False)
        return seen

    def __len__(self) -> int:
        return len(self._keys)


# ---------------------------------------------------------------------- source


Sleep = Callable[[float, asyncio.Event], Awaitable[None]]


async def stoppable_sleep(seconds: float, stop: asyncio.Event) -> None:
    """Sleep `seconds`, returning early when `stop` is set."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass


class SqsSource:
    """Turns queue messages into notices for the daemon. Clients and callbacks injected."""

    def __init__(
        self,
        sqs_client: Any,
        queue_url: str,
        *,
        owns: Callable[[str], bool],
        push: Callable[[Notice], None],
        wake: Callable[[], None] | None = None,
        wait_seconds: int = SQS_LONG_POLL,
        backoff: tuple[float, float] = (BACKOFF_FIRST, BACKOFF_CAP),
        sleep: Sleep = stoppable_sleep,
        clock: Callable[[], float] | None = None,
        dedupe_keys: int = DEDUPE_KEYS,
        notice_window: float = NOTICE_WINDOW,
    ) -> None:
        self.sqs = sqs_client
        self.queue_url = queue_url
        self.owns = owns
        self.push = push
        self.wake = wake
        self.wait_seconds = wait_seconds
        self.backoff = backoff
        self.sleep = sleep
        self.clock = clock or time.monotonic
        self.counts: Counter[str] = Counter()
        self._event_ids = _Seen(dedupe_keys)
        self._notices = _Seen(dedupe_keys, notice_window)
        self._in_hand = False  # a received batch is being handled and deleted

    async def run(self, stop: asyncio.Event) -> None:
        """Receive and handle batches until `stop` is set; never raises (but CancelledError)."""
        failures = 0
        log.info("source.sqs.started", queue_url=self.queue_url)
        while not stop.is_set():
            ok = await self._until_stopped(stop)
            if stop.is_set():
                break
            failures = 0 if ok else failures + 1
            if failures:
                first, cap = self.backoff
                await self.sleep(min(cap, first * 2 ** (failures - 1)), stop)
        log.info("source.sqs.stopped", **dict(self.counts))

    async def _until_stopped(self, stop: asyncio.Event) -> bool:
        """One batch, abandoned if `stop` is set during the long poll; once messages are
        in hand, they are handled and deleted first (else each would come back, after the
        visibility timeout, to a process that may already have acted on it)."""
        batch = asyncio.ensure_future(self._receive_guarded())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({batch, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not batch.done() and self._in_hand:
                await asyncio.wait({batch})  # bounded by the client's timeouts and retries
        finally:
            # Also when run() itself is cancelled: no request may outlive its client.
            stopped.cancel()
            if not batch.done():
                batch.cancel()
                await asyncio.gather(batch, return_exceptions=True)
        return True if batch.cancelled() else batch.result()

    async def _receive_guarded(self) -> bool:
        try:
            return await self.receive_once()
        except Exception as exc:  # noqa: BLE001 - a bug in one batch must not end the source
            self.counts["errors"] += 1
            log.error("source.sqs.receive.failed", api="handle", code=error_code(exc), error=_cap(str(exc)))
            return False

    async def receive_once(self) -> bool:
        """Receive one batch, handle and delete every message; False if an AWS call failed."""
        try:
            reply = await self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=MAX_MESSAGES,
                WaitTimeSeconds=self.wait_seconds,
            )
        except Exception as exc:  # noqa: BLE001 - any failure: logged, backed off, retried
            return self._failed("ReceiveMessage", exc)
        self._in_hand = True
        try:
            return await self._handle_all(reply)
        finally:
            self._in_hand = False

    async def _handle_all(self, reply: dict) -> bool:
        messages = reply.get("Messages", [])
        self.counts["received"] += len(messages)
        for message in messages:
            try:
                self._handle(message)
            except Exception as exc:  # noqa: BLE001 - a bug (or a failing push) must not keep it queued
                self.counts["errors"] += 1
                log.error("source.sqs.handle.failed", message_id=message.get("MessageId", "?"),
                          error=type(exc).__name__, detail=_cap(str(exc)))
        return await self._delete(messages)

    def _handle(self, message: dict) -> None:
        message_id = message.get("MessageId", "?")
        parsed = parse(message.get("Body", ""))
        if isinstance(parsed, Malformed):
            self.counts["malformed"] += 1
            log.warning("source.sqs.malformed", message_id=message_id, reason=parsed.reason)
            return
        now = self.clock()
        if self._event_ids.check_and_add(parsed.event_id, now):
            self.counts["duplicates"] += 1
            log.debug("source.sqs.duplicate", message_id=message_id, event_id=parsed.event_id)
            return
        if parsed.kind is None:
            self._wake(parsed, message_id)
            return
        self._notice(parsed, message_id, now)

    def _notice(self, parsed: Parsed, message_id: str, now: float) -> None:
        fields = dict(
            message_id=message_id, event_id=parsed.event_id, source=parsed.source,
            instance_id=parsed.instance_id, kind=parsed.kind,
        )
        # Ownership is checked before the (instance, kind) key is recorded: an
        # instance no guard owns yet may be owned by the time the agent's copy comes.
        if not self.owns(parsed.instance_id):
            self.counts["unowned"] += 1
            log.info("source.sqs.unowned", **fields)
            return
        if self._notices.check_and_add((parsed.instance_id, parsed.kind), now):
            self.counts["duplicates"] += 1
            log.debug("source.sqs.duplicate", **fields)
            return
        self.counts["notices"] += 1
        log.info("source.sqs.notice", **fields)
        self.push(Notice(parsed.instance_id, parsed.kind or ""))

    def _wake(self, parsed: Parsed, message_id: str) -> None:
        # A fulfilment names a new instance no guard can own yet; a state change
        # matters only for an instance a guard owns.
        if parsed.detail_type == STATE_CHANGE and not self.owns(parsed.instance_id):
            return
        self.counts["wakes"] += 1
        log.debug("source.sqs.wake", message_id=message_id, detail_type=parsed.detail_type,
                  instance_id=parsed.instance_id)
        if self.wake is not None:
            self.wake()

    async def _delete(self, messages: list[dict]) -> bool:
        entries = [
            {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
            for n, m in enumerate(messages[:MAX_MESSAGES])
            if m.get("ReceiptHandle")
        ]
        if not entries:
            return True
        try:
            reply = await self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
        except Exception as exc:  # noqa: BLE001 - the messages come back; dedupe catches them
            return self._failed("DeleteMessageBatch", exc)
        self.counts["deleted"] += len(reply.get("Successful", []))
        for failed in reply.get("Failed", []):
            self.counts["errors"] += 1
            log.warning("source.sqs.delete.failed", code=failed.get("Code"), error=_cap(str(failed.get("Message"))))
        return True

    def _failed(self, api: str, exc: BaseException) -> bool:
        self.counts["errors"] += 1
        log.error("source.sqs.receive.failed", api=api, code=error_code(exc), error=_cap(str(exc)))
        return False
