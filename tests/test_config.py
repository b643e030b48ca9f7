"""Tests of the config loader (spotguard.config) and the `spotguard check-config` / `run` CLI.

Configs are written as real TOML files: a small serializer below turns a dict
into TOML text, so each error case is one edit of a valid config plus the
exact line (key path first) the loader must report.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotguard import cli
from spotguard.config import (
    DISCORD_ENV,
    AwsSettings,
    ConfigError,
    DaemonSettings,
    DiscordSettings,
    GuardSettings,
    Settings,
    SqsSettings,
    format_duration,
    load,
    parse_duration,
)
from spotguard.machine import Rules

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"

ARN = "arn:aws:elasticloadbalancing:ap-northeast-2:123456789012:targetgroup/inference/6d0ecf831eec9f09"
ARN2 = "arn:aws:elasticloadbalancing:ap-northeast-2:123456789012:targetgroup/batch/0123456789abcdef"
SB1, SB2, SB3 = "i-0a1b2c3d4e5f60718", "i-0f9e8d7c6b5a49382", "i-1234abcd"
HOOK = "https://discord.com/api/webhooks/123/SECRET-token"

VALID = {
    "aws": {"region": "ap-northeast-2"},
    "guard": [
        {
            "name": "inference",
            "target_group_arn": ARN,
            "spot_request_ids": ["sir-8x4kq2bn"],
            "standby_instance_ids": [SB1, SB2],
        }
    ],
}


# --------------------------------------------------------------------------- helpers


def toml_value(value: object) -> str:
    """TOML text for a value, always inline (tables as { }, arrays as [ ])."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else {math.inf: "inf", -math.inf: "-inf"}.get(value, repr(value))
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def _toml_char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c


def to_toml(doc: dict) -> str:
    return "".join(f"{toml_value(str(k))} = {toml_value(v)}\n" for k, v in doc.items())


def write(tmp_path: Path, doc: dict | str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else to_toml(doc), encoding="utf-8")
    return path


_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def edited(doc: dict, path: str, value: object = ..., *, drop: bool = False) -> dict:
    """A copy of doc with `path` ("guard[0].standby_instance_ids[1]") set to value, or dropped."""
    doc = copy.deepcopy(doc)
    steps = [key if key else int(index) for key, index in _STEP.findall(path)]
    node = doc
    for step in steps[:-1]:
        if isinstance(step, str) and step not in node:
            node[step] = {}
        node = node[step]
    if drop:
        del node[steps[-1]]
    else:
        node[steps[-1]] = value
    return doc


def problems(tmp_path: Path, doc: dict | str, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, doc), env=env or {})
    lines = caught.value.problems
    assert str(caught.value) == "\n".join(lines)
    assert all(line and "\n" not in line for line in lines)
    return lines


# --------------------------------------------------------------------------- valid configs


def test_minimal_config_gets_the_documented_defaults(tmp_path):
    settings = load(write(tmp_path, VALID), env={})
    assert settings == Settings(
        aws=AwsSettings(region="ap-northeast-2", endpoint_url=None),
        daemon=DaemonSettings(state_dir=Path("/var/lib/spotguard"), poll_interval=5.0, log_format="auto"),
        discord=None,
        sqs=None,
        guards=(
            GuardSettings(
                name="inference",
                target_group_arn=ARN,
                target_port=None,
                spot_request_ids=("sir-8x4kq2bn",),
                spot_instance_tags=(),
                standby_instance_ids=(SB1, SB2),
                failback_grace=600.0,
                standby_ready_timeout=300.0,
                unhealthy_grace=30.0,
                on_rebalance="ignore",
                rebalance_hold=1800.0,
            ),
        ),
    )


def test_full_config_with_two_guards(tmp_path):
    hook_file = tmp_path / "secrets" / "hook"
    hook_file.parent.mkdir()
    hook_file.write_text(HOOK + "\n")
    doc = {
        "aws": {"region": "ap-northeast-2", "endpoint_url": "http://127.0.0.1:5000"},
        "daemon": {"state_dir": "state", "poll_interval": 2.5, "log_format": "json"},
        "notify": {"discord": {"webhook_url_file": "secrets/hook"}},
        "sources": {"sqs": {"queue_url": "http://127.0.0.1:5000/123456789012/spotguard"}},
        "guard": [
            dict(VALID["guard"][0], target_port=8080, failback_grace="1h30m", standby_ready_timeout=90,
                 unhealthy_grace="0s", on_rebalance="prewarm", rebalance_hold="1.5h"),
            {"name": "batch-2", "target_group_arn": ARN2, "spot_instance_tags": {"Role": "batch", "Env": "prod"},
             "standby_instance_ids": [SB3]},
        ],
    }
    settings = load(write(tmp_path, doc), env={DISCORD_ENV: "https://ignored.example/"})
    assert settings.aws.endpoint_url == "http://127.0.0.1:5000"
    assert settings.daemon == DaemonSettings(state_dir=tmp_path / "state", poll_interval=2.5, log_format="json")
    assert settings.discord == DiscordSettings(webhook_url=HOOK)  # the file wins over the environment
    assert settings.sqs == SqsSettings(queue_url="http://127.0.0.1:5000/123456789012/spotguard")
    first, second = settings.guards
    assert (first.target_port, first.failback_grace, first.standby_ready_timeout) == (8080, 5400.0, 90.0)
    assert (first.unhealthy_grace, first.on_rebalance, first.rebalance_hold) == (0.0, "prewarm", 5400.0)
    assert second.spot_instance_tags == (("Role", "batch"), ("Env", "prod"))
    assert second.spot_request_ids == () and second.standby_instance_ids == (SB3,)
    assert first.rules() == Rules(standbys=(SB1, SB2), failback_grace=5400.0, standby_ready_timeout=90.0,
                                  unhealthy_grace=0.0, on_rebalance="prewarm", rebalance_hold=5400.0, capacity=1)
    # Capacity: one per spot request unless said; with tags, what the guard first sees (None here).
    assert second.capacity is None and second.rules().capacity is None


