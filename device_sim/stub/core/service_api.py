"""The service (management) API of the emulator: CA certificates, enrollments, registrations.

One entry point, `ServiceApi.handle(method, path, query, headers, body) -> Reply`, does
SAS authentication, routing, validation and storage; it never raises.

Routes (every call needs `?api-version=...`, e.g. SERVICE_API_VERSION, and an
`Authorization: SharedAccessSignature ...` header made with `sas.make_token` for
`config.service_host`):

| method | path | what |
|---|---|---|
| GET | /certificates | list CA certificates (`{"value": [...]}`) |
| GET, PUT, DELETE | /certificates/{name} | CA certificate (ARM shape, dps-protocol.md 7.2) |
| POST | /certificates/{name}/generateVerificationCode | new proof-of-possession code |
| POST | /certificates/{name}/verify | body `{"certificate": ...}` signed by the CA, CN = code |
| GET, PUT, DELETE | /enrollments/{registrationId} | individual enrollment |
| POST | /enrollments/query | body `{"query": "*"}`, paging headers |
| POST | /enrollments | bulk operation (mode create/update/updateIfMatchETag/delete) |
| POST | /enrollments/{id}/attestationmechanism | the entry's attestation |
| GET, PUT, DELETE | /enrollmentGroups/{id} | enrollment group |
| POST | /enrollmentGroups/query, /enrollmentGroups, /enrollmentGroups/{id}/attestationmechanism | as above |
| GET, DELETE | /registrations/{registrationId} | registration record |
| POST | /registrations/{enrollmentGroupId}/query | a group's registration records |

Choices where the service is silent or the emulator is smaller:
- If-Match is optional except when replacing an existing CA certificate (ARM requires it
  there); when given it must match (`*` matches any existing entity), else 412. The
  `etag` inside a body is ignored except for bulk `updateIfMatchETag`.
- Only X.509 attestation. Certificates are stored as their `info` (thumbprints, names,
  validity); responses carry `info`, not the certificate text.
- CA certificates must be CA certificates (basicConstraints CA:TRUE), at most 25; a
  certificate may be uploaded under one name only; a CA named by a group's caReferences
  cannot be deleted (409) until the group is changed.
- A verification code is used up by a successful verify; a failed attempt leaves it.
- `custom` allocation is refused (no webhooks); `geoLatency` behaves as `hashed`.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from urllib.parse import unquote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from . import errors
from .allocation import listed_hubs
from .cert_input import certificate_info, common_name, parse_certificate, sha256_thumbprint
from .config import StubConfig
from .device_api import new_etag, validate_registration_id
from .enrollment_walk import GROUP, INDIVIDUAL, Entry, ca_problem
from .errors import DpsError, Reply, error_reply, json_object, utc_text
from .sas import SasError, verify_token
from .store import CaRecord, RegistrationRow, Store

log = logging.getLogger(__name__)

SERVICE_API_VERSION = "2021-10-01"
MAX_CA_CERTIFICATES = 25
MAX_GROUPS = 100
MAX_BULK = 10
DEFAULT_PAGE = 100
_CERT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,256}$")
_QUERY_ALL = re.compile(r"^\s*(\*|select\s+\*\s+from\s+\w+)\s*$", re.IGNORECASE)
_CA_TYPE = "Microsoft.Devices/ProvisioningServices/Certificates"
_ALLOCATION = ("hashed", "geoLatency", "static")


def etag_matches(if_match: str, etag: str) -> bool:
    """RFC 7232 If-Match against our etag; quotes and W/ are tolerated."""
    for candidate in if_match.split(","):
        value = candidate.strip()
        if value == "*":
            return True
        if value.startswith("W/"):
            value = value[2:]
        if value == etag or value.strip('"') == etag.strip('"'):
            return True
    return False


def _check_if_match(headers: Mapping[str, str], etag: str | None, required: bool = False) -> None:
    if_match = headers.get("if-match")
    if if_match is None:
        if required:
            raise DpsError(errors.PRECONDITION_FAILED,
                           "If-Match with the current etag is required to replace this entity")
        return
    if etag is None or not etag_matches(if_match, etag):
        raise DpsError(errors.PRECONDITION_FAILED, "Precondition failed: If-Match does not "
                       "match the current etag (fetch the entity again)")


def _rfc1123(moment: datetime) -> str:
    return email.utils.format_datetime(moment.astimezone(timezone.utc), usegmt=True)



def _page_args(headers: Mapping[str, str]) -> tuple[str, int]:
    raw_count = headers.get("x-ms-max-item-count") or str(DEFAULT_PAGE)
    try:
        count = int(raw_count)
    except ValueError:
        raise DpsError(errors.BAD_REQUEST, "x-ms-max-item-count must be an integer") from None
    if not 1 <= count <= 10_000:
        raise DpsError(errors.BAD_REQUEST, "x-ms-max-item-count must be 1..10000")
    token = headers.get("x-ms-continuation") or ""
    try:
        after = base64.urlsafe_b64decode(token.encode()).decode() if token else ""
    except (ValueError, binascii.Error):
        raise DpsError(errors.BAD_REQUEST, "x-ms-continuation is not a token this service "
                       "issued") from None
    return after, count


def _paged(items: list, keys: list[str], count: int, item_type: str) -> Reply:
    headers = {"x-ms-item-type": item_type, "x-ms-max-item-count": str(count)}
    if len(items) > count:
        items, keys = items[:count], keys[:count]
        headers["x-ms-continuation"] = base64.urlsafe_b64encode(keys[-1].encode()).decode()
    return Reply(200, items, headers)


def _query_body(body: bytes) -> None:
    data = json_object(body, required=False)
    query = data.get("query", "*")
    if not isinstance(query, str) or not _QUERY_ALL.match(query):
        raise DpsError(errors.BAD_REQUEST, 'only the query "*" (or SELECT * FROM ...) is '
                       "supported by the emulator")


def _kept_info(value, stored: dict | None, field_name: str, slot: str) -> dict | None:
    """The stored info of this slot when the body echoes it back without a certificate."""
    if not isinstance(value, dict) or not isinstance(value.get("info"), dict) or not stored:
        return None
    old = (((stored.get("x509") or {}).get(field_name) or {}).get(slot) or {}).get("info")
    if old and old.get("sha256Thumbprint") == value["info"].get("sha256Thumbprint"):
        return old
    return None


class ServiceApi:
    def __init__(self, store: Store, config: StubConfig, service_key: bytes, clock=time.time):
        self.store = store
        self.config = config
        self.service_key = service_key
        self.clock = clock

    # -- entry point --------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str],
               headers: Mapping[str, str], body: bytes) -> Reply:
        try:
            headers = {k.lower(): v for k, v in headers.items()}
            return self._handle(method.upper(), path, query, headers, body or b"")
        except DpsError as exc:
            return exc.reply(self._now())
        except Exception as exc:  # never let the front end see a traceback
            log.exception("service API failure")
            return error_reply(errors.INTERNAL_ERROR,
                               f"internal error in the emulator ({type(exc).__name__})")

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), timezone.utc)

    def _handle(self, method, path, query, headers, body) -> Reply:
        if len(body) > self.config.max_body:
            raise DpsError(errors.PAYLOAD_TOO_LARGE,
                           f"the request body is larger than {self.config.max_body} bytes")
        path = path.split("?", 1)[0]
        try:
            verify_token(headers.get("authorization"), self.service_key,
                         self.config.service_host + "/" + path.strip("/"), now=self.clock())
        except SasError as exc:
            raise DpsError(errors.UNAUTHORIZED, f"Unauthorized: {exc}") from None
        if not query.get("api-version"):
            raise DpsError(errors.MISSING_API_VERSION, "the api-version query parameter is "
                           f"required (e.g. {SERVICE_API_VERSION})")
        segments = [unquote(s) for s in path.strip("/").split("/") if s]
        handlers, args = self._route(segments)
        if handlers is None:
            raise DpsError(errors.NOT_FOUND, f"no such resource: {path}")
        handler = handlers.get(method)
        if handler is None:
            raise DpsError(errors.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path} "
                           f"(allowed: {', '.join(sorted(handlers))})",
                           {"Allow": ", ".join(sorted(handlers))})
        return handler(*args, headers=headers, body=body)

    def _route(self, seg: list[str]) -> tuple[dict[str, Callable] | None, tuple]:
        words = [s.lower() for s in seg]
        n = len(seg)
        if n == 0:
            return None, ()
        head = words[0]
        if head == "certificates":
            if n == 1:
                return {"GET": self.list_cas}, ()
            if n == 2:
                return {"GET": self.get_ca, "PUT": self.put_ca, "DELETE": self.delete_ca}, (seg[1],)
            if n == 3 and words[2] == "generateverificationcode":
                return {"POST": self.generate_code}, (seg[1],)
            if n == 3 and words[2] == "verify":
                return {"POST": self.verify_ca}, (seg[1],)
        elif head in ("enrollments", "enrollmentgroups"):
            kind = INDIVIDUAL if head == "enrollments" else GROUP
            if n == 1:
                return {"POST": self.bulk}, (kind,)
            if n == 2:
                handlers = {"GET": self.get_entry, "PUT": self.put_entry,
                            "DELETE": self.delete_entry}
                if words[1] == "query":
                    handlers["POST"] = lambda _k, _i, **kw: self.query_entries(kind, **kw)
                return handlers, (kind, seg[1])
            if n == 3 and words[2] == "attestationmechanism":
                return {"POST": self.attestation}, (kind, seg[1])
        elif head == "registrations":
            if n == 2:
                return {"GET": self.get_registration, "DELETE": self.delete_registration}, (seg[1],)
            if n == 3 and words[2] == "query":
                return {"POST": self.query_registrations}, (seg[1],)
        return None, ()

    # -- CA certificates ----------------------------------------------------------------

    def _ca_view(self, record: CaRecord, code: str | None = None) -> dict:
        cert = record.certificate()
        properties = {
            "subject": cert.subject.rfc4514_string(),
            "expiry": _rfc1123(cert.not_valid_after_utc),
            "thumbprint": record.thumbprint,
            "isVerified": record.is_verified,
            "certificate": base64.b64encode(record.der).decode("ascii"),
            "created": record.created,
            "updated": record.updated,
        }
        if code:
            properties["verificationCode"] = code
        return {"id": f"/certificates/{record.name}", "name": record.name,
                "type": _CA_TYPE, "etag": record.etag, "properties": properties}

    def _ca_or_404(self, name: str) -> CaRecord:
        record = self.store.get_ca(name)
        if record is None:
            raise DpsError(errors.CERTIFICATE_NOT_FOUND, f"no CA certificate named {name!r}")
        return record

    def list_cas(self, *, headers, body) -> Reply:
        return Reply(200, {"value": [self._ca_view(r) for r in self.store.list_cas()]}, {})

    def get_ca(self, name, *, headers, body) -> Reply:
        return Reply(200, self._ca_view(self._ca_or_404(name)), {})

    def put_ca(self, name, *, headers, body) -> Reply:
        if not _CERT_NAME.match(name):
            raise DpsError(errors.BAD_REQUEST, "a certificate name may contain only letters, "
                           "digits and - . _ (no spaces)")
        data = json_object(body)
        properties = data.get("properties", data)
        if not isinstance(properties, dict):
            raise DpsError(errors.BAD_REQUEST, "properties must be a JSON object")
        cert = parse_certificate(properties.get("certificate"), "properties.certificate")
        problem = ca_problem(cert, 0)
        if problem:
            raise DpsError(errors.BAD_REQUEST, f"the uploaded certificate {problem}; upload a "
                           "root or intermediate CA certificate")
        verified = properties.get("isVerified", False)
        if not isinstance(verified, bool):
            raise DpsError(errors.BAD_REQUEST, "properties.isVerified must be true or false")
        thumbprint = sha256_thumbprint(cert)
        now = _rfc1123(self._now())
        with self.store.transaction():
            existing = self.store.get_ca(name)
            if existing is not None:
                _check_if_match(headers, existing.etag, required=True)
            elif headers.get("if-match") not in (None, ""):
                _check_if_match(headers, None)
            others = self.store.list_cas()
            for other in others:
                if other.thumbprint == thumbprint and other.name.lower() != name.lower():
                    raise DpsError(errors.CONFLICT, f"this certificate is already uploaded as "
                                   f"{other.name!r}")
            if existing is None and len(others) >= MAX_CA_CERTIFICATES:
                raise DpsError(errors.CONFLICT, f"at most {MAX_CA_CERTIFICATES} CA "
                               "certificates per instance; delete one first")
            record = CaRecord(existing.name if existing else name, cert.public_bytes(Encoding.DER),
                              thumbprint, verified, None, new_etag(),
                              existing.created if existing else now, now)
            self.store.put_ca(record)
        return Reply(200, self._ca_view(record), {})

    def delete_ca(self, name, *, headers, body) -> Reply:
        with self.store.transaction():
            record = self._ca_or_404(name)
            _check_if_match(headers, record.etag)
            users = self.store.groups_referencing(name)
            if users:
                raise DpsError(errors.CONFLICT, f"CA certificate {name!r} is referenced by "
                               f"enrollment group(s) {', '.join(users)}; change them first")
            self.store.delete_ca(name)
        return Reply(204, None, {})

    def generate_code(self, name, *, headers, body) -> Reply:
        with self.store.transaction():
            record = self._ca_or_404(name)
            _check_if_match(headers, record.etag)
            code = secrets.token_hex(24).upper()
            record = CaRecord(record.name, record.der, record.thumbprint, record.is_verified,
                              code, new_etag(), record.created, _rfc1123(self._now()))
            self.store.put_ca(record)
        return Reply(200, self._ca_view(record, code), {})

    def verify_ca(self, name, *, headers, body) -> Reply:
        data = json_object(body)
        text = data.get("certificate")
        if text is None and isinstance(data.get("properties"), dict):
            text = data["properties"].get("certificate")
        proof = parse_certificate(text, "certificate")
        with self.store.transaction():
            record = self._ca_or_404(name)
            _check_if_match(headers, record.etag)
            if not record.verification_code:
                raise DpsError(errors.BAD_REQUEST, "no verification code is pending for this "
                               "certificate: call generateVerificationCode first")
            cn = common_name(proof) or ""
            if cn.upper() != record.verification_code:
                raise DpsError(errors.BAD_REQUEST, "the verification certificate's subject CN "
                               "is not the current verification code")
            now = self._now()
            if not proof.not_valid_before_utc <= now <= proof.not_valid_after_utc:
                raise DpsError(errors.BAD_REQUEST, "the verification certificate is outside "
                               "its validity period")
            try:
                proof.verify_directly_issued_by(record.certificate())
            except (ValueError, TypeError, InvalidSignature):
                raise DpsError(errors.BAD_REQUEST, "the verification certificate is not signed "
                               "by this CA certificate's private key") from None
            record = CaRecord(record.name, record.der, record.thumbprint, True, None,
                              new_etag(), record.created, _rfc1123(now))
            self.store.put_ca(record)
        return Reply(200, self._ca_view(record), {})

    # -- enrollments and groups ---------------------------------------------------------

    def _entry_or_404(self, kind: str, entry_id: str) -> Entry:
        entry = self.store.get_entry(kind, entry_id)
        if entry is None:
            what = "individual enrollment" if kind == INDIVIDUAL else "enrollment group"
            raise DpsError(errors.ENROLLMENT_NOT_FOUND, f"no {what} {entry_id!r}")
        return entry

    def _entry_view(self, entry: Entry) -> dict:
        view = dict(entry.doc)
        view["etag"] = entry.etag
        if entry.kind == INDIVIDUAL:
            record = self.store.get_registration(entry.id)
            if record is not None:
                view["registrationState"] = dict(record.doc)
        return view

    def get_entry(self, kind, entry_id, *, headers, body) -> Reply:
        return Reply(200, self._entry_view(self._entry_or_404(kind, entry_id)), {})

    def attestation(self, kind, entry_id, *, headers, body) -> Reply:
        return Reply(200, self._entry_or_404(kind, entry_id).doc["attestation"], {})

    def put_entry(self, kind, entry_id, *, headers, body) -> Reply:
        data = json_object(body)
        with self.store.transaction():
            existing = self.store.get_entry(kind, entry_id)
            if headers.get("if-match") is not None:
                _check_if_match(headers, existing.etag if existing else None)
            entry = self._save_entry(kind, entry_id, data, existing)
        return Reply(200, self._entry_view(entry), {})

    # A GET answer carries certificate `info` only; sending it back unchanged (the SDKs'
    # get-modify-put pattern) keeps the stored certificate of that slot.

    def _save_entry(self, kind: str, entry_id: str, data: dict, existing: Entry | None) -> Entry:
        doc, thumbprints = self._validated_entry(kind, entry_id, data, existing)
        if existing is None and kind == GROUP and \
                len(self.store.list_entries(GROUP, "", MAX_GROUPS + 1)) >= MAX_GROUPS:
            raise DpsError(errors.CONFLICT, f"at most {MAX_GROUPS} enrollment groups per instance")
        now = utc_text(self._now())
        doc["createdDateTimeUtc"] = existing.doc.get("createdDateTimeUtc", now) if existing else now
        doc["lastUpdatedDateTimeUtc"] = now
        etag = new_etag()
        doc["etag"] = etag
        enabled = doc["provisioningStatus"] == "enabled"
        self.store.put_entry(kind, entry_id, doc, etag, thumbprints, enabled)
        return Entry(kind, doc["registrationId" if kind == INDIVIDUAL else "enrollmentGroupId"],
                     enabled, doc, etag)

    def _validated_entry(self, kind: str, entry_id: str, data: dict,
                         existing: Entry | None = None) -> tuple[dict, list[str]]:
        """The stored form of an enrollment body and the certificate thumbprints it uses."""
        id_field = "registrationId" if kind == INDIVIDUAL else "enrollmentGroupId"
        problem = validate_registration_id(entry_id)
        if problem:
            raise DpsError(errors.INVALID_REGISTRATION_ID if kind == INDIVIDUAL
                           else errors.BAD_REQUEST, f"invalid {id_field}: {problem}")
        claimed = data.get(id_field, entry_id)
        if not isinstance(claimed, str) or claimed.lower() != entry_id.lower():
            raise DpsError(errors.BAD_REQUEST, f"{id_field} in the body differs from the path")
        doc = {k: v for k, v in data.items()
               if k not in ("registrationState", "etag", "createdDateTimeUtc",
                            "lastUpdatedDateTimeUtc")}
        doc[id_field] = claimed
        attestation, thumbprints = self._validated_attestation(
            kind, data.get("attestation"), existing.doc.get("attestation") if existing else None)
        doc["attestation"] = attestation
        self._validate_common(kind, doc)
        return doc, thumbprints

    def _validated_attestation(self, kind: str, attestation,
                               stored: dict | None) -> tuple[dict, list[str]]:
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
            refs = {}
            thumbprints = []
            for slot in ("primary", "secondary"):
                name = slots.get(slot)
                if name is None:
                    continue
                record = self.store.get_ca(name) if isinstance(name, str) else None
                if record is None:
                    raise DpsError(errors.BAD_REQUEST, f"caReferences.{slot} names no uploaded "
                                   f"CA certificate ({name!r}); upload it first")
                refs[slot] = record.name
                thumbprints.append(record.thumbprint)
            return {"type": "x509", "x509": {"caReferences": refs}}, thumbprints
        stored_slots, thumbprints = {}, []
        for slot in ("primary", "secondary"):
            value = slots.get(slot)
            if value is None:
                continue
            text = value.get("certificate") if isinstance(value, dict) else None
            kept = _kept_info(value, stored, field_name, slot) if text is None else None
            if kept is not None:
                stored_slots[slot] = {"info": kept}
                if kept["sha256Thumbprint"] not in thumbprints:
                    thumbprints.append(kept["sha256Thumbprint"])
                continue
            cert = parse_certificate(text, f"attestation.x509.{field_name}.{slot}.certificate")
            if field_name == "signingCertificates":
                problem = ca_problem(cert, 0)
                if problem:
                    raise DpsError(errors.BAD_REQUEST, f"signingCertificates.{slot} {problem}")
            stored_slots[slot] = {"info": certificate_info(cert)}
            thumbprint = sha256_thumbprint(cert)
            if thumbprint not in thumbprints:
                thumbprints.append(thumbprint)
        return {"type": "x509", "x509": {field_name: stored_slots}}, thumbprints

    def _validate_common(self, kind: str, doc: dict) -> None:
        status = doc.setdefault("provisioningStatus", "enabled")
        if status not in ("enabled", "disabled"):
            raise DpsError(errors.BAD_REQUEST, 'provisioningStatus must be "enabled" or "disabled"')
        policy = doc.get("reprovisionPolicy")
        if policy is not None:
            if not isinstance(policy, dict) or not all(
                    isinstance(policy.get(k, True), bool)
                    for k in ("updateHubAssignment", "migrateDeviceData")):
                raise DpsError(errors.BAD_REQUEST, "reprovisionPolicy must be {updateHubAssignment:"
                               " bool, migrateDeviceData: bool}")
        allocation = doc.get("allocationPolicy")
        if allocation == "custom" or doc.get("customAllocationDefinition"):
            raise DpsError(errors.BAD_REQUEST, "custom allocation (webhooks) is not supported by "
                           "the emulator; use hashed or static")
        if allocation is not None and allocation not in _ALLOCATION:
            raise DpsError(errors.BAD_REQUEST, f"allocationPolicy must be one of {', '.join(_ALLOCATION)}")
        hubs = doc.get("iotHubs")
        if hubs is not None and (not isinstance(hubs, list) or
                                 not all(isinstance(h, str) for h in hubs)):
            raise DpsError(errors.BAD_REQUEST, "iotHubs must be a list of hub host names")
        single = doc.get("iotHubHostName")
        if single is not None and not isinstance(single, str):
            raise DpsError(errors.BAD_REQUEST, "iotHubHostName must be a hub host name")
        names = listed_hubs(doc)
        unknown = [h for h in names if self.config.hub(h) is None]
        if unknown:
            linked = ", ".join(h.name for h in self.config.hubs) or "none"
            raise DpsError(errors.BAD_REQUEST, f"IoT hub(s) {', '.join(unknown)} are not linked "
                           f"to this instance (linked: {linked})")
        effective = allocation or self.config.allocation_policy
        if effective == "static" and len(names) != 1:
            raise DpsError(errors.BAD_REQUEST, "static allocation needs exactly one hub in "
                           "iotHubs or iotHubHostName")
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

    def delete_entry(self, kind, entry_id, *, headers, body) -> Reply:
        with self.store.transaction():
            entry = self._entry_or_404(kind, entry_id)
            _check_if_match(headers, entry.etag)
            self.store.delete_entry(kind, entry_id)
        return Reply(204, None, {})

    def query_entries(self, kind, *, headers, body) -> Reply:
        _query_body(body)
        after, count = _page_args(headers)
        entries = self.store.list_entries(kind, after, count + 1)
        return _paged([self._entry_view(e) for e in entries], [e.id.lower() for e in entries],
                      count, "Enrollment" if kind == INDIVIDUAL else "EnrollmentGroup")

    def bulk(self, kind, *, headers, body) -> Reply:
        data = json_object(body)
        list_field = "enrollments" if kind == INDIVIDUAL else "enrollmentGroups"
        id_field = "registrationId" if kind == INDIVIDUAL else "enrollmentGroupId"
        mode = data.get("mode")
        items = data.get(list_field)
        if mode not in ("create", "update", "updateIfMatchETag", "delete"):
            raise DpsError(errors.BAD_REQUEST, "mode must be create, update, updateIfMatchETag "
                           "or delete")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BULK:
            raise DpsError(errors.BAD_REQUEST, f"{list_field} must be a list of 1..{MAX_BULK} items")
        failures = []
        for item in items:
            entry_id = item.get(id_field) if isinstance(item, dict) else None
            try:
                if not isinstance(entry_id, str):
                    raise DpsError(errors.BAD_REQUEST, f"{id_field} is required")
                self._bulk_one(kind, mode, entry_id, item)
            except DpsError as exc:
                failures.append({id_field: entry_id, "errorCode": exc.code,
                                 "errorStatus": exc.message})
        return Reply(200, {"isSuccessful": not failures, "errors": failures}, {})

    def _bulk_one(self, kind: str, mode: str, entry_id: str, item: dict) -> None:
        with self.store.transaction():
            existing = self.store.get_entry(kind, entry_id)
            if mode == "delete":
                if existing is None:
                    self._entry_or_404(kind, entry_id)
                self.store.delete_entry(kind, entry_id)
                return
            if mode == "create" and existing is not None:
                raise DpsError(errors.CONFLICT, f"{entry_id!r} already exists")
            if mode == "updateIfMatchETag":
                _check_if_match({"if-match": str(item.get("etag", ""))},
                                existing.etag if existing else None)
            self._save_entry(kind, entry_id, item, existing)

    # -- registrations ------------------------------------------------------------------

    @staticmethod
    def _registration_view(row: RegistrationRow) -> dict:
        view = dict(row.doc)
        if row.internal.get("devicePayload") is not None:
            view["devicePayload"] = row.internal["devicePayload"]
        return view

    def _registration_or_404(self, registration_id: str) -> RegistrationRow:
        row = self.store.get_registration(registration_id)
        if row is None:
            raise DpsError(errors.REGISTRATION_NOT_FOUND,
                           f"no registration record for {registration_id!r}")
        return row

    def get_registration(self, registration_id, *, headers, body) -> Reply:
        return Reply(200, self._registration_view(self._registration_or_404(registration_id)), {})

    def delete_registration(self, registration_id, *, headers, body) -> Reply:
        with self.store.transaction():
            row = self._registration_or_404(registration_id)
            _check_if_match(headers, row.doc.get("etag"))
            self.store.delete_registration(registration_id)
        return Reply(204, None, {})

    def query_registrations(self, group_id, *, headers, body) -> Reply:
        self._entry_or_404(GROUP, group_id)
        after, count = _page_args(headers)
        rows = self.store.list_registrations(group_id, after, count + 1)
        return _paged([self._registration_view(r) for r in rows],
                      [r.registration_id.lower() for r in rows], count, "DeviceRegistration")
