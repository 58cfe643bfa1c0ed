"""A device's key in its token, with its certificates: the one call the device side makes.

A device is named by an RFC 7512 PKCS#11 URI (`pkcs11:token=devices;object=dev-1?pin-source=...`)
or by its registration ID in the state directory's registry (`hsm_setup.devices`).
`open_device_key` resolves either to a `TokenKey`: where the key is (module, slot, token,
label, id), its type, the leaf certificate and the issuers the registry or the token
know, the PIN, and `sign(data)` inside the token. With `login=False` only public objects
are read (certificates), no PIN is asked for and `sign` is not available.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, ObjectClass

from device_sim.common import x509util
from device_sim.common.errors import UserError
from hsm_setup import devices, keys, tokens
from hsm_setup.context import Pkcs11Context
from hsm_setup.failures import as_user_error, pkcs11_errors
from hsm_setup.key_types import KeySpec, key_spec
from hsm_setup.pins import pin_from_source, resolve_pin
from hsm_setup.signing import sign_x509
from hsm_setup.uri import Pkcs11Uri


@dataclass
class TokenKey:
    module_path: str
    slot_id: int
    token_label: str
    key_label: str            # awscrt selects the private key by this label
    key_id: bytes | None
    spec: KeySpec
    leaf: x509.Certificate
    issuers: list[x509.Certificate]  # from the registry, the token, or the --cert file
    pin: str | None = field(default=None, repr=False)
    private_key: object = field(default=None, repr=False)  # None when opened without login

    @property
    def key_type(self) -> str:
        return self.spec.name

    @property
    def uri(self) -> str:
        """The key's URI (without PIN)."""
        return str(Pkcs11Uri(token=self.token_label, object=self.key_label, id=self.key_id,
                             type="private"))

    def sign(self, data: bytes) -> bytes:
        """An X.509-form signature over `data`, made inside the token."""
        if self.private_key is None:
            raise UserError(f"the key {self.key_label!r} was opened without login: it cannot sign")
        try:
            return sign_x509(self.private_key, self.spec, data)
        except pkcs11.PKCS11Error as exc:
            raise as_user_error(exc, doing="signing with the device key",
                                token=self.token_label) from None


def is_uri(text: str) -> bool:
    return text[:7].lower() == "pkcs11:"


def open_device_key(ctx: Pkcs11Context, device: str, *, module: str | None = None,
                    pin_file: str | None = None, cert_file: str | None = None,
                    login: bool = True) -> TokenKey:
    """Resolve `device` (URI or registration ID) to its token key; UserError on any problem
    (a PKCS#11 error included: it becomes one line naming its CKR value)."""
    with pkcs11_errors(doing=f"opening the key of {device if not is_uri(device) else 'the device'}"):
        return _open(ctx, device, module=module, pin_file=pin_file, cert_file=cert_file, login=login)


def _open(ctx, device, *, module, pin_file, cert_file, login) -> TokenKey:
    uri = Pkcs11Uri.parse(device) if is_uri(device) else None
    record = None if uri else devices.lookup_device(ctx.home, device)
    library = ctx.library(module or (uri.module_path if uri else None))
    if uri:
        if uri.type not in (None, "private", "cert"):
            raise UserError(f"the URI names a {uri.type!r} object: name the device's private key "
                            "(type=private, or no type)")
        token_label, key_id, key_label = _token_label(library.lib, uri), uri.id, uri.object
    else:
        token_label, key_id, key_label = record.token_label, record.key_id, record.label
    token = tokens.find_token(library, token_label)
    private_key, pin = None, None
    if login:
        pin = _pin(uri, pin_file)
        session = tokens.session(library, token_label, pin)
        private_key = _private_key(session, token_label, key_id, key_label)
        key_label = private_key[Attribute.LABEL] or ""
        key_id = key_id or private_key[Attribute.ID] or None
    else:
        session = tokens.public_session(library, token_label)
    leaf, issuers = _certificates(session, record, cert_file, key_id, key_label, token_label)
    if not login:
        key_id = key_id or _certificate_id(session, leaf)
        key_label = key_label or (record.label if record else x509util.common_name(leaf) or "")
    return TokenKey(library.path, token.slot.slot_id, token_label, key_label, key_id,
                    spec_for(leaf), leaf, issuers, pin, private_key)


def _pin(uri: Pkcs11Uri | None, pin_file: str | None) -> str:
    if uri and uri.pin_value:
        return uri.pin_value
    if uri and uri.pin_source:
        return pin_from_source(uri.pin_source)
    return resolve_pin(pin_file)


def _certificates(session, record, cert_file, key_id, key_label, token_label):
    """(leaf, issuers): the --cert file's, else the token's (else the registry's) leaf; the
    registry's issuers (no token search), else those stored on the token."""
    issuers: list[x509.Certificate] = []
    if cert_file:
        file_certs = x509util.load_certificate_file(cert_file)
        leaf, issuers = file_certs[0], file_certs[1:]
    else:
        leaf = _token_certificate(session, key_id, key_label)
        if leaf is None and record is not None:
            leaf = record.certificate_x509()
        if leaf is None:
            raise UserError(f"no certificate for key {key_label!r} on token {token_label!r}: "
                            "store it on the token or pass --cert FILE")
    if record is not None:
        issuers += record.chain_x509()
    else:
        issuers += _token_issuers(session, leaf)
    return leaf, issuers


def spec_for(leaf: x509.Certificate) -> KeySpec:
    """The key type of the certificate's public key, as the TLS path supports it."""
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
            # python-pkcs11 gives the serial as the token's padded bytes; the URI's is text.
            serial = token.serial.decode("ascii", "replace").strip()
            if slot.slot_id == uri.slot_id or (uri.serial and serial == uri.serial):
                return token.label
        raise UserError(f"no token matches {uri}")
    raise UserError("the PKCS#11 URI names no token: add token=LABEL (or slot-id= / serial=)")



def _private_key(session, token_label, key_id, key_label):
    """The device's private key; its label must be unique because awscrt selects the key by label.

    Every object search costs ~20-30 ms on a SoftHSM token holding 1,000+ objects, so this
    makes one search when the label is known (by label, then the id is checked here).
    """
    what = " and ".join(filter(None, [f"id={key_id.hex()}" if key_id else None,
                                      f"object={key_label}" if key_label else None])) or "any attributes"
    if not key_label:
        found = keys.private_keys(session, key_id=key_id)
        if len(found) != 1:
            return _key_search_failed(found, what, token_label)
        key_label = found[0][Attribute.LABEL] or ""
        if not key_label:
            raise UserError(f"the device key on token {token_label!r} has no label: awscrt finds the TLS key by label")
    same_label = keys.private_keys(session, label=key_label)
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
    elif key_label:
        attrs[Attribute.LABEL] = key_label
    else:
        return None
    for obj in session.get_objects(attrs):
        return x509.load_der_x509_certificate(obj[Attribute.VALUE])
    return None


def _certificate_id(session, leaf: x509.Certificate) -> bytes | None:
    """CKA_ID of the token's copy of `leaf` (without login the key itself is not visible)."""
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE,
                                    Attribute.VALUE: x509util.to_der(leaf)}):
        return bytes(obj[Attribute.ID]) or None
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
