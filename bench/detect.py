"""`make bench-detect`: notice appears → StartInstances issued, per detection path.

Each trial starts a fresh daemon exactly as `spotguard run` wires it
(`spotguard.daemon.build` + `serve`, which also runs the SQS source when
`[sources.sqs]` is set) on aiobotocore clients pointed at moto in server mode,
in a child process (bench/world_server.py). Paths, interleaved trial by trial so
they share the same stretch of machine noise:

  * sqs:   EC2 flips the spot request's status and, at that moment, an
           EventBridge-shaped `EC2 Spot Instance Interruption Warning` is put on
           the daemon's queue. poll_interval is 30 s, so only SQS can act. The
           clock starts when moto's status has flipped, before the send.
  * agent: `spotguard.agent.Agent` (interval 1 s) polls a real IMDSv2 server
           (spotguard.lab.imds) for the spot instance and sends to the same
           kind of queue; the clock starts when the interruption is set on
           IMDS. poll_interval is 30 s. Agent and daemon share this process's
           event loop here; on AWS they run on different hosts.
  * poll:  only the spot request's status flips; poll_interval is 1 s and there
           is no SQS source. The clock starts when moto's status has flipped.

Every notice lands at a uniformly random moment after the daemon's first round
(0–1 s), so poll and agent figures include the wait for the next tick. The
clock stops when moto's EC2 backend receives StartInstances (recorded in the
world's process; CLOCK_MONOTONIC is shared by processes on Linux).

The result goes to docs/benchmarks.md between BEGIN and END markers, replacing
only that block (bench/run.py keeps the block when it rewrites the file).
This module must not wrap or patch anything of spotguard's.

Usage: .venv/bin/python bench/detect.py [--trials N] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remote import RemoteWorld, start_time, until, use_dummy_credentials

use_dummy_credentials()  # before any botocore import reads the environment

import boto3  # noqa: E402
import configs  # noqa: E402
from aiobotocore.session import get_session  # noqa: E402
from run import loadavg, shown  # noqa: E402
from stats import fmt, percentile, table  # noqa: E402

from spotguard import config, logs  # noqa: E402
from spotguard.aws import clients  # noqa: E402
from spotguard.daemon import build, serve  # noqa: E402
from spotguard.machine import Phase  # noqa: E402
from spotguard.notify import Notifier  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench-detect:start -->"
END = "<!-- bench-detect:end -->"

TRIALS = 30
DEADLINE = 15.0
AGENT_INTERVAL = 1.0
POLL_INTERVAL = 1.0
QUIET_POLL = 30.0  # sqs and agent paths: the poll must not be what acts
SLACK = 0.5  # the goals: p99 <= (tick) + 0.5 s
PATHS = ("sqs", "agent", "poll")


@dataclass(frozen=True)
class Goal:
    tick: float  # the path's own interval (0 for SQS, which has none)
    about: str

    @property
    def limit(self) -> float:
        return self.tick + SLACK


GOALS = {
    "sqs": Goal(0.0, "p99 <= 0.5 s"),
    "agent": Goal(AGENT_INTERVAL, "p99 <= interval + 0.5 s"),
    "poll": Goal(POLL_INTERVAL, "p99 <= poll_interval + 0.5 s"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=TRIALS, help=f"trials per path (default {TRIALS})")
    parser.add_argument("--quick", action="store_true", help="3 trials per path; writes nothing unless --out")
    parser.add_argument("--out", type=Path, help="the document to update (default docs/benchmarks.md)")
    args = parser.parse_args(argv)
    trials = 3 if args.quick else args.trials
    out = args.out or (None if args.quick else DEFAULT_OUT)

    agent, missing = _agent_class()
    began, started_at, load = time.monotonic(), dt.datetime.now(dt.timezone.utc), loadavg()
    with tempfile.TemporaryDirectory(prefix="spotguard-detect-") as tmp, RemoteWorld() as world:
        workdir = Path(tmp)
        with open(workdir / "daemon.log", "w") as log_stream:
            logs.configure("json", log_stream)  # production logging, kept off the figures
            results = asyncio.run(_measure(world, workdir, trials, agent))
    elapsed = time.monotonic() - began
    block = _block(results, missing, trials, started_at, elapsed, load, args.quick)
    print(block)
    if out is not None:
        old = out.read_text() if out.exists() else ""
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(splice(old, block))
        print(f"wrote {shown(out)} ({elapsed:.0f} s)", file=sys.stderr)
    return 0


def _agent_class() -> tuple[Any, str | None]:
    """spotguard.agent.Agent, or None and why it cannot be measured."""
    try:
        from spotguard.agent import Agent
    except Exception as exc:  # noqa: BLE001 - any import failure: the row says so, nothing is faked
        return None, f"{type(exc).__name__}: {exc}"
    return Agent, None


# ---------------------------------------------------------------------- measuring


async def _measure(world: RemoteWorld, workdir: Path, trials: int, agent: Any) -> dict[str, list[float]]:
    world.call("reset")
    deployment = world.call("provision", name="detect", standbys=1)
    sqs = boto3.client("sqs", region_name=world.region, endpoint_url=world.endpoint_url)
    paths = [p for p in PATHS if p != "agent" or agent is not None]
    results: dict[str, list[float]] = {p: [] for p in paths}
    rng = random.Random(3)  # the same offsets every run
    async with clients(world.region, world.endpoint_url, session=get_session()) as aws:
        for i in range(trials):
            for path in paths:
                latency = await _trial(world, aws, sqs, workdir, path, deployment, agent, rng.uniform(0.0, 1.0))
                results[path].append(latency)
                world.call("restore", deployment=deployment)
                print(f"{path:5} {i + 1:2}/{trials}: {latency * 1e3:7.1f} ms", file=sys.stderr, flush=True)
    return results


async def _trial(
    world: Any, aws: Any, sqs: Any, workdir: Path, path: str, d: dict, agent_class: Any, offset: float
) -> float:
    """One notice through a fresh daemon; seconds from notice to StartInstances in moto."""
    run_dir = workdir / f"{path}-{time.monotonic_ns()}"
    run_dir.mkdir()
    # A queue per trial: a long poll abandoned by the last trial's daemon may still
    # be waiting inside moto and would swallow this trial's message.
    queue_url = None if path == "poll" else sqs.create_queue(QueueName=run_dir.name)["QueueUrl"]
    settings = _settings(run_dir, world, d, path, queue_url)
    notifier = Notifier(None)
    await notifier.start()
    daemon = build(settings, aws, notifier)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(serve(daemon, settings, aws, stop))]
    imds = None
    try:
        if path == "agent":
            imds = await _imds(d["spot_instance_id"])
            agent = agent_class(imds.url, aws.sqs, queue_url, interval=AGENT_INTERVAL)
            tasks.append(asyncio.create_task(agent.run(stop)))
            # Steady state first: the agent has its token and its instance id.
            await until(lambda: agent.instance_id is not None or tasks[-1].done(), "agent ready")
        await until(lambda: daemon.rounds >= 1 or any(t.done() for t in tasks), "first round")
        await asyncio.sleep(offset)  # the notice lands anywhere in the interval
        seen = await asyncio.to_thread(world.call, "starts")
        began = await _notice(world, sqs, path, d, queue_url, imds)
        at = await start_time(world, seen, d["standby_ids"][0], path, DEADLINE)
        guard = daemon.guards[d["name"]]
        await until(lambda: guard.state.phase is not Phase.SPOT_HEALTHY, "failover phase")
        return at - began
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=DEADLINE)
        await notifier.close()
        if imds is not None:
            await imds.close()
        if queue_url is not None:
            sqs.delete_queue(QueueUrl=queue_url)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception():
                raise task.exception()


def _settings(run_dir: Path, world: Any, d: dict, path: str, queue_url: str | None) -> Any:
    interval = POLL_INTERVAL if path == "poll" else QUIET_POLL
    file = configs.write(run_dir / "config.toml", world, [d], state_dir=run_dir / "state", poll_interval=interval)
    if queue_url is not None:
        with open(file, "a") as f:
            f.write(f"\n[sources.sqs]\nqueue_url = {json.dumps(queue_url)}\n")
    return config.load(file)


async def _imds(instance_id: str) -> Any:
    from spotguard.lab.imds import InstanceMetadata

    imds = InstanceMetadata(instance_id)
    await imds.start()
    return imds


async def _notice(world: Any, sqs: Any, path: str, d: dict, queue_url: str | None, imds: Any) -> float:
    """Make the notice appear on the path's channel; the monotonic moment it did."""
    if path == "agent":
        began = time.monotonic()
        imds.set_interruption(dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=2))
        await asyncio.to_thread(world.call, "notice", request_id=d["spot_request_id"])
        return began
    flipped = await asyncio.to_thread(world.call, "notice", request_id=d["spot_request_id"])
    if path == "sqs":
        body = json.dumps(_warning(d["spot_instance_id"]))
        await asyncio.to_thread(sqs.send_message, QueueUrl=queue_url, MessageBody=body)
    return flipped


