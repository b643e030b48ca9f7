"""`spotguard status` against a daemon running on moto, plus its month arithmetic by table.

The daemon runs in-process as in test_daemon.py, with a real Ledger observer
writing to its state_dir; status reads only those files, both through its
function and as the CLI in a subprocess, while the daemon runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from configs import daemon_settings, write_config
from observing import Told
from test_daemon import health, phase, replace_spot, running
from waiting import until

from spotguard import ledger, store
from spotguard.commands import status
from spotguard.config import GuardSettings
from spotguard.ledger import Ledger, LedgerView
from spotguard.machine import GuardState, Phase, Rules
from spotguard.store import Store

SECRET = "SECRET-webhook-token-never-printed"
PRICES = {"on_demand_hourly": 1.006, "spot_hourly": 0.35}
GUARD_FIELDS = {"name", "phase", "since", "reason", "standby", "stray", "rehearsing", "observed", "transitions",
                "month", "problems", "slots"}
MONTH_FIELDS = {"start", "end", "counted_from", "hours", "spot_hours", "standby_hours", "interruptions",
                "ready_margins", "on_demand_hourly", "spot_hourly", "cost", "on_demand_cost", "saving"}


def configured(tmp_path, world, d):
    discord = {"webhook_url": f"http://127.0.0.1:9/api/webhooks/1/{SECRET}"}
    return daemon_settings(tmp_path, world, [d], poll="0.2s", grace="1s", discord=discord, guard=PRICES)


async def cli(config: Path, *flags: str) -> tuple[int, str]:
    """The real command in a subprocess, awaited without blocking the daemon's loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spotguard", "status", "--config", str(config), *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert err == b"", err
    return proc.returncode, out.decode()


def guard_doc(settings) -> dict:
    (g,) = status.report(settings, time.time())["guards"]
    return g


