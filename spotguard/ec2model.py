"""The lean EC2 service model spotguard ships, and the command that regenerates it.

`lean(full)` keeps only the EC2 operations spotguard calls, the shapes they
reach and, of the two big reply structures, the members spotguard reads;
`spotguard.aws` loads it instead of botocore's 800-operation model.
`python -m spotguard.ec2model` rewrites the shipped file from the installed
botocore (tests/test_model.py says when). A new EC2 call, or a new field read
from a reply, must be added here.

This module must not create clients or call AWS; input shapes are never trimmed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Mapping

SERVICE = "ec2"
TYPE_NAME = "service-2"
# Put first on a session's botocore search path by spotguard.aws.
DATA = Path(__file__).resolve().parent / "data"

# Every EC2 operation spotguard calls (tests/test_model.py finds the calls with
# ast and fails when one is missing here).
OPERATIONS = (
    "DescribeInstances",  # sources/poll.py, check.py, rehearse.py
    "DescribeSpotInstanceRequests",  # sources/poll.py, check.py
    "DescribeInstanceStatus",  # check.py: scheduled events
    "StartInstances",  # executor.py, rehearse.py, check.py (DryRun)
    "StopInstances",  # executor.py, rehearse.py, check.py (DryRun)
)

# Members of `Instance` (a DescribeInstances reply) that spotguard reads; the
# parser drops the rest. Nested shapes of a kept member stay whole.
INSTANCE_MEMBERS = frozenset({
    "InstanceId",  # poll.py, check.py: the key of every instance
    "State",  # poll.py, check.py, rehearse.py: State.Name
    "Tags",  # poll.py: _has_tags matches a tag-based guard's spots
    "InstanceLifecycle",  # poll.py, check.py: "spot" or not (moto lacks the filter)
    "LaunchTime",  # poll.py: orders a tag-based guard's spots; how long a silent instance has run
    "PrivateIpAddress",  # poll.py: where the readiness probe knocks
    "VpcId",  # check.py: a standby must be in the target group's VPC
    "InstanceType",  # check.py: printed in the standby line
})

# Members of `SpotInstanceRequest` (a DescribeSpotInstanceRequests reply) that
# spotguard reads.
SPOT_REQUEST_MEMBERS = frozenset({
    "SpotInstanceRequestId",  # poll.py: the key of every request
    "InstanceId",  # poll.py, check.py: the request's current spot
    "Status",  # poll.py, check.py: Status.Code carries the interruption notice
    "State",  # check.py: cancelled/closed/failed requests launch nothing
    "Type",  # check.py: one-time requests are not re-fulfilled
})

# Output structures trimmed to a keep-list; every other shape keeps all members.
TRIMMED: Mapping[str, frozenset[str]] = {
    "Instance": INSTANCE_MEMBERS,
    "SpotInstanceRequest": SPOT_REQUEST_MEMBERS,
}

# Keys only botocore's documentation generator reads.
DOC_KEYS = frozenset({"documentation", "documentationUrl", "deprecatedMessage", "deprecatedSince", "examples"})


def lean(full: Mapping[str, Any]) -> dict[str, Any]:
    """The lean model of a full EC2 service-2 model (`full` is left untouched)."""
    shapes = full["shapes"]
    operations = {name: _undocumented(full["operations"][name]) for name in OPERATIONS}
    kept = {name: _trimmed(name, _undocumented(shapes[name])) for name in _reachable(operations, shapes)}
    return {
        "version": full["version"],
        "metadata": _undocumented(full["metadata"]),
        "operations": operations,
        "shapes": kept,
    }


def render(model: Mapping[str, Any]) -> str:
    """Stable JSON: sorted keys, one key per line, so a regenerated file diffs readably."""
    return json.dumps(model, sort_keys=True, indent=1, separators=(",", ":")) + "\n"


def path(api_version: str) -> Path:
    """Where the lean model of `api_version` lives, laid out as botocore's loader expects."""
    return DATA / SERVICE / api_version / f"{TYPE_NAME}.json"


def botocore_model() -> tuple[str, dict[str, Any]]:
    """(api version, model) of the installed botocore's own EC2 model, nothing else on the path."""
    from botocore.loaders import Loader

    # Only botocore's data: neither ~/.aws/models, AWS_DATA_PATH nor our own file.
    loader = Loader(extra_search_paths=[Loader.BUILTIN_DATA_PATH], include_default_search_paths=False,
                    include_default_extras=False)
    version = loader.determine_latest_version(SERVICE, TYPE_NAME)
    return version, loader.load_service_model(SERVICE, TYPE_NAME, version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spotguard.ec2model", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the shipped file is stale; write nothing")
    args = parser.parse_args(argv)
    version, full = botocore_model()
    model = lean(full)
    target, text = path(version), render(model)
    if args.check:
        fresh = target.is_file() and target.read_text() == text
        print(f"{target}: {'up to date' if fresh else 'stale'}")
        return 0 if fresh else 1
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote {target}: {len(full['operations'])} -> {len(model['operations'])} operations, "
          f"{len(full['shapes'])} -> {len(model['shapes'])} shapes, {len(text):,} bytes")
    return 0


# ---------------------------------------------------------------------- helpers


def _undocumented(value: Any) -> Any:
    """A deep copy of `value` without documentation keys."""
    if isinstance(value, Mapping):
        return {k: _undocumented(v) for k, v in value.items() if k not in DOC_KEYS}
    if isinstance(value, list):
        return [_undocumented(v) for v in value]
    return value


def _trimmed(name: str, shape: dict[str, Any]) -> dict[str, Any]:
    keep = TRIMMED.get(name)
    if keep is None:
        return shape
    missing = keep - shape["members"].keys()
    if missing:  # a renamed member would silently vanish from every reply
        raise KeyError(f"{name} has no member(s) {sorted(missing)}: update spotguard.ec2model")
    shape = {**shape, "members": {k: v for k, v in shape["members"].items() if k in keep}}
    if "required" in shape:
        shape["required"] = [k for k in shape["required"] if k in keep]
    return shape


def _reachable(operations: Mapping[str, Any], shapes: Mapping[str, Any]) -> list[str]:
    """Names of the shapes the operations reach (after trimming), in discovery order."""
    roots = [ref["shape"] for op in operations.values() for ref in _operation_refs(op)]
    seen: dict[str, None] = {}
    queue = deque(roots)
    while queue:
        name = queue.popleft()
        if name in seen:
            continue
        seen[name] = None
        queue.extend(ref["shape"] for ref in _shape_refs(name, shapes[name]))
    return list(seen)


def _operation_refs(operation: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for key in ("input", "output"):
        if key in operation:
            yield operation[key]
    yield from operation.get("errors", ())


def _shape_refs(name: str, shape: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    keep = TRIMMED.get(name)
    for member, ref in shape.get("members", {}).items():
        if keep is None or member in keep:
            yield ref
    for key in ("member", "key", "value"):
        if key in shape:
            yield shape[key]


if __name__ == "__main__":
    sys.exit(main())
