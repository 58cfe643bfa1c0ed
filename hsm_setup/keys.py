"""Key pairs generated inside a token, and the public half as an X.509 SubjectPublicKeyInfo.

Private keys are token objects that can never leave the token: CKA_SENSITIVE true,
CKA_EXTRACTABLE false, CKA_PRIVATE true. Private key, public key (and later the
certificate) of one identity share one CKA_ID and one CKA_LABEL.

Templates ask for what attestation needs and nothing else, because modules differ in
what they accept (docs/token-quirks.md). tpm2-pkcs11 1.9 works the usage flags of both
halves out from the TPM object it creates and fails C_GenerateKeyPair with
CKR_GENERAL_ERROR when a template says otherwise; as it pairs the public key's
CKA_VERIFY with the private key's CKA_DECRYPT, the obvious VERIFY=true / DECRYPT=false
template is refused ("User specified and TPM specified attr mismatch: 0x10a"). What
matters is read back from the new private key instead of being trusted: a module that
ignored CKA_SENSITIVE or CKA_EXTRACTABLE gets its keys destroyed and a UserError.
"""

from __future__ import annotations

import secrets

import pkcs11
from asn1crypto import keys as asn1_keys
from pkcs11 import Attribute, ObjectClass
from pkcs11.constants import DEFAULT
from pkcs11.util.ec import encode_ec_public_key
from pkcs11.util.rsa import encode_rsa_public_key

from device_sim.common.errors import UserError
from hsm_setup.key_types import KeySpec
from hsm_setup import tokens

KEY_ID_BYTES = 16

# What the private key must be. Everything else is left to the module.
PRIVATE_KEY_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
}
# python-pkcs11 fills usage flags from its default "capabilities" into both templates
# (EC: SIGN/VERIFY/DERIVE on, ENCRYPT/WRAP/DECRYPT/UNWRAP off); DEFAULT drops an entry,
# so these templates reach C_GenerateKeyPair exactly as written here.
_LEAVE_TO_MODULE_PUBLIC = {a: DEFAULT for a in (Attribute.ENCRYPT, Attribute.WRAP, Attribute.VERIFY)}
_LEAVE_TO_MODULE_PRIVATE = {a: DEFAULT for a in (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE)}

# C_GenerateKeyPair failures that mean "this token does not make this kind of key".
_UNSUPPORTED = (pkcs11.MechanismInvalid, pkcs11.KeySizeRange, pkcs11.DomainParamsInvalid,
                pkcs11.TemplateInconsistent, pkcs11.AttributeValueInvalid,
                pkcs11.AttributeTypeInvalid, pkcs11.TemplateIncomplete,
                pkcs11.FunctionNotSupported, pkcs11.MechanismParamInvalid)


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
    """(public, private) key objects generated inside the token.

    The private key is checked after creation: CKA_SENSITIVE true and CKA_EXTRACTABLE
    false, else both keys are destroyed and UserError is raised. Any refusal of the
    module is a one-line UserError, never a PKCS#11 traceback.

    `store=False` asks for session objects (a throw-away key); a module that only makes
    token objects (tpm2-pkcs11) gets token objects instead: the caller destroys them.
    """
    try:
        try:
            return _generate_checked(session, spec, key_id=key_id, label=label, store=store)
        except (pkcs11.AttributeValueInvalid, pkcs11.TemplateInconsistent):
            if store:
                raise
        # CKA_TOKEN false refused: tpm2-pkcs11 only makes token objects
        # ("Expected attr 0x1 to be 0, got 1", CKR_ATTRIBUTE_VALUE_INVALID).
        return _generate_checked(session, spec, key_id=key_id, label=label, store=True)
    except pkcs11.PKCS11Error as exc:
        raise _refusal(session, spec, exc) from None


def _generate_checked(session, spec: KeySpec, *, key_id: bytes, label: str, store: bool):
    public_template = {**_LEAVE_TO_MODULE_PUBLIC, Attribute.TOKEN: store}
    private_template = {**_LEAVE_TO_MODULE_PRIVATE, **PRIVATE_KEY_TEMPLATE, Attribute.TOKEN: store}
    kwargs = {}
    if spec.is_ec:
        public_template[Attribute.EC_PARAMS] = spec.ec_params()
    else:
        kwargs["key_length"] = spec.bits  # python-pkcs11 adds CKA_MODULUS_BITS and e = 65537
    public, private = session.generate_keypair(
        spec.key_type, id=key_id, label=label, store=store,
        public_template=public_template, private_template=private_template, **kwargs)
    problem = _not_protected(private)
    if problem:
        destroy_quietly(public, private)
        raise UserError(f"token {_token_label(session)!r} made a {spec.name} private key that is "
                        f"{problem}: refusing to use this module for identity keys")
    return public, private


def _not_protected(private) -> str | None:
    """Why the private key could leave the token (as read back from it), or None."""
    try:
        values = private.get_attributes((Attribute.SENSITIVE, Attribute.EXTRACTABLE))  # one call
        sensitive, extractable = values.get(Attribute.SENSITIVE), values.get(Attribute.EXTRACTABLE)
    except pkcs11.PKCS11Error as exc:
        return f"of unknown protection (reading CKA_SENSITIVE/CKA_EXTRACTABLE: {_name(exc)})"
    reasons = []
    if sensitive is not True:
        reasons.append("not CKA_SENSITIVE")
    if extractable is not False:
        reasons.append("CKA_EXTRACTABLE")
    return " and ".join(reasons) or None


def _refusal(session, spec: KeySpec, exc: Exception) -> UserError:
    token = _token_label(session)
    if isinstance(exc, _UNSUPPORTED):
        return UserError(f"token {token!r} cannot generate {spec.name} keys ({_name(exc)}): "
                         "choose another --key type")
    return UserError(f"token {token!r} failed to generate {spec.name} keys ({_name(exc)}); "
                     "the PKCS#11 module's own log may say why")


def _name(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _token_label(session) -> str:
    try:
        return session.token.label
    except Exception:  # a label is only decoration for the message
        return "?"


def public_key_info(public_key, spec: KeySpec) -> asn1_keys.PublicKeyInfo:
    """The token public key as an X.509 SubjectPublicKeyInfo."""
    if spec.is_ec:
        return asn1_keys.PublicKeyInfo.load(encode_ec_public_key(public_key))
    rsa_der = encode_rsa_public_key(public_key)
    return asn1_keys.PublicKeyInfo({
        "algorithm": {"algorithm": "rsa", "parameters": None},
        "public_key": asn1_keys.RSAPublicKey.load(rsa_der),
    })


def private_keys(session, *, key_id: bytes | None = None, label: str | None = None) -> list:
    """The private key objects with CKA_ID `key_id` and/or CKA_LABEL `label` (one attribute
    search; each caller says in its own words what a count other than one means)."""
    attrs = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
    if key_id:
        attrs[Attribute.ID] = key_id
    if label is not None:
        attrs[Attribute.LABEL] = label
    return list(session.get_objects(attrs))


def find_private_key(session, key_id: bytes, label: str | None = None):
    """The private key object with CKA_ID `key_id` (one attribute search)."""
    found = private_keys(session, key_id=key_id, label=label)
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
