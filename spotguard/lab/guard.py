"""spotguard in the lab, run as a user runs it: `python -m spotguard run --config <file>`.

`write_config()` writes the TOML a user would write for the lab's deployment,
with every duration divided by the lab's speed (spotguard runs on the wall
clock; the lab's scenario clock runs `speed` times faster). It renders with
`render_toml()`, which turns any config held as a dict into TOML: the one way
a config is rendered (the tests write theirs with it too). `SpotguardProcess`
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
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from ..defaults import DEREGISTER_AHEAD, LATE_WARNING

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
    spot_request_ids: tuple[str, ...],
    standby_ids: tuple[str, ...],
    speed: float,
    poll_interval: float,
    failback_grace: float,
    standby_ready_timeout: float,
    unhealthy_grace: float,
    register_when: str = "ready",
    on_rebalance: str = "ignore",
    queue_url: str | None = None,
) -> Path:
    """The lab's config; durations are scenario seconds, written as wall seconds (÷ speed)."""

    def wall(seconds: float) -> float:
        return round(seconds / speed, 6)

    doc = {
        "aws": {"region": region, "endpoint_url": endpoint_url},
        "daemon": {"state_dir": state_dir, "poll_interval": wall(poll_interval), "log_format": "json"},
        "guard": [{
            "name": guard_name,
            "target_group_arn": target_group_arn,
            "spot_request_ids": list(spot_request_ids),  # capacity: one spot per request (the default)
            "standby_instance_ids": list(standby_ids),
            "failback_grace": wall(failback_grace),
            "standby_ready_timeout": wall(standby_ready_timeout),
            "unhealthy_grace": wall(unhealthy_grace),
            "register_when": register_when,
            "on_rebalance": on_rebalance,
            "late_warning": wall(LATE_WARNING),
            "deregister_ahead": wall(DEREGISTER_AHEAD),
        }],
        "sources": {"sqs": {"queue_url": queue_url}} if queue_url else None,
    }
    comment = f"Written by the spotguard lab: durations are the scenario's divided by the speed ({speed:g})."
    path.write_text(render_toml(doc, comment=comment))
    return path


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def render_toml(doc: Mapping[str, Any], *, comment: str | None = None) -> str:
    """`doc` as TOML: a dict value is a [table], a list of dicts an [[array of tables]], None leaves a key out.

    Tables come in the dict's order, each after a blank line; values are
    strings (JSON's escapes are TOML's), paths, numbers, booleans and lists.
    """
    blocks: list[str] = []

    def table(path: list[str], body: Mapping[str, Any], *, element: bool = False) -> None:
        keys = "".join(f"{_key(k)} = {_value(v)}\n" for k, v in body.items() if v is not None and not _is_table(v))
        name = ".".join(_key(k) for k in path)
        if not path:
            blocks.append(keys)
        elif element:
            blocks.append(f"[[{name}]]\n{keys}")
        elif keys or not any(_is_table(v) for v in body.values()):  # a table of tables needs no header of its own
            blocks.append(f"[{name}]\n{keys}")
        for k, v in body.items():
            if isinstance(v, Mapping):
                table(path + [k], v)
            elif _is_table(v):
                for item in v:
                    table(path + [k], item, element=True)

    table([], doc)
    text = "\n".join(block for block in blocks if block)
    return f"# {comment}\n{text}" if comment else text


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping) or (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value))


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML value for {value!r}")


class SpotguardProcess:
    """`spotguard run` as a child process; every JSON log line goes to `on_event`."""

    def __init__(self, config: Path | None, on_event: Callable[[dict[str, Any]], None], *,
                 argv: list[str] | None = None, ready_event: str = "daemon.ready",
                 env: Mapping[str, str] | None = None) -> None:
        """`argv` runs another verb (the agent: ready once it logs `ready_event`), with `env` added."""
        self.config = config
        self.argv = ["-m", "spotguard", *(argv if argv is not None else ["run", "--config", str(config)])]
        self.ready_event = ready_event
        self.env = dict(env or {})
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
            sys.executable, *self.argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**sandbox_environ(), **self.env},
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

    def kill(self) -> None:
        """SIGKILL now, as a host that vanishes (stop() still reaps it)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

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
            if event.get("event") == self.ready_event:
                self.ready.set()
            try:
                self.on_event(event)
            except Exception as exc:  # noqa: BLE001 - keep reading: later lines matter as much
                self.reader_errors.append(f"{type(exc).__name__}: {exc} (on {event.get('event')})")

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        async for raw in self._proc.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip())

