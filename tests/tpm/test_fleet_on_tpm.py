"""Fleets on a TPM token (tpm2-pkcs11): `hsm-setup fleet create` of TPM-held identities,
`device-sim fleet run` of them over HTTPS, a TPM key registering over MQTT, and a TPM that
disappears in the middle of a fleet run (issue 10; token quirks in docs/token-quirks.md).

Every TPM here is one of this file's own and is used only by subprocesses, as a user runs
the tools: this process's libtpm2_pkcs11.so belongs to the session TPM (see conftest.py),
and python-pkcs11 keeps one library per path per process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_sim.testing import Emulator, StateDir, fleet_emulator, fleet_world
from device_sim.testing.tpm import SoftwareTpm
from hsm_setup.module import SOFTHSM_CANDIDATES

from .conftest import TEST_PIN, TEST_SO_PIN

REPO = Path(__file__).resolve().parents[2]
FLEET_SIZE = 20
# The variables of the session TPM (and of SoftHSM) that must not leak into a child that
# is meant to talk to another token.
FOREIGN_ENV = ("DBUS_", "TPM2_PKCS11_", "TPM2TOOLS_", "TSS2_", "SOFTHSM2_CONF", "PKCS11_")


def _softhsm_module() -> str:
    return next(p for p in SOFTHSM_CANDIDATES if Path(p).is_file())


def _state(home: Path, tpm: SoftwareTpm | None) -> StateDir:
    tpm_env = None if tpm is None else {**tpm.env, "PKCS11_MODULE": tpm.module_path}
    return StateDir(home, pin=TEST_PIN, so_pin=TEST_SO_PIN, without=FOREIGN_ENV, extra_env=tpm_env, cwd=REPO,
                    timeout=300)


@pytest.fixture(scope="module")
def tpm_fleet(tmp_path_factory):
    """20 devices on TPM shard tokens (default 10 per token) under a CA whose key is in the
    TPM too, and an emulator (HTTPS + MQTT) that trusts the CA."""
    work = tmp_path_factory.mktemp("tpm-fleet")
    with SoftwareTpm.start(work / "tpm", label="fleet-ca", user_pin=TEST_PIN, so_pin=TEST_SO_PIN) as tpm:
        home = work / "home"
        home.mkdir()
        state = _state(home, tpm)
        created = fleet_world(state, FLEET_SIZE, "tpmfl-", ca_token=None, ca_args=("--token", "fleet-ca"),
                              extra=("--token-prefix", "tpmshard"))
        softhsm = _softhsm_rate(work / "softhsm-home")
        print(f"\nfleet create, {FLEET_SIZE} ec-p256 identities: TPM {created['per_second']}/s "
              f"({created['seconds']} s), SoftHSM {softhsm['per_second']}/s ({softhsm['seconds']} s)")
        emulator = fleet_emulator(state, "--retry-after", "0", "--assignment-delay", "0", env=state.env)
        try:
            yield home, state, created, emulator
        finally:
            emulator.stop()


def _softhsm_rate(home: Path) -> dict:
    """The same `fleet create` on SoftHSM, for the figure beside the TPM's."""
    home.mkdir()
    return fleet_world(_state(home, None), FLEET_SIZE, "shfl-", ca_args=("--token", "ca"))


def test_fleet_create_puts_20_identities_on_tpm_shard_tokens(tpm_fleet):
    home, state, created, _ = tpm_fleet
    assert created["count"] == FLEET_SIZE
    assert created["tokens"] == ["tpmshard-001", "tpmshard-002"]
    assert created["per_second"] > 0
    listed = json.loads(state.hsm_setup("device", "show", "tpmfl-0020", "--json").stdout)
    assert listed["uri"].startswith("pkcs11:token=tpmshard-002;object=tpmfl-0020")
    # Run again: every identity is there already, nothing is made twice.
    again = state.fleet_create(FLEET_SIZE, "tpmfl-", "root", "--token-prefix", "tpmshard")
    assert again["count"] == 0 and again["kept"] == FLEET_SIZE


