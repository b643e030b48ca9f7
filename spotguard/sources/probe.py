"""The readiness probe: does an instance answer its target group's health check yet?

Each round the daemon names, per guard, the instances the machine wants probed
(`machine.to_probe`: running, not registered). For each, a task sends the
target group's own health check (protocol, port, path, success codes, timeout,
as DescribeTargetGroups gives them) to the instance's private address every
PROBE_EVERY seconds and keeps the verdict for the next observation:
machine.READY, WAITING or SILENT, or None when it cannot be probed from here.
`on_ready` is called when a verdict turns READY, so registering need not wait
for the next poll.

This module must not decide anything about failovers nor change the world.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import structlog

from spotguard.aws import AWS_ERRORS, error_code
from spotguard.machine import READY, SILENT, WAITING, Instance

log = structlog.get_logger("spotguard.probe")

PROBE_EVERY = 2.0
# A target group's health check settings are read again after this long (someone may change them).
SETTINGS_TTL = 300.0
# The balancer's own User-Agent: a service that treats its health checks specially treats ours alike.
USER_AGENT = "ELB-HealthChecker/2.0"
MAX_STATUS_LINE = 4096
PROBED = frozenset({"HTTP", "HTTPS", "TCP"})

# One health check's outcome.
PASS, FAIL, NO_ANSWER = "pass", "fail", "no answer"


@dataclass(frozen=True)
class HealthCheck:
    """A target group's health check, as the balancer sends it."""

    protocol: str  # HTTP | HTTPS | TCP
    port: int | None  # None: the traffic port
    path: str = "/"
    codes: tuple[tuple[int, int], ...] = ((200, 200),)  # success code ranges, inclusive
    timeout: float = 5.0

    @classmethod
    def of_target_group(cls, group: dict[str, Any]) -> "HealthCheck | str":
        """From a DescribeTargetGroups entry; a string says why it cannot be probed from here."""
        protocol = group.get("HealthCheckProtocol") or group.get("Protocol") or "HTTP"
        if protocol not in PROBED or group.get("ProtocolVersion") in ("GRPC", "HTTP2"):
            return f"a {group.get('ProtocolVersion') or protocol} health check"
        port = group.get("HealthCheckPort") or "traffic-port"
        matcher = (group.get("Matcher") or {}).get("HttpCode") or "200"
        try:
            codes = tuple(_code_range(part) for part in matcher.split(","))
            return cls(protocol=protocol, port=None if port == "traffic-port" else int(port),
                       path=group.get("HealthCheckPath") or "/", codes=codes,
                       timeout=float(group.get("HealthCheckTimeoutSeconds") or 5))
        except ValueError:
            return f"a health check it cannot read (port {port!r}, codes {matcher!r})"

    @classmethod
    def of_url(cls, url: str, codes: str = "200", timeout: float = 5.0) -> tuple[str, int, "HealthCheck"]:
        """(host, port, check) for a URL such as http://127.0.0.1:8080/health; ValueError if it is not one."""
        parts = urlsplit(url)
        protocol = parts.scheme.upper()
        if protocol not in ("HTTP", "HTTPS") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if protocol == "HTTPS" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return parts.hostname, port, cls(protocol, port, path, tuple(_code_range(c) for c in codes.split(",")),
                                         timeout)

    def port_for(self, target_port: int | None, group_port: int | None) -> int | None:
        """The port the check goes to: its own, else the traffic port (the guard's target_port, else the group's)."""
        return self.port or target_port or group_port

    def passes(self, status: int) -> bool:
        return any(low <= status <= high for low, high in self.codes)


def _code_range(part: str) -> tuple[int, int]:
    low, _, high = part.strip().partition("-")
    return int(low), int(high or low)


_TLS = ssl.create_default_context()
# The balancer does not validate a target's certificate either: an instance's is rarely for its address.
_TLS.check_hostname = False
_TLS.verify_mode = ssl.CERT_NONE


async def check_once(address: str, port: int, check: HealthCheck) -> tuple[str, bool]:
    """One health check of address:port: (PASS, FAIL or NO_ANSWER, whether anything answered at all)."""
    answered = False
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(address, port, limit=MAX_STATUS_LINE)
            answered = True
            try:
                if check.protocol == "HTTPS":
                    await writer.start_tls(_TLS)
                if check.protocol == "TCP":
                    return PASS, True
                host = f"{address}:{port}"
                writer.write(f"GET {check.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
                             "Accept: */*\r\nConnection: close\r\n\r\n".encode("latin-1"))
                line = await reader.readline()
            finally:
                writer.close()
    except (ConnectionRefusedError, ConnectionResetError, ssl.SSLError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError, ValueError):
        return FAIL, True  # something is there: the kernel refused, or the service answered badly
    except (TimeoutError, OSError):
        return (FAIL if answered else NO_ANSWER), answered  # slow service, or no route / nothing up yet
    return (PASS if check.passes(_status(line)) else FAIL), True


def _status(line: bytes) -> int:
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return 0
    return int(parts[1])


