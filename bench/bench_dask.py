"""Benchmark of `--scheduler`: a fleet over two Dask workers beside a local fleet of the same size.

One run, on this machine, with a real `dask scheduler` and two `dask worker` processes on
loopback (device_sim/testing/dask.py; each worker with its own state directory and SoftHSM
configuration, the CA in the coordinator's token) and one emulator (Retry-After 0,
assignment delay 0), prints side by side:
  1. `hsm-setup fleet create` of N identities locally (one state directory, --jobs 2) and
     `hsm-setup fleet create --scheduler` of N over the two workers: identities/s of each
     (wall time of the command) and their ratio;
  2. `device-sim fleet run` of the local N (concurrency C) and `device-sim fleet run
     --scheduler` of the workers' N (concurrency C/2 on each, so as many devices are in
     flight): registrations/s, p50/p99 total latency, outcomes, and their ratio;
  3. the raw limit measured in the same run: file-key mTLS handshakes/s of C clients
     (CPython ssl) against the same emulator, and each registrations/s as a ratio to it.

On one machine the workers, the coordinator and the emulator share the same cores, so the
Dask figures say what the distribution costs, not what it gains: it pays off when the
workers are machines whose cores add up (docs/fleet.md, "Across machines").

    .venv/bin/python bench/bench_dask.py [--count 400] [--concurrency 32] [--seconds 5]
    .venv/bin/python bench/bench_dask.py --count 20 --concurrency 4 --seconds 1   # a quick check

`--keep DIR` runs in DIR (new or empty) and keeps it: the state directories, the reports
and the logs of the scheduler and workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_fleet import (PIN, ROOT, SO_PIN, cli, create_fleet, fleet_run, peak_rss_mib,  # bench/ is sys.path[0]
                         raw_handshake_rate)

from device_sim.testing import Emulator
from device_sim.testing.dask import DaskCluster

WORKERS = ("w1", "w2")
DASK_PREFIX = "dask-"  # the local fleet is bench_fleet's "bench-"


def environment(home: Path) -> dict:
    """The environment of one machine: its own state directory, SoftHSM config and PINs."""
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "PKCS11_MODULE")}
    env.update(DEVICE_SIM_HOME=str(home), PKCS11_PIN=PIN, PKCS11_SO_PIN=SO_PIN)
    return env


def create_over_dask(env, scheduler: str, count: int) -> tuple[float, dict]:
    """(wall seconds, JSON summary) of `hsm-setup fleet create --scheduler` with the CA "line"."""
    started = time.perf_counter()
    result = cli(env, "device_sim.cli.hsm_setup", "fleet", "create", "--scheduler", scheduler, "--count", count,
                 "--prefix", DASK_PREFIX, "--ca", "line", "--no-progress", "--json")
    return time.perf_counter() - started, json.loads(result.stdout)


def run_over_dask(env, scheduler: str, concurrency: int, report: Path) -> tuple[dict, float]:
    """(report, wall seconds incl. start-up) of `device-sim fleet run --scheduler`."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "device_sim.cli", "fleet", "run", "--scheduler", scheduler, "--emulator",
         "--concurrency", str(concurrency), "--prefix", DASK_PREFIX, "--no-progress", "--json", str(report)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):  # 1: some device not assigned, still a figure
        sys.exit(f"fleet run --scheduler failed with exit {done.returncode}: {done.stderr.strip()}")
    return json.loads(report.read_text()), wall


