"""sd_notify over real AF_UNIX datagram sockets: a path in tmp_path and an abstract name."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from structlog.testing import capture_logs

from spotguard import sdnotify


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path, announced as $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


@pytest.fixture
def abstract_receiver(monkeypatch) -> Iterator[socket.socket]:
    name = f"spotguard-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (sdnotify.ready, "READY=1"),
        (sdnotify.stopping, "STOPPING=1"),
        (sdnotify.watchdog, "WATCHDOG=1"),
        (lambda: sdnotify.status("polling 2 guards"), "STATUS=polling 2 guards"),
        (lambda: sdnotify.notify("READY=1\nSTATUS=up"), "READY=1\nSTATUS=up"),
    ],
)
def test_sends_one_datagram_to_a_path_socket(receiver, call, expected):
    assert call() is True
    assert recv(receiver) == expected


def test_sends_to_an_abstract_socket(abstract_receiver):
    assert sdnotify.ready() is True
    assert recv(abstract_receiver) == "READY=1"


def test_status_keeps_to_one_line(receiver):
    sdnotify.status("failover\nin progress")
    assert recv(receiver) == "STATUS=failover in progress"


def test_unset_socket_is_a_silent_no_op():
    with capture_logs() as logs:
        assert sdnotify.ready() is False
        assert sdnotify.watchdog() is False
    assert logs == []


@pytest.mark.parametrize(
    "address",
    [
        "/nonexistent/spotguard/notify.sock",  # no such socket
        pytest.param("@spotguard-nobody-listens-" + uuid.uuid4().hex,
                     id="abstract-unbound"),  # abstract name nobody bound
        pytest.param("/" + "x" * 200, id="too-long"),  # longer than an AF_UNIX path may be
        "/",  # a directory, not a socket
        "vsock:2:1234",  # a form this module does not speak
    ],
)
def test_failure_is_logged_and_never_raises(monkeypatch, address):
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with capture_logs() as logs:
        assert sdnotify.ready() is False
    assert [entry["event"] for entry in logs] == ["sdnotify.failed"]
    assert logs[0]["log_level"] == "warning"


def test_a_regular_file_is_not_a_socket(tmp_path, monkeypatch):
    path = tmp_path / "not-a-socket"
    path.write_text("")
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    with capture_logs() as logs:
        assert sdnotify.watchdog() is False
    assert logs[0]["event"] == "sdnotify.failed"


def test_unencodable_text_is_logged_not_raised(receiver):
    with capture_logs() as logs:
        assert sdnotify.status("bad \udcff surrogate") is False
    assert logs[0]["event"] == "sdnotify.failed"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),  # WatchdogSec=30 → ping every 15 s
        ("30000000", "self", 15.0),
        ("1000", None, 0.0005),
        ("30000000", "other", None),  # someone else's watchdog
        ("30000000", "junk", None),
        (None, None, None),
        ("", None, None),
        ("0", None, None),
        ("-5", None, None),
        ("thirty", None, None),
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
        monkeypatch.setenv("WATCHDOG_PID", value)
    assert sdnotify.watchdog_interval() == expected
