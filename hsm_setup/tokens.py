"""Tokens by label: find, initialise, log in.

PKCS#11 login state belongs to the application, not the session: closing one
logged-in session logs every session of that token out. So this module keeps one
logged-in session per token and process (`session`), and the rest of hsm_setup
borrows it instead of opening and closing its own.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hmac

import pkcs11
from pkcs11 import TokenFlag

from hsm_setup import module
from device_sim.common.errors import UserError

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


# (lib, library generation, slot) -> (session, PIN it logged in with)
_sessions: dict[tuple, tuple] = {}


def list_tokens(lib) -> list[TokenInfo]:
    """Every initialised token the module shows (one C_GetTokenInfo per slot)."""
    out = []
    for slot in lib.get_slots(token_present=True):
        token = slot.get_token()
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            continue
        out.append(_info(slot, token))
    return out


# (lib, library generation) -> {label: slot}, built with one C_GetTokenInfo per slot, so a
# run that touches a thousand shard tokens does not pay a thousand-slot scan per lookup
# (that made `fleet create` of 10,000 devices spend ~4 of its 9 minutes in lookups).
# Within one generation the slot list only gains the tokens this process initialises
# (SoftHSM shows other processes' new tokens after a re-initialisation, which starts a new
# generation), and `init_token` adds those.
_slot_by_label: dict[tuple, dict] = {}


def _index(lib) -> dict:
    key = (id(lib), module.generation())
    index = _slot_by_label.get(key)
    if index is None:
        _slot_by_label.clear()  # older generations' slots are gone
        index = _slot_by_label[key] = {}
        for slot in lib.get_slots(token_present=True):
            token = slot.get_token()
            if token.flags & TokenFlag.TOKEN_INITIALIZED:
                index.setdefault(token.label, slot)
    return index


def find_token(lib, label: str, *, required: bool = True):
    """The pkcs11 Token labelled `label`; UserError (or None) when there is none."""
    slot = _index(lib).get(label)
    token = _token_in_slot(slot, label)
    if slot is not None and token is None:  # re-initialised under our feet: look again
        _slot_by_label.clear()
        token = _token_in_slot(_index(lib).get(label), label)
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


def session(lib, label: str, pin: str):
    """A read-write session logged in as user on token `label`, shared per process."""
    token = find_token(lib, label)
    key = (id(lib), module.generation(), token.slot.slot_id)
    cached = _sessions.pop(key, None)
    if cached is not None:
        if hmac.compare_digest(cached[1].encode(), pin.encode()):
            _sessions[key] = cached
            return cached[0]
        # Another PIN: log out first, or C_Login would answer "already logged in"
        # without checking the new PIN at all.
        _close_quietly(cached[0])
    try:
        opened = token.open(rw=True, user_pin=pin)
    except pkcs11.PinIncorrect:
        raise UserError(f"wrong user PIN for token {label!r} (check --pin-file / $PKCS11_PIN)") from None
    except pkcs11.PinLocked:
        raise UserError(f"the user PIN of token {label!r} is locked: re-initialise the token") from None
    except pkcs11.UserPinNotInitialized:
        raise UserError(f"token {label!r} has no user PIN: initialise it with 'hsm-setup token init'") from None
    except (pkcs11.PinLenRange, pkcs11.PinInvalid):
        raise UserError(f"the user PIN for token {label!r} has an invalid length or characters") from None
    except pkcs11.UserAlreadyLoggedIn:
        # Someone else in this process logged in already: a plain session shares that login.
        opened = token.open(rw=True)
    _sessions[key] = (opened, pin)
    return opened


def forget_sessions() -> None:
    """Log out and drop cached sessions."""
    for opened, _ in _sessions.values():
        _close_quietly(opened)
    _sessions.clear()


def _close_quietly(opened) -> None:
    try:
        opened.close()
    except pkcs11.PKCS11Error:
        pass  # stale after a re-initialisation: nothing left to close


def check_mechanisms(token, *mechanisms, what: str) -> None:
    """UserError naming the first mechanism the token's slot lacks."""
    have = set(token.slot.get_mechanisms())
    for mechanism in mechanisms:
        if mechanism not in have:
            raise UserError(f"token {token.label!r} does not support {what} "
                            f"(mechanism {mechanism.name} missing): choose another --key type")


