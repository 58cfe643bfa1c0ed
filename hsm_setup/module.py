"""Which PKCS#11 module to load, and SoftHSM's configuration inside the state directory.

`--module PATH`, else $PKCS11_MODULE, else SoftHSM found on the system. SoftHSM gets a
configuration file inside the state directory (token files live there too), so a run
never touches the system token store. Loading the module is the context's job
(`hsm_setup.context`); nothing here changes the process environment.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def resolve_module(arg: str | None, home: Path | None = None) -> str:
    """The module path to load: `arg`, else $PKCS11_MODULE, else SoftHSM; UserError if none.

    With `home`, a SoftHSM module also gets its configuration file there (`softhsm_conf`).
    """
    path = arg or os.environ.get(ENV_MODULE) or _find_softhsm()
    if not path:
        raise UserError(
            "no PKCS#11 module: pass --module PATH or set $PKCS11_MODULE "
            "(SoftHSM was not found; install it with: apt-get install softhsm2)"
        )
    if not Path(path).is_file():
        raise UserError(f"PKCS#11 module not found: {path} (check --module / ${ENV_MODULE})")
    if home is not None and is_softhsm(path):
        softhsm_conf(home)
    return str(path)


def softhsm_environment(path: str, home: Path) -> dict[str, str]:
    """The environment a process needs before it initialises module `path` for `home`
    (SoftHSM reads SOFTHSM2_CONF at C_Initialize only); empty for other modules."""
    return {ENV_SOFTHSM_CONF: str(softhsm_conf(home))} if is_softhsm(path) else {}


def is_softhsm(path: str) -> bool:
    return "softhsm" in Path(path).name.lower()


def softhsm_conf(home: Path) -> Path:
    """home/softhsm2.conf, written if missing (with its token directory).

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
    return conf


def _find_softhsm() -> str | None:
    return next((p for p in SOFTHSM_CANDIDATES if Path(p).is_file()), None)
