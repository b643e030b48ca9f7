"""Benchmark: steady-state memory, CPU and AWS calls of `spotguard run`, beside a floor.

Six processes run at once against the same moto (world_server), each with
its own notify socket and access key (bench/proc.py):

  * `python -m spotguard run` with 1 guard, with 20 guards, and with 20 guards of
    4 spots each (a fleet: capacity 4), at the default poll_interval (5 s), JSON
    logs to a file, exactly as systemd starts it;
  * bench/floor.py for each: a bare aiobotocore process holding the same
    clients and making the same calls, no spotguard.

Timeline, from the moment all four sent READY=1:
  0 .. STEADY s          steady state. RSS is sampled every SAMPLE s; the figure
                         is the median of the samples of the last minute. CPU
                         (utime+stime from /proc) and moto's calls by caller are
                         taken at STEADY-60 and STEADY: one steady minute.
  STEADY .. +FAILOVER s  a failover of each daemon's first guard: the notice
                         (the spot request's status flips, as EC2 does), the
                         spot terminated TERMINATE s later, a new spot
                         fulfilled FULFIL s later. Calls and CPU over the window.

Calls are counted by moto (every request it answered, by the access key id
that signed it), not by spotguard's own counters.

This module must not change the world beyond provisioning it and playing the
failover, nor signal any process but those it started.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import configs
import proc
from stats import fmt, table

SIZES = ((1, 1), (20, 1), (20, 4))  # (guards, spots per guard)
POLL_INTERVAL = 5.0  # the default
STEADY = 120.0
WINDOW = 60.0  # the steady minute at the end of STEADY
FAILOVER = 60.0
TERMINATE = 10.0  # notice → spot terminated (EC2 gives ~120 s; shorter keeps the bench short)
FULFIL = 20.0  # notice → new spot fulfilled
SAMPLE = 5.0

# The goals of issue 7 for these figures.
GOAL_RSS_VS_FLOOR = 1.15
GOAL_RSS_20_VS_1 = 1.10
GOAL_CPU = 0.5  # % of one core


@dataclass
class Watched:
    """One process under measurement and what was read about it."""

    kind: str  # spotguard | floor
    size: tuple[int, int]  # (guards, spots per guard)
    launched: proc.Launched
    deployments: list
    rss: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (t since ready, status)
    marks: dict[str, tuple[float, dict[str, int]]] = field(default_factory=dict)  # name -> (cpu s, calls)

    @property
    def name(self) -> str:
        return f"{self.kind}, {sized(self.size)}"


def sized(size: tuple[int, int]) -> str:
    guards, spots = size
    return f"{guards} guard{'s' * (guards > 1)}" + (f" × {spots} spots" if spots > 1 else "")


def run(world: Any, workdir: Path, quick: bool = False) -> tuple[str, dict]:
    """The report section and the figures (for the summary of goals)."""
    steady, window, failover = (30.0, 15.0, 20.0) if quick else (STEADY, WINDOW, FAILOVER)
    world.call("reset")
    groups, at = {}, 0
    for size in SIZES:
        groups[size] = [world.call("provision", name=f"s{at + i:02d}", standbys=1, spots=size[1])
                        for i in range(size[0])]
        at += size[0]
    watched = []
    try:
        for size in SIZES:
            watched.append(_spotguard(world, workdir, size, groups[size]))
            watched.append(_floor(world, workdir, size, groups[size]))
        for w in watched:
            w.launched.wait_ready()
        zero = time.monotonic()
        _sample_until(watched, zero, steady - window, "steady-start", world)
        _sample_until(watched, zero, steady, "steady-end", world)
        daemons = [w for w in watched if w.kind == "spotguard"]
        _failover(world, watched, daemons, zero + steady, failover)
        codes = {w.name: w.launched.stop() for w in watched}
    finally:
        for w in watched:
            if w.launched.proc.poll() is None:
                w.launched.stop()
    bad = {k: c for k, c in codes.items() if c != 0}
    if bad:
        raise AssertionError(f"processes exited non-zero: {bad}; see {workdir}")
    for w in daemons:
        _check_failover_log(w)
    figures = _figures(watched, steady, window, failover)
    return _report(figures, steady, window, failover), figures


def _spotguard(world: Any, workdir: Path, size: tuple[int, int], deployments: list) -> Watched:
    tag = f"{size[0]}x{size[1]}"
    run_dir = workdir / f"steady-spotguard-{tag}"
    run_dir.mkdir(parents=True)
    path = configs.write(
        run_dir / "config.toml", world, deployments, state_dir=run_dir / "state", poll_interval=POLL_INTERVAL,
    )
    launched = proc.launch(f"sg{tag}", ["-m", "spotguard", "run", "--config", str(path)], run_dir)
    return Watched("spotguard", size, launched, deployments)


def _floor(world: Any, workdir: Path, size: tuple[int, int], deployments: list) -> Watched:
    tag = f"{size[0]}x{size[1]}"
    run_dir = workdir / f"steady-floor-{tag}"
    run_dir.mkdir(parents=True)
    configs.write_floor_spec(run_dir / "spec.json", world, deployments, interval=POLL_INTERVAL)
    argv = [str(proc.BENCH / "floor.py"), str(run_dir / "spec.json")]
    launched = proc.launch(f"floor{tag}", argv, run_dir)
    return Watched("floor", size, launched, deployments)


def _sample_until(watched: list[Watched], zero: float, until: float, mark: str, world: Any) -> None:
    """Sample RSS every SAMPLE s until `zero + until`, then take the mark (CPU and calls) of each process."""
    while True:
        now = time.monotonic()
        for w in watched:
            if w.launched.proc.poll() is not None:
                raise AssertionError(f"{w.name} exited {w.launched.proc.returncode}; see {w.launched.log}")
            if not w.rss or now - zero - w.rss[-1][0] >= SAMPLE - 0.01:
                w.rss.append((now - zero, proc.status(w.launched.pid)))
        left = zero + until - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(left, SAMPLE / 5))
    _mark(watched, mark, world)


def _mark(watched: list[Watched], mark: str, world: Any) -> None:
    for w in watched:
        w.marks[mark] = (proc.cpu_seconds(w.launched.pid), world.call("calls", caller=w.launched.key))


def _failover(world: Any, watched: list[Watched], daemons: list[Watched], began: float, length: float) -> None:
    """Notice, termination and re-fulfilment of each daemon's first guard's spot, on a schedule."""
    _mark(watched, "failover-start", world)
    for w in daemons:
        world.call("notice", request_id=w.deployments[0]["spot_request_id"])
    short = length < FULFIL + 5  # --quick: everything sooner
    plan = [(began + (TERMINATE / 4 if short else TERMINATE), "terminate_spot"),
            (began + (FULFIL / 4 if short else FULFIL), "fulfil")]
    for at, op in plan:
        time.sleep(max(0.0, at - time.monotonic()))
        for w in daemons:
            world.call(op, request_id=w.deployments[0]["spot_request_id"])
    time.sleep(max(0.0, began + length - time.monotonic()))
    _mark(watched, "failover-end", world)


def _check_failover_log(w: Watched) -> None:
    """The daemon must have failed over and come back to spot (else the failover figures lie)."""
    phases = []
    for line in w.launched.log.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "guard.transition":
            phases.append(event["to"])
        elif event.get("level") in ("error", "critical"):
            raise AssertionError(f"{w.name} logged {event}")
    if "standby-starting" not in phases or "spot-restored" not in phases:
        raise AssertionError(f"{w.name}: no failover in its log (transitions {phases})")


def _delta(w: Watched, a: str, b: str) -> tuple[float, dict[str, int]]:
    (cpu_a, calls_a), (cpu_b, calls_b) = w.marks[a], w.marks[b]
    return cpu_b - cpu_a, {op: n - calls_a.get(op, 0) for op, n in calls_b.items() if n - calls_a.get(op, 0)}


def _figures(watched: list[Watched], steady: float, window: float, failover: float) -> dict:
    out: dict[str, Any] = {}
    for w in watched:
        last = [s for t, s in w.rss if t >= steady - window]
        cpu, calls = _delta(w, "steady-start", "steady-end")
        f_cpu, f_calls = _delta(w, "failover-start", "failover-end")
        out[(w.kind, w.size)] = {
            "rss": statistics.median(s["VmRSS"] for s in last),
            "anon": statistics.median(s["RssAnon"] for s in last),
            "hwm": max(s["VmHWM"] for s in last),
            "rss_first": w.rss[0][1]["VmRSS"],
            "cpu": cpu / window * 100,
            "calls": {op: n * 60 / window for op, n in calls.items()},
            "failover_cpu": f_cpu / failover * 100,
            "failover_calls": {op: n * 60 / failover for op, n in f_calls.items()},
        }
    return out


def _calls_cell(calls: dict[str, float]) -> str:
    return ", ".join(f"{op} {fmt(n, 3)}" for op, n in sorted(calls.items())) or "none"


def _per_poll(calls: dict[str, float]) -> str:
    rounds = calls.get("DescribeSpotInstanceRequests", 0)
    if not rounds:
        return "no rounds"
    return ", ".join(f"{op} {n / rounds:.2f}" for op, n in sorted(calls.items()))


def _mib(kib: float) -> str:
    return fmt(kib / 1024, 3)


def goals(figures: dict) -> list[list[str]]:
    """Rows of the goal summary for memory, CPU and calls."""
    rows = []
    for size in SIZES:
        sg, fl = figures[("spotguard", size)], figures[("floor", size)]
        ratio = sg["rss"] / fl["rss"]
        rows.append([f"RSS of `spotguard run`, {sized(size)}, vs floor", f"<= {GOAL_RSS_VS_FLOOR}×",
                     f"{ratio:.3f}× ({_mib(sg['rss'])} / {_mib(fl['rss'])} MiB)", _met(ratio <= GOAL_RSS_VS_FLOOR)])
    r = figures[("spotguard", (20, 1))]["rss"] / figures[("spotguard", (1, 1))]["rss"]
    rows.append(["RSS, 20 guards vs 1 guard", f"<= {GOAL_RSS_20_VS_1}×", f"{r:.3f}×", _met(r <= GOAL_RSS_20_VS_1)])
    for size in SIZES:
        cpu = figures[("spotguard", size)]["cpu"]
        rows.append([f"CPU, steady minute at 5 s, {sized(size)}", f"<= {GOAL_CPU} % of one core",
                     f"{cpu:.3f} %", _met(cpu <= GOAL_CPU)])
    for size in SIZES:
        n, calls = size[0], figures[("spotguard", size)]["calls"]
        rounds = calls.get("DescribeSpotInstanceRequests", 0)
        got = {op: round(k / rounds, 2) for op, k in calls.items()} if rounds else {}
        ok = (set(got) <= {"DescribeSpotInstanceRequests", "DescribeInstances", "DescribeTargetHealth"}
              and got.get("DescribeSpotInstanceRequests") == got.get("DescribeInstances") == 1.0
              and 0 < got.get("DescribeTargetHealth", 0) <= n)
        rows.append([f"steady calls per poll, {sized(size)}",
                     f"DSIR 1, DI 1, DTH at most {n} (one per target group), nothing else", _per_poll(calls), _met(ok)])
    return rows


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _report(figures: dict, steady: float, window: float, failover: float) -> str:
    mem_rows = []
    for size in SIZES:
        sg, fl = figures[("spotguard", size)], figures[("floor", size)]
        for kind, f in (("`spotguard run`", sg), ("floor", fl)):
            mem_rows.append([f"{kind}, {sized(size)}", _mib(f["rss_first"]), _mib(f["rss"]),
                             _mib(f["anon"]), _mib(f["hwm"]), f"{f['rss'] / fl['rss']:.3f}×", fmt(f["cpu"], 2) + " %"])
    call_rows = []
    for size in SIZES:
        for kind in ("spotguard", "floor"):
            f = figures[(kind, size)]
            name = f"{'`spotguard run`' if kind == 'spotguard' else 'floor'}, {sized(size)}"
            call_rows.append([name, "steady", _calls_cell(f["calls"]), _per_poll(f["calls"]), fmt(f["cpu"], 2) + " %"])
            if kind == "spotguard":
                call_rows.append([name, "failover", _calls_cell(f["failover_calls"]), "",
                                  fmt(f["failover_cpu"], 2) + " %"])
    return "\n\n".join(
        [
            f"Six processes at once against one moto, each started as systemd starts a service (notify "
            f"socket, SIGTERM at the end): `python -m spotguard run` with 1 guard, 20 guards, and 20 guards of "
            f"4 spot requests each (fleets, capacity 4) at poll_interval "
            f"{POLL_INTERVAL:g} s, and the floor for each (bench/floor.py: a bare aiobotocore process with the "
            f"same three clients making the same calls at the same interval, no spotguard). All six ran "
            f"{steady:g} s after their READY=1; RSS is the median of the samples (every {SAMPLE:g} s) of the "
            f"last {window:g} s, CPU is utime+stime over those {window:g} s as a share of one core.",
            table(["process", "VmRSS MiB at READY", "VmRSS MiB, steady", "RssAnon MiB", "VmHWM MiB",
                   "vs its floor", "CPU, one core"], mem_rows, align="l"),
            f"AWS calls per minute by operation, counted by moto by the access key each process signs with. "
            f"Steady: the same {window:g} s. Failover: the {failover:g} s after each daemon's first guard got "
            f"its notice (spot request status flipped; the spot terminated at +{TERMINATE:g} s and a new one "
            f"fulfilled at +{FULFIL:g} s), while the daemon polls every 1 s until the guard is back in "
            f"spot-healthy; Start/Register/Deregister are the failover's own commands.",
            table(["process", "window", "calls per minute, by operation", "per poll (÷ DescribeSpotInstanceRequests)",
                   "CPU, one core"], call_rows, align="lll"),
        ]
    )
