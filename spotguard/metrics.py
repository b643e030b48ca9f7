"""Prometheus metrics: a daemon observer, and the loopback endpoint that serves it.

`Metrics` keeps spotguard's metrics (every name starts `spotguard_`; the list
and their meaning are in docs/operations.md § 10) in its own registry, fed by
the daemon's observer hooks; `serve()`/`exposed()` serve them on
`[daemon] metrics_address` (127.0.0.1 unless told otherwise) from a daemon thread.

This module must not decide anything, call AWS, block the event loop or raise
into the daemon; it reads time only through the `at` the daemon passes.
"""

from __future__ import annotations

import ipaddress
import platform
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping
from wsgiref.simple_server import WSGIRequestHandler, make_server

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from . import __version__, defaults, machine
from .executor import ACTIONS, FAILED, OK
from .machine import Event, GuardState, Observed, Phase, Start

log = structlog.get_logger("spotguard.metrics")

SHUTDOWN_POLL = 0.05  # seconds; how soon close() is noticed by the serving thread


# Notice to StartInstances done: ~1 s on the SQS/agent path, up to a poll
# interval more on the poll path; the whole budget is the 120 s notice.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
ACTION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Ready margins: late (negative) to well ahead; a margin under ~10 s is one health check from an outage.
MARGIN_BUCKETS = (-60.0, -30.0, -10.0, 0.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0)


@dataclass
class _Watch:
    """What one guard's metrics need to remember between hooks (loop thread only)."""

    phase: Phase = machine.INITIAL_PHASE
    noticed_at: float | None = None  # the detection clock, running since the first notice
    running: int = 0  # standbys running in the last observation
    last_at: float | None = None  # the previous event of this guard


