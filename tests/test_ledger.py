"""The ledger observer and its reader, driven by the daemon's hooks with chosen times.

No AWS here: the hooks take machine events and commands, which are plain data.
The end-to-end path (the daemon telling a real Ledger during a failover on
moto) is in test_status.py.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from dataclasses import dataclass

import pytest
from observing import Told
from structlog.testing import capture_logs

from spotguard import ledger
from spotguard.ledger import Ledger, LedgerView, Run
from spotguard.machine import Failed, GuardState, Instance, Notice, Observed, Phase, Rules, Start, Stop, Target

SPOT, SPOT2, SB, SB2 = "i-00000000000000001", "i-00000000000000002", "i-0000000000000000a", "i-0000000000000000b"
H = 3600.0


def t(text: str) -> float:
    """Epoch seconds of a UTC time like "2026-11-28 10:00"."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()


@dataclass(frozen=True)
class G:
    name: str = "inference"
    standby_instance_ids: tuple[str, ...] = (SB, SB2)


def observed(spot: str | None = SPOT, spot_state="running", notice=False, sb="stopped", sb2="stopped",
             health: dict[str, str] | None = None) -> Observed:
    spots = (Instance(spot, spot_state, notice),) if spot else ()
    targets = tuple(Target(i, h) for i, h in (health if health is not None else {SPOT: "healthy"}).items())
    return Observed(spots=spots, standbys=(Instance(SB, sb), Instance(SB2, sb2)), targets=targets)


def state(phase: Phase, reason: str = "r") -> GuardState:
    return GuardState(rules=Rules(standbys=(SB, SB2)), phase=phase, reason=reason)


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


RULES = Rules(standbys=(SB, SB2))


@pytest.fixture
def book(tmp_path):
    return Ledger(tmp_path, [G()])


@pytest.fixture
def tell(book):
    return Told(book, RULES)


def test_a_failover_is_recorded_as_transitions_runs_and_one_interruption(tmp_path, book, tell):
    g = "inference"
    tell.event(g, observed(), t("2026-11-28 10:00"))
    tell.event(g, Notice(SPOT), t("2026-11-28 10:01"))
    tell.event(g, observed(notice=True), t("2026-11-28 10:01:05"))  # the poll sees the notice too: counted once
    book.transition(g, state(Phase.SPOT_HEALTHY), state(Phase.STANDBY_STARTING, "interruption notice"),
                    t("2026-11-28 10:01"))
    book.action(g, Start(SB), None, 0.2, t("2026-11-28 10:01:01"))
    tell.event(g, observed(notice=True, sb="running"), t("2026-11-28 10:01:10"))
    tell.event(g, observed(spot=None, sb="running", health={SB: "healthy"}), t("2026-11-28 10:03"))
    tell.event(g, observed(spot=SPOT2, sb="running"), t("2026-11-28 11:00"))
    book.action(g, Stop(SB), None, 0.2, t("2026-11-28 11:11"))
    tell.event(g, observed(spot=SPOT2, sb="stopped"), t("2026-11-28 11:11:05"))

    view = ledger.read(tmp_path, g)
    assert [(x.old, x.new, x.reason) for x in view.transitions()] == [
        ("spot-healthy", "standby-starting", "interruption notice")]
    assert view.runs("standby") == [Run("standby", SB, t("2026-11-28 10:01:01"), t("2026-11-28 11:11"))]
    assert view.runs("spot") == [Run("spot", SPOT, t("2026-11-28 10:00"), t("2026-11-28 10:03")),
                                 Run("spot", SPOT2, t("2026-11-28 11:00"), None)]
    assert [(i.instance, i.how) for i in view.interruptions(0, t("2026-12-01 00:00"))] == [(SPOT, "notice")]
    assert view.standby_seconds(t("2026-11-28 00:00"), t("2026-11-29 00:00")) == 70 * 60 - 1


