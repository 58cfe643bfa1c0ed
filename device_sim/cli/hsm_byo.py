"""`hsm-setup` verbs for tokens and PKIs the tool did not make (docs/byo-pki.md):
`token probe`, `device csr`, `device import-cert`, `device adopt`, `ca sign-csr`.

`add_byo_verbs` registers them into the existing `token`, `device` and `ca` groups.
"""

from __future__ import annotations

import sys

from device_sim.cli.hsm_options import (add_key_argument, ca_library, device_library, emit,
                                        json_option, pin_book, token_options, token_run, write_out)
from hsm_setup import byo, certificates, csr_signing, identities, probe
from hsm_setup.key_types import key_spec


def add_verbs(group) -> None:
    """Add the verbs to the `token`, `device` and `ca` groups (see cli/hsm_setup.py)."""
    _add_probe(group("token"))
    _add_device_verbs(group("device"))
    _add_sign_csr(group("ca"))


# --- token probe ----------------------------------------------------------------

def cmd_token_probe(args) -> int:
    with token_run(args) as (_, ctx):
        lib = device_library(ctx, args)
        label = args.token or probe.default_token_label(lib, identities.DEFAULT_DEVICE_TOKEN)
        report = probe.probe(lib, lib.path, label, pin_book(args).user)
    emit(args, report.as_dict(), _probe_text(report))
    return 0 if report.usable_for_dps else 1  # a gate for scripts: `token probe && fleet create ...`


def _probe_text(report: probe.ProbeReport) -> str:
    lines = [f"module:      {report.module}",
             f"token:       {report.token} (serial {report.serial}, {report.manufacturer} {report.model})",
             f"flags:       {', '.join(report.flags)}",
             f"mechanisms:  {len(report.mechanisms)}",
             f"sessions:    max {_count(report.max_sessions)}, read-write max {_count(report.max_rw_sessions)}"]
    for result in report.key_results:
        if result.usable:
            lines.append(f"  {result.name:9} yes  sign {result.sign_ms} ms, sensitive and non-extractable")
        else:
            lines.append(f"  {result.name:9} no   {result.reason}")
    lines += [f"problem:     {problem}" for problem in report.problems]
    verdict = "usable" if report.usable_for_dps else "NOT usable"
    lines.append(f"verdict:     {verdict} for DPS X.509 attestation"
                 + (f" with --key {', '.join(report.key_types)}" if report.usable_for_dps else ""))
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "not limited (or not stated)" if value is None else str(value)


def _add_probe(verbs) -> None:
    p = verbs.add_parser("probe", help="what a token offers for DPS X.509 attestation (stores nothing)")
    p.add_argument("--token", metavar="LABEL",
                   help=f"token to probe (default: the only token, else {identities.DEFAULT_DEVICE_TOKEN!r})")
    token_options(p)
    json_option(p)
    p.set_defaults(func=cmd_token_probe)


# --- device csr / import-cert / adopt -----------------------------------------------

def cmd_device_csr(args) -> int:
    with token_run(args) as (home, ctx):
        pending, made = byo.request_certificate(device_library(ctx, args), home, args.registration_id,
                                                token_label=args.token, spec=key_spec(args.key),
                                                pin=pin_book(args).user())
    write_out(args, pending.csr_pem())
    state = "key pair made" if made else "pending already (same key, same CSR)"
    where = f", CSR written to {args.out}" if args.out else ""
    print(f"device {pending.registration_id!r}: {state} on token {pending.token_label!r}{where}; "
          f"next: 'hsm-setup device import-cert {pending.registration_id} --cert FILE'", file=sys.stderr)
    return 0


def cmd_device_import_cert(args) -> int:
    with token_run(args) as (home, ctx):
        record = byo.import_certificate(device_library(ctx, args), home, args.registration_id,
                                        cert_file=args.cert, chain_file=args.chain, pin=pin_book(args).user())
    emit(args, record.as_dict(), f"device {record.registration_id!r} complete\n{record.uri}\n"
                                  f"certificate chain: {record.chain_path}")
    return 0


def cmd_device_adopt(args) -> int:
    with token_run(args) as (home, ctx):
        record = byo.adopt(device_library(ctx, args), home, args.uri, chain_file=args.chain,
                           pin=pin_book(args).user())
    emit(args, record.as_dict(), f"device {record.registration_id!r} adopted\n{record.uri}\n"
                                  f"certificate chain: {record.chain_path}")
    return 0


def _add_device_verbs(verbs) -> None:
    p = verbs.add_parser("csr", help="key pair in the token and a CSR for an outside CA (identity pending)")
    p.add_argument("registration_id", help="DPS registration ID = CSR CN = CKA_LABEL")
    p.add_argument("--token", default=identities.DEFAULT_DEVICE_TOKEN, metavar="LABEL",
                   help=f"device token (default {identities.DEFAULT_DEVICE_TOKEN!r})")
    p.add_argument("--out", metavar="FILE", help="write the CSR (PEM) here (default: stdout)")
    add_key_argument(p, help_what="device key")
    token_options(p)
    p.set_defaults(func=cmd_device_csr)

    p = verbs.add_parser("import-cert", help="store the certificate for a pending identity and complete it")
    p.add_argument("registration_id")
    p.add_argument("--cert", required=True, metavar="FILE", help="the device certificate (PEM or DER)")
    p.add_argument("--chain", metavar="FILE",
                   help="its CA certificates (PEM), unless a CA of this state directory issued it")
    token_options(p)
    json_option(p)
    p.set_defaults(func=cmd_device_import_cert)

    p = verbs.add_parser("adopt", help="register a key and certificate another tool put on a token")
    p.add_argument("uri", help="PKCS#11 URI of the key, e.g. 'pkcs11:token=devices;object=dev-1'")
    p.add_argument("--chain", metavar="FILE",
                   help="CA certificates (PEM), unless they are on the token or CAs of this state directory")
    token_options(p)
    json_option(p)
    p.set_defaults(func=cmd_device_adopt)


# --- ca sign-csr -------------------------------------------------------------------

def cmd_ca_sign_csr(args) -> int:
    with token_run(args) as (home, ctx):
        signed = csr_signing.sign_csr(ca_library(ctx, args), home, args.name, args.csr, days=args.days,
                                      pin=pin_book(args).ca())
    for note in signed.notes:
        print(f"hsm-setup: note: {note}", file=sys.stderr)
    write_out(args, certificates.to_pem(signed.certificate))
    if args.out:
        print(f"certificate for {signed.registration_id!r} signed by CA {args.name!r} written to {args.out}",
              file=sys.stderr)
    return 0


def _add_sign_csr(verbs) -> None:
    p = verbs.add_parser("sign-csr", help="sign an outside CSR with the CA key (device leaf profile)")
    p.add_argument("name", help="CA name")
    p.add_argument("--csr", required=True, metavar="FILE", help="PKCS#10 request (PEM or DER)")
    p.add_argument("--days", type=int, default=identities.DEFAULT_DEVICE_DAYS,
                   help=f"validity in days (default {identities.DEFAULT_DEVICE_DAYS}; at most the CA's)")
    p.add_argument("--out", metavar="FILE", help="write the certificate (PEM) here (default: stdout)")
    token_options(p, ca_pin=True, ca_module=True)
    p.set_defaults(func=cmd_ca_sign_csr)
