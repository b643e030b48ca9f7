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

from . import machine, rehearsal, sdnotify, store
from .machine import Alert, Event, GuardState, Heard, Instance, Observed
from .sources.poll import PollError

log = structlog.get_logger("spotguard")


class SteadyClock:
    """Wall-clock seconds that a wall-clock step cannot move: the wall time at start plus
    monotonic time since. Timers measured on it are monotonic; times stay readable."""

    def __init__(self) -> None:
        self._wall, self._mono = time.time(), time.monotonic()

    def __call__(self) -> float:
        return self._wall + (time.monotonic() - self._mono)


@dataclass
class Guard:
    """One guard's settings, its machine state, and what the shell keeps about it."""

    settings: Any
    state: GuardState
    # Notices in order, then the newest observation: a newer one replaces one not
    # yet stepped, since the machine only needs the latest view of the world.
    queued: list[Event] = field(default_factory=list)
    latest: Observed | None = None
    worker: asyncio.Task | None = None  # steps and acts on the queue; ends when it is empty
    acting: int = 0  # AWS commands in flight
    acted: float = float("-inf")  # monotonic time the last command ended
    unsaved: str | None = None  # why the state could not be written; None once it is
    seen_at: float = field(default_factory=time.monotonic)  # the last good observation (monotonic)
    blind: bool = False  # said to be blind: no observation for blind_after
    rehearsing: str | None = None  # the standby `spotguard rehearse` runs now
    why_blind: str | None = None  # the last poll error

    @property
    def name(self) -> str:
        return self.settings.name


