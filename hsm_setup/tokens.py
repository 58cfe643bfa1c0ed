"""Tokens by label: list, find, initialise, log in (the run's state is in `context`).

Every function takes the run's `Pkcs11Library` (hsm_setup.context), which keeps one
logged-in session per token; the rest of hsm_setup borrows it instead of opening and
closing its own.
"""

from __future__ import annotations

import ctypes
import dataclasses

import pkcs11
from pkcs11 import TokenFlag

from device_sim.common.errors import UserError
from hsm_setup.context import Pkcs11Library
from hsm_setup.failures import as_user_error, token_state_error

LABEL_MAX = 32  # CK_TOKEN_INFO.label is 32 bytes, blank padded


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    label: str
    serial: str
    slot_id: int
    manufacturer: str
    model: str
    initialized: bool
    user_pin_initialized: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def list_tokens(library: Pkcs11Library) -> list[TokenInfo]:
    """Every initialised token the module shows (one C_GetTokenInfo per slot)."""
    out = []
    for slot in library.lib.get_slots(token_present=True):
        token = slot.get_token()
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            continue
        out.append(_info(slot, token))
    return out


def find_token(library: Pkcs11Library, label: str, *, required: bool = True):
    """The pkcs11 Token labelled `label`; UserError (or None) when there is none."""
    slot = library.slot_index().get(label)
    token = _token_in_slot(slot, label)
    # Re-initialised under our feet, or (when it must exist) made since the index was
    # built by another context of this process: look again, once.
    if token is None and (slot is not None or required):
        library.forget_slots()
        token = _token_in_slot(library.slot_index().get(label), label)
    if token is not None:
        return token
    if required:
        raise UserError(f"unknown token {label!r}: create it with 'hsm-setup token init {label}' "
                        "(or check --module / the state directory)")
    return None


def _token_in_slot(slot, label: str):
    """The token in `slot` if it is still initialised and labelled `label` (re-read: another
    process may have re-initialised it), else None."""
    if slot is None:
        return None
    try:
        token = slot.get_token()
    except pkcs11.PKCS11Error:
        return None
    if token.label == label and token.flags & TokenFlag.TOKEN_INITIALIZED:
        return token
    return None


def token_info(token) -> TokenInfo:
    return _info(token.slot, token)


def session(library: Pkcs11Library, label: str, pin: str):
    """A read-write session logged in as user on token `label`, one per token and run.

    A PIN the token refused is never presented again in this run (tokens lock their PIN
    after a few wrong tries): the same refusal is raised without a new C_Login.
    """
    token = find_token(library, label)
    slot_id = token.slot.slot_id
    cached = library.cached_session(slot_id, pin)
    if cached is not None:
        return cached
    # Another PIN than the cached session's: log out first, or C_Login would answer
    # "already logged in" without checking the new PIN at all.
    library.drop_session(slot_id)
    try:
        opened = token.open(rw=True, user_pin=pin)
    except pkcs11.UserAlreadyLoggedIn:
        # Another context in this process (login state is per application) is logged in:
        # C_Login would not check this PIN at all, so end that login and present ours.
        opened = _login_after_logout(library, token, pin, label)
    except pkcs11.PKCS11Error as exc:
        raise library.refuse(slot_id, pin, _login_refusal(exc, label)) from None
    return library.keep_session(slot_id, opened, pin)


def _login_after_logout(library: Pkcs11Library, token, pin: str, label: str):
    plain = token.open(rw=True)
    rv = _function(library.path, "C_Logout", _C_Logout)(plain.handle)
    if rv not in (0, 0x101):  # CKR_OK, CKR_USER_NOT_LOGGED_IN
        raise UserError(f"cannot log out of token {label!r} before logging in (C_Logout 0x{rv:x})")
    plain.close()
    try:
        return token.open(rw=True, user_pin=pin)
    except pkcs11.PKCS11Error as exc:
        raise library.refuse(token.slot.slot_id, pin, _login_refusal(exc, label)) from None


def public_session(library: Pkcs11Library, label: str):
    """A read-only session without login on token `label`: public objects only
    (certificates, public keys), and no PIN asked for. One per token and run."""
    token = find_token(library, label)
    slot_id = token.slot.slot_id
    cached = library.public_session(slot_id)
    if cached is None:
        try:
            cached = library.keep_public_session(slot_id, token.open())
        except pkcs11.PKCS11Error as exc:
            raise as_user_error(exc, doing="opening a session", token=label) from None
    return cached


def _login_refusal(exc: pkcs11.PKCS11Error, label: str) -> str:
    if isinstance(exc, pkcs11.PinIncorrect):
        return f"wrong user PIN for token {label!r} (check --pin-file / $PKCS11_PIN)"
    if isinstance(exc, pkcs11.UserPinNotInitialized):
        return f"token {label!r} has no user PIN: initialise it with 'hsm-setup token init'"
    if isinstance(exc, (pkcs11.PinLenRange, pkcs11.PinInvalid)):
        return f"the user PIN for token {label!r} has an invalid length or characters"
    known = token_state_error(exc, label)
    return str(known) if known else str(as_user_error(exc, doing="logging in", token=label))


