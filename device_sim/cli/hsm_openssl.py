"""`hsm-setup export openssl ID --out DIR`: the device key for standard OpenSSL (docs/openssl.md)."""

from __future__ import annotations

import json

from device_sim.cli.options import add_home_argument
from device_sim.common.home import ensure_home
from hsm_setup.openssl_export import export_openssl
from hsm_setup.pins import resolve_pin


def cmd_export_openssl(args) -> int:
    pin = resolve_pin(args.pin_file) if args.include_pin else None
    done = export_openssl(ensure_home(args.home), args.registration_id, args.out, module=args.module,
                          pin_file=args.pin_file, pin=pin)
    files = {"key": str(done.key_pem), "cert": str(done.cert_pem), "openssl_cnf": str(done.openssl_cnf),
             "env": str(done.env), "uri": done.uri}
    if args.json:
        print(json.dumps(files, indent=2))
    else:
        print(f"wrote {done.directory}: key.pem ({done.uri}), cert.pem, openssl.cnf, env\n"
              f"use: . {done.env} && openssl s_client -cert {done.cert_pem} -cert_chain {done.cert_pem} "
              f"-key {done.key_pem} ...")
    return 0


def add_openssl_export(export_verbs) -> None:
    """Add the `openssl` verb to the subparsers of the `export` group (`add_parser` is all it uses)."""
    p = export_verbs.add_parser(
        "openssl", help="key.pem (PKCS#11 provider URI), cert.pem, openssl.cnf and env for OpenSSL tools",
        description="Write what standard OpenSSL 3 (pkcs11-provider) needs to use the device's token key: "
                    "key.pem naming the key by its PKCS#11 URI, cert.pem (leaf and CA chain), openssl.cnf "
                    "and env (source it). The PIN is referenced (--pin-file) or prompted, never written "
                    "unless --include-pin.")
    p.add_argument("registration_id", metavar="ID", help="the device (registration ID in the registry)")
    p.add_argument("--out", metavar="DIR", required=True, help="directory to write (created if missing)")
    p.add_argument("--module", metavar="PATH", default=None,
                   help="PKCS#11 module (default: $PKCS11_MODULE, else SoftHSM)")
    p.add_argument("--pin-file", metavar="FILE", default=None,
                   help="PIN file pkcs11-provider reads (pkcs11-module-token-pin = file:FILE)")
    p.add_argument("--include-pin", action="store_true",
                   help="write the PIN itself into DIR/env (mode 600) as $PKCS11_PIN, which openssl.cnf reads "
                        "(PIN from --pin-file, $PKCS11_PIN or a prompt)")
    p.add_argument("--json", action="store_true", help="print the written paths as JSON")
    add_home_argument(p)
    p.set_defaults(func=cmd_export_openssl)
