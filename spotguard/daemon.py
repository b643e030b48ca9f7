"""The daemon: the imperative shell around `machine.step`.

Each round it hands pending notices to their guards, observes the world (one
batched poll) and hands each guard the observation. One worker per guard steps
the machine, persists the new state before its commands run (write ahead),
carries them out and feeds failures back; observers (metrics, ledger) are told
after the fact. With `[ha]` only the lease holder steps and acts (docs/ha.md).
`run()` owns the process (logging, signals, systemd); `serve()` is the loop
plus its fast sources, and is what tests drive.

This module must not hold a failover rule (machine.py does) nor call AWS itself.
"""

from __future__ import annotations

import asyncio
import signal
import time
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, ContextManager, Protocol, Sequence

import structlog

from . import machine, sdnotify, store
from .machine import Alert, Event, GuardState, Notice, Observed

log = structlog.get_logger("spotguard")


@dataclass
class Guard:
    """One guard's settings, its machine state, and the events waiting for its worker."""

    settings: Any
    state: GuardState
    # Notices in order, then the newest observation: a newer one replaces one not
    # yet stepped, since the machine only needs the latest view of the world.
    queued: list[Event] = field(default_factory=list)
    latest: Observed | None = None
    worker: asyncio.Task | None = None  # steps and acts on the queue; ends when it is empty
    acting: int = 0  # AWS commands in flight
    acted: float = float("-inf")  # monotonic time the last command ended

    @property
    def name(self) -> str:
        return self.settings.name


class Observer(Protocol):
    """Watches what the daemon does (metrics, the ledger behind `status`, summaries).

    Observers are told after the fact and must not block or raise: an
    observer's failure is logged and never stops a failover. `event` comes
    with the states before and after the machine stepped it, so an observer
    reads what the machine concluded (say, a newly doomed spot) instead of
    deciding it again.
    """

    def event(self, guard: str, event: Event, old: GuardState, new: GuardState, at: float) -> None: ...

    def transition(self, guard: str, old: GuardState, new: GuardState, at: float) -> None: ...

    def action(self, guard: str, command: machine.Command, failed: machine.Failed | None, seconds: float, at: float) -> None: ...


