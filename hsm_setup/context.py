"""The PKCS#11 state of one run: loaded libraries, their initialisation, slots and sessions.

One `Pkcs11Context` per process run, made by the CLI (or the fleet worker, or a test)
and passed down; hsm_setup keeps no other state. It holds one `Pkcs11Library` per module
path (a CA token and a device token may live in different modules, docs/hsm-setup.md).

Each library owns:
- its initialisation: python-pkcs11 keeps one initialised library per path in the
  process, and SoftHSM reads $SOFTHSM2_CONF only in C_Initialize. So the context sets
  $SOFTHSM2_CONF to its state directory's configuration and re-initialises the library
  when the variable pointed elsewhere (several state directories in one process, as in
  tests). Re-initialising closes every session of that library in the process;
  `generation` counts them, so cached slots and sessions of an older one are dropped;
- the token label -> slot index (one C_GetTokenInfo per slot, once per generation);
- the session cache: PKCS#11 login state belongs to the application, not the session
  (closing one logged-in session logs every session of that token out), so one
  logged-in session per token is kept and borrowed, and a refused PIN is remembered so
  the token never sees the same wrong PIN twice in one run.

Leaving the context (`with Pkcs11Context(home) as ctx:`) turns a PKCS#11 error that
escaped into a one-line UserError naming its CKR value.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import pkcs11

from device_sim.common.errors import UserError
from hsm_setup import module
from hsm_setup.failures import as_user_error


# python-pkcs11 keeps one initialised library per module path for the whole process, so
# which configuration that C_Initialize read is a fact about the process, not about one
# run: every context of the process (tests use several state directories) consults it.
_initialised_with: dict[str, dict[str, str]] = {}


class Pkcs11Library:
    """One PKCS#11 module as this run uses it (see the module docstring)."""

    def __init__(self, path: str, home: Path, softhsm_conf: Path | None = None):
        self.path = path
        self.home = Path(home)
        self._environment = module.softhsm_environment(path, self.home)
        if softhsm_conf is not None and self._environment:  # a view of some tokens (fleet/token_views.py)
            self._environment = {module.ENV_SOFTHSM_CONF: str(softhsm_conf)}
        self._lib = None
        self.generation = 0
        self._slots: dict[str, object] | None = None
        self._sessions: dict[int, tuple[object, bytes]] = {}  # slot id -> (session, PIN digest)
        self._refused: dict[int, tuple[bytes, str]] = {}      # slot id -> (PIN digest, message)
        self._public: dict[int, object] = {}                  # slot id -> session without login
        self._salt = secrets.token_bytes(16)

    @property
    def lib(self):
        """The python-pkcs11 library, initialised for this run's configuration."""
        first = self._lib is None
        switched = bool(self._environment) and _initialised_with.get(self.path) != self._environment
        if first or switched or any(os.environ.get(k) != v for k, v in self._environment.items()):
            os.environ.update(self._environment)
            already = self.path in getattr(pkcs11, "_loaded", {})  # python-pkcs11's per-path cache
            try:
                lib = pkcs11.lib(self.path)
                # Initialised in this process for another state directory (another
                # context, a test): SoftHSM must read ours now.
                if already and switched:
                    lib.reinitialize()
            except pkcs11.PKCS11Error as exc:
                raise UserError(f"cannot load PKCS#11 module {self.path}: "
                                f"{str(exc).strip() or type(exc).__name__}") from None
            _initialised_with[self.path] = dict(self._environment)
            self._lib = lib
            if not first and switched:
                self._new_generation()
        return self._lib

    def reload(self) -> None:
        """Re-initialise now: SoftHSM lists its tokens at C_Initialize, so tokens another
        process created (or that this one just initialised) are only seen after that."""
        lib = self.lib
        try:
            lib.reinitialize()
        except pkcs11.PKCS11Error as exc:
            raise as_user_error(exc, doing=f"re-initialising {self.path}") from None
        _initialised_with[self.path] = dict(self._environment)
        self._new_generation()

    def _new_generation(self) -> None:
        self.generation += 1
        self._slots = None
        self._sessions.clear()
        self._public.clear()

    # --- slot index -------------------------------------------------------------

    def slot_index(self) -> dict[str, object]:
        """Token label -> slot, built with one C_GetTokenInfo per slot once per generation,
        so a run touching a thousand shard tokens does not scan every slot per lookup.
        Within a generation the slot list only gains the tokens this run initialises
        (`tokens.init_token` adds them)."""
        lib = self.lib
        if self._slots is None:
            self._slots = {}
            for slot in lib.get_slots(token_present=True):
                token = slot.get_token()
                if token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
                    self._slots.setdefault(token.label, slot)
        return self._slots

    def forget_slots(self) -> None:
        self._slots = None

    # --- session cache ----------------------------------------------------------

    def digest(self, pin: str) -> bytes:
        """A salted digest, so the cache compares PINs without keeping refused ones."""
        return hashlib.sha256(self._salt + pin.encode("utf-8")).digest()

    def cached_session(self, slot_id: int, pin: str):
        """The logged-in session of `slot_id` if it logged in with `pin`; raises the first
        refusal again, without a new C_Login, when `pin` was refused before."""
        refused = self._refused.get(slot_id)
        digest = self.digest(pin)
        if refused is not None and secrets.compare_digest(refused[0], digest):
            raise UserError(refused[1])
        cached = self._sessions.get(slot_id)
        if cached is not None and secrets.compare_digest(cached[1], digest):
            return cached[0]
        return None

    def keep_session(self, slot_id: int, session, pin: str):
        old = self._sessions.pop(slot_id, None)
        if old is not None and old[0] is not session:
            _close_quietly(old[0])
        self._sessions[slot_id] = (session, self.digest(pin))
        return session

    def drop_session(self, slot_id: int) -> None:
        """Close (and so log out) the cached session of `slot_id`, e.g. before another PIN."""
        old = self._sessions.pop(slot_id, None)
        if old is not None:
            _close_quietly(old[0])

    def refuse(self, slot_id: int, pin: str, message: str) -> UserError:
        self._refused[slot_id] = (self.digest(pin), message)
        return UserError(message)

    def public_session(self, slot_id: int):
        return self._public.get(slot_id)

    def keep_public_session(self, slot_id: int, session):
        self._public[slot_id] = session
        return session

    def close(self) -> None:
        """Close the public sessions; leave the logged-in ones to the process's end.

        Closing a logged-in session logs the token out for every session of this process
        (login state is per application), other contexts' and awscrt's included."""
        for session in self._public.values():
            _close_quietly(session)
        self._sessions.clear()
        self._public.clear()


class Pkcs11Context:
    """Everything PKCS#11 one run holds; see the module docstring."""

    def __init__(self, home: Path, *, softhsm_conf: Path | None = None):
        """`softhsm_conf`: another SoftHSM configuration than the state directory's (a view
        of some of its tokens, device_sim/fleet/token_views.py)."""
        self.home = Path(home)
        self.softhsm_conf = softhsm_conf
        self._libraries: dict[str, Pkcs11Library] = {}

    def library(self, path: str | None = None) -> Pkcs11Library:
        """The library for module `path` (None: $PKCS11_MODULE, else SoftHSM)."""
        path = module.resolve_module(path, self.home)
        if path not in self._libraries:
            self._libraries[path] = Pkcs11Library(path, self.home, self.softhsm_conf)
        return self._libraries[path]

    def close(self) -> None:
        for library in self._libraries.values():
            library.close()

    def __enter__(self) -> "Pkcs11Context":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        if isinstance(exc, pkcs11.PKCS11Error):
            raise as_user_error(exc) from None
        return False


def _close_quietly(session) -> None:
    try:
        session.close()
    except pkcs11.PKCS11Error:
        pass  # stale after a re-initialisation: nothing left to close