def test_fleet_run_of_tpm_held_devices_over_https(tpm_fleet, tmp_path):
    home, state, _, emulator = tpm_fleet
    report = tmp_path / "report.json"
    done = state.device_sim("fleet", "run", "--emulator", "--no-progress", "--prefix", "tpmfl-",
                            "--concurrency", 4, "--json", report)
    assert f"assigned {FLEET_SIZE}" in done.stdout, done.stdout
    data = json.loads(report.read_text())
    assert len(data["devices"]) == FLEET_SIZE
    assert data["summary"]["outcomes"] == {"assigned": FLEET_SIZE}
    assert all(d["tls_ms"] > 0 for d in data["devices"])
    assert emulator.admin.get_registration("tpmfl-0013")["status"] == "assigned"


def test_register_with_a_tpm_key_over_mqtt(tpm_fleet):
    _, state, _, _ = tpm_fleet
    done = state.device_sim("register", "tpmfl-0007", "--emulator", "--transport", "mqtt", "--json",
                            "--timeout", "60")
    answer = json.loads(done.stdout)
    assert answer["status"] == "assigned", answer


def _registered(emulator: Emulator, registration_id: str) -> bool:
    try:
        return emulator.admin.get_registration(registration_id).get("status") == "assigned"
    except Exception:  # not registered yet
        return False


def _assigned(emulator: Emulator) -> list[str]:
    ids = (f"gone-{n:04d}" for n in range(1, FLEET_SIZE + 1))
    return sorted(i for i in ids if _registered(emulator, i))


def test_a_tpm_that_disappears_mid_run_ends_the_affected_devices_and_the_run(tmp_path):
    """The CA is in SoftHSM (--ca-module): only the device token goes away."""
    with SoftwareTpm.start(tmp_path / "tpm", label="unused", user_pin=TEST_PIN,
                           so_pin=TEST_SO_PIN) as tpm:
        home = tmp_path / "home"
        home.mkdir()
        state = _state(home, tpm)
        softhsm = _softhsm_module()
        state.hsm_setup("token", "init", "ca", "--module", softhsm)
        state.hsm_setup("ca", "create", "root", "--token", "ca", "--module", softhsm)
        state.hsm_setup("fleet", "create", "--count", FLEET_SIZE, "--prefix", "gone-", "--ca", "root",
                        "--ca-module", softhsm, "--token-prefix", "goneshard", "--no-progress")
        emulator = fleet_emulator(state, "--retry-after", "0", "--assignment-delay", "1", "--no-mqtt", "--no-amqp",
                                  env=state.env)
        report = tmp_path / "report.json"
        try:
            run = subprocess.Popen(
                [sys.executable, "-m", "device_sim.cli", "fleet", "run", "--emulator", "--no-progress",
                 "--prefix", "gone-", "--concurrency", "2", "--timeout", "20", "--json", str(report)],
                cwd=REPO, env=state.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 60
                while not _registered(emulator, "gone-0001") and time.monotonic() < deadline:
                    assert run.poll() is None, run.communicate()
                    time.sleep(0.1)
                at_kill = _assigned(emulator)
                tpm.kill_tpm()
                killed_at = time.monotonic()
                out, err = run.communicate(timeout=120)  # nothing hangs
            finally:
                if run.poll() is None:
                    run.kill()
                    run.communicate()
            print(f"\nrun ended {time.monotonic() - killed_at:.1f} s after the TPM was killed")
            after = _assigned(emulator)
        finally:
            emulator.stop()
    assert run.returncode == 1, err
    assert "Traceback" not in err
    data = json.loads(report.read_text())
    devices = {d["registration_id"]: d for d in data["devices"]}
    assert len(devices) == FLEET_SIZE
    assigned = sorted(r for r, d in devices.items() if d["status"] == "assigned")
    failed = {r: d for r, d in devices.items() if d["status"] != "assigned"}
    assert "gone-0001" in assigned and failed, data["summary"]
    assert "gone-0001" in at_kill and set(at_kill) <= set(assigned)  # assigned before the kill stay so
    assert after == assigned  # the report and the emulator agree
    for registration_id, record in failed.items():
        message = record.get("error_message") or ""
        # setup_error: the TLS context (C_Login, key search) failed; tls_error: C_Sign did.
        assert record["status"] in ("setup_error", "tls_error"), record
        assert "the token failed" in message and "AWS_ERROR_PKCS11_CKR_" in message, record
        assert "Traceback" not in message and "RuntimeError" not in message and "\n" not in message
    print(f"assigned {len(assigned)}, failed {len(failed)}: "
          f"{sorted({d['error_message'] for d in failed.values()})}")