class Daemon:
    """Runs the guards. Every collaborator is injected so tests pass their own."""

    def __init__(
        self,
        settings: Any,
        *,
        poller: Any,
        executor: Any,
        store: Any,
        notifier: Any,
        clock: Callable[[], float] = time.time,
        observers: Sequence[Observer] = (),
        ha: Any = None,
    ) -> None:
        self.settings = settings
        self.poller = poller
        self.executor = executor
        self.store = store
        self.notifier = notifier
        self.clock = clock
        self.observers = tuple(observers)
        self.ha = ha  # ha.Leadership with [ha]; None: this daemon runs alone and always acts
        self.loaded_epoch: int | None = None  # the lease epoch whose shared states we loaded
        self.guards = {g.name: Guard(g, self._load(g)) for g in settings.guards}
        self.notices: asyncio.Queue[Notice] = asyncio.Queue()
        self.woken = asyncio.Event()  # set by push()/wake(): start a round now
        self.rounds = 0  # completed observation rounds; tests wait on it

    # ------------------------------------------------------------------ lifecycle

    def _load(self, settings: Any) -> GuardState:
        state = self.store.load(settings.name, settings.rules())
        if state is None:
            return machine.initial(settings.rules(), self.clock())
        log.info("guard.resumed", guard=settings.name, phase=state.phase.value, standby=state.standby)
        return machine.resumed(state)

    async def async_run(self, stop: asyncio.Event, ready: Callable[[], None] = lambda: None) -> None:
        """Observe and act until `stop` is set; `ready` is called after the first round.

        Rounds are timed on the monotonic clock (a wall-clock step must not stall
        them) and do not wait for the guards' commands: each guard's worker
        carries them out, so one guard's slow or throttled call never delays
        another guard's next round. On `stop` the commands in flight finish.
        """
        try:
            while not stop.is_set():
                started = time.monotonic()
                await self.round(settle=self.rounds == 0)  # READY=1 once the first step is done
                if self.rounds == 1:
                    ready()
                self._reraise()
                await self._wait(stop, started + self._interval())
            await self.settle()
        finally:
            self._cancel_workers()

    def push(self, notice: Notice) -> None:
        """Hand in a notice from a fast source (SQS, agent); it wakes the loop at once."""
        self.notices.put_nowait(notice)
        self.woken.set()

    def wake(self) -> None:
        """Look at the world now rather than at the next poll (e.g. a spot was fulfilled)."""
        self.woken.set()

    def owns(self, instance_id: str) -> bool:
        """Whether a guard knows this instance, as of the last observation."""
        return self._owner(instance_id, {}) is not None

    def _interval(self) -> float:
        return machine.poll_interval((g.state for g in self.guards.values()), self.settings.daemon.poll_interval)

    async def _wait(self, stop: asyncio.Event, until: float) -> None:
        """Sleep until the next round is due, we are woken, or we are stopped."""
        timeout = max(0.0, until - time.monotonic())
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.woken.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # ------------------------------------------------------------------ one round

    async def round(self, settle: bool = True) -> None:
        """One round: hand pending notices to their guards at once, then poll and hand
        each guard the observation; with `settle`, return once every guard has acted."""
        # Notices go first, on the last observation: the machine only starts and
        # registers on them (never deregisters or stops), so a failover starts without
        # waiting for a whole poll. A notice for an instance no guard has seen yet
        # (a spot fulfilled since the last poll) waits for this round's poll.
        self.woken.clear()
        if self.ha is not None and not await self._lead():
            await self._follow()
            self.rounds += 1
            return
        later = self._route(self._drain_notices(), {}, final=False)
        if settle:
            await self.settle()  # as before a poll that waits for nothing: notices acted on first
        polled = time.monotonic()
        try:
            seen = await self.poller.observe(steady=self._steady(), now=self.clock())
        except Exception as exc:  # noqa: BLE001 - a failed poll must never kill the daemon
            log.error("guard.poll.failed", error=type(exc).__name__, detail=str(exc))
            seen = {}
        self._route(later, seen, final=True)
        for name, observed in seen.items():
            guard = self.guards.get(name)
            # An observation taken while one of the guard's commands was in flight may
            # predate it; stepping it would repeat the command. The next poll is fresh.
            if guard is not None and not guard.acting and guard.acted < polled:
                self._enqueue(guard, observed)
        if settle:
            await self.settle()
        self.rounds += 1

    def _steady(self) -> set[str]:
        """Steady guards with nothing queued or in flight: the poller may reuse their target health."""
        return {name for name, g in self.guards.items() if machine.is_steady(g.state) and not g.queued and not g.acting}

    def _enqueue(self, guard: Guard, event: Event) -> None:
        if isinstance(event, Observed):
            guard.latest = event
        else:
            guard.queued.append(event)
        if guard.worker is None or guard.worker.done():
            guard.worker = asyncio.create_task(self._work(guard))

    async def _work(self, guard: Guard) -> None:
        """Step and act on a guard's events in order until none is left."""
        while guard.queued or guard.latest is not None:
            if guard.queued:
                event = guard.queued.pop(0)
            else:
                event, guard.latest = guard.latest, None
            await self.apply(guard, event)

    async def settle(self) -> None:
        """Wait until every guard has stepped and acted on everything handed to it."""
        while busy := [g.worker for g in self.guards.values() if g.worker is not None and not g.worker.done()]:
            await asyncio.wait(busy)
        self._reraise()

    def _reraise(self) -> None:
        # A worker only fails when the write-ahead save does (disk full, read-only):
        # acting without it would be unsafe, so the daemon stops and systemd restarts it.
        for guard in self.guards.values():
            if guard.worker is not None and guard.worker.done() and not guard.worker.cancelled():
                error = guard.worker.exception()
                if error is not None:
                    raise error

    def _cancel_workers(self) -> None:
        for guard in self.guards.values():
            guard.queued.clear()
            guard.latest = None
            if guard.worker is not None:
                guard.worker.cancel()

    async def _lead(self) -> bool:
        """Whether to act this round; on a newly won lease, the shared states are loaded first."""
        if not self.ha.leading():
            return False
        if self.loaded_epoch == self.ha.epoch:
            return True
        epoch = self.ha.epoch
        shared = await self.ha.states(self._rules(), consistent=True)
        if shared is None or self.ha.epoch != epoch:
            return False
        self._cancel_workers()  # nothing decided in an earlier term may still run
        self._adopt({name: machine.resumed(state) for name, state in shared.items()})
        self.loaded_epoch = epoch
        log.info("ha.states.loaded", epoch=epoch, guards={n: g.state.phase.value for n, g in self.guards.items()})
        return True

    async def _follow(self) -> None:
        """A follower's round: observe and adopt the leader's states; step nothing, so act on nothing."""
        for notice in self._drain_notices():  # the leader's own sources see the same notices
            log.info("ha.follower.notice.dropped", instance_id=notice.instance_id, kind=notice.kind)
        self._cancel_workers()  # deposed: stop acting now, as a kill -9 would
        self.loaded_epoch = None
        try:
            seen = await self.poller.observe(steady=self._steady(), now=self.clock())
        except Exception as exc:  # noqa: BLE001 - a follower's failed poll changes nothing
            log.warning("guard.poll.failed", error=type(exc).__name__, detail=str(exc))
            seen = {}
        shared = await self.ha.states(self._rules(), consistent=False)
        self._adopt(shared or {})
        for name, observed in seen.items():
            if name in self.guards:
                self.guards[name].state = replace(self.guards[name].state, seen=observed)

    def _rules(self) -> dict[str, machine.Rules]:
        return {name: g.settings.rules() for name, g in self.guards.items()}

    def _adopt(self, shared: dict[str, GuardState]) -> None:
        # The shared state never holds an observation; ours is as fresh as any.
        for name, state in shared.items():
            guard = self.guards[name]
            if store.differs(guard.state, state):
                self.store.save(name, state)  # the local mirror `status` reads
            guard.state = replace(state, seen=guard.state.seen)

    def _route(self, notices: list[Notice], seen: dict[str, Observed], final: bool) -> list[Notice]:
        """Hand each notice to its guard's worker; return those no guard owns (yet)."""
        unowned = []
        for notice in notices:
            owner = self._owner(notice.instance_id, seen)
            if owner is not None:
                self._enqueue(self.guards[owner], notice)
            elif final:
                log.info("guard.notice.unowned", instance_id=notice.instance_id, kind=notice.kind)
            else:
                unowned.append(notice)
        return unowned

    def _drain_notices(self) -> list[Notice]:
        out = []
        while not self.notices.empty():
            out.append(self.notices.get_nowait())
        return out

    def _owner(self, instance_id: str, seen: dict[str, Observed]) -> str | None:
        for name, guard in self.guards.items():
            observed = seen.get(name) or guard.state.seen
            spots = observed.spots if observed else ()
            if any(i.id == instance_id for i in spots) or instance_id in guard.settings.standby_instance_ids:
                return name
        return None

    async def apply(self, guard: Guard, event: Event) -> None:
        """Step the machine, persist, then carry out the commands (write ahead)."""
        if not self._may_act(guard, "step"):
            return
        old, now = guard.state, self.clock()
        new, commands = machine.step(old, event, now)
        guard.state = new
        self._tell("event", guard.name, event, old, new, now)
        if store.differs(old, new) and not await self._save(guard, old, new):
            return
        if new.phase is not old.phase:
            self._transition(guard, old, new)
            self._tell("transition", guard.name, old, new, now)
        for command in commands:
            if not self._may_act(guard, type(command).__name__.lower()):
                return
            failed = await self._carry_out(guard, command)
            if failed is not None:
                await self.apply(guard, failed)

    def _may_act(self, guard: Guard, what: str) -> bool:
        """With [ha]: only while the lease is ours and valid by our own clock, and its states loaded."""
        if self.ha is None or (self.ha.leading() and self.ha.epoch == self.loaded_epoch):
            return True
        log.warning("ha.gate.closed", guard=guard.name, skipped=what, holder=self.ha.holder)
        return False

    async def _save(self, guard: Guard, old: GuardState, new: GuardState) -> bool:
        """Persist before acting. With [ha] the write is fenced: refused or failed, the state
        reverts (so the next round decides the same step again) and nothing is carried out."""
        if self.ha is None:
            self.store.save(guard.name, new)
            return True
        if await self.ha.save(guard.name, new):
            self.store.save(guard.name, new)  # a local mirror, so `status` reads the phase on either controller
            return True
        guard.state = old
        return False

    def _transition(self, guard: Guard, old: GuardState, new: GuardState) -> None:
        spots = [i.id for i in new.seen.spots] if new.seen else []
        log.info(
            "guard.transition",
            guard=guard.name,
            **{"from": old.phase.value, "to": new.phase.value},
            reason=new.reason,
            standby=new.standby,
            spots=spots,
        )
        self.notifier.notify(f"[{guard.name}] {old.phase.value} → {new.phase.value}: {new.reason}")

    async def _carry_out(self, guard: Guard, command: machine.Command) -> machine.Failed | None:
        if isinstance(command, Alert):
            log.warning("guard.alert", guard=guard.name, text=command.text)
            self.notifier.notify(f"[{guard.name}] ⚠ {command.text}")
            return None
        started = time.monotonic()
        guard.acting += 1
        try:
            failed = await self.executor.run(guard.name, command)
        finally:
            guard.acting -= 1
            guard.acted = time.monotonic()
        self._tell("action", guard.name, command, failed, guard.acted - started, self.clock())
        return failed

    def _tell(self, what: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, what)(*args)
            except Exception as exc:  # noqa: BLE001 - an observer must never stop a failover
                log.error("guard.observer.failed", observer=type(observer).__name__, hook=what, error=type(exc).__name__, detail=str(exc))


