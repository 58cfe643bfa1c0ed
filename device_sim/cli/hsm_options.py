"""What the `hsm-setup` verb groups share: token options, PIN sources, output helpers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from device_sim.cli.options import add_home_argument
from device_sim.common.home import ensure_home
from hsm_setup import module
from hsm_setup.pins import PinBook


def token_options(parser: argparse.ArgumentParser, *, ca_pin: bool = False, so_pin: bool = False) -> None:
    add_home_argument(parser)
    parser.add_argument("--module", metavar="PATH", default=None,
                        help="PKCS#11 module (default: $PKCS11_MODULE, else SoftHSM)")
    parser.add_argument("--pin-file", metavar="FILE", default=None,
                        help="file whose first line is the user PIN (default: $PKCS11_PIN, else prompt)")
    if ca_pin:
        parser.add_argument("--ca-pin-file", metavar="FILE", default=None,
                            help="user PIN of the CA token (default: $PKCS11_CA_PIN, else the user PIN)")
    if so_pin:
        parser.add_argument("--so-pin-file", metavar="FILE", default=None,
                            help="security-officer PIN for new tokens (default: $PKCS11_SO_PIN, else prompt)")


def json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def open_module(args) -> tuple[Path, str, object]:
    home = ensure_home(args.home)
    path = module.resolve_module(args.module, home)
    return home, path, module.load_library(path)


def pin_book(args) -> PinBook:
    return PinBook(args.pin_file, getattr(args, "ca_pin_file", None))


def emit(args, data, text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


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
