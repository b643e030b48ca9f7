"""Processes under measurement: start them as systemd would, and read /proc about them.

`Launched` is one child process (`spotguard run` or bench/floor.py) with its
own systemd notify socket (a datagram socket this process binds, as systemd
does for `Type=notify`) and its own AWS access key id, so that moto can tell
its calls from every other process's (world_server counts calls per key).
`status(pid)` and `cpu_seconds(pid)` read /proc.

This module must not measure anything by itself nor signal any process but
the ones it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from remote import AWS_ENV

TICK = os.sysconf("SC_CLK_TCK")
BENCH = Path(__file__).resolve().parent


def access_key(label: str) -> str:
    """A 20-character access key id (the form moto recognises) unique to `label`."""
    text = "".join(c for c in label.upper() if c.isalnum())
    return ("BENCH" + text).ljust(20, "0")[:20]


def status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and VmHWM of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class Launched:
    """One child process with its notify socket; `started` is time.monotonic() just before exec."""

    label: str
    key: str
    proc: subprocess.Popen
    sock: socket.socket
    log: Path
    started: float
    ready_at: float | None = None
    ready_cpu: float | None = None  # the process's CPU seconds when READY=1 arrived
    messages: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, deadline: float = 30.0) -> float:
        """Seconds from exec to READY=1 on the notify socket."""
        end = time.monotonic() + deadline
        while self.ready_at is None:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.label} exited {self.proc.returncode} before READY=1; see {self.log}")
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.label}: no READY=1 within {deadline}s; see {self.log}")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            at = time.monotonic()
            self.messages.append(data)
            if "READY=1" in data.splitlines():
                self.ready_at, self.ready_cpu = at, cpu_seconds(self.pid)
        return self.ready_at - self.started

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, and the exit code (killed if it does not stop)."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.sock.close()
        return self.proc.returncode


def launch(
    label: str, argv: Sequence[str], run_dir: Path, extra_env: dict[str, str] | None = None, nice: int = 0
) -> Launched:
    """Start `python argv...` with a notify socket and an access key of its own; logs to run_dir.

    `nice` below 0 (root only) lets the process go ahead of whatever else shares the machine.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    notify_path = run_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    key = access_key(label)
    env = {**os.environ, **AWS_ENV, "AWS_ACCESS_KEY_ID": key, "NOTIFY_SOCKET": str(notify_path), **(extra_env or {})}
    log = run_dir / "out.log"
    with open(log, "w") as out, open(run_dir / "err.log", "w") as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, *argv], stdout=out, stderr=err, env=env, cwd=BENCH.parent,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
    return Launched(label, key, proc, sock, log, started)
