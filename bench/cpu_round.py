"""Benchmark: where a poll round's CPU goes, and what the alternatives would cost.

A steady poll round of 20 guards is one DescribeSpotInstanceRequests, one
DescribeInstances (20 spots + 20 standbys) and 20 DescribeTargetHealth. Two
measurements on the same moto world, in this process (moto is elsewhere):

  * profile: `Poller.observe()` on `spotguard.aws.clients`, under cProfile
    with a CPU-time timer; each function's own time is put in a bucket by the
    module it lives in (response parsing, timestamps, request building and
    signing, HTTP, spotguard, the event loop). cProfile inflates pure-Python
    call overhead, so the shares, not the milliseconds, are the finding.
  * variants: the same calls made directly on aiobotocore clients, variants
    interleaved round by round so they share the machine's noise, CPU time
    per round (the mean of the medians of even and odd rounds). They add
    issue 7's changes one by one, from what the daemon did before it
    (botocore's full EC2 model, dateutil timestamps, its own User-Agent, DescribeTargetHealth
    for every group every round) to what it does now (spotguard.aws's
    timestamp parser, the lean EC2 model of spotguard.ec2model, a fixed
    User-Agent (botocore builds none per request), and a steady
    guard's target health reused for unhealthy_grace / 3, i.e. described every
    2nd round at a 5 s poll and the default 30 s grace).

This module must not change the world: it only describes it.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import statistics
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import configs
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from stats import fmt, table

from spotguard import config

# The variants set up their sessions with spotguard.aws's own helpers, so each is
# exactly what the daemon does, one change at a time.
from spotguard.aws import USER_AGENT, _fast_parsers, _lean_models, client_config, clients
from spotguard.sources.poll import Poller

GUARDS = 20
ROUNDS = 30
PROFILED = 20
POLL_INTERVAL = 5.0

# (bucket, substrings of a profiled function's file path), first match wins.
BUCKETS = (
    ("timestamp parsing (dateutil, spotguard.aws.parse_timestamp)", ("dateutil", "_strptime", "spotguard/aws.py")),
    ("response parsing (botocore.parsers, XML)",
     ("botocore/parsers", "aiobotocore/parsers", "xml/etree", "ElementTree")),
    ("request building and signing (serialize, auth, user agent, endpoints)",
     ("botocore/serialize", "botocore/auth", "botocore/useragent", "botocore/awsrequest", "botocore/signers",
      "aiobotocore/signers", "botocore/regions", "botocore/endpoint_provider", "botocore/validate", "hashlib", "hmac",
      "urllib/parse")),
    ("HTTP (aiohttp, sockets, connections)",
     ("aiohttp", "aiohappyeyeballs", "multidict", "yarl", "socket", "selectors")),
    ("the rest of aiobotocore/botocore (events, retries, client)", ("aiobotocore", "botocore")),
    ("spotguard", ("spotguard",)),
    ("asyncio", ("asyncio",)),
)


async def run(world: Any, workdir: Path, quick: bool = False) -> str:
    rounds = 10 if quick else ROUNDS  # a multiple of PERIOD
    world.call("reset")
    deployments = [world.call("provision", name=f"c{i:02d}", standbys=1) for i in range(GUARDS)]
    path = configs.write(workdir / "cpu.toml", world, deployments, state_dir=workdir / "cpu-state", poll_interval=5)
    guards = config.load(path).guards
    shares, total = await _profile(world, guards, 5 if quick else PROFILED)
    variants = await _variants(world, deployments, rounds)
    return _report(shares, total, variants, rounds)


async def _profile(world: Any, guards: Any, rounds: int) -> tuple[dict[str, float], float]:
    async with clients(world.region, world.endpoint_url, session=get_session()) as aws:
        poller = Poller(aws.ec2, aws.elbv2, guards)
        for _ in range(3):
            await poller.observe()
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        for _ in range(rounds):
            await poller.observe()
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    shares: dict[str, float] = {}
    for (filename, _, _), (_, _, own, _, callers) in stats.items():
        bucket = _bucket(filename)
        if bucket != OTHER or not callers:
            shares[bucket] = shares.get(bucket, 0.0) + own
            continue
        # A builtin or stdlib function (dict.get, isinstance, re): its time goes to its callers' buckets.
        weights = {caller: entry[2] for caller, entry in callers.items()}
        whole = sum(weights.values()) or 1.0
        for (caller_file, _, _), w in weights.items():
            b = _bucket(caller_file)
            shares[b] = shares.get(b, 0.0) + own * w / whole
    total = sum(shares.values())
    return shares, total


def _bucket(filename: str) -> str:
    for name, marks in BUCKETS:
        if any(m in filename for m in marks):
            return name
    return OTHER


OTHER = "other (stdlib called from stdlib, builtins)"


# (name, lean EC2 model, fast timestamps, fixed User-Agent, DescribeTargetHealth every n rounds)
VARIANTS = (
    ("before issue 7: botocore's full EC2 model, timestamp parser and User-Agent, every group every round",
     False, False, False, 1),
    ("+ timestamps by spotguard.aws.parse_timestamp", False, True, False, 1),
    ("+ the lean EC2 model (spotguard.ec2model)", True, True, False, 1),
    ("+ a fixed User-Agent (spotguard.aws.USER_AGENT)", True, True, True, 1),
    ("+ a steady guard's target health reused for unhealthy_grace / 3 (every 2nd round): spotguard now",
     True, True, True, 2),
)
PERIOD = 2  # rounds are judged by residue mod 2, so every-2nd-round variants are not flattered by a median


async def _variants(world: Any, deployments: list, rounds: int) -> dict[str, list[float]]:
    request_ids = [d["spot_request_id"] for d in deployments]
    standby_ids = [s for d in deployments for s in d["standby_ids"]]
    groups = [d["target_group_arn"] for d in deployments]
    out: dict[str, list[float]] = {name: [] for name, *_ in VARIANTS}
    async with AsyncExitStack() as stack:
        made = []
        for name, lean, fast, fixed_agent, health_every in VARIANTS:
            session = get_session()  # its own session: parser defaults and models are per session
            if fast:
                _fast_parsers(session)
            if lean:
                _lean_models(session)
            agent = AioConfig(user_agent=USER_AGENT if fixed_agent else None)  # None: botocore builds its own
            ec2 = await stack.enter_async_context(session.create_client(
                "ec2", region_name=world.region, endpoint_url=world.endpoint_url,
                config=client_config("ec2").merge(agent)))
            elbv2 = await stack.enter_async_context(session.create_client(
                "elbv2", region_name=world.region, endpoint_url=world.endpoint_url,
                config=client_config("elbv2").merge(agent)))
            made.append((name, ec2, elbv2, health_every))
        for i in range(-PERIOD, rounds):  # warm-up rounds first
            for name, ec2, elbv2, every in made:
                began = time.process_time()
                await _round(ec2, elbv2, request_ids, standby_ids, groups if i % every == 0 else [])
                if i >= 0:
                    out[name].append(time.process_time() - began)
    return out


async def _round(ec2: Any, elbv2: Any, request_ids: list, standby_ids: list, groups: list) -> None:
    async def spot_view() -> None:
        reply = await ec2.describe_spot_instance_requests(SpotInstanceRequestIds=request_ids)
        ids = [r["InstanceId"] for r in reply["SpotInstanceRequests"] if r.get("InstanceId")] + standby_ids
        await ec2.describe_instances(InstanceIds=ids)

    await asyncio.gather(spot_view(), *(elbv2.describe_target_health(TargetGroupArn=arn) for arn in groups))


def _per_round(values: list[float]) -> float:
    """Mean of the medians of each residue mod PERIOD: robust to an outlier, fair to every-2nd-round variants."""
    return statistics.fmean(statistics.median(values[k::PERIOD]) for k in range(PERIOD))


def _report(shares: dict[str, float], total: float, variants: dict[str, list[float]], rounds: int) -> str:
    share_rows = [[name, f"{own / total * 100:.0f} %"] for name, own in sorted(shares.items(), key=lambda kv: -kv[1])]
    base = _per_round(variants[VARIANTS[0][0]])
    rows = []
    for name, values in variants.items():
        m = _per_round(values)
        rows.append([name, fmt(m * 1e3), f"{m / base:.2f}×", f"{m / POLL_INTERVAL * 100:.2f} %"])
    return "\n\n".join(
        [
            f"Profile of {PROFILED} `Poller.observe()` rounds of {GUARDS} guards, each describing every target "
            "group (a full round; spotguard.aws's clients, so the lean EC2 model; cProfile, CPU-time timer), "
            "each function's own time by where it lives (a builtin's or stdlib function's time goes to the "
            "module that called it):",
            table(["where", "share of the round's CPU"], share_rows, align="l"),
            f"The same calls made directly on aiobotocore clients, {rounds} rounds per variant, interleaved, "
            f"issue 7's changes added one at a time; CPU per round (the mean of the medians of even and odd "
            f"rounds: in the last variant odd rounds describe no target group) and what it is as a share of "
            f"one core at a {POLL_INTERVAL:g} s poll:",
            table(["variant", "CPU ms per round", "vs before issue 7", "one core at 5 s"], rows, align="l"),
        ]
    )