async def test_status_follows_a_failover_phase_by_phase(tmp_path, moto_world, deployment, aws):
    d, standby = deployment, deployment.standby_ids[0]
    settings = configured(tmp_path, moto_world, d)
    config = tmp_path / "config.toml"
    moto_world.set_health(d.target_group_arn, standby, "initial")  # holds standby-starting
    moto_world.hold_draining(d.target_group_arn, standby)  # holds standby-draining
    outputs: list[str] = []
    seen_phases: list[str] = []

    def check(expected: Phase) -> dict:
        g = guard_doc(settings)
        assert g["phase"] == expected.value, g
        assert g["problems"] == []
        seen_phases.append(g["phase"])
        outputs.append(json.dumps(g))
        return g

    async with running(settings, aws, observers=[Ledger(settings.daemon.state_dir, settings.guards)]) as daemon:
        g = check(Phase.SPOT_HEALTHY)
        assert g["since"] is None  # nothing saved yet: the daemon has only observed
        assert [s["id"] for s in g["observed"]["spots"]] == [d.spot_instance_id]
        assert abs(status.parse_time(g["observed"]["at"]) - time.time()) < 60  # when the daemon last saw the world
        assert g["observed"]["spots"][0]["target"] == "healthy"

        moto_world.notice(d.spot_request_id)
        await until(lambda: phase(daemon) is Phase.STANDBY_STARTING and standby in health(moto_world, d),
                    what="standby-starting, standby registered")
        await until(lambda: (guard_doc(settings)["observed"]["standbys"][0]["target"] == "initial"),
                    what="status sees the standby registered")
        g = check(Phase.STANDBY_STARTING)
        assert g["standby"] == standby
        assert g["observed"]["spots"][0]["notice"] is True
        assert g["transitions"][-1]["from"] == "spot-healthy"
        assert "interruption notice" in g["transitions"][-1]["reason"]

        moto_world.set_health(d.target_group_arn, standby, None)  # passed its first check
        await until(lambda: phase(daemon) is Phase.BOTH_SERVING, what="both-serving")
        check(Phase.BOTH_SERVING)
        code, out = await cli(config, "--json")  # the real CLI, while the daemon runs
        assert code == 0
        doc = json.loads(out)
        assert doc["version"] == 1 and doc["guards"][0]["phase"] in ("both-serving", "spot-restored")
        assert set(doc) == {"version", "generated_at", "state_dir",
                            "blind_after", "ha", "guards"}  # docs/status-json.md
        assert doc["ha"] is None  # no [ha]: no DynamoDB, no field value
        assert set(doc["guards"][0]) == GUARD_FIELDS and set(doc["guards"][0]["month"]) == MONTH_FIELDS
        outputs.append(out)
        code, text = await cli(config)
        print(text)  # what a person sees mid-failover (pytest -s)
        assert "  last observed " in text and "not observed for" not in text
        outputs.append(text)

        await replace_spot(moto_world, daemon, d)
        await until(lambda: phase(daemon) is Phase.SPOT_RESTORED or phase(daemon) is Phase.STANDBY_DRAINING,
                    what="spot back")
        if phase(daemon) is Phase.SPOT_RESTORED:  # a 1 s grace: may already be draining
            check(Phase.SPOT_RESTORED)
        await until(lambda: phase(daemon) is Phase.STANDBY_DRAINING, what="standby-draining")
        g = check(Phase.STANDBY_DRAINING)
        assert g["reason"] == "failback_grace passed"
        code, text = await cli(config)
        assert code == 0 and "guard lab: standby-draining since" in text, text
        outputs.append(text)

        moto_world.hold_draining(d.target_group_arn, standby, False)
        await until(lambda: phase(daemon) is Phase.SPOT_HEALTHY, what="back to spot-healthy")
        g = check(Phase.SPOT_HEALTHY)
        text = status.render(status.report(settings, time.time()))
        outputs.append(text)
        print(text)  # what a person sees after the cycle (pytest -s)

    assert [t["to"] for t in g["transitions"]] == [
        "standby-starting", "both-serving", "spot-restored", "standby-draining", "spot-healthy"]
    month = g["month"]
    assert 0 < month["standby_hours"] < 0.02 and month["interruptions"] == 1
    assert month["cost"] is not None and month["saving"] == pytest.approx(
        month["on_demand_cost"] - month["cost"], abs=1e-3)
    # Nothing status prints, in either form, holds the webhook URL.
    assert not any(SECRET in o or "/api/webhooks" in o for o in outputs)


async def test_status_while_files_are_replaced_under_it(tmp_path):
    # A writer thread keeps saving the state, rewriting the seen file and appending
    # (with rotations) while status reads: every read must be whole.
    guard = GuardSettings(name="busy", target_group_arn="arn:x", standby_instance_ids=("i-0000000000000000a",))
    from spotguard.machine import GuardState, Instance, Observed

    book, saver = Ledger(tmp_path, [guard]), store.Store(tmp_path)
    tell = Told(book, guard.rules())
    done, written = threading.Event(), threading.Event()

    def write() -> None:
        n = 0
        while not done.is_set():
            n += 1
            saver.save("busy", GuardState(rules=guard.rules(), phase=Phase.BOTH_SERVING, since=n, reason=f"r{n}"))
            tell.event("busy", Observed(spots=(Instance(f"i-{n:017x}", "running"),)), 1e9 + n * 86400 * 20)
            written.set()

    writer = threading.Thread(target=write)
    writer.start()
    written.wait(5)
    try:
        for _ in range(150):
            g = status.guard_report(tmp_path, guard, time.time())
            assert g["problems"] == [] and g["phase"] == "both-serving"
    finally:
        done.set()
        writer.join()


def test_a_corrupt_state_file_is_reported_and_left_alone(tmp_path, capsys):
    path = tmp_path / "lab.json"
    path.write_text("{ truncated")
    guard = GuardSettings(name="lab", target_group_arn="arn:x")
    g = status.guard_report(tmp_path, guard, time.time())
    assert g["problems"] and g["problems"][0].startswith("state file: unusable")
    assert path.read_text() == "{ truncated"  # evidence for a person; only the daemon sets it aside
    assert g["phase"] is None and "unknown" in status.render({"guards": [g], "generated_at": status.iso(0)})


