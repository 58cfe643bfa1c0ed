"""Which PKCS#11 module to load, and loading it once per process.

`--module PATH`, else $PKCS11_MODULE, else SoftHSM found on the system. SoftHSM is
pointed at a configuration inside the state directory (token files live there too),
so a run never touches the system token store.

python-pkcs11 keeps one initialised library object per path and SoftHSM reads
SOFTHSM2_CONF only in C_Initialize: `load_library` re-initialises the library when
the configuration in the environment changed since the last load (several state
directories in one process, as in tests). Re-initialising closes every open
session of that library in this process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pkcs11

from device_sim.common.errors import UserError

ENV_MODULE = "PKCS11_MODULE"
ENV_SOFTHSM_CONF = "SOFTHSM2_CONF"

SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)

SOFTHSM_CONF_NAME = "softhsm2.conf"
SOFTHSM_TOKEN_DIR = "softhsm/tokens"

# path -> the SOFTHSM2_CONF value the library was initialised with
_initialised_with: dict[str, str | None] = {}
# Bumped on every re-initialisation: session caches keyed on it go stale by themselves.
_generation = 0


def resolve_module(arg: str | None, home: Path) -> str:
    """The module path to load; for SoftHSM also configure it inside `home`."""
    path = arg or os.environ.get(ENV_MODULE) or _find_softhsm()
    if not path:
        raise UserError(
            "no PKCS#11 module: pass --module PATH or set $PKCS11_MODULE "
            "(SoftHSM was not found; install it with: apt-get install softhsm2)"
        )
    if not Path(path).is_file():
        raise UserError(f"PKCS#11 module not found: {path} (check --module / ${ENV_MODULE})")
    if is_softhsm(path):
        configure_softhsm(home)
    return str(path)


def is_softhsm(path: str) -> bool:
    return "softhsm" in Path(path).name.lower()


def configure_softhsm(home: Path) -> Path:
    """Write home/softhsm2.conf (if missing) and point $SOFTHSM2_CONF at it.

    An existing file is kept, so a user (or a test) may tune it, e.g. restrict
    `slots.mechanisms`.
    """
    home = Path(home)
    conf = home / SOFTHSM_CONF_NAME
    tokens = home / SOFTHSM_TOKEN_DIR
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not conf.exists():
        conf.write_text(
            "# SoftHSM configuration written by hsm-setup: tokens live in the state directory.\n"
            f"directories.tokendir = {tokens}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
            "slots.mechanisms = ALL\n"
            "library.reset_on_fork = false\n",
            encoding="utf-8",
        )
    os.environ[ENV_SOFTHSM_CONF] = str(conf)
    return conf


def load_library(path: str, *, fresh: bool = False):
    """The python-pkcs11 `lib` for `path`, initialised for the current configuration.

    `fresh=True` re-initialises it anyway: SoftHSM lists its tokens at C_Initialize,
    so tokens another process created since are only seen after that.
    """
    global _generation
    conf = os.environ.get(ENV_SOFTHSM_CONF)
    try:
        lib = pkcs11.lib(path)
        if path in _initialised_with and (fresh or _initialised_with[path] != conf):
            lib.reinitialize()
            _generation += 1
    except pkcs11.PKCS11Error as exc:
        raise UserError(f"cannot load PKCS#11 module {path}: {_describe(exc)}") from None
    _initialised_with[path] = conf
    return lib


def generation() -> int:
    """Changes whenever a library was re-initialised (all sessions closed)."""
    return _generation


def load(arg: str | None, home: Path):
    """resolve_module + load_library: the usual first step of every command."""
    return load_library(resolve_module(arg, home))


def _find_softhsm() -> str | None:
    return next((p for p in SOFTHSM_CANDIDATES if Path(p).is_file()), None)


def _describe(exc: Exception) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
