"""The state store on a real filesystem: round trips, crashes, corrupt files, permissions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from dataclasses import fields, replace
from pathlib import Path
from typing import get_type_hints

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from spotguard import store as store_module
from spotguard.machine import GuardState, Instance, Observed, Phase, Rules
from spotguard.store import Store, decode, encode

RULES = Rules(standbys=("i-0standby1", "i-0standby2"), failback_grace=60.0)

finite = st.floats(allow_nan=False, allow_infinity=False)
ids = st.text(min_size=1, max_size=20)
rules_st = st.builds(Rules, standbys=st.tuples(ids, ids), failback_grace=finite, on_rebalance=st.sampled_from(["ignore", "prewarm"]))
# A strategy per GuardState field type; a field of a new type fails loudly here too.
BY_TYPE = {
    Phase: st.sampled_from(Phase),
    float: finite,
    float | None: st.none() | finite,
    str: st.text(),
    str | None: st.none() | ids,
    int: st.integers(min_value=0, max_value=2**53),
    frozenset[str]: st.frozensets(ids),
}
HINTS = get_type_hints(GuardState)
states = st.builds(
    GuardState,
    rules=rules_st,
    **{f.name: BY_TYPE[HINTS[f.name]] for f in fields(GuardState) if f.name not in ("rules", "seen")},
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def failover_state(seen: Observed | None = None) -> GuardState:
    return GuardState(
        rules=RULES,
        phase=Phase.STANDBY_STARTING,
        since=1_700_000_000.5,
        reason="notice for i-0spot",
        standby="i-0standby1",
        started_at=1_700_000_001.0,
        failed=frozenset({"i-0standby9", "i-0standby0"}),
        doomed=frozenset({"i-0spot"}),
        retries=2,
        seen=seen,
    )


def corrupt_files(state_dir: Path) -> list[str]:
    return sorted(p.name for p in state_dir.iterdir() if ".corrupt" in p.name)


# --------------------------------------------------------------------------- format


@settings(max_examples=200)
@given(states)
def test_encode_decode_round_trip_through_json(state):
    data = json.loads(json.dumps(encode(state), allow_nan=False))
    assert decode(data, state.rules) == state


@given(states, rules_st)
def test_rules_come_from_the_caller_not_the_file(state, rules):
    assert decode(encode(state), rules).rules == rules


def test_every_field_but_rules_and_seen_is_persisted():
    assert set(store_module.PERSISTED) == {f.name for f in fields(GuardState)} - {"rules", "seen"}


def test_file_format_is_plain_and_versioned():
    data = encode(failover_state())
    assert data["version"] == 1
    assert data["phase"] == "standby-starting"
    assert data["since"] == 1_700_000_000.5
    assert data["reason"] == "notice for i-0spot"
    assert data["standby"] == "i-0standby1"
    assert data["failed"] == ["i-0standby0", "i-0standby9"]  # sets as sorted lists
    assert data["doomed"] == ["i-0spot"]
    assert data["unhealthy_since"] is None
    assert data["retries"] == 2
    assert "rules" not in data and "seen" not in data
    assert set(data) == {"version", *store_module.PERSISTED}


def test_seen_is_not_persisted(tmp_path):
    seen = Observed(spots=(Instance("i-0onlyinseen", "running", notice=True),))
    s = Store(tmp_path)
    s.save("inference", failover_state(seen=seen))
    assert "i-0onlyinseen" not in (tmp_path / "inference.json").read_text()
    assert s.load("inference", RULES) == failover_state(seen=None)


@given(json_values)
def test_decode_accepts_or_raises_value_error_only(data):
    try:
        result = decode(data, RULES)
    except ValueError:
        return
    assert isinstance(result, GuardState)


@given(states, st.sampled_from(store_module.PERSISTED), json_values)
def test_decode_never_crashes_on_a_mangled_field(state, key, value):
    data = {**encode(state), key: value}
    try:
        decode(data, state.rules)
    except ValueError:
        pass


BAD = [
    ("not an object", []),
    ("no version", {k: v for k, v in encode(GuardState(RULES)).items() if k != "version"}),
    ("version 2", {**encode(GuardState(RULES)), "version": 2}),
    ("version true", {**encode(GuardState(RULES)), "version": True}),
    ("version 1.0", {**encode(GuardState(RULES)), "version": 1.0}),
    ("missing key", {k: v for k, v in encode(GuardState(RULES)).items() if k != "retries"}),
    ("unknown key", {**encode(GuardState(RULES)), "seen": {}}),
    ("unknown phase", {**encode(GuardState(RULES)), "phase": "panicking"}),
    ("since a string", {**encode(GuardState(RULES)), "since": "0"}),
    ("since overflows", {**encode(GuardState(RULES)), "since": 10**400}),
    ("since a bool", {**encode(GuardState(RULES)), "since": False}),
    ("retries a float", {**encode(GuardState(RULES)), "retries": 1.0}),
    ("failed a string", {**encode(GuardState(RULES)), "failed": "i-1"}),
    ("failed holds ints", {**encode(GuardState(RULES)), "failed": [1]}),
    ("standby a number", {**encode(GuardState(RULES)), "standby": 7}),
]


@pytest.mark.parametrize(("why", "data"), BAD, ids=[why for why, _ in BAD])
def test_decode_refuses_bad_shapes(why, data):
    with pytest.raises(ValueError):
        decode(data, RULES)


def test_decode_refuses_non_finite_numbers():
    with pytest.raises(ValueError, match="since"):
        decode({**encode(GuardState(RULES)), "since": float("inf")}, RULES)


# --------------------------------------------------------------------------- files


def test_save_then_load(tmp_path):
    s = Store(tmp_path)
    s.save("inference", failover_state())
    assert s.load("inference", RULES) == failover_state()
    assert (tmp_path / "inference.json").is_file()


def test_load_of_a_guard_never_saved_is_none(tmp_path):
    with capture_logs() as logs:
        assert Store(tmp_path).load("inference", RULES) is None
    assert logs == []


def test_save_overwrites_and_creates_the_directory(tmp_path):
    s = Store(tmp_path / "state" / "dir")
    s.save("inference", GuardState(RULES))
    s.save("inference", failover_state())
    assert s.load("inference", RULES) == failover_state()
    assert sorted(p.name for p in (tmp_path / "state" / "dir").iterdir()) == ["inference.json"]


def test_guards_do_not_share_files(tmp_path):
    s = Store(tmp_path)
    s.save("a", GuardState(RULES))
    s.save("b", failover_state())
    assert s.load("a", RULES) == GuardState(RULES)
    assert s.load("b", RULES) == failover_state()


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", ".hidden", "UPPER", "x.json"])
def test_guard_names_cannot_be_paths(tmp_path, name):
    with pytest.raises(ValueError, match="guard name"):
        Store(tmp_path).save(name, GuardState(RULES))


def test_file_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        s = Store(tmp_path)
        s.save("inference", GuardState(RULES))
        s.save("inference", failover_state())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "inference.json").stat().st_mode) == 0o600


def test_a_state_that_cannot_be_encoded_leaves_the_old_file(tmp_path):
    s = Store(tmp_path)
    s.save("inference", failover_state())
    before = (tmp_path / "inference.json").read_bytes()
    with pytest.raises(ValueError):
        s.save("inference", replace(failover_state(), since=float("nan")))
    assert (tmp_path / "inference.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inference.json"]


def test_a_failed_rename_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    s = Store(tmp_path)
    s.save("inference", failover_state())
    before = (tmp_path / "inference.json").read_bytes()

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "replace", disk_full)
    with pytest.raises(OSError):
        s.save("inference", GuardState(RULES))
    assert (tmp_path / "inference.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inference.json"]


def test_a_crash_mid_write_keeps_the_old_state(tmp_path):
    """A real process dies (os._exit) after writing its temp file, before the rename."""
    s = Store(tmp_path)
    s.save("inference", failover_state())
    child = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from spotguard import store
        from spotguard.machine import GuardState, Rules
        store.os.fsync = lambda fd: os._exit(9)   # power cut right after the data write
        store.Store(Path({str(tmp_path)!r})).save("inference", GuardState(Rules(standbys=("i-x",))))
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert result.returncode == 9, result.stderr.decode()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "inference.json"]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the crash left its temp file
    assert s.load("inference", RULES) == failover_state()  # old state, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inference.json"]  # load cleared the debris


CORRUPT = [
    ("truncated", lambda good: good[: len(good) // 2], "not JSON"),
    ("empty", lambda good: b"", "not JSON"),
    ("binary", lambda good: b"\x80\x81garbage", "not UTF-8"),
    ("wrong version", lambda good: good.replace(b'"version": 1', b'"version": 7'), "version"),
    ("wrong shape", lambda good: b'["a", "list"]', "JSON object"),
    ("bad field", lambda good: good.replace(b'"standby-starting"', b'"on-fire"'), "phase"),
    ("deep nesting", lambda good: b"[" * 100_000 + b"]" * 100_000, ""),
]


@pytest.mark.parametrize(("why", "mangle", "reason"), CORRUPT, ids=[c[0] for c in CORRUPT])
def test_a_corrupt_file_is_kept_aside_and_logged(tmp_path, why, mangle, reason):
    s = Store(tmp_path)
    s.save("inference", failover_state())
    path = tmp_path / "inference.json"
    bad = mangle(path.read_bytes())
    path.write_bytes(bad)
    with capture_logs() as logs:
        assert s.load("inference", RULES) is None
    assert not path.exists()
    assert (tmp_path / "inference.json.corrupt").read_bytes() == bad
    (entry,) = logs
    assert entry["event"] == "store.corrupt"
    assert entry["guard"] == "inference"
    assert entry["kept"].endswith("inference.json.corrupt")
    assert reason in entry["reason"]


def test_corrupt_files_are_numbered_never_overwritten(tmp_path):
    s = Store(tmp_path)
    path = tmp_path / "inference.json"
    for n in range(3):
        path.write_text(f"garbage {n}")
        assert s.load("inference", RULES) is None
    assert corrupt_files(tmp_path) == ["inference.json.corrupt", "inference.json.corrupt-1", "inference.json.corrupt-2"]
    assert (tmp_path / "inference.json.corrupt-2").read_text() == "garbage 2"
    s.save("inference", GuardState(RULES))  # a new state starts fresh; the evidence stays
    assert len(corrupt_files(tmp_path)) == 3


def test_an_unreadable_file_is_kept_aside(tmp_path):
    # A directory in the file's place is unreadable for root too (chmod 000 is not).
    (tmp_path / "inference.json").mkdir()
    with capture_logs() as logs:
        assert Store(tmp_path).load("inference", RULES) is None
    assert (tmp_path / "inference.json.corrupt").is_dir()
    assert logs[0]["event"] == "store.corrupt"
    assert "unreadable" in logs[0]["reason"]

