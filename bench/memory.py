"""Benchmark: does `python -m spotguard run` leak? Its memory over 10,000 polls.

The daemon runs as systemd would run it (its own process, a generated config,
JSON logs to a file) against its own moto (a world of its own, so that this
fast-polling run does not disturb the steady runs beside it), one guard, with
a tiny poll_interval so that 10,000 rounds pass in minutes. Rounds are counted
on moto's side (one DescribeSpotInstanceRequests per round). At checkpoints
the benchmark reads VmRSS, RssAnon and VmHWM from /proc/<pid>/status and the
process's CPU time from /proc/<pid>/stat. Growth is measured from a warm
checkpoint (round WARM) to round WARM + 10,000. A baseline shows what the
interpreter, spotguard's imports and the clients alone cost.

This module must not change the world beyond provisioning it, nor signal any
process but the daemon it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import configs
from poll_round import cpu_seconds
from remote import AWS_ENV
from stats import fmt, table

POLLS = 10_000  # issue 7: growth over 10,000 polls under 1 MiB
# Growth is measured from this round on: botocore fills per-shape caches and
# aiohttp its connection pool over the first rounds.
WARM = 500
EVERY = 1_000  # a checkpoint every this many rounds after WARM
GOAL_KIB = 1024
POLL_INTERVAL = 0.001
DEADLINE = 900.0
# Where a daemon's memory goes before its first round: one JSON [label, /proc status text] per line.
# With STOCK set (the first line), spotguard.aws's lean EC2 model is switched off in
# this throwaway process, to show what botocore's full model costs beside it.
BASELINE = """
import asyncio, json, os
STOCK = bool(os.environ.get("BENCH_STOCK_MODEL"))
def show(label):
    print(json.dumps([label, open("/proc/self/status").read()]), flush=True)
show("interpreter")
import spotguard.daemon, spotguard.aws, spotguard.sources.poll, spotguard.executor
import spotguard.store, spotguard.notify, spotguard.config, spotguard.logs, spotguard.cli, spotguard.commands.run
show("+ spotguard's imports (aiobotocore, structlog, ...)")
if STOCK:
    spotguard.aws._lean_models = lambda session: session
from contextlib import AsyncExitStack
from aiobotocore.session import get_session
async def clients():
    session = get_session()
    async with AsyncExitStack() as stack:
        for name in ("ec2", "elbv2", "sqs"):
            await stack.enter_async_context(spotguard.aws.client(name, "us-east-1", "http://127.0.0.1:9", session=session))
            model = "botocore's full EC2 model" if STOCK and name == "ec2" else "service model"
            show(f"+ {name} client ({model} loaded, no call made)")