def check_mechanisms(token, *mechanisms, what: str) -> None:
    """UserError naming the first mechanism the token's slot lacks."""
    have = set(token.slot.get_mechanisms())
    for mechanism in mechanisms:
        if mechanism not in have:
            raise UserError(f"token {token.label!r} does not support {what} "
                            f"(mechanism {mechanism.name} missing): choose another --key type")


def init_token(library: Pkcs11Library, label: str, *, so_pin: str, user_pin: str,
               reload: bool = True) -> TokenInfo | None:
    """Initialise a fresh token labelled `label` in the first empty slot and set its user PIN.

    Re-initialises the library afterwards: open sessions and object handles of this
    library become invalid (initialise tokens before opening anything else). Several
    tokens in a row: pass reload=False (returns None) and call `library.reload()` once
    at the end, as SoftHSM's C_Initialize reads every object of every token.
    """
    if not label or len(label.encode("utf-8")) > LABEL_MAX:
        raise UserError(f"token label must be 1..{LABEL_MAX} bytes, got {label!r}")
    if find_token(library, label, required=False) is not None:
        raise UserError(f"a token labelled {label!r} exists already: pick another label")
    slot = _free_slot(library)
    _c_init_token(library.path, slot.slot_id, so_pin, label)
    library.slot_index()[label] = slot
    token = find_token(library, label)
    try:
        with token.open(rw=True, so_pin=so_pin) as so_session:
            so_session.init_pin(user_pin)
    except (pkcs11.PinLenRange, pkcs11.PinInvalid):
        raise UserError(f"the user PIN has an invalid length for token {label!r} "
                        "(SoftHSM: 4..255 characters)") from None
    # SoftHSM gives a new token a provisional slot ID until the next C_Initialize, when
    # it switches to one derived from the serial (what every other process sees).
    # Re-initialise now, so slot IDs recorded from here on are the lasting ones.
    if not reload:
        return None
    library.reload()
    return token_info(find_token(library, label))


def _free_slot(library: Pkcs11Library):
    # SoftHSM lists its one empty slot last: look from the end.
    for slot in reversed(library.lib.get_slots(token_present=True)):
        if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED:
            return slot
    raise UserError("the PKCS#11 module has no empty slot to initialise a token in")


def _info(slot, token) -> TokenInfo:
    flags = token.flags
    return TokenInfo(
        label=token.label,
        serial=token.serial.decode("ascii", "replace"),
        slot_id=slot.slot_id,
        manufacturer=token.manufacturer_id,
        model=token.model,
        initialized=bool(flags & TokenFlag.TOKEN_INITIALIZED),
        user_pin_initialized=bool(flags & TokenFlag.USER_PIN_INITIALIZED),
    )


# --- C_InitToken, C_Logout --------------------------------------------------------
# python-pkcs11 0.10 wraps neither. We call them through the module's own function list.

_CK_RV = ctypes.c_ulong
_C_InitToken = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_C_Logout = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_ulong)


class _FunctionList(ctypes.Structure):
    # CK_FUNCTION_LIST up to C_Logout (PKCS#11 2.40 section 5.x order).
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [
        (name, ctypes.c_void_p) for name in (
            "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
            "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
            "C_InitToken", "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession",
            "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState",
            "C_SetOperationState", "C_Login", "C_Logout",
        )
    ]


_RV_MESSAGES = {
    0xA0: "wrong SO PIN",
    0xA2: "the SO PIN has an invalid length (SoftHSM: 4..255 characters)",
    0xA4: "the SO PIN is locked",
    0xB3: "a session is open on that slot",
    0xE1: "the token is write protected",
}


def _function(module_path: str, name: str, prototype):
    """A function of the module's own list (the module is already C_Initialize'd by
    python-pkcs11 in this process; dlopen of the same path returns the same instance)."""
    so = ctypes.CDLL(module_path)
    get_list = so.C_GetFunctionList
    get_list.restype = _CK_RV
    pointer = ctypes.POINTER(_FunctionList)()
    get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
    rv = get_list(ctypes.byref(pointer))
    if rv != 0:
        raise UserError(f"PKCS#11 module {module_path}: C_GetFunctionList failed (0x{rv:x})")
    return prototype(getattr(pointer.contents, name))


def _c_init_token(module_path: str, slot_id: int, so_pin: str, label: str) -> None:
    init_token = _function(module_path, "C_InitToken", _C_InitToken)
    pin = so_pin.encode("utf-8")
    padded_label = label.encode("utf-8").ljust(LABEL_MAX, b" ")
    rv = init_token(slot_id, pin, len(pin), padded_label)
    if rv != 0:
        reason = _RV_MESSAGES.get(rv, f"C_InitToken returned 0x{rv:x}")
        raise UserError(f"cannot initialise token {label!r}: {reason}")