def test_a_standby_a_person_started_counts_and_a_failed_start_does_not(tmp_path, book, tell):
    g = "inference"
    book.action(g, Start(SB2), Failed(Start(SB2), "InsufficientInstanceCapacity"), 0.1, t("2026-11-28 09:00"))
    tell.event(g, observed(), t("2026-11-28 09:00"))
    tell.event(g, observed(sb2="pending"), t("2026-11-28 09:30"))  # started from the console
    tell.event(g, observed(sb2="stopping"), t("2026-11-28 10:00"))
    runs = ledger.read(tmp_path, g).runs("standby")
    assert runs == [Run("standby", SB2, t("2026-11-28 09:30"), t("2026-11-28 10:00"))]
    assert [r["via"] for r in lines(ledger.ledger_path(tmp_path, g)) if r["kind"].startswith("run-")
            and r["role"] == "standby"] == ["observed", "observed"]


def test_a_spot_gone_without_notice_is_an_interruption(tmp_path, book, tell):
    tell.event("inference", observed(), t("2026-11-28 09:00"))
    tell.event("inference", observed(spot_state="terminated"), t("2026-11-28 09:05"))
    (i,) = ledger.read(tmp_path, "inference").interruptions(0, t("2027-01-01 00:00"))
    assert (i.instance, i.how, i.at) == (SPOT, "lost", t("2026-11-28 09:05"))


