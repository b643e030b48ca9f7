"""`spotguard simulate`: replay real spot traces through the machine, with the user's numbers.

It prints a table (or JSON) of what spotguard, no standby, and On-Demand alone
would have cost and how long the service would have been down; the work is in
spotguard.sim.playback. It must not touch AWS or the network; `--plot` imports the
plotting module only when asked.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from spotguard import traces
from spotguard.commands.common import EXIT_CONFIG, load_or_report, positive_number
from spotguard.config import format_duration
from spotguard.sim.playback import POLICIES, Numbers, Replay, margin_summary, replay


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_argument_group("traces")
    which.add_argument("--trace", default=None, metavar="NAME",
                       help="a shipped trace (e.g. preemption/p3.2xlarge/us-east-1c), `all` (the default "
                            "without --trace-file), or `list`")
    which.add_argument("--trace-file", type=Path, metavar="PATH",
                       help="your own trace: JSON {\"metadata\": {\"gap_seconds\": G}, \"data\": [1, 1, 0, ...]}")
    yours = parser.add_argument_group("your numbers (seconds; defaults: AWS's target group defaults, a 60 s "
                                      "model load)")
    for flag, kind, what in NUMBER_FLAGS:
        yours.add_argument(flag, type=kind, metavar="N", help=what)
    yours.add_argument("--on-rebalance", choices=("ignore", "prewarm"), help="the guard's on_rebalance")
    yours.add_argument("--register-when", choices=("ready", "running"), help="the guard's register_when")
    yours.add_argument("--detect", choices=("events", "poll"),
                       help="how the notice reaches spotguard: events (SQS or the agent, ~1 s; the default) "
                            "or poll (the poll alone)")
    yours.add_argument("--config", metavar="PATH",
                       help="take the guard's settings and prices from this config (flags still win)")
    yours.add_argument("--guard", metavar="NAME", help="which guard of --config (default: the first)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print JSON for machines instead of the table")
    out.add_argument("--plot", type=Path, metavar="FILE.svg",
                     help="draw each trace's timeline and cumulative cost (one trace: FILE; several: FILE-N.svg)")


# (flag, type, help); each sets the Numbers field of the same name.
def _whole(text: str) -> int:
    value = positive_number(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of seconds")
    return int(value)


def _price(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a price") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a price in USD per hour, 0 or more")
    return value


NUMBER_FLAGS = (
    ("--boot", _whole, "StartInstances → running (default 20)"),
    ("--warm-up", _whole, "running → the service answers its health check: the model load (default 60)"),
    ("--health-interval", _whole, "HealthCheckIntervalSeconds (default 30)"),
    ("--healthy-threshold", _whole, "HealthyThresholdCount (default 5)"),
    ("--unhealthy-threshold", _whole, "UnhealthyThresholdCount (default 2)"),
    ("--deregistration-delay", _whole, "deregistration_delay.timeout_seconds (default 300)"),
    ("--poll-interval", positive_number, "the daemon's poll_interval (default 5)"),
    ("--failback-grace", positive_number, "the guard's failback_grace (default 600)"),
    ("--standby-ready-timeout", positive_number, "the guard's standby_ready_timeout (default 300)"),
    ("--rebalance-hold", positive_number, "the guard's rebalance_hold (default 1800)"),
    ("--rebalance-lead", _whole,
     "with prewarm: a rebalance recommendation this long before each notice (default: none; the traces have none)"),
    ("--on-demand-hourly", _price, "the standby's On-Demand price, USD per hour"),
    ("--spot-hourly", _price, "the spot price, USD per hour"),
)


def numbers_of(args: argparse.Namespace) -> Numbers | None:
    """The Numbers: defaults, then the config's guard, then the flags; None after saying what is wrong."""
    numbers = Numbers()
    if args.config:
        settings = load_or_report(args.config)
        if settings is None:
            return None
        guards = {g.name: g for g in settings.guards}
        guard = guards.get(args.guard) if args.guard else settings.guards[0] if settings.guards else None
        if guard is None:
            print(f"spotguard simulate: no guard {args.guard!r} in {args.config} (guards: {', '.join(guards)})",
                  file=sys.stderr)
            return None
        numbers = replace(numbers, poll_interval=settings.daemon.poll_interval, **{
            name: getattr(guard, name) for name in ("failback_grace", "standby_ready_timeout", "on_rebalance",
                                                    "rebalance_hold", "register_when", "on_demand_hourly",
                                                    "spot_hourly")})
    elif args.guard:
        print("spotguard simulate: --guard needs --config", file=sys.stderr)
        return None
    names = [flag[2:].replace("-", "_") for flag, _, _ in NUMBER_FLAGS] + ["on_rebalance", "register_when", "detect"]
    return replace(numbers, **{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})


