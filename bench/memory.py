"""Benchmark 4: resident memory of a real `python -m spotguard run` process, and its growth.

The daemon runs as systemd would run it (its own process, a generated config,
JSON logs to a file) against the world's moto, with a tiny poll_interval so
that hundreds of rounds pass in seconds. Rounds are counted on moto's side (one
DescribeSpotInstanceRequests per round). At checkpoints the benchmark reads
VmRSS, RssAnon and VmHWM from /proc/<pid>/status and the process's CPU time
from /proc/<pid>/stat. Growth is measured from a warm checkpoint (after caches
fill) to the last one. A baseline row shows what the interpreter and
spotguard's imports alone cost.

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

# (guards, rounds): 16 guards cost moto ~0.1 s of CPU per round, so fewer rounds keep the run short.
PLAN = ((1, 300), (16, 200))
CHECKPOINTS = (1, 10, 50, 100, 150, 200, 300)
# Growth is measured from this round on: botocore fills per-shape caches over the first ~100 rounds.
WARM = 100
# Above this many KiB per 100 rounds after warming, the report says memory has not settled.
UNSETTLED = 100
POLL_INTERVAL = 0.01
DEADLINE = 120.0
# Where a daemon's memory goes before its first round: one JSON [label, /proc status text] per line.
BASELINE = """
import asyncio, json
def show(label):
    print(json.dumps([label, open("/proc/self/status").read()]), flush=True)
show("interpreter")
import spotguard.daemon, spotguard.aws, spotguard.sources.poll, spotguard.executor
import spotguard.store, spotguard.notify, spotguard.config, spotguard.logs, spotguard.cli
show("+ spotguard's imports (aiobotocore, structlog, discord-webhook, ...)")
from contextlib import AsyncExitStack
from aiobotocore.session import get_session
async def clients():
    session = get_session()
    async with AsyncExitStack() as stack:
        for name in ("ec2", "elbv2", "sqs"):
            await stack.enter_async_context(spotguard.aws.client(name, "us-east-1", "http://127.0.0.1:9", session=session))
            show(f"+ {name} client (service model loaded, no call made)")
asyncio.run(clients())
"""


def status(pid: int) -> dict[str, int]:
    """KiB figures of /proc/<pid>/status that matter here."""
    with open(f"/proc/{pid}/status") as f:
        return _parse_status(f.read())


def run(world: Any, workdir: Path, quick: bool = False) -> str:
    results = []
    for guards, rounds in PLAN:
        rounds = min(rounds, 60) if quick else rounds
        world.call("reset")
        deployments = [world.call("provision", name=f"g{i:02d}", standbys=1) for i in range(guards)]
        results.append((guards, rounds, _measure(world, workdir, deployments, rounds)))
    return _report(_baseline(), results)


def _measure(world: Any, workdir: Path, deployments: list, rounds: int) -> dict[int, dict[str, float]]:
    run_dir = workdir / f"memory-{len(deployments)}"
    run_dir.mkdir()
    path = configs.write(
        run_dir / "config.toml", world, deployments, state_dir=run_dir / "state", poll_interval=POLL_INTERVAL
    )
    points = [c for c in CHECKPOINTS if c <= rounds]
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
    reply = subprocess.run(
        [sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True, env={**os.environ, **AWS_ENV}
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
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def _mib(kib: float) -> str:
    return fmt(kib / 1024, 3)


def _report(baseline: list[tuple[str, dict[str, int]]], results: list) -> str:
    stages = [[label, _mib(s["VmRSS"]), _mib(s["RssAnon"])] for label, s in baseline]
    rows, growth_rows = [], []
    for guards, rounds, samples in results:
        for point, s in samples.items():
            rows.append([f"`spotguard run`, {guards} guard{'s' * (guards > 1)}", point, _mib(s["VmRSS"]), _mib(s["RssAnon"]), _mib(s["VmHWM"])])
        last = max(samples)
        warm = WARM if WARM in samples and WARM < last else min(samples)
        grown = samples[last]["VmRSS"] - samples[warm]["VmRSS"]
        span = last - warm
        cpu_per_round = (samples[last]["cpu"] - samples[warm]["cpu"]) / span
        period = (samples[last]["t"] - samples[warm]["t"]) / span
        first = samples[warm]["VmRSS"] - samples[min(samples)]["VmRSS"]
        growth_rows.append(
            [
                guards, f"{first:+,d}", f"{warm}→{last}", f"{grown:+,d}", f"{grown / span * 100:+,.1f}",
                fmt(cpu_per_round * 1e3), f"{cpu_per_round / 5.0 * 100:.2f} %", fmt(period * 1e3),
            ]
        )
    unsettled = [row[0] for row in growth_rows if float(row[4].replace(",", "")) > UNSETTLED]
    verdict = (
        f"Not flat yet at this length for {' and '.join(f'{g} guard' + 's' * (g > 1) for g in unsettled)}: more than "
        f"{UNSETTLED} KiB per 100 rounds after warming. Raise PLAN in bench/memory.py to see whether it settles."
        if unsettled
        else f"Flat after warming: under {UNSETTLED} KiB per 100 rounds for every size."
    )
    return "\n\n".join(
        [
            f"`python -m spotguard run --config <generated>` against the world's moto, poll_interval "
            f"{POLL_INTERVAL:g} s, rounds counted by moto. MiB = 1,048,576 bytes; VmHWM is the peak so far.",
            "Where it goes, before any round (one short-lived process, stage by stage):",
            table(["stage", "VmRSS MiB", "RssAnon MiB"], stages, align="l"),
            "The daemon, as it runs:",
            table(["process", "after round", "VmRSS MiB", "RssAnon MiB", "VmHWM MiB"], rows, align="l"),
            f"Growth while warming up (round 1 to {WARM}: connections, botocore's per-shape caches) and after "
            "it, and the cost per round after it (whole process, logging included). \"vCPU at 5 s\" is that "
            "CPU per round spread over the default poll_interval, on this machine's CPU.",
            table(
                [
                    "guards", "VmRSS growth KiB, warming", "rounds", "VmRSS growth KiB", "KiB per 100 rounds",
                    "CPU ms/round", "vCPU at 5 s", "round period ms",
                ],
                growth_rows,
            ),
            verdict,
        ]
    )
