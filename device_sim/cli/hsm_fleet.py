"""`hsm-setup fleet create`: many device identities over shard tokens."""

from __future__ import annotations

import sys

from device_sim.cli.durations import human_duration
from device_sim.cli.hsm_options import (add_key_argument, ca_library, device_library, emit,
                                        json_option, lazy, pin_book, token_options, token_run,
                                        warn_if_clamped)
from hsm_setup import ca, fleet, identities, tokens
from hsm_setup.key_types import key_spec
from hsm_setup.pins import ENV_SO_PIN, resolve_pin


# GnuTLS reads at most 48 slots and skips a module with more; SoftHSM adds one empty slot.
GNUTLS_MAX_TOKENS = 47


def cmd_fleet_create(args) -> int:
    if args.scheduler:
        from device_sim.cli.fleet_scheduler import cmd_create_distributed
        return cmd_create_distributed(args)
    pins = pin_book(args)
    ids = fleet.fleet_ids(args.prefix, args.count, args.start)
    so_pin = lazy(lambda: resolve_pin(args.so_pin_file, env=ENV_SO_PIN, what="SO PIN"))
    with token_run(args) as (home, ctx):
        issuer = ca.open_issuer(ca_library(ctx, args), home, args.ca, pins.ca())
        warn_if_clamped(issuer, args.days)
        result = fleet.create_fleet(
            device_library(ctx, args), home, ids=ids, issuer=issuer, spec=key_spec(args.key),
            pin=pins.user(), ca_pin=pins.ca(), so_pin=so_pin, days=args.days,
            per_token=args.per_token, token_prefix=args.token_prefix, jobs=args.jobs,
            progress=not args.no_progress)
        shown = len(tokens.list_tokens(device_library(ctx, args)))
    if shown > GNUTLS_MAX_TOKENS:
        print(f"hsm-setup: warning: the module now shows {shown} tokens: GnuTLS tools (p11tool) list "
              f"none beyond {GNUTLS_MAX_TOKENS} (docs/hsm-setup.md); a larger --per-token keeps fewer",
              file=sys.stderr)
    if not result.created:
        emit(args, {"count": 0, "kept": result.kept, "tokens": []},
             f"all {result.kept} device identities exist already: nothing to create")
        return 0
    summary = {"count": len(result.created), "tokens": result.tokens,
               "seconds": round(result.seconds, 3), "per_second": round(result.rate, 2),
               "first": result.created[0], "last": result.created[-1]}
    if result.kept:
        summary["kept"] = result.kept
    if args.json:
        summary["devices"] = result.created
    kept = f" ({result.kept} made before were kept)" if result.kept else ""
    emit(args, summary,
         f"{len(result.created)} device identities in {human_duration(result.seconds)} "
         f"({result.rate:.1f}/s) on tokens {', '.join(result.tokens)}{kept}\n"
         f"first: {result.created[0]['uri']}\nlast:  {result.created[-1]['uri']}")
    return 0


def add_verbs(group) -> None:
    verbs = group("fleet")
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
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="make the keys on the workers of this Dask scheduler, each in its own tokens, "
                        "certified by --ca here (docs/fleet.md, 'Across machines')")
    add_key_argument(p, help_what="device key")
    token_options(p, ca_pin=True, so_pin=True, ca_module=True)
    json_option(p, cmd_fleet_create)
