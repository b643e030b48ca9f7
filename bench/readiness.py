"""`make bench-readiness`: a failover at AWS's default health-check settings, registered when ready or when running.

Each run is the lab's whole cycle (spotguard.lab: moto, a health-checking and
draining balancer, real HTTP load, `spotguard run` as a process) with the
target group AWS gives by default (HTTP, every 30 s, timeout 5 s, healthy after
5, unhealthy after 2, deregistration delay 300 s), or the README's advised one,
and a service that loads its model for `warm_up` seconds after boot. Rows
alternate register_when = ready and running. Figures are scenario seconds, read off the
lab's timeline: StartInstances → the standby healthy, the time the group had
no healthy target, and failed requests.

The result goes to docs/benchmarks.md between its BEGIN and END markers
(`make bench` keeps the block). This module must not patch anything of spotguard's.

Usage: .venv/bin/python bench/readiness.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shlex
import sys
import time
from pathlib import Path

from detect import splice
from remote import use_dummy_credentials
from run import loadavg, shown
from stats import table

use_dummy_credentials()

from spotguard.lab.run import run_scenario  # noqa: E402
from spotguard.lab.scenario import Outcome, Scenario  # noqa: E402
from spotguard.lab.world import MotoWorld  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench-readiness:start -->"
END = "<!-- bench-readiness:end -->"
SPEED = 25.0
# AWS's defaults for a new HTTP target group; a short grace and quick capacity return keep each run short.
AWS_DEFAULTS = dict(health_interval=30.0, health_timeout=5.0, healthy_threshold=5, unhealthy_threshold=2,
                    deregistration_delay=300.0, failback_grace=120.0, refulfil_after=60.0, tail=10.0)
# The README's advised target group: every 5 s, healthy after 2, unhealthy after 2, 60 s drain (the lab's own).
ADVISED = dict(failback_grace=120.0, refulfil_after=60.0, tail=10.0)
# (settings, warm-up): AWS's defaults at two model loads, the advised settings at the longer one.
CASES = (("AWS defaults", AWS_DEFAULTS, 40.0), ("AWS defaults", AWS_DEFAULTS, 60.0), ("advised", ADVISED, 60.0))
MODES = ("ready", "running")
SLACK = 2.0  # the goal: StartInstances → healthy within boot + warm-up + one interval + this


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one warm-up; writes nothing unless --out")
    parser.add_argument("--out", type=Path, help="the document to update (default docs/benchmarks.md)")
    args = parser.parse_args(argv)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    began, started_at, load = time.monotonic(), dt.datetime.now(dt.timezone.utc), loadavg()
    cases = CASES[1:2] if args.quick else CASES
    scenarios = [Scenario(name=label, warm_up=warm, register_when=mode, **settings)
                 for label, settings, warm in cases for mode in MODES]
    with MotoWorld() as world:
        outcomes = [asyncio.run(run_scenario(s, speed=SPEED, world=world)) for s in scenarios]
    block = _block(outcomes, started_at, time.monotonic() - began, load, args.quick)
    print(block)
    if out is not None:
        out.write_text(splice(out.read_text() if out.exists() else "", block, BEGIN, END))
        print(f"wrote {shown(out)}", file=sys.stderr)
    return 0


def to_healthy(outcome: Outcome) -> float | None:
    """Scenario seconds from StartInstances of the standby to its target first healthy."""
    started = next((e.at for e in outcome.entries
                    if e.data.get("kind") == "action" and e.data.get("action") == "StartInstances"), None)
    healthy = next((e.at for e in outcome.entries if e.data.get("kind") == "health" and e.data.get("new") == "healthy"
                    and started is not None and e.at >= started), None)
    return None if started is None or healthy is None else healthy - started


def _row(o: Outcome) -> list:
    s = o.scenario
    took = to_healthy(o)
    bound = s.boot + s.standby_warm + s.health_interval + SLACK
    goals = [o.failed == 0, o.no_healthy_target == 0, took is not None and took <= bound]
    group = f"{s.name}: {s.health_interval:g} s / {s.healthy_threshold} / {s.unhealthy_threshold}, " \
            f"drain {s.deregistration_delay:g} s"
    return [group, s.register_when, f"{s.standby_warm:.0f}", "—" if took is None else f"{took:.0f}", f"{bound:.0f}",
            f"{o.no_healthy_target:.0f}", o.failed, o.sent, "met" if all(goals) else "**not met**"]


def _block(outcomes: list[Outcome], started_at: dt.datetime, elapsed: float, load: str, quick: bool) -> str:
    command = shlex.join([shown(Path(sys.executable)), *sys.argv])
    made = f"`make bench-readiness` (runs `{command}`)" if len(sys.argv) == 1 else f"`{command}`"
    rows = [_row(o) for o in outcomes]
    return "\n\n".join([
        BEGIN,
        "<!-- Generated by `make bench-readiness` (bench/readiness.py); `make bench` keeps this block. -->",
        "## Readiness: registered when ready, at AWS's default health-check settings",
        "The lab's whole cycle (`spotguard run` as a process, moto, a balancer that health-checks and drains, "
        "real HTTP load) with AWS's defaults for a new target group (HTTP every 30 s, timeout 5 s, healthy "
        "after 5, unhealthy after 2, deregistration delay 300 s) and with the README's advised settings (every "
        "5 s, 2 / 2, 60 s); instances boot in 20 s, then the service "
        "answers 503 until its model is loaded (the warm-up). Scenario seconds. Goal per row: no failed "
        "request, no time without a healthy target, and StartInstances → healthy within boot + warm-up + one "
        f"health-check interval + {SLACK:.0f} s.",
        table(["target group (interval / healthy / unhealthy, drain)", "register_when", "warm-up s",
               "StartInstances → healthy s", "goal ≤ s", "no healthy target s", "failed requests", "requests",
               "goal"], rows, align="lll"),
        f"Command: {made}" + (" (quick)" if quick else "")
        + f"; {started_at:%Y-%m-%d %H:%M UTC}; lab speed ×{SPEED:g}; run time {elapsed:.0f} s; "
        f"nproc {os.cpu_count()}; load average at start {load}.",
        END,
    ])


if __name__ == "__main__":
    raise SystemExit(main())
