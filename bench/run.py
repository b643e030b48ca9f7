"""`make bench`: measure spotguard's costs and write them to docs/benchmarks.md.

Four benchmarks, each in its own module, run in this order in one process:
  1. machine_step: `machine.step` over a full failover/failback cycle;
  2. poll_round:   one `Poller.observe()` round for 1, 4 and 16 guards;
  3. latency:      notice → StartInstances through the whole daemon (push, poll);
  4. memory:       resident memory and growth of a real `spotguard run` process.

AWS is moto in server mode in a child process (bench/world_server.py), so the
CPU figures of this process are spotguard's and its client libraries' alone.
Every figure is a median with its spread, all taken in this one run; the
document records the command, the machine and the versions that produced it.

Usage: .venv/bin/python bench/run.py [--quick] [--out PATH]
`--quick` runs few repetitions to check the harness and writes nothing unless
`--out` is given. This module must not measure anything itself: it wires the
benchmarks together and writes the report.
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
from importlib.metadata import version
from pathlib import Path

from remote import RemoteWorld, use_dummy_credentials

use_dummy_credentials()  # before any botocore import reads the environment

from spotguard import logs  # noqa: E402

import latency  # noqa: E402
import machine_step  # noqa: E402
import memory  # noqa: E402
import poll_round  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"

INTRO = """\
spotguard is meant to run on a t4g.nano: 2 burstable Graviton2 vCPUs (baseline
5 % each, bursting on CPU credits) and 0.5 GiB of RAM. What matters there: the
cost of one poll round for N guards, the time from an interruption notice to
StartInstances, the state machine's step cost, and the daemon's resident memory.

These figures come from the machine below, not from a t4g.nano: compare ratios
and orders of magnitude, not absolute milliseconds. Medians and ratios are taken
within this one run (the machines are noisy; other work may share them), with
p90 or min–max beside them. AWS is moto in server mode, started in a separate
process so that "our CPU" counts spotguard, aiobotocore and asyncio only. Wall
times against moto on loopback are not AWS's: there a call costs network and
API time (tens of milliseconds in-region) instead of moto's CPU, so the CPU
figures carry over and the wall figures only rank the paths against each other."""


SECTIONS = (
    (
        "1. `machine.step`",
        "The pure state machine, called directly (spotguard/machine.py): one guard's events over a "
        "whole failover and failback, produced by the real machine against a small model of EC2 and "
        "an ALB (bench/cycle.py).",
    ),
    (
        "2. One poll round",
        "`spotguard.sources.poll.Poller.observe()` with spotguard's aiobotocore clients "
        "(spotguard.aws.clients) on moto's endpoint. \"Our CPU\" is `time.process_time()` of the "
        "benchmark process, which holds no moto; moto's CPU is read from /proc for its own process.",
    ),
    (
        "3. Notice → StartInstances",
        "The whole daemon (spotguard.daemon.build + Daemon.async_run, the same wiring as "
        "`spotguard run`) in the benchmark process. The clock stops when moto's EC2 backend receives "
        "StartInstances for the guard's first standby (recorded in moto's process; CLOCK_MONOTONIC is "
        "shared across processes).",
    ),
    (
        "4. Resident memory",
        "A real daemon process, exactly as systemd starts it.",
    ),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions; check the harness")
    parser.add_argument("--out", type=Path, help=f"where to write the report (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    out = args.out or (None if args.quick else DEFAULT_OUT)

    began, started_at, load = time.monotonic(), dt.datetime.now(dt.timezone.utc), loadavg()
    bodies = []
    with tempfile.TemporaryDirectory(prefix="spotguard-bench-") as tmp, RemoteWorld() as world:
        workdir = Path(tmp)
        # The in-process daemon logs as in production (JSON), to a file rather than over the figures.
        log_stream = open(workdir / "daemon-inprocess.log", "w")
        logs.configure("json", log_stream)
        steps = (
            lambda: machine_step.run(args.quick),
            lambda: asyncio.run(poll_round.run(world, workdir, args.quick)),
            lambda: asyncio.run(latency.run(world, workdir, args.quick)),
            lambda: memory.run(world, workdir, args.quick),
        )
        for (title, _), step in zip(SECTIONS, steps):
            print(f"## {title} ...", file=sys.stderr, flush=True)
            body = step()
            bodies.append(body)
            print(f"\n## {title}\n\n{body}\n", flush=True)
        log_stream.close()
    elapsed = time.monotonic() - began
    document = _document(bodies, started_at, elapsed, load, args.quick)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(document + _kept_blocks(out))
        print(f"wrote {shown(out)} ({elapsed:.0f} s)", file=sys.stderr)
    return 0


def _document(bodies: list[str], started_at: dt.datetime, elapsed: float, load: str, quick: bool) -> str:
    parts = [
        "# Benchmarks",
        "<!-- Generated by `make bench` (bench/run.py). Do not edit by hand: run it again. -->",
        INTRO,
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
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{revision}" + (" with uncommitted changes" if dirty else "")


if __name__ == "__main__":
    raise SystemExit(main())
