"""Benchmark: start-up, from exec of `python -m spotguard run` to READY=1 on the notify socket.

`spotguard run` sends READY=1 after its first observation (one poll round done,
every guard stepped). Each trial starts a fresh process with a fresh state
directory, exactly as systemd would, waits for READY=1 on a datagram socket
bound here, then stops it with SIGTERM. The floor beside it is
bench/floor.py, which imports aiobotocore, opens the same clients and makes
the same first round, then sends READY=1: what any process doing this job in
Python pays. Trials alternate between the rows, so they share the machine's noise.

A start-up is almost all CPU (imports, loading botocore's service models,
the first round), so on a machine whose cores other work is using its wall
time stretches with the load; on the nano the daemon is alone. The CPU column
(utime+stime at READY=1) does not depend on the load: on an idle machine the
wall time is that plus the first round's waits for AWS. Both are reported,
with the load average over the trials, and the goal is judged on the wall time.

Where the time goes is shown once per run with `python -X importtime` on
`spotguard run`'s imports.

This module must not change the world beyond provisioning it, nor signal any
process but those it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import configs
import proc
from remote import AWS_ENV
from stats import fmt, summarize, table

TRIALS = 10
SIZES = (1, 20)
GOAL = 1.5  # seconds, issue 7


def run(world: Any, workdir: Path, quick: bool = False) -> tuple[str, dict]:
    trials = 3 if quick else TRIALS
    world.call("reset")
    pool = {n: [world.call("provision", name=f"u{n}-{i:02d}", standbys=1) for i in range(n)] for n in SIZES}
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {(k, n): [] for n in SIZES for k in ("spotguard", "floor")}
    load = [_load1()]
    for t in range(trials):
        for kind, n in rows:
            rows[(kind, n)].append(_one(world, workdir / f"startup-{kind}-{n}-{t}", kind, pool[n]))
        load.append(_load1())
    imports = _imports()
    figures = {key: (summarize(w for w, _ in values), summarize(c for _, c in values)) for key, values in rows.items()}
    figures["load"] = (min(load), max(load))
    return _report(figures, imports, trials), figures


def _load1() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _one(world: Any, run_dir: Path, kind: str, deployments: list) -> tuple[float, float]:
    """(wall seconds from exec to READY=1, the process's CPU seconds by then)."""
    run_dir.mkdir(parents=True)
    if kind == "spotguard":
        path = configs.write(
            run_dir / "config.toml", world, deployments, state_dir=run_dir / "state", poll_interval=5.0
        )
        argv = ["-m", "spotguard", "run", "--config", str(path)]
    else:
        configs.write_floor_spec(run_dir / "spec.json", world, deployments, interval=5.0)
        argv = [str(proc.BENCH / "floor.py"), str(run_dir / "spec.json")]
    launched = proc.launch(f"start{kind}{len(deployments)}", argv, run_dir)
    try:
        return launched.wait_ready(), launched.ready_cpu
    finally:
        code = launched.stop()
        if code != 0:
            raise AssertionError(f"{kind} exited {code}; see {run_dir}")


def _verdict(s: Any) -> str:
    return "met" if s.median <= GOAL else "**missed**"


IMPORTS = (
    "import spotguard.cli, spotguard.commands.run, spotguard.config, spotguard.daemon, spotguard.aws, "
    "spotguard.sources.poll, spotguard.executor, spotguard.store, spotguard.notify, spotguard.logs"
)


def _imports() -> list[tuple[str, float]]:
    """Import time (ms) of `spotguard run`'s modules, each module's own time summed by top-level package."""
    reply = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", IMPORTS + "; import aiobotocore.session, aiohttp"],
        capture_output=True, text=True, check=True, env={**os.environ, **AWS_ENV},
    )
    top: dict[str, float] = {}
    for line in reply.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _, name = line[len("import time:"):].split("|")
        try:
            micros = int(own.strip())
        except ValueError:
            continue  # the header line
        package = name.strip().split(".")[0]
        top[package] = top.get(package, 0) + micros / 1000
    return sorted(top.items(), key=lambda kv: -kv[1])


def _report(figures: dict, imports: list[tuple[str, float]], trials: int) -> str:
    rows = []
    for (kind, n), (s, c) in [(k, v) for k, v in figures.items() if k != "load"]:
        name = f"{'`spotguard run`' if kind == 'spotguard' else 'floor'}, {n} guard{'s' * (n > 1)}"
        rows.append([name, fmt(s.median * 1e3), fmt(s.p90 * 1e3), f"{fmt(s.min * 1e3)}–{fmt(s.max * 1e3)}",
                     fmt(c.median * 1e3), s.n, _verdict(s) if kind == "spotguard" else ""])
    low, high = figures["load"]
    total = sum(ms for _, ms in imports)
    shown = [[pkg, fmt(ms, 3)] for pkg, ms in imports[:10]]
    return "\n\n".join(
        [
            f"{trials} trials per row, rows alternating. Clock: from just before `exec` to READY=1 received "
            f"on the notify socket (first poll round done and stepped). \"CPU\" is the process's utime+stime "
            f"at READY=1. 1-minute load average during the trials: {low:.1f}–{high:.1f} on "
            f"{os.cpu_count()} CPUs. Goal: <= {GOAL:g} s, judged on the median wall time.",
            table(["process", "wall median ms", "wall p90 ms", "wall min–max ms", "CPU median ms", "trials", "goal"],
                  rows, align="l"),
            f"Where the imports go (`python -X importtime`, one run, each module's own import time summed by "
            f"top-level package; {fmt(total, 3)} ms in all, interpreter start-up excluded):",
            table(["package", "import ms"], shown, align="l"),
        ]
    )
