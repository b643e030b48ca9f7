"""The tests' one config writer: a spotguard TOML file, as a user would write it, from a few keywords.

`write_config` writes `config.toml` in a test's tmp_path: [aws] from the world
(region and endpoint), [daemon] with a state_dir under tmp_path (a test never
points at /var/lib/spotguard), and one [[guard]] per deployment. Only what a
keyword asks for is written besides; every other setting is spotguard's
default. `daemon_settings` is the end-to-end daemon tests' config, loaded:
quick timings and JSON logs.

The TOML is rendered by the lab's `render_toml`, so tests and the lab write a
config one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from spotguard import config
from spotguard.lab.guard import render_toml
from spotguard.lab.world import Deployment


def write_config(
    tmp_path: Path,
    world: Any,
    guards: Iterable[Deployment | Mapping[str, Any]],
    *,
    poll: str | None = None,
    grace: str | None = None,
    ready: str | None = None,
    unhealthy: str | None = None,
    aws: Mapping[str, Any] | None = None,
    daemon: Mapping[str, Any] | None = None,
    guard: Mapping[str, Any] | None = None,
    sqs: str | None = None,
    ha: Mapping[str, Any] | None = None,
    discord: Mapping[str, Any] | None = None,
) -> Path:
    """Write tmp_path/config.toml; its path.

    `world` gives [aws] (anything with `region` and `endpoint_url`; None: only
    `aws`). A deployment in `guards` is guarded by name, target group, spot
    request and standbys; a mapping there is a [[guard]] table as it stands.
    `poll` is [daemon] poll_interval; `grace`, `ready` and `unhealthy` are each
    deployment's failback_grace, standby_ready_timeout and unhealthy_grace;
    `aws`, `daemon` and `guard` add keys to those tables or replace them (None
    drops one); `sqs` is [sources.sqs] queue_url, `ha` the [ha] table,
    `discord` the [notify.discord] table.
    """
    timings = {"failback_grace": grace, "standby_ready_timeout": ready, "unhealthy_grace": unhealthy}
    where = {} if world is None else {"region": world.region, "endpoint_url": world.endpoint_url}
    doc: dict[str, Any] = {
        "aws": {**where, **(aws or {})},
        "daemon": {"state_dir": tmp_path / "state", "poll_interval": poll, **(daemon or {})},
        "notify": {"discord": discord} if discord is not None else None,
        "sources": {"sqs": {"queue_url": sqs}} if sqs is not None else None,
        "ha": ha,
        "guard": [
            dict(g) if isinstance(g, Mapping) else {
                "name": g.name,
                "target_group_arn": g.target_group_arn,
                "spot_request_ids": [g.spot_request_id],
                "standby_instance_ids": list(g.standby_ids),
                # Registered as they run unless a test says otherwise: these worlds' instances are not
                # all on loopback addresses, and a test never probes anything else.
                "register_when": "running",
                **timings,
                **(guard or {}),
            }
            for g in guards
        ] or None,
    }
    path = tmp_path / "config.toml"
    path.write_text(render_toml(doc))
    return path


def daemon_settings(tmp_path: Path, world: Any, deployments: Iterable[Deployment], *, poll: str = "0.2s",
                    grace: str = "1s", ready: str = "30s", unhealthy: str = "30s",
                    daemon: Mapping[str, Any] | None = None, **keys: Any) -> config.Settings:
    """The end-to-end daemon tests' config, loaded: a round every 0.2 s, failback 1 s after
    the spot is back, 30 s for a standby to turn healthy, JSON logs (keywords as `write_config`'s)."""
    return config.load(write_config(tmp_path, world, deployments, poll=poll, grace=grace, ready=ready,
                                    unhealthy=unhealthy, daemon={"log_format": "json", **(daemon or {})}, **keys))