def test_a_corrupt_state_file_beside_an_observation_shows_no_phase_and_the_problem_first(tmp_path):
    """The issue's case: the seen file says the world was observed, the state file is corrupt.
    The phase is unknown (not the initial spot-healthy), and the problem comes first."""
    (tmp_path / "lab.json").write_text("{ truncated")
    ledger.seen_path(tmp_path, "lab").write_text(json.dumps(
        {"version": 1, "spots": [], "standbys": [], "targets": [], "since": 1e9, "observed_at": 1e9}))
    g = status.guard_report(tmp_path, GuardSettings(name="lab", target_group_arn="arn:x"), 1e9 + 10)
    assert g["phase"] is None
    lines = status.render({"guards": [g], "generated_at": status.iso(1e9 + 10)}).splitlines()
    assert lines[0] == "guard lab: phase unknown (its state file cannot be used)"
    assert lines[1].startswith("  problem: state file: unusable")


def test_a_world_not_seen_for_blind_after_is_said(tmp_path):
    """A daemon stopped or blind to AWS leaves an old observation behind: status says how old."""
    guard = GuardSettings(name="lab", target_group_arn="arn:x")
    now = time.time()
    for ago in (10, 300):
        ledger.seen_path(tmp_path, "lab").write_text(json.dumps(
            {"version": 1, "spots": [], "standbys": [], "targets": [], "since": now - 3600, "observed_at": now - ago}))
        g = status.guard_report(tmp_path, guard, now)
        text = status.render({"guards": [g], "generated_at": status.iso(now), "blind_after": 60.0})
        assert f"last observed {status.iso(now - ago).replace('T', ' ').replace('Z', ' UTC')}" in text
        assert ("not observed for 5m 00s, over blind_after (1m 00s)" in text) is (ago == 300), text


# --------------------------------------------------------------------------- [ha]: who leads

TABLE = "spotguard-ha"
HA = {"table": TABLE, "lease": "15s"}


def write_lease(world, holder: str, epoch: int, expires: float) -> None:
    """The lease item as a daemon's Leadership writes it (ha.py's attributes)."""
    world.boto("dynamodb").put_item(TableName=TABLE, Item={
        "pk": {"S": "lease"}, "holder": {"S": holder}, "epoch": {"N": str(epoch)},
        "expires": {"N": repr(expires)}, "lease": {"N": "15"},
    })


def run_status(config: Path, capsys, *flags: str) -> tuple[int, str]:
    from spotguard.cli import main

    code = main(["status", "--config", str(config), *flags])
    out, err = capsys.readouterr()
    assert err == ""
    return code, out


