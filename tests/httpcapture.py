"""A real local HTTP server for tests that talk HTTP (Discord webhooks, ...).

`CaptureServer` listens on 127.0.0.1 on a free port, in a thread, and records
every request (method, path, headers, body). How it answers is set by the test:
status code, JSON body, extra headers, a delay, or "hold" (the handler blocks
until `release()` or `stop()`, so a stuck server costs no wall-clock time).

`refused_url()` gives a URL whose port is bound but not listening: connecting
there is refused at once. (Waiting for what the server saw: tests/waiting.py.)

This module must not mock anything: the client under test opens real sockets.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

# Upper bound on a "hold": a handler never blocks longer than this, even if a
# test forgets to release it, so a broken test cannot hang the suite.
MAX_HOLD = 30.0


@dataclass(frozen=True)
class Captured:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = 0.0  # time.monotonic() when it arrived

    @property
    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


@dataclass(frozen=True)
class Response:
    """How the server answers: status, JSON body, extra headers, delay before answering."""

    status: int = 200
    body: Any = field(default_factory=lambda: {"id": "1"})
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    trickle: float = 0.0  # send the body one byte every this many seconds (a server that never quite answers)


class CaptureServer:
    """Threaded HTTP server on 127.0.0.1 that records requests; use as a context manager."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[Captured] = []
        self._response = Response()
        self._script: Callable[[int], Response] | None = None  # request number (from 0) -> answer
        self._released = threading.Event()
        self._released.set()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        # A short poll interval: shutdown() waits up to one interval for the loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="capture-http", daemon=True
        )

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> "CaptureServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()  # let held handlers finish
        self._stopping.set()  # and trickling ones
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "CaptureServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- control

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def respond(self, status: int = 200, body: Any = None, *, headers: dict[str, str] | None = None,
                delay: float = 0.0, trickle: float = 0.0) -> None:
        """Answer every following request this way."""
        with self._lock:
            self._script = None
            self._response = Response(
                status=status,
                body={"id": "1"} if body is None else body,
                headers=tuple((headers or {}).items()),
                delay=delay,
                trickle=trickle,
            )

    def answer(self, script: Callable[[int], Response]) -> None:
        """Answer request number n (counted from 0) with `script(n)`, from now on."""
        with self._lock:
            self._script = script

    def hold(self) -> None:
        """Make handlers block before answering, until `release()` (or `stop()`)."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    @property
    def requests(self) -> list[Captured]:
        with self._lock:
            return list(self._requests)

    # ----------------------------------------------------------------- handler

    def _record(self, req: Captured) -> Response:
        with self._lock:
            self._requests.append(req)
            return self._response if self._script is None else self._script(len(self._requests) - 1)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                resp = server._record(Captured(self.command, self.path, dict(self.headers.items()), body,
                                               time.monotonic()))
                server._released.wait(MAX_HOLD)
                if resp.delay:
                    time.sleep(resp.delay)
                payload = b"" if resp.body == b"" else json.dumps(resp.body).encode()
                try:
                    self.send_response(resp.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in resp.headers:
                        self.send_header(name, value)
                    self.end_headers()
                    if not resp.trickle:
                        self.wfile.write(payload)
                    for n in range(len(payload) if resp.trickle else 0):
                        self.wfile.write(payload[n:n + 1])
                        self.wfile.flush()
                        if server._stopping.wait(resp.trickle):
                            break
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): nothing to answer

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output quiet

        return Handler


@contextlib.contextmanager
def refused_url() -> Iterator[str]:
    """A URL on 127.0.0.1 whose port is bound but not listening: connections are refused.

    Holding the bound socket keeps the port from being reused while the test runs.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
