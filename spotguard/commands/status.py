"""`spotguard status`: what each guard is doing now and what this month cost, as text or the stable JSON document.

It reads the daemon's files in state_dir read-only (docs/status-json.md says
which, and what each field means). It must not write anything, talk to AWS
beyond the one [ha] lease read, or print a secret (it never touches the Discord
settings); without [ha] it does not even import the AWS libraries.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import grp
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from spotguard import defaults, ledger, rehearsal, store
from spotguard.commands.common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, add_config_argument, load_or_report
from spotguard.config import GuardSettings, Settings
from spotguard.machine import INITIAL_PHASE, GuardState

JSON_VERSION = 1
LAST_TRANSITIONS = 10
# The lease read is one GetItem; status is for a person at a prompt, so it waits no longer than this.
HA_TIMEOUT = 10.0


# --------------------------------------------------------------------------- the document


def report(settings: Settings, now: float, *, ha: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status document (what `--json` prints): version 1, one entry per guard.

    `ha` is `read_ha`'s answer, required with [ha] (ValueError without it) and ignored without.
    """
    if settings.ha is not None and ha is None:
        raise ValueError("with [ha], pass the lease as read_ha() read it")
    return {
        "version": JSON_VERSION,
        "generated_at": iso(now),
        "state_dir": str(settings.daemon.state_dir),
        "blind_after": settings.daemon.blind_after,
        "ha": ha if settings.ha is not None else None,
        "guards": [guard_report(settings.daemon.state_dir, g, now) for g in settings.guards],
    }


async def read_ha(settings: Settings, dynamodb: Any, now: float) -> dict[str, Any] | None:
    """The document's "ha": None without [ha]; else the table, the leader (or None) and an error code (or None)."""
    if settings.ha is None:
        return None
    from spotguard import ha  # lazily: without [ha] status never loads the AWS libraries
    from spotguard.aws import AWS_ERRORS, error_code

    try:
        async with asyncio.timeout(HA_TIMEOUT):
            lease = await ha.leader(settings, dynamodb, now=now)
    except AWS_ERRORS as exc:
        return {"table": settings.ha.table, "leader": None, "error": error_code(exc)}
    return {"table": settings.ha.table, "leader": _leader(lease), "error": None}


def _leader(lease: dict[str, Any] | None) -> dict[str, Any] | None:
    if lease is None:
        return None
    return {"holder": lease["holder"], "epoch": lease["epoch"], "expires": iso(lease["expires"]),
            "valid": lease["valid"]}


def guard_report(state_dir: Path, guard: GuardSettings, now: float) -> dict[str, Any]:
    problems: list[str] = []
    state = _attempt(problems, "state file", lambda: store.peek(state_dir, guard.name, guard.rules()))
    readable = not problems
    seen = _attempt(problems, "seen file", lambda: ledger.read_seen(state_dir, guard.name))
    rehearsed = rehearsal.rehearsing(state_dir, guard.name)
    view = _attempt(problems, "ledger", lambda: ledger.read(state_dir, guard.name)) or ledger.LedgerView(())
    return {
        "name": guard.name,
        **_phase(state, seen, readable=readable),
        "rehearsing": rehearsed[0] if rehearsed else None,
        "observed": _observed(seen),
        "transitions": [
            {"at": iso(t.at), "from": t.old, "to": t.new, "reason": t.reason, "slot": t.slot}
            for t in view.transitions()[-LAST_TRANSITIONS:]
        ],
        "month": month_report(view, guard, now),
        "problems": problems,
    }


def _attempt(problems: list[str], what: str, read: Any) -> Any:
    try:
        return read()
    except OSError as exc:
        problems.append(f"{what}: cannot read: {exc.strerror or type(exc).__name__}")
    except (ValueError, RecursionError) as exc:
        problems.append(f"{what}: unusable: {exc}")
    return None


