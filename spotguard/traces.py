"""Real spot traces: what `spotguard simulate` replays, shipped in compact form, and a user's own.

A trace says, every `gap` seconds, how many spot instances were running (the
1-node traces: 1 or 0). A 1 → 0 step is an interruption; the following 0 → 1
step is the persistent request fulfilled again. Shipped traces come from the
NSDI 2024 data set of Wu et al. ("Can't Be Late"), kept run-length encoded in
spotguard/data/traces.json (`python -m spotguard.traces SOURCE_DIR` rebuilds
it from the data set's files). `load_file` reads a file of the data set's own
JSON format and refuses anything else with one line that says why.

This module must not simulate anything; it reads, checks and describes traces.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

SOURCE = ("Wu et al., Can't Be Late: Optimizing Spot Instance Savings under Deadlines, NSDI 2024; "
          "data: github.com/skypilot-org/spot-traces (commit 221da1a)")
DATA = "traces.json"
MAX_FILE = 64 * 1024 * 1024  # bytes of a user's trace file read; the shipped ones are under 1 MiB each
MAX_GAP = 86400


class TraceError(ValueError):
    """A trace file spotguard cannot use, and why (one line)."""


@dataclass(frozen=True)
class Trace:
    """One trace: a name, the seconds between samples, and (value, samples) runs in order."""

    name: str
    gap: float
    runs: tuple[tuple[int, int], ...]

    @property
    def seconds(self) -> float:
        return self.gap * sum(n for _, n in self.runs)

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    def steps(self) -> Iterator[tuple[float, int]]:
        """(time, running) at the start of each run: time 0 first."""
        at = 0.0
        for value, n in self.runs:
            yield at, value
            at += n * self.gap

    def interruptions(self) -> list[float]:
        """The times of each step down (a spot running before, fewer after)."""
        out, before = [], None
        for at, value in self.steps():
            if before is not None and value < before:
                out.append(at)
            before = value
        return out

    def gaps(self) -> list[float]:
        """How long each interruption left fewer spots running (to the end of the trace for the last)."""
        out, down_at, before = [], None, None
        for at, value in self.steps():
            if before is not None and value < before and down_at is None:
                down_at = at
            elif before is not None and value > before and down_at is not None:
                out.append(at - down_at)
                down_at = None
            before = value
        if down_at is not None:
            out.append(self.seconds - down_at)
        return out


def encode(values: list[int]) -> tuple[tuple[int, int], ...]:
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return tuple((v, n) for v, n in runs)


def parse(name: str, document: Any) -> Trace:
    """A trace from the data set's JSON document ({"metadata": {"gap_seconds": G}, "data": [...]})."""
    if not isinstance(document, dict):
        raise TraceError(f"{name}: expected a JSON object with metadata.gap_seconds and data")
    meta = document.get("metadata")
    gap = meta.get("gap_seconds") if isinstance(meta, dict) else None
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not 0 < gap <= MAX_GAP:
        raise TraceError(f"{name}: metadata.gap_seconds must be a number of seconds in (0, {MAX_GAP}], got {gap!r}")
    data = document.get("data")
    if not isinstance(data, list) or not data:
        raise TraceError(f"{name}: data must be a non-empty list of instance counts")
    for i, v in enumerate(data):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TraceError(f"{name}: data[{i}] must be a whole number of running instances (0, 1, ...), got {v!r}")
    return Trace(name, float(gap), encode(data))


def load_file(path: Path) -> Trace:
    """A user's trace file in the data set's format; TraceError with the reason otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE:
        raise TraceError(f"{path}: larger than {MAX_FILE // (1024 * 1024)} MiB")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise TraceError(f"{path}: not JSON ({exc})") from None
    return parse(path.name.removesuffix(".json"), document)


def shipped() -> dict[str, Trace]:
    """The traces that come with spotguard, by name (e.g. preemption/p3.2xlarge/us-east-1c)."""
    document = json.loads(resources.files("spotguard").joinpath("data").joinpath(DATA).read_text())
    return {name: Trace(name, float(t["gap"]), tuple((v, n) for v, n in t["runs"]))
            for name, t in document["traces"].items()}


# Instance types by the data set's file suffix.
_TYPES = {"v100_1": "p3.2xlarge", "intel_64": "r5.16xlarge"}


def _shipped_name(path: Path) -> str:
    """preemption/1-node/aws-04-22-2023/us-west-2b_v100_1.json → preemption/p3.2xlarge/us-west-2b."""
    kind = path.parts[-4]
    zone, _, suffix = path.stem.partition("_")
    return f"{kind}/{_TYPES.get(suffix, suffix)}/{zone}"


def build(source: Path) -> dict[str, Any]:
    """The compact document of every 1-node trace under `source` (the data set's folders)."""
    traces = {}
    for path in sorted(source.glob("*/1-node/*/*.json")):
        trace = parse(_shipped_name(path), json.loads(path.read_text()))
        traces[trace.name] = {"gap": trace.gap, "runs": [list(r) for r in trace.runs],
                              "file": str(path.relative_to(source))}
    return {"source": SOURCE, "traces": traces}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m spotguard.traces SOURCE_DIR (the spot-traces folders)", file=sys.stderr)
        return 2
    document = build(Path(argv[0]))
    target = Path(__file__).parent / "data" / DATA
    target.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    print(f"wrote {target}: {len(document['traces'])} traces, {target.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
