"""How spotguard talks to AWS: client factory and error helpers.

`client()`/`clients()` open aiobotocore clients with bounded retries, short
timeouts, botocore's User-Agent naming spotguard (built once per client), a
fast ISO 8601 timestamp parser and the lean EC2 model (ec2model.py);
docs/benchmarks.md measures what each saves.
`error_code(exc)` turns any AWS or network exception into the short code that
ends up in `machine.Failed` and in logs.

This module must not decide anything about guards or make API calls itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator, NamedTuple

import aiohttp
import botocore
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError
from botocore.useragent import UserAgentString
from botocore.utils import parse_timestamp as botocore_parse_timestamp

from spotguard import __version__
from spotguard.ec2model import DATA as LEAN_DATA

log = structlog.get_logger("spotguard.aws")

# Codes botocore's standard retries treat as throttling (botocore.retries.standard).
THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "TransactionInProgressException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled",
    "SlowDown", "PriorRequestNotComplete", "EC2ThrottledException",
})

# Standard mode retries throttling and transient errors with backoff; five tries
# bound the worst case so a failover is never stuck behind an endless retry loop.
RETRIES = {"mode": "standard", "max_attempts": 5}
# A person at a prompt (check, setup) wants an answer in seconds: one retry, not four.
INTERACTIVE_RETRIES = 1
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 15.0
# SQS long polls for 20 s; its read timeout must outlast that or every empty
# poll would end in a ReadTimeoutError.
SQS_LONG_POLL = 20
SQS_READ_TIMEOUT = SQS_LONG_POLL + 10.0
# spotguard's product token: how an operator finds its calls in CloudTrail's userAgent.
USER_AGENT = f"spotguard/{__version__}"


class Clients(NamedTuple):
    """The three clients, unpackable as `(ec2, elbv2, sqs)`."""

    ec2: Any
    elbv2: Any
    sqs: Any


def client_config(service: str, *, max_attempts: int = RETRIES["max_attempts"]) -> AioConfig:
    """The botocore config for one service: bounded retries, short timeouts (`client()` adds the User-Agent)."""
    read_timeout = SQS_READ_TIMEOUT if service == "sqs" else READ_TIMEOUT
    return AioConfig(
        retries={**RETRIES, "max_attempts": max_attempts},
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=read_timeout,
    )


def user_agent(session: AioSession, config: AioConfig) -> str:
    """botocore's own User-Agent for a client of `session` with `config`, spotguard's token last.

    `aiobotocore/<v> md/Botocore#<v> ua/2.1 os/… lang/python#… cfg/… app/<id> spotguard/<v>`:
    app/ is AWS_SDK_UA_APP_ID (or sdk_ua_app_id in the AWS config file). botocore
    would build this string twice per request from ~16 parts (docs/benchmarks.md
    § 6: ~10 % of a poll round); `client()` builds it once and hands it over as
    Config(user_agent=), which botocore only joins to the session's extra per
    request. What a fixed string cannot carry is botocore's per-request feature
    ids (m/…): SDK telemetry, nothing an operator reads. botocore calls its
    builder private: constraints.txt pins botocore, tests/test_aws.py checks the wire.
    """
    appid = config.user_agent_appid or session.get_config_variable("user_agent_appid")
    ua = UserAgentString.from_environment()
    # No session extra here: a non-empty one is joined on by botocore per request.
    ua.set_session_config(session.user_agent_name, session.user_agent_version, None)
    return ua.with_client_config(config.merge(AioConfig(user_agent_extra=USER_AGENT,
                                                        user_agent_appid=appid))).to_string()


def _botocore_once(session: AioSession) -> AioSession:
    """Drop aiobotocore's session extra `botocore/<v>` (idempotent): botocore's own
    string already names it (md/Botocore#<v>), and the extra would repeat it."""
    if session.user_agent_extra == f"botocore/{botocore.__version__}":
        session.user_agent_extra = ""
    return session


def parse_timestamp(value: Any) -> dt.datetime:
    """A response timestamp as botocore would parse it, ISO 8601 ones by the C parser.

    EC2, ELBv2 and SQS send ISO 8601 (`2026-11-28T08:22:00.000Z`); botocore
    hands every timestamp to dateutil, ~0.1 ms each in pure Python (this C
    parser: ~0.2 µs), and a DescribeInstances reply carries several per instance.
    `datetime.fromisoformat` (Python 3.11+) reads the same strings to the same
    instants. Anything else (epoch numbers, RFC 822) goes to botocore's parser.
    """
    if isinstance(value, str) and len(value) >= 10 and value[4] == "-" and value[7] == "-":
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            pass
    return botocore_parse_timestamp(value)


def _fast_parsers(session: AioSession) -> AioSession:
    """Make the session's future clients parse timestamps with `parse_timestamp` (idempotent)."""
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
    return session


def _lean_models(session: AioSession) -> AioSession:
    """Make the session's future clients load spotguard's lean service models first (idempotent).

    botocore's loader picks the latest api version over all search paths, then
    the first path holding that version's file, so `ec2model.DATA` first wins
    service-2 for EC2 and leaves endpoint rules, paginators and every other
    service to botocore. A session that already built an EC2 client keeps the
    full model (the loader caches it): pass a fresh one.
    """
    paths = session.get_component("data_loader").search_paths
    if str(LEAN_DATA) not in paths:
        paths.insert(0, str(LEAN_DATA))
    return session


@asynccontextmanager
async def client(
    service: str,
    region: str,
    endpoint_url: str | None = None,
    *,
    session: AioSession | None = None,
    max_attempts: int = RETRIES["max_attempts"],
) -> AsyncIterator[Any]:
    """One aiobotocore client for `service`, closed on exit."""
    session = _botocore_once(_lean_models(_fast_parsers(session or get_session())))
    config = client_config(service, max_attempts=max_attempts)
    config = config.merge(AioConfig(user_agent=user_agent(session, config)))
    async with session.create_client(
        service,
        region_name=region,
        endpoint_url=endpoint_url,
        config=config,
    ) as c:
        c.meta.events.register_first("needs-retry", _RetryLog(max_attempts))
        yield c


@asynccontextmanager
async def clients(
    region: str,
    endpoint_url: str | None = None,
    *,
    session: AioSession | None = None,
    max_attempts: int = RETRIES["max_attempts"],
) -> AsyncIterator[Clients]:
    """EC2, ELBv2 and SQS clients sharing one session; all closed on exit.

    `endpoint_url` points every client at one endpoint (moto in tests and the
    lab). Pass one `session` to many calls to load botocore's service models
    once; `max_attempts` exists for tests that want a failure without backoff.
    """
    session = session or get_session()
    async with AsyncExitStack() as stack:
        made = [
            await stack.enter_async_context(
                client(name, region, endpoint_url, session=session, max_attempts=max_attempts)
            )
            for name in ("ec2", "elbv2", "sqs")
        ]
        yield Clients(*made)


class _RetryLog:
    """A botocore `needs-retry` hook that only logs: a call about to be retried (throttled,
    5xx, a dropped connection) says so, so a slow round is never silent. It decides nothing:
    returning None leaves the decision and the backoff to botocore's standard retries."""

    def __init__(self, max_attempts: int) -> None:
        self.retries = max_attempts  # botocore's max_attempts counts the retries after the first try

    def __call__(self, attempts: int, response: Any = None, caught_exception: Any = None, event_name: str = "",
                 **_: Any) -> None:
        if attempts > self.retries:
            return None  # the last try: what it got is the caller's to report
        code = _retryable(response, caught_exception)
        if code is not None:
            _, _, call = event_name.partition(".")
            log.warning("aws.retrying", call=call, attempt=attempts, code=code)
        return None


def _retryable(response: Any, caught: Any) -> str | None:
    """The code of an answer standard retries would retry (throttling, 5xx, no connection), else None."""
    if caught is not None:
        return type(caught).__name__
    if not response:
        return None
    http, parsed = response
    code = (parsed or {}).get("Error", {}).get("Code")
    if http.status_code >= 500 or http.status_code == 429 or code in THROTTLING_CODES:
        return code or f"HTTP {http.status_code}"
    return None


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError, else the exception's class name.

    Network failures have no AWS code; their botocore class name
    (`EndpointConnectionError`, `ReadTimeoutError`, `ConnectTimeoutError`) is
    what a person grepping the journal will recognise.
    """
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "ClientError")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "Timeout"
    return type(exc).__name__


def describe_error(exc: BaseException) -> str:
    """One line for a person: the error's code, then AWS's (or botocore's) message."""
    code = error_code(exc)
    if isinstance(exc, ClientError):
        message = exc.response.get("Error", {}).get("Message", "")
    else:
        message = str(exc)
    message = " ".join(message.split())
    return f"{code}: {message}" if message and message != code else code


# Exceptions that mean "AWS or the network said no", as opposed to a bug in
# spotguard. The executor turns these into Failed; the poller into PollError.
# aiobotocore maps most aiohttp failures to botocore's; aiohttp.ClientError
# covers the few it lets through (payload errors, odd disconnects). A reply
# botocore cannot parse (a 200 with an empty body from a broken proxy) raises
# ResponseParserError, which is neither a BotoCoreError nor a ClientError.
AWS_ERRORS: tuple[type[BaseException], ...] = (
    ClientError,
    BotoCoreError,
    ResponseParserError,
    aiohttp.ClientError,
    OSError,
    asyncio.TimeoutError,
)
