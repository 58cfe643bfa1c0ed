"""The device registry: which token holds which device identity, and its certificates.

<home>/pki/devices.sqlite holds one row per device (registration ID unique,
case-insensitively); <home>/pki/devices/<id>.pem is the leaf certificate and
<id>.chain.pem the leaf followed by its CA chain up to the root. Readers (device
side, fleet runs) get the key's CKA_ID and certificates without any label search
on a token; `list_devices` reads 10,000 rows in well under a second, and `iter_devices`
and `tokens_of` let a fleet run read any number of them in constant memory.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Iterator

from cryptography import x509

from device_sim.common.errors import UserError
from device_sim.common.registration_id import normalize_registration_id
from device_sim.common.x509util import load_certificates, to_der
from hsm_setup import ca

DB_NAME = "devices.sqlite"
PEM_DIR = "devices"
# ca_name of a device whose issuer is no CA of this registry (bring-your-own PKI, see
# docs/byo-pki.md): this prefix + the issuer's subject. Its CA certificates come from the
# device's chain file instead of the CA registry.
EXTERNAL_CA_PREFIX = "external:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    registration_id TEXT NOT NULL PRIMARY KEY COLLATE NOCASE,
    token_label     TEXT NOT NULL,
    token_serial    TEXT NOT NULL,
    slot_id         INTEGER,
    key_id          BLOB NOT NULL,
    label           TEXT NOT NULL,
    key_type        TEXT NOT NULL,
    ca_name         TEXT NOT NULL,
    uri             TEXT NOT NULL,
    certificate     BLOB NOT NULL,
    cert_path       TEXT NOT NULL,
    chain_path      TEXT NOT NULL,
    created         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
CREATE INDEX IF NOT EXISTS devices_by_token ON devices (token_label);
"""
_COLUMNS = ("registration_id", "token_label", "token_serial", "slot_id", "key_id", "label",
            "key_type", "ca_name", "uri", "certificate", "cert_path", "chain_path", "created")


@dataclasses.dataclass(frozen=True)
class DeviceRecord:
    registration_id: str
    token_label: str
    token_serial: str
    slot_id: int | None
    key_id: bytes           # CKA_ID shared by private key, public key and certificate
    label: str              # CKA_LABEL (= registration ID)
    key_type: str           # ec-p256, ...
    ca_name: str            # issuing CA
    uri: str                # RFC 7512 URI of the identity (no PIN)
    certificate: bytes      # leaf, DER
    chain: tuple[bytes, ...]  # issuing CA first, root last, DER
    cert_path: Path         # leaf PEM
    chain_path: Path        # leaf + chain PEM
    created: str

    def certificate_x509(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.certificate)

    def chain_x509(self) -> list[x509.Certificate]:
        return [x509.load_der_x509_certificate(c) for c in self.chain]

    def as_dict(self) -> dict:
        return {
            "registration_id": self.registration_id, "token": self.token_label,
            "token_serial": self.token_serial, "slot_id": self.slot_id,
            "key_id": self.key_id.hex(), "label": self.label, "key_type": self.key_type,
            "ca": self.ca_name, "uri": self.uri, "certificate": str(self.cert_path),
            "chain": str(self.chain_path), "created": self.created,
        }


def db_path(home: Path) -> Path:
    return Path(home) / "pki" / DB_NAME


def pem_dir(home: Path) -> Path:
    return Path(home) / "pki" / PEM_DIR


def pem_paths(home: Path, registration_id: str) -> tuple[Path, Path]:
    """(leaf PEM, chain PEM) file names for a device (lower-case: IDs compare case-insensitively)."""
    stem = normalize_registration_id(registration_id)
    folder = pem_dir(home)
    return folder / f"{stem}.pem", folder / f"{stem}.chain.pem"


def connect(home: Path, *, create: bool = False) -> sqlite3.Connection | None:
    """The registry database; None when it does not exist and `create` is false."""
    path = db_path(home)
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a commit is a cheap append (no fsync), so writers commit every row
    # and several fleet workers never wait on each other's open transaction.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    return conn


def find_device(home: Path, registration_id: str) -> DeviceRecord | None:
    conn = connect(home)
    if conn is None:
        return None
    with conn:
        row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM devices WHERE registration_id = ?",
                           (registration_id,)).fetchone()
    conn.close()
    return _record(home, row, {}) if row else None


def lookup_device(home: Path, registration_id: str) -> DeviceRecord:
    """The device `registration_id` (case-insensitive); UserError if unknown."""
    record = find_device(home, registration_id)
    if record is None:
        raise UserError(f"unknown device {registration_id!r}: create it with "
                        f"'hsm-setup device create {registration_id} --ca NAME'")
    return record


def list_devices(home: Path, *, token_label: str | None = None,
                 prefix: str | None = None) -> list[DeviceRecord]:
    """All registered devices (optionally of one token / with an ID prefix), by ID."""
    return list(iter_devices(home, token_label=token_label, prefix=prefix))


