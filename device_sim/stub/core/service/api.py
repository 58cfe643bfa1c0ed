"""`ServiceApi`: the one entry of the service API, `handle(method, path, query, headers,
body) -> Reply`. It checks the body size, the SAS token and the api-version, routes, and
never raises (docs/emulator.md, "Service API").

Routes (every call needs `?api-version=...`, e.g. SERVICE_API_VERSION, and an
`Authorization: SharedAccessSignature ...` header made with `sas.make_token` for
`config.service_host`, alone or with one of `config.service_ports`):

| method | path | what |
|---|---|---|
| GET | /certificates | list CA certificates (`{"value": [...]}`) |
| GET, PUT, DELETE | /certificates/{name} | CA certificate (ARM shape) |
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
| POST | /emulator/registrations/query | every registration record (emulator only) |
| GET | /emulator/status | counts of what the emulator holds (emulator only) |
| GET, PUT, DELETE | /emulator/faults | the live fault plan and its counters (emulator only) |
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from urllib.parse import unquote

from device_sim.common.dps import SERVICE_API_VERSION

from .. import errors
from ..config import StubConfig
from ..enrollment_walk import GROUP, INDIVIDUAL
from ..errors import DpsError, Reply, error_reply, with_request_id
from ..faults import Faults
from ..quotas import Quotas
from ..sas import SasError, verify_token_for
from ..store import Store
from .bulk import bulk
from .certificates import CaCertificates
from .enrollments import Enrollments
from .faults import FaultPlanRoutes
from .registrations import Registrations
from .status import Status

log = logging.getLogger(__name__)

Handlers = dict[str, Callable[..., Reply]]


class ServiceApi:
    def __init__(self, store: Store, config: StubConfig, service_key: bytes, clock=time.time,
                 server_status: Callable[[], dict] | None = None, faults: Faults | None = None):
        """`server_status`: the server's part of `/emulator/status` (listeners, uptime).
        `faults`: the live plan `/emulator/faults` shows and changes (the device API's)."""
        self.store = store
        self.config = config
        self.service_key = service_key
        self.clock = clock
        self.certificates = CaCertificates(store, clock)
        self.enrollments = Enrollments(store, config, clock)
        self.registrations = Registrations(store)
        self.faults = faults if faults is not None else Faults()
        self.fault_routes = FaultPlanRoutes(self.faults)
        self.quotas = Quotas(config.quota_units)
        self.status = Status(store, config, server_status, self.faults)

    def handle(self, method: str, path: str, query: dict[str, str],
               headers: Mapping[str, str], body: bytes) -> Reply:
        try:
            headers = {k.lower(): v for k, v in headers.items()}
            return with_request_id(self._handle(method.upper(), path, query, headers, body or b""))
        except DpsError as exc:
            return exc.reply(datetime.fromtimestamp(self.clock(), timezone.utc))
        except Exception as exc:  # a bug: never let the front end see a traceback
            log.exception("service API failure")
            return error_reply(errors.INTERNAL_ERROR,
                               f"internal error in the emulator ({type(exc).__name__})")

    def _handle(self, method, path, query, headers, body) -> Reply:
        if len(body) > self.config.max_body:
            raise DpsError(errors.PAYLOAD_TOO_LARGE,
                           f"the request body is larger than {self.config.max_body} bytes")
        path = path.split("?", 1)[0]
        self._authenticate(headers.get("authorization"), path)
        if not query.get("api-version"):
            raise DpsError(errors.MISSING_API_VERSION, "the api-version query parameter is "
                           f"required (e.g. {SERVICE_API_VERSION})")
        segments = [unquote(s) for s in path.strip("/").split("/") if s]
        if segments[:1] != ["emulator"]:  # the emulator's own paths are not DPS operations
            self._check_quota()
        handlers, args = self._route(segments)
        if handlers is None:
            raise DpsError(errors.NOT_FOUND, f"no such resource: {path}")
        handler = handlers.get(method)
        if handler is None:
            raise DpsError(errors.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path} "
                           f"(allowed: {', '.join(sorted(handlers))})",
                           {"Allow": ", ".join(sorted(handlers))})
        return handler(*args, headers=headers, body=body)

    def _check_quota(self) -> None:
        retry_after = self.quotas.admit_service_operation()
        if retry_after is not None:
            raise DpsError(errors.THROTTLED, "Too many requests: the service operations quota of this "
                           "instance is used up (emulator --quota-units)", {"Retry-After": str(retry_after)})

    def _authenticate(self, token: str | None, path: str) -> None:
        resource_path = path.strip("/")
        resources = tuple(f"{host}/{resource_path}" for host in self.config.service_resources())
        try:
            verify_token_for(token, self.service_key, resources, now=self.clock())
        except SasError as exc:
            raise DpsError(errors.UNAUTHORIZED, f"Unauthorized: {exc}") from None

    def _route(self, seg: list[str]) -> tuple[Handlers | None, tuple]:
        words = [s.lower() for s in seg]
        if not seg:
            return None, ()
        head = words[0]
        if head == "certificates":
            return self._certificate_route(seg, words)
        if head in ("enrollments", "enrollmentgroups"):
            return self._entry_route(INDIVIDUAL if head == "enrollments" else GROUP, seg, words)
        if head == "registrations":
            return self._registration_route(seg, words)
        if head == "emulator":
            return self._emulator_route(words)
        return None, ()

    def _certificate_route(self, seg, words):
        n, cas = len(seg), self.certificates
        if n == 1:
            return {"GET": cas.list}, ()
        if n == 2:
            return {"GET": cas.get, "PUT": cas.put, "DELETE": cas.delete}, (seg[1],)
        if n == 3 and words[2] == "generateverificationcode":
            return {"POST": cas.generate_code}, (seg[1],)
        if n == 3 and words[2] == "verify":
            return {"POST": cas.verify}, (seg[1],)
        return None, ()

    def _entry_route(self, kind, seg, words):
        n, entries = len(seg), self.enrollments
        if n == 1:
            return {"POST": lambda _kind, headers, body: bulk(entries, _kind, body)}, (kind,)
        if n == 2:
            handlers: Handlers = {"GET": entries.get, "PUT": entries.put, "DELETE": entries.delete}
            if words[1] == "query":
                handlers["POST"] = lambda _kind, _id, **kw: entries.query(_kind, **kw)
            return handlers, (kind, seg[1])
        if n == 3 and words[2] == "attestationmechanism":
            return {"POST": entries.attestation}, (kind, seg[1])
        return None, ()

    def _registration_route(self, seg, words):
        n, records = len(seg), self.registrations
        if n == 2:
            return {"GET": records.get, "DELETE": records.delete}, (seg[1],)
        if n == 3 and words[2] == "query":
            return {"POST": records.query_group}, (seg[1],)
        return None, ()

    def _emulator_route(self, words):
        if words == ["emulator", "status"]:
            return {"GET": self.status.get}, ()
        if words == ["emulator", "registrations", "query"]:
            return {"POST": self.registrations.query_all}, ()
        if words == ["emulator", "faults"]:
            routes = self.fault_routes
            return {"GET": routes.get, "PUT": routes.put, "DELETE": routes.delete}, ()
        return None, ()
