"""`device-sim fleet run`: register many token-backed devices at once and report on them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

from tqdm import tqdm

from device_sim.cli import register as register_cli
from device_sim.cli.options import add_home_argument
from device_sim.common.errors import (EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_NOT_ASSIGNED, EXIT_USAGE,
                                      UserError)
from device_sim.common.files import write_atomic
from device_sim.common.home import ensure_home
from device_sim.device import chain_builder
from device_sim.device import registration as reg
from device_sim.fleet import identities, plot
from device_sim.fleet.report import render_text
from device_sim.fleet.runner import FleetSettings, run_fleet
from hsm_setup import module, pins

DEFAULT_CONCURRENCY = 64
DEFAULT_TIMEOUT = 60.0


def add_subparser(subparsers) -> None:
    fleet = subparsers.add_parser("fleet", help="register many devices at once and report on them",
                                  description="Fleet simulation: many devices, each with its own "
                                              "non-extractable token key, registering at once.")
    verbs = fleet.add_subparsers(dest="fleet_command", required=True, metavar="VERB")
    run = verbs.add_parser(
        "run", help="register the devices of the state directory (or a list) with bounded concurrency",
        description="Register devices made by 'hsm-setup fleet create' (or listed in --devices) "
                    "with bounded concurrency and an optional arrival rate, then report "
                    "registrations/s, latency percentiles per phase, outcomes, retries and hubs.",
        epilog=f"exit codes: {EXIT_OK} every device assigned; {EXIT_SOME_NOT_ASSIGNED} some device not assigned; "
               f"{EXIT_USAGE} usage or configuration error; {EXIT_INTERRUPTED} interrupted (the report still "
               "covers what finished)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_home_argument(run)
    which = run.add_mutually_exclusive_group()
    which.add_argument("--prefix", metavar="P", help="only devices whose registration ID starts with P")
    which.add_argument("--devices", metavar="FILE",
                       help="file with one registration ID or PKCS#11 URI per line")
    run.add_argument("--limit", type=int, metavar="N", help="at most N devices")
    run.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, metavar="N",
                     help=f"registrations in flight at once (default {DEFAULT_CONCURRENCY})")
    run.add_argument("--rate", type=float, metavar="PER_S",
                     help="arrival rate: start at most this many devices per second (default: no limit)")
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                     help=f"deadline per device in seconds, retries and polls included (default {DEFAULT_TIMEOUT:g})")
    run.add_argument("--module", metavar="PATH", help="PKCS#11 module (default: $PKCS11_MODULE, else SoftHSM)")
    run.add_argument("--pin-file", metavar="FILE", help="file whose first line is the user PIN (default $PKCS11_PIN)")
    run.add_argument("--chain-to", metavar="NAME|root|leaf", default=chain_builder.ROOT,
                     help="last certificate each device presents (default: root)")
    run.add_argument("--chain-file", metavar="FILE", action="append", default=[],
                     help="PEM file of CA certificates to build chains from (repeatable)")
    register_cli.add_target_arguments(run)
    run.add_argument("--event-loop-threads", type=int, metavar="N",
                     help="awscrt event-loop threads doing TLS and I/O (default: one per core)")
    run.add_argument("--json", metavar="FILE", help="write the full report (summary + one record per device) here")
    run.add_argument("--plot", metavar="FILE",
                     help="draw throughput, latency and outcomes over time (.png, .svg, .pdf or .html)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                     help="run on every worker of this Dask scheduler, each over the devices of its own "
                          "state directory, and merge the reports (docs/fleet.md, 'Across machines')")
    run.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    if args.scheduler:
        from device_sim.cli.fleet_scheduler import cmd_run_distributed
        return cmd_run_distributed(args)
    _check_numbers(args)
    threads = {} if args.event_loop_threads is None else {"event_loop_threads": args.event_loop_threads}
    settings = FleetSettings(concurrency=args.concurrency, timeout=args.timeout, rate=args.rate,
                             **threads)  # checks its numbers
    home = ensure_home(args.home)
    target = register_cli.resolve_target(args, home)
    check_outputs(args)
    records = identities.select_records(home, prefix=args.prefix, list_file=args.devices, limit=args.limit)
    module_path = module.resolve_module(args.module, home)
    pin = pins.resolve_pin(args.pin_file)
    slots = identities.token_slots(module_path, home)
    devices = identities.fleet_devices(records, home=home, module_path=module_path, pin=pin, slots=slots,
                                       chain_to=args.chain_to, chain_files=args.chain_file)
    if target.trust_file:
        fast_trust_defaults(target.trust_file)
    report = _run_with_progress(devices, target, settings, args.no_progress)
    report.settings = {
        "devices": len(devices), "concurrency": args.concurrency, "rate": args.rate, "timeout": args.timeout,
        "transport": args.transport, "endpoint": f"{target.host}:{target.port}", "id_scope": target.id_scope,
        "event_loop_threads": settings.event_loop_threads,
    }
    summary = report.summary()
    print(render_text(summary))
    if args.json:
        _write_json(Path(args.json), report.to_dict())
    if args.plot:
        plot.write_plot(Path(args.plot), report.devices,
                        f"device-sim fleet: {len(devices)} devices, concurrency {args.concurrency}")
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if summary["outcomes"].get(reg.ASSIGNED, 0) == len(devices) else EXIT_SOME_NOT_ASSIGNED


def check_outputs(args) -> None:
    """--json and --plot can be written (checked before any device starts)."""
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not Path(path).resolve().parent.is_dir():
            raise UserError(f"{option} {path}: the folder does not exist")
    if args.plot:
        plot.check_format(Path(args.plot))


def _check_numbers(args) -> None:
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")


def _run_with_progress(devices, target, settings, quiet: bool):
    stop = threading.Event()
    bar = tqdm(total=len(devices), unit="dev", file=sys.stderr, disable=quiet, dynamic_ncols=True)

    def on_result(result, counts):
        bar.update(1)
        bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in counts.most_common()), refresh=False)

    try:
        return run_fleet(devices, target, settings, stop=stop, on_result=on_result)
    finally:
        bar.close()


def _write_json(path: Path, document: dict) -> None:
    write_atomic(path, json.dumps(document, indent=1) + "\n")  # a reader never sees half a report


def fast_trust_defaults(trust_file: str) -> None:
    """Make awscrt's default trust store the (small) trust file for this process.

    s2n loads the system trust store into every new TLS context before our override
    replaces it: ~10 ms of a ~12 ms context (measured: 2.4 ms per token-key context once
    the default paths point at one small file). awscrt reads these variables at each
    context creation; no file is written. A process-wide choice, so the entry point makes it.
    """
    os.environ["SSL_CERT_FILE"] = trust_file
    os.environ["SSL_CERT_DIR"] = os.path.join(os.path.dirname(os.path.abspath(trust_file)), ".no-cert-dir")
