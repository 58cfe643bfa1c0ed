"""Benchmark of `device-sim fleet run`: token-backed devices registering at once.

One run, on this machine, with the emulator on the same machine (assignment delay 0,
Retry-After 0), prints:
  1. identities created (`hsm-setup fleet create`) and their wall time;
  2. fleet registrations/s with C concurrent devices, latency percentiles per phase,
     outcomes/errors, peak RSS of the fleet process and of the emulator;
  3. beside it, from the same run: the raw mTLS handshake rate of file-key OpenSSL
     clients (CPython ssl, C threads) against the same emulator, and SoftHSM's raw
     ECDSA P-256 sign rate with a known key handle, each as a ratio.

    .venv/bin/python bench/bench_fleet.py [--count 1000] [--concurrency 64] [--per-token 25]
    .venv/bin/python bench/bench_fleet.py --count 10000            # the 10,000-device run

The fleet process's peak RSS is its own VmHWM (sampled from /proc while it runs); the
figure with its children adds the short-lived child that looks up slot ids. `--keep DIR`
keeps the state directory: a second run with the same DIR registers the same devices
again (the `fleet create` figure is the one saved by the run that made them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_stub import client_context, handshake_once, run_clients  # bench/ is sys.path[0] when run

from device_sim.testing import Emulator, TestCA

ROOT = Path(__file__).resolve().parent.parent

PIN, SO_PIN = "1234", "bench-so-pin"


def cli(env, *args, capture=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=env,
                            capture_output=capture, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} failed: {result.stderr}")
    return result


def create_fleet(env, count: int, per_token: int | None, jobs: int) -> float:
    cli(env, "device_sim.cli.hsm_setup", "token", "init", "ca")
    cli(env, "device_sim.cli.hsm_setup", "ca", "create", "root")
    cli(env, "device_sim.cli.hsm_setup", "ca", "create", "line", "--parent", "root")
    started = time.perf_counter()
    shards = ("--per-token", per_token) if per_token else ()
    cli(env, "device_sim.cli.hsm_setup", "fleet", "create", "--count", count, "--prefix", "bench-", "--ca", "line",
        *shards, "--jobs", jobs, "--no-progress")
    return time.perf_counter() - started


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fleet_run(env, concurrency: int, count: int, report: Path,
              token_batch: int | None = None) -> tuple[dict, float, float, float, float]:
    """(report, wall seconds, peak RSS MiB of the fleet process alone, peak RSS MiB of it and
    its children (the token-slot child), CPU seconds of the fleet process)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "device_sim.cli", "fleet", "run", "--emulator", "--concurrency", str(concurrency),
         "--prefix", "bench-", "--limit", str(count), "--no-progress", "--json", str(report),
         *(("--token-batch", str(token_batch)) if token_batch is not None else ())],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    own_peak = [float("nan")]
    watcher = threading.Thread(target=_watch_peak, args=(process.pid, own_peak), daemon=True)
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    watcher.join()
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        sys.exit(f"fleet run failed with exit {os.waitstatus_to_exitcode(status)}")
    return (json.loads(report.read_text()), wall, own_peak[0], usage.ru_maxrss / 1024,
            usage.ru_utime + usage.ru_stime)


def _watch_peak(pid: int, peak: list) -> None:
    """VmHWM of the process itself (wait4's ru_maxrss also covers its children), read until it ends."""
    while True:
        try:
            value = peak_rss_mib(pid)
        except (OSError, ValueError):
            return
        if value == value:  # a process that ended (a zombie) has no VmHWM: keep the last figure
            peak[0] = value
        time.sleep(0.1)


def created_before(home: Path) -> dict | None:
    """The `fleet create` figures of a kept state directory, when they were saved."""
    path = home / "create.json"
    return json.loads(path.read_text()) if path.exists() else None


def raw_handshake_rate(ready: dict, work: Path, clients: int, seconds: float) -> float:
    """File-key OpenSSL (CPython ssl) mTLS handshakes/s against the emulator's device port."""
    chain, key = TestCA("bench-file-root").issue_leaf("bench-file-leaf").write(work, "file-leaf")
    context = client_context(ready["ca_cert"], chain, key)
    port = int(ready["device_url"].rsplit(":", 1)[1])
    ok, failed, elapsed = run_clients(clients, seconds, lambda i: handshake_once(port, context))
    return ok / elapsed


