"""The `spotguard` command line: parses arguments and hands off to the part that does the work.

Each subcommand is one entry of SUBCOMMANDS (name → how to add its arguments
and the function that runs it, returning the exit code), so a new one slots in
without touching main(). Exit codes: 0 fine, 2 bad usage or bad config (argparse
uses 2 as well), anything else is the subcommand's own answer.

This module must not hold any logic of its own beyond wiring and printing: the
config rules live in config.py, the daemon in daemon.py (imported only when
`run` needs it, so `check-config` stays light and never starts anything), the
lab in spotguard/lab (imported only by `demo`: it needs moto, an optional extra).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from spotguard import __version__
from spotguard.config import ConfigError, GuardSettings, Settings, format_duration, load

EXIT_CONFIG = 2


@dataclass(frozen=True)
class Subcommand:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="PATH", help="the TOML config file")


def _load_or_report(path: str) -> Settings | None:
    """The settings, or None after printing each problem on its own line to stderr."""
    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def describe_guard(guard: GuardSettings) -> str:
    """One line summing up a guard, for people checking their config."""
    target_group = guard.target_group_arn.rsplit(":", 1)[-1]
    port = f"port {guard.target_port}" if guard.target_port else "port from target group"
    if guard.spot_request_ids:
        spot = "spot requests " + ", ".join(guard.spot_request_ids)
    else:
        spot = "spot tags " + ", ".join(f"{k}={v!r}" for k, v in guard.spot_instance_tags)
    rebalance = f"on_rebalance {guard.on_rebalance}"
    if guard.on_rebalance == "prewarm":
        rebalance += f" (hold {format_duration(guard.rebalance_hold)})"
    return (
        f"guard {guard.name}: {target_group} ({port}); {spot}; "
        f"standbys {', '.join(guard.standby_instance_ids)}; "
        f"failback_grace {format_duration(guard.failback_grace)}, "
        f"standby_ready_timeout {format_duration(guard.standby_ready_timeout)}, "
        f"unhealthy_grace {format_duration(guard.unhealthy_grace)}, {rebalance}"
    )


def check_config(args: argparse.Namespace) -> int:
    settings = _load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    print(f"config OK: {len(settings.guards)} guard(s)")
    for guard in settings.guards:
        print(describe_guard(guard))
    return 0


def run(args: argparse.Namespace) -> int:
    settings = _load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    from spotguard import daemon  # lazily: check-config must not pay for (or depend on) the daemon

    return daemon.run(settings)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speed", type=_positive, default=25.0, metavar="X",
        help="run scenario time X times faster than the wall clock (default 25: a full cycle in under a minute)",
    )
    parser.add_argument(
        "--compare", action="store_true", help="also play the same interruption without a standby, side by side"
    )
    parser.add_argument(
        "--rate", type=_positive, default=50.0, metavar="N", help="requests per second sent through the load balancer"
    )


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def demo(args: argparse.Namespace) -> int:
    try:
        from spotguard.lab.demo import demo as play  # lazily: moto is the optional `lab` extra
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("moto", "werkzeug", "flask"):
            print(f"spotguard demo needs the lab extra ({exc.name} is missing): pip install 'spotguard[lab]'",
                  file=sys.stderr)
            return EXIT_CONFIG
        raise
    return play(speed=args.speed, compare=args.compare, rate=args.rate)


def _agent_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue-url", required=True, type=_url, metavar="URL",
                        help="the SQS queue the daemon reads (its [sources.sqs] queue_url)")
    parser.add_argument("--imds-url", type=_url, default="http://169.254.169.254", metavar="URL",
                        help="the instance metadata service (default http://169.254.169.254)")
    parser.add_argument("--interval", type=_positive, default=1.0, metavar="SECONDS",
                        help="seconds between metadata reads (default 1)")


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL")
    return text


def agent(args: argparse.Namespace) -> int:
    import os

    from spotguard import agent as forwarder  # lazily: only the spot host runs it

    region = forwarder.region_from_env(dict(os.environ))
    if region is None:
        print("spotguard agent: no region: set AWS_REGION (or AWS_DEFAULT_REGION)", file=sys.stderr)
        return EXIT_CONFIG
    return forwarder.main(args.queue_url, args.imds_url, args.interval, region)


def _setup_arguments(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("--dry-run", action="store_true", help="say what would be created or updated; change nothing")


def setup(args: argparse.Namespace) -> int:
    from spotguard import setup as sqs_setup  # lazily: check-config must not pay for aiobotocore

    return sqs_setup.main(args)


def _iam_arguments(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument(
        "--agent", action="store_true", help="the agent's policy instead (sqs:SendMessage on the [sources.sqs] queue only)"
    )


def iam_policy(args: argparse.Namespace) -> int:
    from spotguard import iam  # lazily, like the other handlers

    return iam.main(args)


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the stable JSON document (docs/status-json.md)")


def status(args: argparse.Namespace) -> int:
    from spotguard import status as report  # lazily, like the other handlers

    return report.main(args)


def check(args: argparse.Namespace) -> int:
    from spotguard import check as checklist  # lazily: it needs aiobotocore

    return checklist.main(args)


def _rehearse_arguments(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("--guard", required=True, metavar="NAME", help="the guard to rehearse")


def rehearse(args: argparse.Namespace) -> int:
    from spotguard import rehearse as rehearsal  # lazily: it needs aiobotocore

    return rehearsal.main(args)


SUBCOMMANDS: dict[str, Subcommand] = {
    "check-config": Subcommand("check the config file and sum up its guards", _config_argument, check_config),
    "run": Subcommand("run the daemon (the config is checked first; nothing starts if it is wrong)", _config_argument, run),
    "status": Subcommand(
        "show each guard's phase, instances, last transitions and this month's standby hours and cost",
        _status_arguments,
        status,
    ),
    "check": Subcommand(
        "check the deployment in AWS is ready for an interruption: one line per check, exit 1 on any ✗",
        _config_argument,
        check,
    ),
    "rehearse": Subcommand(
        "start a guard's first standby, time it to healthy in the target group, then drain and stop it again",
        _rehearse_arguments,
        rehearse,
    ),
    "demo": Subcommand(
        "watch spotguard keep a service up through a spot interruption on an embedded AWS (needs spotguard[lab])",
        _demo_arguments,
        demo,
    ),
    "setup": Subcommand(
        "create the SQS queue, its policy and the EventBridge rules feeding it (idempotent; --dry-run changes nothing)",
        _setup_arguments,
        setup,
    ),
    "iam-policy": Subcommand(
        "print the least-privilege IAM policy (JSON) for the daemon, or with --agent for the agent",
        _iam_arguments,
        iam_policy,
    ),
    "agent": Subcommand(
        "on the spot instance: forward its IMDS interruption and rebalance notices to the SQS queue",
        _agent_arguments,
        agent,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotguard",
        description="Keeps a service on EC2 Spot available through interruptions with a stopped On-Demand standby.",
    )
    parser.add_argument("--version", action="version", version=f"spotguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, sub in SUBCOMMANDS.items():
        sub.arguments(commands.add_parser(name, help=sub.help, description=sub.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return SUBCOMMANDS[args.command].handler(args)