def test_capacity_is_at_most_one_per_spot_request(tmp_path):
    doc = {"aws": {"region": "ap-northeast-2"},
           "guard": [{"name": "web", "target_group_arn": ARN, "spot_request_ids": ["sir-8x4kq2bn", "sir-3p9zt7cd"],
                      "capacity": 2, "standby_instance_ids": [SB1, SB2]}]}
    assert load(write(tmp_path, doc)).guards[0].rules().capacity == 2
    for bad, says in ((3, "3 is more than the 2 spot_request_ids"), (0, "expected a whole number"),
                      (True, "expected a whole number"), ("2", "expected a whole number")):
        doc["guard"][0]["capacity"] = bad
        with pytest.raises(ConfigError) as caught:
            load(write(tmp_path, doc))
        assert [p for p in caught.value.problems if "guard[0].capacity" in p and says in p], caught.value.problems


def test_ids_in_the_shape_moto_issues_are_accepted(tmp_path):
    # moto issues `sir-` + 17 hex digits where AWS issues `sir-` + 8 characters; the lab runs on moto.
    doc = edited(VALID, "guard[0].spot_request_ids", ["sir-0123456789abcdef0"])
    assert load(write(tmp_path, doc), env={}).guards[0].spot_request_ids == ("sir-0123456789abcdef0",)


def test_settings_are_frozen_and_the_webhook_url_stays_out_of_repr(tmp_path):
    settings = load(write(tmp_path, edited(VALID, "notify.discord.webhook_url", HOOK)), env={})
    assert settings.discord.webhook_url == HOOK
    assert "SECRET" not in repr(settings) and "SECRET" not in repr(settings.discord)
    with pytest.raises(AttributeError):
        settings.aws.region = "us-east-1"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("doc", "env", "expected"),
    [
        (VALID, {DISCORD_ENV: HOOK}, HOOK),  # no [notify.discord]: the environment
        (edited(VALID, "notify.discord", {}), {DISCORD_ENV: f" {HOOK}\n"}, HOOK),  # empty section: the environment
        (VALID, {DISCORD_ENV: "  "}, None),  # blank means unset
        (VALID, {}, None),
        (edited(VALID, "notify.discord.webhook_url", HOOK), {DISCORD_ENV: "https://other.example/"}, HOOK),
    ],
)
def test_discord_webhook_sources(tmp_path, doc, env, expected):
    discord = load(write(tmp_path, doc), env=env).discord
    assert (discord and discord.webhook_url) == expected


# --------------------------------------------------------------------------- every error class

HOOK_FILE_CASES = [
    # (file content or None for no file, expected message after the key path)
    (None, 'cannot read "{dir}/hook": No such file or directory'),
    ("", '"{dir}/hook" is empty'),
    ("  \n", '"{dir}/hook" is empty'),
    ("not a url\n", '"{dir}/hook" does not hold an http(s) URL'),
    (b"\xff\xfe", '"{dir}/hook" is not UTF-8 text'),
]


@pytest.mark.parametrize(("content", "message"), HOOK_FILE_CASES)
def test_bad_webhook_url_file_names_the_key(tmp_path, content, message):
    if content is not None:
        (tmp_path / "hook").write_bytes(content if isinstance(content, bytes) else content.encode())
    lines = problems(tmp_path, edited(VALID, "notify.discord.webhook_url_file", "hook"))
    assert lines == ["notify.discord.webhook_url_file: " + message.format(dir=tmp_path)]


def test_webhook_url_file_must_be_a_regular_file(tmp_path):
    lines = problems(tmp_path, edited(VALID, "notify.discord.webhook_url_file", "/dev/zero"))
    assert lines == ['notify.discord.webhook_url_file: "/dev/zero" is not a regular file']


def test_bad_webhook_urls_are_reported_without_the_secret(tmp_path):
    secret = "ftp://discord.example/SECRET"
    (tmp_path / "hook").write_text(secret)
    cases = [
        (edited(VALID, "notify.discord.webhook_url", secret), {}, "notify.discord.webhook_url: is not an http(s) URL"),
        (edited(VALID, "notify.discord.webhook_url_file", "hook"), {}, "notify.discord.webhook_url_file: "),
        (VALID, {DISCORD_ENV: secret}, f"{DISCORD_ENV}: is not an http(s) URL"),
    ]
    for doc, env, start in cases:
        (line,) = problems(tmp_path, doc, env)
        assert line.startswith(start) and "SECRET" not in line


