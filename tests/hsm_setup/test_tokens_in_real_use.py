"""What real tokens need (issue 10): one login per token and run, a wrong PIN stops a fleet
before any device, PKCS#11 states as one line, CA and device tokens in different modules,
a repeatable `fleet create`, public objects read without a PIN, validity a user can see."""

import datetime as dt
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509

from device_sim.common.errors import UserError
from device_sim.device.identity import load_identity
from hsm_setup import devices, failures, module

from .test_any_module import SPY

needs_spy = pytest.mark.skipif(SPY is None, reason="OpenSC's pkcs11-spy.so is not installed")
REPO = Path(__file__).resolve().parents[2]
PIN, SO_PIN = "1234", "87654321"


def env_for(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "PKCS11_MODULE")}
    env.update({"DEVICE_SIM_HOME": str(home), "PKCS11_PIN": PIN, "PKCS11_SO_PIN": SO_PIN, **extra})
    return env


def run(env, program, *args, check=True):
    done = subprocess.run([sys.executable, "-m", program, *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def hsm(env, *args, **kw):
    return run(env, "device_sim.cli.hsm_setup", *args, **kw)


def spy_env(home: Path, log: Path, wrapped: str, **extra) -> dict:
    return env_for(home, PKCS11SPY=wrapped, PKCS11SPY_OUTPUT=str(log),
                   SOFTHSM2_CONF=str(home / module.SOFTHSM_CONF_NAME), **extra)


def calls(log: Path, name: str) -> int:
    return sum(1 for line in log.read_text(errors="replace").splitlines() if f" {name}" in line
               and line.split()[-1] == name) if log.exists() else 0


@needs_spy
def test_fleet_run_with_a_wrong_pin_logs_in_once_and_registers_nothing(tmp_path):
    from device_sim.testing import Emulator

    home = tmp_path / "home"
    env = env_for(home)
    hsm(env, "token", "init", "ca")
    hsm(env, "ca", "create", "root")
    hsm(env, "fleet", "create", "--count", 20, "--prefix", "pin-", "--ca", "root", "--per-token", 10,
        "--no-progress")
    emulator = Emulator.spawn(home, "--assignment-delay", "0")
    try:
        emulator.admin.upload_ca("root", (home / "pki" / "ca" / "root" / "cert.pem").read_bytes(), verified=True)
        emulator.admin.create_group("all", ca_ref="root")
        log = tmp_path / "spy.log"
        softhsm = module.resolve_module(None)
        done = run(spy_env(home, log, softhsm, PKCS11_PIN="wrong-pin-0"), "device_sim.cli", "fleet", "run",
                   "--emulator", "--no-progress", "--module", SPY, check=False)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "wrong user PIN for token 'fleet-001'" in lines[0], done.stderr
        assert "Traceback" not in done.stderr
        assert calls(log, "C_Login") == 1
        for rid in ("pin-0001", "pin-0010", "pin-0020"):
            with pytest.raises(UserError, match=f"no registration record for '{rid}'"):
                emulator.admin.get_registration(rid)
    finally:
        emulator.stop()


@needs_spy
def test_ca_token_in_another_module_signs_device_and_fleet_identities(tmp_path):
    """CA token behind pkcs11-spy (over its own copy of SoftHSM: one library can only be
    initialised once per process), device tokens in SoftHSM itself."""
    home = tmp_path / "home"
    softhsm = module.resolve_module(None)
    copy = tmp_path / "lib" / "libsofthsm2-ca.so"
    copy.parent.mkdir()
    shutil.copy(softhsm, copy)
    log = tmp_path / "spy.log"
    module.softhsm_conf(home)  # the spy's SoftHSM reads the state directory's configuration
    env = spy_env(home, log, str(copy))
    hsm(env, "token", "init", "ca", "--module", SPY)
    hsm(env, "ca", "create", "root", "--module", SPY)
    hsm(env, "token", "init", "devices")
    generated, signed = calls(log, "C_GenerateKeyPair"), calls(log, "C_SignInit")
    hsm(env, "device", "create", "dev-1", "--ca", "root", "--ca-module", SPY)
    assert calls(log, "C_GenerateKeyPair") == generated   # the device key is not made through the spy
    assert calls(log, "C_SignInit") == signed + 1              # the leaf is signed through it (C_Sign: twice, length then value)
    hsm(env, "fleet", "create", "--count", 4, "--prefix", "mix-", "--ca", "root", "--ca-module", SPY,
        "--per-token", 2, "--jobs", 2, "--no-progress")
    assert calls(log, "C_SignInit") == signed + 5
    root = x509.load_pem_x509_certificate((home / "pki" / "ca" / "root" / "cert.pem").read_bytes())
    for record in devices.list_devices(home):
        record.certificate_x509().verify_directly_issued_by(root)
    assert len(devices.list_devices(home)) == 5


def test_fleet_create_again_makes_exactly_the_missing_identities(tmp_path, monkeypatch):
    monkeypatch.setenv("PKCS11_PIN", PIN)
    home = tmp_path / "home"
    env = env_for(home)
    hsm(env, "token", "init", "ca")
    hsm(env, "ca", "create", "root")
    argv = ("fleet", "create", "--count", 12, "--prefix", "re-", "--ca", "root", "--per-token", 5,
            "--no-progress")
    hsm(env, *argv)
    # What a killed worker leaves: token objects without registry row or files.
    gone = ["re-0002", "re-0007", "re-0012"]
    with sqlite3.connect(devices.db_path(home)) as conn:
        conn.executemany("DELETE FROM devices WHERE registration_id = ?", [(g,) for g in gone])
    for rid in gone:
        for path in devices.pem_paths(home, rid):
            path.unlink()
    out = hsm(env, *argv).stdout
    assert out.startswith("3 device identities") and "9 made before were kept" in out
    records = devices.list_devices(home, prefix="re-")
    assert [r.registration_id for r in records] == [f"re-{n:04d}" for n in range(1, 13)]
    assert devices.count_by_token(home) == {"fleet-001": 5, "fleet-002": 5, "fleet-003": 2}
    for rid in gone:  # one key per label: the leftovers were removed
        assert load_identity(rid, home=home).key_label == rid
    assert "nothing to create" in hsm(env, *argv).stdout
    # an ID made outside this fleet is still refused
    hsm(env, "token", "init", "devices")
    hsm(env, "device", "create", "re-0013", "--ca", "root")
    refused = hsm(env, "fleet", "create", "--count", 13, "--prefix", "re-", "--ca", "root",
                  "--no-progress", check=False)
    assert refused.returncode == 2 and "exist already outside this fleet" in refused.stderr


def test_ca_show_prints_validity_and_short_ca_clamps_with_a_warning(softhsm_home):
    h = softhsm_home
    h.init_token("ca")
    h.init_token("devices")
    assert h.cli("ca", "create", "root", "--days", "1").code == 0
    shown = h.cli("ca", "show", "root")
    assert "not_before: " in shown.out and "not_after: " in shown.out
    made = h.cli("device", "create", "dev-1", "--ca", "root", "--days", "400")
    assert made.code == 0, made.err
    assert "warning: --days 400 ends after CA 'root'" in made.err
    leaf = devices.lookup_device(h.home, "dev-1").certificate_x509()
    ca_cert = x509.load_pem_x509_certificate((h.home / "pki" / "ca" / "root" / "cert.pem").read_bytes())
    assert leaf.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_ca_token_without_the_signing_mechanism_is_refused_up_front(softhsm_home):
    h = softhsm_home
    h.init_token("ca")
    h.init_token("devices")
    assert h.cli("ca", "create", "root").code == 0
    conf = h.home / module.SOFTHSM_CONF_NAME
    conf.write_text(conf.read_text().replace("slots.mechanisms = ALL", "slots.mechanisms = ALL,-CKM_ECDSA"))
    done = subprocess.run([sys.executable, "-m", "device_sim.cli.hsm_setup", "device", "create", "dev-1",
                           "--ca", "root"], env=env_for(h.home), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot sign" in lines[0] and "ECDSA" in lines[0], done.stderr
    assert devices.find_device(h.home, "dev-1") is None


def test_public_objects_are_read_without_a_pin(token_pki, monkeypatch):
    monkeypatch.delenv("PKCS11_PIN", raising=False)
    record = token_pki.devices["device-ec-p256"]
    identity = load_identity(record.registration_id, home=token_pki.home, login=False)
    assert identity.pin is None and identity.leaf == record.certificate_x509()
    assert identity.key_label == record.registration_id and identity.key_id == record.key_id
    uri = f"pkcs11:token=devices;object={record.registration_id}"
    by_uri = load_identity(uri, home=token_pki.home, login=False)
    assert by_uri.key_id == record.key_id and by_uri.ca_certs  # issuers found on the token
    with pytest.raises(UserError, match="no user PIN"):
        load_identity(record.registration_id, home=token_pki.home)  # with login: asks for the PIN


def test_validity_check_can_be_turned_off(token_pki, monkeypatch):
    monkeypatch.setenv("PKCS11_PIN", token_pki.pin)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=20 * 365)
    with pytest.raises(UserError, match="expired on"):
        load_identity("device-ec-p256", home=token_pki.home, now=later)
    identity = load_identity("device-ec-p256", home=token_pki.home, now=later, check_validity=False)
    assert identity.registration_id == "device-ec-p256"


def test_token_states_have_their_own_line():
    texts = {cls: str(failures.as_user_error(cls(), token="t")) for cls in
             (pkcs11.PinLocked, pkcs11.PinExpired, pkcs11.TokenNotPresent, pkcs11.DeviceRemoved)}
    assert len(set(texts.values())) == 4 and all("'t'" in t for t in texts.values())
    assert "locked" in texts[pkcs11.PinLocked] and "expired" in texts[pkcs11.PinExpired]
    assert "CKR_TOKEN_NOT_PRESENT" in texts[pkcs11.TokenNotPresent]
    assert "CKR_DEVICE_REMOVED" in texts[pkcs11.DeviceRemoved]
    assert failures.ckr_name(pkcs11.GeneralError()) == "CKR_GENERAL_ERROR"
    assert failures.ckr_name(pkcs11.SlotIDInvalid()) == "CKR_SLOT_ID_INVALID"
    assert str(failures.as_user_error(pkcs11.GeneralError(), doing="signing", token="ca")) == \
        "signing on token 'ca' failed: CKR_GENERAL_ERROR"