# ---------------------------------------------------------------------- process


def run(settings: Any) -> int:
    """Run the daemon until SIGTERM/SIGINT; the exit code for the process."""
    from . import logs

    logs.configure(settings.daemon.log_format)
    try:
        asyncio.run(_main(settings))
    except Exception as exc:  # noqa: BLE001 - logged as one line for journald, then systemd restarts us
        log.critical("daemon.crashed", error=type(exc).__name__, detail=str(exc))
        return 1
    return 0


def build(settings: Any, aws: Any, notifier: Any, observers: Sequence[Observer] = (), *, ha: Any = None) -> Daemon:
    """The daemon wired to real parts: poll source, executor and store on `aws` clients;
    `ha` is the ha.Leadership gating it when `[ha]` is set."""
    from .executor import Executor
    from .sources.poll import Poller
    from .store import Store

    return Daemon(
        settings,
        poller=Poller(aws.ec2, aws.elbv2, settings.guards),
        executor=Executor(aws.ec2, aws.elbv2, settings.guards),
        store=Store(settings.daemon.state_dir),
        notifier=notifier,
        observers=observers,
        ha=ha,
    )


async def _main(settings: Any) -> None:
    from .aws import clients
    from .ledger import Ledger
    from .notify import Notifier

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = Notifier(settings.discord.webhook_url if settings.discord else None)
    await notifier.start()
    with _metrics(settings) as metrics:
        async with clients(settings.aws.region, settings.aws.endpoint_url) as aws, _leadership(settings, notifier) as ha:
            observers = [Ledger(settings.daemon.state_dir, settings.guards), *([metrics] if metrics else [])]
            daemon = build(settings, aws, notifier, observers, ha=ha)
            if metrics is not None:
                metrics.watch_phases(daemon.guards)  # phases resumed from the state files, or adopted with [ha]
            summary = _summary(settings, notifier, ha)
            log.info("daemon.started", guards=list(daemon.guards), poll_interval=settings.daemon.poll_interval,
                     holder=ha.holder if ha else None, metrics_port=settings.daemon.metrics_port)
            watchdog = asyncio.create_task(_watchdog())
            try:
                await serve(daemon, settings, aws, stop, ready=_ready)
            finally:
                if summary is not None:
                    summary.shutdown()
                watchdog.cancel()
                sdnotify.stopping()
                if ha is not None:
                    await ha.release()  # the follower takes over at its next look, not a lease later
                await notifier.close()
    log.info("daemon.stopped")


