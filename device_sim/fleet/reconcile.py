"""Did a fleet run under faults lose or double anything? (docs/fleet.md, "Proving nothing is lost")

Pure arithmetic over three documents a user can save:
- the fleet report (`fleet run --json`: one record per device),
- the emulator's registration records (`device-sim stub registration list --json`), each
  with `registerRequests`, the register calls the emulator processed for it,
- the fault plan's report (`device-sim stub faults show --json`: counters per rule).

A register call is processed more than once for a device only when its answer was lost:
a rule that closes or resets the connection after the request fired on it. So the
processed calls beyond one per record may not exceed what those rules fired on register.
"""

from __future__ import annotations

from collections import Counter

ASSIGNED = "assigned"


def forced_registers(plan_report: dict | None) -> int:
    """Register calls whose answer a fault plan dropped (each may force one more)."""
    total = 0
    for rule in (plan_report or {}).get("rules", []):
        action = rule.get("action", {})
        if action.get("close") == "after_request" or action.get("reset") == "after_request":
            total += rule.get("firedByOperation", {}).get("register", 0)
    return total


def reconcile(devices: list[dict], records: list[dict], plan_report: dict | None) -> dict:
    """The figures that prove a run: lost, registered twice beyond the faults, unstated."""
    by_id = {r["registrationId"].lower(): r for r in records}
    assigned = [d for d in devices if d["status"] == ASSIGNED]
    # Lost: the device says assigned but the service has no such assignment, or the
    # device ended otherwise without saying why.
    lost = [d["registration_id"] for d in assigned
            if by_id.get(d["registration_id"].lower(), {}).get("assignedHub") != d.get("assigned_hub")]
    unstated = [d["registration_id"] for d in devices if d["status"] != ASSIGNED and not d.get("error_message")]
    known = {d["registration_id"].lower() for d in devices}
    extra_calls = sum(r.get("registerRequests", 1) - 1 for r in records if r["registrationId"].lower() in known)
    forced = forced_registers(plan_report)
    return {
        "devices": len(devices),
        "assigned": len(assigned),
        "records": sum(1 for key in by_id if key in known),
        "lost": lost,
        "unstated": unstated,
        "register_calls": extra_calls + sum(1 for key in by_id if key in known),
        "extra_register_calls": extra_calls,
        "forced_by_faults": forced,
        "doubled_beyond_faults": max(0, extra_calls - forced),
        "not_assigned_by_status": dict(Counter(d["status"] for d in devices if d["status"] != ASSIGNED)),
    }