class Metrics:
    """The daemon observer behind the Prometheus endpoint; `registry` holds its metrics."""

    def __init__(self, guards: Iterable[Any] = ()) -> None:
        """`guards`: the guard settings (or just names); their series exist from the start."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._phases: Mapping[str, Any] | None = None  # the daemon's guards, once watched
        r.register(_PhaseCollector(self))
        self.phase_changes = Counter(
            "spotguard_phase_changes",
            "Phase changes of the guard, by the phase left and the phase entered.",
            ["guard", "from", "to"],
            registry=r,
        )
        self.failovers = Counter(
            "spotguard_failovers", "Failovers begun: spot-healthy to standby-starting.", ["guard"], registry=r
        )
        self.latency = Histogram(
            "spotguard_detection_latency_seconds",
            "Seconds from the daemon learning of a spot interruption to StartInstances of a standby succeeding.",
            ["guard"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ready_margin = Histogram(
            "spotguard_ready_margin_seconds",
            "Per interruption: seconds from the replacement healthy to the spot's deadline (negative: late).",
            ["guard"],
            buckets=MARGIN_BUCKETS,
            registry=r,
        )
        # The histogram has negative buckets, so the client exposes no _sum: the latest is its own gauge.
        self.last_ready_margin = Gauge(
            "spotguard_last_ready_margin_seconds",
            "The latest ready margin: the replacement healthy this many seconds before the spot's deadline.",
            ["guard"],
            registry=r,
        )
        self.last_latency = Gauge(
            "spotguard_last_detection_latency_seconds",
            "The latest detection latency: interruption known to standby StartInstances succeeded, in seconds.",
            ["guard"],
            registry=r,
        )
        self.standby_seconds = Counter(
            "spotguard_standby_seconds",
            "Instance-seconds of standbys observed running (On-Demand billed time), as of the guard's last event.",
            ["guard"],
            registry=r,
        )
        self.actions = Counter(
            "spotguard_aws_actions",
            "AWS actions carried out, by API call and outcome (ok or failed).",
            ["guard", "action", "outcome"],
            registry=r,
        )
        self.action_seconds = Histogram(
            "spotguard_aws_action_seconds", "Duration of AWS actions, retries included.", ["action"],
            buckets=ACTION_BUCKETS, registry=r,
        )
        self.errors = Counter(
            "spotguard_aws_errors", "Failed AWS actions by API call and AWS error code.", ["guard", "action", "code"],
            registry=r,
        )
        self.last_observation = Gauge(
            "spotguard_last_observation_timestamp_seconds",
            "When the guard's instances and targets were last described successfully (Unix time).",
            ["guard"],
            registry=r,
        )
        self.poll_errors = Counter(
            "spotguard_poll_errors", "Rounds in which the guard could not be observed, by the Describe that failed "
            "and its error code.", ["guard", "api", "code"], registry=r,
        )
        self.save_errors = Counter(
            "spotguard_state_save_errors", "Failed writes of the guard's state file (the daemon acted anyway).",
            ["guard"], registry=r,
        )
        self.unsaved = Gauge(
            "spotguard_state_unsaved", "1 while the guard's latest state is not on disk.", ["guard"], registry=r
        )
        Info("spotguard_build", "The spotguard version and the Python running it.", registry=r).info(
            {"version": __version__, "python": platform.python_version()})
        ProcessCollector(namespace="spotguard", registry=r)  # spotguard_process_*: memory, CPU, fds
        r.register(_SourceCollector(self))
        self._sqs: Any = None  # the SQS source, once watched
        self._ha: Any = None  # the [ha] leadership, once watched
        self._watch: dict[str, _Watch] = {}
        for guard in guards:
            self._add(guard if isinstance(guard, str) else guard.name)

    # ------------------------------------------------------------------ setup

    def _add(self, name: str) -> _Watch:
        watch = self._watch[name] = _Watch()
        self.failovers.labels(name)
        self.standby_seconds.labels(name)
        self.save_errors.labels(name)
        self.unsaved.labels(name)
        return watch

    def _guard(self, name: str) -> _Watch:
        return self._watch.get(name) or self._add(name)

    def watch_phases(self, guards: Mapping[str, Any]) -> None:
        """Read `spotguard_phase` from the daemon's guards (`daemon.guards`) at each scrape.

        Without this the gauge follows the transition hook, which misses a phase
        loaded from the state file at start and, with [ha], the leader's states a
        follower adopts. Reading a guard's (immutable) state from the server
        thread is safe: the loop only ever swaps the reference.
        """
        self._phases = guards

    def watch_sources(self, *, sqs: Any = None, ha: Any = None) -> None:
        """Read the SQS source's message counts and the [ha] leadership at each scrape."""
        self._sqs, self._ha = sqs, ha

    def current_phases(self) -> dict[str, Phase]:
        """Each guard's phase as the gauge shows it."""
        phases = {name: watch.phase for name, watch in list(self._watch.items())}
        if self._phases is not None:
            phases.update({name: guard.state.phase for name, guard in list(self._phases.items())})
        return phases

    # ------------------------------------------------------------------ Observer hooks

    def event(self, guard: str, event: Event, old: GuardState, new: GuardState, at: float) -> None:
        watch = self._guard(guard)
        self._advance_standby(guard, watch, at)
        if isinstance(event, Observed):
            watch.running = sum(1 for i in event.standbys if i.state == "running")
        # The machine says which spots this event doomed; a repeat notice dooms none.
        if new.doomed - old.doomed and watch.noticed_at is None:
            watch.noticed_at = at
        for _, seconds in machine.ready_margins(old, new, at):
            self.ready_margin.labels(guard).observe(seconds)
            self.last_ready_margin.labels(guard).set(seconds)

    def transition(self, guard: str, old: GuardState, new: GuardState, at: float, slot: int | None = None) -> None:
        watch = self._guard(guard)
        if slot is None:  # a fleet's phase is its guard state's (read from the daemon), not one slot's
            watch.phase = new.phase
        self.phase_changes.labels(guard, old.phase.value, new.phase.value).inc()
        if old.phase is Phase.SPOT_HEALTHY and new.phase is Phase.STANDBY_STARTING:
            self.failovers.labels(guard).inc()
        if new.phase is not Phase.STANDBY_STARTING:
            watch.noticed_at = None  # served without a start: nothing to measure

    def polled(self, guard: str, error: Exception | None, at: float) -> None:
        if error is None:
            self.last_observation.labels(guard).set(at)
        else:
            api, code = getattr(error, "api", "poll"), getattr(error, "code", type(error).__name__)
            self.poll_errors.labels(guard, api, code).inc()

    def saved(self, guard: str, error: str | None, at: float) -> None:
        if error is not None:
            self.save_errors.labels(guard).inc()
        self.unsaved.labels(guard).set(0 if error is None else 1)

    def action(self, guard: str, command: machine.Command, failed: machine.Failed | None, seconds: float,
               at: float) -> None:
        name = ACTIONS.get(type(command))
        if name is None:
            return  # an Alert is no AWS call (the daemon does not report them anyway)
        self.actions.labels(guard, name, FAILED if failed else OK).inc()
        self.action_seconds.labels(name).observe(max(0.0, seconds))
        if failed is not None:
            self.errors.labels(guard, name, failed.code).inc()
            return
        watch = self._guard(guard)
        if isinstance(command, Start) and watch.noticed_at is not None:
            latency = max(0.0, at - watch.noticed_at)
            watch.noticed_at = None
            self.latency.labels(guard).observe(latency)
            self.last_latency.labels(guard).set(latency)

    # ------------------------------------------------------------------ helpers

    def _advance_standby(self, guard: str, watch: _Watch, at: float) -> None:
        if watch.last_at is not None and watch.running and at > watch.last_at:
            self.standby_seconds.labels(guard).inc((at - watch.last_at) * watch.running)
        # A clock stepped back is not time served; the next event counts from here.
        watch.last_at = at


