"""docs/reliability.md is what tests/reliability.py generates from the tests, and stays so.

The check collects the marked tests in a subprocess (`pytest --collect-only`)
and runs `systemd-analyze security --offline=true`: a few seconds. A stale
document fails with the command that fixes it.
"""

from __future__ import annotations

import reliability

REPORT = {
    "seed": 7, "steps": 5000, "rounds": 5300, "settles": 34, "seconds": 290.0, "baseline_step": 300,
    "held_growth": 120, "traced_growth": 0, "rss_growth": 4 * 1024 * 1024, "task_growth": 0, "simulated_hours": 60.2,
}


def test_the_document_is_current():
    assert reliability.main(["--check"]) == 0, "docs/reliability.md is stale: run `python tests/reliability.py`"


def test_measured_figures_are_kept_and_ignored_by_the_check():
    data = {"faults": [{"test": "tests/test_x.py::test_y", "fault": "f", "phase": "p", "outcome": "o"}],
            "fuzz": {"tests/test_x.py::test_z": 50}, "soak": {}, "problems": []}
    one = reliability.render(data, {"u.service": "1.1 (OK)"}, reliability.render_measured(REPORT))
    other = reliability.render(data, {"u.service": "1.1 (OK)"}, reliability.NO_MEASUREMENT)
    assert "5000 steps" in one and "seed 7" in one and "+4096 KiB" in one
    assert reliability.measured_block(one) == reliability.render_measured(REPORT)
    assert reliability.measured_block("no markers") == reliability.NO_MEASUREMENT
    assert one != other and reliability.without_measured(one) == reliability.without_measured(other)
    # ... but anything outside the block counts.
    changed = reliability.render(data, {"u.service": "1.2 (OK)"}, reliability.NO_MEASUREMENT)
    assert reliability.without_measured(changed) != reliability.without_measured(other)


def test_a_fault_row_names_its_tests_once_and_cells_stay_in_their_column():
    data = {"faults": [{"test": "tests/t.py::a", "fault": "x|y", "phase": "p", "outcome": "o"},
                       {"test": "tests/t.py::a", "fault": "x|y", "phase": "p", "outcome": "o"},
                       {"test": "tests/t.py::b", "fault": "x|y", "phase": "p", "outcome": "o"}],
            "fuzz": {}, "soak": {}, "problems": []}
    text = reliability.render(data, {}, reliability.NO_MEASUREMENT)
    assert "| x\\|y | p | o | `tests/t.py::a`<br>`tests/t.py::b` |" in text