def _warning(instance_id: str) -> dict:
    """What the EventBridge rule for EC2 interruption warnings puts on the queue."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "EC2 Spot Instance Interruption Warning",
        "source": "aws.ec2",
        "account": "123456789012",
        "time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": "us-east-1",
        "resources": [f"arn:aws:ec2:us-east-1:123456789012:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "instance-action": "terminate"},
    }


# ---------------------------------------------------------------------- reporting


def splice(document: str, block: str, begin: str = BEGIN, end_marker: str = END) -> str:
    """`document` with its begin…end block replaced by `block` (appended when it has none)."""
    start, end = document.find(begin), document.find(end_marker)
    if start != -1 and end > start:
        return document[:start] + block + document[end + len(end_marker):]
    return (document.rstrip("\n") + "\n\n" if document.strip() else "") + block + "\n"


def _block(
    results: dict[str, list[float]], missing: str | None, trials: int,
    started_at: dt.datetime, elapsed: float, load: str, quick: bool,
) -> str:
    rows = []
    for path in PATHS:
        goal = GOALS[path]
        tick = {"sqs": "SQS long poll; poll_interval 30 s", "agent": "agent interval 1 s; poll_interval 30 s",
                "poll": "poll_interval 1 s; no SQS"}[path]
        if path not in results:
            rows.append([path, tick, "—", "—", "—", 0, goal.about, f"not measured: agent not available ({missing})"])
            continue
        xs = sorted(results[path])
        p50, p99 = percentile(xs, 0.5), percentile(xs, 0.99)
        met = "met" if p99 <= goal.limit else "**not met**"
        rows.append([path, tick, fmt(p50 * 1e3), fmt(p99 * 1e3), fmt(xs[-1] * 1e3), len(xs),
                     f"{goal.about} ({fmt(goal.limit * 1e3)} ms)", met])
    command = shlex.join([shown(Path(sys.executable)), *sys.argv])
    # With no arguments this is exactly what the Makefile target runs.
    made = f"`make bench-detect` (runs `{command}`)" if len(sys.argv) == 1 else f"`{command}`"
    return "\n\n".join([
        BEGIN,
        "<!-- Generated by `make bench-detect` (bench/detect.py); `make bench` keeps this block. -->",
        "## Detection paths: notice appears → StartInstances",
        "From the moment a notice appears on a path's channel to moto's EC2 backend receiving "
        "StartInstances for the standby, through the whole daemon (`spotguard.daemon.build` + `serve`, "
        "a fresh daemon per trial, moto in server mode in its own process). **sqs**: the spot request's "
        "status flips and an EventBridge-shaped interruption warning goes on the queue at once; the clock "
        "starts at the flip. **agent**: `spotguard.agent.Agent` polls a real local IMDSv2 server and sends "
        "to SQS; the clock starts when the interruption is set on IMDS (agent and daemon share one event "
        "loop here). **poll**: only the status flips; poll_interval is 1 s for this row. Notices land at a "
        "uniformly random moment 0–1 s after the daemon's first round; paths are interleaved trial by "
        f"trial. p99 of {trials} trials is interpolated between the two largest values (numpy's default), so it "
        "is close to the max. Loopback moto, not AWS: in-region calls add tens of ms each.",
        table(["path", "intervals", "p50 ms", "p99 ms", "max ms", "trials", "goal", "goal met"], rows, align="ll"),
        f"Command: {made}" + (" (quick)" if quick else "")
        + f"; {started_at:%Y-%m-%d %H:%M UTC}; {trials} trials per path; run time {elapsed:.0f} s; "
        f"nproc {os.cpu_count()}; load average at start {load}.",
        END,
    ])


if __name__ == "__main__":
    raise SystemExit(main())
