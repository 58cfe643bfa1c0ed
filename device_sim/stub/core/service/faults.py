"""`/emulator/faults`: the live fault plan (an emulator extension; docs/emulator.md,
"Fault plans"). GET shows the plan and its counters, PUT replaces it (counters and
windows start again), DELETE clears it. New requests see a change at once."""

from __future__ import annotations

from .. import errors
from ..errors import DpsError, Reply
from ..faults import FaultPlanError, Faults, parse_plan


class FaultPlanRoutes:
    def __init__(self, faults: Faults):
        self.faults = faults

    def get(self, *, headers, body) -> Reply:
        return Reply(200, {"plan": self.faults.report()}, {})

    def put(self, *, headers, body) -> Reply:
        try:
            plan = parse_plan(body)
        except FaultPlanError as exc:
            raise DpsError(errors.BAD_REQUEST, f"bad fault plan: {exc}") from None
        self.faults.set(plan)
        return Reply(200, {"plan": self.faults.report()}, {})

    def delete(self, *, headers, body) -> Reply:
        self.faults.set(None)
        return Reply(204, None, {})
