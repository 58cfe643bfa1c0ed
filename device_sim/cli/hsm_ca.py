"""`hsm-setup ca ...`: certificate authorities whose keys live in a token."""

from __future__ import annotations

import sys

from device_sim.cli.hsm_options import emit, json_option, open_module, pin_book, token_options, write_out
from device_sim.cli.options import add_home_argument
from device_sim.common.home import ensure_home
from hsm_setup import ca, certificates, verification
from hsm_setup.interrupts import StopRequest
from hsm_setup.key_types import add_key_argument, key_spec


def cmd_ca_create(args) -> int:
    home, _, lib = open_module(args)
    pins = pin_book(args)
    pin = pins.ca()
    with StopRequest():  # a signal while the CA is half-made waits until it is whole
        record = ca.create_ca(lib, home, args.name, parent=args.parent, spec=key_spec(args.key),
                              days=args.days, token_label=args.token, pin=pin)
    kind = f"intermediate CA under {record.parent!r}" if record.parent else "root CA"
    emit(args, record.as_dict(), f"{kind} {record.name!r} created\n{record.uri}\n"
                                 f"certificate: {record.pem_path}")
    return 0


def cmd_ca_list(args) -> int:
    home = ensure_home(args.home)
    records = ca.list_cas(home)
    text = "\n".join(f"{r.name}\tparent={r.parent or '-'}\t{r.key_type}\t{r.uri}" for r in records)
    emit(args, [r.as_dict() for r in records], text or "(no CAs)")
    return 0


def cmd_ca_show(args) -> int:
    record = ca.load_ca(ensure_home(args.home), args.name)
    data = record.as_dict()
    emit(args, data, "\n".join(f"{k}: {v}" for k, v in data.items()))
    return 0


def cmd_ca_verification_cert(args) -> int:
    home, _, lib = open_module(args)
    pin = pin_book(args).ca()
    issuer = ca.open_issuer(lib, home, args.name, pin)
    cert = verification.issue_verification_certificate(lib, issuer, args.code, pin=pin, days=args.days)
    write_out(args, certificates.to_pem(cert))
    if args.out:
        print(f"verification certificate for {args.name!r} (CN={args.code}) written to {args.out}",
              file=sys.stderr)
    return 0


def add_verbs(group) -> None:
    verbs = group("ca")
    p = verbs.add_parser("create", help="create a root CA, or an intermediate with --parent")
    p.add_argument("name", help="CA name (also its certificate CN and the CKA_LABEL of its key)")
    p.add_argument("--parent", metavar="NAME", help="parent CA (default: a self-signed root)")
    p.add_argument("--token", default=ca.DEFAULT_CA_TOKEN, metavar="LABEL",
                   help=f"token that holds the CA key (default {ca.DEFAULT_CA_TOKEN!r})")
    p.add_argument("--days", type=int, default=ca.DEFAULT_CA_DAYS, help="validity in days")
    add_key_argument(p, help_what="CA key")
    token_options(p, ca_pin=True)
    json_option(p)
    p.set_defaults(func=cmd_ca_create)
    p = verbs.add_parser("list", help="list registered CAs")
    add_home_argument(p)
    json_option(p)
    p.set_defaults(func=cmd_ca_list)
    p = verbs.add_parser("show", help="show one CA")
    p.add_argument("name")
    add_home_argument(p)
    json_option(p)
    p.set_defaults(func=cmd_ca_show)
    p = verbs.add_parser("verification-cert",
                         help="DPS proof-of-possession certificate (CN = CODE, signed by the CA key)")
    p.add_argument("name", help="CA name")
    p.add_argument("--code", required=True, help="verification code shown by DPS")
    p.add_argument("--days", type=int, default=verification.DEFAULT_DAYS, help="validity in days")
    p.add_argument("--out", metavar="FILE", help="write the PEM here (default: stdout)")
    token_options(p, ca_pin=True)
    p.set_defaults(func=cmd_ca_verification_cert)
