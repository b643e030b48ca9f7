"""Generates docs/reliability.md from the test suite: `python tests/reliability.py`.

What the document says is read from the tests themselves, never typed in:
  * the fault matrix: every test marked
    `@pytest.mark.fault(fault=..., phase=..., outcome=...)`, found by
    `pytest --collect-only` in a subprocess with this module loaded as a plugin
    (`-p reliability`), which dumps the markers as JSON;
  * the fuzz and property tests: every Hypothesis test and its `max_examples`;
  * the soak's default length and bounds (tests/test_soak.py's constants);
  * the systemd units' `systemd-analyze security --offline=true` exposure.

A soak run may add measured figures (`--soak report.json`, as `make reliability`
does); they live between the MEASURED markers, which `--check` ignores and a
plain regeneration keeps. `--check` exits 1 when the file is stale
(tests/test_reliability_doc.py runs it). This module must not run any test; it
only collects them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
DOC = ROOT / "docs" / "reliability.md"
UNITS = (ROOT / "systemd" / "spotguard.service", ROOT / "systemd" / "spotguard-agent.service")
SOAK_MODULE = "test_soak.py"
MEASURED_BEGIN = "<!-- MEASURED: written by a soak run (make reliability); not checked -->"
MEASURED_END = "<!-- /MEASURED -->"
NO_MEASUREMENT = "No soak run has been recorded here yet: `make reliability` records one."
OUT_ENV = "SPOTGUARD_RELIABILITY_OUT"
FAULT_KEYS = ("fault", "phase", "outcome")
SOAK_CONSTANTS = (
    "DEFAULT_STEPS", "SETTLE_EVERY", "WARMUP", "MAX_HELD_GROWTH", "MAX_RSS_FLOOR", "MAX_RSS_PER_STEP", "STANDBYS",
)


# --------------------------------------------------------------------------- the plugin (runs inside pytest)


def pytest_collection_finish(session: Any) -> None:
    """Dump fault markers, Hypothesis settings and the soak's constants of the collected tests."""
    out = os.environ.get(OUT_ENV)
    if not out:
        return
    faults, fuzz, soak, problems = [], {}, {}, []
    for item in session.items:
        for marker in item.iter_markers("fault"):
            kwargs = {k: marker.kwargs.get(k) for k in FAULT_KEYS}
            complete = all(isinstance(v, str) and v for v in kwargs.values())
            if marker.args or set(marker.kwargs) != set(FAULT_KEYS) or not complete:
                problems.append(f"{item.nodeid}: a fault marker needs exactly fault=, phase=, outcome= "
                                "(non-empty strings)")
                continue
            faults.append({"test": _base(item.nodeid), **kwargs})
        handle = getattr(getattr(item, "obj", None), "hypothesis", None)
        if handle is not None:
            used = getattr(item.obj, "_hypothesis_internal_use_settings", None)
            fuzz[_base(item.nodeid)] = used.max_examples if used is not None else None
        module = getattr(item, "module", None)
        if module is not None and Path(module.__file__).name == SOAK_MODULE and not soak:
            soak = {name: getattr(module, name) for name in SOAK_CONSTANTS}
    Path(out).write_text(json.dumps({"faults": faults, "fuzz": fuzz, "soak": soak, "problems": problems}))


def _base(nodeid: str) -> str:
    """The test's id without its parameters: one row per test, not per case."""
    return nodeid.split("[", 1)[0]


# --------------------------------------------------------------------------- collecting


def test_files() -> list[str]:
    """Only the test files that can hold what the document reports: collecting all of them is slow."""
    wanted = re.compile(r"pytest\.mark\.fault|hypothesis")
    return sorted(
        str(p.relative_to(ROOT)) for p in TESTS.glob("test_*.py") if wanted.search(p.read_text(encoding="utf-8"))
    )


def collect() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "collected.json"
        path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, OUT_ENV: str(out), "PYTHONPATH": path}
        plugins = ["-p", "reliability", "-p", "no:cacheprovider"]
        cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", *plugins, *test_files()]
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode != 0 or not out.exists():
            tail = result.stdout[-3000:] + result.stderr[-3000:]
            raise SystemExit(f"collection failed (exit {result.returncode}):\n{tail}")
        data = json.loads(out.read_text())
    if data["problems"]:
        raise SystemExit("bad fault markers:\n" + "\n".join(data["problems"]))
    return data


def exposure(unit: Path) -> str:
    """`systemd-analyze security --offline=true`'s overall exposure for `unit`, as it prints it."""
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
    try:
        result = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
            capture_output=True, text=True, env=env, timeout=60,
        )
    except FileNotFoundError:
        raise SystemExit("systemd-analyze not found: install the `systemd` package") from None
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", result.stdout)
    if result.returncode != 0 or not match:
        raise SystemExit(f"systemd-analyze security failed on {unit.name}:\n{result.stdout[-2000:]}{result.stderr}")
    return f"{match.group(1)} ({match.group(2)})"


