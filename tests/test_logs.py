"""Log output as journald and a person see it: captured from a real stream."""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from datetime import datetime, timezone

import pytest
import structlog

from spotguard import logs


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging():
    """configure() changes process-wide state: put structlog and the root logger back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_is_one_object_per_line():
    out = io.StringIO()
    assert logs.configure("json", out) == "json"
    log = structlog.get_logger("spotguard.test")
    log.info("guard.transition", guard="inference", to="standby-starting")
    log.warning("poll.describe.failed", code="Throttling", attempt=2)
    first, second = json_lines(out)
    assert first["event"] == "guard.transition"
    assert first["level"] == "info"
    assert first["guard"] == "inference" and first["to"] == "standby-starting"
    assert second == {**second, "event": "poll.describe.failed", "level": "warning", "code": "Throttling", "attempt": 2}


def test_json_timestamp_is_iso_utc():
    out = io.StringIO()
    logs.configure("json", out)
    before = datetime.now(timezone.utc)
    structlog.get_logger().info("daemon.started")
    (line,) = json_lines(out)
    stamp = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset().total_seconds() == 0
    assert abs((stamp - before).total_seconds()) < 60


def test_json_exception_is_rendered_as_text():
    out = io.StringIO()
    logs.configure("json", out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger().exception("executor.command.failed")
    (line,) = json_lines(out)
    assert line["level"] == "error"
    assert "RuntimeError: boom" in line["exception"]


def test_console_is_for_people():
    out = io.StringIO()
    assert logs.configure("console", out) == "console"
    structlog.get_logger().info("guard.transition", guard="inference")
    text = out.getvalue()
    assert "guard.transition" in text and "guard=inference" in text
    assert "\x1b[" not in text  # no colour codes when the stream is not a terminal
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


@pytest.mark.parametrize(("stream", "expected"), [(io.StringIO(), "json"), (TTY(), "console")])
def test_auto_picks_console_only_on_a_tty(stream, expected):
    assert logs.configure("auto", stream) == expected


def test_unknown_format_and_level_are_refused():
    with pytest.raises(ValueError, match="log_format"):
        logs.configure("xml", io.StringIO())
    with pytest.raises(ValueError, match="level"):
        logs.configure("json", io.StringIO(), level="chatty")


def test_level_filters():
    out = io.StringIO()
    logs.configure("json", out, level="warning")
    log = structlog.get_logger()
    log.debug("poll.tick")
    log.info("poll.done")
    log.warning("poll.slow")
    assert [line["event"] for line in json_lines(out)] == ["poll.slow"]


def test_webhook_url_is_never_written():
    out = io.StringIO()
    logs.configure("json", out)
    secret = "https://discord.com/api/webhooks/123/TOKEN-abc"
    log = structlog.get_logger()
    log.info("config.loaded", webhook_url=secret, guards=1)
    log.warning("oops", detail=f"posting to {secret} failed")
    first, second = json_lines(out)
    assert "webhook_url" not in first and first["guards"] == 1
    assert second["detail"] == logs.REDACTED
    assert "TOKEN-abc" not in out.getvalue()


def test_stdlib_records_share_the_format():
    out = io.StringIO()
    logs.configure("json", out)
    logging.getLogger("apscheduler.scheduler").warning("Run time of job %s was missed", "poll")
    (line,) = json_lines(out)
    assert line["event"] == "Run time of job poll was missed"
    assert line["level"] == "warning"
    assert line["logger"] == "apscheduler.scheduler"
    assert "timestamp" in line


def test_stdlib_debug_lines_stay_out():
    # urllib3 logs request paths at DEBUG, and a webhook path is a credential.
    out = io.StringIO()
    logs.configure("json", out)
    logging.getLogger("urllib3.connectionpool").debug('"POST /api/webhooks/1/TOKEN HTTP/1.1" 204')
    logging.getLogger("botocore").info("found credentials")
    assert out.getvalue() == ""


def test_configure_twice_writes_each_line_once():
    first, second = io.StringIO(), io.StringIO()
    logs.configure("json", first)
    logs.configure("json", second)
    logging.getLogger("x").error("only here")
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1


# ---------------------------------------------------------------------- journald priorities


def test_the_journal_is_recognised_by_the_device_and_inode_systemd_names(tmp_path):
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        assert logs.is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.is_journal(stream, {"JOURNAL_STREAM": "garbage"})
        assert not logs.is_journal(stream, {})
    assert not logs.is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})  # no file behind it


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_on_the_journal_each_line_starts_with_its_syslog_priority(tmp_path, monkeypatch, fmt):
    with open(tmp_path / "stream", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logs.configure(fmt, stream)
        log = structlog.get_logger("spotguard.test")
        log.critical("daemon.crashed")
        log.error("poll.describe.failed")
        log.warning("guard.alert")
        log.info("guard.transition")
        logging.getLogger("botocore.test").warning("a library's warning")
        stream.seek(0)
        prefixes = [line[:3] for line in stream.read().splitlines()]
    assert prefixes == ["<2>", "<3>", "<4>", "<6>", "<4>"]


def test_off_the_journal_lines_have_no_prefix(tmp_path, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    logs.configure("json", out)
    structlog.get_logger().error("poll.describe.failed")
    assert out.getvalue().startswith("{")


JOURNALD = "/lib/systemd/systemd-journald"
JOURNAL_SCRIPT = r"""
set -e
mount -t tmpfs tmpfs /run/systemd 2>/dev/null || { mkdir -p /run/systemd && mount -t tmpfs tmpfs /run/systemd; }
mkdir -p /run/systemd/journal
mount -t tmpfs tmpfs /run/log 2>/dev/null || { mkdir -p /run/log && mount -t tmpfs tmpfs /run/log; }
mkdir -p /run/log/journal
@JOURNALD@ & journald=$!
for i in $(seq 100); do [ -S /run/systemd/journal/stdout ] && break; sleep 0.05; done
# As systemd does for a service: stdout is a journal stream, named by JOURNAL_STREAM.
systemd-cat -t @TAG@ sh -c 'export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/$$/fd/1); exec "$0" -c "$1"' \
    @PYTHON@ @CODE@