# (key path to set, value, the exact problem line; "DROP" as value removes the key)
CASES = [
    # structure and unknown keys
    ("daemon.poll_intervall", 5, "daemon.poll_intervall: unknown key (did you mean poll_interval?)"),
    ("colour", "red", "colour: unknown key"),
    ("aws.profile", "x", "aws.profile: unknown key"),
    ("notify.slack", {}, "notify.slack: unknown key"),
    ("notify.discord.webhook_uri", HOOK, "notify.discord.webhook_uri: unknown key (did you mean webhook_url?)"),
    ("sources.sqs.queue", "x", "sources.sqs.queue: unknown key (did you mean queue_url?)"),
    ("sources.agent", {}, "sources.agent: unknown key"),
    ("guard[0].standby_ids", [SB3], "guard[0].standby_ids: unknown key (did you mean standby_instance_ids?)"),
    ("guard[0].odd key", 1, 'guard[0]."odd key": unknown key'),
    ("aws", "ap-northeast-2", 'aws: expected a table, got a string ("ap-northeast-2")'),
    ("daemon", [], "daemon: expected a table, got an array"),
    ("notify.discord", "x", 'notify.discord: expected a table, got a string ("x")'),
    ("sources.sqs", 1, "sources.sqs: expected a table, got an integer (1)"),
    ("guard", {"name": "x"}, "guard: expected an array of tables ([[guard]]), got a table"),
    ("guard", [], "guard: at least one [[guard]] is required"),
    ("guard", "DROP", "guard: at least one [[guard]] is required"),
    ("guard[0]", 7, "guard[0]: expected a table, got an integer (7)"),
    # aws
    ("aws.region", "DROP", "aws.region: required"),
    ("aws", "DROP", "aws.region: required"),
    ("aws.region", "ap-northeast2", 'aws.region: "ap-northeast2" is not an AWS region (like "ap-northeast-2")'),
    ("aws.region", 2, "aws.region: expected a string, got an integer (2)"),
    ("aws.endpoint_url", "localhost:5000", 'aws.endpoint_url: "localhost:5000" is not an http(s) URL'),
    # daemon
    ("daemon.poll_interval", 0, "daemon.poll_interval: must be greater than 0"),
    ("daemon.poll_interval", "0s", "daemon.poll_interval: must be greater than 0"),
    ("daemon.poll_interval", -1, "daemon.poll_interval: -1 is not a duration: must not be negative"),
    ("daemon.poll_interval", True,
     'daemon.poll_interval: expected a number of seconds or a string like "90s", "10m", "1h30m", got a boolean (true)'),
    ("daemon.log_format", "text", 'daemon.log_format: "text" is not one of auto | json | console'),
    ("daemon.state_dir", 5, "daemon.state_dir: expected a string, got an integer (5)"),
    ("daemon.state_dir", "", 'daemon.state_dir: "" is not a usable path'),
    ("daemon.state_dir", "a\0b", 'daemon.state_dir: "a\\u0000b" is not a usable path'),
    # notify / sources
    ("notify.discord", {},
     f"notify.discord: set webhook_url or webhook_url_file (or the environment variable {DISCORD_ENV})"),
    ("notify.discord", {"webhook_url": HOOK, "webhook_url_file": "/x"},
     "notify.discord.webhook_url_file: cannot be combined with webhook_url (choose one)"),
    ("notify.discord.webhook_url", 5, "notify.discord.webhook_url: expected a string, got an integer"),
    ("sources.sqs", {}, "sources.sqs.queue_url: required"),
    ("sources.sqs.queue_url", "sqs://q", 'sources.sqs.queue_url: "sqs://q" is not an http(s) URL'),
    # Another region than aws.region: iam-policy built the wrong ARN from it (issue 20).
    ("sources.sqs.queue_url", "https://sqs.us-east-1.amazonaws.com/123456789012/spotguard",
     'sources.sqs.queue_url: the queue is in "us-east-1", not aws.region "ap-northeast-2"'),
    ("sources.sqs.queue_url", "https://sqs.ap-northeast-2.amazonaws.com/",
     'sources.sqs.queue_url: "https://sqs.ap-northeast-2.amazonaws.com/" does not end in a queue name'),
    # guard: name and target group
    ("guard[0].name", "DROP", "guard[0].name: required"),
    ("guard[0].name", "Inference",
     'guard[0].name: "Inference" is not a guard name (1-63 characters of a-z, 0-9 and -, '
     'starting with a letter or digit)'),
    ("guard[0].name", "",
     'guard[0].name: "" is not a guard name (1-63 characters of a-z, 0-9 and -, '
     'starting with a letter or digit)'),
    ("guard[0].name", "a" * 64,
     f'guard[0].name: "{"a" * 64}" is not a guard name (1-63 characters of a-z, 0-9 and -, '
     'starting with a letter or digit)'),
    # A name is part of file names in state_dir: the store would refuse "-web" as a path.
    ("guard[0].name", "-web",
     'guard[0].name: "-web" is not a guard name (1-63 characters of a-z, 0-9 and -, '
     'starting with a letter or digit)'),
    ("guard[0].target_group_arn", "DROP", "guard[0].target_group_arn: required"),
    ("guard[0].target_group_arn", ARN.replace("targetgroup", "loadbalancer/app"),
     f'guard[0].target_group_arn: "{ARN.replace("targetgroup", "loadbalancer/app")}" is not an ELBv2 target group ARN'),
    ("guard[0].target_group_arn", ARN[:-1],
     f'guard[0].target_group_arn: "{ARN[:-1]}" is not an ELBv2 target group ARN'),
    ("guard[0].target_group_arn", ARN.replace("123456789012", "12345"),
     f'guard[0].target_group_arn: "{ARN.replace("123456789012", "12345")}" is not an ELBv2 target group ARN'),
    ("guard[0].target_group_arn", ARN.replace("ap-northeast-2", "us-east-1"),
     'guard[0].target_group_arn: is in region "us-east-1", not aws.region "ap-northeast-2"'),
    ("guard[0].target_port", 0, "guard[0].target_port: 0 is not a port (1-65535)"),
    ("guard[0].target_port", 65536, "guard[0].target_port: 65536 is not a port (1-65535)"),
    ("guard[0].target_port", "8080", 'guard[0].target_port: expected an integer port, got a string ("8080")'),
    ("guard[0].target_port", 80.0, "guard[0].target_port: expected an integer port, got a float (80.0)"),
    # guard: spot capacity
    ("guard[0].spot_request_ids", "DROP", "guard[0].spot_request_ids: required (or spot_instance_tags)"),
    ("guard[0].spot_instance_tags", {"Role": "x"},
     "guard[0].spot_instance_tags: cannot be combined with spot_request_ids (choose one)"),
    ("guard[0].spot_request_ids", [], "guard[0].spot_request_ids: must not be empty"),
    ("guard[0].spot_request_ids", "sir-8x4kq2bn",
     'guard[0].spot_request_ids: expected an array, got a string ("sir-8x4kq2bn")'),
    ("guard[0].spot_request_ids[0]", "sir-8X4KQ2BN",
     'guard[0].spot_request_ids[0]: "sir-8X4KQ2BN" is not a spot request id'),
    ("guard[0].spot_request_ids[0]", "sir-123", 'guard[0].spot_request_ids[0]: "sir-123" is not a spot request id'),
    ("guard[0].spot_request_ids", ["sir-8x4kq2bn", "sir-8x4kq2bn"],
     'guard[0].spot_request_ids[1]: "sir-8x4kq2bn" is already listed at guard[0].spot_request_ids[0]'),
    # guard: standbys
    ("guard[0].standby_instance_ids", "DROP", "guard[0].standby_instance_ids: required"),
    ("guard[0].standby_instance_ids", [], "guard[0].standby_instance_ids: must not be empty"),
    ("guard[0].standby_instance_ids[1]", "i-zz", 'guard[0].standby_instance_ids[1]: "i-zz" is not an instance id'),
    ("guard[0].standby_instance_ids[1]", "i-0123456789abcdef",
     'guard[0].standby_instance_ids[1]: "i-0123456789abcdef" is not an instance id'),
    ("guard[0].standby_instance_ids[0]", 7, "guard[0].standby_instance_ids[0]: expected a string, got an integer (7)"),
    ("guard[0].standby_instance_ids", [SB1, SB2, SB1],
     f'guard[0].standby_instance_ids[2]: "{SB1}" is already listed at guard[0].standby_instance_ids[0]'),
    # guard: durations and policy
    ("guard[0].failback_grace", "10 min",
     'guard[0].failback_grace: "10 min" is not a duration '
     '(use a number of seconds or a string like "90s", "10m", "1h30m")'),
    ("guard[0].standby_ready_timeout", -5,
     "guard[0].standby_ready_timeout: -5 is not a duration: must not be negative"),
    ("guard[0].unhealthy_grace", math.nan,
     'guard[0].unhealthy_grace: nan is not a duration '
     '(use a number of seconds or a string like "90s", "10m", "1h30m")'),
    ("guard[0].rebalance_hold", math.inf, "guard[0].rebalance_hold: inf is too long a duration"),
    ("guard[0].rebalance_hold", [1],
     'guard[0].rebalance_hold: expected a number of seconds or a string like "90s", "10m", "1h30m", got an array'),
    ("guard[0].on_rebalance", "start", 'guard[0].on_rebalance: "start" is not one of ignore | prewarm'),
    ("guard[0].register_when", "healthy", 'guard[0].register_when: "healthy" is not one of ready | running'),
    # prices, metrics, daily summary, ha
    ("guard[0].on_demand_hourly", -1,
     "guard[0].on_demand_hourly: expected a price in USD per hour (a number, 0 or more), got an integer (-1)"),
    ("guard[0].spot_hourly", "0.3",
     'guard[0].spot_hourly: expected a price in USD per hour (a number, 0 or more), got a string ("0.3")'),
    ("guard[0].spot_hourly", math.nan,
     "guard[0].spot_hourly: expected a price in USD per hour (a number, 0 or more), got a float (nan)"),
    ("daemon.metrics_port", 70000, "daemon.metrics_port: 70000 is not a port (1-65535)"),
    ("daemon", {"metrics_port": 19108, "metrics_address": "127.0.0.1:19108"},
     'daemon.metrics_address: "127.0.0.1:19108" is not an IP address (like "127.0.0.1" or "::1")'),
    ("daemon", {"metrics_port": 19108, "metrics_address": "localhost"},
     'daemon.metrics_address: "localhost" is not an IP address (like "127.0.0.1" or "::1")'),
    ("daemon.metrics_address", 127, "daemon.metrics_address: expected a string, got an integer (127)"),
    ("daemon.metrics_address", "::1", "daemon.metrics_address: has no effect without metrics_port"),
    ("notify.discord", {"webhook_url": HOOK, "daily_summary": "9am"},
     'notify.discord.daily_summary: expected a time of day like "09:00" (24-hour HH:MM), got "9am"'),
    ("notify.discord", {"webhook_url": HOOK, "timezone": "Seoul"},
     'notify.discord.timezone: "Seoul" is not a known time zone (an IANA name like "UTC" or "Asia/Seoul")'),
    ("ha", {}, "ha.table: required"),
    ("ha", {"table": "spotguard", "lease": "2s"}, "ha.lease: must be at least 3s (renewed every third of it), got 2s"),
    ("ha", {"table": "x!"}, 'ha.table: "x!" is not a DynamoDB table name (3-255 of A-Z a-z 0-9 _ . -)'),
    ("ha", {"table": "spotguard", "holder": "two words"},
     'ha.holder: "two words" is not a holder name (1-128 printable characters, no spaces)'),
    ("ha", "on", 'ha: expected a table, got a string ("on")'),
    ("ha.tabel", "x", "ha.tabel: unknown key (did you mean table?)"),
]


