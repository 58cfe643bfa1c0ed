"""`device-sim`: register simulated devices with DPS, inspect chains, run fleets, serve a local DPS."""

from __future__ import annotations

import argparse
import importlib
import sys

from hsm_setup.errors import run_cli

# Each area owns its verbs: a module with `add_subparser(subparsers)` that sets `func`.
COMMAND_MODULES = (
    "device_sim.register_cli",   # device-sim register
    "device_sim.chain_cli",      # device-sim chain show|lint
    "device_sim.fleet_cli",      # device-sim fleet run
    "device_sim.stub.cli",       # device-sim stub serve|...
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="device-sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # area not built yet
        module.add_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli("device-sim", build_parser(), argv)

if __name__ == "__main__":
    sys.exit(main())
