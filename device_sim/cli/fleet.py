"""`device-sim fleet run`: register many token-backed devices at once and report on them."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from device_sim.cli import register as register_cli
from device_sim.cli import runner
from device_sim.cli.options import add_home_argument
from device_sim.common.errors import (EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_NOT_ASSIGNED, EXIT_USAGE,
                                      UserError)
from device_sim.common.home import ensure_home
from device_sim.device import chain_builder
from device_sim.device import registration as reg
from device_sim.fleet import identities, plot
from device_sim.fleet.records import RunLog, read_records, write_json_report
from device_sim.fleet.report import render_text
from device_sim.fleet.runner import FleetSettings, run_fleet
from hsm_setup import module, pins

DEFAULT_CONCURRENCY = 64
DEFAULT_TIMEOUT = 60.0
RUNS_DIR = "fleet-runs"  # under the state directory: records of runs without --json / --records
LATEST = "latest.jsonl"
# Devices per SoftHSM token batch: each switch waits for the batch's last devices (about one
# registration's time at falling concurrency), so a batch of 25 x concurrency devices loses
# a few percent of throughput, and SoftHSM then holds ~0.7 MiB per concurrency slot (docs/fleet.md).
TOKEN_BATCH_PER_SLOT = 25
TOKEN_BATCH_MIN = 1000


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
    run.add_argument("--ramp", type=float, metavar="SECONDS",
                     help="with --rate: arrivals grow linearly from 0 to --rate over SECONDS, then stay at --rate")
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                     help=f"deadline per device in seconds, retries and polls included (default {DEFAULT_TIMEOUT:g})")
    run.add_argument("--module", metavar="PATH", help="PKCS#11 module (default: $PKCS11_MODULE, else SoftHSM)")
    run.add_argument("--pin-file", metavar="FILE", help="file whose first line is the user PIN (default $PKCS11_PIN)")
    run.add_argument("--chain-to", metavar="NAME|root|leaf", default=chain_builder.ROOT,
                     help="last certificate each device presents (default: root)")
    run.add_argument("--chain-file", metavar="FILE", action="append", default=[],
                     help="PEM file of CA certificates to build chains from (repeatable)")
    register_cli.add_target_arguments(run)
    run.add_argument("--token-batch", type=int, metavar="N",
                     help="with SoftHSM: load the tokens of about N identities at a time, so memory follows "
                          f"the concurrency, not the state directory (default {TOKEN_BATCH_PER_SLOT} x --concurrency, "
                          f"at least {TOKEN_BATCH_MIN}; 0: every token at once; docs/fleet.md, 'Memory')")
    run.add_argument("--event-loop-threads", type=int, metavar="N",
                     help="awscrt event-loop threads doing TLS and I/O (default: one per core)")
    run.add_argument("--json", metavar="FILE",
                     help="write the full report here (settings, summary, every failed device, every record)")
    run.add_argument("--records", metavar="FILE",
                     help="JSON Lines file of per-device records, written as devices finish (default: FILE.jsonl "
                          f"beside --json, else <home>/{RUNS_DIR}/<UTC time>.jsonl with {RUNS_DIR}/{LATEST} "
                          "naming the newest)")
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
                             ramp=args.ramp, **threads)  # checks its numbers
    home = ensure_home(args.home)
    target = register_cli.resolve_target(args, home)
    check_outputs(args)
    selection = identities.Selection(home, prefix=args.prefix, list_file=args.devices, limit=args.limit)
    module_path = module.resolve_module(args.module, home)
    pin = pins.resolve_pin(args.pin_file)
    batch = token_batch(args)
    devices = identities.stream_devices(selection, home=home, module_path=module_path, pin=pin, slots={},
                                        chain_to=args.chain_to, chain_files=args.chain_file, batch=batch,
                                        on_note=lambda note: print(f"device-sim: note: {note}", file=sys.stderr))
    if target.trust_file:
        fast_trust_defaults(target.trust_file)
    records_path = records_file(args, home)
    runner.skip_teardown()  # awscrt loads the module from here on: see runner.skip_teardown
    try:
        with RunLog(records_path) as log:
            report = _run_with_progress(devices, target, settings, args.no_progress, log)
    finally:
        devices.close()
    report.settings = {
        "devices": len(selection), "concurrency": args.concurrency, "rate": args.rate, "ramp": args.ramp,
        "timeout": args.timeout, "transport": args.transport, "endpoint": f"{target.host}:{target.port}",
        "id_scope": target.id_scope, "event_loop_threads": settings.event_loop_threads,
        "records": str(records_path), "token_batch": batch if devices.views is not None else 0,
        **{k: v for k, v in report.settings.items() if k.startswith("token_")},
    }
    summary = report.summary()
    print(render_text(summary))
    if report.settings.get("token_batches"):
        print(f"token batches: {report.settings['token_batches']} of about {batch} identities each, "
              f"{report.settings['token_switch_s']:.1f} s spent switching ({report.settings['token_drain_s']:.1f} s "
              f"letting each batch's last devices finish, {report.settings['token_load_s']:.1f} s loading the next tokens)")
    print(f"records: {records_path}")
    if args.json:
        write_json_report(Path(args.json), log, settings=report.settings, summary=summary)
    if args.plot:
        title = f"device-sim fleet: {len(selection)} devices, concurrency {args.concurrency}"
        plot.write_plot(Path(args.plot), read_records(records_path), title, summary)  # streamed from the file
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if summary["outcomes"].get(reg.ASSIGNED, 0) == len(selection) else EXIT_SOME_NOT_ASSIGNED


def records_file(args, home: Path) -> Path:
    """Where the per-device records go: --records; else beside --json (.jsonl); else a new
    file under <home>/fleet-runs/, with fleet-runs/latest.jsonl pointing at it."""
    if args.records:
        return Path(args.records)
    if args.json:
        json_path = Path(args.json)
        beside = json_path.with_suffix(".jsonl")
        return beside if beside != json_path else json_path.with_name(json_path.name + ".records.jsonl")
    runs = Path(home) / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = runs / f"{stamp}.jsonl"
    n = 1
    while path.exists():  # two runs in one second
        n += 1
        path = runs / f"{stamp}-{n}.jsonl"
    path.touch()
    latest = runs / LATEST
    tmp = runs / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(path.name)
    tmp.replace(latest)
    return path


def check_outputs(args) -> None:
    """--json, --plot and --records can be written (checked before any device starts)."""
    for option, path in (("--json", args.json), ("--plot", args.plot), ("--records", args.records)):
        if path and not Path(path).resolve().parent.is_dir():
            raise UserError(f"{option} {path}: the folder does not exist")
    if args.records and args.json and Path(args.records).resolve() == Path(args.json).resolve():
        raise UserError(f"--records {args.records}: the same file as --json; name another")
    if args.plot:
        plot.check_format(Path(args.plot))


def _check_numbers(args) -> None:
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.token_batch is not None and args.token_batch < 0:
        raise UserError("--token-batch must be 0 (every token at once) or a number of identities")


def token_batch(args) -> int:
    """Identities per SoftHSM token batch (--token-batch, else TOKEN_BATCH_PER_SLOT x concurrency)."""
    if args.token_batch is not None:
        return args.token_batch
    return max(TOKEN_BATCH_MIN, TOKEN_BATCH_PER_SLOT * args.concurrency)


def _run_with_progress(devices, target, settings, quiet: bool, log: RunLog):
    stop = threading.Event()
    bar = tqdm(total=len(devices), unit="dev", file=sys.stderr, disable=quiet, dynamic_ncols=True)

    def on_result(result, counts):
        bar.update(1)
        bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in counts.most_common()), refresh=False)

    try:
        return run_fleet(devices, target, settings, stop=stop, on_result=on_result, log=log)
    finally:
        bar.close()


def fast_trust_defaults(trust_file: str) -> None:
    """Make awscrt's default trust store the (small) trust file for this process.

    s2n loads the system trust store into every new TLS context before our override
    replaces it: ~10 ms of a ~12 ms context (measured: 2.4 ms per token-key context once
    the default paths point at one small file). awscrt reads these variables at each
    context creation; no file is written. A process-wide choice, so the entry point makes it.
    """
    os.environ["SSL_CERT_FILE"] = trust_file
    os.environ["SSL_CERT_DIR"] = os.path.join(os.path.dirname(os.path.abspath(trust_file)), ".no-cert-dir")