def raw_sign_rate(home: str, seconds: float) -> float:
    """SoftHSM ECDSA P-256 signatures/s with the key handle known (one device key, one session)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_sign_child, (home, seconds))


def _sign_child(home: str, seconds: float) -> float:
    from pkcs11 import Mechanism, ObjectClass

    from hsm_setup import devices, module, tokens
    from hsm_setup.context import Pkcs11Context

    record = devices.list_devices(Path(home))[0]
    module_path = module.resolve_module(None, Path(home))
    session = tokens.session(Pkcs11Context(Path(home)).library(module_path), record.token_label, PIN)
    key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=record.key_id)
    data = os.urandom(32)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        key.sign(data, mechanism=Mechanism.ECDSA)
        count += 1
    return count / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--per-token", type=int, default=None,
                        help="devices per shard token (default: hsm-setup fleet create's)")
    parser.add_argument("--jobs", type=int, default=2, help="fleet create worker processes")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each raw-limit measurement")
    parser.add_argument("--token-batch", type=int, default=None,
                        help="fleet run --token-batch (default: its own; 0 loads every token at once)")
    parser.add_argument("--keep", metavar="DIR", help="use (and keep) this state directory")
    args = parser.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-fleet-"))
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "PKCS11_MODULE")}
    env.update(DEVICE_SIM_HOME=str(home), PKCS11_PIN=PIN, PKCS11_SO_PIN=SO_PIN)

    total_started = time.perf_counter()
    if (home / "pki" / "devices.sqlite").exists():  # --keep DIR of an earlier run: register again
        before = created_before(home)
        create_s = before["seconds"] if before and before["count"] == args.count else float("nan")
    else:
        create_s = create_fleet(env, args.count, args.per_token, args.jobs)
        (home / "create.json").write_text(json.dumps({"count": args.count, "seconds": create_s, "jobs": args.jobs}))
    running = Emulator.spawn(home, "--retry-after", "0", "--assignment-delay", "0", "--no-mqtt",
                             "--max-connections", "1024", env=env)
    emulator, ready = running.process, running.ready
    try:
        cli(env, "device_sim.cli", "stub", "ca", "upload", "root", home / "pki" / "ca" / "root" / "cert.pem", "--verified")
        cli(env, "device_sim.cli", "stub", "group", "create", "bench", "--ca-ref", "root")
        emulator_cpu = cpu_seconds(emulator.pid)
        report, run_wall, fleet_rss, with_children_rss, fleet_cpu = fleet_run(
            env, args.concurrency, args.count, work / "report.json", args.token_batch)
        emulator_cpu = cpu_seconds(emulator.pid) - emulator_cpu
        total_s = time.perf_counter() - total_started
        emulator_rss = peak_rss_mib(emulator.pid)
        handshakes = raw_handshake_rate(ready, work, args.concurrency, args.seconds)
    finally:
        running.stop()
    signs = raw_sign_rate(str(home), args.seconds)

    summary = report["summary"]
    rate = summary["registrations_per_s"]
    total = summary["latency_ms"]["total_ms"]
    from hsm_setup import devices as registry  # after the run: the registry tells the real shard size
    per_token = args.count / max(1, len(registry.count_by_token(home, prefix="bench-", limit=args.count)))
    print(f"devices {args.count}, concurrency {args.concurrency}, {per_token:.0f} per shard token, "
          f"{os.cpu_count()} cores")
    print(f"fleet create: {create_s:.1f} s ({args.count / create_s:.1f} identities/s, {args.jobs} jobs)"
          + (" (made by an earlier run of this --keep DIR)" if args.keep else ""))
    print(f"fleet run:    {rate} registrations/s over {summary['wall_s']} s "
          f"(process wall {run_wall:.1f} s incl. start-up)")
    batches = report["settings"].get("token_batches")
    print(f"  SoftHSM token batches: {batches} of about {report['settings'].get('token_batch')} identities, "
          f"{report['settings'].get('token_switch_s')} s switching" if batches else
          "  SoftHSM token batches: none (every token loaded at once)")
    print("  latency ms  " + "  ".join(f"{k:>7}" for k in ("p50", "p90", "p99", "max")))
    for phase, stats in summary["latency_ms"].items():
        print(f"  {phase:<11} " + "  ".join(f"{stats[k] if stats[k] is not None else '-':>7}"
                                            for k in ("p50", "p90", "p99", "max")))
    print(f"  outcomes {summary['outcomes']}, errors {summary['errors'] or 'none'}, retries {summary['retries']}")
    print("raw limits measured in the same run:")
    print(f"  file-key mTLS handshakes/s, {args.concurrency} clients: {handshakes:.1f} "
          f"-> fleet/raw = {rate / handshakes:.2f}")
    print(f"  SoftHSM ECDSA P-256 signs/s (handle known): {signs:.0f} -> fleet/raw = {rate / signs:.3f}")
    print(f"CPU per registration: fleet process {fleet_cpu / args.count * 1000:.2f} ms "
          f"(incl. start-up), emulator {emulator_cpu / args.count * 1000:.2f} ms")
    print(f"peak RSS: fleet process {fleet_rss:.0f} MiB ({with_children_rss:.0f} MiB with its token-slot child), "
          f"emulator {emulator_rss:.0f} MiB")
    print(f"throughput: {summary['throughput']['explanation']}")
    print(f"end to end (create + serve + register): {total_s:.1f} s")
    print(f"targets: >= 300 registrations/s: {'met' if rate >= 300 else 'NOT met'}; "
          f"p99 total <= 1000 ms: {'met' if total['p99'] <= 1000 else 'NOT met'}; "
          f"zero errors: {'met' if summary['outcomes'] == {'assigned': args.count} else 'NOT met'}; "
          f"fleet RSS <= 1 GiB: {'met' if fleet_rss <= 1024 else 'NOT met'}")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
