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

import errno
import fcntl
import glob
import json
import math
import os
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, get_type_hints

import structlog

from spotguard import ids
from spotguard.machine import GuardState, Phase, Rules, slot_rules

log = structlog.get_logger(__name__)

# Version 2 names its guard inside (a file copied from another guard is set aside)
# and adds `watched`; a version-1 file is still read.
VERSION = 2
ADDED_IN_2 = frozenset({"watched", "stray"})
# Fields added since version 2 was first written: a file without them (an upgrade) takes their defaults.
ADDED_SINCE_2 = frozenset({"ready", "unprobed", "deadlines", "warned", "learned", "short_said", "slots", "holds"})
# GuardState fields that are deliberately not written; every other field is.
NOT_PERSISTED = frozenset({"rules", "seen"})
_TMP_SUFFIX = ".tmp"
LOCK_NAME = "spotguard.lock"
# A state file is a few hundred bytes; anything near this is not one.
MAX_STATE_BYTES = 1 << 20
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


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _str_set(v: Any) -> frozenset[str]:
    if not isinstance(v, list):
        raise ValueError(f"expected a list, got {v!r}")
    return frozenset(_str(item) for item in v)


def _deadlines(v: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(v, list) or not all(isinstance(pair, list) and len(pair) == 2 for pair in v):
        raise ValueError(f"expected a list of [instance, time] pairs, got {v!r}")
    return tuple((_str(iid), _float(at)) for iid, at in v)


def _opt_str_tuple(v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list):
        raise ValueError(f"expected a list, got {v!r}")
    return tuple(_str(item) for item in v)


def _slots(v: Any) -> tuple[GuardState, ...]:
    """A fleet's slots, each a state of its own (decode() gives them their rules)."""
    if not isinstance(v, list):
        raise ValueError(f"expected a list of slots, got {v!r}")
    return tuple(_fields(slot, Rules(standbys=()), set(_DECODERS) - {"slots"}) for slot in v)


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
    bool: _bool,
    frozenset[str]: _str_set,
    tuple[tuple[str, float], ...]: _deadlines,
    tuple[str, ...] | None: _opt_str_tuple,
    tuple[GuardState, ...]: _slots,
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
    if isinstance(value, GuardState):
        return {name: _encode_value(getattr(value, name)) for name in _DECODERS if name != "slots"}
    if isinstance(value, tuple):
        return [_encode_value(item) for item in value]
    return value


def differs(old: GuardState, new: GuardState) -> bool:
    """Whether the part of a state worth a write changed: all but the last observation and
    its time, a fleet's slots' included (`watched` rides along with the next write; a poll
    alone never writes)."""
    return _worth_writing(old) != _worth_writing(new)


def _worth_writing(state: GuardState) -> GuardState:
    slots = tuple(replace(s, seen=None, watched=None) for s in state.slots)
    return replace(state, seen=None, watched=None, slots=slots)


def encode(state: GuardState, guard: str) -> dict[str, Any]:
    """The JSON document for `guard`'s `state`: version, the guard's name, every field but rules and seen."""
    data: dict[str, Any] = {"version": VERSION, "guard": guard}
    for name in _DECODERS:
        data[name] = _encode_value(getattr(state, name))
    return data


def decode(data: Any, rules: Rules, guard: str) -> GuardState:
    """`guard`'s GuardState in `data`, with the given rules; ValueError if it is not a state
    spotguard wrote for that guard. A version-1 file (no name inside, fields added since
    missing) is read as it was written."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    version = data.get("version")
    if type(version) is not int or version not in (1, VERSION):  # bool is an int, 1.0 == 1: both refused
        raise ValueError(f"unsupported version {version!r}")
    if version == VERSION and data.get("guard") != guard:
        raise ValueError(f"it is guard {data.get('guard')!r}'s state, not {guard!r}'s")
    header = {"version", "guard"} if version == VERSION else {"version"}
    body = {key: value for key, value in data.items() if key not in header}
    state = _fields(body, rules, set(_DECODERS) - (ADDED_IN_2 if version == 1 else set()))
    return replace(state, slots=tuple(replace(slot, rules=slot_rules(rules)) for slot in state.slots))


def _fields(data: Any, rules: Rules, expected: set[str]) -> GuardState:
    """A GuardState from the `expected` keys of `data` (those added since version 2 may be missing)."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    keys = set(data)
    if missing := expected - keys - ADDED_SINCE_2:
        raise ValueError(f"missing keys: {', '.join(sorted(missing))}")
    if extra := keys - expected:
        raise ValueError(f"unknown keys: {', '.join(sorted(map(str, extra)))}")
    values = {}
    for name in keys:
        try:
            values[name] = _DECODERS[name](data[name])
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return GuardState(rules=rules, **values)


# --------------------------------------------------------------------------- files


class Store:
    """Guard states as `<state_dir>/<guard>.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self._reported_open = False  # store.dir.open is said once

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
        payload = json.dumps(encode(state, guard), sort_keys=True, allow_nan=False, indent=1).encode() + b"\n"
        self._ensure_dir()
        write_atomic(path, payload, durable=True)

    def load(self, guard: str, rules: Rules) -> GuardState | None:
        """The saved state of `guard`, or None when there is none or it cannot be used."""
        path = self.path(guard)
        if self.state_dir.is_dir():
            self._check_private()
        self._remove_stale_temps(path)
        try:
            raw = read_bounded(path, MAX_STATE_BYTES)
        except FileNotFoundError:
            return None
        except OSError as exc:  # permission, a directory, a FIFO or a symlink in its place, I/O error
            return self._set_aside(guard, path, f"unreadable: {type(exc).__name__}: {exc.strerror or exc}")
        except ValueError as exc:  # too large to be a state
            return self._set_aside(guard, path, str(exc))
        try:
            return decode(json.loads(raw.decode("utf-8")), rules, guard)
        except UnicodeDecodeError:
            return self._set_aside(guard, path, "not UTF-8")
        except json.JSONDecodeError as exc:
            return self._set_aside(guard, path, f"not JSON (truncated?): {exc}")
        except (ValueError, RecursionError) as exc:
            return self._set_aside(guard, path, str(exc))

    def _ensure_dir(self) -> None:
        """Make the state directory owner-only if spotguard creates it; one it did not
        create is never chmodded (it may be shared, or a symlink's target), only reported."""
        try:
            self.state_dir.mkdir(mode=PRIVATE_DIR, parents=True)
        except FileExistsError:
            self._check_private()
            return
        os.chmod(self.state_dir, PRIVATE_DIR)  # mkdir's mode is masked by the umask

    def _check_private(self) -> None:
        if self._reported_open:
            return
        try:
            mode = stat.S_IMODE(self.state_dir.stat().st_mode)
        except OSError:
            return  # the write that follows says what is wrong
        if mode & 0o077:
            self._reported_open = True
            log.warning("store.dir.open", state_dir=str(self.state_dir), mode=f"{mode:04o}",
                        fix=f"chmod 0700 {self.state_dir} (spotguard does not change a directory it did not create)")

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
        raw = read_bounded(Store(state_dir).path(guard), MAX_STATE_BYTES)
    except FileNotFoundError:
        return None
    try:
        return decode(json.loads(raw), rules, guard)
    except RecursionError as exc:  # JSON nested too deep to decode
        raise ValueError(str(exc)) from None


def read_bounded(path: Path, limit: int) -> bytes:
    """A regular file's bytes, read as if from untrusted ground: no symlink is followed,
    a FIFO or device is refused rather than read (it could block or never end), and a
    file longer than `limit` bytes raises ValueError instead of filling memory."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data


def check_writable(state_dir: Path) -> None:
    """Raise OSError unless files can be written in `state_dir` (created if missing): the
    daemon checks this once before it says it is ready."""
    Store(state_dir)._ensure_dir()
    probe = Path(state_dir) / ".spotguard-write-check"
    write_atomic(probe, b"ok\n", durable=True)
    probe.unlink()


class Locked(Exception):
    """Another process holds the state directory's lock."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder = path, holder


@contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Hold `<state_dir>/spotguard.lock` (flock) while inside: one daemon per state
    directory. Raises Locked, naming the holder's pid, when another process has it."""
    path = Path(state_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            raise Locked(path, f"pid {holder}" if holder.isdigit() else "another process") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock


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
