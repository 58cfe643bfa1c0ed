"""Where one emulator keeps its state: the names below `<home>/stub/`, in one place.

    <home>/stub/
      stub.db          SQLite (WAL) store: CA certificates, enrollments, registrations
      settings.json    ID scope and hubs chosen on first start (reused after a restart)
      service.key      service API key, base64, mode 600 (the SAS signing key; never printed)
      endpoint.json    written while `stub serve` runs: its ready line, for the admin verbs
                       and for `device-sim register --emulator` (mode 600: the service
                       connection string in it carries the key)
      tls/ca.pem       the CA clients trust; tls/ca.key its key (mode 600)
      tls/server.pem   the server certificate, tls/server.key its key (mode 600)
      issuing/ca.pem   the issuing CA of certificate issuance, then its root (PEM bundle);
                       issuing/ca.key its key (mode 600), unless --issuing-ca-* names others

The server (`stub/server.py`), the admin client (`stub/admin.py`) and the device side read
these names from here; see docs/emulator.md for what each file holds.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from pathlib import Path

from device_sim.common.errors import UserError
from device_sim.common.files import write_atomic

STATE_SUBDIR = "stub"
DB_FILE = "stub.db"
SETTINGS_FILE = "settings.json"
SERVICE_KEY_FILE = "service.key"
ENDPOINT_FILE = "endpoint.json"
TLS_SUBDIR = "tls"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
ISSUING_SUBDIR = "issuing"
ISSUING_CA_CERT_FILE = "ca.pem"
ISSUING_CA_KEY_FILE = "ca.key"


@dataclass(frozen=True)
class StateLayout:
    """The paths of one emulator's state directory (nothing is created by naming them)."""

    root: Path  # <home>/stub
    database: Path
    settings: Path
    service_key: Path
    endpoint: Path
    tls_dir: Path
    ca_cert: Path

    @classmethod
    def of(cls, home: Path) -> StateLayout:
        return cls.at(Path(home) / STATE_SUBDIR)

    @classmethod
    def at(cls, root: Path) -> StateLayout:
        tls_dir = root / TLS_SUBDIR
        return cls(root, root / DB_FILE, root / SETTINGS_FILE, root / SERVICE_KEY_FILE,
                   root / ENDPOINT_FILE, tls_dir, tls_dir / CA_CERT_FILE)


def state_dir(home: Path) -> Path:
    return StateLayout.of(home).root


def ensure_service_key(path: Path) -> Path:
    """The service API key: 32 random bytes, base64, created once with mode 600."""
    if not path.exists():
        write_atomic(path, base64.b64encode(secrets.token_bytes(32)).decode() + "\n", private=True)
    return path


def read_service_key(path: Path) -> bytes:
    try:
        return base64.b64decode(path.read_text().strip(), validate=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the service key {path}: {type(exc).__name__}; "
                        "delete it to make a new one") from exc
