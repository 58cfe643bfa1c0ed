"""`--scheduler tcp://HOST:PORT` of `device-sim fleet run` and `hsm-setup fleet create`: the
same verbs spread over the workers of a Dask scheduler (docs/fleet.md, "Across machines")."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from device_sim.cli import register as register_cli
from device_sim.cli.durations import human_duration
from device_sim.common.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_NOT_ASSIGNED, UserError
from device_sim.common.home import ensure_home
from device_sim.fleet import plot
from device_sim.fleet.report import render_text

# Options naming things of the coordinator's machine, which the workers do not have.
_RUN_LOCAL_ONLY = (("devices", "--devices"), ("limit", "--limit"), ("module", "--module"),
                   ("pin_file", "--pin-file"), ("chain_file", "--chain-file"))
_WORKER_SIDE = ("each worker uses its own state directory ($DEVICE_SIM_HOME), module ($PKCS11_MODULE) "
                "and PIN ($PKCS11_PIN) from the environment of its 'dask worker'")


def cmd_run_distributed(args) -> int:
    from device_sim.cli.fleet import check_outputs, records_file, token_batch
    from device_sim.fleet import distributed
    from device_sim.fleet.records import RunLog, read_records, write_json_report
    from device_sim.fleet.runner import FleetSettings

    _refuse_local_options(args, _RUN_LOCAL_ONLY)
    threads = {} if args.event_loop_threads is None else {"event_loop_threads": args.event_loop_threads}
    FleetSettings(concurrency=args.concurrency, timeout=args.timeout, rate=args.rate, ramp=args.ramp,
                  **threads)  # checks the numbers
    home = ensure_home(args.home)
    target = register_cli.resolve_target(args, home)
    check_outputs(args)
    job = distributed.child_job(prefix=args.prefix, chain_to=args.chain_to, target=target,
                                settings={"concurrency": args.concurrency, "timeout": args.timeout,
                                          "ramp": args.ramp, **threads}, token_batch=token_batch(args))
    bar = tqdm(unit="dev", file=sys.stderr, disable=args.no_progress, dynamic_ncols=True)

    def on_record(record, counts):
        bar.update(1)
        bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in counts.most_common()), refresh=False)

    records_path = records_file(args, home)
    try:
        with RunLog(records_path) as log:  # the merged records go to disk as they come
            run = distributed.run_distributed(args.scheduler, job, log, rate=args.rate, on_record=on_record)
    finally:
        bar.close()
    settings = {
        "devices": run.count, "scheduler": args.scheduler, "workers": len(run.workers),
        "concurrency_per_worker": args.concurrency, "rate": args.rate, "timeout": args.timeout,
        "transport": args.transport, "endpoint": target.endpoint, "id_scope": target.id_scope,
        "records": str(records_path),
    }
    summary = run.summary(concurrency=args.concurrency * len(run.workers), rate=args.rate, ramp=args.ramp)
    print(render_text(summary))
    for name, tally in run.workers.items():
        outcomes = ", ".join(f"{k} {v}" for k, v in tally.outcomes.most_common()) or "-"
        print(f"worker {name}: {tally.devices} devices: {outcomes}" + (" (lost)" if tally.lost else ""))
    for name in run.unplanned():
        print(f"device-sim: warning: worker {name} left before it said which devices it has: "
              "they are in no record of this report", file=sys.stderr)
    print(f"records: {records_path}")
    if args.json:
        write_json_report(Path(args.json), log, settings=settings, summary=summary,
                          extra={"workers": {n: t.as_dict() for n, t in run.workers.items()}})
    if args.plot:
        plot.write_plot(Path(args.plot), read_records(records_path),  # the records name their worker
                        f"device-sim fleet: {run.count} devices on {len(run.workers)} workers", summary)
    if run.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if run.all_assigned(summary) else EXIT_SOME_NOT_ASSIGNED


def _refuse_local_options(args, options) -> None:
    for attribute, flag in options:
        if getattr(args, attribute, None):
            raise UserError(f"{flag} cannot go with --scheduler: {_WORKER_SIDE}")


_CREATE_LOCAL_ONLY = (("so_pin_file", "--so-pin-file"),)


def cmd_create_distributed(args) -> int:
    from device_sim.cli.hsm_options import ca_library, emit, pin_book, token_run, warn_if_clamped
    from hsm_setup import ca, fleet, fleet_distributed
    from hsm_setup.key_types import key_spec

    _refuse_local_options(args, _CREATE_LOCAL_ONLY)
    if args.jobs != 1:
        raise UserError("--jobs cannot go with --scheduler: each worker makes its share with "
                        "'dask worker --nworkers'")
    ids = fleet.fleet_ids(args.prefix, args.count, args.start)
    pins = pin_book(args)
    bar = tqdm(total=len(ids), unit="dev", file=sys.stderr, disable=args.no_progress,
               desc="fleet create", smoothing=0.1)
    try:
        with token_run(args) as (home, ctx):
            issuer = ca.open_issuer(ca_library(ctx, args), home, args.ca, pins.ca())
            warn_if_clamped(issuer, args.days)
            result = fleet_distributed.create_distributed(
                args.scheduler, ids=ids, issuer=issuer, spec=key_spec(args.key), days=args.days,
                per_token=args.per_token, token_prefix=args.token_prefix, on_created=bar.update)
    finally:
        bar.close()
    rate = result.created / result.seconds if result.seconds else 0.0
    summary = {"count": result.created, "kept": result.kept, "seconds": round(result.seconds, 3),
               "per_second": round(rate, 2), "first": result.first, "last": result.last,
               "workers": {name: share.as_dict() for name, share in result.workers.items()}}
    lines = [f"{result.created} device identities in {human_duration(result.seconds)} ({rate:.1f}/s) "
             f"on {len(result.workers)} workers" + (f" ({result.kept} made before were kept)" if result.kept else "")]
    for name, share in result.workers.items():
        tokens_text = ", ".join(share.tokens) or "-"
        lines.append(f"worker {name}: {share.created} created, {share.kept} kept, tokens {tokens_text}")
    emit(args, summary, "\n".join(lines))
    return 0
