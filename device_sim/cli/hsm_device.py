"""`hsm-setup device ...`: device identities (key, CSR and certificate in a token)."""

from __future__ import annotations

from device_sim.cli.hsm_options import (ca_library, device_library, emit, emit_list, json_option,
                                        key_holder_options, pin_book, show_command, token_run,
                                        warn_if_clamped)
from device_sim.cli.options import add_home_argument, existing_home
from hsm_setup import ca, devices, identities
from hsm_setup.interrupts import StopRequest
from hsm_setup.key_types import key_spec


def cmd_device_create(args) -> int:
    pins = pin_book(args)
    with token_run(args) as (home, ctx):
        issuer = ca.open_issuer(ca_library(ctx, args), home, args.ca, pins.ca())
        warn_if_clamped(issuer, args.days)
        pin = pins.user()
        with StopRequest():  # a signal while the identity is half-made waits until it is whole
            record = identities.create_device(device_library(ctx, args), home, args.registration_id,
                                              issuer=issuer, spec=key_spec(args.key),
                                              token_label=args.token, pin=pin, days=args.days)
    emit(args, record.as_dict(), f"device {record.registration_id!r} created\n{record.uri}\n"
                                 f"certificate chain: {record.chain_path}")
    return 0


def cmd_device_list(args) -> int:
    emit_list(args, devices.list_devices(existing_home(args.home), token_label=args.token, prefix=args.prefix),
              lambda r: f"{r.registration_id}\t{r.token_label}\t{r.key_type}\t{r.uri}", "(no devices)")
    return 0


cmd_device_show = show_command(lambda home, args: devices.lookup_device(home, args.registration_id))


def add_verbs(group) -> None:
    verbs = group("device")
    p = verbs.add_parser("create", help="create one device identity")
    p.add_argument("registration_id", help="DPS registration ID = certificate CN = CKA_LABEL")
    p.add_argument("--ca", required=True, metavar="NAME", help="issuing CA")
    key_holder_options(p, token=identities.DEFAULT_DEVICE_TOKEN, days=identities.DEFAULT_DEVICE_DAYS,
                       what="device key")
    json_option(p, cmd_device_create)
    p = verbs.add_parser("list", help="list registered devices")
    p.add_argument("--token", metavar="LABEL", help="only devices on this token")
    p.add_argument("--prefix", help="only registration IDs starting with this")
    add_home_argument(p)
    json_option(p, cmd_device_list)
    p = verbs.add_parser("show", help="show one device")
    p.add_argument("registration_id")
    add_home_argument(p)
    json_option(p, cmd_device_show)
