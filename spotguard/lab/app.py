"""One instance's service: a tiny HTTP server on the instance's address that warms up, then serves.

`InstanceApp` is what runs on an instance while EC2 says it is running. It
listens at once (the OS is up) but answers 503 to everything, the health check
included, until its warm-up (the model loading) has passed; then `GET /health`
is 200 and any other GET takes `latency` and answers 200 naming the instance
in the body and the `X-Served-By` header. With a `concurrency`, at most that
many requests are served at a time and the others wait their turn (a model
server's queue); the health check never waits, so a busy instance stays
healthy. `kill()` is the instance stopping or
dying: the listener closes and every open connection is aborted, so requests
in flight fail as they would.

One request per connection (`Connection: close`), like the balancer's health
checks and forwarded requests: nothing survives a kill but errors.

This module must not know about EC2 or the balancer; the fleet starts and
kills apps, the balancer sends them requests.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .clock import ScenarioClock

SERVED_BY = "X-Served-By"
# A request head larger than this is not one the balancer sends.
MAX_HEAD = 16 * 1024


class InstanceApp:
    def __init__(self, instance_id: str, clock: ScenarioClock, *, warm_up: float, latency: float,
                 concurrency: int | None = None) -> None:
        self.instance_id = instance_id
        self.clock = clock
        self.warm_up = warm_up  # scenario seconds from start to serving
        self.latency = latency  # scenario seconds per request
        self._lanes = asyncio.Semaphore(concurrency) if concurrency else None  # None: no limit
        self.address: tuple[str, int] | None = None  # where it listens: the instance's (loopback) address
        self.ready_at: float | None = None  # scenario time it starts serving
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on host:port (port 0: any free one); the address it listens on."""
        self._server = await asyncio.start_server(self._connection, host, port, limit=MAX_HEAD)
        self.address = self._server.sockets[0].getsockname()[:2]
        self.ready_at = self.clock.now() + self.warm_up
        return self.address

    @property
    def ready(self) -> bool:
        return self.ready_at is not None and self.clock.now() >= self.ready_at

    def kill(self) -> None:
        """The instance is gone: stop listening and cut every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in list(self._open):
            transport.abort()
        self._open.clear()
        for task in list(self._tasks):
            task.cancel()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        task = asyncio.current_task()
        self._open.add(transport)  # type: ignore[arg-type]
        if task is not None:
            self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            status, body = await self._answer(_path(head))
            writer.write(_response(status, body, self.instance_id))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except asyncio.CancelledError:
            return  # killed mid-request: the transport is already aborted
        finally:
            self._open.discard(transport)  # type: ignore[arg-type]
            if task is not None:
                self._tasks.discard(task)
        writer.close()

    async def _answer(self, path: str) -> tuple[int, str]:
        if not self.ready:
            return 503, "warming up\n"
        if path == "/health":
            return 200, "ok\n"
        if self._lanes is None:
            await self.clock.sleep(self.latency)
        else:
            async with self._lanes:
                await self.clock.sleep(self.latency)
        return 200, f"served by {self.instance_id}\n"


def _path(head: bytes) -> str:
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].decode("latin-1").split("?", 1)[0] if len(parts) >= 2 else "/"


def _response(status: int, body: str, instance_id: str) -> bytes:
    reason = {200: "OK", 503: "Service Unavailable"}[status]
    data = body.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
        f"{SERVED_BY}: {instance_id}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data
