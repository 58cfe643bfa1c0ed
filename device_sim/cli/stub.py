"""`device-sim stub ...`: run the local DPS emulator and manage its CA certificates,
enrollments and registration records through its service API."""

from __future__ import annotations

from device_sim.cli import stub_admin, stub_serve


def add_subparser(subparsers) -> None:
    stub = subparsers.add_parser("stub", help="local DPS emulator: serve it, manage its enrollments",
                                 description=__doc__)
    verbs = stub.add_subparsers(dest="stub_command", required=True, metavar="VERB")
    stub_serve.add_serve(verbs)
    stub_admin.add_admin(verbs)
