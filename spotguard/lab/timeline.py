"""The lab's timeline: what happened when, in scenario time, printed live and kept for the verdict.

Every part of a run (EC2, the load balancer, spotguard's log, the load) adds
entries here; each is printed at once as one line

    +2:31  alb        standby healthy

with instance ids replaced by their role (`spot-1`, `standby`), and kept with
its data so the summary and the tests can read what happened rather than
parse text; `on_entry`, when given, is handed each entry as it is added (a
test acting during a run, on the lab's event loop).

This module must not decide anything nor look at the world; it records and prints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TextIO

from .clock import ScenarioClock, clock_text

# An instance id, with the word before it when that word is a role ("spot i-…").
_INSTANCE_ID = re.compile(r"\b(?:(spot|standby) )?(i-[0-9a-f]{8,17})\b")


@dataclass(frozen=True)
class Entry:
    at: float  # scenario seconds since the scenario's start
    source: str  # lab | ec2 | alb | spotguard | load
    text: str
    data: Mapping[str, Any] = field(default_factory=dict)


class Timeline:
    def __init__(
        self, clock: ScenarioClock, out: TextIO | None = None, on_entry: Callable[[Entry], None] | None = None
    ) -> None:
        self.clock = clock
        self.out = out
        self.on_entry = on_entry
        self.start = clock.now()  # scenario second 0; moved by begin()
        self.started = False  # before begin(): setup, printed without a time
        self.entries: list[Entry] = []
        self.names: dict[str, str] = {}

    def begin(self) -> None:
        """Scenario second 0 is now; what came before was setup."""
        self.start = self.clock.now()
        self.started = True

    def now(self) -> float:
        return self.clock.now() - self.start

    def name(self, instance_id: str, role: str) -> None:
        self.names[instance_id] = role

    def label(self, instance_id: str | None) -> str:
        if instance_id is None:
            return "-"
        return self.names.get(instance_id, instance_id)

    def humane(self, text: str) -> str:
        """Text with every known instance id replaced by its role ("spot i-0a…" → "spot-1")."""

        def named(match: re.Match[str]) -> str:
            word, iid = match.group(1), match.group(2)
            name = self.names.get(iid, iid)
            if word and not name.startswith(word):
                return f"{word} {name}"
            return name

        return _INSTANCE_ID.sub(named, text)

    def add(self, source: str, text: str, *, at: float | None = None, **data: Any) -> Entry:
        entry = Entry(self.now() if at is None else at, source, self.humane(text), data)
        self.entries.append(entry)
        when = clock_text(entry.at) if self.started else "setup"
        self.say(f"{when:>7}  {source:<10} {entry.text}")
        if self.on_entry is not None:
            self.on_entry(entry)
        return entry

    def say(self, line: str = "") -> None:
        if self.out is not None:
            print(line, file=self.out, flush=True)

    def find(self, source: str, **data: Any) -> list[Entry]:
        """Entries from `source` whose data holds every given key/value."""
        return [e for e in self.entries if e.source == source and all(e.data.get(k) == v for k, v in data.items())]
