"""`spotguard simulate`: replaying traces through the machine gives the model's exact answer.

Hand-made traces with a known answer (worked out by hand from the sim world's
timing model, below), the episode replay against one continuous play of a real
trace, every shipped trace through the command, and bad trace files refused
with one line and exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from xml.etree import ElementTree

import pytest

from spotguard.cli import main
from spotguard.sim.playback import STANDBY, Numbers, cuts, ready_margins, replay, script
from spotguard.sim.world import run
from spotguard.traces import parse, shipped

# A quick target group, so the answer is easy to work out by hand.
QUICK = Numbers(boot=20, warm_up=60, health_interval=5, healthy_threshold=2, unhealthy_threshold=2,
                deregistration_delay=30, poll_interval=5, failback_grace=300)


def minutes(*runs: tuple[int, int]) -> list[int]:
    """A 1-node trace at one sample a minute: (value, minutes) runs."""
    return [value for value, n in runs for _ in range(n)]


def trace_of(data: list[int], gap: int = 60):
    return parse("hand-made", {"metadata": {"gap_seconds": gap}, "data": data})


def test_one_interruption_capacity_back_after_ten_minutes_has_the_exact_answer():
    # Spot gone at 3600 (notice 3480, heard by the event at 3481), back running at 4200.
    # Standby: StartInstances 3481, running 3501, answers 3561 (warm-up 60), registered at
    # once (fast poll), healthy at the first check 3566: 34 s before the spot is reclaimed.
    # New spot: running 4200, answers 4260, healthy 4265; failback_grace to 4565, then the
    # drain (30 s) to 4595, when the standby is stopped: 4595 - 3501 = 1094 s On-Demand.
    result = replay(trace_of(minutes((1, 60), (0, 10), (1, 120))), QUICK)
    assert (result.seconds, result.interruptions) == (11400, 1)
    guard = result.policies["spotguard"]
    assert (guard.spot_seconds, guard.on_demand_seconds, guard.outage_seconds) == (10800, 1094, 0)
    assert guard.margins == (34,)
    # Without a standby the service is down from the reclaim (3600) to the new spot healthy (4265).
    alone = result.policies["no_standby"]
    assert (alone.spot_seconds, alone.on_demand_seconds, alone.outage_seconds) == (10800, 0, 665)
    assert result.policies["on_demand"].on_demand_seconds == 11400


def test_a_ten_hour_gap_is_the_short_answer_plus_the_gap():
    # The same interruption, the spot back only at 39600: the standby serves the whole gap.
    result = replay(trace_of(minutes((1, 60), (0, 600), (1, 60))), QUICK)
    assert result.policies["spotguard"].on_demand_seconds == 39995 - 3501
    assert result.policies["spotguard"].outage_seconds == 0
    assert result.policies["no_standby"].outage_seconds == 39665 - 3600


def test_prices_give_the_cost_per_month_and_none_without_them():
    data = minutes((1, 60), (0, 10), (1, 120))
    priced = replay(trace_of(data), replace(QUICK, on_demand_hourly=3.6, spot_hourly=1.2))
    per_month = 730 / (11400 / 3600)
    assert priced.policies["spotguard"].cost_per_month == pytest.approx((10800 * 1.2 + 1094 * 3.6) / 3600 * per_month)
    assert priced.policies["on_demand"].cost_per_month == pytest.approx(3.6 * 730)
    assert replay(trace_of(data), QUICK).policies["spotguard"].cost_per_month is None


def test_episodes_agree_with_one_continuous_play_of_a_real_trace():
    """The replay plays each interruption on a fresh world, reuses episodes it has played and
    adds long gaps at their quiet rate; one world playing the whole trace second by second
    where anything changes gives the same spot seconds and outage, and On-Demand seconds
    within the poll phase (a notice may meet a poll, or wait for one): 1 s per interruption."""
    trace = shipped()["preemption/p3.2xlarge/us-west-2b"]
    cut_list, seconds = cuts(trace, Numbers())
    for rules, policy in ((Numbers().rules(), "spotguard"), (replace(Numbers().rules(), standbys=()), "no_standby")):
        whole = run(rules, script(cut_list, seconds, Numbers()))
        got = replay(trace, Numbers()).policies[policy]
        assert got.spot_seconds == sum(s for iid, s in whole.running if iid != STANDBY)
        assert got.outage_seconds == whole.dark
        assert abs(got.on_demand_seconds - sum(s for iid, s in whole.running if iid == STANDBY)) <= len(cut_list)
        if policy == "spotguard":
            assert len(got.margins) == len(ready_margins(whole.log)) == len(cut_list)


def test_every_shipped_trace_replays_with_json_for_machines(capsys):
    assert main(["simulate", "--trace", "all", "--json", "--on-demand-hourly", "3.06", "--spot-hourly", "0.92"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [t["trace"] for t in out["traces"]] == list(shipped())
    for t in out["traces"]:
        assert t["hours"] > 100 and t["interruptions"] > 0
        guard, alone, od = (t["policies"][p] for p in ("spotguard", "no_standby", "on_demand"))
        for policy in (guard, alone, od):
            assert set(policy) >= {"spot_hours", "on_demand_hours", "outage_seconds", "cost_per_month"}
        # With AWS's defaults and a 60 s model load the standby is healthy before every reclaim.
        assert guard["outage_seconds"] == 0 < alone["outage_seconds"]
        assert guard["ready_margin_seconds"]["min"] > 0
        assert alone["cost_per_month"] < guard["cost_per_month"] < od["cost_per_month"]
        assert guard["spot_hours"] + guard["on_demand_hours"] >= t["hours"]


def test_one_trace_as_a_table(capsys):
    assert main(["simulate", "--trace", "preemption/p3.2xlarge/us-east-1c", "--warm-up", "200"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("preemption/p3.2xlarge/us-east-1c"))
    # A 200 s model load does not fit the two-minute notice: the outage shows, and the margin is negative.
    assert " -" in row.split("%")[1]
    assert "warm-up 200s" in out and "Costs need --on-demand-hourly" in out and "NSDI 2024" in out


@pytest.mark.parametrize("content, says", [
    ("not json at all", "not JSON"),
    ('{"data": [1, 0, 1]}', "metadata.gap_seconds"),
    ('{"metadata": {"gap_seconds": 60}, "values": [1]}', "data must be a non-empty list"),
    ('{"metadata": {"gap_seconds": 60}, "data": []}', "data must be a non-empty list"),
    ('{"metadata": {"gap_seconds": 60}, "data": [1, -1, 1]}', "data[1]"),
    ('{"metadata": {"gap_seconds": -5}, "data": [1, 0]}', "gap_seconds"),
    ('{"metadata": {"gap_seconds": 1e9}, "data": [1, 0]}', "gap_seconds"),
    ('{"metadata": {"gap_seconds": 60}, "data": [0, 0, 0]}', "no spot ever runs"),
    ('{"metadata": {"gap_seconds": 60}, "data": [1, 2, 1]}', "1-node traces"),
])
def test_a_bad_trace_file_is_one_line_and_exit_2(tmp_path, capsys, content, says):
    path = tmp_path / "mine.json"
    path.write_text(content)
    assert main(["simulate", "--trace-file", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and lines[0].startswith("spotguard simulate: ")


def test_a_missing_trace_file_and_an_unknown_trace_name_are_one_line(tmp_path, capsys):
    assert main(["simulate", "--trace-file", str(tmp_path / "nope.json")]) == 2
    assert main(["simulate", "--trace", "preemption/nowhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nope.json" in err[0] and "--trace list" in err[1]


def test_a_user_trace_file_replays(tmp_path, capsys):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"metadata": {"gap_seconds": 60}, "data": minutes((1, 60), (0, 10), (1, 120))}))
    assert main(["simulate", "--trace-file", str(path), "--json"]) == 0
    (only,) = json.loads(capsys.readouterr().out)["traces"]
    assert (only["trace"], only["interruptions"]) == ("mine", 1)


def test_plot_writes_an_svg_of_the_timeline_and_the_cost(tmp_path, capsys):
    path = tmp_path / "one.svg"
    assert main(["simulate", "--trace", "preemption/r5.16xlarge/us-east-1d", "--plot", str(path)]) == 0
    root = ElementTree.parse(path).getroot()
    text = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert "preemption/r5.16xlarge/us-east-1d: 152 h, 27 interruptions" in text
    assert "outage, spotguard: 0 s" in text and "NSDI 2024" in text
    bands = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("fill") == "#2f6fb0"]
    assert len(bands) >= 20  # the standby served through (nearly) every one of the 27 gaps
    assert len(list(root.iter("{http://www.w3.org/2000/svg}polyline"))) == 3
    assert main(["simulate", "--trace", "preemption/r5.16xlarge/us-east-1d", "--plot", str(tmp_path / "a.png")]) == 2
    assert "--plot writes SVG" in capsys.readouterr().err


def test_the_daemon_never_loads_the_simulator_or_its_plot():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, spotguard.commands.run, spotguard.daemon; "
                               "print(sorted(m for m in sys.modules if m.startswith('spotguard.sim')))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


@pytest.mark.parametrize("document", ["README.md", "docs/simulate.md"])
def test_the_documented_example_is_what_simulate_prints(document, capsys):
    text = (Path(__file__).parent.parent / document).read_text()
    command = ("$ spotguard simulate --trace preemption/p3.2xlarge/us-east-1c "
               "--on-demand-hourly 3.06 --spot-hourly 0.918")
    shown = text.split(command + "\n", 1)[1].split("```", 1)[0].rstrip("\n").splitlines()
    assert main(command.split()[2:]) == 0
    assert capsys.readouterr().out.splitlines()[:len(shown)] == shown