def work_directory(keep: str | None) -> Path:
    if keep is None:
        return Path(tempfile.mkdtemp(prefix="bench-dask-"))
    work = Path(keep)
    if work.exists() and any(work.iterdir()):
        sys.exit(f"--keep {keep}: the directory is not empty; give a new or empty one "
                 "(a second fleet create there would only keep what exists)")
    work.mkdir(parents=True, exist_ok=True)
    return work


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=400, help="identities of each fleet (default 400)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="devices in flight: all locally, half on each Dask worker (default 32)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of the raw-limit measurement")
    parser.add_argument("--keep", metavar="DIR", help="run in this new or empty directory and keep it")
    args = parser.parse_args()
    if args.count < len(WORKERS):
        parser.error(f"--count must be at least {len(WORKERS)} (one identity per worker)")
    if args.concurrency < len(WORKERS) or args.concurrency % len(WORKERS):
        parser.error(f"--concurrency {args.concurrency}: give a multiple of {len(WORKERS)}, so that the "
                     f"{len(WORKERS)} workers have as many devices in flight as the local run")
    per_worker = args.concurrency // len(WORKERS)
    try:
        import distributed  # noqa: F401
    except ImportError:
        sys.exit("bench_dask needs Dask distributed: pip install 'device-sim[distributed]' (make venv installs it)")

    work = work_directory(args.keep)
    try:
        coordinator = environment(work / "coordinator")
        (work / "coordinator").mkdir()
        cluster = DaskCluster(work / "cluster")
        try:
            for name in WORKERS:
                cluster.add_worker(name, env=environment(work / name), wait=False)
            cluster.wait_for_workers(len(WORKERS))
            local_create_s = create_fleet(coordinator, args.count, None, 2)  # also makes the CAs root and line
            dask_create_s, dask_created = create_over_dask(coordinator, cluster.address, args.count)
            emulator = Emulator.spawn(work / "coordinator", "--retry-after", "0", "--assignment-delay", "0",
                                      "--no-mqtt", "--max-connections", "1024", env=coordinator)
            try:
                cli(coordinator, "device_sim.cli", "stub", "ca", "upload", "root",
                    work / "coordinator" / "pki" / "ca" / "root" / "cert.pem", "--verified")
                cli(coordinator, "device_sim.cli", "stub", "group", "create", "bench", "--ca-ref", "root")
                local, local_wall, local_rss, _, _ = fleet_run(coordinator, args.concurrency, args.count,
                                                               work / "local.json")
                dask, dask_wall = run_over_dask(coordinator, cluster.address, per_worker, work / "dask.json")
                handshakes = raw_handshake_rate(emulator.ready, work, args.concurrency, args.seconds)
                emulator_rss = peak_rss_mib(emulator.process.pid)
            finally:
                emulator.stop()
        finally:
            cluster.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"devices {args.count} per fleet, {os.cpu_count()} cores, Dask: 1 scheduler + {len(WORKERS)} workers "
          "on this machine, each worker its own state directory; the CA on the coordinator")
    local_create, dask_create = args.count / local_create_s, dask_created["count"] / dask_create_s
    print("fleet create (wall time of the command, incl. start-up):")
    print(f"  local, --jobs 2:        {local_create:8.1f} identities/s ({local_create_s:.1f} s)")
    shares = ", ".join(f"{name} {share['created']}" for name, share in dask_created["workers"].items())
    print(f"  --scheduler, 2 workers: {dask_create:8.1f} identities/s ({dask_create_s:.1f} s; {shares}; "
          f"{dask_created['per_second']}/s by its own clock)")
    print(f"  ratio dask/local: {dask_create / local_create:.2f}")
    print(f"fleet run ({args.concurrency} in flight either way):")
    rows = ((f"local, concurrency {args.concurrency}", local, local_wall),
            (f"--scheduler, 2 x {per_worker}", dask, dask_wall))
    for label, report, wall in rows:
        summary = report["summary"]
        total = summary["latency_ms"]["total_ms"]
        print(f"  {label:<24}{summary['registrations_per_s']:8} registrations/s over {summary['wall_s']} s "
              f"(process {wall:.1f} s), total p50 {total['p50']} ms, p99 {total['p99']} ms, "
              f"outcomes {summary['outcomes']}")
    for name, tally in dask["workers"].items():
        outcomes = ", ".join(f"{k} {v}" for k, v in tally["outcomes"].items()) or "-"
        print(f"    worker {name}: {tally['devices']} devices, {outcomes}" + (" (lost)" if tally["lost"] else ""))
    local_rate, dask_rate = (report["summary"]["registrations_per_s"] or 0.0 for _, report, _ in rows)
    print(f"  ratio dask/local: {dask_rate / local_rate:.2f}" if local_rate else "  ratio dask/local: -")
    print("raw limit measured in the same run:")
    print(f"  file-key mTLS handshakes/s, {args.concurrency} clients, same emulator: {handshakes:.1f} "
          f"-> local/raw = {local_rate / handshakes:.2f}, dask/raw = {dask_rate / handshakes:.2f}")
    print(f"peak RSS: local fleet process {local_rss:.0f} MiB, emulator {emulator_rss:.0f} MiB")
    print("what this means: here the workers, the coordinator and the emulator share the same "
          f"{os.cpu_count()} cores, so the ratios show what distribution costs; --scheduler pays off "
          "when the workers are machines whose cores add up (and the endpoint keeps up).")
    if args.keep:
        print(f"kept: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
