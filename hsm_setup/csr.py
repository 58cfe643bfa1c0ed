"""PKCS#10 certificate requests signed inside the token (built with asn1crypto)."""

from __future__ import annotations

from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509

from hsm_setup.certificates import assemble_signed
from hsm_setup.signing import TokenSigner


def build_csr(signer: TokenSigner, public_key: asn1_keys.PublicKeyInfo,
              common_name: str) -> asn1_csr.CertificationRequest:
    """A CSR for CN=`common_name`, its signature made by `signer` inside the token."""
    info_der = asn1_csr.CertificationRequestInfo({
        "version": "v1",
        "subject": asn1_x509.Name.build({"common_name": common_name}),
        "subject_pk_info": public_key,
        "attributes": [],
    }).dump()
    return assemble_signed(asn1_csr.CertificationRequest, "certification_request_info", info_der,
                     "signature", signer)