# --------------------------------------------------------------------------- rendering


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def render(data: dict[str, Any], scores: dict[str, str], measured: str) -> str:
    rows: dict[tuple[str, str, str], list[str]] = {}
    for f in data["faults"]:
        tests = rows.setdefault((f["fault"], f["phase"], f["outcome"]), [])
        if f["test"] not in tests:
            tests.append(f["test"])
    faults = sorted(rows.items(), key=lambda kv: (kv[0][0].lower(), kv[0][1].lower(), kv[0][2]))
    fuzz = sorted(data["fuzz"].items())
    total = sum(n for _, n in fuzz if n)
    soak = data["soak"]
    lines = [
        "# Reliability",
        "",
        "Generated by `python tests/reliability.py` from the tests themselves; "
        "`tests/test_reliability_doc.py` fails when this file is stale. Do not edit it by hand: "
        "change the tests (their `@pytest.mark.fault(...)` markers, Hypothesis settings, soak constants) "
        "or the systemd units, then regenerate.",
        "",
        "## Fault matrix",
        "",
        f"{len(faults)} fault/phase rows, proved by {len({t for _, ts in faults for t in ts})} tests "
        "(each row names the tests that carry its marker).",
        "",
        "| fault | phase | outcome | test |",
        "|---|---|---|---|",
    ]
    for (fault, phase, outcome), tests in faults:
        lines.append(f"| {_cell(fault)} | {_cell(phase)} | {_cell(outcome)} | {'<br>'.join(f'`{t}`' for t in tests)} |")
    lines += [
        "",
        "## Fuzz and property tests",
        "",
        f"{len(fuzz)} Hypothesis tests, {total} generated cases per run "
        "(`max_examples`, read from each test's settings).",
        "",
        "| test | cases per run |",
        "|---|---|",
    ]
    lines += [f"| `{test}` | {n if n is not None else '?'} |" for test, n in fuzz]
    lines += ["", "## Soak", ""]
    if soak:
        lines += [
            f"`tests/test_soak.py` runs the real daemon on moto (server mode) for {soak['DEFAULT_STEPS']} random steps "
            f"by default (`SPOTGUARD_SOAK_STEPS=n` for a long run), with {soak['STANDBYS']} standbys, checking "
            f"design.md's invariants after every round and settling the world every {soak['SETTLE_EVERY']} steps "
            "(the guard must then be back on spot alone).",
            f"Memory is measured from the first settle at or after step {soak['WARMUP']} to the end: what the daemon "
            f"holds may grow by less than {_kib(soak['MAX_HELD_GROWTH'])}, the process's RSS (moto included) by less "
            f"than {_kib(soak['MAX_RSS_FLOOR'])} plus {_kib(soak['MAX_RSS_PER_STEP'])} per step, and no asyncio task "
            "may be left behind.",
        ]
    else:
        lines.append("No soak test was collected.")
    lines += ["", MEASURED_BEGIN, measured.strip(), MEASURED_END, ""]
    lines += [
        "## systemd hardening",
        "",
        "`systemd-analyze security --offline=true` overall exposure (0 = locked down, 10 = exposed):",
        "",
        "| unit | exposure |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {score} |" for name, score in scores.items()]
    return "\n".join(lines) + "\n"


def measured_block(text: str) -> str:
    """The measured figures in an existing document, or the placeholder."""
    start, end = text.find(MEASURED_BEGIN), text.find(MEASURED_END)
    if start < 0 or end < start:
        return NO_MEASUREMENT
    return text[start + len(MEASURED_BEGIN):end].strip() or NO_MEASUREMENT


def render_measured(report: dict[str, Any]) -> str:
    per_step = report["rss_growth"] / max(1, report["steps"] - report["baseline_step"])
    return (
        f"Last recorded soak: {report['steps']} steps ({report['rounds']} rounds, {report['settles']} settles, "
        f"{report['simulated_hours']:.1f} simulated hours, {report.get('transitions', '?')} phase changes) "
        f"in {report['seconds']:.0f} s, seed {report['seed']}. "
        f"Growth from step {report['baseline_step']} to the end: daemon-held {report['held_growth']:+d} bytes, "
        f"RSS {report['rss_growth'] / 1024:+.0f} KiB ({per_step:.0f} bytes per step, moto included), "
        f"asyncio tasks {report['task_growth']:+d}."
    )


def without_measured(text: str) -> str:
    """The document with its measured figures cut out: what --check compares."""
    pattern = re.escape(MEASURED_BEGIN) + ".*?" + re.escape(MEASURED_END)
    return re.sub(pattern, MEASURED_BEGIN + MEASURED_END, text, count=1, flags=re.S)


def generate(measured: str | None = None) -> str:
    current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    data = collect()
    scores = {unit.name: exposure(unit) for unit in UNITS}
    return render(data, scores, measured if measured is not None else measured_block(current))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/reliability.md is stale; write nothing")
    parser.add_argument("--soak", type=Path, help="a soak report (SPOTGUARD_SOAK_REPORT) to record as measured figures")
    args = parser.parse_args(argv)
    measured = render_measured(json.loads(args.soak.read_text())) if args.soak else None
    text = generate(measured)
    if args.check:
        current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
        if without_measured(current) != without_measured(text):
            print(f"{DOC.relative_to(ROOT)} is stale: run `python tests/reliability.py`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
