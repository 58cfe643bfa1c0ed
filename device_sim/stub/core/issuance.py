"""Certificate issuance at registration (device API 2025-07-01-preview), the core's rules.

A register body may carry `csr`: base64 of a DER PKCS#10 request, no PEM armour. The CN
must equal the registration ID, the key must be EC P-384 (the only key the public docs
accept) and the request's signature must verify. The entry that matched must name a
`credentialPolicyName` the emulator knows; the policy's issuing CA then signs a leaf and
the terminal operation result carries `registrationState.issuedCertificateChain` (base64
DER, leaf first, to the root). What the spec and docs say, and what the emulator chose
where they are silent: docs/certificate-issuance.md.

Signing is behind `Issuer`, so the core never touches a key: `KeyIssuer` (here) signs
with a key `cryptography` holds; the token issuer (stub/issuing_token.py) signs inside
a PKCS#11 token.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import DpsError

# The emulator's own codes (400 family, docs/certificate-issuance.md): no list is published.
CSR_INVALID = 400000  # the generic bad request: not base64 DER PKCS#10, or a bad signature
CSR_KEY_UNSUPPORTED = 400011  # a key other than EC P-384
CSR_CN_MISMATCH = 400012      # subject CN differs from the registration ID
NO_CREDENTIAL_POLICY = 400013  # csr sent, but the entry names no (known) credential policy

DEFAULT_POLICY = "default"
# The docs allow 7..90 days for a policy's certificates; the default is the middle of that.
DEFAULT_VALIDITY_DAYS = 30
MAX_CSR_TEXT = 8 * 1024
BACKDATE = dt.timedelta(minutes=5)  # device clocks drift


@dataclass(frozen=True)
class CredentialPolicy:
    name: str
    validity_days: int = DEFAULT_VALIDITY_DAYS


def default_policies() -> dict[str, CredentialPolicy]:
    return {DEFAULT_POLICY: CredentialPolicy(DEFAULT_POLICY)}


class Issuer(Protocol):
    """Signs a leaf for a checked CSR; returns the chain leaf first, ending at the root."""

    def issue(self, csr: x509.CertificateSigningRequest, registration_id: str,
              policy: CredentialPolicy, now: dt.datetime) -> list[x509.Certificate]: ...


def parse_csr(value: object, registration_id: str) -> x509.CertificateSigningRequest:
    """The request in a register body's `csr`, checked; DpsError (400) naming the fault."""
    if not isinstance(value, str) or not value or len(value) > MAX_CSR_TEXT:
        raise DpsError(CSR_INVALID, "csr must be the base64 of a DER PKCS#10 request "
                       f"(a non-empty string of at most {MAX_CSR_TEXT} characters)")
    if value.lstrip().startswith("-----"):
        raise DpsError(CSR_INVALID, "csr must be base64 DER without the PEM header and footer")
    try:
        der = base64.b64decode(value, validate=True)
        csr = x509.load_der_x509_csr(der)
    except (binascii.Error, ValueError, UnsupportedAlgorithm):
        raise DpsError(CSR_INVALID, "csr is not the base64 of a DER PKCS#10 request") from None
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise DpsError(CSR_KEY_UNSUPPORTED, "csr carries a key the emulator cannot read; "
                       "certificate issuance needs an EC P-384 key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise DpsError(CSR_KEY_UNSUPPORTED, f"csr key is {key_name(key)}; certificate issuance "
                       "needs an EC P-384 key (RSA and other curves are not supported)")
    try:
        verifies = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        verifies = False
    if not verifies:
        raise DpsError(CSR_INVALID, "csr signature does not verify with its own public key")
    cn = common_name_of_csr(csr)
    if cn is None or cn.lower() != registration_id.lower():
        raise DpsError(CSR_CN_MISMATCH, f"csr subject CN {cn!r} must equal the registration "
                       f"ID {registration_id!r}")
    return csr


def common_name_of_csr(csr: x509.CertificateSigningRequest) -> str | None:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return names[0].value if len(names) == 1 else None


def key_name(key) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return f"{type(key).__name__.removesuffix('PublicKey').lstrip('_')} {getattr(key, 'key_size', '')}".strip()


def policy_for(entry_doc: Mapping, policies: Mapping[str, CredentialPolicy],
               entry_label: str) -> CredentialPolicy:
    name = entry_doc.get("credentialPolicyName")
    if not name:
        raise DpsError(NO_CREDENTIAL_POLICY, f"{entry_label} has no credentialPolicyName, so no "
                       "certificate can be issued; link a credential policy (e.g. "
                       f"{DEFAULT_POLICY!r}) or register without csr")
    policy = policies.get(name) if isinstance(name, str) else None
    if policy is None:
        raise DpsError(NO_CREDENTIAL_POLICY, f"{entry_label} names credential policy {name!r}, "
                       f"which the emulator does not have (it has: {', '.join(sorted(policies))})")
    return policy


def chain_base64(chain: Sequence[x509.Certificate]) -> list[str]:
    return [base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in chain]


def leaf_builder(csr: x509.CertificateSigningRequest, registration_id: str,
                 ca_cert: x509.Certificate, policy: CredentialPolicy,
                 now: dt.datetime) -> x509.CertificateBuilder:
    """The issued leaf before signing: CN = registration ID, client-auth profile."""
    not_after = min(now + dt.timedelta(days=policy.validity_days), ca_cert.not_valid_after_utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_id)]))
            .issuer_name(ca_cert.subject)
            .public_key(csr.public_key())
            .serial_number(secrets.randbits(159) | 1 << 158)
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_cert.public_key()), critical=False))


class KeyIssuer:
    """Issues with a CA key held by `cryptography` (file or generated)."""

    def __init__(self, chain: Sequence[x509.Certificate], private_key):
        self.chain = list(chain)  # the issuing CA first, to its root
        self.private_key = private_key

    def issue(self, csr, registration_id, policy, now):
        builder = leaf_builder(csr, registration_id, self.chain[0], policy, now)
        return [builder.sign(self.private_key, hashes.SHA384()), *self.chain]
