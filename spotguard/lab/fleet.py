"""The lab's EC2 clockwork and the software on each instance.

`Fleet.tick()` lets time pass as EC2 does (`pending` → `running` after the
boot, `stopping` → `stopped`), runs each instance's software while it runs (an
`InstanceApp` that serves after its warm-up, and its IMDSv2 service), logs
every state change on the timeline and counts the On-Demand seconds.

This module must not register targets or decide anything spotguard decides.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable

from .app import InstanceApp
from .clock import ScenarioClock, span_text
from .imds import InstanceMetadata
from .timeline import Timeline

LIVE = frozenset({"pending", "running"})


@dataclass
class _Known:
    role: str
    warm_up: float
    on_demand: bool
    warm: bool = False  # already serving when the lab began: its first app needs no warm-up
    state: str | None = None
    since: float = 0.0
    running_since: float | None = None
    billed: float = 0.0  # closed running intervals, scenario seconds
    app: InstanceApp | None = None
    imds: InstanceMetadata | None = None
    announced_ready: bool = False


class Fleet:
    def __init__(
        self,
        world: Any,
        clock: ScenarioClock,
        timeline: Timeline,
        *,
        boot: float,
        stop_time: float,
        latency: float,
        port: int,
        concurrency: int | None = None,
        on_state: Callable[[str, str], None] = lambda instance_id, state: None,
    ) -> None:
        self.world = world
        self.target_port = port  # the target group's: every instance's service listens on it
        self.on_state = on_state  # (instance id, new state): what EC2 announces on EventBridge
        self.clock = clock
        self.timeline = timeline
        self.boot = boot
        self.stop_time = stop_time
        self.latency = latency
        self.concurrency = concurrency  # requests each instance serves at a time (None: no limit)
        self._known: dict[str, _Known] = {}
        self._spots: dict[str, tuple[str, float]] = {}  # spot request id → (role prefix, warm-up)
        self._spot_count = 0
        self._ticking = asyncio.Lock()  # the runner's loop and the script both tick

    # ------------------------------------------------------------------ what the lab knows

    def watch(self, instance_id: str, role: str, *, warm_up: float, on_demand: bool = False,
              warm: bool = False) -> None:
        self._known[instance_id] = _Known(role, warm_up, on_demand, warm)
        self.timeline.name(instance_id, role)

    def follow_spot_request(self, request_id: str, *, warm_up: float) -> None:
        """Watch every instance this persistent request launches, as spot-1, spot-2, ...

        The one it has now is taken as long warm: it was serving before the lab began.
        """
        self._spots[request_id] = ("spot", warm_up)
        current = self.world.spot_instance_id(request_id)
        if current is not None:
            self._spot_count += 1
            self.watch(current, f"spot-{self._spot_count}", warm_up=warm_up, warm=True)

    def role(self, instance_id: str) -> str | None:
        known = self._known.get(instance_id)
        return known.role if known else None

    def address(self, instance_id: str) -> tuple[str, int] | None:
        """Where the instance's app listens (its private address, the target port); None when
        nothing listens (any thread)."""
        known = self._known.get(instance_id)
        app = known.app if known else None
        return app.address if app is not None else None

    def metadata(self, instance_id: str) -> InstanceMetadata | None:
        """The instance's metadata service, None when it is not running."""
        known = self._known.get(instance_id)
        return known.imds if known else None

    def spot_metadata(self) -> dict[str, str]:
        """The metadata service URL of every spot instance that runs now, by instance id."""
        return {iid: k.imds.url for iid, k in self._known.items() if k.role.startswith("spot") and k.imds is not None}

    def live(self, instance_id: str) -> bool:
        """Whether EC2 shows the instance pending or running (reads moto's backend; any thread)."""
        return self.world.instance_state(instance_id) in LIVE

    def on_demand_seconds(self) -> float:
        """Scenario seconds On-Demand instances have spent running, so far."""
        now = self.clock.now()
        return sum(
            k.billed + (now - k.running_since if k.running_since is not None else 0.0)
            for k in self._known.values()
            if k.on_demand
        )

    # ------------------------------------------------------------------ time passing

    async def tick(self) -> None:
        async with self._ticking:
            self._discover_spots()
            for instance_id, known in list(self._known.items()):
                await self._advance(instance_id, known)

    def _discover_spots(self) -> None:
        for request_id, (prefix, warm_up) in self._spots.items():
            instance_id = self.world.spot_instance_id(request_id)
            if instance_id is not None and instance_id not in self._known:
                self._spot_count += 1
                self.watch(instance_id, f"{prefix}-{self._spot_count}", warm_up=warm_up)

    async def _advance(self, instance_id: str, known: _Known) -> None:
        now = self.clock.now()
        state = self.world.instance_state(instance_id)
        if state != known.state:
            self._changed(instance_id, known, state, now)
        if state == "pending" and now - known.since >= self.boot:
            self.world.set_state(instance_id, "running")
            self._changed(instance_id, known, "running", now)
        elif state == "stopping" and now - known.since >= self.stop_time:
            self.world.set_state(instance_id, "stopped")
            self._changed(instance_id, known, "stopped", now)
        if known.state == "running" and known.app is None:
            await self._start_app(instance_id, known)
        elif known.state != "running" and known.app is not None:
            known.app.kill()
            known.app = None
            await self._close_imds(known)
            self.timeline.add("app", f"{known.role} killed: any request in flight fails", instance=instance_id)
        if known.app is not None and known.app.ready and not known.announced_ready:
            known.announced_ready = True
            if known.warm_up > 0:
                self.timeline.add("app", f"{known.role} warmed up: serving", instance=instance_id)

    def _changed(self, instance_id: str, known: _Known, state: str | None, now: float) -> None:
        old = known.state
        known.state, known.since = state, now
        if old == "running" and known.running_since is not None:
            known.billed += now - known.running_since
            known.running_since = None
        if state == "running":
            known.running_since = now
        if old is not None:
            self.timeline.add("ec2", f"{known.role} {old} → {state}", instance=instance_id, old=old, new=state)
            if state is not None:
                self.on_state(instance_id, state)

    async def _start_app(self, instance_id: str, known: _Known) -> None:
        warm_up = 0.0 if known.warm else known.warm_up
        known.warm = False  # a restart loads the model again
        known.app = InstanceApp(instance_id, self.clock, warm_up=warm_up, latency=self.latency,
                                concurrency=self.concurrency)
        known.announced_ready = False
        await known.app.start(self.world.private_address(instance_id), self.target_port)
        # A fresh service per boot: what it answered belonged to the instance's last run.
        known.imds = InstanceMetadata(instance_id, region=self.world.region)
        await known.imds.start()
        if warm_up > 0:
            self.timeline.add(
                "app", f"{known.role} booted: loading its model ({span_text(warm_up)})", instance=instance_id
            )

    async def close(self) -> None:
        for known in self._known.values():
            if known.app is not None:
                known.app.kill()
                known.app = None
            await self._close_imds(known)

    @staticmethod
    async def _close_imds(known: _Known) -> None:
        if known.imds is not None:
            imds, known.imds = known.imds, None
            await imds.close()
