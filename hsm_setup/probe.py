"""`hsm-setup token probe`: what a module and token offer for DPS X.509 attestation.

Key types are judged by trying, not by the mechanism list alone: each one whose
mechanisms are listed gets a session key pair (CKA_TOKEN false, gone with the session
and destroyed at once anyway), its private key's protection attributes are read back,
a CSR is signed with it and checked, and a few signatures are timed. Nothing is left
on the token. See docs/byo-pki.md ("Probing a token").
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import statistics
import time

import pkcs11
from cryptography import x509
from pkcs11 import Attribute, KeyType, Mechanism, TokenFlag

from device_sim.common.errors import UserError
from hsm_setup import csr, keys, tokens
from hsm_setup.byo import token_failures
from hsm_setup.key_types import DEFAULT_KEY_TYPE, KEY_TYPES, KeySpec
from hsm_setup.signing import TokenSigner, sign_x509

PROBE_LABEL = "hsm-setup-probe"
SIGN_ROUNDS = 5

# The mechanism the TLS stack (awscrt) signs the handshake with, beside the one hsm-setup
# signs CSRs with: a device key needs both.
TLS_MECHANISMS = {KeyType.EC: Mechanism.ECDSA, KeyType.RSA: Mechanism.RSA_PKCS}

# Token flags that stop an identity from being made or used.
_BLOCKING_FLAGS = {
    TokenFlag.WRITE_PROTECTED: "the token is write protected: no key or certificate can be stored",
    TokenFlag.USER_PIN_LOCKED: "the user PIN is locked",
    TokenFlag.USER_PIN_TO_BE_CHANGED: "the user PIN must be changed before use",
    TokenFlag.ERROR_STATE: "the token reports an error state",
}
# Flags after which the probe does not log in: one wrong PIN more would lock the token.
_NO_LOGIN_FLAGS = TokenFlag.USER_PIN_LOCKED | TokenFlag.USER_PIN_FINAL_TRY

# CK_TOKEN_INFO session counts: "no limit" and "not stated".
_CK_EFFECTIVELY_INFINITE = 0
_CK_UNAVAILABLE_INFORMATION = ctypes.c_ulong(-1).value


@dataclasses.dataclass
class KeyTypeResult:
    name: str
    usable: bool = False
    reason: str | None = None        # why not usable
    sensitive: bool | None = None    # None: the module did not answer
    extractable: bool | None = None
    always_sensitive: bool | None = None
    never_extractable: bool | None = None
    sign_ms: float | None = None

    @property
    def protected(self) -> bool:
        """The private key stays in the token (unknown ALWAYS/NEVER answers do not count against)."""
        return (self.sensitive is True and self.extractable is False
                and self.always_sensitive is not False and self.never_extractable is not False)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ProbeReport:
    module: str
    token: str
    serial: str
    manufacturer: str
    model: str
    flags: list[str]
    mechanisms: list[str]
    key_results: list[KeyTypeResult]
    max_sessions: int | None      # None: no limit, or not stated
    max_rw_sessions: int | None
    problems: list[str]

    @property
    def key_types(self) -> list[str]:
        return [r.name for r in self.key_results if r.usable]

    @property
    def non_extractable(self) -> bool:
        generated = [r for r in self.key_results if r.sensitive is not None]
        return bool(generated) and all(r.protected for r in generated)

    @property
    def sign_ms(self) -> float | None:
        """Time of one signature with the default key type, else the first usable one."""
        usable = sorted((r for r in self.key_results if r.usable), key=lambda r: r.name != DEFAULT_KEY_TYPE)
        return usable[0].sign_ms if usable else None

    @property
    def usable_for_dps(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {
            "module": self.module, "token": self.token, "serial": self.serial,
            "manufacturer": self.manufacturer, "model": self.model, "flags": self.flags,
            "mechanisms": self.mechanisms, "key_types": self.key_types,
            "key_type_details": {r.name: r.as_dict() for r in self.key_results},
            "non_extractable": self.non_extractable, "sign_ms": self.sign_ms,
            "max_sessions": self.max_sessions, "max_rw_sessions": self.max_rw_sessions,
            "usable_for_dps": self.usable_for_dps, "problems": self.problems,
        }


def default_token_label(lib, fallback: str) -> str:
    """The module's only initialised token, else `fallback`."""
    labels = [info.label for info in tokens.list_tokens(lib)]
    return labels[0] if len(labels) == 1 else fallback


