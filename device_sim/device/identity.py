"""Load a device identity: the token key, its certificate, CA certificates to chain with.

A device is named by an RFC 7512 PKCS#11 URI (`pkcs11:token=devices;object=dev-1?pin-source=...`)
or by its registration ID in the state directory's device registry (hsm_setup.devices).
Before any connection the identity is checked, each failure a one-line UserError:
the certificate's public key is the token key's (a nonce is signed inside the token and
verified against the certificate), the certificate is valid now, and its CN is a valid
registration ID.
"""

from __future__ import annotations

import datetime
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pkcs11
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, ObjectClass

from device_sim.device.chain_builder import common_name, describe
from hsm_setup import devices, tokens
from device_sim.common.errors import UserError
from hsm_setup.key_types import KeySpec, key_spec
from hsm_setup.module import load_library, resolve_module
from hsm_setup.pins import read_pin_file, resolve_pin
from device_sim.common.registration_id import registration_id_problem
from hsm_setup.signing import sign_x509
from hsm_setup.uri import Pkcs11Uri


@dataclass
class DeviceIdentity:
    registration_id: str
    module_path: str
    token_label: str
    slot_id: int
    key_label: str  # awscrt selects the private key by this label
    key_id: bytes | None
    key_type: str
    leaf: x509.Certificate
    ca_certs: list[x509.Certificate]  # issuers found in the registry / on the token / in files
    uri: str  # without PIN
    pin: str | None = field(default=None, repr=False)


def is_uri(text: str) -> bool:
    return text[:7].lower() == "pkcs11:"


def load_identity(device: str, *, home: Path, module: str | None = None, pin_file: str | None = None,
                  cert_file: str | None = None, check: bool = True,
                  now: datetime.datetime | None = None) -> DeviceIdentity:
    """Resolve `device` (URI or registration ID) to a checked identity; UserError on any problem."""
    uri = Pkcs11Uri.parse(device) if is_uri(device) else None
    record = None if uri else devices.lookup_device(home, device)
    module_path = resolve_module(module or (uri.module_path if uri else None), home)
    lib = load_library(module_path)

    if uri:
        token_label, key_id, key_label = _token_label(lib, uri), uri.id, uri.object
        pin = uri.pin_value or (_pin_from_source(uri.pin_source) if uri.pin_source else resolve_pin(pin_file))
        if uri.type not in (None, "private", "cert"):
            raise UserError(f"the URI names a {uri.type!r} object: name the device's private key "
                            "(type=private, or no type)")
    else:
        token_label, key_id, key_label = record.token_label, record.key_id, record.label
        pin = resolve_pin(pin_file)

    token = tokens.find_token(lib, token_label)
    session = tokens.session(lib, token_label, pin)
    private_key = _private_key(session, token_label, key_id, key_label)
    key_label = private_key[Attribute.LABEL] or ""
    key_id = key_id or private_key[Attribute.ID] or None

    extra_cas: list[x509.Certificate] = []
    if cert_file:
        from device_sim.device.chain_builder import load_pem_file

        file_certs = load_pem_file(cert_file)
        leaf, extra_cas = file_certs[0], file_certs[1:]
    else:
        leaf = _token_certificate(session, key_id, key_label)
        if leaf is None and record is not None:
            leaf = record.certificate_x509()
        if leaf is None:
            raise UserError(f"no certificate for key {key_label!r} on token {token_label!r}: "
                            "store it on the token or pass --cert FILE")
    if record is not None:
        extra_cas += record.chain_x509()  # the registry already knows the issuers: no token search
    else:
        extra_cas += _token_issuers(session, leaf)

    registration_id = common_name(leaf) or ""
    spec = _spec_for(leaf)
    if check:
        check_identity(leaf, private_key, spec, now=now)
    uri_text = str(Pkcs11Uri(token=token_label, object=key_label, id=key_id, type="private"))
    return DeviceIdentity(registration_id, module_path, token_label, token.slot.slot_id, key_label,
                          key_id, spec.name, leaf, extra_cas, uri_text, pin)


def check_identity(leaf: x509.Certificate, private_key, spec: KeySpec,
                   now: datetime.datetime | None = None) -> None:
    """The three pre-connection checks; each failure is one UserError line."""
    problem = registration_id_problem(common_name(leaf) or "")
    if problem:
        raise UserError(f"the certificate {describe(leaf)} cannot register: its CN is not a valid "
                        f"registration ID ({problem})")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if now < leaf.not_valid_before_utc:
        raise UserError(f"the certificate {describe(leaf)} is not valid before "
                        f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ} (check the clock or re-issue it)")
    if now > leaf.not_valid_after_utc:
        raise UserError(f"the certificate {describe(leaf)} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}: "
                        "issue a new one ('hsm-setup device create ...')")
    nonce = secrets.token_bytes(32)
    try:
        signature = sign_x509(private_key, spec, nonce)
    except pkcs11.PKCS11Error as exc:
        raise UserError(f"the token key cannot sign ({type(exc).__name__}): check the key's CKA_SIGN "
                        "and the token's mechanisms") from None
    if not _verifies(leaf.public_key(), signature, nonce, spec):
        raise UserError(f"the certificate {describe(leaf)} does not belong to the token key: its public key "
                        "differs from the key that signed (wrong --cert, or a key/certificate mix-up on the token)")


