"""The agent on the spot host: IMDSv2 notices forwarded to the SQS queue as EventBridge events.

It runs on the Spot instance because the daemon cannot read another
instance's metadata. Every `interval` it reads `spot/instance-action` and
`events/recommendations/rebalance` (IMDSv2: a token, replaced before it
expires and on a 401) and sends each new notice once, as `eventbridge.build`
makes it; a notice counts as sent only once SendMessage succeeded, so a failed
send is retried next interval. Garbage from IMDS is logged, never sent. With a
`ready` check (the target group's health check, on localhost) it also says,
once per boot, when the instance's service first passes it: the daemon then
registers the instance without probing it over the network.

This module must not decide anything about guards nor call any AWS API but SendMessage.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import aiohttp
import structlog

from spotguard import ids
from spotguard.aws import error_code
from spotguard.sources.eventbridge import ACTION_TIME, INTERRUPTION, READY, REBALANCE, build, cap, is_action
from spotguard.sources.probe import PASS, HealthCheck, check_once
from spotguard.sources.sqs import stoppable_sleep

log = structlog.get_logger("spotguard.agent")

DEFAULT_IMDS_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
META = "/latest/meta-data/"
INSTANCE_ID_PATH = "instance-id"
INSTANCE_ACTION_PATH = "spot/instance-action"
REBALANCE_PATH = "events/recommendations/rebalance"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL = 21600
# A token is replaced this long before it expires (at most), so no GET ever
# carries one that expires in flight.
REFRESH_MARGIN = 300.0
SENT_CAP = 256  # distinct notices remembered; a host sees a handful in its life
MAX_BODY = 65536  # bytes of an IMDS answer read; real ones are under 100
BOOT_ID = "/proc/sys/kernel/random/boot_id"  # one per boot: a standby started again is ready again


@dataclass(frozen=True)
class ReadyCheck:
    """The service's health check as the agent sends it on the host: GET url, passing on `check`'s codes."""

    host: str
    port: int
    check: HealthCheck

    @classmethod
    def of_url(cls, url: str, codes: str = "200") -> "ReadyCheck":
        return cls(*HealthCheck.of_url(url, codes))


@dataclass(frozen=True)
class Notice:
    """One notice read from IMDS: which detail-type, its detail, and the payload it came from."""

    detail_type: str
    detail: dict[str, str]
    payload: str  # canonical JSON of the IMDS answer: what makes it this notice (dedupe key, event id)

    @property
    def key(self) -> tuple[str, str]:
        return (self.detail_type, self.payload)


class _Malformed(Exception):
    """An answer that is there (200) but is not what IMDS would say."""


class _Failed(Exception):
    """No usable answer: a network error, a timeout, a status other than 200/404."""


def interpret(path: str, text: str, instance_id: str) -> Notice:
    """The notice a 200 answer on `path` carries; raises _Malformed for anything else."""
    try:
        answer = json.loads(text)
    except (ValueError, RecursionError):
        raise _Malformed("not json") from None
    if not isinstance(answer, dict):
        raise _Malformed(f"not an object: {type(answer).__name__}")
    payload = json.dumps(answer, sort_keys=True, separators=(",", ":"))
    if path == INSTANCE_ACTION_PATH:
        action, when = answer.get("action"), answer.get("time")
        if not (is_action(action) and isinstance(when, str) and when):
            raise _Malformed("instance-action needs action terminate|stop|hibernate and a time")
        detail = {"instance-id": instance_id, "instance-action": answer["action"], ACTION_TIME: when}
        return Notice(INTERRUPTION, detail, payload)
    if not isinstance(answer.get("noticeTime"), str) or not answer["noticeTime"]:
        raise _Malformed("rebalance needs a noticeTime")
    return Notice(REBALANCE, {"instance-id": instance_id}, payload)


class Agent:
    """Polls one instance's metadata service and forwards its notices to SQS. Clients injected."""

    def __init__(
        self,
        imds_url: str,
        sqs_client: Any,
        queue_url: str,
        *,
        interval: float = 1.0,
        token_ttl: int = MAX_TTL,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        ready: ReadyCheck | None = None,
        boot_id: Callable[[], str] = lambda: _read_boot_id(),
    ) -> None:
        if not 1 <= token_ttl <= MAX_TTL:
            raise ValueError(f"token_ttl must be 1–{MAX_TTL} seconds, not {token_ttl}")
        if not interval > 0 or not timeout > 0:
            raise ValueError("interval and timeout must be positive")
        self.imds_url = imds_url.rstrip("/")
        self.sqs = sqs_client
        self.queue_url = queue_url
        self.interval = interval
        self.token_ttl = token_ttl
        self.timeout = timeout
        self.clock = clock
        self.ready = ready
        self.boot_id = boot_id
        self.said_ready = False
        self.instance_id: str | None = None
        self.sent: dict[tuple[str, str], str] = {}  # notice key → event id, oldest first
        self._token: str | None = None
        self._refresh_at = 0.0  # on `clock`: when the token must be replaced
        self._token_lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "Agent":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every `interval` until `stop` is set; never raises (but CancelledError)."""
        log.info("agent.started", imds_url=self.imds_url, queue_url=self.queue_url, interval=self.interval)
        try:
            while not stop.is_set():
                started = self.clock()
                try:
                    await self.poll_once()
                except Exception as exc:  # noqa: BLE001 - a bug in one poll must not end the agent
                    log.error("agent.poll.failed", error=type(exc).__name__, detail=cap(str(exc)))
                await stoppable_sleep(max(0.0, self.interval - (self.clock() - started)), stop)
        finally:
            await self.close()
            log.info("agent.stopped", sent=len(self.sent))

    async def poll_once(self) -> list[str]:
        """One round: read both notices, send the new ones. Returns the detail-types sent."""
        if self.instance_id is None and not await self._learn_instance_id():
            return []
        reads = await asyncio.gather(self._read(INSTANCE_ACTION_PATH), self._read(REBALANCE_PATH),
                                     self._ready())
        sent = []
        for notice in reads:
            if notice is not None and notice.key not in self.sent and await self._send(notice):
                sent.append(notice.detail_type)
                self.said_ready |= notice.detail_type == READY
        return sent

    async def _ready(self) -> Notice | None:
        """The ready notice, once the service passes its health check (until it was sent)."""
        if self.ready is None or self.said_ready:
            return None
        outcome, _ = await check_once(self.ready.host, self.ready.port, self.ready.check)
        if outcome != PASS:
            return None
        payload = json.dumps({"boot": self.boot_id()}, separators=(",", ":"))
        return Notice(READY, {"instance-id": self.instance_id}, payload)

    # ------------------------------------------------------------------ IMDS

    async def read_region(self) -> str | None:
        """The instance's region from IMDS (placement/region); None without a usable answer."""
        try:
            status, text = await self._get("placement/region")
        except _Failed as exc:
            log.warning("agent.imds.region.failed", reason=str(exc))
            return None
        region = text.strip()
        return region if status == 200 and ids.REGION.fullmatch(region) else None

    async def _learn_instance_id(self) -> bool:
        try:
            status, text = await self._get(INSTANCE_ID_PATH)
        except _Failed as failed:
            log.warning("agent.imds.failed", path=INSTANCE_ID_PATH, error=str(failed))
            return False
        if status != 200:
            log.warning("agent.imds.failed", path=INSTANCE_ID_PATH, status=status, body=cap(text))
            return False
        if not ids.INSTANCE_ID.fullmatch(text.strip()):
            log.warning("agent.imds.malformed", path=INSTANCE_ID_PATH, body=cap(text))
            return False
        self.instance_id = text.strip()
        log.info("agent.instance", instance_id=self.instance_id)
        return True

    async def _read(self, path: str) -> Notice | None:
        """The notice on `path`, or None for 404 and for anything logged as bad."""
        assert self.instance_id is not None
        try:
            status, text = await self._get(path)
        except _Failed as failed:
            log.warning("agent.imds.failed", path=path, error=str(failed))
            return None
        if status == 404:
            return None
        if status != 200:
            log.warning("agent.imds.failed", path=path, status=status, body=cap(text))
            return None
        try:
            return interpret(path, text, self.instance_id)
        except _Malformed as bad:
            log.warning("agent.imds.malformed", path=path, reason=str(bad), body=cap(text))
            return None

    async def _get(self, path: str) -> tuple[int, str]:
        """GET a metadata path with a valid token: on a 401 the token is replaced and the GET retried once."""
        token = await self._valid_token()
        status, text = await self._request("GET", META + path, {TOKEN_HEADER: token})
        if status != 401:
            return status, text
        await self._reject(token)
        token = await self._valid_token()
        return await self._request("GET", META + path, {TOKEN_HEADER: token})

    async def _valid_token(self) -> str:
        async with self._token_lock:
            if self._token is None or self.clock() >= self._refresh_at:
                reason = "first" if self._token is None else "expiring"
                await self._fetch_token(reason)
            assert self._token is not None
            return self._token

    async def _reject(self, token: str) -> None:
        """Forget `token` after a 401, unless a concurrent GET already replaced it."""
        async with self._token_lock:
            if self._token == token:
                self._token = None
                log.info("agent.imds.token.rejected")

    async def _fetch_token(self, reason: str) -> None:
        asked_at = self.clock()  # counted from before the PUT: the token may be a little older
        status, text = await self._request("PUT", TOKEN_PATH, {TTL_HEADER: str(self.token_ttl)})
        token = text.strip()
        if status != 200 or not token or any(c.isspace() for c in token):
            raise _Failed(f"token PUT answered {status}: {cap(text)}")
        margin = min(REFRESH_MARGIN, self.token_ttl / 10)
        self._token = token
        self._refresh_at = asked_at + self.token_ttl - margin
        log.info("agent.imds.token", reason=reason, ttl=self.token_ttl)

    async def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        if self._http is None:
            # No proxies from the environment: IMDS refuses proxied token requests.
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout), trust_env=False)
        try:
            async with self._http.request(method, self.imds_url + path, headers=headers) as response:
                body = await response.content.read(MAX_BODY)
                return response.status, body.decode("utf-8", errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise _Failed(f"{method} {path}: {error_code(exc)} {cap(str(exc))}".strip()) from None

    # ------------------------------------------------------------------ SQS

    async def _send(self, notice: Notice) -> bool:
        message = build(notice.detail_type, notice.detail, payload=notice.payload,
                        region=self.sqs.meta.region_name, at=datetime.now(timezone.utc))
        fields = dict(detail_type=notice.detail_type, instance_id=self.instance_id, event_id=message["id"])
        try:
            await self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=json.dumps(message))
        except Exception as exc:  # noqa: BLE001 - any failure: logged, retried next interval
            log.error("agent.sqs.failed", code=error_code(exc), error=cap(str(exc)), **fields)
            return False
        self.sent[notice.key] = message["id"]
        while len(self.sent) > SENT_CAP:
            del self.sent[next(iter(self.sent))]
        log.info("agent.sqs.sent", payload=notice.payload, **fields)
        return True


