"""Did a fleet run under faults lose or double anything? (docs/fleet.md, "Proving nothing is lost")

Pure arithmetic over three documents a user can save:
- the fleet report (`fleet run --json`: one record per device) or its records file,
- the emulator's registration records (`device-sim stub registration list --json`), each
  with `registerRequests`, the register calls the emulator processed for it,
- the fault plan's report (`device-sim stub faults show --json`: counters per rule).

A register call is processed more than once for a device only when its answer was lost:
a rule that closes or resets the connection after the request fired on it. So the
processed calls beyond one per record may not exceed what those rules fired on register.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

ASSIGNED = "assigned"


def forced_registers(plan_report: dict | None) -> int:
    """Register calls whose answer a fault plan dropped (each may force one more)."""
    total = 0
    for rule in (plan_report or {}).get("rules", []):
        action = rule.get("action", {})
        if action.get("close") == "after_request" or action.get("reset") == "after_request":
            total += rule.get("firedByOperation", {}).get("register", 0)
    return total


def reconcile(devices: Iterable[dict], records: list[dict], plan_report: dict | None) -> dict:
    """The figures that prove a run: lost, registered twice beyond the faults, unstated.

    `devices` is read once: the --json report's list or a records file
    (`records.read_records(path)`)."""
    by_id = {r["registrationId"].lower(): r for r in records}
    lost, unstated, known = [], [], set()
    count = assigned = 0
    not_assigned: Counter = Counter()
    for device in devices:
        rid = device["registration_id"]
        count += 1
        known.add(rid.lower())
        if device["status"] == ASSIGNED:
            assigned += 1
            # Lost: the device says assigned but the service has no such assignment.
            if by_id.get(rid.lower(), {}).get("assignedHub") != device.get("assigned_hub"):
                lost.append(rid)
        else:
            not_assigned[device["status"]] += 1
            if not device.get("error_message"):  # ended otherwise without saying why
                unstated.append(rid)
    extra_calls = sum(r.get("registerRequests", 1) - 1 for r in records if r["registrationId"].lower() in known)
    forced = forced_registers(plan_report)
    matched = sum(1 for key in by_id if key in known)
    return {
        "devices": count,
        "assigned": assigned,
        "records": matched,
        "lost": lost,
        "unstated": unstated,
        "register_calls": extra_calls + matched,
        "extra_register_calls": extra_calls,
        "forced_by_faults": forced,
        "doubled_beyond_faults": max(0, extra_calls - forced),
        "not_assigned_by_status": dict(not_assigned),
    }
