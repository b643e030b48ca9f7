"""The ledger: what each guard did and when, kept for `status` and the daily summary.

`Ledger` is a daemon observer. Per guard it appends transitions, instance runs
(the hours that cost money) and interruptions to `<guard>.ledger.jsonl`, and
keeps the last observation in `<guard>.seen.json`; both are owner-only, and the
history is rotated monthly or past MAX_BYTES with open runs carried over.
`read()` is the reader behind `status`; `LedgerView.estimate` holds the one
cost formula status and summary share. docs/status-json.md says how runs and
interruptions are counted.

This module must not block the daemon, raise out of a hook (a failure is
logged as `ledger.write.failed`), decide anything about failover, or talk to AWS.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import structlog

from spotguard import ids
from spotguard.machine import LIVE_STATES, Command, Event, Failed, GuardState, Observed, Start, Stop, ready_margins
from spotguard.store import read_bounded, write_atomic

log = structlog.get_logger(__name__)

VERSION = 1
# A ledger file past this size is rotated early: a flood of records (a flapping
# target, say) must not fill the nano's disk. A normal month is a few KiB.
MAX_BYTES = 4 << 20
READ_LIMIT = 2 * MAX_BYTES  # a file can outgrow MAX_BYTES by the records of one month's start
SEEN_LIMIT = 1 << 20
# seen.json is rewritten when the world changes and at least this often (seconds), so
# `status` can tell how long ago the daemon last saw the world.
HEARTBEAT = 30.0
STANDBY, SPOT = "standby", "spot"


# --------------------------------------------------------------------------- paths


def ledger_path(state_dir: Path | str, guard: str) -> Path:
    return Path(state_dir) / f"{_checked(guard)}.ledger.jsonl"


def previous_path(state_dir: Path | str, guard: str) -> Path:
    return Path(state_dir) / f"{_checked(guard)}.ledger.jsonl.1"


def seen_path(state_dir: Path | str, guard: str) -> Path:
    return Path(state_dir) / f"{_checked(guard)}.seen.json"


def _checked(guard: str) -> str:
    if not ids.GUARD_NAME.fullmatch(guard):
        raise ValueError(f"invalid guard name {guard!r}")
    return guard


def month_start(at: float) -> float:
    """The start (UTC) of the calendar month holding `at`."""
    d = dt.datetime.fromtimestamp(at, dt.timezone.utc)
    return d.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def _month(at: float) -> tuple[int, int]:
    d = dt.datetime.fromtimestamp(at, dt.timezone.utc)
    return d.year, d.month


# --------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class Transition:
    at: float
    old: str
    new: str
    reason: str
    slot: int | None = None  # a fleet's slot (from 1); None: the guard's own phase


@dataclass(frozen=True)
class Run:
    """One instance's stretch of running; `stop` None while it still runs."""

    role: str
    instance: str
    start: float
    stop: float | None

    def seconds(self, start: float, end: float) -> float:
        """Seconds of this run inside [start, end]; an open run counts up to `end`."""
        stop = end if self.stop is None else min(self.stop, end)
        return max(0.0, stop - max(self.start, start))


@dataclass(frozen=True)
class Interruption:
    at: float
    instance: str
    how: str  # notice | lost


@dataclass(frozen=True)
class Margin:
    """A ready margin: the replacement healthy `seconds` before the spot's deadline (negative: after)."""

    at: float
    instance: str
    seconds: float


@dataclass(frozen=True)
class Estimate:
    """Hours and money over a window; money is None when a price is missing.

    saving = on_demand_cost − cost, where
      on_demand_cost = hours × on_demand_hourly   (one On-Demand instance the whole window)
      cost = spot_hours × spot_hourly + standby_hours × on_demand_hourly
    and `hours` is the window from max(start, covered_from) to end: time before
    the ledger's first record is not known, so it is not counted either way.
    """

    start: float  # the window actually counted
    end: float
    hours: float
    spot_hours: float
    standby_hours: float
    on_demand_hourly: float | None
    spot_hourly: float | None
    cost: float | None
    on_demand_cost: float | None
    saving: float | None


