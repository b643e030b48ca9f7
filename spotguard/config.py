"""Reads spotguard's TOML config file into frozen settings, or says everything wrong with it.

`load(path)` returns `Settings`, or raises `ConfigError` listing every problem,
one line each, key path first (`guard[0].standby_instance_ids[1]: "i-zz" is not
an instance id`). It never raises anything else, whatever the file holds.
Durations are seconds or "1h30m"-style strings; relative paths are relative to
the config file; the Discord webhook URL (a credential) comes from the file,
a file it names, or SPOTGUARD_DISCORD_WEBHOOK_URL and never appears in a repr
or an error. Defaults come from defaults.py, id shapes from ids.py.

This module must not talk to AWS, start anything, or log.
"""

from __future__ import annotations

import datetime as dt
import difflib
import ipaddress
import json
import math
import os
import re
import stat
import tomllib
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from spotguard import defaults, ids
from spotguard.machine import Rules

DISCORD_ENV = "SPOTGUARD_DISCORD_WEBHOOK_URL"
LOG_FORMATS = ("auto", "json", "console")
REBALANCE_POLICIES = ("ignore", "prewarm")
REGISTER_WHEN = ("ready", "running")

# A config or webhook file beyond these sizes is a wrong path, not a config:
# the limits keep a mistake like `/dev/zero` from eating the nano's memory.
MAX_CONFIG_BYTES = 1 << 20
MAX_SECRET_BYTES = 64 << 10