def _metrics(settings: Any) -> ContextManager[Any]:
    """The Prometheus endpoint on loopback with [daemon] metrics_port; without it nothing
    listens and prometheus-client is never imported (start-up time on a t4g.nano)."""
    if settings.daemon.metrics_port is None:
        return nullcontext(None)
    from .metrics import exposed

    return exposed(settings.daemon.metrics_port, settings.guards)


def _summary(settings: Any, notifier: Any, ha: Any) -> Any:
    """The daily Discord summary, scheduled, when daily_summary is set (apscheduler imported only then)."""
    if settings.discord is None or settings.discord.daily_summary is None:
        return None
    from .summary import DailySummary

    summary = DailySummary(settings, notifier, leading=ha.leading if ha else lambda: True)
    summary.start()
    return summary


@asynccontextmanager
async def _leadership(settings: Any, notifier: Any) -> AsyncIterator[Any]:
    """The lease on its own DynamoDB client with [ha]; None (and no client) without."""
    if settings.ha is None:
        yield None
        return
    from .aws import client
    from .ha import MAX_ATTEMPTS, Leadership, default_holder

    async with client("dynamodb", settings.aws.region, settings.aws.endpoint_url, max_attempts=MAX_ATTEMPTS) as ddb:
        yield Leadership(ddb, settings.ha.table, lease=settings.ha.lease,
                         holder=settings.ha.holder or default_holder(), notifier=notifier)


