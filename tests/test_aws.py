"""spotguard.aws: the fast timestamp parser reads what botocore's does, to the same instant;
every request carries botocore's User-Agent naming spotguard, built once per client."""

from __future__ import annotations

import re

import aiobotocore
import botocore
import pytest
from awsproxy import AwsProxy
from botocore.useragent import UserAgentString
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


@pytest.mark.parametrize("app_id", [None, "ops-team"])
async def test_every_request_names_spotguard_in_botocores_user_agent(moto_world, deployment, monkeypatch, app_id):
    """CloudTrail's userAgent is how an operator finds spotguard's calls; seen on the wire here.

    botocore's own string (ua/2.1, named once) with spotguard's token, and the operator's
    AWS_SDK_UA_APP_ID as app/ when set; built once per client, not per request (the CPU saving).
    """
    if app_id is None:
        monkeypatch.delenv("AWS_SDK_UA_APP_ID", raising=False)
    else:
        monkeypatch.setenv("AWS_SDK_UA_APP_ID", app_id)
    builds = []
    build_sdk_metadata = UserAgentString._build_sdk_metadata
    monkeypatch.setattr(UserAgentString, "_build_sdk_metadata", lambda ua: builds.append(1) or build_sdk_metadata(ua))
    with AwsProxy(moto_world.endpoint_url) as proxy:
        async with clients(moto_world.region, proxy.url) as aws:
            for _ in range(2):
                await aws.ec2.describe_instances(InstanceIds=[deployment.spot_instance_id])
                await aws.elbv2.describe_target_health(TargetGroupArn=deployment.target_group_arn)
                await aws.sqs.list_queues()
    agents = [dict((k.lower(), v) for k, v in r.headers)["user-agent"] for r in proxy.requests]
    assert len(agents) == 6 and len(builds) == 3, (agents, builds)
    for agent in agents:
        parts = agent.split(" ")
        assert parts[:2] == [f"aiobotocore/{aiobotocore.__version__}", f"md/Botocore#{botocore.__version__}"], agent
        assert len(re.findall(r"(?<![a-z])botocore", agent, re.IGNORECASE)) == 1, agent
        assert "ua/2.1" in parts and parts[-1] == f"spotguard/{__version__}", agent
        assert [p for p in parts if p.startswith("app/")] == ([] if app_id is None else [f"app/{app_id}"]), agent