@pytest.mark.parametrize(("path", "value", "line"), CASES,
                         ids=[c[2].split(":")[0] + "|" + str(i) for i, c in enumerate(CASES)])
def test_each_problem_is_reported_with_its_key_path(tmp_path, path, value, line):
    doc = edited(VALID, path, drop=True) if value == "DROP" else edited(VALID, path, value)
    lines = problems(tmp_path, doc)
    assert line in lines, lines


@pytest.mark.parametrize(
    ("tags", "line"),
    [
        ({}, "guard[0].spot_instance_tags: must not be empty"),
        ("Role=x", 'guard[0].spot_instance_tags: expected a table of tag = value, got a string ("Role=x")'),
        ({"Role": 1}, "guard[0].spot_instance_tags.Role: expected a string tag value, got an integer (1)"),
        ({"": "x"}, 'guard[0].spot_instance_tags."": a tag key is 1-128 characters'),
        ({"Role": "x" * 257}, "guard[0].spot_instance_tags.Role: a tag value is at most 256 characters"),
    ],
)
def test_bad_spot_instance_tags(tmp_path, tags, line):
    doc = edited(edited(VALID, "guard[0].spot_request_ids", drop=True), "guard[0].spot_instance_tags", tags)
    assert line in problems(tmp_path, doc)


