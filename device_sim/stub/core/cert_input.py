"""Certificates inside JSON bodies: PEM text, base64 of a PEM file, or base64 DER.

Clients disagree (Azure CLI sends PEM text, the C service SDK base64 of the PEM file,
ARM examples base64 DER), so all three are accepted; anything else is a 400. A body field
holds exactly one certificate: a chain pasted into an enrollment's slot is refused rather
than silently cut to its first certificate (docs/emulator.md, "Service API").
"""

from __future__ import annotations

import base64
import binascii

from cryptography import x509

from device_sim.common.x509util import (CertificateError, load_certificates, sha1_thumbprint,
                                        sha256_thumbprint, unreadable_reason)

from .errors import BAD_REQUEST, DpsError

_FORMATS = "send PEM, base64 PEM or base64 DER"


def parse_certificate(text: object, what: str = "certificate") -> x509.Certificate:
    """The one certificate of a body string; raises DpsError 400 naming `what` otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise DpsError(BAD_REQUEST, f"{what} must be a non-empty string "
                                    "(PEM, base64 PEM or base64 DER)")
    raw = text.strip().encode("ascii", "replace")
    try:
        if b"-----BEGIN" not in raw:
            raw = base64.b64decode(b"".join(raw.split()), validate=True)
        certs = load_certificates(raw, what)
    except (CertificateError, binascii.Error, ValueError):
        raise DpsError(BAD_REQUEST, f"{what} is not a certificate: {_FORMATS}") from None
    if len(certs) != 1:
        raise DpsError(BAD_REQUEST, f"{what} holds {len(certs)} certificates; it takes exactly "
                                    "one (send only that certificate, not a chain)")
    problem = unreadable_reason(certs[0])
    if problem:
        raise DpsError(BAD_REQUEST, f"{what} is not a readable X.509 certificate ({problem})")
    return certs[0]


def _utc(moment) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def certificate_info(cert: x509.Certificate) -> dict:
    """`X509CertificateInfo` as the service API reports it (read-only fields)."""
    return {
        "subjectName": cert.subject.rfc4514_string(),
        "sha1Thumbprint": sha1_thumbprint(cert),
        "sha256Thumbprint": sha256_thumbprint(cert),
        "issuerName": cert.issuer.rfc4514_string(),
        "notBeforeUtc": _utc(cert.not_valid_before_utc),
        "notAfterUtc": _utc(cert.not_valid_after_utc),
        "serialNumber": format(cert.serial_number, "X"),
        "version": cert.version.value + 1,
    }
