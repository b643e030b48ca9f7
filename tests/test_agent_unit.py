"""The agent's pure parts and its systemd unit: answers → events the daemon parses; the unit verifies and scores.

The unit checks need `systemd-analyze` and fail (never skip) without it, as in
test_systemd.py, whose helpers they reuse.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_systemd import MAX_EXPOSURE, run_analyze, settings, verify_complaints

from spotguard.agent import INSTANCE_ACTION_PATH, REBALANCE_PATH, Agent, Notice, _Malformed, interpret, region_from_env
from spotguard.sources.eventbridge import INTERRUPTION, Malformed, build, parse

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "spotguard-agent.service"
INSTALLED_EXEC = "/usr/local/bin/spotguard"
ID = "i-0123456789abcdef0"
AT = datetime(2026, 11, 28, 8, 20, 5, tzinfo=timezone.utc)


def event(notice: Notice, region: str, at: datetime = AT) -> dict:
    """The event the agent sends for `notice`."""
    return build(notice.detail_type, notice.detail, payload=notice.payload, region=region, at=at)


# ---------------------------------------------------------------------- answers and events


@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
def test_an_instance_action_becomes_an_interruption_the_daemon_parses(action):
    notice = interpret(INSTANCE_ACTION_PATH, json.dumps({"action": action, "time": "2026-11-28T08:22:00Z"}), ID)
    parsed = parse(json.dumps(event(notice, "ap-northeast-2")))
    assert not isinstance(parsed, Malformed), parsed
    assert (parsed.source, parsed.instance_id, parsed.kind) == ("spotguard.agent", ID, "interruption")


def test_a_rebalance_becomes_a_rebalance_the_daemon_parses():
    notice = interpret(REBALANCE_PATH, '{"noticeTime": "2026-11-28T08:20:00Z"}', ID)
    message = event(notice, "us-east-1")
    assert message["detail"] == {"instance-id": ID}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", message["time"])
    parsed = parse(json.dumps(message))
    assert not isinstance(parsed, Malformed) and parsed.kind == "rebalance"


def test_the_event_id_is_the_notices_not_the_sends():
    notice = interpret(INSTANCE_ACTION_PATH, '{"action": "stop", "time": "2026-11-28T08:22:00Z"}', ID)
    first = event(notice, "us-east-1")
    # Sent again later (a restarted agent, a retried send): the same id, so the SQS source drops the copy.
    assert event(notice, "us-east-1", AT + timedelta(hours=1))["id"] == first["id"]
    assert uuid.UUID(first["id"]).version == 8
    # A new interruption of the same instance (a new time), or another instance: a new id.
    later = interpret(INSTANCE_ACTION_PATH, '{"action": "stop", "time": "2026-11-28T09:22:00Z"}', ID)
    other = interpret(INSTANCE_ACTION_PATH, '{"action": "stop", "time": "2026-11-28T08:22:00Z"}', "i-0fedcba9876543210")
    assert len({first["id"], event(later, "us-east-1")["id"], event(other, "us-east-1")["id"]}) == 3


def test_the_time_is_the_send_time_in_utc():
    notice = interpret(REBALANCE_PATH, '{"noticeTime": "2026-11-28T08:20:00Z"}', ID)
    seoul = AT.astimezone(timezone(timedelta(hours=9)))
    assert event(notice, "r", seoul)["time"] == "2026-11-28T08:20:05Z"


@pytest.mark.parametrize(
    "detail_type, detail",
    [
        (INTERRUPTION, {"instance-id": "i-0123456789", "instance-action": "stop"}),  # 10 digits: no instance id
        (INTERRUPTION, {"instance-id": ID}),  # no action
        (INTERRUPTION, {"instance-id": ID, "instance-action": "reboot"}),
        ("EC2 Instance Launch Successful", {"instance-id": ID}),
    ],
)
def test_build_refuses_what_parse_would_refuse(detail_type, detail):
    with pytest.raises(ValueError):
        build(detail_type, detail, payload="{}", region="r", at=AT)


def test_the_payload_key_ignores_key_order_and_spacing():
    a = interpret(INSTANCE_ACTION_PATH, '{"action": "stop", "time": "t"}', ID)
    b = interpret(INSTANCE_ACTION_PATH, '{ "time":"t","action":"stop" }', ID)
    assert a.key == b.key


@pytest.mark.parametrize(
    "path, body",
    [
        (INSTANCE_ACTION_PATH, "<html><body>Service Unavailable</body></html>"),
        (INSTANCE_ACTION_PATH, '{"action": "terminate", '),
        (INSTANCE_ACTION_PATH, '["terminate"]'),
        (INSTANCE_ACTION_PATH, '{"action": "explode", "time": "t"}'),
        (INSTANCE_ACTION_PATH, '{"action": "stop"}'),
        (INSTANCE_ACTION_PATH, "[" * 100000),
        (REBALANCE_PATH, '{"noticeTime": 5}'),
        (REBALANCE_PATH, '{"noticeTime": ""}'),
        (REBALANCE_PATH, "null"),
    ],
)
def test_garbage_is_malformed(path, body):
    with pytest.raises(_Malformed):
        interpret(path, body, ID)


def test_region_prefers_aws_region():
    assert region_from_env({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-east-1"}) == "eu-west-1"
    assert region_from_env({"AWS_DEFAULT_REGION": "us-east-1"}) == "us-east-1"
    assert region_from_env({}) is None


def test_agent_refuses_a_ttl_imds_would_refuse():
    with pytest.raises(ValueError):
        Agent("http://x", None, "q", token_ttl=21601)
    with pytest.raises(ValueError):
        Agent("http://x", None, "q", interval=0)


# ---------------------------------------------------------------------- CLI arguments


@pytest.mark.parametrize(
    "argv, env_drop, message",
    [
        (["agent"], (), "--queue-url"),
        (["agent", "--queue-url", "not-a-url"], (), "not an http(s) URL"),
        (["agent", "--queue-url", "http://q", "--interval", "0"], (), "positive"),
        (["agent", "--queue-url", "http://q", "--interval", "soon"], (), "not a number"),
    ],
)
def test_bad_arguments_exit_2(argv, env_drop, message):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    result = subprocess.run([sys.executable, "-m", "spotguard", *argv], capture_output=True, text=True, env=env,
                            timeout=30)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------- the unit


def service_value(key: str) -> str:
    values = [v for s, k, v in settings(UNIT.read_text()) if s == "Service" and k == key]
    assert values, f"{key}= missing from [Service]"
    return values[-1]


def test_unit_runs_the_agent_with_the_queue_from_its_environment_file():
    assert service_value("Type") == "simple"
    assert service_value("EnvironmentFile") == "/etc/spotguard/agent.env"
    assert service_value("ExecStart") == (f"{INSTALLED_EXEC} agent --queue-url ${{SPOTGUARD_QUEUE_URL}} "
                                          "$SPOTGUARD_AGENT_OPTIONS")
    assert service_value("Restart") == "on-failure"
    assert service_value("DynamicUser") == "yes"
    assert set(service_value("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}


def test_unit_verifies(tmp_path):
    script = Path(sys.executable).with_name("spotguard")
    exe = str(script) if os.access(script, os.X_OK) else "/bin/true"
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_EXEC} " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={exe} "))
    assert verify_complaints(copy) == []


def test_unit_security_exposure_is_low():
    result = run_analyze("security", "--offline=true", "--no-pager", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure level in systemd-analyze output:\n{result.stdout[-2000:]}{result.stderr}"
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
