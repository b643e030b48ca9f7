"""A real HTTP proxy between a spotguard process and the moto server, for fault tests.

`AwsProxy(upstream)` listens on 127.0.0.1 (a free port) and forwards every
request to `upstream` (moto's endpoint_url), keeping the client's headers
(SigV4's Host included) and answering with upstream's reply. Give `proxy.url`
to spotguard as `aws.endpoint_url`; the test then decides, per AWS action,
what reaches AWS and what comes back:

  * `hold(action)`: the next matching request waits *before* it is forwarded
    (AWS has not seen it); `hold(action, after=True)`: it is forwarded, AWS
    carries it out, and the reply is withheld. Either way `Hold.arrived` is
    set once one is waiting; `Hold.release()` lets it go on, `Hold.drop()`
    closes the client's connection without forwarding (before) or without
    answering (after). So a test can kill a process exactly on either side of
    an AWS call. `match=` narrows a hold to some requests (e.g. one instance
    id in `ProxyRequest.params`); `count=` holds more than one (None: all
    until release/drop).
  * `blackhole()`: requests are accepted and read but never answered, as
    behind a dead route; `blackhole(False)` forwards new requests again.
  * `actions` / `requests`: what was forwarded to AWS, in order (each
    `ProxyRequest` with its action, parameters and arrival time `at`).

The action is the query or form `Action=` parameter (EC2, ELBv2: query
protocol) or the suffix of the `X-Amz-Target` header (JSON protocols, e.g.
`AmazonSQS.ReceiveMessage` → `ReceiveMessage`).

This module must not change a request or a reply (beyond hop-by-hop headers
and the body's framing) nor answer anything on AWS's behalf: a request is
either forwarded as sent, or not answered at all.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping

# A held or blackholed request is never kept longer than this, so a test that
# forgets one cannot hang the suite; past it the connection is closed unanswered.
MAX_HOLD = 120.0
UPSTREAM_TIMEOUT = 30.0
# Headers that belong to one connection, not to the request or reply.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "content-length", "expect"}
)
# http.server adds its own; upstream's copies would be duplicates.
OWN_REPLY_HEADERS = frozenset({"server", "date"})


@dataclass(frozen=True)
class ProxyRequest:
    """One request as the client sent it, with its AWS action and parameters."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    action: str | None
    # Query/form parameters (last value wins), or the JSON body's top-level object.
    params: Mapping[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)  # when the proxy read it (time.monotonic)


