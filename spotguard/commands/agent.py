"""`spotguard agent`: run the IMDS-to-SQS forwarder on the spot instance (spotguard/agent.py).

It must not read a config file: the spot host has only the queue URL and its region.
"""

from __future__ import annotations

import argparse
import os
import sys

from spotguard.commands.common import EXIT_CONFIG, http_url, positive_number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue-url", required=True, type=http_url, metavar="URL",
                        help="the SQS queue the daemon reads (its [sources.sqs] queue_url)")
    parser.add_argument("--imds-url", type=http_url, default="http://169.254.169.254", metavar="URL",
                        help="the instance metadata service (default http://169.254.169.254)")
    parser.add_argument("--interval", type=positive_number, default=1.0, metavar="SECONDS",
                        help="seconds between metadata reads (default 1)")
    parser.add_argument("--ready-url", type=http_url, metavar="URL",
                        help="the service's health check on this host, e.g. http://127.0.0.1:8080/health: once it "
                             "passes, the daemon is told to register this instance (register_when = \"ready\")")
    parser.add_argument("--ready-codes", default="200", metavar="CODES",
                        help="the target group's success codes, e.g. 200 or 200-299 or 200,204 (default 200)")


def run(args: argparse.Namespace) -> int:
    from spotguard import agent as forwarder  # lazily: only the spot host runs it

    region = forwarder.region_from_env(dict(os.environ))  # None: read from the instance's metadata
    ready = None
    if args.ready_url is not None:
        try:
            ready = forwarder.ReadyCheck.of_url(args.ready_url, args.ready_codes)
        except ValueError as exc:
            print(f"spotguard agent: --ready-url/--ready-codes: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    return forwarder.main(args.queue_url, args.imds_url, args.interval, region, ready)
