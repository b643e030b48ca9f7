"""Shared test fixtures: an embedded AWS (moto world), clients on it, guard settings.

Tests talk to moto over HTTP with real aiobotocore clients; the world drives
moto's backend for the dynamics moto lacks. Dummy credentials keep any real
AWS account out of reach.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import pytest
from aiobotocore.session import AioSession, get_session

# Before any client exists: dummy credentials, no profiles, no IMDS lookups.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_SECURITY_TOKEN="testing",
    AWS_SESSION_TOKEN="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_CONFIG_FILE="/dev/null",
    AWS_SHARED_CREDENTIALS_FILE="/dev/null",
    AWS_EC2_METADATA_DISABLED="true",
)
os.environ.pop("AWS_PROFILE", None)



def _loopback_only(event: str, args: tuple) -> None:
    """Every connection and datagram a test process makes goes to loopback, never to a private range
    (an audit hook: it sees asyncio's, aiohttp's and botocore's sockets alike)."""
    if event not in ("socket.connect", "socket.sendto"):
        return
    address = args[1] if event == "socket.connect" else args[-1]
    host = address[0] if isinstance(address, tuple) and address else None
    try:
        ip = ipaddress.ip_address(host) if isinstance(host, str) else None
    except ValueError:
        return  # a name: its resolved address is checked when it is connected to
    if ip is not None and ip.is_private and not ip.is_loopback:
        raise PermissionError(f"a test sent to {host}: tests and the lab send only to 127.0.0.0/8")


sys.addaudithook(_loopback_only)

from hypothesis import settings  # noqa: E402

# CI runs the property tests on a fixed seed, so a landing never hangs on a new
# random draw; everywhere else each run explores new examples.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

from spotguard.aws import Clients, clients  # noqa: E402
from spotguard.lab.world import Deployment, MotoWorld  # noqa: E402


@dataclass(frozen=True)
class GuardSpec:
    """The slice of a guard's settings that the poller and executor read."""

    name: str
    target_group_arn: str
    target_port: int | None = None
    spot_request_ids: tuple[str, ...] = ()
    spot_instance_tags: tuple[tuple[str, str], ...] = ()
    standby_instance_ids: tuple[str, ...] = ()
    unhealthy_grace: float = 30.0


def guard_for(deployment: Deployment, name: str = "inference", **overrides: Any) -> GuardSpec:
    """A request-based guard over a provisioned deployment; keywords replace fields."""
    fields: dict[str, Any] = dict(
        name=name,
        target_group_arn=deployment.target_group_arn,
        spot_request_ids=(deployment.spot_request_id,),
        standby_instance_ids=deployment.standby_ids,
    )
    fields.update(overrides)
    return GuardSpec(**fields)


def _atomic_dynamodb() -> None:
    """Make moto's DynamoDB writes atomic, as DynamoDB's are.

    moto's threaded server evaluates a ConditionExpression and applies the
    write without a lock, so two daemons acquiring the [ha] lease at the same
    moment could both see it free and both win: a split brain DynamoDB itself
    never allows. One lock around every item operation restores the guarantee
    the lease relies on.
    """
    from moto.dynamodb.models import DynamoDBBackend

    lock = threading.RLock()
    for name in ("put_item", "update_item", "delete_item", "get_item", "transact_write_items", "transact_get_items",
                 "batch_get_item"):
        original = getattr(DynamoDBBackend, name)
        if getattr(original, "_spotguard_atomic", False):
            continue

        def atomic(self, *args, _original=original, **kwargs):
            with lock:
                return _original(self, *args, **kwargs)

        atomic._spotguard_atomic = True  # type: ignore[attr-defined]
        setattr(DynamoDBBackend, name, atomic)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoWorld]:
    """One moto server for the whole session (starting it is cheap, but why twice)."""
    _atomic_dynamodb()
    with MotoWorld() as world:
        yield world


@pytest.fixture
def moto_world(moto_server: MotoWorld) -> MotoWorld:
    """The session's world, reset to a blank account for this test."""
    moto_server.reset()
    return moto_server


@pytest.fixture
def deployment(moto_world: MotoWorld) -> Deployment:
    """A fresh service: ALB, target group, running spot (registered), two stopped standbys."""
    return moto_world.provision(standbys=2)


@pytest.fixture(scope="session")
def aio_session() -> AioSession:
    """One aiobotocore session: botocore loads the (large) service models once."""
    return get_session()


@pytest.fixture
async def aws(moto_world: MotoWorld, aio_session: AioSession) -> AsyncIterator[Clients]:
    """spotguard's own aiobotocore clients (ec2, elbv2, sqs) pointed at the world."""
    async with clients(moto_world.region, moto_world.endpoint_url, session=aio_session) as made:
        yield made


HA_TABLE = "spotguard-ha"


@pytest.fixture
def table(moto_world: MotoWorld) -> str:
    """The [ha] DynamoDB table, made as `spotguard setup` makes it."""
    from spotguard import ha

    moto_world.boto("dynamodb").create_table(**ha.table_spec(HA_TABLE))
    return HA_TABLE
