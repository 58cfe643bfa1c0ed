"""Facts about X.509 certificates that the device, the emulator and hsm_setup all need,
decided once: the subject CN, thumbprints, who issued whom, what makes a CA certificate
fit to issue, and reading certificate text.

The rules come from DPS X.509 attestation (docs/x509-rules.md): the leaf's single subject
CN is the registration ID; a CA certificate must say CA:TRUE, allow keyCertSign when it
has a keyUsage, and respect its pathLenConstraint.
"""

from __future__ import annotations

import functools
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from device_sim.common.errors import UserError

PEM_MARK = b"-----BEGIN"

# What cryptography raises for certificate parts it cannot decode: not all of them are
# ValueErrors (DuplicateExtension, InvalidVersion and UnsupportedAlgorithm are not).
_UNREADABLE = (ValueError, TypeError, x509.DuplicateExtension, x509.InvalidVersion,
               UnsupportedAlgorithm)


class CertificateError(UserError, ValueError):
    """Certificate text that cannot be read; the message says what was expected (a
    `UserError`, so a CLI shows it as one line; the emulator answers it with a 400)."""


def common_name(cert: x509.Certificate) -> str | None:
    """The subject CN when there is exactly one, else None (several CNs name no device)."""
    try:
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except ValueError:  # a subject cryptography cannot decode
        return None
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def describe(cert: x509.Certificate) -> str:
    """`CN=...`, else the whole subject: how messages name a certificate."""
    cn = common_name(cert)
    if cn:
        return f"CN={cn}"
    try:
        return cert.subject.rfc4514_string() or "(empty subject)"
    except ValueError:
        return "(unreadable subject)"


# Every device of a group presents the same CA certificates and a connection's polls look
# its leaf up again. Certificates hash and compare by their DER, so a remembered
# thumbprint is exactly the one that would be computed (~9 us saved per certificate).
@functools.lru_cache(maxsize=4096)
def sha256_thumbprint(cert: x509.Certificate) -> str:
    """Upper-case hex SHA-256 over the DER: the key every index of the emulator uses."""
    return cert.fingerprint(hashes.SHA256()).hex().upper()


def sha1_thumbprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA1()).hex().upper()


def is_self_issued(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def signature_verifies(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """True when `parent`'s key made `child`'s signature (names are not compared)."""
    try:
        child.verify_directly_issued_by(parent)
    except (InvalidSignature, *_UNREADABLE):
        return False
    return True


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when `issuer`'s name and key made `cert`."""
    return cert.issuer == issuer.subject and signature_verifies(cert, issuer)


def is_self_signed(cert: x509.Certificate) -> bool:
    return is_self_issued(cert) and signature_verifies(cert, cert)


def in_validity(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def ca_problem(cert: x509.Certificate, issued_below: int = 0) -> str | None:
    """Why `cert` may not issue a chain with `issued_below` CA certificates under it, or
    None. Malformed extensions (duplicates, bad encodings) are a problem, not an exception."""
    try:
        extensions = cert.extensions
    except _UNREADABLE as exc:  # duplicate extensions, undecodable extension values
        return f"has unreadable extensions ({exc})"
    try:
        basic = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "is not a CA certificate (no basicConstraints)"
    if not basic.ca:
        return "is not a CA certificate (basicConstraints CA:FALSE)"
    if basic.path_length is not None and basic.path_length < issued_below:
        return f"has pathLenConstraint {basic.path_length} but {issued_below} CA(s) below it"
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not usage.key_cert_sign:
        return "is not allowed to sign certificates (keyUsage lacks keyCertSign)"
    return None


# Remembered like the thumbprint: a fleet's devices present the same CA certificates.
@functools.lru_cache(maxsize=4096)
def unreadable_reason(cert: x509.Certificate) -> str | None:
    """Why some part the rules read (names, validity, extensions, key) cannot be decoded,
    or None. cryptography decodes these lazily, so a certificate that loaded may still
    fail later; checking once up front keeps every later use free of surprises."""
    try:
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        cert.not_valid_before_utc, cert.not_valid_after_utc
        cert.extensions
        cert.public_key()
        cert.signature_hash_algorithm
    except _UNREADABLE as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _label(cert: x509.Certificate, index: int) -> str:
    return f"certificate {index} ({describe(cert)})"


def chain_problem(chain: Sequence[x509.Certificate], now: datetime, *,
                  signed_by: Callable[[x509.Certificate, x509.Certificate], bool] = signature_verifies) -> str | None:
    """The first reason `chain` (leaf first, exactly as a device sent it) is not a valid
    chain, else None: every certificate inside its validity, each one issued (name and
    signature) by the next, each issuer fit to be a CA, a self-issued top self-signed.
    Nothing is re-ordered or completed. `signed_by(child, parent)` checks one signature
    (a caller checking many chains over the same CAs may pass a remembering one).
    """
    if not chain:
        return "the chain is empty"
    for index, cert in enumerate(chain):
        unreadable = unreadable_reason(cert)
        if unreadable:
            return f"certificate {index} cannot be read ({unreadable})"
    for index, cert in enumerate(chain):
        if not in_validity(cert, now):
            return f"{_label(cert, index)} is outside its validity period"
    for index in range(len(chain) - 1):
        child, parent = chain[index], chain[index + 1]
        problem = ca_problem(parent, index)
        if problem:
            return f"{_label(parent, index + 1)} {problem}"
        if child.issuer != parent.subject:
            return (f"{_label(child, index)} was not issued by the next certificate sent "
                    "(send the chain leaf first, in issuing order)")
        if not signed_by(child, parent):
            return f"{_label(child, index)} signature does not verify with its issuer"
    top = chain[-1]
    if is_self_issued(top) and not signed_by(top, top):
        return f"{_label(top, len(chain) - 1)} self-signature does not verify"
    return None


def is_ca(cert: x509.Certificate) -> bool:
    return ca_problem(cert) is None


def load_certificates(data: bytes, source: str = "input") -> list[x509.Certificate]:
    """Every certificate in PEM text, or the one in DER; CertificateError naming `source`."""
    try:
        if PEM_MARK in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except _UNREADABLE:
        raise CertificateError(f"{source} holds no X.509 certificate (no readable X.509 PEM or DER in it)") from None
    return certs


def load_certificate_file(path: str | Path) -> list[x509.Certificate]:
    """Every certificate in a PEM (or single DER) file; CertificateError naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read certificate file {path}: {exc.strerror}") from None
    return load_certificates(data, str(path))


def to_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def to_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)