def test_two_guards_may_not_share_anything(tmp_path):
    first = dict(VALID["guard"][0])
    tags = {"Role": "web"}
    doc = {
        "aws": VALID["aws"],
        "guard": [
            first,
            dict(first, standby_instance_ids=[SB3, SB2]),  # same name, target group, spot request; SB2 again
            {"name": "a", "target_group_arn": ARN2, "spot_instance_tags": tags, "standby_instance_ids": ["i-0000aaaa"]},
            {"name": "b", "target_group_arn": ARN2.replace("batch", "batch2"), "spot_instance_tags": tags,
             "standby_instance_ids": ["i-0000bbbb"]},
        ],
    }
    assert problems(tmp_path, doc) == [
        'guard[1].name: "inference" is already the name of guard[0].name',
        "guard[1].target_group_arn: is already the target group of guard[0].target_group_arn",
        'guard[1].spot_request_ids[0]: "sir-8x4kq2bn" is already listed at guard[0].spot_request_ids[0]',
        f'guard[1].standby_instance_ids[1]: "{SB2}" is already listed at guard[0].standby_instance_ids[1]',
        "guard[3].spot_instance_tags: the same tags already select guard[2].spot_instance_tags's spot instances",
    ]


@pytest.mark.parametrize(
    "a, b, overlap",
    [
        ({"Role": "svc", "Team": "x"}, {"Role": "svc"}, True),  # issue 21: A's spot was registered in B's group
        ({"Role": "svc"}, {"Team": "x"}, True),  # an instance may carry both tags
        ({"Role": "svc"}, {"Role": "batch"}, False),  # one key, different values: exclusive
        ({"Role": "svc", "Env": "prod"}, {"Role": "svc", "Env": "test"}, False),
    ],
)
def test_tag_selectors_must_exclude_each_other(tmp_path, a, b, overlap):
    def guard(name: str, arn: str, tags: dict, standby: str) -> dict:
        return {"name": name, "target_group_arn": arn, "spot_instance_tags": tags, "standby_instance_ids": [standby]}

    doc = {"aws": VALID["aws"], "guard": [guard("a", ARN, a, "i-0000aaaa"), guard("b", ARN2, b, "i-0000bbbb")]}
    expected = ["guard[1].spot_instance_tags: can select the same instances as guard[0].spot_instance_tags "
                "(no tag key with a different value in each): give both a key with different values"]
    if overlap:
        assert problems(tmp_path, doc) == expected
    else:
        assert len(load(write(tmp_path, doc), env={}).guards) == 2


