"""Bulk operations on entries: `{"mode": ..., "enrollments"|"enrollmentGroups": [...]}`,
at most 10 items, each applied in its own transaction; the answer lists the failures
(docs/emulator.md, "Service API")."""

from __future__ import annotations

from .. import errors
from ..enrollment_walk import INDIVIDUAL
from ..errors import DpsError, Reply
from ..json_body import json_object
from .enrollments import Enrollments
from .preconditions import check_if_match
from .validation import id_field

MAX_BULK = 10
MODES = ("create", "update", "updateIfMatchETag", "delete")


def bulk(enrollments: Enrollments, kind: str, body: bytes) -> Reply:
    data = json_object(body)
    list_field = "enrollments" if kind == INDIVIDUAL else "enrollmentGroups"
    name = id_field(kind)
    mode = data.get("mode")
    items = data.get(list_field)
    if mode not in MODES:
        raise DpsError(errors.BAD_REQUEST, "mode must be create, update, updateIfMatchETag "
                       "or delete")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BULK:
        raise DpsError(errors.BAD_REQUEST, f"{list_field} must be a list of 1..{MAX_BULK} items")
    failures = []
    for item in items:
        entry_id = item.get(name) if isinstance(item, dict) else None
        try:
            if not isinstance(entry_id, str):
                raise DpsError(errors.BAD_REQUEST, f"{name} is required")
            _one(enrollments, kind, mode, entry_id, item)
        except DpsError as exc:
            failures.append({name: entry_id, "errorCode": exc.code, "errorStatus": exc.message})
    return Reply(200, {"isSuccessful": not failures, "errors": failures}, {})


def _one(enrollments: Enrollments, kind: str, mode: str, entry_id: str, item: dict) -> None:
    store = enrollments.store
    with store.transaction():
        existing = store.get_entry(kind, entry_id)
        if mode == "delete":
            if existing is None:
                enrollments.get(kind, entry_id, headers={}, body=b"")  # raises the 404
            store.delete_entry(kind, entry_id)
            return
        if mode == "create" and existing is not None:
            raise DpsError(errors.CONFLICT, f"{entry_id!r} already exists")
        if mode == "updateIfMatchETag":
            check_if_match({"if-match": str(item.get("etag", ""))},
                           existing.etag if existing else None)
        enrollments.save(kind, entry_id, item, existing)
