"""Signatures made inside a token, returned in X.509 form.

PKCS#11 ECDSA returns raw r||s; X.509 (certificates, CSRs) wants the DER
ECDSA-Sig-Value, which asn1crypto builds. RSA PKCS#1 v1.5 signatures need no
re-encoding. Other areas (TLS glue, proof of possession) reuse `TokenSigner`.
"""

from __future__ import annotations

import dataclasses
import hashlib

from asn1crypto import algos

from hsm_setup.key_types import KeySpec


@dataclasses.dataclass
class TokenSigner:
    """A token private key plus the rules for turning its output into X.509 signatures."""

    private_key: object  # pkcs11 PrivateKey handle
    spec: KeySpec

    @property
    def algorithm(self) -> algos.SignedDigestAlgorithm:
        """The AlgorithmIdentifier to put next to the signature (signatureAlgorithm)."""
        return signature_algorithm(self.spec)

    def sign(self, data: bytes) -> bytes:
        """DER signature over `data` (hashing included), as X.509 expects it."""
        return sign_x509(self.private_key, self.spec, data)


def signature_algorithm(spec: KeySpec) -> algos.SignedDigestAlgorithm:
    # RFC 5758: ECDSA AlgorithmIdentifiers have absent parameters; RFC 4055: RSA ones NULL.
    params = None if spec.is_ec else algos.Null()
    value = {"algorithm": spec.signature_algorithm}
    if params is not None:
        value["parameters"] = params
    return algos.SignedDigestAlgorithm(value)


def sign_x509(private_key, spec: KeySpec, data: bytes) -> bytes:
    """Sign `data` with a token private key; DER-encoded ECDSA-Sig-Value or RSA bytes."""
    if spec.is_ec:
        digest = hashlib.new(spec.hash_name, data).digest()
        raw = private_key.sign(digest, mechanism=spec.sign_mechanism)
        return algos.DSASignature.from_p1363(raw).dump()
    return private_key.sign(data, mechanism=spec.sign_mechanism)
