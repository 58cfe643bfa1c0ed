"""Certificates inside JSON bodies: PEM text, base64 of a PEM file, or base64 DER.

Clients disagree (Azure CLI sends PEM text, the C service SDK base64 of the PEM file,
ARM examples base64 DER), so all three are accepted; anything else is a 400.
"""

from __future__ import annotations

import base64
import binascii
import functools
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from .errors import BAD_REQUEST, DpsError

PEM_MARK = b"-----BEGIN CERTIFICATE-----"


def parse_certificate(text: object, what: str = "certificate") -> x509.Certificate:
    """One certificate from a body string; raises DpsError 400 naming `what` otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise DpsError(BAD_REQUEST, f"{what} must be a non-empty string "
                                    "(PEM, base64 PEM or base64 DER)")
    raw = text.strip().encode("ascii", "replace")
    try:
        if PEM_MARK not in raw:
            raw = base64.b64decode(b"".join(raw.split()), validate=True)
        if PEM_MARK in raw:
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except (ValueError, binascii.Error):
        raise DpsError(BAD_REQUEST, f"{what} is not a certificate: send PEM, base64 PEM "
                                    "or base64 DER") from None


# Every device of a group presents the same CA certificates, and a connection's polls look
# its leaf up again. Certificates hash and compare by their DER, so a remembered
# thumbprint is exactly the one that would be computed (~9 us saved per certificate).
@functools.lru_cache(maxsize=4096)
def sha256_thumbprint(cert: x509.Certificate) -> str:
    """Upper-case hex SHA-256 over the DER: the key every index of the emulator uses."""
    return cert.fingerprint(hashes.SHA256()).hex().upper()


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def der_base64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(Encoding.DER)).decode("ascii")


def _utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def certificate_info(cert: x509.Certificate) -> dict:
    """`X509CertificateInfo` as the service API reports it (read-only fields)."""
    return {
        "subjectName": cert.subject.rfc4514_string(),
        "sha1Thumbprint": cert.fingerprint(hashes.SHA1()).hex().upper(),
        "sha256Thumbprint": sha256_thumbprint(cert),
        "issuerName": cert.issuer.rfc4514_string(),
        "notBeforeUtc": _utc(cert.not_valid_before_utc),
        "notAfterUtc": _utc(cert.not_valid_after_utc),
        "serialNumber": format(cert.serial_number, "X"),
        "version": cert.version.value + 1,
    }