def test_every_problem_of_a_file_is_reported(tmp_path):
    text = f"""
colour = "red"
[aws]
endpoint_url = "ftp://x"
[daemon]
poll_intervall = "5s"
log_format = "text"
[notify.discord]
webhook_url = "{HOOK}"
webhook_url_file = "/etc/spotguard/hook"
[sources.sqs]
[[guard]]
name = "Inference"
target_group_arn = "{ARN}"
spot_request_ids = ["sir-bad"]
spot_instance_tags = {{ Role = "x" }}
standby_instance_ids = ["{SB1}", "i-zz"]
failback_grace = "ten minutes"
[[guard]]
name = "ok"
target_group_arn = "{ARN2}"
standby_instance_ids = ["{SB1}"]
on_rebalance = "always"
"""
    assert problems(tmp_path, text) == [
        "colour: unknown key",
        "aws.region: required",
        'aws.endpoint_url: "ftp://x" is not an http(s) URL',
        "daemon.poll_intervall: unknown key (did you mean poll_interval?)",
        'daemon.log_format: "text" is not one of auto | json | console',
        "notify.discord.webhook_url_file: cannot be combined with webhook_url (choose one)",
        "sources.sqs.queue_url: required",
        'guard[0].name: "Inference" is not a guard name (1-63 characters of a-z, 0-9 and -, '
        'starting with a letter or digit)',
        "guard[0].spot_instance_tags: cannot be combined with spot_request_ids (choose one)",
        'guard[0].spot_request_ids[0]: "sir-bad" is not a spot request id',
        'guard[0].standby_instance_ids[1]: "i-zz" is not an instance id',
        'guard[0].failback_grace: "ten minutes" is not a duration '
        '(use a number of seconds or a string like "90s", "10m", "1h30m")',
        "guard[1].spot_request_ids: required (or spot_instance_tags)",
        'guard[1].on_rebalance: "always" is not one of ignore | prewarm',
        f'guard[1].standby_instance_ids[0]: "{SB1}" is already listed at guard[0].standby_instance_ids[0]',
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[aws\nregion = "x"', "not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 5)"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00\xff\xfe\x00", "not valid TOML: not UTF-8 text (bad byte at offset 10)"),
        (b"a = 1\x00\n", "not valid TOML: Expected newline or end of document after a statement (at line 1, column 6)"),
        ("a = " + "[" * 5000 + "]" * 5000, "not valid TOML: "),
    ],
)
def test_a_file_that_is_not_toml_is_one_line(tmp_path, content, message):
    path = tmp_path / "config.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as caught:
        load(path, env={})
    (line,) = caught.value.problems
    assert line.startswith(f"{path}: {message}")


def test_unreadable_paths_are_one_line(tmp_path):
    for path, reason in [(tmp_path / "nope.toml", "No such file or directory"), (tmp_path, "Is a directory")]:
        with pytest.raises(ConfigError) as caught:
            load(path, env={})
        assert caught.value.problems == [f"{path}: cannot read: {reason}"]


def test_a_utf8_bom_is_tolerated(tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xef\xbb\xbf" + to_toml(VALID).encode())
    assert load(path, env={}).aws.region == "ap-northeast-2"


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0.0), (90, 90.0), (2.5, 2.5), ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0), ("1h30m", 5400.0),
     ("1m30s", 90.0), ("1h0m5s", 3605.0), ("1.5h", 5400.0), ("0.5s", 0.5), ("0s", 0.0)],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", '"" is not a duration'),
        ("10", '"10" is not a duration'),
        ("10 m", '"10 m" is not a duration'),
        ("30m1h", '"30m1h" is not a duration'),
        ("1d", '"1d" is not a duration'),
        ("-5s", '"-5s" is not a duration'),
        (".5s", '".5s" is not a duration'),
        (-1, "-1 is not a duration: must not be negative"),
        (math.nan, "nan is not a duration (use"),
        (10**400, "a very large integer is too long a duration"),
        ("9" * 400 + "h", "is too long a duration"),
        (True, "expected a number of seconds"),
        (None, "expected a number of seconds or a string like \"90s\", \"10m\", \"1h30m\", got NoneType"),
        ([5], "got an array"),
    ],
)
def test_parse_duration_rejects_with_a_clear_message(value, message):
    with pytest.raises(ValueError) as caught:
        parse_duration(value)
    assert message in str(caught.value)


@given(st.integers(min_value=0, max_value=10**7))
def test_format_duration_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_duration_examples():
    assert [format_duration(s) for s in (0, 30, 90, 600, 5400, 3605, 2.5)] == [
        "0s", "30s", "1m30s", "10m", "1h30m", "1h5s", "2.5s"
    ]


# --------------------------------------------------------------------------- the example file and the CLI


def test_the_example_file_loads():
    settings = load(EXAMPLE, env={})
    assert settings.aws.region == "ap-northeast-2" and settings.sqs is not None and settings.discord is None
    (guard,) = settings.guards
    assert guard.standby_instance_ids and guard.spot_request_ids


def test_operator_keys_have_their_defaults_and_values(tmp_path):
    plain = load(write(tmp_path, VALID), env={})
    assert plain.ha is None and plain.daemon.metrics_port is None and plain.daemon.metrics_address == "127.0.0.1"
    assert plain.guards[0].on_demand_hourly is None and plain.guards[0].spot_hourly is None
    doc = edited(edited(VALID, "ha", {"table": "spotguard"}), "daemon.metrics_port", 19108)
    doc = edited(doc, "daemon.metrics_address", "0:0:0:0:0:0:0:1")
    doc = edited(edited(doc, "guard[0].on_demand_hourly", 1.006), "guard[0].spot_hourly", 0)
    doc = edited(doc, "notify.discord", {"webhook_url": HOOK, "daily_summary": "09:30", "timezone": "Asia/Seoul"})
    settings = load(write(tmp_path, doc), env={})
    assert (settings.ha.table, settings.ha.lease, settings.ha.holder) == ("spotguard", 15.0, None)
    assert (settings.daemon.metrics_port, settings.daemon.metrics_address) == (19108, "::1")  # kept in its short form
    assert (settings.guards[0].on_demand_hourly, settings.guards[0].spot_hourly) == (1.006, 0.0)
    assert (settings.discord.daily_summary, settings.discord.timezone) == ("09:30", "Asia/Seoul")