def _phase(state: GuardState | None, seen: dict[str, Any] | None, *, readable: bool) -> dict[str, Any]:
    """Phase, since, reason, and the standby serving a failover (or running outside one)."""
    if state is not None:
        serving = state.standby if not state.stray else None
        return {"phase": state.phase.value, "since": iso(state.since), "reason": state.reason,
                "standby": serving, "stray": state.standby if state.stray else None,
                "slots": [_slot(k, s) for k, s in enumerate(state.slots, start=1)]}
    # The daemon saves a state only once it changes: observed but never saved is the machine's
    # initial phase; a state file that cannot be read says nothing, so the phase is unknown.
    phase = INITIAL_PHASE.value if seen is not None and readable else None
    return {"phase": phase, "since": None, "reason": None, "standby": None, "stray": None, "slots": []}


def _slot(number: int, slot: GuardState) -> dict[str, Any]:
    """One position of a fleet: its phase, the spots it holds and the standby covering it."""
    return {"slot": number, "phase": slot.phase.value, "since": iso(slot.since), "reason": slot.reason,
            "spots": list(slot.holds or ()), "standby": slot.standby, "stray": slot.stray}


def _observed(seen: dict[str, Any] | None) -> dict[str, Any] | None:
    if seen is None:
        return None
    since, at = seen.get("since"), seen.get("observed_at")
    return {
        "at": iso(at) if isinstance(at, (int, float)) else None,
        "since": iso(since) if isinstance(since, (int, float)) else None,
        "spots": [_instance(i, notice=True) for i in seen.get("spots", [])],
        "standbys": [_instance(i) for i in seen.get("standbys", [])],
        "targets": [{"id": t.get("id"), "health": t.get("health")} for t in seen.get("targets", [])],
    }


def _instance(i: dict[str, Any], notice: bool = False) -> dict[str, Any]:
    out = {"id": i.get("id"), "state": i.get("state"), "target": i.get("target")}
    if notice:
        out["notice"] = bool(i.get("notice"))
    return out


def month_report(view: ledger.LedgerView, guard: GuardSettings, now: float) -> dict[str, Any]:
    start = ledger.month_start(now)
    est = view.estimate(start, now, guard.on_demand_hourly, guard.spot_hourly)
    return {
        "start": iso(start),
        "end": iso(now),
        "counted_from": iso(est.start),
        "hours": round(est.hours, 4),
        "spot_hours": round(est.spot_hours, 4),
        "standby_hours": round(est.standby_hours, 4),
        "interruptions": len(view.interruptions(start, now)),
        "ready_margins": margins_report(view.margins(start, now)),
        "on_demand_hourly": est.on_demand_hourly,
        "spot_hourly": est.spot_hourly,
        "cost": _money(est.cost),
        "on_demand_cost": _money(est.on_demand_cost),
        "saving": _money(est.saving),
    }


def margins_report(margins: list[ledger.Margin]) -> dict[str, Any]:
    """This month's ready margins: how many, the least, the median, and the latest."""
    seconds = [m.seconds for m in margins]
    last = margins[-1] if margins else None
    return {
        "count": len(seconds),
        "min": min(seconds) if seconds else None,
        "median": statistics.median(seconds) if seconds else None,
        "last": None if last is None else {"at": iso(last.at), "instance": last.instance, "seconds": last.seconds},
    }