def test_seen_is_written_when_the_world_changes_and_every_heartbeat(tmp_path, book, tell):
    path = ledger.seen_path(tmp_path, "inference")
    tell.event("inference", observed(), t("2026-11-28 09:00"))
    first = path.stat().st_ino
    tell.event("inference", observed(), t("2026-11-28 09:00") + ledger.HEARTBEAT - 1)
    assert path.stat().st_ino == first  # same world, within the heartbeat: not rewritten
    tell.event("inference", observed(), t("2026-11-28 09:01"))
    beat = json.loads(path.read_text())
    assert path.stat().st_ino != first  # a heartbeat: how long ago the world was seen, for `status`
    assert (beat["since"], beat["observed_at"]) == (t("2026-11-28 09:00"), t("2026-11-28 09:01"))
    tell.event("inference", observed(health={SPOT: "unhealthy"}), t("2026-11-28 09:02"))
    seen = ledger.read_seen(tmp_path, "inference")
    assert seen["since"] == t("2026-11-28 09:02")
    assert seen["spots"] == [{"id": SPOT, "state": "running", "notice": False, "target": "unhealthy"}]
    assert seen["standbys"][0] == {"id": SB, "state": "stopped", "target": None}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_files_are_owner_only(tmp_path, book, tell):
    old = os.umask(0o022)
    try:
        tell.event("inference", observed(), t("2026-11-28 09:00"))
        book.transition("inference", state(Phase.SPOT_HEALTHY), state(Phase.STANDBY_STARTING), t("2026-11-28 09:00"))
    finally:
        os.umask(old)
    for path in (ledger.ledger_path(tmp_path, "inference"), ledger.seen_path(tmp_path, "inference")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_new_month_rotates_and_carries_open_runs(tmp_path, book, tell):
    g = "inference"
    tell.event(g, observed(sb="running"), t("2026-10-31 23:00"))
    book.transition(g, state(Phase.SPOT_HEALTHY), state(Phase.SPOT_RESTORED), t("2026-10-31 23:00"))
    tell.event(g, observed(sb="stopped"), t("2026-11-01 01:00"))  # first record of November: rotates
    current, previous = ledger.ledger_path(tmp_path, g), ledger.previous_path(tmp_path, g)
    assert {r["kind"] for r in lines(previous)} == {"run-start", "transition"}
    carried = [r for r in lines(current) if r["via"] == "carried"] if current.exists() else []
    assert {(r["instance"], r["at"]) for r in carried} == {(SPOT, t("2026-10-31 23:00")), (SB, t("2026-10-31 23:00"))}
    view = ledger.read(tmp_path, g)
    assert view.runs("standby") == [Run("standby", SB, t("2026-10-31 23:00"), t("2026-11-01 01:00"))]
    # Two months on, October is gone but the spot that has run all along still counts.
    tell.event(g, observed(health={SPOT: "unhealthy"}), t("2026-12-02 00:00"))
    book.transition(g, state(Phase.SPOT_HEALTHY), state(Phase.STANDBY_STARTING), t("2026-12-02 00:00"))
    view = ledger.read(tmp_path, g)
    assert min(r["at"] for r in lines(previous)) >= t("2026-10-31 23:00")
    assert [x.new for x in view.transitions()] == ["standby-starting"]
    assert view.runs("spot") == [Run("spot", SPOT, t("2026-10-31 23:00"), None)]


def test_a_restarted_ledger_knows_which_runs_are_open(tmp_path):
    Told(Ledger(tmp_path, [G()]), RULES).event("inference", observed(sb="running"), t("2026-11-28 09:00"))
    again = Ledger(tmp_path, [G()])
    Told(again, RULES).event("inference", observed(sb="running"), t("2026-11-28 09:10"))  # not a second start
    again.action("inference", Stop(SB), None, 0.1, t("2026-11-28 10:00"))
    assert ledger.read(tmp_path, "inference").runs("standby") == [
        Run("standby", SB, t("2026-11-28 09:00"), t("2026-11-28 10:00"))]


def test_the_file_past_its_size_cap_is_rotated_early(tmp_path, book, monkeypatch, tell):
    monkeypatch.setattr(ledger, "MAX_BYTES", 500)
    tell.event("inference", observed(sb="running"), t("2026-11-28 09:00"))
    for n in range(20):
        book.transition("inference", state(Phase.SPOT_HEALTHY), state(Phase.STANDBY_STARTING, f"flap {n}"),
                        t("2026-11-28 09:00") + n)
    assert ledger.ledger_path(tmp_path, "inference").stat().st_size <= 500 + 200
    assert ledger.read(tmp_path, "inference").open_runs()  # carried over each time


def test_a_hook_never_raises(tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the state dir should be")
    book = Ledger(blocked, [G()])
    tell = Told(book, RULES)
    with capture_logs() as logs:
        tell.event("inference", observed(), t("2026-11-28 09:00"))
        book.transition("inference", state(Phase.SPOT_HEALTHY), state(Phase.STANDBY_STARTING), 1.0)
        book.action("inference", Start(SB), None, 0.1, 1.0)
        tell.event("someone-else", observed(), 1.0)  # not our guard: ignored
    assert {e["hook"] for e in logs if e["event"] == "ledger.write.failed"} == {"event", "transition", "action"}


def test_the_reader_skips_a_partial_or_foreign_line(tmp_path, book):
    book.transition("inference", state(Phase.SPOT_HEALTHY), state(Phase.STANDBY_STARTING), 5.0)
    with open(ledger.ledger_path(tmp_path, "inference"), "ab") as f:
        f.write(b'["not", "a record"]\n{"v": 1, "at": 6, "kind": "transition", "from": "x"}\n{"v": 1, "at": 7, "ki')
    assert len(ledger.read(tmp_path, "inference").transitions()) == 1
    assert ledger.read(tmp_path, "other").records == ()


# --------------------------------------------------------------------------- arithmetic

NOV, DEC = t("2026-11-01 00:00"), t("2026-12-01 00:00")


def view(*records: tuple) -> LedgerView:
    out = []
    for at, kind, role, iid in records:
        out.append({"v": 1, "at": at, "kind": kind, "role": role, "instance": iid})
    return LedgerView(tuple(sorted(out, key=lambda r: r["at"])))


@pytest.mark.parametrize(
    ("records", "start", "end", "standby_h", "spot_h"),
    [
        pytest.param([], NOV, NOV + 10 * H, 0, 0, id="nothing"),
        pytest.param([(NOV + H, "run-start", "standby", SB), (NOV + 3 * H, "run-stop", "standby", SB)],
                     NOV, NOV + 10 * H, 2, 0, id="closed run"),
        pytest.param([(NOV + H, "run-start", "standby", SB)], NOV, NOV + 4 * H, 3, 0, id="open run counts to end"),
        pytest.param([(DEC - 2 * H, "run-start", "standby", SB), (DEC + 3 * H, "run-stop", "standby", SB)],
                     DEC, DEC + 10 * H, 3, 0, id="run across the month boundary: December's part"),
        pytest.param([(DEC - 2 * H, "run-start", "standby", SB), (DEC + 3 * H, "run-stop", "standby", SB)],
                     NOV, DEC, 2, 0, id="run across the month boundary: November's part"),
        pytest.param([(NOV, "run-start", "spot", SPOT), (NOV + 5 * H, "run-stop", "spot", SPOT),
                      (NOV + 4 * H, "run-start", "spot", SPOT2),
                      (NOV + 4 * H, "run-start", "standby", SB), (NOV + 4.5 * H, "run-start", "standby", SB),
                      (NOV + 5 * H, "run-stop", "standby", SB)],
                     NOV, NOV + 6 * H, 1, 7, id="overlapping spots both bill; a repeated start is ignored"),
        pytest.param([(NOV + 2 * H, "run-stop", "standby", SB)], NOV, NOV + 6 * H, 0, 0, id="stop without start"),
    ],
)
def test_hours_by_table(records, start, end, standby_h, spot_h):
    v = view(*records)
    assert v.standby_seconds(start, end) == pytest.approx(standby_h * H)
    assert v.spot_seconds(start, end) == pytest.approx(spot_h * H)


@pytest.mark.parametrize(
    ("od", "spot", "expected"),
    [
        # 10 h window, spot 10 h, standby 1 h: cost 10×0.3 + 1×1.0 = 4.0; On-Demand 10×1.0; saving 6.0
        (1.0, 0.3, (4.0, 10.0, 6.0)),
        (None, 0.3, (None, None, None)),
        (1.0, None, (None, None, None)),
    ],
)
def test_cost_and_saving_by_table(od, spot, expected):
    v = view((NOV, "run-start", "spot", SPOT), (NOV + 2 * H, "run-start", "standby", SB),
             (NOV + 3 * H, "run-stop", "standby", SB))
    est = v.estimate(NOV, NOV + 10 * H, od, spot)
    assert (est.hours, est.spot_hours, est.standby_hours) == (10, 10, 1)
    got = (est.cost, est.on_demand_cost, est.saving)
    assert got == (pytest.approx(expected[0]), pytest.approx(expected[1]), pytest.approx(expected[2])) \
        if expected[0] is not None else got == expected


def test_the_window_starts_at_the_ledgers_first_record():
    v = view((NOV + 4 * H, "run-start", "spot", SPOT))
    est = v.estimate(NOV, NOV + 10 * H, 1.0, 0.25)
    assert est.start == NOV + 4 * H and est.hours == 6 and est.saving == pytest.approx(6 - 6 * 0.25)
    empty = LedgerView(()).estimate(NOV, NOV + 10 * H, 1.0, 0.25)
    assert (empty.hours, empty.cost, empty.saving) == (0, 0, 0)


def test_a_spot_described_as_missing_is_not_taken_for_gone(tmp_path, book, tell):
    tell.event("inference", observed(), t("2026-11-28 09:00"))
    tell.event("inference", observed(spot_state="missing"), t("2026-11-28 09:01"))
    tell.event("inference", observed(), t("2026-11-28 09:02"))
    view = ledger.read(tmp_path, "inference")
    assert view.runs("spot") == [Run("spot", SPOT, t("2026-11-28 09:00"), None)]
    assert view.interruptions(0, t("2027-01-01 00:00")) == []


@pytest.mark.fault(fault="the ledger file a symlink", phase="any",
                   outcome="never appended through: write refused and logged; the target untouched")
def test_a_ledger_symlink_is_never_followed(tmp_path, book, tell):
    target = tmp_path / "elsewhere"
    target.write_text("someone else's file\n")
    ledger.ledger_path(tmp_path, "inference").symlink_to(target)  # as root, an append would land there
    with capture_logs() as logs:
        tell.event("inference", observed(sb="running"), t("2026-11-28 09:00"))
    assert target.read_text() == "someone else's file\n"
    assert [e["event"] for e in logs if e["log_level"] == "error"][:1] == ["ledger.write.failed"]


def test_the_ready_margin_is_recorded_once_per_interruption(tmp_path, book, tell):
    g = "inference"
    tell.event(g, observed(), t("2026-11-28 10:00"))
    tell.event(g, Notice(SPOT, deadline=t("2026-11-28 10:03")), t("2026-11-28 10:01"))
    both = observed(notice=True, sb="running", health={SPOT: "healthy", SB: "healthy"})
    assert tell.event(g, both, t("2026-11-28 10:02:30")).phase is Phase.BOTH_SERVING
    tell.event(g, both, t("2026-11-28 10:02:35"))
    (margin,) = ledger.read(tmp_path, g).margins(0, t("2026-12-01 00:00"))
    assert (margin.instance, margin.seconds, margin.at) == (SPOT, 30.0, t("2026-11-28 10:02:30"))
