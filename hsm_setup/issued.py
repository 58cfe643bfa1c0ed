"""The token side of DPS certificate issuance: a new key pair, its CSR, the issued chain.

The device makes an EC P-384 key pair inside its token (sensitive, non-extractable, read
back by `keys.generate_keypair`), signs a CSR for its registration ID with it inside the
token, and after DPS answers stores the issued chain beside the key:

- key pair and issued leaf share a new random CKA_ID and the label `<registration ID>.issued`,
  so `pkcs11:token=T;object=<ID>.issued` names the new identity for later registrations;
- each CA certificate of the chain is stored once, CKA_ID = its key identifier, label = its CN.

The leaf is only stored when its public key is the new key's; otherwise the key pair is
destroyed and a UserError says why (docs/certificate-issuance.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from asn1crypto import x509 as asn1_x509
from pkcs11 import Attribute

from device_sim.common.errors import UserError
from hsm_setup import keys, tokens
from hsm_setup.certificates import ensure_on_token, key_identifier, store_on_token
from hsm_setup.csr import build_csr
from hsm_setup.key_types import KeySpec, key_spec
from hsm_setup.signing import TokenSigner

ISSUED_SUFFIX = ".issued"
ISSUANCE_KEY_TYPE = "ec-p384"  # the only key the DPS docs accept for issuance


@dataclass
class IssuanceKey:
    """A freshly generated key pair waiting for its issued certificate."""

    registration_id: str
    key_id: bytes
    label: str
    spec: KeySpec
    public: object  # pkcs11 PublicKey
    private: object  # pkcs11 PrivateKey

    def public_key_der(self) -> bytes:
        return keys.public_key_info(self.public, self.spec).dump()


def issued_label(registration_id: str) -> str:
    return registration_id + ISSUED_SUFFIX


def token_session(library, token_label: str, pin: str):
    """The run's logged-in session on the device token (the context's: no second login)."""
    return tokens.session(library, token_label, pin)


def new_issuance_key(session, registration_id: str) -> IssuanceKey:
    """A new EC P-384 token key pair for `registration_id` (UserError if the token cannot)."""
    spec = key_spec(ISSUANCE_KEY_TYPE)
    keys.check_key_support(session.token, spec)
    key_id = keys.new_key_id()
    label = issued_label(registration_id)
    public, private = keys.generate_keypair(session, spec, key_id=key_id, label=label)
    return IssuanceKey(registration_id, key_id, label, spec, public, private)


def issuance_csr(key: IssuanceKey) -> bytes:
    """DER PKCS#10 for CN = the registration ID, signed inside the token by the new key."""
    signer = TokenSigner(key.private, key.spec)
    public_info = keys.public_key_info(key.public, key.spec)
    return build_csr(signer, public_info, key.registration_id).dump()


def store_issued_chain(session, key: IssuanceKey, chain_der: list[bytes]) -> asn1_x509.Certificate:
    """Store the issued leaf beside `key` and its CA certificates; the leaf is returned.

    A chain whose leaf is not for the new key is refused: the key pair is destroyed.
    """
    try:
        chain = [asn1_x509.Certificate.load(der) for der in chain_der]
        leaf_key = chain[0].public_key.dump() if chain else None
    except ValueError:
        chain, leaf_key = [], None
    if leaf_key is None:
        discard(key)
        raise UserError("the issued certificate chain could not be read (base64 DER X.509 "
                        "expected); the new key pair was removed from the token")
    if leaf_key != key.public_key_der():
        discard(key)
        raise UserError("the issued certificate is not for the key this device generated (its "
                        "public key differs); the new key pair was removed from the token")
    store_on_token(session, chain[0], key_id=key.key_id, label=key.label)
    for ca in chain[1:]:
        ensure_on_token(session, ca, key_id=ca.key_identifier or key_identifier(ca.public_key),
                        label=ca.subject.native.get("common_name") or "ca")
    retire_previous(session, key)
    return chain[0]


def retire_previous(session, key: IssuanceKey) -> int:
    """Destroy older objects labelled `<ID>.issued` (a renewal replaces the identity), so
    the label keeps naming one key; returns how many went."""
    older = [obj for obj in session.get_objects({Attribute.LABEL: key.label})
             if obj[Attribute.ID] != key.key_id]
    keys.destroy_quietly(*older)
    return len(older)


def discard(key: IssuanceKey) -> None:
    """Remove a key pair that got no certificate (tokens have room for few objects)."""
    keys.destroy_quietly(key.public, key.private)