def parse(method: str, path: str, headers: Mapping[str, str], body: bytes) -> ProxyRequest:
    """The request with its action and parameters read the way AWS reads them."""
    lower = {k.lower(): v for k, v in headers.items()}
    params: dict[str, Any] = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
    if "x-www-form-urlencoded" in lower.get("content-type", ""):
        params.update(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
    action = params.get("Action")
    target = lower.get("x-amz-target")
    if target:
        action = target.rsplit(".", 1)[-1]
        try:
            decoded = json.loads(body or b"{}")
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            params = decoded
    return ProxyRequest(method, path, tuple(headers.items()), body, action, params)


class Hold:
    """Requests of one action kept waiting until the test decides; see `AwsProxy.hold`."""

    def __init__(self, action: str, after: bool, match: Callable[[ProxyRequest], bool] | None, count: int | None):
        self.action = action
        self.after = after
        self.match = match
        self.count = count
        self.arrived = threading.Event()  # set once a request is waiting
        self._decided = threading.Event()
        self._verdict = "drop"
        self._lock = threading.Lock()
        self._held: list[ProxyRequest] = []
        self._ended = False

    @property
    def requests(self) -> list[ProxyRequest]:
        """The requests this hold caught, in order."""
        with self._lock:
            return list(self._held)

    def release(self) -> None:
        """Let every waiting request go on (forwarded, or its reply sent); the hold catches no more."""
        self._end("release")

    def drop(self) -> None:
        """Close every waiting request's connection unanswered; the hold catches no more."""
        self._end("drop")

    def _end(self, verdict: str) -> None:
        with self._lock:
            if not self._ended:
                self._verdict, self._ended = verdict, True
        self._decided.set()

    def _claim(self, request: ProxyRequest) -> bool:
        """Catch `request` if it is one this hold waits for."""
        if request.action != self.action or (self.match is not None and not self.match(request)):
            return False
        with self._lock:
            if self._ended or (self.count is not None and len(self._held) >= self.count):
                return False
            self._held.append(request)
            return True

    def _wait(self, stopping: threading.Event) -> str:
        """Block the handler until release/drop; 'drop' too when the proxy stops or MAX_HOLD passes."""
        self.arrived.set()
        deadline = time.monotonic() + MAX_HOLD
        while not self._decided.wait(0.05):
            if stopping.is_set() or time.monotonic() > deadline:
                return "drop"
        return self._verdict


class AwsProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of `upstream`; use as a context manager."""

    def __init__(self, upstream: str):
        split = urllib.parse.urlsplit(upstream)
        if split.scheme != "http" or not split.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream = (split.hostname, split.port or 80)
        self._lock = threading.Lock()
        self._holds: list[Hold] = []
        self._forwarded: list[ProxyRequest] = []
        self._blackholed = False
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="aws-proxy", daemon=True
        )

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> "AwsProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting; held and blackholed requests are closed unanswered."""
        self._stopping.set()
        if self._thread.is_alive():  # shutdown() waits for serve_forever, forever if it never ran
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> "AwsProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ----------------------------------------------------------------- control

    def hold(
        self,
        action: str,
        after: bool = False,
        *,
        match: Callable[[ProxyRequest], bool] | None = None,
        count: int | None = 1,
    ) -> Hold:
        """Hold the next `count` requests of `action` (None: every one until release/drop).

        Before forwarding by default; with `after`, once AWS has answered, with
        the reply withheld. `match`, when given, narrows the hold to requests
        it accepts (e.g. one instance id in `request.params`).
        """
        hold = Hold(action, after, match, count)
        with self._lock:
            self._holds.append(hold)
        return hold

    def blackhole(self, on: bool = True) -> None:
        """While on, new requests are read and never answered (an unreachable endpoint)."""
        with self._lock:
            self._blackholed = on

    @property
    def actions(self) -> list[str | None]:
        """The actions forwarded to upstream, in order."""
        with self._lock:
            return [r.action for r in self._forwarded]

    @property
    def requests(self) -> list[ProxyRequest]:
        """The requests forwarded to upstream, in order."""
        with self._lock:
            return list(self._forwarded)

    # ----------------------------------------------------------------- one request

    def _route(self, request: ProxyRequest) -> tuple[str, Hold | None]:
        """('blackhole', None), or ('forward', the hold that caught it or None)."""
        with self._lock:
            if self._blackholed:
                return "blackhole", None
            holds = list(self._holds)
        return "forward", next((h for h in holds if h._claim(request)), None)

    def _forward(self, request: ProxyRequest) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=UPSTREAM_TIMEOUT)
        try:
            headers = {k: v for k, v in request.headers if k.lower() not in HOP_BY_HOP}
            conn.request(request.method, request.path, body=request.body, headers=headers)
            reply = conn.getresponse()
            payload = reply.read()
            kept = [(k, v) for k, v in reply.getheaders() if k.lower() not in HOP_BY_HOP | OWN_REPLY_HEADERS]
            with self._lock:
                self._forwarded.append(request)
            return reply.status, reply.reason, kept, payload
        finally:
            conn.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's pools expect

            def _handle(self) -> None:
                request = parse(self.command, self.path, dict(self.headers.items()), self._body())
                verdict, hold = proxy._route(request)
                if verdict == "blackhole":
                    proxy._stopping.wait(MAX_HOLD)
                    return self._hang_up()
                if hold is not None and not hold.after and hold._wait(proxy._stopping) == "drop":
                    return self._hang_up()
                try:
                    status, reason, headers, payload = proxy._forward(request)
                except OSError:  # upstream unreachable: the client sees a dead connection, as it would
                    return self._hang_up()
                if hold is not None and hold.after and hold._wait(proxy._stopping) == "drop":
                    return self._hang_up()
                self._answer(status, reason, headers, payload)

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    return self._chunks()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _chunks(self) -> bytes:
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()

            def _answer(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes) -> None:
                try:
                    self.send_response(status, reason)
                    for name, value in headers:
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    self.close_connection = True  # the client is gone (killed, or gave up)

            def _hang_up(self) -> None:
                """Close the client's connection with no reply at all."""
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output quiet

        return Handler
