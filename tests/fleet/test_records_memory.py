"""A fleet run's memory does not grow with its devices (issue 14, item 1).

The same `device-sim fleet run` (the real CLI, in a subprocess, against a real emulator,
SoftHSM shard tokens) runs 50 and then 400 devices under tracemalloc: the peak of the
Python heap may not grow by more than 1 KB per extra device. A per-device list of
anything the run makes (a record, a TLS identity, a registry row) costs more than that:
the run before this issue held ~4 KB per device (its device list, its results, its
report). The records file has one line per device and agrees with the summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from device_sim.testing import Emulator
from stub_server.emulator_proc import REPO, stub_admin

PIN, SO_PIN = "1234", "87654321"
SMALL, LARGE = 50, 400
PER_DEVICE_BYTES = 1024

# The interpreter's table of interned strings (pathlib interns every path part, so each
# device's file names pass through it) grows in one ~1 MB step somewhere between a few
# hundred and a thousand devices, then stays (measured: 18.41 / 19.03 / 19.07 MB peak at
# 100 / 400 / 1,000 devices). Growing it before tracing starts keeps that step out.
TRACED_RUN = """
import sys, tracemalloc
warm = [sys.intern(f"warm-up-{n}") for n in range(200_000)]
del warm
tracemalloc.start()
from device_sim.cli.main import main
try:
    code = main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as out:
        out.write(str(tracemalloc.get_traced_memory()[1]))
sys.exit(code)
"""


def cli(env, *args, program="device_sim.cli.hsm_setup"):
    done = subprocess.run([sys.executable, "-m", program, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    home = tmp_path_factory.mktemp("memory-home")
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "PKCS11_MODULE")}
    env.update(DEVICE_SIM_HOME=str(home), PKCS11_PIN=PIN, PKCS11_SO_PIN=SO_PIN)
    cli(env, "token", "init", "ca")
    cli(env, "ca", "create", "root")
    cli(env, "fleet", "create", "--count", LARGE, "--prefix", "mem-", "--ca", "root", "--jobs", 2, "--no-progress")
    emulator = Emulator.spawn(home, "--retry-after", "0", "--assignment-delay", "0", "--no-mqtt")
    stub_admin(emulator, "ca", "upload", "root", home / "pki" / "ca" / "root" / "cert.pem", "--verified")
    stub_admin(emulator, "group", "create", "all", "--ca-ref", "root")
    yield home, env
    emulator.stop()


def traced_run(env, tmp_path, count: int) -> tuple[int, dict, list[dict]]:
    """(peak traced bytes, --json summary, records) of a run of `count` devices."""
    peak, report = tmp_path / f"peak-{count}", tmp_path / f"run-{count}.json"
    done = subprocess.run([sys.executable, "-c", TRACED_RUN, str(peak), "fleet", "run", "--emulator", "--no-progress",
                           "--concurrency", "16", "--limit", str(count), "--json", str(report)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in report.with_suffix(".jsonl").read_text().splitlines()]
    return int(peak.read_text()), json.loads(report.read_text())["summary"], records


def test_memory_does_not_grow_with_the_fleet(fleet, tmp_path):
    _, env = fleet
    small_peak, small, small_records = traced_run(env, tmp_path, SMALL)
    large_peak, large, large_records = traced_run(env, tmp_path, LARGE)
    assert len(small_records) == SMALL and len(large_records) == LARGE
    assert len({r["registration_id"] for r in large_records}) == LARGE
    assert small["outcomes"] == {"assigned": SMALL} and large["outcomes"] == {"assigned": LARGE}
    assert large["latency_ms"]["total_ms"]["count"] == LARGE
    assert large["latency_ms"]["total_ms"]["max"] == round(max(r["total_ms"] for r in large_records), 1)
    growth = large_peak - small_peak
    print(f"peak Python heap: {small_peak} bytes at {SMALL} devices, {large_peak} at {LARGE}")
    assert growth < PER_DEVICE_BYTES * (LARGE - SMALL), (
        f"peak Python heap {small_peak / 1e6:.2f} MB at {SMALL} devices, {large_peak / 1e6:.2f} MB at {LARGE}: "
        f"{growth / (LARGE - SMALL):.0f} bytes per extra device")