@dataclass(frozen=True)
class LedgerView:
    """A guard's history as read from its ledger files (chronological)."""

    records: tuple[dict[str, Any], ...]

    @property
    def covered_from(self) -> float | None:
        """The earliest time the ledger knows about (None when it is empty)."""
        return min((r["at"] for r in self.records), default=None)

    def transitions(self, since: float | None = None) -> list[Transition]:
        return [
            Transition(r["at"], r["from"], r["to"], r["reason"], r["slot"] if isinstance(r.get("slot"), int) else None)
            for r in self.records
            if r["kind"] == "transition" and (since is None or r["at"] >= since)
        ]

    def runs(self, role: str) -> list[Run]:
        """Runs of `role` paired from run-start/run-stop records; a repeated start is ignored."""
        open_: dict[str, float] = {}
        done: list[Run] = []
        for r in self.records:
            if r.get("role") != role:
                continue
            iid = r["instance"]
            if r["kind"] == "run-start" and iid not in open_:
                open_[iid] = r["at"]
            elif r["kind"] == "run-stop" and iid in open_:
                done.append(Run(role, iid, open_.pop(iid), r["at"]))
        done += [Run(role, iid, start, None) for iid, start in open_.items()]
        return sorted(done, key=lambda run: run.start)

    def open_runs(self) -> list[Run]:
        return [run for role in (STANDBY, SPOT) for run in self.runs(role) if run.stop is None]

    def standby_seconds(self, start: float, end: float) -> float:
        return sum(run.seconds(start, end) for run in self.runs(STANDBY))

    def spot_seconds(self, start: float, end: float) -> float:
        return sum(run.seconds(start, end) for run in self.runs(SPOT))

    def interruptions(self, start: float, end: float) -> list[Interruption]:
        return [
            Interruption(r["at"], r["instance"], r["how"])
            for r in self.records
            if r["kind"] == "interruption" and start <= r["at"] < end
        ]

    def margins(self, start: float, end: float) -> list[Margin]:
        return [Margin(r["at"], r["instance"], float(r["seconds"])) for r in self.records
                if r["kind"] == "margin" and start <= r["at"] < end and _number(r.get("seconds"))]

    def estimate(self, start: float, end: float, on_demand_hourly: float | None, spot_hourly: float | None) -> Estimate:
        """Hours and money from `start` to `end` (see Estimate for the formula)."""
        covered = self.covered_from
        begin = min(end, max(start, covered)) if covered is not None else end
        hours = (end - begin) / 3600
        spot_h = self.spot_seconds(begin, end) / 3600
        standby_h = self.standby_seconds(begin, end) / 3600
        cost = od_cost = saving = None
        if on_demand_hourly is not None and spot_hourly is not None:
            cost = spot_h * spot_hourly + standby_h * on_demand_hourly
            od_cost = hours * on_demand_hourly
            saving = od_cost - cost
        return Estimate(begin, end, hours, spot_h, standby_h, on_demand_hourly, spot_hourly, cost, od_cost, saving)


