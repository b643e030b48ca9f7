"""The benchmark's AWS, in a process of its own: a MotoWorld answering commands on stdin.

Run as `python bench/world_server.py`. It starts `spotguard.lab.world.MotoWorld`
(moto in server mode on a free port) and then reads one JSON object per line
on stdin and answers one JSON line on stdout: `{"op": ..., ...}` →
`{"ok": result}` or `{"error": text}`.

Why a separate process: moto's server answers every request on a thread of the
process it lives in, so `time.process_time()` in a benchmark that embeds it
would count moto's CPU as spotguard's. Here moto burns its own process's CPU and
the benchmark's clock holds spotguard's (and its client libraries') work alone.

Besides building and poking the world, it records *moto's* side of three facts
the benchmark cannot see from outside without polling: when StartInstances
reached the EC2 backend (monotonic clock, comparable across processes on
Linux), how many DescribeSpotInstanceRequests it has answered (one per
daemon round), and every API call it answered by caller and operation (the
caller is the access key id of the request's signature: each process the
benchmark starts signs with its own). It wraps moto's methods for that, never
spotguard's.

This module must not be imported by the benchmark process (it imports moto and
patches its classes); `bench/remote.py` is the parent's side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable

from moto.core.responses import BaseResponse
from moto.ec2.models.instances import InstanceBackend
from moto.ec2.models.spot_requests import SpotRequestBackend

from spotguard.lab.world import MotoWorld


class Recorder:
    """Moto-side observations: StartInstances arrivals and spot-request describes."""

    def __init__(self) -> None:
        self.starts: list[tuple[float, list[str]]] = []
        self.started = threading.Condition()
        self.describes = 0
        self.calls: Counter[tuple[str, str]] = Counter()  # (access key id, operation) -> answered
        self._calls_lock = threading.Lock()  # moto answers on many threads
        self._originals: dict[tuple[type, str], Callable[..., Any]] = {}

    def install(self) -> None:
        # Installed after MotoWorld's own patches, so these wrap the world's versions.
        self._wrap(InstanceBackend, "start_instances", self._on_start)
        self._wrap(SpotRequestBackend, "describe_spot_instance_requests", self._on_describe)
        self._count_calls()

    def uninstall(self) -> None:
        for (cls, name), original in self._originals.items():
            setattr(cls, name, original)
        self._originals.clear()

    def _wrap(self, cls: type, name: str, hook: Callable[..., None]) -> None:
        original = getattr(cls, name)
        self._originals[(cls, name)] = original

        def wrapped(backend: Any, *args: Any, **kwargs: Any) -> Any:
            hook(*args, **kwargs)
            return original(backend, *args, **kwargs)

        setattr(cls, name, wrapped)

    def _count_calls(self) -> None:
        original = BaseResponse.call_action
        self._originals[(BaseResponse, "call_action")] = original
        recorder = self

        def call_action(response: Any) -> Any:
            key = (response.get_access_key(), response._get_action())
            with recorder._calls_lock:
                recorder.calls[key] += 1
            return original(response)

        BaseResponse.call_action = call_action  # type: ignore[method-assign]

    def calls_by(self, caller: str) -> dict[str, int]:
        with self._calls_lock:
            return {op: n for (who, op), n in self.calls.items() if who == caller}

    def _on_start(self, instance_ids: list[str], *_: Any, **__: Any) -> None:
        at = time.monotonic()  # first thing: the moment the request reached EC2
        with self.started:
            self.starts.append((at, list(instance_ids)))
            self.started.notify_all()

    def _on_describe(self, *_: Any, **__: Any) -> None:
        self.describes += 1  # one int store under the GIL: no lock needed

    def wait_start(self, after: int, timeout: float) -> tuple[float, list[str]] | None:
        """The first StartInstances recorded at index >= `after`, waiting up to `timeout`."""
        with self.started:
            self.started.wait_for(lambda: len(self.starts) > after, timeout=timeout)
            return self.starts[after] if len(self.starts) > after else None


class Server:
    """The commands the benchmark may send; each returns something JSON can carry."""

    def __init__(self, world: MotoWorld, recorder: Recorder) -> None:
        self.world = world
        self.recorder = recorder

    def endpoint(self) -> dict[str, str]:
        return {"endpoint_url": self.world.endpoint_url, "region": self.world.region}

    def reset(self) -> None:
        self.world.reset()
        self.recorder.starts.clear()
        self.recorder.describes = 0

    def provision(self, name: str, standbys: int = 1, spots: int = 1) -> dict[str, Any]:
        """A deployment as a dict; with `spots` above 1, that many spot requests behind its target group."""
        d = self.world.provision(name, standbys=standbys)
        more = [self.world.add_spot(d) for _ in range(spots - 1)]
        return {**dataclasses.asdict(d), "spot_request_ids": [d.spot_request_id] + [r for r, _ in more]}

    def notice(self, request_id: str) -> float:
        self.world.notice(request_id)
        return time.monotonic()  # the status is flipped: from here the poll can see it

    def starts(self) -> int:
        return len(self.recorder.starts)

    def wait_start(self, after: int, timeout: float = 10.0) -> list | None:
        found = self.recorder.wait_start(after, timeout)
        return [found[0], found[1]] if found else None

    def describes(self) -> int:
        return self.recorder.describes

    def calls(self, caller: str) -> dict[str, int]:
        """API calls answered so far for requests signed with access key id `caller`, by operation."""
        return self.recorder.calls_by(caller)

    def terminate_spot(self, request_id: str) -> str:
        return self.world.terminate_spot(request_id)

    def fulfil(self, request_id: str) -> str:
        return self.world.fulfil(request_id)

    def restore(self, deployment: dict[str, Any]) -> None:
        """Put a failed-over deployment back as provisioned: spot serving, standbys stopped."""
        request = self.world._spot_request(deployment["spot_request_id"])
        request._status_code = "fulfilled"
        request.status_message = "Your Spot request is fulfilled."
        tg = deployment["target_group_arn"]
        for sid in deployment["standby_ids"]:
            self.world.set_health(tg, sid, None)
        self.world.ec2_backend.stop_instances(list(deployment["standby_ids"]))
        elbv2 = self.world.boto("elbv2")
        registered = self.world.health(tg)
        stray = [{"Id": i} for i in deployment["standby_ids"] if i in registered]
        if stray:
            elbv2.deregister_targets(TargetGroupArn=tg, Targets=stray)
        if deployment["spot_instance_id"] not in registered:
            elbv2.register_targets(TargetGroupArn=tg, Targets=[{"Id": deployment["spot_instance_id"]}])

    def rss_kib(self) -> int:
        return _status_kib(os.getpid(), "VmRSS")


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def serve(commands: Any, replies: Any, server: Server) -> None:
    for line in commands:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            replies.write(json.dumps({"ok": None}) + "\n")
            replies.flush()
            return
        try:
            reply = {"ok": getattr(server, op)(**request)}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
            reply = {"error": f"{op}: {type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    # Replies get a private copy of stdout; anything moto or werkzeug prints goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    recorder = Recorder()
    with MotoWorld() as world:
        recorder.install()
        try:
            serve(sys.stdin, replies, Server(world, recorder))
        finally:
            recorder.uninstall()


if __name__ == "__main__":
    main()
