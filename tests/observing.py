"""Tells a daemon observer of events as the daemon does, for tests of the observers alone.

Each event is stepped through the real machine and the observer hears it with
the states before and after, so what it reads (a newly doomed spot, say) is
what the machine concluded, not what a test made up.
"""

from __future__ import annotations

from typing import Any

from spotguard.machine import Event, GuardState, Rules, initial, step


class Told:
    """One observer and each guard's machine state, stepped event by event."""

    def __init__(self, observer: Any, rules: Rules) -> None:
        self.observer = observer
        self.rules = rules
        self.states: dict[str, GuardState] = {}

    def event(self, guard: str, event: Event, at: float) -> GuardState:
        old = self.states.get(guard) or initial(self.rules, at)
        new, _ = step(old, event, at)
        self.states[guard] = new
        self.observer.event(guard, event, old, new, at)
        return new
