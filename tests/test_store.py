"""The state store on a real filesystem: round trips, crashes, corrupt files, permissions.

The last part runs the real daemon (`daemon.build`, real aiobotocore clients on
moto in server mode, driven round by round on a fake clock) to show what a bad
state file means for a guard: kept aside, logged, and the guard rebuilt from
what AWS shows; and that a Discord webhook URL never reaches a state file.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import fields, replace
from pathlib import Path
from typing import get_type_hints

import pytest
from configs import write_config
from httpcapture import CaptureServer
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from waiting import until

from spotguard import config
from spotguard import store as store_module
from spotguard.daemon import build
from spotguard.machine import GuardState, Instance, Observed, Phase, Rules
from spotguard.notify import Notifier
from spotguard.store import Store, decode, encode

RULES = Rules(standbys=("i-0standby1", "i-0standby2"), failback_grace=60.0)
G = "inference"

finite = st.floats(allow_nan=False, allow_infinity=False)
ids = st.text(min_size=1, max_size=20)
rules_st = st.builds(Rules, standbys=st.tuples(ids, ids), failback_grace=finite,
                     on_rebalance=st.sampled_from(["ignore", "prewarm"]))
# A strategy per GuardState field type; a field of a new type fails loudly here too.
BY_TYPE = {
    Phase: st.sampled_from(Phase),
    float: finite,
    float | None: st.none() | finite,
    str: st.text(),
    str | None: st.none() | ids,
    int: st.integers(min_value=0, max_value=2**53),
    bool: st.booleans(),
    frozenset[str]: st.frozensets(ids),
    tuple[tuple[str, float], ...]: st.lists(st.tuples(ids, finite), max_size=4).map(tuple),
    tuple[str, ...] | None: st.none() | st.lists(ids, max_size=3).map(tuple),
    tuple[GuardState, ...]: st.just(()),  # filled in by `states` below: a slot is a state itself
}
HINTS = get_type_hints(GuardState)
flat_states = st.builds(
    GuardState,
    rules=rules_st,
    **{f.name: BY_TYPE[HINTS[f.name]] for f in fields(GuardState) if f.name not in ("rules", "seen")},
)


@st.composite
def states(draw):
    """A state, sometimes a fleet's with slots (which read back with the guard's rules, capacity 1)."""
    state = draw(flat_states)
    slots = draw(st.lists(flat_states, max_size=2))
    return replace(state, slots=tuple(replace(s, rules=replace(state.rules, capacity=1)) for s in slots))


states = states()
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
    data = json.loads(json.dumps(encode(state, G), allow_nan=False))
    assert decode(data, state.rules, G) == state


@given(states, rules_st)
def test_rules_come_from_the_caller_not_the_file(state, rules):
    assert decode(encode(state, G), rules, G).rules == rules


def test_every_field_but_rules_and_seen_is_persisted():
    assert set(store_module.PERSISTED) == {f.name for f in fields(GuardState)} - {"rules", "seen"}


def test_file_format_is_plain_and_versioned():
    data = encode(failover_state(), G)
    assert data["version"] == 2 and data["guard"] == G
    assert data["phase"] == "standby-starting"
    assert data["since"] == 1_700_000_000.5
    assert data["reason"] == "notice for i-0spot"
    assert data["standby"] == "i-0standby1"
    assert data["failed"] == ["i-0standby0", "i-0standby9"]  # sets as sorted lists
    assert data["doomed"] == ["i-0spot"]
    assert data["unhealthy_since"] is None
    assert data["retries"] == 2
    assert "rules" not in data and "seen" not in data
    assert set(data) == {"version", "guard", *store_module.PERSISTED}


def test_a_version_1_file_is_read_as_it_was_written():
    """What spotguard wrote before the guard's name and `watched` were kept: read, not set aside."""
    newer = ("guard", "watched", "stray")
    old = {k: v for k, v in encode(failover_state(), G).items() if k not in newer} | {"version": 1}
    assert decode(old, RULES, G) == failover_state()


def test_seen_is_not_persisted(tmp_path):
    seen = Observed(spots=(Instance("i-0onlyinseen", "running", notice=True),))
    s = Store(tmp_path)
    s.save("inference", failover_state(seen=seen))
    assert "i-0onlyinseen" not in (tmp_path / "inference.json").read_text()
    assert s.load("inference", RULES) == failover_state(seen=None)


@given(json_values)
def test_decode_accepts_or_raises_value_error_only(data):
    try:
        result = decode(data, RULES, G)
    except ValueError:
        return
    assert isinstance(result, GuardState)


