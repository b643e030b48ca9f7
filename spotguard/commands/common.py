"""What every verb of the command line shares: exit codes, the --config argument and its loading, argument types.

It must not hold a verb's own logic, nor import anything heavier than config.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any, Coroutine

from spotguard import defaults
from spotguard.config import ConfigError, Settings, load

EXIT_OK = 0
EXIT_FAILED = 1  # the verb ran and the answer is no (a ✗ line, AWS refused, a file unreadable)
EXIT_CONFIG = 2  # bad usage or a bad config: nothing was done (argparse exits 2 as well)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=default_config(), metavar="PATH",
                        help=f"the TOML config file (default: ${defaults.CONFIG_ENV}, else {defaults.CONFIG})")


def default_config() -> str:
    return os.environ.get(defaults.CONFIG_ENV) or str(defaults.CONFIG)


def load_or_report(path: str) -> Settings | None:
    """The settings, or None after printing each problem on its own line to stderr."""
    if path == default_config() and not os.path.exists(path):
        where = f"${defaults.CONFIG_ENV}" if os.environ.get(defaults.CONFIG_ENV) else "the default config"
        print(f"{path}: no such file ({where}); pass --config PATH or set {defaults.CONFIG_ENV}", file=sys.stderr)
        return None
    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def positive_number(text: str) -> float:
    """An argparse type: a finite number above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def http_url(text: str) -> str:
    """An argparse type: an http:// or https:// URL with something after the scheme."""
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL")
    return text


def run_aws(verb: str, work: Coroutine[Any, Any, int]) -> int:
    """Run a verb's AWS work; any AWS, credential or network failure, raised before a
    call (no such profile, no credentials) or by one, is one line on stderr and exit 1,
    never a traceback."""
    from spotguard.aws import AWS_ERRORS, describe_error  # only verbs that talk to AWS pay for it

    try:
        return asyncio.run(work)
    except AWS_ERRORS as exc:
        print(f"spotguard {verb}: {describe_error(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyError, IndexError) as exc:  # a reply that parsed but lacks what every real one has
        print(f"spotguard {verb}: AWS answered without {exc} (is a proxy or a wrong endpoint_url in the way?)",
              file=sys.stderr)
        return EXIT_FAILED
