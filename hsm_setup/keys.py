"""Key pairs generated inside a token, and the public half as an X.509 SubjectPublicKeyInfo.

Private keys are token objects that can never leave the token: CKA_SENSITIVE true,
CKA_EXTRACTABLE false, CKA_PRIVATE true. Private key, public key (and later the
certificate) of one identity share one CKA_ID and one CKA_LABEL.
"""

from __future__ import annotations

import secrets

import pkcs11
from asn1crypto import keys as asn1_keys
from pkcs11 import Attribute, ObjectClass
from pkcs11.util.ec import encode_ec_public_key
from pkcs11.util.rsa import encode_rsa_public_key

from device_sim.common.errors import UserError
from hsm_setup.key_types import KeySpec
from hsm_setup import tokens

KEY_ID_BYTES = 16

PRIVATE_KEY_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}


def new_key_id() -> bytes:
    """A random CKA_ID: unique without a search on the token."""
    return secrets.token_bytes(KEY_ID_BYTES)


def check_key_support(token, spec: KeySpec) -> None:
    """UserError if the token cannot generate or sign with this key type."""
    tokens.check_mechanisms(token, spec.keygen_mechanism, spec.sign_mechanism, what=f"{spec.name} keys")
    try:
        info = token.slot.get_mechanism_info(spec.keygen_mechanism)
    except pkcs11.PKCS11Error:
        return
    # Some modules state EC sizes in bytes, others in bits: only judge RSA sizes.
    if not spec.is_ec and info.max_key_length and not (info.min_key_length <= spec.bits <= info.max_key_length):
        raise UserError(f"token {token.label!r} does not support {spec.name} keys "
                        f"(RSA sizes {info.min_key_length}..{info.max_key_length}): choose another --key type")


def generate_keypair(session, spec: KeySpec, *, key_id: bytes, label: str, store: bool = True):
    """(public, private) key objects generated inside the token."""
    public_template = {Attribute.TOKEN: store, Attribute.VERIFY: True, Attribute.ENCRYPT: False,
                       Attribute.WRAP: False, Attribute.PRIVATE: False}
    private_template = {**PRIVATE_KEY_TEMPLATE, Attribute.TOKEN: store}
    kwargs = {}
    if spec.is_ec:
        public_template[Attribute.EC_PARAMS] = spec.ec_params()
    else:
        kwargs["key_length"] = spec.bits
    try:
        return session.generate_keypair(
            spec.key_type, id=key_id, label=label, store=store,
            public_template=public_template, private_template=private_template, **kwargs)
    except (pkcs11.MechanismInvalid, pkcs11.KeySizeRange, pkcs11.DomainParamsInvalid,
            pkcs11.TemplateInconsistent) as exc:
        raise UserError(f"the token cannot generate {spec.name} keys ({type(exc).__name__}): "
                        "choose another --key type") from None


def public_key_info(public_key, spec: KeySpec) -> asn1_keys.PublicKeyInfo:
    """The token public key as an X.509 SubjectPublicKeyInfo."""
    if spec.is_ec:
        return asn1_keys.PublicKeyInfo.load(encode_ec_public_key(public_key))
    rsa_der = encode_rsa_public_key(public_key)
    return asn1_keys.PublicKeyInfo({
        "algorithm": {"algorithm": "rsa", "parameters": None},
        "public_key": asn1_keys.RSAPublicKey.load(rsa_der),
    })


def find_private_key(session, key_id: bytes, label: str | None = None):
    """The private key object with CKA_ID `key_id` (one attribute search)."""
    attrs = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}
    if label is not None:
        attrs[Attribute.LABEL] = label
    found = list(session.get_objects(attrs))
    if len(found) != 1:
        raise UserError(f"expected one private key with id {key_id.hex()} on token "
                        f"{session.token.label!r}, found {len(found)}")
    return found[0]


def find_public_key(session, key_id: bytes):
    found = list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id}))
    if len(found) != 1:
        raise UserError(f"expected one public key with id {key_id.hex()} on token "
                        f"{session.token.label!r}, found {len(found)}")
    return found[0]


def destroy_quietly(*objects) -> None:
    """Remove objects during a rollback; a failure here must not hide the first error."""
    for obj in objects:
        if obj is None:
            continue
        try:
            obj.destroy()
        except pkcs11.PKCS11Error:
            pass