def test_the_example_file_has_every_key():
    text = EXAMPLE.read_text()
    for key in ["region", "endpoint_url", "state_dir", "poll_interval", "log_format", "blind_after", "[notify.discord]",
                "webhook_url_file", "webhook_url", "[sources.sqs]", "queue_url", "[[guard]]", "name",
                "target_group_arn", "target_port", "spot_request_ids", "spot_instance_tags", "capacity",
                "standby_instance_ids", "failback_grace", "standby_ready_timeout", "unhealthy_grace", "on_rebalance",
                "rebalance_hold", "register_when", "metrics_port", "metrics_address", "daily_summary", "timezone",
                "on_demand_hourly", "spot_hourly",
                "[ha]", "table", "lease", "holder"]:
        assert key in text, key


def spotguard(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != DISCORD_ENV} | (env or {})
    return subprocess.run([sys.executable, "-m", "spotguard", *args], capture_output=True, text=True,
                          cwd=ROOT, env=environ, timeout=60)


def test_cli_check_config_accepts_the_example():
    done = spotguard("check-config", "--config", "config.example.toml")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "config OK: 1 guard(s)",
        "guard inference: targetgroup/inference/6d0ecf831eec9f09 (port from target group); spot requests sir-8x4kq2bn "
        "(capacity 1); "
        "standbys i-0a1b2c3d4e5f60718, i-0f9e8d7c6b5a49382; failback_grace 10m, standby_ready_timeout 5m, "
        "unhealthy_grace 30s, on_rebalance ignore, register_when ready",
    ]
    assert done.stderr == ""


@pytest.mark.parametrize("kind", ["missing", "directory", "not-toml", "binary", "bad-config"])
def test_cli_check_config_exits_2_without_a_traceback(tmp_path, kind):
    path = tmp_path / "config.toml"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-toml":
        path.write_text("[aws\n")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "bad-config":
        path.write_text(to_toml(edited(VALID, "guard[0].standby_instance_ids[1]", "i-zz")))
    done = spotguard("check-config", "--config", str(path))
    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(line.startswith(f"{path}: ") or line.startswith("guard[0]") for line in lines), lines
    if kind == "bad-config":
        assert lines == ['guard[0].standby_instance_ids[1]: "i-zz" is not an instance id']


def test_cli_a_bad_metrics_address_is_one_line_and_exit_2(tmp_path):
    path = write(tmp_path, edited(VALID, "daemon", {"metrics_port": 19108, "metrics_address": "127.0.0.1:19108"}))
    done = spotguard("check-config", "--config", str(path))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        'daemon.metrics_address: "127.0.0.1:19108" is not an IP address (like "127.0.0.1" or "::1")']


