"""Registration records (made when a device registers): get, delete, a group's records,
and every record of the instance (an emulator extension for `device-sim stub registration
list`; docs/emulator.md, "Service API")."""

from __future__ import annotations

from .. import errors
from ..enrollment_walk import GROUP
from ..errors import DpsError, Reply
from ..store import RegistrationRow, Store
from . import paging
from .preconditions import check_if_match


def registration_view(row: RegistrationRow) -> dict:
    view = dict(row.doc)
    if row.internal.get("devicePayload") is not None:
        view["devicePayload"] = row.internal["devicePayload"]
    if row.internal.get("initialTwin") is not None:  # what a custom webhook gave the hub
        view["initialTwin"] = row.internal["initialTwin"]
    return view


def emulator_view(row: RegistrationRow) -> dict:
    """The record with what only the emulator knows: how many register calls made it."""
    return {**registration_view(row), "registerRequests": row.internal.get("registerRequests", 1)}


class Registrations:
    def __init__(self, store: Store):
        self.store = store

    def _or_404(self, registration_id: str) -> RegistrationRow:
        row = self.store.get_registration(registration_id)
        if row is None:
            raise DpsError(errors.REGISTRATION_NOT_FOUND,
                           f"no registration record for {registration_id!r}")
        return row

    def get(self, registration_id, *, headers, body) -> Reply:
        return Reply(200, registration_view(self._or_404(registration_id)), {})

    def delete(self, registration_id, *, headers, body) -> Reply:
        with self.store.transaction():
            row = self._or_404(registration_id)
            check_if_match(headers, row.doc.get("etag"))
            self.store.delete_registration(registration_id)
        return Reply(204, None, {})

    def query_group(self, group_id, *, headers, body) -> Reply:
        if self.store.get_entry(GROUP, group_id) is None:
            raise DpsError(errors.ENROLLMENT_NOT_FOUND, f"no enrollment group {group_id!r}")
        return self._page(group_id, headers)

    def query_all(self, *, headers, body) -> Reply:
        paging.check_query(body)
        return self._page(None, headers, emulator_view)

    def _page(self, group_id: str | None, headers, view=registration_view) -> Reply:
        after, count = paging.page_args(headers)
        rows = self.store.list_registrations(group_id, after, count + 1)
        return paging.paged([view(r) for r in rows],
                            [r.registration_id.lower() for r in rows], count, "DeviceRegistration")
