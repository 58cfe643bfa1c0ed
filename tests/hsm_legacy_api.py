"""The hsm_setup calls tests/conftest.py makes, on top of `hsm_setup.context`.

Temporary: conftest.py (rewritten elsewhere) still calls `module.load_library` /
`module.configure_softhsm` / `tokens.init_token(lib, module_path, ...)`, which the
context replaced. Tests own their process, so this keeps one `Pkcs11Context` per state
directory for it; delete this file when conftest makes its contexts itself.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

from hsm_setup import module as _module
from hsm_setup import tokens as _tokens
from hsm_setup.context import Pkcs11Context

_contexts: dict[Path, Pkcs11Context] = {}
# module path -> the configuration this shim last initialised it for. conftest writes
# $SOFTHSM2_CONF itself, so the contexts cannot tell from the environment alone.
_initialised_for: dict[str, str] = {}


def _configure_softhsm(home: Path) -> Path:
    conf = _module.softhsm_conf(home)
    os.environ[_module.ENV_SOFTHSM_CONF] = str(conf)
    return conf


def _resolve_module(arg, home):
    # The old resolve_module also pointed $SOFTHSM2_CONF at `home`; conftest relies on it.
    path = _module.resolve_module(arg, home)
    if _module.is_softhsm(path):
        _configure_softhsm(home)
    return path


def _load_library(path: str, *, fresh: bool = False):
    home = Path(os.environ[_module.ENV_SOFTHSM_CONF]).parent
    ctx = _contexts.setdefault(home, Pkcs11Context(home))
    library = ctx.library(path)
    library.lib  # noqa: B018 - initialise (or switch) first
    conf = os.environ[_module.ENV_SOFTHSM_CONF]
    if fresh or _initialised_for.get(path) != conf:
        library.reload()
    _initialised_for[path] = conf
    return library


def _init_token(library, module_path: str, label: str, **kwargs):
    return _tokens.init_token(library, label, **kwargs)


def _session(library, label: str, pin: str):
    # An in-process CLI run may have ended this process's login (a wrong PIN logs out
    # first, see tokens.session): log in afresh on every call.
    library.drop_session(_tokens.find_token(library, label).slot.slot_id)
    return _tokens.session(library, label, pin)


module = types.SimpleNamespace(**{k: getattr(_module, k) for k in dir(_module) if not k.startswith("_")})
module.configure_softhsm = _configure_softhsm
module.load_library = _load_library
module.resolve_module = _resolve_module
tokens = types.SimpleNamespace(**{k: getattr(_tokens, k) for k in dir(_tokens) if not k.startswith("_")})
tokens.init_token = _init_token
tokens.session = _session
