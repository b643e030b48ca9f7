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
        help="requests per second sent through the load balancer",
    )


def run(args: argparse.Namespace) -> int:
    try:
        from spotguard.lab.demo import demo as play  # lazily: moto is the optional `lab` extra
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("moto", "werkzeug", "flask"):
            print(f"spotguard demo needs the lab extra ({exc.name} is missing): pip install 'spotguard[lab]', "
                  "or in a checkout pip install -e '.[lab]' (or make demo)", file=sys.stderr)
            return EXIT_CONFIG
        raise
    return play(speed=args.speed, compare=args.compare, rate=args.rate)
