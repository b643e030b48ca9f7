"""Waiting in tests: poll a condition until it holds or a deadline passes; never a blind sleep.

`until` is for async tests (it yields to the event loop between looks, so the
daemon under test keeps running); `until_blocking` is for threads and
subprocess tests. Both return the predicate's first truthy value, so a test
can wait for something and use it at once, and both raise `TimedOut` (an
AssertionError) naming what was awaited and for how long.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

T = TypeVar("T")

# How long a test waits for the daemon by default: several poll rounds and AWS calls on a loaded machine.
DEADLINE = 15.0
# How often it looks: fast enough to see a short-lived phase, slow enough to leave the daemon the GIL.
INTERVAL = 0.02


class TimedOut(AssertionError):
    """The condition did not hold within the timeout."""


def _timed_out(timeout: float, what: str) -> TimedOut:
    return TimedOut(f"timed out after {timeout}s waiting for {what}")


async def until(predicate: Callable[[], T], timeout: float = DEADLINE, interval: float = INTERVAL,
                what: str = "condition") -> T:
    """`predicate()`'s first truthy value, looking every `interval` s; TimedOut after `timeout` s."""
    end = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > end:
            raise _timed_out(timeout, what)
        await asyncio.sleep(interval)
    return value


def until_blocking(predicate: Callable[[], T], timeout: float = DEADLINE, interval: float = INTERVAL,
                   what: str = "condition") -> T:
    """`until` for code outside an event loop: sleeps the thread between looks."""
    end = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > end:
            raise _timed_out(timeout, what)
        time.sleep(interval)
    return value