@token_failures("token probe")
def probe(lib, module_path: str, label: str, pin_source) -> ProbeReport:
    """Probe token `label`; `pin_source()` gives the user PIN (asked only if the probe logs in).

    A wrong PIN is a UserError (one login, no retry); every other token failure becomes a
    problem in the report.
    """
    token = tokens.find_token(lib, label)
    info = tokens.token_info(token)
    flags = token.flags
    problems = [text for flag, text in _BLOCKING_FLAGS.items() if flags & flag]
    if not flags & TokenFlag.USER_PIN_INITIALIZED:
        problems.append("the token has no user PIN: initialise it first")
    mechanisms = _mechanisms(token)
    max_sessions, max_rw = _session_limits(module_path, token.slot.slot_id)
    if flags & _NO_LOGIN_FLAGS or not flags & TokenFlag.USER_PIN_INITIALIZED:
        if flags & TokenFlag.USER_PIN_FINAL_TRY:
            problems.append("the user PIN has one try left: the probe did not log in")
        results = [KeyTypeResult(name, reason="not tried (no login)") for name in KEY_TYPES]
    else:
        session = tokens.session(lib, label, pin_source())
        _remove_leftovers(session)
        results = [_try_key_type(session, mechanisms, spec) for spec in KEY_TYPES.values()]
        problems += _key_problems(results)
    return ProbeReport(
        module=module_path, token=label, serial=info.serial, manufacturer=info.manufacturer,
        model=info.model, flags=sorted(f.name for f in TokenFlag if flags & f),
        mechanisms=sorted(_mechanism_name(m) for m in mechanisms), key_results=results,
        max_sessions=max_sessions, max_rw_sessions=max_rw, problems=problems)


def _remove_leftovers(session) -> None:
    """Destroy probe keys an interrupted earlier probe left: a module that makes only token
    objects (tpm2-pkcs11 refuses CKA_TOKEN false, see docs/byo-pki.md) stores them."""
    keys.destroy_quietly(*session.get_objects({Attribute.LABEL: PROBE_LABEL}))


def _key_problems(results: list[KeyTypeResult]) -> list[str]:
    problems = []
    exposed = [r.name for r in results if r.sensitive is not None and not r.protected]
    if exposed:
        problems.append(f"generated private keys can leave the token ({', '.join(exposed)}: "
                        "CKA_SENSITIVE/CKA_EXTRACTABLE not as asked)")
    if not any(r.usable for r in results):
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in results)
        problems.append(f"no key type can be generated and sign for DPS ({reasons})")
    return problems


def _try_key_type(session, mechanisms: set, spec: KeySpec) -> KeyTypeResult:
    result = KeyTypeResult(spec.name)
    needed = (spec.keygen_mechanism, spec.sign_mechanism, TLS_MECHANISMS[spec.key_type])
    missing = [m.name for m in dict.fromkeys(needed) if m not in mechanisms]  # EC signs CSRs and TLS alike
    if spec.keygen_mechanism not in mechanisms:
        result.reason = f"mechanism {', '.join(missing)} missing"
        return result
    try:
        public, private = keys.generate_keypair(session, spec, key_id=keys.new_key_id(),
                                                label=PROBE_LABEL, store=False)
    except UserError as exc:
        result.reason = f"key generation refused: {exc}"
        return result
    except pkcs11.PKCS11Error as exc:
        result.reason = f"key generation failed ({type(exc).__name__})"
        return result
    try:
        _read_protection(private, result)
        if missing:
            result.reason = f"mechanism {', '.join(missing)} missing"
        else:
            _check_signing(public, private, spec, result)
    finally:
        keys.destroy_quietly(public, private)
    return result


