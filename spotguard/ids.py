"""The shapes of the names spotguard reads: AWS ids and ARNs, and guard names.

One pattern per kind, used wherever one is checked: the config, the
EventBridge format (the SQS source and the agent), the store's file names and
the IAM policy builder. Patterns are matched with `fullmatch`.
"""

from __future__ import annotations

import re

# AWS issues 8 or 17 hex digits after the prefix.
INSTANCE_ID = re.compile(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})")
# AWS issues `sir-` + 8 characters; moto issues `sir-` + 17 hex digits. Both are accepted.
SPOT_REQUEST_ID = re.compile(r"sir-(?:[a-z0-9]{8}|[0-9a-f]{17})")
REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d+")
TARGET_GROUP_ARN = re.compile(
    rf"arn:(?P<partition>aws[-a-z]*):elasticloadbalancing:(?P<region>{REGION.pattern}):(?P<account>\d{{12}}):"
    r"targetgroup/[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?/[0-9a-f]{16}"
)
# A guard's name is part of its file names in state_dir, so it can never be a path.
GUARD_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
DYNAMODB_TABLE = re.compile(r"[A-Za-z0-9_.-]{3,255}")
# An SQS queue's name (a FIFO queue's ends in .fifo), and the region an SQS queue URL names
# (sqs.<region>.amazonaws.com[.cn], or the legacy <region>.queue.amazonaws.com).
QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}(?:\.fifo)?")
# The EventBridge rules `spotguard setup` makes are all named so; its IAM policy is scoped to them.
RULE_PREFIX = "spotguard-"
QUEUE_URL_HOST = re.compile(r"(?:sqs\.(?P<a>[a-z0-9-]+)|(?P<b>[a-z0-9-]+)\.queue)\.amazonaws\.com(?:\.cn)?")


def queue_region(url_host: str) -> str | None:
    """The region an SQS queue URL's host names, or None for a host that names none (an endpoint_url)."""
    match = QUEUE_URL_HOST.fullmatch(url_host)
    return (match["a"] or match["b"]) if match else None
