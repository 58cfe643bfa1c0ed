"""What an individual enrollment or an enrollment group document must hold before it is
stored (docs/x509-rules.md, "Enrollments"; docs/emulator.md, "Service API").

Only X.509 attestation. Certificates are stored as their `info` (thumbprints, names,
validity); answers carry `info`, not the certificate text. A GET answer sent back
unchanged (the SDKs' get-modify-put) keeps the stored certificate of each slot.
`custom` allocation needs a `customAllocationDefinition` with an http(s) `webhookUrl` and
an `apiVersion` (core/webhook.py); `geoLatency` behaves as `hashed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509

from device_sim.common import dps
from device_sim.common.x509util import ca_problem, common_name

from .. import errors
from ..allocation import CUSTOM, ENTRY_POLICIES, listed_hubs
from ..cert_input import certificate_info, parse_certificate
from ..config import StubConfig
from ..device_api import validate_registration_id
from ..enrollment_walk import GROUP, INDIVIDUAL, Entry
from ..errors import DpsError
from ..store import Store
from ..webhook import definition_problem

READ_ONLY = ("registrationState", "etag", "createdDateTimeUtc", "lastUpdatedDateTimeUtc")


@dataclass
class ValidEntry:
    """An entry document fit to store, the thumbprints it stands for, and the client
    certificates it was given in this request (individual enrollments)."""

    doc: dict
    thumbprints: list[str] = field(default_factory=list)
    client_certificates: list[tuple[str, x509.Certificate]] = field(default_factory=list)


def id_field(kind: str) -> str:
    return "registrationId" if kind == INDIVIDUAL else "enrollmentGroupId"


def validated_entry(kind: str, entry_id: str, data: dict, existing: Entry | None,
                    store: Store, config: StubConfig) -> ValidEntry:
    """The stored form of an enrollment body; DpsError 400 naming the first problem."""
    name = id_field(kind)
    problem = validate_registration_id(entry_id)
    if problem:
        raise DpsError(errors.INVALID_REGISTRATION_ID if kind == INDIVIDUAL
                       else errors.BAD_REQUEST, f"invalid {name}: {problem}")
    claimed = data.get(name, entry_id)
    if not isinstance(claimed, str) or claimed.lower() != entry_id.lower():
        raise DpsError(errors.BAD_REQUEST, f"{name} in the body differs from the path")
    doc = {k: v for k, v in data.items() if k not in READ_ONLY}
    doc[name] = claimed
    stored = existing.doc.get("attestation") if existing else None
    doc["attestation"], thumbprints, given = _validated_attestation(
        kind, data.get("attestation"), stored, store)
    _validate_common(kind, doc, config)
    return ValidEntry(doc, thumbprints, given)


def client_cn_problem(registration_id: str, certificates) -> str | None:
    """Why an individual enrollment's certificates do not name its device: the leaf CN is
    the registration ID (docs/x509-rules.md, "Registration ID")."""
    for slot, cert in certificates:
        cn = common_name(cert)
        if cn is None:
            return f"clientCertificates.{slot} has no single subject CN"
        if cn.lower() != registration_id.lower():
            return (f"clientCertificates.{slot} has subject CN {cn!r}, but an X.509 "
                    f"device's registration ID is its CN: enroll it as {cn!r} or use the "
                    f"certificate of {registration_id!r}")
    return None


# (the stored attestation, its thumbprints, the client certificates given in the body)
_Attestation = tuple[dict, list[str], list[tuple[str, x509.Certificate]]]


def _validated_attestation(kind: str, attestation, stored: dict | None,
                           store: Store) -> _Attestation:
    if not isinstance(attestation, dict) or attestation.get("type") != "x509":
        raise DpsError(errors.BAD_REQUEST, 'attestation must be {"type": "x509", "x509": '
                       '{...}}: the emulator supports X.509 attestation only')
    part = attestation.get("x509")
    if not isinstance(part, dict):
        raise DpsError(errors.BAD_REQUEST, "attestation.x509 must be a JSON object")
    allowed = ("clientCertificates",) if kind == INDIVIDUAL else \
        ("signingCertificates", "caReferences")
    present = [k for k in ("clientCertificates", "signingCertificates", "caReferences")
               if part.get(k)]
    if len(present) != 1 or present[0] not in allowed:
        raise DpsError(errors.BAD_REQUEST, f"attestation.x509 must hold exactly one of "
                       f"{' / '.join(allowed)}")
    field_name = present[0]
    slots = part[field_name]
    if not isinstance(slots, dict) or not slots.get("primary"):
        raise DpsError(errors.BAD_REQUEST, f"attestation.x509.{field_name}.primary is required")
    if field_name == "caReferences":
        return _ca_references(slots, store)
    return _certificate_slots(field_name, slots, stored)


def _ca_references(slots: dict, store: Store) -> _Attestation:
    refs, thumbprints = {}, []
    for slot in ("primary", "secondary"):
        name = slots.get(slot)
        if name is None:
            continue
        row = store.get_ca(name) if isinstance(name, str) else None
        if row is None:
            raise DpsError(errors.BAD_REQUEST, f"caReferences.{slot} names no uploaded "
                           f"CA certificate ({name!r}); upload it first")
        refs[slot] = row.name
        thumbprints.append(row.thumbprint)
    return {"type": "x509", "x509": {"caReferences": refs}}, thumbprints, []


def _kept_info(value, stored: dict | None, field_name: str, slot: str) -> dict | None:
    """The stored info of this slot when the body echoes it back without a certificate."""
    if not isinstance(value, dict) or not isinstance(value.get("info"), dict) or not stored:
        return None
    old = (((stored.get("x509") or {}).get(field_name) or {}).get(slot) or {}).get("info")
    if old and old.get("sha256Thumbprint") == value["info"].get("sha256Thumbprint"):
        return old
    return None


def _certificate_slots(field_name: str, slots: dict, stored: dict | None) -> _Attestation:
    stored_slots, thumbprints, given = {}, [], []
    for slot in ("primary", "secondary"):
        value = slots.get(slot)
        if value is None:
            continue
        text = value.get("certificate") if isinstance(value, dict) else None
        kept = _kept_info(value, stored, field_name, slot) if text is None else None
        if kept is not None:
            info = kept
        else:
            cert = parse_certificate(text, f"attestation.x509.{field_name}.{slot}.certificate")
            if field_name == "signingCertificates":
                problem = ca_problem(cert, 0)
                if problem:
                    raise DpsError(errors.BAD_REQUEST, f"signingCertificates.{slot} {problem}")
            else:
                given.append((slot, cert))
            info = certificate_info(cert)
        stored_slots[slot] = {"info": info}
        if info["sha256Thumbprint"] not in thumbprints:
            thumbprints.append(info["sha256Thumbprint"])
    return {"type": "x509", "x509": {field_name: stored_slots}}, thumbprints, given


def _validate_common(kind: str, doc: dict, config: StubConfig) -> None:
    status = doc.setdefault("provisioningStatus", dps.ENABLED)
    if status not in dps.PROVISIONING_STATUSES:
        raise DpsError(errors.BAD_REQUEST, 'provisioningStatus must be "enabled" or "disabled"')
    policy = doc.get("reprovisionPolicy")
    if policy is not None:
        if not isinstance(policy, dict) or not all(
                isinstance(policy.get(k, True), bool)
                for k in ("updateHubAssignment", "migrateDeviceData")):
            raise DpsError(errors.BAD_REQUEST, "reprovisionPolicy must be {updateHubAssignment:"
                           " bool, migrateDeviceData: bool}")
    allocation = doc.get("allocationPolicy")
    if allocation is not None and allocation not in ENTRY_POLICIES:
        raise DpsError(errors.BAD_REQUEST,
                       f"allocationPolicy must be one of {', '.join(ENTRY_POLICIES)}")
    if allocation == CUSTOM or doc.get("customAllocationDefinition") is not None:
        problem = definition_problem(doc.get("customAllocationDefinition"))
        if problem:
            raise DpsError(errors.BAD_REQUEST, problem)
    _validate_hubs(doc, allocation or config.allocation_policy, config)
    for name in ("initialTwin", "capabilities", "optionalDeviceInformation"):
        if doc.get(name) is not None and not isinstance(doc[name], dict):
            raise DpsError(errors.BAD_REQUEST, f"{name} must be a JSON object")
    device_id = doc.get("deviceId")
    if kind == GROUP and device_id is not None:
        raise DpsError(errors.BAD_REQUEST, "an enrollment group has no deviceId (devices "
                       "get their registration ID)")
    if device_id is not None and (not isinstance(device_id, str) or not device_id
                                  or len(device_id) > 128):
        raise DpsError(errors.BAD_REQUEST, "deviceId must be a string of 1..128 characters")


def _validate_hubs(doc: dict, effective_policy: str, config: StubConfig) -> None:
    hubs = doc.get("iotHubs")
    if hubs is not None and (not isinstance(hubs, list) or
                             not all(isinstance(h, str) for h in hubs)):
        raise DpsError(errors.BAD_REQUEST, "iotHubs must be a list of hub host names")
    single = doc.get("iotHubHostName")
    if single is not None and not isinstance(single, str):
        raise DpsError(errors.BAD_REQUEST, "iotHubHostName must be a hub host name")
    names = listed_hubs(doc)
    unknown = [h for h in names if config.hub(h) is None]
    if unknown:
        linked = ", ".join(h.name for h in config.hubs) or "none"
        raise DpsError(errors.BAD_REQUEST, f"IoT hub(s) {', '.join(unknown)} are not linked "
                       f"to this instance (linked: {linked})")
    if effective_policy == "static" and len(names) != 1:
        raise DpsError(errors.BAD_REQUEST, "static allocation needs exactly one hub in "
                       "iotHubs or iotHubHostName")
