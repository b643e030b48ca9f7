"""The systemd notify protocol (sd_notify(3)), without a dependency.

READY=1 once the daemon serves, WATCHDOG=1 at half of $WATCHDOG_USEC,
STATUS=..., STOPPING=1 on shutdown, sent to $NOTIFY_SOCKET.

Nothing here may raise or block: outside systemd every call is a no-op, and a
failed send is logged as `sdnotify.failed`.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger(__name__)


def notify(message: str) -> bool:
    """Send one datagram to $NOTIFY_SOCKET; True if sent, False if unset or failed."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        # vsock: and other forms of newer systemd are not used for services on a host.
        log.warning("sdnotify.failed", error="unsupported NOTIFY_SOCKET address", socket=address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)  # a full receive queue must not stall the caller
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: NUL in path, unencodable text
        log.warning("sdnotify.failed", error=f"{type(exc).__name__}: {exc}", message=message.split("=", 1)[0])
        return False
    return True


def ready() -> bool:
    return notify("READY=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    # The protocol is newline-separated KEY=VALUE lines: a newline would end STATUS early.
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when no watchdog is ours."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # the watchdog belongs to another process (we were forked/exec'd)
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2
