"""Issue 12, item 4: a fleet registers while a plan injects 20% 503 on register, 10%
connections closed after the request and a 3 s outage; every device ends assigned or
with a stated cause, and the run reconciles against the emulator's records and the rule
counters (zero lost, zero registered twice beyond what the faults forced). Shard tokens
from `hsm-setup fleet create` (one module-scoped fleet of 1,000), the emulator and the fleet
as subprocesses, as a user runs them. bench/bench_faults.py runs the same beside a clean run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from device_sim.fleet.reconcile import reconcile
from device_sim.testing import Emulator
from stub_server.emulator_proc import REPO, stub_admin

COUNT = 1000
PIN, SO_PIN = "1234", "87654321"
PLAN = {"seed": 12, "rules": [
    {"match": {"operation": "register"}, "probability": 0.2, "action": {"status": 503, "retry_after": 1}},
    {"match": {"operation": ["register", "poll"]}, "probability": 0.1, "action": {"close": "after_request"}},
    {"match": {}, "window": {"start_s": 1, "duration_s": 3}, "action": {"refuse_connections": True}},
]}


def run(env, program, *args, timeout=300):
    result = subprocess.run([sys.executable, "-m", program, *map(str, args)], capture_output=True,
                            text=True, cwd=REPO, env=env, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("fault-fleet")
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env.update(DEVICE_SIM_HOME=str(home), PKCS11_PIN=PIN, PKCS11_SO_PIN=SO_PIN)
    for args in (("token", "init", "ca"), ("ca", "create", "root"),
                 ("fleet", "create", "--count", COUNT, "--prefix", "ff-", "--ca", "root",
                  "--per-token", 250, "--no-progress")):
        assert run(env, "device_sim.cli.hsm_setup", *args).returncode == 0
    emulator = Emulator.spawn(home, "--retry-after", "0", "--assignment-delay", "0", "--max-connections", "1024")
    stub_admin(emulator, "ca", "upload", "root", home / "pki" / "ca" / "root" / "cert.pem", "--verified")
    stub_admin(emulator, "group", "create", "all", "--ca-ref", "root")
    yield home, env, emulator
    emulator.stop()


def test_nothing_is_lost_or_doubled_under_faults(world, tmp_path):
    home, env, emulator = world
    plan_file, report_file = tmp_path / "plan.json", tmp_path / "report.json"
    plan_file.write_text(json.dumps(PLAN))
    stub_admin(emulator, "faults", "set", plan_file)  # the outage counts from now
    started = time.monotonic()
    result = run(env, "device_sim.cli", "fleet", "run", "--emulator", "--no-progress", "--prefix", "ff-",
                 "--concurrency", 64, "--rate", 200, "--timeout", 60, "--json", report_file)
    assert time.monotonic() - started > 4  # the run lasted past the outage window
    report = json.loads(report_file.read_text())
    plan_report = json.loads(stub_admin(emulator, "faults", "show", "--json").stdout)
    stub_admin(emulator, "faults", "clear")
    records = json.loads(stub_admin(emulator, "registration", "list", "--json").stdout)

    figures = reconcile(report["devices"], records, plan_report)
    assert figures["devices"] == COUNT and figures["lost"] == [] and figures["unstated"] == []
    # Every device rides the faults out: resets during the handshake are retried causes.
    others = [(d["status"], d["error_message"]) for d in report["devices"] if d["status"] != "assigned"]
    assert figures["assigned"] == COUNT, (figures, others)
    assert figures["records"] == figures["assigned"]
    # Every register call the emulator processed beyond one per device had its answer dropped.
    assert figures["extra_register_calls"] == figures["forced_by_faults"] > 0
    assert figures["doubled_beyond_faults"] == 0

    fired = [rule["fired"] for rule in plan_report["rules"]]
    assert all(fired), plan_report  # each fault happened
    by_cause = report["summary"]["retries_by_cause"]
    assert by_cause.get("server_error", 0) == plan_report["rules"][0]["fired"]
    # Every answer the plan dropped is one `dropped` retry of the flow, none hidden in the
    # transport (a kept-alive connection the server closed before a request went is
    # reopened silently, but the emulator's 60 s idle timeout never passes in this run).
    assert by_cause.get("dropped", 0) == plan_report["rules"][1]["fired"]
    assert by_cause.get("reset", 0) + by_cause.get("refused", 0) + by_cause.get("tls_eof", 0) > 0
    assert "retries:" in result.stdout and "server_error" in result.stdout


def register_calls(emulator) -> int:
    return sum(r["registerRequests"] for r in json.loads(stub_admin(emulator, "registration", "list", "--json").stdout))


def test_a_plan_set_while_the_fleet_registers_applies_at_once(world, tmp_path):
    home, env, emulator = world
    before = {r["registrationId"]: r["registerRequests"]
              for r in json.loads(stub_admin(emulator, "registration", "list", "--json").stdout)}
    report_file, plan_file = tmp_path / "report.json", tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"seed": 5, "rules": [
        {"match": {"operation": "register"}, "probability": 0.5, "action": {"status": 503, "retry_after": 1}}]}))
    fleet = subprocess.Popen([sys.executable, "-m", "device_sim.cli", "fleet", "run", "--emulator", "--no-progress",
                              "--prefix", "ff-", "--concurrency", "32", "--rate", "100", "--json", str(report_file)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while register_calls(emulator) - sum(before.values()) < 50:  # some devices are through
        assert time.monotonic() < deadline and fleet.poll() is None
        time.sleep(0.2)
    stub_admin(emulator, "faults", "set", plan_file)  # the rest still to come
    out, err = fleet.communicate(timeout=120)
    assert fleet.returncode == 0 and "Traceback" not in err, err
    plan_report = json.loads(stub_admin(emulator, "faults", "show", "--json").stdout)
    stub_admin(emulator, "faults", "clear")
    report = json.loads(report_file.read_text())
    rule = plan_report["rules"][0]
    assert 0 < rule["matched"] < COUNT + rule["fired"]  # only the registers after the change
    assert rule["fired"] > 0
    assert report["summary"]["retries_by_cause"].get("server_error") == rule["fired"]
    records = [{**r, "registerRequests": r["registerRequests"] - before.get(r["registrationId"], 0)}
               for r in json.loads(stub_admin(emulator, "registration", "list", "--json").stdout)]
    figures = reconcile(report["devices"], records, plan_report)
    assert figures["assigned"] == COUNT and figures["lost"] == [] and figures["doubled_beyond_faults"] == 0
    # The devices through before the change saw no fault.
    clean = [d for d in report["devices"] if not d["retries_by_cause"]]
    assert len(clean) >= 50
