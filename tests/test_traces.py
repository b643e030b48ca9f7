"""The shipped spot traces (the NSDI 2024 data set, run-length encoded) and a user's own trace files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotguard import traces
from spotguard.traces import Trace, TraceError, load_file, parse

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "traces"


def decode(trace: Trace) -> list[int]:
    return [v for v, n in trace.runs for _ in range(n)]


@given(st.lists(st.integers(0, 3), min_size=1, max_size=300))
def test_run_length_encoding_loses_nothing(values):
    trace = parse("t", {"metadata": {"gap_seconds": 30}, "data": values})
    assert decode(trace) == values
    assert all(a[0] != b[0] for a, b in zip(trace.runs, trace.runs[1:]))  # runs are maximal
    assert trace.seconds == 30 * len(values)


def test_the_shipped_traces_are_the_data_sets_as_its_readme_counts_them():
    shipped = traces.shipped()
    assert len(shipped) == 16
    kinds = {name: t for name, t in shipped.items()}
    p3 = [t for n, t in kinds.items() if n.startswith("preemption/p3.2xlarge/")]
    r5 = [t for n, t in kinds.items() if n.startswith("preemption/r5.16xlarge/")]
    availability = [t for n, t in kinds.items() if n.startswith("availability/")]
    assert (len(p3), len(r5), len(availability)) == (4, 3, 9)
    assert {t.gap for t in p3} == {32.0} and {t.gap for t in r5} == {34.0} and {t.gap for t in availability} == {195}
    assert sorted(len(t.interruptions()) for t in p3) == [41, 44, 57, 60]  # "41–60 per week per zone"
    assert sorted(len(t.interruptions()) for t in r5) == [27, 66, 128]
    assert all(round(t.hours / 24, 1) == 7.4 for t in p3) and all(round(t.hours / 24, 1) == 45.5
                                                                 for t in availability)
    for t in shipped.values():
        assert len(t.gaps()) == len(t.interruptions()) and min(t.gaps()) >= t.gap


@pytest.mark.skipif(not SOURCE.is_dir(), reason="the data set's files are beside the project only in development")
def test_the_shipped_file_is_rebuilt_from_the_data_set_unchanged():
    built = traces.build(SOURCE)
    assert set(built["traces"]) == set(traces.shipped())
    for name, t in built["traces"].items():
        original = json.loads((SOURCE / t["file"]).read_text())
        assert decode(traces.shipped()[name]) == original["data"]


def test_gaps_and_interruptions_of_a_small_trace():
    trace = parse("t", {"metadata": {"gap_seconds": 10}, "data": [1, 1, 0, 0, 0, 1, 0, 1, 1, 0]})
    assert trace.interruptions() == [20.0, 60.0, 90.0]
    assert trace.gaps() == [30.0, 10.0, 10.0]  # the last runs to the end of the trace
    assert trace.hours == pytest.approx(100 / 3600)


@pytest.mark.parametrize("document,reason", [
    ([1, 0], "expected a JSON object with metadata.gap_seconds and data"),
    ({"data": [1]}, "metadata.gap_seconds must be a number of seconds in (0, 86400], got None"),
    ({"metadata": {"gap_seconds": 0}, "data": [1]}, "metadata.gap_seconds must be a number of seconds in (0, 86400], "
                                                    "got 0"),
    ({"metadata": {"gap_seconds": True}, "data": [1]}, "metadata.gap_seconds must be a number of seconds in "
                                                       "(0, 86400], got True"),
    ({"metadata": {"gap_seconds": 30}, "data": []}, "data must be a non-empty list of instance counts"),
    ({"metadata": {"gap_seconds": 30}, "data": [1, 0.5]}, "data[1] must be a whole number of running instances "
                                                          "(0, 1, ...), got 0.5"),
    ({"metadata": {"gap_seconds": 30}, "data": [1, -1]}, "data[1] must be a whole number of running instances "
                                                         "(0, 1, ...), got -1"),
])
def test_a_bad_trace_is_refused_with_the_reason(document, reason):
    with pytest.raises(TraceError) as caught:
        parse("mine", document)
    assert str(caught.value) == f"mine: {reason}"


def test_a_users_file(tmp_path):
    good = tmp_path / "zone-a.json"
    good.write_text(json.dumps({"metadata": {"gap_seconds": 60}, "data": [1, 1, 0, 1]}))
    assert load_file(good) == Trace("zone-a", 60.0, ((1, 2), (0, 1), (1, 1)))
    broken = tmp_path / "broken.json"
    broken.write_text('{"metadata": ')
    with pytest.raises(TraceError, match=r"broken.json: not JSON"):
        load_file(broken)
    with pytest.raises(TraceError, match=r"missing.json: No such file or directory"):
        load_file(tmp_path / "missing.json")
