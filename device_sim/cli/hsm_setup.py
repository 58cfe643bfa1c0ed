"""`hsm-setup`: tokens, key pairs, CAs and device identities inside PKCS#11 tokens.

PINs come from --pin-file / $PKCS11_PIN (CA tokens: --ca-pin-file / $PKCS11_CA_PIN,
else the user PIN), SO PINs from --so-pin-file / $PKCS11_SO_PIN, else a prompt.
"""

from __future__ import annotations

import argparse
import sys

from device_sim.cli import hsm_byo, hsm_ca, hsm_device, hsm_export, hsm_fleet, hsm_token, hsm_uri
from device_sim.cli.runner import run_cli

# Verb groups in help order: name -> one-line help. A verb module asks for its group by
# name (`group("ca")`), so a new module can add verbs to an existing group.
GROUPS = {
    "token": "initialise and list tokens",
    "ca": "certificate authorities whose keys live in a token",
    "device": "device identities: key, CSR and certificate in a token",
    "fleet": "many device identities at once",
    "uri": "RFC 7512 PKCS#11 URIs",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsm-setup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, object] = {}

    def group(name: str):
        if name not in groups:
            help_text = GROUPS[name]
            p = sub.add_parser(name, help=help_text, description=help_text)
            groups[name] = p.add_subparsers(dest=f"{name}_command", required=True, metavar="VERB")
        return groups[name]

    hsm_token.add_verbs(group)
    hsm_ca.add_verbs(group)
    hsm_device.add_verbs(group)
    hsm_byo.add_verbs(group)  # bring-your-own PKI and the token probe (docs/byo-pki.md)
    hsm_export.add_command(sub)
    hsm_fleet.add_verbs(group)
    hsm_uri.add_verbs(group)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli("hsm-setup", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
