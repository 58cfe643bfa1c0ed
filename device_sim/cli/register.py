"""`device-sim register`: one device, one full DPS registration over mTLS with its token key.

A registration reads as a straight line (docs/device.md): options -> target -> identity
(one call into the token layer) -> chain -> TLS context and transport -> flow -> outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cryptography import x509

from device_sim.cli.options import add_home_argument
from device_sim.cli.register_output import EXIT_TABLE, as_json, exit_code, human_summary, issued_json
from device_sim.common.dps import DEVICE_API_VERSION, ISSUANCE_API_VERSION
from device_sim.common.errors import UserError
from device_sim.common.home import ensure_home
from device_sim.common.x509util import to_pem
from device_sim.device import chain_builder, target as targets
from device_sim.device.driver import run_registration
from device_sim.device.identity import load_identity
from device_sim.device.registration import ASSIGNED, RegistrationFlow
from device_sim.device.transport_https import CrtRuntime, TlsIdentity, client_tls_context
from hsm_setup import issued
from hsm_setup.uri import Pkcs11Uri

DEFAULT_TIMEOUT = 60.0


def add_identity_arguments(parser: argparse.ArgumentParser) -> None:
    """Options naming a device identity and its chain (shared by `register` and `chain`)."""
    parser.add_argument("device", help="PKCS#11 URI of the device key (pkcs11:token=...;object=...) "
                                       "or a registration ID from the state directory")
    add_home_argument(parser)
    parser.add_argument("--module", metavar="PATH", help="PKCS#11 module (default: $PKCS11_MODULE, else SoftHSM)")
    parser.add_argument("--pin-file", metavar="FILE",
                        help="file whose first line is the user PIN (default: the URI's pin-source/pin-value, "
                             "else $PKCS11_PIN)")
    parser.add_argument("--cert", metavar="FILE", help="the device certificate (PEM; more certificates in the "
                                                       "file are used as chain candidates); default: from the token")
    parser.add_argument("--chain-file", metavar="FILE", action="append", default=[],
                        help="PEM file of CA certificates to build the chain from (repeatable)")
    parser.add_argument("--chain-to", metavar="NAME|root|leaf", default=chain_builder.ROOT,
                        help="last certificate to present: a CA name or CN, 'root' (default: the whole "
                             "chain including the root) or 'leaf' (the leaf alone)")


TRANSPORT_HELP = {
    targets.HTTPS: "https (port 443)",
    targets.MQTT: "mqtt (MQTT 3.1.1 over TLS, port 8883)",
    targets.MQTT_WS: "mqtt-ws (MQTT over WebSockets, port 443)",
    targets.AMQP: "amqp (AMQP 1.0 over TLS, port 5671)",
    targets.AMQP_WS: "amqp-ws (AMQP over WebSockets, port 443)",
}


def add_target_arguments(parser: argparse.ArgumentParser,
                         transports: tuple[str, ...] = targets.AWSCRT_TRANSPORTS) -> None:
    """Where and how to register (shared by `register` and `fleet run`); see `resolve_target`.

    `transports`: the choices of --transport; `fleet run` takes the awscrt ones (its devices
    share one awscrt runtime), `register` all of them."""
    parser.add_argument("--emulator", action="store_true",
                        help="use the local emulator of the state directory (endpoint, ID scope and "
                             "--trust from <home>/stub/endpoint.json)")
    parser.add_argument("--transport", choices=transports, default=targets.HTTPS,
                        help="DPS device protocol: " + ", ".join(TRANSPORT_HELP[t] for t in transports)
                             + "; with --emulator the port is the emulator's")
    parser.add_argument("--endpoint", metavar="HOST[:PORT]|URL",
                        help=f"DPS device endpoint (default {targets.GLOBAL_ENDPOINT})")
    parser.add_argument("--id-scope", metavar="SCOPE", help="the DPS instance's ID scope (0ne...)")
    parser.add_argument("--trust", metavar="FILE",
                        help="CA certificate(s) that sign the server certificate (default: system trust store)")
    parser.add_argument("--api-version", default=DEVICE_API_VERSION,
                        help=f"device API version (default {DEVICE_API_VERSION})")
    parser.add_argument("--payload", metavar="JSON", help="custom payload (a JSON object) sent with the registration")


def add_subparser(subparsers) -> None:
    epilog = "exit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_TABLE)
    parser = subparsers.add_parser(
        "register", help="register one device with DPS over mTLS (key stays in the token)",
        description="Run a full DPS registration (register, poll, result) for one device whose "
                    "private key stays inside a PKCS#11 token.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_identity_arguments(parser)
    add_target_arguments(parser, targets.TRANSPORTS)
    parser.add_argument("--registration-id", metavar="ID",
                        help="send this registration ID instead of the certificate's CN (only to see DPS "
                             "refuse a mismatch)")
    parser.add_argument("--allow-invalid-time", action="store_true",
                        help="present an expired or not-yet-valid certificate anyway, to see how DPS answers")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"total deadline in seconds, retries and polls included (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--issue-cert", action="store_true",
                        help="ask DPS for a certificate: a new EC P-384 key pair is made in the device's "
                             "token, its CSR sent (api-version " + ISSUANCE_API_VERSION + ") and the "
                             "issued chain stored beside it as <ID>.issued")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    parser.add_argument("--tls", choices=("awscrt", "openssl"),
                        help="TLS stack: awscrt (TLS 1.2; the default for https, mqtt, mqtt-ws) or OpenSSL "
                             "through pkcs11-provider (TLS 1.2/1.3; https, and always for amqp and amqp-ws; "
                             "docs/openssl.md)")
    parser.set_defaults(func=cmd_register)


def resolve_target(args, home: Path) -> targets.Target:
    """The options of `add_target_arguments` as a `Target`; a UserError names the option at fault."""
    try:
        return targets.resolve_target(
            home, transport=args.transport, emulator=args.emulator, endpoint=args.endpoint,
            id_scope=args.id_scope, trust_file=args.trust, api_version=args.api_version,
            payload=targets.parse_payload(args.payload))
    except targets.TargetError as exc:
        raise UserError(_target_message(exc, args, home)) from None


def _target_message(exc: targets.TargetError, args, home: Path) -> str:
    if exc.about == targets.ENDPOINT:
        suffix = f" with --transport {args.transport}" if args.transport != targets.HTTPS and "expected" in str(exc) else ""
        return f"--endpoint {exc}{suffix}"
    if exc.about == targets.EMULATOR:
        return f"--emulator: {exc}; start it with 'device-sim stub serve --home {home}'"
    if exc.about == targets.EMULATOR_MQTT:
        return (f"--transport mqtt: {exc} (started with --no-mqtt?); "
                "restart 'device-sim stub serve' without --no-mqtt")
    if exc.about == targets.EMULATOR_AMQP:
        return (f"--transport amqp: {exc} (started with --no-amqp?); "
                "restart 'device-sim stub serve' without --no-amqp, or use --transport amqp-ws")
    if exc.about == targets.ID_SCOPE:
        return f"{exc}: pass --id-scope (shown on the DPS instance's overview page) or --emulator"
    if exc.about == targets.PAYLOAD:
        return f"--payload {exc}"
    return str(exc)


def _device_token_session(identity):
    """The identity's own logged-in session: the run logs in to the token once."""
    library = identity.context.library(identity.module_path)
    return issued.token_session(library, identity.token_label, identity.pin)


