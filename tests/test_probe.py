"""The readiness probe against real HTTP(S) and TCP servers on loopback addresses, and moto's target groups."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from waiting import until

from spotguard.machine import READY, SILENT, WAITING, Instance
from spotguard.sources.probe import FAIL, NO_ANSWER, PASS, USER_AGENT, HealthCheck, Prober, check_once

# An instance's private address, as moto gives it in a 127.0.0.0/8 VPC: loopback, never a private range.
ADDRESS = "127.42.0.7"


class Service:
    """An instance's service: answers GET with `status` (after `delay` seconds), records what it was sent."""

    def __init__(self, status: int = 200, delay: float = 0.0, tls: ssl.SSLContext | None = None,
                 address: str = ADDRESS) -> None:
        self.status, self.delay, self.tls, self.address = status, delay, tls, address
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> "Service":
        self.server = await asyncio.start_server(self._answer, self.address, 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            await asyncio.sleep(self.delay)
            writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
        writer.close()


def http(path: str = "/health", codes: str = "200", timeout: float = 2.0, protocol: str = "HTTP") -> HealthCheck:
    check = HealthCheck.of_target_group({"HealthCheckProtocol": protocol, "HealthCheckPath": path,
                                         "Matcher": {"HttpCode": codes}, "HealthCheckTimeoutSeconds": timeout})
    assert isinstance(check, HealthCheck)
    return check


def closed_port(address: str = ADDRESS) -> int:
    """A port on `address` where nothing listens (the kernel answers with a reset)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("status,codes,outcome", [
    (200, "200", PASS), (503, "200", FAIL), (204, "200-299", PASS), (302, "200,302", PASS), (404, "200-299", FAIL),
])
async def test_http_status_against_the_groups_success_codes(status, codes, outcome):
    async with Service(status) as service:
        assert await check_once(ADDRESS, service.port, http(codes=codes)) == (outcome, True)
    head = service.heads[0].decode()
    assert head.startswith("GET /health HTTP/1.1\r\n")
    assert f"Host: {ADDRESS}:{service.port}\r\n" in head and f"User-Agent: {USER_AGENT}\r\n" in head


async def test_refused_is_an_answer_and_a_slow_service_fails_within_the_timeout():
    assert await check_once(ADDRESS, closed_port(), http()) == (FAIL, True)
    async with Service(delay=5.0) as service:
        started = asyncio.get_running_loop().time()
        assert await check_once(ADDRESS, service.port, http(timeout=0.3)) == (FAIL, True)
        assert asyncio.get_running_loop().time() - started < 3.0


class Unanswering:
    """A listener that never accepts, its queue full: the kernel drops new SYNs, so a connection
    gets no answer at all, as from a host still booting or behind a security group."""

    def __init__(self, address: str = ADDRESS) -> None:
        self.sockets = [socket.socket()]
        self.sockets[0].bind((address, 0))
        self.sockets[0].listen(0)
        self.port = self.sockets[0].getsockname()[1]
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((address, self.port))
            self.sockets.append(filler)

    def __enter__(self) -> "Unanswering":
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.sockets:
            s.close()


async def test_no_answer_at_all_is_silent():
    with Unanswering() as nothing:
        assert await check_once(ADDRESS, nothing.port, http(timeout=0.3, protocol="TCP")) == (NO_ANSWER, False)


async def test_a_slow_body_is_judged_on_the_status_line():
    """The status line decides; a body that trickles in for longer than the timeout does not turn it into a fail."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")  # 10 s of body
            await writer.drain()
            for _ in range(200):
                writer.write(b"x" * 5)
                await writer.drain()
                await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(answer, ADDRESS, 0)
    try:
        started = asyncio.get_running_loop().time()
        port = server.sockets[0].getsockname()[1]
        assert await check_once(ADDRESS, port, http(timeout=5.0)) == (PASS, True)
        assert asyncio.get_running_loop().time() - started < 5.0  # waiting for the body would have timed out
    finally:
        server.close()


async def test_tcp_check_passes_on_connect():
    async with Service() as service:
        check = HealthCheck.of_target_group({"HealthCheckProtocol": "TCP", "HealthCheckPort": str(service.port)})
        assert check.port == service.port
        assert await check_once(ADDRESS, service.port, check) == (PASS, True)
    assert await check_once(ADDRESS, closed_port(), check) == (FAIL, True)