@given(states, st.sampled_from(store_module.PERSISTED), json_values)
def test_decode_never_crashes_on_a_mangled_field(state, key, value):
    data = {**encode(state, G), key: value}
    try:
        decode(data, state.rules, G)
    except ValueError:
        pass


BAD = [
    ("not an object", []),
    ("no version", {k: v for k, v in encode(GuardState(RULES), G).items() if k != "version"}),
    ("version 3", {**encode(GuardState(RULES), G), "version": 3}),
    ("another guard's state", encode(GuardState(RULES), "batch")),
    ("version 2 without a name", {k: v for k, v in encode(GuardState(RULES), G).items() if k != "guard"}),
    ("version 1 with a field of version 2", {k: v for k, v in encode(GuardState(RULES), G).items() if k != "guard"}
     | {"version": 1}),
    ("version true", {**encode(GuardState(RULES), G), "version": True}),
    ("version 1.0", {**encode(GuardState(RULES), G), "version": 1.0}),
    ("missing key", {k: v for k, v in encode(GuardState(RULES), G).items() if k != "retries"}),
    ("unknown key", {**encode(GuardState(RULES), G), "seen": {}}),
    ("unknown phase", {**encode(GuardState(RULES), G), "phase": "panicking"}),
    ("since a string", {**encode(GuardState(RULES), G), "since": "0"}),
    ("since overflows", {**encode(GuardState(RULES), G), "since": 10**400}),
    ("since a bool", {**encode(GuardState(RULES), G), "since": False}),
    ("retries a float", {**encode(GuardState(RULES), G), "retries": 1.0}),
    ("failed a string", {**encode(GuardState(RULES), G), "failed": "i-1"}),
    ("failed holds ints", {**encode(GuardState(RULES), G), "failed": [1]}),
    ("standby a number", {**encode(GuardState(RULES), G), "standby": 7}),
]


@pytest.mark.parametrize(("why", "data"), BAD, ids=[why for why, _ in BAD])
def test_decode_refuses_bad_shapes(why, data):
    with pytest.raises(ValueError):
        decode(data, RULES, G)


def test_decode_refuses_non_finite_numbers():
    with pytest.raises(ValueError, match="since"):
        decode({**encode(GuardState(RULES), G), "since": float("inf")}, RULES, G)


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
    ("wrong version", lambda good: good.replace(b'"version": 2', b'"version": 7'), "version"),
    ("another guard's file", lambda good: good.replace(b'"guard": "inference"', b'"guard": "batch"'),
     "guard 'batch''s state"),
    ("wrong shape", lambda good: b'["a", "list"]', "JSON object"),
    ("bad field", lambda good: good.replace(b'"standby-starting"', b'"on-fire"'), "phase"),
    ("deep nesting", lambda good: b"[" * 100_000 + b"]" * 100_000, ""),
    ("older version", lambda good: _older(), "version 0"),
    ("no version", lambda good: _without_version(good), "version None"),
]


def _older() -> bytes:
    """What an older spotguard might have written: version 0, fewer and other fields."""
    return json.dumps({"version": 0, "phase": "both-serving", "standby": "i-0standby1", "since": 1.0}).encode()


def _without_version(good: bytes) -> bytes:
    return json.dumps({k: v for k, v in json.loads(good).items() if k != "version"}).encode()


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


SPOILED_PLACES = [
    ("a symlink", lambda path, elsewhere: path.symlink_to(elsewhere), "unreadable: OSError"),
    ("a FIFO", lambda path, elsewhere: os.mkfifo(path), "not a regular file"),
    ("a huge file", lambda path, elsewhere: path.write_bytes(b" " * (store_module.MAX_STATE_BYTES + 1)), "larger than"),
]


@pytest.mark.fault(fault="state file a symlink, FIFO or huge file", phase="start",
                   outcome="never followed, read or blocked on: kept aside, logged")
@pytest.mark.parametrize(("why", "place", "reason"), SPOILED_PLACES, ids=[p[0] for p in SPOILED_PLACES])
def test_the_state_file_is_read_as_untrusted_ground(tmp_path, why, place, reason):
    """No symlink followed (it could point at another guard's file, or anything as root),
    no FIFO read (start-up would hang), no unbounded read."""
    elsewhere = tmp_path / "elsewhere.json"
    Store(tmp_path).save("elsewhere", failover_state())
    (tmp_path / "elsewhere.json").rename(elsewhere)
    path = tmp_path / "inference.json"
    place(path, elsewhere)
    with capture_logs() as logs:
        assert Store(tmp_path).load("inference", RULES) is None  # returns at once, even for the FIFO
    (entry,) = logs
    assert entry["event"] == "store.corrupt" and reason in entry["reason"]
    assert elsewhere.exists() and not path.exists()  # the link itself was set aside, its target untouched


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