def _verifies(public_key, signature: bytes, data: bytes, spec: KeySpec) -> bool:
    digest = getattr(hashes, spec.hash_name.upper())()
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(digest))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), digest)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def _spec_for(leaf: x509.Certificate) -> KeySpec:
    public_key = leaf.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        names = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}
        if public_key.curve.name not in names:
            raise UserError(f"the certificate's key is EC {public_key.curve.name}: awscrt's PKCS#11 TLS "
                            "supports P-256 and P-384 (P-521 fails), and RSA")
        return key_spec(names[public_key.curve.name])
    if isinstance(public_key, rsa.RSAPublicKey):
        return key_spec("rsa-3072" if public_key.key_size == 3072 else "rsa-2048")
    raise UserError(f"the certificate's key type {type(public_key).__name__} is not supported (EC or RSA)")


def _token_label(lib, uri: Pkcs11Uri) -> str:
    if uri.token:
        return uri.token
    if uri.slot_id is not None or uri.serial:
        for slot in lib.get_slots(token_present=True):
            token = slot.get_token()
            if slot.slot_id == uri.slot_id or (uri.serial and token.serial.strip() == uri.serial):
                return token.label
        raise UserError(f"no token matches {uri}")
    raise UserError("the PKCS#11 URI names no token: add token=LABEL (or slot-id= / serial=)")


def _pin_from_source(source: str) -> str:
    """RFC 7512 pin-source: a file path or a file: URI."""
    path = unquote(urlparse(source).path) if source.startswith("file:") else source
    return read_pin_file(os.path.expanduser(path), what="PIN")


def _private_key(session, token_label, key_id, key_label):
    """The device's private key; its label must be unique because awscrt selects the key by label.

    Every object search costs ~20-30 ms on a SoftHSM token holding 1,000+ objects, so this
    makes one search when the label is known (by label, then the id is checked here).
    """
    what = " and ".join(filter(None, [f"id={key_id.hex()}" if key_id else None,
                                      f"object={key_label}" if key_label else None])) or "any attributes"
    if not key_label:
        attrs = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if key_id:
            attrs[Attribute.ID] = key_id
        found = list(session.get_objects(attrs))
        if len(found) != 1:
            return _key_search_failed(found, what, token_label)
        key_label = found[0][Attribute.LABEL] or ""
        if not key_label:
            raise UserError(f"the device key on token {token_label!r} has no label: awscrt finds the TLS key by label")
    same_label = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: key_label}))
    found = [k for k in same_label if not key_id or k[Attribute.ID] == key_id]
    if len(found) != 1:
        return _key_search_failed(found, what, token_label)
    if len(same_label) > 1:
        raise UserError(f"{len(same_label)} private keys on token {token_label!r} share the label {key_label!r}: "
                        "awscrt selects the TLS key by label, so it must be unique")
    return found[0]


def _key_search_failed(found, what, token_label):
    if not found:
        raise UserError(f"no private key with {what} on token {token_label!r}: check the URI's object/id "
                        "('hsm-setup device list' shows the devices)")
    raise UserError(f"{len(found)} private keys match {what} on token {token_label!r}: add id= or object= to the URI")


def _token_certificate(session, key_id, key_label) -> x509.Certificate | None:
    attrs = {Attribute.CLASS: ObjectClass.CERTIFICATE}
    if key_id:
        attrs[Attribute.ID] = key_id
    else:
        attrs[Attribute.LABEL] = key_label
    for obj in session.get_objects(attrs):
        return x509.load_der_x509_certificate(obj[Attribute.VALUE])
    return None


def _token_issuers(session, leaf: x509.Certificate, limit: int = 8) -> list[x509.Certificate]:
    """CA certificates stored on the token, found by subject = issuer name (no full scan)."""
    out, current = [], leaf
    for _ in range(limit):
        if current.issuer == current.subject:
            break
        found = [x509.load_der_x509_certificate(o[Attribute.VALUE]) for o in session.get_objects(
            {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.SUBJECT: current.issuer.public_bytes()})]
        found = [c for c in found if c not in out and c != current]
        if not found:
            break
        out += found
        current = found[0]
    return out
