"""The benchmark's handle on its AWS: starts `world_server.py` and sends it commands.

`RemoteWorld` is the parent's side of the one-JSON-line-per-command protocol
described in world_server.py. Calls block on a pipe; from async code run them
with `asyncio.to_thread` so the event loop under measurement keeps running.
It also sets the dummy AWS credentials every client in the benchmark needs.

This module must not import moto: the benchmark process stays free of it, so
its CPU clock holds spotguard's work only.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SERVER = Path(__file__).with_name("world_server.py")

# Dummy credentials, no profiles, no IMDS: no real account is ever reachable.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def use_dummy_credentials() -> None:
    os.environ.update(AWS_ENV)
    os.environ.pop("AWS_PROFILE", None)


class RemoteWorld:
    """A MotoWorld in a child process."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()  # one command on the pipe at a time
        self.endpoint_url = ""
        self.region = ""

    def __enter__(self) -> "RemoteWorld":
        self._proc = subprocess.Popen(
            [sys.executable, str(SERVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **AWS_ENV},
        )
        where = self.call("endpoint")
        self.endpoint_url, self.region = where["endpoint_url"], where["region"]
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def call(self, op: str, **args: Any) -> Any:
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        with self._lock:
            self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"world server exited (code {self._proc.poll()}) during {op}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]


async def until(predicate: Any, what: str, deadline: float = 15.0) -> None:
    """Wait for `predicate()` with a deadline (5 ms steps: the latencies measured are ms)."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def start_time(world: "RemoteWorld", seen: Any, standby_id: str, label: str, deadline: float = 15.0) -> float:
    """When moto's EC2 backend received StartInstances (after `seen`), checked to be for `standby_id`."""
    started = await asyncio.to_thread(world.call, "wait_start", after=seen, timeout=deadline)
    if started is None:
        raise AssertionError(f"{label}: no StartInstances within {deadline}s")
    at, ids = started
    if ids != [standby_id]:
        raise AssertionError(f"{label}: StartInstances for {ids}, expected {standby_id}")
    return at