class ConfigError(Exception):
    """The config cannot be used. `problems` holds one line per problem, key path first."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AwsSettings:
    region: str
    endpoint_url: str | None = None  # only for local/moto testing


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path = defaults.STATE_DIR
    poll_interval: float = defaults.POLL_INTERVAL
    log_format: str = defaults.LOG_FORMAT  # auto | json | console
    blind_after: float = defaults.BLIND_AFTER  # no good observation of a guard this long: alert
    metrics_port: int | None = None  # Prometheus endpoint on metrics_address; None: no endpoint
    metrics_address: str = defaults.METRICS_ADDRESS  # an IPv4 or IPv6 address of this host


@dataclass(frozen=True)
class DiscordSettings:
    webhook_url: str = field(repr=False)  # a credential: never in repr or logs
    daily_summary: str | None = None  # "HH:MM": one summary message per guard each day
    timezone: str = defaults.TIMEZONE  # the zone daily_summary is read in (IANA name)


@dataclass(frozen=True)
class HaSettings:
    """Two controllers, one leader, through a DynamoDB lease ([ha]; absent: run alone)."""

    table: str
    lease: float = defaults.LEASE
    holder: str | None = None  # None: host name and process id, decided at start


@dataclass(frozen=True)
class SqsSettings:
    queue_url: str

    @property
    def queue_name(self) -> str | None:
        """The URL's last path segment: the queue's name (None when the path is empty)."""
        segments = _path_segments(self.queue_url)
        return segments[-1] if segments else None

    @property
    def account(self) -> str | None:
        """The 12-digit account segment before the name, when the URL has one."""
        segments = _path_segments(self.queue_url)
        return segments[-2] if len(segments) >= 2 and re.fullmatch(r"\d{12}", segments[-2]) else None


def _path_segments(url: str) -> list[str]:
    return [s for s in urlsplit(url).path.split("/") if s]


@dataclass(frozen=True)
class GuardSettings:
    name: str
    target_group_arn: str
    target_port: int | None = None  # None: the target group's port
    spot_request_ids: tuple[str, ...] = ()
    spot_instance_tags: tuple[tuple[str, str], ...] = ()  # (key, value) in file order
    # Spot positions kept serving; None: the number of spot_request_ids, or with spot_instance_tags
    # the live tagged spots the guard first sees (remembered in its state).
    capacity: int | None = None
    standby_instance_ids: tuple[str, ...] = ()
    failback_grace: float = defaults.FAILBACK_GRACE
    standby_ready_timeout: float = defaults.STANDBY_READY_TIMEOUT
    unhealthy_grace: float = defaults.UNHEALTHY_GRACE
    on_rebalance: str = defaults.ON_REBALANCE  # ignore | prewarm
    rebalance_hold: float = defaults.REBALANCE_HOLD
    register_when: str = defaults.REGISTER_WHEN  # ready | running
    late_warning: float = defaults.LATE_WARNING
    deregister_ahead: float = defaults.DEREGISTER_AHEAD
    on_demand_hourly: float | None = None  # USD per standby hour, for status and summaries
    spot_hourly: float | None = None  # USD per spot hour

    def rules(self, poll_interval: float = defaults.POLL_INTERVAL) -> Rules:
        """The machine's rules for this guard, observed every `poll_interval` (the daemon's) when steady."""
        return Rules(
            standbys=self.standby_instance_ids,
            failback_grace=self.failback_grace,
            standby_ready_timeout=self.standby_ready_timeout,
            unhealthy_grace=self.unhealthy_grace,
            on_rebalance=self.on_rebalance,
            rebalance_hold=self.rebalance_hold,
            poll_interval=poll_interval,
            register_when=self.register_when,
            capacity=self.capacity if self.capacity is not None else (len(self.spot_request_ids) or None),
            late_warning=self.late_warning,
            deregister_ahead=self.deregister_ahead,
        )


@dataclass(frozen=True)
class Settings:
    aws: AwsSettings
    daemon: DaemonSettings = DaemonSettings()
    discord: DiscordSettings | None = None
    sqs: SqsSettings | None = None
    guards: tuple[GuardSettings, ...] = ()
    ha: HaSettings | None = None


# --------------------------------------------------------------------------- durations

_DURATION = re.compile(
    r"(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?"
)
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION_HINT = 'a number of seconds or a string like "90s", "10m", "1h30m"'


def parse_duration(value: object) -> float:
    """Seconds from a non-negative number or a string like "90s", "10m", "1h30m".

    Raises ValueError (and nothing else) with a message fit to follow a key path.
    """
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if not value or match is None:
            raise ValueError(f"{_show(value)} is not a duration (use {_DURATION_HINT})")
        seconds = sum(float(match[u]) * _UNIT_SECONDS[u] for u in "hms" if match[u] is not None)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    else:
        raise ValueError(f"expected {_DURATION_HINT}, got {_describe(value)}")
    if math.isnan(seconds):
        raise ValueError(f"{_show(value)} is not a duration (use {_DURATION_HINT})")
    if seconds < 0:
        raise ValueError(f"{_show(value)} is not a duration: must not be negative")
    if math.isinf(seconds):
        raise ValueError(f"{_show(value)} is too long a duration")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration for display: 600 → "10m", 5400 → "1h30m", 2.5 → "2.5s"."""
    if not math.isfinite(seconds) or seconds != int(seconds):
        return f"{seconds:g}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = "".join(f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)
    return text or "0s"


# --------------------------------------------------------------------------- showing values
# Every message stays on one line whatever the file holds: strings and odd keys
# are shown JSON-quoted with non-ASCII escaped (U+2028 would split a line too).


def _show(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 200 else value[:197] + "...")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        text = str(value) if abs(value) < 10**30 else "a very large integer"
        return text
    if isinstance(value, float):
        return repr(value)
    return _kind(value)


def _kind(value: object) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, dt.datetime):
        return "a datetime"
    if isinstance(value, dt.date):
        return "a date"
    if isinstance(value, dt.time):
        return "a time"
    return type(value).__name__


def _describe(value: object) -> str:
    if isinstance(value, (str, bool, int, float)):
        return f"{_kind(value)} ({_show(value)})"
    return _kind(value)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(path: str, key: str) -> str:
    shown = key if _BARE_KEY.fullmatch(key) else _show(key)
    return f"{path}.{shown}" if path else shown


def _display_path(path: object) -> str:
    text = str(path)
    return text if text.isprintable() else json.dumps(text)


# --------------------------------------------------------------------------- the reader

_REQUIRED = object()
Convert = Callable[["_Reader", Any, str], Any]


