"""`hsm-setup ca sign-csr`: a CA whose key is in a token signs a CSR made elsewhere.

The certificate has the device leaf profile of `device create` (hsm_setup.certificates):
subject CN = the CSR's CN only, CA:false, digitalSignature, clientAuth. Other subject
attributes and requested extensions of the CSR are not copied. See docs/byo-pki.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from device_sim.common.errors import UserError
from device_sim.common.registration_id import registration_id_problem
from hsm_setup import ca, certificates, tokens
from hsm_setup.byo import token_failures

MIN_RSA_BITS = 2048


@dataclasses.dataclass
class SignedCsr:
    certificate: asn1_x509.Certificate
    registration_id: str
    notes: list[str]  # what the caller should tell the user (e.g. a clamped validity)


def load_csr(path: str | Path) -> x509.CertificateSigningRequest:
    """A PKCS#10 request from a PEM or DER file whose signature verifies; UserError otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read CSR file {path}: {exc.strerror}") from None
    try:
        request = (x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data))
    except ValueError:
        raise UserError(f"{path} holds no PKCS#10 certificate request (PEM or DER)") from None
    try:
        valid = request.is_signature_valid
    except (UnsupportedAlgorithm, ValueError):  # a key or signature cryptography cannot check
        valid = False
    if not valid:
        raise UserError(f"{path}: the CSR signature does not verify (it was not signed by the key "
                        "it names): make the CSR again")
    return request


def request_registration_id(request: x509.CertificateSigningRequest, source: str) -> str:
    names = request.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = names[0].value if len(names) == 1 else ""
    problem = "the subject needs exactly one CN" if len(names) != 1 else registration_id_problem(value)
    if problem:
        raise UserError(f"{source}: the CSR's CN is not a valid registration ID ({problem})")
    return value


def _public_key_info(request: x509.CertificateSigningRequest, source: str) -> asn1_keys.PublicKeyInfo:
    public = request.public_key()
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
        raise UserError(f"{source}: RSA key of {public.key_size} bits; at least {MIN_RSA_BITS} needed")
    if not isinstance(public, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise UserError(f"{source}: the CSR's key is neither EC nor RSA: DPS X.509 attestation needs one of them")
    return asn1_keys.PublicKeyInfo.load(public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


@token_failures("ca sign-csr")
def sign_csr(lib, home: Path, ca_name: str, csr_path: str | Path, *, days: int, pin: str,
             now: dt.datetime | None = None) -> SignedCsr:
    """Check the CSR, then issue its leaf certificate inside the CA's token."""
    if days < 1:
        raise UserError("--days must be at least 1")
    request = load_csr(csr_path)
    registration_id = request_registration_id(request, str(csr_path))
    spki = _public_key_info(request, str(csr_path))
    issuer = ca.open_issuer(lib, home, ca_name, pin)
    spec = issuer.signer.spec
    if spec.sign_mechanism not in tokens.find_token(lib, issuer.record.token_label).slot.get_mechanisms():
        raise UserError(f"token {issuer.record.token_label!r} of CA {ca_name!r} cannot sign with its "
                        f"{spec.name} key (mechanism {spec.sign_mechanism.name} missing)")
    now = now or dt.datetime.now(dt.timezone.utc)
    notes = []
    ca_end = issuer.certificate.not_valid_after
    if now + dt.timedelta(days=days) > ca_end:
        notes.append(f"--days {days} reaches past the end of CA {ca_name!r}: the certificate ends "
                     f"with the CA on {ca_end:%Y-%m-%d %H:%M:%SZ}")
    cert = certificates.issue(signer=issuer.signer, issuer=issuer.certificate, subject_cn=registration_id,
                              public_key=spki, profile=certificates.LEAF_PROFILE, days=days, now=now)
    return SignedCsr(cert, registration_id, notes)
