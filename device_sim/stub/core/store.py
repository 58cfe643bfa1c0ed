"""The emulator's state in one SQLite file: CA certificates, enrollments, registrations,
operations.

Durability: WAL mode, and every acknowledged change is committed before the caller
replies. With `synchronous=NORMAL` (the default here) a commit survives a `kill -9` of
the process (it is in the WAL file, which the next open replays) but not a power cut or
kernel crash of the machine; `Store(path, durable=True)` uses `synchronous=FULL` for that,
at the cost of an fsync per registration.

Threads: one connection guarded by a lock; SQLite itself is fast enough that callers
never wait long, and a single connection avoids SQLITE_BUSY between our own threads.
Processes: the workers of `stub serve --workers N` (and any other process) use the same
file. Writes start with BEGIN IMMEDIATE, so a writer waits for the write lock up front
(busy timeout 5 s) instead of failing a read-then-write upgrade with SQLITE_BUSY. Another
process's commits are noticed via `PRAGMA data_version`; the walk view is rebuilt only
when the `shared` row "walk" (bumped by every entry or CA change) moved. The `shared`
table also carries what the workers must agree on (the live fault plan), `quota_events`
the service-operation quota window they share, and `worker_reports` what each worker
publishes about itself (docs/scaling.md).

Write checks: a document is stored only if it could be read back and walked: it must
serialise as plain JSON and nest at most MAX_STORED_DEPTH levels (the request bodies are
held to json_body.MAX_DEPTH; the emulator's own wrapping adds a few levels), else the
write is refused with a 400 and nothing changes. One bad write cannot poison the store.

Caches (rebuilt on any change): enrollment groups by certificate thumbprint (at most a
hundred groups, with `caReferences` resolved through the CA table), verified CA
certificates parsed once. Individual enrollments (up to a million) stay in SQL, found
through an index of certificate thumbprints that also enforces "one certificate, one
entry".
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from .enrollment_walk import GROUP, INDIVIDUAL, Entry, SignatureCache
from .errors import BAD_REQUEST, CONFLICT, DpsError
from .json_body import MAX_DEPTH, deeper_than

MAX_STORED_DEPTH = MAX_DEPTH + 8

SCHEMA = """
CREATE TABLE IF NOT EXISTS ca_certificates (
    name_key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    der BLOB NOT NULL,
    thumbprint TEXT NOT NULL,
    is_verified INTEGER NOT NULL,
    verification_code TEXT,
    etag TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    kind TEXT NOT NULL,
    id_key TEXT NOT NULL,
    doc TEXT NOT NULL,
    etag TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    PRIMARY KEY (kind, id_key)
);
CREATE TABLE IF NOT EXISTS cert_index (
    thumbprint TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    id_key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cert_index_owner ON cert_index (kind, id_key);
CREATE TABLE IF NOT EXISTS registrations (
    id_key TEXT PRIMARY KEY,
    group_key TEXT,
    doc TEXT NOT NULL,
    internal TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS registrations_group ON registrations (group_key);
CREATE TABLE IF NOT EXISTS operations (
    operation_id TEXT PRIMARY KEY,
    id_key TEXT NOT NULL,
    leaf_thumbprint TEXT NOT NULL,
    ready_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS operations_registration ON operations (id_key);
CREATE TABLE IF NOT EXISTS shared (
    key TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    doc TEXT
);
CREATE TABLE IF NOT EXISTS quota_events (
    kind TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS quota_events_kind ON quota_events (kind, at);
CREATE TABLE IF NOT EXISTS worker_reports (
    idx INTEGER PRIMARY KEY,
    doc TEXT NOT NULL
);
"""

# The `shared` row whose version counts changes to entries and CA certificates, so that
# another process rebuilds its walk view only for those, not for every registration.
WALK_KEY = "walk"


@dataclass(frozen=True)
class CaCertificateRow:
    """One uploaded CA certificate (the service API's certificate resource)."""

    name: str
    der: bytes
    thumbprint: str
    is_verified: bool
    verification_code: str | None
    etag: str
    created: str
    updated: str

    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)


@dataclass(frozen=True)
class RegistrationRow:
    registration_id: str
    group_id: str | None       # enrollment group that admitted it, None for individual
    doc: dict                  # DeviceRegistrationState fields
    internal: dict             # emulator-only: initialHub, devicePayload, entry, leaf


@dataclass(frozen=True)
class OperationRow:
    operation_id: str
    registration_id: str
    leaf_thumbprint: str
    ready_at: float
    body: dict                 # the terminal RegistrationOperationStatus


class WalkView:
    """A consistent snapshot for one decision (implements enrollment_walk.StoreView)."""

    def __init__(self, store: "Store", groups: dict[str, Entry],
                 verified: dict[str, x509.Certificate],
                 by_subject: dict[x509.Name, list[x509.Certificate]],
                 signatures: SignatureCache):
        self.signatures = signatures
        self._store = store
        self._groups = groups
        self._verified = verified
        self._by_subject = by_subject

    def individual_for(self, thumbprint: str) -> Entry | None:
        return self._store.individual_for(thumbprint)

    def group_for(self, thumbprint: str) -> Entry | None:
        return self._groups.get(thumbprint)

    def is_verified_ca(self, thumbprint: str) -> bool:
        return thumbprint in self._verified

    def verified_cas_named(self, subject: x509.Name) -> Sequence[x509.Certificate]:
        return self._by_subject.get(subject, ())


def document_text(doc: object, what: str) -> str:
    """The JSON text to store for `doc`; DpsError 400 when it could not be read back."""
    if deeper_than(doc, MAX_STORED_DEPTH):
        raise DpsError(BAD_REQUEST, f"the {what} nests deeper than {MAX_STORED_DEPTH} levels; "
                       "the emulator does not store what it could not read back")
    try:
        return json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError):
        raise DpsError(BAD_REQUEST, f"the {what} is not plain JSON") from None


def _entry(kind: str, doc_text: str, etag: str, enabled: int) -> Entry:
    doc = json.loads(doc_text)
    entry_id = doc.get("registrationId") if kind == INDIVIDUAL else doc.get("enrollmentGroupId")
    return Entry(kind, entry_id, bool(enabled), doc, etag)


def group_thumbprints(doc: dict, ca_thumbprints: dict[str, str]) -> list[str]:
    """SHA-256 thumbprints a group stands for: its signing certificates, or the CA
    certificates its caReferences name (by name, resolved now)."""
    x509_part = (doc.get("attestation") or {}).get("x509") or {}
    found = []
    signing = x509_part.get("signingCertificates") or {}
    for slot in ("primary", "secondary"):
        info = (signing.get(slot) or {}).get("info") or {}
        if info.get("sha256Thumbprint"):
            found.append(info["sha256Thumbprint"])
    refs = x509_part.get("caReferences") or {}
    for slot in ("primary", "secondary"):
        name = refs.get(slot)
        if name and name.lower() in ca_thumbprints:
            found.append(ca_thumbprints[name.lower()])
    return found


class Store:
    def __init__(self, path: Path, durable: bool = False):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._depth = 0
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False,
                                     isolation_level=None, timeout=5.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._cache_key: tuple[int, int] | None = None
        self._seen_versions: dict[str, int] = {}  # data_version each reader saw last
        self._walk_version = 0
        self._generation = 0
        self._view: WalkView | None = None
        # Outlives the views: its answers depend only on the two certificates of a link.
        self._signatures = SignatureCache()
        self._create_schema()

    def _create_schema(self) -> None:
        with self.transaction() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and one write transaction; nested uses join the outer one.
        Commits on success (before the caller replies), rolls back on any exception."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                self._generation += 1  # a rolled-back change may have reached the cache
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._depth = 0

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- walk view and caches -----------------------------------------------------------

    def _changed(self) -> None:
        """Entries or CA certificates changed through this connection: rebuild the view,
        here and (through the "walk" version) in every other process.
        (Registrations and operations do not touch it, so the hot path keeps its cache.)"""
        self._generation += 1
        self._bump_shared(WALK_KEY)

    def walk_view(self) -> WalkView:
        """The snapshot `enrollment_walk.decide` reads; rebuilt only after a change."""
        with self._lock:
            key = (self._walk_version_now(), self._generation)
            if key != self._cache_key or self._view is None:
                self._view = self._build_view()
                self._cache_key = key
            return self._view

    def _walk_version_now(self) -> int:
        if self._others_committed(WALK_KEY):
            self._walk_version = self.shared_version(WALK_KEY)
        return self._walk_version

    def _others_committed(self, reader: str) -> bool:
        """True when another connection committed since `reader` last asked (first: True)."""
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        changed = version != self._seen_versions.get(reader)
        self._seen_versions[reader] = version
        return changed

    # -- what the worker processes share -----------------------------------------------

    def _bump_shared(self, key: str, doc: str | None = None, keep_doc: bool = True) -> int:
        with self.transaction() as db:
            db.execute("INSERT INTO shared VALUES (?, 1, ?) ON CONFLICT (key) DO UPDATE SET"
                       " version = version + 1" + ("" if keep_doc else ", doc = excluded.doc"),
                       (key, doc))
            return db.execute("SELECT version FROM shared WHERE key = ?", (key,)).fetchone()[0]

    def put_shared(self, key: str, doc: object) -> int:
        """Store a document every process sees (JSON, None allowed); its new version."""
        return self._bump_shared(key, None if doc is None else json.dumps(doc), keep_doc=False)

    def get_shared(self, key: str) -> tuple[int, object]:
        """(version, document) of a shared row; (0, None) when never set."""
        rows = self._query("SELECT version, doc FROM shared WHERE key = ?", (key,))
        if not rows:
            return 0, None
        version, doc = rows[0]
        return version, None if doc is None else json.loads(doc)

    def shared_version(self, key: str) -> int:
        rows = self._query("SELECT version FROM shared WHERE key = ?", (key,))
        return rows[0][0] if rows else 0

    def changed_elsewhere(self, reader: str) -> bool:
        """Whether another process committed since `reader` last asked: a cheap check
        (no table read) before looking at a shared row."""
        with self._lock:
            return self._others_committed(reader)

    def publish_worker(self, index: int, doc: dict) -> None:
        """What worker `index` says about itself (pid, connections, fault counters)."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO worker_reports VALUES (?, ?)", (index, json.dumps(doc)))

    def worker_reports(self) -> dict[int, dict]:
        return {index: json.loads(doc) for index, doc in
                self._query("SELECT idx, doc FROM worker_reports ORDER BY idx")}

    def begin_run(self) -> None:
        """A new `--workers` run starts: the reports and quota windows of an earlier one
        are not about it."""
        with self.transaction() as db:
            db.execute("DELETE FROM worker_reports")
            db.execute("DELETE FROM quota_events")

    def admit_window(self, kind: str, limit: int, seconds: float, now: float) -> float | None:
        """One sliding window every process shares (`core/quotas.py`): None when a request
        at `now` (CLOCK_MONOTONIC, the same in every process) is admitted, else the time
        the oldest admitted one arrived."""
        with self.transaction() as db:
            db.execute("DELETE FROM quota_events WHERE kind = ? AND at <= ?", (kind, now - seconds))
            count, oldest = db.execute("SELECT count(*), min(at) FROM quota_events WHERE kind = ?",
                                       (kind,)).fetchone()
            if count < limit:
                db.execute("INSERT INTO quota_events VALUES (?, ?)", (kind, now))
                return None
            return oldest

    def _build_view(self) -> WalkView:
        verified: dict[str, x509.Certificate] = {}
        by_subject: dict[x509.Name, list[x509.Certificate]] = {}
        ca_thumbprints = {}
        for name_key, der, thumbprint, is_verified in self._conn.execute(
                "SELECT name_key, der, thumbprint, is_verified FROM ca_certificates"):
            ca_thumbprints[name_key] = thumbprint
            if is_verified:
                cert = x509.load_der_x509_certificate(der)
                verified[thumbprint] = cert
                by_subject.setdefault(cert.subject, []).append(cert)
        groups: dict[str, Entry] = {}
        for doc, etag, enabled in self._conn.execute(
                "SELECT doc, etag, enabled FROM entries WHERE kind = ?", (GROUP,)):
            entry = _entry(GROUP, doc, etag, enabled)
            for thumbprint in group_thumbprints(entry.doc, ca_thumbprints):
                groups.setdefault(thumbprint, entry)
        return WalkView(self, groups, verified, by_subject, self._signatures)

    def individual_for(self, thumbprint: str) -> Entry | None:
        rows = self._query(
            "SELECT e.doc, e.etag, e.enabled FROM cert_index c JOIN entries e"
            " ON e.kind = c.kind AND e.id_key = c.id_key"
            " WHERE c.thumbprint = ? AND c.kind = ?", (thumbprint, INDIVIDUAL))
        return _entry(INDIVIDUAL, *rows[0]) if rows else None

    def owner_of(self, thumbprint: str) -> tuple[str, str] | None:
        """(kind, entry id) of the entry using this certificate, directly or by caReference."""
        rows = self._query("SELECT e.kind, e.doc FROM cert_index c JOIN entries e"
                           " ON e.kind = c.kind AND e.id_key = c.id_key"
                           " WHERE c.thumbprint = ?", (thumbprint,))
        if rows:
            entry = _entry(rows[0][0], rows[0][1], "", 1)
            return entry.kind, entry.id
        group = self.walk_view().group_for(thumbprint)
        return (GROUP, group.id) if group else None

    # -- CA certificates ----------------------------------------------------------------

    def get_ca(self, name: str) -> CaCertificateRow | None:
        rows = self._query("SELECT name, der, thumbprint, is_verified, verification_code,"
                           " etag, created, updated FROM ca_certificates WHERE name_key = ?",
                           (name.lower(),))
        return self._ca(rows[0]) if rows else None

    def list_cas(self) -> list[CaCertificateRow]:
        rows = self._query("SELECT name, der, thumbprint, is_verified, verification_code,"
                           " etag, created, updated FROM ca_certificates ORDER BY name_key")
        return [self._ca(row) for row in rows]

    @staticmethod
    def _ca(row: tuple) -> CaCertificateRow:
        name, der, thumbprint, verified, code, etag, created, updated = row
        return CaCertificateRow(name, bytes(der), thumbprint, bool(verified), code, etag, created, updated)

    def put_ca(self, record: CaCertificateRow) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO ca_certificates VALUES (?,?,?,?,?,?,?,?,?)",
                       (record.name.lower(), record.name, record.der, record.thumbprint,
                        int(record.is_verified), record.verification_code, record.etag,
                        record.created, record.updated))
            self._changed()

    def delete_ca(self, name: str) -> bool:
        with self.transaction() as db:
            self._changed()
            return db.execute("DELETE FROM ca_certificates WHERE name_key = ?",
                              (name.lower(),)).rowcount > 0

    # -- enrollment entries -------------------------------------------------------------

    def get_entry(self, kind: str, entry_id: str) -> Entry | None:
        rows = self._query("SELECT doc, etag, enabled FROM entries WHERE kind = ? AND id_key = ?",
                           (kind, entry_id.lower()))
        return _entry(kind, *rows[0]) if rows else None

    def put_entry(self, kind: str, entry_id: str, doc: dict, etag: str,
                  thumbprints: Sequence[str], enabled: bool) -> None:
        """Insert or replace an entry; 409 when one of its certificates (SHA-256 thumbprints,
        caReferences resolved) already belongs to another entry."""
        key = entry_id.lower()
        text = document_text(doc, "enrollment" if kind == INDIVIDUAL else "enrollment group")
        with self.transaction() as db:
            self.check_certificates_free(kind, entry_id, thumbprints)
            db.execute("DELETE FROM cert_index WHERE kind = ? AND id_key = ?", (kind, key))
            db.executemany("INSERT OR IGNORE INTO cert_index VALUES (?,?,?)",
                           [(t, kind, key) for t in thumbprints])
            db.execute("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?)",
                       (kind, key, text, etag, int(enabled)))
            self._changed()

    def check_certificates_free(self, kind: str, entry_id: str,
                                thumbprints: Sequence[str]) -> None:
        """409 when one of these certificates already belongs to another entry."""
        key = entry_id.lower()
        for thumbprint in thumbprints:
            owner = self.owner_of(thumbprint)
            if owner and (owner[0], owner[1].lower()) != (kind, key):
                label = Entry(owner[0], owner[1], True).label
                raise DpsError(CONFLICT, f"certificate {thumbprint} is already used by {label}: "
                               "a certificate may appear in one entry only")

    def delete_entry(self, kind: str, entry_id: str) -> bool:
        key = entry_id.lower()
        with self.transaction() as db:
            self._changed()
            db.execute("DELETE FROM cert_index WHERE kind = ? AND id_key = ?", (kind, key))
            return db.execute("DELETE FROM entries WHERE kind = ? AND id_key = ?",
                              (kind, key)).rowcount > 0

    def list_entries(self, kind: str, after: str = "", limit: int = 100) -> list[Entry]:
        """Entries in ID order, starting after the (lower-cased) ID `after`."""
        rows = self._query("SELECT doc, etag, enabled FROM entries WHERE kind = ? AND id_key > ?"
                           " ORDER BY id_key LIMIT ?", (kind, after.lower(), limit))
        return [_entry(kind, *row) for row in rows]

    def groups_referencing(self, ca_name: str) -> list[str]:
        found = []
        for entry in self.list_entries(GROUP, "", 10_000):
            refs = ((entry.doc.get("attestation") or {}).get("x509") or {}).get("caReferences") or {}
            if any((refs.get(s) or "").lower() == ca_name.lower() for s in ("primary", "secondary")):
                found.append(entry.id)
        return found

    # -- registrations and operations ---------------------------------------------------

    def get_registration(self, registration_id: str) -> RegistrationRow | None:
        rows = self._query("SELECT group_key, doc, internal FROM registrations WHERE id_key = ?",
                           (registration_id.lower(),))
        if not rows:
            return None
        group_key, doc, internal = rows[0]
        doc = json.loads(doc)
        return RegistrationRow(doc.get("registrationId", registration_id), group_key,
                               doc, json.loads(internal))

    def list_registrations(self, group_id: str | None, after: str = "",
                           limit: int = 100) -> list[RegistrationRow]:
        """Registration records in ID order after `after`: of one group, or all (None)."""
        if group_id is None:
            rows = self._query("SELECT id_key, group_key, doc, internal FROM registrations"
                               " WHERE id_key > ? ORDER BY id_key LIMIT ?", (after.lower(), limit))
        else:
            rows = self._query("SELECT id_key, group_key, doc, internal FROM registrations"
                               " WHERE group_key = ? AND id_key > ? ORDER BY id_key LIMIT ?",
                               (group_id.lower(), after.lower(), limit))
        result = []
        for id_key, group_key, doc, internal in rows:
            doc = json.loads(doc)
            result.append(RegistrationRow(doc.get("registrationId", id_key), group_key,
                                          doc, json.loads(internal)))
        return result

    def delete_registration(self, registration_id: str) -> bool:
        key = registration_id.lower()
        with self.transaction() as db:
            db.execute("DELETE FROM operations WHERE id_key = ?", (key,))
            return db.execute("DELETE FROM registrations WHERE id_key = ?", (key,)).rowcount > 0

    def save_registration(self, row: RegistrationRow, operation: OperationRow) -> None:
        """Record the outcome and its operation in one commit; earlier operations of the
        same registration are dropped (keeps the table as small as the registrations)."""
        key = row.registration_id.lower()
        texts = [document_text(part, "registration record")
                 for part in (row.doc, row.internal, operation.body)]
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO registrations VALUES (?,?,?,?)",
                       (key, row.group_id.lower() if row.group_id else None, texts[0], texts[1]))
            db.execute("DELETE FROM operations WHERE id_key = ?", (key,))
            db.execute("INSERT INTO operations VALUES (?,?,?,?,?)",
                       (operation.operation_id, key, operation.leaf_thumbprint,
                        operation.ready_at, texts[2]))

    def start_operation(self, operation: OperationRow) -> None:
        """An operation whose outcome is not known yet (a webhook runs); it replaces the
        registration's earlier operations, the record itself stays as it was."""
        text = document_text(operation.body, "operation")
        with self.transaction() as db:
            db.execute("DELETE FROM operations WHERE id_key = ?", (operation.registration_id,))
            db.execute("INSERT INTO operations VALUES (?,?,?,?,?)",
                       (operation.operation_id, operation.registration_id,
                        operation.leaf_thumbprint, operation.ready_at, text))

    def finish_operation(self, row: RegistrationRow, operation: OperationRow) -> bool:
        """Record the outcome of a started operation, unless a newer register call
        replaced it meanwhile (then nothing changes and the answer is False)."""
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM operations WHERE operation_id = ?",
                              (operation.operation_id,)).fetchall():
                return False
            self.save_registration(row, operation)
            return True

    def get_operation(self, operation_id: str) -> OperationRow | None:
        rows = self._query("SELECT id_key, leaf_thumbprint, ready_at, body FROM operations"
                           " WHERE operation_id = ?", (operation_id,))
        if not rows:
            return None
        id_key, leaf, ready_at, body = rows[0]
        return OperationRow(operation_id, id_key, leaf, ready_at, json.loads(body))

    # -- overview -----------------------------------------------------------------------

    def counts(self) -> dict:
        """How much the store holds: CA certificates (verified or not), entries by kind,
        registrations by status and by assigned hub."""
        cas = self._query("SELECT is_verified, count(*) FROM ca_certificates GROUP BY is_verified")
        entries = dict(self._query("SELECT kind, count(*) FROM entries GROUP BY kind"))
        statuses = self._query("SELECT json_extract(doc, '$.status'), count(*) FROM registrations"
                               " GROUP BY 1")
        hubs = self._query("SELECT json_extract(doc, '$.assignedHub'), count(*) FROM registrations"
                           " WHERE json_extract(doc, '$.status') = 'assigned' GROUP BY 1")
        verified = sum(n for flag, n in cas if flag)
        return {
            "certificates": {"total": sum(n for _, n in cas), "verified": verified},
            "enrollments": entries.get(INDIVIDUAL, 0),
            "enrollmentGroups": entries.get(GROUP, 0),
            "registrations": {"total": sum(n for _, n in statuses),
                              "byStatus": {str(status): n for status, n in statuses}},
            "assignedByHub": {str(hub): n for hub, n in hubs},
        }