class _Reader:
    """Collects problems while converting the parsed TOML into settings."""

    def __init__(self, base: Path, env: Mapping[str, str]) -> None:
        self.base = base  # relative paths in the file are relative to this
        self.env = env
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def get(self, table: dict, key: str, path: str, convert: Convert, default: Any = _REQUIRED) -> Any:
        """table[key] converted, `default` when absent; None (and a problem) when wrong."""
        where = _join(path, key)
        if key not in table:
            if default is _REQUIRED:
                self.problem(where, "required")
                return None
            return default
        return convert(self, table[key], where)

    def section(self, table: dict, key: str, path: str, allowed: tuple[str, ...]) -> dict | None:
        """The sub-table table[key] ({} when absent) with unknown keys reported; None when not a table."""
        where = _join(path, key)
        value = table.get(key, {})
        if not isinstance(value, dict):
            self.problem(where, f"expected a table, got {_describe(value)}")
            return None
        self.known_keys(value, where, allowed)
        return value

    def known_keys(self, table: dict, path: str, allowed: tuple[str, ...]) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.problem(_join(path, key), f"unknown key{hint}")


# --------------------------------------------------------------------------- converters
# Each takes (reader, value, key path) and returns the converted value, or
# records a problem and returns None.


def _string(r: _Reader, value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return value
    r.problem(path, f"expected a string, got {_describe(value)}")
    return None


def _matching(regex: re.Pattern[str], what: str) -> Convert:
    def convert(r: _Reader, value: Any, path: str) -> str | None:
        text = _string(r, value, path)
        if text is not None and not regex.fullmatch(text):
            r.problem(path, f"{_show(text)} is not {what}")
            return None
        return text

    return convert


def _choice(options: tuple[str, ...]) -> Convert:
    def convert(r: _Reader, value: Any, path: str) -> str | None:
        text = _string(r, value, path)
        if text is not None and text not in options:
            r.problem(path, f"{_show(text)} is not one of {' | '.join(options)}")
            return None
        return text

    return convert


def _is_http_url(text: str) -> bool:
    if not text.isprintable() or any(c.isspace() for c in text):
        return False
    try:
        parts = urlsplit(text)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def _url(r: _Reader, value: Any, path: str) -> str | None:
    text = _string(r, value, path)
    if text is not None and not _is_http_url(text):
        r.problem(path, f"{_show(text)} is not an http(s) URL")
        return None
    return text


def _secret_url(r: _Reader, value: Any, path: str) -> str | None:
    if not isinstance(value, str):
        r.problem(path, f"expected a string, got {_kind(value)}")  # not even the value: it may be the secret
        return None
    if not _is_http_url(value):
        r.problem(path, "is not an http(s) URL (value not shown: it is a credential)")
        return None
    return value


def _duration(r: _Reader, value: Any, path: str) -> float | None:
    try:
        return parse_duration(value)
    except ValueError as exc:
        r.problem(path, str(exc))
        return None


def _positive_duration(r: _Reader, value: Any, path: str) -> float | None:
    seconds = _duration(r, value, path)
    if seconds == 0:
        r.problem(path, "must be greater than 0")
        return None
    return seconds


def _port(r: _Reader, value: Any, path: str) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool):
        r.problem(path, f"expected an integer port, got {_describe(value)}")
        return None
    if not 1 <= value <= 65535:
        r.problem(path, f"{_show(value)} is not a port (1-65535)")
        return None
    return value


def _ip_address(r: _Reader, value: Any, path: str) -> str | None:
    text = _string(r, value, path)
    if text is None:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        r.problem(path, f'{_show(text)} is not an IP address (like "127.0.0.1" or "::1")')
        return None


def _count(r: _Reader, value: Any, path: str) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1000:
        r.problem(path, f"expected a whole number of spot instances (1 or more), got {_describe(value)}")
        return None
    return value


def _capacity(r: _Reader, table: dict, path: str, get: Callable[..., Any]) -> int | None:
    """`capacity`: at most one per spot request (more could never be served by spot alone)."""
    capacity = get("capacity", _count, None)
    requests = table.get("spot_request_ids")
    if capacity is not None and isinstance(requests, list) and capacity > len(requests):
        r.problem(f"{path}.capacity", f"{capacity} is more than the {len(requests)} spot_request_ids: spot alone "
                                      "could never serve it, and a standby would run for good")
    return capacity


