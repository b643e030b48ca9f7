"""`make bench`: measure spotguard's footprint and costs and write them to docs/benchmarks.md.

Issue 7's goals (a t4g.nano: 0.5 GiB, 5 % baseline CPU) and the benchmarks
that measure them, each in its own module:
  steady:       memory, CPU and AWS calls of `spotguard run` (1 and 20 guards, 20 guards of 4 spots)
                over two steady minutes and a failover, beside a bare
                aiobotocore floor (four processes at once);
  memory:       growth over 10,000 polls (its own process and its own moto,
                concurrently with steady);
  startup:      exec → READY=1;
  latency:      notice → StartInstances leaving the daemon (push, poll);
  poll_round:   one `Poller.observe()` round for 1, 4 and 20 guards, and 20 guards of 4 spots;
  cpu_round:    where a 20-guard round's CPU goes, and what alternatives cost;
  machine_step: `machine.step` over a full failover/failback cycle.
steady and memory run first, side by side (each is minutes of mostly waiting);
the rest run one after the other once they are done, so their timings see no
benchmark of ours beside them.

AWS is moto in server mode in child processes (bench/world_server.py), so the
CPU figures of the processes measured are spotguard's and its client
libraries' alone. Every figure is a median (or a stated percentile) taken in
this one run; the document records the command, the machine and the versions
that produced it, and says which goal is met or missed.

Usage: .venv/bin/python bench/run.py [--quick] [--out PATH]
`--quick` shortens every benchmark to check the harness and writes nothing
unless `--out` is given. This module must not measure anything itself: it
wires the benchmarks together and writes the report.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

from remote import RemoteWorld, use_dummy_credentials
from stats import table

use_dummy_credentials()  # before any botocore import reads the environment

import cpu_round  # noqa: E402
import latency  # noqa: E402
import machine_step  # noqa: E402
import memory  # noqa: E402
import poll_round  # noqa: E402
import startup  # noqa: E402
import steady  # noqa: E402

from spotguard import logs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"

INTRO = """\
spotguard is meant to run on a t4g.nano: 2 burstable Graviton2 vCPUs (baseline
5 % each, bursting on CPU credits) and 0.5 GiB of RAM. Issue 7 set the goals
below for it: memory near the floor any Python process with the same AWS
clients pays, a fraction of a percent of one core at the default 5 s poll,
one EC2 Describe of each kind per poll whatever the number of guards (and at
most one DescribeTargetHealth per target group), a quick start and a quick
reaction.

These figures come from the machine below, not from a t4g.nano: compare ratios
and orders of magnitude, not absolute milliseconds. Medians, percentiles and
ratios are taken within this one run (the machine is shared: its load average
is recorded; wall-clock figures suffer from it, CPU-time figures much less).
AWS is moto in server mode, started in separate processes so that the CPU of
the processes measured counts spotguard, aiobotocore and asyncio only. Against
AWS a call costs network and API time (tens of milliseconds in-region) instead
of moto's CPU, and TLS besides: the CPU figures carry over, the wall figures
only rank the paths against each other."""


FINDINGS = """\
What the figures say, and what issue 7 changed (bench/cpu_round.py measures
the changes one by one in every run; the rest is argued from the tables):

* **Memory** is within the goals, and most of it is not spotguard's: the floor
  (a bare aiobotocore process with the same clients) holds all but a few MiB
  (section 1). The largest single piece was botocore's EC2 service model,
  800 operations of which spotguard calls four. spotguard now ships a lean
  model (spotguard/ec2model.py: those four operations, the shapes they reach,
  `Instance` and `SpotInstanceRequest` cut to the members spotguard reads, no
  documentation), loaded first through botocore's search path; section 4's
  last row is the ec2 client with botocore's full model, for comparison. The
  floor loads the same lean model, so "vs floor" is spotguard's own share:
  its modules and structlog. discord-webhook (and `requests`, 3.7 MiB) is
  imported only when a webhook is configured; this run has none.
* **No leak**: section 4's growth after warming is a few KiB per thousand
  polls, an order of magnitude under the goal.
* **CPU** is almost all aiobotocore's, per call (section 6: response parsing,
  request building and signing, HTTP); spotguard's own code is about 1 % of
  a round. What was done, each step measured in section 6: timestamps parsed
  by `datetime.fromisoformat` instead of dateutil; the lean EC2 model, whose
  parser no longer walks the ~80 members of every instance; botocore's
  User-Agent built once per client (botocore otherwise builds it from ~16 parts
  twice per request); and a steady guard's target health reused for
  `unhealthy_grace / 3` (spotguard/sources/poll.py): described again as soon
  as anything about the guard moves (an instance, a notice, a target not
  healthy, the guard leaving spot-healthy), so the only cost is that an
  unhealthy spot is noticed up to 10 s later at the default 30 s grace.
  moto's server closes every connection after one reply, so every call here
  also pays a new TCP connection that AWS's keep-alive spares.
