"""One instance's metadata service: IMDSv2 on a loopback port, as an agent on the spot host polls it.

`InstanceMetadata` serves `PUT /latest/api/token` (TTL 1-21600, refused through
a proxy) and token-checked GETs of `instance-id`, `spot/instance-action` and
`events/recommendations/rebalance` (404 until the lab sets an answer), as
design.md § Detection sources describes. Tokens live on their own clock
(`advance()` expires one without sleeping).

This module must not know about EC2, the fleet or scenario time.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timezone
from typing import Any, Callable

from aiohttp import web

TOKEN_PATH = "/latest/api/token"
META = "/latest/meta-data"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL = 21600
ACTIONS = frozenset({"terminate", "stop", "hibernate"})


def iso_z(moment: datetime) -> str:
    """A moment as IMDS writes it: UTC, whole seconds, `Z` (2026-11-28T08:22:00Z)."""
    if moment.tzinfo is None:
        raise ValueError("a naive datetime has no place on IMDS's UTC clock")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class InstanceMetadata:
    def __init__(self, instance_id: str, *, region: str = "us-east-1",
                 now: Callable[[], float] = time.monotonic) -> None:
        self.instance_id = instance_id
        self.region = region
        self.port: int | None = None
        self._now = now
        self._skew = 0.0  # seconds advance() added to the token clock
        self._tokens: dict[str, float] = {}  # token → expiry on the token clock
        self._instance_action: dict[str, str] | None = None
        self._rebalance: dict[str, str] | None = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        app = web.Application()
        app.router.add_put(TOKEN_PATH, self._token)
        app.router.add_get(META + "/{path:.*}", self._get)
        # shutdown_timeout 0: when the instance goes, its metadata service goes at once.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ------------------------------------------------------------------ what it answers

    def set_interruption(self, at: datetime, action: str = "terminate") -> dict[str, str]:
        """spot/instance-action from now on: `action` at `at` (an aware datetime). Returns the answer."""
        if action not in ACTIONS:
            raise ValueError(f"instance-action is one of {sorted(ACTIONS)}, not {action!r}")
        self._instance_action = {"action": action, "time": iso_z(at)}
        return dict(self._instance_action)

    def clear_interruption(self) -> None:
        self._instance_action = None

    def set_rebalance(self, notice_time: datetime | None) -> dict[str, str] | None:
        """events/recommendations/rebalance from now on (None: 404 again). Returns the answer."""
        self._rebalance = None if notice_time is None else {"noticeTime": iso_z(notice_time)}
        return None if self._rebalance is None else dict(self._rebalance)

    def instance_action(self) -> dict[str, str] | None:
        return None if self._instance_action is None else dict(self._instance_action)

    def advance(self, seconds: float) -> None:
        """Move the token clock forward (tests expire tokens this way rather than by sleeping)."""
        self._skew += seconds

    def clock(self) -> float:
        """The token clock: seconds on `now`, plus whatever advance() added."""
        return self._now() + self._skew

    # ------------------------------------------------------------------ HTTP

    async def _token(self, request: web.Request) -> web.Response:
        if "X-Forwarded-For" in request.headers:
            return _text(403, "Forbidden")
        ttl = _ttl(request.headers.get(TTL_HEADER))
        if ttl is None:
            return _text(400, "Bad Request")
        now = self.clock()
        self._tokens = {t: end for t, end in self._tokens.items() if end > now}  # forget the expired
        token = secrets.token_urlsafe(42)
        self._tokens[token] = now + ttl
        return _text(200, token, {TTL_HEADER: str(ttl)})

    async def _get(self, request: web.Request) -> web.Response:
        if not self._valid(request.headers.get(TOKEN_HEADER)):
            return _text(401, "Unauthorized")
        answer = self._item(request.match_info["path"])
        if answer is None:
            return _text(404, "Not Found")
        return _text(200, answer)

    def _valid(self, token: str | None) -> bool:
        expiry = self._tokens.get(token) if token else None
        return expiry is not None and self.clock() < expiry

    def _item(self, path: str) -> str | None:
        items: dict[str, Any] = {
            "instance-id": self.instance_id,
            "placement/region": self.region,
            "spot/instance-action": self._instance_action,
            "events/recommendations/rebalance": self._rebalance,
        }
        value = items.get(path.rstrip("/"))
        if value is None or isinstance(value, str):
            return value
        return json.dumps(value)


def _ttl(raw: str | None) -> int | None:
    """The requested token TTL in seconds, or None when it is missing or not an integer 1–21600."""
    try:
        ttl = int(raw) if raw is not None and raw.strip().isdigit() else None
    except ValueError:
        return None
    return ttl if ttl is not None and 1 <= ttl <= MAX_TTL else None


def _text(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/plain", headers=headers)