def _price(r: _Reader, value: Any, path: str) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1e6:
        r.problem(path, f"expected a price in USD per hour (a number, 0 or more), got {_describe(value)}")
        return None
    return float(value)


def _clock_time(r: _Reader, value: Any, path: str) -> str | None:
    text = _string(r, value, path)
    if text is None:
        return None
    match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", text)
    if match is None:
        r.problem(path, f'expected a time of day like "09:00" (24-hour HH:MM), got {_show(text)}')
        return None
    return text


def _timezone(r: _Reader, value: Any, path: str) -> str | None:
    text = _string(r, value, path)
    if text is None:
        return None
    try:
        zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        r.problem(path, f'{_show(text)} is not a known time zone (an IANA name like "UTC" or "Asia/Seoul")')
        return None
    return text


def _path(r: _Reader, value: Any, path: str) -> Path | None:
    text = _string(r, value, path)
    if text is None:
        return None
    if not text or "\0" in text:
        r.problem(path, f"{_show(text)} is not a usable path")
        return None
    return r.base / text  # an absolute `text` replaces the base


def _array(element: Convert) -> Convert:
    """A non-empty array; bad elements are reported at their own index and come back as None."""

    def convert(r: _Reader, value: Any, path: str) -> tuple | None:
        if not isinstance(value, list):
            r.problem(path, f"expected an array, got {_describe(value)}")
            return None
        if not value:
            r.problem(path, "must not be empty")
            return None
        return tuple(element(r, item, f"{path}[{i}]") for i, item in enumerate(value))

    return convert


def _tags(r: _Reader, value: Any, path: str) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, dict):
        r.problem(path, f"expected a table of tag = value, got {_describe(value)}")
        return None
    if not value:
        r.problem(path, "must not be empty")
        return None
    ok = True
    for key, tag_value in value.items():
        where = _join(path, key)
        if not 1 <= len(key) <= 128:
            r.problem(where, "a tag key is 1-128 characters")
            ok = False
        if not isinstance(tag_value, str):
            r.problem(where, f"expected a string tag value, got {_describe(tag_value)}")
            ok = False
        elif len(tag_value) > 256:
            r.problem(where, "a tag value is at most 256 characters")
            ok = False
    return tuple(value.items()) if ok else None


def _url_from_file(r: _Reader, value: Any, path: str) -> str | None:
    """The URL held by the file named by `value`, or None and a problem naming the key (never the URL)."""
    file = _path(r, value, path)
    if file is None:
        return None
    shown = _show(str(file))
    try:
        # A FIFO or device would block or never end: only a regular file holds a URL.
        if not stat.S_ISREG(os.stat(file).st_mode):
            r.problem(path, f"{shown} is not a regular file")
            return None
        with open(file, "rb") as handle:
            data = handle.read(MAX_SECRET_BYTES + 1)
    except (OSError, ValueError) as exc:
        r.problem(path, f"cannot read {shown}: {_os_reason(exc)}")
        return None
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = None
    if not text:
        r.problem(path, f"{shown} is empty" if text == "" else f"{shown} is not UTF-8 text")
    elif len(data) > MAX_SECRET_BYTES or not _is_http_url(text):
        r.problem(path, f"{shown} does not hold an http(s) URL")
    else:
        return text
    return None


def _os_reason(exc: Exception) -> str:
    reason = getattr(exc, "strerror", None) or str(exc)
    return " ".join(reason.split())


# --------------------------------------------------------------------------- sections

_TOP_KEYS = ("aws", "daemon", "notify", "sources", "guard", "ha")
_GUARD_KEYS = (
    "name",
    "target_group_arn",
    "target_port",
    "spot_request_ids",
    "spot_instance_tags",
    "capacity",
    "standby_instance_ids",
    "failback_grace",
    "standby_ready_timeout",
    "unhealthy_grace",
    "on_rebalance",
    "rebalance_hold",
    "register_when",
    "late_warning",
    "deregister_ahead",
    "on_demand_hourly",
    "spot_hourly",
)