* **The CPU goal and its floor**: at 20 guards the floor alone (the same
  calls from a bare aiobotocore process) already takes more than 0.5 % of a
  core (section 1), so the goal cannot be met by trimming spotguard; what is
  spotguard's own is the difference to the floor. A fleet of 20 guards of 4
  spots (capacity 4, one slot per spot) parses four times the instances per
  poll: more CPU in the floor too, and the same calls per poll. Its own extra
  work per guard (four slots stepped, spots assigned to them) is section 7's
  steady fleet step beside the one-spot one.
* **AWS calls**: one DescribeSpotInstanceRequests and one DescribeInstances
  per poll whatever the number of guards, at most one DescribeTargetHealth
  per target group (one every 10 s for a steady guard at the defaults),
  nothing else in steady state. A failover adds only its own commands, and
  the 1 s fast poll describes the busy guard's target group, not every
  guard's (section 1).
* **Start-up** is almost all CPU (imports, the service models, the first
  round): on a quiet machine its wall time is about its CPU time (section 2).
  The lean EC2 model takes most of the model's load time off; prometheus-client
  and apscheduler are imported only with metrics_port and daily_summary.
* **Reaction**: the daemon's own CPU from a pushed notice to StartInstances
  leaving is a few ms even at p99 (section 3's CPU columns); the rest of the
  wall time is the write-ahead fsync (section 3's `Store.save` line) and
  waiting for a core. At load 11-13 (an earlier run) the p99 was 45.6 ms,
  mostly a slow fsync on a busy disk. The fsync is the design's promise
  (state on disk before the command) and stays; whether the p99 goal holds
  on a t4g.nano's EBS volume is for a measurement there."""


SECTIONS = (
    ("1. Steady state: memory, CPU, AWS calls", "Goals 1–3 of issue 7."),
    ("2. Start-up: exec → READY=1", "Goal 4 of issue 7."),
    (
        "3. Reaction: notice → StartInstances",
        "Goal 5 of issue 7. The whole daemon (spotguard.daemon.build + Daemon.async_run, the same wiring as "
        "`spotguard run`) in the benchmark process, a fresh daemon per run.",
    ),
    ("4. Memory growth over 10,000 polls", "Goal 1 of issue 7 (no leak)."),
    (
        "5. One poll round, by number of guards",
        "`spotguard.sources.poll.Poller.observe()` with spotguard's aiobotocore clients "
        "(spotguard.aws.clients) on moto's endpoint, every target group described (a full round, as "
        "while guards are busy; a steady guard's group is described every other round at the defaults, "
        "section 1). \"Our CPU\" is `time.process_time()` of the "
        "benchmark process, which holds no moto; moto's CPU is read from /proc for its own process.",
    ),
    (
        "6. Where a poll round's CPU goes",
        "Why the 20-guard CPU figure is what it is, and what brought it down (bench/cpu_round.py). The "
        "variants are measured, in this run, on the same moto world as everything else.",
    ),
    (
        "7. `machine.step`",
        "The pure state machine, called directly (spotguard/machine.py): one guard's events over a "
        "whole failover and failback, produced by the real machine against a small model of EC2 and "
        "an ALB (bench/cycle.py).",
    ),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions; check the harness")
    parser.add_argument("--out", type=Path, help=f"where to write the report (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    out = args.out or (None if args.quick else DEFAULT_OUT)

    began, started_at, load = time.monotonic(), dt.datetime.now(dt.timezone.utc), loadavg()
    with tempfile.TemporaryDirectory(prefix="spotguard-bench-") as tmp, \
            RemoteWorld() as world, RemoteWorld() as leak_world:
        workdir = Path(tmp)
        # The in-process daemon logs as in production (JSON), to a file rather than over the figures.
        log_stream = open(workdir / "daemon-inprocess.log", "w")
        logs.configure("json", log_stream)
        _say("steady state and memory growth, side by side (minutes) ...")
        with ThreadPoolExecutor(2) as pool:
            steady_job = pool.submit(steady.run, world, workdir, args.quick)
            leak_job = pool.submit(memory.run, leak_world, workdir, args.quick)
            steady_body, steady_fig = steady_job.result()
            leak_body, leak_fig = leak_job.result()
        _say("start-up ...")
        startup_body, startup_fig = startup.run(world, workdir, args.quick)
        _say("reaction ...")
        latency_body, latency_fig = asyncio.run(latency.run(world, workdir, args.quick))
        _say("poll round ...")
        poll_body = asyncio.run(poll_round.run(world, workdir, args.quick))
        _say("where a round's CPU goes ...")
        cpu_body = asyncio.run(cpu_round.run(world, workdir, args.quick))
        _say("machine.step ...")
        step_body = machine_step.run(args.quick)
        log_stream.close()
    bodies = [steady_body, startup_body, latency_body, leak_body, poll_body, cpu_body, step_body]
    summary = _goals(steady_fig, startup_fig, latency_fig, leak_fig)
    elapsed = time.monotonic() - began
    document = _document(summary, bodies, started_at, elapsed, load, args.quick)
    print(document)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(document + _kept_blocks(out))
        print(f"wrote {shown(out)} ({elapsed:.0f} s)", file=sys.stderr)
    return 0


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _goals(steady_fig: dict, startup_fig: dict, latency_fig: dict, leak_fig: dict) -> str:
    rows = steady.goals(steady_fig)
    grown = leak_fig["grown_kib"]
    rows.insert(3, [f"VmRSS growth over {leak_fig['polls']:,} polls", f"< {memory.GOAL_KIB:,} KiB",
                    f"{grown:+,d} KiB", "met" if grown < memory.GOAL_KIB else "**missed**"])
    low, high = startup_fig["load"]
    for n in startup.SIZES:
        wall, cpu = startup_fig[("spotguard", n)]
        rows.append([f"start-up, exec → READY=1, {n} guard{'s' * (n > 1)} (median)", f"<= {startup.GOAL:g} s",
                     f"wall {wall.median:.2f} s at load {low:.1f}–{high:.1f} on {os.cpu_count()} CPUs; "
                     f"CPU {cpu.median:.2f} s", startup._verdict(wall)])
    for n, (p50, p99, count) in latency_fig.items():
        rows.append([f"notice reaching the daemon → StartInstances leaving it, {n} guard{'s' * (n > 1)}",
                     f"p99 <= {latency.GOAL_P99 * 1e3:g} ms",
                     f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms ({count} runs)",
                     "met" if p99 <= latency.GOAL_P99 else "**missed**"])
    return table(["goal (issue 7)", "target", "measured", "verdict"], rows, align="llll")


def _document(summary: str, bodies: list[str], started_at: dt.datetime, elapsed: float, load: str, quick: bool) -> str:
    parts = [
        "# Benchmarks",
        "<!-- Generated by `make bench` (bench/run.py). Do not edit by hand: run it again. -->",
        INTRO,
        "## Goals",
        summary,
        FINDINGS,
        "## How these were produced",
        _machine_table(started_at, elapsed, load, quick),
    ]
    for (title, about), body in zip(SECTIONS, bodies):
        parts += [f"## {title}", about, body]
    return "\n\n".join(parts) + "\n"


def _kept_blocks(out: Path) -> str:
    """Sections other commands own (e.g. `make bench-detect`'s), carried over from the old file."""
    old = out.read_text() if out.exists() else ""
    marked = re.finditer(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", old, flags=re.S)
    return "".join(f"\n{m.group(0)}\n" for m in marked)


def _machine_table(started_at: dt.datetime, elapsed: float, load: str, quick: bool) -> str:
    command = shlex.join([shown(Path(sys.executable)), *sys.argv])
    rows = [
        ("command", ("`make bench` → " if os.environ.get("MAKELEVEL") else "") + f"`{command}`"
         + (" (quick: few repetitions)" if quick else "")),
        ("date", started_at.strftime("%Y-%m-%d %H:%M UTC")),
        ("run time", f"{elapsed:.0f} s"),
        ("nproc", str(os.cpu_count())),
        ("CPU", _cpu_model()),
        ("memory", _mem_total()),
        ("load average at start (1/5/15 min)", load),
        ("load average at end (1/5/15 min)", loadavg()),
        ("kernel", platform.release()),
        ("Python", platform.python_version()),
        ("spotguard", _git_revision()),
        ("libraries", ", ".join(f"{p} {version(p)}" for p in ("aiobotocore", "botocore", "moto", "structlog"))),
    ]
    lines = ["| | |", "|:--|:--|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def shown(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    try:
        return str(path.absolute().relative_to(ROOT))
    except ValueError:
        return str(path)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " / ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def _git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    # Its own output does not count: a rerun starts with the last run's file changed.
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", f":!{DEFAULT_OUT.relative_to(ROOT)}")
    return f"{revision}" + (" with uncommitted changes" if dirty else "")


if __name__ == "__main__":
    raise SystemExit(main())