def test_cli_run_with_a_bad_config_starts_nothing(tmp_path):
    path = write(tmp_path, edited(VALID, "aws", drop=True))
    probe = ("import sys; from spotguard.cli import main; code = main(['run', '--config', sys.argv[1]]); "
             "print('daemon imported' if 'spotguard.daemon' in sys.modules else 'daemon not imported'); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (2, "daemon not imported\n", "aws.region: required\n")


def test_cli_run_hands_the_settings_to_the_daemon(tmp_path, monkeypatch):
    # daemon.run is the seam: a stand-in function records what it was given and answers an exit code.
    received = []
    monkeypatch.setattr("spotguard.daemon.run", lambda s: received.append(s) or 7)
    path = write(tmp_path, VALID)
    monkeypatch.delenv(DISCORD_ENV, raising=False)
    assert cli.main(["run", "--config", str(path)]) == 7
    assert received == [load(path, env={})]


def test_cli_version_and_usage_errors(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as caught:
        cli.main(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out == "spotguard 0.1.0\n"
    for argv in ([], ["frobnicate"], ["check-config", "--config", "x", "--extra"]):
        with pytest.raises(SystemExit) as caught:
            cli.main(argv)
        assert caught.value.code == 2
    capsys.readouterr()
    monkeypatch.setenv("SPOTGUARD_CONFIG", str(tmp_path / "none.toml"))  # no --config: where it looked
    assert cli.main(["check-config"]) == 2
    assert capsys.readouterr().err.startswith(f"{tmp_path / 'none.toml'}: no such file ($SPOTGUARD_CONFIG)")


def test_cli_summarises_tag_guards_and_prewarm(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DISCORD_ENV, raising=False)
    guard = dict(VALID["guard"][0], target_port=8080, on_rebalance="prewarm", spot_instance_tags={"Role": "gpu"})
    del guard["spot_request_ids"]
    path = write(tmp_path, {"aws": VALID["aws"], "guard": [guard]})
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "guard inference: targetgroup/inference/6d0ecf831eec9f09 (port 8080); spot tags Role='gpu' "
        "(capacity: the tagged spots first seen); "
        f"standbys {SB1}, {SB2}; failback_grace 10m, standby_ready_timeout 5m, unhealthy_grace 30s, "
        "on_rebalance prewarm (hold 30m), register_when ready"
    )


# --------------------------------------------------------------------------- fuzz: ConfigError or Settings only

toml_keys = st.text(max_size=12)
toml_scalars = (
    st.text(max_size=30)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.booleans()
    | st.datetimes(timezones=st.none() | st.just(dt.timezone.utc))
    | st.dates()
    | st.times()
    | st.sampled_from(["5s", "1h30m", "-1s", "prewarm", "json", SB1, "i-zz", "sir-8x4kq2bn", ARN,
                       "https://example.com/x", "hook", "/dev/zero", ""])
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(toml_keys, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw, value: object, rate: int | None = None) -> object:
    """A variant of a valid value: each part kept (itself mutated), dropped, or replaced by anything.

    `rate` (percent, drawn once per example) ranges from no change to heavy damage, so some
    examples stay valid and reach Settings while others break everywhere at once.
    """
    if rate is None:
        rate = draw(st.sampled_from([0, 3, 10, 30]))
    hit = lambda: draw(st.integers(0, 99)) < rate  # noqa: E731
    if hit():
        return draw(toml_values)
    if isinstance(value, dict):
        out = {k: draw(mutated(v, rate)) for k, v in value.items() if not hit()}
        if hit():
            out.update(draw(st.dictionaries(toml_keys, toml_values, min_size=1, max_size=1)))
        return out
    if isinstance(value, list):
        extra = [draw(toml_values)] if hit() else []
        return [draw(mutated(v, rate)) for v in value if not hit()] + extra
    return value


FULL = {
    "aws": {"region": "ap-northeast-2", "endpoint_url": "http://127.0.0.1:5000"},
    "daemon": {"state_dir": "state", "poll_interval": "5s", "log_format": "auto"},
    "notify": {"discord": {"webhook_url_file": "hook"}},
    "sources": {"sqs": {"queue_url": "https://sqs.ap-northeast-2.amazonaws.com/123456789012/spotguard"}},
    "guard": [
        dict(VALID["guard"][0], target_port=8080, failback_grace="10m", standby_ready_timeout=300,
             unhealthy_grace="30s", on_rebalance="ignore", rebalance_hold="30m"),
        {"name": "b", "target_group_arn": ARN2, "spot_instance_tags": {"Role": "x"}, "standby_instance_ids": [SB3]},
    ],
}


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    # Module-scoped: hypothesis runs many examples per test call, all in this one directory.
    path = tmp_path_factory.mktemp("fuzz")
    (path / "hook").write_text(HOOK)
    return path


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(FULL), st.dictionaries(toml_keys, toml_values, max_size=5)),
       st.none() | st.just(HOOK) | st.text(max_size=10))
def test_load_returns_settings_or_config_error_and_nothing_else(fuzz_dir, doc, env_hook):
    path = fuzz_dir / "config.toml"
    path.write_text(to_toml(doc if isinstance(doc, dict) else {"guard": doc}), encoding="utf-8")
    env = {} if env_hook is None else {DISCORD_ENV: env_hook}
    try:
        settings = load(path, env=env)
    except ConfigError as exc:
        assert exc.problems and all(line and line.isprintable() for line in exc.problems), exc.problems
        assert not any("internal error" in line or "not valid TOML" in line for line in exc.problems), exc.problems
        assert not any("SECRET" in line for line in exc.problems)
    else:
        assert isinstance(settings, Settings) and settings.guards
        assert all(isinstance(g.rules(), Rules) for g in settings.guards)


def test_the_example_states_the_defaults_of_defaults_py():
    """config.example.toml writes out each default it shows: the values must be defaults.py's."""
    from spotguard import defaults

    settings = load(EXAMPLE, env={})
    d, (g,) = settings.daemon, settings.guards
    assert (d.state_dir, d.poll_interval, d.log_format, d.blind_after) == (
        defaults.STATE_DIR, defaults.POLL_INTERVAL, defaults.LOG_FORMAT, defaults.BLIND_AFTER)
    assert (g.failback_grace, g.standby_ready_timeout, g.unhealthy_grace, g.on_rebalance, g.rebalance_hold) == (
        defaults.FAILBACK_GRACE, defaults.STANDBY_READY_TIMEOUT, defaults.UNHEALTHY_GRACE, defaults.ON_REBALANCE,
        defaults.REBALANCE_HOLD)
    text = EXAMPLE.read_text()
    assert f'# lease = "{format_duration(defaults.LEASE)}"' in text
    assert f'# timezone = "{defaults.TIMEZONE}"' in text
    assert f'# metrics_address = "{defaults.METRICS_ADDRESS}"' in text


def test_every_verb_reads_spotguard_config_or_the_default_file():
    assert spotguard("check-config", env={"SPOTGUARD_CONFIG": "config.example.toml"}).returncode == 0
    if Path("/etc/spotguard/config.toml").exists():
        pytest.skip("this machine has a real /etc/spotguard/config.toml")
    done = spotguard("check-config", env={"SPOTGUARD_CONFIG": ""})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("/etc/spotguard/config.toml: no such file (the default config); pass --config PATH or "
                           "set SPOTGUARD_CONFIG\n")
    done = spotguard("status", env={"SPOTGUARD_CONFIG": "/nowhere/spotguard.toml"})
    assert done.returncode == 2
    assert done.stderr.startswith("/nowhere/spotguard.toml: no such file ($SPOTGUARD_CONFIG)")


def test_late_warning_is_a_duration_for_the_rules(tmp_path):
    doc = edited(VALID, "guard[0].late_warning", "45s")
    assert load(write(tmp_path, doc)).guards[0].rules().late_warning == 45.0
    assert load(write(tmp_path, VALID)).guards[0].rules().late_warning == 30.0
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, edited(VALID, "guard[0].late_warning", "soon")))
    assert any(p.startswith("guard[0].late_warning: ") for p in caught.value.problems)