class Observer(Protocol):
    """Watches what the daemon does (metrics, the ledger behind `status`, summaries).

    Observers are told after the fact and must not block or raise: an
    observer's failure is logged and never stops a failover. `event` comes
    with the states before and after the machine stepped it, so an observer
    reads what the machine concluded (say, a newly doomed spot) instead of
    deciding it again. An observer may leave out a hook it has no use for.
    """

    def event(self, guard: str, event: Event, old: GuardState, new: GuardState, at: float) -> None: ...

    def transition(self, guard: str, old: GuardState, new: GuardState, at: float, slot: int | None) -> None:
        """A phase change: the guard's, or in a fleet one slot's (numbered from 1)."""

    def action(self, guard: str, command: machine.Command, failed: machine.Failed | None, seconds: float,
               at: float) -> None: ...

    def polled(self, guard: str, error: Exception | None, at: float) -> None: ...

    def saved(self, guard: str, error: str | None, at: float) -> None: ...


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
        clock: Callable[[], float] | None = None,
        observers: Sequence[Observer] = (),
        ha: Any = None,
        prober: Any = None,
    ) -> None:
        self.settings = settings
        self.poller = poller
        self.executor = executor
        self.store = store
        self.notifier = notifier
        self.clock = clock or SteadyClock()
        self.observers = tuple(observers)
        self.ha = ha  # ha.Leadership with [ha]; None: this daemon runs alone and always acts
        # sources.probe.Prober: whether instances answer their health check. None: nothing can be
        # probed (an instance waiting to be registered is then registered as it runs, said once).
        self.prober = prober
        if prober is not None:
            prober.on_ready = self.wake  # an instance that turns ready is registered now, not a poll later
        self.loaded_epoch: int | None = None  # the lease epoch whose shared states we loaded
        self.guards = {g.name: Guard(g, self._load(g)) for g in settings.guards}
        self.held: list[Heard] = []  # notices for instances no guard is known to own, until the next poll
        self.woken = asyncio.Event()  # set by push()/wake(): start a round now
        self.cadence = asyncio.Event()  # set when a phase changes: the poll interval may have too
        self.fatal: BaseException | None = None  # a bug in a worker: the daemon stops with it
        self.rounds = 0  # completed observation rounds; tests wait on it

    # ------------------------------------------------------------------ lifecycle

    def _load(self, settings: Any) -> GuardState:
        rules = settings.rules(self.settings.daemon.poll_interval)
        state = self.store.load(settings.name, rules)
        if state is None:
            return machine.initial(rules, self.clock())
        log.info("guard.resumed", guard=settings.name, phase=state.phase.value, standby=state.standby)
        return machine.resumed(state)

    async def async_run(self, stop: asyncio.Event, ready: Callable[[], None] = lambda: None) -> None:
        """Observe and act until `stop` is set; `ready` is called after the first round.

        Rounds are timed on the monotonic clock and do not wait for the guards'
        commands: each guard's worker carries them out, so one guard's slow call
        never delays another guard's next round. A bug in a worker ends the loop
        with that exception (systemd restarts the daemon). On `stop` the
        commands in flight finish.
        """
        try:
            while not stop.is_set():
                started = time.monotonic()
                if not await self._round_unless_stopped(stop):
                    break
                if self.rounds == 1:
                    ready()
                self._reraise()
                await self._wait(stop, started)
                self._reraise()
            await self.settle()
        finally:
            self._cancel_workers()
            if self.prober is not None:
                await self.prober.close()

    async def _round_unless_stopped(self, stop: asyncio.Event) -> bool:
        """One round (READY=1 follows the first step); a round still polling when `stop`
        comes is abandoned, as a poll only reads: shutdown waits for commands in flight,
        never for a Describe stuck in its retries. False when abandoned."""
        this = asyncio.ensure_future(self.round(settle=self.rounds == 0))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({this, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not this.done():
            this.cancel()
            await asyncio.gather(this, return_exceptions=True)
            return False
        this.result()  # a bug in the round is the daemon's to stop on
        return True

    def push(self, notice: Heard) -> None:
        """Hand in a notice (or a scheduled change) from a fast source (SQS, agent): stepped at once by its guard's
        worker, whatever the poll is doing; one for an instance no guard is known to own
        yet (a spot fulfilled since the last poll) waits for the next poll, which starts now."""
        if self.ha is not None and not self.ha.leading():
            log.info("ha.follower.notice.dropped", instance_id=notice.instance_id, kind=notice.kind)
            return
        owner = self._owner(notice.instance_id, {})
        if owner is not None and (self.ha is None or self.loaded_epoch == self.ha.epoch):
            self._enqueue(self.guards[owner], notice)
        else:
            self.held.append(notice)
            self.woken.set()

    def wake(self) -> None:
        """Look at the world now rather than at the next poll (e.g. a spot was fulfilled)."""
        self.woken.set()

    def owns(self, instance_id: str) -> bool:
        """Whether a guard knows this instance, as of the last observation."""
        return self._owner(instance_id, {}) is not None

    def _interval(self) -> float:
        return machine.poll_interval((g.state for g in self.guards.values()), self.settings.daemon.poll_interval)

    async def _wait(self, stop: asyncio.Event, started: float) -> None:
        """Sleep until the next round is due, we are woken, or we are stopped. A phase
        change while sleeping (a notice's failover) recomputes when the next round is due."""
        while True:
            self.cadence.clear()
            timeout = max(0.0, started + self._interval() - time.monotonic())
            waits = [asyncio.ensure_future(e.wait()) for e in (stop, self.woken, self.cadence)]
            try:
                done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if not self.cadence.is_set() or stop.is_set() or self.woken.is_set() or self.fatal is not None:
                return

    # ------------------------------------------------------------------ one round

    async def round(self, settle: bool = True) -> None:
        """One round: poll and hand each guard its observation (with any notices held for
        it); with `settle`, return once every guard has acted."""
        self.woken.clear()
        if self.ha is not None and not await self._lead():
            await self._follow()
            self.rounds += 1
            return
        self.held = self._route(self.held, {}, final=False)  # their owner may be known now (a takeover)
        if settle:
            await self.settle()  # as before a poll that waits for nothing: notices acted on first
        polled = time.monotonic()
        seen = await self._observe(lambda name, result: self._deliver(name, result, polled))
        self.held = self._route(self.held, seen, final=True)
        if settle:
            await self.settle()
        self.rounds += 1
        if self.ha is not None and self.guards and all(g.blind for g in self.guards.values()):
            await self.ha.step_aside("every guard is blind: EC2/ELBv2 cannot be described from here",
                                     hold=self.settings.daemon.blind_after)

    def _deliver(self, name: str, result: Any, polled: float) -> None:
        """A guard's observation, handed to its worker as soon as the poll has it (a slow call
        for another guard's target group does not hold it back)."""
        guard = self.guards.get(name)
        # An observation taken while one of the guard's commands was in flight may
        # predate it; stepping it would repeat the command. The next poll is fresh.
        if isinstance(result, Observed) and guard is not None and not guard.acting and guard.acted < polled:
            self._enqueue(guard, replace(self._probed(guard, result), rehearsing=self._rehearsing(guard)))

    def _probed(self, guard: Guard, seen: Observed) -> Observed:
        """`seen` with the readiness probe's verdicts on the instances the machine wants probed."""
        wanted = machine.to_probe(guard.state, seen)
        if self.prober is not None:
            self.prober.watch(guard.name, guard.settings.target_group_arn, guard.settings.target_port, wanted)
        if not wanted:
            return seen
        ids = {i.id for i in wanted}

        def judged(i: Instance) -> Instance:
            if i.id not in ids:
                return i
            return replace(i, probe=self.prober.verdict(i.id) if self.prober is not None else None)

        return replace(seen, spots=tuple(map(judged, seen.spots)), standbys=tuple(map(judged, seen.standbys)))

    def _rehearsing(self, guard: Guard) -> frozenset[str]:
        """The standby `spotguard rehearse` is running for this guard now (its marker in
        state_dir), said once when it begins and once when it ends."""
        now = rehearsal.rehearsing(self.settings.daemon.state_dir, guard.name)
        standby = now[0] if now else None
        if standby != guard.rehearsing:
            if standby is not None:
                log.info("guard.rehearsal.started", guard=guard.name, standby=standby, pid=now[1])
                self.notifier.notify(f"[{guard.name}] rehearsal of standby {standby} begun (spotguard rehearse, "
                                     f"pid {now[1]}): left to it, no failover")
            else:
                log.info("guard.rehearsal.ended", guard=guard.name, standby=guard.rehearsing)
            guard.rehearsing = standby
        return frozenset({standby}) if standby else frozenset()

    async def _observe(self, deliver: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
        """Each guard's observation, or why it has none this round (a PollError)."""
        try:
            seen = await self.poller.observe(steady=self._steady(), now=self.clock(), deliver=deliver)
        except Exception as exc:  # noqa: BLE001 - a bug in the poll blinds the guards (said loudly), never kills the daemon
            log.exception("guard.poll.failed", error=type(exc).__name__, detail=str(exc))
            seen = {name: PollError("poll", type(exc).__name__) for name in self.guards}
        self._sight(seen)
        return seen

    def _steady(self) -> set[str]:
        """Steady guards with nothing queued or in flight: the poller may reuse their target health."""
        return {name for name, g in self.guards.items() if machine.is_steady(g.state) and not g.queued and not g.acting}

    def _sight(self, seen: dict[str, Any]) -> None:
        """Keep track of each guard's last good observation: blindness past blind_after is
        said loudly (log and Discord), and so is sight coming back."""
        now, at = time.monotonic(), self.clock()
        for name, guard in self.guards.items():
            result = seen.get(name)
            failed = result if isinstance(result, Exception) else None
            self._tell("polled", name, failed, at)
            if failed is None:
                if guard.blind:
                    self._say(guard, "guard.sight.back",
                              f"sight back: observed again after {now - guard.seen_at:.0f}s blind")
                guard.seen_at, guard.blind, guard.why_blind = now, False, None
                continue
            guard.why_blind = str(failed)
            if not guard.blind and now - guard.seen_at >= self.settings.daemon.blind_after:
                guard.blind = True
                self._say(guard, "guard.blind", f"blind: no observation for {now - guard.seen_at:.0f}s "
                          f"(last: {failed}); spotguard cannot see this guard's instances", error=True)

    def _enqueue(self, guard: Guard, event: Event) -> None:
        if isinstance(event, Observed):
            guard.latest = event
        else:
            guard.queued.append(event)
        if guard.worker is None or guard.worker.done():
            guard.worker = asyncio.create_task(self._work(guard))
            guard.worker.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task) -> None:
        # The only exceptions left in a worker are bugs: never lost, they stop the daemon.
        if not task.cancelled() and task.exception() is not None and self.fatal is None:
            self.fatal = task.exception()
            log.critical("guard.worker.failed", error=type(self.fatal).__name__, detail=str(self.fatal))
            self.woken.set()

    async def _work(self, guard: Guard) -> None:
        """Step and act on a guard's events in order until none is left; then retry a state
        write that failed (every round brings its worker here)."""
        while guard.queued or guard.latest is not None:
            if guard.queued:
                event = guard.queued.pop(0)
            else:
                event, guard.latest = guard.latest, None
            await self.apply(guard, event)
        if guard.unsaved is not None:
            self._write(guard, guard.state)

    async def settle(self) -> None:
        """Wait until every guard has stepped and acted on everything handed to it."""
        while busy := [g.worker for g in self.guards.values() if g.worker is not None and not g.worker.done()]:
            await asyncio.wait(busy)
        self._reraise()

    def _reraise(self) -> None:
        if self.fatal is not None:
            raise self.fatal

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
        for notice in self.held:  # the leader's own sources see the same notices
            log.info("ha.follower.notice.dropped", instance_id=notice.instance_id, kind=notice.kind)
        self.held = []
        self._cancel_workers()  # deposed: stop acting now, as a kill -9 would
        self.loaded_epoch = None
        seen = await self._observe()
        shared = await self.ha.states(self._rules(), consistent=False)
        self._adopt(shared or {})
        for name, observed in seen.items():
            if isinstance(observed, Observed) and name in self.guards:
                self.guards[name].state = replace(self.guards[name].state, seen=observed)

    def _rules(self) -> dict[str, machine.Rules]:
        return {name: g.settings.rules(self.settings.daemon.poll_interval) for name, g in self.guards.items()}

    def _adopt(self, shared: dict[str, GuardState]) -> None:
        # The shared state never holds an observation; ours is as fresh as any.
        for name, state in shared.items():
            guard = self.guards[name]
            if store.differs(guard.state, state):
                self._write(guard, state)  # the local mirror `status` reads
            guard.state = replace(state, seen=guard.state.seen)

    def _route(self, notices: list[Heard], seen: dict[str, Any], final: bool) -> list[Heard]:
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

    def _owner(self, instance_id: str, seen: dict[str, Any]) -> str | None:
        """The guard whose spot this is (the observation's owner), else whose standby."""
        for name, guard in self.guards.items():
            observed = seen.get(name)
            observed = observed if isinstance(observed, Observed) else guard.state.seen
            if observed is not None and any(i.id == instance_id for i in observed.spots):
                return name
        return next((n for n, g in self.guards.items() if instance_id in g.settings.standby_instance_ids), None)

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
        changes = machine.transitions(old, new)
        for slot, was, became in changes:
            self._transition(guard, slot, was, became)
            self._tell("transition", guard.name, was, became, now, slot)
        if changes:
            self.cadence.set()
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
        """Persist before acting. Alone, a failed write never blocks the commands (see
        _write). With [ha] the shared write is fenced: refused or failed, the state reverts
        (so the next round decides the same step again) and nothing is carried out."""
        if self.ha is not None and not await self.ha.save(guard.name, new):
            guard.state = old
            return False
        self._write(guard, new)  # with [ha], a local mirror, so `status` reads the phase on either controller
        return True

    def _write(self, guard: Guard, state: GuardState) -> None:
        """Write the state file. Availability beats persistence: when the disk says no (full,
        read-only), the commands still run, the state stays in memory, the write is retried
        at the end of every round's work, and people hear once that it failed and once that
        it is back."""
        try:
            self.store.save(guard.name, state)
        except OSError as exc:
            reason = f"{type(exc).__name__}: {exc.strerror or exc}"
            self._tell("saved", guard.name, reason, self.clock())
            if guard.unsaved is None:
                self._say(guard, "guard.state.unsaved", f"state not saved ({reason}): acting on it anyway; "
                          "a restart now would forget this phase", error=True)
            guard.unsaved = reason
            return
        if guard.unsaved is not None:
            guard.unsaved = None
            self._tell("saved", guard.name, None, self.clock())
            self._say(guard, "guard.state.saved", "state saved again")

    def _say(self, guard: Guard, event: str, text: str, *, error: bool = False) -> None:
        """One line in the log and one Discord message about a guard's own health."""
        (log.error if error else log.warning)(event, guard=guard.name, text=text)
        self.notifier.notify(f"[{guard.name}] ⚠ {text}")

    def _transition(self, guard: Guard, slot: int | None, old: GuardState, new: GuardState) -> None:
        """One line and one message per phase change; a fleet's name their slot (its spots and standby)."""
        spots = [i.id for i in new.seen.spots] if new.seen else list(new.holds or ())
        where = {} if slot is None else {"slot": slot}
        log.info(
            "guard.transition",
            guard=guard.name,
            **where,
            **{"from": old.phase.value, "to": new.phase.value},
            reason=new.reason,
            standby=new.standby,
            spots=spots,
        )
        name = guard.name if slot is None else f"{guard.name} slot {slot}"
        self.notifier.notify(f"[{name}] {old.phase.value} → {new.phase.value}: {new.reason}")

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
            hook = getattr(observer, what, None)
            if hook is None:
                continue
            try:
                hook(*args)
            except Exception as exc:  # noqa: BLE001 - an observer must never stop a failover
                log.error("guard.observer.failed", observer=type(observer).__name__, hook=what,
                          error=type(exc).__name__, detail=str(exc))


# ---------------------------------------------------------------------- process


def run(settings: Any) -> int:
    """Run the daemon until SIGTERM/SIGINT; the exit code for the process.

    Before anything starts: the state directory must take a write, and no other
    daemon may hold it (one line and exit 1 otherwise, so systemd retries).
    """
    from . import logs

    logs.configure(settings.daemon.log_format)
    state_dir = settings.daemon.state_dir
    try:
        store.check_writable(state_dir)
    except OSError as exc:
        log.critical("daemon.state_dir.unusable", state_dir=str(state_dir),
                     error=f"{type(exc).__name__}: {exc.strerror or exc}")
        return 1
    try:
        with store.locked(state_dir):
            asyncio.run(_main(settings))
    except store.Locked as exc:
        log.critical("daemon.already_running", state_dir=str(state_dir), holder=exc.holder,
                     detail=f"another spotguard ({exc.holder}) runs on this state directory")
        return 1
    except Exception as exc:  # noqa: BLE001 - logged as one line for journald, then systemd restarts us
        log.critical("daemon.crashed", error=type(exc).__name__, detail=str(exc))
        return 1
    return 0


def build(settings: Any, aws: Any, notifier: Any, observers: Sequence[Observer] = (), *, ha: Any = None) -> Daemon:
    """The daemon wired to real parts: poll source, executor and store on `aws` clients;
    `ha` is the ha.Leadership gating it when `[ha]` is set."""
    from .executor import Executor
    from .sources.poll import Poller
    from .sources.probe import PROBE_EVERY, Prober
    from .store import Store

    return Daemon(
        settings,
        poller=Poller(aws.ec2, aws.elbv2, settings.guards),
        executor=Executor(aws.ec2, aws.elbv2, settings.guards),
        store=Store(settings.daemon.state_dir),
        notifier=notifier,
        observers=observers,
        ha=ha,
        # Never slower than the poll: a lab running 50 times faster than the wall polls every 0.1 s.
        prober=Prober(aws.elbv2, every=min(PROBE_EVERY, settings.daemon.poll_interval)),
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
        async with clients(settings.aws.region, settings.aws.endpoint_url) as aws, \
                _leadership(settings, notifier) as ha:
            observers = [Ledger(settings.daemon.state_dir, settings.guards), *([metrics] if metrics else [])]
            daemon = build(settings, aws, notifier, observers, ha=ha)
            if metrics is not None:
                metrics.watch_phases(daemon.guards)  # phases resumed from the state files, or adopted with [ha]
            summary = _summary(settings, notifier, ha)
            log.info("daemon.started", guards=list(daemon.guards), poll_interval=settings.daemon.poll_interval,
                     holder=ha.holder if ha else None, metrics_port=settings.daemon.metrics_port)
            watchdog = asyncio.create_task(_watchdog())
            try:
                await serve(daemon, settings, aws, stop, ready=_ready, metrics=metrics)
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
    """The Prometheus endpoint on [daemon] metrics_address with metrics_port; without a port nothing
    listens and prometheus-client is never imported (start-up time on a t4g.nano)."""
    if settings.daemon.metrics_port is None:
        return nullcontext(None)
    from .metrics import exposed

    return exposed(settings.daemon.metrics_port, settings.guards, settings.daemon.metrics_address)


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


async def serve(daemon: Daemon, settings: Any, aws: Any, stop: asyncio.Event, ready: Callable[[], None] = lambda: None,
                metrics: Any = None) -> None:
    """The daemon's loop plus its fast sources (SQS when `[sources.sqs]` is set), until `stop`;
    `metrics` (when serving) is shown the SQS source and the [ha] leadership."""
    tasks, source = [], None
    if settings.sqs is not None:
        from .sources.sqs import SqsSource

        source = SqsSource(aws.sqs, settings.sqs.queue_url, owns=daemon.owns, push=daemon.push, wake=daemon.wake)
        run_source = source.run if daemon.ha is None else (lambda s: _while_leading(daemon.ha, source.run, s))
        tasks.append(asyncio.create_task(run_source(stop)))
    if metrics is not None:
        metrics.watch_sources(sqs=source, ha=daemon.ha)
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