async def serve(daemon: Daemon, settings: Any, aws: Any, stop: asyncio.Event, ready: Callable[[], None] = lambda: None) -> None:
    """The daemon's loop plus its fast sources (SQS when `[sources.sqs]` is set), until `stop`."""
    tasks = []
    if settings.sqs is not None:
        from .sources.sqs import SqsSource

        source = SqsSource(aws.sqs, settings.sqs.queue_url, owns=daemon.owns, push=daemon.push, wake=daemon.wake)
        run_source = source.run if daemon.ha is None else (lambda s: _while_leading(daemon.ha, source.run, s))
        tasks.append(asyncio.create_task(run_source(stop)))
    if daemon.ha is not None:
        tasks.append(asyncio.create_task(daemon.ha.run(stop)))
        tasks.append(asyncio.create_task(_wake_on_change(daemon, stop)))
    try:
        await daemon.async_run(stop, ready=ready)
    finally:
        for task in tasks:
            task.cancel()  # a no-op when stop already ended it
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wake_on_change(daemon: Daemon, stop: asyncio.Event) -> None:
    """A won lease starts a round at once: a takeover must not wait for the poll interval."""
    while not stop.is_set():
        await daemon.ha.changed.wait()
        daemon.ha.changed.clear()
        daemon.wake()


async def _while_leading(ha: Any, run: Callable[[asyncio.Event], Any], stop: asyncio.Event) -> None:
    """Run a source only during each term of leadership (checked every poll of the lease)."""
    while not stop.is_set():
        if not ha.leading():
            await asyncio.sleep(ha.renew_every / 4)
            continue
        term = asyncio.Event()
        task = asyncio.create_task(run(term))
        while ha.leading() and not stop.is_set():
            await asyncio.sleep(ha.renew_every / 4)
        term.set()
        await asyncio.gather(task, return_exceptions=True)


def _ready() -> None:
    sdnotify.ready()
    log.info("daemon.ready")


async def _watchdog() -> None:
    """Ping systemd's watchdog from the event loop: a stuck loop stops the pings."""
    interval = sdnotify.watchdog_interval()
    if interval is None:
        return
    while True:
        sdnotify.watchdog()
        await asyncio.sleep(interval)