def _issuance_key(identity, registration_id: str):
    session = _device_token_session(identity)
    return issued.new_issuance_key(session, registration_id)


def _keep_issued(identity, new_key, outcome) -> dict | None:
    """Store an issued chain beside the new key (None when none came: the key is removed)."""
    chain = outcome.issued_chain
    if outcome.status != ASSIGNED or not chain:
        issued.discard(new_key)
        return None
    session = _device_token_session(identity)
    issued.store_issued_chain(session, new_key, chain)
    uri = str(Pkcs11Uri(token=identity.token_label, object=new_key.label, id=new_key.key_id, type="private"))
    return issued_json(x509.load_der_x509_certificate(chain[0]), uri, len(chain))


def tls_stack(args) -> str:
    """awscrt or openssl: the one --tls asked for, else the transport's own; a one-line
    error for a pair that cannot work (checked before the token is opened)."""
    if args.transport in targets.OPENSSL_TRANSPORTS:
        if args.tls == "awscrt":
            raise UserError(f"--transport {args.transport} runs over OpenSSL (awscrt offers no raw TLS "
                            "stream for AMQP): drop --tls awscrt (docs/device.md)")
        return "openssl"
    if args.tls == "openssl" and args.transport != targets.HTTPS:
        raise UserError(f"--tls openssl carries DPS over HTTPS and AMQP only: drop --transport {args.transport} "
                        "or --tls openssl (docs/openssl.md)")
    return args.tls or "awscrt"


