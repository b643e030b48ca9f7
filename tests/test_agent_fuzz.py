"""Fuzzing the agent's IMDS answer parser, and its hand-off to the daemon's SQS parser.

`agent.interpret(path, text, instance_id)` reads a 200 answer from the
metadata service. Whatever the text (and whatever the path), it either returns
a `Notice` or raises its documented `_Malformed`; a malformed answer (not JSON,
not an object, an action outside terminate|stop|hibernate, a time or
noticeTime that is not a string) never yields a Notice; and every Notice it
does yield becomes an event (`eventbridge.build`) that `eventbridge.parse`
accepts with the same instance and kind. The parser itself is fuzzed in
test_sqs.py; here only the one shape that fuzz does not reach is searched (a
well-formed interruption envelope whose `instance-action` is any JSON value).

It found one crash in each: an `action` that is a JSON array or object raised
TypeError (`[] in ACTIONS`); both are kept below as examples. This module must
not patch the agent or the parser; it only calls them.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spotguard.agent import INSTANCE_ACTION_PATH, REBALANCE_PATH, Notice, _Malformed, interpret
from spotguard.ids import INSTANCE_ID
from spotguard.sources.eventbridge import ACTIONS, INTERRUPTION, REBALANCE, Malformed, Parsed, build, parse

ID = "i-0123456789abcdef0"
AT = datetime(2026, 11, 28, 8, 20, tzinfo=timezone.utc)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
paths = st.sampled_from([INSTANCE_ACTION_PATH, REBALANCE_PATH]) | st.text(max_size=40)
actions = st.sampled_from(sorted(ACTIONS)) | json_values
times = st.sampled_from(["2026-11-28T08:22:00Z", "", "t"]) | json_values
# Objects shaped like the real answers, with every key optional and every value possibly wrong.
near_answers = st.fixed_dictionaries(
    {},
    optional={"action": actions, "time": times, "noticeTime": times, "extra": json_values},
)
texts = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    near_answers.map(json.dumps),
    # Cut short, as a hung IMDS answer cut off by the timeout would be.
    st.tuples(near_answers.map(json.dumps), st.integers(0, 60)).map(lambda p: p[0][: p[1]]),
)


def _malformed(path: str, text: str) -> bool:
    """Whether `text` is an answer IMDS would never give on `path` (the parser's contract)."""
    try:
        answer = json.loads(text)
    except (ValueError, RecursionError):
        return True
    if not isinstance(answer, dict):
        return True
    if path == INSTANCE_ACTION_PATH:
        action, when = answer.get("action"), answer.get("time")
        return not (isinstance(action, str) and action in ACTIONS and isinstance(when, str) and when)
    notice_time = answer.get("noticeTime")
    return not (isinstance(notice_time, str) and notice_time)


def _interpret(path: str, text: str) -> Notice | None:
    """interpret(), with its documented error as None."""
    try:
        return interpret(path, text, ID)
    except _Malformed:
        return None


@pytest.mark.fault(fault="IMDS answers garbage", phase="agent", outcome="malformed, logged, never sent")
@FUZZ
@given(paths, texts)
@example(INSTANCE_ACTION_PATH, "[" * 100_000)
@example(REBALANCE_PATH, '{"noticeTime": "\\ud800"}')
@example(INSTANCE_ACTION_PATH, '{"action": "stop", "time": "t", "x": ' + "[" * 900 + "]" * 900 + "}")
def test_interpret_returns_a_notice_or_raises_malformed_only(path, text):
    notice = _interpret(path, text)
    if _malformed(path, text):
        assert notice is None, f"malformed answer {text!r} on {path!r} gave {notice}"
        return
    assert notice is not None
    answer = json.loads(text)
    if path == INSTANCE_ACTION_PATH:
        assert notice.detail_type == INTERRUPTION
        assert notice.detail == {"instance-id": ID, "instance-action": answer["action"],
                                 "instance-action-time": answer["time"]}
    else:
        assert notice.detail_type == REBALANCE
        assert notice.detail == {"instance-id": ID}
    assert json.loads(notice.payload) == answer


@pytest.mark.fault(fault="IMDS notice reformatted", phase="agent", outcome="one notice, sent once")
@FUZZ
@given(st.data(), st.sampled_from([INSTANCE_ACTION_PATH, REBALANCE_PATH]), st.sampled_from(sorted(ACTIONS)))
def test_the_same_answer_in_any_layout_is_the_same_notice(data, path, action):
    keys = st.text(max_size=8).filter(lambda k: k not in ("action", "time", "noticeTime"))
    extra = data.draw(st.dictionaries(keys, json_values, max_size=3))
    answer = {"action": action, "time": "2026-11-28T08:22:00Z", "noticeTime": "2026-11-28T08:20:00Z", **extra}
    order = data.draw(st.permutations(sorted(answer)))
    indent = data.draw(st.sampled_from([None, 0, 2]))
    one = interpret(path, json.dumps(answer), ID)
    other = interpret(path, json.dumps({k: answer[k] for k in order}, indent=indent), ID)
    assert one.key == other.key  # the agent's dedupe key: reformatting is no new notice
    assert _event(one, "r")["id"] == _event(other, "r")["id"]  # nor a new event id


@pytest.mark.fault(fault="IMDS notice forwarded", phase="agent", outcome="daemon parses the same kind")
@FUZZ
@given(
    paths,
    near_answers.map(json.dumps),
    st.from_regex(INSTANCE_ID, fullmatch=True),
    st.text(max_size=20),
    st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.timezones()),
)
def test_every_notice_becomes_an_event_the_daemon_parses(path, text, instance_id, region, at):
    # build() and parse() are the two halves of one format: what one writes, the other reads back.
    try:
        notice = interpret(path, text, instance_id)
    except _Malformed:
        return
    built = build(notice.detail_type, notice.detail, payload=notice.payload, region=region, at=at)
    expected = "interruption" if notice.detail_type == INTERRUPTION else "rebalance"
    parsed = parse(json.dumps(built))
    assert parsed == replace(Parsed(built["id"], "spotguard.agent", notice.detail_type, instance_id, expected),
                             deadline=parsed.deadline)
    told = json.loads(text).get("time")
    if notice.detail_type == INTERRUPTION and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", told):
        # IMDS's own time, as IMDS writes it, is the deadline the daemon reads.
        assert parsed.deadline == datetime.fromisoformat(told.replace("Z", "+00:00")).timestamp()
    else:  # anything else: a time read somehow, or none (the machine counts its own two minutes)
        assert parsed.deadline is None or isinstance(parsed.deadline, float)


