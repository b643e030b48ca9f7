"""Benchmark: one poll round (`Poller.observe()`) for 1, 4 and 20 guards, and 20 guards × 4 spots, against moto.

The world (moto in server mode, in its own process) holds 20 provisioned
deployments; three Pollers on the same aiobotocore clients watch the first 1, 4
and 20 of them, and their rounds are interleaved so that the ratios between
them come from the same moments of a noisy machine. Per round: wall time, this
process's CPU time (spotguard + aiobotocore + asyncio; moto is elsewhere),
moto's CPU time (from /proc, 10 ms ticks, so only its mean is meaningful) and
the AWS calls made (`Poller.calls`).

This module must not change the world: it only polls it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import configs
from aiobotocore.session import get_session
from stats import fmt, spread, summarize, table

from spotguard import config
from spotguard.aws import clients
from spotguard.sources.poll import Poller

SIZES = (1, 4, 20)
FLEET = (20, 4)  # and 20 guards of 4 spot requests each (the fleet issue's benchmark)
ROUNDS = 25
WARMUP = 3
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def run(world: Any, workdir: Path, quick: bool = False) -> str:
    rounds = 8 if quick else ROUNDS
    world.call("reset")
    deployments = [world.call("provision", name=f"g{i:02d}", standbys=1) for i in range(max(SIZES))]
    path = configs.write(
        workdir / "poll.toml", world, deployments, state_dir=workdir / "poll-state", poll_interval=5
    )
    guards = config.load(path).guards
    fleets = [world.call("provision", name=f"f{i:02d}", standbys=1, spots=FLEET[1]) for i in range(FLEET[0])]
    fleet_path = configs.write(
        workdir / "fleet.toml", world, fleets, state_dir=workdir / "fleet-state", poll_interval=5
    )
    sizes = [*SIZES, FLEET]
    wall: dict = {n: [] for n in sizes}
    cpu: dict = {n: [] for n in sizes}
    moto_cpu: dict = {n: 0.0 for n in sizes}
    async with clients(world.region, world.endpoint_url, session=get_session()) as aws:
        pollers: dict = {n: Poller(aws.ec2, aws.elbv2, guards[:n]) for n in SIZES}
        pollers[FLEET] = Poller(aws.ec2, aws.elbv2, config.load(fleet_path).guards)
        for n, poller in pollers.items():
            for _ in range(WARMUP):  # botocore loads its models and opens connections here
                _check(await poller.observe(), n)
            poller.calls.clear()
        for _ in range(rounds):
            for n, poller in pollers.items():
                moto_before, cpu_before = cpu_seconds(world.pid), time.process_time()
                began = time.perf_counter()
                await poller.observe()
                wall[n].append(time.perf_counter() - began)
                cpu[n].append(time.process_time() - cpu_before)
                moto_cpu[n] += cpu_seconds(world.pid) - moto_before
    calls = {n: pollers[n].calls for n in sizes}
    return _report(wall, cpu, moto_cpu, calls, rounds)


def _check(seen: dict, n: int | tuple[int, int]) -> None:
    guards, spots = n if isinstance(n, tuple) else (n, 1)
    if len(seen) != guards or any(len(o.spots) != spots or any(i.state != "running" for i in o.spots)
                                  for o in seen.values()):
        raise AssertionError(f"poll of {n} guards saw {seen}")


def _label(n: int | tuple[int, int]) -> str:
    return f"{n[0]} × {n[1]} spots" if isinstance(n, tuple) else str(n)


def _report(wall: dict, cpu: dict, moto_cpu: dict, calls: dict, rounds: int) -> str:
    rows, per_call = [], []
    base_wall = summarize(wall[SIZES[0]]).median
    base_cpu = summarize(cpu[SIZES[0]]).median
    for n in wall:
        w, c = summarize(wall[n]).scaled(1e3), summarize(cpu[n]).scaled(1e3)
        total_calls = sum(calls[n].values()) / rounds
        rows.append(
            [
                _label(n),
                fmt(w.median), fmt(w.p90), spread(w),
                fmt(c.median), fmt(c.p90),
                fmt(moto_cpu[n] / rounds * 1e3, 2),
                fmt(total_calls, 3),
                f"{w.median / 1e3 / base_wall:.2f}× / {c.median / 1e3 / base_cpu:.2f}×",
            ]
        )
        breakdown = ", ".join(f"{api} {k / rounds:g}" for api, k in sorted(calls[n].items()))
        per_call.append([_label(n), breakdown, fmt(c.median / total_calls, 3)])
    big = SIZES[-1]
    moto_share = moto_cpu[big] / rounds / summarize(cpu[big]).median
    return "\n\n".join(
        [
            f"{rounds} interleaved rounds per size, after {WARMUP} warm-up rounds. "
            "Each guard: one persistent spot request (running, registered, healthy), one stopped standby, "
            f"its own target group; `{_label(FLEET)}`: {FLEET[0]} more guards of {FLEET[1]} spot requests each "
            f"(capacity {FLEET[1]}) behind their target group. The moto account holds all "
            f"{max(SIZES) + FLEET[0]} deployments throughout.",
            table(
                [
                    "guards", "wall ms median", "wall p90", "wall min–max",
                    "our CPU ms median", "our CPU p90", "moto CPU ms (mean)", "AWS calls", "vs 1 guard (wall / CPU)",
                ],
                rows,
            ),
            table(["guards", "calls per round, by API", "our CPU ms per call (median)"], per_call, align="rl"),
            f"moto's own server time dominates the wall time: at {big} guards it spends {moto_share:.1f}× "
            "our CPU per round, and both processes share this machine's cores. Against AWS the wall time "
            "is network and API latency instead (the EC2 calls run one after the other, the target groups "
            "in parallel); our CPU per round is the figure that carries over.",
        ]
    )
