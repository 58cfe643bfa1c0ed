"""Load a device identity: one call into the token layer, then the pre-connection checks.

`hsm_setup.device_keys.open_device_key` finds the key, its certificate and issuers (from
the registry, the token, or a --cert file). Before any connection the identity is then
checked, each failure a one-line UserError: the certificate's CN is a valid registration
ID, the certificate is valid now (unless the caller asks to see how DPS answers an
expired or not-yet-valid one), and its public key is the token key's (a nonce is signed
inside the token and verified against the certificate).
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from device_sim.common.errors import UserError
from device_sim.common.registration_id import registration_id_problem
from device_sim.common.x509util import common_name, describe
from hsm_setup.context import Pkcs11Context
from hsm_setup.device_keys import TokenKey, is_uri, open_device_key

__all__ = ["DeviceIdentity", "check_identity", "is_uri", "load_identity"]


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
    # Keeps the run's token sessions (and so the login) open while the identity is in use.
    key: TokenKey | None = field(default=None, repr=False, compare=False)
    context: Pkcs11Context | None = field(default=None, repr=False, compare=False)


def load_identity(device: str, *, home: Path, module: str | None = None, pin_file: str | None = None,
                  cert_file: str | None = None, check: bool = True,
                  now: datetime.datetime | None = None, check_validity: bool = True,
                  login: bool = True, context: Pkcs11Context | None = None) -> DeviceIdentity:
    """Resolve `device` (URI or registration ID) to a checked identity; UserError on any problem.

    `login=False` reads public objects only (no PIN asked for) and so cannot check that the
    key matches the certificate. `context` is the run's PKCS#11 context (default: a new one).
    """
    ctx = context or Pkcs11Context(home)
    key = open_device_key(ctx, device, module=module, pin_file=pin_file, cert_file=cert_file,
                          login=login)
    if check:
        check_certificate(key.leaf, now=now, check_validity=check_validity)
        if login:
            check_key_matches(key)
    return DeviceIdentity(common_name(key.leaf) or "", key.module_path, key.token_label, key.slot_id,
                          key.key_label, key.key_id, key.key_type, key.leaf, key.issuers, key.uri,
                          key.pin, key=key, context=ctx)


def check_identity(key: TokenKey, now: datetime.datetime | None = None, *,
                   check_validity: bool = True) -> None:
    """The three pre-connection checks; each failure is one UserError line."""
    check_certificate(key.leaf, now=now, check_validity=check_validity)
    check_key_matches(key)


def check_certificate(leaf: x509.Certificate, *, now: datetime.datetime | None = None,
                      check_validity: bool = True) -> None:
    problem = registration_id_problem(common_name(leaf) or "")
    if problem:
        raise UserError(f"the certificate {describe(leaf)} cannot register: its CN is not a valid "
                        f"registration ID ({problem})")
    if not check_validity:
        return
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if now < leaf.not_valid_before_utc:
        raise UserError(f"the certificate {describe(leaf)} is not valid before "
                        f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ} (check the clock or re-issue it)")
    if now > leaf.not_valid_after_utc:
        raise UserError(f"the certificate {describe(leaf)} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}: "
                        "issue a new one ('hsm-setup device create ...')")


def check_key_matches(key: TokenKey) -> None:
    """A nonce signed inside the token verifies against the certificate's public key."""
    nonce = secrets.token_bytes(32)
    try:
        signature = key.sign(nonce)
    except UserError as exc:
        raise UserError(f"the token key cannot sign ({exc}): check the key's CKA_SIGN "
                        "and the token's mechanisms") from None
    if not _verifies(key.leaf.public_key(), signature, nonce, key.spec.hash_name):
        raise UserError(f"the certificate {describe(key.leaf)} does not belong to the token key: its public key "
                        "differs from the key that signed (wrong --cert, or a key/certificate mix-up on the token)")


def _verifies(public_key, signature: bytes, data: bytes, hash_name: str) -> bool:
    digest = getattr(hashes, hash_name.upper())()
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
