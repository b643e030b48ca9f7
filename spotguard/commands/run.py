"""`spotguard run`: check the config, then hand it to the daemon.

It must not start or import the daemon before the config is known to be good.
"""

from __future__ import annotations

import argparse

from spotguard.commands.common import EXIT_CONFIG, add_config_argument, load_or_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)


def run(args: argparse.Namespace) -> int:
    settings = load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    from spotguard import daemon  # lazily: a bad config must not pay for (or depend on) the daemon

    return daemon.run(settings)
