"""Error replies of the emulator: the DPS error body, its numeric codes, and the Reply type.

DPS answers every failure with `{errorCode, trackingId, message, timestampUtc}` where the
HTTP status is `errorCode // 1000` and the `x-ms-error-code` header repeats the code.
Codes marked "observed" were seen from the real service (docs/x509-rules.md, "Error
codes"); the others follow the same convention but are this emulator's own choice,
because no official list is published. Every reply, success or error, carries an
`x-ms-request-id` (an error's equals its trackingId, as the service's do).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

# 400: bad request
BAD_REQUEST = 400000              # generic validation failure (own)
INVALID_REGISTRATION_ID = 400004  # observed: "Invalid RegistrationId"
MISSING_API_VERSION = 400001      # own
NO_HUB_ASSIGNED = 400208          # observed, reported inside registrationState
CUSTOM_ALLOCATION_FAILED = 400209  # observed: the custom allocation webhook failed
# 401: authentication
UNAUTHORIZED = 401000             # observed for SAS failures; used for the service API
INVALID_CERTIFICATE = 401002      # observed: certificate / chain not accepted
# 404: not found
NOT_FOUND = 404000                # generic: unknown route or unknown ID scope (own)
ENROLLMENT_NOT_FOUND = 404201     # observed (mapping unconfirmed)
REGISTRATION_NOT_FOUND = 404202   # observed (mapping unconfirmed)
OPERATION_NOT_FOUND = 404203      # own
CERTIFICATE_NOT_FOUND = 404204    # own
# 405, 409, 412, 413, 415, 429, 500
METHOD_NOT_ALLOWED = 405000
CONFLICT = 409000                 # own: e.g. a certificate already used by another entry
PRECONDITION_FAILED = 412002      # own (IoT Hub uses 412002 for ETag mismatch)
PAYLOAD_TOO_LARGE = 413000
UNSUPPORTED_MEDIA_TYPE = 415000
THROTTLED = 429001
INTERNAL_ERROR = 500000

REQUEST_ID = "x-ms-request-id"


def new_request_id() -> str:
    """A GUID, as the service's request IDs are. Unique, not secret: drawn from `random`
    (seeded from the OS), which is several times cheaper than `uuid4`'s os.urandom."""
    return str(uuid.UUID(int=random.getrandbits(128), version=4))


@dataclass(frozen=True)
class Reply:
    """What a front end sends back: HTTP status, JSON body (None = no body) and headers.

    Front ends add `Content-Type: application/json; charset=utf-8` when `body` is not None.
    MQTT maps `status` to the `res/{status}` topic and `Retry-After` to `&retry-after=`.
    """

    status: int
    body: dict | list | bytes | None  # bytes: sent as they are (a fault plan's non-JSON body)
    headers: dict[str, str] = field(default_factory=dict)


class DpsError(Exception):
    """A failure that becomes an error Reply; raised inside the core, never out of it."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}

    def reply(self, now: datetime | None = None) -> Reply:
        return error_reply(self.code, self.message, now=now, headers=self.headers)


def utc_text(moment: datetime) -> str:
    """DPS timestamp form: ISO 8601, UTC, `Z` suffix, 7 fractional digits at most."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def error_reply(code: int, message: str, *, now: datetime | None = None,
                headers: dict[str, str] | None = None) -> Reply:
    tracking_id = new_request_id()
    moment = now or datetime.now(timezone.utc)
    body = {
        "errorCode": code,
        "trackingId": tracking_id,
        "message": message,
        "timestampUtc": utc_text(moment),
    }
    all_headers = {"x-ms-error-code": str(code), REQUEST_ID: tracking_id}
    all_headers.update(headers or {})
    return Reply(code // 1000, body, all_headers)


def with_request_id(reply: Reply) -> Reply:
    """The reply with an `x-ms-request-id` header (kept when it has one already)."""
    if any(name.lower() == REQUEST_ID for name in reply.headers):
        return reply
    return Reply(reply.status, reply.body, {**reply.headers, REQUEST_ID: new_request_id()})
