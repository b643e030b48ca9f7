"""spotguard config files for the benchmark's deployments, written as a user would write them.

`write(path, world, deployments, ...)` writes a TOML config with one `[[guard]]`
per deployment (a dict as `world_server.provision` returns it) pointed at the
world's endpoint, and returns the path; `config.load(path)` then gives the
real Settings the daemon and the poller take. `write_floor_spec` writes the
same deployments as bench/floor.py's JSON spec. This module must not start
anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from spotguard.config import GuardSettings
from spotguard.ec2model import DATA as LEAN_DATA
from spotguard.machine import STEADY_HEALTH_SHARE

# The configs keep the default unhealthy_grace, and spotguard's poller reuses a
# steady guard's target health for a share of it: the floor describes as often.
FLOOR_HEALTH_EVERY = GuardSettings.unhealthy_grace / STEADY_HEALTH_SHARE


def write(
    path: Path,
    world: Any,
    deployments: Sequence[dict[str, Any]],
    *,
    state_dir: Path,
    poll_interval: float,
    failback_grace: str = "10m",
) -> Path:
    guards = "".join(
        f"""
[[guard]]
name = {json.dumps(d["name"])}
target_group_arn = {json.dumps(d["target_group_arn"])}
spot_request_ids = {json.dumps(d.get("spot_request_ids", [d["spot_request_id"]]))}
standby_instance_ids = {json.dumps(list(d["standby_ids"]))}
failback_grace = {json.dumps(failback_grace)}
# No service runs on the bench's instances: a readiness probe would wait forever.
register_when = "running"
"""
        for d in deployments
    )
    path.write_text(
        f"""# Written by bench/configs.py for one benchmark run.
[aws]
region = {json.dumps(world.region)}
endpoint_url = {json.dumps(world.endpoint_url)}

[daemon]
state_dir = {json.dumps(str(state_dir))}
poll_interval = {poll_interval!r}
log_format = "json"
{guards}"""
    )
    return path


def write_floor_spec(path: Path, world: Any, deployments: Sequence[dict[str, Any]], *, interval: float) -> Path:
    """bench/floor.py's spec: the same ids, interval, health cadence and EC2 model as the daemon's."""
    spec = {
        "region": world.region,
        "endpoint_url": world.endpoint_url,
        "interval": interval,
        "request_ids": [r for d in deployments for r in d.get("spot_request_ids", [d["spot_request_id"]])],
        "standby_ids": [s for d in deployments for s in d["standby_ids"]],
        "target_groups": [d["target_group_arn"] for d in deployments],
        "health_every": FLOOR_HEALTH_EVERY,
        "data_path": str(LEAN_DATA),  # read by path: the floor imports no spotguard
    }
    path.write_text(json.dumps(spec))
    return path
