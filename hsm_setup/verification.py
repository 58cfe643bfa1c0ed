"""DPS proof of possession: a certificate whose subject CN is the verification code,
signed inside the token by the CA's private key.

The certificate's own key pair is a throw-away session object in the CA token: it
is never stored and never leaves the token; only the CA's signature matters to DPS.
"""

from __future__ import annotations

from asn1crypto import x509 as asn1_x509

from hsm_setup import certificates, keys
from hsm_setup.ca import Issuer
from device_sim.common.errors import UserError

DEFAULT_DAYS = 30
MAX_CODE_LENGTH = 64  # X.509 CN upper bound


def validate_code(code: str) -> str:
    if not code or len(code) > MAX_CODE_LENGTH or not code.isprintable() or code.strip() != code:
        raise UserError(f"invalid verification code {code[:80]!r}: 1..{MAX_CODE_LENGTH} printable "
                        "characters as shown by DPS")
    return code


def issue_verification_certificate(issuer: Issuer, code: str, *,
                                   days: int = DEFAULT_DAYS) -> asn1_x509.Certificate:
    """Signed by the CA key through the issuer's own session (its module, its login)."""
    validate_code(code)
    session = issuer.session
    spec = issuer.record.spec()
    public, private = keys.generate_keypair(session, spec, key_id=keys.new_key_id(),
                                            label="verification", store=False)
    try:
        return certificates.issue(
            signer=issuer.signer, issuer=issuer.certificate, subject_cn=code,
            public_key=keys.public_key_info(public, spec), profile=certificates.LEAF_PROFILE,
            days=days)
    finally:
        keys.destroy_quietly(public, private)