def iter_devices(home: Path, *, token_label: str | None = None, prefix: str | None = None,
                 limit: int | None = None, page: int = 100) -> Iterator[DeviceRecord]:
    """The same records as `list_devices`, read `page` rows at a time (keyset paging on the
    ID index: each page costs the same however far into the registry it is), at most `limit`."""
    where, params = _filters(token_label, prefix)
    chains: dict[str, tuple[bytes, ...]] = {}
    last, left = None, limit
    while left is None or left > 0:
        size = page if left is None else min(page, left)
        clauses = where + (["registration_id > ?"] if last is not None else [])
        query = f"SELECT {', '.join(_COLUMNS)} FROM devices"
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        rows = _read(home, query + " ORDER BY registration_id LIMIT ?",
                     [*params, *([last] if last is not None else []), size])
        for row in rows:
            yield _record(home, row, chains)
        if len(rows) < size:
            return
        last = rows[-1][0]
        left = None if left is None else left - len(rows)


def count_by_token(home: Path, *, prefix: str | None = None, limit: int | None = None) -> dict[str, int]:
    """Devices per token label (of the first `limit` by ID with `prefix`, when given)."""
    return {label: count for label, (count, _) in tokens_of(home, prefix=prefix, limit=limit).items()}


def tokens_of(home: Path, *, prefix: str | None = None, limit: int | None = None) -> dict[str, tuple[int, str]]:
    """Token label -> (devices, first registration ID) over the devices `iter_devices`
    would give for `prefix` and `limit`: one count query, no rows read into memory."""
    where, params = _filters(None, prefix)
    inner = "SELECT token_label, registration_id FROM devices"
    if where:
        inner += " WHERE " + " AND ".join(where)
    if limit is not None:
        inner += " ORDER BY registration_id LIMIT ?"
        params = [*params, limit]
    rows = _read(home, f"SELECT token_label, COUNT(*), MIN(registration_id) FROM ({inner}) "
                       "GROUP BY token_label ORDER BY MIN(registration_id)", params)
    return {label: (count, first) for label, count, first in rows}


def token_serials(home: Path) -> dict[str, str]:
    """Token label -> the serial its devices were made on (one query; a token initialised
    again since has another serial now)."""
    return {label: serial for label, serial in
            _read(home, "SELECT token_label, MAX(token_serial) FROM devices GROUP BY token_label", [])}


def _filters(token_label: str | None, prefix: str | None) -> tuple[list[str], list]:
    where, params = [], []
    if token_label is not None:
        where.append("token_label = ?")
        params.append(token_label)
    if prefix:
        where.append("registration_id LIKE ? ESCAPE '\\'")
        params.append(prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
    return where, params


def _read(home: Path, query: str, params) -> list:
    conn = connect(home)
    if conn is None:
        return []
    try:
        with conn:
            return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def existing(home: Path, registration_ids: list[str]) -> dict[str, tuple[str, str, str]]:
    """Which of `registration_ids` are registered already (case-insensitively):
    registration ID -> (token label, CA name, key type)."""
    conn = connect(home)
    if conn is None:
        return {}
    with conn:
        conn.execute("CREATE TEMP TABLE wanted (id TEXT COLLATE NOCASE)")
        conn.executemany("INSERT INTO wanted VALUES (?)", [(i,) for i in registration_ids])
        rows = conn.execute("SELECT d.registration_id, d.token_label, d.ca_name, d.key_type "
                            "FROM devices d JOIN wanted w ON d.registration_id = w.id").fetchall()
    conn.close()
    return {r[0]: tuple(r[1:]) for r in rows}


def insert(conn: sqlite3.Connection, row: dict) -> None:
    """Add one device row (caller commits); UserError on a duplicate ID."""
    try:
        conn.execute(
            f"INSERT INTO devices ({', '.join(_COLUMNS[:-1])}) VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})",
            tuple(row[c] for c in _COLUMNS[:-1]))
    except sqlite3.IntegrityError:
        raise UserError(f"registration ID {row['registration_id']!r} exists already "
                        "(IDs compare case-insensitively)") from None


def _record(home: Path, row, chains: dict) -> DeviceRecord:
    values = dict(zip(_COLUMNS, row))
    ca_name = values["ca_name"]
    if ca_name.startswith(EXTERNAL_CA_PREFIX):
        chain = _chain_file_cas(Path(values["chain_path"]))
    else:
        if ca_name not in chains:
            chains[ca_name] = tuple(c.certificate for c in ca.chain_of(home, ca.load_ca(home, ca_name)))
        chain = chains[ca_name]
    values["key_id"] = bytes(values["key_id"])
    values["certificate"] = bytes(values["certificate"])
    values["cert_path"] = Path(values["cert_path"])
    values["chain_path"] = Path(values["chain_path"])
    return DeviceRecord(chain=chain, **values)


def _chain_file_cas(chain_path: Path) -> tuple[bytes, ...]:
    """The CA certificates (DER) after the leaf in a device's chain file; none if it is gone."""
    try:
        data = chain_path.read_bytes()
    except OSError:
        return ()
    return tuple(to_der(c) for c in load_certificates(data, str(chain_path))[1:])
