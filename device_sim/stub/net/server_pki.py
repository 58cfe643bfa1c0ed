"""The emulator's own server identity: a CA and a server certificate below `<home>/stub/tls/`.

The CA is made on first start and kept, so clients trust the same `ca.pem` across restarts;
the server certificate is (re)issued when a name asked for is missing or it nears expiry.
These are file keys on purpose: they are the emulator's identity, not a device's
(docs/emulator.md, "TLS").
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_sim.common.files import write_atomic
from device_sim.stub.layout import CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=825)
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class ServerIdentity:
    """Files of the emulator's own server identity, below `<home>/stub/tls/`."""

    ca_cert: Path  # clients trust this file
    cert: Path  # server certificate (leaf only)
    key: Path  # server key (file key: the emulator's own identity, not a device's)


def ensure_server_identity(tls_dir: Path, extra_names: Sequence[str] = ()) -> ServerIdentity:
    """Create the emulator's CA on first start; (re)issue the server certificate when the
    names asked for are not all in it or it is about to expire. The CA is reused, so clients
    keep trusting the same file across restarts."""
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = ServerIdentity(tls_dir / CA_CERT_FILE, tls_dir / SERVER_CERT_FILE, tls_dir / SERVER_KEY_FILE)
    ca_key_path = tls_dir / CA_KEY_FILE
    names = _unique([*DEFAULT_SERVER_NAMES, *extra_names])

    if not (identity.ca_cert.exists() and ca_key_path.exists()):
        ca_key, ca_cert = _make_ca()
        write_atomic(ca_key_path, _key_pem(ca_key), private=True)
        write_atomic(identity.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    else:
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(identity.ca_cert.read_bytes())

    if _server_cert_needs_renewal(identity, ca_cert, names):
        key, cert = _make_server_cert(ca_key, ca_cert, names)
        write_atomic(identity.key, _key_pem(key), private=True)
        write_atomic(identity.cert, cert.public_bytes(serialization.Encoding.PEM))
    return identity


def _unique(items: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item.strip().lower(), None)
    return [item for item in seen if item]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "device-sim"),
        x509.NameAttribute(NameOID.COMMON_NAME, "device-sim local DPS emulator CA"),
    ])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _make_server_cert(ca_key, ca_cert: x509.Certificate, names: Sequence[str]):
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _server_cert_needs_renewal(identity: ServerIdentity, ca_cert: x509.Certificate, names) -> bool:
    if not (identity.cert.exists() and identity.key.exists()):
        return True
    try:
        cert = x509.load_pem_x509_certificate(identity.cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return True
    if cert.issuer != ca_cert.subject:
        return True
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return True
    have = set(san)
    return not all(entry in have for entry in _san_entries(names))


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
