"""The SQS source against moto's SQS (and SNS) in server mode; the body parser is test_events.py's.

Messages go into a real (moto) queue with boto3; the source reads them with
spotguard's own aiobotocore client. Every test ends by checking the queue is
empty: whatever a message says, it must not come back.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from structlog.testing import capture_logs

from spotguard.aws import client
from spotguard.machine import Notice, Scheduled
from spotguard.sources.eventbridge import ASG_TERMINATE, FULFILLMENT, INTERRUPTION, LOG_CAP, REBALANCE, STATE_CHANGE
from spotguard.sources.sqs import SqsSource, stoppable_sleep

OWNED = "i-0123456789abcdef0"
OTHER = "i-0fedcba9876543210"
NEW_SPOT = "i-00000000aaaaaaaa1"
# event()'s time, 2026-11-28T08:20:00Z, plus the two-minute notice: when EC2 reclaims the instance.
RECLAIMED = 1795854000.0 + 120


def event(
    detail_type: str, instance_id: str = OWNED, *, source: str = "aws.ec2", event_id: str | None = None, **detail: Any
) -> dict:
    """An EventBridge envelope as EC2 (or the agent) sends it."""
    if detail_type == INTERRUPTION:
        detail.setdefault("instance-action", "terminate")
    if detail_type == FULFILLMENT:
        detail.setdefault("spot-instance-request-id", "sir-12345678")
    if detail_type == STATE_CHANGE:
        detail.setdefault("state", "running")
    return {
        "version": "0",
        "id": event_id or str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": source,
        "account": "123456789012",
        "time": "2026-11-28T08:20:00Z",
        "region": "us-east-1",
        "resources": [f"arn:aws:ec2:us-east-1:123456789012:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, **detail},
    }


class Harness:
    """A queue, a source on it, and what the source pushed and woke."""

    def __init__(self, moto_world: Any, sqs: Any, **options: Any):
        self.boto = moto_world.boto("sqs")
        self.queue_url = self.boto.create_queue(QueueName=f"spotguard-{uuid.uuid4().hex[:8]}")["QueueUrl"]
        self.pushed: list[Notice] = []
        self.wakes = 0
        self.owned = {OWNED}
        options.setdefault("wait_seconds", 0)
        self.source = SqsSource(
            sqs, self.queue_url, owns=self.owned.__contains__, push=self.pushed.append, wake=self._wake, **options
        )

    def _wake(self) -> None:
        self.wakes += 1

    def send(self, *bodies: dict | str) -> None:
        for body in bodies:
            text = body if isinstance(body, str) else json.dumps(body)
            self.boto.send_message(QueueUrl=self.queue_url, MessageBody=text)

    async def drain(self) -> None:
        """receive_once until a batch comes back empty (a batch holds at most 10)."""
        for _ in range(20):
            received = self.source.counts["received"]
            assert await self.source.receive_once() is True
            if self.source.counts["received"] == received:
                return
        raise AssertionError("queue never drained")

    def assert_empty(self) -> None:
        attrs = self.boto.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["All"])["Attributes"]
        assert attrs["ApproximateNumberOfMessages"] == "0"
        assert attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
        # And nothing comes back once visibility no longer hides it.
        again = self.boto.receive_message(
            QueueUrl=self.queue_url, WaitTimeSeconds=0, VisibilityTimeout=0, MaxNumberOfMessages=10
        )
        assert again.get("Messages", []) == []


@pytest.fixture
def harness(moto_world, aws) -> Harness:
    return Harness(moto_world, aws.sqs)


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


# ---------------------------------------------------------------------- detail-types


@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
async def test_interruption_warning_pushes_an_interruption(harness, action):
    harness.send(event(INTERRUPTION, **{"instance-action": action}))
    with capture_logs() as logs:
        await harness.drain()
    assert harness.pushed == [Notice(OWNED, "interruption", deadline=RECLAIMED)]
    assert [e["instance_id"] for e in events(logs, "source.sqs.notice")] == [OWNED]
    assert harness.source.counts["notices"] == 1 and harness.source.counts["deleted"] == 1
    harness.assert_empty()


async def test_rebalance_recommendation_pushes_a_rebalance(harness):
    harness.send(event(REBALANCE))
    await harness.drain()
    assert harness.pushed == [Notice(OWNED, "rebalance")]
    harness.assert_empty()


async def test_the_agents_events_are_understood_too(harness):
    harness.send(event(INTERRUPTION, source="spotguard.agent", **{"instance-action": "stop"}))
    await harness.drain()
    assert harness.pushed == [Notice(OWNED, "interruption", deadline=RECLAIMED)]
    harness.assert_empty()


async def test_fulfillment_wakes_without_a_notice(harness):
    # A fulfilment names a spot no guard has seen yet: wake the poll regardless.
    harness.send(event(FULFILLMENT, NEW_SPOT))
    await harness.drain()
    assert harness.pushed == [] and harness.wakes == 1
    harness.assert_empty()


async def test_state_change_wakes_only_for_an_owned_instance(harness):
    harness.send(event(STATE_CHANGE, OWNED, state="stopping"), event(STATE_CHANGE, OTHER, state="stopping"))
    await harness.drain()
    assert harness.pushed == [] and harness.wakes == 1
    assert harness.source.counts["deleted"] == 2
    harness.assert_empty()


async def test_wake_is_optional(moto_world, aws):
    h = Harness(moto_world, aws.sqs)
    h.source.wake = None
    h.send(event(FULFILLMENT, NEW_SPOT))
    await h.drain()
    assert h.source.counts["wakes"] == 1
    h.assert_empty()


async def test_an_auto_scaling_termination_pushes_an_early_notice(harness):
    harness.send({**event(INTERRUPTION), "source": "aws.autoscaling", "detail-type": ASG_TERMINATE,
                  "detail": {"EC2InstanceId": OWNED, "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
                             "LifecycleActionToken": "t-1", "AutoScalingGroupName": "web", "LifecycleHookName": "h"}})
    await harness.drain()
    assert harness.pushed == [Notice(OWNED, "terminating")]
    harness.assert_empty()


async def test_a_health_scheduled_change_pushes_one_per_instance(harness):
    detail = {"service": "EC2", "eventTypeCategory": "scheduledChange", "statusCode": "upcoming",
              "eventTypeCode": "AWS_EC2_SYSTEM_MAINTENANCE_EVENT", "startTime": "Thu, 10 Dec 2026 08:00:00 GMT",
              "endTime": "Thu, 10 Dec 2026 10:00:00 GMT",
              "affectedEntities": [{"entityValue": OWNED}, {"entityValue": OTHER}, {"entityValue": "not-an-id"}]}
    harness.send({**event(INTERRUPTION), "source": "aws.health", "detail-type": "AWS Health Event", "detail": detail})
    with capture_logs() as logs:
        await harness.drain()
    window = "2026-12-10 08:00 UTC to 2026-12-10 10:00 UTC"
    assert harness.pushed == [Scheduled(i, "AWS_EC2_SYSTEM_MAINTENANCE_EVENT", window, "upcoming")
                              for i in (OWNED, OTHER)]
    assert [e["instance_ids"] for e in events(logs, "source.sqs.scheduled")] == [[OWNED, OTHER]]
    assert harness.source.counts["scheduled"] == 1
    harness.assert_empty()


async def test_foreign_events_are_deleted_counted_and_said_once_per_kind(harness):
    launch_ok = {**event(INTERRUPTION), "source": "aws.autoscaling", "detail-type": "EC2 Instance Launch Successful"}
    test = {"Service": "AWS Auto Scaling", "Event": "autoscaling:TEST_NOTIFICATION", "AccountId": "123456789012",
            "AutoScalingGroupName": "web", "RequestId": "r-1", "Time": "2026-11-28T08:20:00Z"}
    harness.send(launch_ok, launch_ok, test, {**event(REBALANCE), "source": "aws.s3"})
    with capture_logs() as logs:
        await harness.drain()
    assert harness.pushed == [] and harness.wakes == 0
    said = [(e["log_level"], e["source"], e["detail_type"]) for e in events(logs, "source.sqs.foreign")]
    assert said == [("info", "aws.autoscaling", "EC2 Instance Launch Successful"),
                    ("debug", "aws.autoscaling", "EC2 Instance Launch Successful"),
                    ("info", "aws.autoscaling", "autoscaling:TEST_NOTIFICATION"),
                    ("info", "aws.s3", REBALANCE)]
    assert events(logs, "source.sqs.malformed") == []
    assert (harness.source.counts["foreign"], harness.source.counts["deleted"]) == (4, 4)
    harness.assert_empty()


async def test_sns_delivers_the_event_wrapped_or_raw_through_a_real_subscription(moto_world, aws):
    """moto's SNS publishes to its SQS subscriptions as SNS does: in the JSON envelope with the
    event as a string in Message, or the event alone with RawMessageDelivery."""
    sns = moto_world.boto("sns")
    topic = sns.create_topic(Name="spot-events")["TopicArn"]
    wrapped, raw = Harness(moto_world, aws.sqs), Harness(moto_world, aws.sqs)
    for h, raw_delivery in ((wrapped, "false"), (raw, "true")):
        arn = h.boto.get_queue_attributes(QueueUrl=h.queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": raw_delivery})
    sns.publish(TopicArn=topic, Message=json.dumps(event(INTERRUPTION, event_id="e-sns")))
    sns.publish(TopicArn=topic, Message=json.dumps(event(REBALANCE, OTHER)), Subject="rebalance")

    envelope = json.loads(wrapped.boto.receive_message(QueueUrl=wrapped.queue_url, VisibilityTimeout=0)
                          ["Messages"][0]["Body"])
    assert envelope["Type"] == "Notification" and isinstance(envelope["Message"], str)
    for h in (wrapped, raw):
        await h.drain()
        assert h.pushed == [Notice(OWNED, "interruption", deadline=RECLAIMED), Notice(OTHER, "rebalance")]
        assert h.source.counts["malformed"] == 0
        h.assert_empty()


# ---------------------------------------------------------------------- dedupe


async def test_duplicate_event_id_is_pushed_once(harness):
    same = event(INTERRUPTION)
    harness.send(same, same, same)
    await harness.drain()
    assert harness.pushed == [Notice(OWNED, "interruption", deadline=RECLAIMED)]
    assert harness.source.counts["duplicates"] == 2 and harness.source.counts["deleted"] == 3
    harness.assert_empty()


async def test_dedupe_is_by_event_id_only(harness):
    # EC2's event, a copy of it, and the agent's event for the same interruption (its own id):
    # the copy is dropped here; the agent's is pushed, and the machine ignores a known interruption.
    ec2 = event(INTERRUPTION, event_id="ec2-1")
    harness.send(ec2, ec2, event(INTERRUPTION, source="spotguard.agent", event_id="agent-1"))
    with capture_logs() as logs:
        await harness.drain()
    assert harness.pushed == [Notice(OWNED, "interruption", deadline=RECLAIMED)] * 2
    assert [e["event_id"] for e in events(logs, "source.sqs.duplicate")] == ["ec2-1"]
    assert harness.source.counts["duplicates"] == 1 and harness.source.counts["deleted"] == 3
    harness.assert_empty()


async def test_dedupe_memory_is_bounded(moto_world, aws):
    h = Harness(moto_world, aws.sqs, dedupe_keys=3)
    h.send(*(event(INTERRUPTION, f"i-{n:017x}", event_id=f"e{n}") for n in range(5)))
    await h.drain()
    assert len(h.pushed) == 5 and len(h.source._event_ids) == 3
    # e0 was forgotten: its copy goes through again; e4 is remembered: dropped.
    h.send(event(INTERRUPTION, "i-00000000000000000", event_id="e0"))
    await h.drain()
    h.send(event(INTERRUPTION, "i-00000000000000004", event_id="e4"))
    await h.drain()
    assert h.pushed[5:] == [Notice("i-00000000000000000", "interruption", deadline=RECLAIMED)]
    assert h.source.counts["duplicates"] == 1
    h.assert_empty()


# ---------------------------------------------------------------------- ownership is the daemon's


async def test_a_notice_for_an_instance_no_guard_owns_is_pushed(harness):
    # Whose instance it is, the daemon decides (and logs guard.notice.unowned); the source only delivers.
    harness.send(event(INTERRUPTION, OTHER), event(REBALANCE, OTHER))
    with capture_logs() as logs:
        await harness.drain()
    assert harness.pushed == [Notice(OTHER, "interruption", deadline=RECLAIMED), Notice(OTHER, "rebalance")]
    assert [(e["instance_id"], e["kind"]) for e in events(logs, "source.sqs.notice")] == [
        (OTHER, "interruption"),
        (OTHER, "rebalance"),
    ]
    assert events(logs, "source.sqs.unowned") == [] and "unowned" not in harness.source.counts
    assert harness.source.counts["deleted"] == 2
    harness.assert_empty()


# ---------------------------------------------------------------------- malformed


def _without_detail() -> dict:
    body = event(INTERRUPTION)
    del body["detail"]
    return body


MALFORMED = {
    "not json": "<html>nope</html>",
    "a json list": json.dumps([event(INTERRUPTION)]),
    "missing detail": json.dumps(_without_detail()),
    "bad instance id": json.dumps(event(INTERRUPTION, "i-NOTHEX00")),
    "short instance id": json.dumps(event(INTERRUPTION, "i-0123")),
    "instance id of 10 digits": json.dumps(event(INTERRUPTION, "i-0123456789")),
    "bad instance-action": json.dumps(event(INTERRUPTION, **{"instance-action": "explode"})),
    "id not a string": json.dumps({**event(INTERRUPTION), "id": 7}),
    "huge body": json.dumps({**event(INTERRUPTION, "i-" + "0" * 250_000)}),
    "no source": json.dumps({k: v for k, v in event(INTERRUPTION).items() if k != "source"}),
    "a stranger's object": json.dumps({"hello": "world"}),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_is_logged_counted_deleted_never_pushed(harness, body):
    harness.send(body)
    with capture_logs() as logs:
        await harness.drain()
    assert harness.pushed == [] and harness.wakes == 0
    bad = events(logs, "source.sqs.malformed")
    assert len(bad) == 1
    assert bad[0]["message_id"] and len(bad[0]["reason"]) <= LOG_CAP + 1
    assert all(len(json.dumps(e, default=str)) < 1000 for e in logs)  # never the whole body
    assert harness.source.counts["malformed"] == 1 and harness.source.counts["deleted"] == 1
    harness.assert_empty()


async def test_a_malformed_message_does_not_spoil_its_batch(harness):
    harness.send("{", event(INTERRUPTION), "[]", event(REBALANCE, OTHER))
    await harness.drain()
    assert harness.pushed == [Notice(OWNED, "interruption", deadline=RECLAIMED), Notice(OTHER, "rebalance")]
    c = harness.source.counts
    assert (c["received"], c["malformed"], c["notices"], c["deleted"]) == (4, 2, 2, 4)
    harness.assert_empty()


async def test_a_failing_push_still_deletes(moto_world, aws):
    h = Harness(moto_world, aws.sqs)

    def broken(_: Notice) -> None:
        raise RuntimeError("queue closed")

    h.source.push = broken
    h.send(event(INTERRUPTION))
    with capture_logs() as logs:
        await h.drain()
    assert [e["error"] for e in events(logs, "source.sqs.handle.failed")] == ["RuntimeError"]
    assert h.source.counts["errors"] == 1
    h.assert_empty()


# ---------------------------------------------------------------------- run loop and failures


async def test_receive_failure_is_logged_not_raised(aio_session):
    async with client("sqs", "us-east-1", "http://127.0.0.1:9", session=aio_session, max_attempts=1) as dead:
        source = SqsSource(
            dead, "http://127.0.0.1:9/123456789012/q", owns=lambda _: True, push=lambda _: None, wait_seconds=0
        )
        with capture_logs() as logs:
            assert await source.receive_once() is False
    failed = events(logs, "source.sqs.receive.failed")
    assert [(e["api"], e["code"]) for e in failed] == [("ReceiveMessage", "EndpointConnectionError")]
    assert source.counts["errors"] == 1


async def test_run_backs_off_on_failures_and_stops(aio_session):
    stop = asyncio.Event()
    slept: list[float] = []

    async def sleep(seconds: float, _: asyncio.Event) -> None:
        slept.append(seconds)
        if len(slept) == 4:
            stop.set()

    async with client("sqs", "us-east-1", "http://127.0.0.1:9", session=aio_session, max_attempts=1) as dead:
        source = SqsSource(
            dead, "http://127.0.0.1:9/123456789012/q", owns=lambda _: True, push=lambda _: None,
            wait_seconds=0, backoff=(1.0, 4.0), sleep=sleep,
        )
        with capture_logs() as logs:
            await asyncio.wait_for(source.run(stop), timeout=30)
    assert slept == [1.0, 2.0, 4.0, 4.0]  # doubling, capped
    assert len(events(logs, "source.sqs.receive.failed")) == 4
    assert events(logs, "source.sqs.stopped")


async def test_stoppable_sleep_returns_when_stopped():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    loop.call_later(0.05, stop.set)
    await asyncio.wait_for(stoppable_sleep(30.0, stop), timeout=5)
    assert loop.time() - started < 1
    started = loop.time()
    await stoppable_sleep(0.01, asyncio.Event())  # and returns after the time when not
    assert loop.time() - started >= 0.01


async def test_run_delivers_and_stops_during_a_long_poll(moto_world, aws):
    h = Harness(moto_world, aws.sqs, wait_seconds=20)
    stop = asyncio.Event()
    task = asyncio.create_task(h.source.run(stop))
    h.send(event(INTERRUPTION))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not (h.pushed and h.source.counts["deleted"]) and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert h.pushed == [Notice(OWNED, "interruption", deadline=RECLAIMED)]
    # The source is now inside a 20 s long poll on an empty queue: stop must not wait it out.
    started = loop.time()
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert loop.time() - started < 2
    h.assert_empty()


async def test_cancelling_run_leaves_no_request_behind(moto_world, aws):
    h = Harness(moto_world, aws.sqs, wait_seconds=20)
    before = asyncio.all_tasks()
    task = asyncio.create_task(h.source.run(asyncio.Event()))
    await asyncio.sleep(0.2)  # inside the long poll
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
    assert asyncio.all_tasks() == before


async def test_run_recovers_after_a_failure(moto_world, aws):
    # The first receive fails (the queue does not exist yet), then it appears and works.
    stop = asyncio.Event()
    slept: list[float] = []

    async def sleep(seconds: float, _: asyncio.Event) -> None:
        slept.append(seconds)
        h.source.queue_url = h.queue_url

    h = Harness(moto_world, aws.sqs, sleep=sleep)
    h.source.queue_url = h.queue_url + "-later"

    h.send(event(REBALANCE))
    task = asyncio.create_task(h.source.run(stop))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not h.pushed and loop.time() < deadline:
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    assert slept == [1.0]
    assert h.pushed == [Notice(OWNED, "rebalance")]
    h.assert_empty()


async def test_a_batch_in_hand_is_deleted_even_when_stopped_meanwhile(moto_world, aws):
    # SIGTERM while a received batch is being handled: the notices were pushed, so the
    # messages must not come back after the visibility timeout to act on them twice.
    stop = asyncio.Event()
    h = Harness(moto_world, aws.sqs)
    pushed = h.source.push

    def push_then_stop(notice: Notice) -> None:
        pushed(notice)
        stop.set()

    h.source.push = push_then_stop
    h.send(event(REBALANCE))
    await asyncio.wait_for(h.source.run(stop), timeout=10)
    assert h.pushed == [Notice(OWNED, "rebalance")]
    h.assert_empty()
