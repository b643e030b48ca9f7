"""spotguard.aws: the fast timestamp parser reads what botocore's does, to the same instant;
every request names spotguard in its User-Agent."""

from __future__ import annotations

import pytest
from awsproxy import AwsProxy
from botocore.utils import parse_timestamp as botocore_parse_timestamp

from spotguard import __version__
from spotguard.aws import clients, parse_timestamp


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


async def test_every_request_names_spotguard_in_its_user_agent(moto_world, deployment):
    """CloudTrail's userAgent is how an operator finds spotguard's calls; seen on the wire here."""
    with AwsProxy(moto_world.endpoint_url) as proxy:
        async with clients(moto_world.region, proxy.url) as aws:
            await aws.ec2.describe_instances(InstanceIds=[deployment.spot_instance_id])
            await aws.elbv2.describe_target_health(TargetGroupArn=deployment.target_group_arn)
            await aws.sqs.list_queues()
    agents = [dict((k.lower(), v) for k, v in r.headers)["user-agent"] for r in proxy.requests]
    assert len(agents) == 3
    assert all(a.startswith(f"spotguard/{__version__} aiobotocore/") for a in agents), agents
