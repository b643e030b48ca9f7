"""`spotguard demo`: play a spot interruption in the lab (spotguard/lab) and show the timeline.

It must not need the lab's extra (moto) before the verb runs: it says how to install it instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys

from spotguard.commands.common import EXIT_CONFIG, positive_number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speed", type=positive_number, default=25.0, metavar="X",
        help="run scenario time X times faster than the wall clock (default 25: a full cycle in under a minute)",
    )
    parser.add_argument(
        "--compare", action="store_true", help="also play the same interruption without a standby, side by side"
    )
    parser.add_argument(
        "--rate", type=positive_number, default=50.0, metavar="N",
        help="requests per second sent through the load balancer (fleet: at most, by closed-loop clients)",
    )
    parser.add_argument("--scenario", default="interruption", metavar="NAME",
                        help="what to play: interruption (default), no-capacity, slow-standby, double, "
                             "rebalance-prewarm, fleet; `--scenario list` says what each shows")
    knobs = parser.add_argument_group("your numbers (scenario seconds; defaults: the demo's quick target group)")
    for flag, kind, what in KNOBS:
        knobs.add_argument(flag, type=kind, metavar="N", help=what)
    knobs.add_argument("--register-when", choices=("ready", "running"),
                       help="spotguard's register_when (default ready)")


# (flag, type, help); each sets the Scenario field of the same name.
KNOBS = (
    ("--boot", positive_number, "StartInstances → running (default 20)"),
    ("--warm-up", positive_number, "running → the service passes its health check: the model load (default 40)"),
    ("--health-interval", positive_number, "the target group's HealthCheckIntervalSeconds (default 5; AWS: 30)"),
    ("--health-timeout", positive_number, "HealthCheckTimeoutSeconds (default 4; AWS: 5)"),
    ("--healthy-threshold", int, "HealthyThresholdCount (default 2; AWS: 5)"),
    ("--unhealthy-threshold", int, "UnhealthyThresholdCount (default 2; AWS: 2)"),
    ("--deregistration-delay", positive_number, "deregistration_delay.timeout_seconds (default 60; AWS: 300)"),
)


def scenario_changes(args: argparse.Namespace) -> dict:
    """The Scenario fields the command line sets."""
    names = [flag[2:].replace("-", "_") for flag, _, _ in KNOBS] + ["register_when"]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def run(args: argparse.Namespace) -> int:
    try:
        from spotguard.lab.demo import demo as play  # lazily: moto is the optional `lab` extra
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("moto", "werkzeug", "flask"):
            print(f"spotguard demo needs the lab extra ({exc.name} is missing): pip install 'spotguard[lab]', "
                  "or in a checkout pip install -e '.[lab]' (or make demo)", file=sys.stderr)
            return EXIT_CONFIG
        raise
    from spotguard.lab.scenario import SCENARIOS

    if args.scenario == "list":
        for name, named in SCENARIOS.items():
            print(f"{name:<14} {named.what}")
        return 0
    if args.scenario not in SCENARIOS:
        print(f"spotguard demo: no scenario {args.scenario!r} (one of {', '.join(SCENARIOS)}, or list)",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        return play(speed=args.speed, compare=args.compare, rate=args.rate, scenario=args.scenario,
                    **scenario_changes(args))
    except ValueError as exc:  # a scenario ELBv2 would refuse (timeout not under the interval, ...)
        print(f"spotguard demo: {exc}", file=sys.stderr)
        return EXIT_CONFIG
