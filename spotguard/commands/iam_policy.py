"""`spotguard iam-policy`: print the least-privilege policy (spotguard/iam.py) for a config as JSON.

It must not talk to AWS: the policy is derived from the config alone.
"""

from __future__ import annotations

import argparse
import json
import sys

from spotguard import iam
from spotguard.commands.common import EXIT_CONFIG, EXIT_OK, add_config_argument, load_or_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--agent", action="store_true",
        help="the agent's policy instead (sqs:SendMessage on the [sources.sqs] queue only)",
    )
    which.add_argument(
        "--setup", action="store_true",
        help="what `spotguard setup` needs instead (create the queue, its policy, the rules, the [ha] table)",
    )


def run(args: argparse.Namespace) -> int:
    """The policy as JSON on stdout; exit 2 on a bad config or one no policy can be written for."""
    settings = load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    try:
        if args.agent:
            policy = iam.agent_policy(settings)
        elif getattr(args, "setup", False):
            policy = iam.setup_policy(settings)
        else:
            policy = iam.daemon_policy(settings)
    except iam.IamError as exc:
        print(f"spotguard iam-policy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(policy, indent=2))
    return EXIT_OK
