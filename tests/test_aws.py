"""spotguard.aws: the fast timestamp parser reads what botocore's does, to the same instant."""

from __future__ import annotations

import pytest
from botocore.utils import parse_timestamp as botocore_parse_timestamp

from spotguard.aws import parse_timestamp


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-28T08:22:00.000Z",  # EC2
        "2026-11-28T08:22:00Z",
        "2026-11-28T08:22:00.123456+09:00",
        "2026-11-28",
        1764318120,  # epoch seconds
        "1764318120.5",
        "Sat, 28 Nov 2026 08:22:00 GMT",  # RFC 822
    ],
)
def test_same_instant_as_botocore(value):
    ours, theirs = parse_timestamp(value), botocore_parse_timestamp(value)
    assert ours == theirs and ours.utcoffset() == theirs.utcoffset()


def test_garbage_is_refused_as_botocore_refuses_it():
    with pytest.raises(ValueError):
        botocore_parse_timestamp("2026-13-45Tnonsense")
    with pytest.raises(ValueError):
        parse_timestamp("2026-13-45Tnonsense")