asyncio.run(clients())
"""  # noqa: E501 - the code a subprocess runs: a wrap would change the string


def status(pid: int) -> dict[str, int]:
    """KiB figures of /proc/<pid>/status that matter here."""
    with open(f"/proc/{pid}/status") as f:
        return _parse_status(f.read())


def run(world: Any, workdir: Path, quick: bool = False) -> tuple[str, dict]:
    warm, polls, every = (50, 500, 100) if quick else (WARM, POLLS, EVERY)
    world.call("reset")
    deployments = [world.call("provision", name="leak", standbys=1)]
    points = [1, 10, 100, *range(warm, warm + polls + 1, every)]
    points = sorted(set(p for p in points if p <= warm + polls) | {warm, warm + polls})
    samples = _measure(world, workdir, deployments, points)
    grown = samples[warm + polls]["VmRSS"] - samples[warm]["VmRSS"]
    return _report(_baseline(), samples, warm, polls), {"grown_kib": grown, "polls": polls}


def _measure(world: Any, workdir: Path, deployments: list, points: list[int]) -> dict[int, dict[str, float]]:
    run_dir = workdir / f"memory-{len(deployments)}"
    run_dir.mkdir()
    path = configs.write(
        run_dir / "config.toml", world, deployments, state_dir=run_dir / "state", poll_interval=POLL_INTERVAL
    )
    samples: dict[int, dict[str, float]] = {}
    with open(run_dir / "daemon.log", "w") as out, open(run_dir / "daemon.err", "w") as err:
        began = world.call("describes")
        proc = subprocess.Popen(
            [sys.executable, "-m", "spotguard", "run", "--config", str(path)],
            stdout=out, stderr=err, env={**os.environ, **AWS_ENV},
        )
        try:
            end = time.monotonic() + DEADLINE
            for point in points:
                while world.call("describes") - began < point:
                    if proc.poll() is not None:
                        raise AssertionError(f"the daemon exited ({proc.returncode}); see {run_dir}")
                    if time.monotonic() > end:
                        raise AssertionError(f"the daemon did not reach round {point} in {DEADLINE}s")
                    time.sleep(0.005)
                samples[point] = {**status(proc.pid), "cpu": cpu_seconds(proc.pid), "t": time.monotonic()}
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise AssertionError(f"the daemon exited {proc.returncode}; see {run_dir}")
    _check_log(run_dir / "daemon.log")
    return samples


def _check_log(path: Path) -> None:
    """A steady world: the daemon must have logged no warning or error (else the figures lie)."""
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event.get("level") not in ("info", "debug"):
            raise AssertionError(f"daemon logged {event}")


def _baseline() -> list[tuple[str, dict[str, int]]]:
    """The stages with spotguard's lean EC2 model, then the ec2 client's stage with botocore's full one."""
    stages = _stages({})
    stock = _stages({"BENCH_STOCK_MODEL": "1"})
    stages.append(("for comparison, in another process: " + stock[2][0].lstrip("+ "), stock[2][1]))
    return stages


def _stages(env: dict[str, str]) -> list[tuple[str, dict[str, int]]]:
    reply = subprocess.run(
        [sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True,
        env={**os.environ, **AWS_ENV, **env},
    )
    stages = []
    for line in reply.stdout.splitlines():
        label, text = json.loads(line)
        stages.append((label, _parse_status(text)))
    return stages


def _parse_status(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM", "Threads"):
            out[key] = int(rest.split()[0])
    return out


def _mib(kib: float) -> str:
    return fmt(kib / 1024, 3)


def _report(baseline: list[tuple[str, dict[str, int]]], samples: dict, warm: int, polls: int) -> str:
    stages = [[label, _mib(s["VmRSS"]), _mib(s["RssAnon"])] for label, s in baseline]
    last = warm + polls
    rows = [
        [point, _mib(s["VmRSS"]), _mib(s["RssAnon"]), _mib(s["VmHWM"]), s["Threads"],
         f"{s['VmRSS'] - samples[warm]['VmRSS']:+,d}" if point >= warm else ""]
        for point, s in samples.items()
    ]
    grown = samples[last]["VmRSS"] - samples[warm]["VmRSS"]
    anon = samples[last]["RssAnon"] - samples[warm]["RssAnon"]
    cpu_per_round = (samples[last]["cpu"] - samples[warm]["cpu"]) / polls
    period = (samples[last]["t"] - samples[warm]["t"]) / polls
    verdict = "met" if grown < GOAL_KIB else "**missed**"
    return "\n\n".join(
        [
            f"`python -m spotguard run --config <generated>`, 1 guard, against a moto of its own, poll_interval "
            f"{POLL_INTERVAL:g} s, rounds counted by moto. MiB = 1,048,576 bytes; VmHWM is the peak so far.",
            "Where it goes, before any round (one short-lived process, stage by stage):",
            table(["stage", "VmRSS MiB", "RssAnon MiB"], stages, align="l"),
            "The daemon, as it runs:",
            table(["after round", "VmRSS MiB", "RssAnon MiB", "VmHWM MiB", "threads",
                   f"VmRSS KiB since round {warm:,}"], rows),
            f"Over the {polls:,} polls from round {warm:,} to {last:,}: VmRSS {grown:+,d} KiB, RssAnon {anon:+,d} KiB "
            f"(goal: under {GOAL_KIB:,} KiB: {verdict}). Per round meanwhile: {fmt(cpu_per_round * 1e3)} ms of CPU "
            f"(whole process, logging included), one round every {fmt(period * 1e3)} ms.",
        ]
    )
