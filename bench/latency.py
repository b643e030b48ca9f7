"""Benchmark 3: from an interruption notice to StartInstances reaching EC2, through the whole daemon.

The daemon is the real one (`spotguard.daemon.build` on aiobotocore clients
pointed at the world, run with `Daemon.async_run`), in this process. Two paths:

  * push: `daemon.push(Notice(spot))`, the fast path SQS and the agent use;
    the clock starts just before the push;
  * poll: only the spot request's status changes in moto (as EC2 does at the
    notice) and the daemon's poll must find it; the clock starts when moto's
    status has flipped. poll_interval is 1 s; the notice lands at a random
    moment of the interval, so the figures include the wait for the next poll.

The clock stops when moto's EC2 backend receives StartInstances (recorded in
the world's process; CLOCK_MONOTONIC is shared by every process on Linux).
Each run starts a fresh daemon (fresh state dir) on a deployment put back to
spot-serving, waits for its first round, then sends the notice.

Also here, because it sits on this path: the cost of the write-ahead save
(`Store.save`: temp file, fsync, rename, directory fsync) on this machine.

This module must not wrap or patch anything of spotguard's.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

from spotguard import config
from spotguard.aws import clients
from spotguard.daemon import build
from spotguard.machine import Notice, Phase
from spotguard.notify import Notifier
from spotguard.store import Store

import configs
from remote import start_time, until
import cycle
from stats import fmt, spread, summarize, table

RUNS = 10
DEADLINE = 15.0
PUSH_POLL_INTERVAL = 5.0  # steady-state default: the push, not a poll, must be what acts
POLL_INTERVAL = 1.0
SAVES = 40


@dataclass(frozen=True)
class Case:
    path: str  # push | poll
    guards: int


# 16 guards only on the push path: it shows what the size of the poll round costs a pushed notice.
CASES = (Case("push", 1), Case("poll", 1), Case("push", 16))


async def run(world: Any, workdir: Path, quick: bool = False) -> str:
    runs = 3 if quick else RUNS
    rng = random.Random(1)  # the same offsets every run of the benchmark
    results: dict[Case, list[float]] = {c: [] for c in CASES}
    calls_before_start: dict[Case, list[int]] = {c: [] for c in CASES}
    session = get_session()
    async with clients(world.region, world.endpoint_url, session=session) as aws:
        for size in sorted({c.guards for c in CASES}):
            world.call("reset")
            deployments = [world.call("provision", name=f"g{i:02d}", standbys=1) for i in range(size)]
            cases = [c for c in CASES if c.guards == size]
            # Alternate push and poll runs so both see the same stretch of machine noise.
            for i in range(runs):
                for case in cases:
                    target = deployments[(i * len(cases) + cases.index(case)) % size]
                    latency, calls = await _one(world, aws, workdir, case, deployments, target, rng)
                    results[case].append(latency)
                    calls_before_start[case].append(calls)
                    world.call("restore", deployment=target)
    saves = _store_saves(workdir / "save-bench", SAVES if not quick else 10)
    return _report(results, calls_before_start, saves, runs)


async def _one(
    world: Any, aws: Any, workdir: Path, case: Case, deployments: list, target: dict, rng: random.Random
) -> tuple[float, int]:
    """One notice through a fresh daemon; (seconds to StartInstances, AWS calls in between)."""
    run_dir = workdir / f"latency-{case.path}-{case.guards}-{time.monotonic_ns()}"
    run_dir.mkdir()
    interval = PUSH_POLL_INTERVAL if case.path == "push" else POLL_INTERVAL
    path = configs.write(run_dir / "config.toml", world, deployments, state_dir=run_dir / "state", poll_interval=interval)
    settings = config.load(path)
    notifier = Notifier(None)
    await notifier.start()
    daemon = build(settings, aws, notifier)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.async_run(stop))
    try:
        await until(lambda: daemon.rounds >= 1 or task.done(), "first round")
        # A random moment: for the poll path, anywhere in the interval before the next round.
        await asyncio.sleep(rng.uniform(0.0, POLL_INTERVAL if case.path == "poll" else 0.3))
        seen = await asyncio.to_thread(world.call, "starts")
        calls = sum(daemon.poller.calls.values())
        if case.path == "push":
            began = time.monotonic()
            daemon.push(Notice(target["spot_instance_id"]))
        else:
            began = await asyncio.to_thread(world.call, "notice", request_id=target["spot_request_id"])
        at = await start_time(world, seen, target["standby_ids"][0], str(case), DEADLINE)
        guard = daemon.guards[target["name"]]
        await until(lambda: guard.state.phase is not Phase.SPOT_HEALTHY, "failover phase")
        return at - began, sum(daemon.poller.calls.values()) - calls
    finally:
        stop.set()
        await asyncio.wait([task], timeout=DEADLINE)
        await notifier.close()
        if task.done() and task.exception():
            raise task.exception()


def _store_saves(state_dir: Path, count: int) -> list[float]:
    """Seconds per Store.save of a mid-failover state (what the notice path writes)."""
    states = [s.state for s in cycle.record() if s.state.phase is Phase.STANDBY_STARTING]
    store, out = Store(state_dir), []
    for i in range(count):
        began = time.perf_counter()
        store.save("bench", states[i % len(states)])
        out.append(time.perf_counter() - began)
    return out


def _report(results: dict, calls: dict, saves: list[float], runs: int) -> str:
    rows = []
    base = summarize(results[CASES[0]]).median
    for case in CASES:
        s = summarize(results[case]).scaled(1e3)
        c = summarize(calls[case])
        interval = PUSH_POLL_INTERVAL if case.path == "push" else POLL_INTERVAL
        rows.append(
            [
                case.path, case.guards, f"{interval:g} s",
                fmt(s.median), fmt(s.p90), spread(s), s.n,
                f"{c.median:g}", f"{s.median / 1e3 / base:.1f}×",
            ]
        )
    save = summarize(saves).scaled(1e3)
    return "\n\n".join(
        [
            f"{runs} runs per row, push and poll runs alternating; with 16 guards the notice goes to a "
            "different guard each run; the poll path's notice lands at a uniformly random moment of its interval. \"AWS calls\" is how many calls the poller made between the notice "
            "and StartInstances (median): a pushed notice is acted on before the round's poll (0 calls), a polled one needs the whole round.",
            table(
                [
                    "path", "guards", "poll_interval", "median ms", "p90 ms", "min–max ms", "runs",
                    "AWS calls before Start", "vs push, 1 guard",
                ],
                rows,
                align="ll",
            ),
            f"Write-ahead `Store.save` of a standby-starting state on this machine's disk "
            f"(runs before StartInstances on this path): median {fmt(save.median)} ms, "
            f"p90 {fmt(save.p90)} ms, min–max {spread(save)} ms over {save.n} saves.",
        ]
    )
