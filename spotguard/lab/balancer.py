"""The lab's load balancer: a loopback HTTP proxy that balances, health-checks and drains like an ALB.

`Balancer` forwards each request round robin to a healthy target, health-checks
its targets with a target group's settings (`HealthCheck`: initial → healthy
after one pass, unhealthy/healthy after the thresholds, fail-open when none is
healthy), and drains a deregistered target for the deregistration delay.
Which targets are registered is moto's (spotguard's (De)RegisterTargets, handed
in by `sync()`); `report()` answers moto's DescribeTargetHealth from the server
thread, so the target table is guarded by a lock. docs/lab.md has the details.

This module must not call AWS or decide registrations; it balances.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import aiohttp
from aiohttp import web

from .app import SERVED_BY
from .clock import ScenarioClock

# The scaled clock shrinks a 4 s check timeout to 80 ms at ×50, which a busy host misses now
# and then: a target flapped unhealthy that no real balancer would fail. A check's timeout is
# never under this many wall seconds (it only matters for an app that hangs; none in the lab does).
MIN_CHECK_TIMEOUT = 0.5
INITIAL, HEALTHY, UNHEALTHY, DRAINING, UNUSED = "initial", "healthy", "unhealthy", "draining", "unused"


@dataclass(frozen=True)
class HealthCheck:
    """A target group's health check settings, in scenario seconds."""

    path: str = "/health"
    interval: float = 5.0
    timeout: float = 4.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2

    @classmethod
    def of_target_group(cls, group: dict[str, Any]) -> "HealthCheck":
        """From a DescribeTargetGroups entry."""
        return cls(
            path=group.get("HealthCheckPath") or "/",
            interval=float(group["HealthCheckIntervalSeconds"]),
            timeout=float(group["HealthCheckTimeoutSeconds"]),
            healthy_threshold=int(group["HealthyThresholdCount"]),
            unhealthy_threshold=int(group["UnhealthyThresholdCount"]),
        )


@dataclass
class _Target:
    state: str = INITIAL
    passes: int = 0  # consecutive passing checks
    fails: int = 0  # consecutive failed checks
    in_flight: int = 0
    drain_until: float | None = None
    checker: asyncio.Task[None] | None = None


# Called with (target id, old state, new state); "gone" when a drained target leaves.
OnChange = Callable[[str, str, str], None]


