"""The verbs of the `spotguard` command, in the order `spotguard --help` lists them.

Each verb is one module of this package with `add_arguments(parser)` and
`run(args) -> int`; this registry names the module and holds the verb's help, so
the command line lists every verb without importing one. A verb's module must
not import another verb's: what verbs share lives in common.py or in a domain
module of spotguard.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Verb:
    module: str  # the module of this package that carries the verb out
    help: str  # one line, for `spotguard --help` and the verb's own --help


VERBS: dict[str, Verb] = {
    "check-config": Verb("check_config", "check the config file and sum up its guards"),
    "run": Verb("run", "run the daemon (the config is checked first; nothing starts if it is wrong)"),
    "status": Verb(
        "status", "show each guard's phase, instances, last transitions and this month's standby hours and cost"
    ),
    "check": Verb(
        "check", "check the deployment in AWS is ready for an interruption: one line per check, exit 1 on any ✗"
    ),
    "rehearse": Verb(
        "rehearse",
        "start a guard's first standby, time it to healthy in the target group, then drain and stop it again",
    ),
    "demo": Verb(
        "demo",
        "watch spotguard keep a service up through a spot interruption on an embedded AWS (needs spotguard[lab])",
    ),
    "simulate": Verb(
        "simulate",
        "replay real spot traces through spotguard's rules with your numbers: cost and outage against no standby "
        "and On-Demand",
    ),
    "setup": Verb(
        "setup",
        "create the SQS queue, its policy and the EventBridge rules feeding it (idempotent; --dry-run changes nothing)",
    ),
    "iam-policy": Verb(
        "iam_policy", "print the least-privilege IAM policy (JSON) for the daemon, or with --agent for the agent"
    ),
    "agent": Verb(
        "agent", "on the spot instance: forward its IMDS interruption and rebalance notices to the SQS queue"
    ),
}


def load(verb: str) -> ModuleType:
    """The module of `verb` (imported now: only the verb being run pays for its imports)."""
    return importlib.import_module(f"{__name__}.{VERBS[verb].module}")