_REQUIRED = {
    "transition": ("from", "to", "reason"),
    "run-start": ("role", "instance"),
    "run-stop": ("role", "instance"),
    "interruption": ("instance", "how"),
    "margin": ("instance",),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _parse(line: bytes) -> dict[str, Any] | None:
    """One record, or None for a line that is not one (partial, foreign, corrupt)."""
    try:
        r = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(r, dict) or r.get("v") != VERSION or r.get("kind") not in _REQUIRED:
        return None
    at = r.get("at")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or at != at:
        return None
    if not all(isinstance(r.get(k), str) for k in _REQUIRED[r["kind"]]):
        return None
    return r


def _lines(path: Path) -> list[dict[str, Any]]:
    try:
        raw = read_bounded(path, READ_LIMIT)
    except FileNotFoundError:
        return []
    return [r for r in map(_parse, raw.splitlines()) if r is not None]


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def read(state_dir: Path | str, guard: str) -> LedgerView:
    """The guard's history; an empty view when there is none.

    Safe while the daemon writes: a half-written last line is skipped, and a
    rotation between reading the two files is noticed (the current file's
    inode changed) and the read repeated. OSError (e.g. permission) is raised.
    """
    current, previous = ledger_path(state_dir, guard), previous_path(state_dir, guard)
    for _ in range(5):
        before = _inode(current)
        records = _lines(previous) + _lines(current)
        if _inode(current) == before:
            break
    records.sort(key=lambda r: r["at"])  # stable: file order breaks ties
    return LedgerView(tuple(records))


def read_seen(state_dir: Path | str, guard: str) -> dict[str, Any] | None:
    """The last observation snapshot, or None when there is none (or it is not one).
    OSError when it cannot be read (a symlink, a FIFO, permission)."""
    try:
        data = json.loads(read_bounded(seen_path(state_dir, guard), SEEN_LIMIT))
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("version") == VERSION else None


# --------------------------------------------------------------------------- observer


@dataclass
class _GuardBook:
    """What the observer remembers about one guard between hooks."""

    standbys: frozenset[str]
    open: dict[str, str]  # instance id → role, for runs not yet stopped
    started: dict[str, float]  # instance id → run start, for carrying over on rotation
    counted: set[str]  # spot ids with an interruption record
    seen: dict[str, Any] | None  # the last snapshot written (without `since` and `observed_at`)
    month: tuple[int, int] | None  # the month of the current file's first record
    since: float | None = None  # when the world first looked like `seen`
    written: float | None = None  # when seen.json was last written


class Ledger:
    """Daemon observer that records transitions, runs and interruptions per guard.

    `guards` are the guard settings (name and standby_instance_ids are read).
    Construction reads each guard's files once to know which runs are open.
    """

    def __init__(self, state_dir: Path | str, guards: Iterable[Any]) -> None:
        self.state_dir = Path(state_dir)
        self._books: dict[str, _GuardBook] = {}
        for g in guards:
            try:
                self._books[g.name] = self._book(g)
            except Exception as exc:  # noqa: BLE001 - a bad ledger file must not keep the daemon from starting
                log.error("ledger.read.failed", guard=g.name, error=type(exc).__name__, detail=str(exc))
                self._books[g.name] = _GuardBook(frozenset(g.standby_instance_ids), {}, {}, set(), None, None)

    def __repr__(self) -> str:
        return f"Ledger({str(self.state_dir)!r}, guards={sorted(self._books)})"

    def _book(self, g: Any) -> _GuardBook:
        view = read(self.state_dir, g.name)
        open_runs = view.open_runs()
        current = _lines(ledger_path(self.state_dir, g.name))
        seen = read_seen(self.state_dir, g.name)
        return _GuardBook(
            standbys=frozenset(g.standby_instance_ids),
            open={r.instance: r.role for r in open_runs},
            started={r.instance: r.start for r in open_runs},
            counted={r["instance"] for r in view.records if r["kind"] == "interruption"},
            seen={k: v for k, v in seen.items() if k not in ("since", "observed_at")} if seen else None,
            since=seen.get("since") if seen else None,
            month=_month(current[0]["at"]) if current else None,
        )

    # ------------------------------------------------------------------ hooks

    def event(self, guard: str, event: Event, old: GuardState, new: GuardState, at: float) -> None:
        book = self._books.get(guard)
        if book is None:
            return
        try:
            # The machine says which spots this event doomed (a notice, or the request's flag).
            for iid in sorted(new.doomed - old.doomed):
                self._interrupted(guard, book, iid, "notice", at)
            for iid, seconds in ready_margins(old, new, at):
                self._append(guard, book, {"at": at, "kind": "margin", "instance": iid, "seconds": round(seconds, 1)})
            if isinstance(event, Observed):
                self._observed(guard, book, event, at)
        except Exception as exc:  # noqa: BLE001 - the ledger must never stop a failover
            _failed(guard, "event", exc)

    def transition(self, guard: str, old: GuardState, new: GuardState, at: float, slot: int | None = None) -> None:
        book = self._books.get(guard)
        if book is None:
            return
        try:
            where = {} if slot is None else {"slot": slot}
            self._append(guard, book, {"at": at, "kind": "transition", "from": old.phase.value,
                                       "to": new.phase.value, "reason": new.reason, **where})
        except Exception as exc:  # noqa: BLE001
            _failed(guard, "transition", exc)

    def action(self, guard: str, command: Command, failed: Failed | None, seconds: float, at: float) -> None:
        book = self._books.get(guard)
        if book is None or failed is not None:
            return
        try:
            if isinstance(command, Start) and command.instance_id in book.standbys:
                self._run_start(guard, book, STANDBY, command.instance_id, "action", at)
            elif isinstance(command, Stop) and command.instance_id in book.open:
                self._run_stop(guard, book, command.instance_id, "action", at, "stopping")
        except Exception as exc:  # noqa: BLE001
            _failed(guard, "action", exc)

    # ------------------------------------------------------------------ what to record

    def _observed(self, guard: str, book: _GuardBook, seen: Observed, at: float) -> None:
        live = {i.id: SPOT for i in seen.spots if i.state in LIVE_STATES}
        live.update({i.id: STANDBY for i in seen.standbys if i.state in LIVE_STATES})
        states = {i.id: i.state for i in seen.spots + seen.standbys}
        # A spot its request names but DescribeInstances did not return (eventual
        # consistency right after a fulfilment) is not known to be gone: wait and see.
        unknown = {i.id for i in seen.spots if i.state == "missing"}
        for iid, role in live.items():
            self._run_start(guard, book, role, iid, "observed", at)
        for iid, role in list(book.open.items()):
            if iid not in live and iid not in unknown:
                if role == SPOT:
                    self._interrupted(guard, book, iid, "lost", at)
                self._run_stop(guard, book, iid, "observed", at, states.get(iid, "gone"))
        self._snapshot(guard, book, seen, at)

    def _interrupted(self, guard: str, book: _GuardBook, iid: str, how: str, at: float) -> None:
        if iid in book.counted:
            return
        self._append(guard, book, {"at": at, "kind": "interruption", "instance": iid, "how": how})
        book.counted.add(iid)

    def _run_start(self, guard: str, book: _GuardBook, role: str, iid: str, via: str, at: float) -> None:
        if iid in book.open:
            return
        # Recorded first, remembered after: a failed write is retried on the next observation.
        self._append(guard, book, {"at": at, "kind": "run-start", "role": role, "instance": iid, "via": via})
        book.open[iid], book.started[iid] = role, at

    def _run_stop(self, guard: str, book: _GuardBook, iid: str, via: str, at: float, state: str) -> None:
        role = book.open[iid]
        self._append(guard, book, {"at": at, "kind": "run-stop", "role": role, "instance": iid, "via": via,
                                   "state": state})
        del book.open[iid]
        book.started.pop(iid, None)

    # ------------------------------------------------------------------ files

    def _append(self, guard: str, book: _GuardBook, record: dict[str, Any]) -> None:
        path = ledger_path(self.state_dir, guard)
        month = _month(record["at"])
        # Only forward: a clock stepped back must not rotate last month's file away.
        if book.month is not None and (month > book.month or _size(path) > MAX_BYTES):
            self._rotate(guard, book, path, month)
        lines = [] if book.month is not None else self._carried(book, record["at"])
        book.month = month
        _append_lines(self.state_dir, path, lines + [{"v": VERSION, **record}])

    def _rotate(self, guard: str, book: _GuardBook, path: Path, month: tuple[int, int]) -> None:
        try:
            os.replace(path, previous_path(self.state_dir, guard))
        except FileNotFoundError:
            pass  # removed by a person: start afresh
        log.info("ledger.rotated", guard=guard, month=f"{month[0]}-{month[1]:02d}")
        book.month = None

    def _carried(self, book: _GuardBook, at: float) -> list[dict[str, Any]]:
        # The run-starts of runs still open, so the new file alone knows they are open.
        return [
            {"v": VERSION, "at": book.started.get(iid, at), "kind": "run-start", "role": role, "instance": iid,
             "via": "carried"}
            for iid, role in book.open.items()
        ]

    def _snapshot(self, guard: str, book: _GuardBook, seen: Observed, at: float) -> None:
        health = {t.id: t.health for t in seen.targets}
        snap = {
            "version": VERSION,
            "spots": [{"id": i.id, "state": i.state, "notice": i.notice, "target": health.get(i.id)}
                      for i in seen.spots],
            "standbys": [{"id": i.id, "state": i.state, "target": health.get(i.id)} for i in seen.standbys],
            "targets": [{"id": t.id, "health": t.health} for t in seen.targets],
        }
        changed = snap != book.seen
        if not changed and book.written is not None and 0 <= at - book.written < HEARTBEAT:
            return
        since = at if changed or book.since is None else book.since
        _write_atomic(self.state_dir, seen_path(self.state_dir, guard), {**snap, "since": since, "observed_at": at})
        book.seen, book.since, book.written = snap, since, at


def _failed(guard: str, hook: str, exc: Exception) -> None:
    log.error("ledger.write.failed", guard=guard, hook=hook, error=type(exc).__name__, detail=str(exc))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _append_lines(state_dir: Path, path: Path, records: list[dict[str, Any]]) -> None:
    # One write of whole lines with O_APPEND: a reader sees complete lines or a
    # partial last one (which it skips). No fsync: this is accounting, not
    # failover state, and a lost last line after a power cut is acceptable.
    data = b"".join(json.dumps(r, sort_keys=True, allow_nan=False).encode() + b"\n" for r in records)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Never through a symlink: as root, that would append to whatever it points at.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_atomic(state_dir: Path, path: Path, data: dict[str, Any]) -> None:
    """Readers see the old file or the new (store.write_atomic), mode 0600."""
    payload = json.dumps(data, sort_keys=True, allow_nan=False, indent=1).encode() + b"\n"
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, payload)
