"""`hsm-setup ca ...`: certificate authorities whose keys live in a token."""

from __future__ import annotations

import sys

from device_sim.cli.hsm_options import (ca_library, device_library, emit,
                                        emit_list, ERRORS_AS_JSON, json_option, key_holder_options, pin_book,
                                        show_command, token_options, token_run, warn_if_clamped,
                                        write_out)
from device_sim.cli.options import add_home_argument, existing_home
from hsm_setup import ca, certificates, verification
from hsm_setup.interrupts import StopRequest
from hsm_setup.key_types import key_spec


def cmd_ca_create(args) -> int:
    pins = pin_book(args)
    pin = pins.ca()
    with token_run(args) as (home, ctx), StopRequest():  # a signal waits until the CA is whole
        parent_library = ca_library(ctx, args)
        if args.parent:
            warn_if_clamped(ca.open_issuer(parent_library, home, args.parent, pin, what="parent CA"),
                            args.days)
        record = ca.create_ca(device_library(ctx, args), home, args.name, parent=args.parent,
                              spec=key_spec(args.key), days=args.days, token_label=args.token,
                              pin=pin, parent_library=parent_library)
    kind = f"intermediate CA under {record.parent!r}" if record.parent else "root CA"
    emit(args, record.as_dict(), f"{kind} {record.name!r} created\n{record.uri}\n"
                                 f"certificate: {record.pem_path}")
    return 0


def cmd_ca_list(args) -> int:
    emit_list(args, ca.list_cas(existing_home(args.home)),
              lambda r: f"{r.name}\tparent={r.parent or '-'}\t{r.key_type}\t{r.uri}", "(no CAs)")
    return 0


cmd_ca_show = show_command(lambda home, args: ca.load_ca(home, args.name))


def cmd_ca_verification_cert(args) -> int:
    pin = pin_book(args).ca()
    with token_run(args) as (home, ctx):
        issuer = ca.open_issuer(ca_library(ctx, args), home, args.name, pin)
        warn_if_clamped(issuer, args.days)
        cert = verification.issue_verification_certificate(issuer, args.code, days=args.days)
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
    key_holder_options(p, token=ca.DEFAULT_CA_TOKEN, days=ca.DEFAULT_CA_DAYS, what="CA key")
    json_option(p, cmd_ca_create)
    p = verbs.add_parser("list", help="list registered CAs")
    add_home_argument(p)
    json_option(p, cmd_ca_list)
    p = verbs.add_parser("show", help="show one CA")
    p.add_argument("name")
    add_home_argument(p)
    json_option(p, cmd_ca_show)
    p = verbs.add_parser("verification-cert",
                         help="DPS proof-of-possession certificate (CN = CODE, signed by the CA key)")
    p.add_argument("name", help="CA name")
    p.add_argument("--code", required=True, help="verification code shown by DPS")
    p.add_argument("--days", type=int, default=verification.DEFAULT_DAYS, help="validity in days")
    p.add_argument("--out", metavar="FILE", help="write the PEM here (default: stdout)")
    token_options(p, ca_pin=True, ca_module=True)
    json_option(p, cmd_ca_verification_cert, ERRORS_AS_JSON)
