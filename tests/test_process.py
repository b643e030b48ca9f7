"""`spotguard run` as systemd runs it: a real process, a real notify socket, SIGTERM.

The process talks to moto over HTTP; systemd's side of the notify protocol is a
datagram socket this test binds, so READY=1, WATCHDOG=1 and STOPPING=1 are
observed exactly as systemd would receive them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from configs import daemon_settings


def receive_until(sock: socket.socket, wanted: str, timeout: float = 20.0) -> list[str]:
    """Collect notify datagrams until one contains `wanted`; fail at the deadline."""
    got: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if any(wanted in line for line in got[-1].splitlines()):
            return got
    raise AssertionError(f"no {wanted} from the daemon within {timeout}s; got {got}")


def test_run_notifies_systemd_and_exits_0_on_sigterm(tmp_path, moto_world, deployment):
    settings_path = tmp_path / "config.toml"
    daemon_settings(tmp_path, moto_world, [deployment], poll="0.5s")
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="1000000")
        proc = subprocess.Popen(
            [sys.executable, "-m", "spotguard", "run", "--config", str(settings_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            receive_until(sock, "READY=1")
            receive_until(sock, "WATCHDOG=1")
            proc.send_signal(signal.SIGTERM)
            receive_until(sock, "STOPPING=1")
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    events = [json.loads(line)["event"] for line in out.splitlines()]
    assert events[0] == "daemon.started"
    assert "daemon.ready" in events and events[-1] == "daemon.stopped"
    assert "Traceback" not in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_wires_the_ledger_metrics_and_daily_summary(tmp_path, moto_world, deployment):
    """The operator's parts are wired into the real process, not only into tests' daemons."""
    port = free_port()
    daemon_settings(tmp_path, moto_world, [deployment], poll="0.5s", daemon={"metrics_port": port},
                    discord={"webhook_url": "http://127.0.0.1:9/hook", "daily_summary": "09:00"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "spotguard", "run", "--config", str(tmp_path / "config.toml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    seen = tmp_path / "state" / f"{deployment.name}.seen.json"
    try:
        end, page = time.monotonic() + 20, ""
        while time.monotonic() < end and not (seen.exists() and "spotguard_phase{" in page):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
                    page = b"".join(iter(lambda: conn.recv(65536), b"")).decode()
            except OSError:
                time.sleep(0.05)  # not listening yet: poll again until the deadline
        assert seen.exists(), "the ledger wrote no snapshot of the observation"
        assert f'spotguard_phase{{guard="{deployment.name}",phase="spot-healthy"}} 1.0' in page
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "/hook" not in out + err  # the webhook URL is a credential