def _transport(args, target, identity, chain, registration_id: str):
    """The device transport over its TLS stack (`tls_stack`)."""
    if tls_stack(args) == "openssl":
        from device_sim.device import transport_openssl

        context = transport_openssl.client_context(identity.module_path, identity.uri, to_pem(chain),
                                                   identity.pin, target.trust_pem)
        if target.transport in targets.OPENSSL_TRANSPORTS:
            return target.new_transport(registration_id, context, None)
        return transport_openssl.OpensslHttpsTransport(target.host, target.port, target.id_scope,
                                                       registration_id, context, api_version=target.api_version)
    runtime = CrtRuntime()
    tls_context = client_tls_context(TlsIdentity(
        identity.module_path, identity.key_label, to_pem(chain), identity.pin,
        slot_id=identity.slot_id), target.trust_pem, runtime)
    return target.new_transport(registration_id, tls_context, runtime)


def cmd_register(args) -> int:
    started = time.monotonic()
    if args.timeout <= 0:
        raise UserError("--timeout must be a positive number of seconds")
    home = ensure_home(args.home)
    if args.issue_cert and args.api_version == DEVICE_API_VERSION:
        args.api_version = ISSUANCE_API_VERSION  # the version that knows csr
    target = resolve_target(args, home)
    tls_stack(args)
    identity = load_identity(args.device, home=home, module=args.module, pin_file=args.pin_file,
                             cert_file=args.cert, check_validity=not args.allow_invalid_time)
    candidates = chain_builder.gather_candidates(home, files=args.chain_file, extra=identity.ca_certs)
    chain = chain_builder.build_chain(identity.leaf, candidates, args.chain_to)
    registration_id = args.registration_id or identity.registration_id
    transport = _transport(args, target, identity, chain, registration_id)
    # --timeout counts from the start of the command: token and TLS setup are part of it.
    new_key = _issuance_key(identity, registration_id) if args.issue_cert else None
    csr = issued.issuance_csr(new_key) if new_key else None
    budget = max(0.001, args.timeout - (time.monotonic() - started))
    outcome, timings = run_registration(RegistrationFlow(registration_id, target.payload, csr=csr),
                                        transport, budget)
    extra = {}
    if new_key is not None:
        extra["issued_certificate"] = _keep_issued(identity, new_key, outcome)
    if args.json:
        print(json.dumps(as_json(registration_id, outcome, timings, endpoint=target.endpoint,
                                 transport=target.transport, id_scope=target.id_scope, chain_length=len(chain),
                                 **extra)))
    else:
        print(human_summary(registration_id, outcome, timings, **extra))
    code = exit_code(outcome)
    if code and not args.json:
        print(f"device-sim: {outcome.status}: {outcome.error_message or 'see above'}", file=sys.stderr)
    return code
