"""Which linked IoT hub a registration lands on, and what a re-registration does.

Pure functions of (registration ID, entry, configuration, previous registration record).

Allocation (docs/emulator.md, "Allocation and re-registration"):
- candidates: the entry's `iotHubs` (or its single `iotHubHostName`) when set - those are
  used even if their `apply_allocation_policy` is False - else every linked hub with
  `apply_allocation_policy`. Hubs no longer linked are skipped; no candidate -> failed
  with 400208.
- `hashed` (default) and `geoLatency` (the emulator has no geography, so it behaves as
  hashed): a weighted choice driven by SHA-256 of the lower-cased registration ID, so the
  same device always lands on the same hub for the same hub set.
- `static`: the entry names exactly one hub.
- `custom` is refused when the entry is created (no webhooks in the emulator).

Re-registration (same section), with `reprovisionPolicy` defaulting to
update+migrate, and "never reprovision" for entries without a policy registered with an
api-version <= 2018-04-01 (legacy sticky behaviour):

| case                                          | hub       | substatus                         | deviceId |
|-----------------------------------------------|-----------|-----------------------------------|----------|
| no earlier assignment                         | allocated | initialAssignment                 | new      |
| updateHubAssignment false                     | previous  | unchanged                         | previous |
| update, hub unchanged, migrate                | previous  | unchanged                         | previous |
| update, hub unchanged, no migrate (reset)     | previous  | deviceDataReset                   | new      |
| update, moved back to the first hub ever      | allocated | reprovisionedToInitialAssignment  | per migrate |
| update, moved, migrate                        | allocated | deviceDataMigrated                | previous |
| update, moved, no migrate                     | allocated | deviceDataReset                   | new      |
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from device_sim.common.dps import LEGACY_API_VERSION

from .config import Hub, StubConfig

INITIAL = "initialAssignment"
MIGRATED = "deviceDataMigrated"
RESET = "deviceDataReset"
BACK_TO_INITIAL = "reprovisionedToInitialAssignment"


@dataclass(frozen=True)
class Assignment:
    hub: str | None            # host name; None = failed
    substatus: str | None
    device_id: str
    initial_hub: str | None    # first hub this registration was ever assigned to
    error: str | None = None   # why no hub, when hub is None


def listed_hubs(entry_doc: dict) -> list[str]:
    """Hub names the entry restricts allocation to (empty = all linked hubs)."""
    hubs = entry_doc.get("iotHubs") or []
    if not hubs and entry_doc.get("iotHubHostName"):
        hubs = [entry_doc["iotHubHostName"]]
    return list(hubs)


def candidate_hubs(entry_doc: dict, config: StubConfig) -> list[Hub]:
    listed = listed_hubs(entry_doc)
    if listed:
        found = [config.hub(name) for name in listed]
        return [hub for hub in found if hub is not None]
    return [hub for hub in config.hubs if hub.apply_allocation_policy]


def hashed_choice(registration_id: str, hubs: list[Hub]) -> Hub:
    """Weighted, deterministic: SHA-256 of the lower-cased ID picks a slot in the weights."""
    digest = hashlib.sha256(registration_id.lower().encode("utf-8")).digest()
    slot = int.from_bytes(digest[:8], "big") % sum(hub.weight for hub in hubs)
    for hub in hubs:
        if slot < hub.weight:
            return hub
        slot -= hub.weight
    return hubs[-1]  # not reached: slot < total weight


def choose_hub(registration_id: str, entry_doc: dict, config: StubConfig) -> tuple[str | None, str | None]:
    """(hub name, None) or (None, reason)."""
    policy = entry_doc.get("allocationPolicy") or config.allocation_policy
    hubs = candidate_hubs(entry_doc, config)
    if not hubs:
        return None, "no linked IoT hub is available for this enrollment"
    if policy == "static":
        if len(hubs) != 1:
            return None, "static allocation needs exactly one linked IoT hub on the enrollment"
        return hubs[0].name, None
    return hashed_choice(registration_id, hubs).name, None


def reprovision_policy(entry_doc: dict, api_version: str | None) -> tuple[bool, bool]:
    """(updateHubAssignment, migrateDeviceData) for a re-registration."""
    policy = entry_doc.get("reprovisionPolicy")
    if policy is None:
        if api_version and api_version[:10] <= LEGACY_API_VERSION:
            return False, True
        return True, True
    return bool(policy.get("updateHubAssignment", True)), bool(policy.get("migrateDeviceData", True))


def allocate(registration_id: str, device_id: str, entry_doc: dict, config: StubConfig,
             previous: dict | None, api_version: str | None) -> Assignment:
    """The outcome of one registration. `previous` holds the last record's
    `assignedHub`, `deviceId`, `substatus`, `initialHub` (None on the first registration)."""
    before = previous or {}
    old_hub = before.get("assignedHub")
    if not old_hub:
        hub, error = choose_hub(registration_id, entry_doc, config)
        return Assignment(hub, INITIAL if hub else None, device_id, hub, error)
    initial_hub = before.get("initialHub") or old_hub
    old_device = before.get("deviceId") or device_id
    old_substatus = before.get("substatus") or INITIAL
    update, migrate = reprovision_policy(entry_doc, api_version)
    if not update:
        return Assignment(old_hub, old_substatus, old_device, initial_hub)
    hub, error = choose_hub(registration_id, entry_doc, config)
    if hub is None:
        return Assignment(None, None, device_id, initial_hub, error)
    kept_device = old_device if migrate else device_id
    if hub.lower() == old_hub.lower():
        if migrate:
            return Assignment(old_hub, old_substatus, old_device, initial_hub)
        return Assignment(old_hub, RESET, device_id, initial_hub)
    if hub.lower() == initial_hub.lower():
        return Assignment(hub, BACK_TO_INITIAL, kept_device, initial_hub)
    return Assignment(hub, MIGRATED if migrate else RESET, kept_device, initial_hub)
