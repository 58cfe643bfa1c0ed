"""`hsm-setup token ...`: initialise and list tokens."""

from __future__ import annotations

from device_sim.cli.hsm_options import device_library, emit, json_option, pin_book, token_options, token_run
from hsm_setup import tokens
from hsm_setup.pins import ENV_SO_PIN, resolve_pin


def cmd_token_init(args) -> int:
    so_pin = resolve_pin(args.so_pin_file, env=ENV_SO_PIN, what="SO PIN")
    user_pin = pin_book(args).user()
    with token_run(args) as (_, ctx):
        info = tokens.init_token(device_library(ctx, args), args.label, so_pin=so_pin, user_pin=user_pin)
    emit(args, info.as_dict(), f"token {info.label!r} initialised (serial {info.serial}, slot {info.slot_id})")
    return 0


def cmd_token_list(args) -> int:
    with token_run(args) as (_, ctx):
        infos = tokens.list_tokens(device_library(ctx, args))
    text = "\n".join(f"{i.label}\tserial={i.serial}\tslot={i.slot_id}\t{i.model}" for i in infos)
    emit(args, [i.as_dict() for i in infos], text or "(no initialised tokens)")
    return 0


def add_verbs(group) -> None:
    verbs = group("token")
    p = verbs.add_parser("init", help="initialise a new token by label (SoftHSM: in the state directory)")
    p.add_argument("label", help="token label (1..32 bytes)")
    token_options(p, so_pin=True)
    json_option(p, cmd_token_init)
    p = verbs.add_parser("list", help="list initialised tokens")
    token_options(p)
    json_option(p, cmd_token_list)
