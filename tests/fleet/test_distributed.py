"""`hsm-setup fleet create --scheduler` and `device-sim fleet run --scheduler` on a real Dask
cluster on loopback: a `dask scheduler`, two `dask worker` processes each with its own state
directory and SoftHSM tokens (device_sim/testing/dask.py), the CA in the coordinator's
token, the emulator as a subprocess (docs/fleet.md, "Across machines")."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest
from cryptography import x509

pytest.importorskip("distributed")

from device_sim.common.errors import EXIT_SOME_NOT_ASSIGNED, UserError  # noqa: E402
from device_sim.testing import StateDir, fleet_emulator  # noqa: E402
from device_sim.testing.dask import DaskCluster  # noqa: E402
from stub_server.emulator_proc import REPO  # noqa: E402

PER_WORKER = 10
IDS = [f"dk-{n:04d}" for n in range(1, 2 * PER_WORKER + 1)]
# The messages that may cross between coordinator and workers (device_sim/common/dask_shares.py).
KINDS = {"plan", "ids", "ready", "go", "record", "done", "exited", "stop", "csrs", "certs", "created"}


def private_keys(state) -> dict[str, list[str]]:
    """Token label -> labels of its private keys, read in a process of that state directory."""
    code = (
        "import json, os\n"
        "from pathlib import Path\n"
        "from pkcs11 import Attribute, ObjectClass\n"
        "from hsm_setup import tokens\n"
        "from hsm_setup.context import Pkcs11Context\n"
        "with Pkcs11Context(Path(os.environ['DEVICE_SIM_HOME'])) as ctx:\n"
        "    lib = ctx.library(None)\n"
        "    out = {}\n"
        "    for info in tokens.list_tokens(lib):\n"
        "        s = tokens.session(lib, info.label, os.environ['PKCS11_PIN'])\n"
        "        out[info.label] = sorted(o[Attribute.LABEL] for o in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))\n"
        "print(json.dumps(out))\n")
    return json.loads(state.python("-c", code).stdout)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("dask")
    coordinator = StateDir(base / "coordinator", cwd=REPO)
    workers = {name: StateDir(base / name, cwd=REPO) for name in ("w1", "w2")}
    coordinator.hsm_setup("token", "init", "ca")
    coordinator.hsm_setup("ca", "create", "root")
    transcript = base / "transcript.jsonl"
    cluster = DaskCluster(base / "cluster", transcript=transcript)
    try:
        for name, worker in workers.items():
            cluster.add_worker(name, env=worker.env, wait=False)
        cluster.wait_for_workers(len(workers))
        emulator = fleet_emulator(coordinator, "--retry-after", "0", "--no-amqp")
        try:
            yield {"coordinator": coordinator, "workers": workers, "cluster": cluster,
                   "emulator": emulator, "transcript": transcript}
        finally:
            emulator.stop()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def created(world):
    """The fleet, made once: PER_WORKER identities on each worker."""
    result = world["coordinator"].hsm_setup("fleet", "create", "--scheduler", world["cluster"].address,
                                            "--count", len(IDS), "--prefix", "dk-", "--ca", "root",
                                            "--per-token", 4, "--no-progress", "--json")
    return json.loads(result.stdout)


def registry(state) -> list[dict]:
    result = state.hsm_setup("device", "list", "--json")
    return json.loads(result.stdout)


def test_create_makes_each_share_in_its_workers_tokens_only(world, created):
    assert created["count"] == len(IDS)
    assert {n: w["created"] for n, w in created["workers"].items()} == {"w1": PER_WORKER, "w2": PER_WORKER}
    w1, w2 = (sorted(d["registration_id"] for d in registry(world["workers"][n])) for n in ("w1", "w2"))
    assert w1 == IDS[:PER_WORKER] and w2 == IDS[PER_WORKER:]
    for name, ids in (("w1", w1), ("w2", w2)):
        keys = private_keys(world["workers"][name])
        assert sorted(label for labels in keys.values() for label in labels) == ids
        assert set(keys) >= {"fleet-001", "fleet-002", "fleet-003"}  # 10 at 4 per token
    assert registry(world["coordinator"]) == []  # the coordinator keeps no device identity
    assert private_keys(world["coordinator"]) == {"ca": ["root"]}


def test_only_csrs_certificates_and_ids_crossed(world, created):
    messages = [m for line in world["transcript"].read_text().splitlines()
                for m in _messages(json.loads(line))]
    kinds = {m["kind"] for m in messages}
    assert {"csrs", "certs", "created"} <= kinds <= KINDS
    csrs = [r for m in messages if m["kind"] == "csrs" for r in m["csrs"]]
    certs = [c for m in messages if m["kind"] == "certs" for c in m["certs"]]
    assert sorted(r["id"] for r in csrs) == IDS == sorted(c["id"] for c in certs)
    for request in csrs:  # each is a CSR whose key matches the certificate sent back for it
        parsed = x509.load_der_x509_csr(base64.b64decode(request["csr"]))
        assert parsed.is_signature_valid
    for cert in certs:
        x509.load_der_x509_certificate(base64.b64decode(cert["certificate"]))
    text = world["transcript"].read_text()
    assert "PRIVATE KEY" not in text and '"pin"' not in text.lower()
    allowed = {"kind", "csrs", "certs", "count", "kept", "tokens", "devices", "code", "stderr", "ids",
               "record", "wall_s", "interrupted", "rate", "message", "worker"}
    assert {key for m in messages for key in m} <= allowed


def _messages(item):
    return item["messages"] if "messages" in item else [item]


def test_a_second_create_keeps_what_exists(world, created):
    result = world["coordinator"].hsm_setup("fleet", "create", "--scheduler", world["cluster"].address,
                                            "--count", len(IDS), "--prefix", "dk-", "--ca", "root",
                                            "--per-token", 4, "--no-progress", "--json")
    summary = json.loads(result.stdout)
    assert summary["count"] == 0 and summary["kept"] == len(IDS)


def test_run_merges_the_records_of_both_workers(world, created, tmp_path):
    report, plot = tmp_path / "report.json", tmp_path / "plot.html"
    result = world["coordinator"].device_sim("fleet", "run", "--scheduler", world["cluster"].address,
                                             "--emulator", "--no-progress", "--concurrency", 4, "--json", report,
                                             "--plot", plot)
    assert "assigned 20" in result.stdout and "worker w1: 10 devices: assigned 10" in result.stdout
    data = json.loads(report.read_text())
    assert sorted(d["registration_id"] for d in data["devices"]) == IDS
    assert {d["registration_id"]: d["worker"] for d in data["devices"]} == \
        {rid: ("w1" if rid in IDS[:PER_WORKER] else "w2") for rid in IDS}
    assert data["summary"]["outcomes"] == {"assigned": 20}
    assert {n: w["outcomes"] for n, w in data["workers"].items()} == \
        {"w1": {"assigned": 10}, "w2": {"assigned": 10}}
    assert "w1" in plot.read_text() and "w2" in plot.read_text()
    # The merged records went to the coordinator's records file as they came.
    lines = [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()]
    assert sorted((d["registration_id"], d["worker"]) for d in lines) == \
        sorted((d["registration_id"], d["worker"]) for d in data["devices"])
    assert data["records"] == str(tmp_path / "report.jsonl")


def test_options_of_the_coordinators_machine_are_refused(world):
    result = world["coordinator"].device_sim("fleet", "run", "--scheduler", world["cluster"].address,
                                             "--emulator", "--limit", 3, check=False)
    assert result.returncode == 2 and "--limit cannot go with --scheduler" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_scheduler_is_one_line(world):
    result = world["coordinator"].device_sim("fleet", "run", "--scheduler", "tcp://127.0.0.1:9",
                                             "--emulator", check=False, timeout=60)
    assert result.returncode != 0 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def _assigned_at_emulator(emulator, registration_id: str) -> bool:
    try:
        return emulator.admin.get_registration(registration_id).get("status") == "assigned"
    except UserError:
        return False


def test_a_killed_worker_has_its_unfinished_devices_reported_lost(world, created, tmp_path):
    emulator, cluster = world["emulator"], world["cluster"]
    if _assigned_at_emulator(emulator, IDS[PER_WORKER]):  # from an earlier test: to see w2 start
        emulator.admin.delete_registration(IDS[PER_WORKER])
    report = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, "-m", "device_sim.cli", "fleet", "run", "--scheduler", cluster.address,
                             "--emulator", "--no-progress", "--concurrency", "1", "--rate", "4", "--json", str(report)],
                            cwd=REPO, env=world["coordinator"].env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 40  # kill w2 once its first device is through (2/s each)
        while not _assigned_at_emulator(emulator, IDS[PER_WORKER]) and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.05)
        cluster.kill_worker("w2")
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.add_worker("w2", env=world["workers"]["w2"].env)  # the cluster as the other tests expect it
    assert proc.returncode == EXIT_SOME_NOT_ASSIGNED, (proc.returncode, out, err)
    data = json.loads(report.read_text())
    by_worker = {n: [d for d in data["devices"] if d["worker"] == n] for n in ("w1", "w2")}
    assert sorted(d["registration_id"] for d in data["devices"]) == IDS  # nothing silently missing
    assert {d["status"] for d in by_worker["w1"]} == {"assigned"}
    lost = [d for d in by_worker["w2"] if d["status"] == "lost"]
    # w2 was killed after its first device was assigned and well before its last (2/s):
    # how many records reached the coordinator first depends on the forwarding, not the rest.
    assert len(lost) >= PER_WORKER // 2 and data["workers"]["w2"]["lost"] is True
    assert {d["status"] for d in by_worker["w2"]} <= {"assigned", "lost"}
    for device in by_worker["w2"]:
        if device["status"] == "assigned":
            assert _assigned_at_emulator(emulator, device["registration_id"])
    assert data["summary"]["outcomes"]["lost"] == len(lost)
    assert "(lost)" in out



def test_a_worker_without_a_pin_is_named_in_one_line(world, created, tmp_path):
    """Last of the cluster tests: w1 and w2 get identities of another prefix."""
    cluster = world["cluster"]
    cluster.add_worker("w3", env=StateDir(tmp_path / "w3", pin=None).env)
    try:
        result = world["coordinator"].hsm_setup("fleet", "create", "--scheduler", cluster.address,
                                                "--count", 3, "--prefix", "np-", "--ca", "root", "--no-progress",
                                                check=False)
    finally:
        cluster.kill_worker("w3")
    assert result.returncode == 2, result.stderr
    assert "worker w3: no user PIN on this worker: set $PKCS11_PIN in the environment of its 'dask worker'" \
        in result.stderr and "2 identities were created" in result.stderr
    assert "Traceback" not in result.stderr

def test_shares_are_contiguous_and_differ_by_one_at_most():
    from device_sim.common.dask_shares import split

    assert split(20, 2) == [(0, 10), (10, 20)]
    assert split(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert split(1, 3) == [(0, 1), (1, 1), (1, 1)]


def test_an_id_planned_on_two_workers_stops_the_run(tmp_path):
    from device_sim.fleet.distributed import _Plan

    plan = _Plan(tmp_path / "plan.sqlite", ["w1", "w2"])
    plan.add(0, ["dk-0001", "dk-0002"])
    with pytest.raises(UserError, match="'DK-0002' is in the state directories of workers w1 and w2"):
        plan.add(1, ["dk-0003", "DK-0002"])
    plan.done("dk-0001")
    assert plan.undone(0) == ["dk-0002"]
