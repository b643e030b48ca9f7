"""spotguard in the lab, run as a user runs it: `python -m spotguard run --config <file>`.

`write_config()` writes the TOML a user would write for the lab's deployment,
with every duration divided by the lab's speed (spotguard runs on the wall
clock; the lab's scenario clock runs `speed` times faster). `SpotguardProcess`
starts the daemon as a subprocess pointed at the lab's moto endpoint, reads
its JSON log lines from stdout as they come and hands each to a callback,
and stops it with SIGTERM as systemd would.

The child gets dummy AWS credentials and no AWS config files, so whatever the
environment holds, the lab can never reach a real account.

This module must not interpret spotguard's decisions (the lab's runner reads
the log lines) nor touch the world.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

# What the child sees of AWS: only moto, through the endpoint in its config.
SANDBOX_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
DROPPED_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "SPOTGUARD_DISCORD_WEBHOOK_URL", "NOTIFY_SOCKET", "WATCHDOG_USEC")


def sandbox_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for key in DROPPED_ENV:
        env.pop(key, None)
    env.update(SANDBOX_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_config(
    path: Path,
    *,
    region: str,
    endpoint_url: str,
    state_dir: Path,
    guard_name: str,
    target_group_arn: str,
    spot_request_id: str,
    standby_ids: tuple[str, ...],
    speed: float,
    poll_interval: float,
    failback_grace: float,
    standby_ready_timeout: float,
    unhealthy_grace: float,
) -> Path:
    """The lab's config; durations are scenario seconds, written as wall seconds (÷ speed)."""

    def wall(seconds: float) -> str:
        return repr(round(seconds / speed, 6))

    standbys = ", ".join(json.dumps(s) for s in standby_ids)
    path.write_text(
        f"""# Written by the spotguard lab: durations are the scenario's divided by the speed ({speed:g}).
[aws]
region = {json.dumps(region)}
endpoint_url = {json.dumps(endpoint_url)}

[daemon]
state_dir = {json.dumps(str(state_dir))}
poll_interval = {wall(poll_interval)}
log_format = "json"

[[guard]]
name = {json.dumps(guard_name)}
target_group_arn = {json.dumps(target_group_arn)}
spot_request_ids = [{json.dumps(spot_request_id)}]
standby_instance_ids = [{standbys}]
failback_grace = {wall(failback_grace)}
standby_ready_timeout = {wall(standby_ready_timeout)}
unhealthy_grace = {wall(unhealthy_grace)}
"""
    )
    return path


class SpotguardProcess:
    """`spotguard run` as a child process; every JSON log line goes to `on_event`."""

    def __init__(self, config: Path, on_event: Callable[[dict[str, Any]], None]) -> None:
        self.config = config
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self.reader_errors: list[str] = []  # on_event raised: a lab bug, reported, never silent
        self.ready = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    async def start(self, timeout: float = 60.0) -> None:
        """Start the daemon and wait for its first observation round (`daemon.ready`)."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "spotguard", "run", "--config", str(self.config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=sandbox_environ(),
        )
        self._readers = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]
        exited = asyncio.create_task(self._proc.wait())
        ready = asyncio.create_task(self.ready.wait())
        done, _ = await asyncio.wait({exited, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        exited.cancel()
        if not self.ready.is_set():
            await self.stop()
            why = "exited" if exited in done else f"was not ready within {timeout:g}s"
            raise RuntimeError(f"spotguard {why}: {self.stderr_tail()}")

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then wait (SIGKILL past the timeout); the exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        return proc.returncode

    def stderr_tail(self, lines: int = 10) -> str:
        return " | ".join(self.stderr[-lines:]) or "(no stderr)"

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for raw in self._proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "lab.unparsed", "text": line, "level": "warning"}
            if not isinstance(event, dict):
                event = {"event": "lab.unparsed", "text": line, "level": "warning"}
            self.events.append(event)
            if event.get("event") == "daemon.ready":
                self.ready.set()
            try:
                self.on_event(event)
            except Exception as exc:  # noqa: BLE001 - keep reading: later lines matter as much
                self.reader_errors.append(f"{type(exc).__name__}: {exc} (on {event.get('event')})")

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        async for raw in self._proc.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip())
