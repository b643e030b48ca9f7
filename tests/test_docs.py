"""The numbers the README and docs/operations.md quote are the code's own.

The timing advice is said in one voice (timing.py): these tests read the
documents and recompute every figure they quote, so a change to the budget
that the docs do not follow fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spotguard.timing import MARGIN, NOTICE, SQS_DETECTION, Budget, advised_delay

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/operations.md")
EXAMPLE = re.compile(r"with SQS detection \((\d+) s\) and a standby healthy (\d+) s after StartInstances that is "
                     r"(\d+) s")
FORMULA = re.compile(r"(\d+) s − (\d+) s margin − detection − ready, rounded down to (\d+) s")


def text(name: str) -> str:
    return " ".join((ROOT / name).read_text().split())  # one line: sentences wrap anywhere


@pytest.mark.parametrize("name", DOCS)
def test_the_advised_deregistration_delay_is_the_budgets_own(name):
    doc = text(name)
    examples = EXAMPLE.findall(doc)
    assert examples, f"{name} quotes no advised delay"
    for detect, ready, advised in examples:
        assert float(detect) == SQS_DETECTION
        assert advised_delay(float(detect), float(ready)) == float(advised)
    ((notice, margin, step),) = set(FORMULA.findall(doc))
    assert (float(notice), float(margin), float(step)) == (NOTICE, MARGIN, 5.0)
    # The three numbers issue 20 found (~60 s, ~100 s, 90 s) are gone for good.
    for stale in ("~60 s", "~100 s", "90s or less", "over ~100"):
        assert stale not in doc, f"{name} still says {stale!r}"


def test_the_over_budget_example_is_what_check_prints():
    doc = text("docs/operations.md")
    budget = Budget(detect=5.0, ready=30.0, drain=300.0)  # the lab's poll, estimate and AWS's default delay
    assert f"timing: not rehearsed; leaving out your service's boot: {budget.text('start ~20s + health checks 10s')}" \
        in doc
    assert f"— {budget.change()}: aws elbv2" in doc
    assert f"Value={advised_delay(5.0, 30.0):.0f}" in doc
