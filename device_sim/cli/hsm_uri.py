"""`hsm-setup uri show`: RFC 7512 PKCS#11 URIs, parsed (never printing the PIN)."""

from __future__ import annotations

from device_sim.cli.hsm_options import emit, json_option
from hsm_setup.uri import Pkcs11Uri


def cmd_uri_show(args) -> int:
    uri = Pkcs11Uri.parse(args.uri)
    data = uri.as_dict()
    emit(args, data, str(uri) + "\n" + "\n".join(f"{k}: {v}" for k, v in data.items()))
    return 0


def add_verbs(group) -> None:
    verbs = group("uri")
    p = verbs.add_parser("show", help="parse a PKCS#11 URI and print its parts (never the PIN)")
    p.add_argument("uri")
    json_option(p, cmd_uri_show)