async def test_https_with_a_certificate_for_another_name(tmp_path: Path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=inference.internal"], check=True, capture_output=True)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    async with Service(200, tls=tls) as service:
        assert await check_once(ADDRESS, service.port, http(protocol="HTTPS")) == (PASS, True)
    async with Service(200) as plain:  # an HTTPS check against a plain HTTP service: answered, failed
        assert await check_once(ADDRESS, plain.port, http(protocol="HTTPS")) == (FAIL, True)


@pytest.mark.parametrize("group,expected", [
    ({"HealthCheckProtocol": "HTTP", "HealthCheckPort": "traffic-port", "HealthCheckPath": "/ping",
      "Matcher": {"HttpCode": "200-399"}, "HealthCheckTimeoutSeconds": 5},
     HealthCheck("HTTP", None, "/ping", ((200, 399),), 5.0)),
    ({"HealthCheckProtocol": "HTTPS", "HealthCheckPort": "8443", "Matcher": {"HttpCode": "200,204"}},
     HealthCheck("HTTPS", 8443, "/", ((200, 200), (204, 204)), 5.0)),
    ({"HealthCheckProtocol": "HTTP", "ProtocolVersion": "GRPC", "Matcher": {"GrpcCode": "12"}},
     "a GRPC health check"),
    ({"HealthCheckProtocol": "HTTP", "ProtocolVersion": "HTTP2"}, "a HTTP2 health check"),
    ({"HealthCheckProtocol": "HTTP", "Matcher": {"HttpCode": "2xx"}},
     "a health check it cannot read (port 'traffic-port', codes '2xx')"),
])
def test_health_check_settings_from_describe_target_groups(group, expected):
    assert HealthCheck.of_target_group(group) == expected


async def test_prober_follows_an_instance_from_silent_to_ready(aws, deployment):
    """The target group as moto describes it (HTTP /health, traffic port), the guard's target_port, a real service."""
    readied = []
    prober = Prober(aws.elbv2, every=0.05, on_ready=lambda: readied.append(1))
    try:
        async with Service(503) as service:
            standby = Instance("i-s1", "running", address=ADDRESS)
            prober.watch("inference", deployment.target_group_arn, service.port, [standby])
            assert prober.verdict("i-s1") == SILENT  # nothing heard yet
            await until(lambda: prober.verdict("i-s1") == WAITING, what="the 503 heard")
            assert readied == []
            service.status = 200
            await until(lambda: prober.verdict("i-s1") == READY, what="ready")
            await until(lambda: len(service.heads) >= 4, what="probing goes on")
            assert readied == [1]  # said once, however many probes pass
            assert {h.split(b" ")[1] for h in service.heads} == {b"/health"}
            task = prober.probing["i-s1"].task
            prober.watch("inference", deployment.target_group_arn, service.port, [])  # registered: stop probing
            await asyncio.gather(task, return_exceptions=True)
            assert task.cancelled() and "i-s1" not in prober.probing
        assert prober.verdict("i-s1") == SILENT
        without = Instance("i-s2", "running", address=None)
        prober.watch("inference", deployment.target_group_arn, None, [without])
        assert prober.verdict("i-s2") is None
    finally:
        await prober.close()


async def test_an_unprobeable_group_says_so(aws, deployment, moto_world):
    moto_world.boto("elbv2").modify_target_group(TargetGroupArn=deployment.target_group_arn,
                                                 Matcher={"HttpCode": "200"}, HealthCheckPort="not-a-port")
    prober = Prober(aws.elbv2, every=0.05)
    try:
        prober.watch("inference", deployment.target_group_arn, None, [Instance("i-s1", "running", address=ADDRESS)])
        await until(lambda: prober.verdict("i-s1") is None, what="unprobeable")
    finally:
        await prober.close()


def test_the_suite_never_sends_to_a_private_range():
    """conftest's audit hook: a test that tried would fail, not send."""
    # 10.0.0.4 and 192.168.0.4, built from their octets.
    ten, home = (str(ipaddress.IPv4Address(bytes(octets))) for octets in ((10, 0, 0, 4), (192, 168, 0, 4)))
    with socket.socket() as s, pytest.raises(PermissionError, match="only to 127.0.0.0/8"):
        s.connect((ten, 8080))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(PermissionError):
        s.sendto(b"x", (home, 53))