def _settings(r: _Reader, top: dict) -> Settings:
    r.known_keys(top, "", _TOP_KEYS)
    aws = _aws(r, top)
    return Settings(
        aws=aws,
        daemon=_daemon(r, top),
        discord=_discord(r, top),
        sqs=_sqs(r, top, aws.region),
        guards=_guards(r, top, aws.region),
        ha=_ha(r, top),
    )


def _aws(r: _Reader, top: dict) -> AwsSettings:
    table = r.section(top, "aws", "", ("region", "endpoint_url"))
    if table is None:
        return AwsSettings(region=None)  # type: ignore[arg-type]  # a problem is recorded
    return AwsSettings(
        region=r.get(table, "region", "aws", _matching(ids.REGION, 'an AWS region (like "ap-northeast-2")')),
        endpoint_url=r.get(table, "endpoint_url", "aws", _url, None),
    )


def _daemon(r: _Reader, top: dict) -> DaemonSettings:
    table = r.section(top, "daemon", "", ("state_dir", "poll_interval", "log_format", "metrics_port",
                                          "metrics_address", "blind_after"))
    if table is None:
        return DaemonSettings()
    address = r.get(table, "metrics_address", "daemon", _ip_address, defaults.METRICS_ADDRESS)
    if "metrics_address" in table and "metrics_port" not in table and address is not None:
        # Without a port nothing listens: an address alone is a forgotten port, not a choice.
        r.problem("daemon.metrics_address", "has no effect without metrics_port")
    return DaemonSettings(
        state_dir=r.get(table, "state_dir", "daemon", _path, defaults.STATE_DIR),
        poll_interval=r.get(table, "poll_interval", "daemon", _positive_duration, defaults.POLL_INTERVAL),
        log_format=r.get(table, "log_format", "daemon", _choice(LOG_FORMATS), defaults.LOG_FORMAT),
        blind_after=r.get(table, "blind_after", "daemon", _positive_duration, defaults.BLIND_AFTER),
        metrics_port=r.get(table, "metrics_port", "daemon", _port, None),
        metrics_address=address,
    )


def _discord(r: _Reader, top: dict) -> DiscordSettings | None:
    notify = r.section(top, "notify", "", ("discord",))
    if notify is None:
        return None
    present = "discord" in notify
    table = r.section(notify, "discord", "notify", ("webhook_url", "webhook_url_file", "daily_summary", "timezone"))
    if table is None:
        return None
    has_url, has_file = "webhook_url" in table, "webhook_url_file" in table
    if has_url and has_file:
        r.problem("notify.discord.webhook_url_file", "cannot be combined with webhook_url (choose one)")
        return None
    if has_url:
        url = r.get(table, "webhook_url", "notify.discord", _secret_url)
    elif has_file:
        url = _url_from_file(r, table["webhook_url_file"], "notify.discord.webhook_url_file")
    else:
        url = _url_from_env(r, required=present)
    summary = r.get(table, "daily_summary", "notify.discord", _clock_time, None)
    zone = r.get(table, "timezone", "notify.discord", _timezone, defaults.TIMEZONE)
    return DiscordSettings(webhook_url=url, daily_summary=summary, timezone=zone) if url is not None else None


def _url_from_env(r: _Reader, *, required: bool) -> str | None:
    text = r.env.get(DISCORD_ENV, "").strip()
    if not text:
        if required:
            r.problem(
                "notify.discord",
                f"set webhook_url or webhook_url_file (or the environment variable {DISCORD_ENV})",
            )
        return None
    return _secret_url(r, text, DISCORD_ENV)


def _sqs(r: _Reader, top: dict, region: str | None) -> SqsSettings | None:
    sources = r.section(top, "sources", "", ("sqs",))
    if sources is None or "sqs" not in sources:
        return None
    table = r.section(sources, "sqs", "sources", ("queue_url",))
    if table is None:
        return None
    settings = SqsSettings(queue_url=r.get(table, "queue_url", "sources.sqs", _url))
    if settings.queue_url is not None:
        _check_queue(r, settings, region)
    return settings


