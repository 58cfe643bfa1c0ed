"""What the emulator dashboard shows and does, read and done through `ServiceApi` like any
service client (docs/emulator.md, "Dashboard"), so the page never bypasses a rule.

The dashboard holds the service key in-process: it signs its own SAS per call. This module
does no I/O of its own; the HTTP edge is `stub/net/dashboard.py`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from urllib.parse import quote

from device_sim.common.dps import SERVICE_API_VERSION
from device_sim.common.errors import UserError
from device_sim.stub.core import sas

BUCKET_SECONDS = 10
BUCKETS = 30  # five minutes of throughput
MAX_ROWS = 10_000  # one page of each listing (the service's largest)
RECENT_REGISTRATIONS = 200
KINDS = {"group": "enrollmentGroups", "enrollment": "enrollments"}


class DashboardError(UserError):
    """An action the service refused; `status` is the HTTP status to answer with."""

    code = "dashboard"

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class DashboardView:
    def __init__(self, service_api, clock=None):
        self.service_api = service_api
        self.clock = clock or service_api.clock

    # -- reads

    def state(self) -> dict:
        registrations = self._list("POST", "/emulator/registrations/query", {"query": "*"})
        registrations.sort(key=lambda r: r.get("lastUpdatedDateTimeUtc") or "", reverse=True)
        return {
            "idScope": self.service_api.config.id_scope,
            "now": _utc(self.clock()),
            "cas": [_ca_row(r) for r in self._value("/certificates")],
            "enrollments": ([_entry_row("group", r) for r in self._list("POST", "/enrollmentGroups/query", {"query": "*"})]
                            + [_entry_row("enrollment", r) for r in self._list("POST", "/enrollments/query", {"query": "*"})]),
            "registrations": [_registration_row(r) for r in registrations[:RECENT_REGISTRATIONS]],
            "registrationCount": len(registrations),
            "throughput": throughput(registrations, self.clock()),
            "faults": self._faults(),
        }

    def _faults(self):
        """The fault plan and its counters where the emulator has them (`/emulator/faults`)."""
        reply = self._call("GET", "/emulator/faults")
        return reply.body if reply.status == 200 else None

    def _value(self, path: str) -> list:
        body = self._ok(self._call("GET", path))
        return body.get("value", []) if isinstance(body, dict) else (body or [])

    def _list(self, method: str, path: str, body) -> list:
        reply = self._call(method, path, body, {"x-ms-max-item-count": str(MAX_ROWS)})
        result = self._ok(reply)
        return list(result) if isinstance(result, list) else []

    # -- actions

    def set_enabled(self, kind: str, entry_id: str, enabled: bool) -> dict:
        """GET, change provisioningStatus, PUT back with the etag (what `stub group|enroll
        enable|disable` do)."""
        path = f"/{_kind(kind)}/{_seg(entry_id)}"
        record = self._ok(self._call("GET", path))
        record.pop("registrationState", None)
        record["provisioningStatus"] = "enabled" if enabled else "disabled"
        headers = {"if-match": record["etag"]} if record.get("etag") else {}
        return _entry_row(kind, self._ok(self._call("PUT", path, record, headers)))

    def delete_registration(self, registration_id: str) -> None:
        self._ok(self._call("DELETE", f"/registrations/{_seg(registration_id)}"))

    # -- plumbing

    def _call(self, method: str, path: str, body=None, headers: dict | None = None):
        config = self.service_api.config
        token = sas.make_token(config.service_host, self.service_api.service_key)
        data = b"" if body is None else json.dumps(body).encode()
        return self.service_api.handle(method, path, {"api-version": SERVICE_API_VERSION},
                                       {"authorization": token, **(headers or {})}, data)

    @staticmethod
    def _ok(reply):
        if reply.status >= 400:
            message = (reply.body or {}).get("message") if isinstance(reply.body, dict) else None
            raise DashboardError(message or f"the service answered {reply.status}", reply.status)
        return reply.body


def throughput(registrations: list[dict], now: float) -> list[dict]:
    """Registrations last updated in each 10 s bucket of the last five minutes, oldest first.
    A device that registers again moves to its newest bucket: these are registrations as
    the records last saw them, not a request log."""
    end = int(now // BUCKET_SECONDS + 1) * BUCKET_SECONDS
    start = end - BUCKETS * BUCKET_SECONDS
    counts = [0] * BUCKETS
    for record in registrations:
        stamp = _parse_utc(record.get("lastUpdatedDateTimeUtc"))
        if stamp is not None and start <= stamp < end:
            counts[int((stamp - start) // BUCKET_SECONDS)] += 1
    return [{"start": _utc(start + i * BUCKET_SECONDS), "count": n} for i, n in enumerate(counts)]


def _ca_row(record: dict) -> dict:
    props = record.get("properties", {})
    return {"name": record.get("name"), "verified": bool(props.get("isVerified")),
            "subject": props.get("subject"), "thumbprint": props.get("thumbprint"),
            "expiry": props.get("expiry")}


def _entry_row(kind: str, record: dict) -> dict:
    x509 = (record.get("attestation") or {}).get("x509") or {}
    if "caReferences" in x509:
        attestation = f"CA {(x509['caReferences'] or {}).get('primary')}"
    elif "signingCertificates" in x509:
        attestation = "signing certificate"
    elif "clientCertificates" in x509:
        attestation = "device certificate"
    else:
        attestation = (record.get("attestation") or {}).get("type", "?")
    entry_id = record.get("enrollmentGroupId") if kind == "group" else record.get("registrationId")
    return {"kind": kind, "id": entry_id,
            "enabled": record.get("provisioningStatus", "enabled") == "enabled",
            "attestation": attestation,
            "allocation": record.get("allocationPolicy") or "instance default",
            "hubs": record.get("iotHubs") or []}


def _registration_row(record: dict) -> dict:
    return {key: record.get(key) for key in
            ("registrationId", "status", "assignedHub", "deviceId", "lastUpdatedDateTimeUtc",
             "errorMessage")}


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise DashboardError(f"unknown enrollment kind {kind!r} (group or enrollment)", 404)
    return KINDS[kind]


def _seg(value: str) -> str:
    return quote(value, safe="")


def _utc(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_utc(text) -> float | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
