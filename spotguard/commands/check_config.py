"""`spotguard check-config`: load the config and sum up each guard in one line.

It must not talk to AWS or import anything beyond config.py: it runs before anything is set up.
"""

from __future__ import annotations

import argparse

from spotguard.commands.common import EXIT_CONFIG, EXIT_OK, add_config_argument, load_or_report
from spotguard.config import GuardSettings, format_duration


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)


def run(args: argparse.Namespace) -> int:
    settings = load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    print(f"config OK: {len(settings.guards)} guard(s)")
    for guard in settings.guards:
        print(describe_guard(guard))
    return EXIT_OK


def describe_guard(guard: GuardSettings) -> str:
    """One line summing up a guard, for people checking their config."""
    target_group = guard.target_group_arn.rsplit(":", 1)[-1]
    port = f"port {guard.target_port}" if guard.target_port else "port from target group"
    if guard.spot_request_ids:
        spot = "spot requests " + ", ".join(guard.spot_request_ids)
    else:
        spot = "spot tags " + ", ".join(f"{k}={v!r}" for k, v in guard.spot_instance_tags)
    capacity = guard.rules().capacity
    spot += f" (capacity {capacity})" if capacity is not None else " (capacity: the tagged spots first seen)"
    rebalance = f"on_rebalance {guard.on_rebalance}"
    if guard.on_rebalance == "prewarm":
        rebalance += f" (hold {format_duration(guard.rebalance_hold)})"
    return (
        f"guard {guard.name}: {target_group} ({port}); {spot}; "
        f"standbys {', '.join(guard.standby_instance_ids)}; "
        f"failback_grace {format_duration(guard.failback_grace)}, "
        f"standby_ready_timeout {format_duration(guard.standby_ready_timeout)}, "
        f"unhealthy_grace {format_duration(guard.unhealthy_grace)}, {rebalance}, register_when {guard.register_when}"
    )