class _PhaseCollector:
    """`spotguard_phase`, computed at scrape time so it is never stale."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        for name, current in sorted(self.metrics.current_phases().items()):
            for phase in Phase:
                family.add_metric([name, phase.value], 1 if phase is current else 0)
        yield family

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("spotguard_phase", "1 for the guard's current phase, 0 for the others.",
                                 labels=["guard", "phase"])


class _SourceCollector:
    """The SQS source's message counts and the [ha] leader, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return list(self._families(None, None))

    def collect(self) -> Iterator[Any]:
        yield from self._families(self.metrics._sqs, self.metrics._ha)

    @staticmethod
    def _families(sqs: Any, ha: Any) -> Iterator[Any]:
        messages = CounterMetricFamily("spotguard_sqs_messages", "SQS messages by what became of them.",
                                       labels=["outcome"])
        last = GaugeMetricFamily("spotguard_sqs_last_receive_timestamp_seconds",
                                 "When ReceiveMessage last answered (Unix time).")
        leader = GaugeMetricFamily("spotguard_leader", "With [ha]: 1 while this daemon holds the lease, else 0.")
        if sqs is not None:
            for outcome, count in list(sqs.counts.items()):
                messages.add_metric([outcome], count)
            if sqs.received_at is not None:
                last.add_metric([], sqs.received_at)
        if ha is not None:
            leader.add_metric([], 1 if ha.leading() else 0)
        yield from (messages, last, leader)


# ---------------------------------------------------------------------- endpoint


class Server:
    """The running endpoint: `port` is the one bound (useful with port 0); `close()` stops it."""

    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host, self.port = httpd.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port (within one SHUTDOWN_POLL)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)
        log.info("metrics.stopped", port=self.port)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Quiet(WSGIRequestHandler):
    """No access log on stderr: a scrape every 15 s is not news for journald."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer6(ThreadingWSGIServer):
    # socketserver binds AF_INET whatever the address: an IPv6 one needs its own class.
    address_family = socket.AF_INET6


def serve(port: int, metrics: Metrics, address: str = defaults.METRICS_ADDRESS) -> Server:
    """Serve `metrics` on `address`:`port` (0: any free port) from a daemon thread.

    Loopback by default: the endpoint has no authentication, and the nano's own
    agent (or an SSH tunnel) is what scrapes it. Raises OSError if the address
    cannot be bound (the port taken, the address not this host's).
    """
    server_class = _ThreadingWSGIServer6 if ipaddress.ip_address(address).version == 6 else ThreadingWSGIServer
    # prometheus_client's start_http_server, but with a short shutdown poll (its
    # serve_forever polls every 0.5 s, which a SIGTERM and every test would wait).
    httpd = make_server(address, port, make_wsgi_app(metrics.registry), server_class, handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": SHUTDOWN_POLL},
                              name="spotguard-metrics", daemon=True)
    thread.start()
    server = Server(httpd, thread)
    log.info("metrics.serving", url=server.url)
    return server


@contextmanager
def exposed(port: int | None, guards: Iterable[Any],
            address: str = defaults.METRICS_ADDRESS) -> Iterator[Metrics | None]:
    """The daemon's metrics, served on `address`:`port` while inside; None without a port.

    Without a port (no `[daemon] metrics_port`) nothing is created and nothing
    listens. A port that cannot be bound is logged (`metrics.serve.failed`) and
    the daemon runs on without the endpoint: failover matters more than metrics.
    """
    if port is None:
        yield None
        return
    metrics = Metrics(guards)
    try:
        server: Server | None = serve(port, metrics, address)
    except OSError as exc:
        log.error("metrics.serve.failed", address=address, port=port, error=type(exc).__name__, detail=str(exc))
        server = None
    try:
        yield metrics
    finally:
        if server is not None:
            server.close()