def _money(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def iso(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- text


def render(doc: dict[str, Any]) -> str:
    """The status document for people."""
    blind_after = doc.get("blind_after", defaults.BLIND_AFTER)
    blocks = [_render_guard(g, doc["generated_at"], blind_after) for g in doc["guards"]]
    if doc.get("ha") is not None:
        blocks.insert(0, _ha_line(doc["ha"], doc["generated_at"]))
    return "\n\n".join(blocks) + "\n"


def _ha_line(h: dict[str, Any], now: str) -> str:
    start = f"ha (table {h['table']}): "
    lease = h["leader"]
    if h["error"] is not None:
        return start + f"leader unknown ({h['error']}: the table could not be read)"
    if lease is None:
        return start + "no leader (no daemon has held the lease yet)"
    who = f"{lease['holder']} (epoch {lease['epoch']})"
    left = parse_time(lease["expires"]) - parse_time(now)
    if lease["valid"]:
        return start + f"leader {who}, lease valid until {_when(lease['expires'])} ({_duration(left)} left)"
    if parse_time(lease["expires"]) <= 0:  # released on a clean stop
        return start + f"no leader ({who} released the lease on a clean stop)"
    return start + f"no leader (the lease of {who} expired at {_when(lease['expires'])}, {_duration(-left)} ago)"


def _render_guard(g: dict[str, Any], now: str, blind_after: float) -> str:
    lines = [_headline(g, now)]
    lines += [f"  problem: {p}" for p in g["problems"]]  # first: what follows may be incomplete because of it
    if g["reason"]:
        lines.append(f"  why: {g['reason']}")
    lines += [_slot_line(s, now) for s in g.get("slots", [])]
    obs = g["observed"]
    if obs is None:
        lines.append("  not observed yet (no seen file: the daemon has not polled this guard)")
    else:
        for role, items in (("spot", obs["spots"]), ("standby", obs["standbys"])):
            for i in items:
                lines.append(_instance_line(role, i, g))
        if not obs["spots"]:
            lines.append("  spot     none (the spot request has no instance)")
        lines += _observed_lines(obs, now, blind_after)
    if g["transitions"]:
        lines.append("  last transitions:")
        lines += [f"    {_when(t['at'])}  {_slot_name(t)}{t['from']} → {t['to']}  {t['reason']}"
                  for t in g["transitions"]]
    lines += _month_lines(g["month"])
    return "\n".join(lines)


def _slot_line(s: dict[str, Any], now: str) -> str:
    ago = parse_time(now) - parse_time(s["since"])
    spots = ", ".join(s["spots"]) or "no spot"
    cover = f" → standby {s['standby']}" if s["standby"] else ""
    return (f"  slot {s['slot']}  {s['phase']} since {_when(s['since'])} ({_duration(ago)} ago): "
            f"{spots}{cover} ({s['reason']})")


def _slot_name(t: dict[str, Any]) -> str:
    return f"slot {t['slot']}: " if t.get("slot") is not None else ""


def _observed_lines(obs: dict[str, Any], now: str, blind_after: float) -> list[str]:
    lines = []
    if obs["at"]:
        ago = parse_time(now) - parse_time(obs["at"])
        lines.append(f"  last observed {_when(obs['at'])} ({_duration(ago)} ago)")
        if ago > blind_after:
            lines.append(f"  ! not observed for {_duration(ago)}, over blind_after ({_duration(blind_after)}): "
                         "is the daemon running, and can it reach EC2 and ELBv2?")
    if obs["since"]:
        lines.append(f"  world as last observed, unchanged since {_when(obs['since'])}")
    return lines


def _headline(g: dict[str, Any], now: str) -> str:
    if g["phase"] is None and any(p.startswith("state file") for p in g["problems"]):
        return f"guard {g['name']}: phase unknown (its state file cannot be used)"
    if g["phase"] is None:
        return f"guard {g['name']}: unknown (no state or observation in the state directory yet)"
    if g["since"] is None:
        return f"guard {g['name']}: {g['phase']} (no phase change recorded yet)"
    ago = parse_time(now) - parse_time(g["since"])
    return f"guard {g['name']}: {g['phase']} since {_when(g['since'])} ({_duration(ago)} ago)"


def _instance_line(role: str, i: dict[str, Any], g: dict[str, Any]) -> str:
    state = i["state"] + (" (interruption notice)" if i.get("notice") else "")
    target = f"target {i['target']}" if i["target"] else "not registered"
    marks = {g.get("standby"): "serving this failover",
             g.get("stray"): "running outside a failover: drained and stopped after failback_grace",
             g.get("rehearsing"): "being rehearsed (spotguard rehearse)"}
    mark = f"  ← {marks[i['id']]}" if role == "standby" and i["id"] in marks else ""
    return f"  {role:<8} {i['id']:<20} {state:<32} {target}{mark}"


def _month_lines(m: dict[str, Any]) -> list[str]:
    counted = "" if m["counted_from"] == m["start"] else f", counted from {_when(m['counted_from'])}"
    n = m["interruptions"]
    lines = [
        f"  this month ({m['start'][:10]} to now{counted}): {n} interruption{'s' * (n != 1)}; "
        f"standbys ran {_hours(m['standby_hours'])} On-Demand; spot ran {_hours(m['spot_hours'])}",
    ]
    r = m["ready_margins"]
    if r["count"]:
        last = r["last"]
        lines.append(f"  ready margin (standby healthy → spot reclaimed): last {_signed(last['seconds'])} "
                     f"({last['instance']}, {_when(last['at'])}); this month min {_signed(r['min'])}, "
                     f"median {_signed(r['median'])} over {r['count']}")
    if m["cost"] is None:
        lines.append("  cost: unknown (set on_demand_hourly and spot_hourly for this guard)")
    else:
        lines.append(
            f"  cost: est. {_usd(m['cost'])} (spot {m['spot_hours']:.2f} h × ${m['spot_hourly']}/h"
            f" + standby {m['standby_hours']:.2f} h × ${m['on_demand_hourly']}/h); "
            f"On-Demand all month {_usd(m['on_demand_cost'])}; saving {_usd(m['saving'])}"
        )
    return lines


def _signed(seconds: float) -> str:
    return f"{seconds:+.0f}s"


def _hours(hours: float) -> str:
    return _duration(hours * 3600) if hours < 1 else f"{hours:.2f} h"


def _usd(amount: float) -> str:
    cents = round(amount * 100)
    return f"{'-' if cents < 0 else ''}${abs(cents) / 100:,.2f}"


def parse_time(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 time as this document writes them."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _when(text: str) -> str:
    return text.replace("T", " ").replace("Z", " UTC")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


# --------------------------------------------------------------------------- command


async def _read_ha(settings: Settings, now: float) -> dict[str, Any] | None:
    from spotguard import ha
    from spotguard.aws import AWS_ERRORS, client, error_code

    try:
        async with client("dynamodb", settings.aws.region, settings.aws.endpoint_url,
                          max_attempts=ha.MAX_ATTEMPTS) as dynamodb:
            return await read_ha(settings, dynamodb, now)
    except AWS_ERRORS as exc:  # no client at all (no such profile, say): the leader is unknown, as for a failed read
        assert settings.ha is not None
        return {"table": settings.ha.table, "leader": None, "error": error_code(exc)}


def unreadable(state_dir: Path) -> str | None:
    """Why this user cannot read the daemon's state directory, with the way out; None if it can
    (or it does not exist yet: then there is simply no state)."""
    try:
        os.listdir(state_dir)
    except FileNotFoundError:
        return None
    except PermissionError:
        group = _group_of(state_dir)
        join = f", or join its group {group} (it must then be group-readable)" if group else ""
        return (f"cannot read {state_dir}: permission denied; run it as the daemon's user or root "
                f"(sudo spotguard status){join}")
    except OSError:
        return None  # reported per file below, as before
    return None


def _group_of(path: Path) -> str | None:
    try:
        return grp.getgrgid(path.stat().st_gid).gr_name
    except (OSError, KeyError):
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the stable JSON document (docs/status-json.md)")


def run(args: argparse.Namespace) -> int:
    """0 fine, 1 some guard's file could not be read, 2 bad config (a failed lease read changes nothing)."""
    settings = load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    denied = unreadable(settings.daemon.state_dir)
    if denied:
        print(f"spotguard status: {denied}", file=sys.stderr)
        return EXIT_FAILED
    now = time.time()
    lease = asyncio.run(_read_ha(settings, now)) if settings.ha is not None else None
    doc = report(settings, now, ha=lease)
    sys.stdout.write(json.dumps(doc, indent=2) + "\n" if args.json else render(doc))
    return EXIT_FAILED if any(g["problems"] for g in doc["guards"]) else EXIT_OK
