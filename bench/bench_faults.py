"""Benchmark of a fleet under faults (issue 12, item 4): 1,000 token-backed devices
register through the emulator twice, once clean and once while a fault plan injects 20%
503 on register, 10% connections closed after the request and a 3 s outage. Each run is
reconciled against the emulator's registration records and the rule counters
(`device_sim.fleet.reconcile`); the faulted run's figures are printed beside the clean
one's, as a ratio.

    .venv/bin/python bench/bench_faults.py [--count 1000] [--concurrency 64] [--rate 200]
                                           [--transport https|mqtt]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_sim.fleet.reconcile import reconcile  # noqa: E402

PIN, SO_PIN = "1234", "bench-so-pin"
PLAN = {"seed": 12, "rules": [
    {"match": {"operation": "register"}, "probability": 0.2, "action": {"status": 503, "retry_after": 1}},
    {"match": {"operation": ["register", "poll"]}, "probability": 0.1, "action": {"close": "after_request"}},
    {"match": {}, "window": {"start_s": 2, "duration_s": 3}, "action": {"refuse_connections": True}},
]}


def cli(env, *args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} failed: {result.stderr}")
    return result


def stub(env, home: Path, *args) -> subprocess.CompletedProcess:
    return cli(env, "device_sim.cli", "stub", *args, "--home", home)


def start_emulator(env, home: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "device_sim.cli", "stub", "serve", "--home", str(home), "--retry-after", "0",
         "--assignment-delay", "0", "--mqtt-port", "0", "--amqp-port", "0", "--max-connections", "1024"],
        stdout=subprocess.PIPE, stderr=open(home / "serve.log", "ab"), text=True, cwd=ROOT, env=env)
    if not process.stdout.readline():
        sys.exit(f"emulator did not start: {(home / 'serve.log').read_text()}")
    return process


def one_run(env, home: Path, args, plan: dict | None) -> dict:
    """Register the whole fleet and reconcile; the figures. Records stay between runs, so
    the register calls of this run are the counts now less the counts before it.

    The plan is set once the first device of the run registered: its outage window counts
    from then, so it meets devices however long the fleet's start-up (token logins, 1,000
    identities) takes on a loaded machine."""
    from device_sim.stub.admin import ServiceClient, find_endpoint

    service = ServiceClient(find_endpoint(home))
    before = {r["registrationId"]: r.get("registerRequests", 1) for r in service.registration_list()}
    stub(env, home, "faults", "clear")
    report_file = home / "report.json"
    report_file.unlink(missing_ok=True)
    argv = ["device_sim.cli", "fleet", "run", "--emulator", "--no-progress", "--prefix", "bf-",
            "--transport", args.transport, "--concurrency", args.concurrency, "--rate", args.rate,
            "--timeout", args.timeout, "--json", report_file]
    started = time.perf_counter()
    fleet = subprocess.Popen([sys.executable, "-m", *map(str, argv)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if plan is not None:
        calls_before = sum(before.values())
        while sum(r.get("registerRequests", 1) for r in service.registration_list()) <= calls_before:
            if fleet.poll() is not None:
                sys.exit(f"fleet run ended before any device registered: {fleet.stderr.read()}")
            time.sleep(0.05)
        service.faults_set(plan)
    _finish(fleet, args.timeout + args.count / args.rate + 180, report_file)
    wall = time.perf_counter() - started
    plan_report = service.faults_show()
    service.faults_clear()
    records = [{**r, "registerRequests": r.get("registerRequests", 1) - before.get(r["registrationId"], 0)}
               for r in service.registration_list()]
    report = json.loads(report_file.read_text())
    return {"wall_s": wall, "summary": report["summary"], "plan": plan_report,
            "reconciled": reconcile(report["devices"], records, plan_report)}


def _finish(fleet: subprocess.Popen, timeout: float, report_file: Path) -> None:
    try:
        _, err = fleet.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Seen once on this machine: `fleet run` wrote its report, then hung in exit()
        # (awscrt's event loop unloading SoftHSM while the main thread ran the exit
        # handlers). The figures are in the report; the hang is said, not hidden.
        fleet.kill()
        fleet.communicate()
        if not report_file.exists():
            sys.exit(f"fleet run did not end within {timeout:.0f} s")
        print(f"note: fleet run did not exit within {timeout:.0f} s after writing its report; killed")
        return
    if fleet.returncode not in (0, 1):  # 1: some device not assigned, which the figures show
        sys.exit(f"fleet run failed: {err}")


def show(clean: dict, faulted: dict) -> None:
    c, f = clean["summary"], faulted["summary"]
    print(f"\n{'':28}{'clean':>10}{'faults':>10}{'ratio':>8}")

    def row(name, a, b):
        ratio = f"{b / a:.2f}" if isinstance(a, (int, float)) and a else "-"
        print(f"{name:28}{a!s:>10}{b!s:>10}{ratio:>8}")

    row("wall s", round(clean["wall_s"], 1), round(faulted["wall_s"], 1))
    row("registrations/s", c["registrations_per_s"], f["registrations_per_s"])
    for phase in ("total_ms", "register_ms", "wait_ms"):
        for pct in ("p50", "p90", "p99"):
            row(f"{phase.removesuffix('_ms')} {pct} ms", c["latency_ms"][phase][pct], f["latency_ms"][phase][pct])
    row("retries", c["retries"], f["retries"])
    print(f"\nretries by cause (faults): {f['retries_by_cause']}")
    print(f"outcomes: clean {c['outcomes']}, faults {f['outcomes']}")
    for rule in faulted["plan"]["rules"]:
        print(f"rule {rule['index']}: matched {rule['matched']}, fired {rule['fired']} {rule['firedByOperation']}"
              f"  {json.dumps(rule['action'])}")
    for name, run in (("clean", clean), ("faults", faulted)):
        r = run["reconciled"]
        print(f"reconciled ({name}): {r['assigned']}/{r['devices']} assigned, records {r['records']}, "
              f"lost {len(r['lost'])}, unstated {len(r['unstated'])}, register calls {r['register_calls']} "
              f"(extra {r['extra_register_calls']}, forced by faults {r['forced_by_faults']}, "
              f"doubled beyond faults {r['doubled_beyond_faults']}), not assigned {r['not_assigned_by_status']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=200, help="devices started per second")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--per-token", type=int, default=250)
    parser.add_argument("--transport", choices=("https", "mqtt"), default="https")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        home = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
        env.update(DEVICE_SIM_HOME=str(home), PKCS11_PIN=PIN, PKCS11_SO_PIN=SO_PIN)
        started = time.perf_counter()
        cli(env, "device_sim.cli.hsm_setup", "token", "init", "ca")
        cli(env, "device_sim.cli.hsm_setup", "ca", "create", "root")
        cli(env, "device_sim.cli.hsm_setup", "fleet", "create", "--count", args.count, "--prefix", "bf-",
            "--ca", "root", "--per-token", args.per_token, "--no-progress")
        print(f"{args.count} identities in {time.perf_counter() - started:.1f} s; "
              f"{args.transport}, concurrency {args.concurrency}, rate {args.rate}/s")
        emulator = start_emulator(env, home)
        try:
            stub(env, home, "ca", "upload", "root", home / "pki" / "ca" / "root" / "cert.pem", "--verified")
            stub(env, home, "group", "create", "all", "--ca-ref", "root")
            clean = one_run(env, home, args, None)
            faulted = one_run(env, home, args, PLAN)
        finally:
            emulator.terminate()
            emulator.wait(15)
    show(clean, faulted)


if __name__ == "__main__":
    main()
