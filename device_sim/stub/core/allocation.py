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
- `custom`: the webhook's `iotHubHostName` (core/webhook.py reads the answer); it must be
  one of the candidates, which are what the request's `linkedHubs` listed; else failed.

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

A custom entry calls its webhook in every case, "never reprovision" included (the hub is
kept, the returned payload refreshed); `linkedHubs` then lists only the current hub. The
webhook's `initialTwin` is the one the hub gets on a first assignment and on a move that
resets the device data; otherwise the hub keeps the device's twin.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from device_sim.common.dps import LEGACY_API_VERSION

from .config import ALLOCATION_POLICIES, Hub, StubConfig

CUSTOM = "custom"
# `custom` is an entry's choice only: the instance default is one of ALLOCATION_POLICIES.
ENTRY_POLICIES = (*ALLOCATION_POLICIES, CUSTOM)

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


def is_custom(entry_doc: dict) -> bool:
    return entry_doc.get("allocationPolicy") == CUSTOM


def webhook_hubs(entry_doc: dict, config: StubConfig, previous: dict | None,
                 api_version: str | None) -> list[str]:
    """The `linkedHubs` of an AllocationRequest: the candidates, or only the current hub
    when a re-registration keeps it ("never reprovision")."""
    old_hub = (previous or {}).get("assignedHub")
    if old_hub and not reprovision_policy(entry_doc, api_version)[0]:
        return [old_hub]
    return [hub.name for hub in candidate_hubs(entry_doc, config)]


def twin_applies(previous: dict | None, hub: str, entry_doc: dict,
                 api_version: str | None) -> bool:
    """Whether the hub gets a fresh initial twin: a first assignment, or a move that
    does not migrate the device data."""
    old_hub = (previous or {}).get("assignedHub")
    if not old_hub:
        return True
    update, migrate = reprovision_policy(entry_doc, api_version)
    return update and not migrate and hub.lower() != old_hub.lower()


def choose_hub(registration_id: str, entry_doc: dict, config: StubConfig,
               custom_hub: str | None = None) -> tuple[str | None, str | None]:
    """(hub name, None) or (None, reason). `custom_hub`: the webhook's choice."""
    policy = entry_doc.get("allocationPolicy") or config.allocation_policy
    hubs = candidate_hubs(entry_doc, config)
    if not hubs:
        return None, "no linked IoT hub is available for this enrollment"
    if policy == CUSTOM:
        for hub in hubs:
            if custom_hub and hub.name.lower() == custom_hub.lower():
                return hub.name, None
        return None, (f"Custom allocation failed: the webhook chose IoT hub {custom_hub!r}, "
                      f"which is not one of the linked hubs ({', '.join(h.name for h in hubs)})")
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
             previous: dict | None, api_version: str | None,
             custom_hub: str | None = None) -> Assignment:
    """The outcome of one registration. `previous` holds the last record's
    `assignedHub`, `deviceId`, `substatus`, `initialHub` (None on the first registration);
    `custom_hub` is the webhook's choice for a custom entry."""
    before = previous or {}
    old_hub = before.get("assignedHub")
    if not old_hub:
        hub, error = choose_hub(registration_id, entry_doc, config, custom_hub)
        return Assignment(hub, INITIAL if hub else None, device_id, hub, error)
    initial_hub = before.get("initialHub") or old_hub
    old_device = before.get("deviceId") or device_id
    old_substatus = before.get("substatus") or INITIAL
    update, migrate = reprovision_policy(entry_doc, api_version)
    if not update:
        return Assignment(old_hub, old_substatus, old_device, initial_hub)
    hub, error = choose_hub(registration_id, entry_doc, config, custom_hub)
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
