"""The memory and CPU floor: a bare aiobotocore process making spotguard's poll calls.

Run as `python bench/floor.py SPEC.json`. SPEC names an endpoint, a region,
a poll interval and the ids a set of guards watches (spot request ids, standby
ids, target group ARNs). The process opens the same three aiobotocore clients
as `spotguard.aws.clients` (ec2, elbv2, sqs, one session, the same retry and
timeout config, a fixed User-Agent, the same timestamp parser, and spotguard's lean EC2 model: the
directory `data_path` put first on botocore's search path, as spotguard.aws
does) and every interval makes the calls of one spotguard poll
round: one DescribeSpotInstanceRequests, one DescribeInstances for the
requests' instances and the standbys, and, concurrently as spotguard's poller
does, one DescribeTargetHealth per target group when the last ones are
`health_every` seconds old (spotguard's poller reuses a steady guard's target
health for unhealthy_grace / 3). After the first round it sends
READY=1 to $NOTIFY_SOCKET, as `spotguard run` does, and it exits 0 on SIGTERM.

Whatever `spotguard run` holds beyond this process is spotguard's own cost
(its modules, structlog, the state machine, the store, the logs).

This module must not import spotguard (that would put spotguard's cost into
the floor) nor act on anything: it only describes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import socket
import sys
import time
from contextlib import AsyncExitStack

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.utils import parse_timestamp as botocore_parse_timestamp

# spotguard/aws.py's client_config, copied rather than imported (see the docstring).
RETRIES = {"mode": "standard", "max_attempts": 5}
READ_TIMEOUT = {"sqs": 30.0}


def _parse_timestamp(value):
    """spotguard/aws.py's parse_timestamp, copied likewise: ISO 8601 by datetime.fromisoformat."""
    if isinstance(value, str) and len(value) >= 10 and value[4] == "-" and value[7] == "-":
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            pass
    return botocore_parse_timestamp(value)


# spotguard.aws sets a fixed User-Agent (botocore then skips building its own); so does the floor.
USER_AGENT = "spotguard-bench-floor"


def _config(service: str) -> AioConfig:
    return AioConfig(retries=RETRIES, connect_timeout=5.0, read_timeout=READ_TIMEOUT.get(service, 15.0),
                     user_agent=USER_AGENT)


def _notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())


async def _round(ec2, elbv2, spec: dict, health: bool) -> None:
    async def spot_view() -> None:
        reply = await ec2.describe_spot_instance_requests(SpotInstanceRequestIds=spec["request_ids"])
        spots = [r["InstanceId"] for r in reply["SpotInstanceRequests"] if r.get("InstanceId")]
        await ec2.describe_instances(InstanceIds=list(dict.fromkeys(spots + spec["standby_ids"])))

    groups = spec["target_groups"] if health else []
    await asyncio.gather(spot_view(), *(elbv2.describe_target_health(TargetGroupArn=a) for a in groups))


async def main(spec: dict) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    session = get_session()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
    session.get_component("data_loader").search_paths.insert(0, spec["data_path"])
    async with AsyncExitStack() as stack:
        ec2, elbv2, _sqs = [
            await stack.enter_async_context(
                session.create_client(
                    name, region_name=spec["region"], endpoint_url=spec["endpoint_url"], config=_config(name)
                )
            )
            for name in ("ec2", "elbv2", "sqs")
        ]
        rounds, described = 0, float("-inf")
        while not stop.is_set():
            began = time.monotonic()
            health = began - described >= spec["health_every"]
            await _round(ec2, elbv2, spec, health)
            described = began if health else described
            rounds += 1
            if rounds == 1:
                _notify("READY=1")
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, began + spec["interval"] - time.monotonic()))
            except asyncio.TimeoutError:
                pass


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        asyncio.run(main(json.load(f)))
