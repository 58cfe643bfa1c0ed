"""`hsm-setup`: tokens, key pairs, CAs and device identities inside PKCS#11 tokens."""

from __future__ import annotations

import argparse
import sys

from hsm_setup.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsm-setup", description=__doc__)
    parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as exc:
        print(f"hsm-setup: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hsm-setup: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