journalctl -D /run/log/journal --sync >/dev/null 2>&1 || true
# Wait until the last line (info) is in the journal, then ask for warnings and worse.
for i in $(seq 100); do
  journalctl -D /run/log/journal -t @TAG@ -o cat --no-pager | grep -q guard.transition && break
  sleep 0.05
done
journalctl -D /run/log/journal -t @TAG@ -p warning -o json --no-pager
kill $journald
"""
LOGGING_CODE = """
import logging, structlog
from spotguard import logs
logs.configure("auto")
log = structlog.get_logger("spotguard")
log.critical("daemon.crashed")
log.error("poll.describe.failed")
log.warning("guard.alert")
logging.getLogger("botocore.test").warning("library.warning")
log.info("guard.transition")
"""


def test_journalctl_priority_filter_sees_spotguards_warnings_through_a_real_journald():
    if (
        os.geteuid() != 0
        or not os.path.exists(JOURNALD)
        or not shutil.which("systemd-cat")
        or not shutil.which("unshare")
    ):
        pytest.skip("needs root, systemd-journald, systemd-cat and unshare to run a private journald")
    tag = f"spotguard-test-{uuid.uuid4().hex[:12]}"  # only this run's lines count
    script = (JOURNAL_SCRIPT.replace("@JOURNALD@", JOURNALD).replace("@TAG@", tag)
              .replace("@PYTHON@", shlex.quote(sys.executable)).replace("@CODE@", shlex.quote(LOGGING_CODE)))
    done = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "unshare" in done.stderr:
        pytest.skip(f"cannot make a private mount namespace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stdout.splitlines()]
    seen = {(json.loads(e["MESSAGE"])["event"], e["PRIORITY"]) for e in entries}
    assert seen == {("daemon.crashed", "2"), ("poll.describe.failed", "3"), ("guard.alert", "4"),
                    ("library.warning", "4")}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("env", "tty", "expected"), [
    ({}, True, True),
    ({}, False, False),
    ({"NO_COLOR": "1"}, True, False),
    ({"NO_COLOR": ""}, True, True),  # set but empty does not count (no-color.org)
    ({"FORCE_COLOR": "1"}, False, True),
    ({"NO_COLOR": "1", "FORCE_COLOR": "1"}, True, False),
])
def test_colours_follow_no_color_and_force_color(env, tty, expected):
    assert logs.colors(_Terminal() if tty else io.StringIO(), env) is expected


def test_no_color_leaves_no_escape_codes_on_a_terminal(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    out = _Terminal()
    logs.configure("console", out)
    structlog.get_logger("t").warning("guard.alert", text="plain")
    assert "guard.alert" in out.getvalue() and "\x1b[" not in out.getvalue()
