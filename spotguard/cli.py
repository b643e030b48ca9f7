"""The `spotguard` command line: builds the parser from the registry of verbs (spotguard/commands) and runs one.

Only the chosen verb's module is imported, so `check-config` and `status`
never pay for the AWS libraries. This module must not hold any logic of a
verb's own: it wires and dispatches, nothing else.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from spotguard import __version__, commands


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, with the arguments of `verb` only (importing its module; None: no verb's)."""
    parser = argparse.ArgumentParser(
        prog="spotguard",
        description="Keeps a service on EC2 Spot available through interruptions with a stopped On-Demand standby.",
    )
    parser.add_argument("--version", action="version", version=f"spotguard {__version__}")
    verbs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, entry in commands.VERBS.items():
        sub = verbs.add_parser(name, help=entry.help, description=entry.help)
        if name == verb:
            commands.load(name).add_arguments(sub)
    return parser


def chosen_verb(argv: Sequence[str]) -> str | None:
    """The verb `argv` names: its first word that is not an option (spotguard's own options take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(chosen_verb(argv)).parse_args(argv)
    return commands.load(args.command).run(args)
