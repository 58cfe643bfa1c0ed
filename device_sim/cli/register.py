"""`device-sim register`: one device, one full DPS registration over mTLS with its token key."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from device_sim.device import chain_builder
from device_sim.device.driver import run_registration
from device_sim.device.identity import load_identity
from device_sim.device.outcome import EXIT_TABLE, as_json, exit_code, human_summary
from device_sim.device.registration import RegistrationFlow
from device_sim.device.transport_https import (DEFAULT_API_VERSION, HttpsTransport, TlsIdentity,
                                               client_tls_context)
from device_sim.common.errors import UserError
from device_sim.cli.options import add_home_argument
from device_sim.common.home import ensure_home

GLOBAL_ENDPOINT = "global.azure-devices-provisioning.net"
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


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how to register (shared by `register` and `fleet run`); see `resolve_target`."""
    parser.add_argument("--emulator", action="store_true",
                        help="use the local emulator of the state directory (endpoint, ID scope and "
                             "--trust from <home>/stub/endpoint.json)")
    parser.add_argument("--transport", choices=("https", "mqtt"), default="https",
                        help="DPS device protocol: https (port 443) or mqtt (MQTT 3.1.1 over TLS, port 8883)")
    parser.add_argument("--endpoint", metavar="HOST[:PORT]|URL",
                        help=f"DPS device endpoint (default {GLOBAL_ENDPOINT})")
    parser.add_argument("--id-scope", metavar="SCOPE", help="the DPS instance's ID scope (0ne...)")
    parser.add_argument("--trust", metavar="FILE",
                        help="CA certificate(s) that sign the server certificate (default: system trust store)")
    parser.add_argument("--api-version", default=DEFAULT_API_VERSION,
                        help=f"device API version (default {DEFAULT_API_VERSION})")
    parser.add_argument("--payload", metavar="JSON", help="custom payload (a JSON object) sent with the registration")


def add_subparser(subparsers) -> None:
    epilog = "exit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_TABLE)
    parser = subparsers.add_parser(
        "register", help="register one device with DPS over mTLS (key stays in the token)",
        description="Run a full DPS registration (register, poll, result) for one device whose "
                    "private key stays inside a PKCS#11 token.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_identity_arguments(parser)
    add_target_arguments(parser)
    parser.add_argument("--registration-id", metavar="ID",
                        help="send this registration ID instead of the certificate's CN (only to see DPS "
                             "refuse a mismatch)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"total deadline in seconds, retries and polls included (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    parser.add_argument("--tls", choices=("awscrt", "openssl"), default="awscrt",
                        help="TLS stack: awscrt (default, TLS 1.2) or OpenSSL through pkcs11-provider "
                             "(TLS 1.2/1.3, HTTPS only; docs/openssl.md)")
    parser.set_defaults(func=cmd_register)


def parse_payload(text: str | None):
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UserError(f"--payload is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(value, dict):
        raise UserError("--payload must be a JSON object ({...}): DPS forwards it as an object")
    return value


def parse_endpoint(text: str) -> tuple[str, int]:
    """`host`, `host:port` or `https://host[:port]` -> (host, port)."""
    parsed = urlparse(text if "://" in text else f"https://{text}")
    if parsed.scheme != "https" or not parsed.hostname:
        raise UserError(f"--endpoint {text!r}: expected HOST[:PORT] or https://HOST[:PORT]")
    try:
        port = parsed.port or 443
    except ValueError:
        raise UserError(f"--endpoint {text!r}: the port is not a number") from None
    return parsed.hostname, port


def emulator_endpoint(home: Path) -> dict:
    path = home / "stub" / "endpoint.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"--emulator: no running emulator found ({path} is missing); start it with "
                        f"'device-sim stub serve --home {home}'") from None


def read_trust(path: str | None) -> bytes | None:
    if path is None:
        return None
    certs = chain_builder.load_pem_file(path)
    return chain_builder.to_pem(certs)


@dataclass(frozen=True)
class Target:
    """The DPS endpoint and request options every device of a run uses."""

    host: str
    port: int
    id_scope: str
    transport: str  # "https" or "mqtt"
    transport_class: type
    trust_file: str | None
    trust_pem: bytes | None
    api_version: str
    payload: dict | None

    def new_transport(self, registration_id: str, tls_context, **kwargs):
        return self.transport_class(self.host, self.port, self.id_scope, registration_id, tls_context,
                                    api_version=self.api_version, **kwargs)


def resolve_target(args, home: Path) -> Target:
    """The options of `add_target_arguments` checked and resolved; UserError when unusable."""
    payload = parse_payload(args.payload)
    endpoint, id_scope, trust_file = args.endpoint, args.id_scope, args.trust
    if args.transport == "mqtt":
        from device_sim.device import transport_mqtt  # helper D's MQTT edge on the same seam

        transport_class, endpoint_parser = transport_mqtt.MqttTransport, transport_mqtt.parse_endpoint
    else:
        transport_class, endpoint_parser = HttpsTransport, parse_endpoint
    if args.emulator:
        ready = emulator_endpoint(home)
        if not endpoint:
            endpoint = transport_mqtt.emulator_url(ready) if args.transport == "mqtt" else ready["device_url"]
        id_scope = id_scope or ready["id_scope"]
        trust_file = trust_file or ready["ca_cert"]
    host, port = endpoint_parser(endpoint or GLOBAL_ENDPOINT)
    if not id_scope:
        raise UserError("no ID scope: pass --id-scope (shown on the DPS instance's overview page) or --emulator")
    return Target(host, port, id_scope, args.transport, transport_class, trust_file, read_trust(trust_file),
                  args.api_version, payload)


def cmd_register(args) -> int:
    if args.timeout <= 0:
        raise UserError("--timeout must be a positive number of seconds")
    home = ensure_home(args.home)
    target = resolve_target(args, home)
    identity = load_identity(args.device, home=home, module=args.module, pin_file=args.pin_file,
                             cert_file=args.cert)
    candidates = chain_builder.gather_candidates(home, files=args.chain_file, extra=identity.ca_certs)
    chain = chain_builder.build_chain(identity.leaf, candidates, args.chain_to)
    registration_id = args.registration_id or identity.registration_id
    if args.tls == "openssl":
        from device_sim.device import transport_openssl

        if target.transport != "https":
            raise UserError("--tls openssl carries DPS over HTTPS only: drop --transport mqtt (docs/openssl.md)")
        transport = transport_openssl.OpensslHttpsTransport(
            target.host, target.port, target.id_scope, registration_id, transport_openssl.client_context(
                identity.module_path, identity.uri, chain_builder.to_pem(chain), identity.pin, target.trust_pem),
            api_version=target.api_version)
    else:
        transport = target.new_transport(registration_id, client_tls_context(TlsIdentity(
            identity.module_path, identity.key_label, chain_builder.to_pem(chain), identity.pin,
            slot_id=identity.slot_id), target.trust_pem))
    outcome, timings = run_registration(RegistrationFlow(registration_id, target.payload), transport, args.timeout)
    if args.json:
        print(json.dumps(as_json(registration_id, outcome, timings, endpoint=f"{target.host}:{target.port}",
                                 transport=target.transport, id_scope=target.id_scope, chain_length=len(chain))))
    else:
        print(human_summary(registration_id, outcome, timings))
    code = exit_code(outcome)
    if code and not args.json:
        print(f"device-sim: {outcome.status}: {outcome.error_message or 'see above'}", file=sys.stderr)
    return code
