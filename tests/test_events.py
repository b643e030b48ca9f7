"""Every way AWS delivers an event, read by `eventbridge.parse` and the SQS source.

tests/events/ holds real message bodies retyped from AWS's documentation and
from aws-node-termination-handler's tests (tests/events/index.json names each
one's origin). Each is parsed in-process and sent through moto's SQS to the
real source; the daemon is then run against moto with a 60 s poll, so only the
queue can make it act, for the two new kinds it acts on. Hypothesis varies the
envelopes: nulls and missing fields spotguard does not read never change what
it does, and nothing ever names an instance the body did not.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from configs import daemon_settings
from httpcapture import CaptureServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_daemon import phase, running, state
from waiting import until

from spotguard.ids import INSTANCE_ID
from spotguard.machine import Notice, Phase, Scheduled
from spotguard.notify import Notifier
from spotguard.sources.eventbridge import (
    FULFILLMENT,
    INTERRUPTION,
    LOG_CAP,
    REBALANCE,
    STATE_CHANGE,
    Foreign,
    Health,
    Malformed,
    Parsed,
    parse,
)
from spotguard.sources.sqs import SqsSource

EVENTS = Path(__file__).resolve().parent / "events"
INDEX = {e["file"]: e for e in json.loads((EVENTS / "index.json").read_text())}

# What spotguard makes of each sample: ("notice", kind) | ("wake",) | ("scheduled", code, window)
# | ("foreign", source, detail-type) | ("malformed", reason).
EXPECTED: dict[str, tuple[str, ...]] = {
    # AWS's own sample names the action "action", a placeholder: no instance action to act on.
    "ec2_spot_interruption_docs.json": ("malformed", "bad instance-action 'action'"),
    "ec2_spot_interruption_nth.json": ("notice", "interruption"),
    "ec2_spot_interruption_nth_time_empty.json": ("notice", "interruption"),
    "ec2_spot_interruption_nth_resources_null_derived.json": ("notice", "interruption"),
    "ec2_spot_interruption_nth_time_null_derived.json": ("notice", "interruption"),
    "ec2_spot_interruption_nth_account_numeric_derived.json": ("notice", "interruption"),
    # NTH's minimal bodies have no event id (which dedupe reads) and a made-up instance id.
    "ec2_spot_interruption_nth_v2_minimal.json": ("malformed", "id missing or not a string"),
    "ec2_rebalance_recommendation_docs.json": ("notice", "rebalance"),
    "ec2_rebalance_recommendation_nth.json": ("notice", "rebalance"),
    "ec2_rebalance_recommendation_nth_v2_minimal.json": ("malformed", "id missing or not a string"),
    "ec2_spot_fulfillment_docs.json": ("wake",),
    "ec2_spot_fulfillment_docs_older.json": ("wake",),
    "ec2_state_change_pending_docs_no_version.json": ("wake",),
    "ec2_state_change_pending_nth.json": ("wake",),
    "ec2_state_change_running_uppercase_pipes_docs.json": ("malformed", "bad instance-id 'i-0123456789'"),
    "ec2_state_change_stopping_nth_v2_minimal.json": ("malformed", "id missing or not a string"),
    "ec2_state_change_terminated_nth_v2_minimal.json": ("malformed", "id missing or not a string"),
    "asg_terminate_lifecycle_eventbridge_docs.json": ("notice", "terminating"),
    "asg_terminate_lifecycle_eventbridge_nth.json": ("notice", "terminating"),
    "asg_terminate_lifecycle_eventbridge_warmpool_docs.json": ("notice", "terminating"),
    "asg_terminate_lifecycle_eventbridge_nth_v2_minimal.json": ("malformed", "id missing or not a string"),
    "asg_launch_lifecycle_eventbridge_docs.json": ("wake",),
    "asg_launch_lifecycle_eventbridge_nth.json": ("wake",),
    "asg_launch_lifecycle_eventbridge_warmpool_docs.json": ("wake",),
    "asg_lifecycle_hook_direct_terminating_nth.json": ("notice", "terminating"),
    "asg_lifecycle_hook_direct_launching_docs_derived.json": ("wake",),
    "asg_test_notification.json": ("foreign", "aws.autoscaling", "autoscaling:TEST_NOTIFICATION"),
    "asg_test_notification_eventbridge_nth.json": ("foreign", "aws.autoscaling", "autoscaling:TEST_NOTIFICATION"),
    "asg_test_notification_docs_derived.json": ("foreign", "aws.autoscaling", "autoscaling:TEST_NOTIFICATION"),
    "health_instance_retirement_custodian.json": ("scheduled", "AWS_EC2_PERSISTENT_INSTANCE_RETIREMENT_SCHEDULED",
                                                  "2018-11-01 22:00 UTC to 2018-11-01 22:00 UTC"),
    "health_dedicated_host_network_maintenance_nth.json": (
        "scheduled", "AWS_EC2_DEDICATED_HOST_NETWORK_MAINTENANCE_SCHEDULED", "2016-06-05 15:10 UTC to unknown"),
    "health_instance_store_drive_degraded_issue.json": ("foreign", "aws.health", "EC2 issue"),
    "health_scheduled_change_nth_v2_minimal_two_entities.json": (
        "foreign", "aws.health", "a scheduled change of no instance"),
    "sns_notification_docs.json": ("foreign", "sns", "Notification of text"),
    "sns_wrapped_spot_interruption_derived.json": ("notice", "interruption"),
    "sns_wrapped_asg_terminating_lifecycle_pudding.json": ("notice", "terminating"),
    "sns_wrapped_asg_test_notification_pudding.json": ("foreign", "aws.autoscaling", "autoscaling:TEST_NOTIFICATION"),
    "sns_subscription_confirmation_docs.json": ("foreign", "sns", "SubscriptionConfirmation"),
    "sns_subscription_confirmation_pudding.json": ("foreign", "sns", "SubscriptionConfirmation"),
    "nth_empty_eventbridge_event.json": ("malformed", "source missing or not a string"),
}


def body(name: str) -> str:
    return (EVENTS / name).read_text()


def outcome(result: Any) -> tuple[str, ...]:
    if isinstance(result, Parsed):
        return ("wake",) if result.kind is None else ("notice", result.kind)
    if isinstance(result, Health):
        return ("scheduled", result.code, result.window)
    if isinstance(result, Foreign):
        return ("foreign", result.source, result.detail_type)
    return ("malformed", result.reason)


def test_every_sample_has_an_expected_outcome_and_every_kind_is_covered():
    assert set(EXPECTED) == set(INDEX)
    kinds = {e["kind"] for e in INDEX.values()}
    assert {"interruption", "rebalance", "fulfillment", "state-change", "asg-terminate", "asg-launch", "asg-test",
            "health", "sns-confirmation"} <= kinds
    assert {o[0] for o in EXPECTED.values()} == {"notice", "wake", "scheduled", "foreign", "malformed"}


# ---------------------------------------------------------------------- in-process


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_sample_is_read_as_expected(name):
    result = parse(body(name))
    assert outcome(result) == EXPECTED[name]
    if isinstance(result, Parsed):
        assert result.instance_id == INDEX[name]["instance_id"]
    if isinstance(result, Health):
        assert INDEX[name]["instance_id"] in result.instance_ids


def test_an_interruption_says_when_the_instance_is_reclaimed():
    """EventBridge's warning carries no time of its own: its sending time + 120 s; the agent's
    carries IMDS's instance-action time; an unreadable time leaves the machine's own estimate."""
    event = json.loads(body("ec2_spot_interruption_nth.json"))
    event["time"] = "2026-12-06T13:00:00Z"
    assert parse(json.dumps(event)).deadline == datetime(2026, 12, 6, 13, 2, tzinfo=timezone.utc).timestamp()
    event["detail"]["instance-action-time"] = "2026-12-06T13:01:55Z"
    assert parse(json.dumps(event)).deadline == datetime(2026, 12, 6, 13, 1, 55, tzinfo=timezone.utc).timestamp()
    event["detail"].pop("instance-action-time")
    for bad in ("yesterday", 12, None, "9999-12-31T23:59:59Z"):
        event["time"] = bad
        parsed = parse(json.dumps(event))
        assert isinstance(parsed, Parsed) and parsed.deadline is None, bad


def test_parse_examples():
    event = json.loads(body("ec2_spot_interruption_nth.json"))
    sent = datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()
    assert parse(json.dumps(event)) == Parsed(event["id"], "aws.ec2", INTERRUPTION, event["detail"]["instance-id"],
                                              "interruption", deadline=sent + 120)
    assert parse("null") == Malformed("not an object: NoneType")
    assert parse("[" * 100_000) == Malformed("not json")  # deep nesting: RecursionError caught
    assert isinstance(parse("\ud800"), Malformed)
    # SNS inside SNS (a topic feeding a topic) is read; deeper is not a delivery path.
    once = {"Type": "Notification", "TopicArn": "arn:aws:sns:us-east-1:123456789012:t", "Message": json.dumps(event)}
    twice = {**once, "Message": json.dumps(once)}
    thrice = {**once, "Message": json.dumps(twice)}
    assert outcome(parse(json.dumps(twice))) == ("notice", "interruption")
    assert parse(json.dumps(thrice)) == Malformed("SNS envelopes nested too deep")


# ---------------------------------------------------------------------- through moto's SQS


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_a_sample_through_a_real_queue(name, moto_world, aws):
    boto = moto_world.boto("sqs")
    url = boto.create_queue(QueueName=f"events-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    pushed: list[Any] = []
    wakes: list[None] = []
    source = SqsSource(aws.sqs, url, owns=lambda _: True, push=pushed.append, wake=lambda: wakes.append(None),
                       wait_seconds=0)
    boto.send_message(QueueUrl=url, MessageBody=body(name))
    assert await source.receive_once() is True

    expected, iid = EXPECTED[name], INDEX[name]["instance_id"]
    kind = expected[0]
    if kind == "notice":
        deadline = parse(body(name)).deadline  # the interruption's, read from the sample (the test above)
        assert pushed == [Notice(iid, expected[1], deadline=deadline)] and wakes == []
    elif kind == "scheduled":
        assert pushed == [Scheduled(iid, expected[1], expected[2], "unknown")] and wakes == []
    elif kind == "wake":
        assert pushed == [] and len(wakes) == 1
    else:
        assert pushed == [] and wakes == []
    counted = {"notice": "notices", "scheduled": "scheduled", "wake": "wakes", "foreign": "foreign",
               "malformed": "malformed"}[kind]
    assert source.counts[counted] == 1 and source.counts["deleted"] == 1
    left = boto.receive_message(QueueUrl=url, WaitTimeSeconds=0, VisibilityTimeout=0)
    assert left.get("Messages", []) == []


# ---------------------------------------------------------------------- the daemon acts on the new kinds


def _send(world: Any, url: str, message: dict) -> None:
    world.boto("sqs").send_message(QueueUrl=url, MessageBody=json.dumps(message))


async def test_auto_scaling_terminating_a_tagged_spot_fails_over_before_any_poll(tmp_path, moto_world, deployment,
                                                                                 aws):
    d, standby = deployment, deployment.standby_ids[0]
    spot = moto_world.launch_spot(d.subnet_ids[0], {"fleet": "web"})
    url = moto_world.boto("sqs").create_queue(QueueName="spotguard")["QueueUrl"]
    guard = {"spot_request_ids": None, "spot_instance_tags": {"fleet": "web"}}
    settings = daemon_settings(tmp_path, moto_world, [d], poll="60s", sqs=url, guard=guard)
    async with running(settings, aws) as daemon:
        rounds = daemon.rounds
        lifecycle = json.loads(body("asg_terminate_lifecycle_eventbridge_nth.json"))
        lifecycle["detail"]["EC2InstanceId"] = spot
        _send(moto_world, url, lifecycle)
        await until(lambda: state(moto_world, standby) == "running", timeout=10.0, what="standby started")
        assert daemon.rounds <= rounds + 1  # the queue, not a poll, started it
        assert phase(daemon) in (Phase.STANDBY_STARTING, Phase.BOTH_SERVING)


async def test_a_health_retirement_of_a_standby_is_posted_and_changes_nothing(tmp_path, moto_world, deployment, aws):
    d, standby = deployment, deployment.standby_ids[1]
    url = moto_world.boto("sqs").create_queue(QueueName="spotguard")["QueueUrl"]
    settings = daemon_settings(tmp_path, moto_world, [d], poll="60s", sqs=url)
    health = json.loads(body("health_instance_retirement_custodian.json"))
    health["detail"]["affectedEntities"] = [{"entityValue": standby}]
    health["resources"] = [standby]
    with CaptureServer() as discord:
        notifier = Notifier(discord.url + "/api/webhooks/1/secret")
        async with running(settings, aws, notifier) as daemon:
            _send(moto_world, url, health)
            await until(lambda: discord.requests, what="the alert posted")
            assert phase(daemon) is Phase.SPOT_HEALTHY
        (text,) = [r.json["content"] for r in discord.requests]
    assert f"standby {standby} has a scheduled AWS_EC2_PERSISTENT_INSTANCE_RETIREMENT_SCHEDULED" in text
    assert "2018-11-01 22:00 UTC" in text and "replace it in standby_instance_ids" in text
    assert state(moto_world, standby) == "stopped"


# ---------------------------------------------------------------------- envelopes, by property

ACTING = [n for n, o in EXPECTED.items() if o[0] in ("notice", "scheduled", "wake")]
# Envelope fields spotguard does not read: whatever they hold, or if missing, the outcome is the same.
UNREAD = ("version", "time", "account", "region", "resources")
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_missing = object()


def _sns(text: str) -> str:
    return json.dumps({"Type": "Notification", "MessageId": "m", "TopicArn": "arn:aws:sns:us-east-1:1:t",
                       "Message": text, "Timestamp": None})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ACTING), st.dictionaries(st.sampled_from(UNREAD), st.just(_missing) | _json), st.booleans())
def test_fields_spotguard_does_not_read_never_change_what_it_does(name, changes, wrapped):
    event = json.loads(body(name))
    if "source" not in event:  # a lifecycle hook's own message has no envelope to vary
        return
    for key, value in changes.items():
        if value is _missing:
            event.pop(key, None)
        else:
            event[key] = value
    text = json.dumps(event)
    assert outcome(parse(_sns(text) if wrapped else text)) == EXPECTED[name]


def _ids_in(value: Any) -> set[str]:
    """Every string in a JSON value (or in JSON inside a string: SNS) that is, or ends in, an instance id."""
    if isinstance(value, str):
        tail = value.rsplit("/", 1)[-1]
        try:
            inner = _ids_in(json.loads(value))
        except (ValueError, RecursionError):
            inner = set()
        return inner | ({tail} if INSTANCE_ID.fullmatch(tail) else set())
    if isinstance(value, dict):
        return set().union(*map(_ids_in, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_ids_in, value)) if value else set()
    return set()


_fields = st.sampled_from(["id", "source", "detail-type", "detail", "instance-id", "instance-action",
                           "EC2InstanceId", "LifecycleTransition", "affectedEntities", "eventTypeCategory",
                           "service", "Type", "Message"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(EXPECTED)), st.lists(st.tuples(_fields, st.just(_missing) | _json), max_size=4),
       st.booleans())
def test_a_damaged_envelope_never_crashes_nor_names_an_instance_it_does_not_hold(name, damage, wrapped):
    event = json.loads(body(name))
    for key, value in damage:
        table = event.get("detail") if key not in event and isinstance(event.get("detail"), dict) else event
        if value is _missing:
            table.pop(key, None)
        else:
            table[key] = value
    text = json.dumps(event)
    result = parse(_sns(text) if wrapped else text)
    assert isinstance(result, (Parsed, Health, Foreign, Malformed))
    named = {result.instance_id} if isinstance(result, Parsed) else set(getattr(result, "instance_ids", ()))
    assert named <= _ids_in(event)
    assert all(INSTANCE_ID.fullmatch(i) for i in named)
    if isinstance(result, Parsed):
        assert result.kind in ("interruption", "rebalance", "terminating", None)
    if isinstance(result, (Foreign, Malformed)):
        assert all(len(v) <= LOG_CAP + 1 for v in vars(result).values())


_near = st.fixed_dictionaries(
    {},
    optional={
        "version": _json,
        "id": st.text(max_size=8) | _json,
        "detail-type": st.sampled_from([INTERRUPTION, REBALANCE, FULFILLMENT, STATE_CHANGE, "AWS Health Event",
                                        "EC2 Instance-terminate Lifecycle Action", ""]) | _json,
        "source": st.sampled_from(["aws.ec2", "spotguard.agent", "aws.health", "aws.autoscaling", "x"]) | _json,
        "resources": st.lists(st.text(max_size=5), max_size=2) | _json,
        "detail": st.fixed_dictionaries(
            {},
            optional={
                "instance-id": st.sampled_from(["i-0123456789abcdef0", "i-0", "I-0123456789ABCDEF0"]) | _json,
                "instance-action": st.sampled_from(["terminate", "stop", "hibernate", "boom"]) | _json,
                "EC2InstanceId": st.sampled_from(["i-0123456789abcdef0", "i-0"]) | _json,
                "service": st.just("EC2") | _json,
                "eventTypeCategory": st.just("scheduledChange") | _json,
                "eventTypeCode": st.text(max_size=8) | _json,
                "startTime": st.sampled_from(["Thu, 10 Dec 2026 08:00:00 GMT", "2026-12-10T08:00:00Z", "x"]) | _json,
                "affectedEntities": st.lists(st.fixed_dictionaries({"entityValue": _json}), max_size=2) | _json,
            },
        )
        | _json,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), _json.map(json.dumps), _near.map(json.dumps), _near.map(json.dumps).map(_sns)))
def test_parse_never_raises(text):
    result = parse(text)
    assert isinstance(result, (Parsed, Health, Foreign, Malformed))
    if isinstance(result, Parsed):
        assert INSTANCE_ID.fullmatch(result.instance_id)
    if isinstance(result, Health):
        assert result.instance_ids and all(INSTANCE_ID.fullmatch(i) for i in result.instance_ids)
    if isinstance(result, Malformed):
        assert len(result.reason) <= LOG_CAP + 1
