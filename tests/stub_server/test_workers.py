"""`stub serve --workers N` (docs/scaling.md): real `stub serve` subprocesses, real TLS
clients on loopback, one SQLite store shared by the worker processes."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_sim.stub.core.quotas import Quotas
from device_sim.stub.core.store import OperationRow, RegistrationRow, Store
from device_sim.testing import Emulator, TestCA

API = "2021-06-01"
DEVICES = 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A root and DEVICES leaves below it, as file keys for `ssl`."""
    root = TestCA("workers-root")
    directory = tmp_path_factory.mktemp("workers-devices")
    devices = [root.issue_leaf(f"wdev-{i}").write(directory, f"wdev-{i}") for i in range(DEVICES)]
    return root, devices


@pytest.fixture
def emulator(tmp_path):
    with Emulator.spawn(tmp_path / "emu", "--workers", "2", "--retry-after", "0", "--no-amqp",
                        "--no-dashboard") as emu:
        yield emu


def register(emu: Emulator, chain: Path, key: Path, registration_id: str) -> tuple[int, dict]:
    """One registration on a new TLS connection: (HTTP status of the last answer, its body)."""
    context = ssl.create_default_context(cafile=str(emu.ca_cert))
    context.load_cert_chain(str(chain), str(key))
    connection = http.client.HTTPSConnection("localhost", emu.device_port, context=context, timeout=15)
    try:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        connection.request("PUT", f"/{emu.id_scope}/registrations/{registration_id}/register?api-version={API}",
                           body=json.dumps({"registrationId": registration_id}), headers=headers)
        response = connection.getresponse()
        status, reply = response.status, json.loads(response.read() or b"{}")
        for _ in range(50):
            if status != 202 or reply.get("status") != "assigning":
                break
            connection.request("GET", f"/{emu.id_scope}/registrations/{registration_id}/operations/"
                                      f"{reply['operationId']}?api-version={API}", headers=headers)
            response = connection.getresponse()
            status, reply = response.status, json.loads(response.read() or b"{}")
        return status, reply
    finally:
        connection.close()


def register_all(emu: Emulator, devices) -> list[tuple[int, dict]]:
    return [register(emu, chain, key, f"wdev-{i}") for i, (chain, key) in enumerate(devices)]