def chosen(args: argparse.Namespace) -> list[traces.Trace] | None:
    """The traces to replay; None after one line on stderr."""
    shipped = traces.shipped()
    picked: list[traces.Trace] = []
    if args.trace_file is not None:
        try:
            picked.append(traces.load_file(args.trace_file))
        except traces.TraceError as exc:
            print(f"spotguard simulate: {exc}", file=sys.stderr)
            return None
    if args.trace == "all" or (args.trace is None and args.trace_file is None):
        picked += shipped.values()
    elif args.trace is not None:
        if args.trace not in shipped:
            print(f"spotguard simulate: no shipped trace {args.trace!r} (spotguard simulate --trace list)",
                  file=sys.stderr)
            return None
        picked.append(shipped[args.trace])
    return picked


def run(args: argparse.Namespace) -> int:
    if args.trace == "list":
        for name, trace in traces.shipped().items():
            print(f"{name:<40} {trace.hours:6.0f} h  {len(trace.interruptions()):4d} interruptions")
        return 0
    if args.plot is not None and args.plot.suffix.lower() != ".svg":
        print(f"spotguard simulate: --plot writes SVG; name the file .svg, not {args.plot.name}", file=sys.stderr)
        return EXIT_CONFIG
    numbers = numbers_of(args)
    picked = chosen(args)
    if numbers is None or picked is None:
        return EXIT_CONFIG
    cache: dict = {}
    try:
        results = [replay(trace, numbers, cache) for trace in picked]
    except traces.TraceError as exc:
        print(f"spotguard simulate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.plot is not None:
        from spotguard.sim import plot  # only when asked: `spotguard run` never loads it

        for path, trace, result in zip(plot.paths(args.plot, len(picked)), picked, results):
            plot.write(path, trace, result, numbers)
    print(json.dumps(as_json(results, numbers), indent=2) if args.json else "\n".join(table(results, numbers)))
    return 0


# --------------------------------------------------------------------------- output


def as_json(results: list[Replay], numbers: Numbers) -> dict:
    out = []
    for r in results:
        policies = {}
        for name in POLICIES:
            o = r.policies[name]
            entry = {"spot_hours": round(o.spot_seconds / 3600, 3),
                     "on_demand_hours": round(o.on_demand_seconds / 3600, 3),
                     "outage_seconds": round(o.outage_seconds),
                     "cost_per_month": None if o.cost_per_month is None else round(o.cost_per_month, 2)}
            if name == "spotguard":
                entry["ready_margin_seconds"] = margin_summary(o.margins)
            policies[name] = entry
        out.append({"trace": r.trace, "hours": round(r.hours, 2), "interruptions": r.interruptions,
                    "policies": policies})
    return {"numbers": asdict(numbers), "source": traces.SOURCE, "traces": out}


def table(results: list[Replay], numbers: Numbers) -> list[str]:
    n = numbers
    lines = [
        f"boot {n.boot}s, warm-up {n.warm_up}s, health check every {n.health_interval}s "
        f"({n.healthy_threshold} healthy / {n.unhealthy_threshold} unhealthy), deregistration delay "
        f"{n.deregistration_delay}s; register_when {n.register_when}, failback_grace "
        f"{format_duration(n.failback_grace)}, poll {format_duration(n.poll_interval)}, notices by {n.detect}",
        "",
        f"{'trace':<38} {'hours':>6} {'interr.':>7}  {'standby':>7} {'outage':>7} {'margin':>11}  "
        f"{'outage alone':>12}  {'$/mo guard':>10} {'$/mo alone':>10} {'$/mo OD':>9}",
    ]
    for r in results:
        sg, ns, od = (r.policies[p] for p in POLICIES)
        m = margin_summary(sg.margins)
        margin = "-" if m["min"] is None else f"{m['min']:.0f}/{m['median']:.0f}s"
        lines.append(
            f"{r.trace:<38} {r.hours:6.0f} {r.interruptions:7d}  {_share(sg.on_demand_seconds, r.seconds):>7} "
            f"{_dur(sg.outage_seconds):>7} {margin:>11}  {_dur(ns.outage_seconds):>12}  "
            f"{_usd(sg.cost_per_month):>10} {_usd(ns.cost_per_month):>10} {_usd(od.cost_per_month):>9}")
    lines += [
        "",
        "standby: its share of the hours (On-Demand); outage: time without a healthy target; margin: the standby "
        "healthy before the spot was reclaimed, min/median (negative: late); alone: no standby, a new spot only "
        "when capacity returns; $/mo: per 730-hour month, with spotguard, alone, and On-Demand (OD) only.",
    ]
    if n.on_demand_hourly is None or n.spot_hourly is None:
        lines.append("Costs need --on-demand-hourly and --spot-hourly (or prices in the guard of --config).")
    lines.append(f"Traces: {traces.SOURCE}.")
    return lines


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _dur(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f}h"
    return format_duration(round(seconds)) if seconds else "0s"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.0f}"
