"""`device-sim fleet run` end to end: shard tokens made by `hsm-setup fleet create`, the
emulator as a subprocess, the fleet as a subprocess (as a user runs them)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from device_sim.common.errors import UserError
from device_sim.testing import StateDir, fleet_emulator, fleet_world
from stub_server.emulator_proc import REPO, stub_admin

FLEET = [f"fl-{n:04d}" for n in range(1, 11)]


def fleet_run(state, *args, **kw):
    return state.device_sim("fleet", "run", "--emulator", "--no-progress", *args, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """10 fleet devices on 3 shard tokens under root -> int (root verified, group on root),
    plus 'rogue-1' under a root the emulator does not know."""
    home = tmp_path_factory.mktemp("fleet-home")
    state = StateDir(home, cwd=REPO)
    state.hsm_setup("token", "init", "devices")
    fleet_world(state, len(FLEET), "fl-", cas=("root", "int"), per_token=4)
    state.hsm_setup("ca", "create", "other-root")
    state.hsm_setup("device", "create", "rogue-1", "--ca", "other-root", "--token", "devices")
    emulator = fleet_emulator(state, "--retry-after", "0", "--assignment-delay", "0")  # same state dir: --emulator finds it
    yield home, state, emulator
    emulator.stop()


def test_every_device_assigned_with_json_report_and_plot(world, tmp_path):
    home, state, _ = world
    report, plot = tmp_path / "report.json", tmp_path / "plot.html"
    result = fleet_run(state, "--prefix", "fl-", "--concurrency", 4, "--json", report, "--plot", plot)
    assert "registrations/s" in result.stdout and "assigned 10" in result.stdout
    data = json.loads(report.read_text())
    assert sorted(d["registration_id"] for d in data["devices"]) == FLEET
    assert {d["status"] for d in data["devices"]} == {"assigned"}
    assert all(d["tls_ms"] > 0 and d["register_ms"] > 0 and d["total_ms"] >= d["tls_ms"]
               for d in data["devices"])
    summary = data["summary"]
    assert summary["outcomes"] == {"assigned": 10} and sum(summary["hubs"].values()) == 10
    for phase in ("tls_ms", "register_ms", "wait_ms", "total_ms"):
        assert summary["latency_ms"][phase]["count"] == 10
    assert data["settings"]["concurrency"] == 4
    assert plot.read_text().count("<svg") == 2


def test_failures_are_reported_by_outcome_and_do_not_stop_the_rest(world, tmp_path):
    home, state, emulator = world
    stub_admin(emulator, "enroll", "create", "fl-0003", "--cert", home / "pki" / "devices" / "fl-0003.pem", "--disabled")
    listing = tmp_path / "devices.txt"
    uri = json.loads(state.hsm_setup("device", "show", "fl-0002", "--json").stdout)["uri"]
    listing.write_text(f"# a device list\nfl-0001\n{uri}\nfl-0003\nrogue-1\nFL-0004\n")
    report = tmp_path / "report.json"
    try:
        result = fleet_run(state, "--devices", listing, "--concurrency", 2, "--json", report, check=False)
    finally:
        stub_admin(emulator, "enroll", "delete", "fl-0003")
    assert result.returncode == 1, result.stderr
    data = json.loads(report.read_text())
    summary = data["summary"]
    assert summary["outcomes"] == {"assigned": 3, "disabled": 1, "unauthorized": 1}
    assert summary["errors"] == {"401002": 1}
    # Every failed device is listed with its status and message, in the JSON and the text.
    failed = {f["registration_id"]: f for f in data["failed"]}
    assert {rid: f["status"] for rid, f in failed.items()} == {"fl-0003": "disabled", "rogue-1": "unauthorized"}
    assert all(f["error_message"] for f in failed.values())
    assert "failed devices (2 of 2 shown):" in result.stdout
    assert "  rogue-1  unauthorized 401002: " in result.stdout and "  fl-0003  disabled" in result.stdout
    # Percentiles per outcome: failures have their own, and are not in the assigned ones.
    by_outcome = summary["latency_ms_by_outcome"]
    assert by_outcome["assigned"]["total_ms"]["count"] == 3 == summary["latency_ms"]["total_ms"]["count"]
    assert by_outcome["unauthorized"]["total_ms"]["count"] == 1 and by_outcome["unauthorized"]["total_ms"]["p50"] > 0
    assert "latency ms, unauthorized (1)" in result.stdout


def test_records_file_beside_the_json_has_one_line_per_device(world, tmp_path):
    _, state, _ = world
    report = tmp_path / "run.json"
    result = fleet_run(state, "--prefix", "fl-", "--concurrency", 3, "--json", report)
    records_path = tmp_path / "run.jsonl"
    lines = records_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted(r["registration_id"] for r in records) == FLEET
    # The world's emulator says Retry-After: 0, so each device polls once without waiting.
    assert all(r["status"] == "assigned" and r["total_ms"] > 0 and r["polls"] >= 1 and r["poll_wait_ms"] == 0
               for r in records)
    data = json.loads(report.read_text())
    assert data["records"] == str(records_path) and data["settings"]["records"] == str(records_path)
    assert data["devices"] == records and data["failed"] == []
    assert data["summary"]["latency_ms"]["total_ms"]["max"] == round(max(r["total_ms"] for r in records), 1)
    assert f"records: {records_path}" in result.stdout


def test_without_json_the_records_go_under_the_state_directory(world, tmp_path):
    home, state, _ = world
    result = fleet_run(state, "--prefix", "fl-", "--limit", 3)
    latest = home / "fleet-runs" / "latest.jsonl"
    named = latest.resolve()
    assert named.parent == (home / "fleet-runs").resolve() and named.name != "latest.jsonl"
    assert f"records: {home / 'fleet-runs' / named.name}" in result.stdout
    assert len(latest.read_text().splitlines()) == 3
    fleet_run(state, "--prefix", "fl-", "--limit", 2)
    assert latest.resolve() != named and len(named.read_text().splitlines()) == 3  # a run never overwrites another


def test_ramp_starts_devices_slower_at_first(world, tmp_path):
    _, state, _ = world
    report = tmp_path / "ramp.json"
    # 20/s reached after 1 s: the 10 devices all arrive during the ramp, the k-th at sqrt(k / 10) s
    # (at a constant 20/s the last would start at 0.45 s).
    fleet_run(state, "--prefix", "fl-", "--rate", 20, "--ramp", 1, "--json", report)
    data = json.loads(report.read_text())
    starts = sorted(d["started_s"] for d in data["devices"])
    assert all(start >= (k / 10) ** 0.5 - 0.02 for k, start in enumerate(starts)), starts
    assert starts[-1] >= 0.92 and data["settings"]["ramp"] == 1.0
    assert data["summary"]["throughput"]["bound"] in ("rate", "concurrency", "concurrency_x_retry_after")


def test_a_retry_after_bound_run_says_so(world, tmp_path):
    _, state, _ = world
    # An emulator of its own that answers every register with "assigning, Retry-After: 1".
    slow = fleet_emulator(state, "--retry-after", "1", "--assignment-delay", "0", home=tmp_path / "slow")
    try:
        report = tmp_path / "slow.json"
        result = state.device_sim("fleet", "run", "--no-progress", "--prefix", "fl-", "--concurrency", 2,
                                  "--endpoint", slow.device_url, "--id-scope", slow.id_scope, "--trust", slow.ca_cert,
                                  "--json", report)
    finally:
        slow.stop()
    throughput = json.loads(report.read_text())["summary"]["throughput"]
    assert throughput["bound"] == "concurrency_x_retry_after", throughput
    assert throughput["retry_after_s"] == 1.0 and throughput["poll_wait_share"] > 0.5
    assert ("10 devices at concurrency 2 with Retry-After 1 s: bounded by concurrency x retry-after (about 2/s"
            in result.stdout), result.stdout


def test_mqtt_transport(world, tmp_path):
    _, state, _ = world
    report = tmp_path / "report.json"
    fleet_run(state, "--prefix", "fl-", "--limit", 3, "--transport", "mqtt", "--json", report)
    assert json.loads(report.read_text())["summary"]["outcomes"] == {"assigned": 3}


def _etag(emulator, registration_id: str) -> str | None:
    try:
        return emulator.admin.get_registration(registration_id).get("etag")
    except UserError:
        return None


def test_ctrl_c_stops_cleanly_and_still_writes_the_report(world, tmp_path):
    _, state, emulator = world
    report = tmp_path / "report.json"
    before = _etag(emulator, FLEET[0])
    proc = subprocess.Popen([sys.executable, "-m", "device_sim.cli", "fleet", "run", "--emulator", "--no-progress",
                             "--prefix", "fl-", "--rate", "2", "--json", str(report)],
                            cwd=REPO, env=state.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Interrupt once the first device of this run is assigned (a fixed sleep raced start-up
    # on a loaded machine); at 2 arrivals/s most of the fleet is still to come.
    deadline = time.monotonic() + 30
    while _etag(emulator, FLEET[0]) == before and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    data = json.loads(report.read_text())
    outcomes = data["summary"]["outcomes"]
    assert data["summary"]["interrupted"] is True
    assert outcomes.get("assigned", 0) >= 1 and outcomes.get("cancelled", 0) >= 1
    assert set(outcomes) <= {"assigned", "cancelled"}
    assert "Traceback" not in err


@pytest.mark.parametrize("transport", ["https", "mqtt"])
def test_token_batches_load_a_few_tokens_at_a_time_and_leave_no_view(world, tmp_path, transport):
    """10 devices on shards of 4, 4 and 2: batches of 4 identities are one shard each."""
    home, state, _ = world
    report = tmp_path / "report.json"
    result = fleet_run(state, "--prefix", "fl-", "--concurrency", 3, "--token-batch", 4, "--json", report,
                       "--transport", transport)
    data = json.loads(report.read_text())
    assert data["summary"]["outcomes"] == {"assigned": 10}
    assert data["settings"]["token_batches"] == 3 and data["settings"]["token_batch"] == 4
    assert "token batches: 3 of about 4 identities" in result.stdout
    views = home / "softhsm" / ".device-sim-views"
    assert list(views.iterdir()) == []


def test_token_batch_0_loads_every_token_at_once(world, tmp_path):
    _, state, _ = world
    report = tmp_path / "report.json"
    result = fleet_run(state, "--prefix", "fl-", "--token-batch", 0, "--json", report)
    data = json.loads(report.read_text())
    assert data["summary"]["outcomes"] == {"assigned": 10}
    assert data["settings"]["token_batch"] == 0 and "token_batches" not in data["settings"]
    assert "token batches" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (("--token-batch", -1), "--token-batch must be 0"),
    (("--concurrency", 0), "--concurrency must be at least 1"),
    (("--rate", -1), "--rate must be a positive"),
    (("--ramp", 5), "--ramp needs --rate"),
    (("--rate", 5, "--ramp", 0), "--ramp must be a positive"),
    (("--records", "/nonexistent-dir/r.jsonl"), "the folder does not exist"),
    (("--json", "same.json", "--records", "same.json"), "the same file as --json"),
    (("--prefix", "nobody-"), "no devices with prefix 'nobody-'"),
    (("--plot", "x.bmp"), "name the file .html or .png"),
    (("--json", "/nonexistent-dir/r.json"), "the folder does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, args, message):
    _, state, _ = world
    result = fleet_run(state, *args, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