def _event(notice: Notice, region: str) -> dict:
    return build(notice.detail_type, notice.detail, payload=notice.payload, region=region, at=AT)


# --------------------------------------------------------------------------- the SQS parser's blind spot


def _interruption(action: Any) -> str:
    return json.dumps(
        {
            "version": "0",
            "id": "7bf73129-1428-4cd3-a780-95db273d1602",
            "detail-type": INTERRUPTION,
            "source": "aws.ec2",
            "detail": {"instance-id": ID, "instance-action": action},
        }
    )


@pytest.mark.fault(fault="SQS body with a bad instance-action", phase="sqs", outcome="malformed, deleted, no notice")
@FUZZ
@given(actions)
def test_parse_of_any_instance_action_is_total(action):
    parsed = parse(_interruption(action))
    if isinstance(action, str) and action in ACTIONS:
        assert isinstance(parsed, Parsed) and parsed.kind == "interruption"
    else:
        assert isinstance(parsed, Malformed), parsed


# --------------------------------------------------------------------------- crashes the fuzz found (fixed)


@pytest.mark.parametrize("body", ['{"action": [], "time": "t"}', '{"action": {"a": 1}, "time": "t"}'])
def test_known_interpret_unhashable_action_is_malformed(body):
    with pytest.raises(_Malformed):
        interpret(INSTANCE_ACTION_PATH, body, ID)


@pytest.mark.parametrize("action", [[], {"a": 1}])
def test_known_parse_unhashable_instance_action_is_malformed(action):
    assert isinstance(parse(_interruption(action)), Malformed)
