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

from device_sim.common.errors import UserError
from device_sim.common.files import write_atomic
from device_sim.common.x509util import CertificateError, in_validity, issued_by, load_certificate_file
from device_sim.stub.layout import CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=825)
RENEW_BEFORE = datetime.timedelta(days=30)
_CA_NAME = x509.Name([
    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "device-sim"),
    x509.NameAttribute(NameOID.COMMON_NAME, "device-sim local DPS emulator CA"),
])


class ServerIdentityError(UserError):
    """Server certificate files that cannot be used; the message names the file."""


@dataclass(frozen=True)
class ServerIdentity:
    """The files of the emulator's server identity."""

    ca_cert: Path | None  # what clients trust; None when a supplied certificate came without one
    cert: Path  # server certificate, leaf first (intermediates may follow)
    key: Path  # server key (file key: the emulator's own identity, not a device's)
    chain: Path | None = None  # extra certificates sent after the leaf (a supplied chain file)


def ensure_server_identity(tls_dir: Path, extra_names: Sequence[str] = ()) -> ServerIdentity:
    """The identity kept in `tls_dir`: generated, or the files a user put there.

    Generated: the CA is made on first start and reused (clients keep trusting the same
    file across restarts); the server certificate is (re)issued when a name asked for is
    missing or it is about to expire. A `server.pem` + `server.key` that the CA there did
    not issue were supplied by a user: they are used as they are when valid and matching,
    refused otherwise, and never replaced; so is a `ca.pem` that comes without its key.
    """
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = ServerIdentity(tls_dir / CA_CERT_FILE, tls_dir / SERVER_CERT_FILE, tls_dir / SERVER_KEY_FILE)
    ca_key_path = tls_dir / CA_KEY_FILE
    names = _unique([*DEFAULT_SERVER_NAMES, *extra_names])

    own_ca = _own_ca(identity.ca_cert, ca_key_path)
    if own_ca is None:
        if identity.cert.exists() and not _made_by_an_emulator_ca(identity.cert):
            return _supplied_in_place(identity)  # a user's server certificate
        if identity.ca_cert.exists():
            raise ServerIdentityError(
                f"{identity.ca_cert} has no {CA_KEY_FILE} beside it, so no server certificate can be "
                f"issued from it; add its key, or put {SERVER_CERT_FILE} and {SERVER_KEY_FILE} there, "
                "or remove it to let the emulator make its own CA")
        own_ca = _make_ca()
        write_atomic(ca_key_path, _key_pem(own_ca[0]), private=True)
        write_atomic(identity.ca_cert, own_ca[1].public_bytes(serialization.Encoding.PEM))
    ca_key, ca_cert = own_ca

    if identity.cert.exists() and not _issued_here(identity.cert, ca_cert):
        return _supplied_in_place(identity)
    if _server_cert_needs_renewal(identity, ca_cert, names):
        key, cert = _make_server_cert(ca_key, ca_cert, names)
        write_atomic(identity.key, _key_pem(key), private=True)
        write_atomic(identity.cert, cert.public_bytes(serialization.Encoding.PEM))
    return identity


def supplied_identity(cert: Path | str, key: Path | str, chain: Path | str | None = None) -> ServerIdentity:
    """A server identity a user brings (a bench's own certificate): checked, never copied.

    `chain` holds the certificates clients need beyond the leaf (intermediates and the
    trust anchor); it is what clients are told to trust, and its non-root certificates are
    sent after the leaf.
    """
    # Absolute, because the ready line and endpoint.json are read from other directories.
    cert, key = Path(cert).absolute(), Path(key).absolute()
    chain = None if chain is None else Path(chain).absolute()
    leaf = check_supplied(cert, key)
    if chain is not None:
        anchors = load_certificate_file(chain)
        if leaf in anchors:
            raise ServerIdentityError(f"{chain} holds the server certificate itself; it should hold "
                                      "the CA certificates clients trust (and intermediates)")
    return ServerIdentity(chain, cert, key, chain)


def check_supplied(cert_path: Path, key_path: Path) -> x509.Certificate:
    """The leaf of a supplied certificate file, when it is in validity and `key_path` is its key."""
    leaf = load_certificate_file(cert_path)[0]
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ServerIdentityError(f"{key_path} does not exist; it should hold the key of {cert_path}") from None
    except TypeError:
        raise ServerIdentityError(f"{key_path} is encrypted; give the server key without a password") from None
    except (OSError, ValueError) as exc:
        raise ServerIdentityError(f"{key_path} is not a PEM private key ({type(exc).__name__})") from None
    if key.public_key() != leaf.public_key():
        raise ServerIdentityError(f"{key_path} is not the key of the certificate in {cert_path}; "
                                  "give the matching pair")
    if not in_validity(leaf, _now()):
        raise ServerIdentityError(f"the certificate in {cert_path} is outside its validity "
                                  f"({leaf.not_valid_before_utc:%Y-%m-%d} .. {leaf.not_valid_after_utc:%Y-%m-%d})")
    return leaf


def _supplied_in_place(identity: ServerIdentity) -> ServerIdentity:
    leaf = check_supplied(identity.cert, identity.key)
    # The ca.pem beside it is the trust anchor only if it issued this certificate.
    anchor = identity.ca_cert
    if not (anchor.exists() and any(issued_by(leaf, ca) for ca in _read_certs(anchor))):
        anchor = None
    return ServerIdentity(anchor, identity.cert, identity.key)


def _own_ca(ca_cert_path: Path, ca_key_path: Path):
    """(key, certificate) of a CA whose key is there too, else None."""
    if not (ca_cert_path.exists() and ca_key_path.exists()):
        return None
    try:
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ServerIdentityError(f"cannot read the CA in {ca_cert_path.parent} ({type(exc).__name__}); "
                                  "fix the files or remove them to let the emulator make new ones") from None
    if ca_key.public_key() != ca_cert.public_key():
        raise ServerIdentityError(f"{ca_key_path} is not the key of {ca_cert_path}; give the matching pair")
    return ca_key, ca_cert


def _issued_here(cert_path: Path, ca_cert: x509.Certificate) -> bool:
    certs = _read_certs(cert_path)
    return bool(certs) and issued_by(certs[0], ca_cert)


def _made_by_an_emulator_ca(cert_path: Path) -> bool:
    """True for a server certificate of an earlier CA of ours (its files were removed)."""
    certs = _read_certs(cert_path)
    return bool(certs) and certs[0].issuer == _CA_NAME


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        return load_certificate_file(path)
    except CertificateError:
        return []


def _unique(items: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item.strip().lower(), None)
    return [item for item in seen if item]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _CA_NAME
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
