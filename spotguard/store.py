"""The state store: one JSON file per guard, written atomically, read back on start.

`encode`/`decode` are the file format, pure and strict; `Store` does the file
work (temp file, fsync, rename, fsync the directory; owner-only). Only the
machine's own fields are stored: rules come from the config, the last
observation is never persisted. A file that cannot be used is renamed aside as
`<guard>.json.corrupt[-n]` and logged, and the guard is rebuilt from what AWS
shows.

This module must not interpret a state (machine.py does) nor talk to AWS.
"""

from __future__ import annotations

import glob
import json
import math
import os
import stat
import tempfile
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, get_type_hints

import structlog

from spotguard import ids
from spotguard.machine import GuardState, Phase, Rules

log = structlog.get_logger(__name__)

VERSION = 1
# GuardState fields that are deliberately not written; every other field is.
NOT_PERSISTED = frozenset({"rules", "seen"})
_TMP_SUFFIX = ".tmp"
PRIVATE_DIR = 0o700


# --------------------------------------------------------------------------- format


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected a number, got {v!r}")
    try:
        value = float(v)  # JSON integers are unbounded: 1e400 as an int overflows here
    except OverflowError:
        raise ValueError("number out of range") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {v!r}")
    return value


def _opt_float(v: Any) -> float | None:
    return None if v is None else _float(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


def _str_set(v: Any) -> frozenset[str]:
    if not isinstance(v, list):
        raise ValueError(f"expected a list, got {v!r}")
    return frozenset(_str(item) for item in v)


def _phase(v: Any) -> Phase:
    try:
        return Phase(_str(v))
    except ValueError:
        raise ValueError(f"unknown phase {v!r}") from None


# How to read back each type a GuardState field may have.
_BY_TYPE: dict[Any, Callable[[Any], Any]] = {
    Phase: _phase,
    float: _float,
    float | None: _opt_float,
    str: _str,
    str | None: _opt_str,
    int: _int,
    frozenset[str]: _str_set,
}


def _field_decoders() -> dict[str, Callable[[Any], Any]]:
    # Follows GuardState: every field but NOT_PERSISTED is written, so a new field
    # is never silently dropped, and a field of a type this module cannot write
    # stops the import instead of losing state at the first save.
    hints = get_type_hints(GuardState)
    decoders = {}
    for f in fields(GuardState):
        if f.name in NOT_PERSISTED:
            continue
        if hints[f.name] not in _BY_TYPE:
            raise TypeError(f"store cannot persist GuardState.{f.name} of type {hints[f.name]}")
        decoders[f.name] = _BY_TYPE[hints[f.name]]
    return decoders


_DECODERS = _field_decoders()
PERSISTED: tuple[str, ...] = tuple(_DECODERS)


def _encode_value(value: Any) -> Any:
    if isinstance(value, Phase):
        return value.value
    if isinstance(value, frozenset):
        return sorted(value)
    return value


def differs(old: GuardState, new: GuardState) -> bool:
    """Whether the part of a state the store keeps (all but the last observation) changed."""
    return replace(old, seen=None) != replace(new, seen=None)


def encode(state: GuardState) -> dict[str, Any]:
    """The JSON document for `state`: version plus every field but rules and seen."""
    data: dict[str, Any] = {"version": VERSION}
    for name in _DECODERS:
        data[name] = _encode_value(getattr(state, name))
    return data


def decode(data: Any, rules: Rules) -> GuardState:
    """The GuardState in `data` with the given rules; ValueError if `data` is not a version-1 state."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    version = data.get("version")
    if type(version) is not int or version != VERSION:  # bool is an int, 1.0 == 1: both refused
        raise ValueError(f"unsupported version {version!r}")
    keys = set(data) - {"version"}
    if missing := set(_DECODERS) - keys:
        raise ValueError(f"missing keys: {', '.join(sorted(missing))}")
    if extra := keys - set(_DECODERS):
        raise ValueError(f"unknown keys: {', '.join(sorted(map(str, extra)))}")
    values = {}
    for name, dec in _DECODERS.items():
        try:
            values[name] = dec(data[name])
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return GuardState(rules=rules, **values)


# --------------------------------------------------------------------------- files


class Store:
    """Guard states as `<state_dir>/<guard>.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)

    def __repr__(self) -> str:
        return f"Store({str(self.state_dir)!r})"

    def path(self, guard: str) -> Path:
        if not ids.GUARD_NAME.fullmatch(guard):
            raise ValueError(f"invalid guard name {guard!r}")
        return self.state_dir / f"{guard}.json"

    def save(self, guard: str, state: GuardState) -> None:
        """Write `state` atomically: after a crash the file holds the old state or the new, never a mix."""
        path = self.path(guard)
        # Encode first: a state that cannot be written must not touch the disk.
        payload = json.dumps(encode(state), sort_keys=True, allow_nan=False, indent=1).encode() + b"\n"
        self.state_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        self._keep_private()
        write_atomic(path, payload, durable=True)

    def load(self, guard: str, rules: Rules) -> GuardState | None:
        """The saved state of `guard`, or None when there is none or it cannot be used."""
        path = self.path(guard)
        if self.state_dir.is_dir():
            self._keep_private()
        self._remove_stale_temps(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # permission, a directory in its place, I/O error
            return self._set_aside(guard, path, f"unreadable: {type(exc).__name__}: {exc.strerror or exc}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._set_aside(guard, path, "not UTF-8")
        try:
            return decode(json.loads(text), rules)
        except json.JSONDecodeError as exc:
            return self._set_aside(guard, path, f"not JSON (truncated?): {exc}")
        except (ValueError, RecursionError) as exc:
            return self._set_aside(guard, path, str(exc))

    def _keep_private(self) -> None:
        # mkdir's mode only applies to a directory it creates, and only under the umask.
        try:
            mode = stat.S_IMODE(self.state_dir.stat().st_mode)
            if mode == PRIVATE_DIR:
                return
            os.chmod(self.state_dir, PRIVATE_DIR)
        except OSError as exc:
            log.warning("store.dir.open", state_dir=str(self.state_dir),
                        error=f"{type(exc).__name__}: {exc.strerror or exc}")
            return
        log.warning("store.dir.tightened", state_dir=str(self.state_dir), was=f"{mode:04o}", now=f"{PRIVATE_DIR:04o}")

    def _set_aside(self, guard: str, path: Path, reason: str) -> None:
        kept = _free_name(path)
        try:
            os.rename(path, kept)
        except OSError as exc:
            log.error("store.corrupt", guard=guard, reason=reason, kept=None,
                      error=f"could not rename aside: {type(exc).__name__}: {exc.strerror or exc}")
            return None
        log.error("store.corrupt", guard=guard, reason=reason, kept=str(kept))
        return None

    def _remove_stale_temps(self, path: Path) -> None:
        # Left by a crash between mkstemp and rename; only our own temp names, never a state file.
        for tmp in self.state_dir.glob(f".{glob.escape(path.name)}.*{_TMP_SUFFIX}"):
            _unlink_quietly(tmp)


def peek(state_dir: Path, guard: str, rules: Rules) -> GuardState | None:
    """The saved state of `guard`, read by a process other than the daemon; None when none is saved.

    Read-only, unlike Store.load: it never sets a file aside nor removes temp files
    (the daemon may be writing them). A file that cannot be read raises OSError, one
    that cannot be used ValueError, for the caller to report.
    """
    try:
        raw = Store(state_dir).path(guard).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return decode(json.loads(raw), rules)
    except RecursionError as exc:  # JSON nested too deep to decode
        raise ValueError(str(exc)) from None


def write_atomic(path: Path, payload: bytes, *, durable: bool = False) -> None:
    """Write `payload` to `path` so that a reader, or a crash, sees the old file or the new.

    Temp file in the same directory (0600 whatever the umask), fsync, rename. With
    `durable` the directory is fsynced too: only then does the rename survive a power
    loss, which the write-ahead state needs and a status snapshot does not.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _free_name(path: Path) -> Path:
    candidate = path.with_name(path.name + ".corrupt")
    n = 1
    while os.path.lexists(candidate):
        candidate = path.with_name(f"{path.name}.corrupt-{n}")
        n += 1
    return candidate


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
