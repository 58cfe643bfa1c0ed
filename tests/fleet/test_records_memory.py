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

import pytest

from device_sim.testing import StateDir, fleet_emulator, fleet_world
from stub_server.emulator_proc import REPO

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


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    state = StateDir(tmp_path_factory.mktemp("memory-home"), without=("SOFTHSM2_CONF", "PKCS11_MODULE"),
                     cwd=REPO, timeout=600)
    fleet_world(state, LARGE, "mem-", extra=("--jobs", 2))
    emulator = fleet_emulator(state, "--retry-after", "0", "--assignment-delay", "0", "--no-mqtt")
    yield state
    emulator.stop()


def traced_run(state, tmp_path, count: int) -> tuple[int, dict, list[dict]]:
    """(peak traced bytes, --json summary, records) of a run of `count` devices."""
    peak, report = tmp_path / f"peak-{count}", tmp_path / f"run-{count}.json"
    state.python("-c", TRACED_RUN, peak, "fleet", "run", "--emulator", "--no-progress",
                 "--concurrency", 16, "--limit", count, "--json", report)
    records = [json.loads(line) for line in report.with_suffix(".jsonl").read_text().splitlines()]
    return int(peak.read_text()), json.loads(report.read_text())["summary"], records


def test_memory_does_not_grow_with_the_fleet(fleet, tmp_path):
    state = fleet
    small_peak, small, small_records = traced_run(state, tmp_path, SMALL)
    large_peak, large, large_records = traced_run(state, tmp_path, LARGE)
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
