"""`hsm-setup`: tokens, key pairs, CAs and device identities inside PKCS#11 tokens.

PINs come from --pin-file / $PKCS11_PIN (CA tokens: --ca-pin-file / $PKCS11_CA_PIN,
else the user PIN), SO PINs from --so-pin-file / $PKCS11_SO_PIN, else a prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hsm_setup import ca, certificates, devices, fleet, identities, module, tokens, verification
from device_sim.cli.runner import run_cli
from device_sim.common.errors import UserError
from device_sim.cli.durations import human_duration
from device_sim.cli.options import add_home_argument, existing_home
from device_sim.common.home import ensure_home
from hsm_setup.interrupts import StopRequest
from hsm_setup.key_types import add_key_argument, key_spec
from hsm_setup.pins import ENV_SO_PIN, PinBook, resolve_pin
from hsm_setup.uri import Pkcs11Uri


# --- shared options -------------------------------------------------------------

def _token_options(parser: argparse.ArgumentParser, *, ca_pin: bool = False, so_pin: bool = False) -> None:
    add_home_argument(parser)
    parser.add_argument("--module", metavar="PATH", default=None,
                        help="PKCS#11 module (default: $PKCS11_MODULE, else SoftHSM)")
    parser.add_argument("--pin-file", metavar="FILE", default=None,
                        help="file whose first line is the user PIN (default: $PKCS11_PIN, else prompt)")
    if ca_pin:
        parser.add_argument("--ca-pin-file", metavar="FILE", default=None,
                            help="user PIN of the CA token (default: $PKCS11_CA_PIN, else the user PIN)")
    if so_pin:
        parser.add_argument("--so-pin-file", metavar="FILE", default=None,
                            help="security-officer PIN for new tokens (default: $PKCS11_SO_PIN, else prompt)")


def _json_option(parser: argparse.ArgumentParser, help_text: str = "print machine-readable JSON") -> None:
    parser.add_argument("--json", action="store_true", help=help_text)


_ERRORS_AS_JSON = "on failure also print a JSON error object on stdout (the PEM output is unchanged)"


def _open(args) -> tuple[Path, str, object]:
    home = ensure_home(args.home)
    path = module.resolve_module(args.module, home)
    return home, path, module.load_library(path)


def _pins(args) -> PinBook:
    return PinBook(args.pin_file, getattr(args, "ca_pin_file", None))


def _emit(args, data, text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


def _write_out(args, data: bytes) -> None:
    if args.out:
        Path(args.out).write_bytes(data)
    else:
        sys.stdout.write(data.decode("ascii"))


# --- token ----------------------------------------------------------------------

def cmd_token_init(args) -> int:
    home, path, lib = _open(args)
    so_pin = resolve_pin(args.so_pin_file, env=ENV_SO_PIN, what="SO PIN")
    user_pin = _pins(args).user()
    info = tokens.init_token(lib, path, args.label, so_pin=so_pin, user_pin=user_pin)
    _emit(args, info.as_dict(), f"token {info.label!r} initialised (serial {info.serial}, slot {info.slot_id})")
    return 0


def cmd_token_list(args) -> int:
    _, _, lib = _open(args)
    infos = tokens.list_tokens(lib)
    text = "\n".join(f"{i.label}\tserial={i.serial}\tslot={i.slot_id}\t{i.model}" for i in infos)
    _emit(args, [i.as_dict() for i in infos], text or "(no initialised tokens)")
    return 0


# --- ca -------------------------------------------------------------------------

def cmd_ca_create(args) -> int:
    home, _, lib = _open(args)
    pins = _pins(args)
    pin = pins.ca()
    with StopRequest():  # a signal while the CA is half-made waits until it is whole
        record = ca.create_ca(lib, home, args.name, parent=args.parent, spec=key_spec(args.key),
                              days=args.days, token_label=args.token, pin=pin)
    kind = f"intermediate CA under {record.parent!r}" if record.parent else "root CA"
    _emit(args, record.as_dict(), f"{kind} {record.name!r} created\n{record.uri}\n"
                                  f"certificate: {record.pem_path}")
    return 0


def cmd_ca_list(args) -> int:
    home = existing_home(args.home)
    records = ca.list_cas(home)
    text = "\n".join(f"{r.name}\tparent={r.parent or '-'}\t{r.key_type}\t{r.uri}" for r in records)
    _emit(args, [r.as_dict() for r in records], text or "(no CAs)")
    return 0


def cmd_ca_show(args) -> int:
    record = ca.load_ca(existing_home(args.home), args.name)
    data = record.as_dict()
    _emit(args, data, "\n".join(f"{k}: {v}" for k, v in data.items()))
    return 0


def cmd_ca_verification_cert(args) -> int:
    home, _, lib = _open(args)
    pin = _pins(args).ca()
    issuer = ca.open_issuer(lib, home, args.name, pin)
    cert = verification.issue_verification_certificate(lib, issuer, args.code, pin=pin, days=args.days)
    _write_out(args, certificates.to_pem(cert))
    if args.out:
        print(f"verification certificate for {args.name!r} (CN={args.code}) written to {args.out}",
              file=sys.stderr)
    return 0


# --- device ---------------------------------------------------------------------

def cmd_device_create(args) -> int:
    home, _, lib = _open(args)
    pins = _pins(args)
    issuer = ca.open_issuer(lib, home, args.ca, pins.ca())
    pin = pins.user()
    with StopRequest():  # a signal while the identity is half-made waits until it is whole
        record = identities.create_device(lib, home, args.registration_id, issuer=issuer,
                                          spec=key_spec(args.key), token_label=args.token,
                                          pin=pin, days=args.days)
    _emit(args, record.as_dict(), f"device {record.registration_id!r} created\n{record.uri}\n"
                                  f"certificate chain: {record.chain_path}")
    return 0


def cmd_device_list(args) -> int:
    records = devices.list_devices(existing_home(args.home), token_label=args.token, prefix=args.prefix)
    text = "\n".join(f"{r.registration_id}\t{r.token_label}\t{r.key_type}\t{r.uri}" for r in records)
    _emit(args, [r.as_dict() for r in records], text or "(no devices)")
    return 0


def cmd_device_show(args) -> int:
    record = devices.lookup_device(existing_home(args.home), args.registration_id)
    data = record.as_dict()
    _emit(args, data, "\n".join(f"{k}: {v}" for k, v in data.items()))
    return 0


# --- export ---------------------------------------------------------------------

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
        _write_out(args, certificates.to_pem(*(r.certificate for r in records)))
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
    _write_out(args, certificates.to_pem(*chain))
    return 0


# --- fleet ----------------------------------------------------------------------

def cmd_fleet_create(args) -> int:
    home, path, lib = _open(args)
    pins = _pins(args)
    ids = fleet.fleet_ids(args.prefix, args.count, args.start)
    issuer = ca.open_issuer(lib, home, args.ca, pins.ca())
    so_pin = _lazy(lambda: resolve_pin(args.so_pin_file, env=ENV_SO_PIN, what="SO PIN"))
    result = fleet.create_fleet(
        lib, home, path, ids=ids, issuer=issuer, spec=key_spec(args.key), pin=pins.user(),
        ca_pin=pins.ca(), so_pin=so_pin, days=args.days, per_token=args.per_token,
        token_prefix=args.token_prefix, jobs=args.jobs, progress=not args.no_progress)
    summary = {"count": len(result.created), "tokens": result.tokens,
               "seconds": round(result.seconds, 3), "per_second": round(result.rate, 2),
               "first": result.created[0], "last": result.created[-1]}
    if args.json:
        summary["devices"] = result.created
    _emit(args, summary,
          f"{len(result.created)} device identities in {human_duration(result.seconds)} "
          f"({result.rate:.1f}/s) on tokens {', '.join(result.tokens)}\n"
          f"first: {result.created[0]['uri']}\nlast:  {result.created[-1]['uri']}")
    return 0


def _lazy(fn):
    cache = []

    def get():
        if not cache:
            cache.append(fn())
        return cache[0]
    return get


# --- uri ------------------------------------------------------------------------

def cmd_uri_show(args) -> int:
    uri = Pkcs11Uri.parse(args.uri)
    data = uri.as_dict()
    _emit(args, data, str(uri) + "\n" + "\n".join(f"{k}: {v}" for k, v in data.items()))
    return 0


# --- parser ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsm-setup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_token(sub)
    _add_ca(sub)
    _add_device(sub)
    _add_export(sub)
    _add_fleet(sub)
    _add_uri(sub)
    return parser


def _group(sub, name: str, help_text: str):
    parser = sub.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="VERB")


def _add_token(sub) -> None:
    verbs = _group(sub, "token", "initialise and list tokens")
    p = verbs.add_parser("init", help="initialise a new token by label (SoftHSM: in the state directory)")
    p.add_argument("label", help="token label (1..32 bytes)")
    _token_options(p, so_pin=True)
    _json_option(p)
    p.set_defaults(func=cmd_token_init)
    p = verbs.add_parser("list", help="list initialised tokens")
    _token_options(p)
    _json_option(p)
    p.set_defaults(func=cmd_token_list)


def _add_ca(sub) -> None:
    verbs = _group(sub, "ca", "certificate authorities whose keys live in a token")
    p = verbs.add_parser("create", help="create a root CA, or an intermediate with --parent")
    p.add_argument("name", help="CA name (also its certificate CN and the CKA_LABEL of its key)")
    p.add_argument("--parent", metavar="NAME", help="parent CA (default: a self-signed root)")
    p.add_argument("--token", default=ca.DEFAULT_CA_TOKEN, metavar="LABEL",
                   help=f"token that holds the CA key (default {ca.DEFAULT_CA_TOKEN!r})")
    p.add_argument("--days", type=int, default=ca.DEFAULT_CA_DAYS, help="validity in days")
    add_key_argument(p, help_what="CA key")
    _token_options(p, ca_pin=True)
    _json_option(p)
    p.set_defaults(func=cmd_ca_create)
    p = verbs.add_parser("list", help="list registered CAs")
    add_home_argument(p)
    _json_option(p)
    p.set_defaults(func=cmd_ca_list)
    p = verbs.add_parser("show", help="show one CA")
    p.add_argument("name")
    add_home_argument(p)
    _json_option(p)
    p.set_defaults(func=cmd_ca_show)
    p = verbs.add_parser("verification-cert",
                         help="DPS proof-of-possession certificate (CN = CODE, signed by the CA key)")
    p.add_argument("name", help="CA name")
    p.add_argument("--code", required=True, help="verification code shown by DPS")
    p.add_argument("--days", type=int, default=verification.DEFAULT_DAYS, help="validity in days")
    p.add_argument("--out", metavar="FILE", help="write the PEM here (default: stdout)")
    _token_options(p, ca_pin=True)
    _json_option(p, _ERRORS_AS_JSON)
    p.set_defaults(func=cmd_ca_verification_cert)


def _add_device(sub) -> None:
    verbs = _group(sub, "device", "device identities: key, CSR and certificate in a token")
    p = verbs.add_parser("create", help="create one device identity")
    p.add_argument("registration_id", help="DPS registration ID = certificate CN = CKA_LABEL")
    p.add_argument("--ca", required=True, metavar="NAME", help="issuing CA")
    p.add_argument("--token", default=identities.DEFAULT_DEVICE_TOKEN, metavar="LABEL",
                   help=f"device token (default {identities.DEFAULT_DEVICE_TOKEN!r})")
    p.add_argument("--days", type=int, default=identities.DEFAULT_DEVICE_DAYS, help="validity in days")
    add_key_argument(p, help_what="device key")
    _token_options(p, ca_pin=True)
    _json_option(p)
    p.set_defaults(func=cmd_device_create)
    p = verbs.add_parser("list", help="list registered devices")
    p.add_argument("--token", metavar="LABEL", help="only devices on this token")
    p.add_argument("--prefix", help="only registration IDs starting with this")
    add_home_argument(p)
    _json_option(p)
    p.set_defaults(func=cmd_device_list)
    p = verbs.add_parser("show", help="show one device")
    p.add_argument("registration_id")
    add_home_argument(p)
    _json_option(p)
    p.set_defaults(func=cmd_device_show)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="PEM of a certificate, its chain, or the CA bundle",
                       description="cert: one certificate; chain: it and its issuers up to the "
                                   "root; bundle: CA certificates (all, or one CA's chain)")
    p.add_argument("what", choices=("cert", "chain", "bundle"))
    p.add_argument("--device", metavar="ID", help="a device's certificate")
    p.add_argument("--ca", metavar="NAME", help="a CA's certificate (bundle: that CA's chain)")
    p.add_argument("--no-root", action="store_true", help="chain: leave the root out")
    p.add_argument("--roots-only", action="store_true", help="bundle: only root certificates")
    p.add_argument("--out", metavar="FILE", help="write here (default: stdout)")
    add_home_argument(p)
    _json_option(p, _ERRORS_AS_JSON)
    p.set_defaults(func=cmd_export)


def _add_fleet(sub) -> None:
    verbs = _group(sub, "fleet", "many device identities at once")
    p = verbs.add_parser("create", help="create N device identities over shard tokens")
    p.add_argument("--count", type=int, required=True, help="number of devices")
    p.add_argument("--prefix", required=True, help="registration ID prefix (IDs: PREFIX0001, ...)")
    p.add_argument("--start", type=int, default=1, help="first number (default 1)")
    p.add_argument("--ca", required=True, metavar="NAME", help="issuing CA")
    p.add_argument("--per-token", type=int, default=fleet.DEFAULT_PER_TOKEN,
                   help=f"devices per shard token (default {fleet.DEFAULT_PER_TOKEN})")
    p.add_argument("--token-prefix", default=fleet.DEFAULT_TOKEN_PREFIX,
                   help=f"shard token labels: PREFIX-001, ... (default {fleet.DEFAULT_TOKEN_PREFIX!r})")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes, each working on its own shard tokens (default 1)")
    p.add_argument("--days", type=int, default=identities.DEFAULT_DEVICE_DAYS, help="validity in days")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_key_argument(p, help_what="device key")
    _token_options(p, ca_pin=True, so_pin=True)
    _json_option(p)
    p.set_defaults(func=cmd_fleet_create)


def _add_uri(sub) -> None:
    verbs = _group(sub, "uri", "RFC 7512 PKCS#11 URIs")
    p = verbs.add_parser("show", help="parse a PKCS#11 URI and print its parts (never the PIN)")
    p.add_argument("uri")
    _json_option(p)
    p.set_defaults(func=cmd_uri_show)


def main(argv: list[str] | None = None) -> int:
    return run_cli("hsm-setup", build_parser(), argv)

if __name__ == "__main__":
    sys.exit(main())
