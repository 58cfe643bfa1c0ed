"""`device-sim chain show|lint`: the chain a device would present, and whether DPS would accept it."""

from __future__ import annotations

import argparse
import json

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from device_sim.cli.register import add_identity_arguments
from device_sim.common.errors import EXIT_LINT_FAILED, EXIT_USAGE
from device_sim.common.home import ensure_home
from device_sim.common.x509util import (describe, is_self_signed, load_certificate_file, sha1_thumbprint,
                                        sha256_thumbprint)
from device_sim.device import chain_builder, chain_lint
from device_sim.device.identity import load_identity


def add_subparser(subparsers) -> None:
    parser = subparsers.add_parser("chain", help="show or lint the certificate chain a device presents",
                                   description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    show = verbs.add_parser("show", help="print the chain leaf first: subject, issuer, fingerprints, "
                                         "validity, key type")
    add_identity_arguments(show)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_show)
    lint = verbs.add_parser(
        "lint", help="check the chain against DPS rules",
        description="Check the chain against DPS rules: links verify, order, duplicates, CA flags and key "
                    "usages, CN rules, validity, and (with --verified) that it reaches the verified CA. "
                    f"Exit {EXIT_LINT_FAILED} when DPS would refuse the device, {EXIT_USAGE} on usage errors.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_identity_arguments(lint)
    lint.add_argument("--verified", metavar="CA_FILE", action="append", default=[],
                      help="certificate of the CA verified in DPS (repeatable)")
    lint.add_argument("--no-key-check", action="store_true",
                      help="do not log into the token to check the key (lint the certificates only)")
    lint.add_argument("--json", action="store_true", help="print JSON")
    lint.set_defaults(func=cmd_lint)


def device_chain(args, *, check: bool):
    home = ensure_home(args.home)
    # Without the key check only public objects are read: no PIN is asked for.
    identity = load_identity(args.device, home=home, module=args.module, pin_file=args.pin_file,
                             cert_file=args.cert, check=check, login=check)
    candidates = chain_builder.gather_candidates(home, files=args.chain_file, extra=identity.ca_certs)
    return identity, chain_builder.build_chain(identity.leaf, candidates, args.chain_to)


def key_description(cert) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


def cert_info(cert) -> dict:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sha256": sha256_thumbprint(cert).lower(),
        "sha1": sha1_thumbprint(cert).lower(),  # IoT Hub shows SHA-1 thumbprints
        "not_before": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "key": key_description(cert),
        "self_signed": is_self_signed(cert),
    }


def cmd_show(args) -> int:
    identity, chain = device_chain(args, check=False)
    infos = [cert_info(c) for c in chain]
    if args.json:
        print(json.dumps({"registration_id": identity.registration_id, "uri": identity.uri, "chain": infos}))
        return 0
    print(f"chain of {identity.registration_id} ({identity.uri}), leaf first:")
    for depth, info in enumerate(infos):
        print(f"[{depth}] subject  {info['subject']}")
        print(f"    issuer   {info['issuer']}")
        print(f"    sha256   {info['sha256']}")
        print(f"    sha1     {info['sha1']}")
        print(f"    valid    {info['not_before']} .. {info['not_after']}")
        print(f"    key      {info['key']}{'  (self-signed)' if info['self_signed'] else ''}")
    return 0


def cmd_lint(args) -> int:
    verified = [c for path in args.verified for c in load_certificate_file(path)]
    identity, chain = device_chain(args, check=not args.no_key_check)
    findings = chain_lint.lint_chain(chain, verified=verified)
    failed = chain_lint.has_errors(findings)
    if args.json:
        print(json.dumps({"registration_id": identity.registration_id, "ok": not failed,
                          "chain": [describe(c) for c in chain],
                          "findings": [f.as_dict() for f in findings]}))
    else:
        print(f"chain of {identity.registration_id}: " + " -> ".join(describe(c) for c in chain))
        for finding in findings:
            print(f"{finding.level:7} {finding.rule:10} {finding.message}")
        print("DPS would refuse this device" if failed else "ok: nothing in the chain makes DPS refuse the device")
    return EXIT_LINT_FAILED if failed else 0