def _check_queue(r: _Reader, sqs: SqsSettings, region: str | None) -> None:
    """The URL names a queue, in aws.region: spotguard talks to one region (and builds its ARN there)."""
    if sqs.queue_name is None or not ids.QUEUE_NAME.fullmatch(sqs.queue_name):
        r.problem("sources.sqs.queue_url", f"{_show(sqs.queue_url)} does not end in a queue name")
        return
    named = ids.queue_region(urlsplit(sqs.queue_url).hostname or "")
    if named is not None and region is not None and named != region:
        r.problem("sources.sqs.queue_url", f"the queue is in {_show(named)}, not aws.region {_show(region)}")


def _ha(r: _Reader, top: dict) -> HaSettings | None:
    if "ha" not in top:
        return None
    table = r.section(top, "ha", "", ("table", "lease", "holder"))
    if table is None:
        return None
    lease = r.get(table, "lease", "ha", _positive_duration, defaults.LEASE)
    if lease is not None and lease < 3:
        r.problem("ha.lease", f"must be at least 3s (renewed every third of it), got {format_duration(lease)}")
    table_name = _matching(ids.DYNAMODB_TABLE, "a DynamoDB table name (3-255 of A-Z a-z 0-9 _ . -)")
    holder_name = _matching(re.compile(r"[\x21-\x7e]{1,128}"), "a holder name (1-128 printable characters, no spaces)")
    return HaSettings(
        table=r.get(table, "table", "ha", table_name),
        lease=lease,
        holder=r.get(table, "holder", "ha", holder_name, None),
    )


def _guards(r: _Reader, top: dict, region: str | None) -> tuple[GuardSettings, ...]:
    raw = top.get("guard")
    if raw is None or raw == []:
        r.problem("guard", "at least one [[guard]] is required")
        return ()
    if not isinstance(raw, list):
        r.problem("guard", f"expected an array of tables ([[guard]]), got {_describe(raw)}")
        return ()
    guards = []
    for i, table in enumerate(raw):
        if isinstance(table, dict):
            guards.append((f"guard[{i}]", _guard(r, table, f"guard[{i}]", region)))
        else:
            r.problem(f"guard[{i}]", f"expected a table, got {_describe(table)}")
    _check_unclaimed(r, guards)
    return tuple(guard for _, guard in guards)


def _guard(r: _Reader, table: dict, path: str, region: str | None) -> GuardSettings:
    r.known_keys(table, path, _GUARD_KEYS)
    get = lambda key, convert, default=_REQUIRED: r.get(table, key, path, convert, default)  # noqa: E731
    name = get("name", _matching(ids.GUARD_NAME, "a guard name (1-63 characters of a-z, 0-9 and -, "
                                                 "starting with a letter or digit)"))
    arn = get("target_group_arn", _matching(ids.TARGET_GROUP_ARN, "an ELBv2 target group ARN"))
    if arn is not None and region is not None:
        arn_region = ids.TARGET_GROUP_ARN.fullmatch(arn)["region"]  # type: ignore[index]
        if arn_region != region:
            r.problem(f"{path}.target_group_arn", f"is in region {_show(arn_region)}, not aws.region {_show(region)}")
    has_requests, has_tags = "spot_request_ids" in table, "spot_instance_tags" in table
    if has_requests and has_tags:
        r.problem(f"{path}.spot_instance_tags", "cannot be combined with spot_request_ids (choose one)")
    elif not (has_requests or has_tags):
        r.problem(f"{path}.spot_request_ids", "required (or spot_instance_tags)")
    return GuardSettings(
        name=name,
        target_group_arn=arn,
        target_port=get("target_port", _port, None),
        spot_request_ids=get("spot_request_ids", _array(_matching(ids.SPOT_REQUEST_ID, "a spot request id")), ()),
        spot_instance_tags=get("spot_instance_tags", _tags, ()),
        capacity=_capacity(r, table, path, get),
        standby_instance_ids=get("standby_instance_ids", _array(_matching(ids.INSTANCE_ID, "an instance id"))),
        failback_grace=get("failback_grace", _duration, defaults.FAILBACK_GRACE),
        standby_ready_timeout=get("standby_ready_timeout", _duration, defaults.STANDBY_READY_TIMEOUT),
        unhealthy_grace=get("unhealthy_grace", _duration, defaults.UNHEALTHY_GRACE),
        on_rebalance=get("on_rebalance", _choice(REBALANCE_POLICIES), defaults.ON_REBALANCE),
        rebalance_hold=get("rebalance_hold", _duration, defaults.REBALANCE_HOLD),
        register_when=get("register_when", _choice(REGISTER_WHEN), defaults.REGISTER_WHEN),
        late_warning=get("late_warning", _duration, defaults.LATE_WARNING),
        deregister_ahead=get("deregister_ahead", _duration, defaults.DEREGISTER_AHEAD),
        on_demand_hourly=get("on_demand_hourly", _price, None),
        spot_hourly=get("spot_hourly", _price, None),
    )


