"""Where PINs come from: a file, an environment variable, or a prompt - never argv.

PINs never appear in process listings (no --pin VALUE option) nor in messages.
"""

from __future__ import annotations

import getpass
import os
import sys
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from device_sim.common.errors import Notice, UserError

ENV_USER_PIN = "PKCS11_PIN"
ENV_SO_PIN = "PKCS11_SO_PIN"


def resolve_pin(pin_file: str | os.PathLike | None, *, env: str = ENV_USER_PIN,
                what: str = "user PIN") -> str:
    """`pin_file` (first line), else $env, else an interactive prompt; no TTY -> UserError."""
    if pin_file:
        return read_pin_file(pin_file, what=what)
    value = os.environ.get(env)
    if value:
        return value
    if not (sys.stdin and sys.stdin.isatty()):
        raise UserError(f"no {what}: pass --{_option_for(env)} FILE or set ${env} (no terminal to prompt on)")
    value = getpass.getpass(f"{what}: ")
    if not value:
        raise UserError(f"empty {what}")
    return value


def read_pin_file(path: str | os.PathLike, *, what: str = "PIN") -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {what} file {path}: {exc.strerror}") from None
    value = text.splitlines()[0] if text else ""
    if not value:
        raise UserError(f"{what} file {path} is empty")
    _warn_if_shared(path, what)
    return value


def _warn_if_shared(path, what: str) -> None:
    """A PIN others can read is a leaked PIN: say so, still use it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o044:
        warnings.warn(f"{what} file {path} is readable by others (mode {mode & 0o777:o}); "
                      f"run `chmod 600 {path}`", Notice, stacklevel=3)


def _option_for(env: str) -> str:
    return "so-pin-file" if env == ENV_SO_PIN else "pin-file"


ENV_CA_PIN = "PKCS11_CA_PIN"


class PinBook:
    """The PINs one command needs, asked for only when first used.

    Device tokens use the user PIN; CA tokens use the CA PIN when one is given
    (--ca-pin-file or $PKCS11_CA_PIN), else the same user PIN.
    """

    def __init__(self, pin_file: str | None = None, ca_pin_file: str | None = None):
        self._pin_file = pin_file
        self._ca_pin_file = ca_pin_file
        self._user: str | None = None
        self._ca: str | None = None

    def user(self) -> str:
        if self._user is None:
            self._user = resolve_pin(self._pin_file, env=ENV_USER_PIN, what="user PIN")
        return self._user

    def ca(self) -> str:
        if self._ca is None:
            if self._ca_pin_file or os.environ.get(ENV_CA_PIN):
                self._ca = resolve_pin(self._ca_pin_file, env=ENV_CA_PIN, what="CA token PIN")
            else:
                self._ca = self.user()
        return self._ca

    def __repr__(self) -> str:  # never show PINs
        return "PinBook(...)"


def pin_from_source(source: str) -> str:
    """An RFC 7512 `pin-source`: a file path or a `file:` URI, read like a PIN file."""
    path = unquote(urlparse(source).path) if source.startswith("file:") else source
    return read_pin_file(os.path.expanduser(path), what="PIN")