def _read_boot_id() -> str:
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


# ---------------------------------------------------------------------- process


def region_from_env(environ: dict[str, str]) -> str | None:
    """AWS_REGION, else AWS_DEFAULT_REGION (botocore itself reads only the latter)."""
    return environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None


def main(queue_url: str, imds_url: str, interval: float, region: str | None, ready: ReadyCheck | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT; the exit code for the process."""
    from spotguard import logs

    logs.configure("auto")
    try:
        asyncio.run(_main(queue_url, imds_url, interval, region, ready))
    except Exception as exc:  # noqa: BLE001 - one line for journald, then systemd restarts us
        log.critical("agent.crashed", error=type(exc).__name__, detail=cap(str(exc)))
        return 1
    return 0


async def _main(queue_url: str, imds_url: str, interval: float, region: str | None,
                ready: ReadyCheck | None) -> None:
    import signal

    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Endpoint (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_SQS) and credentials (the
    # instance role) come from botocore's own chain. Short timeouts and few
    # retries: a failed send is retried next interval anyway.
    config = AioConfig(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=2.0, read_timeout=5.0)
    if region is None:
        async with Agent(imds_url, None, queue_url) as reader:
            region = await reader.read_region()
        if region is None:
            raise RuntimeError("no region: set AWS_REGION, or let the agent read IMDS placement/region (no answer)")
        log.info("agent.region", region=region, source="imds")
    async with get_session().create_client("sqs", region_name=region, config=config) as sqs:
        await Agent(imds_url, sqs, queue_url, interval=interval, ready=ready).run(stop)