def _unreadable_child(state_dir: Path) -> dict:
    """Load as `nobody` in a child process: as root, chmod 000 does not stop a read."""
    child = textwrap.dedent(
        """
        import json, os, sys
        from pathlib import Path
        from structlog.testing import capture_logs
        from spotguard.machine import Rules
        from spotguard.store import Store
        os.setgroups([]); os.setgid(65534); os.setuid(65534)   # after the imports: root's venv stays readable
        with capture_logs() as logs:
            result = Store(Path(sys.argv[1])).load("inference", Rules(standbys=("i-0standby1", "i-0standby2")))
        print(json.dumps({"loaded": result is not None, "logs": [{k: str(v) for k, v in e.items()} for e in logs]}))
        """
    )
    result = subprocess.run([sys.executable, "-c", child, str(state_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.fault(
    fault="state file unreadable (chmod 000)", phase="start", outcome="kept aside, logged, rebuilt from AWS"
)
def test_a_chmod_000_file_is_kept_aside():
    # Not under tmp_path: pytest's base directory is 0700, which `nobody` cannot enter.
    state_dir = Path(tempfile.mkdtemp(prefix="spotguard-store-"))
    try:
        Store(state_dir).save("inference", failover_state())
        path = state_dir / "inference.json"
        path.chmod(0)
        if os.geteuid() == 0:
            # Root reads a mode-000 file (CAP_DAC_OVERRIDE), so the state loads: honest, and fine.
            assert Store(state_dir).load("inference", RULES) == failover_state()
            state_dir.chmod(0o777)  # let `nobody` rename in it, as the daemon's own user could
            outcome = _unreadable_child(state_dir)
            loaded, logs = outcome["loaded"], outcome["logs"]
        else:
            with capture_logs() as logs:
                loaded = Store(state_dir).load("inference", RULES) is not None
        assert not loaded
        (entry,) = [e for e in logs if e["event"] == "store.corrupt"]
        assert "unreadable: PermissionError" in entry["reason"]
        assert entry["kept"].endswith("inference.json.corrupt")
        assert not path.exists() and (state_dir / "inference.json.corrupt").exists()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


# --------------------------------------------------------------------------- permissions


def test_state_dir_is_created_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        Store(tmp_path / "var" / "spotguard").save("inference", GuardState(RULES))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "var" / "spotguard").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "var" / "spotguard" / "inference.json").stat().st_mode) == 0o600


