"""The emulator's overview for `device-sim stub status`: what the store holds and which
hubs are linked. The process part (listeners, uptime) comes from the server, which hands
`ServiceApi` a callable for it (docs/emulator.md, "Service API")."""

from __future__ import annotations

from collections.abc import Callable

from ..config import StubConfig
from ..errors import Reply
from ..faults import Faults
from ..store import Store


class Status:
    def __init__(self, store: Store, config: StubConfig,
                 server_part: Callable[[], dict] | None = None, faults: Faults | None = None):
        self.store = store
        self.config = config
        self.server_part = server_part
        self.faults = faults

    def overview(self) -> dict:
        counts = self.store.counts()
        assigned: dict[str, int] = {}
        for hub, n in counts.pop("assignedByHub").items():
            assigned[hub.lower()] = assigned.get(hub.lower(), 0) + n
        overview = {
            "idScope": self.config.id_scope,
            **counts,
            "hubs": [{"name": hub.name, "weight": hub.weight,
                      "applyAllocationPolicy": hub.apply_allocation_policy,
                      "assignedRegistrations": assigned.get(hub.name.lower(), 0)}
                     for hub in self.config.hubs],
        }
        if self.faults is not None and self.faults.plan is not None:
            overview["faults"] = self.faults.report()
        if self.config.quota_units:
            overview["quotaUnits"] = self.config.quota_units
        if self.server_part is not None:
            overview["server"] = self.server_part()
        return overview

    def get(self, *, headers, body) -> Reply:
        return Reply(200, self.overview(), {})
