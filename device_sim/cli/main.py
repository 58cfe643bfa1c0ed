"""`device-sim`: register simulated devices with DPS, inspect chains, run fleets, serve a local DPS."""

from __future__ import annotations

import argparse
import sys

from device_sim.cli import chain, fleet, register, stub
from device_sim.cli.runner import end_program, run_cli

# Each verb group owns its verbs: `add_subparser(subparsers)` sets `func`.
VERB_GROUPS = (register, chain, fleet, stub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="device-sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in VERB_GROUPS:
        group.add_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    code = run_cli("device-sim", build_parser(), argv)
    return end_program(code) if argv is None else code  # the program, not a caller in-process


if __name__ == "__main__":
    sys.exit(main())
