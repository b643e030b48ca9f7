"""The record of a guard's last rehearsal (`<guard>.rehearsal.json`), and the marker of one running now.

`spotguard rehearse` writes the record and `spotguard check` reads it to judge the
timing budget; while it runs, `<guard>.rehearsing.json` tells the daemon which
standby is being rehearsed. This module must not rehearse (commands/rehearse.py)
nor judge the figures (timing.py), and never touches the daemon's own state file.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from spotguard.store import Store, read_bounded, write_atomic

VERSION = 1


@dataclass(frozen=True)
class Rehearsal:
    """One rehearsal's result: seconds after StartInstances, None where it never got."""

    guard: str
    standby: str
    at: str  # when it began, ISO 8601 UTC
    outcome: str  # "healthy", or what went wrong
    running: float | None = None
    ready: float | None = None  # it answered its health check (register_when = "ready")
    registered: float | None = None
    healthy: float | None = None


def path(state_dir: Path, guard: str) -> Path:
    return Store(state_dir).path(guard).with_name(f"{guard}.rehearsal.json")


def write(state_dir: Path, rehearsal: Rehearsal) -> Path:
    """Atomically (temp file, fsync, rename), mode 0600."""
    target = path(Path(state_dir), rehearsal.guard)
    payload = json.dumps({"version": VERSION, **asdict(rehearsal)}, indent=1, sort_keys=True).encode() + b"\n"
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(target, payload)
    return target


def read(state_dir: Path, guard: str) -> Rehearsal | str | None:
    """The last rehearsal, None when there is none, or why the file cannot be used."""
    source = path(Path(state_dir), guard)
    try:
        data = json.loads(source.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        return f"{source}: {type(exc).__name__}: {exc}"
    try:
        if data.pop("version") != VERSION:
            raise ValueError("unsupported version")
        rehearsal = Rehearsal(**data)
        for name in ("running", "ready", "registered", "healthy"):
            value = getattr(rehearsal, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} is not a number")
        return rehearsal
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return f"{source}: not a rehearsal record ({exc})"


# ---------------------------------------------------------------------- a rehearsal in progress

# A rehearsal ends within minutes (ready timeout, drain, stop); a marker older than this
# outlived its process whatever its pid says now.
MARKER_LIFETIME = 3600.0


def marker(state_dir: Path, guard: str) -> Path:
    return Store(state_dir).path(guard).with_name(f"{guard}.rehearsing.json")


@contextmanager
def announced(state_dir: Path, guard: str, standby: str) -> Iterator[None]:
    """While inside, `<guard>.rehearsing.json` tells the daemon that `standby` is being
    rehearsed by this process, so it does not take the standby for a stray one. Readable
    by the daemon's own user (0644: it holds no secret) when a person runs rehearse as root."""
    target = marker(Path(state_dir), guard)
    payload = json.dumps({"version": VERSION, "standby": standby, "pid": os.getpid(), "started": time.time()})
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(target, payload.encode() + b"\n")
    os.chmod(target, 0o644)
    try:
        yield
    finally:
        target.unlink(missing_ok=True)


def rehearsing(state_dir: Path, guard: str) -> tuple[str, int] | None:
    """(standby, pid) of the rehearsal running now, or None: no marker, or one left by a
    process that is gone (killed with SIGKILL) or too old to be one."""
    try:
        data = json.loads(read_bounded(marker(Path(state_dir), guard), 4096))
        standby, pid, started = data["standby"], int(data["pid"]), float(data["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(standby, str) or time.time() - started > MARKER_LIFETIME or not _alive(pid):
        return None
    return standby, pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process (the person running rehearse as root)
    except (OverflowError, ValueError):
        return False
    return True