def test_with_ha_status_reads_the_leader_from_the_table(tmp_path, moto_world, deployment, capsys):
    from spotguard import ha

    daemon_settings(tmp_path, moto_world, [deployment], ha=HA)
    config = tmp_path / "config.toml"
    moto_world.boto("dynamodb").create_table(**ha.table_spec(TABLE))

    code, out = run_status(config, capsys, "--json")
    assert code == 0
    assert json.loads(out)["ha"] == {"table": TABLE, "leader": None, "error": None}
    code, out = run_status(config, capsys)
    assert out.startswith(f"ha (table {TABLE}): no leader (no daemon has held the lease yet)\n\nguard lab: ")

    expires = time.time() + 12.4
    write_lease(moto_world, "controller-a", 3, expires)
    code, out = run_status(config, capsys, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["version"] == 1
    assert doc["ha"] == {"table": TABLE, "error": None, "leader": {
        "holder": "controller-a", "epoch": 3, "expires": status.iso(expires), "valid": True}}
    assert doc["ha"]["leader"]["expires"].endswith("Z") and len(doc["ha"]["leader"]["expires"]) == 20
    code, out = run_status(config, capsys)
    first = out.splitlines()[0]
    until = status.iso(expires).replace("T", " ").replace("Z", " UTC")
    left = re.fullmatch(rf"ha \(table {TABLE}\): leader controller-a \(epoch 3\), "
                        rf"lease valid until {until} \((\d+)s left\)", first)
    assert left and 5 <= int(left[1]) <= 13, first  # 12.4 s rounded up, less the time status took

    write_lease(moto_world, "controller-a", 3, time.time() - 30)
    code, out = run_status(config, capsys, "--json")
    assert json.loads(out)["ha"]["leader"]["valid"] is False
    code, out = run_status(config, capsys)
    ago = re.search(r"no leader \(the lease of controller-a \(epoch 3\) expired at [^,]+, (\d+)s ago\)", out)
    assert ago and 30 <= int(ago[1]) <= 40, out

    write_lease(moto_world, "controller-b", 4, 0)  # released on a clean stop
    code, out = run_status(config, capsys, "--json")
    assert json.loads(out)["ha"]["leader"] == {
        "holder": "controller-b", "epoch": 4, "expires": "1970-01-01T00:00:00Z", "valid": False}
    code, out = run_status(config, capsys)
    assert out.startswith(f"ha (table {TABLE}): no leader (controller-b (epoch 4) released the lease on a clean stop)")


def test_with_ha_a_failed_read_shows_the_leader_unknown_and_the_rest(tmp_path, moto_world, deployment, capsys):
    daemon_settings(tmp_path, moto_world, [deployment], ha=HA)  # no table
    config = tmp_path / "config.toml"
    code, out = run_status(config, capsys, "--json")
    doc = json.loads(out)
    assert code == 0, "the lease read does not change the exit code"
    assert doc["ha"] == {"table": TABLE, "leader": None, "error": "ResourceNotFoundException"}
    assert [g["name"] for g in doc["guards"]] == ["lab"] and set(doc["guards"][0]) == GUARD_FIELDS
    code, out = run_status(config, capsys)
    assert code == 0
    assert out.startswith(f"ha (table {TABLE}): leader unknown (ResourceNotFoundException: the table could not be "
                          "read)\n\nguard lab: unknown")


async def test_with_ha_an_unreachable_endpoint_is_an_error_code(tmp_path, moto_world, deployment, aio_session):
    from spotguard.aws import client

    settings = daemon_settings(tmp_path, moto_world, [deployment], ha=HA)
    async with client("dynamodb", "us-east-1", "http://127.0.0.1:9", session=aio_session, max_attempts=1) as ddb:
        got = await status.read_ha(settings, ddb, time.time())
    assert got == {"table": TABLE, "leader": None, "error": "EndpointConnectionError"}
    assert await status.read_ha(daemon_settings(tmp_path, moto_world, [deployment]), None, time.time()) is None
    with pytest.raises(ValueError):
        status.report(settings, time.time())  # with [ha], the caller must pass what it read


def test_without_ha_status_loads_no_aws_library(tmp_path):
    # Run alone, status reads local files only: not even aiobotocore is imported.
    path = write_config(tmp_path, None, [{
        "name": "lab",
        "target_group_arn": "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/lab/6d0ecf831eec9f09",
        "spot_request_ids": ["sir-8x4kq2bn"],
        "standby_instance_ids": ["i-0a1b2c3d4e5f60718"],
    }], aws={"region": "us-east-1"}, daemon={"state_dir": tmp_path})
    code = ("import sys; from spotguard.cli import main; rc = main(['status', '--config', sys.argv[1], '--json']); "
            "assert 'aiobotocore' not in sys.modules and 'botocore' not in sys.modules, 'AWS loaded'; sys.exit(rc)")
    import subprocess

    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ha"] is None


def test_a_bad_config_exits_2(tmp_path):
    (tmp_path / "c.toml").write_text("[aws]\n")
    from spotguard.cli import main

    assert main(["status", "--config", str(tmp_path / "c.toml")]) == 2


# --------------------------------------------------------------------------- month arithmetic

H = 3600.0
SB, SPOT = "i-0000000000000000a", "i-00000000000000001"


def t(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()


def runs(*spans) -> LedgerView:
    records = []
    for role, start, stop in spans:
        iid = SB if role == "standby" else SPOT
        records.append({"v": 1, "at": start, "kind": "run-start", "role": role, "instance": iid})
        if stop is not None:
            records.append({"v": 1, "at": stop, "kind": "run-stop", "role": role, "instance": iid})
    return LedgerView(tuple(sorted(records, key=lambda r: r["at"])))


GUARD = GuardSettings(name="lab", target_group_arn="arn:x", on_demand_hourly=1.0, spot_hourly=0.3)


@pytest.mark.parametrize(
    ("spans", "now", "expected"),
    [
        pytest.param(
            [("spot", t("2026-11-01 00:00"), None)], t("2026-11-11 00:00"),
            dict(hours=240, spot_hours=240, standby_hours=0, cost=72.0, on_demand_cost=240.0, saving=168.0),
            id="spot all month, no failover",
        ),
        pytest.param(
            [("spot", t("2026-10-01 00:00"), None), ("standby", t("2026-10-31 22:00"), t("2026-11-01 03:00"))],
            t("2026-11-03 00:00"),
            dict(hours=48, spot_hours=48, standby_hours=3, cost=48 * 0.3 + 3, on_demand_cost=48.0, saving=48 - 17.4),
            id="standby run across the month boundary: only November's 3 h",
        ),
        pytest.param(
            [("spot", t("2026-11-01 00:00"), t("2026-11-01 10:00")), ("standby", t("2026-11-01 09:58"), None)],
            t("2026-11-01 12:00"),
            dict(hours=12, spot_hours=10, standby_hours=2 + 2 / 60, cost=3 + (2 + 2 / 60), on_demand_cost=12.0,
                 saving=12 - 3 - (2 + 2 / 60)),
            id="open standby run counts up to now",
        ),
        pytest.param(
            [("spot", t("2026-11-20 00:00"), None)], t("2026-11-21 00:00"),
            dict(hours=24, spot_hours=24, standby_hours=0, cost=7.2, on_demand_cost=24.0, saving=16.8),
            id="ledger begins mid-month: counted from its first record",
        ),
    ],
)
def test_month_by_table(spans, now, expected):
    m = status.month_report(runs(*spans), GUARD, now)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-3), key
    assert m["start"] == status.iso(ledger.month_start(now))


def test_month_without_prices_says_unknown():
    guard = GuardSettings(name="lab", target_group_arn="arn:x", on_demand_hourly=1.0)
    m = status.month_report(runs(("standby", t("2026-11-01 00:00"), t("2026-11-01 02:00"))), guard,
                            t("2026-11-02 00:00"))
    assert (m["cost"], m["on_demand_cost"], m["saving"], m["standby_hours"]) == (None, None, None, 2)
    assert "cost: unknown" in "\n".join(status._month_lines(m))


def test_the_months_ready_margins_are_counted_and_the_last_one_shown():
    view = runs(("spot", t("2026-11-01 00:00"), None))
    margins = [{"v": 1, "at": t(at), "kind": "margin", "instance": SPOT, "seconds": s}
               for at, s in (("2026-10-31 23:00", 5.0), ("2026-11-02 10:00", 31.0), ("2026-11-03 10:00", -4.0),
                             ("2026-11-04 10:00", 12.0))]
    view = LedgerView(tuple(sorted(view.records + tuple(margins), key=lambda r: r["at"])))
    m = status.month_report(view, GUARD, t("2026-11-05 00:00"))
    assert m["ready_margins"] == {"count": 3, "min": -4.0, "median": 12.0,
                                  "last": {"at": "2026-11-04T10:00:00Z", "instance": SPOT, "seconds": 12.0}}
    (line,) = [x for x in status._month_lines(m) if "ready margin" in x]
    assert line.startswith("  ready margin (standby healthy → spot reclaimed): last +12s (")
    assert line.endswith("this month min -4s, median +12s over 3")
    quiet = status.month_report(runs(), GUARD, t("2026-11-05 00:00"))
    assert quiet["ready_margins"]["count"] == 0 and not any("ready margin" in x for x in status._month_lines(quiet))


MINIMAL = """[aws]
region = "ap-northeast-2"
[daemon]
state_dir = {state}
[[guard]]
name = "inference"
target_group_arn = "arn:aws:elasticloadbalancing:ap-northeast-2:123456789012:targetgroup/inference/6d0ecf831eec9f09"
spot_request_ids = ["sir-8x4kq2bn"]
standby_instance_ids = ["i-0a1b2c3d4e5f60718"]
"""


def test_status_without_permission_says_so_on_stderr_with_the_way_out():
    """As a user who cannot read the owner-only state directory (root: run as nobody)."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no unprivileged user to try it as")
    shared = Path(tempfile.mkdtemp(prefix="spotguard-status-"))
    try:
        shared.chmod(0o755)
        state = shared / "state"
        state.mkdir(mode=0o700)
        config = shared / "config.toml"
        config.write_text(MINIMAL.format(state=json.dumps(str(state))))
        config.chmod(0o644)
        argv = [sys.executable, "-m", "spotguard", "status", "--config", str(config)]
        if os.geteuid() == 0:
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
        assert "join its group root" in done.stderr or os.geteuid() != 0
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"spotguard status: cannot read {state}: permission denied; run it as the daemon's "
                               "user or root (sudo spotguard status)")
    finally:
        state.chmod(0o700)
        shutil.rmtree(shared)


def test_a_fleet_shows_one_line_per_slot(tmp_path):
    """A guard of three spots, two of them lost: the headline is its most urgent slot's phase,
    then one line per slot (its spots, its standby, why); --json lists the same as `slots`."""
    rules = Rules(standbys=("i-sb1", "i-sb2"), capacity=3)
    slot = replace(rules, capacity=1)
    slots = (GuardState(slot, Phase.BOTH_SERVING, 1e9, "standby i-sb1 healthy", "i-sb1", holds=()),
             GuardState(slot, Phase.STANDBY_STARTING, 1e9 + 5, "interruption notice for spot i-b", "i-sb2",
                        holds=("i-b",)),
             GuardState(slot, Phase.SPOT_HEALTHY, 1e9 - 60, "initial", holds=("i-c",)))
    fleet = GuardState(rules, Phase.STANDBY_STARTING, 1e9 + 5, "interruption notice for spot i-b", "i-sb2",
                       slots=slots)
    Store(tmp_path).save("lab", fleet)
    g = status.guard_report(tmp_path, GuardSettings(name="lab", target_group_arn="arn:x"), 1e9 + 65)
    assert [(s["slot"], s["phase"], s["spots"], s["standby"]) for s in g["slots"]] == [
        (1, "both-serving", [], "i-sb1"), (2, "standby-starting", ["i-b"], "i-sb2"), (3, "spot-healthy", ["i-c"], None)]
    lines = status.render({"guards": [g], "generated_at": status.iso(1e9 + 65)}).splitlines()
    assert lines[0].startswith("guard lab: standby-starting since")
    assert lines[2] == ("  slot 1  both-serving since 2001-09-09 01:46:40 UTC (1m 05s ago): no spot → standby i-sb1 "
                        "(standby i-sb1 healthy)")
    assert lines[3].startswith("  slot 2  standby-starting") and "i-b → standby i-sb2" in lines[3]
    assert lines[4].startswith("  slot 3  spot-healthy") and lines[4].endswith("i-c (initial)")
