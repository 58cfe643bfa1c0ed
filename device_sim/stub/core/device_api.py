"""The device-facing DPS API, independent of transport: HTTPS and MQTT front ends call it.

Each method takes what the device sent (path IDs already URL-decoded, the TLS chain as
presented, leaf first, the raw body) and returns a `Reply`; nothing raises out of it.

Decisions where the public documentation is silent (docs/x509-rules.md, "Open questions"):
- The register call always answers `202` with `status: assigning`, an `operationId`,
  `Retry-After` (config.retry_after) and a `Location`: absolute
  (`https://{host}/{idScope}/registrations/{id}/register`) when the front end passes the
  request's `host`, else relative. The
  outcome is decided and committed during that call; polls answer `202 assigning` until
  `config.assignment_delay` has passed, then `200` with the stored terminal status.
- A disabled entry: terminal poll `200` with `status: disabled` (not a 401) and an
  `errorMessage` naming the entry ("enrollment group 'line' is disabled"); the
  registration record shows the same. A 401 message names the entry that matched when
  one did.
- Every reply carries `x-ms-request-id`. A certificate that cannot be decoded is a 401,
  never a 500.
- No hub available: terminal poll `200` with `status: failed`, errorCode 400208.
- The device `payload` is stored with the registration (visible as `devicePayload` in
  the service API) and not echoed to the device: DPS returns only a payload produced by a
  custom-allocation webhook (`registrationState.payload`).
- Custom allocation: the register call starts the webhook through the injected
  `WebhookCaller` and answers `202 assigning` at once; polls read `assigning` until the
  webhook's outcome is committed (docs/emulator.md, "Custom allocation webhooks"). An
  operation still pending from an earlier process (the webhook's answer was lost with it)
  ends `failed` with 400209 on its next poll.
- `csr` (certificate issuance, preview API): checked and issued through `issuance`
  (docs/certificate-issuance.md); the chain rides only the terminal operation result.
  Sent to the status lookup it is a 400, as the spec says.
- Polls are authenticated cheaply: the leaf CN must match the path and the leaf must be
  the certificate that started the operation (the TLS handshake proved its key).
- The status lookup (POST) runs the full walk: an unauthenticated chain gets 401002,
  an unknown registration 404202.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone

from cryptography import x509

from device_sim.common import dps
from device_sim.common.registration_id import MAX_LENGTH, registration_id_problem
from device_sim.common.x509util import common_name, sha256_thumbprint

from . import errors, issuance
from .allocation import allocate, is_custom, twin_applies, webhook_hubs
from .cert_input import certificate_info
from .config import StubConfig
from .enrollment_walk import DISABLED, GROUP, UNAUTHORIZED, decide
from .errors import DpsError, Reply, error_reply, utc_text, with_request_id
from .faults import Faults
from .json_body import json_object
from .quotas import Quotas
from .store import OperationRow, RegistrationRow, Store
from .webhook import FAILED_PREFIX, AllocationResponse, WebhookAnswer, WebhookCall, \
    WebhookCaller, allocation_request, read_answer

__all__ = ["DeviceApi", "Reply", "validate_registration_id", "new_etag"]

log = logging.getLogger(__name__)

# A Host header value fit to put into Location: a name or address, an optional port.
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(:[0-9]{1,5})?$")


def location(host: str | None, path: str) -> str:
    """Absolute when the request named a usable host, else the path alone."""
    if host and _HOST.match(host):
        return f"https://{host}{path}"
    return path


def validate_registration_id(registration_id: str) -> str | None:
    """None when valid, else why not: the shared rule of hsm_setup (128 characters at most
    here; a leaf CN is shorter anyway, and a longer path ID simply fails the CN match)."""
    return registration_id_problem(registration_id, max_length=MAX_LENGTH)


def new_etag() -> str:
    """Opaque entity tag (base64-looking like the service's)."""
    return secrets.token_urlsafe(12)


def new_operation_id() -> str:
    return f"5.{secrets.token_hex(8)}.{uuid.uuid4()}"


class DeviceApi:
    def __init__(self, store: Store, config: StubConfig, clock=time.time,
                 issuer: issuance.Issuer | None = None, policies=None,
                 webhooks: WebhookCaller | None = None):
        self.store = store
        self.config = config
        self.clock = clock
        self.issuer = issuer  # None: no issuing CA, so a csr is refused
        self.policies = issuance.default_policies() if policies is None else policies
        self.webhooks = webhooks
        self._in_flight: set[str] = set()  # operation IDs whose webhook runs in this process
        self._in_flight_lock = threading.Lock()
        self._throttled: dict[str, int] = {}
        self._throttle_lock = threading.Lock()
        # The fault plan every edge asks (docs/emulator.md, "Fault plans"); set live.
        self.faults = Faults()
        self.quotas = Quotas(config.quota_units)

    # -- the three operations -----------------------------------------------------------

    def register(self, id_scope: str, registration_id: str, api_version: str | None,
                 chain: Sequence[x509.Certificate], body: bytes, host: str | None = None,
                 hold: float | None = None) -> Reply:
        """`host`: the request's Host header (HTTPS), which makes `Location` absolute.
        `hold`: seconds the operation stays `assigning` at least (a fault plan's assigning_s)."""
        return self._guarded(self._register, id_scope, registration_id, api_version, chain,
                             body, host, hold)

    def operation_status(self, id_scope: str, registration_id: str, operation_id: str,
                         api_version: str | None, chain: Sequence[x509.Certificate]) -> Reply:
        return self._guarded(self._operation_status, id_scope, registration_id, operation_id,
                             api_version, chain)

    def registration_status(self, id_scope: str, registration_id: str, api_version: str | None,
                            chain: Sequence[x509.Certificate], body: bytes) -> Reply:
        return self._guarded(self._registration_status, id_scope, registration_id,
                             api_version, chain, body)

    # -- plumbing -----------------------------------------------------------------------

    def _guarded(self, method, *args) -> Reply:
        try:
            return with_request_id(method(*args))
        except DpsError as exc:
            return exc.reply(self._now()[1])
        except Exception as exc:  # never let a front end see a traceback
            log.exception("device API failure")
            return error_reply(errors.INTERNAL_ERROR,
                               f"internal error in the emulator ({type(exc).__name__})")

    def _now(self) -> tuple[float, datetime]:
        stamp = self.clock()
        return stamp, datetime.fromtimestamp(stamp, timezone.utc)

    def _check_request(self, id_scope: str, registration_id: str, api_version: str | None) -> None:
        if not api_version:
            raise DpsError(errors.MISSING_API_VERSION,
                           "the api-version query parameter is required "
                           f"(e.g. {dps.DEVICE_API_VERSION})")
        if id_scope.lower() != self.config.id_scope.lower():
            raise DpsError(errors.NOT_FOUND, f"unknown ID scope {id_scope!r}")
        problem = validate_registration_id(registration_id)
        if problem:
            raise DpsError(errors.INVALID_REGISTRATION_ID, f"Invalid RegistrationId: {problem}")
        self._throttle(registration_id)

    def _throttle(self, registration_id: str) -> None:
        if not self.config.throttle:
            return
        key = registration_id.lower()
        with self._throttle_lock:
            seen = self._throttled.get(key, 0)
            if seen >= self.config.throttle:
                return
            self._throttled[key] = seen + 1
        raise DpsError(errors.THROTTLED, "Too many requests (emulator throttle setting)",
                       {"Retry-After": "1"})

    @staticmethod
    def _check_quota(retry_after: int | None, what: str) -> None:
        if retry_after is not None:
            raise DpsError(errors.THROTTLED, f"Too many requests: the {what} quota of this "
                           "instance is used up (emulator --quota-units)",
                           {"Retry-After": str(retry_after)})

    def _parse_body(self, body: bytes, registration_id: str) -> dict:
        if len(body) > self.config.max_body:
            raise DpsError(errors.PAYLOAD_TOO_LARGE,
                           f"the request body is larger than {self.config.max_body} bytes")
        data = json_object(body, required=False)
        claimed = data.get("registrationId")
        if claimed is not None and (not isinstance(claimed, str)
                                    or claimed.lower() != registration_id.lower()):
            raise DpsError(errors.INVALID_REGISTRATION_ID,
                           "Invalid RegistrationId: the body's registrationId differs from the path")
        if data.get("payload") is not None and not isinstance(data["payload"], dict):
            raise DpsError(errors.BAD_REQUEST, "payload must be a JSON object")
        return data

    @staticmethod
    def _leaf_matches(chain: Sequence[x509.Certificate], registration_id: str) -> None:
        if not chain:
            raise DpsError(errors.INVALID_CERTIFICATE,
                           "Invalid certificate: no client certificate was presented")
        cn = common_name(chain[0])
        if cn is None or cn.lower() != registration_id.lower():
            raise DpsError(errors.INVALID_CERTIFICATE, "Invalid certificate: the registration "
                           "ID does not match the certificate's subject CN")

    # -- register -----------------------------------------------------------------------

    def _register(self, id_scope, registration_id, api_version, chain, body, host, hold) -> Reply:
        self._check_request(id_scope, registration_id, api_version)
        self._check_quota(self.quotas.admit_registration(), "device registrations")
        data = self._parse_body(body, registration_id)
        self._leaf_matches(chain, registration_id)
        stamp, now = self._now()
        decision = decide(chain, self.store.walk_view(), now)
        if decision.outcome == UNAUTHORIZED:
            raise DpsError(errors.INVALID_CERTIFICATE, f"Invalid certificate: {decision.reason}")
        csr = self._checked_csr(data.get("csr"), registration_id, decision)
        previous = self.store.get_registration(registration_id)
        operation_id = new_operation_id()
        # A fault plan's hold keeps the operation `assigning` longer (docs/emulator.md).
        ready_at = stamp + max(self.config.assignment_delay, hold or 0.0)
        started = (decision.outcome != DISABLED and is_custom(decision.entry.doc)
                   and self._start_webhook(decision, previous, data.get("payload"),
                                           api_version, chain, ready_at, operation_id, csr))
        if not started:
            row = self._outcome(decision, previous, data.get("payload"), api_version, now)
            self.store.save_registration(row, self._terminal(operation_id, decision, row, ready_at,
                                                             csr, now))
        headers = {"Retry-After": str(self.config.retry_after),
                   "Location": location(host, f"/{id_scope}/registrations/{registration_id}/register")}
        return Reply(202, {"operationId": operation_id, "status": dps.ASSIGNING}, headers)

    def _terminal(self, operation_id: str, decision, row: RegistrationRow, ready_at: float,
                  csr, now: datetime) -> OperationRow:
        """The operation's final answer; an issued chain rides only here (never the record)."""
        body = {"operationId": operation_id, "status": row.doc["status"],
                "registrationState": {"x509": {}, **row.doc}}
        if csr is not None and row.doc["status"] == dps.ASSIGNED:
            issued = self.issuer.issue(csr[0], decision.registration_id, csr[1], now)
            body["registrationState"]["issuedCertificateChain"] = issuance.chain_base64(issued)
        return OperationRow(operation_id, decision.registration_id.lower(),
                            decision.leaf_thumbprint, ready_at, body)

    def _checked_csr(self, value, registration_id, decision):
        """(request, policy) when the body asks for a certificate, else None; a fault is a 400."""
        if value is None:
            return None
        csr = issuance.parse_csr(value, registration_id)
        if decision.outcome == DISABLED:
            return None
        policy = issuance.policy_for(decision.entry.doc, self.policies, decision.entry.label)
        if self.issuer is None:
            raise DpsError(issuance.NO_CREDENTIAL_POLICY,
                           "this emulator runs without an issuing CA, so it cannot issue certificates")
        return csr, policy

    # -- custom allocation --------------------------------------------------------------

    def _start_webhook(self, decision, previous, payload, api_version, chain, ready_at,
                       operation_id, csr) -> bool:
        """Hand the AllocationRequest to the webhook caller; False when there is no
        candidate hub to offer (the ordinary outcome then fails with 400208)."""
        entry = decision.entry
        before = previous.internal if previous else {}
        linked = webhook_hubs(entry.doc, self.config, before, api_version)
        if not linked:
            return False
        x509_info = {"certificateInfo": certificate_info(chain[0])}
        if entry.kind == GROUP:
            x509_info["enrollmentGroupId"] = entry.id
        if len(chain) > 1:
            x509_info["signingCertificateInfo"] = certificate_info(chain[1])
        kind_field = "enrollmentGroup" if entry.kind == GROUP else "individualEnrollment"
        document = allocation_request(kind_field, entry.doc, decision.registration_id,
                                      x509_info, payload, before, linked)
        self.store.start_operation(OperationRow(
            operation_id, decision.registration_id.lower(), decision.leaf_thumbprint, ready_at,
            {"operationId": operation_id, "status": dps.ASSIGNING}))
        with self._in_flight_lock:
            self._in_flight.add(operation_id)

        def done(answer: WebhookAnswer) -> None:
            self._finish_webhook(answer, decision, previous, payload, api_version, ready_at,
                                 operation_id, csr)

        if self.webhooks is None:
            done(WebhookAnswer(error="the emulator was started without a webhook client"))
        else:
            self.webhooks.submit(WebhookCall(entry.doc["customAllocationDefinition"]["webhookUrl"],
                                             document), done)
        return True

    def _finish_webhook(self, answer, decision, previous, payload, api_version, ready_at,
                        operation_id, csr) -> None:
        """Runs in the caller's worker thread: commit the outcome the answer decides."""
        try:
            outcome = read_answer(answer)
            for custom in (outcome, (None, f"{FAILED_PREFIX}: the emulator could not record "
                                           "the webhook's answer")):
                try:
                    now = self._now()[1]
                    row = self._outcome(decision, previous, payload, api_version, now,
                                        custom=custom)
                    self.store.finish_operation(row, self._terminal(operation_id, decision,
                                                                    row, ready_at, csr, now))
                    return
                except Exception:  # the worker has nobody to report to but the log
                    log.exception("custom allocation outcome not recorded")
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(operation_id)

    def _outcome(self, decision, previous: RegistrationRow | None, payload,
                 api_version, now: datetime,
                 custom: tuple[AllocationResponse | None, str | None] | None = None
                 ) -> RegistrationRow:
        """The new registration record for this decision (not yet stored); `custom` is
        the webhook's (response, error) for a custom entry."""
        entry = decision.entry
        cn = decision.registration_id
        before = previous.internal if previous else {}
        now_text = utc_text(now)
        doc = {"registrationId": cn,
               "createdDateTimeUtc": (previous.doc.get("createdDateTimeUtc") if previous
                                      else None) or now_text}
        internal = {key: before.get(key) for key in
                    ("assignedHub", "deviceId", "substatus", "initialHub")}
        response, custom_error = custom or (None, None)
        if decision.outcome == DISABLED:
            doc.update(status=dps.DISABLED, errorMessage=decision.reason)
        elif custom_error:
            doc.update(status=dps.FAILED, errorCode=errors.CUSTOM_ALLOCATION_FAILED,
                       errorMessage=custom_error)
        else:
            result = allocate(cn, decision.device_id, entry.doc, self.config,
                              before, api_version, response.hub if response else None)
            if result.hub is None:
                doc.update(status=dps.FAILED, errorMessage=result.error,
                           errorCode=errors.CUSTOM_ALLOCATION_FAILED if response
                           else errors.NO_HUB_ASSIGNED)
            else:
                doc.update(assignedHub=result.hub, deviceId=result.device_id,
                           status=dps.ASSIGNED, substatus=result.substatus)
                internal.update(assignedHub=result.hub, deviceId=result.device_id,
                                substatus=result.substatus, initialHub=result.initial_hub)
                if response is not None:
                    self._webhook_results(doc, internal, response, before, result.hub,
                                          entry.doc, api_version)
        doc.update(lastUpdatedDateTimeUtc=now_text, etag=new_etag())
        internal.update(devicePayload=payload, entryKind=entry.kind, entryId=entry.id,
                        leafThumbprint=decision.leaf_thumbprint, apiVersion=api_version,
                        # Register calls this record has seen: a fleet run proves with it
                        # that no device registered more often than its faults forced.
                        registerRequests=before.get("registerRequests", 0) + 1)
        group_id = entry.id if entry.kind == GROUP else None
        return RegistrationRow(cn, group_id, doc, internal)

    @staticmethod
    def _webhook_results(doc, internal, response, before, hub, entry_doc, api_version) -> None:
        """The webhook's payload goes to the device every time; its twin only when the
        hub gets a fresh one (else the hub keeps the device's twin)."""
        if response.payload is not None:
            doc["payload"] = response.payload
        if twin_applies(before, hub, entry_doc, api_version):
            internal["initialTwin"] = response.initial_twin or entry_doc.get("initialTwin")
        else:
            internal["initialTwin"] = before.get("initialTwin")

    # -- polling ------------------------------------------------------------------------

    def _operation_status(self, id_scope, registration_id, operation_id, api_version,
                          chain) -> Reply:
        self._check_request(id_scope, registration_id, api_version)
        self._check_quota(self.quotas.admit_poll(registration_id), "operation-status polls")
        self._leaf_matches(chain, registration_id)
        # Read before the row: a worker commits its outcome, then leaves the set.
        in_flight = operation_id in self._in_flight
        operation = self.store.get_operation(operation_id)
        if operation is None or operation.registration_id != registration_id.lower():
            raise DpsError(errors.OPERATION_NOT_FOUND,
                           f"operation {operation_id!r} not found for this registration")
        if operation.leaf_thumbprint != sha256_thumbprint(chain[0]):
            raise DpsError(errors.INVALID_CERTIFICATE, "Invalid certificate: the operation was "
                           "started with a different device certificate")
        pending = operation.body.get("status") == dps.ASSIGNING
        if pending and not in_flight:
            return Reply(200, self._lost_webhook(operation_id, registration_id), {})
        if pending or self.clock() < operation.ready_at:
            return Reply(202, {"operationId": operation_id, "status": dps.ASSIGNING},
                         {"Retry-After": str(self.config.retry_after)})
        return Reply(200, operation.body, {})

    def _lost_webhook(self, operation_id: str, registration_id: str) -> dict:
        message = (f"{FAILED_PREFIX}: the emulator stopped while the webhook was being "
                   "called; register again")
        state = {"registrationId": registration_id, "status": dps.FAILED,
                 "errorCode": errors.CUSTOM_ALLOCATION_FAILED, "errorMessage": message,
                 "lastUpdatedDateTimeUtc": utc_text(self._now()[1])}
        return {"operationId": operation_id, "status": dps.FAILED, "registrationState": state}

    # -- status lookup ------------------------------------------------------------------

    def _registration_status(self, id_scope, registration_id, api_version, chain, body) -> Reply:
        self._check_request(id_scope, registration_id, api_version)
        if self._parse_body(body, registration_id).get("csr") is not None:
            raise DpsError(errors.BAD_REQUEST, "csr is not allowed in a registration status "
                           "lookup; send it with the register call")
        self._leaf_matches(chain, registration_id)
        decision = decide(chain, self.store.walk_view(), self._now()[1])
        if decision.outcome == UNAUTHORIZED:
            raise DpsError(errors.INVALID_CERTIFICATE, f"Invalid certificate: {decision.reason}")
        record = self.store.get_registration(registration_id)
        if record is None:
            raise DpsError(errors.REGISTRATION_NOT_FOUND,
                           f"no registration record for {registration_id!r}")
        return Reply(200, {"x509": {}, **record.doc}, {})
