"""Individual enrollments and enrollment groups: get, create or replace, delete, query,
attestation mechanism (docs/emulator.md, "Service API").

The `etag` inside a body is ignored (bulk `updateIfMatchETag` aside); If-Match, when
given, must match. At most 100 enrollment groups per instance.
"""

from __future__ import annotations

from datetime import datetime, timezone

from device_sim.common import dps

from .. import errors
from ..device_api import new_etag
from ..enrollment_walk import GROUP, INDIVIDUAL, Entry
from ..errors import DpsError, Reply, utc_text
from ..json_body import json_object
from ..store import Store
from . import paging
from .preconditions import check_if_match
from .validation import client_cn_problem, id_field, validated_entry

MAX_GROUPS = 100


class Enrollments:
    def __init__(self, store: Store, config, clock):
        self.store = store
        self.config = config
        self.clock = clock

    def _or_404(self, kind: str, entry_id: str) -> Entry:
        entry = self.store.get_entry(kind, entry_id)
        if entry is None:
            raise DpsError(errors.ENROLLMENT_NOT_FOUND, f"no {Entry(kind, entry_id, True).label}")
        return entry

    def view(self, entry: Entry) -> dict:
        view = dict(entry.doc)
        view["etag"] = entry.etag
        if entry.kind == INDIVIDUAL:
            record = self.store.get_registration(entry.id)
            if record is not None:
                view["registrationState"] = dict(record.doc)
        return view

    def get(self, kind, entry_id, *, headers, body) -> Reply:
        return Reply(200, self.view(self._or_404(kind, entry_id)), {})

    def attestation(self, kind, entry_id, *, headers, body) -> Reply:
        return Reply(200, self._or_404(kind, entry_id).doc["attestation"], {})

    def put(self, kind, entry_id, *, headers, body) -> Reply:
        data = json_object(body)
        with self.store.transaction():
            existing = self.store.get_entry(kind, entry_id)
            if headers.get("if-match") is not None:
                check_if_match(headers, existing.etag if existing else None)
            entry = self.save(kind, entry_id, data, existing)
        return Reply(200, self.view(entry), {})

    def save(self, kind: str, entry_id: str, data: dict, existing: Entry | None) -> Entry:
        """Validate and store one entry (inside the caller's transaction)."""
        valid = validated_entry(kind, entry_id, data, existing, self.store, self.config)
        # A certificate already enrolled elsewhere is the first thing to report: it is
        # what an operator mixing up two devices most needs to hear.
        self.store.check_certificates_free(kind, entry_id, valid.thumbprints)
        if kind == INDIVIDUAL:
            problem = client_cn_problem(entry_id, valid.client_certificates)
            if problem:
                raise DpsError(errors.BAD_REQUEST, problem)
        if existing is None and kind == GROUP and \
                len(self.store.list_entries(GROUP, "", MAX_GROUPS + 1)) >= MAX_GROUPS:
            raise DpsError(errors.CONFLICT, f"at most {MAX_GROUPS} enrollment groups per instance")
        doc = valid.doc
        now = utc_text(datetime.fromtimestamp(self.clock(), timezone.utc))
        doc["createdDateTimeUtc"] = existing.doc.get("createdDateTimeUtc", now) if existing else now
        doc["lastUpdatedDateTimeUtc"] = now
        etag = new_etag()
        doc["etag"] = etag
        enabled = doc["provisioningStatus"] == dps.ENABLED
        self.store.put_entry(kind, entry_id, doc, etag, valid.thumbprints, enabled)
        return Entry(kind, doc[id_field(kind)], enabled, doc, etag)

    def delete(self, kind, entry_id, *, headers, body) -> Reply:
        with self.store.transaction():
            entry = self._or_404(kind, entry_id)
            check_if_match(headers, entry.etag)
            self.store.delete_entry(kind, entry_id)
        return Reply(204, None, {})

    def query(self, kind, *, headers, body) -> Reply:
        paging.check_query(body)
        after, count = paging.page_args(headers)
        entries = self.store.list_entries(kind, after, count + 1)
        return paging.paged([self.view(e) for e in entries], [e.id.lower() for e in entries],
                            count, "Enrollment" if kind == INDIVIDUAL else "EnrollmentGroup")
