"""X.509 certificate profiles and issuing: the TBSCertificate is built with asn1crypto,
the issuer's signature is made inside the issuer's token.

Profiles (RFC 5280 extensions):
- CA: basicConstraints CA:true (critical), keyUsage keyCertSign+cRLSign (critical), SKI, AKI.
- device leaf: CA:false, keyUsage digitalSignature, extendedKeyUsage clientAuth, SKI, AKI.
- verification (DPS proof of possession): subject CN = the verification code, leaf profile.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import secrets

from asn1crypto import keys as asn1_keys
from asn1crypto import pem
from asn1crypto import x509 as asn1_x509
from pkcs11 import Attribute, CertificateType, ObjectClass

from hsm_setup.signing import TokenSigner

# Issue certificates valid a little in the past: clocks of devices and emulators drift.
BACKDATE = dt.timedelta(minutes=5)

CA_PROFILE = "ca"
LEAF_PROFILE = "leaf"


def key_identifier(public_key: asn1_keys.PublicKeyInfo) -> bytes:
    """RFC 5280 4.2.1.2 method 1: SHA-1 of the subjectPublicKey bits."""
    return hashlib.sha1(public_key["public_key"].contents[1:]).digest()


def random_serial() -> int:
    """A positive serial with 159 random bits (RFC 5280: at most 20 octets)."""
    return secrets.randbits(159) | 1 << 158


def name_cn(common_name: str) -> asn1_x509.Name:
    return asn1_x509.Name.build({"common_name": common_name})


def issue(
    *,
    signer: TokenSigner,
    issuer: asn1_x509.Certificate | None,
    subject_cn: str,
    public_key: asn1_keys.PublicKeyInfo,
    profile: str,
    days: int,
    now: dt.datetime | None = None,
) -> asn1_x509.Certificate:
    """Issue a certificate; `issuer` None means self-signed (a root CA)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    subject = name_cn(subject_cn)
    ski = key_identifier(public_key)
    if issuer is None:
        issuer_name, aki = subject, ski
        not_after = now + dt.timedelta(days=days)
    else:
        issuer_name, aki = issuer.subject, issuer.key_identifier or key_identifier(issuer.public_key)
        # A certificate must not outlive the CA that vouches for it.
        not_after = min(now + dt.timedelta(days=days), issuer.not_valid_after)
    tbs_der = asn1_x509.TbsCertificate({
        "version": "v3",
        "serial_number": random_serial(),
        "signature": signer.algorithm,
        "issuer": issuer_name,
        "validity": {
            "not_before": asn1_x509.Time({"utc_time": (now - BACKDATE).replace(microsecond=0)}),
            "not_after": _time(not_after.replace(microsecond=0)),
        },
        "subject": subject,
        "subject_public_key_info": public_key,
        "extensions": _extensions(profile, ski, aki),
    }).dump()
    return assemble_signed(asn1_x509.Certificate, "tbs_certificate", tbs_der, "signature_value", signer)


def assemble_signed(cls, body_field: str, body_der: bytes, signature_field: str, signer: TokenSigner):
    """Sign the DER body and return the parsed result.

    asn1crypto re-serialises objects built from Python values on every dump(); objects
    loaded from DER return their bytes as they are, so everything handed on is loaded.
    """
    body = cls._fields[0][1].load(body_der)
    signed = cls({
        body_field: body,
        "signature_algorithm": signer.algorithm,
        signature_field: signer.sign(body_der),
    })
    return cls.load(signed.dump())


def _time(value: dt.datetime) -> asn1_x509.Time:
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime afterwards.
    if value.year < 2050:
        return asn1_x509.Time({"utc_time": value})
    return asn1_x509.Time({"general_time": value})


def _extensions(profile: str, ski: bytes, aki: bytes) -> list:
    fixed = [asn1_x509.Extension.load(der) for der in _profile_extensions(profile)]
    return fixed + [
        {"extn_id": "key_identifier", "critical": False, "extn_value": ski},
        asn1_x509.Extension.load(_authority_key_identifier(aki)),
    ]


@functools.lru_cache(maxsize=None)
def _profile_extensions(profile: str) -> tuple[bytes, ...]:
    """DER of the extensions a profile always has (built once: asn1crypto building is slow)."""
    if profile == CA_PROFILE:
        constraints = {"ca": True}
        usage = {"key_cert_sign", "crl_sign"}
    elif profile == LEAF_PROFILE:
        constraints = {"ca": False}
        usage = {"digital_signature"}
    else:
        raise ValueError(f"unknown certificate profile {profile!r}")
    extensions = [
        {"extn_id": "basic_constraints", "critical": True, "extn_value": constraints},
        {"extn_id": "key_usage", "critical": True, "extn_value": usage},
    ]
    if profile == LEAF_PROFILE:
        extensions.append({"extn_id": "extended_key_usage", "critical": False,
                           "extn_value": ["client_auth"]})
    return tuple(asn1_x509.Extension(e).dump() for e in extensions)


@functools.lru_cache(maxsize=64)
def _authority_key_identifier(aki: bytes) -> bytes:
    return asn1_x509.Extension({"extn_id": "authority_key_identifier", "critical": False,
                                "extn_value": {"key_identifier": aki}}).dump()


def to_pem(*certificates: asn1_x509.Certificate | bytes) -> bytes:
    """PEM text of one or more certificates (DER bytes or asn1crypto objects)."""
    return b"".join(
        pem.armor("CERTIFICATE", c if isinstance(c, bytes) else c.dump()) for c in certificates
    )


def store_on_token(session, certificate: asn1_x509.Certificate, *, key_id: bytes, label: str):
    """Write the certificate as a token object sharing the key's CKA_ID and CKA_LABEL."""
    return session.create_object({
        Attribute.CLASS: ObjectClass.CERTIFICATE,
        Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.ID: key_id,
        Attribute.LABEL: label,
        Attribute.SUBJECT: certificate.subject.dump(),
        Attribute.ISSUER: certificate.issuer.dump(),
        Attribute.SERIAL_NUMBER: certificate["tbs_certificate"]["serial_number"].dump(),
        Attribute.VALUE: certificate.dump(),
    })


def find_certificate_objects(session, key_id: bytes) -> list:
    return list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: key_id}))


def ensure_on_token(session, certificate: asn1_x509.Certificate, *, key_id: bytes, label: str) -> bool:
    """Store a CA certificate on a token unless one with that CKA_ID is there; True if written."""
    if find_certificate_objects(session, key_id):
        return False
    store_on_token(session, certificate, key_id=key_id, label=label)
    return True