@dataclass
class _Probing:
    """One instance being probed."""

    address: str
    arn: str
    port: int | None  # the guard's target_port (None: the group's)
    verdict: str | None = SILENT
    answered: bool = False
    task: asyncio.Task | None = field(default=None, repr=False)


class Prober:
    """Probes the instances it is told to watch, in the background, and keeps their verdicts."""

    def __init__(self, elbv2: Any, *, every: float = PROBE_EVERY, on_ready: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] | None = None) -> None:
        self.elbv2 = elbv2
        self.every = every
        self.on_ready = on_ready
        self.clock = clock or time.monotonic
        self.probing: dict[str, _Probing] = {}  # by instance id
        self.watched: dict[str, set[str]] = {}  # instance ids by guard
        self.checks: dict[str, tuple[float, HealthCheck | str | None, int | None]] = {}  # arn: (read at, check, port)
        self.reading: dict[str, asyncio.Task] = {}
        self.said: set[str] = set()  # target groups whose unprobeable check was logged
        self.unread: set[str] = set()  # target groups whose settings could not be read, logged once

    def watch(self, guard: str, arn: str, target_port: int | None, instances: Iterable[Instance]) -> None:
        """From now on probe `instances` for `guard` (target group `arn`), and none of its others."""
        wanted = {i.id: i for i in instances}
        for iid in self.watched.get(guard, set()) - set(wanted):
            self._forget(iid)
        self.watched[guard] = set(wanted)
        for iid, inst in wanted.items():
            known = self.probing.get(iid)
            if known is not None and known.address == inst.address:
                continue
            if known is not None:
                self._forget(iid)
            self._begin(iid, inst.address, arn, target_port)

    def verdict(self, instance_id: str) -> str | None:
        probing = self.probing.get(instance_id)
        return probing.verdict if probing is not None else SILENT

    async def close(self) -> None:
        tasks = [p.task for p in self.probing.values() if p.task] + list(self.reading.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.probing.clear()

    def _begin(self, iid: str, address: str | None, arn: str, port: int | None) -> None:
        if address is None:
            self.probing[iid] = _Probing("", arn, port, verdict=None)  # no private address: nothing to knock on
            return
        probing = _Probing(address, arn, port)
        probing.task = asyncio.create_task(self._probe(iid, probing), name=f"probe {iid}")
        probing.task.add_done_callback(lambda task: self._ended(iid, probing, task))
        self.probing[iid] = probing

    @staticmethod
    def _ended(iid: str, probing: _Probing, task: asyncio.Task) -> None:
        # A bug in a probe must not leave its instance waiting forever: said, and it cannot be probed.
        if not task.cancelled() and task.exception() is not None:
            probing.verdict = None
            log.error("probe.failed", instance_id=iid, error=type(task.exception()).__name__,
                      detail=str(task.exception()))

    def _forget(self, iid: str) -> None:
        probing = self.probing.pop(iid, None)
        if probing is not None and probing.task is not None:
            probing.task.cancel()

    async def _probe(self, iid: str, p: _Probing) -> None:
        while True:
            check, group_port = await self._health_check(p.arn)
            if isinstance(check, str):
                p.verdict = None
                return
            if check is not None:
                port = check.port_for(p.port, group_port)
                outcome, answered = await check_once(p.address, port, check)
                p.answered |= answered
                verdict = READY if outcome == PASS else WAITING if p.answered else SILENT
                turned_ready = verdict == READY and p.verdict != READY
                p.verdict = verdict
                if turned_ready:
                    log.info("probe.ready", instance_id=iid, address=f"{p.address}:{port}",
                             check=f"{check.protocol} {check.path}")
                    self.on_ready()
            await asyncio.sleep(self.every)

    async def _health_check(self, arn: str) -> tuple[HealthCheck | str | None, int | None]:
        """The group's health check (cached SETTINGS_TTL); None when it could not be read now."""
        cached = self.checks.get(arn)
        if cached is not None and self.clock() - cached[0] < SETTINGS_TTL:
            return cached[1], cached[2]
        # One DescribeTargetGroups per group however many instances wait on it.
        reading = self.reading.get(arn)
        if reading is None or reading.done():
            reading = self.reading[arn] = asyncio.create_task(self._read(arn))
        return await asyncio.shield(reading)

    async def _read(self, arn: str) -> tuple[HealthCheck | str | None, int | None]:
        try:
            answer = await self.elbv2.describe_target_groups(TargetGroupArns=[arn])
        except AWS_ERRORS as exc:
            if arn not in self.unread:  # said once; read again every probe round until it works
                self.unread.add(arn)
                log.warning("probe.target_group.unread", target_group_arn=arn, error=error_code(exc))
            return None, None
        self.unread.discard(arn)
        group = answer["TargetGroups"][0]
        check = HealthCheck.of_target_group(group)
        if isinstance(check, str) and arn not in self.said:
            self.said.add(arn)
            log.warning("probe.unprobeable", target_group_arn=arn, why=check)
        port = group.get("Port")
        self.checks[arn] = (self.clock(), check, port)
        return check, port
