"""The lab's instance metadata service (IMDSv2) over real HTTP, and the lab setting its answer at a notice.

The first tests talk to one `InstanceMetadata` on a loopback port: the token
rules (a token from PUT with a valid TTL, 401 without one, 400 for a bad TTL,
403 through a proxy), expiry on the service's own token clock (moved, never
slept through), and the answers before and after a notice. The last one plays
a short lab scenario and asks the spot's IMDS, during the notice period, what
an agent on the host would see.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import AsyncIterator

import aiohttp
import pytest

from spotguard.lab.imds import TOKEN_HEADER, TTL_HEADER, InstanceMetadata
from spotguard.lab.run import run_scenario
from spotguard.lab.scenario import Scenario
from spotguard.lab.timeline import Entry

INSTANCE = "i-0123456789abcdef0"
ACTION = "/latest/meta-data/spot/instance-action"
REBALANCE = "/latest/meta-data/events/recommendations/rebalance"


@pytest.fixture
async def imds() -> AsyncIterator[InstanceMetadata]:
    service = InstanceMetadata(INSTANCE)
    await service.start()
    try:
        yield service
    finally:
        await service.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def token(http: aiohttp.ClientSession, url: str, ttl: str = "21600", **headers: str) -> tuple[int, str]:
    async with http.put(f"{url}/latest/api/token", headers={TTL_HEADER: ttl, **headers}) as reply:
        return reply.status, await reply.text()


async def get(http: aiohttp.ClientSession, url: str, path: str, key: str | None) -> tuple[int, str]:
    headers = {TOKEN_HEADER: key} if key is not None else {}
    async with http.get(url + path, headers=headers) as reply:
        return reply.status, await reply.text()


# --------------------------------------------------------------------------- tokens


async def test_a_token_opens_the_metadata(imds, http):
    async with http.put(f"{imds.url}/latest/api/token", headers={TTL_HEADER: "60"}) as reply:
        assert reply.status == 200
        assert reply.headers[TTL_HEADER] == "60"
        good = await reply.text()
    assert good
    assert await get(http, imds.url, "/latest/meta-data/instance-id", good) == (200, INSTANCE)


@pytest.mark.parametrize("sent", [None, "", "not-a-token"])
async def test_no_valid_token_is_401(imds, http, sent):
    await token(http, imds.url)  # a token exists, just not this one
    assert (await get(http, imds.url, "/latest/meta-data/instance-id", sent))[0] == 401
    assert (await get(http, imds.url, ACTION, sent))[0] == 401
    assert (await get(http, imds.url, "/latest/meta-data/no-such-item", sent))[0] == 401  # token first, then path


async def test_a_token_expires_after_its_ttl_on_the_token_clock(imds, http):
    _, short = await token(http, imds.url, ttl="1")
    _, long = await token(http, imds.url, ttl="21600")
    assert (await get(http, imds.url, "/latest/meta-data/instance-id", short))[0] == 200
    imds.advance(1.0)
    assert (await get(http, imds.url, "/latest/meta-data/instance-id", short))[0] == 401
    assert (await get(http, imds.url, "/latest/meta-data/instance-id", long))[0] == 200
    imds.advance(21600.0)
    assert (await get(http, imds.url, "/latest/meta-data/instance-id", long))[0] == 401
    _, fresh = await token(http, imds.url, ttl="5")  # refresh on 401, as an agent does
    assert (await get(http, imds.url, "/latest/meta-data/instance-id", fresh))[0] == 200


@pytest.mark.parametrize("ttl", ["0", "21601", "-5", "60s", "1.5", "", "abc"])
async def test_a_bad_ttl_is_400(imds, http, ttl):
    assert (await token(http, imds.url, ttl=ttl))[0] == 400


async def test_a_missing_ttl_is_400(imds, http):
    async with http.put(f"{imds.url}/latest/api/token") as reply:
        assert reply.status == 400


async def test_ttl_bounds_are_accepted(imds, http):
    assert (await token(http, imds.url, ttl="1"))[0] == 200
    assert (await token(http, imds.url, ttl="21600"))[0] == 200


async def test_a_token_request_through_a_proxy_is_403(imds, http):
    status, _ = await token(http, imds.url, **{"X-Forwarded-For": "203.0.113.7"})
    assert status == 403


# --------------------------------------------------------------------------- answers


async def test_instance_action_is_404_until_the_notice_then_json(imds, http):
    _, t = await token(http, imds.url)
    assert (await get(http, imds.url, ACTION, t))[0] == 404
    when = datetime(2026, 11, 28, 8, 22, 0, 400000, tzinfo=timezone.utc)
    assert imds.set_interruption(when) == {"action": "terminate", "time": "2026-11-28T08:22:00Z"}
    async with http.get(imds.url + ACTION, headers={TOKEN_HEADER: t}) as reply:
        assert reply.status == 200
        assert reply.content_type == "text/plain"  # IMDS sends JSON as text
        assert await reply.json(content_type=None) == {"action": "terminate", "time": "2026-11-28T08:22:00Z"}
    imds.set_interruption(when, action="stop")
    assert (await get(http, imds.url, ACTION, t))[1] == '{"action": "stop", "time": "2026-11-28T08:22:00Z"}'
    imds.clear_interruption()
    assert (await get(http, imds.url, ACTION, t))[0] == 404
    with pytest.raises(ValueError):
        imds.set_interruption(when, action="reboot")
    with pytest.raises(ValueError):
        imds.set_interruption(datetime(2026, 11, 28, 8, 22))  # naive: no UTC to write


async def test_rebalance_is_404_until_recommended(imds, http):
    _, t = await token(http, imds.url)
    assert (await get(http, imds.url, REBALANCE, t))[0] == 404
    imds.set_rebalance(datetime(2026, 11, 28, 8, 0, tzinfo=timezone(timedelta(hours=1))))
    assert await get(http, imds.url, REBALANCE, t) == (200, '{"noticeTime": "2026-11-28T07:00:00Z"}')
    imds.set_rebalance(None)
    assert (await get(http, imds.url, REBALANCE, t))[0] == 404


async def test_unknown_items_are_404_and_a_closed_service_refuses(imds, http):
    _, t = await token(http, imds.url)
    assert (await get(http, imds.url, "/latest/meta-data/ami-id", t))[0] == 404
    await imds.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await token(http, imds.url)


# --------------------------------------------------------------------------- in the lab


async def test_the_labs_notice_sets_the_spots_instance_action(moto_world):
    """An agent on spot-1 asking its IMDS during the notice period reads terminate at the termination time."""
    speed = 50.0
    scenario = Scenario(
        name="imds", guarded=False, notice_at=5.0, refulfil_after=None, end_after=130.0, tail=0.0, rate=5.0,
    )
    asked: list[asyncio.Task[dict]] = []

    async def ask_like_an_agent(entry: Entry) -> dict:
        async with aiohttp.ClientSession() as http:
            _, t = await token(http, entry.data["imds"], ttl="30")
            status, iid = await get(http, entry.data["imds"], "/latest/meta-data/instance-id", t)
            async with http.get(entry.data["imds"] + ACTION, headers={TOKEN_HEADER: t}) as reply:
                return {"id": (status, iid), "status": reply.status, "answer": await reply.json(content_type=None),
                        "read_at": datetime.now(timezone.utc)}

    def on_entry(entry: Entry) -> None:
        if entry.data.get("kind") == "notice":
            asked.append(asyncio.create_task(ask_like_an_agent(entry)))

    outcome = await run_scenario(scenario, speed=speed, world=moto_world, on_entry=on_entry)
    assert outcome.completed and outcome.problem is None, outcome.problem
    [notice] = [e for e in outcome.entries if e.data.get("kind") == "notice"]
    assert len(asked) == 1
    seen = await asked[0]
    assert seen["id"] == (200, notice.data["instance"])
    assert seen["status"] == 200 and seen["answer"] == notice.data["instance_action"]
    assert seen["answer"]["action"] == "terminate"
    assert "IMDS spot/instance-action" in notice.text and seen["answer"]["time"] in notice.text
    # The time is when the lab terminates the spot, on the wall clock: notice + 120 s scenario = 2.4 s wall
    # (in whole seconds, so up to 1 s earlier).
    left = datetime.fromisoformat(seen["answer"]["time"].replace("Z", "+00:00")) - seen["read_at"]
    assert timedelta(0) < left < timedelta(seconds=scenario.notice_period / speed + 0.5)
    # The terminated spot's metadata service is gone with it.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await token(http, notice.data["imds"])
