"""PKCS#11 return values as one-line `UserError`s: the boundary where module errors
stop being exceptions a user would see as a traceback (docs/hsm-setup.md, "Errors")."""

from __future__ import annotations

import contextlib
import re

import pkcs11

from device_sim.common.errors import UserError

# python-pkcs11 names its exception classes after the CKR_ values; these few differ.
_CKR_NAMES = {
    "TokenNotRecognised": "CKR_TOKEN_NOT_RECOGNIZED",
    "FunctionCancelled": "CKR_FUNCTION_CANCELED",
    "AnotherUserAlreadyLoggedIn": "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    "SlotIDInvalid": "CKR_SLOT_ID_INVALID",
    "RandomNoRNG": "CKR_RANDOM_NO_RNG",
}

# Return values that are about the token itself, not about one operation: each its own line.
_TOKEN_STATES = {
    pkcs11.PinLocked: "the user PIN of token {token} is locked (too many wrong PINs): "
                      "unlock it with the SO PIN or re-initialise the token",
    pkcs11.PinExpired: "the user PIN of token {token} has expired: set a new one with the "
                       "token's own tool, then run again",
    pkcs11.TokenNotPresent: "token {token} is not present (CKR_TOKEN_NOT_PRESENT): connect it, "
                            "or check --module",
    pkcs11.DeviceRemoved: "the device holding token {token} was removed (CKR_DEVICE_REMOVED): "
                          "reconnect it and run again",
}


def ckr_name(exc: pkcs11.PKCS11Error) -> str:
    """The CKR_ name of a python-pkcs11 exception (its class name, in PKCS#11 spelling)."""
    name = type(exc).__name__
    if name in _CKR_NAMES:
        return _CKR_NAMES[name]
    if type(exc) is pkcs11.PKCS11Error:  # python-pkcs11's catch-all: its text is the reason
        return str(exc).strip() or "PKCS11Error"
    return "CKR_" + re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def token_state_error(exc: pkcs11.PKCS11Error, token: str | None) -> UserError | None:
    """The one-line error for a PIN-locked/-expired, absent or removed token; else None."""
    for cls, text in _TOKEN_STATES.items():
        if isinstance(exc, cls):
            return UserError(text.format(token=repr(token) if token else "(unnamed)"))
    return None


def as_user_error(exc: pkcs11.PKCS11Error, *, doing: str = "a PKCS#11 call",
                  token: str | None = None) -> UserError:
    """`exc` as one line naming the CKR value (and the token, when known)."""
    known = token_state_error(exc, token)
    if known is not None:
        return known
    where = f" on token {token!r}" if token else ""
    return UserError(f"{doing}{where} failed: {ckr_name(exc)}")


@contextlib.contextmanager
def pkcs11_errors(*, doing: str = "a PKCS#11 call", token: str | None = None):
    """Inside: a PKCS#11 error that escapes becomes `as_user_error` (no traceback)."""
    try:
        yield
    except pkcs11.PKCS11Error as exc:
        raise as_user_error(exc, doing=doing, token=token) from None
