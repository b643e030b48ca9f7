"""The record of a guard's last rehearsal: `<state_dir>/<guard>.rehearsal.json`.

`spotguard rehearse` writes it and `spotguard check` reads it to judge the timing
budget. This module must not rehearse (commands/rehearse.py) nor judge the
figures (timing.py), and never touches the daemon's own state file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from spotguard.store import Store, write_atomic

VERSION = 1


@dataclass(frozen=True)
class Rehearsal:
    """One rehearsal's result: seconds after StartInstances, None where it never got."""

    guard: str
    standby: str
    at: str  # when it began, ISO 8601 UTC
    outcome: str  # "healthy", or what went wrong
    running: float | None = None
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
        for name in ("running", "registered", "healthy"):
            value = getattr(rehearsal, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} is not a number")
        return rehearsal
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return f"{source}: not a rehearsal record ({exc})"