def _read_protection(private, result: KeyTypeResult) -> None:
    for field, attribute in (("sensitive", Attribute.SENSITIVE), ("extractable", Attribute.EXTRACTABLE),
                             ("always_sensitive", Attribute.ALWAYS_SENSITIVE),
                             ("never_extractable", Attribute.NEVER_EXTRACTABLE)):
        try:
            setattr(result, field, bool(private[attribute]))
        except pkcs11.PKCS11Error:
            pass  # stays None: the module does not say


def _check_signing(public, private, spec: KeySpec, result: KeyTypeResult) -> None:
    """A CSR signed with the key must verify; then time plain signatures."""
    try:
        request = csr.build_csr(TokenSigner(private, spec), keys.public_key_info(public, spec), PROBE_LABEL)
        if not x509.load_der_x509_csr(request.dump()).is_signature_valid:
            result.reason = "the token's signatures do not verify"
            return
        data = os.urandom(64)
        times = []
        for _ in range(SIGN_ROUNDS):
            start = time.perf_counter()
            sign_x509(private, spec, data)
            times.append((time.perf_counter() - start) * 1000)
    except pkcs11.PKCS11Error as exc:
        result.reason = f"signing failed ({type(exc).__name__})"
        return
    result.sign_ms = round(statistics.median(times), 3)
    result.usable = result.protected
    if not result.usable:
        result.reason = "the private key is not sensitive and non-extractable"


def _mechanisms(token) -> set:
    try:
        return set(token.slot.get_mechanisms())
    except pkcs11.PKCS11Error as exc:
        raise UserError(f"token {token.label!r}: the module cannot list its mechanisms "
                        f"({type(exc).__name__})") from None


def _mechanism_name(mechanism) -> str:
    return mechanism.name if isinstance(mechanism, Mechanism) else f"0x{int(mechanism):08x}"


class _CkTokenInfo(ctypes.Structure):
    # CK_TOKEN_INFO (PKCS#11 2.40 section 3.2), Unix layout (CK_ULONG = unsigned long).
    _fields_ = [("label", ctypes.c_char * 32), ("manufacturerID", ctypes.c_char * 32),
                ("model", ctypes.c_char * 16), ("serialNumber", ctypes.c_char * 16)] + [
        (name, ctypes.c_ulong) for name in (
            "flags", "ulMaxSessionCount", "ulSessionCount", "ulMaxRwSessionCount",
            "ulRwSessionCount", "ulMaxPinLen", "ulMinPinLen", "ulTotalPublicMemory",
            "ulFreePublicMemory", "ulTotalPrivateMemory", "ulFreePrivateMemory")
    ] + [("hardwareVersion", ctypes.c_ubyte * 2), ("firmwareVersion", ctypes.c_ubyte * 2),
         ("utcTime", ctypes.c_char * 16)]


def _session_limits(module_path: str, slot_id: int) -> tuple[int | None, int | None]:
    """(ulMaxSessionCount, ulMaxRwSessionCount); None for "no limit" or "not stated".

    python-pkcs11 does not expose them: asked through the module's exported C_GetTokenInfo
    (the module is already initialised in this process; dlopen returns the same instance).
    """
    try:
        get_info = ctypes.CDLL(module_path).C_GetTokenInfo
    except (OSError, AttributeError):
        return None, None
    get_info.restype = ctypes.c_ulong
    get_info.argtypes = [ctypes.c_ulong, ctypes.POINTER(_CkTokenInfo)]
    info = _CkTokenInfo()
    if get_info(slot_id, ctypes.byref(info)) != 0:
        return None, None
    return _limit(info.ulMaxSessionCount), _limit(info.ulMaxRwSessionCount)


def _limit(value: int) -> int | None:
    return None if value in (_CK_EFFECTIVELY_INFINITE, _CK_UNAVAILABLE_INFORMATION) else value
