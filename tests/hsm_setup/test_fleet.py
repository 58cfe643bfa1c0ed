"""fleet create: shard tokens, registry, chains, refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from pkcs11 import Attribute, ObjectClass

from hsm_setup import ca, devices, fleet, tokens
from device_sim.common.errors import UserError

from .verify import verify_client_chain


def test_plan_fills_existing_shards_first():
    plan = fleet.plan_shards([f"d{i}" for i in range(7)], per_token=3, token_prefix="f",
                             filled={"f-001": 3, "f-002": 1})
    assert plan == [("f-002", ["d0", "d1"]), ("f-003", ["d2", "d3", "d4"]), ("f-004", ["d5", "d6"])]


def test_ids_are_padded_and_validated():
    assert fleet.fleet_ids("dev-", 3) == ["dev-0001", "dev-0002", "dev-0003"]
    assert fleet.fleet_ids("d", 2, start=99999)[-1] == "d100000"
    with pytest.raises(UserError, match="invalid registration ID"):
        fleet.fleet_ids("bad prefix ", 2)
    with pytest.raises(UserError, match="limit is 64"):
        fleet.fleet_ids("x" * 61, 2)
    with pytest.raises(UserError, match="--count"):
        fleet.fleet_ids("d", 0)


def test_fleet_create_over_shard_tokens(softhsm_home):
    h = softhsm_home
    h.init_token("ca")
    assert h.cli("ca", "create", "root").code == 0
    assert h.cli("ca", "create", "factory", "--parent", "root").code == 0
    result = h.cli("fleet", "create", "--count", "7", "--prefix", "sim-", "--ca", "factory",
                   "--per-token", "3", "--json", "--no-progress")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["count"] == 7
    assert summary["tokens"] == ["fleet-001", "fleet-002", "fleet-003"]
    records = devices.list_devices(h.home, prefix="sim-")
    assert [r.registration_id for r in records] == [f"sim-000{i}" for i in range(1, 8)]
    assert devices.count_by_token(h.home) == {"fleet-001": 3, "fleet-002": 3, "fleet-003": 1}
    root = x509.load_der_x509_certificate(records[0].chain[-1])
    for record in records:
        chain = record.chain_x509()
        verify_client_chain(record.certificate_x509(), chain[:-1], root)
        # 3 objects per identity on the shard, all with the registry's CKA_ID
        session = h.session(record.token_label)
        assert len(list(session.get_objects({Attribute.ID: record.key_id}))) == 3

    # a second run fills fleet-003 first, then opens fleet-004
    result = h.cli("fleet", "create", "--count", "3", "--prefix", "sim-", "--start", "8",
                   "--ca", "factory", "--per-token", "3", "--no-progress")
    assert result.code == 0, result.err
    assert devices.count_by_token(h.home) == {"fleet-001": 3, "fleet-002": 3, "fleet-003": 3,
                                              "fleet-004": 1}
    # recorded slot IDs are the lasting ones (what a new process sees), not provisional ones
    slots = {t.label: t.slot_id for t in tokens.list_tokens(h.lib(fresh=True))}
    assert all(r.slot_id == slots[r.token_label] for r in devices.list_devices(h.home))


def test_fleet_refuses_existing_ids_before_writing(softhsm_home):
    h = softhsm_home
    h.init_token("ca")
    h.init_token("devices")
    assert h.cli("ca", "create", "root").code == 0
    assert h.cli("device", "create", "SIM-0002", "--ca", "root").code == 0
    result = h.cli("fleet", "create", "--count", "3", "--prefix", "sim-", "--ca", "root", "--no-progress")
    assert result.code == 2
    assert "exist already" in result.err and "SIM-0002" in result.err
    assert {t.label for t in tokens.list_tokens(h.lib())} == {"ca", "devices"}  # no shard made
    assert [r.registration_id for r in devices.list_devices(h.home)] == ["SIM-0002"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_stops_between_identities(softhsm_home, jobs):
    """A stopped run keeps only whole identities: every registry row has its 3 objects, no extras."""
    h = softhsm_home
    h.init_token("ca")
    assert h.cli("ca", "create", "root").code == 0
    env = dict(os.environ, SOFTHSM2_CONF=str(h.home / "softhsm2.conf"))
    cli = Path(sys.executable).with_name("hsm-setup")
    proc = subprocess.Popen([str(cli), "fleet", "create", "--count", "300", "--prefix", "s-", "--ca", "root",
                             "--jobs", str(jobs), "--per-token", "150", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(devices.list_devices(h.home)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    records = devices.list_devices(h.home)
    assert 4 <= len(records) < 300
    by_id: dict[bytes, set] = {}
    lib = h.lib(fresh=True)  # the shard tokens were made by the subprocess
    for label in ("fleet-001", "fleet-002"):
        if tokens.find_token(lib, label, required=False) is None:
            continue
        for obj in h.session(label).get_objects():
            if obj[Attribute.CLASS] != ObjectClass.DATA:
                by_id.setdefault(bytes(obj[Attribute.ID]), set()).add(obj[Attribute.CLASS])
    ca_ids = {c.key_id for c in ca.list_cas(h.home)}
    identity_ids = {k for k in by_id if k not in ca_ids}
    assert identity_ids == {r.key_id for r in records}
    assert all(by_id[k] == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY, ObjectClass.CERTIFICATE}
               for k in identity_ids)
    assert len(list(devices.pem_dir(h.home).iterdir())) == 2 * len(records)
