"""The key types a token identity may have, and how each one signs X.509 data.

Signatures are made with the token's raw mechanisms where possible (CKM_ECDSA over a
digest computed here) because not every module has the combined hash+sign ones.
"""

from __future__ import annotations

import dataclasses

from pkcs11 import KeyType, Mechanism
from pkcs11.util.ec import encode_named_curve_parameters

from device_sim.common.errors import UserError


@dataclasses.dataclass(frozen=True)
class KeySpec:
    name: str                 # what users type: ec-p256, rsa-2048, ...
    key_type: KeyType
    bits: int
    curve: str | None         # asn1crypto named curve, EC only
    hash_name: str            # hashlib / asn1crypto digest name
    signature_algorithm: str  # asn1crypto SignedDigestAlgorithm name
    keygen_mechanism: Mechanism
    sign_mechanism: Mechanism

    @property
    def is_ec(self) -> bool:
        return self.key_type == KeyType.EC

    def ec_params(self) -> bytes:
        return encode_named_curve_parameters(self.curve)


KEY_TYPES: dict[str, KeySpec] = {
    spec.name: spec
    for spec in (
        KeySpec("ec-p256", KeyType.EC, 256, "secp256r1", "sha256", "sha256_ecdsa",
                Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA),
        KeySpec("ec-p384", KeyType.EC, 384, "secp384r1", "sha384", "sha384_ecdsa",
                Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA),
        KeySpec("rsa-2048", KeyType.RSA, 2048, None, "sha256", "sha256_rsa",
                Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.SHA256_RSA_PKCS),
        KeySpec("rsa-3072", KeyType.RSA, 3072, None, "sha256", "sha256_rsa",
                Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.SHA256_RSA_PKCS),
    )
}
DEFAULT_KEY_TYPE = "ec-p256"


def key_spec(name: str) -> KeySpec:
    try:
        return KEY_TYPES[name.lower()]
    except KeyError:
        raise UserError(f"unknown key type {name!r}: use one of {', '.join(KEY_TYPES)}") from None
