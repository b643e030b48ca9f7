"""Logging setup: structlog to one stream, as JSON lines or for a person.

`configure()` is called once before anything logs: `json` (one object per
line, what journald gets; `auto` picks it off a terminal) or `console`.
Records of the standard `logging` module (botocore, apscheduler, ...) go
through the same renderer at WARNING and above. When the stream is the
journal (systemd's JOURNAL_STREAM names it), each line starts with its syslog
priority as sd-daemon(3) describes (`<3>` for an error), so `journalctl -p
warning` finds warnings. Secrets (the Discord webhook URL) are dropped or
redacted from every event.

This module must not decide what is logged, only how.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

FORMATS = ("auto", "json", "console")

# Keys whose values are secrets: dropped from every event before rendering.
SECRET_KEYS = frozenset({"webhook_url"})
# Any value that looks like a Discord webhook URL is a secret wherever it hides.
_WEBHOOK_MARK = "/api/webhooks/"
REDACTED = "[redacted]"

_HANDLER_MARK = "_spotguard_handler"

# Log levels as syslog priorities (sd-daemon(3) prefixes, journalctl -p).
PRIORITIES = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
INFO_PRIORITY = 6


def drop_secrets(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: drop `webhook_url` keys; redact string values holding a webhook URL."""
    for key in SECRET_KEYS & event_dict.keys():
        del event_dict[key]
    for key, value in event_dict.items():
        if isinstance(value, str) and _WEBHOOK_MARK in value:
            event_dict[key] = REDACTED
    return event_dict


def resolve_format(log_format: str, stream: TextIO) -> str:
    """`auto` → `console` on a TTY, else `json`; other values checked and returned."""
    if log_format not in FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    if log_format == "auto":
        return "console" if _isatty(stream) else "json"
    return log_format


def configure(log_format: str = "auto", stream: TextIO | None = None, *, level: str = "info") -> str:
    """Configure structlog (and stdlib logging) to write to `stream`; return the format used."""
    stream = sys.stdout if stream is None else stream
    fmt = resolve_format(log_format, stream)
    levelno = _level(level)
    renderer: Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=colors(stream))
    )
    if is_journal(stream):
        renderer = _Prioritised(renderer)
    # ConsoleRenderer formats exceptions itself; JSON needs them as a string.
    exc: list[Processor] = [structlog.processors.format_exc_info] if fmt == "json" else []
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        drop_secrets,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *exc, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=structlog.PrintLoggerFactory(stream),
        # Not cached: loggers bound at import time must follow a later configure()
        # (tests reconfigure, and structlog.testing.capture_logs needs it).
        cache_logger_on_first_use=False,
    )
    _route_stdlib(stream, [structlog.stdlib.add_logger_name, *shared], [*exc, renderer])
    return fmt


def _route_stdlib(stream: TextIO, pre_chain: list[Processor], render: list[Processor]) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    # Replace only our own handler: others (pytest's capture, say) stay.
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def colors(stream: TextIO, environ: Any = None) -> bool:
    """Whether console lines are coloured: NO_COLOR (no-color.org) wins, then FORCE_COLOR,
    else only on a terminal. Either counts when set to anything but an empty string."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR"):
        return True
    return _isatty(stream)


def is_journal(stream: TextIO, environ: Any = None) -> bool:
    """Whether `stream` is connected to journald: systemd sets JOURNAL_STREAM to its device:inode."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # unset, malformed, or no file behind the stream
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class _Prioritised:
    """A renderer whose lines start with the event's syslog priority, `<N>`, for journald."""

    def __init__(self, renderer: Processor) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, method: str, event_dict: EventDict) -> str:
        priority = PRIORITIES.get(str(event_dict.get("level", method)).lower(), INFO_PRIORITY)
        return f"<{priority}>{self.renderer(logger, method, event_dict)}"


def _level(level: str) -> int:
    try:
        return logging.getLevelNamesMapping()[level.upper()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