def _check_unclaimed(r: _Reader, guards: list[tuple[str, GuardSettings]]) -> None:
    """Report every name, target group, spot request, standby and tag set used twice, naming both places."""
    claims: dict[tuple[str, object], str] = {}

    def claim(kind: str, value: object, where: str, message: str) -> None:
        if value is None:
            return
        first = claims.setdefault((kind, value), where)
        if first != where:
            r.problem(where, message.format(first=first))

    for path, g in guards:
        claim("name", g.name, f"{path}.name", f"{_show(g.name)} is already the name of {{first}}")
        claim("tg", g.target_group_arn, f"{path}.target_group_arn", "is already the target group of {first}")
        for field_name in ("spot_request_ids", "standby_instance_ids"):
            for i, value in enumerate(getattr(g, field_name) or ()):
                # Spot requests and instances share one namespace per kind, across lists and guards.
                kind = "sir" if field_name == "spot_request_ids" else "instance"
                where = f"{path}.{field_name}[{i}]"
                claim(kind, value, where, f"{_show(value)} is already listed at {{first}}")
        if g.spot_instance_tags:
            where = f"{path}.spot_instance_tags"
            claim("tags", frozenset(g.spot_instance_tags), where,
                  "the same tags already select {first}'s spot instances")
    _check_exclusive_tags(r, guards)


def _check_exclusive_tags(r: _Reader, guards: list[tuple[str, GuardSettings]]) -> None:
    """Two tag selectors must exclude each other: some tag key both name, with different
    values. Otherwise one instance can carry both sets, and two guards would claim it."""
    tagged = [(path, dict(g.spot_instance_tags)) for path, g in guards if g.spot_instance_tags]
    for n, (path, tags) in enumerate(tagged):
        for first, other in tagged[:n]:
            if tags == other:
                continue  # said above: the same tags
            if not any(key in other and other[key] != value for key, value in tags.items()):
                r.problem(f"{path}.spot_instance_tags", f"can select the same instances as {first}.spot_instance_tags "
                          "(no tag key with a different value in each): give both a key with different values")


# --------------------------------------------------------------------------- loading


def load(path: str | Path, *, env: Mapping[str, str] | None = None) -> Settings:
    """The settings in the TOML file at `path`; raises ConfigError (only) listing every problem.

    `env` stands in for os.environ (where SPOTGUARD_DISCORD_WEBHOOK_URL may be).
    """
    try:
        return _load(Path(path), os.environ if env is None else env)
    except ConfigError:
        raise
    except Exception as exc:  # a bug here must still end as a config error, never a traceback
        raise ConfigError(
            [f"{_display_path(path)}: internal error while checking the config: {type(exc).__name__}: {exc}"]
        ) from exc


def _load(path: Path, env: Mapping[str, str]) -> Settings:
    shown = _display_path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{shown}: cannot read: {_os_reason(exc)}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{shown}: larger than {MAX_CONFIG_BYTES} bytes, not a spotguard config"])
    try:
        text = data.decode("utf-8-sig")  # tolerate the BOM some editors write
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{shown}: not valid TOML: not UTF-8 text (bad byte at offset {exc.start})"]) from None
    try:
        top = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError
        raise ConfigError([f"{shown}: not valid TOML: {' '.join(str(exc).split())}"]) from None
    reader = _Reader(_base_dir(path), env)
    settings = _settings(reader, top)
    if reader.problems:
        raise ConfigError(reader.problems)
    return settings


def _base_dir(path: Path) -> Path:
    try:
        return Path(os.path.abspath(path)).parent
    except OSError:  # the working directory is gone
        return path.parent