class Balancer:
    def __init__(
        self,
        clock: ScenarioClock,
        check: HealthCheck,
        deregistration_delay: float,
        resolve: Callable[[str], tuple[str, int] | None],
        live: Callable[[str], bool],
        *,
        on_change: OnChange = lambda tid, old, new: None,
        request_timeout: float = 5.0,
    ) -> None:
        self.clock = clock
        self.check = check
        self.deregistration_delay = deregistration_delay
        self.resolve = resolve  # target id → (host, port) its app listens on, None when nothing listens
        self.live = live  # target id → whether its instance is pending or running (any thread)
        self.on_change = on_change
        self.request_timeout = request_timeout  # wall seconds
        self.port: int | None = None
        self._targets: dict[str, _Target] = {}
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        # force_close: one connection per request, so nothing pooled outlives a killed app.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        for target in self._targets.values():
            if target.checker is not None:
                target.checker.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------ registration

    def sync(self, registered: Iterable[str]) -> None:
        """Follow the target group's registration: new targets, deregistered ones, finished drains."""
        registered = set(registered)
        now = self.clock.now()
        changes: list[tuple[str, str, str]] = []
        with self._lock:
            for tid in registered:
                target = self._targets.get(tid)
                if target is None or target.state == DRAINING:
                    old = target.state if target else UNUSED
                    self._targets[tid] = _Target(checker=asyncio.create_task(self._checks(tid)))
                    changes.append((tid, old, INITIAL))
            for tid, target in list(self._targets.items()):
                if target.state != DRAINING and tid not in registered:
                    changes.append((tid, target.state, DRAINING))
                    if target.checker is not None:
                        target.checker.cancel()
                    target.state, target.drain_until, target.checker = DRAINING, now + self.deregistration_delay, None
                elif target.state == DRAINING and target.drain_until is not None and now >= target.drain_until:
                    del self._targets[tid]
                    changes.append((tid, DRAINING, "gone"))
        for change in changes:
            self.on_change(*change)

    def report(self, target_group_arn: str, registered: tuple[str, ...]) -> dict[str, str]:
        """DescribeTargetHealth's answer (a world.HealthSource); safe on any thread."""
        with self._lock:
            answer: dict[str, str] = {}
            for tid in registered:
                target = self._targets.get(tid)
                if not self.live(tid):
                    answer[tid] = UNUSED  # ALB: Target.InvalidState, the instance is not running
                elif target is None or target.state == DRAINING:
                    answer[tid] = INITIAL  # registered since our last sync
                else:
                    answer[tid] = target.state
            for tid in self._targets.keys() - set(registered):
                answer[tid] = DRAINING  # draining, or deregistered since our last sync
            return answer

    def states(self) -> dict[str, str]:
        with self._lock:
            return {tid: t.state for tid, t in self._targets.items()}

    def healthy(self) -> list[str]:
        with self._lock:
            return [tid for tid, t in self._targets.items() if t.state == HEALTHY]

    # ------------------------------------------------------------------ health checks

    async def _checks(self, tid: str) -> None:
        while True:
            began = self.clock.now()
            passed = await self._probe(tid)
            self._record(tid, passed)
            await self.clock.sleep_until(began + self.check.interval)

    async def _probe(self, tid: str) -> bool:
        address = self.resolve(tid)
        if address is None or self._session is None:
            return False  # nothing listens: connection refused
        try:
            timeout = aiohttp.ClientTimeout(total=max(self.clock.wall(self.check.timeout), MIN_CHECK_TIMEOUT))
            async with self._session.get(_url(address, self.check.path), timeout=timeout) as reply:
                await reply.read()
                return reply.status == 200
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False

    def _record(self, tid: str, passed: bool) -> None:
        with self._lock:
            target = self._targets.get(tid)
            if target is None or target.state == DRAINING:
                return
            old = target.state
            if passed:
                target.passes, target.fails = target.passes + 1, 0
                if old == INITIAL or (old == UNHEALTHY and target.passes >= self.check.healthy_threshold):
                    target.state = HEALTHY
            else:
                target.passes, target.fails = 0, target.fails + 1
                if old in (INITIAL, HEALTHY) and target.fails >= self.check.unhealthy_threshold:
                    target.state = UNHEALTHY
            new = target.state
        if new != old:
            self.on_change(tid, old, new)

    # ------------------------------------------------------------------ requests

    def _pick(self) -> str | None:
        with self._lock:
            healthy = [tid for tid, t in self._targets.items() if t.state == HEALTHY]
            # Fail open: with no healthy target, every unhealthy one gets requests.
            pool = healthy or [tid for tid, t in self._targets.items() if t.state == UNHEALTHY]
            if not pool:
                return None
            tid = pool[next(self._turn) % len(pool)]
            self._targets[tid].in_flight += 1
            return tid

    def _done(self, tid: str) -> None:
        with self._lock:
            target = self._targets.get(tid)
            if target is not None:
                target.in_flight -= 1

    async def _forward(self, request: web.Request) -> web.Response:
        tid = self._pick()
        if tid is None:
            return web.Response(status=503, text="no healthy target\n")
        try:
            address = self.resolve(tid)
            if address is None or self._session is None:
                return web.Response(status=502, text=f"{tid} refused the connection\n")
            timeout = aiohttp.ClientTimeout(total=self.request_timeout)
            async with self._session.get(_url(address, str(request.rel_url)), timeout=timeout) as reply:
                body = await reply.read()
                headers = {SERVED_BY: reply.headers.get(SERVED_BY, tid)}
                return web.Response(status=reply.status, body=body, headers=headers)
        except asyncio.TimeoutError:
            return web.Response(status=504, text=f"{tid} did not answer in time\n")
        except (aiohttp.ClientError, OSError) as exc:
            return web.Response(status=502, text=f"{tid} failed: {type(exc).__name__}\n")
        finally:
            self._done(tid)


def _url(address: tuple[str, int], path: str) -> str:
    host, port = address
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the lab only sends to loopback addresses, not {host}")
    return f"http://{host}:{port}{path}"
