"""The executor: carries out the machine's commands against EC2 and ELBv2.

`Executor.run(guard, command)` performs one Start, Stop, Register or
Deregister and returns None, or `machine.Failed(command, code)` when AWS or the
network said no. Every command is idempotent against reality (starting a
running instance, deregistering an absent target: success). Each action is
logged once as `executor.action`.

This module must not decide, retry beyond botocore's bounded retries, raise
for AWS or network errors, or send alerts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterable

import structlog

from spotguard.aws import AWS_ERRORS, error_code
from spotguard.machine import Alert, Command, Deregister, Failed, Register, Start, Stop

log = structlog.get_logger("spotguard.executor")

# DeregisterTargets answers InvalidTarget for a target that is not registered
# (or no longer exists): either way the target is not in the group, which is
# what Deregister wants.
ABSENT_TARGET = "InvalidTarget"
# The AWS call behind each command: the one name logs, metrics and CloudTrail all use.
ACTIONS: dict[type, str] = {
    Start: "StartInstances",
    Stop: "StopInstances",
    Register: "RegisterTargets",
    Deregister: "DeregisterTargets",
}
OK, FAILED = "ok", "failed"

# One action may not take longer than this, retries included; past it the
# machine hears Failed("Timeout") and decides again from the next observation.
ACTION_DEADLINE = 60.0


class Executor:
    """Runs commands for the guards it was given, with the clients it was given."""

    def __init__(self, ec2: Any, elbv2: Any, guards: Iterable[Any], *, deadline: float = ACTION_DEADLINE):
        self.ec2 = ec2
        self.elbv2 = elbv2
        self.guards = {g.name: g for g in guards}
        self.deadline = deadline

    async def run(self, guard_name: str, command: Command) -> Failed | None:
        """Carry out one command; None on success, Failed with the AWS code otherwise."""
        if isinstance(command, Alert):
            return None
        guard = self.guards[guard_name]  # an unknown guard is a bug, not an AWS error
        began = time.monotonic()
        code: str | None = None
        changed = False
        try:
            async with asyncio.timeout(self.deadline):
                changed = await self._perform(guard, command)
        except AWS_ERRORS as exc:
            code = error_code(exc)
            if isinstance(command, Deregister) and code == ABSENT_TARGET:
                code = None  # not in the group: what Deregister wants
        log_event = log.warning if code else log.info
        log_event(
            "executor.action",
            guard=guard_name,
            action=ACTIONS[type(command)],
            instance_id=command.instance_id,
            outcome=FAILED if code else OK,
            changed=changed,  # False: it already was so (a running instance started, an absent target removed)
            code=code,
            duration_ms=round((time.monotonic() - began) * 1000),
        )
        return Failed(command, code) if code else None

    async def _perform(self, guard: Any, command: Command) -> bool:
        """Make the call; whether it changed anything (a registration always counts as one)."""
        if isinstance(command, Start):
            reply = await self.ec2.start_instances(InstanceIds=[command.instance_id])
            return _transition(reply, "StartingInstances", already={"pending", "running"})
        if isinstance(command, Stop):
            reply = await self.ec2.stop_instances(InstanceIds=[command.instance_id])
            return _transition(reply, "StoppingInstances", already={"stopping", "stopped"})
        if isinstance(command, Register):
            await self.elbv2.register_targets(
                TargetGroupArn=guard.target_group_arn, Targets=[_target(guard, command.instance_id)]
            )
            return True
        if isinstance(command, Deregister):
            await self.elbv2.deregister_targets(
                TargetGroupArn=guard.target_group_arn, Targets=[_target(guard, command.instance_id)]
            )
            return True
        raise TypeError(f"executor cannot run {command!r}")


def _target(guard: Any, instance_id: str) -> dict[str, Any]:
    target: dict[str, Any] = {"Id": instance_id}
    if guard.target_port is not None:
        target["Port"] = int(guard.target_port)
    return target


def _transition(reply: dict, key: str, *, already: set[str]) -> bool:
    """False when the instance was in the wanted state before the call."""
    changes = reply.get(key) or [{}]
    previous = changes[0].get("PreviousState", {}).get("Name")
    return previous not in already
