"""The lab's clients: a steady stream of HTTP requests through the load balancer, every outcome kept.

`LoadGenerator.run()` sends `rate` requests per wall second to the balancer,
open loop (a slow answer never delays the next request, as real users do not
wait for each other), until stopped, `max_requests` are sent, or `max_wall`
seconds pass. With `clients` it is closed loop instead: that many clients,
each with one request at a time, sending the next when the last is answered
and no sooner than its share of `rate` allows; so what is served is what the
targets can serve (up to `rate`), and a lost target shows as fewer requests
per second rather than as a queue growing without bound. Each request ends as
a `Sample`: sent when and answered when (scenario time), ok or not, the HTTP
status or the error, and which instance served it (`X-Served-By`). A request
fails when it gets anything but a 200, an error, or no answer within `timeout`
wall seconds.

Loopback only: the generator refuses a URL that is not on 127.0.0.1.

This module must not look at the world or judge the run; it sends and counts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import aiohttp

from .app import SERVED_BY
from .clock import ScenarioClock

# Concurrent requests beyond this are not sent but counted failed ("overload"):
# the lab must never grow without bound when something hangs.
MAX_IN_FLIGHT = 200


@dataclass(frozen=True)
class Sample:
    sent_at: float  # scenario seconds (the timeline's time)
    ok: bool
    status: int | None  # HTTP status, None when there was no answer
    error: str | None  # why it failed: "503", "502", "timeout", "ClientConnectorError", ...
    served_by: str | None  # instance id that answered
    done_at: float | None = None  # scenario seconds: when the answer (or the failure) came


class LoadGenerator:
    def __init__(
        self,
        url: str,
        clock: ScenarioClock,
        *,
        rate: float = 50.0,
        timeout: float = 5.0,
        max_requests: int = 20_000,
        max_wall: float = 600.0,
        origin: float = 0.0,
        clients: int | None = None,
    ) -> None:
        if urlsplit(url).hostname != "127.0.0.1":
            raise ValueError(f"the lab only sends load to 127.0.0.1, not {url}")
        if not 0 < rate <= 1000:
            raise ValueError(f"rate must be in (0, 1000] requests per second, not {rate}")
        self.url = url
        self.clock = clock
        self.rate = rate
        self.timeout = timeout
        self.max_requests = max_requests
        self.max_wall = max_wall
        self.origin = origin  # scenario time that samples count from
        self.clients = clients  # closed loop: this many clients, one request each at a time (None: open loop)
        self.samples: list[Sample] = []
        self.sent = 0
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Send until `stop` is set or a bound is reached; then wait for the requests in flight."""
        began = time.monotonic()
        gap = 1.0 / self.rate
        connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
        async with aiohttp.ClientSession(connector=connector) as session:
            if self.clients:
                pace = self.clients / self.rate  # each client's share of the rate
                await asyncio.gather(*(self._client(session, stop, began, k * pace / self.clients, pace)
                                       for k in range(self.clients)))
                return
            while not stop.is_set() and self.sent < self.max_requests:
                due = began + self.sent * gap  # drift-free: the schedule never slips behind
                if due - began > self.max_wall:
                    break
                await _sleep_until(due, stop)
                if stop.is_set():
                    break
                self._send(session)
            if self._in_flight:
                await asyncio.wait(self._in_flight, timeout=self.timeout + 1.0)

    async def _client(self, session: aiohttp.ClientSession, stop: asyncio.Event, began: float, offset: float,
                      pace: float) -> None:
        """One closed-loop client from `offset` after `began`: a request, its answer, then the next
        no sooner than `pace` after the last was due."""
        due = began + offset
        while not stop.is_set() and self.sent < self.max_requests and due - began <= self.max_wall:
            await _sleep_until(due, stop)
            if stop.is_set():
                break
            self.sent += 1
            await self._one(session, self.clock.now() - self.origin)
            due = max(due + pace, time.monotonic())

    def _send(self, session: aiohttp.ClientSession) -> None:
        self.sent += 1
        sent_at = self.clock.now() - self.origin
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            self.samples.append(Sample(sent_at, False, None, "overload", None))
            return
        task = asyncio.create_task(self._one(session, sent_at))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _one(self, session: aiohttp.ClientSession, sent_at: float) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with session.get(self.url, timeout=timeout) as reply:
                await reply.read()
                ok = reply.status == 200
                sample = Sample(sent_at, ok, reply.status, None if ok else str(reply.status),
                                reply.headers.get(SERVED_BY))
        except asyncio.TimeoutError:
            sample = Sample(sent_at, False, None, "timeout", None)
        except (aiohttp.ClientError, OSError) as exc:
            sample = Sample(sent_at, False, None, type(exc).__name__, None)
        self.samples.append(replace(sample, done_at=self.clock.now() - self.origin))


async def _sleep_until(due: float, stop: asyncio.Event) -> None:
    delay = due - time.monotonic()
    if delay > 0:
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass


def served_rates(samples: list[Sample], window: float, clock: ScenarioClock) -> tuple[float, ...]:
    """Requests answered 200 per wall second in each whole `window` of scenario time from 0, by
    answer time (by send time, a closed loop's first window would count the queue it fills)."""
    done = [s.done_at for s in samples if s.ok and s.done_at is not None]
    counts = [0] * int(max(done, default=0.0) // window)
    for at in done:
        k = int(at // window)
        if 0 <= k < len(counts):
            counts[k] += 1
    return tuple(c / clock.wall(window) for c in counts)


def failed(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if not s.ok]


def longest_outage(samples: list[Sample]) -> float:
    """The longest stretch of scenario time in which every request sent failed.

    From the first failed request of a run of failures to the first request
    after it that succeeded (or the last failure when none did).
    """
    longest, began, last = 0.0, None, None
    for sample in sorted(samples, key=lambda s: s.sent_at):
        if not sample.ok:
            began = sample.sent_at if began is None else began
            last = sample.sent_at
        elif began is not None:
            longest = max(longest, sample.sent_at - began)
            began = None
    if began is not None and last is not None:
        longest = max(longest, last - began)
    return longest
