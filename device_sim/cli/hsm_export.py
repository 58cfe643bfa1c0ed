"""`hsm-setup export`: PEM of a certificate, its chain, or the CA bundle (registry only)."""

from __future__ import annotations

from device_sim.cli.hsm_openssl import add_openssl_export
from device_sim.cli.hsm_options import ERRORS_AS_JSON, json_option, write_out
from device_sim.cli.options import add_home_argument, existing_home
from device_sim.common.errors import UserError
from hsm_setup import ca, certificates, devices


def cmd_export(args) -> int:
    home = existing_home(args.home)
    if args.what == "bundle":
        records = ca.list_cas(home)
        if args.ca:
            records = ca.chain_of(home, ca.load_ca(home, args.ca))
        if args.roots_only:
            records = [r for r in records if r.is_root]
        if not records:
            raise UserError("no CA certificates to export: create one with 'hsm-setup ca create'")
        write_out(args, certificates.to_pem(*(r.certificate for r in records)))
        return 0
    if bool(args.device) == bool(args.ca):
        raise UserError(f"export {args.what}: name exactly one of --device ID or --ca NAME")
    if args.device:
        record = devices.lookup_device(home, args.device)
        chain = [record.certificate, *record.chain]
    else:
        chain = [r.certificate for r in ca.chain_of(home, ca.load_ca(home, args.ca))]
    if args.what == "cert":
        chain = chain[:1]
    elif args.no_root and len(chain) > 1:
        chain = chain[:-1]
    write_out(args, certificates.to_pem(*chain))
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("export", help="PEM of a certificate, its chain, or the CA bundle; the key for OpenSSL",
                       description="cert: one certificate; chain: it and its issuers up to the "
                                   "root; bundle: CA certificates (all, or one CA's chain); "
                                   "openssl: the device key for OpenSSL tools (docs/openssl.md)")
    verbs = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    for what in ("cert", "chain", "bundle"):
        v = verbs.add_parser(what)
        v.add_argument("--device", metavar="ID", help="a device's certificate")
        v.add_argument("--ca", metavar="NAME", help="a CA's certificate (bundle: that CA's chain)")
        v.add_argument("--no-root", action="store_true", help="chain: leave the root out")
        v.add_argument("--roots-only", action="store_true", help="bundle: only root certificates")
        v.add_argument("--out", metavar="FILE", help="write here (default: stdout)")
        add_home_argument(v)
        json_option(v, cmd_export, ERRORS_AS_JSON)
    add_openssl_export(verbs)
