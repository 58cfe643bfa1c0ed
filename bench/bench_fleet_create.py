#!/usr/bin/env python3
"""Benchmark: device identities per second of `hsm-setup fleet create`, beside the raw
SoftHSM token key-generation rate measured in the same run.

Everything happens in a temporary state directory (removed afterwards unless --keep):

  raw keygen      EC P-256 key pairs generated as token objects with the same
                  template hsm_setup uses, nothing else (the token's limit);
  floor           raw keygen + writing one certificate object per key: the token work
                  an identity cannot avoid (private key, public key, certificate);
  fleet create    the real CLI (`hsm-setup fleet create --count N`, a subprocess),
                  rate of identities from its JSON summary;
  with --jobs J > 1 also the raw rate of J processes generating keys at once.

The raw rate is measured before and after the fleet run; the mean is the reference.
Because a shared machine's load changes within seconds, the run also measures an
"interleaved" pair: fleet creation in chunks (the same `create_fleet` code, in this
process) alternating with raw key generation chunks, so both see the same load.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hsm_setup import ca, certificates, keys, module, tokens
from hsm_setup.context import Pkcs11Context
from hsm_setup.key_types import key_spec

PIN = "1234"
SO_PIN = "bench-so-pin"
SPEC = key_spec("ec-p256")


def raw_keygen_rate(module_path: str, home: str, label: str, count: int, *, with_cert: bytes | None = None) -> float:
    """Key pairs (optionally + one certificate object each) per second on token `label`."""
    lib = Pkcs11Context(Path(home)).library(module_path)
    session = tokens.session(lib, label, PIN)
    from asn1crypto import x509 as asn1_x509
    cert = asn1_x509.Certificate.load(with_cert) if with_cert else None
    started = time.perf_counter()
    for n in range(count):
        key_id = keys.new_key_id()
        keys.generate_keypair(session, SPEC, key_id=key_id, label=f"{label}-{n}")
        if cert is not None:
            certificates.store_on_token(session, cert, key_id=key_id, label=f"{label}-{n}")
    return count / (time.perf_counter() - started)


def _raw_worker(args) -> float:
    return raw_keygen_rate(*args)


def parallel_raw_rate(module_path: str, home: Path, labels: list[str], count: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(len(labels)) as pool:
        started = time.perf_counter()
        pool.map(_raw_worker, [(module_path, str(home), label, count) for label in labels])
        return len(labels) * count / (time.perf_counter() - started)


def interleaved_rates(module_path: str, home: Path, count: int, chunk: int = 25) -> tuple[float, float]:
    """(fleet identities/s, raw keygen/s) measured in alternating chunks."""
    from hsm_setup import fleet
    lib = Pkcs11Context(home).library(module_path)
    issuer = ca.open_issuer(lib, home, "factory", PIN)
    ids = fleet.fleet_ids("inter-", count)
    fleet_seconds = raw_seconds = 0.0
    for start in range(0, count, chunk):
        part = ids[start:start + chunk]
        result = fleet.create_fleet(lib, home, ids=part, issuer=issuer, spec=SPEC, pin=PIN,
                                    ca_pin=PIN, so_pin=lambda: SO_PIN, days=30, per_token=count,
                                    token_prefix="inter", progress=False)
        fleet_seconds += result.seconds
        raw_seconds += len(part) / raw_keygen_rate(module_path, str(home), "raw-i", len(part))
    return count / fleet_seconds, count / raw_seconds


def fleet_rate(home: Path, count: int, jobs: int, prefix: str, token_prefix: str) -> dict:
    env = dict(os.environ, DEVICE_SIM_HOME=str(home), PKCS11_PIN=PIN, PKCS11_SO_PIN=SO_PIN)
    cli = Path(sys.executable).with_name("hsm-setup")
    command = [str(cli) if cli.exists() else "hsm-setup", "fleet", "create", "--count", str(count),
               "--prefix", prefix, "--ca", "factory", "--jobs", str(jobs),
               "--per-token", str(math.ceil(count / jobs)), "--token-prefix", token_prefix,
               "--no-progress", "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"fleet create failed: {done.stderr.strip()}")
    summary = json.loads(done.stdout)
    return {"count": summary["count"], "seconds": summary["seconds"], "per_second": summary["per_second"],
            "wall_seconds": round(wall, 3), "wall_per_second": round(summary["count"] / wall, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500, help="identities per fleet run (default 500)")
    parser.add_argument("--raw", type=int, default=150, help="key pairs per raw measurement (default 150)")
    parser.add_argument("--jobs", default="1,2", help="comma-separated --jobs values to run (default 1,2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    job_values = [int(j) for j in args.jobs.split(",")]

    home = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        module_path = module.resolve_module(None, home)
        lib = Pkcs11Context(home).library(module_path)
        raw_labels = ["raw-a", "raw-b", "raw-i", "floor"] + [f"par-{n}" for n in range(max(job_values))]
        for label in ["ca", *raw_labels]:
            tokens.init_token(lib, label, so_pin=SO_PIN, user_pin=PIN)
        ca.create_ca(lib, home, "root", parent=None, spec=SPEC, days=30, token_label="ca", pin=PIN)
        factory = ca.create_ca(lib, home, "factory", parent="root", spec=SPEC, days=30,
                               token_label="ca", pin=PIN)

        results: dict = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}}
        raw_before = raw_keygen_rate(module_path, str(home), "raw-a", args.raw)
        floor = raw_keygen_rate(module_path, str(home), "floor", args.raw, with_cert=factory.certificate)
        runs = {}
        for jobs in job_values:
            runs[jobs] = fleet_rate(home, args.count, jobs, prefix=f"bench-j{jobs}-", token_prefix=f"j{jobs}")
            if jobs > 1:
                runs[jobs]["raw_parallel_per_second"] = round(
                    parallel_raw_rate(module_path, home, [f"par-{n}" for n in range(jobs)], args.raw), 2)
        raw_after = raw_keygen_rate(module_path, str(home), "raw-b", args.raw)
        raw = (raw_before + raw_after) / 2
        inter_fleet, inter_raw = interleaved_rates(module_path, home, args.count)
        results.update({
            "raw_keygen_per_second": round(raw, 2),
            "raw_keygen_before_after": [round(raw_before, 2), round(raw_after, 2)],
            "floor_keygen_plus_cert_per_second": round(floor, 2),
            "interleaved": {"fleet_per_second": round(inter_fleet, 2), "raw_per_second": round(inter_raw, 2),
                            "ratio": round(inter_fleet / inter_raw, 3)},
            "fleet": {str(j): dict(r, ratio_to_raw=round(r["per_second"] / raw, 3),
                                   ratio_to_floor=round(r["per_second"] / floor, 3),
                                   **({"ratio_to_raw_parallel": round(r["per_second"] / r["raw_parallel_per_second"], 3)}
                                      if "raw_parallel_per_second" in r else {}))
                      for j, r in runs.items()},
        })
        results["machine"]["load_after"] = os.getloadavg()[0]
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            _print_table(results, args.count)
    finally:
        if args.keep:
            print(f"state directory kept: {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)
    return 0


def _print_table(results: dict, count: int) -> None:
    raw = results["raw_keygen_per_second"]
    print(f"bench_fleet_create: fleet create --count {count} vs SoftHSM raw token keygen (EC P-256)")
    print(f"  cpus {results['machine']['cpus']}, load average {results['machine']['load_before']:.1f}"
          f" -> {results['machine']['load_after']:.1f}")
    print(f"  raw token keygen, 1 process          {raw:8.1f} /s   (before {results['raw_keygen_before_after'][0]:.1f},"
          f" after {results['raw_keygen_before_after'][1]:.1f})")
    print(f"  floor: keygen + 1 certificate object {results['floor_keygen_plus_cert_per_second']:8.1f} /s"
          f"   ratio to raw {results['floor_keygen_plus_cert_per_second'] / raw:.2f}")
    for jobs, run in results["fleet"].items():
        line = (f"  fleet create --jobs {jobs:<2}              {run['per_second']:8.1f} /s   "
                f"ratio to raw {run['ratio_to_raw']:.2f}, to floor {run['ratio_to_floor']:.2f}")
        if "raw_parallel_per_second" in run:
            line += (f"; raw keygen with {jobs} processes {run['raw_parallel_per_second']:.1f} /s,"
                     f" ratio {run['ratio_to_raw_parallel']:.2f}")
        print(line)
        print(f"      (whole command incl. start-up and token init: {run['wall_per_second']:.1f} /s)")
    inter = results["interleaved"]
    print(f"  interleaved chunks (same load): fleet {inter['fleet_per_second']:.1f} /s,"
          f" raw keygen {inter['raw_per_second']:.1f} /s, ratio {inter['ratio']:.2f}")
    print("  target: fleet rate >= 0.8 x raw keygen rate")


if __name__ == "__main__":
    sys.exit(main())
