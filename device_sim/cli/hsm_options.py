"""What the `hsm-setup` verb groups share: token options, PIN sources, output helpers."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from device_sim.cli.options import add_home_argument, existing_home
from device_sim.common.errors import UserError
from device_sim.common.home import ensure_home
from hsm_setup import devices
from hsm_setup.ca import Issuer, UnknownCa
from hsm_setup.context import Pkcs11Context, Pkcs11Library
from hsm_setup.key_types import DEFAULT_KEY_TYPE, KEY_TYPES
from hsm_setup.pins import PinBook


def token_options(parser: argparse.ArgumentParser, *, ca_pin: bool = False, so_pin: bool = False,
                  ca_module: bool = False) -> None:
    add_home_argument(parser)
    parser.add_argument("--module", metavar="PATH", default=None,
                        help="PKCS#11 module (default: $PKCS11_MODULE, else SoftHSM)")
    if ca_module:
        parser.add_argument("--ca-module", metavar="PATH", default=None,
                            help="PKCS#11 module of the CA token, when it is not --module's")
    parser.add_argument("--pin-file", metavar="FILE", default=None,
                        help="file whose first line is the user PIN (default: $PKCS11_PIN, else prompt)")
    if ca_pin:
        parser.add_argument("--ca-pin-file", metavar="FILE", default=None,
                            help="user PIN of the CA token (default: $PKCS11_CA_PIN, else the user PIN)")
    if so_pin:
        parser.add_argument("--so-pin-file", metavar="FILE", default=None,
                            help="security-officer PIN for new tokens (default: $PKCS11_SO_PIN, else prompt)")


ERRORS_AS_JSON = "on failure also print a JSON error object on stdout (the PEM output is unchanged)"


def json_option(parser: argparse.ArgumentParser, func=None, help_text: str = "print machine-readable JSON") -> None:
    """--json, and the verb's function when given (the last step of most verbs' setup)."""
    parser.add_argument("--json", action="store_true", help=help_text)
    if func is not None:
        parser.set_defaults(func=func)


@contextlib.contextmanager
def token_run(args):
    """(home, the run's Pkcs11Context): one context per command, closed at the end; a
    PKCS#11 error that escapes becomes one line (see hsm_setup.context)."""
    home = ensure_home(args.home)
    with Pkcs11Context(home) as ctx, _explain_device_names(home):
        yield home, ctx


def device_library(ctx: Pkcs11Context, args) -> Pkcs11Library:
    return ctx.library(args.module)


def ca_library(ctx: Pkcs11Context, args) -> Pkcs11Library:
    """The CA token's module: --ca-module, else the device module."""
    return ctx.library(getattr(args, "ca_module", None) or args.module)


@contextlib.contextmanager
def _explain_device_names(home: Path):
    # A common mistake: naming a device identity where a CA is expected.
    try:
        yield
    except UnknownCa as exc:
        if devices.find_device(home, exc.name) is not None:
            raise UserError(f"{exc.what} {exc.name!r} is a device identity, not a CA "
                            "(see 'hsm-setup ca list')") from None
        raise


def warn_if_clamped(issuer: Issuer, days: int) -> None:
    """Certificates end with their issuer's: say so when --days asked for more."""
    if issuer.clamped(days):
        print(f"hsm-setup: warning: --days {days} ends after CA {issuer.record.name!r} "
              f"(valid until {issuer.record.not_after:%Y-%m-%d %H:%M:%SZ}): the certificate "
              "ends with the CA", file=sys.stderr)


def pin_book(args) -> PinBook:
    return PinBook(args.pin_file, getattr(args, "ca_pin_file", None))


def emit(args, data, text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


def emit_list(args, records, line, empty: str) -> None:
    """One line per record (or JSON of them all)."""
    emit(args, [r.as_dict() for r in records], "\n".join(line(r) for r in records) or empty)


def emit_fields(args, data: dict) -> None:
    """`key: value` lines (or the JSON object)."""
    emit(args, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


def show_command(load):
    """A `show` verb: `load(home, args)` -> a record with as_dict(), printed as fields."""
    def cmd(args) -> int:
        emit_fields(args, load(existing_home(args.home), args).as_dict())
        return 0
    return cmd


def write_out(args, data: bytes) -> None:
    if args.out:
        Path(args.out).write_bytes(data)
    else:
        sys.stdout.write(data.decode("ascii"))


def lazy(fn):
    """fn() on first call, the same value afterwards (a PIN asked for only if needed)."""
    cache = []

    def get():
        if not cache:
            cache.append(fn())
        return cache[0]
    return get


def add_key_argument(parser, *, help_what: str = "key") -> None:
    parser.add_argument("--key", default=DEFAULT_KEY_TYPE, choices=sorted(KEY_TYPES),
                        metavar="TYPE",
                        help=f"{help_what} type: {', '.join(KEY_TYPES)} (default {DEFAULT_KEY_TYPE})")


def key_holder_options(parser: argparse.ArgumentParser, *, token: str, days: int, what: str) -> None:
    """What every verb that makes a key and a certificate in a token takes: the token, the
    validity, the key type, and the token options with the CA token's PIN and module."""
    parser.add_argument("--token", default=token, metavar="LABEL",
                        help=f"token that holds the {what} (default {token!r})")
    parser.add_argument("--days", type=int, default=days, help="validity in days")
    add_key_argument(parser, help_what=what)
    token_options(parser, ca_pin=True, ca_module=True)