@pytest.mark.parametrize("how", ["save", "load"])
def test_an_open_state_dir_spotguard_did_not_make_is_reported_once_never_chmodded(tmp_path, how):
    """It may be shared, or a symlink's target (a 1777 directory): not spotguard's to change."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    state_dir = tmp_path / "state"
    state_dir.symlink_to(shared)  # systemd's DynamicUser state directories are symlinks too
    s = Store(state_dir)
    with capture_logs() as logs:
        if how == "save":
            s.save("inference", GuardState(RULES))
        else:
            assert s.load("inference", RULES) is None
        s.save("inference", failover_state())
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert [(e["event"], e["mode"]) for e in logs] == [("store.dir.open", "1777")]
    assert "chmod 0700" in logs[0]["fix"]
    assert s.load("inference", RULES) == failover_state()


# --------------------------------------------------------------------------- with the daemon on moto


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def started(settings, aws, notifier, clock):
    daemon = build(settings, aws, notifier)
    daemon.clock = clock  # build() wires the real parts; time is the test's
    return daemon


async def rounds_until(daemon, clock, done, *, step: float = 20.0, limit: int = 30) -> None:
    for _ in range(limit):
        clock.now += step
        await daemon.round()
        if done():
            return
    raise AssertionError(f"not done after {limit} rounds: {daemon.guards['inference'].state}")


REBUILD = [
    ("truncated", lambda path: path.write_bytes(path.read_bytes()[:40])),
    ("older version", lambda path: path.write_bytes(_older())),
    ("no version", lambda path: path.write_bytes(_without_version(path.read_bytes()))),
    ("a directory", lambda path: (path.unlink(), path.mkdir())),
]


@pytest.mark.fault(
    fault="state file corrupt, old or replaced", phase="start", outcome="kept aside, logged, rebuilt from AWS"
)
@pytest.mark.parametrize(("why", "spoil"), REBUILD, ids=[r[0] for r in REBUILD])
async def test_a_bad_state_file_is_kept_aside_and_the_guard_rebuilt_from_aws(
    tmp_path, moto_world, deployment, aws, why, spoil
):
    d, standby = deployment, deployment.standby_ids[0]
    settings = config.load(write_config(tmp_path, moto_world, [d], grace="60s", guard={"name": "inference"}))
    # The daemon died mid-failover: the standby runs and serves beside the spot.
    Store(settings.daemon.state_dir).save("inference", failover_state())
    moto_world.boto("ec2").start_instances(InstanceIds=[standby])
    moto_world.boto("elbv2").register_targets(TargetGroupArn=d.target_group_arn, Targets=[{"Id": standby}])
    path = settings.daemon.state_dir / "inference.json"
    spoil(path)

    clock = Clock(1_800_000_000.0)
    with capture_logs() as logs:
        daemon = started(settings, aws, Notifier(None), clock)
    assert [e["event"] for e in logs if e["event"].startswith("store.")] == ["store.corrupt"]
    guard = daemon.guards["inference"]
    assert guard.state.phase.value == "spot-healthy" and guard.state.standby is None  # knows nothing yet
    assert (settings.daemon.state_dir / "inference.json.corrupt").exists()

    # What AWS shows is enough: a standby running outside a failover gets the grace, then stops.
    await rounds_until(daemon, clock,
                       lambda: guard.state.phase.value == "spot-healthy" and guard.state.reason != "initial")
    assert moto_world.states(standby)[standby] == "stopped"
    assert guard.state.reason == f"standby {standby} stopped"
    assert moto_world.health(d.target_group_arn) == {d.spot_instance_id: "healthy"}
    assert moto_world.states(d.standby_ids[1])[d.standby_ids[1]] == "stopped"
    assert Store(settings.daemon.state_dir).load("inference", guard.state.rules) is not None  # a good file again


async def test_the_discord_webhook_url_never_reaches_a_state_file(tmp_path, moto_world, deployment, aws):
    d = deployment
    with CaptureServer() as discord:
        url = discord.url + "/api/webhooks/123456789/S3cr3t-T0ken_never-on-disk"
        settings = config.load(write_config(tmp_path, moto_world, [d], grace="60s", guard={"name": "inference"},
                                            discord={"webhook_url": url}))
        assert settings.discord.webhook_url == url
        notifier = Notifier(settings.discord.webhook_url)
        await notifier.start()
        clock = Clock(1_800_000_000.0)
        daemon = started(settings, aws, notifier, clock)
        guard = daemon.guards["inference"]
        moto_world.inject_error("start", d.standby_ids[0], "InsufficientInstanceCapacity")  # an alert too
        moto_world.notice(d.spot_request_id)
        await rounds_until(daemon, clock, lambda: guard.state.phase.value == "both-serving")
        moto_world.terminate_spot(d.spot_request_id)
        moto_world.fulfil(d.spot_request_id)
        await rounds_until(daemon, clock, lambda: guard.state.phase.value == "spot-healthy")
        await until(lambda: len(discord.requests) >= 5, timeout=15.0)
        await notifier.close()
    texts = [r.json["content"] for r in discord.requests]
    assert any("InsufficientInstanceCapacity" in t for t in texts), texts
    files = [p for p in settings.daemon.state_dir.rglob("*") if p.is_file()]
    assert files, "no state file was written"
    secrets = [url, "S3cr3t-T0ken_never-on-disk", "/api/webhooks/", discord.url]
    for p in files:
        text = p.read_bytes().decode("utf-8", "replace")
        assert not [s for s in secrets if s in text], f"{p.name} holds the webhook URL"


def test_a_steady_fleet_is_not_written_on_every_poll():
    """A fleet's slots carry their own view and watch time: like the guard's, neither is worth a
    write, or every poll of a steady fleet would fsync its state file."""
    from spotguard.machine import Instance, Target, initial, step
    from spotguard.store import differs

    spots = tuple(Instance(f"i-s{k}", "running", probe=None) for k in range(4))
    seen = Observed(spots=spots, standbys=(Instance("i-sb1", "stopped"),),
                    targets=tuple(Target(f"i-s{k}", "healthy") for k in range(4)))
    first, _ = step(initial(Rules(standbys=("i-sb1",), capacity=4)), seen, 0.0)
    second, _ = step(first, seen, 5.0)
    third, _ = step(second, seen, 10.0)
    assert third.slots and not differs(second, third)
    noticed, _ = step(third, replace(seen, spots=(replace(spots[0], notice=True),) + spots[1:]), 15.0)
    assert differs(third, noticed)