def init_token(lib, module_path: str, label: str, *, so_pin: str, user_pin: str,
               reload: bool = True) -> TokenInfo | None:
    """Initialise a fresh token labelled `label` in the first empty slot and set its user PIN.

    Re-initialises the library afterwards: open sessions and object handles of this
    process become invalid (initialise tokens before opening anything else). Several
    tokens in a row: pass reload=False (returns None) and call
    `module.load_library(path, fresh=True)` once at the end, as SoftHSM's C_Initialize
    reads every object of every token.
    """
    if not label or len(label.encode("utf-8")) > LABEL_MAX:
        raise UserError(f"token label must be 1..{LABEL_MAX} bytes, got {label!r}")
    if find_token(lib, label, required=False) is not None:
        raise UserError(f"a token labelled {label!r} exists already: pick another label")
    slot = _free_slot(lib)
    _c_init_token(module_path, slot.slot_id, so_pin, label)
    _index(lib)[label] = slot
    token = find_token(lib, label)
    try:
        with token.open(rw=True, so_pin=so_pin) as so_session:
            so_session.init_pin(user_pin)
    except (pkcs11.PinLenRange, pkcs11.PinInvalid):
        raise UserError(f"the user PIN has an invalid length for token {label!r} "
                        "(SoftHSM: 4..255 characters)") from None
    # SoftHSM gives a new token a provisional slot ID until the next C_Initialize, when
    # it switches to one derived from the serial (what every other process sees).
    # Re-initialise now, so slot IDs recorded from here on are the lasting ones.
    # This closes every session of this library in the process.
    if not reload:
        return None
    module.load_library(module_path, fresh=True)
    return token_info(find_token(lib, label))


def _free_slot(lib):
    # SoftHSM lists its one empty slot last: look from the end.
    for slot in reversed(lib.get_slots(token_present=True)):
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


# --- C_InitToken ---------------------------------------------------------------
# python-pkcs11 0.10 has no wrapper for C_InitToken. We call it through the module's
# own function list (the module is already C_Initialize'd by python-pkcs11 in this
# process; dlopen of the same path returns the same instance).

_CK_RV = ctypes.c_ulong
_C_InitToken = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)


class _FunctionList(ctypes.Structure):
    # CK_FUNCTION_LIST up to C_InitToken (PKCS#11 2.40 section 5.x order).
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [
        (name, ctypes.c_void_p) for name in (
            "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
            "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
            "C_InitToken",
        )
    ]


_RV_MESSAGES = {
    0xA0: "wrong SO PIN",
    0xA2: "the SO PIN has an invalid length (SoftHSM: 4..255 characters)",
    0xA4: "the SO PIN is locked",
    0xB3: "a session is open on that slot",
    0xE1: "the token is write protected",
}


def _c_init_token(module_path: str, slot_id: int, so_pin: str, label: str) -> None:
    so = ctypes.CDLL(module_path)
    get_list = so.C_GetFunctionList
    get_list.restype = _CK_RV
    pointer = ctypes.POINTER(_FunctionList)()
    get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
    rv = get_list(ctypes.byref(pointer))
    if rv != 0:
        raise UserError(f"PKCS#11 module {module_path}: C_GetFunctionList failed (0x{rv:x})")
    init_token = _C_InitToken(pointer.contents.C_InitToken)
    pin = so_pin.encode("utf-8")
    padded_label = label.encode("utf-8").ljust(LABEL_MAX, b" ")
    rv = init_token(slot_id, pin, len(pin), padded_label)
    if rv != 0:
        reason = _RV_MESSAGES.get(rv, f"C_InitToken returned 0x{rv:x}")
        raise UserError(f"cannot initialise token {label!r}: {reason}")
