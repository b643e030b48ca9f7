"""The SQS source: the events of a queue (EventBridge, SNS, Auto Scaling hooks) as notices.

`SqsSource.run(stop)` long-polls the queue; `eventbridge.parse` reads each
body. Every interruption, rebalance or Auto Scaling termination becomes one
`machine.Notice` for `push`, every AWS Health scheduled change one
`machine.Scheduled` per instance, whatever the instance (the daemon decides
which guard, if any, owns it); a spot fulfilment, an Auto Scaling launch, or a
state change of an instance `owns` knows, only calls `wake`. Events for others
(a shared queue) are counted and said once per kind at INFO.
Copies of one event are dropped by event id, in bounded memory; a repeated
notice under a new id (EC2's event and the agent's) is harmless, as the state
machine ignores a notice for an interruption it already knows. Every message is
deleted once handled, malformed ones too, or it would come back every
visibility timeout for days.

This module must not decide anything about guards, let a message crash the
loop or cause more than a notice or a wake, nor call any AWS API but
ReceiveMessage and DeleteMessageBatch.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from typing import Any, Awaitable, Callable, Hashable

import structlog

from spotguard.aws import SQS_LONG_POLL, error_code
from spotguard.machine import Heard, Notice, Scheduled
from spotguard.sources.eventbridge import STATE_CHANGE, Foreign, Health, Malformed, Parsed, cap, parse

log = structlog.get_logger("spotguard.sqs")

MAX_MESSAGES = 10  # ReceiveMessage and DeleteMessageBatch both cap at 10
# What becomes of messages, as counted (and logged with source.sqs.stopped).
OUTCOMES = ("received", "notices", "scheduled", "wakes", "duplicates", "foreign", "malformed", "deleted", "errors")
DEDUPE_KEYS = 4096  # event ids remembered; a copy older than that is pushed again, which is harmless
FOREIGN_KINDS = 256  # (source, detail-type) pairs said at INFO once; later ones of a kind at DEBUG
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 30.0


# ---------------------------------------------------------------------- dedupe


class _Seen:
    """The last `size` keys seen, least recently seen forgotten first."""

    def __init__(self, size: int):
        self.size = size
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def check_and_add(self, key: Hashable) -> bool:
        """True if `key` is remembered; remembers it as the newest either way."""
        seen = key in self._keys
        self._keys[key] = None
        self._keys.move_to_end(key)
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
        push: Callable[[Heard], None],
        wake: Callable[[], None] | None = None,
        wait_seconds: int = SQS_LONG_POLL,
        backoff: tuple[float, float] = (BACKOFF_FIRST, BACKOFF_CAP),
        sleep: Sleep = stoppable_sleep,
        dedupe_keys: int = DEDUPE_KEYS,
    ) -> None:
        self.sqs = sqs_client
        self.queue_url = queue_url
        self.owns = owns  # only to decide whether a state change is worth a wake
        self.push = push
        self.wake = wake
        self.wait_seconds = wait_seconds
        self.backoff = backoff
        self.sleep = sleep
        # Every outcome present from the start: the metrics endpoint reads these from its own thread.
        self.counts: Counter[str] = Counter({outcome: 0 for outcome in OUTCOMES})
        self.received_at: float | None = None  # wall time of the last ReceiveMessage that answered
        self._event_ids = _Seen(dedupe_keys)
        self._foreign = _Seen(FOREIGN_KINDS)
        self._in_hand = False  # a received batch is being handled and deleted

    async def run(self, stop: asyncio.Event) -> None:
        """Receive and handle batches until `stop` is set; never raises (but CancelledError)."""
        failures = 0
        log.info("source.sqs.started", queue_url=self.queue_url)
        try:
            while not stop.is_set():
                ok = await self._until_stopped(stop)
                if stop.is_set():
                    break
                failures = 0 if ok else failures + 1
                if failures:
                    first, longest = self.backoff
                    await self.sleep(min(longest, first * 2 ** (failures - 1)), stop)
        finally:  # also when cancelled: the counts are said on every stop
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
            log.error("source.sqs.receive.failed", api="handle", code=error_code(exc), error=cap(str(exc)))
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
        self.received_at = time.time()
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
                          error=type(exc).__name__, detail=cap(str(exc)))
        return await self._delete(messages)

    def _handle(self, message: dict) -> None:
        message_id = message.get("MessageId", "?")
        parsed = parse(message.get("Body", ""))
        if isinstance(parsed, Malformed):
            self.counts["malformed"] += 1
            log.warning("source.sqs.malformed", message_id=message_id, reason=parsed.reason)
            return
        if isinstance(parsed, Foreign):
            self._foreign_one(parsed, message_id)
            return
        if self._event_ids.check_and_add(parsed.event_id):
            self.counts["duplicates"] += 1
            log.debug("source.sqs.duplicate", message_id=message_id, event_id=parsed.event_id)
            return
        if isinstance(parsed, Health):
            self._scheduled(parsed, message_id)
            return
        if parsed.kind is None:
            self._wake(parsed, message_id)
            return
        self.counts["notices"] += 1
        log.info("source.sqs.notice", message_id=message_id, event_id=parsed.event_id, source=parsed.source,
                 detail_type=parsed.detail_type, instance_id=parsed.instance_id, kind=parsed.kind)
        self.push(Notice(parsed.instance_id, parsed.kind, deadline=parsed.deadline))

    def _foreign_one(self, parsed: Foreign, message_id: str) -> None:
        """Another kind of event (a queue shared with lifecycle hooks, Health's other news):
        deleted, counted, and said at INFO the first time its kind is seen."""
        self.counts["foreign"] += 1
        known = self._foreign.check_and_add((parsed.source, parsed.detail_type))
        (log.debug if known else log.info)("source.sqs.foreign", message_id=message_id, source=parsed.source,
                                          detail_type=parsed.detail_type)

    def _scheduled(self, parsed: Health, message_id: str) -> None:
        self.counts["scheduled"] += 1
        log.info("source.sqs.scheduled", message_id=message_id, event_id=parsed.event_id, code=parsed.code,
                 status=parsed.status, window=parsed.window, instance_ids=list(parsed.instance_ids))
        for iid in parsed.instance_ids:
            self.push(Scheduled(iid, parsed.code, parsed.window, parsed.status))

    def _wake(self, parsed: Parsed, message_id: str) -> None:
        # A fulfilment names a new instance no guard can own yet; a state change
        # is worth a poll only for an instance a guard knows (a wake, not a notice).
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
            log.warning("source.sqs.delete.failed", code=failed.get("Code"), error=cap(str(failed.get("Message"))))
        return True

    def _failed(self, api: str, exc: BaseException) -> bool:
        self.counts["errors"] += 1
        log.error("source.sqs.receive.failed", api=api, code=error_code(exc), error=cap(str(exc)))
        return False