def worker_table(emu: Emulator, device_connections: int, deadline: float = 10.0) -> list[dict]:
    """`stub status`'s per-worker reports once they account for that many device connections."""
    ends = time.monotonic() + deadline
    while True:
        workers = emu.admin.client.json("GET", "/emulator/status")["server"]["workers"]
        if sum(w["connections"]["device"] for w in workers) >= device_connections or time.monotonic() > ends:
            return workers
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids, deadline: float = 15.0) -> list[int]:
    ends = time.monotonic() + deadline
    while time.monotonic() < ends and any(alive(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


# --------------------------------------------------------------------------- processes


def test_one_ready_line_names_the_supervisor_and_both_workers(emulator):
    ready = emulator.ready
    assert ready["pid"] == emulator.process.pid
    assert ready["workers"] == 2 and len(ready["worker_pids"]) == 2
    for pid in ready["worker_pids"]:
        assert alive(pid)
        assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == ready["pid"]
    endpoint = json.loads((emulator.home / "stub" / "endpoint.json").read_text())
    assert endpoint["worker_pids"] == ready["worker_pids"]
    assert "worker" not in ready
    assert "mqtt_url" in ready and "device_url" in ready and "service_url" in ready


def listening_pids(port: int) -> set[int]:
    """Processes holding a listening TCP socket on `port` (from /proc, IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    holders = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = {os.readlink(fd) for fd in fd_dir.iterdir()}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            holders.add(int(fd_dir.parent.name))
    return holders


def test_every_listener_is_shared_by_both_workers_and_the_dashboard_by_one(tmp_path):
    with Emulator.spawn(tmp_path / "emu", "--workers", "2", "--no-amqp") as emu:
        pids = set(emu.ready["worker_pids"])
        for key in ("device_url", "service_url", "mqtt_url"):
            port = int(emu.ready[key].rsplit(":", 1)[1])
            assert listening_pids(port) == pids, key
        dashboard = int(emu.ready["dashboard_url"].split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        assert listening_pids(dashboard) == {emu.ready["worker_pids"][0]}


def test_registrations_spread_over_both_workers(emulator, pki):
    root, devices = pki
    emulator.admin.upload_ca("workers-root", root.cert_pem, verified=True)
    emulator.admin.create_group("everyone", ca_ref="workers-root")
    outcomes = register_all(emulator, devices)
    assert [status for status, _ in outcomes] == [200] * DEVICES, outcomes
    assert all(reply["status"] == "assigned" for _, reply in outcomes)
    workers = worker_table(emulator, DEVICES)
    assert [w["pid"] for w in workers] == emulator.ready["worker_pids"]
    served = [w["connections"]["device"] for w in workers]
    assert sum(served) == DEVICES
    assert all(n > 0 for n in served), served  # one worker alone: 2 in a million
    assert emulator.admin.client.json("GET", "/emulator/status")["registrations"]["total"] == DEVICES


def test_an_admin_change_is_seen_at_once_by_every_worker(emulator, pki):
    root, devices = pki
    emulator.admin.upload_ca("workers-root", root.cert_pem, verified=True)
    # Every worker has walked (and cached) an empty set of groups first.
    assert {status for status, _ in register_all(emulator, devices)} == {401}
    emulator.admin.create_group("everyone", ca_ref="workers-root")
    outcomes = register_all(emulator, devices)
    assert [reply.get("status") for _, reply in outcomes] == ["assigned"] * DEVICES, outcomes
    emulator.admin.set_enabled("group", "everyone", False)
    outcomes = register_all(emulator, devices)
    assert [reply.get("status") for _, reply in outcomes] == ["disabled"] * DEVICES, outcomes
    served = [w["connections"]["device"] for w in worker_table(emulator, 3 * DEVICES)]
    assert all(n > 0 for n in served), served


def test_a_fault_plan_set_live_applies_on_every_worker(emulator, pki):
    root, devices = pki
    emulator.admin.upload_ca("workers-root", root.cert_pem, verified=True)
    emulator.admin.create_group("everyone", ca_ref="workers-root")
    plan = {"seed": 3, "rules": [{"match": {"operation": "register"}, "action": {"status": 503, "retry_after": 1}}]}
    emulator.admin.client.faults_set(plan)
    outcomes = register_all(emulator, devices)
    assert [status for status, _ in outcomes] == [503] * DEVICES
    served = [w["connections"]["device"] for w in worker_table(emulator, DEVICES)]
    assert all(n > 0 for n in served), served
    time.sleep(1.2)  # two publishing periods: every worker's counters are in the store
    shown = emulator.admin.client.faults_show()
    assert shown["workersCounted"] == 2
    assert shown["rules"][0]["matched"] == DEVICES and shown["rules"][0]["fired"] == DEVICES
    emulator.admin.client.faults_clear()
    assert [reply.get("status") for _, reply in register_all(emulator, devices)] == ["assigned"] * DEVICES


def test_sigterm_stops_every_worker(emulator):
    pids = emulator.ready["worker_pids"]
    assert emulator.stop(signal.SIGTERM) == 0
    assert wait_gone(pids) == []
    assert not (emulator.home / "stub" / "endpoint.json").exists()


def test_a_killed_supervisor_leaves_no_worker(emulator):
    pids = emulator.ready["worker_pids"]
    emulator.stop(signal.SIGKILL)
    assert wait_gone(pids) == []


def test_a_worker_that_dies_stops_the_emulator_with_a_failure(emulator):
    victim = emulator.ready["worker_pids"][1]
    os.kill(victim, signal.SIGKILL)
    code = emulator.process.wait(timeout=20)
    assert code == 1
    log = emulator.log.read_text()
    assert f"worker 1 (pid {victim}) was killed by SIGKILL; stopping the emulator" in log
    assert wait_gone(emulator.ready["worker_pids"]) == []


def test_workers_zero_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "device_sim.cli", "stub", "serve", "--home", str(tmp_path),
                             "--workers", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--workers 0" in lines[0], result.stderr


def test_a_port_held_by_another_emulator_is_refused_not_shared(tmp_path, emulator):
    """SO_REUSEPORT alone would let a second emulator take half the first one's connections."""
    port = str(emulator.device_port)
    result = subprocess.run([sys.executable, "-m", "device_sim.cli", "stub", "serve", "--home", str(tmp_path / "b"),
                             "--workers", "2", "--port", port, "--service-port", "0", "--no-mqtt", "--no-amqp",
                             "--no-dashboard"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"device API port {port} is in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# --------------------------------------------------------------------------- the shared store


def test_another_process_registering_does_not_rebuild_the_walk_view(tmp_path):
    one, other = Store(tmp_path / "stub.db"), Store(tmp_path / "stub.db")
    try:
        view = one.walk_view()
        row = RegistrationRow("dev-1", None, {"registrationId": "dev-1", "status": "assigned"}, {})
        other.save_registration(row, OperationRow("op-1", "dev-1", "ab" * 32, 0.0, {"status": "assigned"}))
        assert one.walk_view() is view
        other.put_entry("group", "g1", {"enrollmentGroupId": "g1"}, "etag", [], True)
        assert one.walk_view() is not view
    finally:
        one.close()
        other.close()


WRITER = """
import sys
from device_sim.stub.core.store import OperationRow, RegistrationRow, Store
store = Store(sys.argv[1])
name = sys.argv[2]
for i in range(int(sys.argv[3])):
    rid = f"{name}-{i}"
    store.save_registration(RegistrationRow(rid, None, {"registrationId": rid, "status": "assigned"}, {}),
                            OperationRow(f"op-{rid}", rid, "ab" * 32, 0.0, {"status": "assigned"}))
store.close()
"""


def test_writers_in_two_processes_never_see_sqlite_busy(tmp_path):
    """BEGIN IMMEDIATE and the busy timeout: concurrent commits wait, none fails."""
    path = tmp_path / "stub.db"
    Store(path).close()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, "400"],
                                stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    errors = [writer.communicate(timeout=120)[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], errors
    store = Store(path)
    try:
        assert store.counts()["registrations"]["total"] == 800
    finally:
        store.close()


def test_quota_budgets_are_split_between_workers():
    now = [0.0]
    quotas = Quotas(1, clock=lambda: now[0], workers=2)
    admitted = sum(quotas.admit_registration() is None for _ in range(1000))
    assert admitted == 500
    third = Quotas(1, clock=lambda: now[0], workers=3)
    assert sum(third.admit_registration() is None for _ in range(1000)) == 334


def test_the_service_budget_is_one_window_for_every_worker(tmp_path):
    """Two processes' stores on one file: 1,000 service operations a minute between them."""
    one, other = Store(tmp_path / "stub.db"), Store(tmp_path / "stub.db")
    try:
        now = [100.0]
        first = Quotas(1, clock=lambda: now[0], workers=2, shared=one)
        second = Quotas(1, clock=lambda: now[0], workers=2, shared=other)
        admitted = [(first if i % 3 else second).admit_service_operation() is None for i in range(1200)]
        assert admitted.count(True) == 1000
        now[0] += 30
        assert first.admit_service_operation() == 30  # Retry-After: until the oldest leaves
        now[0] += 30.5
        assert second.admit_service_operation() is None
    finally:
        one.close()
        other.close()


def test_each_worker_admits_its_share_of_the_registration_budget(tmp_path):
    """The wiring of server.py: a worker of two with one quota unit admits 500
    registrations per minute, and counts service operations in the shared window."""
    emu = Emulator.in_process(tmp_path / "emu", mqtt=False, worker=0, workers=2, quota_units=1)
    try:
        quotas = emu.app.device_api.quotas
        assert [quotas.admit_registration() is None for _ in range(501)].count(True) == 500
        service = emu.app.service_api.quotas
        assert [service.admit_service_operation() is None for _ in range(1001)].count(True) == 1000
        assert emu.app.store.admit_window("service", 1000, 60.0, time.monotonic()) is not None
    finally:
        emu.stop()


def test_stub_status_lists_each_worker_on_its_own_line(emulator):
    from .emulator_proc import stub_admin

    text = stub_admin(emulator, "status").stdout
    lines = [line for line in text.splitlines() if line.startswith("worker ")]
    assert [line.split("\t")[:2] for line in lines] == [
        [f"worker {index}", f"pid {pid}"] for index, pid in enumerate(emulator.ready["worker_pids"])]
    assert "[{" not in text  # no Python list repr
